"""The per-layer table charges each initializer of the result to the input weight it was made from (longest
name prefix at a '_') and each pass's node to the input layer it stands for (longest prefix at a '/')."""
import numpy as np
import onnx
from onnx import helper

import onnxcomp
from onnxcomp.layer_table import _origin, _owner
from onnxcomp.summary import weight_layers


def test_owner_is_the_longest_prefix_at_an_underscore():
    originals = {"W", "W_1", "onnx::MatMul_12"}
    assert _owner("W", originals) == "W"
    assert _owner("W_quantized", originals) == "W"
    assert _owner("W_1_pruned_scale", originals) == "W_1"
    assert _owner("onnx::MatMul_123_quantized", originals) is None  # not "onnx::MatMul_12"
    assert _owner("input_scale", originals) is None


def test_origin_is_the_longest_prefix_at_a_slash():
    table = {"/enc/dense/MatMul": {}, "fc1": {}}
    assert _origin("/enc/dense/MatMul/smooth-matmul__8", table) == "/enc/dense/MatMul"
    assert _origin("fc1/static-gemm-3", table) == "fc1"
    assert _origin("relu1/static-conv-relu-3", table) is None


def _two_layers() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = [helper.make_tensor(f"W{i}", onnx.TensorProto.FLOAT, [64, 64],
                            (rng.standard_normal((64, 64)) / 8).astype(np.float32).ravel()) for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W1"], ["y"], name="mm1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])], w)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_int8_rows_and_an_excluded_layer():
    m = _two_layers()
    assert set(weight_layers(m)) == {"mm0", "mm1"}
    res = onnxcomp.compress(m, [{"type": "quantize", "mode": "dynamic", "min_weight_elements": 0,
                                 "exclude": ["mm1"]}], progress=False, validate=False)
    by = {r["node"]: r for r in res.report.layers}
    assert by["mm0"]["done"] == "quantize" and by["mm0"]["storage_after"].startswith("int8")
    assert by["mm0"]["bytes_before"] == 64 * 64 * 4 and by["mm0"]["bytes_after"] < 64 * 64 * 4 / 3  # int8 + scales
    assert by["mm1"] == {**by["mm1"], "done": "unchanged", "bytes_after": 64 * 64 * 4, "ratio": 1.0,
                         "storage_after": "fp32"}
