#!/usr/bin/env bash
# Issue 17's A/Bs on the GPU machine: every entry of a sweep trained at once (one process each,
# sharing the GPU), then each evaluated on the held-out split of the 256 px pool shards against
# the released taef2 decoder. Entries run the same number of steps, so they compare per step; their
# images/s are shared-GPU rates, not the solo ones.
#   SWEEP=configs/ab/quality-128.toml bash bench/gpu_quality_ab.sh
# After `source tools/cuda/gpu-env.sh`. POOL (/data/pool), ONNX (/data/ref/taef2_encoder.onnx),
# REF (/data/ref), WORK (/data), OUT (results; gets ab.tgz and summary.md), ONLY (entries, default
# all), SHARDS128=1: also run ENTRY128 (default pixel-cosine) on 128 px shards precomputed with 4
# variants per image instead of 128 px loader crops of the 256 px shards. EXTRA: more train flags.
# SEED1_BEST=N: then the N best entries again at seed 1 (see below).
set -uo pipefail
POOL=${POOL:-/data/pool}; ONNX=${ONNX:-/data/ref/taef2_encoder.onnx}; REF=${REF:-/data/ref}
WORK=${WORK:-/data}; OUT=${OUT:-/tmp/out}; SWEEP=${SWEEP:-configs/ab/quality-128.toml}
BASE=${BASE:-configs/distill-taef2-pool.toml}
S256=$WORK/lat256v2; S128=$WORK/lat128v4; AB=$WORK/ab/$(basename "$SWEEP" .toml)
mkdir -p "$OUT" "$AB"
# The machine (a host-bound 128 px step runs at the host CPU's speed): cores, CPU model, GPU.
echo "== machine: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p'); $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1)"
shards() { # DIR RES VARIANTS
  if ! grep -q complete <<< "$(precompute inspect "$1" 2>/dev/null | head -3)"; then
    echo "== precompute: pool at $2 px, $3 variants, taef2 teacher -> $1"
    precompute --vae taef2 --onnx "$ONNX" --images "$POOL" --resolution "$2" --variants "$3" --device cuda \
      --batch-size 32 --out "$1" --quiet 2>&1 | tail -4
  fi
}
shards "$S256" 256 2
[[ ${SHARDS128:-0} == 1 ]] && shards "$S128" 128 4
names=${ONLY:-$(python3 -c 'import sys, tomllib; print(" ".join(r["name"] for r in tomllib.load(open(sys.argv[1], "rb"))["runs"]))' "$SWEEP")}
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 1000 > "$AB/gpu.csv" &
smi=$!
# launch RUN ENTRY SHARDS [FLAGS...]: one entry of the sweep in the background, into $AB/RUN.
pids=()
launch() {
  local run=$1 entry=$2 shards=$3; shift 3
  rm -rf "${AB:?}/$run"
  train --config "$BASE" --sweep "$SWEEP" --only "$entry" --shards "$shards" --run-dir "$AB/$run" --quiet ${EXTRA:-} "$@" \
    > "$AB/$run.log" 2>&1 &
  pids+=($!)
}
# finish RUNS...: wait for the launched runs, then evaluate each on the 256 px held-out split.
finish() {
  for p in "${pids[@]}"; do wait "$p" || echo "a run failed (pid $p): see its log"; done
  pids=()
  echo "== $# runs at once: $(( $(date +%s) - t0 )) s"
  for n in "$@"; do
    tail -2 "$AB/$n.log" | sed "s/^/  [$n] /"
    train eval --model "$AB/$n" --shards "$S256" --reference "$REF/taef2_decoder.pth" --device cuda --max-images 256 \
      --json "$AB/eval-$n.json" > "$AB/eval-$n.txt" 2>&1 || { echo "eval of $n failed:"; tail -3 "$AB/eval-$n.txt"; }
  done
}
t0=$(date +%s)
for n in $names; do launch "$n" "$n" "$S256"; done
if [[ ${SHARDS128:-0} == 1 ]]; then
  e=${ENTRY128:-pixel-cosine}; names="$names $e-shards128"
  launch "$e-shards128" "$e" "$S128"
fi
# shellcheck disable=SC2086
finish $names
# SEED1_BEST=N: the N best entries again at seed 1, all at once (best: sharpness in the goal's
# band 0.9-1.1 first, then by held-out PSNR; outside the band, the nearest to it first: an entry
# far out of it is not adopted whatever its PSNR), so that a winner is checked in the same session.
if (( ${SEED1_BEST:-0} > 0 )); then
  best=$(python3 - "$AB" "$SEED1_BEST" $names <<'PY'
import json, sys
ab, k, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows = []
for n in names:
    try:
        o = json.load(open(f"{ab}/eval-{n}.json"))["models"]["ours"]
    except (OSError, KeyError, ValueError):
        continue
    sharp = o.get("sharpness") or 0
    rows.append((round(max(0.0, 0.9 - sharp, sharp - 1.1), 2), -o["psnr"], n))
print(" ".join(n for *_, n in sorted(rows)[:k]))
PY
)
  echo "== seed 1 of: ${best:-none (no entry was evaluated)}"
  t0=$(date +%s)
  for n in $best; do launch "$n-seed1" "$n" "$S256" --set run.seed=1; done
  # shellcheck disable=SC2086
  finish $(for n in $best; do echo "$n-seed1"; done)
  for n in $best; do names="$names $n-seed1"; done
fi
kill $smi 2>/dev/null
python3 - "$AB" $names > "$OUT/summary.md" <<'PY'
import json, sys, os
ab, names = sys.argv[1], sys.argv[2:]
print("| run | steps | img/s (shared GPU) | PSNR | SSIM | sharpness | cycle MAE | encoder MAE |")
print("|---|---|---|---|---|---|---|---|")
ref = None
for n in names:
    try:
        e = json.load(open(f"{ab}/eval-{n}.json"))
    except OSError:
        print(f"| {n} | failed | | | | | | |"); continue
    o = e["models"]["ours"]; ref = e["models"].get("reference", ref)
    tr = [json.loads(l) for l in open(f"{ab}/{n}/metrics.jsonl") if '"train"' in l]
    ips = sum(t["images_per_s"] for t in tr) / max(1, len(tr))
    f = lambda k, d=2: "-" if o.get(k) is None else f"{o[k]:.{d}f}"
    print(f"| {n} | {tr[-1]['step'] if tr else 0} | {ips:.0f} | {f('psnr')} | {f('ssim', 3)} | {f('sharpness', 3)} | {f('cycle_mae', 4)} | {f('encoder_mae', 4)} |")
if ref:
    g = lambda k, d: "-" if ref.get(k) is None else f"{ref[k]:.{d}f}"
    print(f"| released taef2 decoder | | | {g('psnr', 2)} | {g('ssim', 3)} | {g('sharpness', 3)} | {g('cycle_mae', 4)} | |")
# EMA probes (recipe.ema_probe_decays): the run's own end-of-run evaluation, PSNR / sharpness.
probes = {}
for n in names:
    try:
        m = json.load(open(f"{ab}/{n}/eval.json"))["models"]
    except (OSError, KeyError, ValueError):
        continue
    probes[n] = {k: v for k, v in m.items() if k.startswith("ema")}
cols = sorted({k for v in probes.values() for k in v}, key=lambda k: (k != "ema", k))
if len(cols) > 1:
    print("\nEMA decays (each run's end-of-run evaluation, PSNR / sharpness):\n")
    print("| run | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for n, v in probes.items():
        cell = lambda k: "-" if k not in v else f"{v[k]['psnr']:.2f} / {v[k]['sharpness']:.3f}"
        print(f"| {n} | " + " | ".join(cell(k) for k in cols) + " |")
u = [l.split(",") for l in open(f"{ab}/gpu.csv") if l.strip() and l.split(",")[0].strip().isdigit()]
if u:
    print(f"\nGPU busy {sum(int(a) for a, _ in u) / len(u):.0f}% (nvidia-smi, 1 s samples), memory max {max(int(b) for _, b in u)} MiB")
PY
cat "$OUT/summary.md"
# What comes back (the device tool returns at most 8 files): logs, metrics, evals, the last previews.
(cd "$AB" && tar -czf "$OUT/ab.tgz" --exclude='checkpoints' --exclude='export' ./*.log ./*.json ./*.txt ./gpu.csv \
  $(for n in $names; do echo "$n/metrics.jsonl $n/config.toml $n/eval.json"; ls "$n"/previews/*.png 2>/dev/null | tail -1; done))
