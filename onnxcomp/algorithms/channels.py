"""Structured pruning (`sparsify` with `pattern: channel`): remove whole channels so that shapes really shrink.

A *group* is a producer layer (MatMul/Gemm/Conv with a constant weight) whose output channels flow through a
channel-preserving region (bias Add, BatchNormalization, elementwise activations such as an Erf-GELU, pools, a
Flatten) into one or more consumer layers that read them on their reduction axis. Removing channel j deletes
producer column/filter j, the j-th entry of every per-channel constant in the region, and the consumer rows
that read it (a block of rows after a Flatten). Channels that reach anything else (a residual Add, a Reshape,
a LayerNorm, a graph output) are not prunable: the group is refused with the reason, so residual streams stay
consistent. A join of two producers' outputs that share one channel set -- the gated MLP
`act(x Wg) * (x Wu) -> Wd` of SwiGLU/GeGLU/GLU blocks, or any elementwise join of two such layers -- makes them
one group: channel j goes from every producer at once (`_Group.extra`).

Which channels go: `magnitude` (producer column norm x consumer row norm, no data), `wanda` (activation
norm x consumer row norm, then a least-squares refit), `sparsegpt` (greedy group-OBS on the consumer input's
Gram matrix: each step removes the channels whose loss, with the other rows refitted, is smallest). The
refit has an intercept when the consumer has a bias, so a removed channel's mean contribution moves into it.
Groups that share a layer (fc1 -> fc2 -> fc3) are rewritten together: one engine rule per connected
component, built from the component's own nodes, so every replacement keeps its outputs' shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .. import ir
from ..calibration.chunks import CHUNK_BYTES
from ..errors import CalibrationDataError
from ..rewrite import GraphIndex, Plan, apply_rules
from ..context import LayerChange, PassContext, PassOutcome
from .components import Component, component, component_rule
from .select import WeightLayer, check_ops, find_weight_layers, is_excluded

_UNARY = frozenset({"Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Softplus", "Softsign", "Elu", "Selu", "LeakyRelu",
                    "HardSigmoid", "HardSwish", "Mish", "Abs", "Neg", "Exp", "Sqrt", "Identity", "Dropout",
                    "Clip", "PRelu", "ThresholdedRelu", "Celu", "QuickGelu"})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"})
#: com.microsoft activations with a per-channel bias input (ORT's transformers optimizer fuses bias + GELU):
#: input 0 is the channel tensor, the bias is sliced with it
_BIAS_ACT = frozenset({"BiasGelu", "FastGelu"})
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_CHANNEL_OPS = ("MatMul", "Gemm", "Conv")
#: candidate fractions of channels removed per group when allocating by sensitivity
_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass
class _Group:
    producer: WeightLayer
    region: list[gs.Node]  # channel-preserving nodes between producer and consumers, in graph order
    consumers: list[WeightLayer]
    tensor: gs.Tensor  # what the consumers read
    channels: int
    block: int  # consumer rows per channel (1; H*W after a Flatten)
    slices: dict[tuple[int, int], int]  # (id(region node), input index) -> axis of that constant to slice
    biases: dict[str, Optional[gs.Node]] = field(default_factory=dict)  # consumer -> its bias Add (MatMul)
    keep: Optional[np.ndarray] = None
    attention: Optional[dict[str, Any]] = None  # attention-head group: the block's bindings (heads.py)
    extra: list[WeightLayer] = field(default_factory=list)  # more producers (q and k of a head group)
    rows: float = 0.0  # rows (batch x sequence) per calibration sample the consumers read; 0: not measured

    @property
    def producers(self) -> list[WeightLayer]:
        return [*self.extra, self.producer]

    @property
    def is_gqa(self) -> bool:
        """A grouped-query attention block (gqa.py): query heads, removed alike in every KV group."""
        return self.attention is not None and self.attention.get("form") == "gqa"

    @property
    def is_fused(self) -> bool:
        """ORT's fused com.microsoft Attention (fused_attention.py): heads of its packed QKV weight."""
        return self.attention is not None and self.attention.get("form") == "fused"

    @property
    def kv_unit(self) -> bool:
        """A grouped-query block pruned by whole KV groups (a KV head with its query heads)."""
        return self.is_gqa and self.attention.get("unit") == "kv"

    @property
    def params(self) -> int:
        n = sum(l.weight.size for l in [*self.producers, *self.consumers])
        if self.kv_unit:  # whole KV groups take their share of Wk and Wv with them
            n += sum(ir.const_value(self.attention["kv"][t]["mm"].inputs[1]).size for t in "kv")
        return n


def _expand(keep: np.ndarray, block: int) -> np.ndarray:
    """Row indices of the kept channels when each channel owns `block` consecutive rows."""
    return (keep[:, None] * block + np.arange(block)).reshape(-1)


def _gram_axis(g: "_Group") -> int:
    """Axis of the consumers' input whose vectors the Gram is taken over (Conv: channels; else the last)."""
    return 1 if g.consumers[0].op == "Conv" else -1


def _channel_axis(layer: WeightLayer) -> int:
    return -1 if layer.op == "MatMul" else 1


def _channels(layer: WeightLayer) -> int:
    w = layer.weight
    if layer.op == "Conv":
        return w.shape[0]
    if layer.op == "Gemm":
        return w.shape[0] if layer.node.attrs.get("transB", 0) else w.shape[1]
    return w.shape[1]


def _rank(t: gs.Tensor) -> Optional[int]:
    return len(t.shape) if getattr(t, "shape", None) is not None else None


@dataclass
class _Walk:
    """The state of `_trace`'s walk from one producer's output through its channel-preserving region."""

    layer: WeightLayer
    index: GraphIndex
    by_node: dict[int, WeightLayer]
    order: dict[int, int]
    c: int  # the producer's channels
    axis: int  # the channel axis of the producer's output
    region: list[gs.Node] = field(default_factory=list)
    slices: dict[tuple[int, int], int] = field(default_factory=dict)
    consumers: list[WeightLayer] = field(default_factory=list)
    inside: set[int] = field(default_factory=set)
    tensors: set[int] = field(default_factory=set)
    frontier: list[gs.Tensor] = field(default_factory=list)
    block: int = 1
    final: Optional[gs.Tensor] = None
    extra: list[WeightLayer] = field(default_factory=list)  # producers joined to the region (gated MLPs)


def _trace(layer: WeightLayer, index: GraphIndex, by_node: dict[int, WeightLayer],
           order: dict[int, int]) -> _Group | str:
    """The group rooted at `layer`, or why its channels cannot be removed (`order`: node id -> graph position)."""
    if layer.op == "Conv" and layer.node.attrs.get("group", 1) != 1:
        return "grouped/depthwise Conv"
    walk = _Walk(layer, index, by_node, order, _channels(layer), _channel_axis(layer))
    walk.tensors.add(id(layer.output))
    walk.frontier.append(layer.output)
    why = _walk_region(walk)
    while not why:  # a join with another producer's channels: take that producer in and walk on from it
        why, joined = _check_joins(walk)
        if not joined:
            break
        why = _walk_region(walk)
    why = why or _check_consumers(walk)
    if why:
        return why
    walk.region.sort(key=lambda n: order.get(id(n), 0))
    biases = _consumer_biases(walk.consumers, index)
    return _Group(layer, walk.region, walk.consumers, walk.final, walk.c, walk.block, walk.slices, biases,
                  extra=walk.extra)


def _walk_region(walk: _Walk) -> Optional[str]:
    """Follow the channels until consumer layers read them; why they cannot be followed, if so."""
    while walk.frontier:
        t = walk.frontier.pop()
        if walk.index.is_graph_output(t):
            return f"channels reach the graph output '{t.name}'"
        for n in walk.index.consumers(t):
            if id(n) in walk.inside:
                continue
            wl = walk.by_node.get(id(n))
            if wl is not None and wl.x is t:
                why = _add_consumer(walk, wl, n, t)
            else:
                why = _add_region_node(walk, n, t)
            if why:
                return why
    return None


def _add_consumer(walk: _Walk, wl: WeightLayer, n: gs.Node, t: gs.Tensor) -> Optional[str]:
    """Take layer `wl` (reading `t` on its input) as a consumer, unless it cannot read the channels by row."""
    if wl.op == "Conv" and (wl.node.attrs.get("group", 1) != 1 or walk.block != 1):
        return f"channels reach Conv '{n.name}' with groups or after a Flatten"
    if wl.op == "Gemm" and wl.node.attrs.get("transA", 0):
        return f"channels reach Gemm '{n.name}' with transA"
    if (wl.op == "Conv") != (walk.axis == 1 and walk.block == 1) and not (wl.op == "Gemm" and walk.axis == 1):
        return f"channel axis does not match the reduction axis of {n.op} '{n.name}'"
    if walk.final is not None and walk.final is not t:
        return "consumers read the channels at different points of the region"
    walk.final = t
    walk.consumers.append(wl)
    walk.inside.add(id(n))
    return None


def _add_region_node(walk: _Walk, n: gs.Node, t: gs.Tensor) -> Optional[str]:
    """Take node `n` (reading `t`) into the region and follow its output, unless it does not preserve channels."""
    if walk.block != 1 and n.op not in _UNARY:
        return f"{n.op} '{n.name}' after a Flatten"
    if n.op in _UNARY or n.op == "BatchNormalization" or (n.op in _POOLS and walk.axis == 1) \
            or n.op in _BINARY or (n.op in _BIAS_ACT and n.domain == "com.microsoft"):
        why = _check_elementwise(walk, n, t)
    elif n.op == "Flatten" and walk.axis == 1 and n.attrs.get("axis", 1) == 1 and walk.block == 1:
        why = _flatten(walk, n, t)
    else:
        return f"channels reach {n.op} '{n.name}'"
    if why:
        return why
    walk.inside.add(id(n))
    walk.region.append(n)
    for o in n.outputs[:1]:
        walk.tensors.add(id(o))
        walk.frontier.append(o)
    return None


def _check_elementwise(walk: _Walk, n: gs.Node, t: gs.Tensor) -> Optional[str]:
    """Check the other inputs of a per-channel node `n` (recording the constants to slice); why it mixes, if so."""
    first = 0 if n.op in _BINARY else 1  # unary ops and BN: input 0 is the channel tensor itself
    for i, x in enumerate(n.inputs[first:], first):
        if not x.name or id(x) in walk.tensors:
            continue
        v = ir.const_value(x)
        why = _other_operand(walk, n, x) if v is None else _const_operand(walk, n, i, x, v, t)
        if why:
            return why
    if n.op == "Dropout" and len(n.outputs) > 1 and walk.index.has_consumers(n.outputs[1]):
        return f"Dropout '{n.name}' mask is used"
    return None


def _other_operand(walk: _Walk, n: gs.Node, x: gs.Tensor) -> Optional[str]:
    """Why non-constant input `x` of `n` stops the walk; none for a binary operand that may come from the region
    or from another producer with the same channels (then joined to the walk)."""
    if n.op in _BINARY:  # the other operand may still be reached from the region, unless
        if _join(walk, x):
            return None
        src = x.inputs[0] if x.inputs else None  # it is computed before the producer
        if src is None or walk.order.get(id(src), -1) < walk.order.get(id(walk.layer.node), 0):
            return f"{n.op} '{n.name}' joins the channels with '{x.name}' (a residual or another branch)"
        return None
    return f"{n.op} '{n.name}' has a non-constant parameter '{x.name}'"


def _const_operand(walk: _Walk, n: gs.Node, i: int, x: gs.Tensor, v: np.ndarray, t: gs.Tensor) -> Optional[str]:
    """Record the axis to slice of constant input i (`x`, value `v`) of `n`; why it is not per channel, if so."""
    if n.op == "BatchNormalization":
        if v.shape != (walk.c,):
            return f"BatchNormalization '{n.name}' parameter '{x.name}' is not per channel"
        walk.slices[(id(n), i)] = 0
        return None
    if n.op == "PRelu" or n.op in _BINARY or n.op in _BIAS_ACT:
        return _broadcast_operand(walk, n, i, x, v, t)
    return None


def _broadcast_operand(walk: _Walk, n: gs.Node, i: int, x: gs.Tensor, v: np.ndarray,
                       t: gs.Tensor) -> Optional[str]:
    """A broadcast constant must be per channel on the channel axis of `t` (then sliced) or constant along it."""
    r = _rank(t)
    axis = walk.axis
    if v.ndim and (axis == -1 or r is not None):
        ax = v.ndim - 1 if axis == -1 else axis - (r - v.ndim)
        if 0 <= ax < v.ndim and v.shape[ax] != 1:
            if v.shape[ax] != walk.c or any(s != 1 for k, s in enumerate(v.shape) if k != ax):
                return f"{n.op} '{n.name}' constant '{x.name}' {list(v.shape)} mixes channels"
            walk.slices[(id(n), i)] = ax
        elif any(s != 1 for s in v.shape):
            return f"{n.op} '{n.name}' constant '{x.name}' {list(v.shape)} mixes channels"
    elif v.ndim:
        return f"{n.op} '{n.name}': rank of '{t.name}' unknown"
    return None


def _flatten(walk: _Walk, n: gs.Node, t: gs.Tensor) -> Optional[str]:
    """A Flatten of NCHW channels: each channel then owns a block of H*W consumer rows."""
    shape = t.shape
    if shape is None or any(not isinstance(s, int) for s in shape[2:]):
        return f"Flatten '{n.name}' of a tensor with unknown spatial shape"
    walk.block = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return None


def _join_partner(walk: _Walk, x: gs.Tensor) -> Optional[WeightLayer]:
    """The one weight layer that `x` is computed from through elementwise nodes only (`act(x Wg)` of a gated
    MLP), if it has the walk's channels on the same axis; None otherwise. Looks back at most 16 tensors."""
    found: Optional[WeightLayer] = None
    stack, seen = [x], set()
    while stack:
        t = stack.pop()
        if id(t) in seen or ir.const_value(t) is not None:
            continue
        seen.add(id(t))
        src = t.inputs[0] if t.inputs else None
        if len(seen) > 16 or src is None or id(t) in walk.tensors:
            return None
        wl = walk.by_node.get(id(src))
        if wl is not None and wl.output is t:
            if found is not None and found is not wl:
                return None
            found = wl
        elif src.op in _UNARY or src.op in _BINARY:
            stack.extend(i for i in src.inputs if i.name)
        else:
            return None
    if found is None or found is walk.layer or any(found is e for e in walk.extra) \
            or _channels(found) != walk.c or _channel_axis(found) != walk.axis \
            or (found.op == "Conv" and found.node.attrs.get("group", 1) != 1):
        return None
    return found


def _join(walk: _Walk, x: gs.Tensor) -> bool:
    """Take the producer behind binary operand `x` into the walk (see `_join_partner`); whether one was."""
    partner = _join_partner(walk, x)
    if partner is None:
        return False
    walk.extra.append(partner)
    walk.tensors.add(id(partner.output))
    walk.frontier.append(partner.output)
    return True


def _check_joins(walk: _Walk) -> tuple[Optional[str], bool]:
    """Binary ops: both operands must come from the region or be checked constants (no residual joins); an
    operand computed from another producer with the same channels joins it to the walk. (why not, joined)"""
    for n in walk.region:
        for i, x in enumerate(n.inputs):
            if n.op in _BINARY and x.name and id(x) not in walk.tensors and (id(n), i) not in walk.slices \
                    and ir.const_value(x) is None:
                if _join(walk, x):
                    return None, True
                return f"{n.op} '{n.name}' joins the channels with '{x.name}' (a residual or another branch)", False
    return None, False


def _check_consumers(walk: _Walk) -> Optional[str]:
    """There must be consumers, each reading exactly channels x block rows."""
    if not walk.consumers:
        return "no consumer layer reads the channels"
    c, block = walk.c, walk.block
    for wl in walk.consumers:
        rows = wl.matrix().shape[0] if wl.op != "Conv" else wl.weight.shape[1]
        if rows != c * block:
            return f"consumer '{wl.name}' reads {rows} rows, expected {c * block}"
    return None


def _consumer_biases(consumers: list[WeightLayer], index: GraphIndex) -> dict[str, Optional[gs.Node]]:
    """Each consumer's bias Add (a MatMul's only reader adding a constant [n] vector), else None."""
    biases: dict[str, Optional[gs.Node]] = {}
    for wl in consumers:
        biases[wl.name] = None
        if wl.op == "MatMul":
            readers = index.consumers(wl.output)
            if len(readers) == 1 and readers[0].op == "Add" and not index.is_graph_output(wl.output):
                other = [x for x in readers[0].inputs if x is not wl.output]
                bv = ir.const_value(other[0]) if len(other) == 1 else None
                if bv is not None and bv.ndim == 1 and bv.shape[0] == wl.weight.shape[1]:
                    biases[wl.name] = readers[0]
    return biases


# -------------------------------------------------------------------------------------------- channel choice
def _consumer_rows(wl: WeightLayer, block: int) -> np.ndarray:
    """The consumer weight as [channels * block, outputs] (Conv: [C_in, C_out*kh*kw])."""
    if wl.op == "Conv":
        w = wl.weight
        return np.ascontiguousarray(w.transpose(1, 0, *range(2, w.ndim)).reshape(w.shape[1], -1))
    return wl.matrix()


def _obs_prune(w: np.ndarray, h: Optional[np.ndarray], block: int, remove: list[int], damping: float,
               fixed: int = 0, score: Optional[np.ndarray] = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Greedy group-OBS: remove channels (blocks of `block` rows of w) in steps, refitting the other rows by least
    squares in the metric h (the rows' Gram). Without h, the channels with the least `score` (default: row
    energy) go and w is kept as is. `fixed` trailing rows (an intercept) are never removed. Returns, for each
    count in `remove` (ascending), (kept channel indices, refitted w)."""
    n_ch = (w.shape[0] - fixed) // block
    w = w.astype(np.float64).copy()
    if h is None:
        if score is None:
            score = (w[: n_ch * block] ** 2).reshape(n_ch, -1).sum(axis=1)
        order = np.argsort(score, kind="stable")
        out = []
        for k in remove:
            keep = np.sort(order[k:])
            out.append((keep, w))
        return out
    h = h.astype(np.float64).copy()
    diag = np.diag(h)[: n_ch * block]
    lam = damping * (float(np.mean(diag)) if diag.size else 1.0) + 1e-12
    h[np.diag_indices_from(h)] += lam
    hinv = np.linalg.inv(h)
    alive = np.ones(n_ch, bool)
    out = []
    removed = 0
    targets = sorted(remove)
    ti = 0
    while ti < len(targets) and targets[ti] == 0:
        out.append((np.arange(n_ch), w.copy()))
        ti += 1
    while ti < len(targets):
        goal = targets[ti]
        step = max(1, min(goal - removed, max(1, n_ch // 64)))
        rows = np.arange(n_ch * block).reshape(n_ch, block)
        live = np.flatnonzero(alive)
        if block == 1:
            d = np.diag(hinv)[live]
            cost = (w[live] ** 2).sum(axis=1) / np.maximum(d, 1e-30)
        else:
            idx = rows[live]
            hb = hinv[idx[:, :, None], idx[:, None, :]]
            wb = w[idx]
            cost = np.einsum("cbm,cbm->c", wb, np.linalg.solve(hb, wb))
        pick = live[np.argsort(cost, kind="stable")[:step]]
        r = rows[pick].reshape(-1)
        hrr = hinv[np.ix_(r, r)]
        sol = np.linalg.solve(hrr, np.concatenate([w[r], hinv[r]], axis=1))
        w -= hinv[:, r] @ sol[:, : w.shape[1]]
        hinv -= hinv[:, r] @ sol[:, w.shape[1]:]
        w[r] = 0.0
        hinv[r, :] = 0.0
        hinv[:, r] = 0.0
        hinv[r, r] = 1.0  # removed rows are decoupled (identity) so later solves stay regular
        alive[pick] = False
        removed += len(pick)
        while ti < len(targets) and removed >= targets[ti]:
            out.append((np.flatnonzero(alive), w.copy()))
            ti += 1
    return out


def _round_for(g: "_Group", k: int) -> int:
    """Channels removed from group g for a wish of k: GQA query heads equally many per KV group (at least one
    kept in each), other groups rounded by `_round`."""
    if g.kv_unit:
        hkv, rep = g.attention["hkv"], g.channels // g.attention["hkv"]
        return min(hkv - 1, max(0, int(round(k / rep)))) * rep
    if g.is_gqa:
        hkv = g.attention["hkv"]
        return min(g.channels // hkv - 1, max(0, int(round(k / hkv)))) * hkv
    return _round(k, g.channels)


def _round(k: int, c: int) -> int:
    """Channels removed, rounded so the kept count is a multiple of 8 for wide layers (SIMD-friendly shapes)."""
    if c >= 64:
        keep = max(8, int(round((c - k) / 8.0)) * 8)
        return max(0, min(c - 1, c - keep))
    return max(0, min(c - 1, k))


def find_groups(model: ir.Model, ops: tuple[str, ...] = _CHANNEL_OPS, exclude: tuple[str, ...] = (),
                heads: bool = False, notes: Optional[list[str]] = None, head_unit: str = "query"
                ) -> tuple[list[_Group], list[dict[str, str]]]:
    """Every prunable channel group (and, with `heads`, attention block) of the main graph, and the layers
    that are not prunable with the reason. With `heads`, Shape readers inside attention blocks are re-pointed
    (an equivalent graph); `head_unit` "kv" prunes grouped-query blocks by whole KV groups where they allow it."""
    notes = [] if notes is None else notes
    layers = find_weight_layers(model, ops=_CHANNEL_OPS, main_graph_only=True)
    by_node = {id(l.node): l for l in layers}
    index = GraphIndex(model.graph)
    order = {id(n): i for i, n in enumerate(model.graph.nodes)}
    groups: list[_Group] = []
    refused: list[dict[str, str]] = []
    claimed: set[int] = set()  # producers already in a group (the other half of a gated MLP)
    for l in layers:
        if l.op not in ops or is_excluded(l.node, exclude) or id(l.node) in claimed:
            continue
        g = _trace(l, index, by_node, order)
        if isinstance(g, str):
            refused.append({"layer": l.name, "reason": g})
            continue
        bad = [c.name for c in g.consumers if c.op not in ops or is_excluded(c.node, exclude)]
        if bad:
            refused.append({"layer": l.name, "reason": f"consumer {bad[0]} excluded by the recipe"})
            continue
        bad = [e.name for e in g.extra if e.op not in ops or is_excluded(e.node, exclude)]
        if bad:
            refused.append({"layer": l.name, "reason": f"joined producer {bad[0]} excluded by the recipe"})
            continue
        claimed.update(id(p.node) for p in g.producers)
        if g.channels < 2:
            refused.append({"layer": l.name, "reason": "a single channel"})
            continue
        groups.append(g)
    if heads:
        groups += _head_groups(model, by_node, ops, exclude, refused, notes)
        groups += _gqa_groups(model, by_node, index, ops, exclude, refused, notes, head_unit)
        groups += _fused_groups(model, by_node, index, ops, exclude, refused, notes)
        refused += _fused_attention(model)
    return groups, refused


#: ORT's fused attention kernels (what its transformers optimizer emits) whose heads are not pruned (packed-QKV
#: Attention is: fused_attention.py)
_FUSED_ATTENTION = frozenset({"MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                              "PackedMultiHeadAttention", "SparseAttention", "DecoderMaskedMultiHeadAttention"})


def _fused_attention(model: ir.Model) -> list[dict[str, str]]:
    """A refusal, with what to do instead, for every fused com.microsoft attention node of the main graph."""
    return [{"layer": n.name, "reason": f"fused attention (com.microsoft {n.op}): its heads are not pruned; prune "
             "heads on the exported graph (MatMul/Softmax attention, recognised) before ORT's transformers "
             "optimizer fuses it"}
            for n in model.graph.nodes if n.op in _FUSED_ATTENTION and n.domain == "com.microsoft"]


# -------------------------------------------------------------------------------------------- the pass part
def prune_channels(model: ir.Model, source: onnx.ModelProto, ctx: PassContext, opts: Any) -> PassOutcome:
    """Remove channels of every prunable group (see the module doc) of `model` (`source` is the same model as a
    ModelProto, for calibration); `opts` is the Sparsify pass's options."""
    notes: list[str] = []
    method = opts.method
    if method == "auto":
        method = "sparsegpt" if ctx.calibration_data is not None else "magnitude"
    details: dict[str, Any] = {"pattern": "channel", "method": method}
    ops = check_ops(opts.ops, _CHANNEL_OPS, "sparsify.ops")
    groups, refused = find_groups(model, ops, tuple(opts.exclude), bool(opts.heads), notes, opts.head_unit)
    details["refused"] = refused
    stream = _residual_stream(model, opts, ctx, refused, notes)
    if not groups:
        notes.append("no prunable channel group found" + (f" ({refused[0]['reason']}, ...)" if refused else ""))
        details["groups"] = []
        if stream is not None:
            _, stats = _group_statistics([], source, ctx, method, opts, stream.normed)
            _slice_residual(model, opts, stats, details, notes)
        return PassOutcome(details=details, notes=notes)

    data_aware = method != "magnitude"
    counts = _counts(groups, opts)
    chunks = _statistics_chunks(groups) if data_aware and opts.allocation != "sensitivity" \
        and not opts.sequential else [groups]
    if len(chunks) > 1:  # Grams over the memory budget: collect, prune and drop them a few groups at a time
        details["statistics_runs"] = len(chunks)
        rows = []
        for chunk in chunks:
            feeds, stats = _group_statistics(chunk, source, ctx, method, opts)
            plans = _plans(chunk, stats, True, notes)
            del stats
            rows += _prune_groups(plans, counts, {}, method, True, opts, source, ctx, feeds, details)
            del plans
        return _channels_outcome(model, groups, rows, refused, details, notes, ctx.providers)
    extra = stream.normed if stream is not None else ()
    feeds, stats = _group_statistics(groups, source, ctx, method, opts, extra) if data_aware or extra \
        else (None, {})
    plans = _plans(groups, stats, data_aware, notes)
    sens = {}
    if opts.allocation == "sensitivity" and data_aware:
        counts, sens = _allocate(plans, method, opts, source, ctx, feeds)
        details["allocation"] = "sensitivity"
    rows = _prune_groups(plans, counts, sens, method, data_aware, opts, source, ctx, feeds, details)
    out = _channels_outcome(model, groups, rows, refused, details, notes, ctx.providers)
    if stream is not None:
        _slice_residual(model, opts, stats, details, notes)
    return out


#: Gram bytes collected in one calibration run by uniform channel pruning (the budget the other passes' chunked
#: moments keep); more groups take several runs
GRAM_CHUNK_BYTES = CHUNK_BYTES


def _statistics_chunks(groups: list[_Group]) -> list[list[_Group]]:
    """Groups in graph order, split so that each part's Grams (float64, d x d per group) fit GRAM_CHUNK_BYTES."""
    chunks: list[list[_Group]] = [[]]
    used = 0
    for g in groups:
        d = g.channels * (1 if g.consumers[0].op == "Conv" else g.block)
        size = 8 * d * d
        if chunks[-1] and used + size > GRAM_CHUNK_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(g)
        used += size
    return chunks


def _group_statistics(groups: list[_Group], source: onnx.ModelProto, ctx: PassContext, method: str,
                      opts: Any, extra: tuple[str, ...] | list[str] = ()) -> tuple[list, dict[str, Any]]:
    """The calibration feeds and the Gram statistics of every group's consumer input (data-aware methods) and
    of the `extra` tensors (last axis), in one calibration run."""
    if ctx.calibration_data is None:
        raise CalibrationDataError(f"sparsify method '{method}' needs calibration_data (activation "
                                   "statistics); use method 'magnitude' without data")
    feeds = opts.calibration_feeds(ctx)
    axes = {g.tensor.name: _gram_axis(g) for g in groups}
    axes.update({name: -1 for name in extra})
    return feeds, ctx.collect(source, [], feeds, histogram=False, gram_axes=axes)


def _residual_stream(model: ir.Model, opts: Any, ctx: PassContext, refused: list, notes: list[str]):
    """The residual stream to slice when the recipe asks for it (`hidden`), else None; why not, in `refused`."""
    if not opts.hidden:
        return None
    from . import residual

    if ctx.calibration_data is None:
        raise CalibrationDataError("sparsify.hidden (slicing the residual stream) needs calibration_data: the "
                                   "stream's principal directions are measured on it")
    stream = residual.find_stream(model)
    if isinstance(stream, str):
        refused.append({"layer": "residual stream", "reason": stream})
        notes.append(f"residual stream not sliced: {stream}")
        return None
    return stream


def _slice_residual(model: ir.Model, opts: Any, stats: dict[str, Any], details: dict[str, Any],
                    notes: list[str]) -> None:
    """Rotate and slice the residual stream (found again: channel pruning may have rebuilt its readers)."""
    from . import residual

    stream = residual.find_stream(model)
    rot = residual.rotation(stream, stats) if not isinstance(stream, str) else None
    if rot is None:
        notes.append("residual stream not sliced: " + (stream if isinstance(stream, str) else "no statistics"))
        return
    q, energy = rot
    k = residual.kept_dims(stream.dim, float(opts.hidden))
    before, after = residual.slice_stream(model, stream, q[:, :k])
    details["residual"] = {"dim": stream.dim, "kept": k, "energy_kept": float(energy[:k].sum() / energy.sum()),
                           "norms": len(stream.norms), "weights": before, "weights_after": after}
    details["params_removed"] = details.get("params_removed", 0) + before - after
    notes.append(f"residual stream sliced {stream.dim} -> {k} ({100 * energy[:k].sum() / energy.sum():.1f}% of "
                 "the normalised stream's energy kept)")


def _plans(groups: list[_Group], stats: dict[str, Any], data_aware: bool, notes: list[str]) -> list[tuple]:
    """(group, *its `_plan`) for every group; a note where a data-aware group falls back to magnitude."""
    plans = []
    for g in groups:
        plan = _plan(g, stats.get(g.tensor.name), data_aware)
        if data_aware and plan[2] is None:
            notes.append(f"no activation statistics for '{g.tensor.name}'; group '{g.producer.name}' pruned by "
                         "magnitude")
        plans.append((g, *plan))
    return plans


def _counts(groups: list[_Group], opts: Any) -> dict[int, int]:
    """Channels to remove per group (by id) under uniform allocation: heads or sparsity of its channels, rounded."""
    return {id(g): _round_for(g, int(round((opts.heads if g.attention is not None else opts.sparsity) * g.channels)))
            for g in groups}


def _prune_groups(plans: list[tuple], counts: dict[int, int], sens: dict, method: str, data_aware: bool, opts: Any,
                  source: onnx.ModelProto, ctx: PassContext, feeds: Optional[list],
                  details: dict[str, Any]) -> list[dict[str, Any]]:
    """Choose the kept channels and refitted consumers of every group; one report row per group. Sequential:
    each group refitted on the activations of the model with the groups before it pruned."""
    sim = None
    if opts.sequential and data_aware and len(plans) > 1:
        sim = onnx.ModelProto()
        sim.CopyFrom(source)
        details["sequential"] = True
    rows = []
    for i, (g, mats, w, h, fixed) in enumerate(plans):
        if sim is not None and i:
            st = ctx.collect(sim, [], feeds, histogram=False, gram_axes={g.tensor.name: _gram_axis(g)})
            mats, w, h, fixed = _plan(g, st.get(g.tensor.name), True)
        row = _prune_group(g, mats, w, h, fixed, counts[id(g)], method, opts.damping, sim)
        if id(g) in sens:
            row["sensitivity"] = sens[id(g)]
        rows.append(row)
    return rows


def _prune_group(g: _Group, mats: list[np.ndarray], w: np.ndarray, h: Optional[np.ndarray], fixed: int, k: int,
                 method: str, damping: float, sim: Optional[onnx.ModelProto]) -> dict[str, Any]:
    """Remove k channels of `g` (keep and new consumers stored on it, `sim` updated alike) and its report row."""
    keep, wf = _choose(method, g, w, h, [k], damping, fixed)[0]
    g.keep = keep
    g.new_consumers = _split_consumers(g, mats, wf, keep, fixed)  # type: ignore[attr-defined]
    if sim is not None:
        _simulate(sim, _same_shape_updates(g, wf, keep, mats, fixed))
    row = {"kind": "heads" if g.attention is not None else "channels",
           "producer": g.producer.name, "consumers": [c.name for c in g.consumers],
           "channels": g.channels, "kept": int(len(keep)), "removed": int(g.channels - len(keep))}
    if g.extra and g.attention is None:
        row["joined"] = [e.name for e in g.extra]  # the other producers of a gated MLP
    if g.is_fused:
        row["form"] = "fused"
    if g.is_gqa:
        row["form"] = "gqa"
        rep = g.channels // g.attention["hkv"]
        # kept KV heads: all of them when query heads go alike in every KV group, else the whole groups kept
        row["kv_heads"] = int(len(np.unique(keep // rep)))
        row["unit"] = "kv" if g.kv_unit else "query"
    if h is not None:  # consumer output error on calibration data, from the Gram: tr(D^T H D) / tr(W^T H W)
        d = _zero_removed(wf, keep, g.block, fixed) - w
        row["rel_err"] = float(np.sqrt(max(0.0, np.sum(d * (h @ d))) / max(1e-30, np.sum(w * (h @ w)))))
    return row


def _channels_outcome(model: ir.Model, groups: list[_Group], rows: list[dict[str, Any]], refused: list,
                      details: dict[str, Any], notes: list[str], providers: Any = None) -> PassOutcome:
    """Rewrite the pruned groups into `model` and report the weights removed and the time it saves."""
    _time_saved(groups, rows, providers, details, notes)
    total_b, total_a = _rewrite(model, [g for g in groups if g.attention is None or g.is_gqa or g.is_fused])
    hb, ha = _rewrite_heads(model, [g for g in groups if g.attention is not None and not (g.is_gqa or g.is_fused)])
    total_b, total_a = total_b + hb, total_a + ha
    details["groups"] = rows
    details["params_before"], details["params_after"] = total_b, total_a
    details["params_removed"] = total_b - total_a
    details["sparsity"] = (total_b - total_a) / total_b if total_b else 0.0  # of the pruned layers' weights
    details["channel_sparsity"] = 1.0 - sum(r["kept"] for r in rows) / max(1, sum(r["channels"] for r in rows))
    notes.append(f"structured: {len(rows)} group(s), {details['params_removed']} weights removed "
                 f"({100.0 * (total_b - total_a) / max(1, total_b):.1f}% of their layers); {len(refused)} layer(s) "
                 "not prunable")
    layers = [LayerChange(r["producer"], r.get("rel_err", 0.0)) for r in rows if r["removed"]]
    return PassOutcome(details=details, notes=notes, layers=layers)


def _matmul_widths(g: _Group) -> Optional[tuple[int, int]]:
    """(input width of the producers, summed output width of the consumers) of a MatMul/Gemm group whose
    consumers read the channels directly, else None (Conv, attention heads, a Flatten between)."""
    if g.attention is not None or g.block != 1:
        return None
    def k_n(layer: WeightLayer) -> Optional[tuple[int, int]]:
        shape = tuple(int(d) for d in (layer.w.shape or ()))
        if layer.op not in ("MatMul", "Gemm") or len(shape) != 2:
            return None
        return shape[::-1] if layer.op == "Gemm" and layer.node.attrs.get("transB", 0) else shape
    prod = [k_n(p) for p in g.producers]
    cons = [k_n(c) for c in g.consumers]
    if any(x is None for x in prod + cons) or len({p[0] for p in prod}) != 1:
        return None
    return prod[0][0], sum(c[1] for c in cons)


def _time_saved(groups: list[_Group], rows: list[dict[str, Any]], providers: Any, details: dict[str, Any],
                notes: list[str]) -> None:
    """The measured time of each pruned MatMul/Gemm group's layers at its old and its new width (generated
    layers of the same shapes timed on the target, runtime.shape_speed), in its report row and summed: what
    removing channels saves depends on the shapes and the kernels, not on the parameter count."""
    from ..runtime.shape_speed import DEFAULT_ROWS, matmul_chain

    before = after = 0.0
    timed = 0
    for g, row in zip(groups, rows):
        widths = _matmul_widths(g) if row["removed"] else None
        if widths is None:
            continue
        n_rows = max(1, int(round(g.rows))) if g.rows else DEFAULT_ROWS
        ms = matmul_chain(widths[0], widths[1], (row["channels"], row["kept"]), n_rows, gates=len(g.extra),
                          providers=providers)
        row.update(rows_timed=n_rows, ms_before=round(ms[0], 4), ms_after=round(ms[1], 4),
                   time_saved=round(1.0 - ms[1] / ms[0], 4) if ms[0] > 0 else 0.0)
        before, after, timed = before + ms[0], after + ms[1], timed + 1
    if timed:
        details["time"] = {"groups_timed": timed, "ms_before": round(before, 4), "ms_after": round(after, 4),
                           "ratio": round(after / before, 4) if before > 0 else 1.0}
        notes.append(f"the {timed} pruned MatMul/Gemm group(s) time {after / before:.2f}x of their unpruned "
                     "shapes (each group's layers timed alone at its calibration rows per sample)")


def _plan(g: _Group, st: Any, data_aware: bool):
    """(consumer matrices, stacked rows w, Gram h or None, intercept rows) of a group; the intercept row is
    added when every consumer has a bias to absorb the removed channels' mean contribution."""
    mats = [_consumer_rows(c, g.block) for c in g.consumers]
    w = np.concatenate(mats, axis=1)
    if not (data_aware and st is not None and st.gram is not None and st.gram_rows):
        return mats, w, None, 0
    h = st.gram / st.gram_rows
    g.rows = st.gram_rows / max(1, st.samples * g.block)
    if all(_bias_target(g, c) is not None for c in g.consumers) and all(c.op != "Conv" for c in g.consumers):
        mu = st.gram_sum / st.gram_rows
        h = np.block([[h, mu[:, None]], [mu[None, :], np.ones((1, 1))]])
        return mats, np.concatenate([w, np.zeros((1, w.shape[1]))], axis=0), h, 1
    return mats, w, h, 0


def _same_shape_updates(g: _Group, wf: np.ndarray, keep: np.ndarray, mats: list[np.ndarray],
                        fixed: int) -> dict[str, np.ndarray]:
    """Tensor name -> new value of each consumer weight and bias with the group pruned *without* changing shapes
    (removed rows zero, the rest refitted, the intercept added to the bias): what removing the channels does."""
    new = _split_consumers(g, mats, _zero_removed(wf, keep, g.block, fixed), np.arange(g.channels), fixed)
    out = {}
    for c in g.consumers:
        w_new, delta = new[c.name]
        out[c.w.name] = w_new
        bt = _bias_target(g, c)
        if delta is not None and bt is not None:
            b = bt[0].inputs[bt[1]]
            out[b.name] = (ir.const_value(b) + delta / bt[2]).astype(np.float32)
    return out


def _simulate(sim: onnx.ModelProto, updates: dict[str, np.ndarray]) -> None:
    """Write same-shape weight updates into the initializers of `sim`."""
    for t in sim.graph.initializer:
        if t.name in updates:
            t.CopyFrom(numpy_helper.from_array(updates[t.name], t.name))


def _choose(method: str, g: _Group, w: np.ndarray, h: Optional[np.ndarray], counts: list[int], damping: float,
            fixed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kept channels, new consumer rows) for each count of removed channels, by the method's criterion."""
    if g.kv_unit:
        return _choose_kv_groups(method, g, w, h, counts, damping, fixed)
    if g.is_gqa:
        return _choose_per_kv_group(method, g, w, h, counts, damping, fixed)
    score = _channel_score(method, g, w, h)
    if score is None:  # sparsegpt
        return _obs_prune(w, h, g.block, counts, damping, fixed)
    runs = _obs_prune(w, None, g.block, counts, damping, fixed, score=score)
    if h is None or method == "magnitude":
        return runs
    return [(keep, _refit(w, h, keep, g.block, fixed, damping)) for keep, _ in runs]  # wanda: least-squares refit


def _channel_score(method: str, g: _Group, w: np.ndarray, h: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Per-channel importance for the score-based methods: magnitude (also any method without data), or wanda's
    activation energy x consumer row energy; None for sparsegpt with data (its choice is group-OBS)."""
    if h is None or method == "magnitude":
        return _magnitude_score(g, w)
    if method == "wanda":
        n = g.channels * g.block
        return (np.diag(h)[:n] * (w[:n] ** 2).sum(axis=1)).reshape(g.channels, -1).sum(axis=1)
    return None


def _choose_per_kv_group(method: str, g: _Group, w: np.ndarray, h: Optional[np.ndarray], counts: list[int],
                         damping: float, fixed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`_choose` for grouped-query attention: the same number of query heads goes from every KV group (the
    repeat stays uniform), each group's choice by the method on its own rows, then one joint refit."""
    hkv = g.attention["hkv"]
    rep, d = g.channels // hkv, g.block
    score = _channel_score(method, g, w, h)
    out = []
    for k in counts:
        r = k // hkv
        keep = []
        for gi in range(hkv):
            heads = np.arange(gi * rep, (gi + 1) * rep)
            if score is not None:
                keep.append(np.sort(heads[np.argsort(-score[heads], kind="stable")[: rep - r]]))
            else:
                rows = _expand(heads, d)
                ((local, _),) = _obs_prune(w[rows], h[np.ix_(rows, rows)], d, [r], damping)
                keep.append(heads[local])
        kept = np.concatenate(keep)
        refit = h is not None and r > 0  # nothing removed: the weights stay as they are
        out.append((kept, _refit(w, h, kept, d, fixed, damping) if refit else w.astype(np.float64)))
    return out


def _choose_kv_groups(method: str, g: _Group, w: np.ndarray, h: Optional[np.ndarray], counts: list[int],
                      damping: float, fixed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`_choose` for whole KV groups: a group is its rep query heads (rep * d consecutive rows of the output
    projection), removed as one block by group-OBS (sparsegpt) or by the summed head scores, then refitted."""
    hkv = g.attention["hkv"]
    rep, d = g.channels // hkv, g.block
    score = _channel_score(method, g, w, h)
    out = []
    for k in counts:
        r = k // rep
        if score is None:
            ((groups, _),) = _obs_prune(w, h, rep * d, [r], damping, fixed)
        else:
            groups = np.sort(np.argsort(-score.reshape(hkv, rep).sum(axis=1), kind="stable")[: hkv - r])
        kept = _expand(np.asarray(groups), rep)
        refit = h is not None and r > 0
        out.append((kept, _refit(w, h, kept, d, fixed, damping) if refit else w.astype(np.float64)))
    return out


def _magnitude_score(g: _Group, w: np.ndarray) -> np.ndarray:
    """||producer columns|| * ||consumer rows|| per channel: what the channel can contribute, without data."""
    energy = np.zeros(g.channels)
    if g.is_fused:  # the packed QKV weight: each head's q, k and v columns
        from . import fused_attention

        energy += fused_attention.head_energy(g.producer.node)
    else:
        for p in g.producers:
            v = p.weight
            cols = v.reshape(v.shape[0], -1) if p.op == "Conv" else (v if _out_axis(p) == 0 else v.T)
            energy += (cols ** 2).sum(axis=1).reshape(g.channels, -1).sum(axis=1)
    rows = (w[: g.channels * g.block] ** 2).reshape(g.channels, -1).sum(axis=1)
    return np.sqrt(energy * rows)


def _refit(w: np.ndarray, h: np.ndarray, keep: np.ndarray, block: int, fixed: int, damping: float) -> np.ndarray:
    """min ||X W - X_S W'|| over rows S (kept channels + intercept): W'_S = H_SS^-1 H_S: W, zero elsewhere."""
    rows = np.concatenate([_expand(keep, block), np.arange(w.shape[0] - fixed, w.shape[0])]).astype(np.int64)
    hd = h.astype(np.float64)
    lam = damping * float(np.mean(np.diag(hd))) + 1e-12
    hss = hd[np.ix_(rows, rows)] + lam * np.eye(len(rows))
    out = np.zeros_like(w, dtype=np.float64)
    out[rows] = np.linalg.solve(hss, hd[rows] @ w)
    return out


def _split_consumers(g: _Group, mats: list[np.ndarray], wf: np.ndarray, keep: np.ndarray, fixed: int):
    """Per consumer: (new stored weight, bias delta or None) from the refitted stacked rows."""
    rows = _expand(keep, g.block)
    out = {}
    col = 0
    for c, m in zip(g.consumers, mats):
        part = wf[:, col: col + m.shape[1]]
        col += m.shape[1]
        delta = part[-1] if fixed else None
        kept = part[rows].astype(np.float32)
        if c.op == "Conv":
            w = c.weight
            new = kept.reshape(len(keep), w.shape[0], *w.shape[2:]).transpose(1, 0, *range(2, w.ndim))
        else:
            new = c.stored(kept)
        out[c.name] = (np.ascontiguousarray(new, dtype=np.float32), delta)
    return out


def _allocate(plans, method: str, opts: Any, source: onnx.ModelProto, ctx: PassContext, feeds):
    """Channels per group from measured end-to-end sensitivity: each group at each level is probed by zeroing
    its removed consumer rows (what removing the channels does) with the refit applied, in one session."""
    from .sensitivity import WeightProbe, allocate

    names = []
    for g, *_ in plans:
        for c in g.consumers:
            names.append(c.w.name)
            bt = _bias_target(g, c)
            if bt is not None:
                names.append(bt[0].inputs[bt[1]].name)
    inits = {t.name for t in source.graph.initializer}
    names = sorted(set(n for n in names if n in inits))
    levels = [sorted({_round_for(g, int(round(f * g.channels))) for f in _LEVELS}) for g, *_ in plans]
    probe = WeightProbe(source, names, feeds[:16], **ctx.probe_args(source, "channels: sensitivity probes",
                                                                     sum(sum(1 for k in ks if k) for ks in levels)))
    choices, level_counts, sens = {}, {}, {}
    budget = 0.0
    for (g, mats, w, h, fixed), ks in zip(plans, levels):
        per_channel = g.params / g.channels
        runs = _choose(method, g, w, h, ks, opts.damping, fixed)
        opts_g = []
        for k, (keep, wf) in zip(ks, runs):
            replace = {n: v for n, v in _same_shape_updates(g, wf, keep, mats, fixed).items() if n in names}
            err = probe.error(replace) if k else 0.0
            opts_g.append(((g.channels - k) * per_channel, err))
        choices[id(g)] = opts_g
        level_counts[id(g)] = ks
        # the budget: every group at its own target (heads for attention blocks, sparsity for channel groups)
        budget += g.channels * per_channel * (1.0 - (opts.heads if g.attention is not None else opts.sparsity))
        sens[id(g)] = {str(k): e for k, (_, e) in zip(ks, opts_g)}
    pick = allocate(choices, budget)
    return {gid: level_counts[gid][i] for gid, i in pick.items()}, sens


def _zero_removed(wf: np.ndarray, keep: np.ndarray, block: int, fixed: int) -> np.ndarray:
    out = np.zeros_like(wf)
    rows = _expand(keep, block)
    out[rows] = wf[rows]
    if fixed:
        out[-fixed:] = wf[-fixed:]
    return out


def _bias_target(g: _Group, c: WeightLayer) -> Optional[tuple[gs.Node, int, float]]:
    """Where consumer c's bias lives: (node, input index, scale of a bias change: Gemm's beta), or None."""
    if c.bias is not None:
        return c.node, 2, float(c.node.attrs.get("beta", 1.0)) if c.op == "Gemm" else 1.0
    add = g.biases.get(c.name)
    if add is None:
        return None
    return add, (1 if add.inputs[0] is c.output else 0), 1.0


def _out_axis(layer: WeightLayer) -> int:
    """Axis of the stored weight that indexes output channels."""
    return 0 if layer.op == "Conv" or (layer.op == "Gemm" and layer.node.attrs.get("transB", 0)) else 1


def _new_constants(comp: list[_Group]) -> dict[tuple[int, int], np.ndarray]:
    """(id(node), input index) -> new constant, in an order that composes: consumer rows are refitted on the
    full outputs first (with the intercept moved into the bias), then producers' output channels are taken,
    then per-channel constants of each region are sliced."""
    new: dict[tuple[int, int], np.ndarray] = {}

    def cur(node: gs.Node, i: int) -> np.ndarray:
        return new.get((id(node), i), np.asarray(ir.const_value(node.inputs[i])))

    for g in comp:
        for c in g.consumers:
            w_new, delta = g.new_consumers[c.name]  # type: ignore[attr-defined]
            new[(id(c.node), 1)] = w_new
            if delta is None:
                continue
            bnode, bi, scale = _bias_target(g, c)
            d = delta / scale
            b = cur(bnode, bi)
            if b.ndim == 1 and b.shape[0] == d.shape[0]:
                new[(id(bnode), bi)] = (b + d).astype(np.float32)
        g.new_consumers = {}  # type: ignore[attr-defined]  # held by `new` now: a producer's slice frees its refit
    for g in comp:
        if g.is_gqa:  # the q projection and the head counts
            from . import gqa

            new.update(gqa.constants(g.attention, g.keep, cur))
            continue
        if g.is_fused:  # the kept heads' columns of the packed QKV weight and bias
            from . import fused_attention

            new.update(fused_attention.constants(g.attention["node"], g.keep, cur))
            continue
        for p in g.producers:
            new[(id(p.node), 1)] = np.take(cur(p.node, 1), g.keep, axis=_out_axis(p))
            if p.bias is not None:
                bv = cur(p.node, 2)
                if bv.ndim == 1 and bv.shape[0] == g.channels:
                    new[(id(p.node), 2)] = bv[g.keep]
        for n in g.region:
            for i in range(len(n.inputs)):
                ax = g.slices.get((id(n), i))
                if ax is not None:
                    new[(id(n), i)] = np.take(cur(n, i), g.keep, axis=ax)
    return new


# -------------------------------------------------------------------------------------------- rewriting
def _rewrite(model: ir.Model, groups: list[_Group]) -> tuple[int, int]:
    """One engine rule per connected component of groups; each rebuilds its nodes with the sliced weights.
    Returns the weight counts of the layers involved, before and after."""
    if not groups:
        return 0, 0
    comps = _connected(groups)
    layers = {id(l.node): l for g in groups for l in [*g.producers, *g.consumers]}
    before = sum(l.weight.size for l in layers.values())
    consts = [_new_constants(comp) for comp in comps]
    after = sum(v.size for c in consts for (nid, i), v in c.items() if i == 1 and nid in layers)
    kv = {id(n): n for g in groups if g.kv_unit for n in (g.attention["kv"][t]["mm"] for t in "kv")}
    new_kv = {nid: v.size for c in consts for (nid, i), v in c.items() if i == 1 and nid in kv}
    for nid, n in kv.items():  # whole KV groups also shrink Wk and Wv
        size = ir.const_value(n.inputs[1]).size
        before, after = before + size, after + new_kv.get(nid, size)
    _apply_components(model, comps, consts, "prune-channels")
    return before, after


def rewrite_with(model: ir.Model, groups: list[_Group], constants: dict[tuple[int, int], np.ndarray],
                 name: str) -> None:
    """Rebuild the groups' nodes (producers, regions, consumers, consumer bias Adds) with `constants`
    ((id(node), input index) -> value, shapes unchanged or consistent): one engine rule per connected component."""
    if groups:
        comps = _connected(groups)
        _apply_components(model, comps, [constants] * len(comps), name)


def _connected(groups: list[_Group]) -> list[list[_Group]]:
    """The groups in connected components: groups that share a node are rewritten together."""
    parent = {id(g): id(g) for g in groups}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    owner: dict[int, int] = {}
    for g in groups:
        for n in [*(p.node for p in g.producers), *g.region, *(c.node for c in g.consumers)]:
            if id(n) in owner:
                parent[find(id(g))] = find(owner[id(n)])
            else:
                owner[id(n)] = id(g)
    comps: dict[int, list[_Group]] = {}
    for g in groups:
        comps.setdefault(find(id(g)), []).append(g)
    return list(comps.values())


def _apply_components(model: ir.Model, comps: list[list[_Group]], consts: list[dict], name: str) -> None:
    order = {id(n): i for i, n in enumerate(model.graph.nodes)}  # built once: rules stay linear in graph size
    index = GraphIndex(model.graph)
    shapes: dict[tuple, list[Component]] = {}
    for comp, c in zip(comps, consts):
        spec = _component(comp, c, order, index)
        shapes.setdefault(spec.signature, []).append(spec)
    rules, plan = [], Plan()
    for k, specs in enumerate(shapes.values()):
        rule, p = component_rule(k, specs, name)
        rules.append(rule)
        plan.update(p)
    stats = apply_rules(model, rules, plan=plan)
    if stats.unapplied:
        from ..errors import InternalError

        raise InternalError(f"{name}: {len(stats.unapplied)} of {len(comps)} channel groups were not rewritten: "
                            f"{sorted(set(stats.unapplied.values()))[:3]}")


def _head_groups(model: ir.Model, by_node: dict[int, WeightLayer], ops, exclude, refused: list,
                 notes: list[str]) -> list[_Group]:
    """One group per recognised attention block whose four projections may be touched (heads.py)."""
    from . import heads

    blocks = []
    for b in heads.find_attention(model):
        layers = [by_node.get(id(b[f"m{t}"])) for t in ("q", "k", "v", "o")]
        if any(l is None or l.op not in ops or is_excluded(l.node, exclude) for l in layers):
            refused.append({"layer": b["mo"].name, "reason": "attention heads: a projection is excluded"})
            continue
        blocks.append(b)
    if not blocks:
        return []
    heads.reroute_shapes(model, blocks)
    exclusive = {id(b["mo"]) for b in heads.find_attention(model, exclusive=True)}
    out = []
    for b in blocks:
        if id(b["mo"]) not in exclusive:
            refused.append({"layer": b["mo"].name, "reason": "attention heads: block values are read outside it"})
            continue
        h, d = heads.head_count(b)
        q, k, v, o = (by_node[id(b[f"m{t}"])] for t in ("q", "k", "v", "o"))
        out.append(_Group(v, [], [o], b["rc"].outputs[0], h, d, {}, {o.name: b.get("ao")}, attention=b,
                          extra=[q, k]))
    notes.append(f"attention heads: {len(out)} block(s) recognised")
    return out


def _fused_groups(model: ir.Model, by_node: dict[int, WeightLayer], index: GraphIndex, ops, exclude,
                  refused: list, notes: list[str]) -> list[_Group]:
    """One group per fused com.microsoft Attention (packed QKV) whose context only its output projection reads:
    its heads, d rows each of that MatMul (fused_attention.py)."""
    from . import fused_attention

    blocks, why = fused_attention.find_blocks(model, index)
    refused.extend(why)
    out = []
    for n in blocks:
        readers = index.consumers(n.outputs[0])
        o = by_node.get(id(readers[0])) if len(readers) == 1 else None
        h, d = fused_attention.heads_and_dim(n)
        if o is None or o.x is not n.outputs[0] or o.op != "MatMul" or o.weight.shape[0] != h * d:
            refused.append({"layer": n.name, "reason": "fused attention: its context is not read by one output "
                            "projection MatMul alone"})
            continue
        if o.op not in ops or is_excluded(o.node, exclude) or is_excluded(n, exclude):
            refused.append({"layer": n.name, "reason": "fused attention: it or its output projection is excluded"})
            continue
        qkv = WeightLayer(n, n.inputs[0], n.inputs[1], n.inputs[2], model.graph)
        out.append(_Group(qkv, [], [o], n.outputs[0], h, d, {}, _consumer_biases([o], index),
                          attention={"form": "fused", "node": n}))
    if blocks:
        notes.append(f"fused attention (com.microsoft Attention): {len(out)} block(s) recognised")
    return out


def _gqa_groups(model: ir.Model, by_node: dict[int, WeightLayer], index: GraphIndex, ops, exclude, refused: list,
                notes: list[str], head_unit: str = "query") -> list[_Group]:
    """One group per grouped-query / rotary attention block (gqa.py): its query heads, read by the output
    projection in blocks of head_dim rows; rebuilt by the channel rewrite with gqa.constants. With head_unit
    "kv", whole KV groups go where the block allows it (else its query heads, with the reason in `refused`)."""
    from . import gqa

    blocks, why = gqa.find_blocks(model)
    refused.extend(why)
    out = []
    for b in blocks:
        q, o = by_node.get(id(b["q"]["mm"])), by_node.get(id(b["mo"]))
        if q is None or o is None or any(l.op not in ops or is_excluded(l.node, exclude) for l in (q, o)):
            refused.append({"layer": b["mo"].name, "reason": "grouped-query attention: a projection is excluded"})
            continue
        b["form"] = "gqa"
        b["unit"] = "query"
        if head_unit == "kv":
            kv = [by_node.get(id(b["kv"][t]["mm"])) for t in ("k", "v")] if "kv" in b else []
            why = b.get("kv_refused") or next(
                (f"projection '{l.name}' is excluded" for l in kv if l is None or l.op not in ops
                 or is_excluded(l.node, exclude)), None)
            if why:
                refused.append({"layer": b["mo"].name, "reason": f"whole KV groups: {why}; query heads pruned "
                                "alike in every KV group instead"})
            else:
                b["unit"] = "kv"
        out.append(_Group(q, b["region"], [o], b["rc"].outputs[0], b["hq"], b["dim"], {},
                          _consumer_biases([o], index), attention=b))
    if blocks:
        notes.append(f"grouped-query attention: {len(out)} block(s) recognised ({blocks[0]['hq']} query heads, "
                     f"{blocks[0]['hkv']} KV heads)")
    return out


def _rewrite_heads(model: ir.Model, groups: list[_Group]) -> tuple[int, int]:
    """Rebuild each attention block with its kept heads (heads.head_rules)."""
    if not groups:
        return 0, 0
    from . import heads

    plan = Plan(anchor="mo")  # each block's constants on its output MatMul
    before = after = 0
    for g in groups:
        b = g.attention
        cols = _expand(g.keep, g.block)
        p: dict[str, np.ndarray] = {"heads": np.array(len(g.keep))}
        for t in ("q", "k", "v"):
            p[f"w{t}"] = np.ascontiguousarray(ir.const_value(b[f"w{t}"])[:, cols])
            p[f"b{t}"] = np.ascontiguousarray(ir.const_value(b[f"b{t}"])[cols])
        o = g.consumers[0]
        p["wo"], delta = g.new_consumers[o.name]  # type: ignore[attr-defined]
        if delta is not None and "bo" in b:
            p["bo"] = (ir.const_value(b["bo"]) + delta).astype(np.float32)
        before += g.params
        after += sum(p[f"w{t}"].size for t in "qkvo")
        plan.add(b["mo"], p)
    stats = apply_rules(model, heads.head_rules(), plan=plan)
    if stats.unapplied:
        from ..errors import InvalidModelError

        raise InvalidModelError(f"attention-head pruning left {len(stats.unapplied)} of {len(plan)} blocks: "
                                f"{sorted(set(stats.unapplied.values()))[:3]}")
    return before, after


def _component(comp: list[_Group], new_const: dict[tuple[int, int], np.ndarray], order: dict[int, int],
               index: GraphIndex) -> Component:
    """The nodes a group component rebuilds: its producers, regions, consumers and the consumers' bias Adds."""
    from . import fused_attention

    nodes = []
    for g in comp:
        nodes += [*(p.node for p in g.producers), *g.region, *(c.node for c in g.consumers)]
        nodes += [a for a in (g.biases.get(c.name) for c in g.consumers) if a is not None]
    attrs = {id(g.attention["node"]): fused_attention.attrs(g.attention["node"], g.keep) for g in comp if g.is_fused}
    return component(nodes, new_const, order, index, attrs)
