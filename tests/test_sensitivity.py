"""algorithms.sensitivity: end-to-end output error of weight changes in one session, and budget allocation."""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from onnxcomp.algorithms.sensitivity import WeightProbe, allocate
from tests.graphs import make_model, vi


def test_probe_error_matches_numpy_and_leaves_the_model_alone():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 5)).astype(np.float32)
    w2 = rng.standard_normal((5, 3)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                    helper.make_node("MatMul", ["r", "W2"], ["y"])], [vi("x", ["n", 6])], [vi("y", ["n", 3])],
                   [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    before = m.SerializeToString()
    feeds = [{"x": rng.standard_normal((4, 6)).astype(np.float32)} for _ in range(3)]
    probe = WeightProbe(m, ["W1", "W2"], feeds)
    assert m.SerializeToString() == before
    assert probe.error({}) == 0.0
    w1b = w1.copy()
    w1b[0] = 0

    def fwd(a, b):
        return [np.maximum(f["x"] @ a, 0) @ b for f in feeds]

    ref, new = fwd(w1, w2), fwd(w1b, w2)
    want = sum(((n - r) ** 2).sum() for n, r in zip(new, ref)) / sum((r ** 2).sum() for r in ref)
    np.testing.assert_allclose(probe.error({"W1": w1b}), want, rtol=1e-4)
    assert probe.error({"W2": np.full_like(w2, np.nan)}) == float("inf")


def test_allocate_spends_the_budget_where_error_is_cheapest():
    choices = {"a": [(10, 0.0), (5, 0.01), (2, 0.5)],  # a tolerates halving, not more
               "b": [(10, 0.0), (5, 0.2), (2, 0.3)],
               "c": [(10, 0.0), (5, 0.05), (2, 0.06)]}
    pick = allocate(choices, budget=17)
    assert pick == {"a": 1, "b": 0, "c": 2}  # 5 + 10 + 2 = 17, error 0.07 (the optimum)
    assert sum(choices[k][i][0] for k, i in pick.items()) <= 17
    assert allocate(choices, budget=30) == {"a": 0, "b": 0, "c": 0}
    assert allocate(choices, budget=1) == {"a": 2, "b": 2, "c": 2}  # unreachable: cheapest everywhere


def test_probe_on_an_ir3_model_whose_weights_are_also_inputs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [vi("x", [2, 4]), vi("W", [4, 3])], [vi("y", [2, 3])], [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 3
    feeds = [{"x": rng.standard_normal((2, 4)).astype(np.float32)}]
    probe = WeightProbe(m, ["W"], feeds)
    assert probe.error({}) == 0.0 and probe.error({"W": np.zeros_like(w)}) == 1.0


def test_allocate_gives_back_an_overshoot():
    # the cheapest rate takes a to its smallest option (total 11 for a budget of 16); a's middle option fits
    choices = {"a": [(10, 0.0), (6, 0.0045), (1, 0.009)], "b": [(10, 0.0), (9, 0.5)]}
    assert allocate(choices, budget=16) == {"a": 1, "b": 0}
