#!/usr/bin/env python3
"""Independent check of a precompute output folder: read the shards with pyarrow (not our Rust
reader), decode the stored images with Pillow, rerun the ONNX teacher with onnxruntime's Python
API, and compare with the stored latents.

usage: verify_shards.py OUT_DIR ONNX [--sample N]
Prints one JSON line; exits 1 when anything disagrees.
"""
import io, json, sys, glob, os, argparse
import numpy as np
import pyarrow.parquet as pq
from PIL import Image
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("onnx")
ap.add_argument("--sample", type=int, default=8)
# JPEG decoders differ by a level or two here and there (Pillow's libjpeg-turbo vs the image crate),
# so with JPEG storage only our own decoder reproduces the teacher's input exactly; the Rust tests
# check that. Here JPEG rows get this looser bound on the latent difference.
ap.add_argument("--jpeg-tolerance", type=float, default=0.1)
a = ap.parse_args()

manifest = json.load(open(os.path.join(a.out, "manifest.json")))
# The shards: OUT/data/ (a Parquet dataset), or beside the manifest in folders of the old layout.
data = os.path.join(a.out, "data")
files = sorted(glob.glob(os.path.join(data, "shard-*.parquet"))) or sorted(glob.glob(os.path.join(a.out, "shard-*.parquet")))
if os.path.isdir(data):
    # The folder reads as one dataset, with every row of the manifest.
    whole = pq.read_table(data)
    if whole.num_rows != manifest["rows"]:
        problems_early = [f"pq.read_table({data}) gives {whole.num_rows} rows, the manifest {manifest['rows']}"]
    else:
        problems_early = []
else:
    problems_early = []
problems = list(problems_early)
rows = 0
checked = 0
max_err = 0.0
sess = ort.InferenceSession(a.onnx, providers=["CPUExecutionProvider"])
in_name = sess.get_inputs()[0].name
for f in files:
    t = pq.read_table(f)
    meta = {k.decode(): v.decode() for k, v in (pq.ParquetFile(f).metadata.metadata or {}).items()}
    schema_meta = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()}
    if schema_meta.get("taesd.vae") != meta.get("taesd.vae"):
        problems.append(f"{f}: the Arrow schema metadata lacks the taesd keys")
    for k in ["taesd.schema_version", "taesd.vae", "taesd.scale", "taesd.shift", "taesd.input_range", "taesd.onnx_sha256", "taesd.latent_dtype"]:
        if k not in meta:
            problems.append(f"{f}: metadata {k} missing")
    if meta.get("taesd.onnx_sha256") != manifest["config"]["onnx_sha256"]:
        problems.append(f"{f}: onnx sha256 differs from the manifest")
    vae = json.loads(meta["taesd.vae"])
    scale, shift = float(meta["taesd.scale"]), float(meta["taesd.shift"])
    rng = meta["taesd.input_range"]
    dtype = {"float16": np.float16, "float32": np.float32}[meta["taesd.latent_dtype"]]
    rows += t.num_rows
    d = t.to_pydict()
    n = t.num_rows
    idx = list(range(n)) if n <= a.sample else list(np.linspace(0, n - 1, a.sample).astype(int))
    for i in idx:
        img = np.asarray(Image.open(io.BytesIO(d["image"][i])).convert("RGB"))
        if img.shape != (d["height"][i], d["width"][i], 3):
            problems.append(f"{f} row {i}: image {img.shape} vs width/height columns")
            continue
        x = img.astype(np.float32).transpose(2, 0, 1)[None] / 255.0
        if rng == "-1,1":
            x = x * 2 - 1
        out = sess.run(None, {in_name: x})[0][0]
        c = vae["channels"]
        z = out[:c]
        z = (z - shift) * scale
        shape = tuple(d["latent_shape"][i])
        stored = np.frombuffer(d["latent"][i], dtype=dtype).astype(np.float32).reshape(shape)
        if stored.shape != z.shape:
            problems.append(f"{f} row {i}: latent shape {stored.shape} vs teacher {z.shape}")
            continue
        err = np.abs(stored - z)
        tol = 1e-3 + 1e-3 * np.abs(z)
        if meta["taesd.image_format"] == "jpeg":
            tol = np.maximum(tol, a.jpeg_tolerance)
        max_err = max(max_err, float(err.max()))
        if (err > tol).any():
            problems.append(f"{f} row {i} ({d['source'][i]}): max |stored - teacher| = {err.max():.2e}")
        checked += 1
if rows != manifest["rows"]:
    problems.append(f"manifest says {manifest['rows']} rows, shards hold {rows}")
print(json.dumps({"rows": rows, "checked": checked, "max_err": max_err, "problems": problems}))
sys.exit(1 if problems or checked == 0 else 0)
