#!/usr/bin/env bash
# Issue 17's from-scratch run on the GPU machine, in stints that may span machines (and sessions):
# taef2 architecture from scratch with the taef2 ONNX teacher on the pool, CONFIG's schedule.
#   CONFIG=configs/scratch-taef2-25min.toml SECONDS_TRAIN=700 bash bench/gpu_scratch_run.sh
# Each call trains at most SECONDS_TRAIN seconds (`train --time-limit`), starting the run if RUN has
# no checkpoint, else resuming it; a run folder brought from another machine is first unpacked from
# CARRY_CK (parts made by `tools/checkpoint_parts.sh pack`, carried in a git-ignored folder). At the
# end of the stint the checkpoint is packed into $WORK/ckparts (9 parts of 16 MB for taef2 without the
# replay buffer, 11 with the config's two EMA probes; copy at most 4 to $OUT per device call). When the run reaches its last step it
# exports, and this evaluates it on the held-out split against the released taef2 decoder (and the
# released encoder + decoder, for their latent-cycle error): $OUT/eval.json, $OUT/eval-released.json.
# After `source tools/cuda/gpu-env.sh`. POOL, ONNX, REF, WORK, OUT as in gpu_distill_pool.sh.
# The whole 25-minute run in one session (a full 1,800 s of device time; docs/gpu.md): after the
# chunk calls, one call starts it in the background and waits, the next ones wait on:
#   setsid nohup bash -c 'OUT=/data/scratch-out SECONDS_TRAIN=1595 FIT_TIME=1450 bash bench/gpu_scratch_run.sh \
#     > /data/scratch.log 2>&1; touch /data/scratch.done' </dev/null >/dev/null 2>&1 &
#   while [[ ! -e /data/scratch.done ]] && (( SECONDS < 570 )); do sleep 5; done; tail -3 /data/scratch.log
# (each call within 30 s of the last; SECONDS_TRAIN ~10% above FIT_TIME; size FIT_TIME as the held
# seconds, or the device seconds if fewer, left after the chunk calls minus ~150 s: docs/gpu.md).
# The call that sees it done brings the files back in the same call (at most 8 files a call):
#   cd /data/scratch-out && tar czf $OUT/small.tgz *.json *.toml *.jsonl *.csv ../scratch.log; \
#     cp loss.png preview-last.png model.tgz $OUT/
# small.tgz: eval.json, eval-released.json, run-eval.json (the run's own evaluation with the EMA
# probes), config.toml, metrics.jsonl, gpu.csv, gpu-clocks.csv and the log; model.tgz: the exported
# taesd .safetensors (~10 MB for taef2: the trained model itself).
set -uo pipefail
POOL=${POOL:-/data/pool}; ONNX=${ONNX:-/data/ref/taef2_encoder.onnx}; REF=${REF:-/data/ref}
WORK=${WORK:-/data}; OUT=${OUT:-/tmp/out}; CONFIG=${CONFIG:-configs/scratch-taef2-25min.toml}
SECONDS_TRAIN=${SECONDS_TRAIN:-600}; SHARDS=$WORK/lat256v2; RUN=${RUN:-$WORK/scratch}
mkdir -p "$OUT"
# The machine (a host-bound 128 px step runs at the host CPU's speed): cores, CPU model, GPU.
echo "== machine: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p'); $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1)"
# FIT_TIME=1500: `train --fit-time 1500` at the run's start: every step count scaled to fill 1500 s on
# this machine, by its own timing of each stage's step (instead of SCALE's guess).
# SCALE=0.9: every step count of CONFIG (each stage's and the run's) times 0.9, the schedule's shape
# kept, for a session with less device time than the config was sized for (a slow machine start).
if [[ -n ${SCALE:-} && ! -d $RUN/checkpoints ]]; then
  python3 - "$CONFIG" "$SCALE" "$WORK/config-scaled.toml" <<'PY' || exit 1
import re, sys
src, scale, dst = sys.argv[1], float(sys.argv[2]), sys.argv[3]
text = re.sub(r"(?m)^(steps\s*=\s*)(\d+)", lambda m: f"{m[1]}{round(int(m[2]) * scale / 50) * 50}", open(src).read())
open(dst, "w").write(f"# {src} with every step count x {scale} (bench/gpu_scratch_run.sh SCALE)\n" + text)
PY
  CONFIG=$WORK/config-scaled.toml
  grep -E '^steps' "$CONFIG"
fi
if ! grep -q complete <<< "$(precompute inspect "$SHARDS" 2>/dev/null | head -3)"; then
  echo "== precompute: pool at 256, 2 variants, taef2 teacher"
  precompute --vae taef2 --onnx "$ONNX" --images "$POOL" --resolution 256 --variants 2 --device cuda \
    --batch-size 32 --out "$SHARDS" --quiet 2>&1 | tail -4
fi
if [[ ! -d $RUN/checkpoints && -n ${CARRY_CK:-} ]]; then
  echo "== unpacking the carried checkpoint from $CARRY_CK"
  tools/checkpoint_parts.sh unpack "$RUN" "$CARRY_CK"/ckpt-*.tar.part* || exit 1
fi
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 1000 >> "$OUT/gpu.csv" &
smi=$!
# Clocks, power and temperature every 5 s: does a long run's images/s wander with the GPU's clock?
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader,nounits \
  -lms 5000 >> "$OUT/gpu-clocks.csv" 2>/dev/null &
smi_clocks=$!
if [[ -d $RUN/checkpoints ]]; then
  echo "== stint of ${SECONDS_TRAIN}s, resumed (shards at $SHARDS)"
  train --run-dir "$RUN" --resume --quiet --time-limit "$SECONDS_TRAIN" --shards "$SHARDS" \
    --set "model.reference_decoder=\"$REF/taef2_decoder.pth\"" ${EXTRA:-} 2>&1 | tail -12
else
  echo "== stint of ${SECONDS_TRAIN}s, from scratch: $CONFIG"
  train --config "$CONFIG" --shards "$SHARDS" --run-dir "$RUN" --quiet --time-limit "$SECONDS_TRAIN" \
    ${FIT_TIME:+--fit-time "$FIT_TIME"} \
    --set "model.reference_decoder=\"$REF/taef2_decoder.pth\"" ${EXTRA:-} 2>&1 | tail -12
fi
kill $smi $smi_clocks 2>/dev/null
python3 - "$RUN/metrics.jsonl" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
for f in (l for l in lines if l["type"] == "fit"):
    print(f"fitted to {f['budget_s']:.0f} s: x {f['factor']:.3f}, run.steps {f['run_steps_before']} -> {f['run_steps_after']};",
          ", ".join(f"{s['crop']} px {s['images_per_s']:.1f} images/s ({s['steps_before']} -> {s['steps_after']} steps)" for s in f["segments"]))
tr = [l for l in lines if l["type"] == "train"]
t = tr[-1]
print(f"step {t['step']}: {t['elapsed_s']:.0f} s of training so far, {t['images_per_s']:.0f} img/s, lr {t['lr']:.2e},",
      {k: round(v, 4) for k, v in t['losses'].items()}, {k: round(v, 3) for k, v in t.get('time_fractions', {}).items()})
PY
if [[ -e $RUN/export/export.json ]] && python3 -c "
import json, sys; s = json.load(open('$RUN/export/export.json'))['step']
ck = max(int(p.split('-')[-1]) for p in __import__('glob').glob('$RUN/checkpoints/step-*'))
sys.exit(0 if s >= ck else 1)"; then
  echo "== the run is finished: held-out eval vs the released taef2"
  train eval --model "$RUN" --reference "$REF/taef2_decoder.pth" --device cuda --max-images 256 --json "$OUT/eval.json"
  train eval --model "$REF" --shards "$SHARDS" --device cuda --max-images 256 --json "$OUT/eval-released.json" | tail -3
  # The run's own last evaluation (in metrics.jsonl too): the EMA probes beside the exported EMA.
  python3 -c "
import json; m = json.load(open('$RUN/eval.json'))['models']
for k, v in m.items(): print(f'  {k:>10}: PSNR {v[\"psnr\"]:.2f}, SSIM {v[\"ssim\"]:.3f}, sharpness {v[\"sharpness\"]:.3f}')"
  cp "$RUN/config.toml" "$RUN/metrics.jsonl" "$RUN/loss.png" "$OUT/" 2>/dev/null
  cp "$(ls "$RUN"/previews/*.png | tail -1)" "$OUT/preview-last.png"
  cp "$RUN/eval.json" "$OUT/run-eval.json"
  (cd "$RUN/export" && tar -czf "$OUT/model.tgz" taesd/*.safetensors)
fi
rm -rf "$WORK/ckparts" && tools/checkpoint_parts.sh pack "$RUN" "$WORK/ckparts" >/dev/null && ls "$WORK/ckparts"
