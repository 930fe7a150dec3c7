"""Which layers a weight pass touches: MatMul/Gemm/Conv nodes with a constant float32 weight, found by engine
patterns and filtered by the recipe's `ops` and `exclude` (node or output-tensor names, or regexes).

Shared by every pass that rewrites weights (quantize, sparsify, lowrank), so "which layers" means the same
thing in every pass of a recipe.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..errors import RecipeError
from ..rewrite import fail, find_matches, query
from ..rewrite.rule import onnx_dtype

#: op types whose weight (input 1) these passes know how to read as a matrix
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
ALREADY_QUANTIZED = "put sparsify/lowrank before quantize in the recipe"


def quantized_weights_note(rejections: dict[str, str]) -> Optional[str]:
    """A note for the report when layers were skipped because an earlier pass already quantized them."""
    n = sum(ALREADY_QUANTIZED in r for r in rejections.values())
    return f"{n} layer(s) skipped: their weights are already quantized; {ALREADY_QUANTIZED}" if n else None


def check_exclude(patterns: Sequence[str], where: str) -> None:
    """RecipeError naming the pattern when an `exclude` entry is not a valid regex."""
    for pat in patterns:
        try:
            re.compile(pat)
        except re.error as e:
            raise RecipeError(f"{where}: {pat!r} is not a valid regex: {e}") from None


def is_excluded(node: gs.Node, patterns: Sequence[str]) -> bool:
    """True when the node's name or one of its output names equals or fully matches a pattern."""
    names = [node.name] + [t.name for t in node.outputs]
    return any(p == n or re.fullmatch(p, n) for p in patterns for n in names)


def check_ops(ops: Optional[Sequence[str]], allowed: Sequence[str], where: str) -> tuple[str, ...]:
    """The op types a pass should touch: `ops` from the recipe (checked against `allowed`) or all of them."""
    if ops is None:
        return tuple(allowed)
    unknown = sorted(set(ops) - set(allowed))
    if unknown:
        raise RecipeError(f"{where}: {unknown} not supported; valid: {list(allowed)}")
    return tuple(ops)


def weight_problem(node: gs.Node, w: gs.Tensor, exclude: Sequence[str], min_ndim: int = 2) -> Optional[str]:
    """Why `node`'s weight `w` cannot be compressed (excluded, not a constant, not float32, rank below
    `min_ndim`, NaN/inf), or None."""
    if is_excluded(node, exclude):
        return f"excluded by the recipe ({node.name})"
    v = ir.const_value(w)
    if v is None:
        if len(w.inputs) == 1 and w.inputs[0].op in ("DequantizeLinear", "DynamicQuantizeLinear"):
            return f"weight '{w.name}' is already quantized ({w.inputs[0].op}): {ALREADY_QUANTIZED}"
        return f"'{w.name}' is not a constant weight"
    if v.dtype != np.float32:
        return f"weight '{w.name}' is {v.dtype}, not float32"
    if v.ndim < min_ndim:
        return f"weight '{w.name}' has rank {v.ndim}"
    if not np.isfinite(v).all():
        return f"weight '{w.name}' contains NaN/inf"
    return None


#: smaller Gather tables are not worth a decode at run time
MIN_EMBEDDING_ELEMENTS = 4096


def embedding_problem(node: gs.Node, w: gs.Tensor, exclude: Sequence[str],
                      min_elements: int = MIN_EMBEDDING_ELEMENTS) -> Optional[str]:
    """Why Gather `node` on table `w` is not an embedding lookup a weight pass may compress (see weight_problem;
    also: not along axis 0, not 2-D, fewer than `min_elements` values), or None."""
    why = weight_problem(node, w, exclude)
    if why:
        return why
    if node.attrs.get("axis", 0) != 0:
        return "Gather is not along axis 0 (not an embedding lookup)"
    v = ir.const_value(w)
    if v.ndim != 2:
        return "embedding table is not 2-D"
    if v.size < min_elements:
        return f"table '{w.name}' is small ({v.size} elements)"
    return None


def embedding_pattern(op, w, idx):
    return op.Gather(w, idx, _bind="node")


@dataclass
class WeightLayer:
    """One node reading a constant weight: y = op(x, W[, bias])."""

    node: gs.Node
    x: gs.Tensor
    w: gs.Tensor
    bias: Optional[gs.Tensor]
    graph: gs.Graph

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]

    @property
    def weight(self) -> np.ndarray:
        return np.asarray(ir.const_value(self.w), np.float32)

    def matrix(self, value: Optional[np.ndarray] = None) -> np.ndarray:
        """The weight (or `value`, another array in its stored layout) as [k inputs, n outputs] with y = x @ M
        (Gemm's transB and alpha applied); Conv: [C_in/group * kh * kw, C_out]."""
        w = self.weight if value is None else np.asarray(value, np.float32)
        if self.op == "Gemm":
            m = w.T if self.node.attrs.get("transB", 0) else w
            return np.ascontiguousarray(m * np.float32(self.node.attrs.get("alpha", 1.0)))
        if self.op == "Conv":
            return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
        if self.op == "ConvTranspose":
            return np.ascontiguousarray(w.reshape(w.shape[0], -1))
        return w

    def stored(self, m: np.ndarray) -> np.ndarray:
        """The inverse of matrix(): a [k, n] matrix (k may differ for Gemm/MatMul, rows pruned) in the layout and
        scale the weight is stored in (Gemm: transB and alpha; Conv: [C_out, C_in/group, kh, kw])."""
        m = np.asarray(m, np.float32)
        if self.op == "Gemm":
            m = m / np.float32(self.node.attrs.get("alpha", 1.0))
            return np.ascontiguousarray(m.T if self.node.attrs.get("transB", 0) else m)
        if self.op == "Conv":
            return np.ascontiguousarray(m.T.reshape(self.weight.shape))
        if self.op == "ConvTranspose":
            return np.ascontiguousarray(m.reshape(self.weight.shape))
        return np.ascontiguousarray(m)


def weight_pattern2(op_type: str):
    def pattern(op, x, w):
        return getattr(op, op_type)(x, w, _bind="node")
    return pattern


def weight_pattern3(op_type: str):
    def pattern(op, x, w, b):
        return getattr(op, op_type)(x, w, b, _bind="node")
    return pattern


def find_weight_layers(model: ir.Model, ops: Sequence[str] = WEIGHT_OPS, exclude: Sequence[str] = (),
                       min_elements: int = 0, main_graph_only: bool = False,
                       rejections: Optional[dict[str, str]] = None) -> list[WeightLayer]:
    """Every node of `ops` whose weight is a finite constant float32 tensor (MatMul: 2-D), in graph order.

    Nodes that look like candidates but are left alone get a reason in `rejections` (node name -> why)."""

    def check(ctx, x, w, node, b=None):
        if main_graph_only and ctx.graph is not model.graph:
            return fail("inside a subgraph (its activations cannot be calibrated)")
        why = weight_problem(node, w, exclude, min_ndim=2 if node.op in ("MatMul", "Gemm") else 3)
        if why:
            return fail(why)
        v = ctx.const_value(w)
        if node.op in ("MatMul", "Gemm") and v.ndim != 2:
            return fail(f"weight '{w.name}' has rank {v.ndim}, not 2")
        if v.size < min_elements:
            return fail(f"weight '{w.name}' has {v.size} elements (< {min_elements})")
        if onnx_dtype(x) not in (None, onnx.TensorProto.FLOAT):
            return fail(f"input '{x.name}' is not float32")
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return fail("Gemm with transA=1")
        if b is not None and node.op != "Gemm" and ctx.const_value(b) is None:
            return fail("bias is not constant")
        return True

    rules = []
    for op_type in ops:
        rules.append(query(f"find-{op_type.lower()}-2", weight_pattern2(op_type), check))
        if op_type != "MatMul":
            rules.append(query(f"find-{op_type.lower()}-3", weight_pattern3(op_type), check))
    rej: dict[str, str] = {} if rejections is None else rejections
    found = find_matches(model, rules, rejections=rej)
    seen: set[int] = set()
    layers = []
    for f in found:
        b = f.match.bindings
        node = b["node"]
        if id(node) in seen:
            continue
        seen.add(id(node))
        layers.append(WeightLayer(node, b["x"], b["w"], b.get("b"), f.graph))
    order = {id(n): i for g in ir.iter_graphs(model.graph) for i, n in enumerate(g.nodes)}
    layers.sort(key=lambda l: order.get(id(l.node), 0))
    return layers
