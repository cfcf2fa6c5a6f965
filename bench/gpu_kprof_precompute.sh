#!/usr/bin/env bash
# Kernel-level profile of the VAE encoder pass, precompute (ONNX Runtime CUDA EP) vs PyTorch
# (eager / torch.compile) on the same images, model and card (issue 6), with tools/cuda/kprof
# (CUPTI, injected with CUDA_INJECTION64_PATH; the last KPROF_LAST_S seconds of GPU activity).
# Run on the GPU machine after bench/gpu_precompute_vs_torch.sh has made the exports and the JPEG
# folder in $WORK (or let this script run it with SETTINGS="" TORCH_MODES="" first: SETUP=1).
#   RES=512 B=16 bash bench/gpu_kprof_precompute.sh
# Environment: WHO="default optimized eager compile" (precompute settings: `default` = the plain
#   export, `optimized` = the --optimize export; torch modes), KP (kprof.so; default .carry/lib or
#   $BIN/../lib), PRECOMPUTE_FLAGS (more precompute flags).
# Writes $OUT/kprof-pc-WHO-RES.tsv and $OUT/kprof-pc.md (report.py; times per image).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/data/bench}
OUT=${OUT:-$WORK/out}
BIN=${BIN:-.carry/bin}
PY=${PY:-/opt/torch/.venv/bin/python}
RES=${RES:-512}; B=${B:-16}
WHO=${WHO:-default compile}
export KPROF_LAST_S=${KPROF_LAST_S:-3}
KP=${KP:-$PWD/$BIN/../lib/kprof.so}
mkdir -p "$OUT"
if [[ ${SETUP:-1} == 1 ]]; then
  RES_LIST=$RES SETTINGS="${SETUP_SETTINGS:-optimized}" TORCH_MODES="" DECODE_ONLY=0 BIN=$BIN OUT=$OUT/setup \
    bash bench/gpu_precompute_vs_torch.sh > "$OUT/setup.log" 2>&1 || tail -5 "$OUT/setup.log"
fi
# shellcheck disable=SC1091
source tools/cuda/gpu-env.sh > /dev/null
export LD_LIBRARY_PATH="$(dirname "$KP"):$LD_LIBRARY_PATH"
PATH="$BIN:$PATH"
[[ -n ${ORT_DYLIB_PATH:-} ]] || for f in /opt/ort/libonnxruntime.so.*; do [[ -e $f ]] && export ORT_DYLIB_PATH=$f; done
files=() per=()
for who in $WHO; do
  tsv=$OUT/kprof-pc-$who-$RES.tsv
  case $who in
    default | optimized)
      onnx=$WORK/sdxl_random_fp16.onnx; [[ $who == optimized ]] && onnx=$WORK/sdxl_random_fp16_opt.onnx
      rm -rf "$WORK/kp-lat"
      # shellcheck disable=SC2086
      CUDA_INJECTION64_PATH=$KP KPROF_OUT=$tsv timeout 240 precompute --vae sdxl --onnx "$onnx" \
        --images "$WORK/img$RES" --out "$WORK/kp-lat" --device cuda --resolution "$RES" --batch-size "$B" \
        --quiet ${PRECOMPUTE_FLAGS:-} > "$OUT/kprof-pc-$who-$RES.log" 2>&1
      rate=$(grep -oP "throughput\s+\K[0-9.]+" "$OUT/kprof-pc-$who-$RES.log") ;;
    eager | compile)
      CUDA_INJECTION64_PATH=$KP KPROF_OUT=$tsv timeout 240 "$PY" bench/torch_vae_encode.py --images "$WORK/img$RES" \
        --resolution "$RES" --batch "$B" --mode "$who" --gpu-only-iters 0 > "$OUT/kprof-pc-$who-$RES.log" 2>&1
      rate=$(grep '^{' "$OUT/kprof-pc-$who-$RES.log" | tail -1 | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["images_per_s"])') ;;
    *) echo "unknown: $who"; continue ;;
  esac
  echo "$who at $RES: ${rate:-?} images/s under the profiler"; tail -2 "$OUT/kprof-pc-$who-$RES.log"
  win=$(awk -F'\t' '/^# window_ms/ {print $2}' "$tsv" 2>/dev/null)
  # images in the window = window seconds x rate: report.py's "steps" here are images.
  files+=("$tsv"); per+=("$("$PY" -c "print(${win:-0} / 1000 * ${rate:-1})")")
done
python3 tools/cuda/kprof/report.py "${files[@]}" --steps "${per[@]}" --top "${TOP:-30}" | tee "$OUT/kprof-pc.md"
