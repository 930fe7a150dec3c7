"""Structured channel pruning (sparsify pattern: channel): shapes shrink, rewrites are exact, joins are respected."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxcomp
from onnxcomp import ir, testing
from onnxcomp.passes.base import PassContext
from onnxcomp.algorithms.channels import _obs_prune, prune_channels
from onnxcomp.passes.sparsify import Sparsify
from tests.graphs import make_model, vi


def _prune(proto: onnx.ModelProto, feeds=None, **opts):
    model = ir.Model.from_proto(proto)
    out = prune_channels(model, proto, PassContext(calibration_data=feeds), Sparsify(pattern="channel", **opts))
    result = model.to_proto()
    onnx.checker.check_model(result, full_check=True)
    return result, out


def _run(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _init_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in proto.graph.initializer}


def _ffn(zero: list[int]) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> MatMul(W1) -> Add(b1) -> erf-GELU -> MatMul(W2) -> Add(b2), neurons in `zero` contribute nothing."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    b1 = rng.standard_normal(32).astype(np.float32)
    w2 = rng.standard_normal((32, 16)).astype(np.float32)
    w2[zero] = 0.0
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="up"),
             helper.make_node("Add", ["h0", "B1"], ["h"], name="up_bias"),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"]),
             helper.make_node("MatMul", ["g", "W2"], ["y0"], name="down"),
             helper.make_node("Add", ["y0", "B2"], ["y"], name="down_bias")]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "B1"),
             numpy_helper.from_array(np.float32(np.sqrt(2)), "sqrt2"), numpy_helper.from_array(np.float32(1), "one"),
             numpy_helper.from_array(np.float32(0.5), "half"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B2")]
    return make_model(nodes, [vi("x", ["b", "s", 16])], [vi("y", ["b", "s", 16])], inits), w2


def test_transformer_ffn_pruned_exactly_when_removed_neurons_are_dead():
    zero = list(range(0, 32, 2))  # half the neurons feed nothing into the down projection
    m, _ = _ffn(zero)
    x = {"x": np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)}
    out, res = _prune(m, method="magnitude", sparsity=0.5)
    shapes = _init_shapes(out)
    assert [s for n, s in shapes.items() if n.startswith("W1")] == [(16, 16)]
    assert [s for n, s in shapes.items() if n.startswith("W2")] == [(16, 16)]
    assert [s for n, s in shapes.items() if n.startswith("B1")] == [(16,)]
    np.testing.assert_allclose(_run(out, x)[0], _run(m, x)[0], rtol=1e-5, atol=1e-5)
    (g,) = res.details["groups"]
    assert (g["producer"], g["consumers"], g["kept"], g["channels"]) == ("up", ["down"], 16, 32)
    assert res.details["params_before"] == 2 * 16 * 32 and res.details["params_after"] == 2 * 16 * 16


def test_cnn_chain_with_batchnorm_pool_and_flatten_shrinks_consistently():
    """Conv -> BN -> Relu -> Conv -> Relu -> MaxPool -> Flatten -> Gemm: dead channels removed, outputs exact."""
    rng = np.random.default_rng(0)
    wc1 = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    wc2 = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    wc2[:, [1, 4, 6, 7]] = 0  # conv1 channels 1,4,6,7 are never read
    wf = rng.standard_normal((5, 6 * 2 * 2)).astype(np.float32)  # Gemm transB: [out, C*H*W]
    wf[:, 0:4] = 0  # conv2 channel 0 (4 flattened rows) is never read
    wf[:, 12:16] = 0  # ... nor channel 3
    bn = [rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.standard_normal(8).astype(np.float32),
          rng.standard_normal(8).astype(np.float32), rng.uniform(0.5, 1.5, 8).astype(np.float32)]
    nodes = [helper.make_node("Conv", ["x", "WC1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "bb", "mu", "var"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "WC2", "BC2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "WF", "BF"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(wc1, "WC1"), numpy_helper.from_array(wc2, "WC2"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "BC2"),
             numpy_helper.from_array(wf, "WF"), numpy_helper.from_array(np.zeros(5, np.float32), "BF")] + \
        [numpy_helper.from_array(v, n) for v, n in zip(bn, ["s", "bb", "mu", "var"])]
    m = make_model(nodes, [vi("x", ["n", 1, 4, 4])], [vi("y", ["n", 5])], inits)
    x = {"x": rng.standard_normal((3, 1, 4, 4)).astype(np.float32)}
    out, res = _prune(m, method="magnitude", sparsity=0.4)
    shapes = _init_shapes(out)
    assert {n.split("_")[0]: s for n, s in shapes.items() if n.startswith(("WC1", "WC2", "WF", "s_", "bb_"))} == {
        "WC1": (5, 1, 3, 3), "WC2": (4, 5, 3, 3), "WF": (5, 16), "s": (5,), "bb": (5,)}
    np.testing.assert_allclose(_run(out, x)[0], _run(m, x)[0], rtol=1e-4, atol=1e-4)
    assert [(g["producer"], g["kept"]) for g in res.details["groups"]] == [("conv1", 5), ("conv2", 4)]


def test_residual_join_and_graph_outputs_are_not_pruned():
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["a"], name="l0"), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("MatMul", ["ra", "W1"], ["b"], name="l1"),
             helper.make_node("Add", ["b", "x"], ["res"], name="residual"),  # l1's channels join the input
             helper.make_node("MatMul", ["res", "W2"], ["y"], name="l2")]
    m = make_model(nodes, [vi("x", [4, 8])], [vi("y", [4, 8])],
                   [numpy_helper.from_array(v, f"W{i}") for i, v in enumerate(w)])
    out, res = _prune(m, method="magnitude", sparsity=0.5)
    reasons = {r["layer"]: r["reason"] for r in res.details["refused"]}
    assert "joins the channels with 'x'" in reasons["l1"]
    assert "graph output" in reasons["l2"]
    assert [g["producer"] for g in res.details["groups"]] == ["l0"]
    shapes = _init_shapes(out)
    assert sorted(s for n, s in shapes.items() if n.startswith("W1")) == [(4, 8)]
    assert ("W2", (8, 8)) in shapes.items()  # the residual stream keeps every channel


def test_obs_refit_recovers_what_plain_removal_loses_on_correlated_inputs():
    """With correlated channels, removing some and refitting the rest beats dropping them (same channels)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((2000, 6))
    x = np.concatenate([base, base @ rng.standard_normal((6, 10)) + 0.05 * rng.standard_normal((2000, 10))], axis=1)
    w = rng.standard_normal((16, 3))
    h = x.T @ x / len(x)
    keep, wf = _obs_prune(w, h, 1, [8], 1e-6)[0]
    dropped = np.zeros_like(w)
    dropped[keep] = w[keep]
    err_refit = np.linalg.norm(x @ w - x @ wf) / np.linalg.norm(x @ w)
    err_drop = np.linalg.norm(x @ w - x @ dropped) / np.linalg.norm(x @ w)
    assert len(keep) == 8 and np.all(wf[np.setdiff1d(np.arange(16), keep)] == 0)
    assert err_refit < 0.1 and err_refit < 0.25 * err_drop


def test_digits_mlp_half_the_neurons_keeps_top1_with_sparsegpt_and_shrinks_the_file(tmp_path):
    d = testing.digits_data()
    path = testing.digits_mlp_path()
    cal = [{"input": d["x_calib_flat"][i:i + 20]} for i in range(0, 200, 20)]
    res = onnxcomp.compress(path, {"passes": [{"type": "sparsify", "pattern": "channel", "sparsity": 0.5,
                                               "method": "sparsegpt"}]}, calibration_data=cal)
    ref = testing.digits_top1(path, d["x_test"], d["y_test"])
    got = testing.digits_top1(res.model, d["x_test"], d["y_test"])
    mag, _ = _prune(ir.load_proto(path), method="magnitude", sparsity=0.5)
    assert got >= ref - 0.01
    assert testing.digits_top1(mag, d["x_test"], d["y_test"]) < got  # the refit is what keeps the accuracy
    assert res.report.size_ratio < 0.45
    page = res.report.to_html(tmp_path / "r.html").read_text()  # the pass's own summary reaches the HTML report
    assert "<h3>sparsify</h3>" in page and "2 channel group(s)" in page and "fc1: 64/128 channels kept" in page
    assert "structured (sparsegpt)" in str(res.report)


def test_minilm_ffn_neurons_pruned_with_refit_keep_embeddings():
    path = testing.minilm_path()
    proto = ir.load_proto(path)
    out, res = _prune(proto, testing.minilm_feeds(24, start=200), method="sparsegpt", sparsity=0.25)
    assert [g["kept"] for g in res.details["groups"]] == [1152, 1152, 1152]
    assert all(g["rel_err"] < 0.3 for g in res.details["groups"])
    ev = testing.minilm_feeds(32, start=0)
    m = testing.minilm_metrics(testing.minilm_embed(proto, ev), testing.minilm_embed(out, ev))
    assert m["cosine_mean"] >= 0.97


def test_needs_data_for_data_aware_methods():
    m, _ = _ffn([])
    with pytest.raises(onnxcomp.CalibrationDataError, match="needs calibration_data"):
        _prune(m, method="wanda", sparsity=0.5)


def _attention(dead_heads: list[int], heads: int = 4, d: int = 4, hidden: int = 16) -> onnx.ModelProto:
    """One BERT-style self-attention block as PyTorch exports it (sizes from Shape -> Gather -> Concat),
    with an additive mask; the heads in `dead_heads` have zero rows in the output projection."""
    rng = np.random.default_rng(0)
    n = heads * d
    inits = []
    nodes = []

    def c(name, v):
        inits.append(numpy_helper.from_array(np.asarray(v), name))
        return name

    def proj(tag, perm):
        nodes.extend([helper.make_node("MatMul", ["x", c(f"W{tag}", rng.standard_normal((hidden, n)).astype(np.float32)
                                                        * 0.3)], [f"{tag}0"], name=f"{tag}_proj"),
                      helper.make_node("Add", [c(f"B{tag}", rng.standard_normal(n).astype(np.float32)), f"{tag}0"],
                                       [f"{tag}1"]),
                      helper.make_node("Shape", [f"{tag}1"], [f"{tag}_shape"]),
                      helper.make_node("Gather", [f"{tag}_shape", c(f"{tag}_i0", np.array(0, np.int64))], [f"{tag}_b"],
                                       axis=0),
                      helper.make_node("Gather", [f"{tag}_shape", c(f"{tag}_i1", np.array(1, np.int64))], [f"{tag}_s"],
                                       axis=0),
                      helper.make_node("Unsqueeze", [f"{tag}_b", c(f"{tag}_ax0", np.array([0], np.int64))], [f"{tag}_bu"]),
                      helper.make_node("Unsqueeze", [f"{tag}_s", c(f"{tag}_ax1", np.array([0], np.int64))], [f"{tag}_su"]),
                      helper.make_node("Concat", [f"{tag}_bu", f"{tag}_su", c(f"{tag}_h", np.array([heads], np.int64)),
                                                  c(f"{tag}_d", np.array([d], np.int64))], [f"{tag}_shp"], axis=0),
                      helper.make_node("Reshape", [f"{tag}1", f"{tag}_shp"], [f"{tag}2"]),
                      helper.make_node("Transpose", [f"{tag}2"], [f"{tag}3"], perm=perm)])

    proj("q", [0, 2, 1, 3])
    proj("k", [0, 2, 3, 1])
    proj("v", [0, 2, 1, 3])
    wo = rng.standard_normal((n, hidden)).astype(np.float32)
    for h in dead_heads:
        wo[h * d:(h + 1) * d] = 0
    nodes += [helper.make_node("MatMul", ["q3", "k3"], ["sc"]),
              helper.make_node("Div", ["sc", c("scale", np.array(2.0, np.float32))], ["sc1"]),
              helper.make_node("Add", ["sc1", "mask"], ["sc2"]),
              helper.make_node("Softmax", ["sc2"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v3"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Shape", ["ctx_t"], ["o_shape"]),
              helper.make_node("Gather", ["o_shape", c("o_i0", np.array(0, np.int64))], ["o_b"], axis=0),
              helper.make_node("Gather", ["o_shape", c("o_i1", np.array(1, np.int64))], ["o_s"], axis=0),
              helper.make_node("Unsqueeze", ["o_b", c("o_ax0", np.array([0], np.int64))], ["o_bu"]),
              helper.make_node("Unsqueeze", ["o_s", c("o_ax1", np.array([0], np.int64))], ["o_su"]),
              helper.make_node("Concat", ["o_bu", "o_su", c("o_n", np.array([n], np.int64))], ["o_shp"], axis=0),
              helper.make_node("Reshape", ["ctx_t", "o_shp"], ["ctx2"]),
              helper.make_node("MatMul", ["ctx2", c("WO", wo)], ["o0"], name="o_proj"),
              helper.make_node("Add", [c("BO", rng.standard_normal(hidden).astype(np.float32)), "o0"], ["y"])]
    return make_model(nodes, [vi("x", ["b", "s", hidden]), vi("mask", ["b", 1, 1, "s"])], [vi("y", ["b", "s", hidden])],
                      inits)


def test_attention_heads_removed_exactly_when_their_output_rows_are_zero():
    m = _attention(dead_heads=[1, 3])
    rng = np.random.default_rng(2)
    mask = np.zeros((2, 1, 1, 5), np.float32)
    mask[1, ..., 3:] = -10000.0
    feed = {"x": rng.standard_normal((2, 5, 16)).astype(np.float32), "mask": mask}
    out, res = _prune(m, method="magnitude", sparsity=0.0, heads=0.5)
    (g,) = [g for g in res.details["groups"] if g["kind"] == "heads"]
    assert (g["channels"], g["kept"], g["consumers"]) == (4, 2, ["o_proj"])
    shapes = _init_shapes(out)
    for name in ("Wq", "Wk", "Wv"):
        assert [s for k, s in shapes.items() if k.startswith(name)] == [(16, 8)]
    assert [s for k, s in shapes.items() if k.startswith("WO")] == [(8, 16)]
    np.testing.assert_allclose(_run(out, feed)[0], _run(m, feed)[0], rtol=1e-5, atol=1e-5)
    # every size read from inside the block now comes from its input; the head counts were rewritten
    hc = [numpy_helper.to_array(t).tolist() for t in out.graph.initializer if t.name.endswith("_shp_heads")]
    assert sorted(hc) == [[2], [2], [2], [8]]  # three head counts and the output width 2 * 4
    # without a heads fraction the attention block is left alone
    same, res2 = _prune(m, method="magnitude", sparsity=0.5)
    assert not [g for g in res2.details["groups"] if g["kind"] == "heads"]


def test_attention_heads_refit_with_data():
    m = _attention(dead_heads=[])
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 6, 16)).astype(np.float32), "mask": np.zeros((1, 1, 1, 6), np.float32)}
             for _ in range(16)]
    out, res = _prune(m, feeds, method="sparsegpt", sparsity=0.0, heads=0.25)
    (g,) = [g for g in res.details["groups"] if g["kind"] == "heads"]
    assert g["kept"] == 3 and 0 < g["rel_err"] < 1
    a, b = _run(out, feeds[0])[0], _run(m, feeds[0])[0]
    assert a.shape == b.shape and np.isfinite(a).all()


def test_grams_over_the_memory_budget_are_collected_a_few_groups_at_a_time(monkeypatch):
    """Uniform channel pruning gives the same model when its Grams are collected and dropped group by group."""
    from onnxcomp.algorithms import channels

    proto = ir.load_proto(testing.minilm_path())
    feeds = testing.minilm_feeds(8, start=200)
    whole, res = _prune(proto, feeds, method="sparsegpt", sparsity=0.25, allocation="uniform")
    assert "statistics_runs" not in res.details
    monkeypatch.setattr(channels, "GRAM_CHUNK_BYTES", 8 * 1536 * 1536)  # one FFN group per run
    parts, res = _prune(proto, feeds, method="sparsegpt", sparsity=0.25, allocation="uniform")
    assert res.details["statistics_runs"] == 3
    assert parts.SerializeToString() == whole.SerializeToString()


def test_each_pruned_group_reports_the_time_its_layers_take_before_and_after(monkeypatch):
    """Per group, its layers' shapes before and after are timed on the target (generated layers, shape_speed),
    at the rows per calibration sample its consumers read; the totals are the sums. The timing is faked here
    to check the shapes asked for and the sums (a test never asserts on wall-clock time)."""
    from onnxcomp.runtime import shape_speed

    asked = []

    def fake(k, n, widths, rows, gates=0, providers=None, budget_s=0.05):
        asked.append((k, n, widths, rows, gates))
        return float(widths[0]), float(widths[1])

    monkeypatch.setattr(shape_speed, "matmul_chain", fake)
    d = testing.digits_data()
    cal = [{"input": d["x_calib_flat"][i:i + 20]} for i in range(0, 200, 20)]
    proto = ir.load_proto(testing.digits_mlp_path())
    _, res = _prune(proto, cal, method="sparsegpt", sparsity=0.5)
    groups = res.details["groups"]
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    assert len(asked) == len(groups) == 2
    for (k, n, widths, rows, gates), g in zip(asked, groups):
        assert widths == (g["channels"], g["kept"]) and rows == 20 and gates == 0 == g["rows_timed"] - 20
        assert (g["ms_before"], g["ms_after"]) == (float(g["channels"]), float(g["kept"]))
        assert g["time_saved"] == pytest.approx(1 - g["kept"] / g["channels"], abs=1e-4)
        assert k in {s[0] for s in shapes.values() if len(s) == 2} | {s[1] for s in shapes.values() if len(s) == 2}
    t = res.details["time"]
    assert t["ms_before"] == sum(g["channels"] for g in groups) and t["ms_after"] == sum(g["kept"] for g in groups)
    assert any("time of the 2 pruned" in line for line in Sparsify.summarize(res.details))


def test_group_timing_runs_real_shapes_in_ort():
    """Unfaked: the timed layers are real ORT sessions of the group's shapes (values are wall-clock, so only
    their presence and sign are checked)."""
    d = testing.digits_data()
    cal = [{"input": d["x_calib_flat"][i:i + 20]} for i in range(0, 100, 20)]
    _, res = _prune(ir.load_proto(testing.digits_mlp_path()), cal, method="sparsegpt", sparsity=0.5)
    assert all(g["ms_before"] > 0 and g["ms_after"] > 0 for g in res.details["groups"])
    assert res.details["time"]["groups_timed"] == 2
