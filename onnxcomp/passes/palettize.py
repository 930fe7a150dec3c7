"""`palettize`: weight sharing. Each weight becomes a codebook of 2**bits values (per tensor, or per group of
`group_size` output channels) and one packed index per element, decoded in the graph on constants only:

    words --BitShift/Mod--> indices --Reshape/Cast(int32)--> (+ group offset) --Gather(codebook)--> (x scales) W

Every input of the decode is an initializer, so ONNX Runtime constant-folds it when the session is created: the
file holds bits/32 of the float size (plus the scales), and the model runs exactly as the float model with the
clustered weights (zero cost per run, on every execution provider; tests/test_palettize.py checks the optimised
graph). With `channel_scale` (default), each float output channel is divided by its largest magnitude before
clustering and a float16 scale per channel multiplies it back: one shared codebook then fits channels of any
range. At <= 4 bits the default `block_size: 32` gives each channel a scale per 32 inputs (0.5 bit per weight):
MiniLM-L3 at 4 bits reaches cosine 0.991 with them, 0.984 per channel, 0.977 without.

Codebooks come from weighted 1-D k-means (algorithms/palette.py). `weighting: activation` (the default with
calibration data) weighs each weight's squared error by E[x_j^2] of the input channel it multiplies, from one
calibration run: what the layer's output error depends on, rather than the weight error itself. Embedding
tables (Gather on a constant, `embeddings: true`) are clustered by value alone. A weight that is at least 1/k
zeros (after `sparsify`) keeps 0 as an exact codebook value. After `quantize`, the int8/uint8 weights of
DequantizeLinear / DynamicQuantizeMatMul / MatMulIntegerToFloat layers and int8 embedding tables get integer
codebooks (error weighed by each channel's scale^2; pairs bounded for saturating kernels stay bounded): ORT folds
the decode at level 1, before its QDQ fusions, so the same integer kernels run on the folded weights. Put `palettize` last in a recipe: the decoded weights are no longer constants that another
weight pass could rewrite.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir, qmath
from ..errors import CalibrationDataError, InternalError, RecipeError
from ..rewrite import Plan, RewriteRule, apply_rules, fail, find_matches, query
from ..rewrite.sweeps import take_back_names
from ..algorithms import palette
from ..algorithms.select import (ALREADY_QUANTIZED, WEIGHT_OPS, WeightLayer, check_ops, embedding_pattern,
                                 embedding_problem, find_weight_layers, is_excluded, weight_pattern2, weight_pattern3)
from ..algorithms.sparsegpt import error_terms
from .base import LayerChange, PassContext, PassOutcome, WeightPass

_LADDER = (2, 3, 4, 5, 6, 8)  # bit widths `allocation: sensitivity` tries per weight (plus the requested one)
_PROBE_SAMPLES = 16  # feeds used to measure each weight's end-to-end sensitivity
# GPTQ's damping (fraction of the mean H_jj added to H's diagonal). MiniLM-L3, 4 bits with block scales, mean
# held-out output error of the 18 MatMuls: 0.0609 at 0.01 (GPTQ's own default), 0.0536 at 0.1; the model's
# cosine 0.9886 -> 0.9908 (0.9909 at 0.3)
_GPTQ_DAMPING = 0.1
_BLOCK = 32  # default block_size at <= _BLOCK_BITS bits: per channel and 32 inputs, as int4 block quantization
_BLOCK_BITS = 4
_WEIGHT_CAP_QUANTILE = 0.99  # k-means weights of scaled values capped at this quantile of the tensor's


@dataclass
class _Tensor:
    """One constant weight, every selected node that reads it, and what it becomes."""

    w: gs.Constant
    layers: list[WeightLayer]  # MatMul/Gemm/Conv/ConvTranspose readers
    lookups: list[gs.Node]  # Gather readers (embedding lookups)
    axis: int  # the output-channel axis the groups run along
    # integer weights of quantized layers: (DequantizeLinear / DynamicQuantizeMatMul node, input index)
    quantized: list[tuple[gs.Node, int]] = field(default_factory=list)
    value: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    importance: Optional[np.ndarray] = None  # per element, E[x^2] of the input it multiplies
    sorted_values: Optional[palette.GroupedValues] = None  # sorted once, reused for every bit width
    scales: Optional[palette.Scales] = None  # with channel_scale: found once, reused for every bit width
    palette: Optional["_Palette"] = None  # the chosen codebooks (None: left in float by the allocation)
    row: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.w.name

    def node_names(self) -> list[str]:
        return [layer.name for layer in self.layers] + [n.name for n in self.lookups] + \
            [n.name for n, _ in self.quantized]

    @property
    def integer(self) -> bool:
        return self.value.dtype.kind in "iu"


@dataclass
class _Palette:
    """One weight at one bit width: packed indices, codebooks, group offsets, and what they decode to."""

    bits: int
    words: np.ndarray
    codebook: np.ndarray  # float32 [groups * k]
    offsets: Optional[np.ndarray]  # int32, broadcast along the group axis (None: one codebook)
    groups: int
    iterations: int
    zero_kept: bool
    shape: tuple[int, ...]  # the weight's
    scales: Optional[palette.Scales] = None  # W = codebook[index] * scales (per channel, or channel and block)

    @property
    def index_shape(self) -> tuple[int, ...]:
        """The layout of the packed indices: the weight's shape, or with block scales `Scales.blocked` (the
        block axis padded with index 0 to whole blocks), so the compact scales broadcast against it."""
        return self.scales.blocked(self.shape) if self.scales is not None and self.scales.block else self.shape

    @property
    def nbytes(self) -> int:
        """Bytes the weight takes in the file (indices, codebooks, group offsets, channel scales)."""
        return int(self.words.nbytes + self.codebook.nbytes + (self.offsets.nbytes if self.offsets is not None else 0)
                   + (self.scales.nbytes if self.scales is not None else 0))

    def decode(self) -> np.ndarray:
        """The weight the graph's decode produces (numpy reference of `_decode`)."""
        ishape = self.index_shape
        idx = palette.unpack(self.words, palette.word_layout(self.bits), int(np.prod(ishape))).reshape(ishape)
        if self.offsets is not None:
            idx = idx + self.offsets
        return self.codebook[idx] if self.scales is None else self.scales.apply(self.codebook[idx], self.shape)


@dataclass(frozen=True)
class Palettize(WeightPass):
    """Share weights through k-means codebooks of 2**bits values, decoded once when ONNX Runtime loads the model."""

    name: ClassVar[str] = "palettize"
    weight_ops: ClassVar[tuple[str, ...]] = WEIGHT_OPS
    slower_hint: ClassVar[str] = ("the codebook decode is folded when the session is created and costs nothing "
                                  "per run: a slower result is noise or another pass")
    bits: int = 4  # codebook of 2**bits values (2..8)
    group_size: Optional[int] = None  # output channels per codebook (None: one codebook per tensor)
    weighting: Optional[Literal["activation", "none"]] = None  # default: activation with calibration data
    embeddings: bool = True  # also Gather tables
    # also the int8/uint8 weights of layers an earlier quantize pass made (DequantizeLinear, DynamicQuantizeMatMul,
    # int8 embedding tables): integer codebooks, so ORT still runs its integer kernels on the folded weights
    quantized: bool = True
    # sensitivity: bits per weight (ladder 2..8, or float) with the least output error for the size of `bits`
    # everywhere; default with calibration data (uniform without)
    allocation: Optional[Literal["uniform", "sensitivity"]] = None
    min_weight_elements: int = 4096  # smaller weights stay float (the codebook and decode would not pay off)
    # float weights: each output channel divided by its largest magnitude before clustering, multiplied back in
    # the decode (a float16 scale per channel); default true
    channel_scale: Optional[bool] = None
    # with channel_scale: one scale per output channel and block of this many inputs of a 2-D weight (0: one per
    # channel); default 32 at bits <= 4, else 0
    block_size: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise RecipeError(f"palettize.bits must be an integer in 2..8 (a codebook of 2**bits values), "
                              f"got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise RecipeError(f"palettize.group_size must be a positive integer (output channels per codebook) or "
                              f"null (one codebook per tensor), got {self.group_size!r}")
        if self.channel_scale is not None and not isinstance(self.channel_scale, bool):
            raise RecipeError(f"palettize.channel_scale must be true or false, got {self.channel_scale!r}")
        if self.block_size is not None:
            if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 0:
                raise RecipeError(f"palettize.block_size must be a non-negative integer (inputs per scale; 0: one "
                                  f"scale per output channel) or null (default), got {self.block_size!r}")
            if self.block_size and self.channel_scale is False:
                raise RecipeError("palettize.block_size needs channel_scale (the blocks are of the channel scales); "
                                  "drop block_size or set channel_scale: true")
        super().__post_init__()

    def _scaling(self) -> tuple[bool, int]:
        """(channel_scale, block_size) with the defaults filled in."""
        on = self.channel_scale is not False
        if not on:
            return False, 0
        return True, self.block_size if self.block_size is not None else (_BLOCK if self.bits <= _BLOCK_BITS else 0)

    def resolve(self, has_data: bool) -> "Palettize":
        channel_scale, block_size = self._scaling()
        return dataclasses.replace(self, weighting=self.weighting or ("activation" if has_data else "none"),
                                   allocation=self.allocation or ("sensitivity" if has_data else "uniform"),
                                   channel_scale=channel_scale, block_size=block_size)

    def min_opset(self) -> Optional[int]:
        return 11  # BitShift

    @classmethod
    def summarize(cls, details: dict[str, Any]) -> list[str]:
        rows = details.get("layers", [])
        before = sum(r["bytes_before"] for r in rows)
        after = sum(r["bytes_after"] for r in rows)
        widths = sorted({r["bits"] for r in rows})
        how = (f"{details.get('bits')}-bit" if details.get("allocation") != "sensitivity" else
               f"{'/'.join(map(str, widths)) or details.get('bits')}-bit (sensitivity allocation at the size of "
               f"{details.get('bits')} bits)")
        group = details.get("group_size")
        block = details.get("block_size")
        scales = ("" if not details.get("channel_scale") else
                  f", a scale per channel and {block} inputs" if block else ", a scale per channel")
        lines = [f"{how} codebooks ({details.get('weighting')} weighting, "
                 f"{f'{group} channel(s) per codebook' if group else 'one per tensor'}{scales}) on {len(rows)} "
                 "weight(s): "
                 f"{before:,} -> {after:,} bytes; {len(details.get('left_float', []))} candidate(s) left as they "
                 "were (reasons in the JSON/HTML report)"]
        worst = sorted(rows, key=lambda r: -(r.get("output_rel_err") or r["weight_rel_err"]))[:3]
        if worst:
            lines.append("largest errors: " + ", ".join(
                f"{r['weight']} ({r['bits']} bits, weight {r['weight_rel_err']:.3g}"
                + (f", output {r['output_rel_err']:.3g}" if r.get("output_rel_err") is not None else "") + ")"
                for r in worst))
        return lines

    # ------------------------------------------------------------------------------------------
    def run(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext) -> PassOutcome:
        weighting, allocation = self._resolved(ctx)
        rejections: dict[str, str] = {}
        tensors = _tensors(model, self, rejections)
        _advise(tensors, rejections)
        notes: list[str] = []
        feeds = self.calibration_feeds(ctx)
        grams: dict[str, np.ndarray] = {}
        if weighting == "activation" and tensors:
            grams = _input_moments(tensors, model, source, ctx, feeds)
        channel_scale, block_size = self._scaling()
        details: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size, "weighting": weighting,
                                   "allocation": allocation, "channel_scale": channel_scale,
                                   "block_size": block_size}

        def make(t: _Tensor, bits: int) -> _Palette:
            return _cluster(t, bits, self.group_size, _moment(t, grams, model) if weighting == "activation" else None,
                            channel_scale, block_size)

        if allocation == "sensitivity" and tensors:
            for t in tensors:
                _importance(t, grams, model)
            self._allocate(tensors, source, ctx, feeds, make, details, notes)
            for t in tensors:
                if t.palette is not None:
                    _measure(t, grams, model)
                _release(t)
        else:
            self._uniform(tensors, grams, model, make)
        grams.clear()
        chosen = [t for t in tensors if t.palette is not None]
        for t in tensors:
            if t.palette is None:
                for name in t.node_names():
                    rejections[name] = ("left as it was by the sensitivity allocation (its error costs most per byte "
                                       "saved)")
        _rewrite(model, chosen)
        details.update({
            "layers": [t.row for t in chosen],
            "params_palettized": int(sum(t.value.size for t in chosen)),
            "left_float": [{"node": n, "reason": why} for n, why in sorted(rejections.items())][:500],
        })
        self._auto_notes(ctx, weighting, allocation, channel_scale, block_size, notes)
        return PassOutcome(details=details, notes=notes, layers=_changes(chosen))

    def _resolved(self, ctx: PassContext) -> tuple[str, str]:
        """(weighting, allocation): activation-weighted and sensitivity-allocated when there is data; asking
        for either without data is an error."""
        weighting = self.weighting or ("activation" if ctx.calibration_data else "none")
        allocation = self.allocation or ("sensitivity" if ctx.calibration_data else "uniform")
        for what, value in (("weighting 'activation'", weighting == "activation"),
                            ("allocation 'sensitivity'", allocation == "sensitivity")):
            if value and not ctx.calibration_data:
                raise CalibrationDataError(f"palettize {what} needs calibration_data (input statistics / output "
                                           "sensitivity); give calibration feeds, or use weighting 'none' and "
                                           "allocation 'uniform'")
        return weighting, allocation

    def _uniform(self, tensors: list[_Tensor], grams: dict[str, np.ndarray], model: ir.Model, make) -> None:
        """`bits` on every weight, one at a time, its statistics let go when it is done (a model over 2 GB)."""
        uses: dict[str, int] = {}
        for t in tensors:
            for layer in t.layers:
                uses[layer.x.name] = uses.get(layer.x.name, 0) + 1
        for t in tensors:
            _importance(t, grams, model)
            t.palette = make(t, self.bits)
            _measure(t, grams, model)
            _release(t)
            for layer in t.layers:
                uses[layer.x.name] -= 1
                if not uses[layer.x.name]:
                    grams.pop(layer.x.name, None)

    def _auto_notes(self, ctx: PassContext, weighting: str, allocation: str, channel_scale: bool,
                    block_size: Optional[int], notes: list[str]) -> None:
        """Say what each option left to auto became, and why."""
        for opt, value, why in (("weighting", weighting, "calibration data given"),
                                ("allocation", allocation, "calibration data given")):
            if getattr(self, opt) is None:
                notes.append(f"{opt} auto -> {value} ({why if ctx.calibration_data else 'no calibration data'})")
        if channel_scale and self.block_size is None:
            per = f"output channel and {block_size} inputs" if block_size else "output channel"
            notes.append(f"block_size auto -> {block_size} (one float16 scale per {per} at {self.bits} bits)")

    def _allocate(self, tensors: list[_Tensor], source: onnx.ModelProto, ctx: PassContext, feeds: list,
                  make, details: dict[str, Any], notes: list[str]) -> None:
        """Bits per weight (or float) with the least end-to-end output error for the bytes that `bits` on every
        weight would take: each weight is clustered at every width of the ladder, its output error measured
        alone in one probe session (sensitivity.WeightProbe), and one width per weight chosen
        (sensitivity.allocate)."""
        from ..algorithms.sensitivity import WeightProbe, allocate

        inits = {t.name for t in source.graph.initializer}
        probed = [t for t in tensors if t.name in inits]
        fixed = [t for t in tensors if t not in probed]
        if fixed:
            notes.append(f"{len(fixed)} weight(s) not probed (not main-graph initializers): {self.bits} bits")
        for t in fixed:
            t.palette = make(t, self.bits)
        if not probed:
            return
        ladder = sorted(set(_LADDER) | {self.bits}, reverse=True)
        probe = WeightProbe(source, [t.name for t in probed], feeds[:_PROBE_SAMPLES],
                            **ctx.probe_args(source, "palettize: sensitivity probes", len(probed) * len(ladder)))
        options: dict[str, list[Optional[_Palette]]] = {}
        choices: dict[str, list[tuple[float, float]]] = {}
        budget = 0.0
        for t in probed:
            opts: list[Optional[_Palette]] = [None]
            costs = [(float(t.value.nbytes), 0.0)]
            for b in ladder:
                pal = make(t, b)
                opts.append(pal)
                costs.append((float(pal.nbytes), probe.error({t.name: pal.decode()})))
                if b == self.bits:
                    budget += pal.nbytes
            options[t.name], choices[t.name] = opts, costs
        pick = allocate(choices, budget)
        for t in probed:
            t.palette = options[t.name][pick[t.name]]
            t.sorted_values = None
            t.row["model_output_err"] = float(np.sqrt(choices[t.name][pick[t.name]][1]))
        details["sensitivity"] = {t.name: {("float" if j == 0 else str(ladder[j - 1])): e
                                           for j, (_, e) in enumerate(choices[t.name])} for t in probed}
        details["probe_samples"] = len(probe.feeds)
        spent = sum(choices[n][j][0] for n, j in pick.items())
        notes.append(f"sensitivity allocation: {spent:,.0f} of {budget:,.0f} bytes (the size of {self.bits} bits "
                     "on every probed weight), bits per weight in the report")


def candidates(model: ir.Model, p: Optional[Palettize] = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The weights `p` (default options) would palettize, as {weight, op, shape, bytes}, and the nodes it would
    leave in float with the reason; nothing is changed (what `onnxcomp inspect` shows)."""
    rejections: dict[str, str] = {}
    found = _tensors(model, p or Palettize(), rejections)
    return ([{"weight": t.name, "op": t.layers[0].op if t.layers else "Gather", "shape": list(t.value.shape),
              "bytes": int(t.value.nbytes)} for t in found], rejections)


# ---------------------------------------------------------------------------------------------- planning
def _output_axis(layer: WeightLayer) -> int:
    """The axis of the stored weight that indexes the layer's output channels."""
    if layer.op == "MatMul":
        return 1
    if layer.op == "Gemm":
        return 0 if layer.node.attrs.get("transB", 0) else 1
    return 0 if layer.op == "Conv" else 1


def _tensors(model: ir.Model, p: Palettize, rejections: dict[str, str]) -> list[_Tensor]:
    """The weights to palettize: constants every reader of which is a selected layer or embedding lookup."""
    layers = find_weight_layers(model, check_ops(p.ops, WEIGHT_OPS, "palettize.ops"), p.exclude,
                                p.min_weight_elements, rejections=rejections)
    lookups: list[gs.Node] = []
    if p.embeddings:
        def check(ctx, w, idx, node):
            why = embedding_problem(node, w, p.exclude, max(p.min_weight_elements, 1))
            return fail(why) if why else True

        found = find_matches(model, [query("find-embedding", embedding_pattern, check)], rejections=rejections)
        lookups = [f.match.bindings["node"] for f in found]
    quantized = _quantized_readers(model, p, rejections) if p.quantized else []
    if p.quantized and p.embeddings:
        lookups += _integer_tables(model, p)
    by_w: dict[int, _Tensor] = {}
    for node, pos, axis, imp in quantized:
        w = node.inputs[pos]
        t = by_w.setdefault(id(w), _Tensor(w, [], [], axis))
        t.quantized.append((node, pos))
        if imp is not None:
            t.importance = imp if t.importance is None else t.importance + imp
    for layer in layers:
        t = by_w.setdefault(id(layer.w), _Tensor(layer.w, [], [], _output_axis(layer)))
        t.layers.append(layer)
    for node in lookups:
        w = node.inputs[0]
        t = by_w.setdefault(id(w), _Tensor(w, [], [], 0))
        if all(n is not node for n in t.lookups):
            t.lookups.append(node)
    out = []
    for t in by_w.values():
        mine = {id(layer.node) for layer in t.layers} | {id(n) for n in t.lookups} | {id(n) for n, _ in t.quantized}
        others = [n for n in t.w.outputs if id(n) not in mine]
        axes = {_output_axis(layer) for layer in t.layers} | ({0} if t.lookups else set()) | \
            ({t.axis} if t.quantized else set())
        why = None
        if others:
            why = f"weight '{t.name}' is also read by {others[0].op} '{others[0].name}', which is not palettized"
        elif p.group_size is not None and len(axes) > 1:
            why = f"weight '{t.name}' is read with its output channels on different axes by several layers"
        if why:
            for name in t.node_names():
                rejections[name] = why
            continue
        v = np.asarray(ir.const_value(t.w))
        t.value = v if v.dtype.kind in "iu" else v.astype(np.float32)
        out.append(t)
    return out


def _dq2(op, q, s):
    return op.DequantizeLinear(q, s, _bind="node")


def _dq3(op, q, s, z):
    return op.DequantizeLinear(q, s, z, _bind="node")


def _dqmm3(op, x, q, s):
    return op.DynamicQuantizeMatMul(x, q, s, _domain="com.microsoft", _bind="node")


def _dqmm4(op, x, q, s, z):
    return op.DynamicQuantizeMatMul(x, q, s, z, _domain="com.microsoft", _bind="node")


def _dqmm5(op, x, q, s, z, b):
    return op.DynamicQuantizeMatMul(x, q, s, z, b, _domain="com.microsoft", _bind="node")


def _mitf6(op, x, q, sx, s, zx, z):
    return op.MatMulIntegerToFloat(x, q, sx, s, zx, z, _domain="com.microsoft", _bind="node")


def _mitf7(op, x, q, sx, s, zx, z, b):
    return op.MatMulIntegerToFloat(x, q, sx, s, zx, z, b, _domain="com.microsoft", _bind="node")


_QUANTIZED_PATTERNS = (("dq2", _dq2), ("dq3", _dq3), ("dqmm3", _dqmm3), ("dqmm4", _dqmm4), ("dqmm5", _dqmm5),
                       ("mitf6", _mitf6), ("mitf7", _mitf7))
#: the integer-kernel nodes that take their int8 weight [K, N] directly (groups along N)
_KN_KERNELS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def _integer_problem(node: gs.Node, q: gs.Tensor, p: "Palettize") -> Optional[str]:
    """Why the integer weight `q` of a quantized layer cannot get an integer codebook, or None."""
    readers = [node] + [c for t in node.outputs for c in t.outputs]
    if any(is_excluded(n, p.exclude) for n in readers):
        return f"excluded by the recipe ({node.name})"
    v = ir.const_value(q)
    if v is None:
        return f"'{q.name}' is not a constant weight"
    if v.ndim < 2:
        return f"weight '{q.name}' has rank {v.ndim}"
    if v.dtype not in (np.int8, np.uint8):
        return f"weight '{q.name}' is {v.dtype}: integer codebooks are built for int8/uint8 weights"
    if v.size < p.min_weight_elements:
        return f"weight '{q.name}' has {v.size} elements (< {p.min_weight_elements})"
    if int(node.attrs.get("block_size", 0) or 0) > 0:
        return f"weight '{q.name}' has blocked scales"
    return None


def _quantized_readers(model: ir.Model, p: "Palettize", rejections: dict[str, str]) -> list[tuple]:
    """(node, input index, group axis, importance) of each int8/uint8 constant weight read by a
    DequantizeLinear, DynamicQuantizeMatMul or MatMulIntegerToFloat; importance = scale^2 per element (the
    dequantized error)."""
    def check(ctx, q, s, node, **_):
        why = _integer_problem(node, q, p)
        if why:
            return fail(why)
        return True if ctx.const_value(s) is not None else fail("scale is not a constant")

    local: dict[str, str] = {}
    found = find_matches(model, [query(f"find-quantized-{n}", f, check) for n, f in _QUANTIZED_PATTERNS],
                         rejections=local)
    rejections.update({n: r for n, r in local.items()  # activations, biases and non-matches are no candidates
                       if not any(k in r for k in ("is not a constant", "no match", "has rank"))})
    out, seen = [], set()
    for f in found:
        node, q, sc = f.match.bindings["node"], f.match.bindings["q"], f.match.bindings["s"]
        if id(node) in seen:
            continue
        seen.add(id(node))
        v, scale = ir.const_value(q), np.asarray(ir.const_value(sc), np.float64)
        axis = 1 if node.op in _KN_KERNELS else int(node.attrs.get("axis", 1)) % v.ndim
        imp = None
        if scale.size == v.shape[axis] and scale.size > 1:
            shape = [1] * v.ndim
            shape[axis] = scale.size
            imp = np.broadcast_to((scale ** 2).reshape(shape), v.shape)
        out.append((node, list(node.inputs).index(q), axis, imp))
    return out


def _integer_tables(model: ir.Model, p: "Palettize") -> list[gs.Node]:
    """Gather lookups on int8/uint8 2-D tables (quantize's int8 embeddings)."""
    def check(ctx, w, idx, node):
        v = ctx.const_value(w)
        if v is None or v.dtype not in (np.int8, np.uint8):
            return fail("not an integer table")
        if is_excluded(node, p.exclude):
            return fail(f"excluded by the recipe ({node.name})")
        if node.attrs.get("axis", 0) != 0 or v.ndim != 2 or v.size < max(p.min_weight_elements, 1):
            return fail("not a 2-D integer embedding table read along axis 0 with enough values")
        return True

    found = find_matches(model, [query("find-integer-embedding", embedding_pattern, check)])
    return [f.match.bindings["node"] for f in found]


def _input_moments(tensors: list[_Tensor], model: ir.Model, source: onnx.ModelProto, ctx: PassContext,
                   feeds: list) -> dict[str, np.ndarray]:
    """X^T X / rows of every main-graph layer input (channels on axis 1 for Conv/ConvTranspose), one run."""
    axes = {}
    for t in tensors:
        for layer in t.layers:
            if layer.graph is model.graph:
                axes[layer.x.name] = 1 if layer.op in ("Conv", "ConvTranspose") else -1
    return ctx.second_moments(source, feeds, axes)


def _importance(t: _Tensor, grams: dict[str, np.ndarray], model: ir.Model) -> None:
    """Per element of the stored weight, the summed E[x_j^2] of the input channel it multiplies in each reader
    (None when no reader's input was observed: plain k-means)."""
    if t.integer:
        return  # importance = scale^2, set when the quantized readers were found
    imp = None
    w = t.value
    for layer in t.layers:
        h = grams.get(layer.x.name) if layer.graph is model.graph else None
        if h is None:
            continue
        d = np.maximum(np.diag(h), 0.0)
        if layer.op == "MatMul" or (layer.op == "Gemm" and not layer.node.attrs.get("transB", 0)):
            e = np.broadcast_to(d[:, None], w.shape)
        elif layer.op == "Gemm":
            e = np.broadcast_to(d[None, :], w.shape)
        elif layer.op == "Conv":  # [Cout, Cin/g, *k]: output o of group o // (Cout/g) reads inputs of that group
            g = int(layer.node.attrs.get("group", 1))
            cout, cig = w.shape[0], w.shape[1]
            chan = (np.arange(cout) // (cout // g))[:, None] * cig + np.arange(cig)[None, :]
            e = np.broadcast_to(d[chan].reshape(cout, cig, *([1] * (w.ndim - 2))), w.shape)
        else:  # ConvTranspose [Cin, Cout/g, *k]
            e = np.broadcast_to(d.reshape(-1, *([1] * (w.ndim - 1))), w.shape)
        imp = e.astype(np.float64) if imp is None else imp + e
    t.importance = imp


def _moment(t: _Tensor, grams: dict[str, np.ndarray], model: ir.Model) -> Optional[np.ndarray]:
    """The input second moment the weight's indices are chosen against (GPTQ): a single MatMul/Gemm reader in
    the main graph whose input was observed, else None (nearest codebook value per weight)."""
    if len(t.layers) != 1 or t.lookups or t.quantized:
        return None
    layer = t.layers[0]
    if layer.op not in ("MatMul", "Gemm") or layer.graph is not model.graph:
        return None
    return grams.get(layer.x.name)


def _cluster(t: _Tensor, bits: int, group_size: Optional[int], h: Optional[np.ndarray],
             channel_scale: bool = False, block_size: Optional[int] = None) -> _Palette:
    """k-means codebooks of 2**bits values (one per group of `group_size` channels along t.axis) and the packed
    indices: the nearest codebook value per weight, or with the input moment `h` GPTQ's choice with error
    feedback. With `channel_scale` (float weights), each output channel (or, with `block_size`, each channel's
    block of that many inputs of a 2-D weight) is divided by its largest magnitude first and the decode
    multiplies it back: one codebook then serves channels and blocks of different ranges."""
    w = t.value
    k = 1 << bits
    channels = w.shape[t.axis]
    size = channels if group_size is None else min(group_size, channels)
    n_groups = -(-channels // size)
    shape = [1] * w.ndim
    shape[t.axis] = channels
    chan_group = (np.arange(channels) // size).reshape(shape)
    if channel_scale and not t.integer and t.scales is None:
        t.scales = palette.absmax_scales(w, t.axis, block_size or 0)
    scales = t.scales if channel_scale and not t.integer else None
    # one scale per element: for the first fit and for GPTQ (an embedding table's later widths need neither)
    full = None if scales is None or (t.sorted_values is not None and h is None) else scales.full(w.shape)
    if t.sorted_values is None:
        if full is None:
            t.sorted_values = palette.GroupedValues(w, np.broadcast_to(chan_group, w.shape), n_groups, t.importance)
        else:  # the error of a normalised value counts scale^2 times in the weight
            s2 = np.square(full, dtype=np.float64)
            wt = s2 if t.importance is None else t.importance * s2
            # capped at the 99th percentile: a few weights of outlier inputs in large blocks would otherwise pull
            # a group's levels to themselves (MiniLM-L3 4 bits, group 16: cosine 0.9585 -> 0.9918; per tensor
            # 0.9908 -> 0.9915)
            wt = np.minimum(wt, np.quantile(wt, _WEIGHT_CAP_QUANTILE))
            t.sorted_values = palette.GroupedValues(w / full, np.broadcast_to(chan_group, w.shape), n_groups, wt)
    cb = t.sorted_values.fit(k)
    labels = cb.labels.reshape(w.shape)
    values = cb.values
    if t.integer:  # integer codebook values, each weight to its nearest one
        info = np.iinfo(w.dtype)
        values = np.sort(np.clip(np.round(values), info.min, info.max), axis=1)
        gid = np.broadcast_to(chan_group, w.shape).reshape(-1)
        labels = palette.nearest(w.reshape(-1).astype(np.float64), values, gid).reshape(w.shape)
        cb = dataclasses.replace(cb, values=values)
    if h is not None:  # [outputs, inputs] layout for GPTQ; row groups are the output-channel groups
        out_major = t.axis == 0
        books = cb.values.astype(w.dtype).astype(np.float64)  # the values the decode holds
        sc = None if full is None else (full if out_major else full.T)
        lab = palette.gptq_assign(w if out_major else w.T, h, books, chan_group.reshape(-1), damping=_GPTQ_DAMPING,
                                  scale=sc)
        labels = lab if out_major else lab.T
    if t.integer and t.quantized and t.value.ndim >= 2:
        labels = _pairs_kept(labels, w, cb.values, np.broadcast_to(chan_group, w.shape), t.axis)
    offsets = (chan_group * k).astype(np.int32) if n_groups > 1 else None
    if scales is not None and scales.block:  # indices in the blocked layout the compact scales broadcast against
        padded = scales.padded(w.shape)
        labels = np.pad(labels, [(0, padded[0] - w.shape[0]), (0, padded[1] - w.shape[1])])
        labels = labels.reshape(scales.blocked(w.shape))
        if offsets is not None:
            offsets = offsets.reshape((1, 1, -1) if t.axis == 1 else (-1, 1, 1))
    return _Palette(bits, palette.pack(labels, palette.word_layout(bits)), cb.values.astype(w.dtype).reshape(-1),
                    offsets, n_groups, cb.iterations, bool(cb.pinned_zero.any()), tuple(w.shape), scales)


def _pairs_kept(labels: np.ndarray, w: np.ndarray, values: np.ndarray, gid: np.ndarray, axis: int) -> np.ndarray:
    """Labels whose integer codebook values keep what int weight `w` had for ORT CPU's saturating kernels: where
    w's even-aligned same-sign pairs along the kernels' inner dimension fit `qmath.PAIR_LIMIT` (quantize's
    `weight_range: pairs`), so do the decoded ones, each pair that would not taking the nearest pair of its
    codebook's values that does. Unchanged where w did not fit (full-range weights of a non-saturating target)."""
    wr, order = qmath.kernel_rows(w, axis)
    if not qmath.pairs_fit(wr):
        return labels
    lr, _ = qmath.kernel_rows(labels, axis)
    gr, _ = qmath.kernel_rows(gid, axis)
    vals = values.reshape(-1, values.shape[-1]).astype(np.float64)  # [groups, k]
    dec = vals[gr, lr]
    kk = dec.shape[1] // 2 * 2
    r, c = np.nonzero(qmath.pairs_over(dec[:, 0:kk:2], dec[:, 1:kk:2]))
    if r.size == 0:
        return labels
    lr = np.array(lr, copy=True)
    va, vb = vals[gr[r, 2 * c]], vals[gr[r, 2 * c + 1]]  # [pairs, k] each
    fits = ~qmath.pairs_over(va[:, :, None], vb[:, None, :])
    cost = (va[:, :, None] - wr[r, 2 * c][:, None, None]) ** 2 + (vb[:, None, :] - wr[r, 2 * c + 1][:, None, None]) ** 2
    best = np.argmin(np.where(fits, cost, np.inf).reshape(len(r), -1), axis=1)
    lr[r, 2 * c], lr[r, 2 * c + 1] = best // vals.shape[1], best % vals.shape[1]
    return qmath.from_kernel_rows(lr, order, w.shape, axis).astype(labels.dtype)


def _release(t: _Tensor) -> None:
    """Drop what only the clustering needed (the sorted copy and importance: several times the weight)."""
    t.sorted_values = None
    t.importance = None
    t.scales = None


def _measure(t: _Tensor, grams: dict[str, np.ndarray], model: ir.Model) -> None:
    """Weight error, layer-output error where the input moment is known, and bytes, for the report."""
    w = t.value.astype(np.float64)
    decoded = t.palette.decode()
    dw = decoded.astype(np.float64) - w
    if t.integer and t.importance is not None:  # dequantized error: each integer step weighs its scale^2
        dw, w = dw * np.sqrt(t.importance), w * np.sqrt(t.importance)
    norm = float(np.sum(w * w))
    out_err = None
    kind = None
    for layer in t.layers:
        h = grams.get(layer.x.name) if layer.graph is model.graph else None
        if h is None:
            continue
        if layer.op in ("MatMul", "Gemm"):
            m = layer.matrix()  # [k, n] with y = x @ m
            num, den = error_terms(m.T, layer.matrix(decoded).T, h)
            e, kind_here = (float(np.sqrt(num / den)) if den > 0 else 0.0), "exact"
        else:
            imp = t.importance
            e = float(np.sqrt(np.sum(imp * dw * dw) / max(np.sum(imp * w * w), 1e-300)))
            kind_here = "diagonal estimate"
        if out_err is None or e > out_err:
            out_err, kind = e, kind_here
    p = t.palette
    t.row.update({"bits": p.bits, "groups": p.groups, "kmeans_iterations": p.iterations, "zero_kept": p.zero_kept,
        "weight": t.name, "nodes": t.node_names(),
        "op": t.layers[0].op if t.layers else t.quantized[0][0].op if t.quantized else "Gather",
        "dtype": str(t.value.dtype),
        "shape": list(t.value.shape),
        "weight_rel_err": float(np.sqrt(np.sum(dw * dw) / norm)) if norm > 0 else 0.0,
        "output_rel_err": out_err, "output_err_kind": kind,
        "bytes_before": int(t.value.nbytes), "bytes_after": p.nbytes,
    })


# ---------------------------------------------------------------------------------------------- rewriting
def _decode(op, t: _Tensor) -> gs.Tensor:
    """The decode subgraph of `t` (constants only): packed words -> indices -> codebook values (-> times the
    scales), in W's shape; numpy reference: _Palette.decode. Its constants' names end in one of
    summary.CODEBOOK_SUFFIXES (how the report counts them)."""
    p = t.palette
    bits = p.bits
    layout = palette.word_layout(bits)
    ishape = p.index_shape
    n = int(np.prod(ishape))
    shape = op.const(np.array(ishape, np.int64), name=f"{t.name}_palette_shape")
    words = op.const(p.words, name=f"{t.name}_palette_indices")
    if layout.per_word == 1:
        idx = op.Reshape(words, shape)
    else:
        shifted = op.BitShift(words, op.const(palette.shifts(layout), name=f"{t.name}_palette_shifts"),
                              direction="RIGHT")
        mod = op.Mod(shifted, op.const(np.array(1 << bits, layout.dtype), name=f"{t.name}_palette_modulus"))
        if layout.dtype != np.uint8:  # narrow at once: the folding steps after this copy 1 byte per weight, not 4-8
            mod = op.Cast(mod, to=onnx.TensorProto.UINT8)
        flat = op.Reshape(mod, op.const(np.array([-1], np.int64), name=f"{t.name}_palette_flat"))
        if p.words.size * layout.per_word != n:
            flat = op.Slice(flat, op.const(np.array([0], np.int64), name=f"{t.name}_palette_start"),
                            op.const(np.array([n], np.int64), name=f"{t.name}_palette_end"))
        idx = op.Reshape(flat, shape)
    idx = op.Cast(idx, to=onnx.TensorProto.INT32)
    if p.offsets is not None:
        idx = op.Add(idx, op.const(p.offsets, name=f"{t.name}_palette_group_offsets"))
    out = op.Gather(op.const(p.codebook, name=f"{t.name}_palette_codebook"), idx, axis=0)
    if p.scales is not None:
        out = _scale(op, t.name, out, p.scales, p.shape)
    return out


def _scale(op, name: str, values: gs.Tensor, scales: palette.Scales, shape: tuple[int, ...]) -> gs.Tensor:
    """`values` (in the index layout) times the compact float32 scales, back in the weight's `shape`: the Mul
    broadcasts one scale per channel or block, so no tensor of per-element scales is made at load (numpy
    reference: palette.Scales.apply)."""
    s = op.const(scales.stored, name=f"{name}_palette_scales")
    if scales.stored.dtype != np.float32:
        s = op.Cast(s, to=onnx.TensorProto.FLOAT)
    out = op.Mul(values, s)
    if not scales.block:
        return out
    b, padded = scales.block_axis, scales.padded(shape)
    out = op.Reshape(out, op.const(np.array(padded, np.int64), name=f"{name}_palette_scaled_shape"))
    if padded[b] != shape[b]:
        out = op.Slice(out, op.const(np.array([0], np.int64), name=f"{name}_palette_scales_start"),
                       op.const(np.array([shape[b]], np.int64), name=f"{name}_palette_scales_end"),
                       op.const(np.array([b], np.int64), name=f"{name}_palette_scales_axis"))
    return out


def _advise(tensors: list[_Tensor], rejections: dict[str, str]) -> None:
    """Reword the float finder's refusals for palettize: a layer whose integer weight gets a codebook is not left
    alone after all, and "already quantized" advice is for the other weight passes."""
    for t in tensors:
        for node, _ in t.quantized:
            for c in (c for out in node.outputs for c in out.outputs):
                rejections.pop(c.name, None)
    for name, why in list(rejections.items()):
        if ALREADY_QUANTIZED in why:
            rejections[name] = why.replace(ALREADY_QUANTIZED, "its integer weight is palettized where it is "
                                           "large enough (see that weight's own row)")


def _changes(chosen: list[_Tensor]) -> list[LayerChange]:
    """The error an accuracy budget ranks by (end to end where probed, else the layer's own), per node; the
    bytes saved on the first reader of each weight."""
    changes = []
    for t in chosen:
        err = next(t.row[k] for k in ("model_output_err", "output_rel_err", "weight_rel_err")
                   if t.row.get(k) is not None)
        saved = t.row["bytes_before"] - t.row["bytes_after"]
        for i, name in enumerate(t.node_names()):
            changes.append(LayerChange(name, float(err), bytes_saved=saved if i == 0 else 0))
    return changes


def _rewrite(model: ir.Model, tensors: list[_Tensor]) -> None:
    """Every reader of a palettized weight -> the same node reading the weight's decode (one decode per weight)."""
    if not tensors:
        return
    plan = Plan([(layer.node, t) for t in tensors for layer in t.layers]
                + [(n, t) for t in tensors for n in t.lookups] + [(n, t) for t in tensors for n, _ in t.quantized])
    made: dict[str, gs.Tensor] = {}

    def decoded(op, t: _Tensor) -> gs.Tensor:
        if t.name not in made:
            made[t.name] = _decode(op, t)
        return made[t.name]

    def replacement(op, x, w, node, decision: _Tensor, b=None):
        ins = [x, decoded(op, decision)] + ([b] if b is not None else [])
        return getattr(op, node.op)(*ins, _name=node.name, **node.attrs)

    def lookup(op, w, idx, node, decision: _Tensor):
        return op.Gather(decoded(op, decision), idx, _name=node.name, **node.attrs)

    def quantized(op, q, s, node, decision: _Tensor, **_):
        ins = [decoded(op, decision) if t is q else t for t in node.inputs]  # the node's own inputs, q decoded
        return getattr(op, node.op)(*ins, _domain=node.domain or None, _name=node.name, **node.attrs)

    rules = []
    if any(t.quantized for t in tensors):
        rules += [RewriteRule(f"palettize-quantized-{n}", f, quantized) for n, f in _QUANTIZED_PATTERNS]
    for op_type in sorted({layer.op for t in tensors for layer in t.layers}):
        rules.append(RewriteRule(f"palettize-{op_type.lower()}", weight_pattern2(op_type), replacement))
        if op_type != "MatMul":
            rules.append(RewriteRule(f"palettize-{op_type.lower()}-bias", weight_pattern3(op_type), replacement))
    if any(t.lookups for t in tensors):
        rules.append(RewriteRule("palettize-embedding", embedding_pattern, lookup))
    stats = apply_rules(model, rules, plan=plan)
    missing = [n.name for t in tensors for n in t.w.outputs]  # readers still on the original weight
    if missing:
        raise InternalError(f"palettize: the rewrite of {missing[:3]} was refused by the engine, which leaves "
                            f"their shared decode unused: {stats.explain(3)}")
    take_back_names(model.graph, made)  # the new weight takes the old one's name when it is free
