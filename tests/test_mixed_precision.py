"""Mixed precision under an accuracy budget: 4-bit weight-only layers the outputs are sensitive to get 8 bits
(quantize.int8_nodes) before any layer is left float; on the digits MLP, held-out images."""
import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp import testing
from onnxcomp.errors import RecipeError


def _data():
    d = testing.digits_data()
    calib = [{"input": d["x_calib_flat"][i:i + 20].astype(np.float32)} for i in range(0, 200, 20)]
    valid = [{"input": d["x_test_flat"][i:i + 50].astype(np.float32)} for i in range(0, 200, 50)]
    return calib, valid


def _bits(model: onnx.ModelProto) -> dict[str, int]:
    return {n.name.split("/")[0]: next(a.i for a in n.attribute if a.name == "bits")
            for n in model.graph.node if n.op_type == "MatMulNBits"}


def test_budget_gives_sensitive_4bit_layers_8_bits_instead_of_float():
    calib, valid = _data()
    q = {"type": "quantize", "mode": "weight_only", "weight_dtype": "int4", "block_size": 16, "min_weight_elements": 0}
    plain = onnxcomp.compress(testing.digits_mlp_path(), [q], calibration_data=calib, validation_data=valid,
                              progress=False)
    assert set(_bits(plain.model).values()) == {4}
    worst = min(o.cosine for o in plain.report.validation.outputs.values())
    budget = 1 - (1 - worst) / 2  # half the 4-bit model's cosine gap: back-off has to act
    res = onnxcomp.compress(testing.digits_mlp_path(), {"passes": [q], "accuracy_budget": {"cosine": budget}},
                            calibration_data=calib, validation_data=valid, progress=False)
    onnx.checker.check_model(res.model, full_check=True)
    rounds = res.report.budget["backoff"]
    softened = [n for r in rounds for n in r["softened"]]
    assert res.report.budget["met"] and softened and not any(r["left_float"] for r in rounds), rounds
    bits = _bits(res.model)
    assert {n for n, b in bits.items() if b == 8} == set(softened) and 4 in bits.values()  # every layer integer
    assert len(bits) == 3
    assert res.report.size_ratio < 0.5  # nothing left float: well under the fp32 size
    assert res.recipe.passes[0].int8_nodes == tuple(softened)
    again = onnxcomp.compress(testing.digits_mlp_path(), res.recipe, calibration_data=calib, validation_data=valid,
                              progress=False)
    assert again.model.SerializeToString() == res.model.SerializeToString()  # the recipe applied replays


def test_int8_nodes_is_for_4bit_weights():
    with pytest.raises(RecipeError, match="int8_nodes applies to 4-bit weights"):
        onnxcomp.compress(testing.digits_mlp_path(), [{"type": "quantize", "mode": "weight_only",
                                                       "int8_nodes": ["fc1"]}], progress=False)


@pytest.mark.parametrize("mode, integer_op", [("static", "MatMulIntegerToFloat"), ("dynamic", "DynamicQuantizeMatMul")])
def test_budget_gives_static_and_dynamic_layers_int8_weights_with_float_activations_first(mode, integer_op):
    """Before a static/dynamic layer is left float, it gets 8-bit MatMulNBits weights with float activations
    (quantize.weight_only_nodes); its input is no longer calibrated or quantized for it."""
    calib, valid = _data()
    q = {"type": "quantize", "mode": mode, "min_weight_elements": 0}
    plain = onnxcomp.compress(testing.digits_mlp_path(), {"passes": [q]}, calibration_data=calib,
                              validation_data=valid, progress=False)
    worst = min(o.cosine for o in plain.report.validation.outputs.values())
    budget = 1 - (1 - worst) / 2  # half the int8 model's cosine gap: back-off has to act
    res = onnxcomp.compress(testing.digits_mlp_path(), {"passes": [q], "accuracy_budget": {"cosine": budget}},
                            calibration_data=calib, validation_data=valid, progress=False)
    onnx.checker.check_model(res.model, full_check=True)
    rounds = res.report.budget["backoff"]
    softened = [n for r in rounds for n in r["softened"]]
    floated = [n for r in rounds for n in r["left_float"]]
    assert res.report.budget["met"] and softened, rounds
    assert rounds[0]["softened"] and not rounds[0]["left_float"]  # softened before anything is left float
    assert set(floated) <= set(softened)  # only a layer already softened is then left float
    assert set(_bits(res.model)) == set(softened) - set(floated) and set(_bits(res.model).values()) <= {8}
    assert integer_op in {n.op_type for n in res.model.graph.node}  # the other layers stay integer
    assert res.recipe.passes[0].weight_only_nodes == tuple(softened)
    if mode == "static":  # a softened layer's input keeps no Q/DQ of its own
        ranges = res.report.passes[0].details["ranges"]
        assert "input" not in ranges or "fc1" not in softened or "fc1" in floated


def test_weight_only_nodes_is_for_static_and_dynamic():
    with pytest.raises(RecipeError, match="weight_only_nodes applies to modes static and dynamic"):
        onnxcomp.compress(testing.digits_mlp_path(), [{"type": "quantize", "mode": "weight_only",
                                                       "weight_only_nodes": ["fc1"]}], progress=False)


def test_the_report_tells_8_bit_from_4_bit_matmulnbits_weights():
    """Both are uint8 tensors read by MatMulNBits: the node's `bits` says which storage class they are."""
    calib, valid = _data()
    q = {"type": "quantize", "mode": "weight_only", "weight_dtype": "int4", "block_size": 16, "min_weight_elements": 0}
    res = onnxcomp.compress(testing.digits_mlp_path(), [dict(q, int8_nodes=["fc1"])], calibration_data=calib,
                            validation_data=valid, progress=False)
    assert _bits(res.model) == {"fc1": 8, "fc2": 4, "fc3": 4}
    storage = res.report.after["bytes_by_storage"]
    w = {t.name: t for t in res.model.graph.initializer}
    fc1_q = next(n for n in res.model.graph.node if n.name.startswith("fc1/")).input[1]
    fc2_q = next(n for n in res.model.graph.node if n.name.startswith("fc2/")).input[1]
    assert storage["int8"] >= len(w[fc1_q].raw_data) and storage["int4"] >= len(w[fc2_q].raw_data)
    only8 = onnxcomp.compress(testing.digits_mlp_path(), [{"type": "quantize", "mode": "weight_only",
                                                           "min_weight_elements": 0}], progress=False)
    assert set(_bits(only8.model).values()) == {8} and "int4" not in only8.report.after["bytes_by_storage"]


def test_an_8_bit_weight_only_layer_has_nothing_softer_than_float():
    """weight_only int8/uint8 layers (DequantizeLinear or 8-bit MatMulNBits) are left float by back-off; they are
    not offered a gentler setting the pass does not have (it raised a RecipeError on int8_nodes before)."""
    calib, valid = _data()
    rec = {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "uint8", "min_weight_elements": 0}],
           "accuracy_budget": {"cosine": 0.9999999}}
    try:
        res = onnxcomp.compress(testing.digits_mlp_path(), rec, calibration_data=calib, validation_data=valid,
                                progress=False)
    except onnxcomp.AccuracyBudgetError as e:
        res = e.result
    rounds = res.report.budget["backoff"]
    assert rounds and all(not r["softened"] and r["left_float"] for r in rounds), rounds
    assert "softer" not in res.report.passes[0].details
