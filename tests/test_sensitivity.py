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


def test_probe_errors_are_reused_and_equal_to_a_fresh_measurement():
    from onnxcomp.calibration import ProbeErrors, model_digest

    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", ["n", 6])], [vi("y", ["n", 4])],
                   [numpy_helper.from_array(w, "W")])
    feeds = [{"x": rng.standard_normal((3, 6)).astype(np.float32)} for _ in range(2)]
    cut = {"W": np.where(np.abs(w) < 0.5, 0, w).astype(np.float32)}
    errors, digest = ProbeErrors(), model_digest(m)
    first = WeightProbe(m, ["W"], feeds, errors=errors, digest=digest)
    e1 = first.error(cut)
    again = WeightProbe(m, ["W"], feeds, errors=errors, digest=digest)
    assert again.error(cut) == e1 and again.session is None  # answered without a session
    assert (errors.hits, errors.misses) == (1, 1)
    assert WeightProbe(m, ["W"], feeds).error(cut) == e1  # the same as measuring afresh
    other = dict(cut, W=cut["W"] * 0)  # other weights, other samples or another model: measured
    assert again.error(other) != e1
    assert WeightProbe(m, ["W"], feeds[:1], errors=errors, digest=digest).error(cut) != e1
    assert WeightProbe(m, ["W"], feeds, errors=errors, digest="another model").session is None
    assert errors.misses == 3
    # providers given with their options (ORT's (name, {option: value}) form) key the errors too
    with_options = [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
    assert WeightProbe(m, ["W"], feeds, providers=with_options, errors=errors, digest=digest).error(cut) == e1
    assert errors.misses == 4


def test_backoff_rounds_take_probe_errors_from_the_first_round(monkeypatch):
    import onnxcomp
    from onnxcomp import testing as fx

    opened = []
    real = WeightProbe._open
    monkeypatch.setattr(WeightProbe, "_open", lambda self: opened.append(len(self.names)) or real(self))
    x = fx.digits_data()["x_test_flat"].astype(np.float32)
    recipe = {"passes": [{"type": "sparsify", "sparsity": 0.8, "allocation": "sensitivity"}],
              "accuracy_budget": {"cosine": 0.99999}}
    try:
        result = onnxcomp.compress(fx.digits_mlp_path(), recipe, calibration_data=[{"input": x[i:i + 20]}
                                                                                    for i in range(0, 200, 20)])
    except onnxcomp.AccuracyBudgetError as e:
        result = e.result
    rounds = result.report.budget["backoff"]
    assert len(rounds) >= 1
    assert len(opened) == 1  # one probe session, in the first round: the later rounds' errors are all reused
