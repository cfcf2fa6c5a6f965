"""Our exports in the tools people run TAESD in, with real torch (issue 20): taesd.py's
TAESD(encoder_path, decoder_path) on our .pth files (torch.load(weights_only=True)), ComfyUI's
vae_approx loading of the same files, and diffusers' AutoencoderTiny on our diffusers folders;
each one's outputs against candle's, saved beside the files by
`cargo run -p taesd-e2e --example consumer_fixtures -- DIR`.

    python3 bench/torch_consumers.py --taesd-py PATH/taesd.py --fixtures DIR --out RESULTS_DIR

taesd.py is madebyollin/taesd's file (not in this repository: pass its path). diffusers is
optional (skipped with a note when it cannot be imported). Per variant and device (cpu, and cuda
when there is one; TF32 off), the max |torch - candle| of the encoder and decoder. Writes
RESULTS_DIR/torch-consumers.json and .md, and prints the table. Exit status 1 when a check fails
(a load error, or a float32 difference above --tol).
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import traceback

import numpy as np
import torch


def load_taesd_py(path):
    spec = importlib.util.spec_from_file_location("taesd_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def max_abs(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def weights_only_report(path):
    """torch's own view: loads with weights_only=True, and which globals the pickle names."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    unsafe = None
    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    return sd, unsafe


# ComfyUI's vae_approx loader, as its VAELoader does it (nodes.py, load_taesd): the files in
# models/vae_approx named `<name>_encoder.*` / `<name>_decoder.*`, each read with
# comfy.utils.load_torch_file (torch.load(weights_only=True) for .pth), keys prefixed with
# `taesd_encoder.` / `taesd_decoder.`, then the VAE built from that state dict (its TAESD module
# has taesd.py's structure). ComfyUI is not installed on the GPU machine: this repeats those
# steps, and loads the prefixed dict strictly into taesd.py's modules under the same names.
COMFY_NAMES = ["taesd", "taesdxl", "taesd3", "taef1"]  # the names its VAELoader lists


def comfy_vae_approx(folder, name, mod):
    files = sorted(os.listdir(folder))
    enc = next(f for f in files if f.startswith(f"{name}_encoder."))
    dec = next(f for f in files if f.startswith(f"{name}_decoder."))
    sd = {}
    for prefix, f in (("taesd_encoder", enc), ("taesd_decoder", dec)):
        part = torch.load(os.path.join(folder, f), map_location="cpu", weights_only=True)
        for k, v in part.items():
            sd[f"{prefix}.{k}"] = v
    t = mod.TAESD(encoder_path=None, decoder_path=None, **guess(mod, name))

    class Comfy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.taesd_encoder, self.taesd_decoder = t.encoder, t.decoder

    m = Comfy()
    m.load_state_dict(sd, strict=True)
    return m, sorted({k.split(".")[0] for k in sd})


def guess(mod, name):
    lc, arch = mod.TAESD.guess_latent_channels_and_arch(None, f"{name}_encoder.pth")
    return {"latent_channels": lc, "arch_variant": arch}


def check_variant(mod, d, v, devices, tol):
    rows = []
    enc_p, dec_p = os.path.join(d, f"{v}_encoder.pth"), os.path.join(d, f"{v}_decoder.pth")
    x = np.load(os.path.join(d, "image.npy"))
    z_ref = np.load(os.path.join(d, "latent.npy"))
    y_ref = np.load(os.path.join(d, "decoded.npy"))
    # torch's weights_only loader, and the globals it sees.
    for p in (enc_p, dec_p):
        sd, unsafe = weights_only_report(p)
        rows.append({"variant": v, "check": f"torch.load(weights_only=True) {os.path.basename(p)}", "ok": unsafe in (None, []),
                     "detail": f"{len(sd)} tensors, {next(iter(sd.values())).dtype}; unsafe globals: {unsafe}"})
    # taesd.py, unchanged: TAESD(encoder_path, decoder_path) guesses the structure from the name.
    t = mod.TAESD(encoder_path=enc_p, decoder_path=dec_p).eval()
    for dev in devices:
        t = t.to(dev)
        with torch.no_grad():
            z = t.encoder(torch.from_numpy(x).to(dev)).float().cpu().numpy()
            y = t.decoder(torch.from_numpy(z_ref).to(dev)).float().cpu().numpy()
        for part, got, ref in (("encoder", z, z_ref), ("decoder", y, y_ref)):
            e = max_abs(got, ref)
            rows.append({"variant": v, "check": f"taesd.py {part} on {dev}", "ok": e <= tol, "max_abs": e, "max_ref": float(np.abs(ref).max()),
                         "shape": list(got.shape)})
    # ComfyUI's vae_approx folder.
    if v in COMFY_NAMES:
        with tempfile.TemporaryDirectory() as folder:
            for p in (enc_p, dec_p):
                shutil.copy(p, folder)
            m, prefixes = comfy_vae_approx(folder, v, mod)
            with torch.no_grad():
                y = m.taesd_decoder(torch.from_numpy(z_ref)).numpy()
            e = max_abs(y, y_ref)
            rows.append({"variant": v, "check": "ComfyUI vae_approx load (strict) + decode, cpu", "ok": e <= tol, "max_abs": e, "detail": f"prefixes {prefixes}"})
    # diffusers AutoencoderTiny on our diffusers export ([-1, 1] images, scaling_factor 1).
    dd = os.path.join(d, "diffusers")
    if os.path.isdir(dd):
        try:
            from diffusers import AutoencoderTiny
        except Exception as e:  # noqa: BLE001
            rows.append({"variant": v, "check": "diffusers AutoencoderTiny", "ok": None, "detail": f"diffusers not importable: {e}"})
        else:
            vae = AutoencoderTiny.from_pretrained(dd).eval()
            for dev in devices:
                vae = vae.to(dev)
                with torch.no_grad():
                    y = vae.decode(torch.from_numpy(z_ref).to(dev)).sample.float().cpu().numpy()
                    z = vae.encode(torch.from_numpy(x * 2 - 1).to(dev)).latents.float().cpu().numpy()
                y01 = (y + 1) / 2
                for part, got, ref in (("decode", y01, y_ref), ("encode", z, z_ref)):
                    e = max_abs(got, ref)
                    rows.append({"variant": v, "check": f"diffusers AutoencoderTiny.{part} on {dev}", "ok": e <= tol, "max_abs": e,
                                 "max_ref": float(np.abs(ref).max())})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--taesd-py", required=True)
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(False)
    mod = load_taesd_py(a.taesd_py)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    manifest = json.load(open(os.path.join(a.fixtures, "fixtures.json")))
    rows = []
    for v in manifest["variants"]:
        try:
            rows += check_variant(mod, os.path.join(a.fixtures, v), v, devices, a.tol)
        except Exception:  # noqa: BLE001
            rows.append({"variant": v, "check": "load", "ok": False, "detail": traceback.format_exc(limit=3)})
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "devices": devices,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "tol": a.tol,
           "fixtures": manifest}
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except Exception:  # noqa: BLE001
        env["diffusers"] = None
    os.makedirs(a.out, exist_ok=True)
    json.dump({"env": env, "rows": rows}, open(os.path.join(a.out, "torch-consumers.json"), "w"), indent=1)
    lines = [f"# Our exports in torch {env['torch']} (diffusers {env['diffusers']}), devices {devices} ({env['gpu']})", "",
             "| variant | check | ok | max abs diff | max abs ref | detail |", "|---|---|---|---|---|---|"]
    for r in rows:
        ok = {True: "yes", False: "**NO**", None: "skipped"}[r["ok"]]
        lines.append(f"| {r['variant']} | {r['check']} | {ok} | {r.get('max_abs', ''):.3g} | {r.get('max_ref', ''):.3g} | {r.get('detail', '')} |"
                     if "max_abs" in r and "max_ref" in r else
                     f"| {r['variant']} | {r['check']} | {ok} | {r.get('max_abs', '')} |  | {str(r.get('detail', '')).replace(chr(10), ' ')} |")
    text = "\n".join(lines) + "\n"
    open(os.path.join(a.out, "torch-consumers.md"), "w").write(text)
    print(text)
    sys.exit(1 if any(r["ok"] is False for r in rows) else 0)


if __name__ == "__main__":
    main()
