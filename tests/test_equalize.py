"""Cross-layer equalization, BatchNormalization folding and bias correction (algorithms/equalize.py, quantize)."""
import numpy as np
import onnx
import pytest
from onnx import helper

import onnxcomp
from onnxcomp import ir, testing
from onnxcomp.algorithms import equalize
from onnxcomp.runtime import with_outputs
from tests.graphs import const, make_model, vi


def _outputs(model, feeds: dict) -> list[np.ndarray]:
    return testing.session(model).run(None, feeds)


def _digits(name: str):
    d = testing.digits_data()
    if name == "mlp":
        return onnx.load(str(testing.digits_mlp_path())), d["x_calib_flat"], d["x_test_flat"]
    return onnx.load(str(testing.digits_cnn_path())), d["x_calib"], d["x_test"]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_equalization_keeps_the_float_outputs_and_balances_the_ranges(name):
    proto, _, x_test = _digits(name)
    model = ir.Model.from_proto(proto)
    found = equalize.equalize(model)
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    # conv1 -> ReLU -> conv2, conv2 -> ReLU -> MaxPool -> Flatten -> fc1 (blocks of H*W rows), fc1 -> ReLU -> fc2
    assert len(found["pairs"]) == (2 if name == "mlp" else 3)
    assert all(r["range_ratio_before"] > 1.2 and r["range_ratio_after"] < 1.01 for r in found["pairs"]), found
    assert any("graph output" in r["reason"] for r in found["refused"])  # the last layer has no consumer
    x = {"input": x_test.astype(np.float32)}
    a, b = _outputs(proto, x)[0], _outputs(out, x)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    w0 = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    w1 = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    changed = [k for k in w1 if k not in w0 or not np.array_equal(w0[k], w1[k])]
    assert len(changed) >= 2 * len(found["pairs"])  # the weights really moved (producer and consumer of each)


def _conv_bn_model(act: str = "Relu", eps: float = 1e-3):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * rng.uniform(0.05, 3, (8, 1, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    bn = [rng.uniform(0.5, 2, 8), rng.standard_normal(8), rng.standard_normal(8), rng.uniform(0.2, 3, 8)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["n1"], name="bn1",
                              epsilon=eps),
             helper.make_node(act, ["n1"], ["r1"], name="act1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["y"], name="conv2")]
    inits = [const("w1", w1), const("b1", rng.standard_normal(8).astype(np.float32)), const("w2", w2),
             const("b2", rng.standard_normal(6).astype(np.float32))]
    inits += [const(n, v.astype(np.float32)) for n, v in zip(("g", "beta", "mean", "var"), bn)]
    return make_model(nodes, [vi("x", [2, 3, 8, 8])], [vi("y", [2, 6, 2, 2])], inits)


def test_batchnorm_folds_into_the_conv_and_then_equalizes_through_relu_and_maxpool():
    proto = _conv_bn_model()
    model = ir.Model.from_proto(proto)
    assert equalize.fold_batchnorm(model) == 1
    assert [n.op for n in model.graph.nodes] == ["Conv", "Relu", "MaxPool", "Conv"]
    found = equalize.equalize(model)
    assert [r["producer"] for r in found["pairs"]] == ["conv1"]
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    a, b = _outputs(proto, x)[0], _outputs(out, x)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


@pytest.mark.parametrize("act,why", [("Sigmoid", "does not commute"), ("Elu", "does not commute")])
def test_equalization_refuses_regions_that_do_not_commute_with_a_scale(act, why):
    model = ir.Model.from_proto(_conv_bn_model(act))
    equalize.fold_batchnorm(model)
    found = equalize.equalize(model)
    assert not found["pairs"]
    assert any(why in r["reason"] and act in r["reason"] for r in found["refused"]), found["refused"]


def test_quantize_folds_batchnorm_and_chooses_equalization_by_measured_error():
    proto = _conv_bn_model()
    rng = np.random.default_rng(2)
    calib = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    res = onnxcomp.compress(proto, {"passes": [{"type": "quantize", "mode": "static"}]}, calibration_data=calib)
    onnx.checker.check_model(res.model, full_check=True)
    det = res.report.passes[0].details
    assert det["batchnorm_folded"] == 1
    assert "BatchNormalization" not in {n.op_type for n in res.model.graph.node}
    scores = det["equalize_search"]
    assert ("equalized" in det) == (scores["on"] < scores["off"])
    forced = onnxcomp.compress(proto, {"passes": [{"type": "quantize", "mode": "static", "equalize": True}]},
                               calibration_data=calib)
    assert [r["producer"] for r in forced.report.passes[0].details["equalized"]] == ["conv1"]
    x = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    ref = _outputs(proto, x)[0]
    for r in (res, forced):
        y = _outputs(r.model, x)[0]
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.05


def test_bias_correction_moves_each_layer_output_mean_toward_the_float_one():
    """Digits MLP, static int8 with nearest rounding: on the calibration images, every corrected layer's output
    mean is closer to the float layer's with bias correction than without; held-out logits come closer too."""
    proto, x_calib, x_test = _digits("mlp")
    calib = [{"input": x_calib[i:i + 20].astype(np.float32)} for i in range(0, 200, 20)]
    layers = ["logits", "fc1_out", "fc2_out"]  # the graph output, then the two added
    x = {"input": x_calib.astype(np.float32)}
    ref = dict(zip(layers, _outputs(with_outputs(proto, layers[1:]), x)))
    got = {}
    for bc in (False, True):
        res = onnxcomp.compress(proto, {"passes": [{"type": "quantize", "mode": "static", "algorithm": "rtn",
                                                    "bias_correction": bc, "equalize": False}]},
                                calibration_data=calib)
        onnx.checker.check_model(res.model, full_check=True)
        got[bc] = dict(zip(layers, _outputs(with_outputs(res.model, layers[1:]), x)))
        det = res.report.passes[0].details
        assert ("bias_correction" in det) == bc
    assert res.report.passes[0].details["bias_correction"]["layers"] == 3
    for t in layers:
        gap = {bc: np.abs(got[bc][t].mean(axis=0) - ref[t].mean(axis=0)).mean() for bc in (False, True)}
        assert gap[True] < 0.5 * gap[False], (t, gap)


def test_equalization_and_batchnorm_folding_leave_shared_weights_alone():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 16)).astype(np.float32) * np.linspace(0.1, 3, 16, dtype=np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
                    helper.make_node("Relu", ["a"], ["r"], name="relu"),
                    helper.make_node("MatMul", ["r", "W"], ["y"], name="mm2")],
                   [vi("x", [2, 16])], [vi("y", [2, 16])], [const("W", w)])
    model = ir.Model.from_proto(m)
    found = equalize.equalize(model)
    assert not found["pairs"] and any("read by several nodes" in r["reason"] for r in found["refused"])
    assert [t.name for t in model.to_proto().graph.initializer] == ["W"]


@pytest.mark.parametrize("kind", ["MatMul", "Gemm", "Conv"])
def test_output_mean_shift_is_the_mean_of_the_output_error(kind):
    from onnxcomp.algorithms.bias import output_mean_shift

    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 6)) + rng.uniform(-2, 2, 6)  # inputs with a nonzero mean per channel
    if kind == "Conv":  # 1x1 kernels: the shift per output channel is exact (no padding)
        dw = rng.standard_normal((5, 6, 1, 1)) * 0.01
        err = x @ dw[:, :, 0, 0].T
        attrs = {}
    elif kind == "Gemm":
        dw = rng.standard_normal((5, 6)) * 0.01  # stored [N, K] (transB), alpha 2, bias scaled by beta 0.5
        err = 2.0 * x @ dw.T / 0.5
        attrs = {"transB": 1, "alpha": 2.0, "beta": 0.5}
    else:
        dw = rng.standard_normal((6, 5)) * 0.01
        err = x @ dw
        attrs = {}
    np.testing.assert_allclose(output_mean_shift(kind, attrs, dw, x.mean(axis=0)), err.mean(axis=0), rtol=1e-10)
    assert output_mean_shift(kind, {"group": 2} if kind == "Conv" else attrs, dw, np.zeros(3)) is None
