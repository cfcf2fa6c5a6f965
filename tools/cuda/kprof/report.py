#!/usr/bin/env python3
"""Summarise kprof.tsv files (tools/cuda/kprof/kprof.c): top kernels and time per kind.

    python3 tools/cuda/kprof/report.py ours.tsv [torch.tsv ...] [--top 25] [--steps N]

--steps N divides the window's times by N (the number of training steps inside the window, e.g.
window_ms / the bench's ms/step) to give ms per step. Names are demangled with c++filt when it is
on PATH. Kinds: cuDNN/cuBLAS convolution and GEMM kernels, taesd-ops' own kernels (ops/src/kernels/ops.cu),
candle's kernels, PyTorch's, copies and memsets.
"""
import argparse
import re
import shutil
import subprocess

OURS = ("bias_act_", "act_bias_bwd_", "bias_grad_finish_", "add_relu_", "relu_bwd_", "upsample2x_",
        "downsum2x_", "adam_f32", "channel_")


def kind(name):
    n = name.lower()
    if n.startswith("[memcpy"):
        return "memcpy"
    if n.startswith("[memset"):
        return "memset"
    if any(name.startswith(p) for p in OURS):
        return "taesd-ops"
    if re.search(r"cudnn|xmma|implicit_gemm|wgrad|dgrad|fprop|conv|sm\d\d_|cutlass|gemm|nchwtonhwc|nhwctonchw", n):
        return "conv/gemm (cuDNN, cuBLAS)"
    if "at::native" in name or "at::" in name or "pytorch" in n or "triton" in n:
        return "pytorch"
    return "candle"


def demangle(names):
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    d = out.split("\n")[: len(names)]
    return d if len(d) == len(names) else names


def load(path):
    meta, rows = {}, []
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("#"):
            k, v = line[2:].split("\t")
            meta[k] = float(v)
        elif line and not line.startswith("total_ms"):
            t, c, _, _, name = line.split("\t", 4)
            rows.append((float(t), int(c), name))
    names = demangle([r[2] for r in rows])
    return meta, [(t, c, n) for (t, c, _), n in zip(rows, names)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--steps", type=float, nargs="*", help="steps in each file's window")
    a = ap.parse_args()
    for i, path in enumerate(a.files):
        meta, rows = load(path)
        steps = a.steps[i] if a.steps and i < len(a.steps) else 1.0
        unit = "ms/step" if steps != 1.0 else "ms"
        total = sum(t for t, _, _ in rows)
        print(f"## {path}")
        print(f"window {meta['window_ms'] / steps:.1f} {unit}, GPU busy {meta['busy_ms'] / steps:.1f} "
              f"({meta['busy_ms'] / meta['window_ms']:.0%}), kernel sum {total / steps:.1f}")
        kinds = {}
        for t, c, n in rows:
            k = kinds.setdefault(kind(n), [0.0, 0])
            k[0] += t
            k[1] += c
        print(f"\n| kind | {unit} | launches/{'step' if steps != 1.0 else 'window'} | share |\n|---|---|---|---|")
        for k, (t, c) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
            print(f"| {k} | {t / steps:.2f} | {c / steps:.0f} | {t / total:.1%} |")
        print(f"\n| {unit} | count | mean us | kind | kernel |\n|---|---|---|---|---|")
        for t, c, n in rows[: a.top]:
            short = n if len(n) < 110 else n[:107] + "..."
            print(f"| {t / steps:.2f} | {c / steps:.1f} | {1000 * t / c:.1f} | {kind(n)} | `{short}` |")
        print()


if __name__ == "__main__":
    main()
