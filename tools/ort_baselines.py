"""ONNX Runtime's own quantizers, as the baselines tools/bench_quantize.py compares onnxcomp with.

Every function reads a model file and writes the quantized model to ``dst`` (a path the caller owns; the
benchmark uses a temporary directory, never the repository) and returns ``dst``. Settings are passed through
unchanged, so a table row can name exactly what ORT was asked to do.

* :func:`static` - ``quantize_static`` (QDQ) with a :class:`FeedReader` over calibration feeds. ORT's
  calibrators need every sample to have the same shape (its Percentile/Entropy histograms crash on ragged
  inputs with "inhomogeneous shape"), so callers pad variable-length feeds to one length first.
* :func:`dynamic` - ``quantize_dynamic`` (int8 weights, activations quantized at run time).
* :func:`nbits` - ``MatMulNBitsQuantizer`` (blocked 4-bit MatMul weights; optionally Gather too).
* :func:`preprocess` - ``quant_pre_process`` (symbolic shape inference + ORT graph optimization).
* :func:`gemm_to_matmul` - Gemm -> MatMul (+ Add): MatMulNBits only takes MatMul nodes.
"""
from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_dynamic, quantize_static)

__all__ = ["FeedReader", "static", "dynamic", "nbits", "preprocess", "gemm_to_matmul", "describe"]

_CALIB = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}
_QTYPE = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}


class FeedReader(CalibrationDataReader):
    """A CalibrationDataReader over a list of feed dicts (rewindable, so ORT may read it more than once)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self._feeds = [dict(f) for f in feeds]
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self._feeds)


def describe(settings: Mapping[str, Any]) -> str:
    """Short text of a static-quantization settings dict, for table footnotes."""
    parts = []
    for k, v in settings.items():
        if k == "extra_options":
            parts.extend(f"{ek}={ev}" for ek, ev in v.items())
        elif isinstance(v, (list, tuple)):
            parts.append(f"{k}={'+'.join(map(str, v))}")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts) if parts else "defaults"


def preprocess(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """ORT's ``quant_pre_process``: symbolic shape inference and graph optimization before quantizing.

    Its symbolic shape inference gives up on some exported transformers ("Incomplete symbolic shape
    inference", e.g. MiniLM); then it is run again with ``skip_symbolic_shape=True`` (ONNX shape inference and
    the graph optimization still run)."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    # on failure the symbolic shape inference dumps sym_shape_infer_temp.onnx (+ a 70 MB .data file) into the
    # working directory: run it from dst's folder so nothing lands in the caller's (e.g. the repository)
    with contextlib.chdir(os.path.dirname(dst)):
        try:
            quant_pre_process(src, dst, skip_symbolic_shape=False)
        except Exception:
            quant_pre_process(src, dst, skip_symbolic_shape=True)
    return dst


def static(src: str | os.PathLike, dst: str | os.PathLike, feeds: Sequence[Mapping[str, np.ndarray]],
           settings: Mapping[str, Any] | None = None) -> str:
    """``quantize_static`` (QDQ). ``settings`` keys: per_channel, reduce_range, op_types (list), calibrate
    ("minmax"/"percentile"/"entropy"), quant_format ("qdq", the default here, or "qoperator"),
    activation_type/weight_type ("int8"/"uint8"), extra_options (dict), pre_process (bool: run
    :func:`preprocess` first, written next to ``dst``). Missing keys = ORT defaults."""
    s = dict(settings or {})
    src = os.fspath(src)
    if s.pop("pre_process", False):
        src = preprocess(src, os.fspath(dst) + ".pre.onnx")
    kwargs: dict[str, Any] = {"quant_format": QuantFormat.QDQ}
    if "quant_format" in s:
        kwargs["quant_format"] = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[s.pop("quant_format")]
    if "per_channel" in s:
        kwargs["per_channel"] = bool(s.pop("per_channel"))
    if "reduce_range" in s:
        kwargs["reduce_range"] = bool(s.pop("reduce_range"))
    if "op_types" in s:
        kwargs["op_types_to_quantize"] = list(s.pop("op_types"))
    if "calibrate" in s:
        kwargs["calibrate_method"] = _CALIB[s.pop("calibrate")]
    if "activation_type" in s:
        kwargs["activation_type"] = _QTYPE[s.pop("activation_type")]
    if "weight_type" in s:
        kwargs["weight_type"] = _QTYPE[s.pop("weight_type")]
    if "extra_options" in s:
        kwargs["extra_options"] = dict(s.pop("extra_options"))
    if s:
        raise ValueError(f"unknown static-quantization settings: {sorted(s)}")
    quantize_static(src, os.fspath(dst), FeedReader(feeds), **kwargs)
    return os.fspath(dst)


def dynamic(src: str | os.PathLike, dst: str | os.PathLike, op_types: Sequence[str] = ("MatMul",),
            per_channel: bool = True, extra_options: Mapping[str, Any] | None = None) -> str:
    """``quantize_dynamic`` with int8 weights (per output channel by default) on ``op_types``."""
    quantize_dynamic(os.fspath(src), os.fspath(dst), op_types_to_quantize=list(op_types), per_channel=per_channel,
                     weight_type=QuantType.QInt8, extra_options=dict(extra_options or {}))
    return os.fspath(dst)


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy with every Gemm whose B is an initializer (alpha=beta=1, transA=0) written as MatMul (+ Add of C).

    Returns (model, number of Gemms rewritten). transB=1 weights are stored transposed, so MatMul sees [K, N].
    """
    m = copy.deepcopy(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    nodes, done = [], 0
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        ok = (n.op_type == "Gemm" and n.domain in ("", "ai.onnx") and len(n.input) >= 2 and n.input[1] in inits
              and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)
        if not ok:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        wname = n.input[1] + "_kn"
        g.initializer.append(numpy_helper.from_array(w, wname))
        has_c = len(n.input) >= 3 and n.input[2] != ""
        mm_out = n.output[0] + "_mm" if has_c else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=(n.name or "gemm") + "_matmul"))
        if has_c:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=(n.name or "gemm") + "_add"))
        done += 1
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return m, done


def nbits(src: str | os.PathLike, dst: str | os.PathLike, *, block_size: int = 32, symmetric: bool = True,
          accuracy_level: int | None = 4, op_types: Sequence[str] = ("MatMul",)) -> str:
    """``MatMulNBitsQuantizer``: 4-bit blocked weights (MatMulNBits; GatherBlockQuantized when "Gather" is in
    ``op_types``). Gemm nodes are rewritten to MatMul first (:func:`gemm_to_matmul`)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(os.fspath(src))
    if any(n.op_type == "Gemm" for n in model.graph.node):
        model, _ = gemm_to_matmul(model)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, op_types_to_quantize=tuple(op_types))
    q.process()
    q.model.save_model_to_file(os.fspath(dst), use_external_data_format=False)
    return os.fspath(dst)
