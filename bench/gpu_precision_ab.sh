#!/usr/bin/env bash
# Issue 5: the effect of mixed precision on the eval numbers. The same run (configs/distill-taef2-pool.toml,
# same seed, same batches) for STEPS steps from scratch in one precision, then the held-out eval.
#   P=f32 STEPS=500 bash bench/gpu_precision_ab.sh ; P=bf16 STEPS=500 bash bench/gpu_precision_ab.sh
# After `source tools/cuda/gpu-env.sh`. POOL (/data/pool), ONNX (/data/ref/taef2_encoder.onnx), REF
# (/data/ref/taef2), WORK (/data), OUT (results: ab-$P.txt, ab-$P-eval.json, ab-$P-metrics.jsonl).
set -uo pipefail
POOL=${POOL:-/data/pool}; ONNX=${ONNX:-/data/ref/taef2_encoder.onnx}; REF=${REF:-/data/ref/taef2}
WORK=${WORK:-/data}; OUT=${OUT:-/tmp/out}; P=${P:-bf16}; STEPS=${STEPS:-500}
SHARDS=$WORK/lat256v2; RUN=$WORK/ab-$P
mkdir -p "$OUT"
if [[ ! -e $SHARDS/manifest.json ]] || ! grep -q complete <(precompute inspect "$SHARDS" 2>/dev/null | head -1); then
  precompute --vae taef2 --onnx "$ONNX" --images "$POOL" --resolution 256 --variants 2 --device cuda \
    --batch-size 32 --out "$SHARDS" --quiet 2>&1 | grep throughput
fi
rm -rf "$RUN"
{
  echo "== $P: $STEPS steps from scratch, configs/distill-taef2-pool.toml, seed 0"
  t0=$(date +%s)
  train --config configs/distill-taef2-pool.toml --shards "$SHARDS" --run-dir "$RUN" --quiet --precision "$P" \
    --steps "$STEPS" --set run.eval_every=0 --set run.preview_every=0 \
    --set "model.reference_decoder=\"$REF/taef2_decoder.pth\"" 2>&1 | tail -6
  echo "wall $(( $(date +%s) - t0 )) s"
  python3 - "$RUN/metrics.jsonl" <<'PY'
import json, sys
tr = [json.loads(l) for l in open(sys.argv[1])]
tr = [l for l in tr if l.get("type") == "train"]
ips = [l["images_per_s"] for l in tr[2:]]
print(f"steady images/s {sum(ips)/max(len(ips),1):.1f}; last losses", {k: round(v, 4) for k, v in tr[-1]["losses"].items()})
PY
  train eval --model "$RUN" --reference "$REF/taef2_decoder.pth" --device cuda --max-images 256 --json "$OUT/ab-$P-eval.json"
} 2>&1 | tee "$OUT/ab-$P.txt"
cp "$RUN/metrics.jsonl" "$OUT/ab-$P-metrics.jsonl"
