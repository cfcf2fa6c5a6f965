#!/usr/bin/env bash
# Issue 17, item 3: the whole trainer's images/s against the step benchmark, in the same call on the
# same card. For each SIZE (128 and 256, batch 32, bf16, full recipe):
#   1. gpu_bench: the training step alone on synthetic batches (the number the step benchmark reports);
#   2. train: a real run on the pool shards with configs/scratch-taef2-25min.toml's recipe (loader,
#      replay buffer, EMA, metrics, previews and checkpoints every PAUSE_EVERY steps: more often than
#      the 25-minute config's 5000, so the pauses weigh more here than there), with nvidia-smi sampling
#      the GPU's utilization once a second.
# Reports per size: the trainer's images/s over the whole run (images seen / wall time, pauses
# included) and in steady state (train lines after WARM steps), its ratio to the step benchmark, the
# trainer's own time fractions (step, loader wait, upload, pauses) and the GPU's mean busy fraction.
# Goal (issue 17): trainer >= 95% of the step benchmark, GPU busy >= 90%.
#   source tools/cuda/gpu-env.sh && bash bench/gpu_trainer_throughput.sh
# Needs gpu_bench and train in .carry/bin (tools/cuda/build.sh -p train -p precompute --features
# train/cudnn --bins --example gpu_bench) and the 256 px pool shards (SHARDS, default
# /data/lat256v2, made by bench/gpu_scratch_run.sh or gpu_quality_ab.sh). Knobs: SIZES ("128 256"), STEPS_128 (1500),
# STEPS_256 (600), WARM (200), PAUSE_EVERY (500), BATCH (32), WORK (/data), OUT (/tmp/out).
set -uo pipefail
WORK=${WORK:-/data}; OUT=${OUT:-/tmp/out}; SHARDS=${SHARDS:-$WORK/lat256v2}
SIZES=${SIZES:-128 256}; WARM=${WARM:-200}; PAUSE_EVERY=${PAUSE_EVERY:-500}; BATCH=${BATCH:-32}
CONFIG=${CONFIG:-configs/scratch-taef2-25min.toml}
D=$WORK/throughput-files   # per-size files, tarred into OUT/throughput.tgz at the end
rm -rf "$D"; mkdir -p "$OUT" "$D"
echo "== $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); $(nproc) cores"
for size in $SIZES; do
  steps_var=STEPS_$size; steps=${!steps_var:-$((size <= 128 ? 1500 : 600))}
  gpu_bench --size "$size" --batch "$BATCH" --recipe full --precision bf16 --steps 8 --seconds 15 \
    > "$D/bench-$size.json" 2> "$D/bench-$size.err" || { echo "gpu_bench $size failed"; tail "$D/bench-$size.err"; }
  run=$WORK/throughput-$size
  rm -rf "$run"
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 1000 > "$D/gpu-$size.csv" &
  smi=$!
  train --config "$CONFIG" --shards "$SHARDS" --run-dir "$run" --quiet --steps "$steps" --crop "$size" \
    --batch-size "$BATCH" --set 'data.stages=[]' --set run.preview_every="$PAUSE_EVERY" \
    --set run.checkpoint_every="$PAUSE_EVERY" --set 'run.export=[]' > "$D/train-$size.log" 2>&1 \
    || { echo "train $size failed"; tail -20 "$D/train-$size.log"; }
  kill "$smi" 2>/dev/null
  cp "$run/metrics.jsonl" "$D/metrics-$size.jsonl" 2>/dev/null
done
python3 - "$D" "$WARM" "$SIZES" <<'PY' | tee "$OUT/throughput.md"
import json, sys, statistics as st
out, warm, sizes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
print("| size | step benchmark img/s | trainer img/s, whole run (pauses in) | trainer / step | steady state img/s | steady / step | in the step | loader wait | upload | pauses | GPU busy (mean of 1 s samples) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for s in sizes:
    try:
        b = json.loads(open(f"{out}/bench-{s}.json").read().strip().splitlines()[-1])["images_per_s"]
    except Exception:
        b = float("nan")
    lines = [json.loads(l) for l in open(f"{out}/metrics-{s}.jsonl")]
    tr = [l for l in lines if l.get("type") == "train"]
    last = tr[-1]
    whole = last["images_seen"] / last["elapsed_s"]
    steady = st.mean(l["images_per_s"] for l in tr if l["step"] > warm)
    tf = {}
    for l in tr:
        for k, v in l.get("time_fractions", {}).items():
            tf.setdefault(k, []).append(v)
    f = lambda k: f"{100 * st.mean(tf[k]):.1f}%" if k in tf else "-"
    util = [float(x) for x in open(f"{out}/gpu-{s}.csv").read().split() if x.strip()]
    busy = st.mean(util[2:-1]) if len(util) > 4 else float("nan")
    print(f"| {s} | {b:.1f} | {whole:.1f} | {whole / b:.3f} | {steady:.1f} | {steady / b:.3f} | {f('step')} | {f('loader_wait')} | {f('upload')} | {f('pauses')} | {busy:.1f}% |")
PY
tar -czf "$OUT/throughput.tgz" -C "$D" .
