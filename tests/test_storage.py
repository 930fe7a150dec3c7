"""onnxcomp.storage: sparse weights stored as Constant(sparse_value) only where smaller, read back identically."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxcomp import ir, storage

from tests.graphs import make_model, vi


def _model(density: float, dtype=np.float32, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((96, 40)).astype(dtype)
    w[rng.random(w.shape) > density] = 0
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [2, 96], helper.np_dtype_to_tensor_dtype(w.dtype))],
                   [vi("y", [2, 40], helper.np_dtype_to_tensor_dtype(w.dtype))], [numpy_helper.from_array(w, "W")])
    return m, w


def test_sparse_storage_only_where_smaller_and_roundtrips_exactly():
    dense_m, w = _model(0.5)
    assert not storage.sparse_storage(dense_m).converted  # 50% of float32 with int64 indices is bigger
    m, w = _model(0.2)
    before = m.ByteSize()
    stats = storage.sparse_storage(m)
    assert list(stats.converted) == ["W"] and m.ByteSize() < 0.75 * before
    onnx.checker.check_model(m, full_check=True)
    assert [n.op_type for n in m.graph.node] == ["Constant", "MatMul"] and not m.graph.initializer
    x = np.random.default_rng(1).standard_normal((2, 96)).astype(np.float32)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0],
                                  ort.InferenceSession(_model(0.2)[0].SerializeToString(),
                                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    # import densifies: passes see the identical dense weight
    model = ir.Model.from_proto(m)
    (node,) = [n for n in model.graph.nodes]
    np.testing.assert_array_equal(ir.const_value(node.inputs[1]), w)
    assert storage.densify(m) == 1 and not any(n.op_type == "Constant" for n in m.graph.node)
    np.testing.assert_array_equal(numpy_helper.to_array(m.graph.initializer[0]), w)


def test_compressed_size_sees_zeros_and_non_float_weights_stay_dense():
    m, _ = _model(0.2)
    dense, _ = _model(1.0)
    assert storage.compressed_size(ir.serialized_chunks(m)) < 0.6 * storage.compressed_size(ir.serialized_chunks(dense))
    q = onnx.ModelProto()
    q.CopyFrom(m)
    q.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((96, 40), np.int8), "W"))
    assert not storage.sparse_storage(q, min_saving=0.0).converted  # int8: 1 + 8 bytes a value never pays


def test_summary_counts_sparse_weights_at_their_stored_size():
    from onnxcomp.summary import summarize

    m, w = _model(0.2)
    dense = summarize(m)
    storage.sparse_storage(m)
    sparse = summarize(m)
    assert sparse["parameters"] == dense["parameters"] == w.size
    nnz = int(np.count_nonzero(w))
    assert sparse["parameter_bytes"] == nnz * (4 + 8) < dense["parameter_bytes"]
