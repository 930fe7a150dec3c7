"""Attention-head pruning for ORT's fused multi-head attention (com.microsoft Attention, packed QKV).

ORT's transformers optimizer (and optimum's ORTOptimizer) turns a BERT block's Q/K/V projections, scores,
softmax and context into one node:

    ctx = Attention(x, W [k, 3·H·d], b [3·H·d], mask_index?; num_heads=H)    y = MatMul(ctx, Wo [H·d, n])

W's columns are the q, k and v parts one after the other, each H heads of d columns; ctx holds the heads one
after the other. A head is then d columns in each part of W and b and d rows of Wo: removing heads slices those
and sets num_heads (the head size d, and so the default score scale 1/sqrt(d), is unchanged). Heads are chosen
and Wo refitted like any channel group (channels.py: block = d). Forms whose heads are not separable this way
are refused with the reason: unequal qkv_hidden_sizes, a KV cache (past/present), attention_bias, rotary.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..rewrite import GraphIndex

MS = "com.microsoft"


def _why_not(n: gs.Node, index: GraphIndex) -> Optional[str]:
    """Why fused Attention `n` is not a block whose heads can be removed, or None."""
    if len(n.inputs) < 3 or any(t.name for t in n.inputs[4:]):
        return "it has no packed bias, or reads past state / attention_bias / past_sequence_length"
    w, b = ir.const_value(n.inputs[1]), ir.const_value(n.inputs[2])
    h = int(n.attrs.get("num_heads", 0))
    if w is None or w.ndim != 2 or w.dtype != np.float32 or b is None or b.shape != (w.shape[1],):
        return "the packed QKV weight and bias are not float32 constants [k, 3·hidden] and [3·hidden]"
    sizes = n.attrs.get("qkv_hidden_sizes")
    if sizes is not None and len(set(int(s) for s in sizes)) != 1:
        return f"unequal qkv_hidden_sizes {list(sizes)}"
    if n.attrs.get("do_rotary", 0) or n.attrs.get("past_present_share_buffer", 0):
        return "rotary or a shared KV-cache buffer"
    if h < 2 or w.shape[1] % (3 * h):
        return f"{w.shape[1]} packed columns are not 3 x {h} heads"
    if len([t for t in n.outputs if t.name]) != 1 or index.is_graph_output(n.outputs[0]):
        return "its present (KV cache) output, or its context, is read outside the model"
    return None


def find_blocks(model: ir.Model, index: GraphIndex) -> tuple[list[gs.Node], list[dict[str, str]]]:
    """The main graph's fused Attention nodes whose heads can be removed, and the others with the reason."""
    blocks, refused = [], []
    for n in model.graph.nodes:
        if n.op != "Attention" or n.domain != MS:
            continue
        why = _why_not(n, index)
        if why:
            refused.append({"layer": n.name, "reason": f"fused attention (com.microsoft Attention): {why}"})
        else:
            blocks.append(n)
    return blocks, refused


def heads_and_dim(n: gs.Node) -> tuple[int, int]:
    """(heads, head size) of a recognised block."""
    h = int(n.attrs["num_heads"])
    return h, int(ir.const_value(n.inputs[1]).shape[1]) // (3 * h)


def columns(n: gs.Node, keep: np.ndarray) -> np.ndarray:
    """The packed QKV columns of the kept heads: the same heads in the q, k and v parts."""
    h, d = heads_and_dim(n)
    per_part = (np.asarray(keep)[:, None] * d + np.arange(d)).reshape(-1)
    return np.concatenate([p * h * d + per_part for p in range(3)])


def head_energy(n: gs.Node) -> np.ndarray:
    """Sum of squares of each head's q, k and v columns (the magnitude score without data)."""
    h, d = heads_and_dim(n)
    w = np.asarray(ir.const_value(n.inputs[1]), np.float64)
    return (w.reshape(w.shape[0], 3, h, d) ** 2).sum(axis=(0, 1, 3))


def constants(n: gs.Node, keep: np.ndarray, cur: Callable[[gs.Node, int], np.ndarray]
              ) -> dict[tuple[int, int], np.ndarray]:
    """The sliced packed weight and bias of block `n` with heads `keep`."""
    cols = columns(n, keep)
    return {(id(n), 1): np.ascontiguousarray(cur(n, 1)[:, cols]), (id(n), 2): np.ascontiguousarray(cur(n, 2)[cols])}


def attrs(n: gs.Node, keep: np.ndarray) -> dict[str, Any]:
    """The attributes block `n` is rebuilt with: num_heads (and equal qkv_hidden_sizes) for the kept heads."""
    out: dict[str, Any] = {"num_heads": int(len(keep))}
    if n.attrs.get("qkv_hidden_sizes") is not None:
        out["qkv_hidden_sizes"] = [int(len(keep)) * heads_and_dim(n)[1]] * 3
    return out
