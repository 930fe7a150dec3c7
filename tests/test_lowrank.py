"""The lowrank pass: exact factorization at the weight's rank, Gemm/Conv attribute handling, rank rules, whitening,
sensitivity allocation, option errors, and real fixtures end to end (also followed by quantize)."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxcomp
from onnxcomp import testing
from onnxcomp.errors import CalibrationDataError, RecipeError
from onnxcomp.passes.lowrank import Lowrank, output_rel_error, rank_for, spectrum
from tests.graphs import const, make_model, random_feeds, vi

FAST = {"speed_check": False, "min_weight_elements": 0}


def _lr(model, calib=None, **opts):
    return onnxcomp.compress(model, [{"type": "lowrank", **opts}], calibration_data=calib, progress=False,
                             validate=False)


def _low_rank(k, n, r, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32)


def _run(model, feeds):
    onnx.checker.check_model(model, full_check=True)
    return testing.session(model).run(None, feeds)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _details(res):
    (rec,) = [r for r in res.report.passes if r.name == "lowrank"]
    assert rec.status == "ok", rec.status
    return rec.details


# ------------------------------------------------------------------------------------ exactness at the true rank
@pytest.mark.parametrize("whiten", [False, True])
def test_matmul_at_weight_rank_reproduces_outputs(whiten):
    w = _low_rank(32, 48, 4)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 5, 32])],
                   [vi("y", [2, 5, 48])], [const("W", w)])
    calib = [random_feeds(m, seed=s) for s in range(4)]
    res = _lr(m, calib if whiten else None, rank=4, whiten=whiten, **FAST)
    assert _ops(res.model) == ["MatMul", "MatMul"]
    assert [o.name for o in res.model.graph.output] == ["y"]
    feeds = random_feeds(m, seed=9)
    np.testing.assert_allclose(_run(res.model, feeds)[0], _run(m, feeds)[0], atol=1e-4, rtol=1e-4)
    row = _details(res)["layers"][0]
    assert (row["rank"], row["k"], row["n"], row["params_before"], row["params_after"]) == (4, 32, 48, 1536, 320)
    assert row["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    assert row["rel_err" if whiten else "weight_rel_err"] < 1e-5


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [None, "vector", "matrix"])
def test_gemm_attributes_exact_at_weight_rank(trans_b, bias):
    w = _low_rank(24, 40, 3, seed=1)
    stored = w.T.copy() if trans_b else w
    inits = [const("W", stored)]
    ins = ["x", "W"]
    if bias is not None:
        b = np.random.default_rng(2).standard_normal((40,) if bias == "vector" else (6, 40)).astype(np.float32)
        inits.append(const("C", b))
        ins.append("C")
    m = make_model([helper.make_node("Gemm", ins, ["y"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3)],
                   [vi("x", [6, 24])], [vi("y", [6, 40])], inits)
    res = _lr(m, rank=3, whiten=False, **FAST)
    assert len(res.model.graph.node) == 2
    feeds = random_feeds(m, seed=3)
    np.testing.assert_allclose(_run(res.model, feeds)[0], _run(m, feeds)[0], atol=1e-4, rtol=1e-4)


def test_gemm_transa_is_left_dense_with_reason():
    w = _low_rank(24, 40, 3)
    m = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="gemm", transA=1)], [vi("x", [24, 6])],
                   [vi("y", [6, 40])], [const("W", w)])
    res = _lr(m, rank=3, whiten=False, **FAST)
    assert _ops(res.model) == ["Gemm"]
    assert any("transA" in s["reason"] for s in _details(res)["skipped"])


def test_conv_channel_factorization_exact_at_weight_rank():
    mat = _low_rank(8 * 9, 16, 4, seed=4)  # [C_in*kh*kw, C_out]
    w = np.ascontiguousarray(mat.T.reshape(16, 8, 3, 3))
    b = np.linspace(-1, 1, 16, dtype=np.float32)
    m = make_model([helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 0, 1, 0],
                                     strides=[2, 1], dilations=[1, 2])],
                   [vi("x", [2, 8, 9, 10])], [vi("y", [2, 16, 5, 6])], [const("W", w), const("B", b)])
    calib = [random_feeds(m, seed=s) for s in range(3)]
    res = _lr(m, calib, rank=4, **FAST)
    assert _ops(res.model) == ["Conv", "Conv"]
    second = res.model.graph.node[1]
    assert [a.ints for a in second.attribute if a.name == "kernel_shape"] == [[1, 1]]
    feeds = random_feeds(m, seed=5)
    np.testing.assert_allclose(_run(res.model, feeds)[0], _run(m, feeds)[0], atol=1e-4, rtol=1e-4)


def test_grouped_conv_is_skipped():
    w = np.random.default_rng(0).standard_normal((16, 4, 3, 3)).astype(np.float32)
    m = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="gconv", group=2)], [vi("x", [1, 8, 6, 6])],
                   [vi("y", [1, 16, 4, 4])], [const("W", w)])
    res = _lr(m, rank=1, whiten=False, **FAST)
    assert _ops(res.model) == ["Conv"]
    assert any("group" in s["reason"] for s in _details(res)["skipped"])


# ------------------------------------------------------------------------------------ rank rules
def _mlp(seed=0, dims=(64, 96, 48)):
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i, (k, n) in enumerate(zip(dims[:-1], dims[1:])):
        inits += [const(f"W{i}", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)),
                  const(f"b{i}", (rng.standard_normal(n) * 0.1).astype(np.float32))]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}")]
        x = f"a{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    return make_model(nodes, [vi("x", [16, dims[0]])], [vi("y", [16, dims[-1]])], inits)


@pytest.mark.parametrize("opts", [{"rank": 1000}, {"rank": 30}, {"energy": 1.0}, {"energy": 0.99}, {"energy": 0.5},
                                  {"params_ratio": 0.99}, {"params_ratio": 0.3}, {"error_budget": 1e-6},
                                  {"error_budget": 0.3}])
def test_rank_rules_never_increase_parameters(opts):
    m = _mlp()
    calib = [random_feeds(m, seed=s) for s in range(3)]
    res = _lr(m, calib, **opts, **FAST)
    d = _details(res)
    for row in d["layers"]:
        assert row["params_after"] < row["params_before"]
        assert row["params_after"] == row["rank"] * (row["k"] + row["n"])
    assert d["params_ratio_candidates"] <= 1.0
    n_init = sum(numpy_helper.to_array(t).size for t in res.model.graph.initializer)
    assert n_init <= sum(numpy_helper.to_array(t).size for t in m.graph.initializer)
    for s in d["skipped"]:
        assert "saves no parameters" in s["reason"] or "sensitivity allocation" in s["reason"]
    assert len(d["layers"]) + len(d["skipped"]) == 2
    _run(res.model, random_feeds(m))


def test_rank_rule_values():
    w = np.diag([4.0, 2.0, 1.0, 0.5]).astype(np.float64) @ np.eye(4, 6)
    spec = spectrum(w, None, whiten=False)
    assert rank_for("energy", 0.75, spec, 4, 6) == 1  # 16 / 21.25 = 0.753
    assert rank_for("energy", 0.94, spec, 4, 6) == 2  # 20 / 21.25 = 0.941
    assert rank_for("energy", 0.95, spec, 4, 6) == 3
    assert rank_for("rank", 9, spec, 4, 6) == 4
    assert rank_for("params_ratio", 0.5, spec, 4, 6) == 1  # floor(0.5 * 24 / 10)
    err = spec.rel_errors()
    assert rank_for("error_budget", err[2] + 1e-9, spec, 4, 6) == 2


@pytest.mark.parametrize("whiten", [False, True])
def test_closed_form_errors_match_direct_computation(whiten):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 20)) * np.logspace(-1, 1, 20)
    h = x.T @ x
    w = rng.standard_normal((20, 12))
    spec = spectrum(w, h, whiten=whiten, damping=0.01)
    errs = spec.rel_errors()
    for r in (1, 4, 11, 12):
        a, b = spec.factors(r)
        direct = np.linalg.norm(x @ w - x @ (a @ b)) / np.linalg.norm(x @ w)
        assert errs[r] == pytest.approx(direct, rel=1e-6, abs=1e-9)
        assert output_rel_error(w, a @ b, h) == pytest.approx(direct, rel=1e-6, abs=1e-9)
        ar, br = spec.factors(r, refit=True)
        assert output_rel_error(w, ar @ br, h) <= direct + 1e-6  # least squares never worse


def test_whitened_beats_plain_on_anisotropic_inputs():
    k, n = 48, 48
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    scale = np.logspace(-2, 1, k).astype(np.float32)  # input channels 1000x apart in magnitude
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [64, k])],
                   [vi("y", [64, n])], [const("W", w)])

    def feed(s):
        return {"x": (np.random.default_rng(s).standard_normal((64, k)) * scale).astype(np.float32)}

    calib = [feed(s) for s in range(8)]
    held = [feed(100 + s) for s in range(4)]
    errs = {}
    for whiten in (False, True):
        res = _lr(m, calib, rank=8, whiten=whiten, **FAST)
        ref = np.concatenate([_run(m, f)[0] for f in held])
        out = np.concatenate([_run(res.model, f)[0] for f in held])
        errs[whiten] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        if whiten:  # the reported layer error is the one ORT measures on the calibration data
            got = np.concatenate([_run(res.model, f)[0] for f in calib])
            want = np.concatenate([_run(m, f)[0] for f in calib])
            measured = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert _details(res)["layers"][0]["rel_err"] == pytest.approx(measured, rel=0.01, abs=1e-4)
    assert errs[True] < 0.5 * errs[False], errs


# ------------------------------------------------------------------------------------ allocation, speed check
def test_sensitivity_allocation_meets_budget_and_favours_the_sensitive_layer():
    m = _mlp(seed=1, dims=(64, 128, 64, 64))
    calib = [random_feeds(m, seed=s) for s in range(6)]
    res = _lr(m, calib, params_ratio=0.5, allocation="sensitivity", sensitivity_samples=4, **FAST)
    d = _details(res)
    assert d["allocation"] == "sensitivity"
    b = d["budget"]
    assert b["params_allocated"] <= b["params_target"]
    assert d["params_ratio_candidates"] <= 0.5 + 1e-9
    assert all("output_error" in row for row in d["layers"])
    uni = _lr(m, calib, params_ratio=0.5, allocation="uniform", **FAST)
    feeds = [random_feeds(m, seed=50 + s) for s in range(4)]

    def err(model):
        ref = np.concatenate([_run(m, f)[0] for f in feeds])
        return np.linalg.norm(np.concatenate([_run(model, f)[0] for f in feeds]) - ref) / np.linalg.norm(ref)

    assert err(res.model) <= err(uni.model) * 1.05


def test_speed_check_reports_timings_and_keeps_the_model_valid():
    m = _mlp(dims=(128, 256, 128))
    calib = [random_feeds(m, seed=s) for s in range(2)]
    res = _lr(m, calib, params_ratio=0.3, speed_rows=16, min_weight_elements=0)  # timings never asserted
    d = _details(res)
    assert d["speed_check"]["rows"] == 16
    timed = {row["node"]: row for row in d["layers"]}
    slower = {s["node"]: s for s in d["skipped"] if "not faster" in s["reason"]}
    assert set(timed) | set(slower) == {"fc0", "fc1"}  # every layer was timed: factorized, or dense and why
    for row in timed.values():
        assert row["pair_ms"] > 0 and row["dense_ms"] > 0
    _run(res.model, random_feeds(m))


# ------------------------------------------------------------------------------------ options and errors
@pytest.mark.parametrize("opts, match", [
    ({"rank": 4, "energy": 0.9}, r"exactly one of .*rank.*energy"),
    ({"params_ratio": 0.5, "error_budget": 0.1}, r"params_ratio.*error_budget"),
    ({"rank": 4, "allocation": "sensitivity"}, "per-layer rule"),
    ({"energy": 1.5}, "energy"),
    ({"params_ratio": 1.0}, "params_ratio"),
    ({"rank": 0}, "rank"),
    ({"ops": ["Softmax"]}, "Softmax"),
    ({"exclude": ["("]}, "regex"),
    ({"allocation": "greedy"}, "allocation"),
    ({"ranks": 3}, "unknown key"),
])
def test_bad_options_are_recipe_errors(opts, match):
    with pytest.raises(RecipeError, match=match):
        onnxcomp.Recipe.parse([{"type": "lowrank", **opts}])


def test_default_rule_is_half_the_parameters_and_round_trips():
    p = Lowrank()
    assert p.params_ratio == 0.5 and p.rule == ("params_ratio", 0.5)
    rec = onnxcomp.Recipe.parse([{"type": "lowrank", "energy": 0.9, "whiten": False}])
    again = onnxcomp.Recipe.parse(rec.to_dict())
    assert again.passes[0] == rec.passes[0] and again.passes[0].params_ratio is None


def test_missing_calibration_data_is_a_clear_error():
    m = _mlp()
    with pytest.raises(CalibrationDataError, match="whiten: false"):
        _lr(m, rank=4, **FAST)
    with pytest.raises(CalibrationDataError, match="allocation"):
        _lr(m, whiten=False, allocation="sensitivity", **FAST)
    res = _lr(m, whiten=False, **FAST)  # plain SVD, uniform half params: no data needed
    assert _details(res)["allocation"] == "uniform"


# ------------------------------------------------------------------------------------ real fixtures
def test_digits_models_end_to_end():
    try:
        mlp, cnn, data = testing.digits_mlp_path(), testing.digits_cnn_path(), testing.digits_data()
    except testing.FixtureUnavailable as e:
        pytest.skip(str(e))
    calib = {"input": data["x_calib_flat"][:128].astype(np.float32)}
    res = onnxcomp.compress(mlp, [{"type": "lowrank", "params_ratio": 0.75, "allocation": "uniform",
                                                "speed_check": False}], calibration_data=[calib], progress=False)
    d = _details(res)
    assert [r["node"] for r in d["layers"]] == ["fc1", "fc2"]  # fc3 (640 weights) is under min_weight_elements
    base = testing.digits_top1(mlp, data["x_test"], data["y_test"])
    assert testing.digits_top1(res.model, data["x_test"], data["y_test"]) >= base - 0.03
    assert res.report.validation is not None
    calib = {"input": data["x_calib"][:128].astype(np.float32)}
    res = onnxcomp.compress(cnn, [{"type": "lowrank", "params_ratio": 0.75, "allocation": "uniform",
                                   "speed_check": False}],
                            calibration_data=[calib], progress=False, validate=False)
    d = _details(res)
    assert "conv2" in [r["node"] for r in d["layers"]]
    assert _ops(res.model).count("Conv") == 3
    base = testing.digits_top1(cnn, data["x_test"], data["y_test"])
    assert testing.digits_top1(res.model, data["x_test"], data["y_test"]) >= base - 0.05


def test_minilm_lowrank_then_dynamic_quantize(minilm):
    feeds = testing.minilm_feeds(8, start=200)
    recipe = [{"type": "lowrank", "params_ratio": 0.5, "allocation": "uniform", "speed_check": False,
               "exclude": [r".*layer\.[12]/.*"]},
              {"type": "quantize", "mode": "dynamic"}]
    res = onnxcomp.compress(minilm, recipe, calibration_data=feeds, progress=False, validate=False)
    d = _details(res)
    assert len(d["layers"]) == 6 and all(r["node"].find("layer.0/") > 0 for r in d["layers"])
    quant = [r for r in res.report.passes if r.name == "quantize"][0]
    assert quant.status == "ok"
    assert quant.ops_added["com.microsoft.DynamicQuantizeMatMul"] == 24  # 18 MatMul+Add, 6 first factors
    consumed = {i for n in res.model.graph.node if n.op_type == "DynamicQuantizeMatMul" for i in n.input}
    # the factors themselves are int8 (smoothed first: dynamic mode with calibration data runs SmoothQuant)
    assert any("_lowrank_a" in name and name.endswith("_quantized") for name in consumed), sorted(consumed)
    ev = testing.minilm_feeds(16)
    cos = testing.minilm_metrics(testing.minilm_embed(minilm, ev), testing.minilm_embed(res.model, ev))
    assert cos["cosine_mean"] > 0.9


def test_shared_weight_is_factorized_per_reader():
    w = _low_rank(32, 32, 2)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
                    helper.make_node("MatMul", ["h", "W"], ["y"], name="mm2")],
                   [vi("x", [4, 32])], [vi("y", [4, 32])], [const("W", w)])
    calib = [random_feeds(m, seed=s) for s in range(3)]
    res = _lr(m, calib, params_ratio=0.25, allocation="sensitivity", **FAST)
    d = _details(res)
    assert sorted(r["node"] for r in d["layers"]) == ["mm1", "mm2"]
    assert any("weight shared" in n for n in res.report.passes[0].notes)
    names = [t.name for t in res.model.graph.initializer]
    assert len(names) == len(set(names)) == 4 and "W" not in names
    feeds = random_feeds(m, seed=4)
    np.testing.assert_allclose(_run(res.model, feeds)[0], _run(m, feeds)[0], rtol=1e-3, atol=1e-3)


def test_subgraph_layer_factorized_without_data_and_skipped_with_data():
    w = _low_rank(64, 64, 2, seed=6)
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="inner")], "then", [],
                               [vi("t", [4, 64])], [const("W", w)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id")], "else", [], [vi("e", [4, 64])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other, name="if")],
                   [vi("c", [], onnx.TensorProto.BOOL), vi("x", [4, 64])], [vi("y", [4, 64])])
    feeds = {"c": np.array(True), "x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    res = _lr(m, rank=2, whiten=False, **FAST)
    assert [r["node"] for r in _details(res)["layers"]] == ["inner"]
    np.testing.assert_allclose(_run(res.model, feeds)[0], _run(m, feeds)[0], atol=1e-4, rtol=1e-4)
    res = _lr(m, [feeds], rank=2, **FAST)  # whitening needs the activations, which a subgraph does not expose
    assert _details(res)["layers"] == []
    assert any("subgraph" in n for n in res.report.passes[0].notes)


def test_speed_check_skips_layers_whose_pair_is_slower(monkeypatch):
    from onnxcomp.passes import lowrank

    timed = []

    def fake(op, k, n, r, rows, providers=None, conv=None, budget_s=0.05):
        timed.append((k, n, r, rows))
        return (1.0, 0.5) if r <= 8 else (1.0, 2.0)  # only ranks up to 8 pay off

    monkeypatch.setattr(lowrank, "pair_speed", fake)
    m = _mlp(dims=(64, 96, 48))
    calib = [random_feeds(m, seed=s) for s in range(3)]
    res = _lr(m, calib, rank=20, min_weight_elements=0, speed_rows=7)
    d = _details(res)
    assert d["layers"] == [] and all("not faster" in s["reason"] for s in d["skipped"])
    assert {t[3] for t in timed} == {7}
    res = _lr(m, calib, params_ratio=0.5, allocation="sensitivity", min_weight_elements=0, sensitivity_samples=2)
    assert all(r["rank"] <= 8 and r["pair_ms"] == 0.5 for r in _details(res)["layers"])
