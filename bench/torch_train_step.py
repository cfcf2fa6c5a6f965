#!/usr/bin/env python3
"""PyTorch reference of our training step, for bench/gpu_train_step.sh (the project's own script).

The same taef2-architecture encoder and decoder as model/src/arch.rs (taesd.py's Block with
TAEF2's mid-block pool, 32 latent channels, 8x; state-dict names and shapes as the released
taef2_*.pth, which load into them and match the parity fixtures; bench/torch_train.py trains
and exports them), seraena's conditional patch discriminator
(train/src/recipe/disc.rs: six conv+BatchNorm+ReLU blocks 64,128s2,256s2,512s2,512,512, a
bias-free 1x1 projection per block avg-pooled to H/8), and the recipe step of
train/src/recipe/engine.rs:
  full:    encoder MSE(enc(x), z) + AMSGrad; decoder: disc step (fakes half replayed, coin-flip
           real/fake, MSE to +1 fake / -1 real, AdamW), correction = -grad/std of
           sum MSE(D(real), D(fake + c)) at c = 0, loss MSE(fake, fake + corr) + MSE(pool8(fake),
           pool8(real)), AMSGrad.
  decoder: decoder-only MSE(dec(z), x) + AMSGrad.
Modes: fp32 (TF32 off, as our default), amp (fp16 autocast + GradScaler).
Prints one JSON line per configuration: images/s, ms/step, peak memory (max_memory_allocated).
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv(n_in, n_out, **kw):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def mid_pool(c):
    """TAEF2's mid-block pool, indices as in taesd.py (`pool.0`, `pool.1`, `pool.3`)."""
    g = 4 * c
    return nn.Sequential(nn.Conv2d(c, g, 1, bias=False), nn.GroupNorm(4, g), nn.ReLU(), nn.Conv2d(g, c, 1, bias=False))


class Block(nn.Module):
    def __init__(self, n_in, n_out, pool=False):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.pool = mid_pool(n_in) if pool else None
        self.fuse = nn.ReLU()

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def encoder(c=32):
    layers = [conv(3, 64), Block(64, 64)]
    for stage in range(3):
        layers.append(conv(64, 64, stride=2, bias=False))
        layers += [Block(64, 64, pool=(stage == 2)) for _ in range(3)]
    layers.append(conv(64, c))
    return nn.Sequential(*layers)


def decoder(c=32):
    layers = [Clamp(), conv(c, 64), nn.ReLU()]
    for stage in range(3):
        layers += [Block(64, 64, pool=(stage == 0)) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2), conv(64, 64, bias=False)]
    layers += [Block(64, 64), conv(64, 3)]
    return nn.Sequential(*layers)


class Disc(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        widths, strides = [64, 128, 256, 512, 512, 512], [1, 2, 2, 2, 1, 1]
        blocks, projs, n_in = [], [], 3 + c
        for w, s in zip(widths, strides):
            k = 4 if s == 2 else 3
            blocks.append(nn.Sequential(nn.Conv2d(n_in, w, k, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
            projs.append(nn.Conv2d(w, 1, 1, bias=False))
            n_in = w
        self.blocks, self.proj = nn.ModuleList(blocks), nn.ModuleList(projs)

    def forward(self, img, lat):
        h, w = img.shape[-2:]
        x = torch.cat([img * 2 - 1, F.interpolate(lat, size=(h, w), mode="nearest")], 1)
        outs = []
        for b, p in zip(self.blocks, self.proj):
            x = b(x)
            o = p(x)
            oh, ow = h // 8, w // 8
            if o.shape[-2:] != (oh, ow):
                o = F.avg_pool2d(o, (o.shape[-2] // oh, o.shape[-1] // ow))
            outs.append(o)
        return torch.cat(outs, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--recipe", choices=["full", "decoder"], default="full")
    ap.add_argument("--mode", choices=["fp32", "amp"], default="fp32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=60.0, help="stop timing after this long")
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    torch.manual_seed(0)
    enc, dec, disc = encoder().to(dev), decoder().to(dev), Disc().to(dev)
    opt_e = torch.optim.Adam(enc.parameters(), lr=3e-4, betas=(0.9, 0.9), amsgrad=True)
    opt_d = torch.optim.Adam(dec.parameters(), lr=3e-4, betas=(0.9, 0.9), amsgrad=True)
    opt_g = torch.optim.AdamW(disc.parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.01)
    amp = a.mode == "amp"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    B, S = a.batch, a.size
    x = torch.rand(B, 3, S, S, device=dev)
    z = torch.randn(B, 32, S // 8, S // 8, device=dev)
    replay_img = torch.rand(B, 3, S, S, device=dev).half()
    replay_lat = z.clone().half()
    ac = lambda: torch.autocast("cuda", dtype=torch.float16, enabled=amp)

    def step():
        if a.recipe == "decoder":
            with ac():
                loss = F.mse_loss(dec(z).float(), x)
            opt_d.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt_d)
            scaler.update()
            return
        # encoder
        with ac():
            le = F.mse_loss(enc(x).float(), z)
        opt_e.zero_grad(set_to_none=True)
        scaler.scale(le).backward()
        scaler.step(opt_e)
        # decoder fakes
        with ac():
            fake = dec(z)
        # disc step: half current fakes, half replayed, coin flip real/fake per position
        n_new = B - B // 2
        f_img = torch.cat([fake.detach()[:n_new].float(), replay_img[: B - n_new].float()])
        f_lat = torch.cat([z[:n_new], replay_lat[: B - n_new].float()])
        coin = torch.rand(B, 1, 1, 1, device=dev) < 0.5
        d_img = torch.where(coin, f_img, x)
        d_lat = torch.where(coin, f_lat, z)
        with ac():
            scores = disc(d_img, d_lat).float()
            ld = F.mse_loss(scores, torch.where(coin, 1.0, -1.0).expand_as(scores))
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(ld).backward()
        scaler.step(opt_g)
        # correction with the updated disc in eval mode
        disc.eval()
        c = torch.zeros_like(fake, dtype=torch.float32, requires_grad=True)
        with ac():
            lc = F.mse_loss(disc(x, z).float(), disc(fake.detach().float() + c, z).float())
        (g,) = torch.autograd.grad(lc, c)
        disc.train()
        corr = -g / (g.std() + 1e-12)
        target = (fake.detach().float() + corr).detach()
        with ac():
            f32 = fake.float()
            loss = F.mse_loss(f32, target) + F.mse_loss(F.avg_pool2d(f32, 8), F.avg_pool2d(x, 8))
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt_d)
        scaler.update()
        replay_img[:n_new] = fake.detach()[:n_new].half()

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    n = 0
    while n < a.steps and (n == 0 or time.perf_counter() - t0 < a.seconds):
        step()
        n += 1
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    print(json.dumps({
        "impl": "torch", "mode": a.mode, "recipe": a.recipe, "size": S, "batch": B, "steps": n,
        "ms_per_step": dt * 1e3, "images_per_s": B / dt,
        "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()
