#!/usr/bin/env bash
# Issue 21 on the one lent GPU: `train` at world size 1 through the data-parallel NCCL path
# (`--dist-backend nccl`: TCP rendezvous, ncclCommInitRank, parameter broadcast, gradient
# all-reduce per step, the agreed NaN-guard verdict and stop flag) vs the plain single-GPU path
# (no comm at all), at 256² / batch 32 bf16, full recipe. Alternating runs, REPEATS each; the
# steady-state images/s of each run (train lines after WARM steps). Goal: overhead <= 3%.
# Runs on the GPU machine after `source tools/cuda/gpu-env.sh` (docs/gpu.md), with the binaries
# of tools/cuda/build.sh; NCCL from the nvidia-nccl-cu13 wheel (or NCCL_LIB=path).
#
#   POOL (/data/pool)  ONNX (.carry-pool1/taef2_encoder.onnx)  WORK (/data)  OUT ($OUT or /tmp/out)
#   STEPS (300)  WARM (100)  REPEATS (3)  CROP (256)  BATCH (32)  SHARDS (existing shards: skip precompute)
set -uo pipefail
POOL=${POOL:-/data/pool}
ONNX=${ONNX:-.carry-pool1/taef2_encoder.onnx}
WORK=${WORK:-/data}
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-300}
WARM=${WARM:-100}
REPEATS=${REPEATS:-3}
CROP=${CROP:-256}
BATCH=${BATCH:-32}
mkdir -p "$OUT"
NCCL_LIB=${NCCL_LIB:-$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)}
if [[ -z $NCCL_LIB || ! -f $NCCL_LIB ]]; then
  echo "no libnccl.so.2 (pip install nvidia-nccl-cu13, or NCCL_LIB=path)"; exit 1
fi
echo "== machine: $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); NCCL $NCCL_LIB"

SHARDS=${SHARDS:-}
if [[ -z $SHARDS ]]; then
  SHARDS=$WORK/lat256
  [[ -d $SHARDS ]] || precompute --vae taef2 --onnx "$ONNX" --images "$POOL" --resolution 256 \
    --device cuda --batch-size 32 --out "$SHARDS" --quiet 2>&1 | tail -4
fi

# One run: its steady-state images/s (mean of the train lines after WARM steps).
one() {
  local name=$1; shift
  local run=$WORK/dist-one-$name
  rm -rf "$run"
  train --shards "$SHARDS" --run-dir "$run" --device cuda --precision bf16 --steps "$STEPS" \
    --crop "$CROP" --batch-size "$BATCH" --quiet \
    --set run.log_every=25 --set run.preview_every=0 --set run.eval_every=0 --set run.checkpoint_every=0 \
    --set data.eval_fraction=0 --set 'run.export=["taesd"]' "$@" > "$OUT/dist-one-$name.log" 2>&1 || {
      echo "$name failed:"; tail -20 "$OUT/dist-one-$name.log"; return 1; }
  python3 - "$run/metrics.jsonl" "$WARM" <<'PY'
import json, sys
tr = [json.loads(l) for l in open(sys.argv[1])]
v = [l["images_per_s"] for l in tr if l.get("type") == "train" and l["step"] > int(sys.argv[2])]
print(f"{sum(v) / len(v):.2f}")
PY
}

plain=(); nccl=()
for i in $(seq "$REPEATS"); do
  p=$(one "plain-$i") || exit 1
  n=$(one "nccl-$i" --dist-backend nccl --nccl-lib "$NCCL_LIB") || exit 1
  echo "repeat $i: plain $p images/s, nccl path $n images/s"
  plain+=("$p"); nccl+=("$n")
done
python3 - "${plain[*]}" "${nccl[*]}" <<'PY' | tee "$OUT/dist-one.md"
import statistics as st, sys
p = [float(x) for x in sys.argv[1].split()]
n = [float(x) for x in sys.argv[2].split()]
mp, mn = st.median(p), st.median(n)
print("| path | images/s (median) | runs |")
print("|---|---|---|")
print(f"| plain (no comm) | {mp:.1f} | {', '.join(f'{x:.1f}' for x in p)} |")
print(f"| NCCL, world size 1 | {mn:.1f} | {', '.join(f'{x:.1f}' for x in n)} |")
print(f"\noverhead of the data-parallel path: {100 * (mp - mn) / mp:+.2f}% (goal <= 3%)")
PY
