#!/usr/bin/env bash
# precompute (ONNX Runtime CUDA, end to end: JPEG folder -> shards) vs the same SDXL VAE encoder in
# PyTorch eager and torch.compile, side by side on the GPU machine (issue 6). No network, no Rust
# there: the precompute binary, the ORT CUDA bundle and the diffusers wheels are carried.
#
#   bash bench/gpu_precompute_vs_torch.sh            (repository root; results in $OUT/results.txt)
#
# Environment (defaults):
#   POOL=/data/pool            source images; JPEG folders of N512 / N1024 images are made from them
#   WORK=/data/bench           scratch: exports, JPEG folders, outputs (reused by a later call on the
#                              same warm machine: exports and folders are only made once)
#   OUT=${OUT:-$WORK/out}      results.txt, results.jsonl, logs/
#   BIN=.carry/bin             precompute (or precompute.xz); tools/cuda/gpu-env.sh is sourced for
#                              the CUDA libraries and ORT_DYLIB_PATH (/opt/ort)
#   PY=/opt/torch/.venv/bin/python   WHL=.whl (diffusers and its dependencies, pip-downloaded here)
#   RES_LIST="512 1024"        N512=1024 B512=16   N1024=256 B1024=4
#   SETTINGS="default optimized optimized-no-bias-fold"   (see setting_flags below; optimized* use the
#                              tools/export_vae_onnx.py --optimize [--no-fold-conv-bias] exports)
#   TORCH_MODES="eager compile"   STEP_TIMEOUT=240 (seconds, each step)   DECODE_ONLY=1   DEVICE=cuda
# To stay under the device tool's 10 minutes per call, run it once per resolution:
#   RES_LIST=512 bash bench/gpu_precompute_vs_torch.sh; RES_LIST=1024 bash bench/gpu_precompute_vs_torch.sh
# (results.jsonl in $WORK accumulates; each call prints the table of everything so far).
set -uo pipefail
cd "$(dirname "$0")/.."
POOL=${POOL:-/data/pool}
WORK=${WORK:-/data/bench}
OUT=${OUT:-$WORK/out}
BIN=${BIN:-.carry/bin}
PY=${PY:-/opt/torch/.venv/bin/python}
WHL=${WHL:-.whl}
RES_LIST=${RES_LIST:-512 1024}
N512=${N512:-1024}; B512=${B512:-16}; N1024=${N1024:-256}; B1024=${B1024:-4}
SETTINGS=${SETTINGS:-default optimized optimized-no-bias-fold}
TORCH_MODES=${TORCH_MODES:-eager compile}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
DECODE_ONLY=${DECODE_ONLY:-1}
DEVICE=${DEVICE:-cuda}   # cpu: a dry run of the script without a GPU (with a fake nvidia-smi)
mkdir -p "$WORK" "$OUT/logs"
RESULTS=$WORK/results.jsonl
LOG=$OUT/logs
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "!! $*"; echo "{\"step\": \"$1\", \"failed\": $(printf '%s' "$2" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}" >> "$RESULTS"; }

say "machine: $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
say "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1 | tail -1)"

# --- setup: libraries, binary, diffusers -------------------------------------------------------
if [[ -f tools/cuda/gpu-env.sh ]]; then
  source tools/cuda/gpu-env.sh > "$LOG/gpu-env.txt" 2>&1 || true
  grep -E "missing|NOT FOUND|ORT_DYLIB" "$LOG/gpu-env.txt"
fi
PATH="$BIN:$PATH"
if [[ ! -x $BIN/precompute && -f $BIN/precompute.xz ]]; then xz -dc "$BIN/precompute.xz" > "$BIN/precompute" && chmod 755 "$BIN/precompute"; fi
if [[ -z ${ORT_DYLIB_PATH:-} ]]; then for f in /opt/ort/libonnxruntime.so.*; do [[ -e $f ]] && export ORT_DYLIB_PATH=$f; done; fi
command -v precompute > /dev/null || fail setup "no precompute binary in $BIN"
say "precompute: $(command -v precompute) ($(precompute --version 2>&1)); ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-unset}"
if ! "$PY" -c 'import diffusers' 2> /dev/null; then
  say "installing diffusers from $WHL"
  timeout 120 "$PY" -m pip install -q --no-index --find-links "$WHL" diffusers pillow > "$LOG/pip.txt" 2>&1 \
    || { tail -5 "$LOG/pip.txt"; fail setup "pip install diffusers from $WHL failed"; }
fi
"$PY" -c 'import diffusers, PIL, onnx; print("diffusers", diffusers.__version__, "pillow", PIL.__version__, "onnx", onnx.__version__)' 2>&1 | tail -1

# --- (a) exports --------------------------------------------------------------------------------
ONNX_PLAIN=$WORK/sdxl_random_fp16.onnx
ONNX_OPT=$WORK/sdxl_random_fp16_opt_fold.onnx        # --optimize (with its conv-bias fold)
ONNX_OPT_NOFOLD=$WORK/sdxl_random_fp16_opt.onnx       # --optimize --no-fold-conv-bias
export_one() { # out, extra flags
  local out=$1; shift
  [[ -s $out ]] && { say "export: $out already there"; return 0; }
  say "export: $out $*"
  if timeout "$STEP_TIMEOUT" "$PY" tools/export_vae_onnx.py --random-init sdxl --dtype fp16 --out "$out.part" "$@" \
      > "$LOG/export-$(basename "$out").txt" 2>&1; then
    mv "$out.part" "$out"; tail -1 "$LOG/export-$(basename "$out").txt" | cut -c1-400
  else
    tail -5 "$LOG/export-$(basename "$out").txt"; fail "export $(basename "$out")" "$(tail -2 "$LOG/export-$(basename "$out").txt")"
  fi
}
export_one "$ONNX_PLAIN"
[[ " $SETTINGS " == *" optimized"* ]] && export_one "$ONNX_OPT" --optimize
[[ " $SETTINGS " == *" optimized-no-bias-fold "* ]] && export_one "$ONNX_OPT_NOFOLD" --optimize --no-fold-conv-bias

# --- (b) JPEG folders ---------------------------------------------------------------------------
for res in $RES_LIST; do
  n=$([[ $res == 512 ]] && echo "$N512" || echo "$N1024")
  dir=$WORK/img$res
  if [[ $(ls "$dir" 2> /dev/null | wc -l) -ne $n ]]; then
    say "making $n JPEGs of ${res}x$res in $dir"
    rm -rf "$dir"; mkdir -p "$dir"
    timeout "$STEP_TIMEOUT" "$PY" - "$POOL" "$dir" "$res" "$n" << 'PY' || fail "jpegs $res" "making the JPEG folder failed"
import os, sys
from concurrent.futures import ProcessPoolExecutor
from PIL import Image, ImageOps
pool, dst, res, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
src = sorted(f for f in os.listdir(pool) if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))
def make(i):
    f = src[i % len(src)]
    try:
        im = ImageOps.exif_transpose(Image.open(os.path.join(pool, f))).convert("RGB")
        w, h = im.size; s = res / min(w, h)
        im = im.resize((max(res, round(w * s)), max(res, round(h * s))), Image.LANCZOS)
        w, h = im.size; x, y = (w - res) // 2, (h - res) // 2
        im.crop((x, y, x + res, y + res)).save(os.path.join(dst, f"{i:05d}-{os.path.splitext(f)[0]}.jpg"), quality=95)
        return 1
    except Exception as e:
        print("skip", f, e, file=sys.stderr); return 0
i, made = 0, 0
with ProcessPoolExecutor(os.cpu_count()) as ex:
    while made < n and i < n + len(src):
        k = n - made
        made += sum(ex.map(make, range(i, i + k))); i += k
print(f"{made} images in {dst}")
PY
  fi
done

# --- helpers: GPU utilisation sampling ----------------------------------------------------------
SMI_PID=
smi_start() { nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$1" 2> /dev/null & SMI_PID=$!; }
smi_stop() { [[ -n $SMI_PID ]] && kill "$SMI_PID" 2> /dev/null; wait "$SMI_PID" 2> /dev/null; SMI_PID=; }
# busy FILE T_START T_END: mean utilization.gpu of the samples inside [T_START, T_END] (epoch s)
busy() {
  "$PY" - "$@" << 'PY'
import sys, datetime
f, a, b = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
u = []
for line in open(f):
    try:
        ts, val = [x.strip() for x in line.split(",")[:2]]
        t = datetime.datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
        if a <= t <= b: u.append(float(val))
    except Exception:
        pass
print(f"{sum(u)/len(u):.1f} {len(u)}" if u else "nan 0")
PY
}

setting_flags() { # the precompute flags of one named setting (besides the common ones)
  case $1 in
    default) echo "" ;;                                   # the defaults: heuristic conv search, no io binding
    io-binding) echo "--io-binding true" ;;
    io-binding-off) echo "--io-binding false" ;;
    exhaustive) echo "--conv-search exhaustive" ;;
    nhwc) echo "--nhwc true" ;;
    static) echo "--static-shapes true" ;;
    cuda-graph) echo "--io-binding true --cuda-graph true" ;;
    heuristic) echo "--conv-search heuristic" ;;
    optimized) echo "" ;;                                 # the --optimize export (conv biases folded), default flags
    optimized-cuda-graph) echo "--io-binding true --cuda-graph true" ;;
    optimized-no-bias-fold) echo "" ;;                    # the --optimize --no-fold-conv-bias export
    optimized-fuse-bias) echo "--cuda-option fuse_conv_bias=1" ;;          # cuDNN frontend conv+bias
    optimized-max-workspace) echo "--cuda-option cudnn_conv_use_max_workspace=1" ;;
    optimized-exhaustive) echo "--conv-search exhaustive" ;;
    fuse-bias) echo "--cuda-option fuse_conv_bias=1" ;;
    *) echo "UNKNOWN" ;;
  esac
}

for res in $RES_LIST; do
  n=$([[ $res == 512 ]] && echo "$N512" || echo "$N1024")
  b=$([[ $res == 512 ]] && echo "$B512" || echo "$B1024")
  imgs=$WORK/img$res

  # --- decode-only: the CPU side alone ----------------------------------------------------------
  if [[ $DECODE_ONLY == 1 ]]; then
    say "precompute --decode-only at $res"
    if timeout "$STEP_TIMEOUT" precompute --vae sdxl --images "$imgs" --resolution "$res" --batch-size "$b" --decode-only --quiet \
        > "$LOG/decode-$res.txt" 2>&1; then
      rate=$(grep -oP "decode rate\s+\K[0-9.]+" "$LOG/decode-$res.txt")
      echo "   $(grep "decode rate" "$LOG/decode-$res.txt")"
      echo "{\"tool\": \"precompute\", \"setting\": \"decode-only ($(nproc) cores)\", \"resolution\": $res, \"batch\": $b, \"images_per_s\": ${rate:-null}, \"gpu_busy\": null}" >> "$RESULTS"
    else
      tail -5 "$LOG/decode-$res.txt"; fail "decode-only $res" "$(tail -2 "$LOG/decode-$res.txt")"
    fi
  fi

  # --- (c) precompute end to end ----------------------------------------------------------------
  for s in $SETTINGS; do
    flags=$(setting_flags "$s")
    [[ $flags == UNKNOWN ]] && { fail "$s" "unknown setting"; continue; }
    onnx=$ONNX_PLAIN; [[ $s == optimized* ]] && onnx=$ONNX_OPT; [[ $s == optimized-no-bias-fold ]] && onnx=$ONNX_OPT_NOFOLD
    [[ -s $onnx ]] || { fail "precompute $s $res" "no $onnx"; continue; }
    out=$WORK/lat-$res-$s; rm -rf "$out"
    say "precompute $s at $res (batch $b, $n images)"
    smi_start "$LOG/smi-precompute-$s-$res.csv"
    # shellcheck disable=SC2086
    timeout "$STEP_TIMEOUT" precompute --vae sdxl --onnx "$onnx" --images "$imgs" --out "$out" --device "$DEVICE" \
      --resolution "$res" --batch-size "$b" --quiet $flags > "$LOG/precompute-$s-$res.txt" 2>&1
    rc=$?; t_end=$(date +%s.%N); smi_stop
    if [[ $rc -ne 0 ]]; then
      tail -5 "$LOG/precompute-$s-$res.txt"; fail "precompute $s $res" "exit $rc: $(tail -2 "$LOG/precompute-$s-$res.txt")"; continue
    fi
    grep -E "teacher on|throughput|pipeline|skipped|rows " "$LOG/precompute-$s-$res.txt" | sed 's/^/   /'
    rate=$(grep -oP "throughput\s+\K[0-9.]+" "$LOG/precompute-$s-$res.txt")
    secs=$(grep -oP "rows/s over \K[0-9.]+" "$LOG/precompute-$s-$res.txt")
    tbusy=$(grep -oP "teacher busy \K[0-9]+" "$LOG/precompute-$s-$res.txt")
    skipped=$(grep -oP "skipped\s+\K[0-9]+" "$LOG/precompute-$s-$res.txt")
    warm=$(grep -oP "warm-up \K[0-9.]+" "$LOG/precompute-$s-$res.txt")
    read -r gb ns < <(busy "$LOG/smi-precompute-$s-$res.csv" "$("$PY" -c "print($t_end - ${secs:-0})")" "$t_end")
    echo "   GPU busy ${gb}% (nvidia-smi, $ns samples over the timed ${secs}s)"
    [[ $gb == nan ]] && gb=null
    echo "{\"tool\": \"precompute\", \"setting\": \"$s\", \"resolution\": $res, \"batch\": $b, \"images\": $n, \"images_per_s\": ${rate:-null}, \"seconds\": ${secs:-null}, \"gpu_busy\": $gb, \"teacher_busy\": ${tbusy:-null}, \"skipped\": ${skipped:-null}, \"warmup_s\": ${warm:-null}}" >> "$RESULTS"
  done

  # --- (d) PyTorch eager / torch.compile --------------------------------------------------------
  for m in $TORCH_MODES; do
    say "torch $m at $res (batch $b)"
    smi_start "$LOG/smi-torch-$m-$res.csv"
    timeout "$STEP_TIMEOUT" "$PY" bench/torch_vae_encode.py --images "$imgs" --resolution "$res" --batch "$b" --mode "$m" \
      --save-latents "$WORK/torch-$m-$res-first.npy" > "$LOG/torch-$m-$res.txt" 2>&1
    rc=$?; smi_stop
    line=$(grep '^{' "$LOG/torch-$m-$res.txt" | tail -1)
    if [[ $rc -ne 0 || -z $line ]]; then
      tail -5 "$LOG/torch-$m-$res.txt"; fail "torch $m $res" "exit $rc: $(tail -2 "$LOG/torch-$m-$res.txt")"; continue
    fi
    echo "   $line" | cut -c1-400
    read -r ta tb < <(echo "$line" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["t_start"], d["t_end"])')
    read -r gb ns < <(busy "$LOG/smi-torch-$m-$res.csv" "$ta" "$tb")
    echo "   GPU busy ${gb}% (nvidia-smi, $ns samples over the timed part)"
    echo "$line" | "$PY" -c "import json,sys; d=json.load(sys.stdin); d.update(setting='torch '+d['mode'], gpu_busy=None if '$gb' == 'nan' else float('$gb')); print(json.dumps(d))" >> "$RESULTS"
  done

  # Same model, same images? each setting's first rows vs torch's first batch (needs pyarrow).
  for s in $SETTINGS; do
  "$PY" - "$WORK/lat-$res-$s" "$WORK/torch-eager-$res-first.npy" "$s" << 'PY' 2>&1 | tail -2
import sys, glob, os, numpy as np
if not os.path.exists(sys.argv[2]):
    print("   (latent check skipped: no torch eager latents)"); sys.exit()
try:
    import pyarrow.parquet as pq
except ImportError:
    print("   (latent check skipped: no pyarrow)"); sys.exit()
shards = sorted(glob.glob(sys.argv[1] + "/data/shard-*.parquet")) or sorted(glob.glob(sys.argv[1] + "/shard-*.parquet"))
ref = np.load(sys.argv[2]) if shards else None
if ref is None:
    print("   (latent check skipped: no shards)"); sys.exit()
t = pq.read_table(shards[0]).to_pylist()[: len(ref)]
got = np.stack([np.frombuffer(r["latent"], np.float16).reshape(r["latent_shape"]).astype(np.float32) for r in t])
rel = np.linalg.norm(got - ref[: len(got)]) / np.linalg.norm(ref[: len(got)])
print(f"   latent check: precompute {sys.argv[3]} (ORT fp16) vs torch eager fp16 on {len(got)} images: relative L2 {rel:.2e}")
PY
  done
done

# --- (e) the table ------------------------------------------------------------------------------
"$PY" - "$RESULTS" << 'PY' | tee "$OUT/results.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [r for r in rows if "failed" not in r]
print(f"{'res':>5} {'batch':>5}  {'setting':<34} {'images/s':>9} {'GPU busy %':>10} {'vs compile':>10}  notes")
for res in sorted({r["resolution"] for r in ok}):
    rs = [r for r in ok if r["resolution"] == res]
    comp = [r for r in rs if r.get("tool") == "torch" and r["mode"] == "compile"]
    ref = comp[-1]["images_per_s"] if comp else None
    for r in rs:
        ips = r.get("images_per_s")
        ratio = f"{ips / ref:.2f}x" if ref and ips else "-"
        gb = r.get("gpu_busy")
        gb = "-" if gb is None or gb != gb else f"{gb:.0f}"
        notes = []
        if r.get("tool") == "torch":
            notes.append(f"GPU-only {r.get('gpu_only_images_per_s')} img/s, warm-up {r.get('warmup_s')} s, nonfinite {r.get('nonfinite_samples')}")
        elif r.get("teacher_busy") is not None:
            notes.append(f"teacher busy {r['teacher_busy']}%, warm-up {r.get('warmup_s')} s, skipped {r.get('skipped')}")
        print(f"{res:>5} {r.get('batch', '-'):>5}  {r['setting']:<34} {ips if ips is not None else '-':>9} {gb:>10} {ratio:>10}  {'; '.join(notes)}")
fails = [r for r in rows if "failed" in r]
for r in fails:
    print(f"FAILED {r['step']}: {r['failed'][:300]}")
PY
cp "$RESULTS" "$OUT/results.jsonl"
say "done; $OUT/results.txt"
