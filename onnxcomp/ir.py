"""Graph IR: load/save ModelProtos safely and index onnx-graphsurgeon graphs for O(1) edits.

onnx-graphsurgeon (gs) is the plain IR. Its slow paths on big graphs are worked around here:
- gs.Node defines ``__eq__`` field-by-field (with a log call), so ``list.remove(node)`` and ``node in list``
  are O(n) comparisons each; we remove by identity and keep node sets keyed by ``id``.
- gs's SynchronizedList removes one consumer at a time (O(k) each, O(k^2) to rewire k consumers);
  ``replace_all_uses`` rewires all consumers of a tensor in one O(k) sweep.
- gs's toposort is replaced by an iterative Kahn sort that understands subgraph (If/Loop/Scan) captures.
- gs's logger formats a message per imported node even when silent; we raise its severity.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import heapq
import itertools
import math
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import InvalidModelError, UnsupportedModelError

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

TWO_GB = 2**31 - 1
ModelLike = Union[onnx.ModelProto, str, os.PathLike, bytes]


# --------------------------------------------------------------------------- load / check / save
def load_proto(src: ModelLike, load_external_data: bool = True, copy: bool = True) -> onnx.ModelProto:
    """Return a private copy of the model; the caller's ModelProto or file is never modified. `copy=False`: a
    ModelProto is checked and returned as it is (for readers that never modify it)."""
    if isinstance(src, onnx.ModelProto):
        out = src
        if copy:
            out = onnx.ModelProto()
            out.CopyFrom(src)
        _require_onnx(out, "<ModelProto>")
        unresolved = [t.name for t in external_tensors(out)]
        if unresolved:
            raise InvalidModelError(
                f"<ModelProto>: tensor '{unresolved[0]}' (and {len(unresolved) - 1} more) points at external data "
                "that was not loaded; pass the model's path instead, or onnx.load it with load_external_data=True"
            )
        return out
    if isinstance(src, (bytes, bytearray)):
        return _parse_bytes(bytes(src), "<bytes>")
    path = Path(os.fspath(src))
    if not path.exists():
        raise InvalidModelError(f"model file not found: {path}")
    if path.is_dir():
        raise InvalidModelError(f"expected an .onnx file, got a directory: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidModelError(f"cannot read model file {path}: {e.strerror or e}") from None
    model = _parse_bytes(data, str(path))
    if load_external_data:
        _load_external(model, path.parent, str(path))
    return model


def _parse_bytes(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError(f"{where}: file is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidModelError(
            f"{where}: not a readable ONNX model (protobuf decode failed: {e}); "
            "the file may be truncated or not an .onnx file"
        ) from None
    _require_onnx(model, where)
    return model


def _require_onnx(model: onnx.ModelProto, where: str) -> None:
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise InvalidModelError(
            f"{where}: not an ONNX model (missing ir_version, graph or opset_import); "
            "the file may be truncated or of another format"
        )


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and Constant-node tensors stored as external data (in the model and its subgraphs), other
    than those onnxcomp keeps in its tensor store (`spill`): data that is not loaded."""
    for g in iter_graph_protos(model.graph):
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL and _stored(t) is None:
                yield t
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL \
                        and _stored(a.t) is None:
                    yield a.t


def _load_external(model: onnx.ModelProto, base: Path, where: str) -> None:
    tensors = list(external_tensors(model))
    if not tensors:
        return
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        full = (base / loc).resolve()
        if loc and base.resolve() not in full.parents:
            raise InvalidModelError(
                f"{where}: external data location '{loc}' of tensor '{t.name}' points outside the model's folder"
            )
        if not loc or not full.is_file():
            raise InvalidModelError(
                f"{where}: external data file '{loc}' for tensor '{t.name}' not found next to the model (in {base})"
            )
        length = int(info.get("length", -1)) if "length" in info else None
        offset = int(info.get("offset", 0))
        if length is not None and offset + length > full.stat().st_size:
            raise InvalidModelError(
                f"{where}: external data file '{loc}' is too short for tensor '{t.name}' "
                f"(needs bytes {offset}..{offset + length}, file has {full.stat().st_size}); truncated?"
            )
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise InvalidModelError(f"{where}: cannot load external data: {e}") from None


def iter_graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Yield a GraphProto and every subgraph (If/Loop/Scan bodies) under it, iteratively."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(a.graphs)


# --------------------------------------------------------------------------- models over 2 GB
#: a model whose tensors hold this many bytes or more is "big": protobuf cannot serialize it as one message, so
#: it is checked, shape-inferred, hashed and written part by part (never ByteSize()/SerializeToString() whole)
BIG_BYTES = TWO_GB - 64 * 2**20
#: tensors this large move to external data in a skeleton (small ones stay inline: shape inference reads them)
SKELETON_MIN_BYTES = 64 * 2**10
#: external data offsets are aligned to this (ONNX Runtime maps aligned external data instead of copying it)
EXTERNAL_ALIGN = 4096


_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
#: bits per element by data type, filled as types are met (the dtype lookup is slow per tensor)
_ITEM_BITS: dict[int, int] = {}


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and dtype for raw data (no copy), else its encoded size; for a
    tensor in the store its length, for other external data 0 (not loaded)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        st = _stored(t)
        return 0 if st is None else st[2]
    if t.HasField("raw_data") and t.data_type not in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        bits = _ITEM_BITS.get(t.data_type)
        if bits is None:
            bits = _BITS.get(t.data_type) or 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            _ITEM_BITS[t.data_type] = bits
        return (math.prod(t.dims) * bits + 7) // 8
    return t.ByteSize()


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer and Constant-node tensor of the model and its subgraphs (one walk over the nodes)."""
    stack = [model.graph]
    while stack:
        g = stack.pop()
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(a.graphs)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all tensor data held in the proto (external data not loaded counts 0); copies nothing."""
    return sum(_tensor_nbytes(t) for t in _tensors(model))


def is_big(model: onnx.ModelProto) -> bool:
    """True when the model cannot be serialized as one protobuf message (its tensors are near 2 GB); stops
    counting at the limit."""
    total = 0
    for t in _tensors(model):
        if _stored(t) is not None:
            return True  # a model with weights in the store takes the part-by-part paths, whatever its size
        total += _tensor_nbytes(t)
        if total >= BIG_BYTES:
            return True
    return False


def skeleton(model: onnx.ModelProto, data_name: str = "data.bin", min_bytes: Optional[int] = None,
             keep_stored: bool = False) -> tuple[onnx.ModelProto, list[tuple[int, onnx.TensorProto]]]:
    """The model with each tensor of >= `min_bytes` replaced by a reference into external file `data_name`
    (aligned offsets), and those tensors as (offset, original tensor); `model` is not modified and no tensor
    data is copied. The skeleton is small: it can be serialized, checked and shape-inferred. `min_bytes`
    defaults to SKELETON_MIN_BYTES. Tensors in the store move too (their data is read from it when written),
    unless `keep_stored`: then they stay references into the store."""
    min_bytes = SKELETON_MIN_BYTES if min_bytes is None else min_bytes
    sk = _without_graph(model)
    moved: list[tuple[int, onnx.TensorProto]] = []
    end = [0]

    def stub(t: onnx.TensorProto, into: onnx.TensorProto) -> None:
        n = _tensor_nbytes(t)
        external = t.data_location == onnx.TensorProto.EXTERNAL
        stored = external and _stored(t) is not None
        if (external and (keep_stored or not stored)) or (n < min_bytes and not stored) \
                or t.data_type == onnx.TensorProto.STRING:
            into.CopyFrom(t)
            return
        offset = end[0] + ((-end[0]) % EXTERNAL_ALIGN if n >= 2**20 else 0)
        end[0] = offset + n
        into.name, into.data_type, into.doc_string = t.name, t.data_type, t.doc_string
        into.dims.extend(t.dims)
        into.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(n))):
            into.external_data.add(key=k, value=v)
        moved.append((offset, t))

    def graph(src: onnx.GraphProto, dst: onnx.GraphProto) -> None:
        _copy_fields(src, dst, skip=("initializer", "node"))
        for t in src.initializer:
            stub(t, dst.initializer.add())
        for n in src.node:
            if not any(a.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                       for a in n.attribute):
                dst.node.append(n)
                continue
            d = dst.node.add()
            _copy_fields(n, d, skip=("attribute",))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    da = d.attribute.add(name=a.name, type=a.type)
                    stub(a.t, da.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    da = d.attribute.add(name=a.name, type=a.type)
                    graph(a.g, da.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    da = d.attribute.add(name=a.name, type=a.type)
                    for sg in a.graphs:
                        graph(sg, da.graphs.add())
                else:
                    d.attribute.append(a)

    graph(model.graph, sk.graph)
    return sk, moved


def _tensor_data(t: onnx.TensorProto) -> bytes:
    """A tensor's data as the bytes external data stores (little-endian raw bytes)."""
    st = _stored(t)
    if st is not None:
        return _read_stored(st)
    if t.HasField("raw_data"):
        return t.raw_data
    return onnx.numpy_helper.to_array(t).tobytes()


def tensor_in_memory(t: onnx.TensorProto) -> onnx.TensorProto:
    """`t` itself, or for a tensor kept in the store a copy with its data loaded."""
    st = _stored(t)
    if st is None:
        return t
    out = onnx.TensorProto()
    out.CopyFrom(t)
    del out.external_data[:]
    out.data_location = onnx.TensorProto.DEFAULT
    out.raw_data = _read_stored(st)
    return out


def write_skeleton(model: onnx.ModelProto, path: Union[str, os.PathLike], with_data: bool = False,
                   min_bytes: Optional[int] = None) -> Path:
    """Write `skeleton(model)` to `path` with its tensors in `<name>.data` beside it: the tensors' bytes when
    `with_data` (a model with external data, for ONNX Runtime or the user), else a sparse file of the right
    length (enough for onnx.checker and shape inference, and nothing written)."""
    path = Path(os.fspath(path))
    data_name = path.name + ".data"
    sk, moved = skeleton(model, data_name, min_bytes)
    if moved:
        write_tensor_data(moved, path.parent / data_name, with_data)
    path.write_bytes(sk.SerializeToString())
    return path


def write_tensor_data(moved: list[tuple[int, onnx.TensorProto]], path: Union[str, os.PathLike],
                      with_data: bool = True) -> None:
    """The external data file of `skeleton`'s moved tensors: their bytes at their offsets (a sparse file of the
    right length without `with_data`)."""
    with open(path, "wb") as f:
        end = 0
        for offset, t in moved:
            end = offset + _tensor_nbytes(t)
            if with_data:
                f.seek(offset)
                f.write(_tensor_data(t))
        f.truncate(end)


# --------------------------------------------------------------------------- tensor store (over 2 GB)
#: names of the store's data files begin so (the store is one temporary folder per process, while open)
STORE_PREFIX = "onnxcomp-store-"
_STORE_FILES: dict[str, Path] = {}  # data file name -> its path, for the files of the open blocks
_STORE_LOCAL = threading.local()  # .blocks: this thread's open `tensor_store` blocks, each the files it made
_STORE_DIR: list[Path] = []  # the folder, while some block is open (in any thread)
_STORE_LOCK = threading.Lock()
_STORE_BLOCKS = [0]  # blocks open in all threads
_STORE_COUNT = itertools.count()


def _blocks() -> list[list[str]]:
    if not hasattr(_STORE_LOCAL, "blocks"):
        _STORE_LOCAL.blocks = []
    return _STORE_LOCAL.blocks


@contextlib.contextmanager
def tensor_store() -> Iterator[None]:
    """While open, a model over 2 GB can keep its weights on disk (`spill`) instead of in the ModelProto: a
    pass then reads each weight when it needs it, and ONNX Runtime loads the sessions of the model from the
    same files (nothing written again per session). Closing removes the files the block made: a model still
    needing them must be `materialize`d first."""
    made: list[str] = []
    _blocks().append(made)
    with _STORE_LOCK:
        _STORE_BLOCKS[0] += 1
    try:
        yield
    finally:
        _blocks().remove(made)
        for name in made:
            path = _STORE_FILES.pop(name, None)
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
        with _STORE_LOCK:
            _STORE_BLOCKS[0] -= 1
            if not _STORE_BLOCKS[0] and _STORE_DIR:
                shutil.rmtree(_STORE_DIR.pop(), ignore_errors=True)


def store_dir() -> Optional[Path]:
    """The store's folder while a `tensor_store` block is open in this thread (created on first use), else
    None."""
    if not _blocks():
        return None
    with _STORE_LOCK:
        if not _STORE_DIR:
            _sweep_dead_stores(Path(tempfile.gettempdir()))
            _STORE_DIR.append(Path(tempfile.mkdtemp(prefix=f"{STORE_PREFIX}{os.getpid()}-")))
        return _STORE_DIR[0]


#: a store folder whose process is gone is removed once it has been left this long (a process of another pid
#: namespace sharing the temporary folder looks dead: its store is spared while it is being written)
STALE_STORE_S = 15 * 60
_STORE_FOLDER_RE = re.compile(re.escape(STORE_PREFIX) + r"(\d+)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process (PermissionError), or no way to tell: alive
    return True


def _sweep_dead_stores(tmp: Path) -> None:
    """Remove the store folders that killed compressions left in `tmp` (SIGKILL skips the cleanup, and a store
    is the size of the model): those whose process is no longer running, untouched for STALE_STORE_S."""
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return
    now = time.time()
    for e in entries:
        m = _STORE_FOLDER_RE.match(e.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            if not e.is_dir(follow_symlinks=False) or now - e.stat().st_mtime < STALE_STORE_S:
                continue
        except OSError:
            continue
        if not _pid_alive(int(m.group(1))):
            shutil.rmtree(e.path, ignore_errors=True)


def _stored(t: onnx.TensorProto) -> Optional[tuple[Path, int, int]]:
    """(file, offset, length) of a tensor kept in the store, else None."""
    if not _STORE_FILES or t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    path = _STORE_FILES.get(info.get("location", ""))
    return None if path is None else (path, int(info.get("offset", 0)), int(info.get("length", 0)))


def _read_stored(st: tuple[Path, int, int]) -> bytes:
    path, offset, length = st
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise InvalidModelError(f"onnxcomp's temporary weights file {path} was cut short (read {len(data)} of "
                                f"{length} bytes at {offset}); was the temporary folder cleaned meanwhile?")
    return data


def spill(model: onnx.ModelProto, min_bytes: Optional[int] = None) -> onnx.ModelProto:
    """`model` with its tensors held in memory (of >= `min_bytes`, default SKELETON_MIN_BYTES) written to a new
    file of the open store, and referenced there; tensors already in the store stay where they are. `model` is
    not modified: the caller lets go of it to free its memory. Needs an open `tensor_store`."""
    return spill_to_file(model, min_bytes)[0]


def spill_to_file(model: onnx.ModelProto, min_bytes: Optional[int] = None
                  ) -> tuple[onnx.ModelProto, Optional[str]]:
    """`spill`, and the name of the store file it wrote (None when every big tensor was in the store already):
    `drop_store_file` removes it when the spill served once (a session)."""
    folder = store_dir()
    if folder is None:
        raise RuntimeError("ir.spill needs an open ir.tensor_store() block")
    name = f"{STORE_PREFIX}{os.getpid()}-{next(_STORE_COUNT)}.data"
    sk, moved = skeleton(model, name, min_bytes, keep_stored=True)
    if not moved:
        return sk, None
    _STORE_FILES[name] = folder / name
    _blocks()[-1].append(name)  # registered first: a partial file is removed with the block
    try:
        write_tensor_data(moved, folder / name)
    except OSError as e:
        from .errors import SaveError

        need = sum(_tensor_nbytes(t) for _, t in moved)
        raise SaveError(f"cannot write onnxcomp's temporary copy of the weights ({need / 2**30:.2f} GiB, a model "
                        f"over 2 GB keeps them on disk while it is compressed) in {folder}: {e.strerror or e}; "
                        "set TMPDIR to a folder with that much free space") from None
    return sk, name


def drop_store_file(name: str) -> None:
    """Remove one file of the store (no model may read it afterwards)."""
    for made in _blocks():
        if name in made:
            made.remove(name)
    path = _STORE_FILES.pop(name, None)
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def release_memory() -> None:
    """Collect cyclic garbage (gs graphs) and hand the C heap's free pages back to the system (glibc's
    malloc_trim; elsewhere a no-op): between the steps of a model over 2 GB, the weights a pass freed would
    otherwise still count in the process's memory while the next step loads the model in ONNX Runtime."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def has_stored(model: onnx.ModelProto) -> bool:
    """True when some tensor of `model` is a reference into the store."""
    return bool(_STORE_FILES) and any(_stored(t) is not None for t in _tensors(model))


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """In place: every tensor of `model` kept in the store gets its data back (before the store closes)."""
    for t in _tensors(model):
        st = _stored(t)
        if st is not None:
            data = _read_stored(st)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
            del data
    return model


#: `serialized_chunks` streams a model from this size on part by part (its serialization would be a second copy)
STREAM_BYTES = 256 * 2**20


def serialized_chunks(model: onnx.ModelProto) -> Iterator[bytes]:
    """The model's content as a stream of byte strings (for hashing or compressing): the whole serialization
    for a model under STREAM_BYTES, else its skeleton then each moved tensor's data."""
    if not is_big(model) and model.ByteSize() < STREAM_BYTES:
        yield model.SerializeToString(deterministic=True)
        return
    sk, moved = skeleton(model)
    yield sk.SerializeToString(deterministic=True)
    for _, t in moved:
        yield _tensor_data(t)


def proto_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (initializers included); for a model over 2 GB, the skeleton's size plus its
    moved tensors' bytes (what its .onnx and .data files hold, alignment aside)."""
    if not is_big(model):
        return model.ByteSize()
    sk, moved = skeleton(model)
    return sk.ByteSize() + sum(_tensor_nbytes(t) for _, t in moved)


def model_bytes(model: onnx.ModelProto) -> int:
    """`proto_size` plus the bytes of tensors left in external data (a model loaded without its data)."""
    ext = sum(int({e.key: e.value for e in t.external_data}.get("length", 0)) for t in external_tensors(model))
    return proto_size(model) + ext


def check_proto(model: onnx.ModelProto, full: bool = True, what: str = "model") -> None:
    """Run onnx.checker (full check = strict shape inference too); raise InvalidModelError naming the culprit.
    A model over 2 GB is checked as a skeleton on disk (its tensors' data is not needed for the check)."""
    try:
        if not is_big(model):
            onnx.checker.check_model(model, full_check=full)
        else:
            with tempfile.TemporaryDirectory(prefix="onnxcomp-check-") as d:
                onnx.checker.check_model(str(write_skeleton(model, Path(d) / "m.onnx")), full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        msg = str(e).strip().splitlines()
        raise InvalidModelError(f"{what} fails onnx.checker: {' '.join(m.strip() for m in msg[:6])}") from None


def save_proto(model: onnx.ModelProto, path: Union[str, os.PathLike], external_data: bool | None = None) -> Path:
    """Write atomically (temp file in the target dir, fsync, rename); external data when > 2 GB. An OSError
    (permissions, full disk, ...) is a SaveError naming the path; the old file, if any, is unchanged."""
    path = Path(os.fspath(path))
    try:
        return _save_proto(model, path, external_data)
    except OSError as e:
        from .errors import SaveError

        why = e.strerror or str(e)
        raise SaveError(f"cannot write {path}: {why}" + (f" ({e.filename})" if e.filename and
                                                          str(e.filename) != str(path) else "") +
                        "; nothing was written there") from None


def _save_proto(model: onnx.ModelProto, path: Path, external_data: bool | None) -> Path:
    target_dir = path.parent if str(path.parent) else Path(".")
    target_dir.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = is_big(model)
    if not external_data:
        data = model.SerializeToString()
        atomic_write(path, data)
        return path
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".onnxcomp-") as tmp:
        write_skeleton(model, Path(tmp) / path.name, with_data=True, min_bytes=1024)  # no copy of the model
        done: list[tuple[Path, str | None]] = []  # (replaced file, link to its previous content)
        try:
            for name in (data_name, path.name):  # data first: the model never points at missing data
                src = os.path.join(tmp, name)
                if os.path.exists(src):
                    _fsync_file(src)
                    os.chmod(src, 0o666 & ~_umask())  # onnx writes the data file 0600; use open()'s mode
                    dst, prev = target_dir / name, None
                    if dst.exists():
                        prev = os.path.join(tmp, name + ".previous")
                        os.link(dst, prev)
                    os.replace(src, dst)
                    done.append((dst, prev))
        except BaseException:  # the old model must not be left reading the new model's data file
            for dst, prev in reversed(done):
                if prev is not None:
                    os.replace(prev, dst)
                else:
                    os.unlink(dst)
            raise
    _fsync_dir(target_dir)
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsynced, then renamed over `path`:
    a reader sees the old file or the new one, never a partial one (the temporary file is removed on failure).
    An OSError (permissions, full disk) is a SaveError naming the path."""
    try:
        _atomic_write(path, data)
    except OSError as e:
        from .errors import SaveError

        raise SaveError(f"cannot write {path}: {e.strerror or e}; nothing was written there") from None


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(p: str) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- gs graph <-> proto
from onnx_graphsurgeon.importers import onnx_importer as _gsi  # noqa: E402
from onnx_graphsurgeon.ir.tensor import LazyValues as _LazyValues  # noqa: E402
from onnx_graphsurgeon.util.misc import SynchronizedList as _SyncList  # noqa: E402


def _sync_list(parent: object, field_name: str, items: list) -> _SyncList:
    lst = _SyncList.__new__(_SyncList)
    lst.parent_obj = parent
    lst.field_name = field_name
    list.extend(lst, items)
    return lst


def _new_variable(name: str, dtype: Any = None, shape: Any = None) -> gs.Variable:
    """A gs.Variable built without gs's per-attribute __setattr__ hooks (identical fields)."""
    v = object.__new__(gs.Variable)
    d = v.__dict__
    d["name"] = name
    d["inputs"] = _sync_list(v, "outputs", [])
    d["outputs"] = _sync_list(v, "inputs", [])
    d["dtype"] = dtype
    d["shape"] = shape
    d["type"] = "tensor_type"
    return v


def _new_node(op: str, name: str, attrs: dict, inputs: list, outputs: list, domain: Optional[str]) -> gs.Node:
    """A gs.Node wired to its tensors with plain list appends (what gs.Node.__init__ does, ~5x faster)."""
    n = object.__new__(gs.Node)
    d = n.__dict__
    d["op"] = op
    d["name"] = name
    d["attrs"] = attrs
    d["inputs"] = _sync_list(n, "outputs", inputs)
    d["outputs"] = _sync_list(n, "inputs", outputs)
    d["domain"] = domain
    for t in inputs:
        list.append(t.outputs, n)
    for t in outputs:
        list.append(t.inputs, n)
    return n


class _UncachedConstant(gs.Constant):
    """A gs.Constant (of a model over 2 GB) whose lazily loaded values are read again on each access instead of
    cached: caching every weight as numpy would hold the model twice. The array is read-only (a write to it
    would be lost); assigning `values` works as for any Constant."""

    @property
    def values(self):
        v = self._values
        if isinstance(v, _LazyValues):
            return _read_only_values(v.tensor)
        return v

    @values.setter
    def values(self, values) -> None:
        self._values = values


def stored_constant(name: str, values: np.ndarray) -> Optional[gs.Constant]:
    """While this thread's job keeps its weights in the store (a model over 2 GB): a new weight of at least
    SKELETON_MIN_BYTES written to a store file at once, as a constant that reads it back when used, so that a
    pass's new weights (AWQ's scaled ones, refits, factors) do not pile up in memory until its graph is let go.
    None otherwise (the caller keeps `values` in memory)."""
    blocks = _blocks()
    if not blocks or not blocks[-1] or values.nbytes < SKELETON_MIN_BYTES:
        return None
    try:
        dtype = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    except (KeyError, TypeError, ValueError):
        return None
    if dtype not in _RAW_VIEW_TYPES:
        return None
    m = onnx.ModelProto()
    t = m.graph.initializer.add()  # filled in place: appending a tensor would copy its bytes
    t.name = name
    t.data_type = dtype
    t.dims.extend(values.shape)
    t.raw_data = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
    sk, stored = spill_to_file(m, min_bytes=0)
    if stored is None:
        return None
    c = gs.Constant(name, _LazyValues(sk.graph.initializer[0]))
    c.__class__ = _UncachedConstant
    return c


def _read_only_values(t: onnx.TensorProto) -> np.ndarray:
    """A tensor's values as a read-only array, with one copy of its data (the bytes protobuf hands out, or
    those read from the store)."""
    st = _stored(t)
    if st is not None:
        if t.data_type in _RAW_VIEW_TYPES:
            dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).newbyteorder("<")
            return np.frombuffer(_read_stored(st), dtype=dt).reshape(tuple(t.dims))
        t = tensor_in_memory(t)
    if t.HasField("raw_data") and t.data_type in _RAW_VIEW_TYPES:
        dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).newbyteorder("<")
        return np.frombuffer(t.raw_data, dtype=dt).reshape(tuple(t.dims))
    a = onnx.numpy_helper.to_array(t)
    a.flags.writeable = False
    return a


_RAW_VIEW_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
                   onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                   onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def _import_fast(model: onnx.ModelProto, shapes: Optional[onnx.GraphProto] = None,
                 uncached: bool = False) -> gs.Graph:
    """gs.import_onnx for the main graph with O(1)-cost tensor/node construction.

    Same objects and fields as gs's importer (which it calls for initializers, attributes and subgraphs);
    used when the model has no local functions, otherwise gs.import_onnx is used as is. The cyclic GC is
    paused while building (every node/tensor pair is a reference cycle: full collections made import
    quadratic-looking on 100k-node graphs). `shapes`: a graph whose value_info/input/output types are used
    instead of the model's (the inferred skeleton of a model over 2 GB). `uncached`: initializers are
    `_UncachedConstant`s (a model over 2 GB).
    """
    with gc_paused():
        return _import_fast_impl(model, shapes, uncached)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic GC around bulk graph work (gs nodes and tensors reference each other, so every
    generation-2 collection rescans the whole graph; on 100k-node graphs that dominated run time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _import_fast_impl(model: onnx.ModelProto, shapes: Optional[onnx.GraphProto], uncached: bool) -> gs.Graph:
    g = model.graph
    sg = g if shapes is None else shapes
    opset = _gsi.OnnxImporter.get_opset(model)
    domains = _gsi.OnnxImporter.get_import_domains(model)
    tensors: dict[str, gs.Tensor] = {}
    for t in g.initializer:
        c = tensors[t.name] = _gsi.OnnxImporter.import_tensor(t)
        if uncached and isinstance(c, gs.Constant) and isinstance(c._values, _LazyValues):
            c.__class__ = _UncachedConstant
    for t in g.sparse_initializer:
        tensors[t.values.name] = _gsi.OnnxImporter.import_tensor(t)
    for vi in sg.value_info:
        _value_tensor(tensors, vi)
    init_names = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    inputs = [_value_tensor(tensors, vi) for vi in sg.input if vi.name not in init_names]
    outputs = [_value_tensor(tensors, vi) for vi in sg.output]
    nodes = _import_nodes(g, tensors, opset, domains)
    return gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, name=g.name, doc_string=g.doc_string,
                    producer_name=model.producer_name, producer_version=model.producer_version, opset=opset,
                    import_domains=domains, functions=[], ir_version=model.ir_version)


def _value_tensor(tensors: dict[str, gs.Tensor], vi: onnx.ValueInfoProto) -> gs.Tensor:
    """The tensor a value_info/input/output names (made if new), its dtype and shape filled where unknown."""
    cur = tensors.get(vi.name)
    if vi.type.HasField("tensor_type"):
        dtype = _gsi.get_onnx_tensor_dtype(vi)
        shape = _gsi.get_onnx_tensor_shape(vi)
    else:
        dtype, shape = None, None
    if cur is None:
        if not vi.type.HasField("tensor_type"):
            cur = _gsi.OnnxImporter.import_tensor(vi)  # sequences/optionals: gs knows how
        else:
            cur = _new_variable(vi.name, dtype, shape)
        tensors[vi.name] = cur
    elif isinstance(cur, gs.Variable):
        cur.dtype = cur.dtype or dtype
        cur.shape = cur.shape or shape
    return cur


def _import_nodes(g: onnx.GraphProto, tensors: dict[str, gs.Tensor], opset: int, domains: Any) -> list[gs.Node]:
    """The graph's nodes as gs nodes wired through `tensors` (tensors first met here are made)."""
    nodes = []
    empty_attrs: dict = {}
    for nd in g.node:
        ins = []
        for name in nd.input:
            t = tensors.get(name)
            if t is None:
                if not name:
                    t = _new_variable("")
                else:
                    t = tensors[name] = _new_variable(name)
            ins.append(t)
        outs = []
        for name in nd.output:
            t = tensors.get(name) if name else None
            if t is None:
                t = _new_variable(name)
                if name:
                    tensors[name] = t
            outs.append(t)
        attrs = (_gsi.OnnxImporter.import_attributes(nd.attribute, tensors, {}, opset, domains)
                 if len(nd.attribute) else dict(empty_attrs))
        nodes.append(_new_node(nd.op_type, nd.name, attrs, ins, outs, nd.domain if nd.HasField("domain") else None))
    return nodes



def shape_inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with ONNX shape inference applied (best effort: the proto itself when inference fails, e.g. on an
    op it does not know). Over 2 GB it is the inferred skeleton (big tensors are stubs): for its shapes only."""
    try:
        if not is_big(proto):
            return _contrib_inferred(onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True))
        with tempfile.TemporaryDirectory(prefix="onnxcomp-shapes-") as d:  # over 2 GB: infer on the skeleton
            p = write_skeleton(proto, Path(d) / "m.onnx")
            onnx.shape_inference.infer_shapes_path(str(p), str(p), strict_mode=False, data_prop=True)
            return load_proto(p, load_external_data=False)  # shapes only: its big tensors are stubs
    except Exception:  # inference is a help, not a requirement
        return proto


def _contrib_inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    """With ORT contrib ops (com.microsoft: fused Attention, SkipLayerNormalization, BiasGelu... from ORT's
    transformers optimizer), ONNX inference leaves their outputs and everything after them untyped, so no pass
    would see a float activation there: ORT's symbolic shape inference, which knows those ops, fills them in
    (best effort: `proto` as it is when it fails)."""
    if not any(n.domain == "com.microsoft" for g in iter_graph_protos(proto.graph) for n in g.node):
        return proto
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        out = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)
    except Exception:  # noqa: BLE001 - its failures are plain exceptions (and sympy may be missing)
        return proto
    declared = {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for field in ("input", "output"):  # the model's own declarations stay (it renames their symbolic dims)
        del getattr(out.graph, field)[:]
        getattr(out.graph, field).extend(getattr(proto.graph, field))
    kept = [v for v in out.graph.value_info if v.name not in declared]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out


def _without_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model-level fields of `proto` (opsets, producer, metadata, functions) without copying its graph."""
    meta = onnx.ModelProto()
    _copy_fields(proto, meta, skip=("graph",))
    return meta


def _copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    """Copy every set field of protobuf message `src` into `dst` except those named in `skip`."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)

@dataclass
class Model:
    """A gs.Graph plus the model-level fields gs does not carry (ir_version, metadata, producer)."""

    graph: gs.Graph
    meta: onnx.ModelProto  # the source ModelProto with its graph cleared
    # value_info names the source carried: inferred shapes help rules but are not written back (they change
    # what ORT's optimizer does, and go stale when a pass changes shapes)
    value_info_names: Optional[set[str]] = None
    # types gs cannot carry (optional, map, sequences of them): written back by name on export
    special_types: Optional[dict[str, onnx.TypeProto]] = None

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, infer_shapes: bool = True,
                   inferred: Optional[onnx.ModelProto] = None) -> "Model":
        """Import into gs (after best-effort shape inference so rules see dtypes and shapes). `inferred` is
        `shape_inferred(proto)` when the caller imports the same model several times."""
        if _has_sparse_weights(proto):  # passes see dense weights; storage.sparse_storage writes them back
            from .storage import densify

            dense = onnx.ModelProto()
            dense.CopyFrom(proto)
            densify(dense)
            proto = dense
            inferred = None
        src = proto
        if inferred is not None:
            src = inferred
        elif infer_shapes:
            src = shape_inferred(proto)
        big = is_big(proto)  # then src is a skeleton (or proto): tensors from proto, shapes from src
        try:
            if big:
                shapes = None if src is proto else src.graph
                graph = _import_fast(proto, shapes, uncached=True) if not proto.functions else gs.import_onnx(proto)
            else:
                graph = _import_fast(src) if not src.functions else gs.import_onnx(src)
        except Exception as e:  # gs raises plain exceptions on odd models
            raise UnsupportedModelError(f"cannot import the graph: {type(e).__name__}: {e}") from None
        meta = _without_graph(proto)
        kept = {vi.name for g in iter_graph_protos(proto.graph) for vi in g.value_info}
        special = {vi.name: vi.type for g in iter_graph_protos(src.graph)
                   for vi in (*g.input, *g.output, *g.value_info) if not vi.type.HasField("tensor_type")}
        return cls(graph, meta, kept, special or None)

    def to_proto(self) -> onnx.ModelProto:
        """Export with topologically sorted nodes and the original model-level fields."""
        with gc_paused():
            return self._to_proto()

    def _to_proto(self) -> onnx.ModelProto:
        for g in iter_graphs(self.graph):
            toposort(g)
        opsets = {o.domain: o.version for o in self.meta.opset_import}
        self.graph.opset = opsets.get("", opsets.get("ai.onnx", self.graph.opset))
        out = self._export()
        for o in out.opset_import:  # keep domains gs discovered, prefer the model's versions
            opsets.setdefault(o.domain, o.version)
        del out.opset_import[:]
        for dom, ver in sorted(opsets.items()):
            out.opset_import.append(onnx.helper.make_opsetid(dom, ver))
        out.ir_version = self.meta.ir_version
        if out.ir_version < 10 and any(t.data_type in _FOUR_BIT.values() for t in _tensors(out)):
            out.ir_version = 10  # 4-bit tensors exist from IR 10 on
        for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            setattr(out, field, getattr(self.meta, field))
        del out.metadata_props[:]
        out.metadata_props.extend(self.meta.metadata_props)
        if not out.functions and self.meta.functions:
            out.functions.extend(self.meta.functions)
        _drop_outer_initializer_copies(out.graph)
        if out.ir_version < 4:  # IR < 4 requires every initializer to be a graph input too; gs drops them
            listed = {i.name for i in out.graph.input}
            out.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                   for t in out.graph.initializer if t.name not in listed)
        if self.value_info_names is not None:
            for g in iter_graph_protos(out.graph):
                keep = [vi for vi in g.value_info if vi.name in self.value_info_names]
                if len(keep) != len(g.value_info):
                    del g.value_info[:]
                    g.value_info.extend(keep)
        return out

    def _export(self) -> onnx.ModelProto:
        """gs.export_onnx, with the types gs cannot write (optional, map, ...) exported untyped and then restored
        from the source by name. An export failure is a bug of ours (the graph came from a valid model)."""
        from .errors import InternalError

        _pack_4bit_constants(self.graph)
        special = self.special_types or {}
        untyped = []
        for g in iter_graphs(self.graph) if special else ():  # most models have none: no walk on the hot path
            for t in g.tensors().values():
                if t.name in special and isinstance(t, gs.Variable) and t.dtype is not None:
                    untyped.append((t, t.dtype))
                    t.dtype = None
        try:
            out = _export_onnx(self.graph)
        except Exception as e:
            raise InternalError(f"bug in onnxcomp: cannot export the rewritten graph: {type(e).__name__}: {e}"
                                ) from e
        finally:
            for t, dtype in untyped:
                t.dtype = dtype
        for g in iter_graph_protos(out.graph) if special else ():
            for vi in (*g.input, *g.output, *g.value_info):
                if vi.name in special:
                    vi.type.CopyFrom(special[vi.name])
        return out


_FOUR_BIT = {"int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}


def _pack_4bit_constants(graph: gs.Graph) -> None:
    """Give every 4-bit constant (numpy int4/uint4, one value a byte) its packed TensorProto, which gs exports as
    it is: gs's own conversion writes one byte per value and onnx rejects the tensor."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    for g in iter_graphs(graph):
        for t in g.tensors().values():
            if not isinstance(t, gs.Constant) or isinstance(t._values, LazyValues):
                continue
            kind = _FOUR_BIT.get(np.dtype(t.values.dtype).name) if hasattr(t._values, "dtype") else None
            if kind is None:
                continue
            flat = np.asarray(t.values).astype(np.int8 if kind == onnx.TensorProto.INT4 else np.uint8).reshape(-1)
            nib = (flat.astype(np.uint8) & 0x0F)
            if nib.size % 2:
                nib = np.append(nib, np.uint8(0))
            packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)  # first value in the low nibble
            tp = onnx.helper.make_tensor(t.name, kind, list(t.shape), packed.tobytes(), raw=True)
            t._values = LazyValues(tp)


def _export_onnx(graph: gs.Graph) -> onnx.ModelProto:
    """gs.export_onnx(graph, do_type_check=False), writing the main graph straight into the ModelProto: gs builds
    a GraphProto and make_model copies it once more (three copies of every weight at the peak, over 2 GB
    models too); here each initializer is exported and appended one at a time (one copy)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter as Ex, update_import_domains
    from onnx_graphsurgeon.ir.tensor import SparseValues

    model = onnx.ModelProto()
    g = model.graph
    g.node.extend(Ex.export_node(n) for n in graph.nodes)
    g.name = graph.name
    g.input.extend(Ex.export_value_info_proto(t, False) for t in graph.inputs)
    g.output.extend(Ex.export_value_info_proto(t, False) for t in graph.outputs)
    tensor_map = graph.tensors()
    for t in tensor_map.values():  # one at a time: a new TensorProto is dropped right after its copy is appended
        if isinstance(t, gs.Constant):
            if isinstance(t._values, SparseValues):
                g.sparse_initializer.append(Ex.export_sparse_tensor_proto(t))
            else:
                g.initializer.append(Ex.export_tensor_proto(t))
    for t in _constants_shared_by_subgraphs(graph, set(tensor_map)):  # once here; the bodies' copies are dropped
        g.initializer.append(Ex.export_tensor_proto(t))
    for t in graph.inputs + graph.outputs:
        tensor_map.pop(t.name, None)
    g.value_info.extend(Ex.export_value_info_proto(t, False) for t in tensor_map.values()
                        if isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None))
    if graph.doc_string:
        g.doc_string = graph.doc_string
    model.functions.extend(Ex.export_function(f) for f in graph.functions)
    model.opset_import.extend(update_import_domains(graph))
    model.ir_version = graph.ir_version if graph.ir_version is not None else onnx.IR_VERSION
    model.producer_name = graph.producer_name or ""
    model.producer_version = graph.producer_version or ""
    return model


def _constants_shared_by_subgraphs(graph: gs.Graph, taken: set[str]) -> list[gs.Constant]:
    """Dense constants read in two or more If/Loop bodies and not in the main graph: an outer-scope initializer
    (e.g. one packed weight both branches slice), which gs would export into every body that reads it."""
    from onnx_graphsurgeon.ir.tensor import SparseValues

    where: dict[int, set[int]] = {}
    obj: dict[int, gs.Constant] = {}
    for sub in iter_graphs(graph):
        if sub is graph:
            continue
        for n in sub.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant) and t.name and not isinstance(t._values, SparseValues):
                    where.setdefault(id(t), set()).add(id(sub))
                    obj[id(t)] = t
    return [obj[k] for k, graphs in where.items() if len(graphs) > 1 and obj[k].name not in taken]


def _has_sparse_weights(proto: onnx.ModelProto) -> bool:
    return any(g.sparse_initializer or any(n.op_type == "Constant" and any(a.name == "sparse_value" for a in n.attribute)
                                           for n in g.node) for g in iter_graph_protos(proto.graph))


def _drop_outer_initializer_copies(graph: onnx.GraphProto) -> None:
    """gs exports an outer-scope initializer read in a subgraph into that subgraph too (one more copy of the
    weight per If/Loop body); drop such copies when identical to the outer one, which the body can read."""
    stack: list[tuple[onnx.GraphProto, dict[str, onnx.TensorProto]]] = [(graph, {})]
    while stack:
        g, outer = stack.pop()
        keep = [t for t in g.initializer
                if t.name not in outer or t.SerializeToString() != outer[t.name].SerializeToString()]
        if len(keep) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(keep)
        scope = {**outer, **{t.name: t for t in g.initializer}}
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append((a.g, scope))
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend((sg, scope) for sg in a.graphs)


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every nested If/Loop/Scan body, iteratively (outer before inner)."""
    stack = [graph]
    seen: set[int] = set()
    while stack:
        g = stack.pop()
        if id(g) in seen:
            continue
        seen.add(id(g))
        yield g
        for n in g.nodes:
            stack.extend(subgraphs_of(n))


def subgraphs_of(node: gs.Node) -> list[gs.Graph]:
    out = []
    for v in node.attrs.values():
        if isinstance(v, gs.Graph):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(x for x in v if isinstance(x, gs.Graph))
    return out


def captured_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Outer-scope tensors a node's subgraphs read (implicit inputs for ordering and liveness)."""
    subs = subgraphs_of(node)
    if not subs:
        return []
    produced: set[int] = set()
    used: dict[int, gs.Tensor] = {}
    for g in (x for s in subs for x in iter_graphs(s)):
        for t in g.inputs:
            produced.add(id(t))
        for n in g.nodes:
            for t in n.outputs:
                produced.add(id(t))
    for g in (x for s in subs for x in iter_graphs(s)):
        for n in g.nodes:
            for t in n.inputs:
                used.setdefault(id(t), t)
        for t in g.outputs:
            used.setdefault(id(t), t)
    return [t for k, t in used.items() if k not in produced and isinstance(t, gs.Variable) and t.name]


def toposort(graph: gs.Graph) -> None:
    """Iterative Kahn sort of graph.nodes, stable w.r.t. the current order; subgraph captures count as inputs."""
    nodes = list(graph.nodes)
    producer: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for t in n.outputs:
            producer[id(t)] = i
    indeg = [0] * len(nodes)
    succ: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        deps = set()
        for t in list(n.inputs) + captured_inputs(n):
            j = producer.get(id(t))
            if j is not None and j != i:
                deps.add(j)
        indeg[i] = len(deps)
        for j in deps:
            succ[j].append(i)
    ready = [i for i in range(len(nodes)) if indeg[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        stuck = [nodes[i] for i in range(len(nodes)) if indeg[i] > 0][:3]
        raise InvalidModelError(
            "graph has a cycle (or a node reads a tensor produced later that is never produced before it): "
            + ", ".join(f"{n.op} '{n.name}'" for n in stuck)
        )
    graph.nodes = order


# --------------------------------------------------------------------------- O(1) editing
def const_value(t: gs.Tensor) -> np.ndarray | None:
    """Value of an initializer or of a Constant node's output; None when not a constant."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1:
        p = t.inputs[0]
        if p.op == "Constant" and p.domain in (None, "", "ai.onnx") and "value" in p.attrs:
            v = p.attrs["value"]
            if isinstance(v, gs.Constant):
                return np.asarray(v.values)
        if p.op == "Constant" and p.domain in (None, "", "ai.onnx"):  # the scalar/list forms of Constant
            for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                               ("value_int", np.int64), ("value_ints", np.int64)):
                if key in p.attrs:
                    return np.asarray(p.attrs[key], dtype=dtype)
    return None
