#!/usr/bin/env python3
"""Compare two precompute output folders row by row (same inputs and settings, e.g. the teacher on
the CPU and on CUDA): stored images must be identical; prints the latent difference.

usage: compare_shards.py DIR_A DIR_B
"""
import glob, os, sys
import numpy as np
import pyarrow.parquet as pq


def rows(d):
    out = {}
    # OUT/data/ (whole runs and --part parts; in folders of the earlier layout, beside manifest.json)
    files = sorted(glob.glob(os.path.join(d, "data", "*.parquet"))) or sorted(glob.glob(os.path.join(d, "shard-*.parquet")))
    for f in files:
        dtype = np.dtype(pq.ParquetFile(f).metadata.metadata[b"taesd.latent_dtype"].decode())
        t = pq.read_table(f, columns=["source", "variant", "image", "latent", "latent_shape"]).to_pydict()
        for s, v, im, lat, shp in zip(t["source"], t["variant"], t["image"], t["latent"], t["latent_shape"]):
            out[(s, v)] = (im, np.frombuffer(lat, dtype=dtype).astype(np.float32).reshape(shp))
    return out


a, b = rows(sys.argv[1]), rows(sys.argv[2])
common = sorted(set(a) & set(b))
if not common:
    sys.exit("no rows in common")
img_diff = sum(a[k][0] != b[k][0] for k in common)
d = np.array([np.abs(a[k][1] - b[k][1]).max() for k in common])
rel = np.array([np.linalg.norm(a[k][1] - b[k][1]) / max(np.linalg.norm(b[k][1]), 1e-12) for k in common])
print(f"rows: {len(a)} vs {len(b)}, {len(common)} in common; stored images differing: {img_diff}")
print(f"latent max |a-b|: {d.max():.3e} (median over rows {np.median(d):.3e}); relative L2: max {rel.max():.3e}, mean {rel.mean():.3e}")
sys.exit(1 if img_diff else 0)
