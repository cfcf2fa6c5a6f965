#!/usr/bin/env bash
# Side-by-side training-step benchmark on one GPU: our step in f32, tf32 and bf16 (gpu_bench, built here with
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
DEADLINE=$(( $(date +%s) + ${BENCH_BUDGET_S:-400} ))
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
# The goal's case (full recipe, 256/bs32) first: later ones may fall to the time budget.
# PRECISIONS: our step's arithmetic (train::recipe::Precision), each a run.
# CASES: "recipe size batch" per line; TORCH_MODES: the reference's modes ("" for ours alone, e.g. an
# A/B of ours: TAESD_FUSED_BLOCKS=0 TORCH_MODES= bash bench/gpu_train_step.sh).
CASES=${CASES:-"full 256 32
full 96 32
full 512 8
decoder 256 32
decoder 96 32
decoder 512 8"}
while read -r recipe size batch; do
  [[ -n $recipe ]] || continue
  a=(--size "$size" --batch "$batch" --recipe "$recipe" --steps "$STEPS" --seconds 15)
  for p in ${PRECISIONS:-f32 tf32 bf16}; do
    run "ours $p $recipe $size" gpu_bench "${a[@]}" --precision "$p"
  done
  for m in ${TORCH_MODES-fp32 amp}; do
    run "torch $m $recipe $size" "$PY" bench/torch_train_step.py "${a[@]}" --mode "$m"
  done
done <<<"$CASES"
"$PY" - "$JSONL" > "$OUTDIR/gpu_train_step.md" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [r for r in rows if "error" not in r]
key = lambda r: (r["recipe"], r["size"], r["batch"])
ours_modes = ["fp32", "tf32", "bf16"]
print("| recipe | size | batch | ours f32 | ours tf32 | ours bf16 | torch fp32 | torch AMP | best ours / fp32 | best ours / AMP | ours bf16 mem MiB (pool used/reserved) | torch AMP mem MiB (alloc/reserved) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for k in sorted({key(r) for r in ok}, key=lambda k: (k[0] != "full", k[1])):
    g = {(r["impl"], r["mode"]): r for r in ok if key(r) == k}
    ours = [g.get(("ours", m)) for m in ours_modes]
    f, a = g.get(("torch", "fp32")), g.get(("torch", "amp"))
    ips = lambda r: f"{r['images_per_s']:.1f}" if r else "-"
    best = max((o for o in ours if o), key=lambda o: o["images_per_s"], default=None)
    ratio = lambda r: f"{best['images_per_s'] / r['images_per_s']:.2f}x ({best['mode']})" if best and r else "-"
    om = f"{ours[2]['peak_mem_mib']:.0f}/{ours[2].get('peak_reserved_mib', float('nan')):.0f}" if ours[2] else "-"
    am = f"{a['peak_mem_mib']:.0f}/{a['peak_reserved_mib']:.0f}" if a else "-"
    print(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(ips(o) for o in ours) + f" | {ips(f)} | {ips(a)} | {ratio(f)} | {ratio(a)} | {om} | {am} |")
for r in rows:
    if "error" in r: print(f"\n- {r['label']}: {r['error']}")
PYEOF
cat "$OUTDIR/gpu_train_step.md"
