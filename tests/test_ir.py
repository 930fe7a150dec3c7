"""onnxcomp.ir: safe load/save (atomic writes, external data, clear errors) and the graph helpers."""
from __future__ import annotations

import inspect
import os
import random
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import ir
from onnxcomp.errors import InvalidModelError, SaveError  # an OSError while saving is a SaveError
from onnxcomp.rewrite import GraphIndex
from onnxcomp.testing import digits_mlp_path, session

F = TensorProto.FLOAT


def vi(name: str, shape, dtype: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def small_model(big: bool = False) -> onnx.ModelProto:
    """y = Relu(x @ W + b) with W 64x64 (16 KiB: stored externally) when big, 4x4 otherwise."""
    n = 64 if big else 4
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
                           helper.make_node("Relu", ["a"], ["y"])], "g", [vi("x", [2, n])], [vi("y", [2, n])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    m.ir_version = 8
    return m


def listing(d) -> list[str]:
    return sorted(os.listdir(d))


def initializers(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


# --------------------------------------------------------------------------------------- load / save
def test_save_load_round_trip(tmp_path):
    m = small_model()
    p = ir.save_proto(m, tmp_path / "sub" / "m.onnx")
    assert p == tmp_path / "sub" / "m.onnx"
    assert listing(tmp_path / "sub") == ["m.onnx"]  # no temp files left behind
    back = ir.load_proto(p)
    assert back.SerializeToString() == m.SerializeToString()
    back_bytes = ir.load_proto(p.read_bytes())
    assert back_bytes.SerializeToString() == m.SerializeToString()
    assert ir.load_proto(str(p)).SerializeToString() == m.SerializeToString()


def test_saved_files_get_the_usual_mode(tmp_path):
    """Files are created with the mode open() gives (0666 & ~umask), not mkstemp's or onnx's 0600."""
    mask = os.umask(0o022)
    try:
        ir.save_proto(small_model(), tmp_path / "inline.onnx")
        ir.save_proto(small_model(big=True), tmp_path / "ext.onnx", external_data=True)
    finally:
        os.umask(mask)
    for f in ("inline.onnx", "ext.onnx", "ext.onnx.data"):
        assert oct((tmp_path / f).stat().st_mode & 0o777) == oct(0o644), f


def test_save_replaces_an_existing_file(tmp_path):
    p = tmp_path / "m.onnx"
    ir.save_proto(small_model(), p)
    bigger = small_model(big=True)
    ir.save_proto(bigger, p)
    assert ir.load_proto(p).SerializeToString() == bigger.SerializeToString()
    assert listing(tmp_path) == ["m.onnx"]


def test_failed_save_keeps_the_old_file_and_leaves_no_temp_files(tmp_path, monkeypatch):
    p = tmp_path / "m.onnx"
    ir.save_proto(small_model(), p)
    old = p.read_bytes()

    def refuse(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(SaveError, match="No space left"):
        ir.save_proto(small_model(big=True), p)
    monkeypatch.undo()
    assert p.read_bytes() == old
    assert listing(tmp_path) == ["m.onnx"]


def test_failed_external_data_save_leaves_no_temp_files(tmp_path, monkeypatch):
    def refuse(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(SaveError):
        ir.save_proto(small_model(big=True), tmp_path / "m.onnx", external_data=True)
    monkeypatch.undo()
    assert listing(tmp_path) == []


def test_failed_external_data_save_keeps_the_old_model_and_its_data(tmp_path, monkeypatch):
    """The data file is moved in first; if moving the model then fails, the old model must not be left
    reading the new model's weights (same file name, same offsets, different values)."""
    p = tmp_path / "m.onnx"
    old = small_model(big=True)
    ir.save_proto(old, p, external_data=True)
    before = {f: (tmp_path / f).read_bytes() for f in listing(tmp_path)}
    new = small_model(big=True)
    new.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((64, 64), np.float32), "W"))
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(SaveError, match="I/O error"):
        ir.save_proto(new, p, external_data=True)
    monkeypatch.undo()
    assert {f: (tmp_path / f).read_bytes() for f in listing(tmp_path)} == before
    got = initializers(ir.load_proto(p))
    np.testing.assert_array_equal(got["W"], initializers(old)["W"])


def test_external_data_round_trip(tmp_path):
    m = small_model(big=True)
    p = ir.save_proto(m, tmp_path / "m.onnx", external_data=True)
    assert listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    raw = onnx.load(str(p), load_external_data=False)
    w = next(t for t in raw.graph.initializer if t.name == "W")
    assert w.data_location == TensorProto.EXTERNAL  # really stored outside
    assert os.path.getsize(tmp_path / "m.onnx") < 4096
    back = ir.load_proto(p)
    got, want = initializers(back), initializers(m)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])
    assert all(t.data_location != TensorProto.EXTERNAL for t in back.graph.initializer)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(session(back).run(None, {"x": x})[0], session(m).run(None, {"x": x})[0])
    # saving again over it (inline this time) works and leaves only the model file that matters
    ir.save_proto(back, p, external_data=False)
    assert ir.load_proto(p).SerializeToString() == back.SerializeToString()


def test_missing_external_data_names_tensor_and_file(tmp_path):
    p = ir.save_proto(small_model(big=True), tmp_path / "m.onnx", external_data=True)
    os.remove(tmp_path / "m.onnx.data")
    with pytest.raises(InvalidModelError) as e:
        ir.load_proto(p)
    msg = str(e.value)
    assert "'W'" in msg and "m.onnx.data" in msg and "not found" in msg


def test_truncated_external_data_is_reported(tmp_path):
    p = ir.save_proto(small_model(big=True), tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InvalidModelError, match=r"too short for tensor 'W'.*truncated"):
        ir.load_proto(p)


def test_truncated_model_file(tmp_path):
    data = digits_mlp_path().read_bytes()
    p = tmp_path / "half.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError, match="truncated"):
        ir.load_proto(p)
    with pytest.raises(InvalidModelError):
        ir.load_proto(data[: len(data) // 2])


PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"


@pytest.mark.parametrize("content", [b"hello, this is a text file\n", PNG_HEADER, b"", b'{"ir_version": 8}'],
                         ids=["text", "png", "empty", "json"])
def test_non_onnx_file(tmp_path, content):
    p = tmp_path / "not_a_model.onnx"
    p.write_bytes(content)
    with pytest.raises(InvalidModelError, match="not_a_model.onnx"):
        ir.load_proto(p)


def test_protobuf_that_is_not_a_model(tmp_path):
    """Bytes that parse as a ModelProto but carry no graph/opset."""
    p = tmp_path / "m.onnx"
    p.write_bytes(onnx.ModelProto(producer_name="x", ir_version=8).SerializeToString())
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        ir.load_proto(p)
    with pytest.raises(InvalidModelError):  # another message type: either undecodable or not a model
        ir.load_proto(numpy_helper.from_array(np.zeros(3, np.float32), "t").SerializeToString())
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        ir.load_proto(onnx.ModelProto())


def test_directory_and_nonexistent_paths(tmp_path):
    with pytest.raises(InvalidModelError, match="directory"):
        ir.load_proto(tmp_path)
    with pytest.raises(InvalidModelError, match="not found"):
        ir.load_proto(tmp_path / "nope.onnx")


def test_load_proto_returns_a_private_copy():
    m = small_model()
    before = m.SerializeToString()
    c = ir.load_proto(m)
    c.graph.node.pop()
    c.graph.initializer[0].float_data.append(3.0)
    assert m.SerializeToString() == before


def test_check_proto_names_the_problem():
    m = small_model()
    m.graph.node[0].input[1] = "missing"
    with pytest.raises(InvalidModelError, match="my model fails onnx.checker"):
        ir.check_proto(m, what="my model")
    ir.check_proto(small_model())


def test_model_round_trip_keeps_model_fields():
    m = small_model()
    m.doc_string = "doc"
    m.model_version = 7
    helper.set_model_props(m, {"k": "v"})
    out = ir.Model.from_proto(m).to_proto()
    assert (out.ir_version, out.producer_name, out.doc_string, out.model_version) == (8, "test", "doc", 7)
    assert [(p.key, p.value) for p in out.metadata_props] == [("k", "v")]
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 17)]
    onnx.checker.check_model(out, full_check=True)


# --------------------------------------------------------------------------------------- toposort
def _chain(n: int) -> tuple[gs.Graph, list[gs.Node]]:
    x = gs.Variable("x", np.float32, [1])
    prev = x
    nodes = []
    for i in range(n):
        out = gs.Variable(f"t{i}", np.float32, [1])
        nodes.append(gs.Node("Relu", f"n{i}", inputs=[prev], outputs=[out]))
        prev = out
    return gs.Graph(nodes=list(nodes), inputs=[x], outputs=[prev]), nodes


def test_toposort_shuffled_10k_chain_iteratively():
    graph, nodes = _chain(10_000)
    shuffled = list(nodes)
    random.Random(0).shuffle(shuffled)
    graph.nodes = shuffled
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(200, len(inspect.stack()) + 100))  # a recursive sort would overflow
    try:
        ir.toposort(graph)
    finally:
        sys.setrecursionlimit(limit)
    assert [n.name for n in graph.nodes] == [f"n{i}" for i in range(10_000)]


def test_toposort_is_stable_and_orders_subgraph_captures():
    """A node whose subgraph reads an outer tensor must come after that tensor's producer."""
    x = gs.Variable("x", np.float32, [2])
    c = gs.Variable("c", np.bool_, [])
    a = gs.Variable("a", np.float32, [2])
    y = gs.Variable("y", np.float32, [2])
    t_out = gs.Variable("t_out", np.float32, [2])
    e_out = gs.Variable("e_out", np.float32, [2])
    then = gs.Graph(nodes=[gs.Node("Neg", inputs=[a], outputs=[t_out])], outputs=[t_out])
    els = gs.Graph(nodes=[gs.Node("Abs", inputs=[a], outputs=[e_out])], outputs=[e_out])
    if_node = gs.Node("If", "if", attrs={"then_branch": then, "else_branch": els}, inputs=[c], outputs=[y])
    producer = gs.Node("Relu", "relu", inputs=[x], outputs=[a])
    z = gs.Variable("z", np.float32, [2])
    independent = gs.Node("Sigmoid", "sig", inputs=[x], outputs=[z])
    graph = gs.Graph(nodes=[if_node, independent, producer], inputs=[x, c], outputs=[y, z])
    ir.toposort(graph)
    assert [n.name for n in graph.nodes] == ["sig", "relu", "if"]


def test_toposort_reports_a_cycle():
    a, b = gs.Variable("a", np.float32, [1]), gs.Variable("b", np.float32, [1])
    n1 = gs.Node("Relu", "n1", inputs=[b], outputs=[a])
    n2 = gs.Node("Relu", "n2", inputs=[a], outputs=[b])
    with pytest.raises(InvalidModelError, match="cycle"):
        ir.toposort(gs.Graph(nodes=[n1, n2], outputs=[b]))


# --------------------------------------------------------------------------------------- GraphIndex
def _fanout(k: int):
    x = gs.Variable("x", np.float32, [2])
    old = gs.Variable("old", np.float32, [2])
    src = gs.Node("Relu", "src", inputs=[x], outputs=[old])
    readers = [gs.Node("Neg", f"r{i}", inputs=[old], outputs=[gs.Variable(f"o{i}", np.float32, [2])]) for i in range(k)]
    twice = gs.Node("Add", "twice", inputs=[old, old], outputs=[gs.Variable("tw", np.float32, [2])])
    outs = [r.outputs[0] for r in readers] + [twice.outputs[0], old]
    graph = gs.Graph(nodes=[src, *readers, twice], inputs=[x], outputs=outs)
    return graph, src, readers, twice


def test_replace_all_uses_with_5k_consumers():
    graph, src, readers, twice = _fanout(5000)
    new = gs.Variable("new", np.float32, [2])
    gs.Node("Abs", "new_src", inputs=[graph.inputs[0]], outputs=[new])
    index = GraphIndex(graph)
    index.replace_all_uses(src.outputs[0], new)
    old = src.outputs[0]
    assert len(old.outputs) == 0 and index.consumers(old) == []
    assert all(r.inputs[0] is new for r in readers)
    assert twice.inputs[0] is new and twice.inputs[1] is new
    assert len(new.outputs) == 5000 + 2  # `twice` reads it twice
    assert len({id(n) for n in new.outputs}) == 5001
    assert graph.outputs[-1] is new and index.is_graph_output(new) and not index.is_graph_output(old)


def test_remove_many_consumers_then_replace_and_commit():
    graph, src, readers, twice = _fanout(5000)
    old = src.outputs[0]
    gone = readers[::2]
    graph.outputs = [old]  # the removed readers' outputs are no longer graph outputs
    index = GraphIndex(graph)
    for r in gone:
        index.remove_node(r)
    kept = readers[1::2]
    assert {id(n) for n in index.consumers(old)} == {id(n) for n in kept} | {id(twice)}
    new = gs.Variable("new", np.float32, [2])
    index.replace_all_uses(old, new)
    assert {id(n) for n in new.outputs} == {id(n) for n in kept} | {id(twice)}
    assert all(r.inputs[0] is new for r in kept)
    assert all(len(r.inputs) == 0 for r in gone)
    index.commit()
    assert len(graph.nodes) == 1 + len(kept) + 1
    assert graph.nodes[0] is src


def test_remove_dead_walks_producers_and_keeps_graph_outputs():
    x = gs.Variable("x", np.float32, [2])
    t = [gs.Variable(f"t{i}", np.float32, [2]) for i in range(4)]
    n0 = gs.Node("Relu", "n0", inputs=[x], outputs=[t[0]])
    n1 = gs.Node("Neg", "n1", inputs=[t[0]], outputs=[t[1]])
    n2 = gs.Node("Abs", "n2", inputs=[t[1]], outputs=[t[2]])  # dead chain n1 -> n2
    n3 = gs.Node("Exp", "n3", inputs=[t[0]], outputs=[t[3]])  # graph output
    graph = gs.Graph(nodes=[n0, n1, n2, n3], inputs=[x], outputs=[t[3]])
    index = GraphIndex(graph)
    removed = index.remove_dead([n2])
    assert [n.name for n in removed] == ["n2", "n1"]
    index.commit()
    assert [n.name for n in graph.nodes] == ["n0", "n3"]


def test_fresh_names_avoid_initializer_and_tensor_names():
    m = ir.Model.from_proto(small_model())
    index = GraphIndex(m.graph)
    assert index.fresh_name("W") != "W"  # an initializer
    assert index.fresh_name("m") != "m"  # a node output
    assert index.fresh_name("x") != "x"  # a graph input
    a, b = index.fresh_name("new"), index.fresh_name("new")
    assert a == "new" and b != a
