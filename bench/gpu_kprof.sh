#!/usr/bin/env bash
# Kernel-level profile of one training step, ours vs the PyTorch reference, on one GPU (no Nsight
# needed): each process runs under tools/cuda/kprof (CUPTI activity tracing, injected with
# CUDA_INJECTION64_PATH) and writes the last KPROF_LAST_S seconds of kernels, aggregated by name.
# Build first (here): tools/cuda/build.sh -p train --features cudnn --example gpu_bench and
# tools/cuda/kprof/build.sh. Run on the GPU machine (device tool: carry [".carry"]):
#   CASES="full 256 32" PRECISION=bf16 bash bench/gpu_kprof.sh     (WHO="ours torch": which to run; OURS_ARGS: more gpu_bench flags)
# Writes $OUT/kprof-{ours,torch}-RECIPE-SIZE.tsv (raw), $OUT/kprof.jsonl (the benches' JSON lines),
# $OUT/kprof.log (stderr) and $OUT/kprof.md (tools/cuda/kprof/report.py).
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source tools/cuda/gpu-env.sh >/dev/null
set -uo pipefail
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
PY=${TORCH_PY:-/opt/torch/.venv/bin/python}
export KPROF_LAST_S=${KPROF_LAST_S:-4}
KP=$PWD/.carry/lib/kprof.so
report=()
while read -r recipe size batch; do
  [[ -n $recipe ]] || continue
  a=(--size "$size" --batch "$batch" --recipe "$recipe" --steps "${STEPS:-40}" --seconds 8 --warmup 4)
  for who in ${WHO:-ours torch}; do
    tag=$who-$recipe-$size
    if [[ $who == ours ]]; then
      cmd=(gpu_bench "${a[@]}" --precision "${PRECISION:-bf16}" ${OURS_ARGS:-})
    else
      cmd=("$PY" bench/torch_train_step.py "${a[@]}" --mode "${TORCH_MODE:-amp}")
    fi
    line=$(CUDA_INJECTION64_PATH=$KP KPROF_OUT=$OUTDIR/kprof-$tag.tsv timeout 120 "${cmd[@]}" \
      2>>"$OUTDIR/kprof.log" | tail -1)
    echo "$line" | tee -a "$OUTDIR/kprof.jsonl"
    ms=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ms_per_step"])' "$line" 2>/dev/null)
    win=$(awk -F'\t' '/^# window_ms/ {print $2}' "$OUTDIR/kprof-$tag.tsv" 2>/dev/null)
    steps=$(python3 -c "print(${win:-0} / ${ms:-1})" 2>/dev/null || echo 1)
    report+=("$OUTDIR/kprof-$tag.tsv:$steps")
  done
done <<<"${CASES:-full 256 32}"
files=() steps=()
for r in "${report[@]}"; do files+=("${r%:*}"); steps+=("${r##*:}"); done
python3 tools/cuda/kprof/report.py "${files[@]}" --steps "${steps[@]}" --top "${TOP:-30}" | tee "$OUTDIR/kprof.md"
