"""Write tests/data/nan_encoder_f16.onnx: a tiny fp16 "encoder" whose latent is NaN where the image is dark.

    latent = sqrt(avgpool8x8(image) - 0.25)      input  image  float16 [batch, 3, height, width]
                                                 output latent float16 [batch, 3, height/8, width/8]

A block of the image with mean below 0.25 gives NaN (sqrt of a negative number), like an fp16 VAE that
overflows. Used by tests/precompute.rs with `--vae custom --channels 3 --scale 1 --input-range 0,1`.
Needs the `onnx` package: python3 tests/py/make_nan_onnx.py [OUT]
"""
import sys

import onnx
from onnx import TensorProto, helper

out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/nan_encoder_f16.onnx"
nodes = [
    helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
    helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
    helper.make_node("Sub", ["pooled", "quarter"], ["shifted"]),
    helper.make_node("Sqrt", ["shifted"], ["root"]),
    helper.make_node("Cast", ["root"], ["latent"], to=TensorProto.FLOAT16),
]
graph = helper.make_graph(
    nodes,
    "nan_encoder",
    [helper.make_tensor_value_info("image", TensorProto.FLOAT16, ["batch", 3, "height", "width"])],
    [helper.make_tensor_value_info("latent", TensorProto.FLOAT16, ["batch", 3, "latent_height", "latent_width"])],
    initializer=[helper.make_tensor("quarter", TensorProto.FLOAT, [], [0.25])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="taesd-rs tests")
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, out)
print(out)
