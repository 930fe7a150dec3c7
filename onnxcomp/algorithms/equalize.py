"""Cross-layer equalization (Nagel et al. 2019, as in AIMET and Quark) and BatchNormalization folding.

Between a producer layer and the layers that read its output channels, through ops that commute with a positive
per-channel scale (ReLU, LeakyReLU, PReLU, max/average pools, a Flatten, a per-channel bias Add), channel i can be
divided by s_i in the producer and multiplied back in the consumers' input rows: ReLU(x / s) = ReLU(x) / s, so
the float model computes the same function. With s_i = sqrt(r1_i / r2_i), r1 the producer's per-output-channel
weight range and r2 the consumers' per-input-row range, both ranges become sqrt(r1 r2): the weights quantize with
less error (a consumer's output-channel scale no longer follows its one largest input row). Chains (conv1 ->
conv2 -> fc) are swept until the scales settle. The groups are channels.py's (the same walk structured pruning
uses); the rewrite is its component rule with the new constants, so the engine checks each replacement.

Conv -> BatchNormalization is folded first (W' = W g / sqrt(v + eps), b' = (b - m) g / sqrt(v + eps) + beta):
ORT folds it at load for float Convs, but not once the Conv's weight is a DequantizeLinear output.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import ir
from ..rewrite import RewriteRule, apply_rules, fail
from . import channels
from .select import WeightLayer

#: ops through which a positive per-channel scale passes unchanged (f(x / s) = f(x) / s, s > 0)
_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity", "Dropout", "MaxPool", "AveragePool", "LpPool",
                          "Flatten", "Abs", "Neg", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Max", "Min"})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min"})
#: sweeps over the groups of a chain; each sweep equalizes every group once against the current weights
_SWEEPS = 20
#: scales outside [1/_CLAMP, _CLAMP] are clamped: a channel of near-zero weights would otherwise explode its pair
_CLAMP = 1e4


# --------------------------------------------------------------------------------- BatchNormalization folding
def _conv_bn2(op, x, w, scale, b, mean, var):
    return op.BatchNormalization(op.Conv(x, w, _bind="conv"), scale, b, mean, var, _bind="bn")


def _conv_bn3(op, x, w, cb, scale, b, mean, var):
    return op.BatchNormalization(op.Conv(x, w, cb, _bind="conv"), scale, b, mean, var, _bind="bn")


def _bn_check(ctx, conv, bn, w, scale, b, mean, var, cb=None, **_):
    if len(bn.outputs) > 1 and any(ctx.consumers(t) or ctx.is_graph_output(t) for t in bn.outputs[1:] if t.name):
        return fail(f"BatchNormalization '{bn.name}' is in training mode (running statistics read)")
    if len(ctx.consumers(conv.outputs[0])) != 1 or ctx.is_graph_output(conv.outputs[0]):
        return fail(f"Conv '{conv.name}' output is read elsewhere too")
    if len(ctx.consumers(w)) != 1:
        return fail(f"Conv weight '{w.name}' is read by several nodes")
    wv = ctx.const_value(w)
    if wv is None or wv.dtype != np.float32 or wv.ndim < 3:
        return fail(f"Conv '{conv.name}' weight is not a constant float32 kernel")
    c = wv.shape[0]
    for t in (scale, b, mean, var) + ((cb,) if cb is not None else ()):
        v = ctx.const_value(t)
        if v is None or v.shape != (c,) or v.dtype != np.float32:
            return fail(f"'{t.name}' is not a constant float32 vector over the {c} output channels")
    return True


def _bn_replacement(op, x, w, scale, b, mean, var, conv, bn, cb=None):
    eps = float(bn.attrs.get("epsilon", 1e-5))
    g = ir.const_value(scale).astype(np.float64) / np.sqrt(ir.const_value(var).astype(np.float64) + eps)
    wv = ir.const_value(w).astype(np.float64)
    bias = np.zeros(wv.shape[0]) if cb is None else ir.const_value(cb).astype(np.float64)
    w_new = (wv * g.reshape(-1, *([1] * (wv.ndim - 1)))).astype(np.float32)
    b_new = ((bias - ir.const_value(mean)) * g + ir.const_value(b)).astype(np.float32)
    return op.Conv(x, op.const(w_new, name=f"{w.name}_bn_folded"), op.const(b_new, name=f"{bn.name}_folded_bias"),
                   _name=conv.name, **dict(conv.attrs))


def fold_batchnorm_rules() -> list[RewriteRule]:
    """Conv(x, W[, b]) -> BatchNormalization (inference form) as one Conv with the folded weight and bias."""
    return [RewriteRule("fold-batchnorm-3", _conv_bn3, _bn_replacement, _bn_check),
            RewriteRule("fold-batchnorm-2", _conv_bn2, _bn_replacement, _bn_check)]


def fold_batchnorm(model: ir.Model) -> int:
    """Fold every Conv -> BatchNormalization pair of `model` (all graphs); the number folded."""
    stats = apply_rules(model, fold_batchnorm_rules())
    return sum(r.applied for r in stats.rules.values())


# --------------------------------------------------------------------------------- cross-layer equalization
def _region_problem(g: Any) -> str:
    """Why a positive per-channel scale does not pass through the group's producer and region unchanged ('' when
    it does)."""
    if g.extra or g.attention is not None:
        return "a join of several producers or an attention block"
    b = g.producer.bias
    if b is not None and (ir.const_value(b) is None or ir.const_value(b).shape != (g.channels,)):
        return f"producer bias '{b.name}' is not a constant vector over its {g.channels} channels"
    for n in g.region:
        if n.op not in _HOMOGENEOUS:
            return f"{n.op} '{n.name}' does not commute with a per-channel scale"
        if n.op not in _BINARY:
            continue
        consts = [ir.const_value(t) for t in n.inputs]
        if sum(v is None for v in consts) != 1 or (n.op == "Div" and consts[0] is not None):
            return f"{n.op} '{n.name}' is not the channels {'over' if n.op == 'Div' else 'with'} one constant"
        if n.op in ("Mul", "Div"):
            continue  # (x / s) * c = (x * c) / s
        for i, v in enumerate(consts):  # Add/Sub/Max/Min: a per-channel constant is scaled with the channel
            if v is not None and (id(n), i) not in g.slices and np.any(v != 0):
                return f"{n.op} '{n.name}' with the constant '{n.inputs[i].name}' (not per channel, not zero)"
    return ""


def _consumer_ranges(g: Any, cons: dict[str, np.ndarray]) -> np.ndarray:
    """Max |w| over every consumer row that reads channel i (a block of rows after a Flatten), per channel."""
    r = np.zeros(g.channels)
    for c in g.consumers:
        rows = np.abs(cons[c.name]).max(axis=1).reshape(g.channels, g.block)
        r = np.maximum(r, rows.max(axis=1))
    return r


def _producer_ranges(g: Any, prod: np.ndarray) -> np.ndarray:
    """max |w| per output channel of the producer's [k, channels] matrix."""
    return np.abs(prod).max(axis=0)


def find_pairs(model: ir.Model, exclude: tuple[str, ...] = ()) -> tuple[list, list[dict[str, str]]]:
    """The channel groups of `model`'s main graph that can be equalized, and the refused ones with why
    (nothing is rewritten)."""
    groups, refused = channels.find_groups(model, ops=("MatMul", "Gemm", "Conv"), exclude=exclude)
    readers: dict[int, int] = {}  # id(tensor) -> nodes reading it, in every graph (a weight may be shared)
    for gr in ir.iter_graphs(model.graph):
        for n in gr.nodes:
            for t in {id(t) for t in n.inputs}:
                readers[t] = readers.get(t, 0) + 1
    ok = []
    for g in groups:
        shared = [l.w.name for l in (g.producer, *g.consumers) if readers.get(id(l.w), 0) != 1]
        why = f"weight '{shared[0]}' is read by several nodes (rescaled for one, it would change the others)" \
            if shared else _region_problem(g)
        if why:
            refused.append({"layer": g.producer.name, "reason": why})
        elif any(c.op == "Conv" and c.node.attrs.get("group", 1) != 1 for c in g.consumers):
            refused.append({"layer": g.producer.name, "reason": "a grouped/depthwise Conv consumer"})
        else:
            ok.append(g)
    return ok, refused


def equalize(model: ir.Model, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Equalize every producer/consumer pair of `model`'s main graph whose region commutes with channel scales.
    Returns {"pairs": rows (producer, consumers, range ratio before/after), "refused": [...]} (the model is
    rewritten in place through the engine; nothing changes when no pair qualifies)."""
    ok, refused = find_pairs(model, exclude)
    if not ok:
        return {"pairs": [], "refused": refused}
    # every layer's weight as [k, n] (y = x @ M; Conv: [C_in*kh*kw, C_out]), updated by the sweeps
    layers: dict[str, WeightLayer] = {l.name: l for g in ok for l in (g.producer, *g.consumers)}
    mats = {n: l.matrix().astype(np.float64) for n, l in layers.items()}
    biases = {g.producer.name: _producer_bias(g) for g in ok}
    region_scale = {id(g): np.ones(g.channels) for g in ok}
    before = {id(g): _imbalance(g, mats) for g in ok}
    for _ in range(_SWEEPS):
        worst = 0.0
        for g in ok:
            prod = mats[g.producer.name]
            cons = {c.name: _consumer_rows(c, mats[c.name], g) for c in g.consumers}
            r1, r2 = _producer_ranges(g, prod), _consumer_ranges(g, cons)
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.sqrt(r1 / r2)
            s = np.where(np.isfinite(s) & (s > 0), np.clip(s, 1 / _CLAMP, _CLAMP), 1.0)
            worst = max(worst, float(np.abs(np.log(s)).max()))
            mats[g.producer.name] = prod / s
            if biases[g.producer.name] is not None:
                biases[g.producer.name] = biases[g.producer.name] / s
            region_scale[id(g)] *= s
            rows = np.repeat(s, g.block)
            for c in g.consumers:
                mats[c.name] = _scale_consumer(c, mats[c.name], rows)
        if worst < 1e-3:
            break
    new = _constants(ok, layers, mats, biases, region_scale)
    channels.rewrite_with(model, ok, new, name="equalize")
    pairs = [{"producer": g.producer.name, "consumers": [c.name for c in g.consumers],
              "range_ratio_before": before[id(g)], "range_ratio_after": _imbalance(g, mats)} for g in ok]
    return {"pairs": pairs, "refused": refused}


def _producer_bias(g: Any):
    b = g.producer.bias
    v = None if b is None else ir.const_value(b)
    if v is None or v.shape != (g.channels,):
        return None
    scale = float(g.producer.node.attrs.get("beta", 1.0)) if g.producer.op == "Gemm" else 1.0
    return v.astype(np.float64) * scale


def _consumer_rows(c: WeightLayer, m: np.ndarray, g: Any) -> np.ndarray:
    """Consumer matrix [k, n] as [channels * block, rest] with row i*block+j reading channel i (Conv: its
    C_in*kh*kw rows regrouped by input channel)."""
    if c.op == "Conv":
        kk = m.shape[0] // (g.channels * g.block)
        return m.reshape(g.channels * g.block, kk * m.shape[1])
    return m


def _scale_consumer(c: WeightLayer, m: np.ndarray, rows: np.ndarray) -> np.ndarray:
    if c.op == "Conv":  # rows of [C_in*kh*kw, C_out] are input-channel major
        return m * np.repeat(rows, m.shape[0] // rows.shape[0])[:, None]
    return m * rows[:, None]


def _imbalance(g: Any, mats: dict[str, np.ndarray]) -> float:
    """Mean over channels of max(r1, r2) / min(r1, r2) (1.0: perfectly equalized)."""
    r1 = _producer_ranges(g, mats[g.producer.name])
    r2 = _consumer_ranges(g, {c.name: _consumer_rows(c, mats[c.name], g) for c in g.consumers})
    lo, hi = np.minimum(r1, r2), np.maximum(r1, r2)
    ok = lo > 0
    return float(np.mean(hi[ok] / lo[ok])) if ok.any() else 1.0


def _stored(layer: WeightLayer, m: np.ndarray) -> np.ndarray:
    """A [k, n] matrix back in the layer's stored weight layout (inverse of WeightLayer.matrix)."""
    w = layer.weight
    if layer.op == "Gemm":
        m = m / float(layer.node.attrs.get("alpha", 1.0))
        return (m.T if layer.node.attrs.get("transB", 0) else m).astype(np.float32)
    if layer.op == "Conv":
        return m.T.reshape(w.shape).astype(np.float32)
    return m.astype(np.float32)


def _constants(groups: list, layers: dict[str, WeightLayer], mats: dict[str, np.ndarray], biases: dict,
               region_scale: dict) -> dict[tuple[int, int], np.ndarray]:
    """(id(node), input index) -> new constant: every weight, the producers' biases, and the per-channel bias
    constants inside each region (divided by the channel's scale; BN's mean and shift likewise)."""
    new: dict[tuple[int, int], np.ndarray] = {}
    for name, l in layers.items():
        new[(id(l.node), 1)] = _stored(l, mats[name])
    for g in groups:
        p = g.producer
        b = biases[p.name]
        if b is not None:
            scale = float(p.node.attrs.get("beta", 1.0)) if p.op == "Gemm" else 1.0
            new[(id(p.node), 2)] = (b / scale).astype(np.float32)
        s = region_scale[id(g)]
        for n in g.region:
            for i in range(len(n.inputs)):
                ax = g.slices.get((id(n), i))
                if ax is None or n.op not in ("Add", "Sub", "Max", "Min", "BatchNormalization"):
                    continue
                if n.op == "BatchNormalization" and i not in (2, 3):  # B and mean scale; gain and variance do not
                    continue
                v = np.asarray(ir.const_value(n.inputs[i]), np.float64)
                shape = [1] * v.ndim
                shape[ax] = -1
                new[(id(n), i)] = (v / s.reshape(shape)).astype(np.float32)
    return new
