"""Property tests (hypothesis): random small graphs of the ops cleanup rewrites; cleanup keeps their outputs,
a second run changes nothing, every result passes the full checker and leaves no dangling tensor."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import onnxcomp  # noqa: E402
from onnxcomp import testing  # noqa: E402

D = 4  # every value is [2, D] float32, so any op can read any earlier value
UNARY = ["Relu", "Identity", "Neg", "Abs", "Sigmoid", "Tanh"]
BINARY = ["Add", "Mul", "Sub"]
KINDS = UNARY + BINARY + ["MatMul", "TransposePair", "Reshape", "Cast", "DupConst", "Dead"]


@st.composite
def graphs(draw) -> onnx.ModelProto:
    """A random DAG over [2, D] values: unary/binary ops, MatMul by a constant, Transpose pairs (foldable),
    no-op Reshape and Cast, duplicated constants (dedupe), dead branches; one or two graph outputs."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    nodes, inits, values = [], [], ["x"]
    const_pool: list[np.ndarray] = []

    def const(shape) -> str:
        if const_pool and draw(st.booleans()):  # the same values under another name: dedupe finds it
            v = const_pool[draw(st.integers(0, len(const_pool) - 1))]
            if v.shape != tuple(shape):
                v = rng.standard_normal(shape).astype(np.float32)
        else:
            v = rng.standard_normal(shape).astype(np.float32)
            const_pool.append(v)
        name = f"c{len(inits)}"
        inits.append(numpy_helper.from_array(v, name))
        return name

    for i in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(KINDS))
        a = values[draw(st.integers(0, len(values) - 1))]
        out = f"v{i}"
        if kind in UNARY:
            nodes.append(helper.make_node(kind, [a], [out], name=f"n{i}"))
        elif kind in BINARY:
            b = values[draw(st.integers(0, len(values) - 1))] if draw(st.booleans()) else const([2, D])
            nodes.append(helper.make_node(kind, [a, b], [out], name=f"n{i}"))
        elif kind == "MatMul":
            nodes.append(helper.make_node("MatMul", [a, const([D, D])], [out], name=f"n{i}"))
        elif kind == "TransposePair":
            nodes.append(helper.make_node("Transpose", [a], [out + "t"], perm=[1, 0], name=f"n{i}a"))
            nodes.append(helper.make_node("Transpose", [out + "t"], [out], perm=[1, 0], name=f"n{i}b"))
        elif kind == "Reshape":
            shape = f"s{i}"
            inits.append(numpy_helper.from_array(np.array([2, D], np.int64), shape))
            nodes.append(helper.make_node("Reshape", [a, shape], [out], name=f"n{i}"))
        elif kind == "Cast":
            nodes.append(helper.make_node("Cast", [a], [out], to=TensorProto.FLOAT, name=f"n{i}"))
        elif kind == "DupConst":
            nodes.append(helper.make_node("Add", [a, const([2, D])], [out], name=f"n{i}"))
        else:  # Dead: a node nobody reads (not added to `values`)
            nodes.append(helper.make_node("Relu", [a], [f"dead{i}"], name=f"n{i}"))
            continue
        values.append(out)
    outs = [values[-1]]
    if len(values) > 2 and draw(st.booleans()):
        extra = values[draw(st.integers(1, len(values) - 2))]
        if extra not in outs:
            outs.append(extra)
    g = helper.make_graph(nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, D])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, D]) for o in outs],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _cleanup(m: onnx.ModelProto) -> onnx.ModelProto:
    return onnxcomp.compress(m, [{"type": "cleanup"}], progress=False, validate=False).model


def _run(m: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return testing.session(m).run(None, {"x": x})


def _dangling(m: onnx.ModelProto) -> list[str]:
    g = m.graph
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    missing = sorted(i for i in read if i and i not in known)
    unused = sorted(t.name for t in g.initializer if t.name not in read)
    return missing + unused


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
          database=None)
@given(graphs())
def test_cleanup_keeps_outputs_is_idempotent_and_valid(model):
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, D)).astype(np.float32)
    want = _run(model, x)
    once = _cleanup(model)
    onnx.checker.check_model(once, full_check=True)
    assert not _dangling(once), _dangling(once)
    assert [o.name for o in once.graph.output] == [o.name for o in model.graph.output]
    for w, g in zip(want, _run(once, x)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    twice = _cleanup(once)
    assert [(n.op_type, list(n.input), list(n.output)) for n in twice.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in once.graph.node]
    assert sorted(t.name for t in twice.graph.initializer) == sorted(t.name for t in once.graph.initializer)
    assert len(once.graph.node) <= len(model.graph.node)
    assert not any(o.startswith("dead") for n in once.graph.node for o in n.output)  # dead branches removed
    # no-ops folded, except on a path that only moves the graph input to a graph output (the output keeps its
    # name, so something must produce it)
    exempt = _moves_input_to_output(once)
    assert not [n.op_type for n in once.graph.node
                if n.op_type in ("Identity", "Transpose", "Cast") and n.name not in exempt], \
        onnx.helper.printable_graph(once.graph)


def _moves_input_to_output(m: onnx.ModelProto) -> set[str]:
    """Names of the nodes on a chain of data-movement ops from graph input x to a graph output."""
    producer = {o: n for n in m.graph.node for o in n.output}
    exempt: set[str] = set()
    for o in m.graph.output:
        chain, t = [], o.name
        while t in producer and producer[t].op_type in ("Identity", "Transpose", "Cast", "Reshape"):
            chain.append(producer[t].name)
            t = producer[t].input[0]
        if t == "x":
            exempt.update(chain)
    return exempt
