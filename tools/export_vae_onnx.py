#!/usr/bin/env python3
"""Export the encoder of a diffusers AutoencoderKL to ONNX, as `precompute` expects it.

What comes out (see precompute/src/teacher.rs):
  * input  `image`: [batch, 3, H, W], pixels in [-1, 1] (the diffusers convention), float32 or float16;
  * output `moments`: [batch, 2C, H/8, W/8], the posterior's mean then logvar (default), or, with
    `--output mean`, `latent_mean`: [batch, C, H/8, W/8]. Raw (unscaled) latents: precompute applies
    the preset's `(z - shift) * scale`;
  * batch, height and width are dynamic (symbols `batch`, `height`, `width`) unless `--static`;
  * the preset's metadata in the file's metadata_props: taesd.preset, taesd.channels, taesd.scale,
    taesd.shift, taesd.input_range ("-1,1"), taesd.output (moments|mean), taesd.dtype,
    taesd.optimized, taesd.source.

Weights: `--model DIR_OR_HUB_ID [--subfolder vae]` (anything AutoencoderKL.from_pretrained reads:
sd-vae-ft-ema, sdxl-vae-fp16-fix, SD3's or FLUX.1's `vae` subfolder), or `--random-init
{sd,sdxl,sd3,flux1}`: the real architecture (configs below) with PyTorch's default random init, for
benchmarks without weights. The SDXL VAE overflows in fp16 with real weights: export sdxl-vae-fp16-fix
for fp16 (precompute flags NaN/inf latents when that happens).

`--optimize` runs ONNX Runtime's basic graph optimisations (constant folding, Pad -> Conv fusion) and
then its transformer optimizer for VAE graphs on the float32 export (GroupNorm(+SiLU) fusion into
com.microsoft.GroupNorm, Conv -> com.microsoft.NhwcConv with channels-last GroupNorm and the transposes
between them merged, VAE attention fusion where the pattern matches) and then converts to float16 if
asked, as ONNX Runtime's Stable Diffusion pipeline does. The fused operators exist only in the CUDA
execution provider: optimized files are for `--device cuda`. Measured on an H100 (SDXL encoder, fp16,
precompute end to end, bench/results/2026-11-27-h100-precompute-vs-torch-fold.txt): 1.11x / 1.28x
torch.compile at 512 / 1024 (the plain export: 0.5x / 0.6x). Part of that: `--optimize` also moves
conv biases into the GroupNorm after them (fold_conv_bias; 1.20x / 1.15x; `--no-fold-conv-bias` to
leave them), latents as close to PyTorch's as without (relative L2 1.2e-2 fp16 vs fp16).

Examples:
  python3 tools/export_vae_onnx.py --model madebyollin/sdxl-vae-fp16-fix --preset sdxl-fp16-fix \\
      --dtype fp16 --optimize --out sdxl_fp16fix_encoder.onnx        # for precompute --device cuda
  python3 tools/export_vae_onnx.py --random-init sdxl --dtype fp16 --out sdxl_random_fp16.onnx
  python3 tools/export_vae_onnx.py --random-init sd3 --dtype fp32 --output mean --out sd3_random.onnx

Needs torch, diffusers, onnx; --optimize also onnxruntime (its `transformers` optimizer scripts are
pure Python: the CPU package is enough). --check compares ONNX Runtime (CPU) with PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# Architecture configs for --random-init (diffusers AutoencoderKL config keys). The encoders of the
# SD 1.x/2.x and SDXL VAEs are the same network (128-256-512-512, 4 latent channels, quant_conv);
# SD3 and FLUX.1 have 16 latent channels and no quant_conv. scaling/shift are the presets' (also in
# schemas/src/presets.rs).
_DOWN4 = ["DownEncoderBlock2D"] * 4
_UP4 = ["UpDecoderBlock2D"] * 4
CONFIGS = {
    "sd": dict(in_channels=3, out_channels=3, down_block_types=_DOWN4, up_block_types=_UP4,
               block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=4,
               norm_num_groups=32, sample_size=512, scaling_factor=0.18215),
    "sdxl": dict(in_channels=3, out_channels=3, down_block_types=_DOWN4, up_block_types=_UP4,
                 block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=4,
                 norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "sd3": dict(in_channels=3, out_channels=3, down_block_types=_DOWN4, up_block_types=_UP4,
                block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=16,
                norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False),
    "flux1": dict(in_channels=3, out_channels=3, down_block_types=_DOWN4, up_block_types=_UP4,
                  block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=16,
                  norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False),
}

# precompute's presets (schemas/src/presets.rs): channels, scale, shift. All take [-1, 1] images.
PRESETS = {
    "sd": (4, 0.18215, 0.0),
    "sdxl": (4, 0.13025, 0.0),
    "sdxl-fp16-fix": (4, 0.13025, 0.0),
    "sd3": (16, 1.5305, 0.0609),
    "flux1": (16, 0.3611, 0.1159),
}


def build_vae(args):
    """The AutoencoderKL (float32, eval) and a string saying where it came from."""
    from diffusers import AutoencoderKL

    if args.random_init:
        import torch

        torch.manual_seed(args.seed)
        vae = AutoencoderKL.from_config(CONFIGS[args.random_init])
        source = f"random-init:{args.random_init}:seed{args.seed}"
    else:
        kw = {"subfolder": args.subfolder} if args.subfolder else {}
        vae = AutoencoderKL.from_pretrained(args.model, torch_dtype=None, **kw)
        source = args.model + (f"/{args.subfolder}" if args.subfolder else "")
    return vae.float().eval(), source


def encoder_module(vae, output: str):
    """vae.encoder (+ quant_conv) as a module with one input and one output."""
    import torch

    class EncoderForOnnx(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = vae.encoder
            self.quant_conv = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else None
            self.c = int(vae.config.latent_channels)
            self.mean_only = output == "mean"

        def forward(self, image):
            h = self.encoder(image)
            if self.quant_conv is not None:
                h = self.quant_conv(h)
            return h[:, : self.c] if self.mean_only else h

    return EncoderForOnnx().eval()


def torch_export(module, path, dtype, device, static, opset, out_name):
    """torch.onnx.export with dynamic batch/height/width (or the --static shape)."""
    import torch

    b, h, w = static if static else (1, 64, 64)
    x = torch.zeros(b, 3, h, w, dtype=dtype, device=device)
    dynamic_axes = None
    if not static:
        dynamic_axes = {"image": {0: "batch", 2: "height", 3: "width"},
                        out_name: {0: "batch", 2: "latent_height", 3: "latent_width"}}
    kw = dict(input_names=["image"], output_names=[out_name], opset_version=opset, do_constant_folding=True,
              dynamic_axes=dynamic_axes)
    with torch.no_grad():
        try:
            # The TorchScript exporter: its GroupNorm decomposition (Reshape, InstanceNormalization,
            # Reshape, Mul, Add) is the pattern ONNX Runtime's optimizer fuses.
            torch.onnx.export(module, (x,), path, dynamo=False, **kw)
            return "torchscript"
        except TypeError:  # a torch without the `dynamo` argument: TorchScript is its only exporter
            torch.onnx.export(module, (x,), path, **kw)
            return "torchscript"
        except Exception as e:  # a torch whose TorchScript exporter is gone
            print(f"export: TorchScript exporter failed ({type(e).__name__}: {e}); trying the dynamo exporter",
                  file=sys.stderr)
            shapes = None
            if not static:
                d = torch.export.Dim
                shapes = {"image": {0: d("batch", min=1, max=1024), 2: 8 * d("h8", min=1, max=1024),
                                    3: 8 * d("w8", min=1, max=1024)}}
            torch.onnx.export(module, (x,), path, dynamo=True, dynamic_shapes=shapes, input_names=["image"],
                              output_names=[out_name], opset_version=max(opset, 18), external_data=False)
            return "dynamo"


def optimize(src, dst, fp16, args):
    """ONNX Runtime transformer optimizer, model_type vae; then float16 conversion."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    # ONNX Runtime's basic (provider-independent) graph rewrites first: constant folding turns the
    # pads of diffusers' Downsample2D `F.pad(x, (0, 1, 0, 1))` (a Concat/Slice subgraph in the export)
    # into a constant, and PadFusion moves it into the strided Conv's pads. Left as a Pad, the NHWC
    # graph below runs it as ONNX Runtime's generic pad kernel: 38 ms per call at 16x128x512x512 on
    # an H100, 2/3 of the whole encoder (bench/results/2026-11-27-h100-kprof-precompute-512.md).
    import onnxruntime as ort

    basic = os.path.splitext(src)[0] + "-basic.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = basic
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    src = basic

    opts = FusionOptions("vae")
    opts.enable_nhwc_conv = not args.no_nhwc
    opts.enable_group_norm = not args.no_group_norm
    opts.group_norm_channels_last = not args.no_nhwc
    opts.enable_skip_group_norm = not args.no_group_norm
    opts.enable_attention = not args.no_attention
    m = optimize_model(src, model_type="vae", num_heads=0, hidden_size=0, opt_level=0,
                       optimization_options=opts, use_gpu=True)
    stats = m.get_fused_operator_statistics()
    if fp16:
        # As ONNX Runtime's SD pipeline does for the VAE encoder: everything in float16, the
        # GroupNorm gamma/beta stay float32 (the converter knows the contrib op).
        m.convert_float_to_float16(keep_io_types=False, op_block_list=[])
    if not args.no_fold_conv_bias:
        stats["ConvBiasIntoGroupNorm"] = fold_conv_bias(m.model)
        m.topological_sort()
    m.save_model_to_file(dst)
    pads = sum(n.op_type == "Pad" for n in m.model.graph.node)
    if pads:
        print(f"warning: {pads} Pad node(s) left in the optimized graph (slow on CUDA in NHWC graphs)",
              file=sys.stderr)
    return stats


def fold_conv_bias(model):
    """Move NhwcConv biases into the com.microsoft GroupNorm that reads the conv's output.

    ONNX Runtime adds a conv bias with a separate cuDNN tensor op: one more pass over every conv
    output (1.44 ms per 512x512 image on an H100, a third of the optimized encoder's GPU time;
    bench/results/2026-11-27-h100-kprof-precompute-512.md). SkipGroupNorm adds a bias (and a skip)
    inside its first pass anyway, so:
      conv(+b) -> GroupNorm          becomes  conv -> SkipGroupNorm(skip = zeros [N, C], bias = b)
      conv(+b) -> SkipGroupNorm      becomes  conv -> SkipGroupNorm(..., bias = b)
    Other readers of the conv output (a residual) read SkipGroupNorm's second output, the sum
    `x + skip + bias` (= conv(+b) with a zero skip). Returns how many convs lost their bias.

    Part of --optimize (off with --no-fold-conv-bias). On an H100 (SDXL encoder fp16, 20 of its 28
    convs folded), precompute end to end: 279.9 vs 233.9 images/s at 512, 57.1 vs 49.7 at 1024;
    latents vs PyTorch eager fp16: relative L2 1.20e-2 with and without the fold at 512, 8.0e-3 at
    1024 (bench/results/2026-11-27-h100-precompute-vs-torch-fold.txt). The fused operators run only
    on CUDA: tools/test_export_vae_onnx.py checks the rewrite on the CPU with a NumPy model of them.
    """
    from collections import defaultdict

    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers = defaultdict(list)
    for n in g.node:
        for i, name in enumerate(n.input):
            if name:
                readers[name].append((n, i))
    outputs = {o.name for o in g.output}
    image = g.input[0].name
    prefix = "taesd_bias_fold/"
    added, zeros = [], {}

    def zero_skip(c, data_type):
        key = (c, data_type)
        if key not in zeros:
            if not added:
                g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), prefix + "i0")])
                added.append(helper.make_node("Shape", [image], [prefix + "image_shape"]))
                added.append(helper.make_node("Gather", [prefix + "image_shape", prefix + "i0"], [prefix + "batch"], axis=0))
            g.initializer.extend([numpy_helper.from_array(np.array([c], np.int64), prefix + f"c{c}")])
            added.append(helper.make_node("Concat", [prefix + "batch", prefix + f"c{c}"], [prefix + f"shape_{c}"], axis=0))
            value = numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(data_type)), "value")
            added.append(helper.make_node("ConstantOfShape", [prefix + f"shape_{c}"], [prefix + f"zeros_{c}_{data_type}"], value=value))
            zeros[key] = prefix + f"zeros_{c}_{data_type}"
        return zeros[key]

    folded = 0
    for conv in list(g.node):
        if conv.op_type != "NhwcConv" or len(conv.input) < 3 or not conv.input[2]:
            continue
        bias = inits.get(conv.input[2])
        y = conv.output[0]
        if bias is None or len(bias.dims) != 1 or y in outputs:
            continue
        users = readers[y]
        norms = [(n, i) for n, i in users if n.domain == "com.microsoft" and (
            (n.op_type == "GroupNorm" and i == 0)
            or (n.op_type == "SkipGroupNorm" and i in (0, 3) and (len(n.input) < 5 or not n.input[4])))]
        if not norms:
            continue
        norm = norms[0][0]
        others = [(n, i) for n, i in users if n is not norm]
        if norm.op_type == "SkipGroupNorm":
            if others:
                continue  # they need conv + b, which no output of this SkipGroupNorm is
            while len(norm.input) < 5:
                norm.input.append("")
            norm.input[4] = conv.input[2]
        else:
            norm.op_type = "SkipGroupNorm"
            norm.input.extend([zero_skip(bias.dims[0], bias.data_type), conv.input[2]])
            if others:
                total = y + "/plus_bias"
                norm.output.append(total)
                for n, i in others:
                    n.input[i] = total
        del conv.input[2]
        folded += 1
    nodes = added + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return folded


def op_counts(model):
    from collections import Counter

    return dict(sorted(Counter(n.op_type for n in model.graph.node).items(), key=lambda kv: -kv[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers AutoencoderKL: a folder or a hub id (with --subfolder)")
    src.add_argument("--random-init", choices=sorted(CONFIGS), help="the architecture with random weights")
    p.add_argument("--subfolder", help="e.g. vae for a whole pipeline's repository")
    p.add_argument("--preset", help="precompute preset written into the metadata (default: --random-init's; "
                   + ", ".join(PRESETS) + ")")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--output", choices=["moments", "mean"], default="moments",
                   help="moments = [mean, logvar] (2C channels; precompute stores the std too), mean = C channels")
    p.add_argument("--static", metavar="B,H,W", help="fixed input shape instead of dynamic batch/height/width")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--optimize", action="store_true", help="ONNX Runtime VAE fusions (CUDA execution provider only)")
    p.add_argument("--no-nhwc", action="store_true", help="--optimize without NhwcConv / channels-last GroupNorm")
    p.add_argument("--no-group-norm", action="store_true", help="--optimize without the GroupNorm fusion")
    p.add_argument("--no-attention", action="store_true", help="--optimize without the attention fusion")
    p.add_argument("--no-fold-conv-bias", action="store_true",
                   help="--optimize without moving conv biases into the (Skip)GroupNorm after them (the fold: 1.2x "
                   "faster at 512 on an H100, same latents)")
    p.add_argument("--seed", type=int, default=0, help="--random-init seed")
    p.add_argument("--device", default=None, help="torch device for the export (default: cuda if there, for fp16)")
    p.add_argument("--check", action="store_true", help="compare ONNX Runtime (CPU) with PyTorch on a random batch "
                   "(not for --optimize files: their fused operators are CUDA-only)")
    args = p.parse_args(argv)

    import onnx
    import torch

    preset = args.preset or (args.random_init if args.random_init else None)
    if preset is None:
        p.error("--preset is required with --model")
    if preset not in PRESETS:
        p.error(f"--preset {preset}: one of {', '.join(PRESETS)}")
    static = tuple(int(v) for v in args.static.split(",")) if args.static else None
    if static and (len(static) != 3 or static[1] % 8 or static[2] % 8):
        p.error("--static B,H,W with H and W multiples of 8")

    t0 = time.time()
    vae, source = build_vae(args)
    channels, scale, shift = PRESETS[preset]
    if int(vae.config.latent_channels) != channels:
        p.error(f"the model has {vae.config.latent_channels} latent channels but preset {preset} has {channels}")
    out_name = "latent_mean" if args.output == "mean" else "moments"
    fp16 = args.dtype == "fp16"
    module = encoder_module(vae, args.output)

    # A direct float16 export traces in float16 (on the GPU: CPU float16 convolutions are slow or missing).
    # The optimized path exports float32 and converts after the fusions, which need the float32 graph.
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    direct_fp16 = fp16 and not args.optimize
    if direct_fp16:
        module = module.half()
    module = module.to(device if (direct_fp16 or static) else "cpu")
    dtype = torch.float16 if direct_fp16 else torch.float32
    exp_device = next(module.parameters()).device

    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    fusion_stats = None
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.onnx") if args.optimize else args.out
        exporter = torch_export(module, raw, dtype, exp_device, static, args.opset, out_name)
        if args.optimize:
            fusion_stats = optimize(raw, args.out, fp16, args)

    model = onnx.load(args.out)
    meta = {
        "taesd.preset": preset,
        "taesd.channels": str(channels),
        "taesd.scale": repr(scale),
        "taesd.shift": repr(shift),
        "taesd.input_range": "-1,1",
        "taesd.output": args.output,
        "taesd.dtype": args.dtype,
        "taesd.optimized": ("ort-vae-fusions" + ("" if args.no_fold_conv_bias else "+conv-bias-fold")) if args.optimize else "none",
        "taesd.source": source,
        "taesd.exporter": f"{exporter} (torch {torch.__version__}, opset {args.opset})",
    }
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "taesd-rs tools/export_vae_onnx.py"
    onnx.save(model, args.out)

    info = {
        "out": args.out,
        "bytes": os.path.getsize(args.out),
        "seconds": round(time.time() - t0, 1),
        "input": "image [" + (",".join(map(str, (static[0], 3, static[1], static[2]))) if static else "batch,3,height,width") + "]",
        "output": out_name,
        "metadata": meta,
        "fused": fusion_stats,
        "ops": op_counts(model),
    }
    print(json.dumps(info))

    if args.check:
        check(args, module, dtype, exp_device, static)


def check(args, module, dtype, device, static):
    """ONNX Runtime (CPU) vs PyTorch on one random batch."""
    import numpy as np
    import onnxruntime as ort
    import torch

    b, h, w = static if static else (2, 64, 96)
    x = torch.rand(b, 3, h, w) * 2 - 1
    with torch.no_grad():
        ref = module(x.to(device=device, dtype=dtype)).float().cpu().numpy()
    sess = ort.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    feed = x.numpy().astype(np.float16 if args.dtype == "fp16" else np.float32)
    got = sess.run(None, {"image": feed})[0].astype(np.float32)
    err = np.abs(got - ref).max()
    rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)
    print(json.dumps({"check": {"shape": list(got.shape), "max_abs": float(err), "rel_l2": float(rel)}}))
    tol = 2e-2 if args.dtype == "fp16" else 1e-3
    if not rel < tol:
        sys.exit(f"check failed: relative L2 {rel:.3g} >= {tol}")


if __name__ == "__main__":
    main()
