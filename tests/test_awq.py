"""AWQ (algorithms/awq.py and quantize `algorithm: awq` / auto on 4-bit weight_only): the scale search, exactness
of the scaling in float, and lower held-out output error than nearest rounding where input channels differ."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp.algorithms import awq, gptq
from onnxcomp.errors import CalibrationDataError, RecipeError
from onnxcomp.algorithms.nbits import blocked_rtn as _blocked_rtn


def _inputs(rng, n, k, loud=8, gain=12.0):
    """Activations whose first `loud` channels are `gain` times larger (what AWQ is for)."""
    x = rng.standard_normal((n, k))
    x[:, :loud] *= gain
    return x.astype(np.float32)


def _rtn(bs=32):
    return lambda wm, hs: _blocked_rtn(wm, np.diag(hs), bs, symmetric=False)


def test_search_prefers_scaling_when_some_channels_are_loud_and_not_otherwise():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 96)).astype(np.float32) * 0.05
    x = _inputs(rng, 2000, 128)
    loud = awq.search_scale([w], x.T.astype(np.float64) @ x / len(x), _rtn())
    assert loud.alpha > 0 and loud.gain > 0.1, loud.errors
    assert loud.scale[:8].min() > loud.scale[8:].max()  # the loud channels get the larger scales
    # the choice holds on inputs the search did not see
    held = _inputs(rng, 2000, 128)
    h_held = held.T.astype(np.float64) @ held / len(held)
    e_scaled = awq.scaled_error([w.T], h_held, loud.scale, _rtn())
    e_plain = awq.scaled_error([w.T], h_held, np.ones(128, np.float32), _rtn())
    assert e_scaled < 0.9 * e_plain
    flat = rng.standard_normal((2000, 128)).astype(np.float32)
    even = awq.search_scale([w], flat.T.astype(np.float64) @ flat / len(flat), _rtn())
    assert even.gain < 0.05  # alike channels: nothing to gain


def test_scaled_error_at_unit_scale_is_the_plain_rounding_error():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    x = _inputs(rng, 500, 64)
    h = x.T.astype(np.float64) @ x / len(x)
    w_hat = _blocked_rtn(w.T, np.diag(h), 32, symmetric=False)
    assert awq.scaled_error([w.T], h, np.ones(64, np.float32), _rtn()) == pytest.approx(
        gptq.output_error(w.T, w_hat, h), rel=1e-9)


def _mlp(rng, k=128, n=128):
    """x -> LayerNormalization -> MatMul(W1) -> Relu -> MatMul(W2): real-looking trained scale is not needed,
    the inputs carry the anisotropy."""
    w1 = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    w2 = (rng.standard_normal((n, 64)) * 0.05).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 64])],
                          [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _rel_err(ref_model, cand_model, feeds):
    from onnxcomp import testing

    a, b = testing.session(ref_model), testing.session(cand_model)
    num = den = 0.0
    for f in feeds:
        r, c = a.run(None, f)[0], b.run(None, f)[0]
        num += float(np.sum((r - c) ** 2))
        den += float(np.sum(r ** 2))
    return num / den


def _int4(algorithm):
    return [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4", "block_size": 32,
             "min_weight_elements": 0, "algorithm": algorithm}]


def test_awq_beats_nearest_rounding_on_held_out_inputs_and_says_what_it_scaled():
    rng = np.random.default_rng(2)
    m = _mlp(rng)
    calib = [{"x": _inputs(rng, 16, 128)} for _ in range(24)]
    held = [{"x": _inputs(rng, 16, 128)} for _ in range(24)]
    rtn = onnxcomp.compress(m, _int4("rtn"), calibration_data=calib, progress=False, validate=False)
    res = onnxcomp.compress(m, _int4("awq"), calibration_data=calib, progress=False, validate=False)
    det = res.report.passes[0].details["awq"]
    assert det["scaled_inputs"] >= 1 and det["inputs"][0]["input"] == "x" and det["inputs"][0]["used"]
    assert _rel_err(m, res.model, held) < 0.8 * _rel_err(m, rtn.model, held)
    onnx.checker.check_model(res.model, full_check=True)
    auto = onnxcomp.compress(m, _int4("auto"), calibration_data=calib, progress=False, validate=False)
    rows = auto.report.passes[0].details["awq"]["inputs"]
    assert all("gptq_error" in r for r in rows if r["alpha"] > 0 and r["gain"] > 0.05)  # auto checks under GPTQ
    assert _rel_err(m, auto.model, held) <= _rel_err(m, res.model, held) * 1.05


def test_awq_needs_data_and_4_bit_weight_only():
    m = _mlp(np.random.default_rng(3))
    with pytest.raises(CalibrationDataError, match="awq"):
        onnxcomp.compress(m, _int4("awq"), progress=False, validate=False)
    with pytest.raises(RecipeError, match="awq"):
        onnxcomp.compress(m, [{"type": "quantize", "mode": "static", "algorithm": "awq"}],
                          calibration_data=[{"x": np.ones((16, 128), np.float32)}] * 4, progress=False,
                          validate=False)


def test_sample_rows_spreads_over_the_output_channels():
    w = np.arange(6 * 1000, dtype=np.float64).reshape(6, 1000)  # input-major [K=6, N=1000]
    s = awq.sample_rows(w, 100)
    assert s.shape == (100, 6) and s[0, 0] == w[0, 0] and s[-1, 0] == w[0, 999]
    assert awq.sample_rows(w[:, :50], 100).shape == (50, 6)  # fewer outputs than the sample: all of them


@pytest.mark.parametrize("trans_b", [0, 1])
def test_smoothing_a_gemm_is_exact_in_float_in_both_weight_layouts(trans_b):
    """x W + b = (x / s)(diag(s) W) + b for a Gemm too, whichever way its weight is stored (the digits MLP's
    trained weights, held-out images)."""
    from onnxcomp import ir, testing
    from onnxcomp.passes.quantize.smooth import _apply_smoothing

    m = onnx.load(testing.digits_mlp_path())
    if not trans_b:  # the same model with fc2's weight stored [K, N]
        g = next(n for n in m.graph.node if list(n.input[1:2]) == ["fc2.weight"])
        t = next(t for t in m.graph.initializer if t.name == "fc2.weight")
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(t).T), t.name))
        for a in g.attribute:
            if a.name == "transB":
                a.i = 0
    x = testing.digits_data()["x_test_flat"][:100].astype(np.float32)
    ref = testing.session(m).run(None, {"input": x})[0]
    fc2_in = next(n for n in m.graph.node if list(n.input[1:2]) == ["fc2.weight"]).input[0]
    scale = np.random.default_rng(0).uniform(0.25, 4.0, 128).astype(np.float32)
    model = ir.Model.from_proto(m)
    assert _apply_smoothing(model, {fc2_in: scale}) == 1
    out_proto = model.to_proto()
    onnx.checker.check_model(out_proto, full_check=True)
    assert "Mul" in {n.op_type for n in out_proto.graph.node}
    np.testing.assert_allclose(testing.session(out_proto).run(None, {"input": x})[0], ref, rtol=1e-4, atol=1e-4)


def test_awq_scales_gemm_inputs_when_asked_and_auto_leaves_gemms_alone():
    """algorithm awq takes the digits MLP's Gemms (each 4-bit MatMulNBits after its scales); auto does not scale
    Gemms (measured not better on the digits models: tools/bench_algorithms.py)."""
    from onnxcomp import testing

    d = testing.digits_data()
    calib = [{"input": d["x_calib_flat"][i:i + 20].astype(np.float32)} for i in range(0, 200, 20)]
    q = {"type": "quantize", "mode": "weight_only", "weight_dtype": "int4", "block_size": 16, "min_weight_elements": 0}
    res = onnxcomp.compress(testing.digits_mlp_path(), [dict(q, algorithm="awq")], calibration_data=calib,
                            progress=False)
    onnx.checker.check_model(res.model, full_check=True)
    det = res.report.passes[0].details["awq"]
    assert det["scaled_inputs"] >= 1 and det["layers"] == det["scaled_inputs"]  # one Gemm per scaled input here
    assert {n.op_type for n in res.model.graph.node} >= {"MatMulNBits", "Mul"}
    auto = onnxcomp.compress(testing.digits_mlp_path(), [q], calibration_data=calib, progress=False)
    assert auto.report.passes[0].details.get("awq", {"scaled_inputs": 0})["scaled_inputs"] == 0
    assert any("no 4-bit MatMul/Gemm input to scale" in n for n in auto.report.passes[0].notes)
