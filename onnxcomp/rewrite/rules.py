"""Small reusable rewrite rules shared by passes, tests and benchmarks."""
from __future__ import annotations

import numpy as np

from ..ir import const_value
from .rule import RewriteRule, fail


def _gemm_pattern(op, x, w, b):
    return op.Add(op.MatMul(x, w), b)


def _gemm_replacement(op, x, w, b):
    return op.Gemm(x, w, b)


def _gemm_check(ctx, x, w, b):
    if x.shape is None or len(x.shape) != 2:
        return fail("MatMul input is not 2-D")
    if ctx.const_value(w) is None or ctx.const_value(b) is None:
        return fail("weight or bias is not constant")
    if np.asarray(ctx.const_value(b)).ndim != 1:
        return fail("bias is not 1-D")
    return True


def matmul_add_to_gemm_rule() -> RewriteRule:
    """Add(MatMul(x, W), b) with 2-D x and constant W, 1-D b -> Gemm(x, W, b) (one kernel, bias fused)."""
    return RewriteRule("matmul-add-to-gemm", _gemm_pattern, _gemm_replacement, _gemm_check)


def _mul_chain_pattern(op, a, c1, c2):
    return op.Mul(op.Mul(a, c1), c2)


def _mul_chain_check(ctx, a, c1, c2):
    v1, v2 = ctx.const_value(c1), ctx.const_value(c2)
    if v1 is None or v2 is None:
        return fail("multipliers are not both constant")
    if ctx.const_value(a) is not None:
        return fail("all three are constants")
    if v1.dtype != v2.dtype:
        return fail("constants of different dtypes")
    try:
        np.broadcast_shapes(v1.shape, v2.shape)
    except ValueError:
        return fail("constants do not broadcast together")
    return True


def _mul_chain_replacement(op, a, c1, c2):
    v1 = const_value(c1)
    return op.Mul(a, op.const((v1 * const_value(c2)).astype(v1.dtype), name=f"{c2.name}_folded"))


def _is_erf_gelu_tail(a) -> bool:
    """`a` is x * (Erf(x / sqrt 2) + 1), the product whose Mul by 0.5 completes an Erf-GELU: ORT fuses the five
    ops into one Gelu only while that 0.5 stays a scalar."""
    prod = a.inputs[0] if len(a.inputs) == 1 else None
    if prod is None or prod.op != "Mul":
        return False
    for t in prod.inputs:
        add = t.inputs[0] if len(t.inputs) == 1 else None
        if add is not None and add.op == "Add" and any(len(u.inputs) == 1 and u.inputs[0].op == "Erf"
                                                       for u in add.inputs):
            return True
    return False


def _mul_chain_keeping_fusions(ctx, a, c1, c2):
    if _is_erf_gelu_tail(a):
        return fail("the inner Mul completes an Erf-GELU (ORT fuses it into Gelu while its 0.5 stays a scalar)")
    return _mul_chain_check(ctx, a, c1, c2)


def fold_constant_mul_chain_rule() -> RewriteRule:
    """Mul(Mul(a, c1), c2) with constant c1, c2 -> Mul(a, c1*c2): one elementwise pass instead of two
    (changes float rounding, so not part of the bit-exact cleanup; the type check guards the shape). Refused
    where the inner Mul is the 0.5 of an Erf-GELU: folding there costs ORT's Gelu fusion (MiniLM-L3 static int8:
    Div/Erf/Add/Mul/Mul left unfused in all three layers)."""
    return RewriteRule("fold-constant-mul-chain", _mul_chain_pattern, _mul_chain_replacement,
                       _mul_chain_keeping_fusions)
