#!/usr/bin/env bash
# Issue 5's proof run on the GPU machine: taef2-architecture encoder + decoder from scratch on the
# pool (configs/distill-taef2-pool.toml), in time-limited pieces with checkpoint + --resume.
#   PIECE=1 SECONDS_TRAIN=480 bash bench/gpu_distill_pool.sh   # precompute (once) + first piece
#   PIECE=2 SECONDS_TRAIN=420 bash bench/gpu_distill_pool.sh   # resume, then eval vs the released
# After `source tools/cuda/gpu-env.sh`. POOL (/data/pool), ONNX (/data/ref/taef2_encoder.onnx),
# REF (/data/ref: taef2_decoder.pth, beside the ONNX), WORK (/data), OUT (results), PRECISION (f32, tf32 or bf16: overrides the
# config's run.precision; may differ between pieces). EXTRA: more train flags.
set -uo pipefail
POOL=${POOL:-/data/pool}; ONNX=${ONNX:-/data/ref/taef2_encoder.onnx}; REF=${REF:-/data/ref}
WORK=${WORK:-/data}; OUT=${OUT:-/tmp/out}; PIECE=${PIECE:-1}; SECONDS_TRAIN=${SECONDS_TRAIN:-480}
SHARDS=$WORK/lat256v2; RUN=$WORK/distill
mkdir -p "$OUT"
if [[ ! -e $SHARDS/manifest.json ]] || ! grep -q complete <(precompute inspect "$SHARDS" 2>/dev/null | head -1); then
  echo "== precompute: pool at 256, 2 variants, taef2 teacher"
  precompute --vae taef2 --onnx "$ONNX" --images "$POOL" --resolution 256 --variants 2 --device cuda \
    --batch-size 32 --out "$SHARDS" --quiet 2>&1 | tail -6
fi
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 1000 > "$OUT/gpu-piece$PIECE.csv" &
smi=$!
if [[ $PIECE == 1 ]]; then
  rm -rf "$RUN"
  echo "== piece 1: ${SECONDS_TRAIN}s from scratch"
  timeout --foreground -s INT "$SECONDS_TRAIN" train --config configs/distill-taef2-pool.toml --shards "$SHARDS" \
    --run-dir "$RUN" --quiet ${PRECISION:+--precision "$PRECISION"} --set "model.reference_decoder=\"$REF/taef2_decoder.pth\"" ${EXTRA:-}
else
  echo "== piece $PIECE: ${SECONDS_TRAIN}s, resumed"
  timeout --foreground -s INT "$SECONDS_TRAIN" train --run-dir "$RUN" --resume --quiet ${PRECISION:+--precision "$PRECISION"}
fi
kill $smi 2>/dev/null
python3 - "$RUN/metrics.jsonl" "$OUT/gpu-piece$PIECE.csv" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
tr = [l for l in lines if l.get("type") == "train"]
for l in tr[-3:]:
    print("step", l["step"], f"{l['steps_per_s']:.2f} steps/s {l['images_per_s']:.1f} img/s",
          {k: round(v, 4) for k, v in l["losses"].items()})
u = [tuple(int(x) for x in r.split(",")) for r in open(sys.argv[2]) if r.strip() and r.split(",")[0].strip().isdigit()]
if u:
    print(f"GPU utilization mean {sum(a for a, _ in u)/len(u):.0f}%, memory used max {max(b for _, b in u)} MiB")
PY
if [[ $PIECE != 1 ]]; then
  step=$(python3 -c "import json; print(max(json.loads(l)['step'] for l in open('$RUN/metrics.jsonl')))")
  echo "== finishing at step $step (final eval, preview, export)"
  train --run-dir "$RUN" --resume --steps "$step" --quiet 2>&1 | tail -8
  echo "== held-out eval: ours (EMA) vs the released taef2 decoder on the same teacher latents"
  train eval --model "$RUN" --reference "$REF/taef2_decoder.pth" --device cuda --max-images 256 --json "$OUT/eval.json"
  echo "== the released taef2 encoder+decoder on the same split"
  train eval --model "$REF" --shards "$SHARDS" --eval-fraction 0.02 --device cuda --max-images 256 --json "$OUT/eval-released.json"
  cp "$RUN/config.toml" "$RUN/metrics.jsonl" "$RUN/loss.png" "$OUT/"
  cp "$(ls "$RUN"/previews/*.png | tail -1)" "$OUT/preview-last.png"
fi
