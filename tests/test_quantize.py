"""The quantize pass: placement, per-channel axes against numpy, calibration paths, validity on real models."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import qmath, testing
from onnxcomp.errors import CalibrationDataError, RecipeError
from tests.graphs import const, make_model, random_feeds, vi


def _q(model, recipe_pass, calib=None, **kw):
    return onnxcomp.compress(model, [{"type": "quantize", **recipe_pass}], calibration_data=calib, progress=False,
                             **kw)


def _dq_feeding(model, op_type):
    """The DequantizeLinear node whose output is input 1 (the weight) of the first `op_type` node."""
    prod = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.op_type == op_type)
    dq = prod[node.input[1]]
    assert dq.op_type == "DequantizeLinear"
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    return dq, inits[dq.input[0]], inits[dq.input[1]], axis


def _close_to_float(ref, cand, feeds, rtol=0.05):
    r = testing.session(ref).run(None, feeds)[0]
    c = testing.session(cand).run(None, feeds)[0]
    rel = np.linalg.norm(c - r) / np.linalg.norm(r)
    assert rel < rtol, rel


# ------------------------------------------------------------------------------------ per-channel axes
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_per_channel_axis_matches_numpy(trans_b):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 16) if trans_b else (16, 8)).astype(np.float32)
    spread = np.linspace(0.1, 3.0, 8, dtype=np.float32)  # output channels of very different magnitudes
    w *= spread[:, None] if trans_b else spread
    m = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="gemm", transB=trans_b)],
                   [vi("x", [4, 16])], [vi("y", [4, 8])], [const("W", w), const("b", np.ones(8, np.float32))])
    # ort-cuda: a DequantizeLinear-fed Gemm (on ort-cpu a weight-only Gemm becomes MatMulNBits, tested below)
    res = onnxcomp.compress(m, {"target": "ort-cuda", "passes": [
        {"type": "quantize", "mode": "weight_only", "ops": ["Gemm"], "min_weight_elements": 0}]}, progress=False)
    dq, q, scale, axis = _dq_feeding(res.model, "Gemm")
    want_axis = 0 if trans_b else 1
    assert axis == want_axis
    ref_scale = np.abs(w).max(axis=1 - want_axis) / 127.0
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    np.testing.assert_array_equal(q, qmath.quantize(w, ref_scale, np.zeros(8, np.int8), want_axis, "int8"))
    _close_to_float(m, res.model, random_feeds(m), rtol=0.02)


def test_convtranspose_per_channel_axis_is_output_channels():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((4, 6, 3, 3)) * np.linspace(0.2, 2, 6)[None, :, None, None]).astype(np.float32)
    m = make_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="deconv")],
                   [vi("x", [1, 4, 5, 5])], [vi("y", [1, 6, 7, 7])], [const("W", w)])
    res = _q(m, {"mode": "weight_only", "ops": ["ConvTranspose"]})
    dq, q, scale, axis = _dq_feeding(res.model, "ConvTranspose")
    assert axis == 1
    np.testing.assert_allclose(scale, np.abs(w).max(axis=(0, 2, 3)) / 127.0, rtol=1e-6)
    _close_to_float(m, res.model, random_feeds(m), rtol=0.02)


def test_convtranspose_4bit_weights_are_int4_per_output_channel_and_run_in_ort():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 8, 3, 3)) * np.linspace(0.2, 2, 8)[None, :, None, None]).astype(np.float32)
    m = make_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="deconv", strides=[2, 2])],
                   [vi("x", [1, 16, 5, 5])], [vi("y", [1, 8, 11, 11])], [const("W", w)])
    res = _q(m, {"mode": "weight_only", "weight_dtype": "int4", "block_size": 32, "ops": ["ConvTranspose"]})
    dq, q, scale, axis = _dq_feeding(res.model, "ConvTranspose")
    assert axis == 1 and scale.shape == (8,)
    stored = next(t for t in res.model.graph.initializer if t.name == dq.input[0])
    assert stored.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    assert max(o.version for o in res.model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    onnx.checker.check_model(res.model, full_check=True)
    # 4-bit per output channel: the error of 16 levels over each channel's range, not more
    _close_to_float(m, res.model, random_feeds(m), rtol=0.12)
    assert res.report.validation.size_ratio < 0.3


def test_convtranspose_not_named_in_ops_is_reported_left_float_with_how_to_get_it():
    w = np.random.default_rng(4).standard_normal((16, 8, 3, 3)).astype(np.float32)
    m = make_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="deconv")],
                   [vi("x", [1, 16, 5, 5])], [vi("y", [1, 8, 7, 7])], [const("W", w)])
    res = _q(m, {"mode": "weight_only"})
    d = res.report.passes[-1].details
    assert d["left_float"] == [{"node": "deconv", "op": "ConvTranspose", "reason": d["left_float"][0]["reason"]}]
    assert "no fused kernel" in d["left_float"][0]["reason"] and "quantize.ops" in d["left_float"][0]["reason"]
    assert "quantized: nothing; left in float: 1 node(s)" in str(res.report)


def test_matmul_weight_axis_is_last_and_bias_fused_in_dynamic_mode():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
                    helper.make_node("Add", ["B", "mm"], ["y"], name="bias")],
                   [vi("x", [1, 3, 64])], [vi("y", [1, 3, 256])],
                   [const("W", w), const("B", rng.standard_normal(256).astype(np.float32))])
    wo = _q(m, {"mode": "weight_only"})  # ort-cpu: 8-bit MatMulNBits, blocks of 64 (K) per output column
    (nb,) = [n for n in wo.model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in nb.attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]) == (8, 64, 64, 256)
    scale = numpy_helper.to_array(next(t for t in wo.model.graph.initializer if t.name == nb.input[2]))
    assert scale.shape == (256,)
    _close_to_float(m, wo.model, random_feeds(m), rtol=0.02)
    dyn = _q(m, {"mode": "dynamic"})
    ops = [n.op_type for n in dyn.model.graph.node]
    assert ops == ["DynamicQuantizeMatMul"]  # MatMul and its bias Add became one kernel
    _close_to_float(m, dyn.model, random_feeds(m), rtol=0.03)


# ------------------------------------------------------------------------------------ placement on MiniLM
@pytest.fixture(scope="module")
def minilm_static(minilm):
    calib = testing.minilm_feeds(32, start=200)  # variable sequence lengths
    return _q(minilm, {"mode": "static", "calibration": "percentile"}, calib,
              validation_data=testing.minilm_feeds(16))


def test_static_minilm_accuracy_and_shared_qdq(minilm, minilm_static):
    model = minilm_static.model
    onnx.checker.check_model(model, full_check=True)
    feeds = testing.minilm_feeds(60)
    m = testing.minilm_metrics(testing.minilm_embed(minilm, feeds), testing.minilm_embed(model, feeds))
    assert m["cosine_mean"] > 0.99, m
    ops = [n.op_type for n in model.graph.node]
    # 18 weight MatMuls read 12 distinct activations (Q, K, V share one): one Q/DQ pair per tensor
    assert ops.count("QuantizeLinear") == 12
    details = minilm_static.report.passes[0].details
    # each weight MatMul and its bias Add are one MatMulIntegerToFloat (ORT leaves the QDQ MatMul's Add apart)
    assert details["quantized"]["static-matmul-bias"] == 18 and "static-matmul-2" not in details["quantized"]
    assert ops.count("MatMulIntegerToFloat") == 18 and ops.count("DequantizeLinear") == 0
    assert details["algorithm"] == "auto" and details["rounding"]["gptq"] > 0
    sens = details["sensitivity"]
    assert len(sens) == 18 + 2 and sens == sorted(sens, key=lambda r: -r["introduced"])
    assert all(r["introduced"] <= r["rel_l2_err"] + 1e-12 and r["node"] for r in sens)


def test_attention_mask_and_integer_paths_untouched(minilm, minilm_static):
    orig = onnx.load(str(minilm))
    consts = {t.name for t in orig.graph.initializer} | {o for n in orig.graph.node if n.op_type == "Constant"
                                                         for o in n.output}
    # the mask-processing subgraph: nodes whose every non-constant input derives from attention_mask only
    mask = {"attention_mask"}
    mask_nodes = set()
    for n in orig.graph.node:  # topologically sorted
        live = [i for i in n.input if i and i not in consts]
        if live and all(i in mask for i in live):
            mask.update(n.output)
            mask_nodes.add(n.name)
    assert len(mask_nodes) >= 4
    model = minilm_static.model
    q_inputs = {n.input[0] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")}
    assert not (q_inputs & mask)  # no Q/DQ anywhere on the mask path
    after = {n.name: n.op_type for n in model.graph.node}
    before = {n.name: n.op_type for n in orig.graph.node}
    assert all(after.get(k) == before[k] for k in mask_nodes if before[k] != "Constant")  # unchanged
    left = {r["node"]: r["reason"] for r in minilm_static.report.passes[0].details["left_float"]}
    assert any("Softmax" in n for n in left) and any("mask" in r for r in left.values())


@pytest.mark.parametrize("method", ["entropy", "mse", "minmax"])
def test_variable_length_calibration_methods(minilm, method):
    calib = testing.minilm_feeds(12, start=250)
    assert len({f["input_ids"].shape[1] for f in calib}) > 3  # really variable
    res = _q(minilm, {"mode": "static", "calibration": method, "sensitivity": False, "smoothquant": None}, calib,
             validate=False)
    feeds = testing.minilm_feeds(20)
    m = testing.minilm_metrics(testing.minilm_embed(minilm, feeds), testing.minilm_embed(res.model, feeds))
    assert m["cosine_mean"] > (0.9 if method == "entropy" else 0.99), m


def test_exclude_keeps_layers_float(minilm):
    res = _q(minilm, {"mode": "dynamic", "exclude": [r".*/layer\.0/.*"]}, validate=False)
    nodes = res.model.graph.node
    assert not any("layer.0" in n.name for n in nodes if n.op_type == "DynamicQuantizeMatMul")
    assert sum(n.op_type == "DynamicQuantizeMatMul" for n in nodes) == 12
    left = res.report.passes[0].details["left_float"]
    excluded = {r["node"] for r in left if "excluded" in r["reason"] and r["op"] == "MatMul"}
    orig = onnx.load(str(minilm))
    inits = {t.name for t in orig.graph.initializer}
    layer0_weight_mms = {n.name for n in orig.graph.node
                         if n.op_type == "MatMul" and n.input[1] in inits and "layer.0/" in n.name}
    assert len(layer0_weight_mms) == 6 and layer0_weight_mms <= excluded


# ------------------------------------------------------------------------------------ digits, opsets, errors
@pytest.mark.parametrize("mode", ["static", "dynamic", "weight_only"])
def test_digits_models_every_mode_valid(mode):
    d = testing.digits_data()
    for path, x in ((testing.digits_cnn_path(), d["x_calib"]), (testing.digits_mlp_path(), d["x_calib"].reshape(-1, 64))):
        calib = [{"input": x[i:i + 1]} for i in range(32)]
        res = _q(path, {"mode": mode, "min_weight_elements": 0}, calib)
        assert res.report.passes[0].status == "ok"
        onnx.checker.check_model(res.model, full_check=True)
        top_ref = testing.digits_top1(path, d["x_test"], d["y_test"])
        top = testing.digits_top1(res.model, d["x_test"], d["y_test"])
        assert top >= top_ref - 0.005, (path.name, mode, top, top_ref)


def test_digits_cnn_static_fuses_qlinearconv():
    import onnxruntime as ort

    d = testing.digits_data()
    calib = [{"input": d["x_calib"][i:i + 1]} for i in range(32)]
    res = _q(testing.digits_cnn_path(), {"mode": "static"}, calib, validate=False)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(res.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 2, ops  # both Convs run as integer kernels


def test_opset11_model_is_upgraded_for_per_channel():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    m = make_model([helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                    helper.make_node("Relu", ["c"], ["y"], name="relu")],
                   [vi("x", [1, 3, 8, 8])], [vi("y", [1, 8, 8, 8])],
                   [const("W", w), const("B", rng.standard_normal(8).astype(np.float32))], opset=11)
    calib = [random_feeds(m, seed=s) for s in range(8)]
    res = _q(m, {"mode": "static"}, calib)
    assert {o.domain: o.version for o in res.model.opset_import}[""] == 13
    assert any("opset 11 to 13" in n for n in res.report.passes[0].notes)
    onnx.checker.check_model(res.model, full_check=True)
    _, _, scale, axis = _dq_feeding(res.model, "Conv")
    assert axis == 0 and scale.shape == (8,)
    _close_to_float(m, res.model, calib[0], rtol=0.05)


def test_ir3_opset6_model_with_pad_attribute_is_upgraded_without_changing_its_inputs():
    """The backend corpus' opset-6 IR-3 Pad models: opset 13 moves Pad's `pads` attribute into an initializer,
    which IR 3 would have to list as a graph input (an input the user never had). The converted model takes the
    IR version opset 13 needs (7), so no input is added and the weights are quantized (W, an input only by IR 3's
    rule, is an initializer of the result)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Pad", ["x"], ["p"], pads=[0, 1, 0, 1], value=0.0),
                           helper.make_node("MatMul", ["p", "W"], ["y"], name="mm")], "g",
                          [vi("x", [3, 4]), vi("W", [6, 4])], [vi("y", [3, 4])], [const("W", w)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 6)])
    m.ir_version = 3  # IR 3: the initializer W is listed as an input too
    onnx.checker.check_model(m, full_check=True)
    calib = [{"x": rng.standard_normal((3, 4)).astype(np.float32)} for _ in range(8)]
    res = _q(m, {"mode": "static"}, calib)
    assert res.report.passes[0].status == "ok", res.report.passes[0].notes
    inits = {t.name for t in res.model.graph.initializer}
    assert [i.name for i in res.model.graph.input if i.name not in inits] == ["x"]  # no pads input appeared
    assert res.model.ir_version >= 7 and {o.domain: o.version for o in res.model.opset_import}[""] == 13
    assert "QuantizeLinear" in {n.op_type for n in res.model.graph.node}
    onnx.checker.check_model(res.model, full_check=True)
    _close_to_float(m, res.model, calib[0], rtol=0.05)


def test_static_needs_calibration_data():
    with pytest.raises(CalibrationDataError, match="calibration"):
        _q(testing.digits_cnn_path(), {"mode": "static"})


def test_4bit_needs_weight_only_and_a_block_size():
    with pytest.raises(RecipeError, match="int4"):
        _q(testing.digits_mlp_path(), {"mode": "static", "weight_dtype": "int4", "block_size": 32})
    with pytest.raises(RecipeError, match="block_size"):
        _q(testing.digits_mlp_path(), {"mode": "weight_only", "weight_dtype": "int4"})


def test_unknown_op_in_ops_is_refused():
    with pytest.raises(RecipeError, match="LayerNormalization"):
        _q(testing.digits_mlp_path(), {"mode": "dynamic", "ops": ["LayerNormalization"]})


def test_degenerate_activation_is_reported_and_exact():
    """An all-zero activation (Relu of a negative input) gets an exact scale and a note, not a NaN scale."""
    w = np.ones((4, 4), np.float32)
    m = make_model([helper.make_node("Neg", ["x"], ["n"], name="neg"),
                    helper.make_node("Relu", ["n"], ["r"], name="relu"),
                    helper.make_node("MatMul", ["r", "W"], ["y"], name="mm")],
                   [vi("x", [2, 4])], [vi("y", [2, 4])], [const("W", w)])
    calib = [{"x": np.abs(np.random.default_rng(i).standard_normal((2, 4))).astype(np.float32) + 0.1}
             for i in range(4)]
    res = _q(m, {"mode": "static"}, calib)
    assert any("all zero" in n for n in res.report.passes[0].notes)
    scales = [numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name.endswith("_scale")]
    assert all(np.isfinite(s).all() and (s > 0).all() for s in scales)
    out = testing.session(res.model).run(None, calib[0])[0]
    np.testing.assert_array_equal(out, np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("symmetric", [True, False])
def test_4bit_matmulnbits_layout_matches_numpy_dequantization(symmetric):
    rng = np.random.default_rng(5)
    k, n, bs = 100, 48, 32  # K not a multiple of the block: padded
    w = rng.standard_normal((k, n)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [3, k])], [vi("y", [3, n])],
                   [const("W", w)])
    res = _q(m, {"mode": "weight_only", "weight_dtype": "int4", "block_size": bs, "min_weight_elements": 0,
                 "symmetric_weights": symmetric})
    (node,) = res.model.graph.node
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    attrs = {a.name: a.i for a in node.attribute}
    assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (k, n, 4, bs)
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    packed, scale = inits[node.input[1]], inits[node.input[2]]
    blocks = -(-k // bs)
    assert packed.shape == (n, blocks, bs // 2) and scale.shape == (n * blocks,)
    if symmetric:
        assert len(node.input) == 3  # zero point 8 implied
        zp = np.full((n, blocks), 8)
    else:  # zero points packed two a byte per column, low nibble first
        zpk = inits[node.input[3]]
        assert zpk.shape == (n * -(-blocks // 2),)
        zp = np.stack([zpk & 0x0F, zpk >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.int32)
        assert not (zp == 8).all()
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, bs).astype(np.int32) - zp[..., None]
    w_deq = (q * scale.reshape(n, blocks, 1)).reshape(n, blocks * bs)[:, :k].T
    assert np.abs(w_deq - w).max() <= (np.abs(w).max() / 7 if symmetric else 2 * np.abs(w).max() / 15)
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = testing.session(res.model).run(None, {"x": x})[0]
    ref = x @ w_deq  # ORT's kernel (accuracy_level 4) also rounds x to int8: close, not exact
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.02


def test_smoothquant_is_exact_in_float_and_helps_static(minilm):
    """Smoothing alone (no quantization) leaves outputs equal up to float rounding; with it static int8 is closer."""
    from onnxcomp import ir
    from onnxcomp.passes.quantize import _apply_smoothing

    model = ir.Model.from_proto(ir.load_proto(minilm))
    orig = onnx.load(str(minilm))
    inits = {t.name for t in orig.graph.initializer}
    acts = {n.input[0] for n in orig.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    rng = np.random.default_rng(0)
    assert _apply_smoothing(model, {a: rng.uniform(0.2, 5.0, 384).astype(np.float32) for a in acts
                                    if "intermediate" not in a and "output/dense" not in a}) > 0
    feeds = testing.minilm_feeds(10)
    smoothed = model.to_proto()
    ref, cand = testing.minilm_embed(minilm, feeds), testing.minilm_embed(smoothed, feeds)
    np.testing.assert_allclose(cand, ref, atol=2e-4, rtol=1e-3)
    calib = testing.minilm_feeds(24, start=200)
    plain = _q(minilm, {"mode": "static", "smoothquant": None, "sensitivity": False}, calib, validate=False)
    smooth = _q(minilm, {"mode": "static", "smoothquant": 0.8, "sensitivity": False}, calib, validate=False)
    feeds = testing.minilm_feeds(40)
    ref = testing.minilm_embed(minilm, feeds)
    c_plain = testing.minilm_metrics(ref, testing.minilm_embed(plain.model, feeds))["cosine_mean"]
    c_smooth = testing.minilm_metrics(ref, testing.minilm_embed(smooth.model, feeds))["cosine_mean"]
    assert c_smooth > c_plain and c_smooth > 0.998, (c_plain, c_smooth)


def test_per_tensor_range_override():
    w = np.random.default_rng(7).standard_normal((4, 4)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 4])], [vi("y", [2, 4])],
                   [const("W", w)])
    calib = [random_feeds(m, seed=s) for s in range(4)]
    res = _q(m, {"mode": "static", "overrides": {"x": {"range": [-1.0, 3.0]}}}, calib, validate=False)
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert inits["x_scale"] == pytest.approx(4.0 / 255) and int(inits["x_zero_point"]) == round(255 / 4)
    assert res.report.passes[0].details["ranges"]["x"] == [-1.0, 3.0]
    with pytest.raises(RecipeError, match="rang"):
        _q(m, {"mode": "static", "overrides": {"x": {"rang": [0, 1]}}}, calib)


def test_dq_q_roundtrip_with_same_params_is_removed():
    """An already-quantized input (Q->DQ->Q with the same parameters) keeps one Q only."""
    s, z = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z")
    m = make_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q1"], name="q1"),
                    helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"], name="d1"),
                    helper.make_node("QuantizeLinear", ["d1", "s", "z"], ["q2"], name="q2"),
                    helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"], name="d2")],
                   [vi("x", [2, 4])], [vi("y", [2, 4])], [s, z], opset=13)
    res = _q(m, {"mode": "dynamic"}, validate=False)
    assert [n.op_type for n in res.model.graph.node] == ["QuantizeLinear", "DequantizeLinear"]
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(testing.session(m).run(None, {"x": x})[0],
                                  testing.session(res.model).run(None, {"x": x})[0])


def _shared_and_if_models():
    rng = np.random.default_rng(0)
    w = const("W", rng.standard_normal((256, 256)).astype(np.float32))
    shared = make_model([helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
                         helper.make_node("MatMul", ["a", "W"], ["y"], name="mm2")],
                        [vi("x", [1, 256])], [vi("y", [1, 256])], [w])
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="mm_then")], "then", [],
                               [vi("t", [1, 256])])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="relu_else")], "else", [],
                               [vi("e", [1, 256])])
    branchy = make_model([helper.make_node("ReduceSum", ["x"], ["s"], name="rs", keepdims=0),
                          helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
                          helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                         [vi("x", [1, 256])], [vi("y", [1, 256])], [w, const("zero", np.float32(0))])
    return shared, branchy


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight_only"])
def test_shared_weight_stored_once_and_if_bodies_quantized(mode):
    shared, branchy = _shared_and_if_models()
    for m, n_quantized in ((shared, 2), (branchy, 1)):
        calib = [random_feeds(m, seed=i) for i in range(4)]
        opts = {"mode": mode, "min_weight_elements": 0, "smoothquant": None}
        res = _q(m, opts, calib)
        p = res.report.passes[0]
        assert p.status == "ok" and sum(p.details["quantized"].values()) == n_quantized
        onnx.checker.check_model(res.model, full_check=True)
        assert res.report.size_ratio < 0.3  # one int8 copy of W, not one per reader
        x1 = calib[1]["x"] - calib[1]["x"].mean()
        for x in (x1 + 0.01, x1 - 0.01):  # sum > 0 and sum < 0: both If branches
            _close_to_float(m, res.model, {"x": x}, rtol=0.03)


@pytest.mark.parametrize("symmetric", [True, False])
def test_4bit_embedding_table_matches_numpy_dequantization(symmetric):
    rng = np.random.default_rng(9)
    table = rng.standard_normal((300, 96)).astype(np.float32)  # 3 blocks a row: an odd count of zero points
    m = make_model([helper.make_node("Gather", ["E", "ids"], ["y"], name="emb")],
                   [vi("ids", [2, 5], TensorProto.INT64)], [vi("y", [2, 5, 96])], [const("E", table)])
    res = _q(m, {"mode": "weight_only", "weight_dtype": "int4", "block_size": 32, "symmetric_weights": symmetric},
             validate=False)
    (node,) = res.model.graph.node
    assert node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft"
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    packed, scale = inits[node.input[0]], inits[node.input[2]]
    if symmetric:
        assert len(node.input) == 3
        zp = np.full((300, 3), 8)
    else:
        zpk = inits[node.input[3]]
        assert zpk.shape == (300, 2)
        zp = np.stack([zpk & 0x0F, zpk >> 4], axis=-1).reshape(300, 4)[:, :3].astype(np.int32)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(300, 3, 32).astype(np.int32) - zp[..., None]
    deq = (q * scale[..., None]).reshape(300, 96)
    ids = rng.integers(0, 300, (2, 5)).astype(np.int64)
    y = testing.session(res.model).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(y, deq[ids], atol=1e-6)
    assert np.abs(deq - table).max() <= (np.abs(table).max() / 7 if symmetric else 2 * np.abs(table).max() / 15)
    int8 = _q(m, {"mode": "weight_only", "weight_dtype": "int4", "block_size": 32, "embedding_bits": 8},
              validate=False)
    assert [n.op_type for n in int8.model.graph.node].count("Gather") == 2  # int8 rows + row scales


# ------------------------------------------------------------------------------------ int8 weight range
def _int_weight(model) -> np.ndarray:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if any(k.endswith("_q8") for k in inits):  # 8-bit MatMulNBits: stored as q + 128
        return next(v for k, v in inits.items() if k.endswith("_q8")).astype(np.int32) - 128
    return next(v for k, v in inits.items() if k.endswith("_quantized"))


@pytest.mark.parametrize("mode,target,option,limit", [
    # the CPU EP's u8 x s8 kernels saturate pair sums without VNNI: 8-bit weights whose same-sign K pairs fit
    ("dynamic", "ort-cpu", None, "pairs"),
    ("static", "ort-cpu", None, "pairs"),
    ("dynamic", "ort-cpu", {"reduce_range": True}, 63),   # ORT's 7-bit weights, asked for
    ("static", "ort-cpu", {"weight_range": "reduced"}, 63),
    ("dynamic", "ort-cpu", {"reduce_range": False}, 127),    # asked for the full range
    ("dynamic", "ort-cpu", {"weight_range": "full", "reduce_range": True}, 127),  # weight_range wins
    ("static", "ort-cuda", None, 127),     # s8 x s8 on CUDA: full range
    ("static", "ort-cpu-vnni", None, 127),  # CPUs whose u8 x s8 kernels do not saturate (VNNI, ARM64)
    ("dynamic", "ort-cpu-vnni", None, 127),
    ("weight_only", "ort-cpu", None, 127),  # dequantized to float: no integer kernel to saturate
])
def test_weight_range_follows_the_target(mode, target, option, limit):
    from onnxcomp import qmath

    w = np.random.default_rng(3).standard_normal((256, 128)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 256])],
                   [vi("y", [2, 128])], [const("W", w)])
    feeds = [random_feeds(m, seed=i) for i in range(4)]
    opts = {"mode": mode, "min_weight_elements": 0, "sensitivity": False, **(option or {})}
    res = onnxcomp.compress(m, {"passes": [{"type": "quantize", **opts}], "target": target},
                            calibration_data=feeds if mode == "static" else None, progress=False, validate=False)
    q = _int_weight(res.model).astype(np.int32)
    if limit == "pairs":
        assert res.report.passes[0].details["weight_range"] == "pairs"
        assert qmath.pairs_fit(q.T)  # [K, N]: the pairs run along K
        assert not qmath.pairs_fit(np.abs(q.T))  # (sign-blind, they would not: the bound is on same-sign pairs)
        assert 100 < np.abs(q).max() <= 127  # much of the 8-bit range in use
    else:
        assert np.abs(q).max() == limit  # the per-channel absmax lands exactly on the bound of the range used
    if limit in (63, "pairs"):  # accurate on every x86 CPU (8-bit ones measured 5% rel. error on AVX2)
        _close_to_float(m, res.model, feeds[0], rtol=0.03 if limit == 63 else 0.015)


@pytest.mark.parametrize("trans_b,bias", [(1, True), (0, True), (1, False)])
def test_static_gemm_is_one_integer_kernel_with_its_bias(trans_b, bias):
    """Static Gemm on ort-cpu -> com.microsoft MatMulIntegerToFloat with W as [K, N] and the float bias inside
    (ORT fuses a Q/DQ Gemm only where a Q follows it: otherwise a float Gemm of the dequantized weight ran);
    golden numerics: the float Gemm of the dequantized weight on the quantized input."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((48, 32)).astype(np.float32)  # [K, N]
    b = rng.standard_normal(32).astype(np.float32)
    wt = np.ascontiguousarray(w.T) if trans_b else w
    ins = ["x", "W"] + (["b"] if bias else [])
    m = make_model([helper.make_node("Gemm", ins, ["y"], name="gemm", transB=trans_b)], [vi("x", [4, 48])],
                   [vi("y", [4, 32])], [const("W", wt)] + ([const("b", b)] if bias else []))
    feeds = [{"x": rng.standard_normal((4, 48)).astype(np.float32)} for _ in range(6)]
    res = onnxcomp.compress(m, {"passes": [{"type": "quantize", "mode": "static", "min_weight_elements": 0,
                                            "sensitivity": False, "bias_correction": False}]},
                            calibration_data=feeds, progress=False)
    ops = [n.op_type for n in res.model.graph.node]
    assert ops == ["QuantizeLinear", "MatMulIntegerToFloat"], ops
    node = res.model.graph.node[1]
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    q, sw = inits[node.input[1]], inits[node.input[3]]
    assert q.dtype == np.int8 and q.shape == (48, 32) and sw.shape == (32,)
    sx, zx = float(inits[node.input[2]]), int(inits[node.input[4]])
    x = feeds[0]["x"]
    xq = (np.clip(np.rint(x / sx) + zx, 0, 255) - zx) * sx
    want = xq @ (q.astype(np.float32) * sw) + (b if bias else 0)
    got = testing.session(res.model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    _close_to_float(m, res.model, feeds[0], rtol=0.02)


def test_pair_bounded_codes_are_the_nearest_ones_that_fit():
    """qmath.pair_bounded changes only the even-aligned same-sign pairs past the limit, to the pair on the bound
    nearest to the unrounded codes (weighted per column); opposite signs and (odd, even) neighbours are free."""
    from onnxcomp import qmath

    t = np.array([[120.3, 100.2, 5.0, 6.0, -90.4, -80.6, 127.0, -127.0, 3.0, 100.0, 100.0, 7.0]])
    q = qmath.pair_bounded(np.rint(t), t, 127)
    assert q.tolist() == [[74, 54, 5, 6, -69, -59, 127, -127, 3, 100, 100, 7]]
    assert qmath.pairs_fit(q) and not qmath.pairs_fit(np.rint(t))
    # int8 codes (127 + 127 overflows int8): the same answer, in int8
    i8 = qmath.pair_bounded(np.array([[127, 127, -100, -60]], np.int8), np.array([[127.0, 127.0, -100.0, -60.0]]), 127)
    assert i8.dtype == np.int8 and i8.tolist() == [[64, 64, -84, -44]]
    # a heavy column keeps its code; its partner takes the cut
    heavy = qmath.pair_bounded(np.rint(t), t, 127, np.array([1, 100, 1, 1, 100, 1, 1, 1, 1, 1, 1, 1.0]))
    assert heavy[0, :2].tolist() == [29, 99] and heavy[0, 4:6].tolist() == [-90, -38]
    # brute force over every pair on the bound: nothing nearer
    rng = np.random.default_rng(0)
    u = rng.uniform(-127, 127, (50, 2))
    got = qmath.pair_bounded(np.clip(np.rint(u), -127, 127), u, 127)
    for (a, b), (ga, gb) in zip(u, got):
        if np.sign(a) == np.sign(b) and abs(np.rint(a)) + abs(np.rint(b)) > 128:
            best = min(((a - np.sign(a) * m) ** 2 + (b - np.sign(b) * (128 - m)) ** 2, m) for m in range(1, 128))
            assert abs(ga) == best[1] and abs(ga) + abs(gb) == 128


def test_safe_pair_scales_leave_no_float_pair_past_the_limit():
    from onnxcomp import qmath

    w = np.random.default_rng(1).standard_normal((64, 96))
    s = qmath.pair_safe_scales(w, 127).astype(np.float64)
    u = w / s[:, None]
    a, b = u[:, 0::2], u[:, 1::2]
    assert (np.where(np.sign(a) == np.sign(b), np.abs(a) + np.abs(b), 0) <= 128 * (1 + 1e-6)).all()  # float32
    assert (np.abs(u).max(axis=1) <= 127 * (1 + 1e-6)).all()
    assert np.isclose(np.where(np.sign(a) == np.sign(b), np.abs(a) + np.abs(b), 0).max(axis=1), 128).any()


# ------------------------------------------------------------------------------------ smoothquant: statistics once
def _smoothable():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    m = make_model([helper.make_node("Mul", ["x", "half"], ["xh"], name="pre"),
                    helper.make_node("MatMul", ["xh", "W"], ["y"], name="mm")], [vi("x", [4, 64])], [vi("y", [4, 32])],
                   [const("W", w), const("half", np.full(64, 0.7, np.float32))])
    spread = np.exp(rng.standard_normal(64)).astype(np.float32) * 3  # outlier channels for SmoothQuant to move
    feeds = [{"x": (rng.standard_normal((4, 64)) * spread).astype(np.float32)} for _ in range(8)]
    return m, feeds


def test_smoothquant_search_calibrates_once_and_derived_ranges_are_exact():
    from onnxcomp import ir
    from onnxcomp.calibration import collect_statistics
    from onnxcomp.passes import PassContext, Quantize
    from onnxcomp.passes.quantize import _smoothed_stats
    from onnxcomp.pipeline import Pipeline

    m, feeds = _smoothable()
    ctx = PassContext(calibration_data=feeds)
    out, recs = Pipeline(ctx).run(m, [Quantize(mode="static", min_weight_elements=0, sensitivity=False)])
    assert len(recs[0].details["smoothquant_search"]) == 4 and recs[0].details["ranges"]
    # channel ranges for the scales and the activations' ranges, once for the 4 trials (on the calibration samples
    # they are not scored on) and once for the result (on all of them)
    assert ctx.statistics.misses == 4
    # the derived min/max of a smoothed tensor are those ORT computes on the smoothed model itself
    model = ir.Model.from_proto(m)
    from onnxcomp.passes.quantize import _apply_smoothing

    assert _apply_smoothing(model, {"xh": np.linspace(0.5, 4, 64).astype(np.float32)}) == 1
    smoothed = next(n.inputs[0].name for n in model.graph.nodes if n.op == "MatMul")
    derived = _smoothed_stats(model, [smoothed], m, PassContext(calibration_data=feeds), feeds)
    real = collect_statistics(model.to_proto(), [smoothed], feeds, histogram=False)[smoothed]
    assert (derived[smoothed].min, derived[smoothed].max) == (real.min, real.max)
    assert derived[smoothed].count == real.count and derived[smoothed].zeros == real.zeros


def test_smoothquant_alpha_is_scored_on_calibration_samples_the_trials_did_not_fit(monkeypatch):
    """Scored in sample, a larger alpha always looks better (its scales fit those samples' outliers); the trials
    fit scales and ranges on the first three quarters of the calibration samples and are scored on the rest."""
    from onnxcomp.passes import PassContext, Quantize
    from onnxcomp.pipeline import Pipeline

    m, feeds = _smoothable()
    feeds = feeds + [{"x": f["x"][::-1].copy()} for f in feeds]  # 16 distinct samples: 12 fit, 4 scored
    key = lambda f: f["x"].tobytes()  # noqa: E731
    seen = []
    real = Quantize._trial_error

    def spy(self, trial, trial_source, ctx, target, tables, ref, scored, rounding=False):
        seen.append(([key(f) for f in ctx.calibration_data], [key(f) for f in scored]))
        return real(self, trial, trial_source, ctx, target, tables, ref, scored, rounding)

    monkeypatch.setattr(Quantize, "_trial_error", spy)
    _, recs = Pipeline(PassContext(calibration_data=feeds)).run(
        m, [Quantize(mode="static", min_weight_elements=0, sensitivity=False)])
    assert len(recs[0].details["smoothquant_search"]) == 4 and len(seen) == 4
    for fit, scored in seen:
        assert fit == [key(f) for f in feeds[:12]] and scored == [key(f) for f in feeds[12:]]


def test_placement_table_decides_whether_conv_output_is_quantized(monkeypatch):
    """targets.py is the one place that decides: with quantize_output off for Conv, its output stays float."""
    import dataclasses

    from onnxcomp import targets

    d = testing.digits_data()
    calib = [{"input": d["x_calib"][i:i + 20].astype(np.float32)} for i in range(0, 100, 20)]
    path = testing.digits_cnn_path()

    on = _q(path, {"mode": "static", "sensitivity": False}, calib, validate=False)
    cpu = targets.TARGETS["ort-cpu"]
    off_conv = dataclasses.replace(cpu.ops["Conv"], quantize_output=False)
    monkeypatch.setitem(targets.TARGETS, "ort-cpu", dataclasses.replace(cpu, ops={**cpu.ops, "Conv": off_conv}))
    off = _q(path, {"mode": "static", "sensitivity": False}, calib, validate=False)
    n_q = lambda m: sum(n.op_type == "QuantizeLinear" for n in m.graph.node)  # noqa: E731
    assert n_q(off.model) < n_q(on.model)  # the Conv (+Relu) outputs lost their Q/DQ
    assert off.report.passes[0].details["quantized"] and on.report.passes[0].details["quantized"]
    on_ranges, off_ranges = on.report.passes[0].details["ranges"], off.report.passes[0].details["ranges"]
    assert set(off_ranges) < set(on_ranges)  # and were not calibrated


@pytest.mark.parametrize("saturates", [True, False, None])
def test_report_suggests_full_8bit_weights_only_where_the_kernels_do_not_saturate(monkeypatch, saturates):
    import onnxcomp.runtime.cpu as cpu

    monkeypatch.setattr(cpu, "u8s8_saturates", lambda: saturates)
    d = testing.digits_data()
    calib = [{"input": d["x_calib_flat"][i:i + 20]} for i in range(0, 200, 20)]
    res = onnxcomp.compress(str(testing.digits_mlp_path()), {"passes": [{"type": "quantize", "mode": "static"}]},
                            calibration_data=calib, validate=False)
    assert res.report.passes[0].details["weight_range"] == "pairs"
    hint = [s for s in res.report.suggestions if "ort-cpu-vnni" in s]
    assert bool(hint) == (saturates is False)


def test_cpu_flags_are_read_on_linux_x86():
    import platform

    from onnxcomp.runtime.cpu import u8s8_saturates

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("reads /proc/cpuinfo on x86-64 Linux")
    with open("/proc/cpuinfo") as f:
        vnni = "vnni" in f.read()
    assert u8s8_saturates() is (not vnni)


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_weight_only_gemm_becomes_matmulnbits_with_its_corrected_bias(dtype):
    """Digits MLP (three Gemms with biases, transB=1): weight_only on ort-cpu stores every Gemm as MatMulNBits
    (4-bit blocks of 32 / 8-bit) carrying the Gemm's bias, corrected for the mean shift of the rounded weights;
    top-1 on the held-out images stays within 1 point (4-bit) / 0.2 point (8-bit) of fp32."""
    d = testing.digits_data()
    path = str(testing.digits_mlp_path())
    calib = [{"input": d["x_calib_flat"][i:i + 20]} for i in range(0, 200, 20)]
    opts = {"mode": "weight_only", "weight_dtype": dtype, "min_weight_elements": 0}
    if dtype == "int4":
        opts["block_size"] = 32
    res = _q(path, opts, calib)
    onnx.checker.check_model(res.model, full_check=True)
    nbits = [n for n in res.model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3 and not [n for n in res.model.graph.node if n.op_type == "Gemm"]
    assert all(len(n.input) == 6 and n.input[5] for n in nbits)  # the bias input
    bits = {a.name: a.i for n in nbits for a in n.attribute}["bits"]
    assert bits == (4 if dtype == "int4" else 8)
    det = res.report.passes[0].details
    assert det["bias_correction"]["layers"] == 3
    fp32 = testing.digits_top1(path, d["x_test"], d["y_test"])
    top1 = testing.digits_top1(res.model, d["x_test"], d["y_test"])
    assert top1 >= fp32 - (0.01 if dtype == "int4" else 0.002), (top1, fp32)
    if dtype == "int4":
        assert res.report.size_ratio < 0.3


def test_budget_back_off_takes_first_the_layers_whose_float_copy_helps_the_output_most():
    """With an accuracy budget, quantize ranks its layers by the drop of the model's output error on calibration
    data when that layer alone stays float (its LayerChange error), and the back-off leaves the top one float."""
    d = testing.digits_data()
    calib = [{"input": d["x_calib_flat"][i:i + 20]} for i in range(0, 200, 20)]
    recipe = {"passes": [{"type": "quantize", "mode": "static", "algorithm": "rtn"}],
              "accuracy_budget": {"cosine": 0.999999}}
    try:
        res = onnxcomp.compress(str(testing.digits_mlp_path()), recipe, calibration_data=calib)
    except onnxcomp.AccuracyBudgetError as e:
        res = e.result
    rounds = res.report.budget["backoff"]
    assert rounds, res.report.budget  # int8 does not reach cosine 0.999999 on the held-back rows
    first = rounds[0]["left_float"] + rounds[0]["softened"]  # softened: int8 weights with float activations
    # the first round's choice came from the unconstrained run's ranking: recompute it
    plain = onnxcomp.compress(str(testing.digits_mlp_path()), {"passes": recipe["passes"]}, calibration_data=calib,
                              validate=False)
    assert "end_to_end_gain" not in plain.report.passes[0].details  # only computed under a budget
    from onnxcomp.context import PassContext
    from onnxcomp.passes import Quantize
    from onnxcomp.pipeline import Pipeline

    from onnxcomp.data import split_holdout

    ctx = PassContext(calibration_data=split_holdout(calib)[0], accuracy_budget=True)  # what compress calibrated on
    _, recs = Pipeline(ctx).run(onnx.load(str(testing.digits_mlp_path())), [Quantize(mode="static", algorithm="rtn")])
    ranking = recs[0].details["end_to_end_gain"]
    assert set(ranking) == {"fc1", "fc2", "fc3"} and all(v >= 0 for v in ranking.values())
    assert {l.node: l.error for l in recs[0].layers} == ranking
    assert first == [max(ranking, key=ranking.get)]


def test_four_bit_conv_weights_per_channel_on_the_digits_cnn():
    """weight_only int4 with Conv named: each Conv kernel stored int4 per output channel (DequantizeLinear,
    opset 21, packed two a byte), the Gemms as 4-bit MatMulNBits; top-1 on held-out images within 1 point."""
    d = testing.digits_data()
    path = str(testing.digits_cnn_path())
    calib = [{"input": d["x_calib"][i:i + 20]} for i in range(0, 200, 20)]
    res = _q(path, {"mode": "weight_only", "weight_dtype": "int4", "block_size": 32, "min_weight_elements": 0,
                    "ops": ["Conv", "Gemm"]}, calib)
    onnx.checker.check_model(res.model, full_check=True)
    assert {o.domain: o.version for o in res.model.opset_import}[""] >= 21 and res.model.ir_version >= 10
    inits = {t.name: t for t in res.model.graph.initializer}
    prod = {o: n for n in res.model.graph.node for o in n.output}
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    for c in convs:
        dq = prod[c.input[1]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == TensorProto.INT4
        assert len(inits[dq.input[0]].raw_data) == (int(np.prod(inits[dq.input[0]].dims)) + 1) // 2
    assert sum(n.op_type == "MatMulNBits" for n in res.model.graph.node) == 2
    assert res.report.size_ratio < 0.2
    fp32 = testing.digits_top1(path, d["x_test"], d["y_test"])
    assert testing.digits_top1(res.model, d["x_test"], d["y_test"]) >= fp32 - 0.01
