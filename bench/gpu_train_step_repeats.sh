#!/usr/bin/env bash
# Run-to-run spread of the training step: our step (and A/B variants of it, by environment) and
# PyTorch's AMP step, alternating, REPEATS rounds, one process per run, on one GPU.
#   bash bench/gpu_train_step_repeats.sh      # writes $OUT/repeats.{jsonl,md} (or bench/results/)
# VARIANTS: "label ENV=VALUE..." per line (our step under each environment; default: ours as
# built, and ours without taped runs). CASE: "recipe size batch" (default "full 256 32").
# Each run: warm-up, then 40 steps or 25 s. After `tools/cuda/build.sh` (carry [".carry"]).
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source tools/cuda/gpu-env.sh >/dev/null
set -uo pipefail
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
PY=${TORCH_PY:-/opt/torch/.venv/bin/python}
REPEATS=${REPEATS:-3}
read -r recipe size batch <<<"${CASE:-full 256 32}"
VARIANTS=${VARIANTS:-"ours
ours-untaped TAESD_TAPE=0"}
JSONL=$OUTDIR/repeats.jsonl
: > "$JSONL"
a=(--size "$size" --batch "$batch" --recipe "$recipe" --steps 40 --seconds 25)
for r in $(seq "$REPEATS"); do
  while read -r label envs; do
    [[ -n $label ]] || continue
    # shellcheck disable=SC2086
    line=$(env $envs timeout 90 gpu_bench "${a[@]}" --precision bf16 2>>"$OUTDIR/repeats.stderr" | tail -1)
    [[ $line == \{* ]] && echo "{\"label\": \"$label\", \"round\": $r, \"run\": $line}" | tee -a "$JSONL"
  done <<<"$VARIANTS"
  line=$(timeout 90 "$PY" bench/torch_train_step.py "${a[@]}" --mode amp 2>>"$OUTDIR/repeats.stderr" | tail -1)
  [[ $line == \{* ]] && echo "{\"label\": \"torch-amp\", \"round\": $r, \"run\": $line}" | tee -a "$JSONL"
done
"$PY" - "$JSONL" > "$OUTDIR/repeats.md" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["label"], []).append(r["run"])
ref = statistics.median(x["images_per_s"] for x in by.get("torch-amp", [])) if "torch-amp" in by else None
print("| run | images/s per round | median | median / torch AMP median | peak memory MiB | ours: median ms per step / of it launching (host), per round |")
print("|---|---|---|---|---|---|")
for label, runs in by.items():
    ips = [x["images_per_s"] for x in runs]
    med = statistics.median(ips)
    mem = max(x.get("peak_mem_mib") or x.get("max_memory_allocated_mib") or 0 for x in runs)
    ratio = f"{med / ref:.2f}x" if ref else "-"
    host = " / ".join(f"{x['step_ms_min_median_max'][1]:.0f}/{x['issue_ms_min_median_max'][1]:.0f}" for x in runs if "issue_ms_min_median_max" in x)
    print(f"| {label} | {' / '.join(f'{v:.1f}' for v in ips)} | {med:.1f} | {ratio} | {mem:.0f} | {host or '-'} |")
PYEOF
cat "$OUTDIR/repeats.md"
