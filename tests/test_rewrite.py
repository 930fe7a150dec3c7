"""The rewrite engine on tiny models: matching, checks, transactional rewrites, subgraphs, fixpoint.

Every rewritten model passes onnx.checker (full check) and is compared with the original in ONNX Runtime
on the same random feeds: bit-identical where the rewrite cannot change a value, 1e-6 where it changes
the order of a summation (MatMul+Add -> Gemm, concatenated weights).
"""
from __future__ import annotations

import signal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import ir
from onnxcomp.passes.cleanup import cleanup_rules, remove_identity_rule
from onnxcomp.rewrite import AttrVar, GraphIndex, RewriteRule, RuleSet, apply_rules, fail
from onnxcomp.rewrite.rules import matmul_add_to_gemm_rule
from onnxcomp.testing import session
from tests.graphs import const, make_model, random_feeds, vi

F = TensorProto.FLOAT
RNG_SEED = 0


# --------------------------------------------------------------------------------------- helpers


def rewrite(proto: onnx.ModelProto, rules) -> tuple[onnx.ModelProto, object]:
    model = ir.Model.from_proto(proto)
    stats = apply_rules(model, rules)
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    return out, stats




def run(proto: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    sess = session(proto)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def assert_same_outputs(orig: onnx.ModelProto, new: onnx.ModelProto, feeds, atol: float = 0.0) -> None:
    a, b = run(orig, feeds), run(new, feeds)
    assert list(a) == list(b), "graph output names changed"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if atol == 0.0:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def ops(g: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in g.node]


def signature(proto: onnx.ModelProto) -> tuple:
    """What a rewrite could change: nodes (op, wiring, attributes), initializers, graph inputs/outputs."""
    g = proto.graph
    return (tuple((n.op_type, tuple(n.input), tuple(n.output), tuple(a.SerializeToString() for a in n.attribute))
                  for n in g.node),
            tuple(sorted(t.SerializeToString() for t in g.initializer)),
            tuple(i.name for i in g.input), tuple(o.name for o in g.output))


def reasons(stats, rule: str) -> str:
    return "\n".join(stats.rules[rule].rejected)


@pytest.fixture
def deadline():
    """Turn a hang into a failure (a rule that never reaches a fixpoint must still stop)."""
    def boom(*_):
        raise TimeoutError("rewrite did not terminate")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------------------- rules used below
def gemm_rule() -> RewriteRule:
    return matmul_add_to_gemm_rule()


def _mul_one(op, x):
    return op.Mul(x, 1.0)


def mul_one_rule() -> RewriteRule:
    return RewriteRule("remove-mul-one", _mul_one, lambda op, x: x)


def _mm_add_model(order: tuple[str, str], extra_nodes=(), extra_outputs=()) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = const("W", rng.standard_normal((8, 5)).astype(np.float32))
    b = const("B", rng.standard_normal(5).astype(np.float32))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Add", list(order), ["y"], name="add"), *extra_nodes]
    return make_model(nodes, [vi("x", [4, 8])], [vi("y", [4, 5]), *extra_outputs], [w, b])


# --------------------------------------------------------------------------------------- commutative matching
@pytest.mark.parametrize("order", [("mm", "B"), ("B", "mm")], ids=["mm+b", "b+mm"])
def test_commutative_add_matches_both_input_orders(order):
    proto = _mm_add_model(order)
    out, stats = rewrite(proto, [gemm_rule()])
    assert ops(out.graph) == ["Gemm"]
    assert stats.rules["matmul-add-to-gemm"].applied == 1
    assert [o.name for o in out.graph.output] == ["y"]
    assert_same_outputs(proto, out, random_feeds(proto), atol=1e-6)


@pytest.mark.parametrize("outer,inner", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_nested_commutative_ops_match_in_every_order(outer, inner):
    """Add(Mul(x, 2), b) matches whichever side the constant and the product are on, at both levels."""
    rng = np.random.default_rng(2)
    mul_in = ["x", "two"] if inner == 0 else ["two", "x"]
    add_in = ["m", "B"] if outer == 0 else ["B", "m"]
    proto = make_model([helper.make_node("Mul", mul_in, ["m"]), helper.make_node("Add", add_in, ["s"]),
                        helper.make_node("Relu", ["s"], ["y"])],
                       [vi("x", [3, 4])], [vi("y", [3, 4])],
                       [const("two", np.float32(2.0)), const("B", rng.standard_normal(4).astype(np.float32))])

    def pattern(op, x, b):
        return op.Add(op.Mul(x, 2.0), b)

    def replacement(op, x, b):
        return op.Add(op.Add(x, x), b)  # x*2 == x+x exactly in float

    out, stats = rewrite(proto, [RewriteRule("mul2", pattern, replacement)])
    assert stats.rules["mul2"].applied == 1, stats.explain()
    assert ops(out.graph) == ["Add", "Add", "Relu"]
    assert_same_outputs(proto, out, random_feeds(proto))


def test_sub_is_not_commutative():
    def pattern(op, x, w, b):
        return op.Sub(op.MatMul(x, w), b)

    def replacement(op, x, w, b):
        return op.Gemm(x, w, b, beta=-1.0)

    rule = RewriteRule("matmul-sub-to-gemm", pattern, replacement)
    straight = _mm_add_model(("mm", "B"))
    straight.graph.node[1].op_type = "Sub"
    out, stats = rewrite(straight, [rule])
    assert ops(out.graph) == ["Gemm"]
    assert_same_outputs(straight, out, random_feeds(straight), atol=1e-6)

    swapped = _mm_add_model(("B", "mm"))  # B - x@W is not x@W - B
    swapped.graph.node[1].op_type = "Sub"
    out, stats = rewrite(swapped, [rule])
    assert ops(out.graph) == ["MatMul", "Sub"]
    assert stats.rules["matmul-sub-to-gemm"].applied == 0
    assert "no match" in reasons(stats, "matmul-sub-to-gemm")
    assert_same_outputs(swapped, out, random_feeds(swapped))


def test_commutative_choice_is_revisited_when_a_later_input_fails():
    proto = make_model([helper.make_node("Mul", ["a", "b"], ["m"]), helper.make_node("Sub", ["m", "b"], ["y"])],
                       [vi("a", [2]), vi("b", [2])], [vi("y", [2])])

    def pattern(op, x, y):
        return op.Sub(op.Mul(x, y), x)  # graph: Sub(Mul(a, b), b) matches with x=b, y=a

    def replacement(op, x, y):
        return op.Mul(x, op.Sub(y, op.const(np.float32(1.0))))

    _, stats = rewrite(proto, [RewriteRule("factor", pattern, replacement)])
    assert stats.rules["factor"].applied == 1, stats.explain()


def test_check_chooses_among_alternative_matches():
    """Mul(x, s) with s required constant: the constant is the FIRST input, so only the swapped order passes."""
    proto = make_model([helper.make_node("Mul", ["two", "a"], ["y"], name="mul")], [vi("a", [2])], [vi("y", [2])],
                       [const("two", np.full(2, 2.0, np.float32))])

    def pattern(op, x, s):
        return op.Mul(x, s)

    def check(ctx, x, s):
        return True if ctx.const_value(s) is not None else fail("scale is not constant")

    def replacement(op, x, s):
        return op.Add(x, x)

    seen = []

    def recording_check(ctx, x, s):
        seen.append((x.name, s.name))
        return check(ctx, x, s)

    out, stats = rewrite(proto, [RewriteRule("mul2-to-add", pattern, replacement, recording_check)])
    assert stats.rules["mul2-to-add"].applied == 1, stats.explain()
    assert seen == [("two", "a"), ("a", "two")]
    assert [n.op_type for n in out.graph.node] == ["Add"]


# --------------------------------------------------------------------------------------- multi-output patterns
def test_two_matmuls_sharing_an_input_become_one_matmul_and_split():
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((4, 5)).astype(np.float32)
    w2 = rng.standard_normal((4, 6)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "W1"], ["y1"], name="mm1"),
                        helper.make_node("MatMul", ["x", "W2"], ["y2"], name="mm2"),
                        helper.make_node("Relu", ["y2"], ["z"], name="relu")],
                       [vi("x", [3, 4])], [vi("y1", [3, 5]), vi("z", [3, 6])], [const("W1", w1), const("W2", w2)])

    def pattern(op, x, w1, w2):
        return op.MatMul(x, w1), op.MatMul(x, w2)

    def check(ctx, x, w1, w2):
        if ctx.const_value(w1) is None or ctx.const_value(w2) is None:
            return fail("weights are not constant")
        return True

    def replacement(op, x, w1, w2):
        a, b = ir.const_value(w1), ir.const_value(w2)
        y = op.MatMul(x, op.const(np.concatenate([a, b], axis=1)))
        return op.Split(y, op.const(np.array([a.shape[1], b.shape[1]], np.int64)), axis=1, _outputs=2)

    out, stats = rewrite(proto, [RewriteRule("merge-matmuls", pattern, replacement, check)])
    assert stats.rules["merge-matmuls"].applied == 1, stats.explain()
    assert sorted(ops(out.graph)) == ["MatMul", "Relu", "Split"]
    split = next(n for n in out.graph.node if n.op_type == "Split")
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert split.output[0] == "y1"  # a graph output keeps its name
    assert list(relu.input) == [split.output[1]]
    assert [o.name for o in out.graph.output] == ["y1", "z"]
    assert_same_outputs(proto, out, random_feeds(proto), atol=1e-6)


def _split_concat_model() -> onnx.ModelProto:
    return make_model([
        helper.make_node("Split", ["x", "s2"], ["a", "b"], axis=0, name="split2"),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=0, name="cat2"),
        helper.make_node("Relu", ["c"], ["y"]),
        helper.make_node("Split", ["x", "s3"], ["p", "q", "r"], axis=0, name="split3"),
        helper.make_node("Concat", ["p", "q"], ["c3"], axis=0, name="cat3"),
        helper.make_node("Relu", ["c3"], ["y3"]),
        helper.make_node("Split", ["x", "s2"], ["u", "v"], axis=0, name="split_swapped"),
        helper.make_node("Concat", ["v", "u"], ["c4"], axis=0, name="cat_swapped"),
        helper.make_node("Relu", ["c4"], ["y4"]),
    ], [vi("x", [6, 3])], [vi("y", [6, 3]), vi("y3", [3, 3]), vi("r", [3, 3]), vi("y4", [6, 3])],
        [const("s2", np.array([2, 4], np.int64)), const("s3", np.array([1, 2, 3], np.int64))])


def test_multi_output_node_inside_a_pattern():
    """Concat(Split(x)) -> x, only for a 2-way Split whose outputs are concatenated in order."""
    def pattern(op, x, s):
        a, b = op.Split(x, s, axis=0, _outputs=2)
        return op.Concat(a, b, axis=0)

    proto = _split_concat_model()
    out, stats = rewrite(proto, [RewriteRule("split-concat", pattern, lambda op, x, s: x)])
    st = stats.rules["split-concat"]
    assert st.applied == 1, stats.explain()
    assert ops(out.graph).count("Split") == 2 and ops(out.graph).count("Concat") == 2
    assert {n.name for n in out.graph.node if n.op_type == "Split"} == {"split3", "split_swapped"}
    text = reasons(stats, "split-concat")
    assert "has 3 outputs, pattern wants 2" in text
    assert "would bind" in text or "is not output" in text  # Concat(v, u): outputs in the wrong order
    assert_same_outputs(proto, out, random_feeds(proto))


def test_multi_output_node_as_the_pattern_root():
    """Both outputs of a 2-way Split are pattern outputs, replaced by two Slices."""
    proto = make_model([helper.make_node("Split", ["x", "s"], ["a", "b"], axis=0, name="split"),
                        helper.make_node("Relu", ["b"], ["rb"])],
                       [vi("x", [5, 3])], [vi("a", [2, 3]), vi("rb", [3, 3])], [const("s", np.array([2, 3], np.int64))])

    def pattern(op, x, s):
        return op.Split(x, s, axis=0, _outputs=2)

    def check(ctx, x, s):
        return True if ctx.const_value(s) is not None else fail("split sizes are not constant")

    def replacement(op, x, s):
        n0, n1 = (int(v) for v in ir.const_value(s))
        i64 = lambda *v: op.const(np.array(v, np.int64))  # noqa: E731
        return (op.Slice(x, i64(0), i64(n0), i64(0)), op.Slice(x, i64(n0), i64(n0 + n1), i64(0)))

    out, stats = rewrite(proto, [RewriteRule("split-to-slices", pattern, replacement, check)])
    assert stats.rules["split-to-slices"].applied == 1, stats.explain()
    assert sorted(ops(out.graph)) == ["Relu", "Slice", "Slice"]
    assert [o.name for o in out.graph.output] == ["a", "rb"]
    assert_same_outputs(proto, out, random_feeds(proto))


# --------------------------------------------------------------------------------------- attributes, constants
def test_attribute_value_constraint():
    def pattern(op, x):
        return op.Transpose(op.Transpose(x, perm=[1, 0, 2]), perm=[1, 0, 2])

    proto = make_model([helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0, 2]),
                        helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0, 2]),
                        helper.make_node("Relu", ["t2"], ["y"]),
                        helper.make_node("Transpose", ["x"], ["u1"], perm=[1, 2, 0]),
                        helper.make_node("Transpose", ["u1"], ["u2"], perm=[1, 2, 0]),
                        helper.make_node("Relu", ["u2"], ["z"])],
                       [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4]), vi("z", [4, 2, 3])])
    out, stats = rewrite(proto, [RewriteRule("transpose-pair", pattern, lambda op, x: x)])
    assert stats.rules["transpose-pair"].applied == 1
    assert ops(out.graph).count("Transpose") == 2
    assert "attribute perm=[1, 2, 0], pattern wants [1, 0, 2]" in reasons(stats, "transpose-pair")
    assert_same_outputs(proto, out, random_feeds(proto))


def test_attribute_predicate_constraint():
    def pattern(op, x):
        return op.LeakyRelu(x, alpha=lambda a: a is not None and 0.0 <= a < 1.0, _bind="node")

    def replacement(op, x, node):
        alpha = op.const(np.float32(node.attrs["alpha"]))
        return op.Max(x, op.Mul(x, alpha))  # == LeakyRelu for 0 <= alpha < 1

    proto = make_model([helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.1, name="small"),
                        helper.make_node("LeakyRelu", ["a"], ["y"], alpha=2.0, name="big")],
                       [vi("x", [4, 5])], [vi("y", [4, 5])])
    out, stats = rewrite(proto, [RewriteRule("leaky-to-max", pattern, replacement)])
    assert stats.rules["leaky-to-max"].applied == 1
    assert [n.name for n in out.graph.node if n.op_type == "LeakyRelu"] == ["big"]
    assert "attribute alpha=2.0 rejected" in reasons(stats, "leaky-to-max")
    assert_same_outputs(proto, out, random_feeds(proto))


def test_attrvar_binds_attributes_for_check_and_replacement():
    def pattern(op, x):
        return op.Transpose(op.Transpose(x, perm=AttrVar("p1")), perm=AttrVar("p2"))

    seen = []

    def check(ctx, x, p1, p2):
        seen.append((p1, p2))
        return fail("a perm is implicit") if p1 is None or p2 is None else True

    def replacement(op, x, p1, p2):
        return op.Transpose(x, perm=[int(p1[i]) for i in p2])

    proto = make_model([helper.make_node("Transpose", ["x"], ["t1"], perm=[2, 0, 1]),
                        helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
                        helper.make_node("Relu", ["t2"], ["r"]),
                        helper.make_node("Transpose", ["r"], ["u1"]),  # no perm: reverse
                        helper.make_node("Transpose", ["u1"], ["y"], perm=[1, 0, 2])],
                       [vi("x", [2, 3, 4])], [vi("y", [3, 2, 4])])
    out, stats = rewrite(proto, [RewriteRule("compose-transposes", pattern, replacement, check)])
    assert stats.rules["compose-transposes"].applied == 1
    assert ([2, 0, 1], [0, 2, 1]) in [(list(a), list(b)) for a, b in seen if a is not None]
    assert (None, [1, 0, 2]) in [(a, list(b)) for a, b in seen if b is not None]
    assert "check failed: a perm is implicit" in reasons(stats, "compose-transposes")
    assert ops(out.graph) == ["Transpose", "Relu", "Transpose", "Transpose"]
    perm = next(a for a in out.graph.node[0].attribute if a.name == "perm")
    assert list(perm.ints) == [2, 1, 0]
    assert_same_outputs(proto, out, random_feeds(proto))


def test_constant_value_matching():
    one_node = helper.make_node("Constant", [], ["one"], value=helper.make_tensor("v", F, [], [1.0]))
    proto = make_model([
        helper.make_node("Mul", ["x", "ones"], ["m1"], name="by_ones_init"),
        one_node,
        helper.make_node("Mul", ["one", "m1"], ["m2"], name="by_constant_node_swapped"),
        helper.make_node("Mul", ["m2", "c121"], ["m3"], name="by_other_value"),
        helper.make_node("Mul", ["m3", "x"], ["m4"], name="by_variable"),
        helper.make_node("Div", ["m4", "c121"], ["d1"], name="div_by_other_value"),
        helper.make_node("Div", ["d1", "ones"], ["d2"], name="div_by_ones"),
        helper.make_node("Mul", ["d2", "ones3d"], ["y"], name="broadcasting"),
    ], [vi("x", [2, 3])], [vi("y", [2, 2, 3])],
        [const("ones", np.ones(3, np.float32)), const("c121", np.array([1, 2, 1], np.float32)),
         const("ones3d", np.ones((2, 2, 3), np.float32))])
    div_one = RewriteRule("remove-div-one", lambda op, x: op.Div(x, 1.0), lambda op, x: x)
    out, stats = rewrite(proto, [mul_one_rule(), div_one])
    assert stats.rules["remove-mul-one"].applied == 2, stats.explain()
    assert stats.rules["remove-div-one"].applied == 1, stats.explain()
    assert [n.name for n in out.graph.node] == ["by_other_value", "by_variable", "div_by_other_value",
                                                "broadcasting"]
    text = reasons(stats, "remove-mul-one")
    assert "is not a constant (pattern wants 1.0)" in text
    assert "changes shape of 'y' from [2, 2, 3] to [2, 3]" in text and "rolled back" in text  # broadcasts
    assert "constant 'c121' has a different value than 1.0" in reasons(stats, "remove-div-one")
    assert {i.name for i in out.graph.initializer} == {"c121", "ones3d"}
    assert_same_outputs(proto, out, random_feeds(proto))


def test_constant_nodes_in_scalar_and_list_forms_are_constants():
    """Constant(value_float=...) / (value_floats=...) / (value_ints=...) are constants like Constant(value=...)."""
    proto = make_model([helper.make_node("Constant", [], ["one"], value_float=1.0),
                        helper.make_node("Mul", ["x", "one"], ["m"]),
                        helper.make_node("Constant", [], ["ones"], value_floats=[1.0, 1.0, 1.0]),
                        helper.make_node("Mul", ["ones", "m"], ["m2"]),
                        helper.make_node("Constant", [], ["shape"], value_ints=[3, 2]),
                        helper.make_node("Reshape", ["m2", "shape"], ["y"])],
                       [vi("x", [2, 3])], [vi("y", [3, 2])])
    model = ir.Model.from_proto(proto)
    by_name = {t.name: ir.const_value(t) for n in model.graph.nodes for t in n.outputs if n.op == "Constant"}
    assert by_name["one"].dtype == np.float32 and by_name["one"].shape == () and by_name["one"] == 1.0
    np.testing.assert_array_equal(by_name["ones"], np.ones(3, np.float32))
    assert by_name["shape"].dtype == np.int64 and by_name["shape"].tolist() == [3, 2]
    out, stats = rewrite(proto, [mul_one_rule()])
    assert stats.rules["remove-mul-one"].applied == 2, stats.explain()
    assert ops(out.graph) == ["Constant", "Reshape"]
    assert_same_outputs(proto, out, random_feeds(proto))


# --------------------------------------------------------------------------------------- checks and rollback
def test_failing_check_reason_is_reported():
    proto = _mm_add_model(("mm", "B"))
    proto.graph.input.append(vi("W", [8, 5]))  # the weight is now a graph input: not a constant
    proto.graph.initializer.pop(0)
    onnx.checker.check_model(proto, full_check=True)
    out, stats = rewrite(proto, [gemm_rule()])
    st = stats.rules["matmul-add-to-gemm"]
    assert st.applied == 0 and st.tried == 1
    assert st.rejected == {"check failed: weight or bias is not constant": 1}
    text = stats.explain()
    assert "matmul-add-to-gemm: 0 applied of 1 candidates" in text
    assert "check failed: weight or bias is not constant" in text and "'add'" in text
    assert stats.to_dict()["rules"]["matmul-add-to-gemm"]["rejected"] == dict(st.rejected)

    boolean = RewriteRule("plain-false", gemm_rule().pattern_fn, gemm_rule().replacement_fn, lambda ctx, **_: False)
    _, stats = rewrite(_mm_add_model(("mm", "B")), [boolean])
    assert "check failed: check returned False" in stats.explain()


def _relu_model() -> onnx.ModelProto:
    return make_model([helper.make_node("Neg", ["x"], ["a"], name="neg"),
                       helper.make_node("Relu", ["a"], ["r"], name="relu"),
                       helper.make_node("Sigmoid", ["r"], ["y"], name="sig")],
                      [vi("x", [2, 3])], [vi("y", [2, 3])])


@pytest.mark.parametrize("kind", ["cast-int32", "reshape-wrong-shape", "invalid-node"])
def test_breaking_rewrite_is_rolled_back(kind):
    replacements = {
        "cast-int32": lambda op, a: op.Cast(a, to=TensorProto.INT32),
        "reshape-wrong-shape": lambda op, a: op.Reshape(op.Relu(a), op.const(np.array([3, 2], np.int64))),
        "invalid-node": lambda op, a: op.MatMul(a, a),  # [2,3] x [2,3]
    }
    expected = {"cast-int32": "changes dtype of 'r' from TensorProto.FLOAT to TensorProto.INT32",
                "reshape-wrong-shape": "changes shape of 'r' from [2, 3] to [3, 2]",
                "invalid-node": "fails onnx checker/shape inference"}
    proto = _relu_model()
    untouched = ir.Model.from_proto(proto).to_proto()
    out, stats = rewrite(proto, [RewriteRule("breaker", lambda op, a: op.Relu(a), replacements[kind])])
    st = stats.rules["breaker"]
    assert st.applied == 0
    (reason,) = st.rejected
    assert expected[kind] in reason and "rolled back" in reason
    assert signature(out) == signature(untouched)
    assert signature(out)[0] == signature(proto)[0]
    assert_same_outputs(proto, out, random_feeds(proto))


def test_rejected_replacement_leaves_no_phantom_reader():
    """A replacement that is built and then rejected must not stay registered as a reader of its inputs:
    it would make the next rule see the intermediate 'a' as used outside its match."""
    proto = _relu_model()
    bad = RewriteRule("bad", lambda op, a: op.Relu(a), lambda op, a: op.Cast(a, to=TensorProto.INT32))

    def pattern(op, x):
        return op.Relu(op.Neg(x))

    def replacement(op, x):
        return op.Neg(op.Min(x, op.const(np.float32(0.0))))  # relu(-x) == -min(x, 0)

    good = RewriteRule("neg-relu", pattern, replacement)
    model = ir.Model.from_proto(proto)
    stats = apply_rules(model, [bad, good])
    assert stats.rules["bad"].applied == 0
    assert stats.rules["neg-relu"].applied == 1, stats.explain()
    x = model.graph.inputs[0]
    assert [n.op for n in x.outputs] == ["Min"]
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    assert ops(out.graph) == ["Min", "Neg", "Sigmoid"]
    assert_same_outputs(proto, out, random_feeds(proto))


def test_replacement_arity_mismatch_and_self_replacement_are_rejected():
    proto = _relu_model()
    two = RewriteRule("two-values", lambda op, a: op.Relu(a), lambda op, a: (a, a))

    def pattern(op, a):
        return op.Relu(a, _bind="node")

    same = RewriteRule("itself", pattern, lambda op, a, node: node.outputs[0])
    out, stats = rewrite(proto, [two, same])
    assert "replacement returned 2 values for 1 pattern outputs" in reasons(stats, "two-values")
    assert "replacement is the matched subgraph itself" in reasons(stats, "itself")
    assert stats.applied == 0
    assert signature(out)[0] == signature(proto)[0]


# --------------------------------------------------------------------------------------- subgraphs
def _branch_model() -> onnx.ModelProto:
    one = const("one_t", np.float32(1.0))
    then = helper.make_graph([helper.make_node("Identity", ["a"], ["t1"]),
                              helper.make_node("Mul", ["t1", "one_t"], ["t2"]),
                              helper.make_node("Neg", ["t2"], ["t_out"])],
                             "then", [], [vi("t_out", [2, 3])], [one])
    els = helper.make_graph([helper.make_node("Constant", [], ["one_e"], value=helper.make_tensor("v", F, [], [1.0])),
                             helper.make_node("Mul", ["one_e", "a"], ["e1"]),
                             helper.make_node("Sigmoid", ["e1"], ["e2"]),
                             helper.make_node("Identity", ["e2"], ["e_out"])],
                            "else", [], [vi("e_out", [2, 3])])
    return make_model([helper.make_node("Relu", ["x"], ["a"]),
                       helper.make_node("If", ["c"], ["b"], then_branch=then, else_branch=els),
                       helper.make_node("Add", ["a", "b"], ["y"])],
                      [vi("x", [2, 3]), vi("c", [], TensorProto.BOOL)], [vi("y", [2, 3])])


def test_rules_apply_inside_if_branches():
    proto = _branch_model()
    out, stats = rewrite(proto, [remove_identity_rule(), mul_one_rule()])
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    branches = {a.name: a.g for a in if_node.attribute}
    assert ops(branches["then_branch"]) == ["Neg"]
    assert ops(branches["else_branch"]) == ["Sigmoid"]
    assert [o.name for o in branches["then_branch"].output] == ["t_out"]
    assert [o.name for o in branches["else_branch"].output] == ["e_out"]  # Sigmoid's output took the name
    assert stats.rules["remove-identity"].applied == 2 and stats.rules["remove-mul-one"].applied == 2
    for c in (True, False):
        feeds = random_feeds(proto, c=np.array(c))
        assert_same_outputs(proto, out, feeds)


def test_branch_output_that_is_an_outer_tensor_keeps_its_identity():
    """then: t_out = Identity(a) with `a` from the outer graph. Removing it would rename the outer `a`."""
    then = helper.make_graph([helper.make_node("Identity", ["a"], ["t_out"])], "then", [], [vi("t_out", [2])])
    els = helper.make_graph([helper.make_node("Neg", ["a"], ["e_out"])], "else", [], [vi("e_out", [2])])
    proto = make_model([helper.make_node("Relu", ["x"], ["a"]),
                        helper.make_node("If", ["c"], ["b"], then_branch=then, else_branch=els),
                        helper.make_node("Add", ["a", "b"], ["y"])],
                       [vi("x", [2]), vi("c", [], TensorProto.BOOL)], [vi("y", [2])])
    out, stats = rewrite(proto, [remove_identity_rule()])
    assert stats.rules["remove-identity"].applied == 0
    assert "'t_out' is a graph output and its replacement 'a' cannot take its name" in reasons(stats, "remove-identity")
    assert [n.output[0] for n in out.graph.node][0] == "a"
    for c in (True, False):
        assert_same_outputs(proto, out, random_feeds(proto, c=np.array(c)))


def _loop_model() -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["acc_in"], ["i1"]),
         helper.make_node("Identity", ["w_outer"], ["w_id"]),  # reads an outer-scope tensor
         helper.make_node("Add", ["i1", "w_id"], ["s"]),
         helper.make_node("Mul", ["s", "one"], ["m"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["m"], ["acc_out"])],
        "body", [vi("iter", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc_in", [2, 3])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [2, 3])], [const("one", np.ones(3, np.float32))])
    return make_model([helper.make_node("Relu", ["x"], ["w_outer"]),
                       helper.make_node("Loop", ["trips", "cond0", "x"], ["y"], body=body)],
                      [vi("x", [2, 3])], [vi("y", [2, 3])],
                      [const("trips", np.array(3, np.int64)), const("cond0", np.array(True))])


def test_rules_apply_inside_a_loop_body_reading_an_outer_tensor():
    proto = _loop_model()
    out, stats = rewrite(proto, [remove_identity_rule(), mul_one_rule()])
    body = next(a.g for a in out.graph.node[-1].attribute if a.name == "body")
    # cond_out = Identity(cond_in) stays: a graph input cannot take a graph output's name
    assert sorted(ops(body)) == ["Add", "Identity"]
    assert [o.name for o in body.output] == ["cond_out", "acc_out"]
    add = next(n for n in body.node if n.op_type == "Add")
    assert list(add.input) == ["acc_in", "w_outer"] and list(add.output) == ["acc_out"]
    assert "cannot take its name" in reasons(stats, "remove-identity")
    assert ops(out.graph) == ["Relu", "Loop"]  # the outer producer read only by the body is kept, in order
    assert_same_outputs(proto, out, random_feeds(proto))


# --------------------------------------------------------------------------------------- blocking and names
def test_intermediate_used_outside_the_match_blocks_the_rewrite():
    relu = helper.make_node("Relu", ["mm"], ["r"])
    proto = _mm_add_model(("mm", "B"), [relu], [vi("r", [4, 5])])
    out, stats = rewrite(proto, [gemm_rule()])
    assert stats.rules["matmul-add-to-gemm"].applied == 0
    assert "intermediate 'mm' is also used by Relu" in reasons(stats, "matmul-add-to-gemm")
    assert sorted(ops(out.graph)) == ["Add", "MatMul", "Relu"]

    proto = _mm_add_model(("mm", "B"), [], [vi("mm", [4, 5])])
    out, stats = rewrite(proto, [gemm_rule()])
    assert "intermediate 'mm' is a graph output" in reasons(stats, "matmul-add-to-gemm")
    assert [o.name for o in out.graph.output] == ["y", "mm"]
    assert_same_outputs(proto, out, random_feeds(proto))


def test_graph_outputs_keep_their_names():
    proto = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Identity", ["r"], ["y"]),
                        helper.make_node("Neg", ["y"], ["z"]),
                        helper.make_node("Identity", ["x"], ["passthrough"])],
                       [vi("x", [2, 3])], [vi("y", [2, 3]), vi("z", [2, 3]), vi("passthrough", [2, 3])])
    out, stats = rewrite(proto, [remove_identity_rule()])
    assert [o.name for o in out.graph.output] == ["y", "z", "passthrough"]
    assert [i.name for i in out.graph.input] == ["x"]
    assert [(n.op_type, list(n.input), list(n.output)) for n in out.graph.node] == [
        ("Relu", ["x"], ["y"]), ("Neg", ["y"], ["z"]), ("Identity", ["x"], ["passthrough"])]
    assert "cannot take its name" in reasons(stats, "remove-identity")  # graph input -> graph output stays
    assert_same_outputs(proto, out, random_feeds(proto))


# --------------------------------------------------------------------------------------- fixpoint
def test_chain_of_50_identities_is_fully_removed():
    nodes = [helper.make_node("Relu", ["x"], ["t0"])]
    for i in range(50):
        nodes.append(helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}" if i < 49 else "y"], name=f"id{i}"))
    proto = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, stats = rewrite(proto, [remove_identity_rule()])
    assert ops(out.graph) == ["Relu"]
    assert stats.fixpoint and stats.rules["remove-identity"].applied == 50
    assert [o.name for o in out.graph.output] == ["y"]
    assert_same_outputs(proto, out, random_feeds(proto))


def test_rule_that_always_matches_stops_without_a_fixpoint(deadline):
    def pattern(op, x):
        return op.Relu(x)

    def replacement(op, x):
        return op.Relu(x)  # a new, equal node: matches again forever

    proto = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
                       [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, stats = rewrite(proto, [RewriteRule("relu-again", pattern, replacement)])
    assert stats.fixpoint is False
    assert stats.rules["relu-again"].applied > 1
    assert "without reaching a fixpoint" in stats.explain()
    assert ops(out.graph) == ["Relu", "Neg"]
    assert_same_outputs(proto, out, random_feeds(proto))


# --------------------------------------------------------------------------------------- inputs not mutated
@pytest.mark.parametrize("infer_shapes", [True, False])
def test_input_modelproto_is_not_mutated(infer_shapes):
    proto = _branch_model()
    rng = np.random.default_rng(4)
    proto.graph.initializer.append(const("W", rng.standard_normal((3, 3)).astype(np.float32)))
    proto.graph.node.extend([helper.make_node("Transpose", ["W"], ["wt"]),
                             helper.make_node("MatMul", ["y", "wt"], ["z"])])
    proto.graph.output.append(vi("z", [2, 3]))
    onnx.checker.check_model(proto, full_check=True)
    before = proto.SerializeToString()

    copy = ir.load_proto(proto)
    assert copy is not proto
    copy.graph.node.pop()
    copy.graph.initializer[0].float_data.append(1.0)

    model = ir.Model.from_proto(proto, infer_shapes=infer_shapes)
    stats = apply_rules(model, cleanup_rules())
    assert stats.applied >= 3
    model.to_proto()
    assert proto.SerializeToString() == before


def test_ruleset_rejects_duplicate_names():
    with pytest.raises(ValueError, match="duplicate rule names"):
        RuleSet([remove_identity_rule(), remove_identity_rule()])


def test_graph_index_readded_node_is_a_live_consumer():
    """A node removed and added back (or a new node that reuses a freed node's id) reads its inputs again."""
    x = gs.Variable("x", np.float32, [2])
    a = gs.Variable("a", np.float32, [2])
    y = gs.Variable("y", np.float32, [2])
    p = gs.Node("Relu", "p", inputs=[x], outputs=[a])
    c = gs.Node("Neg", "c", inputs=[a], outputs=[y])
    graph = gs.Graph(nodes=[p, c], inputs=[x], outputs=[y])
    index = GraphIndex(graph)
    index.remove_node(c)
    assert index.consumers(a) == []
    c.inputs.append(a)
    c.outputs.append(y)
    index.add_node(c)
    readers = index.consumers(a)
    assert len(readers) == 1 and readers[0] is c and index.has_consumers(a)
    assert index.remove_dead([p]) == []  # p's output is read by the re-added c
    index.commit()
    assert [n.name for n in graph.nodes] == ["p", "c"]


def test_attribute_default_is_matched_when_the_node_omits_it():
    """Softmax's axis defaults to -1 at opset 13+: a pattern asking for axis=-1 matches a node without it."""
    proto = make_model([helper.make_node("Softmax", ["a"], ["y"], name="sm")], [vi("a", [2, 3])], [vi("y", [2, 3])])

    def pattern(op, x):
        return op.Softmax(x, axis=-1)

    def replacement(op, x):
        return op.Softmax(x, axis=1)

    out, stats = rewrite(proto, [RewriteRule("explicit-axis", pattern, replacement)])
    assert stats.rules["explicit-axis"].applied == 1, stats.explain()
    assert out.graph.node[0].attribute[0].i == 1


def test_constant_mul_chain_folds_into_one_mul():
    from onnxcomp.rewrite.rules import fold_constant_mul_chain_rule

    c2 = np.linspace(0.5, 2.0, 6).astype(np.float32)
    proto = make_model([helper.make_node("Mul", ["x", "half"], ["h"], name="m1"),
                        helper.make_node("Mul", ["s", "h"], ["y"], name="m2")],
                       [vi("x", [2, 6])], [vi("y", [2, 6])], [const("half", np.float32(0.5)), const("s", c2)])
    out, stats = rewrite(proto, [fold_constant_mul_chain_rule()])
    assert stats.rules["fold-constant-mul-chain"].applied == 1
    assert [n.op_type for n in out.graph.node] == ["Mul"]
    feeds = random_feeds(proto)
    np.testing.assert_allclose(session(out).run(None, feeds)[0], session(proto).run(None, feeds)[0], rtol=1e-6)


# --------------------------------------------------------------------------------------- plan, then apply
def _three_matmuls() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [const(f"W{i}", rng.standard_normal((6, 6)).astype(np.float32)) for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["a"], name="mm0"),
             helper.make_node("MatMul", ["a", "W1"], ["b"], name="mm1"),
             helper.make_node("MatMul", ["b", "W2"], ["y"], name="mm2")]
    return make_model(nodes, [vi("x", [2, 6])], [vi("y", [2, 6])], inits)


def _scaled(op, x, w, decision):
    return op.MatMul(x, op.const(np.asarray(ir.const_value(w)) * np.float32(decision), name=f"{w.name}_scaled"))


def test_plan_rewrites_only_planned_nodes_with_their_own_decision():
    from onnxcomp.rewrite import Plan, query

    proto = _three_matmuls()
    model = ir.Model.from_proto(proto)
    mm = {n.name: n for n in model.graph.nodes}
    plan = Plan([(mm["mm0"], 2.0), (mm["mm2"], 0.5)])
    rule = RewriteRule("scale", lambda op, x, w: op.MatMul(x, w), _scaled)
    stats = apply_rules(model, [rule], plan=plan)
    assert stats.rules["scale"].applied == 2 and stats.unapplied == {}
    assert stats.rules["scale"].tried == 2  # unplanned roots are not even tried
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    src = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(w["W0_scaled"], src["W0"] * np.float32(2.0))
    np.testing.assert_array_equal(w["W2_scaled"], src["W2"] * np.float32(0.5))
    np.testing.assert_array_equal(w["W1"], src["W1"])  # mm1 had no decision: untouched
    feeds = random_feeds(proto)
    np.testing.assert_allclose(run(out, feeds)["y"], run(proto, feeds)["y"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="two decisions"):
        plan.add(mm["mm0"], 3.0)
    with pytest.raises(ValueError, match="queries"):
        apply_rules(model, [query("q", lambda op, x, w: op.MatMul(x, w))], plan=plan)


def test_plan_reports_planned_nodes_the_engine_refused_with_the_reason():
    from onnxcomp.rewrite import Plan

    model = ir.Model.from_proto(_three_matmuls())
    mm = {n.name: n for n in model.graph.nodes}
    def check(ctx, x, w, decision):
        return fail("decision too large") if decision > 1 else True
    rule = RewriteRule("scale", lambda op, x, w: op.MatMul(x, w), _scaled, check)
    stats = apply_rules(model, [rule], plan=Plan([(mm["mm0"], 2.0), (mm["mm1"], 0.5)]))
    assert stats.rules["scale"].applied == 1
    assert stats.unapplied == {"mm0": "check failed: decision too large"}


def test_plan_anchored_at_a_bound_node_that_is_not_the_root():
    from onnxcomp.rewrite import Plan

    proto = _mm_add_model(("mm", "B"))
    model = ir.Model.from_proto(proto)
    mm = next(n for n in model.graph.nodes if n.op == "MatMul")

    def pattern(op, x, w, b):
        return op.Add(op.MatMul(x, w, _bind="mm"), b)

    def replacement(op, x, w, b, mm, decision):
        return op.Gemm(x, w, b, alpha=float(decision))

    stats = apply_rules(model, [RewriteRule("to-gemm", pattern, replacement)], plan=Plan([(mm, 1.0)], anchor="mm"))
    assert stats.rules["to-gemm"].applied == 1 and stats.unapplied == {}
    out = model.to_proto()
    assert ops(out.graph) == ["Gemm"]
    feeds = random_feeds(proto)
    np.testing.assert_allclose(run(out, feeds)["y"], run(proto, feeds)["y"], rtol=1e-5, atol=1e-5)
    # the same rule with an empty plan leaves the graph as it was, and says nothing is planned
    model = ir.Model.from_proto(proto)
    stats = apply_rules(model, [RewriteRule("to-gemm", pattern, replacement)], plan=Plan(anchor="mm"))
    assert stats.applied == 0 and stats.unapplied == {}
    assert signature(model.to_proto()) == signature(proto)
