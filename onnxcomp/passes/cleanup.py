"""`cleanup`: remove what computes nothing, without changing a single output value.

Rules on the rewrite engine: Identity, inference-mode Dropout, Cast to the dtype the tensor already has,
Transpose of a constant folded into the constant, two Transposes in a row merged into one (or none). Then
constant-only layout subgraphs (Slice/Reshape/Concat/Cast/Unsqueeze/Squeeze/Gather/Flatten of constants, in
every graph, If/Loop bodies included) are evaluated by onnx's reference implementation and become constants,
so weights stored packed (a Slice of one big initializer) are weights the other passes see. Then dead nodes,
duplicated initializers (same dtype, shape and bytes) and initializers nobody reads are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..rewrite import RewriteRule, RuleSet, apply_rules, fail
from ..rewrite.sweeps import dedupe_initializers, fold_constant_subgraphs, remove_dead_nodes
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
