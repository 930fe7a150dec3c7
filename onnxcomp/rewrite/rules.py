"""Small reusable rewrite rules shared by passes, tests and benchmarks."""
from __future__ import annotations

import numpy as np

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
