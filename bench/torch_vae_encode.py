#!/usr/bin/env python3
"""The PyTorch/diffusers side of bench/gpu_precompute_vs_torch.sh: the same VAE encoder as the ONNX
export (tools/export_vae_onnx.py --random-init CONFIG --seed S builds the same weights), over the
same folder of images, eager or torch.compile, and prints one JSON line with the rates.

What is timed (after --warmup batches, which include torch.compile's compilation):
  * end to end: PIL decode + RGB + resize shorter side to N (LANCZOS, as precompute) + centre crop
    in a thread pool (--workers, prefetching like a DataLoader), uint8 -> pinned host tensor ->
    GPU, [-1, 1], fp16, encoder + quant_conv -> moments, posterior mean/std in TAESD scale, copied
    back to the host. precompute does the same work, plus hashing and storing each image.
  * GPU only: the encoder alone on one batch already on the GPU, repeated (the model's ceiling).

    python bench/torch_vae_encode.py --images DIR --resolution 512 --batch 16 --mode compile
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))


def load(path, n):
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = im.size
    s = n / min(w, h)
    if (w, h) != (n, n):
        im = im.resize((max(n, round(w * s)), max(n, round(h * s))), Image.LANCZOS)
        w, h = im.size
        x, y = (w - n) // 2, (h - n) // 2
        im = im.crop((x, y, x + n, y + n))
    import numpy as np

    return np.asarray(im, dtype=np.uint8)  # H, W, 3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: its default)")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    p.add_argument("--random-init", default="sdxl", help="architecture (tools/export_vae_onnx.py CONFIGS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=3, help="batches before timing (compilation happens here)")
    p.add_argument("--gpu-only-iters", type=int, default=20)
    p.add_argument("--save-latents", help="write the first batch's scaled posterior mean here (.npy)")
    args = p.parse_args()

    import numpy as np
    import torch

    from export_vae_onnx import CONFIGS, PRESETS, encoder_module

    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_config(CONFIGS[args.random_init]).float().eval()
    c, scale, shift = PRESETS[args.random_init]
    enc = encoder_module(vae, "moments").to(dev, dtype)
    if args.channels_last:
        enc = enc.to(memory_format=torch.channels_last)
    fn = enc
    if args.mode == "compile":
        fn = torch.compile(enc, mode=args.compile_mode) if args.compile_mode else torch.compile(enc)

    def encode(x_u8):  # [B, H, W, 3] uint8 on the GPU -> (mean, std) in TAESD scale, on the host
        # u8 / 255 -> [-1, 1] in float32, then the model's dtype: the values precompute feeds.
        x = x_u8.permute(0, 3, 1, 2).float().div_(255.0).mul_(2.0).sub_(1.0).to(dtype)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.contiguous()
        m = fn(x).float()
        mean, logvar = m[:, :c], m[:, c:].clamp(-30.0, 20.0)
        std = torch.exp(0.5 * logvar) * scale
        return ((mean - shift) * scale).cpu(), std.cpu()

    files = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                   if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))
    if args.limit:
        files = files[: args.limit]
    n, b = args.resolution, args.batch
    batches = [files[i: i + b] for i in range(0, len(files), b)]
    pool = cf.ThreadPoolExecutor(args.workers)

    def host_batch(paths):
        arrs = list(pool.map(lambda f: load(f, n), paths))
        while len(arrs) < b:  # pad the last batch, as precompute does on CUDA
            arrs.append(np.full((n, n, 3), 128, np.uint8))
        return torch.from_numpy(np.stack(arrs)).pin_memory()

    out = {"tool": "torch", "mode": args.mode + (f"-{args.compile_mode}" if args.compile_mode else "")
           + ("-channels-last" if args.channels_last else ""), "resolution": n, "batch": b,
           "dtype": args.dtype, "images": len(files), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0)}
    nonfinite = 0
    with torch.inference_mode():
        # Warm-up (and compilation) on the first batch's images.
        t0 = time.time()
        first = host_batch(batches[0]).to(dev, non_blocking=True)
        for _ in range(args.warmup):
            mean, _ = encode(first)
        torch.cuda.synchronize()
        out["warmup_s"] = round(time.time() - t0, 2)
        if args.save_latents:
            np.save(args.save_latents, mean[: len(batches[0])].numpy())

        # End to end, decode of batch i+1 overlapping the GPU work of batch i.
        t0 = time.time()
        out["t_start"] = t0
        nxt = pool.submit(host_batch, batches[0])
        done = 0
        for i in range(len(batches)):
            hb = nxt.result()
            if i + 1 < len(batches):
                nxt = pool.submit(host_batch, batches[i + 1])
            mean, std = encode(hb.to(dev, non_blocking=True))
            k = len(batches[i])
            nonfinite += int((~torch.isfinite(mean[:k])).flatten(1).any(1).sum())
            done += k
        torch.cuda.synchronize()
        t1 = time.time()
        out["t_end"] = t1
        out["seconds"] = round(t1 - t0, 3)
        out["images_per_s"] = round(done / (t1 - t0), 2)
        out["nonfinite_samples"] = nonfinite

        # The encoder alone, one batch resident on the GPU.
        x = first
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(args.gpu_only_iters):
            xx = x.permute(0, 3, 1, 2).float().div_(255.0).mul_(2.0).sub_(1.0).to(dtype)
            xx = xx.contiguous(memory_format=torch.channels_last) if args.channels_last else xx.contiguous()
            fn(xx)
        torch.cuda.synchronize()
        out["gpu_only_images_per_s"] = round(args.gpu_only_iters * b / (time.time() - t0), 2)
    out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
