#!/usr/bin/env bash
# A few minutes of `train` on the GPU on the pool (taef2 teacher shards), then the held-out eval of
# our model against the released taef2 decoder. Runs on the GPU machine after
# `source tools/cuda/gpu-env.sh` (docs/gpu.md), with the pool in $POOL and the released weights in
# $REF. Results (log, eval JSON, metrics, loss curve, previews, config) go to $OUT.
#
#   POOL (/data/pool)  ONNX (.carry-pool1/taef2_encoder.onnx)  REF (.carry-ref/taef2)  WORK (/data)
#   OUT ($OUT or /tmp/out)  SECONDS_TRAIN (240)  CROP (128)  BATCH (16)  VARIANTS (2)
#   INIT (released: fine-tune the released taef2 encoder+decoder; scratch: from random init)
#   SHARDS: an existing shard folder (skips the precompute step)
#   EXTRA: more train flags (e.g. "--set recipe.lr=3e-4")
set -uo pipefail
POOL=${POOL:-/data/pool}
ONNX=${ONNX:-.carry-pool1/taef2_encoder.onnx}
REF=${REF:-.carry-ref/taef2}
WORK=${WORK:-/data}
OUT=${OUT:-/tmp/out}
SECONDS_TRAIN=${SECONDS_TRAIN:-240}
CROP=${CROP:-128}
BATCH=${BATCH:-16}
VARIANTS=${VARIANTS:-2}
INIT=${INIT:-released}
RUN=$WORK/run-$INIT-$CROP
mkdir -p "$OUT"

echo "== machine: $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
SHARDS=${SHARDS:-}
if [[ -z $SHARDS ]]; then
  SHARDS=$WORK/lat${RES:-256}
  echo "== precompute: pool at 256, $VARIANTS variant(s), taef2 teacher, CUDA EP"
  precompute --vae taef2 --onnx "$ONNX" --images "$POOL" --resolution "${RES:-256}" --variants "$VARIANTS" \
    --device cuda --batch-size 32 --out "$SHARDS" --quiet 2>&1 | tail -8
fi
precompute inspect "$SHARDS" | head -12

init=()
if [[ $INIT == released ]]; then
  init=(--set "model.init_encoder=\"$REF/taef2_encoder.pth\"" --set "model.init_decoder=\"$REF/taef2_decoder.pth\"" --set recipe.lr=1e-4)
fi
echo "== train ($INIT) for ${SECONDS_TRAIN}s: crop $CROP, batch $BATCH"
rm -rf "$RUN"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/gpu-train.csv" &
smi=$!
# Ctrl-C (SIGINT) makes train checkpoint and stop; the --resume below (at the step reached) then
# writes the final eval, preview and export.
timeout --foreground -s INT "$SECONDS_TRAIN" train --shards "$SHARDS" --run-dir "$RUN" --device cuda --steps 1000000 \
  --crop "$CROP" --batch-size "$BATCH" --quiet "${init[@]}" \
  --set "model.reference_decoder=\"$REF/taef2_decoder.pth\"" \
  --set run.log_every=20 --set run.preview_every=200 --set run.eval_every=0 --set run.checkpoint_every=0 \
  --set data.eval_fraction=0.02 --set data.eval_max_images=128 ${EXTRA:-}
kill $smi 2>/dev/null
step=$(python3 -c "import json,sys; print(max(json.loads(l)['step'] for l in open('$RUN/metrics.jsonl')))")
echo "== reached step $step; finishing (eval, preview, export)"
train --run-dir "$RUN" --resume --steps "$step" --quiet
python3 - "$RUN/metrics.jsonl" "$OUT/gpu-train.csv" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
tr = [l for l in lines if l.get("type") == "train"]
if tr:
    last = tr[-1]
    steady = tr[1:] or tr
    ips = sum(l["images_per_s"] for l in steady) / len(steady)
    sps = sum(l["steps_per_s"] for l in steady) / len(steady)
    print(f"train: {last['step']} steps; after the first log interval {sps:.2f} steps/s, {ips:.1f} images/s")
    print("last losses:", {k: round(v, 4) for k, v in last["losses"].items()})
u = []
for row in open(sys.argv[2]):
    p = [x.strip() for x in row.split(",")]
    if len(p) == 2 and p[0].isdigit():
        u.append((int(p[0]), int(p[1])))
if u:
    print(f"GPU: utilization mean {sum(a for a, _ in u)/len(u):.0f}% ; memory used max {max(b for _, b in u)} MiB")
for l in lines:
    if l.get("type") == "eval":
        print("eval", json.dumps(l))
PY
echo "== eval on the held-out split: ours (EMA) vs the released taef2 decoder on the same latents"
train eval --model "$RUN" --reference "$REF/taef2_decoder.pth" --device cuda --max-images 256 --json "$OUT/eval.json"
echo "== the released taef2 (encoder+decoder) alone, same split"
train eval --model "$REF" --shards "$SHARDS" --eval-fraction 0.02 --device cuda --max-images 256 --json "$OUT/eval-released.json"
cp "$RUN/config.toml" "$RUN/metrics.jsonl" "$RUN/loss.png" "$OUT/" 2>/dev/null
last_preview=$(ls "$RUN"/previews/*.png | tail -1)
cp "$last_preview" "$OUT/preview-last.png"
ls "$RUN"/previews | head -2 | while read -r p; do cp "$RUN/previews/$p" "$OUT/"; done
