#!/usr/bin/env bash
# precompute on the pool with the real taef2 teacher at 256x256: the CUDA execution provider vs the
# CPU, on the GPU machine (after `source tools/cuda/gpu-env.sh`; see docs/gpu.md).
#   POOL (default /data/pool), ONNX (default .carry-pool1/taef2_encoder.onnx), WORK (default /data),
#   CPU_LIMIT: images for the CPU run (default 640; the CPU rate is what is reported).
set -uo pipefail
POOL=${POOL:-/data/pool}
ONNX=${ONNX:-.carry-pool1/taef2_encoder.onnx}
WORK=${WORK:-/data}
CPU_LIMIT=${CPU_LIMIT:-640}
echo "== machine: $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
echo "== inputs: $(ls "$POOL" | wc -l) files in $POOL"
# peak memory via GNU time when the machine has it
timed() { local log=$1; shift; if [[ -x /usr/bin/time ]]; then /usr/bin/time -v "$@" 2> "$log"; else "$@"; fi; }
common=(--vae taef2 --onnx "$ONNX" --images "$POOL" --resolution 256 --quiet)

rm -rf "$WORK/lat-cuda" "$WORK/lat-cpu"
nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 > "$WORK/util-cuda.txt" &
smi=$!
echo "== precompute --device cuda (whole pool)"
timed "$WORK/time-cuda.txt" precompute "${common[@]}" --device cuda --batch-size 32 --out "$WORK/lat-cuda"
kill $smi
grep -sE "Maximum resident|Elapsed" "$WORK/time-cuda.txt"
python3 - "$WORK/util-cuda.txt" <<'PY'
import sys
u = [int(x) for x in open(sys.argv[1]).read().split() if x.strip().isdigit()]
busy = [x for x in u if x > 0]
print(f"GPU utilization (nvidia-smi, 200 ms samples): mean {sum(u)/max(len(u),1):.0f}% over {len(u)} samples; "
      f"mean {sum(busy)/max(len(busy),1):.0f}% over the {len(busy)} non-idle samples")
PY

echo "== precompute --device cpu (first $CPU_LIMIT images)"
timed "$WORK/time-cpu.txt" precompute "${common[@]}" --device cpu --batch-size 16 --limit "$CPU_LIMIT" --out "$WORK/lat-cpu"
grep -sE "Maximum resident|Elapsed" "$WORK/time-cpu.txt"

echo "== CPU vs CUDA teacher on the same rows"
python3 tools/compare_shards.py "$WORK/lat-cpu" "$WORK/lat-cuda"
precompute inspect "$WORK/lat-cuda" | grep -vE "^  ch "
