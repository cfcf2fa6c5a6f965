#!/usr/bin/env bash
# The whole pipeline, end to end, on real images that are here (../shared):
#   1. precompute: pool images -> Parquet shards of image/latent pairs, the released TAEF2 encoder
#      (ONNX) as the teacher;
#   2. train: a short run that fine-tunes the released taef2 encoder and decoder on those shards
#      (the full recipe: encoder MSE, decoder GAN + low-res MSE), with previews, metrics,
#      TensorBoard events, report.html and the exports (taesd.py .pth, ComfyUI, ONNX);
#   3. train eval: our model vs the released decoder on the held-out split; decode a few latents.
#
#   ./demo.sh [OUT]        (default OUT=demo-out; remove it to start over, rerun to resume)
#
# Knobs (environment): DEMO_IMAGES (256), DEMO_RESOLUTION (64), DEMO_STEPS (24), DEMO_CROP (= resolution),
# DEMO_BATCH (4), DEMO_DEVICE (auto: CUDA when built with it and present, else CPU),
# TAESD_SHARED (../shared).
#
# Time on 2 CPU cores: the first build of the two binaries (candle, arrow/parquet, ONNX Runtime's
# bindings; debug profile with optimised dependencies) takes ~20 minutes, and cargo shows
# each crate as it goes; the pipeline itself then takes about 8 minutes or more (7:58 measured with the cores shared, before the ONNX export and the mid-run evaluation were added). A rerun
# skips the build (seconds) and resumes the run.
set -euo pipefail
cd "$(dirname "$0")"

SHARED=${TAESD_SHARED:-../shared}
OUT=${1:-demo-out}
IMAGES=${DEMO_IMAGES:-256}
RES=${DEMO_RESOLUTION:-64}
STEPS=${DEMO_STEPS:-24}
CROP=${DEMO_CROP:-$RES}   # crop = the stored size: exact encoder targets (see recipe.encoder_margin)
BATCH=${DEMO_BATCH:-4}
DEVICE=${DEMO_DEVICE:-auto}
REF=$SHARED/reference/taef2

for f in "$SHARED/data/pool" "$REF/taef2_encoder.onnx" "$REF/taef2_encoder.pth" "$REF/taef2_decoder.pth"; do
  [[ -e $f ]] || { echo "demo: $f is missing (set TAESD_SHARED to the shared folder)" >&2; exit 1; }
done

# ONNX Runtime: precompute loads the library at run time (ORT_DYLIB_PATH, --ort-lib, or a pip install).
if [[ -z ${ORT_DYLIB_PATH:-} ]] && ! python3 -c 'import onnxruntime' 2>/dev/null; then
  echo "== installing ONNX Runtime (pip, user site)"
  python3 -m pip install --quiet --user --disable-pip-version-check onnxruntime==1.31.1
fi

BIN=${CARGO_TARGET_DIR:-target}/debug
if [[ -x $BIN/precompute && -x $BIN/train ]]; then
  echo "== building precompute and train into $BIN (built before: only what changed is rebuilt)"
else
  echo "== building precompute and train into $BIN: the first build takes ~20 minutes on 2 cores"
  echo "   (cargo lists each crate as it compiles it; later runs reuse the build)"
fi
cargo build -p precompute -p train

echo "== 1. precompute: the first $IMAGES files of the pool at ${RES}x${RES}, taef2 teacher -> $OUT/latents"
"$BIN/precompute" --vae taef2 --onnx "$REF/taef2_encoder.onnx" --images "$SHARED/data/pool" \
  --out "$OUT/latents" --resolution "$RES" --limit "$IMAGES" --shard-rows 128 --device "$DEVICE"
"$BIN/precompute" inspect "$OUT/latents"

echo "== 2. train: fine-tune the released taef2 for $STEPS steps (crop $CROP, batch $BATCH) -> $OUT/run"
resume=()
[[ -e $OUT/run/config.toml ]] && resume=(--resume)
"$BIN/train" --shards "$OUT/latents" --run-dir "$OUT/run" --device "$DEVICE" \
  --steps "$STEPS" --crop "$CROP" --batch-size "$BATCH" "${resume[@]}" \
  --set model.init_encoder="\"$REF/taef2_encoder.pth\"" \
  --set model.init_decoder="\"$REF/taef2_decoder.pth\"" \
  --set model.reference_decoder="\"$REF/taef2_decoder.pth\"" \
  --set recipe.lr=1e-5 --set recipe.disc_warmup_steps=12 --set run.preview_every=12 --set run.log_every=4 \
  --set run.eval_every=12 --set 'run.export=["taesd", "comfyui", "onnx"]' \
  --set data.eval_fraction=0.05 --set data.eval_max_images=12

echo "== 3. eval on the held-out split: ours (EMA export) vs the released taef2 decoder"
"$BIN/train" eval --model "$OUT/run" --reference "$REF/taef2_decoder.pth" --device "$DEVICE" \
  --json "$OUT/eval.json"
"$BIN/train" decode --model "$OUT/run" --latents "$OUT/latents" --out "$OUT/decoded" --limit 4 --device "$DEVICE"

echo
echo "done: shards $OUT/latents, run $OUT/run (report.html, previews/, loss.png, metrics.jsonl,"
echo "      export/: taesd/*.pth for taesd.py, onnx/ for ONNX Runtime), eval $OUT/eval.json,"
echo "      decoded PNGs $OUT/decoded; tensorboard --logdir $OUT shows the run"
