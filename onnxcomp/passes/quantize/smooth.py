"""SmoothQuant for the quantize pass: per-channel scales, the exact float rewrite that moves activation
outliers into the weights, and the smoothed tensors' ranges derived from one calibration of the float model."""
from __future__ import annotations

from typing import Any, Optional

import math
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ... import ir
from ...rewrite import Plan, RewriteRule, apply_rules, fail, find_matches, query
from ...runtime import observable_tensors
from ...rewrite.rules import fold_constant_mul_chain_rule
from ..base import PassContext

from .rules import _gemm3_bias_pattern, _matmul_pattern, _pattern_for


def _smoothing_scales(amax_x: dict[str, np.ndarray], amax_w: dict[str, np.ndarray], alpha: float
                      ) -> dict[str, np.ndarray]:
    """SmoothQuant's per-input-channel scales max|x|^alpha / max|w|^(1-alpha), finite and in [1e-4, 1e4]."""
    out = {}
    for n, ax in amax_x.items():
        aw = amax_w[n]
        if ax.shape != aw.shape:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.power(ax, alpha) / np.power(aw, 1.0 - alpha)
        sc = np.where(np.isfinite(sc) & (sc > 0), sc, 1.0)
        out[n] = np.clip(sc, 1e-4, 1e4).astype(np.float32)
    return out


def _unsmoothed(x: gs.Tensor) -> gs.Tensor:
    """The activation before SmoothQuant's Mul (the tensor the float model also has)."""
    if len(x.inputs) == 1 and x.inputs[0].op == "Mul" and len(x.inputs[0].inputs) == 2 \
            and x.inputs[0].inputs[1].name.startswith(f"{x.inputs[0].inputs[0].name}_smooth_inv"):
        return x.inputs[0].inputs[0]
    return x


def _apply_smoothing(model: ir.Model, scales: dict[str, np.ndarray]) -> int:
    """MatMul(x, W) -> MatMul(Mul(x, 1/s), diag(s) W), and Gemm alike (its weight scaled along its input axis),
    for every x in `scales` (one Mul per x, shared): the plan puts each main-graph MatMul/Gemm whose constant 2-D
    weight fits its input's scales on that node, with the scales."""

    def target(ctx, x, w, node, b=None):
        v = ctx.const_value(w)
        if ctx.graph is not model.graph:
            return fail("subgraph (activations there cannot be calibrated)")
        if x.name not in scales or v is None or v.ndim != 2:
            return fail("not a smoothing target")
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0):
            return fail("Gemm with transA or alpha != 1")
        k = v.shape[1] if node.op == "Gemm" and node.attrs.get("transB", 0) else v.shape[0]
        return True if k == scales[x.name].shape[0] else fail("weight does not fit the scales")

    patterns = (_matmul_pattern, _pattern_for("Gemm", 2), _gemm3_bias_pattern)
    plan = Plan((f.match.bindings["node"], scales[f.match.bindings["x"].name])
                for f in find_matches(model, [query(f"smooth-target-{i}", p, target) for i, p in enumerate(patterns)]))

    def smoothed_input(op, x, sc):
        for c in op.ctx.consumers(x):
            if c.op == "Mul" and len(c.inputs) == 2 and c.inputs[1].name.startswith(f"{x.name}_smooth_inv"):
                return c.outputs[0]
        xs = op.Mul(x, op.const((1.0 / sc).astype(np.float32), name=f"{x.name}_smooth_inv"))
        xs.name = op.ctx.index.fresh_name(f"{x.name}_smoothed")
        return xs

    def matmul(op, x, w, node, decision: np.ndarray):
        wv = np.asarray(ir.const_value(w), np.float32) * decision[:, None]
        return op.MatMul(smoothed_input(op, x, decision), op.const(wv.astype(np.float32), name=f"{w.name}_smoothed"))

    def gemm(op, x, w, node, decision: np.ndarray, b=None):
        v = np.asarray(ir.const_value(w), np.float32)
        wv = v * decision[None, :] if node.attrs.get("transB", 0) else v * decision[:, None]
        ins = [smoothed_input(op, x, decision), op.const(wv.astype(np.float32), name=f"{w.name}_smoothed")]
        return op.Gemm(*ins, *([b] if b is not None else []), **dict(node.attrs))

    rules = [RewriteRule("smooth-matmul", _matmul_pattern, matmul),
             RewriteRule("smooth-gemm-2", _pattern_for("Gemm", 2), gemm),
             RewriteRule("smooth-gemm-3", _gemm3_bias_pattern, gemm)]
    stats = apply_rules(model, rules, plan=plan)
    # a smoothing Mul right after a constant Mul (e.g. GELU's final *0.5) folds into it: no extra op at run time
    apply_rules(model, [fold_constant_mul_chain_rule()])
    return stats.applied


def _observable(proto: onnx.ModelProto) -> set[str]:
    """What calibration can observe in the main graph: what ORT can return, and the initializers."""
    return observable_tensors(proto) | {t.name for t in proto.graph.initializer}


def _smoothed_stats(model: ir.Model, names: list[str], source: onnx.ModelProto, ctx: PassContext,
                    feeds: list) -> Optional[dict[str, Any]]:
    """Min/max statistics of `names` in the smoothed `model`, from one calibration of its float `source`.

    Smoothing is exact in real arithmetic, so a tensor both models have is taken from `source` (the two differ
    by float rounding only, downstream of a smoothed MatMul). A smoothed tensor is Mul(u, c), c a constant vector
    along the last axis and u a tensor of `source`: its min/max are those of u_j * c_j at u's per-channel
    min/max (float rounding is monotone), its counts those of u. So every smoothquant trial and the result
    reuse one calibration run. None when a tensor is neither (then the caller calibrates `model` itself)."""
    from ...calibration import TensorStats

    have = _observable(source)
    tensors = model.graph.tensors()
    plain, smoothed = [], {}
    for n in names:
        if n in have:
            plain.append(n)
            continue
        t = tensors.get(n)
        mul = t.inputs[0] if t is not None and len(t.inputs) == 1 else None
        if mul is None or mul.op != "Mul" or len(mul.inputs) != 2 or mul.inputs[0].name not in have:
            return None
        c = ir.const_value(mul.inputs[1])
        if c is None or c.ndim != 1 or c.dtype != np.float32:
            return None
        smoothed[n] = (mul.inputs[0].name, c)
    users = sorted({u for u, _ in smoothed.values()})
    stats = ctx.collect(source, sorted(set(plain) | set(users)), feeds, histogram=False,
                        channel_axes={u: -1 for u in users})
    out = {n: stats[n] for n in plain if n in stats}
    for n, (u, c) in smoothed.items():
        su = stats.get(u)
        if su is None or su.channel_min is None or su.channel_min.shape != c.shape:
            return None
        ok = su.channel_min <= su.channel_max  # channels with a finite value
        ends = np.stack([su.channel_min[ok].astype(np.float32) * c[ok], su.channel_max[ok].astype(np.float32) * c[ok]])
        lo, hi = (float(ends.min()), float(ends.max())) if ends.size else (math.nan, math.nan)
        out[n] = TensorStats(n, su.dtype, su.count, su.samples, lo, hi, su.nonfinite, zeros=su.zeros)
    return out
