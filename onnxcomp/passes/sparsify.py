"""`sparsify`: zero weights of MatMul/Gemm/Conv/ConvTranspose layers (unstructured, N:M, block), or remove whole
channels (`pattern: channel`, in channels.py).

Criteria (see sparsegpt.py for the math, on weights in [outputs, inputs] layout):
- magnitude: |W|, lowest per layer. Needs no data.
- wanda: |W_ij| * ||x_j|| compared within each output (Sun et al. 2023); input norms from calibration data.
- sparsegpt: OBS mask selection plus a least-squares update of the kept weights against the input second
  moment X^T X (Frantar & Alistarh 2023): the largest accuracy gain measured (tools/bench_sparsify.py).
- auto (default): sparsegpt with calibration data, magnitude without (the report says which).

The input second moments come from one streaming calibration run (`collect_statistics(gram_axes=...)`). For a
Conv the exact im2col moment is observed through an extra "unfold" Conv with one-hot kernels added to a private
copy of the model; for a ConvTranspose the channel moment is used (cross-tap terms ignored). `sequential: true`
re-collects them per depth on the partly pruned model (SparseGPT's sequential mode; measured on MiniLM-L3 at 50%:
cosine 0.9383 vs 0.9377, at ~6x the time, so off by default).

`allocation: sensitivity` spends the global budget (kept weights) where the model's outputs suffer least:
each layer is pruned alone at a ladder of sparsities, its output error measured in one probe session
(sensitivity.WeightProbe), and one level per layer chosen (sensitivity.allocate).

Weights are rewritten with engine rules (the same op reading the new constant; a weight shared by several
selected layers is pruned once, with their moments summed). Zeros are exact, so symmetric int8 quantization
later in the recipe keeps them. `storage: auto` writes the pruned weights as Constant(sparse_value) in the final
model where that is really smaller (storage.sparse_storage); the report gives file and gzip sizes either way.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir, storage
from ..errors import CalibrationDataError, InternalError, RecipeError
from ..rewrite import Plan, RewriteRule, apply_rules
from ..rewrite.sweeps import take_back_names
from ..algorithms import sparsegpt as sg
from ..algorithms.unfold import with_patches
from ..algorithms.select import (WEIGHT_OPS, WeightLayer, check_ops, find_weight_layers, quantized_weights_note,
                                 weight_pattern2, weight_pattern3)
from .base import LayerChange, PassContext, PassOutcome, WeightPass

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
#: sparsity ladder tried per layer by `allocation: sensitivity` (plus the requested sparsity)
_LEVELS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_PROBE_SAMPLES = 16  # feeds used to measure each layer's end-to-end sensitivity


@dataclass(frozen=True)
class Sparsify(WeightPass):
    """Prune weights to a sparsity pattern by magnitude, Wanda or SparseGPT (with reconstruction)."""

    name: ClassVar[str] = "sparsify"
    weight_ops: ClassVar[tuple[str, ...]] = WEIGHT_OPS
    slower_hint: ClassVar[str] = ("zeros in dense weights do not run faster in ONNX Runtime: sparsify pattern "
                                  "'channel' removes whole channels")
    method: Literal["auto", "magnitude", "wanda", "sparsegpt"] = "auto"
    pattern: Any = "unstructured"  # unstructured | "N:M" (keep N of every M inputs) | block | channel
    sparsity: Optional[float] = None  # fraction of weights zeroed; default 0.5 (N:M: 1 - N/M)
    block: tuple[int, ...] = (1, 4)  # pattern block: tile of [outputs, inputs]
    # default: sensitivity when calibration data is given (measured better: MiniLM 0.5 unstructured cosine 0.930
    # -> 0.952), else uniform
    allocation: Optional[Literal["uniform", "sensitivity"]] = None
    damping: float = 0.01  # sparsegpt: added to the diagonal of X^T X, relative to its mean
    # wanda/sparsegpt: calibrate each depth on the outputs of the already-pruned layers before it (SparseGPT's
    # sequential mode; one calibration run per depth), else every layer on the original model's activations
    sequential: bool = False
    storage: Literal["auto", "dense"] = "auto"
    # pattern channel: fraction of attention heads removed per recognised attention block (None: heads kept);
    # MHA (BERT form) and grouped-query/rotary attention (Llama form: query heads alike in every KV group); with
    # allocation sensitivity the heads' and the channels' targets make one budget, spent where outputs suffer least
    heads: Optional[float] = None
    # grouped-query blocks: what `heads` removes -- "query": query heads alike in every KV group (the KV heads,
    # and so the KV cache, stay); "kv": whole KV groups, a KV head with its query heads (Wk, Wv and the attention
    # shrink too; refused, with the reason, where the KV heads are read outside the block, e.g. a KV cache output)
    head_unit: Literal["query", "kv"] = "query"
    # pattern channel: fraction of the residual stream sliced (SliceGPT-style: the stream rotated onto its principal
    # directions on the calibration data, the weakest directions removed from every weight that reads or writes it;
    # pre-norm RMSNorm models; needs calibration data); None: the stream is kept
    hidden: Optional[float] = None

    def __post_init__(self) -> None:
        pat = self.pattern
        if isinstance(pat, int) and not isinstance(pat, bool):
            raise RecipeError(f"sparsify.pattern: got the number {pat}; write N:M patterns quoted (e.g. '2:4'): "
                              "YAML 1.1 reads an unquoted 2:4 as the base-60 number 124")
        if not isinstance(pat, str) or (pat not in ("unstructured", "block", "channel") and not _NM.match(pat)):
            raise RecipeError(f"sparsify.pattern: invalid value {pat!r}; valid: 'unstructured', 'N:M' with "
                              "0 < N < M (e.g. '2:4'), 'block', 'channel'")
        nm = self.nm_pattern
        if nm is not None and not 0 < nm.n < nm.m:
            raise RecipeError(f"sparsify.pattern: {pat!r} needs 0 < N < M (N weights kept in every M)")
        s = self.sparsity
        if nm is not None:
            if s is not None and abs(s - nm.fixed_sparsity) > 1e-9:
                raise RecipeError(f"sparsify: pattern {pat!r} keeps {nm.n} of every {nm.m} weights (sparsity "
                                  f"{nm.fixed_sparsity:g}), which contradicts sparsity {s:g}; leave sparsity out")
            s = nm.fixed_sparsity
        elif s is None:
            s = 0.5
        if not 0.0 <= s < 1.0:
            raise RecipeError(f"sparsify.sparsity must be in [0, 1), got {s:g}")
        object.__setattr__(self, "sparsity", float(s))  # resolved at construction (frozen dataclass)
        if len(self.block) != 2 or any(b < 1 for b in self.block):
            raise RecipeError(f"sparsify.block must be [rows, cols] of positive integers, got {list(self.block)}")
        if self.allocation == "sensitivity" and nm is not None:
            raise RecipeError("sparsify.allocation 'sensitivity' varies the sparsity per layer; an N:M pattern fixes "
                              "it: use pattern 'unstructured' or 'block', or allocation 'uniform'")
        if self.heads is not None and (self.pattern != "channel" or not 0.0 <= self.heads < 1.0):
            raise RecipeError(f"sparsify.heads (fraction of attention heads removed, in [0, 1)) applies to pattern "
                              f"'channel' only; got heads={self.heads:g} with pattern {self.pattern!r}")
        if self.head_unit not in ("query", "kv"):
            raise RecipeError(f"sparsify.head_unit: invalid value {self.head_unit!r}; valid: 'query', 'kv'")
        if self.head_unit != "query" and self.heads is None:
            raise RecipeError("sparsify.head_unit applies with heads (the fraction of attention heads removed)")
        if self.hidden is not None and (self.pattern != "channel" or not 0.0 <= self.hidden < 1.0):
            raise RecipeError(f"sparsify.hidden (fraction of the residual stream sliced, in [0, 1)) applies to "
                              f"pattern 'channel' only; got hidden={self.hidden:g} with pattern {self.pattern!r}")
        if not self.damping > 0:
            raise RecipeError(f"sparsify.damping must be > 0, got {self.damping:g}")
        super().__post_init__()

    def resolve(self, has_data: bool) -> "Sparsify":
        if self.allocation is not None:
            return self
        best = "sensitivity" if has_data and self.nm_pattern is None else "uniform"
        return dataclasses.replace(self, allocation=best)

    @property
    def nm_pattern(self) -> Optional[sg.SparsityPattern]:
        m = _NM.match(self.pattern) if isinstance(self.pattern, str) else None
        return sg.SparsityPattern("nm", int(m.group(1)), int(m.group(2))) if m else None

    def _pattern(self) -> sg.SparsityPattern:
        if self.pattern == "block":
            return sg.SparsityPattern("block", block=(int(self.block[0]), int(self.block[1])))
        return self.nm_pattern or sg.SparsityPattern("unstructured")

    @classmethod
    def summarize(cls, details: dict[str, Any]) -> list[str]:
        if details.get("pattern") == "channel":
            groups = details.get("groups") or []
            kinds = {"channels": "channel group(s)", "heads": "attention block(s)"}
            made = ", ".join(f"{sum(g.get('kind', 'channels') == k for g in groups)} {v}" for k, v in kinds.items())
            lines = [f"structured ({details['method']}): {made}; {details.get('params_removed', 0):,} of "
                     f"{details.get('params_before', 0):,} weights removed; {len(details.get('refused', []))} "
                     "layer(s) not prunable (reasons in the JSON/HTML report)"]
            res = details.get("residual")
            if res:
                lines.append(f"residual stream: {res['dim']} -> {res['kept']} dimensions ({100 * res['energy_kept']:.1f}% "
                             f"of its energy kept), {res['norms']} RMSNorms, {res['weights']} weights rotated")
            lines += [f"{g['producer']}{' + ' + ', '.join(g['joined']) if g.get('joined') else ''}: {g['kept']}/"
                      f"{g['channels']} {'heads' if g.get('kind') == 'heads' else 'channels'} kept"
                      + (f" ({g['kv_heads']} KV heads)" if g.get("form") == "gqa" else "")
                      + (f", rel err {g['rel_err']:.3g}" if "rel_err" in g else "")
                      + (f", its layers {g['ms_after']:.3g} ms (was {g['ms_before']:.3g}) at {g['rows_timed']} rows"
                         if "ms_after" in g else "") for g in groups[:6]]
            t = details.get("time")
            if t:
                lines.append(f"time of the {t['groups_timed']} pruned MatMul/Gemm group(s), timed alone on the "
                             f"target: {t['ms_before']:.3g} -> {t['ms_after']:.3g} ms ({t['ratio']:.2f}x)")
            return lines
        size = details.get("size", {})
        lines = [f"{details['pattern']} ({details['method']}, {details['allocation']}): sparsity "
                 f"{details['sparsity']:.3f} over {len(details.get('layers', []))} weight(s), "
                 f"{details.get('params_zeroed', 0):,} weights zeroed"]
        if "gzip_bytes_after" in size and size.get("gzip_bytes_before"):
            lines.append(f"file {size.get('file_bytes_before', 0):,} -> {size.get('file_bytes_after', 0):,} bytes, "
                         f"gzip {size['gzip_bytes_before']:,} -> {size['gzip_bytes_after']:,} bytes "
                         f"({size.get('sparse_tensors', 0)} weight(s) stored sparse)")
        worst = sorted((r for r in details.get("layers", []) if r.get("rel_err") is not None),
                       key=lambda r: -r["rel_err"])[:3]
        if worst:
            lines.append("largest layer errors: " + ", ".join(f"{r['weight']} ({r['sparsity']:.2f}, rel err "
                                                                f"{r['rel_err']:.3g})" for r in worst))
        return lines

    # ------------------------------------------------------------------------------------------
    def run(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext) -> PassOutcome:
        if self.pattern == "channel":
            from ..algorithms.channels import prune_channels

            return prune_channels(model, source, ctx, self)
        method = self.method
        if method == "auto":
            method = "sparsegpt" if ctx.calibration_data else "magnitude"
        if (method != "magnitude" or self.allocation == "sensitivity") and not ctx.calibration_data:
            what = f"method '{method}'" if method != "magnitude" else "allocation 'sensitivity'"
            raise CalibrationDataError(f"sparsify {what} needs calibration_data (input statistics / output "
                                       "sensitivity); give calibration feeds, or use method 'magnitude'")
        feeds = self.calibration_feeds(ctx)
        pattern = self._pattern()
        notes: list[str] = []
        rejections: dict[str, str] = {}
        layers = find_weight_layers(model, check_ops(self.ops, WEIGHT_OPS, "sparsify.ops"), self.exclude,
                                    self.min_weight_elements, main_graph_only=method != "magnitude",
                                    rejections=rejections)
        units = _units(model, layers, rejections)
        quantized_note = quantized_weights_note(rejections)
        if quantized_note:
            notes.append(quantized_note)
        details: dict[str, Any] = {"method": method, "pattern": self.pattern, "requested_sparsity": self.sparsity,
                                   "allocation": self.allocation or "uniform"}
        if self.method == "auto":
            notes.append(f"method auto -> {method} ({'calibration data given' if feeds else 'no calibration data'})")
        if feeds:
            _second_moments(units, source, ctx, feeds)
        levels = {u.name: self.sparsity for u in units}
        if self.allocation == "sensitivity" and units:
            levels = self._allocate(units, source, ctx, feeds, method, pattern, details, notes)
        staged = _stages(model, units) if self.sequential and method != "magnitude" else []
        done: dict[str, np.ndarray] = {}
        for k, stage in enumerate(staged):
            if k:  # inputs of this depth as the already-pruned layers before it produce them
                _second_moments(stage, source, ctx, feeds, done)
            for u in stage:
                u.result = _prune(u, method, pattern, levels[u.name], self.damping)
                done[u.name] = u.result.weight
        if staged:
            details["sequential_stages"] = len(staged)
        for u in units:
            if u.result is None:
                u.result = _prune(u, method, pattern, levels[u.name], self.damping)
        _rewrite(model, [u for u in units if u.result is not None])
        details.update(_summary(units, rejections, source))
        changed = [u for u in units if u.result is not None and u.result.zeros]
        layers = [LayerChange(layer.name, u.result.rel_err if u.result.rel_err is not None else u.result.zeros /
                              max(u.size, 1)) for u in changed for layer in u.layers]
        return PassOutcome(details=details, notes=notes, layers=layers)

    def _allocate(self, units: list["_Unit"], source: onnx.ModelProto, ctx: PassContext, feeds: list, method: str,
                  pattern: sg.SparsityPattern, details: dict[str, Any], notes: list[str]) -> dict[str, float]:
        """Per layer, the sparsity that reaches the global budget (kept weights) with the least output error."""
        from ..algorithms.sensitivity import WeightProbe, allocate

        inits = {t.name for t in source.graph.initializer}
        probed = [u for u in units if u.name in inits and u.in_main_graph]
        fixed = [u for u in units if u not in probed]
        if fixed:
            notes.append(f"{len(fixed)} weight(s) not probed (not main-graph initializers): uniform sparsity")
        ladder = sorted(set(_LEVELS) | {round(self.sparsity, 6)})
        probe = WeightProbe(source, [u.name for u in probed], feeds[:_PROBE_SAMPLES],
                            **ctx.probe_args(source, "sparsify: sensitivity probes",
                                             len(probed) * sum(1 for s in ladder if s != 0.0)))
        choices: dict[str, list[tuple[float, float]]] = {}
        for u in probed:
            opts = []
            for s in ladder:
                if s == 0.0:
                    opts.append((float(u.size), 0.0))
                    continue
                res = _prune(u, method, pattern, s, self.damping)
                opts.append((float(u.size - res.zeros), probe.error({u.name: res.weight})))
            choices[u.name] = opts
        total = sum(u.size for u in units)
        budget = (1.0 - self.sparsity) * total - sum((1.0 - self.sparsity) * u.size for u in fixed)
        pick = allocate(choices, budget)
        levels = {u.name: self.sparsity for u in fixed}
        levels.update({name: ladder[j] for name, j in pick.items()})
        # the ladder overshoots the budget: hand the surplus back to the layers whose last step hurt most
        size = {u.name: u.size for u in probed}
        surplus = budget - sum(choices[n][j][0] for n, j in pick.items())

        def slope(n: str) -> float:
            j = pick[n]
            (c0, e0), (c1, e1) = choices[n][j - 1], choices[n][j]
            return (e1 - e0) / max(c0 - c1, 1e-12)

        for n in sorted((n for n, j in pick.items() if j > 0), key=slope, reverse=True):
            if surplus < 1:
                break
            j = pick[n]
            give = min(surplus, choices[n][j - 1][0] - choices[n][j][0])
            levels[n] = ladder[j] - give / size[n]
            surplus -= give
        details["sensitivity"] = {name: {str(s): e for s, (_, e) in zip(ladder, opts)}
                                  for name, opts in choices.items()}
        details["probe_samples"] = len(probe.feeds)
        return levels

    # ------------------------------------------------------------------------------------------
    def finalize(self, proto: onnx.ModelProto, outcome: PassOutcome) -> None:
        names = set(outcome.details.get("sparsified_weights", []))
        info: dict[str, Any] = {"storage": self.storage}
        if self.storage == "auto" and names:
            st = storage.sparse_storage(proto, names, read=ir.tensor_in_memory)
            info["sparse_tensors"] = len(st.converted)
            info["bytes_saved_by_sparse_storage"] = st.bytes_saved
            if not st.converted:
                outcome.notes.append("storage auto: no pruned weight is smaller as a sparse tensor (int64 indices: "
                                     "float32 needs < 1/3 density; int8 never), all stored dense")
        info["file_bytes_after"] = ir.proto_size(proto)
        info["gzip_bytes_after"] = storage.compressed_size(ir.serialized_chunks(proto))
        outcome.details.setdefault("size", {}).update(info)


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class _Part:
    """A slice of a weight pruned against one input second moment (Conv/ConvTranspose groups)."""

    rows: slice
    cols: slice
    key: str  # tensor whose Gram holds the moment
    gram_slice: slice


@dataclass
class _Result:
    weight: np.ndarray  # new weight in the original layout
    zeros: int
    rel_err: Optional[float]


@dataclass
class _Unit:
    """One constant weight and the selected layers reading it."""

    name: str
    layers: list[WeightLayer]
    wt: np.ndarray  # [outputs, inputs] float32
    parts: list[_Part]
    in_main_graph: bool
    grams: dict[int, np.ndarray] = field(default_factory=dict)  # part index -> X^T X
    hinv: dict[int, np.ndarray] = field(default_factory=dict)  # part index -> sparsegpt's factor (cached)
    result: Optional[_Result] = None

    @property
    def size(self) -> int:
        return int(self.wt.size)

    @property
    def layer(self) -> WeightLayer:
        return self.layers[0]


def _layout(layer: WeightLayer) -> tuple[np.ndarray, list[_Part]]:
    """The weight as [outputs, inputs] (the reduction axis last: WeightLayer.matrix() transposed) and how it
    splits into groups."""
    wt = np.ascontiguousarray(layer.matrix().T)
    whole = [_Part(slice(None), slice(None), layer.x.name, slice(None))]
    if layer.op in ("MatMul", "Gemm"):
        return wt, whole
    w, g = layer.weight, int(layer.node.attrs.get("group", 1))
    if layer.op == "Conv":  # [Cout, Cin/g * taps]; group i: outputs i, unfolded inputs i
        ro, k = wt.shape[0] // g, wt.shape[1]
        return wt, [_Part(slice(i * ro, (i + 1) * ro), slice(None), _unfold_name(layer), slice(i * k, (i + 1) * k))
                    for i in range(g)]
    # ConvTranspose [Cin, Cout/g, *k]: outputs = (Cout/g, taps), inputs = Cin split in groups
    ci = w.shape[0] // g
    return wt, [_Part(slice(None), slice(i * ci, (i + 1) * ci), layer.x.name, slice(i * ci, (i + 1) * ci))
                for i in range(g)]


def _layout_key(layer: WeightLayer) -> tuple:
    a = layer.node.attrs
    if layer.op in ("MatMul", "Gemm"):
        return ("mm", bool(layer.op == "Gemm" and a.get("transB", 0)))
    return (layer.op, int(a.get("group", 1)))


def _units(model: ir.Model, layers: list[WeightLayer], rejections: dict[str, str]) -> list[_Unit]:
    """Group layers by weight; a weight also read by something not selected (an embedding lookup, an excluded
    layer) is left alone, since pruning it would change that reader too."""
    by_w: dict[int, list[WeightLayer]] = {}
    for layer in layers:
        by_w.setdefault(id(layer.w), []).append(layer)
    units = []
    for group in by_w.values():
        w = group[0].w
        mine = {id(layer.node) for layer in group}
        others = [n for n in w.outputs if id(n) not in mine]
        if others:
            for layer in group:
                rejections[layer.name] = (f"weight '{w.name}' is also read by {others[0].op} '{others[0].name}', "
                                          "which is not pruned")
            continue
        if len({_layout_key(layer) for layer in group}) > 1:
            for layer in group:
                rejections[layer.name] = f"weight '{w.name}' is read in different layouts by several layers"
            continue
        wt, parts = _layout(group[0])
        units.append(_Unit(w.name, group, wt, parts, all(layer.graph is model.graph for layer in group)))
    return units


def _unfold_name(layer: WeightLayer) -> str:
    return f"{layer.x.name}::sparsify_unfold::{layer.name}"


def _stages(model: ir.Model, units: list[_Unit]) -> list[list[_Unit]]:
    """Units grouped by depth: a unit's input depends only on units of earlier stages."""
    of_node = {id(layer.node): u for u in units if u.in_main_graph for layer in u.layers}
    level: dict[str, int] = {}  # tensor name -> number of pruned layers on the longest path behind it
    stage: dict[str, int] = {}
    for node in model.graph.nodes:  # imported in topological order
        lv = max((level.get(t.name, 0) for t in node.inputs), default=0)
        u = of_node.get(id(node))
        if u is not None:
            stage[u.name] = max(stage.get(u.name, 0), lv)
            lv += 1
        for t in node.outputs:
            level[t.name] = lv
    out: dict[int, list[_Unit]] = {}
    for u in units:
        if u.name in stage:
            out.setdefault(stage[u.name], []).append(u)
    return [out[k] for k in sorted(out)]


def _second_moments(units: list[_Unit], source: onnx.ModelProto, ctx: PassContext, feeds: list,
                    pruned: Optional[dict[str, np.ndarray]] = None) -> None:
    """X^T X of each part's input, from one streaming calibration run over a private copy of the model in which
    the weights in `pruned` (name -> new value) are already replaced."""
    axes: dict[str, int] = {}
    convs = {}
    for u in units:
        if not u.in_main_graph:
            continue
        for layer in u.layers:
            if layer.op == "Conv":
                convs[_unfold_name(layer)] = (layer.x.name, layer.weight.shape, layer.node.attrs)
                axes[_unfold_name(layer)] = 1
            else:
                axes[layer.x.name] = 1 if layer.op == "ConvTranspose" else -1
    if not axes:
        return
    probe = with_patches(source, convs, pruned)
    stats = ctx.collect(probe, [], feeds, histogram=False, gram_axes=axes)
    for u in units:
        u.grams.clear()
        u.hinv.clear()
        for layer in u.layers:
            for i, p in enumerate(u.parts):
                key = _unfold_name(layer) if layer.op == "Conv" else layer.x.name
                st = stats.get(key)
                if st is None or st.gram is None:
                    continue
                g = st.gram[p.gram_slice, p.gram_slice]
                u.grams[i] = u.grams[i] + g if i in u.grams else g


# ---------------------------------------------------------------------------------------------- pruning
def _prune(u: _Unit, method: str, pattern: sg.SparsityPattern, sparsity: float, damping: float) -> _Result:
    """New weight of unit `u` at `sparsity` (exact counts split over its groups), with its output error."""
    wt = u.wt.astype(np.float64)
    out = wt.copy()
    sizes = np.array([wt[p.rows, p.cols].size for p in u.parts])
    if pattern.kind == "block":
        tiles = np.array([sg.block_count(wt[p.rows, p.cols].shape, pattern.block, 1.0) for p in u.parts])
        counts = sg.split_count(sg.block_count(wt.shape, pattern.block, sparsity) if len(u.parts) == 1
                                else int(round(sparsity * tiles.sum())), tiles)
    else:
        counts = sg.split_count(int(round(sparsity * wt.size)), sizes)
    num = den = 0.0
    have_err = bool(u.grams) and len(u.grams) == len(u.parts)
    for i, p in enumerate(u.parts):
        w = wt[p.rows, p.cols]
        h = u.grams.get(i)
        if method != "magnitude" and h is None:
            raise CalibrationDataError(f"sparsify: no input statistics for weight '{u.name}' (its input could not "
                                       "be observed in calibration); exclude it or use method 'magnitude'")
        if method == "sparsegpt":
            if i not in u.hinv:
                u.hinv[i] = sg.inverse_cholesky(sg.damped_hessian(h, damping), damping)
            new, _ = sg.sparsegpt(w, h, pattern, sparsity, damping, count=int(counts[i]), hinv=u.hinv[i])
            new = new.astype(np.float64)
        else:
            score = np.abs(w)
            if method == "wanda":
                score = score * np.sqrt(np.maximum(np.diag(h), 0.0))[None, :]
            mask = sg.select_mask(score, pattern, sparsity, per_row=method == "wanda", count=int(counts[i]))
            new = np.where(mask, 0.0, w)
        out[p.rows, p.cols] = new
        if have_err:
            a, b = sg.error_terms(w, new, u.grams[i])
            num, den = num + a, den + b
    rel = float(np.sqrt(num / den)) if have_err and den > 0 else None
    new_w = u.layer.stored(out.astype(np.float32).T)
    if method != "sparsegpt":  # keep the surviving weights bit-exact (no layout round trip in float64)
        new_w = np.where(new_w == 0, np.float32(0), u.layer.weight).astype(np.float32)
    return _Result(new_w, int(np.count_nonzero(new_w == 0)), rel)


def _rewrite(model: ir.Model, units: list[_Unit]) -> None:
    """Each selected layer -> the same op reading its unit's new weight (one new constant per unit)."""
    plan = Plan((layer.node, u) for u in units for layer in u.layers)
    made: dict[str, gs.Constant] = {}

    def replacement(op, x, w, node, decision: _Unit, b=None):
        u = decision
        c = made.get(u.name)
        if c is None:
            c = made[u.name] = op.const(u.result.weight, name=u.name)
        ins = [x, c] + ([b] if b is not None else [])
        return getattr(op, node.op)(*ins, _name=node.name, **node.attrs)

    rules = []
    for op_type in sorted({layer.op for u in units for layer in u.layers}):
        rules.append(RewriteRule(f"sparsify-{op_type.lower()}", weight_pattern2(op_type), replacement))
        if op_type != "MatMul":
            rules.append(RewriteRule(f"sparsify-{op_type.lower()}-bias", weight_pattern3(op_type), replacement))
    stats = apply_rules(model, rules, plan=plan)
    if stats.unapplied:
        raise InternalError(f"sparsify: the engine refused the planned rewrite of {len(stats.unapplied)} layer(s), "
                            f"e.g. {sorted(stats.unapplied.items())[:2]}")
    take_back_names(model.graph, made)  # the new weight takes the old one's name when it is free


def _summary(units: list[_Unit], rejections: dict[str, str], source: onnx.ModelProto) -> dict[str, Any]:
    rows = []
    total = zeros = zeros_before = 0
    for u in units:
        r = u.result
        before = int(np.count_nonzero(u.wt == 0))
        total += u.size
        zeros += r.zeros
        zeros_before += before
        rows.append({"weight": u.name, "nodes": [layer.name for layer in u.layers], "op": u.layer.op,
                     "shape": list(u.layer.weight.shape), "sparsity": r.zeros / max(u.size, 1),
                     "zeros": r.zeros, "rel_err": r.rel_err})
    size_before = ir.proto_size(source)
    return {
        "layers": rows,
        "sparsity": zeros / total if total else 0.0,
        "params_considered": total,
        "params_zeroed": zeros - zeros_before,
        "bytes_zeroed": 4 * (zeros - zeros_before),
        "left_dense": [{"node": n, "reason": why} for n, why in sorted(rejections.items())][:500],
        "sparsified_weights": [u.name for u in units],
        "size": {"file_bytes_before": size_before,
                 "gzip_bytes_before": storage.compressed_size(ir.serialized_chunks(source))},
    }
