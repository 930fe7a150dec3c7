"""ONNX Runtime sessions for validation: provider selection that says what it did, and typed errors.

* Providers default to ``["CPUExecutionProvider"]``. A requested provider that this onnxruntime build lacks
  (e.g. CUDA on a CPU wheel) is skipped with a note, never an exception; the providers the session really
  uses (``session.get_providers()``) are returned so reports show them.
* A ModelProto over 2 GB, or one whose tensors point at external data, cannot be handed to ORT as bytes;
  a path is used then: the caller's path; inside an ``ir.tensor_store`` block, a skeleton in the store's
  folder (the weights already there are read where they are, only those held in memory are written); else a
  temporary copy written with external data.
* Failures become :class:`~onnxcomp.errors.InvalidModelError` naming the model (and, for run failures, the
  node ORT names) with the first line of ORT's message; input-shape/dtype rejections become
  :class:`~onnxcomp.errors.CalibrationDataError`.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import CalibrationDataError, InvalidModelError, SaveError
from ..ir import drop_store_file, is_big, save_proto, spill_to_file, store_dir

__all__ = ["MadeSession", "make_session", "run_session", "ort_message"]

ProviderLike = Union[str, tuple[str, Mapping[str, Any]]]
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class MadeSession(NamedTuple):
    session: ort.InferenceSession
    providers: list[str]  # what the session actually uses, in priority order
    notes: list[str]  # providers skipped or not taken, and why
    create_ms: float = 0.0  # time ORT took to create the session (graph optimisation, constant folding included)


def ort_message(e: BaseException) -> str:
    """First line of an ORT exception, without the ``[ONNXRuntimeError] : N : CODE :`` prefix and C++ locations."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", line)
    line = re.sub(r"(?:/[\w.+-]+)+\.(?:h|cc|cpp|cu):\d+\s+(?:[\w:~<>]+\([^()]*\)(?:\s*const)?\s+)?", "", line)
    return line.strip()


def _has_external_data(model: onnx.ModelProto) -> bool:
    from ..ir import external_tensors

    return any(True for _ in external_tensors(model))


def _store_skeleton(model: onnx.ModelProto) -> tuple[str, str | None]:
    """A file in the tensor store's folder from which ORT loads `model`: its graph, with its weights read where
    the store keeps them (those `model` holds in memory are written to a new store file, whose name is returned
    too, for removal once the session is made)."""
    sk, own_data = spill_to_file(model)
    try:
        fd, path = tempfile.mkstemp(dir=store_dir(), prefix="session-", suffix=".onnx")
        with os.fdopen(fd, "wb") as f:
            f.write(sk.SerializeToString())
    except OSError as e:
        if own_data is not None:
            drop_store_file(own_data)
        raise SaveError(f"cannot write a model for ONNX Runtime in onnxcomp's temporary folder {store_dir()}: "
                        f"{e.strerror or e}") from None
    return path, own_data


def _provider_name(p: ProviderLike) -> str:
    return p if isinstance(p, str) else p[0]


def _choose_providers(providers: Sequence[ProviderLike] | None) -> tuple[list[ProviderLike], list[str]]:
    if providers is None:
        return list(DEFAULT_PROVIDERS), []
    if isinstance(providers, str):
        providers = [providers]
    available = ort.get_available_providers()
    known = set(ort.get_all_providers())
    chosen: list[ProviderLike] = []
    notes: list[str] = []
    for p in providers:
        name = _provider_name(p)
        if name in available:
            chosen.append(p)
        elif name in known:
            notes.append(
                f"{name} is not available in this onnxruntime build (available: {', '.join(available)}); skipped"
            )
        else:
            notes.append(f"'{name}' is not an ONNX Runtime execution provider name; skipped")
    if not chosen:
        chosen = list(DEFAULT_PROVIDERS)
        notes.append("none of the requested providers is available; fell back to CPUExecutionProvider")
    return chosen, notes


def make_session(
    model: Union[onnx.ModelProto, str, os.PathLike, bytes],
    providers: Sequence[ProviderLike] | None = None,
    *,
    name: str | None = None,
    path: Union[str, os.PathLike, None] = None,
    prepack: bool = True,
    spinning: bool = True,
) -> MadeSession:
    """An ORT InferenceSession on a path, bytes or ModelProto, with the providers really used and notes.

    ``path``: where ``model`` (a ModelProto) was loaded from; ORT reads that file instead of the proto when the
    proto is over 2 GB or has external data. ``name`` names the model in error messages. ``prepack=False``: no
    weight prepacking (sessions that measure values, never time: while prepacking, ORT holds each weight twice).
    ``spinning=False``: the intra-op threads sleep between runs instead of spinning (sessions of sub-millisecond
    shapes timed against each other: a pool that is spinning or not made the same shape run 0.17 or 0.30 ms).
    """
    chosen, notes = _choose_providers(providers)
    keep_alive = None
    skeleton_file = own_data = None
    if isinstance(model, onnx.ModelProto):
        label = name or "model"
        src: Union[str, bytes, None] = None
        if not _has_external_data(model) and not is_big(model):
            src = model.SerializeToString()  # under 2 GB: ORT reads the bytes
        if src is None:
            if path is not None:
                src = os.fspath(path)
            elif _has_external_data(model):
                raise InvalidModelError(
                    f"{label}: the ModelProto references external data that is not loaded; pass the model's path"
                )
            elif store_dir() is not None:
                skeleton_file, own_data = _store_skeleton(model)
                src = skeleton_file
            else:
                keep_alive = tempfile.TemporaryDirectory(prefix="onnxcomp-session-")
                src = str(save_proto(model, Path(keep_alive.name) / "model.onnx", external_data=True))
    elif isinstance(model, (bytes, bytearray)):
        label = name or "model"
        src = bytes(model)
    else:
        src = os.fspath(model)
        label = name or src
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures are re-raised with ORT's message; keep stderr quiet
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    start = time.perf_counter()
    try:
        sess = ort.InferenceSession(src, sess_options=opts, providers=chosen)
    except Exception as e:  # ORT raises pybind11 exception types that derive from Exception only
        raise InvalidModelError(f"{label}: ONNX Runtime cannot load the model: {ort_message(e)}") from None
    finally:
        if keep_alive is not None:
            keep_alive.cleanup()
        if skeleton_file is not None:  # the session has read its graph, and holds (or maps) its weights
            os.unlink(skeleton_file)
        if own_data is not None:
            drop_store_file(own_data)
    used = list(sess.get_providers())
    wanted = [_provider_name(p) for p in chosen]
    dropped = [p for p in wanted if p not in used]
    if dropped:
        notes.append(f"ONNX Runtime did not enable {', '.join(dropped)} for {label}; it runs on {', '.join(used)}")
    return MadeSession(sess, used, notes, 1e3 * (time.perf_counter() - start))


_NODE_RE = re.compile(r"running (\w+) node\. Name:'([^']*)'(?: Status Message: (.*))?")


def run_session(
    sess: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
    *,
    name: str = "model",
    sample: int | None = None,
) -> list[Any]:
    """``sess.run`` with failures turned into typed errors that name the model, the node and the sample."""
    try:
        return sess.run(None if output_names is None else list(output_names), dict(feed))
    except Exception as e:
        msg = ort_message(e)
        at = f" on sample {sample}" if sample is not None else ""
        m = _NODE_RE.search(msg)
        if m:
            op, node, detail = m.group(1), m.group(2), (m.group(3) or "").strip()
            raise InvalidModelError(
                f"{name}: ONNX Runtime failed in node '{node}' ({op}){at}: {detail or msg}"
            ) from None
        if "INVALID_ARGUMENT" in str(e) and ("input" in msg.lower()):
            raise CalibrationDataError(f"{name}: ONNX Runtime rejected the feed{at}: {msg}") from None
        raise InvalidModelError(f"{name}: ONNX Runtime failed{at}: {msg}") from None
