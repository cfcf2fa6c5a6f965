#!/usr/bin/env bash
# issue 21: `precompute --device cuda:0` through the multi-device pipeline (one runner per teacher
# session, batches dealt from one queue, results matched back by sequence number) at the same rate
# as the single-session pipeline before it, on one GPU; plus two sessions on the one GPU
# (`--device cuda:0,cuda:0`) for information, and `--device cuda:0,...` over every visible GPU
# when there are several. Run on the GPU machine (after `source tools/cuda/gpu-env.sh`; docs/gpu.md):
#   BASE: the precompute binary built from main before issue 21 (default .carry/precompute-main),
#   NEW:  this branch's binary (default precompute on PATH),
#   POOL (default /data/pool), ONNX (default .carry-pool1/taef2_encoder.onnx), WORK (default /data),
#   RES (default 256), BATCH (default 32), REPEATS (default 3: BASE and NEW alternate).
# The rates are the summaries' `throughput` lines (images/s over the whole run, warm-up excluded);
# the shards of every run are compared with NEW's single-session run (tools/compare_shards.py):
# the same rows, whichever session encoded a batch.
set -uo pipefail
BASE=${BASE:-.carry/precompute-main}
NEW=${NEW:-precompute}
POOL=${POOL:-/data/pool}
ONNX=${ONNX:-.carry-pool1/taef2_encoder.onnx}
WORK=${WORK:-/data}
RES=${RES:-256}
BATCH=${BATCH:-32}
REPEATS=${REPEATS:-3}
echo "== machine: $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sort | uniq -c)"
echo "== inputs: $(ls "$POOL" | wc -l) files in $POOL; ${RES}x${RES}, batch $BATCH"
common=(--vae taef2 --onnx "$ONNX" --images "$POOL" --resolution "$RES" --batch-size "$BATCH" --quiet)
rate() { grep -oE "throughput +[0-9.]+ images/s" "$1" | grep -oE "[0-9.]+" | head -1; }

one() { # label binary device...
    local label=$1 bin=$2 dev=$3 out="$WORK/lat-multi-$1"
    rm -rf "$out"
    "$bin" "${common[@]}" --device "$dev" --out "$out" > "$WORK/multi-$label.txt" 2>&1 || {
        echo "!! $label failed"; tail -5 "$WORK/multi-$label.txt"; return 1; }
    echo "$label ($dev): $(rate "$WORK/multi-$label.txt") images/s"
}

declare -a base_rates new_rates
for r in $(seq 1 "$REPEATS"); do
    echo "== repeat $r"
    one "base-$r" "$BASE" cuda:0 && base_rates+=("$(rate "$WORK/multi-base-$r.txt")")
    one "new-$r" "$NEW" cuda:0 && new_rates+=("$(rate "$WORK/multi-new-$r.txt")")
done
python3 - "${base_rates[*]:-}" "${new_rates[*]:-}" <<'PY'
import sys, statistics as st
b = [float(x) for x in sys.argv[1].split()]; n = [float(x) for x in sys.argv[2].split()]
if b and n:
    print(f"cuda:0, single-session pipeline (main): median {st.median(b):.1f} images/s {b}")
    print(f"cuda:0, multi-device pipeline (this branch): median {st.median(n):.1f} images/s {n}")
    print(f"ratio new/base {st.median(n)/st.median(b):.3f} (target >= 0.97)")
PY

echo "== two sessions on one GPU (--device cuda:0,cuda:0)"
one "two-on-0" "$NEW" cuda:0,cuda:0
gpus=$(nvidia-smi -L | wc -l)
if (( gpus > 1 )); then
    devs=$(seq -s, 0 $((gpus - 1)) | sed 's/\([0-9]\+\)/cuda:\1/g')
    echo "== every GPU ($devs)"
    one "all-gpus" "$NEW" "$devs"
fi

echo "== the same rows whichever session encoded a batch"
for l in two-on-0 all-gpus; do
    [[ -d "$WORK/lat-multi-$l" ]] && python3 tools/compare_shards.py "$WORK/lat-multi-new-1" "$WORK/lat-multi-$l"
done
