"""Check an ONNX export of ours with the onnx package and ONNX Runtime (Python).

    python3 tests/py/check_onnx.py MODEL.onnx INPUT.npy EXPECTED.npy [INPUT.npy EXPECTED.npy ...]

The model must pass onnx.checker (full check, with shape inference), use opset >= 17, declare one
input and one output with symbolic batch/height/width, and carry the taesd.* metadata. Each
input is run on the CPU provider; prints one JSON line with the max |ours - expected| and the
max |expected| per pair, the metadata, the opset and the node count.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    path, pairs = sys.argv[1], sys.argv[2:]
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17, f"opset {opset}"
    meta = {p.key: p.value for p in model.metadata_props}
    for k in ("taesd.part", "taesd.variant", "taesd.input", "taesd.output", "taesd.input_range", "taesd.output_range", "taesd.precision"):
        assert k in meta, f"metadata {k} missing: {meta}"
    g = model.graph
    assert len(g.input) == 1 and len(g.output) == 1, "one input, one output"
    assert g.input[0].name == meta["taesd.input"] and g.output[0].name == meta["taesd.output"]
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    for v in (g.input[0], g.output[0]):
        d = dims(v)
        assert isinstance(d[0], str) and isinstance(d[2], str) and isinstance(d[3], str), f"{v.name}: {d} is not dynamic"
        assert isinstance(d[1], int), f"{v.name}: channels {d[1]}"
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    runs = []
    for i in range(0, len(pairs), 2):
        x, want = np.load(pairs[i]), np.load(pairs[i + 1])
        x = x.astype(np.float16 if meta["taesd.precision"] == "float16" else np.float32)
        (got,) = sess.run(None, {g.input[0].name: x})
        assert got.shape == want.shape, f"shape {got.shape} vs {want.shape}"
        assert got.dtype == x.dtype, f"output dtype {got.dtype}"
        runs.append({
            "shape": list(got.shape),
            "max_abs": float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()),
            "max_ref": float(np.abs(want).max()),
        })
    print(json.dumps({"opset": opset, "ir_version": model.ir_version, "nodes": len(g.node), "input": dims(g.input[0]), "output": dims(g.output[0]), "metadata": meta, "runs": runs}))


if __name__ == "__main__":
    main()
