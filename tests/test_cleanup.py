"""The cleanup pass: no-op nodes, dead code and duplicated initializers go; no output value changes.

Each tiny model is run through `Pipeline().run(proto, [Cleanup()])`; the result must pass onnx.checker (full check),
keep its graph input and output names, have fewer nodes or initializers, and give bit-identical outputs in
ONNX Runtime on the same random feeds. The real fixtures (digits MLP/CNN, MiniLM) are checked the same
way on real inputs, within 1e-6.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import testing as fx
from onnxcomp.passes import Cleanup
from onnxcomp.pipeline import Pipeline
from tests.graphs import const, make_model, random_feeds, vi

F = TensorProto.FLOAT


# --------------------------------------------------------------------------------------- helpers


def cleanup(proto: onnx.ModelProto, **opts):
    before = proto.SerializeToString()
    out, records = Pipeline().run(proto, [Cleanup(**opts)])
    assert proto.SerializeToString() == before, "the input model was modified"
    (rec,) = records
    assert rec.status == "ok", rec.status
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == [i.name for i in proto.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    return out, rec




def outputs(proto, feeds) -> dict[str, np.ndarray]:
    sess = fx.session(proto)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def assert_same_outputs(orig, new, feeds, atol: float = 0.0) -> None:
    a, b = outputs(orig, feeds), outputs(new, feeds)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if atol:
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def ops(g: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in g.node]


def rejected(rec, rule: str) -> dict[str, int]:
    return rec.details["rewrites"]["rules"][rule]["rejected"]


# --------------------------------------------------------------------------------------- Identity
def test_identity_chains():
    proto = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Identity", ["r"], ["i1"]),
                        helper.make_node("Identity", ["i1"], ["i2"]),
                        helper.make_node("Identity", ["i2"], ["i3"]),
                        helper.make_node("Identity", ["B"], ["b_id"]),  # Identity of an initializer
                        helper.make_node("Add", ["i3", "b_id"], ["s"]),
                        helper.make_node("Identity", ["s"], ["y"])],
                       [vi("x", [2, 3])], [vi("y", [2, 3])], [const("B", np.arange(3, dtype=np.float32))])
    out, rec = cleanup(proto)
    assert ops(out.graph) == ["Relu", "Add"]
    assert rec.nodes_before == 7 and rec.nodes_after == 2 and rec.ops_removed == {"Identity": 5}
    assert list(out.graph.node[1].input) == ["r", "B"] and list(out.graph.node[1].output) == ["y"]
    assert_same_outputs(proto, out, random_feeds(proto))


# --------------------------------------------------------------------------------------- Dropout
def test_dropout_variants():
    nodes = [
        helper.make_node("Dropout", ["x"], ["d1"], name="one_output"),
        helper.make_node("Dropout", ["d1", "ratio"], ["d2", "mask_unused"], name="mask_unused"),
        helper.make_node("Dropout", ["d2", "ratio", "false"], ["d3"], name="training_false"),
        helper.make_node("Dropout", ["d3", "zero", "true"], ["d4", "mask_t"], name="training_true"),
        helper.make_node("Dropout", ["d4"], ["d5", "mask_used"], name="mask_used"),
        helper.make_node("Cast", ["mask_used"], ["mask_f"], to=F),
        helper.make_node("Add", ["d5", "mask_f"], ["s"]),
        helper.make_node("Dropout", ["s", "ratio", "mode"], ["y"], name="training_input"),
    ]
    proto = make_model(nodes, [vi("x", [3, 4]), vi("mode", [], TensorProto.BOOL)], [vi("y", [3, 4])],
                       [const("ratio", np.float32(0.5)), const("zero", np.float32(0.0)),
                        const("false", np.array(False)), const("true", np.array(True))], opset=13)
    out, rec = cleanup(proto)
    names = [n.name for n in out.graph.node if n.op_type == "Dropout"]
    assert names == ["training_true", "mask_used", "training_input"]
    assert rec.ops_removed == {"Dropout": 3}
    assert "intermediate 'mask_used' is also used by Cast ''" in rejected(rec, "remove-dropout")
    mode = rejected(rec, "remove-dropout-training-mode")
    assert mode["check failed: training_mode is true"] == 1
    assert mode["check failed: training_mode is not a constant"] == 1
    assert "ratio" in {t.name for t in out.graph.initializer}  # still read by the last Dropout
    # ratio 0 in training mode is deterministic; mode=False is inference
    assert_same_outputs(proto, out, random_feeds(proto, mode=np.array(False)))


def test_dropout_whose_mask_is_a_graph_output_stays():
    proto = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Dropout", ["r"], ["y", "mask"])],
                       [vi("x", [2, 3])], [vi("y", [2, 3]), vi("mask", [2, 3], TensorProto.BOOL)], opset=13)
    out, rec = cleanup(proto)
    assert ops(out.graph) == ["Relu", "Dropout"]
    assert_same_outputs(proto, out, random_feeds(proto))


# --------------------------------------------------------------------------------------- Cast
def test_cast_to_same_dtype_goes_cast_to_other_dtype_stays():
    proto = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Cast", ["r"], ["same"], to=F, name="noop"),
                        helper.make_node("Cast", ["same"], ["as_int"], to=TensorProto.INT32, name="to_int"),
                        helper.make_node("Cast", ["as_int"], ["back"], to=F, name="to_float"),
                        helper.make_node("Add", ["same", "back"], ["s"]),
                        helper.make_node("Cast", ["s"], ["y"], to=F, name="noop_output")],
                       [vi("x", [3, 4])], [vi("y", [3, 4])])
    out, rec = cleanup(proto)
    assert [n.name for n in out.graph.node if n.op_type == "Cast"] == ["to_int", "to_float"]
    assert rec.ops_removed == {"Cast": 2}
    assert rejected(rec, "remove-noop-cast") == {"check failed: Cast changes the dtype": 2}
    assert_same_outputs(proto, out, random_feeds(proto, x=np.linspace(-5, 5, 12, dtype=np.float32).reshape(3, 4)))


# --------------------------------------------------------------------------------------- Transpose of constants
def test_transpose_of_constant_weight_is_folded_and_shared_weight_stays():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    proto = make_model([helper.make_node("Transpose", ["W"], ["wt"], perm=[1, 0]),
                        helper.make_node("MatMul", ["x", "wt"], ["y"]),
                        helper.make_node("MatMul", ["z", "W"], ["v"])],  # another reader of W
                       [vi("x", [2, 4]), vi("z", [2, 3])], [vi("y", [2, 3]), vi("v", [2, 4])], [const("W", w)])
    out, rec = cleanup(proto)
    assert ops(out.graph) == ["MatMul", "MatMul"]
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert set(inits) == {"W", "W_transposed"}
    np.testing.assert_array_equal(inits["W"], w)
    np.testing.assert_array_equal(inits["W_transposed"], w.T)
    assert_same_outputs(proto, out, random_feeds(proto))


def test_two_transposes_of_one_weight_get_distinct_initializers():
    """Both folds want the name 'W_transposed' (and one such initializer already exists): names must stay
    unique or the whole pass fails the checker and is rolled back."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((2, 3, 4)).astype(np.float32)
    other = rng.standard_normal(5).astype(np.float32)
    proto = make_model([helper.make_node("Transpose", ["W"], ["t1"], perm=[0, 2, 1]),
                        helper.make_node("Add", ["x1", "t1"], ["y1"]),
                        helper.make_node("Transpose", ["W"], ["t2"], perm=[2, 1, 0]),
                        helper.make_node("Add", ["x2", "t2"], ["y2"]),
                        helper.make_node("Add", ["x3", "W_transposed"], ["y3"])],
                       [vi("x1", [2, 4, 3]), vi("x2", [4, 3, 2]), vi("x3", [5])],
                       [vi("y1", [2, 4, 3]), vi("y2", [4, 3, 2]), vi("y3", [5])],
                       [const("W", w), const("W_transposed", other)])
    out, rec = cleanup(proto, dedupe=False)
    assert ops(out.graph) == ["Add", "Add", "Add"]
    names = [t.name for t in out.graph.initializer]
    assert len(names) == len(set(names)) == 3
    assert_same_outputs(proto, out, random_feeds(proto))


def test_transpose_fold_can_be_disabled():
    proto = make_model([helper.make_node("Transpose", ["W"], ["y"])], [], [vi("y", [3, 2])],
                       [const("W", np.ones((2, 3), np.float32))])
    out, _ = cleanup(proto, fold_transpose=False)
    assert ops(out.graph) == ["Transpose"]


# --------------------------------------------------------------------------------------- dead code, initializers
def test_dead_nodes_are_removed_in_the_graph_and_in_branches():
    then = helper.make_graph([helper.make_node("Exp", ["a"], ["dead_in_branch"]),
                              helper.make_node("Neg", ["a"], ["t_out"])], "then", [], [vi("t_out", [2, 3])])
    els = helper.make_graph([helper.make_node("Abs", ["a"], ["e_out"])], "else", [], [vi("e_out", [2, 3])])
    proto = make_model([helper.make_node("Relu", ["x"], ["a"]),
                        helper.make_node("Sigmoid", ["a"], ["dead1"]),
                        helper.make_node("Tanh", ["dead1"], ["dead2"]),
                        helper.make_node("Mul", ["dead2", "K"], ["dead3"]),
                        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)],
                       [vi("x", [2, 3]), vi("c", [], TensorProto.BOOL)], [vi("y", [2, 3])],
                       [const("K", np.full(3, 2.0, np.float32))])
    out, rec = cleanup(proto)
    assert ops(out.graph) == ["Relu", "If"]
    then_out = next(a.g for a in out.graph.node[1].attribute if a.name == "then_branch")
    assert ops(then_out) == ["Neg"]
    assert rec.details["dead_nodes_removed"] == 4
    assert len(out.graph.initializer) == 0  # K was only read by dead code
    for c in (True, False):
        assert_same_outputs(proto, out, random_feeds(proto, c=np.array(c)))


def test_duplicated_initializers_are_merged():
    v = np.arange(12, dtype=np.float32).reshape(3, 4)
    proto = make_model([helper.make_node("Add", ["x", "A"], ["a"]),
                        helper.make_node("Mul", ["a", "B"], ["b"]),  # same bytes as A
                        helper.make_node("Sub", ["b", "C"], ["c"]),  # same bytes as A
                        helper.make_node("Add", ["c", "D"], ["d"]),  # same values, other shape
                        helper.make_node("Cast", ["d"], ["di"], to=TensorProto.INT32),
                        helper.make_node("Add", ["di", "E"], ["y"])],  # same bytes, other dtype
                       [vi("x", [3, 4])], [vi("y", [1, 3, 4], TensorProto.INT32)],
                       [const("A", v), const("B", v.copy()), const("C", v.copy()), const("D", v.reshape(1, 3, 4)),
                        const("E", v.view(np.int32))])
    out, rec = cleanup(proto)
    assert sorted(t.name for t in out.graph.initializer) == ["A", "D", "E"]
    assert len(proto.graph.initializer) == 5 and len(out.graph.initializer) == 3
    assert rec.details["initializers_deduplicated"] == 2 and rec.details["bytes_deduplicated"] == 2 * v.nbytes
    assert rec.initializers_removed == 2 and rec.nodes_after == rec.nodes_before
    assert_same_outputs(proto, out, random_feeds(proto))


def test_duplicated_initializer_that_is_a_graph_output_keeps_its_name():
    v = np.arange(6, dtype=np.float32).reshape(2, 3)
    proto = make_model([helper.make_node("Add", ["x", "A"], ["y"]), helper.make_node("Mul", ["x", "B"], ["z"])],
                       [vi("x", [2, 3])], [vi("y", [2, 3]), vi("z", [2, 3]), vi("B", [2, 3])],
                       [const("A", v), const("B", v.copy())])
    out, rec = cleanup(proto)
    assert [o.name for o in out.graph.output] == ["y", "z", "B"]
    assert_same_outputs(proto, out, random_feeds(proto))


def test_unused_initializer_is_removed():
    proto = make_model([helper.make_node("Add", ["x", "A"], ["y"])], [vi("x", [3])], [vi("y", [3])],
                       [const("A", np.ones(3, np.float32)), const("unused", np.zeros((100, 100), np.float32))])
    out, rec = cleanup(proto)
    assert [t.name for t in out.graph.initializer] == ["A"]
    assert rec.initializers_removed == 1 and rec.bytes_after < rec.bytes_before - 39_000
    assert_same_outputs(proto, out, random_feeds(proto))


def test_outer_weight_read_in_a_loop_body_is_stored_once():
    """A body reading an outer-scope initializer must not get its own copy of it after the pass."""
    w = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    body = helper.make_graph([helper.make_node("MatMul", ["acc_in", "W"], ["mm"]),
                              helper.make_node("Identity", ["mm"], ["acc_out"]),
                              helper.make_node("Identity", ["cond_in"], ["cond_out"])],
                             "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL),
                                      vi("acc_in", [1, 64])],
                             [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [1, 64])])
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["x2"]),
                        helper.make_node("Loop", ["n", "", "x2"], ["y"], body=body)],
                       [vi("x", [1, 64])], [vi("y", [1, 64])], [const("W", w), const("n", np.array(2, np.int64))])
    out, rec = cleanup(proto)
    assert rec.bytes_after < rec.bytes_before + 1024  # not one more 16 KiB copy of W
    body_out = next(a.g for a in out.graph.node[-1].attribute if a.name == "body")
    assert len(body_out.initializer) == 0 and "W" in {t.name for t in out.graph.initializer}
    assert sorted(ops(body_out)) == ["Identity", "MatMul"]
    assert_same_outputs(proto, out, random_feeds(proto))


def test_ir3_model_keeps_its_initializers_listed_as_inputs():
    """IR < 4 requires every initializer to be a graph input; the pass must not drop them (or it is rolled back)."""
    g = helper.make_graph([helper.make_node("Add", ["x", "W"], ["a"]), helper.make_node("Identity", ["a"], ["y"])], "g",
                          [vi("x", [3]), vi("W", [3])], [vi("y", [3])], [const("W", np.arange(3, dtype=np.float32))])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    proto.ir_version = 3
    onnx.checker.check_model(proto, full_check=True)
    out, rec = cleanup(proto)
    assert out.ir_version == 3 and ops(out.graph) == ["Add"]
    x = {"x": np.array([1.0, -2.0, 3.5], np.float32)}
    assert_same_outputs(proto, out, x)


# --------------------------------------------------------------------------------------- real fixtures
def _real_fixture(name: str):
    try:
        if name == "digits_mlp":
            d = fx.digits_data()
            return fx.digits_mlp_path(), [{"input": d["x_test_flat"][:64]}]
        if name == "digits_cnn":
            d = fx.digits_data()
            return fx.digits_cnn_path(), [{"input": d["x_test"][:64]}]
        return fx.minilm_path(), fx.minilm_feeds(8)
    except fx.FixtureUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "minilm"])
def test_cleanup_on_real_fixtures(name, capsys):
    path, feeds = _real_fixture(name)
    proto = onnx.load(str(path))
    out, rec = cleanup(proto)
    with capsys.disabled():
        print(f"\ncleanup {name}: nodes {rec.nodes_before} -> {rec.nodes_after}, "
              f"initializers {len(proto.graph.initializer)} -> {len(out.graph.initializer)}, "
              f"bytes {rec.bytes_before} -> {rec.bytes_after}")
    assert rec.nodes_after <= rec.nodes_before
    assert rec.bytes_after <= rec.bytes_before * 1.05 + 4096  # only shape annotations may be added
    ref, new = fx.session(proto), fx.session(out)
    names = [o.name for o in ref.get_outputs()]
    assert names == [o.name for o in new.get_outputs()]
    for feed in feeds:
        for k, a, b in zip(names, ref.run(None, feed), new.run(None, feed)):
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0) <= 1e-6, k
    if name == "minilm":
        # its two Identity nodes copy graph inputs to graph outputs ("output" <- input_ids, "463" <-
        # attention_mask): removing one would rename an output, so cleanup must keep them and say why
        assert ops(out.graph).count("Identity") == 2
        reasons = rejected(rec, "remove-identity")
        assert reasons == {"'output' is a graph output and its replacement 'input_ids' cannot take its name": 1,
                           "'463' is a graph output and its replacement 'attention_mask' cannot take its name": 1}
        # 112 Constant nodes hold only 19 distinct values: the duplicates are merged
        assert ops(out.graph).count("Constant") < 30 < ops(proto.graph).count("Constant")
        assert rec.nodes_after < rec.nodes_before


def _range_from_squeezed_scalars() -> onnx.ModelProto:
    """Range(Squeeze([0]), Shape(x)[Squeeze([1])], Squeeze([1])): Range takes scalars only, so the folded
    Squeezes must stay rank 0 (the expanded Attention functions of the backend corpus build their causal masks
    this way; a [1] index makes the Gather's output [1] too, and with x of fixed shape ORT's shape inference
    sees the Range inputs' values and refuses them)."""
    nodes = [helper.make_node("Squeeze", ["zero1d", "ax"], ["zero"], name="sq0"),
             helper.make_node("Squeeze", ["one1d", "ax"], ["one"], name="sq1"),
             helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "one"], ["n"], name="seq_len"),
             helper.make_node("Range", ["zero", "n", "one"], ["r"], name="range")]
    inits = [const("zero1d", np.array([0], np.int64)), const("one1d", np.array([1], np.int64)),
             const("ax", np.array([0], np.int64))]
    return make_model(nodes, [vi("x", [2, 5])], [helper.make_tensor_value_info("r", TensorProto.INT64, [None])],
                      inits)


def test_folded_scalar_stays_a_scalar():
    import onnxcomp

    m = _range_from_squeezed_scalars()
    feeds = [{"x": np.zeros((2, 5), np.float32)}]
    res = onnxcomp.compress(m, ["cleanup"], validation_data=feeds, progress=False)
    assert "Squeeze" not in {n.op_type for n in res.model.graph.node}
    folded = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for n in res.model.graph.node:
        if n.op_type == "Constant":
            folded[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    assert folded["zero"].shape == () and folded["one"].shape == ()
    assert res.report.validation.outputs["r"].max_abs_err == 0.0


def test_a_produced_model_ort_cannot_load_is_an_internal_error(monkeypatch):
    """The fault of that folding bug, put back: the result passes onnx.checker but ORT refuses it. That is
    onnxcomp's fault, not the input's: an InternalError saying so, never an InvalidModelError."""
    import onnxcomp
    from onnxcomp.errors import InternalError
    from onnxcomp.rewrite import sweeps

    real = sweeps._evaluate
    monkeypatch.setattr(sweeps, "_evaluate", lambda *a: np.ascontiguousarray(real(*a)))  # 0-d becomes [1]
    with pytest.raises(InternalError, match=r"bug in onnxcomp.*candidate model.*Range.*report it"):
        onnxcomp.compress(_range_from_squeezed_scalars(), ["cleanup"], validation_data=[{"x": np.zeros((2, 5), np.float32)}],
                          progress=False)
