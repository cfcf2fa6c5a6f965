#!/usr/bin/env bash
# Side-by-side training-step benchmark on one GPU: our step (gpu_bench, built here with
#   tools/cuda/build.sh -p train --features cudnn --example gpu_bench --example gpu_check
# and shipped in .carry/bin) vs the PyTorch reference bench/torch_train_step.py (fp32 with TF32
# off, and AMP fp16), at 96x96/bs32, 256x256/bs32, 512x512/bs8, full recipe and decoder-only.
# Run on the GPU machine from the repository root (device tool: carry [".carry"]):
#   bash bench/gpu_train_step.sh            # writes $OUT/gpu_train_step.{jsonl,md} (or bench/results/)
# Each run is time-limited (RUN_TIMEOUT s, default 35) and runs stop starting after
# BENCH_BUDGET_S (default 430 s): the whole bench stays under 8 min.
cd "$(dirname "$0")/.."
# gpu-env.sh is sourced before `set -u` (it may read unset variables).
# shellcheck disable=SC1091
source tools/cuda/gpu-env.sh >/dev/null
set -uo pipefail
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
PY=${TORCH_PY:-/opt/torch/.venv/bin/python}
RUN_TIMEOUT=${RUN_TIMEOUT:-35}
# Runs not started by then are skipped (reported as such): the whole bench stays under 8 min.
DEADLINE=$(( $(date +%s) + ${BENCH_BUDGET_S:-430} ))
STEPS=${STEPS:-8}
JSONL=$OUTDIR/gpu_train_step.jsonl
: > "$JSONL"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUTDIR/gpu_train_step.device"
run() {  # label, command...
  local label=$1; shift
  local line
  if (( $(date +%s) + 10 > DEADLINE )); then
    echo "{\"label\": \"$label\", \"error\": \"skipped: bench time budget spent\"}" | tee -a "$JSONL"; return
  fi
  line=$(timeout "$RUN_TIMEOUT" "$@" 2>>"$OUTDIR/gpu_train_step.stderr" | tail -1)
  if [[ $line == \{* ]]; then echo "$line" | tee -a "$JSONL"; else echo "{\"label\": \"$label\", \"error\": \"failed or timed out (see stderr)\"}" | tee -a "$JSONL"; fi
}
for cfg in "96 32" "256 32" "512 8"; do
  read -r size batch <<<"$cfg"
  for recipe in full decoder; do
    a=(--size "$size" --batch "$batch" --recipe "$recipe" --steps "$STEPS" --seconds 15)
    run "ours $recipe $size" gpu_bench "${a[@]}"
    run "torch fp32 $recipe $size" "$PY" bench/torch_train_step.py "${a[@]}" --mode fp32
    run "torch amp $recipe $size" "$PY" bench/torch_train_step.py "${a[@]}" --mode amp
  done
done
"$PY" - "$JSONL" > "$OUTDIR/gpu_train_step.md" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [r for r in rows if "error" not in r]
key = lambda r: (r["recipe"], r["size"], r["batch"])
print("| recipe | size | batch | ours img/s | torch fp32 img/s | torch AMP img/s | ours/fp32 | ours/AMP | ours mem MiB | torch fp32 mem MiB (alloc/reserved) | torch AMP mem MiB (alloc/reserved) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for k in sorted({key(r) for r in ok}, key=lambda k: (k[0], k[1])):
    g = {(r["impl"], r["mode"]): r for r in ok if key(r) == k}
    o, f, a = g.get(("ours", "fp32")), g.get(("torch", "fp32")), g.get(("torch", "amp"))
    ips = lambda r: f"{r['images_per_s']:.1f}" if r else "-"
    ratio = lambda r: f"{o['images_per_s'] / r['images_per_s']:.2f}x" if o and r else "-"
    mem = lambda r: f"{r['peak_mem_mib']:.0f}/{r['peak_reserved_mib']:.0f}" if r else "-"
    print(f"| {k[0]} | {k[1]} | {k[2]} | {ips(o)} | {ips(f)} | {ips(a)} | {ratio(f)} | {ratio(a)} | {o['peak_mem_mib']:.0f} | {mem(f)} | {mem(a)} |" if o else f"| {k[0]} | {k[1]} | {k[2]} | - | {ips(f)} | {ips(a)} | - | - | - | {mem(f)} | {mem(a)} |")
for r in rows:
    if "error" in r: print(f"\n- {r['label']}: {r['error']}")
PYEOF
cat "$OUTDIR/gpu_train_step.md"
