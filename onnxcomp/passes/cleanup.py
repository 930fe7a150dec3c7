"""`cleanup`: remove what computes nothing, without changing a single output value.

Rules on the rewrite engine: Identity, inference-mode Dropout, Cast to the dtype the tensor already has,
Transpose of a constant folded into the constant, two Transposes in a row merged into one (or none). Then
constant-only layout subgraphs (Slice/Reshape/Concat/Cast/Unsqueeze/Squeeze/Gather/Flatten of constants, in
every graph, If/Loop bodies included) are evaluated by onnx's reference implementation and become constants,
so weights stored packed (a Slice of one big initializer) are weights the other passes see. Then dead nodes,
duplicated initializers (same dtype, shape and bytes) and initializers nobody reads are dropped.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..rewrite import GraphIndex, RewriteRule, RuleSet, apply_rules, fail
from ..rewrite.rule import onnx_dtype
from .base import Pass, PassContext, PassOutcome


# -- Identity ---------------------------------------------------------------------------------
def _identity(op, x):
    return op.Identity(x)


def _passthrough(op, x, **_: Any):
    return x


def remove_identity_rule() -> RewriteRule:
    return RewriteRule("remove-identity", _identity, _passthrough)


# -- Dropout in inference mode ----------------------------------------------------------------
def _dropout1(op, x):
    return op.Dropout(x, _outputs=None, _bind="node")


def _dropout2(op, x, ratio):
    return op.Dropout(x, ratio, _outputs=None, _bind="node")


def _dropout3(op, x, ratio, training_mode):
    return op.Dropout(x, ratio, training_mode, _outputs=None, _bind="node")


def _dropout_check(ctx, x, node, training_mode=None, **_: Any):
    if len(node.outputs) > 1 and (ctx.consumers(node.outputs[1]) or ctx.is_graph_output(node.outputs[1])):
        return fail("Dropout mask output is used")
    if training_mode is not None:
        v = ctx.const_value(training_mode)
        if v is None:
            return fail("training_mode is not a constant")
        if bool(np.asarray(v).reshape(-1)[0]):
            return fail("training_mode is true")
    return True


# -- Cast to the same dtype -------------------------------------------------------------------
def _cast(op, x):
    return op.Cast(x, _bind="node")


def _cast_check(ctx, x, node, **_: Any):
    want = node.attrs.get("to")
    have = onnx_dtype(x)
    if have is None:
        return fail(f"dtype of '{x.name}' is unknown")
    if have != want:
        return fail("Cast changes the dtype")
    return True


# -- Transpose of a constant ------------------------------------------------------------------
def _transpose(op, x):
    return op.Transpose(x, _bind="node")


def _transpose_check(ctx, x, node, **_: Any):
    if ctx.const_value(x) is None:
        return fail(f"'{x.name}' is not a constant")
    return True


def _transpose_fold(op, x, node, **_: Any):
    v = ir.const_value(x)
    perm = node.attrs.get("perm")
    return op.const(np.ascontiguousarray(np.transpose(v, perm)), name=f"{x.name}_transposed")


# -- Transpose of a Transpose ------------------------------------------------------------------
def _transpose_pair(op, x):
    return op.Transpose(op.Transpose(x, _bind="first"), _bind="second")


def _perm(node: gs.Node, rank: int | None) -> list[int] | None:
    p = node.attrs.get("perm")
    if p is not None:
        return [int(i) for i in p]
    return None if rank is None else list(range(rank))[::-1]  # no perm: reverse the axes


def _transpose_pair_check(ctx, x, first, second, **_: Any):
    rank = len(x.shape) if x.shape is not None else None
    if _perm(first, rank) is None or _perm(second, rank) is None:
        return fail(f"rank of '{x.name}' is unknown and a Transpose has no perm")
    return True


def _transpose_pair_fold(op, x, first, second, **_: Any):
    """Transpose(Transpose(x, p1), p2) is Transpose(x, p1[p2]); x itself when that is the identity."""
    rank = len(x.shape) if x.shape is not None else None
    p1, p2 = _perm(first, rank), _perm(second, rank)
    combined = [p1[i] for i in p2]
    if combined == list(range(len(combined))):
        return x
    return op.Transpose(x, perm=combined)


def cleanup_rules() -> RuleSet:
    return RuleSet([
        remove_identity_rule(),
        RewriteRule("remove-dropout", _dropout1, _passthrough, _dropout_check),
        RewriteRule("remove-dropout-ratio", _dropout2, _passthrough, _dropout_check),
        RewriteRule("remove-dropout-training-mode", _dropout3, _passthrough, _dropout_check),
        RewriteRule("remove-noop-cast", _cast, _passthrough, _cast_check),
        RewriteRule("fold-constant-transpose", _transpose, _transpose_fold, _transpose_check),
        RewriteRule("fold-transpose-pair", _transpose_pair, _transpose_pair_fold, _transpose_pair_check),
    ])


# -- graph-level sweeps -----------------------------------------------------------------------
def remove_dead_nodes(graph: gs.Graph) -> int:
    """Drop nodes (in this graph and its subgraphs) whose outputs nobody reads."""
    total = 0
    for g in list(ir.iter_graphs(graph)):
        index = GraphIndex(g)
        removed = index.remove_dead(list(g.nodes)[::-1])
        if removed:
            index.commit()
            total += len(removed)
    return total


def dedupe_initializers(graph: gs.Graph) -> tuple[int, int]:
    """Point every reader of a duplicated constant (initializer or Constant node, same dtype, shape and bytes)
    at one copy, then drop the Constant nodes left unread; returns (tensors merged, bytes saved)."""
    merged = saved = 0
    for g in list(ir.iter_graphs(graph)):
        index = GraphIndex(g)
        first: dict[tuple, gs.Tensor] = {}
        seen: set[int] = set()
        dropped: list[gs.Node] = []
        for n in list(g.nodes):
            cands = list(n.inputs)
            if n.op == "Constant" and len(n.outputs) == 1:
                cands.append(n.outputs[0])
            for t in cands:
                if id(t) in seen or index.is_graph_input(t):
                    continue
                v = ir.const_value(t)
                if v is None:
                    continue
                seen.add(id(t))
                v = np.asarray(v)
                key = (v.dtype.str, v.shape,
                       hashlib.blake2b(np.ascontiguousarray(v).view(np.uint8), digest_size=16).digest())
                keep = first.setdefault(key, t)
                # a graph output keeps its name: it may be the copy kept, never one replaced
                if keep is not t and not index.is_graph_output(t) and np.array_equal(ir.const_value(keep), v):
                    index.replace_all_uses(t, keep)
                    dropped.extend(p for p in t.inputs)
                    merged += 1
                    saved += v.nbytes
        if index.remove_dead(dropped):
            index.commit()
    return merged, saved


# ops whose output is a function of constant inputs that onnx's reference evaluates exactly (data movement and
# dtype casts): folded when every input is a constant and the result is no larger than its inputs
FOLDABLE_OPS = ("Slice", "Reshape", "Transpose", "Concat", "Cast", "Unsqueeze", "Squeeze", "Gather", "Flatten")


def _evaluate(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    """The node's one output by onnx.reference (the operator's specified semantics at `opset`)."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if v is not None else "" for i, v in enumerate(values)]
    proto = onnx.helper.make_node(node.op, names, ["out"], **node.attrs)
    feeds = {n: v for n, v in zip(names, values) if v is not None}
    return np.asarray(ReferenceEvaluator(proto, opsets={"": opset}).run(None, feeds)[0])


def fold_constant_subgraphs(graph: gs.Graph, opset: int) -> tuple[int, list[str]]:
    """Replace every FOLDABLE_OPS node whose inputs are all constants (in this graph and its subgraphs, in
    topological order so chains fold whole) by a constant under its output's name; returns (nodes folded,
    notes on nodes left unfolded). Constant nodes left unread are for `remove_dead_nodes`, which cleanup runs
    next."""
    folded, notes = 0, []
    for g in list(ir.iter_graphs(graph)):
        index = GraphIndex(g)
        done = []
        for n in list(g.nodes):
            if n.op not in FOLDABLE_OPS or n.domain not in ("", "ai.onnx", None) or len(n.outputs) != 1:
                continue
            out = n.outputs[0]
            if index.is_graph_output(out) or not index.has_consumers(out):
                continue
            values = [None if not t.name else ir.const_value(t) for t in n.inputs]
            if any(v is None for v, t in zip(values, n.inputs) if t.name) or not any(v is not None for v in values):
                continue
            try:
                y = _evaluate(n, values, opset)
            except Exception as e:  # onnx.reference lacks some old-opset forms: leave the node as it is
                notes.append(f"{n.op} '{n.name}' left unfolded: onnx.reference cannot evaluate it at opset {opset} "
                             f"({type(e).__name__})")
                continue
            if y.nbytes > sum(np.asarray(v).nbytes for v in values if v is not None):
                notes.append(f"{n.op} '{n.name}' left unfolded: its result ({y.nbytes} bytes) is larger than its "
                             "constant inputs")
                continue
            const = gs.Constant(out.name, np.ascontiguousarray(y))
            index.replace_all_uses(out, const)
            index.remove_node(n)
            done.append(n)
        if done:  # the Constant nodes that fed them are left for the dead-node sweep
            index.commit()
            folded += len(done)
    return folded, notes


@dataclass(frozen=True)
class Cleanup(Pass):
    """Remove Identity/no-op Cast/Dropout, fold constant Transposes and constant-only layout subgraphs, drop dead
    nodes and duplicate initializers."""

    name: ClassVar[str] = "cleanup"
    dedupe: bool = True
    fold_transpose: bool = True
    fold_constants: bool = True  # evaluate FOLDABLE_OPS nodes of constants (packed weights become weights)

    def run(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext) -> PassOutcome:
        rules = [r for r in cleanup_rules() if self.fold_transpose or r.name != "fold-constant-transpose"]
        stats = apply_rules(model, rules)
        folded, notes = fold_constant_subgraphs(model.graph, model.graph.opset) if self.fold_constants else (0, [])
        dead = remove_dead_nodes(model.graph)
        merged, saved = dedupe_initializers(model.graph) if self.dedupe else (0, 0)
        out = PassOutcome(details={"rewrites": stats.to_dict(), "constants_folded": folded, "dead_nodes_removed": dead,
                                   "initializers_deduplicated": merged, "bytes_deduplicated": saved},
                          notes=notes[:20])
        if not stats.fixpoint:
            out.notes.append("rule application stopped before a fixpoint (step limit)")
        return out
