"""Quantize rules for the fused transformer ops of ORT's transformers optimizer (com.microsoft domain).

A BERT-like model run through `onnxruntime.transformers.optimizer` (or optimum's ORTOptimizer) keeps its Q/K/V
weights packed in `Attention` nodes and its embedding tables in `EmbedLayerNormalization`: no MatMul or Gather
is left to quantize there. These rules give them ORT's integer kernels, as its own quantizer does:
- Attention(x, W [K, 3H], b) -> QAttention(Q(x), int8 W per output column, b, ...): in dynamic mode x is
  quantized at run time (DynamicQuantizeLinear), in static mode with its calibrated range;
- EmbedLayerNormalization is unfused first (Gathers, Adds, LayerNormalization: `unfuse_embed_layernorm`), so its
  tables get the int8 row-wise embedding rule, in every mode; its quantized kernel (QEmbedLayerNormalization)
  takes each table uint8 per tensor, which measured less accurate.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ... import ir
from ...rewrite import RewriteRule, apply_rules, fail
from ...rewrite.rule import onnx_dtype
from .rules import _Run

MS = "com.microsoft"

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
        if q.q.weight_dtype not in ("int8", "uint8"):
            return fail(f"QAttention takes 8-bit weights (weight_dtype {q.q.weight_dtype})")
        if q.mode == "static" and (q.act_dtype != "uint8" or q.act_sym):
            return fail("QAttention's CPU kernel takes asymmetric uint8 activations (activation_dtype uint8)")
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


def _eln_check(ctx, node, word, pos, segemb, gamma, beta, mask=None, **_: Any):
    for k, t in (("word_embedding", word), ("position_embedding", pos), ("segment_embedding", segemb),
                 ("gamma", gamma), ("beta", beta)):
        v = ctx.const_value(t)
        if v is None or v.dtype != np.float32:
            return fail(f"EmbedLayerNormalization input '{k}' is not a float32 constant")
    if mask is None and ctx.consumers(node.outputs[1]):
        return fail("EmbedLayerNormalization without a mask whose mask_index is read")
    return True


def _eln_replacement(op, ids, seg, word, pos, segemb, gamma, beta, node, mask=None):
    """LayerNormalization(word[ids] + position[0..S-1] + segment[seg]) and mask_index = ReduceSum(mask, 1):
    what the fused kernel computes (the same outputs to float rounding)."""
    one = op.const(np.array([1], np.int64), name=f"{node.name}_axis1")
    s = op.Cast(op.Gather(op.Shape(ids), op.const(np.array(1, np.int64), name=f"{node.name}_seq_dim"), axis=0),
                to=onnx.TensorProto.INT32)
    positions = op.Range(op.const(np.array(0, np.int32), name=f"{node.name}_zero"), s,
                         op.const(np.array(1, np.int32), name=f"{node.name}_one"))
    total = op.Add(op.Add(op.Gather(word, ids, axis=0), op.Gather(pos, positions, axis=0)),
                   op.Gather(segemb, seg, axis=0))
    y = op.LayerNormalization(total, gamma, beta, axis=-1, epsilon=float(node.attrs.get("epsilon", 1e-12)))
    index = (op.ReduceSum(mask, one, keepdims=0) if mask is not None
             else op.ConstantOfShape(op.Shape(ids, end=1), value=onnx.numpy_helper.from_array(np.zeros(1, np.int32))))
    return y, index


def unfuse_embed_layernorm(model: ir.Model) -> int:
    """Every EmbedLayerNormalization -> its Gathers, Adds and LayerNormalization, so the tables get the int8
    row-wise embedding rule. Its quantized kernel, QEmbedLayerNormalization, takes each table uint8 per tensor:
    ORT-fused MiniLM-L3 static cosine 0.99815 with it, 0.99897 unfused (dynamic 0.99827 -> 0.99907)."""
    rules = [RewriteRule(f"unfuse-embed-layernorm-{n}", p, _eln_replacement, _eln_check)
             for n, p in (("mask", _eln8), ("nomask", _eln7))]
    return apply_rules(model, rules).applied
