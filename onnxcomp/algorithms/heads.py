"""Attention-head pruning for MatMul-based multi-head attention (the BERT-style graph PyTorch exports).

Recognised by an engine pattern rooted at the output projection:

    q = Transpose(Reshape(Add(MatMul(xq, Wq), bq), [.., H, d]))      (k, v alike; k transposed for q @ k)
    p = Softmax(Add(Div|Mul(MatMul(q, k), scale), mask))              (mask optional)
    y = Add(MatMul(Reshape(Transpose(MatMul(p, v)), [.., H*d]), Wo), bo)   (bo optional)

A head is a block of d columns of Wq/Wk/Wv (and their biases) and d rows of Wo, so removing heads shrinks all
four weights, every attention tensor, and the head count in the Reshape shapes (a constant, or a Concat whose
head-count entry is a constant). Exporters compute batch and sequence sizes with Shape -> Gather on tensors
inside the block; those readers are first re-pointed at the block's inputs (same sizes), so that the block's
intermediates are its own and the engine can replace it as a whole.

Which heads go and how Wo is refitted is decided like any channel group (channels.py), with block = d.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..rewrite import RewriteRule, apply_rules, fail, find_matches, query

_PERM = [0, 2, 1, 3]
_PERM_K = [0, 2, 3, 1]


def _make_pattern(scale_op: str, masked: bool, out_bias: bool):
    def pattern(op, xq, wq, bq, sq, xk, wk, bk, sk, xv, wv, bv, sv, scale, mask, so, wo, bo):
        def proj(x, w, b, s, tag):
            return op.Transpose(op.Reshape(op.Add(op.MatMul(x, w, _bind=f"m{tag}"), b, _bind=f"a{tag}"), s,
                                           _bind=f"r{tag}"), _bind=f"t{tag}")

        q, k, v = proj(xq, wq, bq, sq, "q"), proj(xk, wk, bk, sk, "k"), proj(xv, wv, bv, sv, "v")
        scores = getattr(op, scale_op)(op.MatMul(q, k, _bind="qk"), scale, _bind="scale_node")
        if masked:
            scores = op.Add(scores, mask, _bind="mask_add")
        ctx = op.Reshape(op.Transpose(op.MatMul(op.Softmax(scores, _bind="sm"), v, _bind="pv"), _bind="tc"), so,
                         _bind="rc")
        y = op.MatMul(ctx, wo, _bind="mo")
        return op.Add(y, bo, _bind="ao") if out_bias else y

    pattern.__name__ = f"attention_{scale_op.lower()}{'_mask' if masked else ''}{'_bias' if out_bias else ''}"
    return pattern


_PATTERNS = [_make_pattern(s, m, b) for s in ("Div", "Mul") for m in (True, False) for b in (True, False)]


def shape_entries(t: gs.Tensor, rank: int) -> Optional[list[Any]]:
    """Entries of a Reshape shape of `rank`: ints where constant, None where computed; None if unreadable."""
    v = ir.const_value(t)
    if v is not None:
        return [int(x) for x in v.reshape(-1)] if v.size == rank else None
    if len(t.inputs) != 1 or t.inputs[0].op != "Concat" or len(t.inputs[0].inputs) != rank:
        return None
    out: list[Any] = []
    for x in t.inputs[0].inputs:
        c = ir.const_value(x)
        if c is not None and c.size != 1:
            return None
        out.append(int(c.reshape(-1)[0]) if c is not None else None)
    return out


def _head_shape(t: gs.Tensor) -> Optional[tuple[int, int]]:
    e = shape_entries(t, 4)
    if e is None or not isinstance(e[2], int) or not isinstance(e[3], int) or e[2] <= 0 or e[3] <= 0:
        return None
    return e[2], e[3]


def _check(ctx, **b):
    for tag in ("q", "k", "v"):
        if b[f"t{tag}"].attrs.get("perm") != (_PERM_K if tag == "k" else _PERM):
            return fail(f"unexpected {tag} transpose {b[f't{tag}'].attrs.get('perm')}")
        w, bias = ctx.const_value(b[f"w{tag}"]), ctx.const_value(b[f"b{tag}"])
        if w is None or w.ndim != 2 or w.dtype != np.float32 or bias is None or bias.shape != (w.shape[1],):
            return fail(f"{tag} projection is not a constant float32 weight with a bias")
    if b["tc"].attrs.get("perm") != _PERM:
        return fail("unexpected context transpose")
    shapes = {_head_shape(b[s]) for s in ("sq", "sk", "sv")}
    if len(shapes) != 1 or None in shapes:
        return fail("head reshapes do not share a constant head count")
    h, d = shapes.pop()
    wq, wk, wv = (ctx.const_value(b[f"w{t}"]) for t in "qkv")
    if not (wq.shape[1] == wk.shape[1] == wv.shape[1] == h * d):
        return fail(f"projections are not {h} heads of {d}")
    so = shape_entries(b["so"], 3)
    if so is None or so[2] not in (h * d, -1):
        return fail("the output reshape's last entry is not heads*head_dim")
    wo = ctx.const_value(b["wo"])
    if wo is None or wo.ndim != 2 or wo.shape[0] != h * d or wo.dtype != np.float32:
        return fail("the output projection is not a constant [heads*head_dim, n] weight")
    if "bo" in b and (ctx.const_value(b["bo"]) is None or ctx.const_value(b["bo"]).shape != (wo.shape[1],)):
        return fail("the output bias is not a constant vector")
    return check_scores(ctx, b)


def check_scores(ctx, b: dict[str, Any]) -> Any:
    """The scores part shared by the attention forms: a constant scalar scale ("scale"), Softmax over the keys
    ("sm"), and an optional mask ("mask") that is the same for every head."""
    if ctx.const_value(b["scale"]) is None or ctx.const_value(b["scale"]).size != 1:
        return fail("the score scale is not a constant scalar")
    if b["sm"].attrs.get("axis", -1) not in (-1, 3):
        return fail("softmax is not over the keys")
    return check_mask(b)


def check_mask(b: dict[str, Any]) -> Any:
    """An optional attention mask ("mask") that is the same for every head (no head axis, or one of size 1)."""
    if "mask" in b:
        m = b["mask"]
        shape = m.shape if ir.const_value(m) is None else ir.const_value(m).shape
        if shape is None or (len(shape) >= 3 and shape[-3] != 1):
            return fail("the mask may differ per head (head axis not 1)")
    return True


def find_attention(model: ir.Model, exclusive: bool = False) -> list[dict[str, Any]]:
    """Bindings of every recognised attention block of the main graph (by default also blocks whose inside is
    read by Shape nodes: reroute_shapes fixes those)."""
    rules = [query(p.__name__, p, _check) for p in _PATTERNS]
    out, seen = [], set()
    for f in find_matches(model, rules, exclusive=exclusive):
        if f.graph is model.graph and id(f.match.bindings["mo"]) not in seen:
            seen.add(id(f.match.bindings["mo"]))
            out.append(dict(f.match.bindings))
    return out


def head_count(b: dict[str, Any]) -> tuple[int, int]:
    """(heads, head_dim) of a block's bindings."""
    return _head_shape(b["sq"])  # type: ignore[return-value]


def reroute_shapes(model: ir.Model, blocks: list[dict[str, Any]]) -> int:
    """Gather(Shape(t), i) for batch/sequence sizes of tensors inside attention blocks -> the same of the block's
    input (an equal size), so the blocks' intermediates have no outside readers. Returns how many."""
    src: dict[int, tuple[gs.Tensor, int]] = {}  # id(tensor inside) -> (block input with the same dims 0/1, rank)
    for b in blocks:
        for tag in ("q", "k", "v"):
            src[id(b[f"a{tag}"].outputs[0])] = (b[f"x{tag}"], 3)
            src[id(b[f"m{tag}"].outputs[0])] = (b[f"x{tag}"], 3)
        src[id(b["tc"].outputs[0])] = (b["xq"], 4)

    def pattern(op, s, i):  # the Shape node itself is not in the pattern: it may feed several Gathers
        return op.Gather(s, i, _bind="gather")

    def check(ctx, s, i, gather):
        shape = s.inputs[0] if len(s.inputs) == 1 else None
        if shape is None or shape.op != "Shape" or id(shape.inputs[0]) not in src:
            return fail("not a size of a tensor inside an attention block")
        iv = ctx.const_value(i)
        rank = src[id(shape.inputs[0])][1]
        if iv is None or iv.size != 1 or int(iv.reshape(-1)[0]) % rank not in (0, 1):
            return fail("reads a size other than batch or sequence")
        if shape.attrs.get("start", 0) != 0 or "end" in shape.attrs or gather.attrs.get("axis", 0) != 0:
            return fail("sliced Shape")
        return True

    def replacement(op, s, i, gather):
        x, rank = src[id(s.inputs[0].inputs[0])]
        idx = int(ir.const_value(i).reshape(-1)[0]) % rank
        return op.Gather(op.Shape(x), op.const(np.array(idx, np.int64), name=f"{x.name}_dim{idx}"), axis=0)

    return apply_rules(model, [RewriteRule("attention-shape-source", pattern, replacement, check)]).rules[
        "attention-shape-source"].applied


def _shape_with(op, t: gs.Tensor, pos: int, value: int, name: str) -> gs.Tensor:
    """Shape tensor t with entry `pos` set to `value` (a new constant, or a new Concat)."""
    v = ir.const_value(t)
    if v is not None:
        arr = np.array(v, copy=True).reshape(-1)
        arr[pos] = value
        return op.const(arr.astype(v.dtype), name=name)
    concat = t.inputs[0]
    ins = list(concat.inputs)
    ins[pos] = op.const(np.array([value], np.int64), name=name)
    return op.Concat(*ins, axis=concat.attrs.get("axis", 0))


def head_rules() -> list[RewriteRule]:
    """Rules rebuilding each block of a plan anchored at its output MatMul ("mo") with the decided constants:
    'wq','bq','wk','bk','wv','bv' (kept columns), 'wo' (kept, refitted rows), optional 'bo', and 'heads'."""

    def replacement(op, xq, wq, bq, sq, xk, wk, bk, sk, xv, wv, bv, sv, scale, so, wo, decision, mask=None, bo=None,
                    **n):
        p = decision
        h, d = int(p["heads"]), _head_shape(sq)[1]

        def proj(x, w, b, s, tag):
            y = op.Add(op.MatMul(x, op.const(p[f"w{tag}"], name=f"{w.name}_heads")),
                       op.const(p[f"b{tag}"], name=f"{b.name}_heads"))
            y = op.Reshape(y, _shape_with(op, s, 2, h, f"{s.name}_heads"), **dict(n[f"r{tag}"].attrs))
            return op.Transpose(y, perm=_PERM_K if tag == "k" else _PERM)

        q, k, v = proj(xq, wq, bq, sq, "q"), proj(xk, wk, bk, sk, "k"), proj(xv, wv, bv, sv, "v")
        scores = getattr(op, n["scale_node"].op)(op.MatMul(q, k), scale)
        if mask is not None:
            scores = op.Add(scores, mask)
        c = op.Transpose(op.MatMul(op.Softmax(scores, **dict(n["sm"].attrs)), v), perm=_PERM)
        entries = shape_entries(so, 3)
        new_so = so if entries[2] == -1 else _shape_with(op, so, 2, h * d, f"{so.name}_heads")
        y = op.MatMul(op.Reshape(c, new_so, **dict(n["rc"].attrs)), op.const(p["wo"], name=f"{wo.name}_heads"))
        if bo is not None:
            y = op.Add(y, op.const(p["bo"], name=f"{bo.name}_heads") if "bo" in p else bo)
        return y

    return [RewriteRule(f"prune-heads-{p.__name__}", p, replacement) for p in _PATTERNS]
