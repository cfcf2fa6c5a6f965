#!/usr/bin/env python3
"""PyTorch replica of `train` (issue 17's equal-steps A/B, bench/gpu_torch_ab.sh): trains the
taef2-architecture encoder and decoder from scratch on OUR shard folder with the same recipe, then
writes the EMA weights where `train eval --model OUT` reads them.

Models: bench/torch_train_step.py (model/src/arch.rs's layers, state-dict names as taesd.py).
Recipe, as train/src/recipe (step.rs, terms.rs, init.rs, config.rs, disc.rs, replay.rs, ema.rs, losses.rs):
  * encoder: MSE(enc(x), z) to the teacher latents, Adam with AMSGrad (lr, betas (0.9, 0.9)).
  * decoder: fake = dec(z). The fakes go into the replay buffer first (appended while there is
    room, then each into a random slot), then floor(B * replay_fraction) samples are drawn from it
    with replacement (a fake just added may come back); the disc batch is the first B - n current
    fakes followed by the drawn ones, each position showing its fake or the real image by a coin
    flip (the latent travels with its image). Disc (seraena's latent-conditioned patch
    discriminator, BatchNorm) in training mode: MSE(scores, +1 fake / -1 real), AdamW (3e-4,
    (0.9, 0.99), weight decay 0.01). Correction with the updated disc in eval mode: g = the
    gradient of sum_i mean (D(real_i) - D(fake_i + c_i))^2 at c = 0, corr = -g / (std(g) + 1e-5);
    loss MSE(fake, fake + corr) + MSE(pool8(fake), pool8(real)) (+ --cycle-weight x the latent
    cycle MSE(enc(fake), z) through the encoder's weights of the step, before its update, taken
    without gradient: recipe.cycle_weight); Adam AMSGrad.
  * EMA of both (decay min(0.999, (1 + n) / (10 + n)), n = updates so far) after each applied
    update; the exported weights are the EMA's.
  * lr: `RecipeConfig::lr_at` (linear warm-up, then constant / cosine / linear decay to
    lr * lr_min_factor at the last step), for the encoder and decoder.
  * data: every shard row whose key is not in the held-out split (train/src/split.rs: sha256 of
    a domain prefix + key, so the same rows as `train` and `train eval` use); per sample a random
    crop aligned to the latent grid (train/src/sample.rs), no mirroring unless --hflip; a
    DataLoader with workers, shuffled each epoch.
  * AMP as the PyTorch baseline: fp16 autocast and one GradScaler for the three optimisers (a
    step with non-finite gradients is skipped per optimiser, as the scaler does; the EMA follows
    only applied updates). The correction's input gradient is taken on the scaled loss and
    unscaled, so fp16 does not flush it to zero. --precision fp32 for the CPU.
What differs from `train` on purpose: the row order and crop draws (another RNG), the weights'
random init (PyTorch's own generator; the same distribution: uniform +-1/sqrt(fan_in), decoder
output bias 0.5), the arithmetic (fp16 autocast vs our bf16).

Writes OUT/taef2_encoder.safetensors, OUT/taef2_decoder.safetensors (EMA, f32, taesd.py names),
OUT/metrics.jsonl (a `train` line every --log-every steps: step, lr, losses{encoder, decoder,
gan, lowres_mse, disc, disc_acc, correction_std, decoder_mse, and cycle with --cycle-weight} as
means over the interval,
images_per_s; `train plot` overlays it on our runs) and OUT/run.json.

    python3 bench/torch_train.py --shards latents --steps 2000 --batch 32 --crop 128 --seed 0 --out runs/torch-s0

`--check` (no torch needed): reads {"key_unit": [keys], "lr_at": [{"step", "end", "lr",
"warmup", "schedule", "decay_steps", "min_factor"}]} on stdin and prints this script's values as
JSON (train/tests/torch_replica.rs compares them with the Rust ones).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

SPLIT_DOMAIN = b"taesd-rs held-out split\0"
LATENT_SCALE = 8  # taef2: 8 pixels per latent cell


def key_unit(key):
    """train/src/split.rs `key_unit`: the key's position in [0, 1)."""
    h = hashlib.sha256(SPLIT_DOMAIN + key.encode("utf-8")).digest()
    return (int.from_bytes(h[:8], "big") >> 11) / float(1 << 53)


def is_heldout(key, fraction):
    return fraction > 0.0 and key_unit(key) < fraction


def lr_at(step, end, lr, warmup=0, schedule="constant", decay_steps=0, min_factor=0.0):
    """train/src/recipe/config.rs `RecipeConfig::lr_at` at (0-based) `step` of a run whose last
    step is `end` (None: unknown, no decay)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if end is None or schedule == "constant":
        return lr
    if schedule == "cosine":
        shape = lambda t: 0.5 * (1.0 + math.cos(math.pi * t))  # noqa: E731
    elif schedule == "linear":
        shape = lambda t: 1.0 - t  # noqa: E731
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    after_warmup = max(end - warmup, 0)
    span = after_warmup if decay_steps == 0 else min(decay_steps, after_warmup)
    start = end - span
    if span == 0 or step < start:
        return lr
    t = min((step - start + 1) / span, 1.0)
    return lr * (min_factor + (1.0 - min_factor) * shape(t))


def check():
    q = json.load(sys.stdin)
    out = {
        "key_unit": [key_unit(k) for k in q.get("key_unit", [])],
        "lr_at": [
            lr_at(c["step"], c.get("end"), c["lr"], c.get("warmup", 0), c.get("schedule", "constant"),
                  c.get("decay_steps", 0), c.get("min_factor", 0.0))
            for c in q.get("lr_at", [])
        ],
    }
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# Data


class ShardRows:
    """The training rows of a shard folder (held-out keys left out): encoded images and latents,
    kept as Arrow columns (shared with forked DataLoader workers without copies)."""

    def __init__(self, folder, eval_fraction):
        import pyarrow as pa
        import pyarrow.parquet as pq

        # The shards are in OUT/data/ (in folders of the earlier layout, beside manifest.json).
        if os.path.isdir(os.path.join(folder, "data")):
            folder = os.path.join(folder, "data")
        # shard-*.parquet of a whole run, part-*-of-*-shard-*.parquet of `precompute --part` runs.
        files = sorted(f for f in os.listdir(folder) if f.startswith(("shard-", "part-")) and f.endswith(".parquet"))
        if not files:
            raise SystemExit(f"{folder}: no shard-*.parquet files")
        tables, dtypes = [], set()
        for f in files:
            t = pq.read_table(os.path.join(folder, f), columns=["key", "image", "latent", "latent_shape"])
            meta = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()}
            dtypes.add(meta.get("taesd.latent_dtype", "float16"))
            tables.append(t)
        if len(dtypes) != 1:
            raise SystemExit(f"{folder}: shards with several latent dtypes {sorted(dtypes)}")
        table = pa.concat_tables(tables)
        keys = table.column("key").to_pylist()
        keep = [not is_heldout(k, eval_fraction) for k in keys]
        self.rows_total = len(keys)
        table = table.filter(pa.array(keep))
        self.heldout = self.rows_total - table.num_rows
        if table.num_rows == 0:
            raise SystemExit(f"{folder}: every row is in the held-out split ({eval_fraction})")
        self.images = table.column("image")
        self.latents = table.column("latent")
        self.shapes = table.column("latent_shape").to_pylist()
        self.latent_dtype = dtypes.pop()

    def __len__(self):
        return len(self.shapes)


class CropDataset:
    """torch Dataset: row i -> (uint8 image [3, crop, crop], latent [C, crop/8, crop/8] in the
    stored dtype), a random crop aligned to the latent grid (train/src/sample.rs)."""

    def __init__(self, rows, crop, hflip):
        self.rows, self.crop, self.hflip = rows, crop, hflip
        self.rng = None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import io

        import numpy as np
        import torch
        from PIL import Image

        if self.rng is None:  # per worker: torch seeds each worker from the loader's generator
            self.rng = np.random.default_rng(torch.initial_seed())
        img = np.asarray(Image.open(io.BytesIO(self.rows.images[i].as_py())).convert("RGB"))
        c, lh, lw = self.rows.shapes[i]
        lat = np.frombuffer(self.rows.latents[i].as_py(), dtype=self.rows.latent_dtype).reshape(c, lh, lw)
        h, w = img.shape[:2]
        s = LATENT_SCALE
        if (lh * s, lw * s) != (h, w):
            raise ValueError(f"row {i}: a {w}x{h} image with a {lw}x{lh} latent is not on a {s}x grid")
        if self.crop % s or self.crop > min(h, w):
            raise ValueError(f"crop {self.crop} must be a multiple of {s} and at most {min(h, w)}")
        cells = self.crop // s
        xc = int(self.rng.integers(0, lw - cells + 1))
        yc = int(self.rng.integers(0, lh - cells + 1))
        img = img[yc * s:yc * s + self.crop, xc * s:xc * s + self.crop]
        lat = lat[:, yc:yc + cells, xc:xc + cells]
        if self.hflip and self.rng.random() < 0.5:
            img, lat = img[:, ::-1], lat[:, :, ::-1]
        return (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(lat)))


# ---------------------------------------------------------------------------------------------
# Training


class ReplayBuffer:
    """train/src/recipe/replay.rs: add the batch's fakes (append while there is room, else a
    random slot each; a later write to a slot wins), then draw `n` entries with replacement.
    Entries are f16 on the device."""

    def __init__(self, capacity):
        self.capacity, self.images, self.latents, self.len = capacity, None, None, 0

    def add_then_sample(self, fake, lat, n, rng):
        import numpy as np
        import torch

        if self.capacity == 0:
            return None
        dev = fake.device
        if self.images is None or self.images.shape[1:] != fake.shape[1:] or self.latents.shape[1:] != lat.shape[1:]:
            self.images = torch.empty((self.capacity, *fake.shape[1:]), dtype=torch.float16, device=dev)
            self.latents = torch.empty((self.capacity, *lat.shape[1:]), dtype=torch.float16, device=dev)
            self.len = 0
        slots, n_len = [], self.len
        for _ in range(fake.shape[0]):
            if n_len < self.capacity:
                slots.append(n_len)
                n_len += 1
            else:
                slots.append(int(rng.integers(0, n_len)))
        last = {s: i for i, s in enumerate(slots)}  # slot -> the batch index written last
        dst = torch.as_tensor(np.fromiter(last.keys(), np.int64), device=dev)
        src = torch.as_tensor(np.fromiter(last.values(), np.int64), device=dev)
        self.images[dst] = fake[src].to(torch.float16)
        self.latents[dst] = lat[src].to(torch.float16)
        self.len = n_len
        if n == 0:
            return None
        draw = torch.as_tensor(rng.integers(0, n_len, size=n), device=dev)
        return self.images[draw].float(), self.latents[draw].float()


class Ema:
    """train/src/recipe/ema.rs: ema = d * ema + (1 - d) * w after each applied update,
    d = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model, decay, warmup=True):
        self.names = [n for n, _ in model.named_parameters()]
        self.values = [p.detach().float().clone() for p in model.parameters()]
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def update(self, model):
        import torch

        n = self.updates
        d = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        torch._foreach_lerp_(self.values, [p.detach().float() for p in model.parameters()], 1.0 - d)
        self.updates += 1

    def state_dict(self):
        return {n: v.detach().cpu().contiguous() for n, v in zip(self.names, self.values)}


def optimizer_steps(opt):
    """Updates the optimiser has applied (GradScaler skips those with non-finite gradients)."""
    p = opt.param_groups[0]["params"][0]
    st = opt.state.get(p)
    return int(st["step"]) if st and "step" in st else 0


def train(a):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from torch.func import functional_call

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_train_step import Disc, decoder, encoder

    dev = torch.device(a.device)
    amp = a.precision == "amp"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)  # replay slots, replay draws, coin flips

    rows = ShardRows(a.shards, a.eval_fraction)
    ds = CropDataset(rows, a.crop, a.hflip)
    if len(ds) < a.batch:
        raise SystemExit(f"{len(ds)} training rows, fewer than one batch of {a.batch}")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=a.batch, shuffle=True, drop_last=True, num_workers=a.workers,
        pin_memory=dev.type == "cuda", persistent_workers=a.workers > 0,
        prefetch_factor=4 if a.workers > 0 else None,
        generator=torch.Generator().manual_seed(a.seed))

    enc, dec, disc = encoder().to(dev), decoder().to(dev), Disc().to(dev)
    with torch.no_grad():
        dec[-1].bias.fill_(0.5)  # the decoder starts at mid-grey, as ours
    opt_e = torch.optim.Adam(enc.parameters(), lr=a.lr, betas=(0.9, 0.9), eps=1e-8, amsgrad=True)
    opt_d = torch.optim.Adam(dec.parameters(), lr=a.lr, betas=(0.9, 0.9), eps=1e-8, amsgrad=True)
    opt_g = torch.optim.AdamW(disc.parameters(), lr=a.disc_lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    ema_e, ema_d = Ema(enc, a.ema_decay), Ema(dec, a.ema_decay)
    replay = ReplayBuffer(a.replay_capacity)
    ac = lambda: torch.autocast(dev.type, dtype=torch.float16, enabled=amp)  # noqa: E731
    unit = torch.tensor(1.0 / 255.0, dtype=torch.float32, device=dev)

    os.makedirs(a.out, exist_ok=True)
    mlog = open(os.path.join(a.out, "metrics.jsonl"), "w")

    def log(kind, step, **fields):
        mlog.write(json.dumps({"type": kind, "step": step, **fields}) + "\n")
        mlog.flush()

    info = {"impl": "torch", "args": vars(a), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "rows": rows.rows_total, "heldout_rows": rows.heldout, "train_rows": len(rows)}
    log("start", 0, **info)
    print(f"torch_train: {len(rows)} training rows ({rows.heldout} held out), {a.steps} steps, "
          f"batch {a.batch}, crop {a.crop}, {a.precision} on {info['device']}", flush=True)

    def batches():
        epoch = 0
        while True:
            for b in loader:
                yield epoch, b
            epoch += 1

    sums, n_int, t_int = {}, 0, time.perf_counter()
    t0, step, skipped, stopped = time.perf_counter(), 0, {"encoder": 0, "decoder": 0}, False
    B = a.batch
    n_replay = min(math.floor(B * a.replay_fraction), B) if a.replay_capacity > 0 else 0
    for epoch, (xb, zb) in batches():
        if step >= a.steps:
            break
        if a.time_limit and time.perf_counter() - t0 > a.time_limit:
            stopped = True
            break
        x = xb.to(dev, non_blocking=True).float() * unit
        z = zb.to(dev, non_blocking=True).float()
        lr = lr_at(step, a.steps, a.lr, a.lr_warmup, a.lr_schedule, a.lr_decay_steps, a.lr_min_factor)
        for o in (opt_e, opt_d):
            for g in o.param_groups:
                g["lr"] = lr
        steps_before = (optimizer_steps(opt_e), optimizer_steps(opt_d))

        # The latent cycle term's encoder: the weights of this step, before its update, detached.
        enc_w = {k: v.detach().clone() for k, v in enc.named_parameters()} if a.cycle_weight > 0 else None

        # 1. Encoder.
        with ac():
            pred = enc(x)
        l_enc = F.mse_loss(pred.float(), z)
        opt_e.zero_grad(set_to_none=True)
        scaler.scale(l_enc).backward()
        scaler.step(opt_e)

        # 2. Decoder fakes; the discriminator's batch (replay: add, then draw).
        with ac():
            fake = dec(z).float()
        fake_d = fake.detach()
        drawn = replay.add_then_sample(fake_d, z, n_replay, rng)
        if drawn is None:
            fake_in, ctx_in = fake_d, z
        else:
            n_fresh = B - n_replay
            fake_in = torch.cat([fake_d[:n_fresh], drawn[0]])
            ctx_in = torch.cat([z[:n_fresh], drawn[1]])
        coin_np = rng.random(B) < 0.5
        coin = torch.as_tensor(coin_np, device=dev).view(B, 1, 1, 1)
        d_img = torch.where(coin, fake_in, x)
        d_lat = torch.where(coin, ctx_in, z)
        disc.train()
        with ac():
            scores = disc(d_img, d_lat).float()
        l_disc = F.mse_loss(scores, torch.where(coin, 1.0, -1.0).expand_as(scores))
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(l_disc).backward()
        scaler.step(opt_g)
        disc_acc = ((scores.detach().mean((1, 2, 3)) > 0) == coin.view(B)).float().mean()

        # 3. Correction with the updated discriminator in inference mode.
        disc.eval()
        with torch.no_grad(), ac():
            ref = disc(x, z).float()
        c = torch.zeros_like(fake_d, requires_grad=True)
        with ac():
            sc = disc(fake_d + c, z).float()
        l_corr = (ref - sc).pow(2).mean((1, 2, 3)).sum()
        s = scaler.get_scale() if amp else 1.0
        (g,) = torch.autograd.grad(l_corr * s, c)
        disc.train()
        g = g.float() / s
        corr_std = g.std(correction=0)
        target = fake_d + (-g / (corr_std + 1e-5))

        # 4. Decoder loss and update.
        l_gan = F.mse_loss(fake, target)
        l_low = F.mse_loss(F.avg_pool2d(fake, 8), F.avg_pool2d(x, 8))
        l_dec = a.gan_weight * l_gan + a.lowres_weight * l_low
        l_cyc = None
        if enc_w is not None:
            with ac():
                z_cyc = functional_call(enc, enc_w, (fake,)).float()
            l_cyc = F.mse_loss(z_cyc, z)
            l_dec = l_dec + a.cycle_weight * l_cyc
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(l_dec).backward()
        scaler.step(opt_d)
        scaler.update()

        # 5. EMA after applied updates only.
        if optimizer_steps(opt_e) > steps_before[0]:
            ema_e.update(enc)
        else:
            skipped["encoder"] += 1
        if optimizer_steps(opt_d) > steps_before[1]:
            ema_d.update(dec)
        else:
            skipped["decoder"] += 1
        step += 1

        vals = {"encoder": l_enc, "decoder": l_dec, "gan": l_gan, "lowres_mse": l_low, "disc": l_disc,
                "disc_acc": disc_acc, "correction_std": corr_std, "decoder_mse": F.mse_loss(fake_d, x)}
        if l_cyc is not None:
            vals["cycle"] = l_cyc
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v.detach()
        n_int += 1
        if step % a.log_every == 0 or step == a.steps:
            now = time.perf_counter()
            dt = now - t_int
            log("train", step, epoch=epoch, lr=lr,
                losses={k: float(v) / n_int for k, v in sums.items()},
                images_per_s=n_int * B / dt, steps_per_s=n_int / dt, elapsed_s=now - t0,
                skipped_total=sum(skipped.values()), skipped_updates=dict(skipped),
                grad_scale=scaler.get_scale() if amp else None)
            if not a.quiet:
                print(f"step {step}/{a.steps} {n_int * B / dt:.0f} img/s "
                      + " ".join(f"{k} {float(v) / n_int:.4g}" for k, v in sums.items()), flush=True)
            sums, n_int, t_int = {}, 0, now

    elapsed = time.perf_counter() - t0
    if n_int:  # a partial interval (time limit)
        log("train", step, epoch=epoch, lr=lr, losses={k: float(v) / n_int for k, v in sums.items()},
            images_per_s=n_int * B / (time.perf_counter() - t_int), elapsed_s=elapsed,
            skipped_total=sum(skipped.values()), skipped_updates=dict(skipped))
    meta = {"format": "pt", "taesd_layout": "taesd", "taesd_variant": "taef2"}
    files = []
    for name, ema in (("encoder", ema_e), ("decoder", ema_d)):
        p = os.path.join(a.out, f"taef2_{name}.safetensors")
        save_file(ema.state_dict(), p, metadata=meta)
        files.append(p)
    summary = {"steps": step, "steps_asked": a.steps, "stopped_at_time_limit": stopped,
               "elapsed_s": elapsed, "images_per_s": step * B / elapsed if elapsed else None,
               "skipped": skipped, "ema_updates": {"encoder": ema_e.updates, "decoder": ema_d.updates}}
    log("export", step, files=files)
    log("end", step, **summary)
    mlog.close()
    with open(os.path.join(a.out, "run.json"), "w") as f:
        json.dump({**info, **summary}, f, indent=1)
    print(f"torch_train: {step} steps in {elapsed:.1f} s ({summary['images_per_s']:.0f} img/s)"
          f"{', stopped at the time limit' if stopped else ''}; skipped updates {skipped}; EMA -> {a.out}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="print key_unit / lr_at of the JSON on stdin (no torch)")
    ap.add_argument("--shards", help="shard folder written by precompute")
    ap.add_argument("--out", help="output folder (EMA weights, metrics.jsonl, run.json)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--crop", type=int, default=128, help="training crop side (multiple of 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-4, help="encoder/decoder peak learning rate")
    ap.add_argument("--lr-warmup", type=int, default=0, help="linear warm-up steps")
    ap.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant")
    ap.add_argument("--lr-decay-steps", type=int, default=0, help="decay over the last N steps (0: all after warm-up)")
    ap.add_argument("--lr-min-factor", type=float, default=0.0, help="lr at the last step, as a fraction of --lr")
    ap.add_argument("--disc-lr", type=float, default=3e-4)
    ap.add_argument("--gan-weight", type=float, default=1.0)
    ap.add_argument("--lowres-weight", type=float, default=1.0)
    ap.add_argument("--cycle-weight", type=float, default=0.0,
                    help="the latent cycle term MSE(enc(fake), z) (recipe.cycle_weight; 0: off)")
    ap.add_argument("--replay-capacity", type=int, default=16384)
    ap.add_argument("--replay-fraction", type=float, default=0.5)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--eval-fraction", type=float, default=0.02, help="held-out fraction left out (data.eval_fraction)")
    ap.add_argument("--hflip", action="store_true", help="mirror crops (off, as data.hflip)")
    ap.add_argument("--workers", type=int, default=3, help="DataLoader worker processes")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", choices=["amp", "fp32"], default=None,
                    help="amp (fp16 autocast + GradScaler; default on CUDA) or fp32 (default on the CPU, where amp is slow)")
    ap.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds (and export)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    if a.check:
        return check()
    if not a.shards or not a.out:
        ap.error("--shards and --out are needed")
    if a.precision is None:
        a.precision = "amp" if a.device.startswith("cuda") else "fp32"
    if a.crop % LATENT_SCALE:
        ap.error(f"--crop {a.crop} is not a multiple of {LATENT_SCALE}")
    train(a)


if __name__ == "__main__":
    main()
