"""Gated MLPs (SwiGLU / GeGLU): the gate and up projections share one channel set and are pruned as one group."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcomp import ir, testing
from onnxcomp.algorithms.channels import find_groups
from tests.graphs import make_model, vi
from tests.test_channels import _init_shapes, _prune, _run


def _swiglu(zero=(), act: str = "silu", up_first: bool = False, residual: bool = True, leak: bool = False):
    """x -> RMS-free residual block: x + (act(x Wg) * (x Wu)) Wd, down-projection rows in `zero` set to 0.
    act: silu (Sigmoid*x, as torch.onnx exports it), gelu (Erf form) or sigmoid (GLU)."""
    rng = np.random.default_rng(0)
    d, f = 12, 24
    wg, wu = rng.standard_normal((d, f)).astype(np.float32), rng.standard_normal((d, f)).astype(np.float32)
    wd = rng.standard_normal((f, d)).astype(np.float32)
    wd[list(zero)] = 0.0
    gate = helper.make_node("MatMul", ["x", "Wg"], ["g"], name="gate_proj")
    up = helper.make_node("MatMul", ["x", "Wu"], ["u"], name="up_proj")
    if act == "silu":
        a = [helper.make_node("Sigmoid", ["g"], ["gs"], name="act.sigmoid"),
             helper.make_node("Mul", ["g", "gs"], ["a"], name="act")]
    elif act == "gelu":
        a = [helper.make_node("Div", ["g", "sqrt2"], ["gd"]), helper.make_node("Erf", ["gd"], ["ge"]),
             helper.make_node("Add", ["ge", "one"], ["ge1"]), helper.make_node("Mul", ["g", "ge1"], ["gm"]),
             helper.make_node("Mul", ["gm", "half"], ["a"])]
    else:
        a = [helper.make_node("Sigmoid", ["g"], ["a"], name="act")]
    nodes = ([up, gate] if up_first else [gate, up]) + a + [
        helper.make_node("Mul", ["a", "u"], ["m"], name="gated"),
        helper.make_node("MatMul", ["m", "Wd"], ["y0"], name="down_proj")]
    outs = [vi("y", ["b", "s", d])]
    if residual:
        nodes.append(helper.make_node("Add", ["x", "y0"], ["y"], name="residual"))
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"]))
    if leak:  # the up projection is also a graph output: its channels cannot go
        outs.append(vi("u", ["b", "s", f]))
    inits = [numpy_helper.from_array(wg, "Wg"), numpy_helper.from_array(wu, "Wu"), numpy_helper.from_array(wd, "Wd"),
             numpy_helper.from_array(np.float32(np.sqrt(2)), "sqrt2"), numpy_helper.from_array(np.float32(1), "one"),
             numpy_helper.from_array(np.float32(0.5), "half")]
    return make_model(nodes, [vi("x", ["b", "s", d])], outs, inits)


def _x(seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((2, 5, 12)).astype(np.float32)}


@pytest.mark.parametrize("act", ["silu", "gelu", "sigmoid"])
@pytest.mark.parametrize("up_first", [False, True])
def test_gated_mlp_is_one_group_and_exact_when_the_removed_channels_are_dead(act, up_first):
    zero = list(range(1, 24, 3))  # 8 of 24 channels feed nothing into the down projection
    m = _swiglu(zero, act, up_first)
    groups, refused = find_groups(ir.Model.from_proto(m))
    assert len(groups) == 1, refused
    g = groups[0]
    assert sorted(p.name for p in g.producers) == ["gate_proj", "up_proj"]
    assert [c.name for c in g.consumers] == ["down_proj"]
    out, res = _prune(m, method="magnitude", sparsity=8 / 24)
    shapes = _init_shapes(out)
    assert [s for n, s in shapes.items() if n.startswith("Wg")] == [(12, 16)]
    assert [s for n, s in shapes.items() if n.startswith("Wu")] == [(12, 16)]
    assert [s for n, s in shapes.items() if n.startswith("Wd")] == [(16, 12)]
    np.testing.assert_allclose(_run(out, _x())[0], _run(m, _x())[0], rtol=1e-5, atol=1e-5)
    (row,) = res.details["groups"]
    assert (row["kept"], row["channels"]) == (16, 24)
    assert {row["producer"], *row["joined"]} == {"gate_proj", "up_proj"}
    assert res.details["params_before"] == 3 * 12 * 24 and res.details["params_after"] == 3 * 12 * 16


def test_gated_mlp_nothing_removed_is_exact():
    m = _swiglu()
    out, res = _prune(m, method="magnitude", sparsity=0.0)
    np.testing.assert_array_equal(_run(out, _x())[0], _run(m, _x())[0])
    assert res.details["groups"][0]["removed"] == 0


def test_gated_mlp_with_data_refits_the_down_projection():
    m = _swiglu()
    calib = [_x(s) for s in range(2, 12)]
    out, res = _prune(m, feeds=calib, method="sparsegpt", sparsity=0.25)
    (row,) = res.details["groups"]
    assert row["removed"] == 6 and 0.0 < row["rel_err"] < 1.0
    held = _x(40)
    ref = _run(m, held)[0] - held["x"]
    got = _run(out, held)[0] - held["x"]
    plain, _ = _prune(m, method="magnitude", sparsity=0.25)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    err_plain = np.linalg.norm(_run(plain, held)[0] - held["x"] - ref) / np.linalg.norm(ref)
    assert err < err_plain  # choice + refit on calibration data beats magnitude on held-out inputs


def test_gated_mlp_whose_up_projection_leaks_is_refused_with_the_reason():
    m = _swiglu(leak=True)
    groups, refused = find_groups(ir.Model.from_proto(m))
    assert groups == []
    assert any("graph output 'u'" in r["reason"] for r in refused), refused


def test_joined_producer_excluded_by_the_recipe_refuses_the_group():
    m = _swiglu()
    groups, refused = find_groups(ir.Model.from_proto(m), exclude=("up_proj",))
    assert groups == [] and any("up_proj" in r["reason"] for r in refused), refused


def test_decoder_fixture_gated_mlps_are_found_and_pruned_on_held_out_text():
    """The real Llama-style decoder: every SwiGLU is one group; 30% of its channels go with a refit."""
    path = testing.decoder_path()
    proto = onnx.load(path)
    groups, refused = find_groups(ir.Model.from_proto(proto))
    gated = [g for g in groups if g.extra]
    assert len(gated) == 3 and all(len(g.producers) == 2 for g in gated), refused
    calib = testing.decoder_feeds(testing.decoder_windows("calib", 32))
    held = testing.decoder_windows("eval", 32)
    out, res = _prune(proto, feeds=calib, method="sparsegpt", sparsity=0.3, ops=["MatMul"])
    assert sum(r["removed"] for r in res.details["groups"] if r.get("joined")) == 3 * 192
    feeds = testing.decoder_feeds(held)
    m = testing.decoder_metrics(testing.decoder_logits(proto, feeds), testing.decoder_logits(out, feeds), held)
    assert m["top1_agreement"] >= 0.9 and m["bpb_ratio"] < 1.05, m
