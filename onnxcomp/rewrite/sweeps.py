"""Graph-wide sweeps of the engine: dead nodes, duplicated constants, constant-only subgraphs folded.

Unlike rules, these look at a whole graph at once (every reader of a tensor, every constant's bytes); like
rules, they change graphs only through the GraphIndex, in the main graph and every If/Loop/Scan body.
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from .index import GraphIndex


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
            const = gs.Constant(out.name, np.array(y, order="C"))  # (ascontiguousarray makes 0-d 1-d)
            index.replace_all_uses(out, const)
            index.remove_node(n)
            done.append(n)
        if done:  # the Constant nodes that fed them are left for the dead-node sweep
            index.commit()
            folded += len(done)
    return folded, notes




def take_back_names(graph: gs.Graph, wanted: dict[str, gs.Tensor]) -> int:
    """Give each tensor of `wanted` (old name -> the tensor that replaced it) its old name where no tensor of the
    graph or its subgraphs still has it, so a rewritten weight keeps the name users know; returns how many."""
    taken = {t.name for g in ir.iter_graphs(graph) for n in g.nodes for t in list(n.inputs) + list(n.outputs)}
    renamed = 0
    for name, t in wanted.items():
        if t.name != name and name not in taken:
            t.name = name
            taken.add(name)
            renamed += 1
    return renamed
