#!/usr/bin/env python3
"""Tests of tools/export_vae_onnx.py's graph rewrites that need no torch and no GPU.

    python3 tools/test_export_vae_onnx.py        (run by tests/precompute.rs; needs onnx, numpy,
                                                  onnxruntime for its transformers helpers)

fold_conv_bias rewrites com.microsoft operators that only the CUDA execution provider runs, so the
check evaluates the graph before and after with a small NumPy interpreter of exactly those operators
(NhwcConv, GroupNorm, SkipGroupNorm as ONNX Runtime documents them) and compares the outputs.
"""

import os
import sys

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_vae_onnx as exp  # noqa: E402

C, GROUPS = 8, 4


def conv_nhwc(x, w, b, pads):
    """x [N,H,W,Ci], w [Co,Ci,k,k] (ONNX layout), stride 1."""
    t, l, bo, r = pads[0], pads[1], pads[2], pads[3]
    x = np.pad(x, ((0, 0), (t, bo), (l, r), (0, 0)))
    k = w.shape[2]
    n, h, wd, _ = x.shape
    oh, ow = h - k + 1, wd - k + 1
    y = np.zeros((n, oh, ow, w.shape[0]), np.float64)
    for i in range(k):
        for j in range(k):
            y += np.einsum("nhwc,oc->nhwo", x[:, i:i + oh, j:j + ow, :], w[:, :, i, j])
    return y + (b if b is not None else 0)


def group_norm_nhwc(x, gamma, beta, groups, eps, swish):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(n, h, w, c) * gamma + beta
    return y / (1 + np.exp(-y)) if swish else y


def run(model, feeds):
    """Evaluate `model` (the operators used here) on `feeds`."""
    env = dict(feeds)
    env.update({t.name: numpy_helper.to_array(t).astype(np.float64) if t.data_type != TensorProto.INT64
                else numpy_helper.to_array(t) for t in model.graph.initializer})
    for node in model.graph.node:
        a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        ins = [env[i] if i else None for i in node.input]
        op = node.op_type
        if op == "Transpose":
            out = [np.transpose(ins[0], a["perm"])]
        elif op == "NhwcConv":
            out = [conv_nhwc(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a["pads"])]
        elif op in ("GroupNorm", "SkipGroupNorm"):
            x = ins[0]
            if op == "SkipGroupNorm":
                skip = ins[3]
                if skip.ndim == 2:  # (N, C) broadcast
                    skip = skip[:, None, None, :]
                x = x + skip + (ins[4] if len(ins) > 4 and ins[4] is not None else 0)
            y = group_norm_nhwc(x, ins[1], ins[2], a["groups"], a["epsilon"], a["activation"] == 1)
            out = [y, x][: len(node.output)]
        elif op == "Add":
            out = [ins[0] + ins[1]]
        elif op == "Shape":
            out = [np.array(ins[0].shape, np.int64)]
        elif op == "Gather":
            out = [np.take(ins[0], ins[1], axis=a.get("axis", 0))]
        elif op == "Concat":
            out = [np.concatenate(ins, axis=a["axis"])]
        elif op == "ConstantOfShape":
            out = [np.full(tuple(ins[0]), numpy_helper.to_array(a["value"])[0], np.float64)]
        else:
            raise NotImplementedError(op)
        for name, v in zip(node.output, out):
            env[name] = v
    return [env[o.name] for o in model.graph.output]


def vae_like_model():
    """conv_in -> (GroupNorm -> conv1 -> GroupNorm -> conv2) + residual -> SkipGroupNorm -> conv_out,
    the shapes of a diffusers ResnetBlock2D after ONNX Runtime's VAE fusions."""
    rng = np.random.default_rng(0)

    def t(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    gn = dict(domain="com.microsoft", groups=GROUPS, channels_last=1, epsilon=1e-5)
    nodes = [
        helper.make_node("Transpose", ["image"], ["x"], perm=[0, 2, 3, 1]),
        helper.make_node("NhwcConv", ["x", "w_in", "b_in"], ["h0"], domain="com.microsoft", pads=[1, 1, 1, 1]),
        helper.make_node("GroupNorm", ["h0", "g1", "be1"], ["n1"], activation=1, **gn),
        helper.make_node("NhwcConv", ["n1", "w1", "b1"], ["h1"], domain="com.microsoft", pads=[1, 1, 1, 1]),
        helper.make_node("GroupNorm", ["h1", "g2", "be2"], ["n2"], activation=1, **gn),
        helper.make_node("NhwcConv", ["n2", "w2", "b2"], ["h2"], domain="com.microsoft", pads=[1, 1, 1, 1]),
        helper.make_node("SkipGroupNorm", ["h2", "g3", "be3", "h0"], ["n3"], activation=0, **gn),
        helper.make_node("NhwcConv", ["n3", "w_out", "b_out"], ["h3"], domain="com.microsoft", pads=[0, 0, 0, 0]),
        helper.make_node("Transpose", ["h3"], ["out"], perm=[0, 3, 1, 2]),
    ]
    inits = [t("w_in", C, 3, 3, 3), t("b_in", C), t("w1", C, C, 3, 3), t("b1", C), t("w2", C, C, 3, 3), t("b2", C),
             t("w_out", 4, C, 1, 1), t("b_out", 4)]
    for i in (1, 2, 3):
        inits += [t(f"g{i}", C), t(f"be{i}", C)]
    graph = helper.make_graph(nodes, "vae_like", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 6, 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_fold_conv_bias_keeps_the_outputs():
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = vae_like_model()
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 5))
    before = run(model, {"image": x})[0]
    om = OnnxModel(model)
    folded = exp.fold_conv_bias(om.model)
    om.topological_sort()
    after = run(om.model, {"image": x})[0]

    # conv_in (GroupNorm + residual reader), conv1 (GroupNorm), conv2 (SkipGroupNorm); not conv_out.
    assert folded == 3, folded
    convs = {n.output[0]: n for n in om.model.graph.node if n.op_type == "NhwcConv"}
    assert [len(convs[h].input) for h in ("h0", "h1", "h2", "h3")] == [2, 2, 2, 3]
    norms = [n for n in om.model.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm")]
    assert [n.op_type for n in norms] == ["SkipGroupNorm"] * 3
    assert [n.input[4] for n in norms] == ["b_in", "b1", "b2"]
    # The residual reads conv_in + its bias: the first SkipGroupNorm's sum output.
    assert norms[2].input[3] == norms[0].output[1], (list(norms[2].input), list(norms[0].output))
    seen = {i.name for i in om.model.graph.input} | {t.name for t in om.model.graph.initializer}
    for n in om.model.graph.node:  # topologically sorted
        assert all(not i or i in seen for i in n.input), n
        seen.update(n.output)
    err = np.abs(after - before).max() / np.abs(before).max()
    assert err < 1e-12, err


def test_fold_conv_bias_leaves_a_conv_with_another_reader_of_a_skip_group_norm_alone():
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = vae_like_model()
    # h2 also read by the output path: SkipGroupNorm's outputs cannot give h2 + b2 to that reader.
    model.graph.node.insert(7, helper.make_node("Add", ["h2", "h2"], ["h2x2"]))
    model.graph.output.append(helper.make_tensor_value_info("h2x2", TensorProto.FLOAT, None))
    x = np.random.default_rng(2).standard_normal((1, 3, 6, 5))
    before = run(model, {"image": x})
    om = OnnxModel(model)
    folded = exp.fold_conv_bias(om.model)
    om.topological_sort()
    after = run(om.model, {"image": x})
    assert folded == 2, folded
    for b, a in zip(before, after):
        assert np.abs(a - b).max() < 1e-9 * np.abs(b).max()


if __name__ == "__main__":
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    for t in tests:
        t()
        print("ok", t.__name__)
    print(f"{len(tests)} passed")
