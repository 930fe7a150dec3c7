"""Quantize rules for the fused transformer ops of ORT's transformers optimizer (com.microsoft domain).

A BERT-like model run through `onnxruntime.transformers.optimizer` (or optimum's ORTOptimizer) keeps its Q/K/V
weights packed in `Attention` nodes and its embedding tables in `EmbedLayerNormalization`: no MatMul or Gather
is left to quantize there. These rules give them ORT's integer kernels, as its own quantizer does:
- Attention(x, W [K, 3H], b) -> QAttention(Q(x), int8 W per output column, b, ...): in dynamic mode x is
  quantized at run time (DynamicQuantizeLinear), in static mode with its calibrated range;
- EmbedLayerNormalization -> QEmbedLayerNormalization with uint8 tables (per tensor: the kernel's form), in every
  mode (no activation involved), like the embedding Gathers.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ... import ir, qmath
from ...rewrite import RewriteRule, fail
from ...rewrite.rule import onnx_dtype
from ...algorithms.select import embedding_problem
from .rules import _Run

MS = "com.microsoft"

#: fused ops with weights that mode weight_only leaves float, and why (listed in the report's left_float)
WEIGHT_ONLY_LEFT = {"Attention": "weight_only: ORT has no weight-only kernel for the fused Attention's packed QKV "
                                 "weight (it would be dequantized every run); mode dynamic or static gives it "
                                 "QAttention"}

#: Attention attributes QAttention has too; any other (qkv_hidden_sizes, rotary_embedding_dim) is refused
_QATTENTION_ATTRS = frozenset({"num_heads", "unidirectional", "do_rotary", "past_present_share_buffer",
                               "mask_filter_value", "scale"})


def _attention3(op, x, w, b):
    return op.Attention(x, w, b, _domain=MS, _bind="node")


def _attention4(op, x, w, b, mask):
    return op.Attention(x, w, b, mask, _domain=MS, _bind="node")


#: the packed-QKV forms, with and without a mask (GPTQ's input Grams are probed on them too)
ATTENTION_PATTERNS = (_attention4, _attention3)


def attention_rules(q: _Run) -> list[RewriteRule]:
    """com.microsoft Attention with a constant packed QKV weight and bias -> QAttention (dynamic and static)."""

    def check(ctx, x, w, b, node, mask=None):
        ok = q._layer_ok(ctx, node, w, x)
        if not ok:
            return ok
        wv, bv = ctx.const_value(w), ctx.const_value(b)
        if wv.ndim != 2 or wv.dtype != np.float32:
            return fail("the packed QKV weight is not a 2-D float32 constant")
        if bv is None or bv.ndim != 1 or bv.shape[0] != wv.shape[1] or bv.dtype != np.float32:
            return fail("the QKV bias is not a constant float32 vector over the weight's columns")
        extra = sorted(set(node.attrs) - _QATTENTION_ATTRS)
        if extra:
            return fail(f"Attention with {extra}: QAttention has no such attribute")
        if len(node.outputs) != 1:
            return fail("Attention with a present (KV cache) output: QAttention is quantized without past state")
        if onnx_dtype(x) != onnx.TensorProto.FLOAT:
            return fail(f"input '{x.name}' is not float32")
        return True

    def replacement(op, x, w, b, node, mask=None):
        q.soften_to_weight_only(node)
        consts, _ = q._weight_consts(op, w, 1, q._gram(op, x, w, node))
        b = q._corrected_bias(op, x, node, b, np.asarray(ir.const_value(w), np.float64), consts, 1, layout="MatMul")
        if q.mode == "dynamic":
            xq, sx, zx = op.DynamicQuantizeLinear(x, _outputs=3)
        else:
            xq, sx, zx = q._q_input(op, x)
        wq, sw, zw = consts
        return op.QAttention(xq, wq, b, sx, sw, mask if mask is not None else gs.Variable.empty(), zx, zw,
                             _domain=MS, **dict(node.attrs))

    return [RewriteRule(f"qattention-{n}", p, replacement, check)
            for n, p in zip(("mask", "nomask"), ATTENTION_PATTERNS)]


def _eln7(op, ids, seg, word, pos, segemb, gamma, beta):
    return op.EmbedLayerNormalization(ids, seg, word, pos, segemb, gamma, beta, _domain=MS, _outputs=2,
                                      _bind="node")


def _eln8(op, ids, seg, word, pos, segemb, gamma, beta, mask):
    return op.EmbedLayerNormalization(ids, seg, word, pos, segemb, gamma, beta, mask, _domain=MS, _outputs=2,
                                      _bind="node")


_TABLES = ("word", "pos", "segemb", "gamma", "beta")


def embed_layernorm_rules(q: _Run) -> list[RewriteRule]:
    """com.microsoft EmbedLayerNormalization (word, position and segment tables, LayerNorm gamma/beta) ->
    QEmbedLayerNormalization with each of the five stored uint8 per tensor (ORT's kernel reads no other form)."""

    def check(ctx, node, word, **t: Any):
        why = embedding_problem(node, word, q.q.exclude)
        if why:
            return fail(why)
        for k in _TABLES:
            v = ctx.const_value(word if k == "word" else t[k])
            if v is None or v.dtype != np.float32:
                return fail(f"EmbedLayerNormalization input '{k}' is not a float32 constant")
        return True

    def replacement(op, ids, seg, word, pos, segemb, gamma, beta, node, mask=None):
        vals, scales, zps = [], [], []
        for k, t in zip(_TABLES, (word, pos, segemb, gamma, beta)):
            v = np.asarray(ir.const_value(t), np.float32)
            scale, zp = qmath.weight_params(v, None, "uint8", False)
            vals.append(op.const(qmath.quantize(v, scale, zp, None, "uint8"), name=f"{t.name}_quantized"))
            scales.append(op.const(np.asarray(scale, np.float32), name=f"{t.name}_scale"))
            zps.append(op.const(np.asarray(zp, np.uint8), name=f"{t.name}_zero_point"))
        return op.QEmbedLayerNormalization(ids, seg, *vals, mask if mask is not None else gs.Variable.empty(),
                                           *scales, *zps, _domain=MS, _outputs=2, **dict(node.attrs))

    return [RewriteRule(f"qembed-layernorm-{n}", p, replacement, check)
            for n, p in (("mask", _eln8), ("nomask", _eln7))]
