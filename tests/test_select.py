"""algorithms.select: which weight layers a pass sees (constant float32 weights, ops/exclude), and their matrices."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnxcomp import ir
from onnxcomp.errors import RecipeError
from onnxcomp.algorithms.select import check_exclude, check_ops, find_weight_layers
from tests.graphs import make_model, vi


def test_layers_found_with_matrices_in_x_at_m_form():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 6)).astype(np.float32)
    w2 = rng.standard_normal((5, 6)).astype(np.float32)  # Gemm transB: stored [n, k]
    wc = rng.standard_normal((4, 5, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm"),
             helper.make_node("Gemm", ["a", "W2", "B2"], ["b"], name="gemm", transB=1, alpha=0.5),
             helper.make_node("Transpose", ["b"], ["b2t"], perm=[1, 0]),
             helper.make_node("MatMul", ["b", "b2t"], ["c"], name="act_mm"),  # activation x activation: skipped
             helper.make_node("Conv", ["img", "WC"], ["d"], name="conv", pads=[1, 1, 1, 1])]
    m = make_model(nodes, [vi("x", [2, 8]), vi("img", [1, 5, 7, 7])], [vi("c", [2, 2]), vi("d", [1, 4, 7, 7])],
                   [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
                    numpy_helper.from_array(np.ones(5, np.float32), "B2"), numpy_helper.from_array(wc, "WC")])
    model = ir.Model.from_proto(m)
    rej: dict[str, str] = {}
    layers = find_weight_layers(model, rejections=rej)
    assert [l.name for l in layers] == ["mm", "gemm", "conv"]
    np.testing.assert_array_equal(layers[0].matrix(), w1)
    np.testing.assert_allclose(layers[1].matrix(), 0.5 * w2.T)
    assert layers[1].bias is not None and layers[0].bias is None
    assert layers[2].matrix().shape == (5 * 9, 4)
    assert "not a constant weight" in rej["act_mm"]
    assert [l.name for l in find_weight_layers(model, ops=("Gemm",))] == ["gemm"]
    assert [l.name for l in find_weight_layers(model, exclude=("g.*", "d"))] == ["mm"]
    rej2: dict[str, str] = {}
    assert [l.name for l in find_weight_layers(model, min_elements=49, rejections=rej2)] == ["conv"]
    assert "< 49" in rej2["mm"]


def test_bad_recipe_selections_are_recipe_errors():
    with pytest.raises(RecipeError, match="not a valid regex"):
        check_exclude(["("], "sparsify.exclude")
    with pytest.raises(RecipeError, match="Softmax"):
        check_ops(["Softmax"], ("MatMul", "Gemm"), "lowrank.ops")
    assert check_ops(None, ("MatMul",), "x") == ("MatMul",)


def test_stored_is_the_inverse_of_matrix():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["a"], name="g", transB=1, alpha=0.25),
             helper.make_node("MatMul", ["a", "M"], ["b"], name="m"),
             helper.make_node("Conv", ["img", "C"], ["c"], name="c")]
    inits = {"W": rng.standard_normal((5, 6)), "M": rng.standard_normal((5, 3)), "C": rng.standard_normal((4, 2, 3, 3))}
    m = make_model(nodes, [vi("x", [2, 6]), vi("img", [1, 2, 5, 5])], [vi("b", [2, 3]), vi("c", [1, 4, 3, 3])],
                   [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    for layer in find_weight_layers(ir.Model.from_proto(m)):
        np.testing.assert_allclose(layer.stored(layer.matrix()), layer.weight, rtol=1e-6)


def test_weights_quantized_by_an_earlier_pass_are_named_as_such():
    from onnxcomp.algorithms.select import quantized_weights_note

    q = numpy_helper.from_array(np.ones((8, 4), np.int8), "Wq")
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"]), helper.make_node("MatMul", ["x", "W"], ["y"],
                                                                                       name="mm")]
    m = make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 4])], [q, numpy_helper.from_array(np.float32(0.1), "s")])
    rej: dict[str, str] = {}
    assert find_weight_layers(ir.Model.from_proto(m), rejections=rej) == []
    assert "already quantized (DequantizeLinear)" in rej["mm"]
    assert "put sparsify/lowrank before quantize" in quantized_weights_note(rej)
    assert quantized_weights_note({"a": "excluded by the recipe (a)"}) is None
