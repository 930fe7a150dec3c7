"""Streaming statistics of chosen tensors over calibration feeds, in one ONNX Runtime session.

The model is copied and the requested intermediate tensors are added to the copy's graph outputs (the caller's
ModelProto is never touched); ORT infers their types at load. Graph inputs are read from the feeds and
constant initializers from the model, without asking ORT for them.

* Pass 1 runs every feed and keeps, per tensor, the running min/max of the finite values, the element and
  NaN/inf counts and, for tensors in ``channel_axes``, the running per-channel max ``|x|``; for tensors in
  ``gram_axes``, the running ``X^T X`` of the vectors along that axis (what whitened SVD, Wanda/SparseGPT
  and least-squares refits read).
* Pass 2 (``histogram=True``) runs every feed again and adds fixed-bin ``np.histogram`` counts over the
  now-fixed ``[min, max]``.

Every statistic is reduced per run, so samples may differ in batch size or sequence length, and no value is
kept from one sample to the next: memory is flat in the number of samples.

Only float tensors (float32, float16, bfloat16, double) get statistics: a requested tensor of another type
(int64 ids, bool masks ...) has no key in the returned dict, and the caller sees it missing. A name that no
node of the main graph produces, and that is neither a graph input nor an initializer, raises
:class:`~onnxcomp.errors.CalibrationDataError` (tensors inside If/Loop/Scan bodies cannot be observed).
"""
from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import CalibrationDataError, RecipeError
from ..ir import load_proto, tensor_in_memory
from ..storage import sparse_value
from ..runtime import run_session, session_with_outputs
from ..runtime.outputs import CAST_SUFFIX
from .observers import TensorObserver, TensorStats, is_float_dtype

__all__ = ["collect_statistics"]

log = logging.getLogger(__name__)

_ORT_FLOAT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
}
_ORT_BF16 = "tensor(bfloat16)"


def _bf16_dtype() -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16))


def collect_statistics(
    model: onnx.ModelProto | str | os.PathLike,
    tensor_names: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    providers: Sequence[Any] | None = None,
    histogram: bool = True,
    bins: int = 2048,
    channel_axes: Mapping[str, int] | None = None,
    gram_axes: Mapping[str, int] | None = None,
    progress: bool | Callable[[str, int, int], None] = False,
) -> dict[str, TensorStats]:
    """Statistics of ``tensor_names`` (plus the keys of ``channel_axes``) over ``feeds``; see the module doc.

    ``model`` is a ModelProto (a path is read with ``onnxcomp.ir.load_proto``); it is not modified.
    ``feeds`` are already checked against the model (``onnxcomp.data``); ``providers`` default to CPU.
    ``histogram`` also builds ``bins``-bin histograms (needed by the percentile/entropy/mse range methods).
    ``channel_axes[name] = axis`` (negative allowed) keeps the per-channel max ``|x|`` along that axis.
    ``gram_axes[name] = axis`` keeps ``TensorStats.gram`` (float64 ``X^T X``, the vectors along ``axis``, every
    other axis flattened into rows) and ``gram_rows``.
    ``progress`` shows a tqdm bar over the samples of each pass (True) or reports them to a callback
    ``(step, done, total)``. Returns ``{name: TensorStats}`` for the
    float tensors among the requested ones.
    """
    _check_bins(bins)
    if isinstance(tensor_names, str):
        tensor_names = [tensor_names]
    axes, gaxes = _axis_maps(channel_axes, gram_axes)
    names = list(dict.fromkeys([*tensor_names, *axes, *gaxes]))
    feeds = list(feeds)
    if not feeds:
        raise CalibrationDataError("calibration needs at least one sample; the feeds are empty")
    if not names:
        return {}

    if not isinstance(model, onnx.ModelProto):  # a path or bytes: read it (the file is never written)
        model = load_proto(model)
    plan = _Plan(model, names)
    observers = _constant_observers(plan, names, axes, gaxes)
    sess = None
    fetch: list[tuple[str, str]] = []  # (tensor name, ORT output name)
    if plan.outputs:
        sess, fetch, dtypes = _open_session(model, plan.outputs, providers)
        for name, _ in fetch:
            observers[name] = _new_observer(name, dtypes[name], axes, gaxes)
    values = functools.partial(
        _sample_values, sess=sess, fetch=fetch, input_names=[n for n in names if n in plan.inputs], plan=plan,
        observers=observers, axes=axes, gaxes=gaxes,
    )
    _run_passes(feeds, values, observers, histogram, bins, progress)
    return {name: observers[name].result() for name in names if name in observers}


def _check_bins(bins: Any) -> None:
    """Raise RecipeError unless ``bins`` is a positive integer (bools are refused)."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise RecipeError(f"calibration histogram bins must be a positive integer, got {bins!r}")


def _axis_maps(
    channel_axes: Mapping[str, int] | None, gram_axes: Mapping[str, int] | None
) -> tuple[dict[str, int], dict[str, int]]:
    """Copies of the channel and Gram axis maps; raises RecipeError for an axis that is not an integer."""
    axes = dict(channel_axes or {})
    gaxes = dict(gram_axes or {})
    for what, mapping in (("channel", axes), ("Gram", gaxes)):
        for name, ax in mapping.items():
            if isinstance(ax, bool) or not isinstance(ax, (int, np.integer)):
                raise RecipeError(f"{what} axis of tensor '{name}' must be an integer, got {ax!r}")
    return axes, gaxes


def _new_observer(name: str, dtype: np.dtype, axes: Mapping[str, int], gaxes: Mapping[str, int]) -> TensorObserver:
    """An observer of ``name`` with its channel and Gram axes, if any were asked for."""
    return TensorObserver(name, dtype, axes.get(name), gaxes.get(name))


def _constant_observers(
    plan: _Plan, names: Sequence[str], axes: Mapping[str, int], gaxes: Mapping[str, int]
) -> dict[str, TensorObserver]:
    """Observers of the requested float tensors whose value the model holds (initializers, input defaults)."""
    observers: dict[str, TensorObserver] = {}
    for name in names:
        if name in plan.const_values:
            dtype = plan.const_values[name].dtype
            if is_float_dtype(dtype):
                observers[name] = _new_observer(name, dtype, axes, gaxes)
    return observers


def _sample_values(
    i: int,
    feed: Mapping[str, np.ndarray],
    *,
    sess: Any,
    fetch: list[tuple[str, str]],
    input_names: list[str],
    plan: _Plan,
    observers: dict[str, TensorObserver],
    axes: Mapping[str, int],
    gaxes: Mapping[str, int],
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, value) of every observed tensor in sample i; nothing is kept once the caller moves on."""
    fetch_names = [out for _, out in fetch]
    if sess is not None and fetch_names:
        outs = run_session(sess, feed, fetch_names, name="calibration model", sample=i)
        for (name, _), val in zip(fetch, outs):
            yield name, val
        del outs
    yield from _input_values(i, feed, input_names, plan, observers, axes, gaxes)
    for name in plan.const_names:
        if name in observers:
            yield name, plan.const_values[name]


def _input_values(
    i: int,
    feed: Mapping[str, np.ndarray],
    input_names: list[str],
    plan: _Plan,
    observers: dict[str, TensorObserver],
    axes: Mapping[str, int],
    gaxes: Mapping[str, int],
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, value) of the requested float graph inputs in sample i (from the feed, else their default)."""
    for name in input_names:
        if name in feed:
            val = np.asarray(feed[name])
        elif name in plan.const_values:
            val = plan.const_values[name]
        else:
            raise CalibrationDataError(f"sample {i} has no value for graph input '{name}'")
        if name not in observers:
            if not is_float_dtype(val.dtype):
                continue
            observers[name] = _new_observer(name, val.dtype, axes, gaxes)
        yield name, val


def _run_passes(
    feeds: list,
    values: Callable[[int, Mapping[str, np.ndarray]], Iterator[tuple[str, np.ndarray]]],
    observers: dict[str, TensorObserver],
    histogram: bool,
    bins: int,
    progress: Any,
) -> None:
    """Pass 1 (ranges) over every feed, then pass 2 (histograms) when ``histogram`` is set."""
    t0 = time.perf_counter()
    for i, feed in enumerate(_progress(feeds, progress, "calibration: ranges")):
        for name, val in values(i, feed):
            observers[name].observe(val)
    t1 = time.perf_counter()
    log.debug("calibration pass 1 (ranges): %d samples, %d tensors, %.3f s", len(feeds), len(observers), t1 - t0)
    if histogram:
        for obs in observers.values():
            obs.start_histogram(int(bins))
        for i, feed in enumerate(_progress(feeds, progress, "calibration: histograms")):
            for name, val in values(i, feed):
                observers[name].observe_histogram(val)
        log.debug("calibration pass 2 (histograms): %.3f s", time.perf_counter() - t1)

class _Plan:
    """Where each requested tensor's value comes from: a feed (graph input), the model (initializer), or ORT."""

    def __init__(self, model: onnx.ModelProto, names: Sequence[str]):
        graph = model.graph
        produced = {o for node in graph.node for o in node.output if o}
        inits: dict[str, Any] = {t.name: t for t in graph.initializer}
        inits.update({t.values.name: t for t in graph.sparse_initializer})
        graph_inputs = {i.name for i in graph.input}
        self.inputs: set[str] = set()
        self.outputs: list[str] = []
        self.const_names: list[str] = []
        self.const_values: dict[str, np.ndarray] = {}
        missing = []
        for name in names:
            if name in graph_inputs:
                self.inputs.add(name)
                if name in inits:  # an input with a default value: the feed wins when it has one
                    self.const_values[name] = _initializer_value(inits[name])
            elif name in produced:
                self.outputs.append(name)
            elif name in inits:
                self.const_names.append(name)
                self.const_values[name] = _initializer_value(inits[name])
            else:
                missing.append(name)
        if missing:
            one = len(missing) == 1
            shown = ", ".join(f"'{m}'" for m in missing[:5])
            if len(missing) > 5:
                shown += f" and {len(missing) - 5} more"
            raise CalibrationDataError(
                f"cannot calibrate tensor{'' if one else 's'} {shown}: no node of the main graph produces "
                f"{'it' if one else 'them'}, and {'it is' if one else 'they are'} neither a graph input nor an "
                "initializer (tensors inside If/Loop/Scan bodies cannot be observed)"
            )


def _initializer_value(t: Any) -> np.ndarray:
    """The value of a TensorProto or SparseTensorProto initializer (dense)."""
    if isinstance(t, onnx.SparseTensorProto):
        return sparse_value(t)
    t = tensor_in_memory(t)  # a weight in onnxcomp's store is read from it
    if t.data_location == onnx.TensorProto.EXTERNAL:
        raise CalibrationDataError(
            f"initializer '{t.name}' points at external data that is not loaded; load the model with its data"
        )
    return numpy_helper.to_array(t)


def _open_session(model: onnx.ModelProto, outputs: Sequence[str], providers):
    """The session, [(name, ORT output name)] of the float tensors to fetch, and their dtypes."""
    made = session_with_outputs(model, outputs, providers=providers, name="calibration model")
    for note in made.notes:
        log.warning("calibration: %s", note)
    sess = made.session
    types = {o.name: o.type for o in sess.get_outputs()}
    bf16 = [n for n in outputs if types.get(n) == _ORT_BF16]
    if bf16:  # rare: rebuild once with float32 Casts of the bfloat16 tensors
        sess = session_with_outputs(model, outputs, bf16, providers=providers, name="calibration model").session
    fetch, dtypes = [], {}
    for name in outputs:
        if name in bf16:
            fetch.append((name, name + CAST_SUFFIX))
            dtypes[name] = _bf16_dtype()
        elif types.get(name) in _ORT_FLOAT_TYPES:
            fetch.append((name, name))
            dtypes[name] = _ORT_FLOAT_TYPES[types[name]]
    return sess, fetch, dtypes


def _progress(items: list, enabled: Any, desc: str):
    """The items, reported one by one: to a callback (step, done, total), or on a tqdm bar when True."""
    if not enabled:
        return items
    if callable(enabled):
        return _reported(items, enabled, desc)
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="sample", leave=False)


def _reported(items: list, callback: Callable[[str, int, int], None], desc: str):
    for i, item in enumerate(items):
        callback(desc, i, len(items))
        yield item
    callback(desc, len(items), len(items))
