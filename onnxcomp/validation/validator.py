"""``validate(reference, candidate)``: numerics per output, interleaved latency, and size, in one report."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np
import onnx

from ..data import InputSpec, check_feeds, generate_feeds, input_specs, load_feeds
from ..errors import CalibrationDataError, InvalidModelError, MetricError, OnnxCompError
from .. import ir
from ..ir import load_proto, model_bytes
from ..progress import Counter, Progress
from .numerics import HIGHER_IS_BETTER, METRICS, OutputAccumulator, OutputError
from ..runtime import MadeSession, ProviderLike, make_session, measure_latency, run_session, time_session

__all__ = ["ValidationReport", "validate", "GENERATED_SAMPLES"]

ModelSource = Union[onnx.ModelProto, str, os.PathLike, bytes]
GENERATED_SAMPLES = 8  # random feeds made when no inputs are given (capped by max_samples)
DEFAULT_TIME_BUDGET_S = 10.0


def _json_float(v: float | None) -> float | None:
    """A plain Python float (or None). NaN/inf stay floats so comparisons such as ``cosine >= 0.99`` still
    fail for them; ``json.dumps`` writes them as NaN/Infinity (``nonfinite`` and ``notes`` say why)."""
    return None if v is None else float(v)


def _fmt(v: float | None, cos: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if cos:
        return f"{v:.6f}"
    return "0" if v == 0 else f"{v:.3g}"


def _fmt_bytes(n: int) -> str:
    for unit, k in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


@dataclass
class ValidationReport:
    """Result of :func:`validate`. ``outputs`` holds one :class:`OutputError` per output present in both models."""

    outputs: dict[str, OutputError]
    latency_ratio: float | None  # candidate / reference median latency; None when latency=False
    latency_ms: dict[str, float] | None  # {"reference": ms, "candidate": ms}
    size_ratio: float  # candidate / reference serialized size
    size_bytes: dict[str, int]  # {"reference": bytes, "candidate": bytes}
    providers: list[str]  # execution providers the sessions actually used
    samples: int  # feeds compared
    feeds_source: str  # "user" | "generated"
    notes: list[str] = field(default_factory=list)
    missing_outputs: list[str] = field(default_factory=list)  # reference outputs the candidate lacks
    latency_pairs: int = 0  # interleaved timed pairs behind the medians
    metric: float | None = None  # the caller's task metric on these samples (validate(metric=...)), if given
    metric_name: str | None = None
    timed_shapes: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> distinct shapes of the feeds
    # time to create each session ({"reference": ms, "candidate": ms}, one creation each): where ORT folds
    # constants, e.g. palettize's decode
    session_ms: dict[str, float] | None = None

    def shapes_text(self) -> str:
        """The input shapes the comparison and timing ran on, e.g. ``input_ids [1, 128], attention_mask [1, 128]``
        (a count when the samples vary)."""
        return ", ".join(f"{k} {v[0]}" if len(v) == 1 else f"{k} {len(v)} shapes ({v[0]} .. {v[-1]})"
                         for k, v in self.timed_shapes.items())

    # ----------------------------------------------------------------------------------- queries
    def worst(self, metric: str = "cosine") -> tuple[str, float] | None:
        """(output name, value) of the worst output for ``metric`` (lowest cosine/exact_match, highest error);
        NaN counts as worst. None when no output was compared."""
        valid = METRICS + ("exact_match", "nonfinite")
        if metric not in valid:
            raise ValueError(f"unknown metric '{metric}'; valid: {', '.join(valid)}")
        higher_better = HIGHER_IS_BETTER.get(metric, False)
        best_name, best_key, best_val = None, None, None
        for name, o in self.outputs.items():
            v = o.metric(metric)
            if metric == "exact_match" and o.exact_match is None:
                continue
            key = (-math.inf if higher_better else math.inf) if math.isnan(v) else v
            key = -key if higher_better else key  # larger key = worse
            if best_key is None or key > best_key:
                best_name, best_key, best_val = name, key, v
        return None if best_name is None else (best_name, best_val)

    @property
    def ok(self) -> bool:
        """Every output compared cleanly (finite metrics, no shape mismatch) and none is missing."""
        return not self.missing_outputs and all(o.ok for o in self.outputs.values())

    # ----------------------------------------------------------------------------------- exports
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of plain floats/ints/str/lists (``json.dumps``-able; a candidate with NaN/inf outputs
        has NaN/inf metrics, which json writes as NaN/Infinity).
        Per output: max_abs_err, mean_abs_err, rel_l2_err, cosine, shape (None for dims that varied), dtype,
        nonfinite; the exact-match fraction of integer/bool outputs is under the top-level ``exact_match``."""
        outs = {}
        for name, o in self.outputs.items():
            outs[name] = {
                "max_abs_err": _json_float(o.max_abs_err),
                "mean_abs_err": _json_float(o.mean_abs_err),
                "rel_l2_err": _json_float(o.rel_l2_err),
                "cosine": _json_float(o.cosine),
                "shape": [None if d is None else int(d) for d in o.shape],
                "dtype": str(o.dtype),
                "nonfinite": int(o.nonfinite),
            }
        return {
            "outputs": outs,
            "exact_match": {n: float(o.exact_match) for n, o in self.outputs.items() if o.exact_match is not None},
            "missing_outputs": list(self.missing_outputs),
            "latency_ratio": _json_float(self.latency_ratio),
            "latency_ms": None
            if self.latency_ms is None
            else {k: _json_float(v) for k, v in self.latency_ms.items()},
            "latency_pairs": int(self.latency_pairs),
            "size_ratio": _json_float(self.size_ratio),
            "size_bytes": {k: int(v) for k, v in self.size_bytes.items()},
            "providers": [str(p) for p in self.providers],
            "samples": int(self.samples),
            "feeds_source": str(self.feeds_source),
            "timed_shapes": {k: [list(map(int, x)) for x in v] for k, v in self.timed_shapes.items()},
            "session_ms": None if self.session_ms is None else {k: _json_float(v) for k, v in self.session_ms.items()},
            "notes": [str(n) for n in self.notes],
            "metric": None if self.metric_name is None else {"name": self.metric_name,
                                                             "value": _json_float(self.metric)},
        }

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        head = ["output", "shape", "dtype", "max_abs_err", "mean_abs_err", "rel_l2_err", "cosine", "nonfinite"]
        rows = []
        for name, o in self.outputs.items():
            shape = "[" + ", ".join("?" if d is None else str(d) for d in o.shape) + "]"
            rows.append([
                name, shape, o.dtype, _fmt(o.max_abs_err), _fmt(o.mean_abs_err), _fmt(o.rel_l2_err),
                _fmt(o.cosine, cos=True), str(o.nonfinite),
            ])
        return head, rows

    def _summary_lines(self) -> list[str]:
        lines = []
        if self.latency_ms is not None and self.latency_ratio is not None:
            lines.append(
                f"latency: reference {self.latency_ms['reference']:.3f} ms, candidate "
                f"{self.latency_ms['candidate']:.3f} ms, ratio {self.latency_ratio:.3f} "
                f"(median of {self.latency_pairs} interleaved pairs) on {self.feeds_source} inputs "
                f"{self.shapes_text() or '(no inputs)'}"
            )
        else:
            lines.append("latency: not measured")
        if self.session_ms is not None:
            lines.append(f"session creation: reference {self.session_ms['reference']:.1f} ms, candidate "
                         f"{self.session_ms['candidate']:.1f} ms (one creation each)")
        lines.append(
            f"size: reference {_fmt_bytes(self.size_bytes['reference'])}, candidate "
            f"{_fmt_bytes(self.size_bytes['candidate'])}, ratio {self.size_ratio:.3f}"
        )
        if self.metric_name is not None:
            lines.append(f"task metric {self.metric_name}: {_fmt(self.metric, cos=True)}")
        if self.missing_outputs:
            lines.append("missing in candidate: " + ", ".join(self.missing_outputs))
        return lines

    def _title(self) -> str:
        return (
            f"validation: {len(self.outputs)} output(s) on {self.samples} {self.feeds_source} sample(s), "
            f"providers {', '.join(self.providers)}"
        )

    def to_markdown(self) -> str:
        head, rows = self._rows()
        out = [f"### {self._title()}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        out.append("")
        out += [f"- {line}" for line in self._summary_lines()]
        if self.notes:
            out += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def __str__(self) -> str:
        head, rows = self._rows()
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        out = [self._title(), line(head)] + [line(r) for r in rows] + self._summary_lines()
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


# ----------------------------------------------------------------------------------------- validate
def _load(src: ModelSource, role: str) -> tuple[onnx.ModelProto, str, Union[str, None]]:
    if isinstance(src, (onnx.ModelProto, bytes, bytearray)):
        try:  # the validator only reads: no copy of a ModelProto (over 2 GB, a copy is one model more)
            return load_proto(src, copy=False), f"{role} model", None
        except InvalidModelError as e:
            raise InvalidModelError(f"{role} model: {e}") from None
    if isinstance(src, (str, os.PathLike)):
        try:  # external data stays on disk: ORT reads the path, the structure is enough here
            proto = load_proto(src, load_external_data=False)
        except InvalidModelError as e:
            raise InvalidModelError(f"{role} model: {e}") from None
        return proto, f"{role} model {os.fspath(src)}", os.fspath(src)
    raise InvalidModelError(
        f"{role} model: expected an onnx.ModelProto, serialized bytes or a path to an .onnx file, "
        f"got {type(src).__name__}"
    )


def _shapes_of(feeds: list[dict[str, np.ndarray]]) -> dict[str, list[list[int]]]:
    """Input name -> the distinct shapes its arrays have over the feeds (in order of first appearance); inputs
    that are not tensors (sequences, optionals) are left out."""
    out: dict[str, list[list[int]]] = {}
    for f in feeds:
        for k, v in f.items():
            if not isinstance(v, np.ndarray):
                continue
            shape = [int(d) for d in v.shape]
            if shape not in out.setdefault(k, []):
                out[k].append(shape)
    return out


def _dims_note(feeds: list[dict[str, np.ndarray]]) -> str:
    first = feeds[0]
    parts = [f"{k} {v.dtype.name} {list(v.shape)}" for k, v in first.items()]
    return "; ".join(parts) or "no inputs"


def _candidate_feeds(
    feeds: list[dict[str, np.ndarray]], ref_specs: Sequence[InputSpec], cand_specs: Sequence[InputSpec], notes: list[str]
) -> list[dict[str, np.ndarray]]:
    """The candidate's version of the feeds: cast where its input dtype differs (e.g. a float16 model)."""
    by_ref = {s.name: s for s in ref_specs}
    casts = {}
    for s in cand_specs:
        r = by_ref[s.name]
        if s.dtype is not None and r.dtype is not None and s.dtype != r.dtype:
            casts[s.name] = s.dtype
            notes.append(
                f"candidate input '{s.name}' is {s.dtype.name} where the reference's is {r.dtype.name}: "
                "feeds are cast for the candidate"
            )
    if not casts:
        out = feeds
    else:
        out = [{k: (v.astype(casts[k]) if k in casts else v) for k, v in f.items()} for f in feeds]
    return check_feeds(out, cand_specs, "validation data (for the candidate)")


def _check_same_inputs(ref_specs: Sequence[InputSpec], cand_specs: Sequence[InputSpec], cand_label: str) -> None:
    """Raise InvalidModelError unless both models take the same input names (naming what differs)."""
    rn, cn = [s.name for s in ref_specs], [s.name for s in cand_specs]
    if set(rn) == set(cn):
        return
    lacks = [n for n in rn if n not in cn]
    extra = [n for n in cn if n not in rn]
    parts = []
    if lacks:
        parts.append(f"lacks input(s) {', '.join(repr(n) for n in lacks)}")
    if extra:
        parts.append(f"has extra input(s) {', '.join(repr(n) for n in extra)}")
    raise InvalidModelError(
        f"{cand_label} {' and '.join(parts)}; the reference's inputs are {', '.join(repr(n) for n in rn)}"
    )


def _outputs_to_compare(
    ref: onnx.ModelProto, cand: onnx.ModelProto, cand_label: str, notes: list[str]
) -> tuple[list[str], list[str]]:
    """(compared, missing): reference outputs the candidate has and lacks; raises when it has none of them."""
    ref_outs = [o.name for o in ref.graph.output]
    cand_out_set = {o.name for o in cand.graph.output}
    compared = [n for n in ref_outs if n in cand_out_set]
    missing = [n for n in ref_outs if n not in cand_out_set]
    extra_outs = sorted(cand_out_set - set(ref_outs))
    if not compared:
        raise InvalidModelError(
            f"{cand_label} has none of the reference's outputs ({', '.join(repr(n) for n in ref_outs)}); "
            f"its outputs are {', '.join(repr(n) for n in sorted(cand_out_set))}"
        )
    if missing:
        notes.append(f"candidate lacks output(s) {', '.join(missing)}: not compared")
    if extra_outs:
        notes.append(f"candidate-only output(s) ignored: {', '.join(extra_outs)}")
    return compared, missing


def _reference_feeds(
    ref: onnx.ModelProto,
    ref_specs: Sequence[InputSpec],
    inputs: Any,
    max_samples: int,
    seed: int,
    dim_values: Mapping[str, int] | None,
    notes: list[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """(feeds, feeds_source): the user's checked inputs, or generated ones when ``inputs`` is None."""
    if inputs is None:
        feeds = generate_feeds(ref, ref_specs, n=min(GENERATED_SAMPLES, max_samples), seed=seed, dim_values=dim_values,
                               shapes=input_shapes)
        notes.append(f"inputs generated (seed {seed}): {_dims_note(feeds)}")
        return feeds, "generated"
    return load_feeds(inputs, ref_specs, what="validation data", limit=max_samples), "user"


def _session_notes(ref_s: MadeSession, cand_s: MadeSession, notes: list[str]) -> None:
    """Add the sessions' provider notes (once each), and a note when the two use different providers."""
    for n in ref_s.notes + cand_s.notes:
        if n not in notes:
            notes.append(n)
    if ref_s.providers != cand_s.providers:
        notes.append(
            f"the sessions use different providers: reference {ref_s.providers}, candidate {cand_s.providers}"
        )


def _run_reference(
    ref_s: MadeSession,
    feed: dict[str, np.ndarray],
    compared: list[str],
    ref_label: str,
    i: int,
    feeds: list[dict[str, np.ndarray]],
    feeds_source: str,
) -> list[Any]:
    """The reference's outputs for sample ``i``; a failure on generated feeds says how to feed real data."""
    try:
        return run_session(ref_s.session, feed, compared, name=ref_label, sample=i)
    except OnnxCompError as e:
        if feeds_source == "generated":
            raise type(e)(
                f"{e} [inputs were generated: {_dims_note(feeds)}; pass inputs= with real data, or "
                "dim_values= for the symbolic dims]"
            ) from None
        raise


def _compare_outputs(
    ref_s: MadeSession,
    cand_s: MadeSession,
    feeds: list[dict[str, np.ndarray]],
    cand_feeds: list[dict[str, np.ndarray]],
    compared: list[str],
    labels: tuple[str, str],
    feeds_source: str,
    kept: tuple[dict[str, list], dict[str, list]] | None = None,
    progress: Progress | None = None,
) -> dict[str, OutputError]:
    """Run both models on every sample and accumulate the per-output errors of ``compared`` (and, when ``kept``
    is given, append every output array to its lists for a task metric); `progress` counts the samples."""
    ref_label, cand_label = labels
    accs = {n: OutputAccumulator(n) for n in compared}
    counter = Counter(progress, "validation: outputs", len(feeds))
    for i, (feed, cfeed) in enumerate(zip(feeds, cand_feeds)):
        r_out = _run_reference(ref_s, feed, compared, ref_label, i, feeds, feeds_source)
        c_out = run_session(cand_s.session, cfeed, compared, name=cand_label, sample=i)
        for name, r, c in zip(compared, r_out, c_out):
            accs[name].update(r, c)
            if kept is not None:
                kept[0].setdefault(name, []).append(r)
                kept[1].setdefault(name, []).append(c)
        counter.tick()
    return {n: a.result() for n, a in accs.items()}


def _one_session_at_a_time(ref: tuple, cand: tuple, providers, feeds, cand_feeds, compared: list[str],
                           labels: tuple[str, str], feeds_source: str, kept, timing_args: tuple, notes: list[str],
                           progress: Progress | None = None):
    """For models over 2 GB: the reference's session runs every sample (and is timed alone), is dropped, then the
    candidate's; returns (per-output errors, timing, providers, session-creation ms). Peak memory holds one
    session, not two."""
    latency, warmup, runs, budget = timing_args
    (ref_m, ref_path), (cand_m, cand_path) = ref, cand
    ref_s = make_session(ref_m, providers, name=labels[0], path=ref_path)
    counter = Counter(progress, "validation: outputs", 2 * len(feeds))
    ref_out = []
    for i, f in enumerate(feeds):
        ref_out.append(_run_reference(ref_s, f, compared, labels[0], i, feeds, feeds_source))
        counter.tick()
    ref_ms = time_session(ref_s.session, feeds, warmup=warmup, runs=runs, time_budget_s=budget / 2,
                          name=labels[0]) if latency else None
    ref_providers, ref_notes = list(ref_s.providers), list(ref_s.notes)
    notes_ms = {"reference": ref_s.create_ms}
    del ref_s
    cand_s = make_session(cand_m, providers, name=labels[1], path=cand_path)
    notes_ms["candidate"] = cand_s.create_ms
    notes.extend(n for n in dict.fromkeys(ref_notes + list(cand_s.notes)) if n not in notes)
    if ref_providers != list(cand_s.providers):
        notes.append(f"the sessions use different providers: reference {ref_providers}, candidate "
                     f"{list(cand_s.providers)}")
    accs = {n: OutputAccumulator(n) for n in compared}
    for i, (cfeed, r_out) in enumerate(zip(cand_feeds, ref_out)):
        c_out = run_session(cand_s.session, cfeed, compared, name=labels[1], sample=i)
        for name, r, c in zip(compared, r_out, c_out):
            accs[name].update(r, c)
            if kept is not None:
                kept[0].setdefault(name, []).append(r)
                kept[1].setdefault(name, []).append(c)
        counter.tick()
    timing: tuple = (None, None, 0)
    if ref_ms is not None:
        cand_ms = time_session(cand_s.session, cand_feeds, warmup=warmup, runs=runs, time_budget_s=budget / 2,
                               name=labels[1])
        timing = (cand_ms[0] / ref_ms[0] if ref_ms[0] > 0 else float("nan"),
                  {"reference": ref_ms[0], "candidate": cand_ms[0]}, min(ref_ms[1], cand_ms[1]))
        notes.append("latency: models over 2 GB are timed one after the other (one session in memory at a time), "
                     "not interleaved: the ratio is noisier")
    return {n: a.result() for n, a in accs.items()}, timing, ref_providers, notes_ms


def _task_metric(metric: Callable[[dict, dict], float], kept: tuple[dict[str, list], dict[str, list]]) -> float:
    """The caller's metric on the kept outputs; its own failure is a MetricError (the metric is the user's code,
    given the outputs by name: {list(kept[0])}), never a crash."""
    name = getattr(metric, "__name__", type(metric).__name__)
    try:
        value = float(metric(kept[0], kept[1]))
    except OnnxCompError:
        raise
    except Exception as e:
        raise MetricError(f"accuracy_budget metric {name} raised {type(e).__name__}: {e} (it gets dicts "
                          f"output name -> list of arrays; outputs: {', '.join(kept[0])})") from e
    return value


def _output_notes(outputs: dict[str, OutputError], notes: list[str]) -> None:
    """Add a note for each output problem: shape/dtype mismatch, NaN/inf in either model's values."""
    for o in outputs.values():
        if o.problem:
            notes.append(f"output '{o.name}': {o.problem}")
        if o.nonfinite:
            notes.append(
                f"output '{o.name}': candidate has {o.nonfinite} NaN/inf value(s)"
                + ("" if o.ok else "; its error metrics are reported as inf/NaN")
            )
        if o.ref_nonfinite:
            notes.append(
                f"output '{o.name}': reference has {o.ref_nonfinite} NaN/inf value(s), left out of the metrics"
            )
        if o.candidate_dtype:
            notes.append(f"output '{o.name}': candidate dtype {o.candidate_dtype}, reference {o.dtype}")


def _latency(
    ref_s: MadeSession,
    cand_s: MadeSession,
    feeds: list[dict[str, np.ndarray]],
    cand_feeds: list[dict[str, np.ndarray]],
    warmup: int,
    runs: int | None,
    time_budget_s: float,
    notes: list[str],
    progress: Progress | None = None,
) -> tuple[float | None, dict[str, float] | None, int]:
    """(ratio, {"reference": ms, "candidate": ms}, pairs) from interleaved timing of both sessions."""
    lat = measure_latency(
        ref_s.session, cand_s.session, feeds, warmup=warmup, runs=runs, time_budget_s=time_budget_s,
        candidate_feeds=cand_feeds, progress=progress, step="validation: latency",
    )
    notes.extend(lat.notes)
    return lat.ratio, {"reference": lat.reference_ms, "candidate": lat.candidate_ms}, lat.pairs


def _build_report(
    sizes: tuple[int, int],
    outputs: dict[str, OutputError],
    timing: tuple[float | None, dict[str, float] | None, int],
    providers: list[str],
    samples: int,
    feeds_source: str,
    notes: list[str],
    missing: list[str],
) -> ValidationReport:
    """Assemble the report, with the serialized sizes of both models (external data included)."""
    latency_ratio, latency_ms, pairs = timing
    size_ref, size_cand = sizes
    return ValidationReport(
        outputs=outputs,
        latency_ratio=latency_ratio,
        latency_ms=latency_ms,
        size_ratio=size_cand / size_ref if size_ref else float("nan"),
        size_bytes={"reference": size_ref, "candidate": size_cand},
        providers=providers,
        samples=samples,
        feeds_source=feeds_source,
        notes=notes,
        missing_outputs=missing,
        latency_pairs=pairs,
    )


def _run_both(ref: tuple, cand: tuple, sizes: tuple[int, int], providers, feeds, cand_feeds, compared: list[str],
              feeds_source: str, kept, timing_opts: tuple, notes: list[str], progress: Progress | None):
    """Both models ((model, path, label) each) in ORT: outputs compared and, when asked, latency timed; over
    2 GB one session at a time. Returns (outputs, timing, providers used, session creation ms)."""
    (ref_m, ref_path, ref_label), (cand_m, cand_path, cand_label) = ref, cand
    labels = (ref_label, cand_label)
    if max(sizes) >= ir.BIG_BYTES:  # over 2 GB: one session in memory at a time
        return _one_session_at_a_time((ref_m, ref_path), (cand_m, cand_path), providers, feeds, cand_feeds, compared,
                                      labels, feeds_source, kept, timing_opts, notes, progress)
    latency, warmup, runs, time_budget_s = timing_opts
    ref_s = make_session(ref_m, providers, name=ref_label, path=ref_path)
    cand_s = make_session(cand_m, providers, name=cand_label, path=cand_path)
    _session_notes(ref_s, cand_s, notes)
    outputs = _compare_outputs(ref_s, cand_s, feeds, cand_feeds, compared, labels, feeds_source, kept, progress)
    timing: tuple[float | None, dict[str, float] | None, int] = (None, None, 0)
    if latency:
        timing = _latency(ref_s, cand_s, feeds, cand_feeds, warmup, runs, time_budget_s, notes, progress)
    return outputs, timing, list(ref_s.providers), {"reference": ref_s.create_ms, "candidate": cand_s.create_ms}


def validate(
    reference: ModelSource,
    candidate: ModelSource,
    inputs: Any = None,
    providers: Sequence[ProviderLike] | None = None,
    latency: bool = True,
    *,
    max_samples: int = 64,
    warmup: int = 3,
    runs: int | None = None,
    seed: int = 0,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    dim_values: Mapping[str, int] | None = None,
    metric: Callable[[dict, dict], float] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    progress: Progress | None = None,
) -> ValidationReport:
    """Compare ``candidate`` with ``reference`` in ONNX Runtime: per-output errors, latency ratio, size ratio.

    reference/candidate: ModelProto or path (never modified). inputs: any :func:`onnxcomp.data.load_feeds`
    source (at most ``max_samples`` are used), or None for ``min(8, max_samples)`` random-but-valid feeds
    (:func:`onnxcomp.data.generate_feeds` with ``seed``/``dim_values``). providers: ORT execution providers
    (default CPU; unavailable ones are skipped with a note). latency: time both models interleaved
    (``warmup`` runs each, then ``runs`` pairs or as many as fit in ``time_budget_s``).
    Outputs present in both models are compared; reference outputs the candidate lacks are listed in
    ``missing_outputs``; candidate-only outputs are ignored. Both models must have the same inputs.
    metric: a task metric ``metric(ref_outputs, cand_outputs) -> float`` (each a dict output name -> list of
    arrays over the samples), reported as ``report.metric``. input_shapes: with generated feeds, the whole shape
    of some inputs (``{"input_ids": [1, 128]}``: time at the lengths the model will see); the report names the
    shapes it ran on (``timed_shapes``) either way. progress: a callback told of the samples compared and the
    latency pairs timed (steps "validation: outputs" / "validation: latency").
    """
    if max_samples < 1:
        raise CalibrationDataError(f"max_samples must be >= 1, got {max_samples}")
    ref, ref_label, ref_path = _load(reference, "reference")
    cand, cand_label, cand_path = _load(candidate, "candidate")
    notes: list[str] = []

    ref_specs, cand_specs = input_specs(ref), input_specs(cand)
    _check_same_inputs(ref_specs, cand_specs, cand_label)
    compared, missing = _outputs_to_compare(ref, cand, cand_label, notes)
    if input_shapes and inputs is not None:
        notes.append("input_shapes ignored: the given inputs are compared and timed at their own shapes")
    feeds, feeds_source = _reference_feeds(ref, ref_specs, inputs, max_samples, seed, dim_values, notes,
                                           input_shapes)
    cand_feeds = _candidate_feeds(feeds, ref_specs, cand_specs, notes)

    kept: tuple[dict[str, list], dict[str, list]] | None = ({}, {}) if metric is not None else None
    sizes = model_bytes(ref), model_bytes(cand)
    outputs, timing, used, session_ms = _run_both(
        (ref, ref_path, ref_label), (cand, cand_path, cand_label), sizes, providers, feeds, cand_feeds, compared,
        feeds_source, kept, (latency, warmup, runs, time_budget_s), notes, progress)
    _output_notes(outputs, notes)
    report = _build_report(sizes, outputs, timing, used, len(feeds), feeds_source, notes, missing)
    report.timed_shapes = _shapes_of(feeds)
    report.session_ms = session_ms
    if metric is not None and kept is not None:
        report.metric, report.metric_name = _task_metric(metric, kept), getattr(metric, "__name__", "metric")
    return report
