"""Feeds: the one place that turns user data into ``list[dict[str, np.ndarray]]`` and checks it against a model.

Calibration and validation both read their data here, so every accepted form behaves the same:

* an iterable of dicts (list, tuple, generator ...) mapping input names to arrays; a generator is consumed
  once, lazily, and never advanced past ``limit`` samples;
* an ``onnxruntime.quantization.CalibrationDataReader`` (anything with ``get_next()`` returning a dict, then
  ``None`` when exhausted);
* a path to an ``.npz`` file whose arrays are stacked on axis 0 (keys = input names, every array the same
  length N). Sample ``i`` is ``arr[i:i+1]``, so the batch dim of each sample stays 1: an ``[N, 64]`` array
  feeds an input ``[batch, 64]`` as N samples of ``[1, 64]``. If an array has exactly one more dim than the
  model's input (``[N, 3, 224, 224]`` for an input ``[3, 224, 224]``), sample ``i`` is ``arr[i]`` instead;
* a path to a directory of ``.npz`` files: each file is one sample (one feed dict), read in sorted file-name
  order.

Bad data raises :class:`~onnxcomp.errors.CalibrationDataError` naming the sample, the input and, where it
applies, the dim or dtype and what the model expects. Values are never downcast silently (float64 arrays for
a float32 input are an error); the only conversions made are lossless ones within a kind (int32 -> int64,
float16 -> float32) and plain Python numbers/lists, which carry no dtype of their own, to the input's dtype.
"""
from __future__ import annotations

import itertools
import os
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from ..errors import CalibrationDataError, UnsupportedModelError

__all__ = ["Feed", "InputSpec", "input_specs", "load_feeds", "check_feeds", "from_arrays", "generate_feeds",
           "split_holdout", "HOLDOUT_EVERY"]

Dim = Union[int, str, None]
Feed = dict[str, np.ndarray]  # (non-tensor inputs, rare, carry whatever ORT takes for them)

DEFAULT_DIM = 16  # value of a symbolic / unknown non-leading dim in generated feeds
_PASSTHROUGH_OPS = {"Cast", "Unsqueeze", "Reshape", "Squeeze", "Flatten", "Identity"}  # index-preserving ops


@dataclass(frozen=True)
class InputSpec:
    """One graph input: ``shape`` is None when the rank is unknown, else one int / symbolic str / None a dim."""

    name: str
    elem_type: int  # onnx.TensorProto data type (0 for non-tensor inputs)
    dtype: np.dtype | None  # numpy dtype (None when numpy has none, or for non-tensor inputs)
    shape: tuple[Dim, ...] | None

    @property
    def type_str(self) -> str:
        """ORT-style type name, e.g. ``tensor(float)``."""
        if self.elem_type == 0:
            return "non-tensor"
        return f"tensor({onnx.helper.tensor_dtype_to_string(self.elem_type).split('.')[-1].lower()})"

    def shape_str(self) -> str:
        if self.shape is None:
            return "[?]"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def _np_dtype(elem_type: int) -> np.dtype | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs, in graph order (graph inputs that are also initializers are left out)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type
        if t.WhichOneof("value") != "tensor_type":
            specs.append(InputSpec(vi.name, 0, None, None))
            continue
        tt = t.tensor_type
        shape: tuple[Dim, ...] | None = None
        if tt.HasField("shape"):
            dims: list[Dim] = []
            for d in tt.shape.dim:
                which = d.WhichOneof("value")
                dims.append(d.dim_value if which == "dim_value" else d.dim_param if which == "dim_param" else None)
            shape = tuple(dims)
        specs.append(InputSpec(vi.name, tt.elem_type, _np_dtype(tt.elem_type), shape))
    return specs


# --------------------------------------------------------------------------------------------- load
#: without validation data, every HOLDOUT_EVERY-th calibration sample is held back for validation
HOLDOUT_EVERY = 5


def split_holdout(feeds: list[Feed], every: int = HOLDOUT_EVERY) -> tuple[list[Feed], list[Feed]]:
    """(calibration, validation): every `every`-th sample (the last when fewer) held back for validation, so the
    accuracy reported is measured on samples calibration did not see. One sample cannot be split: ([f], [f])."""
    keep_checked = (lambda part: CheckedFeeds(part, feeds.specs)) if isinstance(feeds, CheckedFeeds) else list
    if len(feeds) < 2:
        return keep_checked(feeds), keep_checked(feeds)
    held = [i for i in range(len(feeds)) if i % every == every - 1] or [len(feeds) - 1]
    keep = set(held)
    return keep_checked([f for i, f in enumerate(feeds) if i not in keep]), keep_checked([feeds[i] for i in held])


def load_feeds(
    source: Any, specs: Sequence[InputSpec], *, what: str = "calibration data", limit: int | None = None
) -> list[Feed]:
    """Read ``source`` (see the module doc for the accepted forms), check it, return at most ``limit`` feeds."""
    if limit is not None and limit < 1:
        raise CalibrationDataError(f"{what}: limit must be >= 1, got {limit}")
    if source is None:
        raise CalibrationDataError(f"{what}: no data given (got None)")
    if isinstance(source, (str, os.PathLike)):
        feeds = _from_path(Path(os.fspath(source)), specs, what, limit)
    elif hasattr(source, "get_next") and callable(source.get_next):
        feeds = list(_from_reader(source, limit))
    elif isinstance(source, Mapping):
        raise CalibrationDataError(
            f"{what}: got a single mapping ({type(source).__name__}) with keys {_names(list(source)[:8])}; "
            "pass a list of feed dicts ([feed] for one sample), or a path to an .npz with arrays stacked on axis 0"
        )
    elif isinstance(source, np.ndarray):
        raise CalibrationDataError(
            f"{what}: got a bare numpy array of shape {list(source.shape)}; pass a list of dicts mapping the "
            f"model's input names ({_names(s.name for s in specs)}) to arrays"
        )
    elif isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise CalibrationDataError(
            f"{what}: unsupported source of type {type(source).__name__}; expected an iterable of dicts, a "
            "CalibrationDataReader, a path to an .npz file, or a directory of .npz files"
        )
    elif isinstance(source, CheckedFeeds) and source.specs == tuple(specs):
        return source if limit is None or len(source) <= limit else CheckedFeeds(source[:limit], specs)
    else:
        feeds = list(itertools.islice(iter(source), limit))
    return check_feeds(feeds, specs, what)


def _from_reader(reader: Any, limit: int | None) -> Iterator[Any]:
    count = 0
    while limit is None or count < limit:
        item = reader.get_next()
        if item is None:
            return
        count += 1
        yield item


def _read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError) as e:
        raise CalibrationDataError(
            f"{what}: cannot read {path} as an .npz archive ({type(e).__name__}: {e}); is the file truncated or corrupt?"
        ) from None
    if not isinstance(z, Mapping):  # an .npy file gives a bare ndarray
        raise CalibrationDataError(f"{what}: {path} holds a single unnamed array (.npy), not an .npz archive of named arrays")
    try:
        with z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError) as e:
        raise CalibrationDataError(
            f"{what}: cannot read {path} as an .npz archive ({type(e).__name__}: {e}); is the file truncated or corrupt?"
        ) from None


def _from_path(path: Path, specs: Sequence[InputSpec], what: str, limit: int | None) -> list[Any]:
    if not path.exists():
        raise CalibrationDataError(f"{what}: path not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".npz")
        if not files:
            raise CalibrationDataError(f"{what}: directory {path} contains no .npz files (one file per sample)")
        return [_read_npz(p, what) for p in files[:limit]]
    return _split_stacked(_read_npz(path, what), specs, f"{what}: {path}", limit)


def _split_stacked(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str,
                   limit: int | None, batch_size: int = 1) -> list[Feed]:
    """Arrays stacked on axis 0 (one length N) -> feeds of `batch_size` rows (see the module doc)."""
    if not arrays:
        raise CalibrationDataError(f"{where} holds no arrays")
    arrays = {k: np.asarray(a) for k, a in arrays.items()}
    by_name = {s.name: s for s in specs}
    lengths = {}
    for k, a in arrays.items():
        if a.ndim == 0:
            raise CalibrationDataError(
                f"{where}: array '{k}' is a scalar; arrays must be stacked on axis 0 (one row per sample)"
            )
        lengths[k] = a.shape[0]
    if len(set(lengths.values())) > 1:
        raise CalibrationDataError(
            f"{where}: arrays are stacked on axis 0 and must have one length, got "
            + ", ".join(f"'{k}': {n}" for k, n in lengths.items())
        )
    n = next(iter(lengths.values()))
    squeeze = {}
    for k, a in arrays.items():
        s = by_name.get(k)
        squeeze[k] = s is not None and s.shape is not None and a.ndim == len(s.shape) + 1
    if any(squeeze.values()):  # one sample per row, without a batch dim
        batch_size = 1
    starts = list(range(0, n, batch_size))[:limit]
    return [{k: (a[i] if squeeze[k] else a[i : i + batch_size]) for k, a in arrays.items()} for i in starts]


def from_arrays(arrays: Mapping[str, np.ndarray], model: Any = None, batch_size: int = 1) -> list[Feed]:
    """Feeds of `batch_size` rows from arrays stacked on axis 0 (keys = input names, as in an .npz), checked
    against `model`'s inputs when given (names, dtypes, ranks; errors name the input)."""
    if batch_size < 1:
        raise CalibrationDataError(f"from_arrays: batch_size must be >= 1, got {batch_size}")
    from .model import model_specs

    specs = model_specs(model)
    feeds = _split_stacked(arrays, specs or [], "from_arrays", None, batch_size)
    return check_feeds(feeds, specs, "from_arrays") if specs else feeds


# --------------------------------------------------------------------------------------------- check
def _names(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names) or "(none)"


def _is_python_data(v: Any) -> bool:
    return isinstance(v, (list, tuple, int, float, bool)) and not isinstance(v, np.generic)


def _convert(value: Any, spec: InputSpec, where: str) -> np.ndarray:
    """Return an array of spec.dtype, or raise naming the dtype problem. Only lossless conversions."""
    want = spec.dtype
    if want is None:
        return value if isinstance(value, np.ndarray) else np.asarray(value)
    if _is_python_data(value):
        try:
            arr = np.asarray(value)
        except ValueError as e:  # ragged lists
            raise CalibrationDataError(f"{where}: cannot make an array of the given list ({e})") from None
        if arr.dtype == want:
            return arr
        ok = (
            (arr.dtype.kind == "b" and want.kind == "b")
            or (arr.dtype.kind in "iub" and want.kind in "iu")
            or (arr.dtype.kind in "iubf" and want.kind == "f")
        )
        if not ok:
            raise CalibrationDataError(
                f"{where}: values of type {arr.dtype} cannot be converted to the input's dtype {want} ({spec.type_str})"
            )
        if want.kind in "iu" and arr.size:
            info = np.iinfo(want)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise CalibrationDataError(
                    f"{where}: values range {lo}..{hi} does not fit the input's dtype {want} ({spec.type_str})"
                )
        return arr.astype(want)
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.dtype == want:
        return arr
    src = arr.dtype
    same_kind = src.kind == want.kind or (src.kind == "u" and want.kind == "i")
    if same_kind and src.kind in "iuf" and np.can_cast(src, want, casting="safe"):
        return arr.astype(want)
    hint = f"; cast it explicitly, e.g. arr.astype(np.{want.name})" if src.kind in "iufb" and want.kind in "iufb" else ""
    lossy = " (onnxcomp does not downcast silently)" if src.kind == want.kind else ""
    raise CalibrationDataError(
        f"{where}: dtype is {src}, but the model expects {want} ({spec.type_str}){lossy}{hint}"
    )


def _check_names(feed: Any, i: int, specs: Sequence[InputSpec], by_name: Mapping[str, InputSpec], what: str) -> None:
    """Raise unless sample ``i`` is a mapping holding exactly the model's input names."""
    expected = _names(s.name for s in specs)
    if not isinstance(feed, Mapping):
        raise CalibrationDataError(
            f"{what} sample {i} is of type {type(feed).__name__}, expected a dict mapping input names "
            f"({expected}) to numpy arrays"
        )
    missing = [s.name for s in specs if s.name not in feed]
    if missing:
        raise CalibrationDataError(
            f"{what} sample {i} lacks input(s) {_names(missing)}; the model expects: {expected}"
        )
    unknown = [str(k) for k in feed if k not in by_name]
    if unknown:
        raise CalibrationDataError(
            f"{what} sample {i} has unknown input name(s) {_names(unknown)}; the model's inputs are: {expected}"
        )


def _check_shape(arr: np.ndarray, spec: InputSpec, where: str, sym: dict[str, tuple[int, str]]) -> None:
    """Raise on a wrong rank, a fixed dim that differs, or a symbolic dim already seen with another value;
    ``sym`` maps each symbolic dim name of this sample to the (value, input name) where it was first seen."""
    if spec.shape is None:
        return
    if arr.ndim != len(spec.shape):
        raise CalibrationDataError(
            f"{where}: rank is {arr.ndim} (shape {list(arr.shape)}), but the model expects rank "
            f"{len(spec.shape)} {spec.shape_str()}"
        )
    for ax, (want, got) in enumerate(zip(spec.shape, arr.shape)):
        if isinstance(want, int) and want > 0 and want != got:
            raise CalibrationDataError(
                f"{where}: dim {ax} is {got}, but the model fixes it to {want} "
                f"(expected shape {spec.shape_str()}, got {list(arr.shape)})"
            )
        if isinstance(want, str) and want:
            seen = sym.setdefault(want, (got, spec.name))
            if seen[0] != got:
                raise CalibrationDataError(
                    f"{where}: dim {ax} ('{want}') is {got}, but the same dim is {seen[0]} in input "
                    f"'{seen[1]}' of this sample"
                )


def nonfinite_values(feeds: Iterable[Feed]) -> dict[str, int]:
    """NaN/inf count per float input over `feeds` (inputs without any are left out). Such values are legitimate
    inputs (IsNaN models, -inf attention masks): range statistics skip them and validation compares their
    positions; the report says how many there were."""
    out: dict[str, int] = {}
    for f in feeds:
        for k, arr in f.items():
            if getattr(arr, "dtype", None) is None or arr.dtype.kind not in "fcV":  # V: bfloat16 / float8
                continue
            try:
                n = int(np.count_nonzero(~np.isfinite(arr)))
            except TypeError:
                continue
            if n:
                out[k] = out.get(k, 0) + n
    return out


def _check_sample(feed: Mapping[str, Any], i: int, specs: Sequence[InputSpec], what: str) -> Feed:
    """A new dict of sample ``i``'s values, each converted and checked against its input's spec."""
    new: Feed = {}
    sym: dict[str, tuple[int, str]] = {}
    for spec in specs:
        where = f"{what} sample {i}, input '{spec.name}'"
        if spec.elem_type == 0:  # sequence/optional/map input: passed through to ORT as given
            new[spec.name] = feed[spec.name]
            continue
        arr = _convert(feed[spec.name], spec, where)
        _check_shape(arr, spec, where, sym)
        new[spec.name] = arr
    return new


class CheckedFeeds(list):
    """Feeds `check_feeds` accepted for `specs`: checking them again against the same inputs returns them as they
    are (compress checks the user's data once; validation, calibration and back-off rounds reuse it)."""

    def __init__(self, feeds: Iterable[Feed], specs: Sequence[InputSpec]):
        super().__init__(feeds)
        self.specs = tuple(specs)


def check_feeds(feeds: Iterable[Any], specs: Sequence[InputSpec], what: str = "calibration data") -> list[Feed]:
    """Check every sample against the model's inputs and return new dicts of arrays (inputs are not mutated).

    Raises CalibrationDataError for: no samples, a sample that is not a dict, missing or unknown input names,
    a dtype that would need a lossy cast, a wrong rank, a fixed dim that differs, a symbolic dim that takes
    two values within one sample (``sequence_length`` of input_ids vs attention_mask). NaN/inf are accepted (see
    ``nonfinite_values``).
    """
    if isinstance(feeds, CheckedFeeds) and feeds.specs == tuple(specs):
        return feeds
    feeds = list(feeds)
    if not feeds:
        raise CalibrationDataError(f"{what} is empty: got no samples")
    by_name = {s.name: s for s in specs}
    out: list[Feed] = []
    for i, feed in enumerate(feeds):
        _check_names(feed, i, specs, by_name, what)
        out.append(_check_sample(feed, i, specs, what))
    return CheckedFeeds(out, specs)


# --------------------------------------------------------------------------------------------- generate
def _gather_rows(model: onnx.ModelProto) -> dict[str, int]:
    """For each graph input, the number of rows of the smallest initializer table it indexes via Gather,
    following Cast/Unsqueeze/Reshape/Squeeze/Flatten/Identity (iterative, O(nodes))."""
    g = model.graph
    tables: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    tables[n.output[0]] = tuple(a.t.dims)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for k, name in enumerate(n.input):
            if name:
                consumers.setdefault(name, []).append((n, k))
    rows: dict[str, int] = {}
    for vi in g.input:
        if vi.name in tables:
            continue
        best: int | None = None
        seen = {vi.name}
        work = deque([vi.name])
        while work:
            t = work.popleft()
            for n, k in consumers.get(t, ()):
                if n.op_type == "Gather" and k == 1 and n.input[0] in tables:
                    dims = tables[n.input[0]]
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                        r = int(dims[axis])
                        best = r if best is None else min(best, r)
                elif n.op_type in _PASSTHROUGH_OPS and k == 0:
                    for o in n.output:
                        if o and o not in seen:
                            seen.add(o)
                            work.append(o)
        if best is not None:
            rows[vi.name] = best
    return rows


def _resolve_dims(specs: Sequence[InputSpec], dim_values: Mapping[str, int]) -> dict[str, list[int]]:
    leading = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str) and s.shape[0]}
    chosen: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for s in specs:
        if s.shape is None:
            raise UnsupportedModelError(
                f"cannot generate random feeds: input '{s.name}' has no shape (unknown rank) in the model; pass inputs="
            )
        dims = []
        for ax, d in enumerate(s.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif isinstance(d, str) and d:
                if d not in chosen:
                    chosen[d] = int(dim_values.get(d, 1 if d in leading else DEFAULT_DIM))
                dims.append(chosen[d])
            else:  # unknown (no name) or 0
                dims.append(1 if ax == 0 else DEFAULT_DIM)
        shapes[s.name] = dims
    return shapes


def check_input_shapes(specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """The given input shapes as int lists, checked against the model (name, rank, fixed dims)."""
    by_name = {sp.name: sp for sp in specs}
    out: dict[str, list[int]] = {}
    for name, shape in shapes.items():
        sp = by_name.get(name)
        if sp is None:
            raise CalibrationDataError(f"shape given for '{name}', which is not an input of the model "
                                       f"(inputs: {', '.join(by_name) or 'none'})")
        try:
            dims = [int(d) for d in shape]
        except (TypeError, ValueError):
            raise CalibrationDataError(f"shape for '{name}' must be a list of integers, got {shape!r}") from None
        if any(d < 0 for d in dims):
            raise CalibrationDataError(f"shape for '{name}' has a negative dim: {dims}")
        if sp.shape is not None:
            if len(dims) != len(sp.shape):
                raise CalibrationDataError(f"shape for '{name}' has rank {len(dims)}, the model's input has rank "
                                           f"{len(sp.shape)} ({sp.shape_str()})")
            bad = [i for i, (d, m) in enumerate(zip(dims, sp.shape)) if isinstance(m, int) and m > 0 and d != m]
            if bad:
                raise CalibrationDataError(f"shape for '{name}' is {dims}, but dim {bad[0]} of the model's input is "
                                           f"fixed at {sp.shape[bad[0]]} ({sp.shape_str()})")
        out[name] = dims
    return out


_LETTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def generate_feeds(
    model: onnx.ModelProto,
    specs: Sequence[InputSpec] | None = None,
    n: int = 1,
    *,
    seed: int = 0,
    dim_values: Mapping[str, int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[Feed]:
    """``n`` random-but-valid feeds for ``model``.

    ``shapes``: the whole shape of some inputs (``{"input_ids": [1, 128]}``); it must keep the input's rank and
    fixed dims, and a symbolic dim it sets takes that value in every input that shares it (attention_mask follows
    input_ids). Other dims: fixed dims as declared; a symbolic dim takes ``dim_values[name]`` if given, else 1 when it is the
    leading (batch) dim of some input, else 16; one symbolic name has one value across all inputs (batch_size,
    sequence_length); unnamed unknown dims are 1 when leading, else 16.
    Values: floats ~ N(0, 1); bool random; strings: random words of 1..8 letters; integers: names containing "mask" -> ones, "token_type"/"segment"
    -> zeros, "position" -> arange along the last dim, an input that indexes an initializer table through
    Gather (directly or via Cast/Unsqueeze/Reshape) -> uniform in [0, rows), any other integer -> {0, 1}.
    """
    if specs is None:
        specs = input_specs(model)
    if n < 1:
        raise CalibrationDataError(f"generate_feeds: n must be >= 1, got {n}")
    for s in specs:
        if s.dtype is None or (s.dtype.kind not in "biufO" and s.dtype.name != "bfloat16"):
            kind = "non-tensor" if s.elem_type == 0 else s.type_str
            raise UnsupportedModelError(
                f"cannot generate random feeds for input '{s.name}' of type {kind}; pass inputs= explicitly"
            )
    shapes_given = check_input_shapes(specs, shapes or {})
    dims = dict(dim_values or {})
    for sp in specs:  # a symbolic dim named in a given shape takes its value everywhere
        for d, v in zip(sp.shape or (), shapes_given.get(sp.name, ())):
            if isinstance(d, str) and d:
                dims[d] = v
    shapes = {**_resolve_dims(specs, dims), **shapes_given}
    rows = _gather_rows(model)
    rng = np.random.default_rng(seed)
    feeds: list[Feed] = []
    for _ in range(n):
        feed: Feed = {}
        for s in specs:
            shape = shapes[s.name]
            dt = s.dtype
            assert dt is not None
            lname = s.name.lower()
            if dt.kind == "b":
                arr = rng.random(shape) < 0.5
            elif dt.kind == "O":  # strings: short random words, mixed case (string ops care about case)
                arr = np.array(["".join(rng.choice(_LETTERS, size=int(rng.integers(1, 9))))
                                for _ in range(int(np.prod(shape)))], dtype=object).reshape(shape)
            elif dt.kind in "iu":
                if "mask" in lname:
                    arr = np.ones(shape, dtype=dt)
                elif "token_type" in lname or "segment" in lname:
                    arr = np.zeros(shape, dtype=dt)
                elif "position" in lname:
                    last = shape[-1] if shape else 1
                    pos = np.arange(last) % rows[s.name] if s.name in rows else np.arange(last)
                    arr = np.broadcast_to(pos, shape).astype(dt) if shape else np.asarray(0, dtype=dt)
                elif s.name in rows:
                    hi = min(rows[s.name], int(np.iinfo(dt).max) + 1)
                    arr = rng.integers(0, hi, size=shape).astype(dt)
                else:
                    arr = rng.integers(0, 2, size=shape).astype(dt)
            else:
                arr = rng.standard_normal(shape).astype(np.float32).astype(dt)
            feed[s.name] = np.array(arr, order="C")  # (np.ascontiguousarray would turn a 0-d input into 1-d)
        feeds.append(feed)
    return feeds
