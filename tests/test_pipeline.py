"""The pipeline (one run over all passes: rollback, finalize once, memoized pass runs, shared statistics) and the
accuracy-budget back-off on typed records (limits, warnings, the recipe really applied replays to the same bytes)."""
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxcomp
from onnxcomp import budget, ir, testing
from onnxcomp.errors import AccuracyBudgetError, UnsupportedModelError
from onnxcomp.passes import Cleanup, LayerChange, Pass, PassContext, PassOutcome, Sparsify
from onnxcomp.pipeline import PassRecord, Pipeline
from onnxcomp.recipe import AccuracyBudget
from onnxcomp.validation import OutputError
from tests.graphs import const, make_model, vi


def _mlp(nan_weight: bool = False) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Relu -> MatMul(W2) = y, plus z = x + b (b holds a NaN when asked: a bad weight that
    does not touch y, so y's budget can be met while the NaN warning must survive)."""
    rng = np.random.default_rng(0)
    b = np.ones((1, 16), np.float32)
    if nan_weight:
        b[0, 3] = np.nan
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"), helper.make_node("Add", ["x", "b"], ["z"])]
    return make_model(nodes, [vi("x", [4, 16])], [vi("y", [4, 8]), vi("z", [4, 16])],
                      [const("W1", rng.standard_normal((16, 32)).astype(np.float32)),
                       const("W2", rng.standard_normal((32, 8)).astype(np.float32)), const("b", b)])


def _feeds(n=8):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(n)]


@dataclass(frozen=True)
class _Breaks(Pass):
    """Test pass: adds a node reading a tensor that does not exist (onnx.checker rejects the model)."""

    name: ClassVar[str] = "breaks"

    def run(self, model, source, ctx):
        import onnx_graphsurgeon as gs

        ghost = gs.Variable("ghost", dtype=np.float32, shape=[1])
        out = gs.Variable("ghost_out", dtype=np.float32, shape=[1])
        model.graph.nodes.append(gs.Node("Relu", "bad", inputs=[ghost], outputs=[out]))
        model.graph.outputs.append(out)
        return PassOutcome(details={"tried": True})


@dataclass(frozen=True)
class _CountsFinalize(Pass):
    """Test pass: changes nothing and counts its finalize calls (in a list it owns)."""

    name: ClassVar[str] = "counts"
    calls: tuple = ()

    def run(self, model, source, ctx):
        return PassOutcome()

    def finalize(self, proto, outcome):
        self.calls[0].append(len(proto.graph.node))


def test_invalid_pass_output_is_rolled_back_with_a_warning():
    m = _mlp()
    ctx = PassContext()
    out, recs = Pipeline(ctx).run(m, [Cleanup(), _Breaks(), Cleanup()])
    assert [r.status.split(":")[0] for r in recs] == ["ok", "rolled back", "ok"]
    assert "ghost" in recs[1].status and any("breaks" in w and "rolled back" in w for w in ctx.warnings)
    assert {n.name for n in out.graph.node} == {n.name for n in m.graph.node}  # the previous model was kept
    onnx.checker.check_model(out, full_check=True)


def test_finalize_runs_once_after_all_passes():
    calls: list = []
    p = _CountsFinalize(calls=(calls,))
    Pipeline().run(_mlp(), [p, Cleanup(), Cleanup()])
    assert calls == [4]  # once, on the final model (not after each pass)


def test_sparse_storage_survives_a_later_pass(minilm):
    """[sparsify 0.8 storage auto, cleanup]: the sparse storage is applied once at the end, so the later pass
    does not densify it, and the file is smaller than the dense one."""
    dense = onnxcomp.compress(minilm, [{"type": "sparsify", "method": "magnitude", "sparsity": 0.8,
                                        "storage": "dense"}, "cleanup"], progress=False, validate=False)
    sparse = onnxcomp.compress(minilm, [{"type": "sparsify", "method": "magnitude", "sparsity": 0.8,
                                         "storage": "auto"}, "cleanup"], progress=False, validate=False)
    n_sparse = sum(n.op_type == "Constant" and any(a.name == "sparse_value" for a in n.attribute)
                   for n in sparse.model.graph.node)
    assert n_sparse > 0
    assert sparse.model.ByteSize() < 0.9 * dense.model.ByteSize()  # (measured 0.877: the embeddings stay dense)
    for key in ("ops_added", "ops_removed", "initializers_removed"):  # cleanup saw no densified weights to undo
        assert getattr(sparse.report.passes[1], key) == getattr(dense.report.passes[1], key)
    assert sparse.report.passes[0].bytes_after < sparse.report.passes[0].bytes_before
    # each pass's saving is its own: sparse storage, written at the end, is credited to sparsify, and the
    # passes' savings add up to the whole model's (sparsify's record once showed the final model's size)
    recs = sparse.report.passes
    saved = sum(r.bytes_before - r.bytes_after for r in recs)
    assert saved == recs[0].bytes_before - ir.proto_size(sparse.model)
    assert recs[1].bytes_before - recs[1].bytes_after == dense.report.passes[1].bytes_before \
        - dense.report.passes[1].bytes_after


def test_unchanged_pass_runs_are_reused_and_statistics_collected_once():
    m, feeds = _mlp(), _feeds()
    ctx = PassContext(calibration_data=feeds)
    pipe = Pipeline(ctx)
    sp = Sparsify(method="sparsegpt", sparsity=0.5, min_weight_elements=0)
    out1, _ = pipe.run(m, [Cleanup(), sp])
    misses = ctx.statistics.misses
    out2, _ = pipe.run(m, [Cleanup(), sp])
    assert pipe.reused == 2 and out2.SerializeToString() == out1.SerializeToString()
    out3, recs = pipe.run(m, [Cleanup(), Sparsify(method="sparsegpt", sparsity=0.5, min_weight_elements=0,
                                                  exclude=("mm2",))])
    assert pipe.reused == 3  # cleanup again; the changed sparsify ran...
    assert ctx.statistics.misses == misses and ctx.statistics.hits >= 1  # ...on the statistics it had
    assert [lay.node for lay in recs[1].layers] == ["mm1"]


def test_opset_upgrade_failure_is_a_typed_error(monkeypatch):
    from onnx import version_converter

    def refuse(*a, **k):
        raise RuntimeError("No Adapter For Foo")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 4])], [vi("y", [2, 4])],
                   [const("W", np.eye(4, dtype=np.float32))], opset=11)
    with pytest.raises(UnsupportedModelError, match=r"opset >= 13.*opset 11.*No Adapter For Foo"):
        onnxcomp.compress(m, [{"type": "quantize", "mode": "weight_only", "min_weight_elements": 0}],
                          progress=False, validate=False)


# ------------------------------------------------------------------------------------------ budget and back-off
def _record(layers):
    return PassRecord("sparsify", {}, "ok", 0.0, 0, 0, {}, {}, 0, 0, 0, 0, layers=layers)


def test_backoff_gives_up_after_its_round_limit():
    """A budget that no round meets: back-off stops after max_rounds with the rounds recorded."""
    layers = [LayerChange(f"n{i}", float(i)) for i in range(40)]
    never = type("V", (), {"outputs": {"y": OutputError("y", [1], "float32", 1.0, 1.0, 1.0, 0.5)}})()
    ran = []

    def run(passes):
        ran.append(passes[0].exclude)
        return None, [_record([lay for lay in layers if lay.node not in passes[0].exclude])]

    res = budget.back_off(AccuracyBudget(cosine=0.99), [Sparsify()], None, [_record(layers)], never, run=run,
                          check=lambda m: never, max_rounds=3)
    assert len(res.rounds) == 3 and len(ran) == 3
    assert res.rounds[0].left_float == tuple(f"n{i}" for i in range(39, 29, -1))  # worst quarter first
    assert res.passes[0].exclude == tuple(f"n{i}" for i in range(39, 39 - len(ran[-1]), -1))
    assert all(r.violations == 1 and r.worst_cosine == 0.5 for r in res.rounds)


def test_backoff_softens_what_the_pass_can_compress_less_before_leaving_it_uncompressed():
    """A layer whose LayerChange says the pass has a gentler setting ("int8" for a 4-bit weight) gets it first
    (WeightPass.soften); only a layer without one, or one already softened, is left uncompressed."""
    from onnxcomp.passes import Quantize

    q = Quantize(mode="weight_only", weight_dtype="int4", block_size=32)
    never = type("V", (), {"outputs": {"y": OutputError("y", [1], "float32", 1.0, 1.0, 1.0, 0.5)}})()

    def records(p):  # 4-bit layers are softer until they are 8-bit, which cuts their error tenfold
        return [_record([LayerChange(f"n{i}", i / 10 if f"n{i}" in p.int8_nodes else float(i),
                                     softer=None if f"n{i}" in p.int8_nodes or i == 7 else "int8")
                         for i in range(8) if f"n{i}" not in p.exclude])]

    res = budget.back_off(AccuracyBudget(cosine=0.99), [q], None, records(q), never,
                          run=lambda passes: (None, records(passes[0])), check=lambda m: never, max_rounds=3)
    r = [(x.softened, x.left_float) for x in res.rounds]
    # the worst quarter of 8: n7 has no 8-bit form (left float), n6 gets 8 bits; then n5, then n4
    assert r == [(("n6",), ("n7",)), (("n5",), ()), (("n4",), ())], r
    assert res.passes[0].int8_nodes == ("n6", "n5", "n4") and res.passes[0].exclude == ("n7",)
    assert res.rounds[1].to_dict() == {"left_float": [], "softened": ["n5"], "violations": 1, "worst_cosine": 0.5}


def test_backoff_stops_when_nothing_is_left_to_give_back():
    never = type("V", (), {"outputs": {"y": OutputError("y", [1], "float32", 1.0, 1.0, 1.0, 0.5)}})()
    res = budget.back_off(AccuracyBudget(cosine=0.99), [Sparsify()], None, [_record([])], never,
                          run=lambda p: pytest.fail("nothing to back off"), check=lambda m: never)
    assert res.rounds == []


def _budgeted_mlp(nan_weight=False, **extra):
    m, feeds = _mlp(nan_weight), _feeds()
    recipe = [{"type": "sparsify", "method": "magnitude", "sparsity": 0.9, "min_weight_elements": 0}]
    plain = onnxcomp.compress(m, recipe, calibration_data=feeds, progress=False)
    target = 1.0 - (1.0 - plain.report.validation.outputs["y"].cosine) / 10
    return m, feeds, {"passes": recipe, "accuracy_budget": {"cosine": target}, **extra}


def test_nan_warning_survives_backoff_and_applied_recipe_replays():
    m, feeds, recipe = _budgeted_mlp(nan_weight=True)
    res = onnxcomp.compress(m, recipe, calibration_data=feeds, progress=False)
    assert res.report.budget["met"] and res.report.budget["backoff"]
    assert sum("NaN" in w and "'b'" in w for w in res.report.warnings) == 1  # kept, and once
    again = onnxcomp.compress(m, res.report.recipe, calibration_data=feeds, progress=False, validate=False)
    assert again.model.SerializeToString() == res.model.SerializeToString()


def test_budget_not_met_raises_with_the_result_and_cli_exits_1(tmp_path):
    m, feeds = _mlp(), _feeds()
    recipe = {"passes": [{"type": "sparsify", "method": "magnitude", "sparsity": 0.9, "min_weight_elements": 0,
                          "exclude": ["mm1", "mm2"]}, {"type": "quantize", "mode": "weight_only",
                                                        "min_weight_elements": 0, "sensitivity": False}],
              "accuracy_budget": {"max_abs_err": 0.0}}  # int8 weights with no sensitivity rows: nothing to give back
    with pytest.raises(AccuracyBudgetError) as e:
        onnxcomp.compress(m, recipe, calibration_data=feeds, progress=False)
    res = e.value.result
    assert res.report.budget["met"] is False and res.report.budget["violations"]
    onnx.checker.check_model(res.model, full_check=True)
    src, out, rfile = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.yaml"
    onnx.save(m, str(src))
    import yaml

    rfile.write_text(yaml.safe_dump(recipe))
    r = subprocess.run([sys.executable, "-m", "onnxcomp", "compress", str(src), "-o", str(out), "--recipe", str(rfile)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "accuracy budget not met" in r.stderr and "Traceback" not in r.stderr


def test_budget_with_validate_false_says_it_was_not_checked():
    m, feeds, recipe = _budgeted_mlp()
    res = onnxcomp.compress(m, recipe, calibration_data=feeds, progress=False, validate=False)
    assert res.report.budget is None and res.report.validation is None
    assert any("not checked" in w for w in res.report.warnings)
    assert "exclude" not in res.report.recipe["passes"][0] or not res.report.recipe["passes"][0]["exclude"]


def test_progress_callback_sees_passes_and_calibration():
    seen = []
    onnxcomp.compress(_mlp(), [{"type": "sparsify", "method": "sparsegpt", "min_weight_elements": 0}],
                      calibration_data=_feeds(), validate=False, progress=lambda s, d, t: seen.append((s, d, t)))
    steps = [s for s, _, _ in seen]
    assert "pass 1/1: sparsify" in steps and any(s.startswith("calibration") for s in steps)
    assert ("passes", 1, 1) in seen
    cal = [(d, t) for s, d, t in seen if s.startswith("calibration")]
    # 7 of the 8 feeds: the 5th is held back for validation
    assert cal[-1] == (7, 7) and [d for d, _ in cal] == sorted(d for d, _ in cal)
