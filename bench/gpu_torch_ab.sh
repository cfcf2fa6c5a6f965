#!/usr/bin/env bash
# Issue 17's regression guard: an equal-steps A/B of our trainer against the PyTorch replica
# (bench/torch_train.py) on the same shards — two seeds each, all four runs at once on one GPU, the
# same steps, crops, batch and learning-rate schedule — then `train eval` of each on the 256 px
# held-out split. Writes OUT/summary.md (+ .json): per run and per implementation (mean and seed
# spread) PSNR, SSIM, sharpness, encoder MAE, and whether ours is within PyTorch's seed spread.
#
#   source tools/cuda/gpu-env.sh && bash bench/gpu_torch_ab.sh
#
# Needs: `train` (and `precompute` + the ORT bundle only when the shards are not there yet) from
# .carry (docs/gpu.md: carry ".carry/bin" and ".carry/lib", 15 MB; the 57 MB ORT bundle does not fit
# beside anything else in one call's 64 MiB); the 256 px pool shards at $WORK/lat256v2 (made here
# from POOL as bench/gpu_quality_ab.sh does, when missing); $REF/taef2_decoder.pth for the reference
# row (left out when absent); python3 with torch, numpy, pillow, pyarrow and safetensors (the GPU
# image lists them all). Where safetensors (or pyarrow) is missing there, carry wheels in the
# git-ignored .whl/ (add ".whl" to carry); this script installs whatever .whl/ holds first. Made here
# with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl safetensors==0.8.0
# (0.5 MB; pyarrow==26.0.1 is 55 MB: with the binaries that is over the 64 MiB a call carries, so
# it would need a call of its own on the same warm machine, installed with --target /tmp/site).
#
# Knobs (environment): STEPS (2000), SEEDS ("0 1"), CROP (128), BATCH (32), the recipe's schedule
# LR (1e-3), WARMUP (200), SCHEDULE (cosine), MIN_FACTOR (0.02) — configs/scratch-taef2-25min.toml's;
# its pixel warm start is not in the replica, so both sides run the GAN from step 1 —
# CYCLE (0: the latent cycle term's weight on both sides, recipe.cycle_weight / --cycle-weight;
# the scratch config's is 0.3),
# TIME_LIMIT (420 s: a safety stop for each run; a run stopped by it has fewer steps and the summary
# says so), WORKERS (3 loader threads / DataLoader workers per run), POOL (/data/pool), ONNX
# (/data/ref/taef2_encoder.onnx), REF (/data/ref), WORK (/data), SHARDS ($WORK/lat256v2), OUT
# (/tmp/out), EXTRA (more train flags), TORCH_EXTRA (more torch_train.py flags), DEVICE (cuda; cpu
# for a dry run of the whole script here on small shards: f32 both sides).
# Time on an H100 (our trainer ~28 steps/s over all runs at 128 px when shared, PyTorch eager AMP
# ~0.8x of ours per step): 2000 steps x (2 + 2 / 0.8) / 28 = ~320 s of training, then ~30 s of
# evaluation (all four at once): one device call of ~6-7 minutes when the shards exist.
set -uo pipefail
{ # (the whole script is read before it runs: an edit meanwhile cannot change what runs)
POOL=${POOL:-/data/pool}; ONNX=${ONNX:-/data/ref/taef2_encoder.onnx}; REF=${REF:-/data/ref}
WORK=${WORK:-/data}; OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-2000}; SEEDS=${SEEDS:-0 1}; CROP=${CROP:-128}; BATCH=${BATCH:-32}
LR=${LR:-1e-3}; WARMUP=${WARMUP:-200}; SCHEDULE=${SCHEDULE:-cosine}; MIN_FACTOR=${MIN_FACTOR:-0.02}
CYCLE=${CYCLE:-0}
TIME_LIMIT=${TIME_LIMIT:-420}; WORKERS=${WORKERS:-3}; DEVICE=${DEVICE:-cuda}
S256=${SHARDS:-$WORK/lat256v2}; AB=$WORK/ab/torch-ab
dev_args=(--device "$DEVICE"); [[ $DEVICE == cpu ]] && dev_args+=(--precision f32)
mkdir -p "$OUT" "$AB"
t_start=$(date +%s)

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "installing .whl/ failed"; exit 1; }
fi
python3 -c 'import torch, numpy, PIL, pyarrow, safetensors; print("python", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())' \
  || { echo "python3 lacks a package: carry wheels in .whl/ (see this script's header)"; exit 1; }
command -v train > /dev/null || { echo "no train binary: source tools/cuda/gpu-env.sh with .carry carried"; exit 1; }

# (The whole report is read before it is looked at: `| grep -q` could close the pipe while precompute
# still prints, and under pipefail its broken-pipe exit would read as "not complete".)
if [[ $(precompute inspect "$S256" 2>/dev/null) != status*complete* ]]; then
  echo "== precompute: pool at 256 px, 2 variants, taef2 teacher -> $S256"
  precompute --vae taef2 --onnx "$ONNX" --images "$POOL" --resolution 256 --variants 2 --device cuda \
    --batch-size 32 --out "$S256" --quiet 2>&1 | tail -4 || { echo "precompute failed"; exit 1; }
fi

ours=(); torch_runs=()
for s in $SEEDS; do ours+=("ours-s$s"); torch_runs+=("torch-s$s"); done
names="${ours[*]} ${torch_runs[*]}"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 1000 > "$AB/gpu.csv" 2>/dev/null &
smi=$!
t0=$(date +%s)
pids=()
for s in $SEEDS; do
  rm -rf "${AB:?}/ours-s$s" "${AB:?}/torch-s$s"
  train --config configs/distill-taef2-pool.toml --shards "$S256" --run-dir "$AB/ours-s$s" --seed "$s" \
    --steps "$STEPS" --crop "$CROP" --batch-size "$BATCH" --quiet --time-limit "$TIME_LIMIT" "${dev_args[@]}" \
    --set recipe.lr="$LR" --set recipe.lr_warmup_steps="$WARMUP" --set recipe.lr_schedule="\"$SCHEDULE\"" \
    --set recipe.lr_min_factor="$MIN_FACTOR" --set recipe.cycle_weight="$CYCLE" --set run.log_every=50 --set run.eval_every=0 --set run.preview_every=0 \
    --set run.checkpoint_every=0 --set run.checkpoint_replay=false --set 'run.export=["taesd"]' \
    --set data.eval_max_images=32 --set data.workers="$WORKERS" ${EXTRA:-} > "$AB/ours-s$s.log" 2>&1 &
  pids+=($!)
  PYTHONUNBUFFERED=1 python3 bench/torch_train.py --shards "$S256" --out "$AB/torch-s$s" --seed "$s" \
    --steps "$STEPS" --crop "$CROP" --batch "$BATCH" --lr "$LR" --lr-warmup "$WARMUP" --lr-schedule "$SCHEDULE" \
    --lr-min-factor "$MIN_FACTOR" --cycle-weight "$CYCLE" --workers "$WORKERS" --time-limit "$TIME_LIMIT" --device "$DEVICE" --quiet ${TORCH_EXTRA:-} \
    > "$AB/torch-s$s.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "a run failed (pid $p): see its log"; done
kill $smi 2>/dev/null
echo "== $(wc -w <<< "$names") runs at once: $(( $(date +%s) - t0 )) s"

ref_args=(); [[ -f $REF/taef2_decoder.pth ]] && ref_args=(--reference "$REF/taef2_decoder.pth")
pids=()
for n in $names; do
  tail -2 "$AB/$n.log" | sed "s/^/  [$n] /"
  train eval --model "$AB/$n" --shards "$S256" "${ref_args[@]}" --device "$DEVICE" --max-images 256 \
    --json "$AB/eval-$n.json" > "$AB/eval-$n.txt" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "an eval failed (pid $p): see eval-*.txt"; done

for k in losses.decoder_mse losses.encoder losses.disc_acc; do
  train plot $(for n in $names; do echo "$AB/$n"; done) --key "$k" --out "$OUT/${k#losses.}.png" || true
done

python3 - "$AB" "$OUT" "$STEPS" $names <<'PY'
import json, os, statistics, sys
ab, out, steps_asked, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
METRICS = [  # key, label, digits, which way is better
    ("psnr", "PSNR", 2, "higher"), ("ssim", "SSIM", 3, "higher"),
    ("sharpness", "sharpness", 3, "closer to 1"), ("encoder_mae", "encoder MAE", 4, "lower"),
    ("cycle_mae", "cycle MAE", 4, "lower"), ("roundtrip_psnr", "round-trip PSNR", 2, "higher")]

def run_info(n):
    lines = [json.loads(l) for l in open(f"{ab}/{n}/metrics.jsonl")]
    tr = [l for l in lines if l.get("type") == "train"]
    ips = [t["images_per_s"] for t in tr if t.get("images_per_s")]
    end = [l for l in lines if l.get("type") == "end"]
    return {"steps": max((t["step"] for t in tr), default=0), "images_per_s": sum(ips) / len(ips) if ips else None,
            "stopped": bool(end and end[-1].get("stopped_at_time_limit"))}

runs, ref = {}, None
for n in names:
    r = {"impl": n.split("-")[0], "seed": n.split("-s")[-1]}
    try:
        r.update(run_info(n))
    except (OSError, ValueError) as e:
        r["error"] = f"metrics: {e}"
    try:
        e = json.load(open(f"{ab}/eval-{n}.json"))
        r["eval"] = e["models"]["ours"]
        ref = e["models"].get("reference", ref)
    except (OSError, ValueError, KeyError) as e:
        r["error"] = f"eval: {e}"
    runs[n] = r

def vals(impl, k):
    return [r["eval"][k] for r in runs.values() if r["impl"] == impl and r.get("eval", {}).get(k) is not None]

verdicts = {}
for k, label, d, better in METRICS:
    o, t = vals("ours", k), vals("torch", k)
    if not o or not t:
        continue
    mo, mt = statistics.mean(o), statistics.mean(t)
    spread_t, spread_o = max(t) - min(t), max(o) - min(o)
    delta = mo - mt
    worse_side = {"higher": delta < 0, "lower": delta > 0, "closer to 1": abs(mo - 1) > abs(mt - 1)}[better]
    v = "within" if abs(delta) <= spread_t else ("WORSE" if worse_side else "better")
    verdicts[k] = {"ours": o, "torch": t, "ours_mean": mo, "torch_mean": mt, "torch_spread": spread_t,
                   "ours_spread": spread_o, "delta": delta, "verdict": v, "better": better,
                   "worse_beyond_noise": worse_side and abs(delta) > max(spread_t, spread_o)}
PRIMARY = ("psnr", "ssim", "sharpness", "encoder_mae")
equal = all(r.get("steps") == steps_asked for r in runs.values())
complete = all(k in verdicts for k in PRIMARY)
within = complete and all(verdicts[k]["verdict"] != "WORSE" for k in PRIMARY)
beyond = [k for k in PRIMARY if verdicts.get(k, {}).get("worse_beyond_noise")]
ok = equal and complete and not beyond

L = []
L.append(f"| run | steps | img/s (shared GPU) | " + " | ".join(m[1] for m in METRICS) + " |")
L.append("|---" * (3 + len(METRICS)) + "|")
for n, r in runs.items():
    e = r.get("eval", {})
    f = lambda k, d: "-" if e.get(k) is None else f"{e[k]:.{d}f}"
    ips = "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.0f}"
    st = f"{r.get('steps', '-')}" + (" (time limit)" if r.get("stopped") else "")
    L.append(f"| {n} | {st} | {ips} | " + " | ".join(f(k, d) for k, _, d, _ in METRICS) + (f" {r['error']}" if "error" in r else "") + " |")
if ref:
    L.append("| released taef2 decoder | | | " + " | ".join("" if ref.get(k) is None else f"{ref[k]:.{d}f}" for k, _, d, _ in METRICS) + " |")
L.append("")
L.append("| metric | ours: mean (seeds) | PyTorch: mean (seeds) | ours - PyTorch | PyTorch seed spread | ours seed spread | vs PyTorch's spread | worse beyond both spreads |")
L.append("|---|---|---|---|---|---|---|---|")
for k, label, d, better in METRICS:
    v = verdicts.get(k)
    if not v:
        continue
    seeds = lambda xs: ", ".join(f"{x:.{d}f}" for x in xs)
    L.append(f"| {label} ({better} is better) | {v['ours_mean']:.{d}f} ({seeds(v['ours'])}) | {v['torch_mean']:.{d}f} ({seeds(v['torch'])}) "
             f"| {v['delta']:+.{d}f} | {v['torch_spread']:.{d}f} | {v['ours_spread']:.{d}f} | {v['verdict']} | {'YES' if v['worse_beyond_noise'] else 'no'} |")
L.append("")
L.append("`vs PyTorch's spread`: `within` = |mean(ours) - mean(PyTorch)| <= PyTorch's seed spread (max - min of its "
         "seeds); `better` / `WORSE` = outside it, on the good / bad side. With two seeds a side this is a noisy test: "
         "for two identical implementations (normal seed noise) it says `within` 61% of the time and `WORSE` 20% "
         "(per metric). `worse beyond both spreads` (ours worse by more than the larger seed spread of either side) "
         "happens by chance 11% of the time per metric.")
L.append(f"steps equal ({steps_asked} each): {'yes' if equal else 'NO'}")
L.append(f"ours within PyTorch's seed spread (PSNR, SSIM, sharpness, encoder MAE none WORSE): {'yes' if within else 'NO'}")
L.append(f"guard (equal steps, none of those four worse beyond both spreads): {'PASS' if ok else 'FAIL'}"
         + (f" (worse: {', '.join(beyond)})" if beyond else ""))
try:
    u = [l.split(",") for l in open(f"{ab}/gpu.csv") if l.strip() and l.split(",")[0].strip().isdigit()]
    if u:
        L.append(f"GPU busy {sum(int(a) for a, _ in u) / len(u):.0f}% (nvidia-smi, 1 s samples), memory max {max(int(b) for _, b in u)} MiB")
except OSError:
    pass
text = "\n".join(L) + "\n"
open(f"{out}/summary.md", "w").write(text)
json.dump({"runs": runs, "reference": ref, "verdicts": verdicts, "steps_equal": equal,
           "within_torch_spread": within, "guard_pass": ok},
          open(f"{out}/summary.json", "w"), indent=1)
print(text)
PY

# What comes back (the device tool returns at most 8 files): summary.md/.json, three plots and this tarball.
(cd "$AB" && tar -czf "$OUT/torch-ab.tgz" ./*.log ./*.json ./*.txt ./gpu.csv \
  $(for n in $names; do for f in metrics.jsonl config.toml run.json; do [[ -f $n/$f ]] && echo "$n/$f"; done; done))
echo "== done in $(( $(date +%s) - t_start )) s"
exit
}
