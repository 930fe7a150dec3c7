"""How weights are stored in the file: dense initializers, or sparse where that is really smaller.

ONNX has two sparse forms. A `sparse_initializer` fails onnx.checker's full check as soon as a dense op reads
it (shape inference types it as a sparse tensor), so onnxcomp writes sparse weights as a
``Constant(sparse_value=...)`` node instead: the checker and ONNX Runtime both read that as a dense tensor, and
ORT folds it into a dense initializer at session load (no cost per run). The checker only accepts int64 indices,
so a float32 weight is smaller sparse only below 1/3 density (4 + 8 bytes per kept value vs 4 per element) and an
int8 one practically never; :func:`sparse_storage` converts only the tensors it really shrinks.

Passes work on dense weights: :func:`densify` turns both sparse forms back into initializers (model import).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

#: bytes per stored index (the checker requires int64 indices)
_INDEX_BYTES = 8
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE)


@dataclass
class StorageStats:
    """What :func:`sparse_storage` converted: tensor name -> (dense bytes, sparse bytes)."""

    converted: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def bytes_saved(self) -> int:
        return sum(d - s for d, s in self.converted.values())


def sparse_value(t: onnx.SparseTensorProto) -> np.ndarray:
    """The dense value of a SparseTensorProto (1-D linear or [nnz, rank] indices)."""
    vals = numpy_helper.to_array(t.values)
    idx = numpy_helper.to_array(t.indices).astype(np.int64)
    dims = tuple(int(d) for d in t.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=vals.dtype)
    flat = idx if idx.ndim == 1 else np.ravel_multi_index(tuple(idx.T), dims)
    dense[flat] = vals.reshape(-1)
    return dense.reshape(dims)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


def densify(model: onnx.ModelProto) -> int:
    """In place: sparse initializers and Constant(sparse_value) nodes become dense initializers; returns how many."""
    n = 0
    for g in _graphs(model.graph):
        for sp in list(g.sparse_initializer):
            g.initializer.append(numpy_helper.from_array(sparse_value(sp), sp.values.name))
            n += 1
        g.ClearField("sparse_initializer")
        keep = []
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1 \
                    and node.attribute[0].name == "sparse_value":
                g.initializer.append(numpy_helper.from_array(sparse_value(node.attribute[0].sparse_tensor),
                                                             node.output[0]))
                n += 1
            else:
                keep.append(node)
        if len(keep) != len(g.node):
            del g.node[:]
            g.node.extend(keep)
    return n


def sparse_bytes(nnz: int, itemsize: int) -> int:
    """Stored size of a sparse tensor's values and int64 indices (protobuf framing left out)."""
    return nnz * (itemsize + _INDEX_BYTES)


def sparse_storage(model: onnx.ModelProto, names: set[str] | None = None, min_saving: float = 0.1,
                   read: Callable[[onnx.TensorProto], onnx.TensorProto] = lambda t: t) -> StorageStats:
    """In place: every float initializer (among `names`, default all) that is at least `min_saving` smaller as a
    Constant(sparse_value) node is stored that way; graph inputs with defaults are left alone. `read` gives a
    tensor with its data (`ir.tensor_in_memory` for one in onnxcomp's store); external data is left as it is."""
    stats = StorageStats()
    for g in _graphs(model.graph):
        inputs = {i.name for i in g.input}
        keep, consts = [], []
        for t in g.initializer:
            if (names is not None and t.name not in names) or t.name in inputs or t.data_type not in _FLOAT_TYPES:
                keep.append(t)
                continue
            loaded = read(t)
            if loaded.data_location == onnx.TensorProto.EXTERNAL:
                keep.append(t)
                continue
            v = numpy_helper.to_array(loaded)
            flat = v.reshape(-1)
            idx = np.flatnonzero(flat)
            dense = v.nbytes
            sparse = sparse_bytes(idx.size, v.dtype.itemsize)
            if v.size == 0 or sparse > (1.0 - min_saving) * dense:
                keep.append(t)
                continue
            sp = onnx.helper.make_sparse_tensor(numpy_helper.from_array(flat[idx], t.name),
                                                numpy_helper.from_array(idx.astype(np.int64), f"{t.name}_indices"),
                                                list(v.shape))
            consts.append(onnx.helper.make_node("Constant", [], [t.name], name=f"{t.name}_sparse", sparse_value=sp))
            stats.converted[t.name] = (dense, sparse)
        if consts:
            del g.initializer[:]
            g.initializer.extend(keep)
            nodes = list(g.node)
            del g.node[:]
            g.node.extend(consts + nodes)
    return stats


def compressed_size(chunks: Iterable[bytes], level: int = 6) -> int:
    """Size after zlib/gzip compression of a serialized model given as byte chunks (`ir.serialized_chunks`: part
    by part over 2 GB): what zeros are worth on disk or on the wire."""
    z, n = zlib.compressobj(level), 0
    for chunk in chunks:
        n += len(z.compress(chunk))
    return n + len(z.flush())
