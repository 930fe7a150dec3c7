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


def fold_constant_mul_chain_rule() -> RewriteRule:
    """Mul(Mul(a, c1), c2) with constant c1, c2 -> Mul(a, c1*c2): one elementwise pass instead of two
    (changes float rounding, so not part of the bit-exact cleanup; the type check guards the shape)."""
    return RewriteRule("fold-constant-mul-chain", _mul_chain_pattern, _mul_chain_replacement, _mul_chain_check)
