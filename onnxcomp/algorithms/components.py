"""Rewriting a planned set of nodes as one unit: the nodes are rebuilt, in graph order, with new constants.

Structured pruning changes shapes across many nodes at once (a channel group, an attention block, the whole
residual stream). A `Component` lists those nodes, the tensors they read from outside (pattern variables) and
the outputs read after them; `component_rule` turns components of one wiring into one engine rule whose pattern
is that wiring, with a plan that puts each component on its root node; the replacement rebuilds the nodes
with the component's constants -- so the engine checks every replacement like any other rewrite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ..rewrite import GraphIndex, Plan, RewriteRule, fail


@dataclass
class Component:
    """The nodes one rewrite replaces, their inputs from outside (pattern variables) and the outputs kept."""

    seq: list[gs.Node]
    ext: dict[int, str]  # id(outside tensor) -> variable name, in order of first use
    outputs: list[gs.Tensor]
    consts: dict[tuple[int, int], np.ndarray]
    tensors: dict[int, gs.Tensor] = field(default_factory=dict)  # id(outside tensor) -> the tensor
    attrs: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(node) -> attributes it is rebuilt with

    @property
    def signature(self) -> tuple:
        """Components with the same signature match the same pattern (same ops, same wiring)."""
        pos = {id(t): (i, j) for i, n in enumerate(self.seq) for j, t in enumerate(n.outputs)}
        wiring = tuple((n.op, n.domain or "", len(n.outputs),
                        tuple(self.ext.get(id(t)) or pos.get(id(t)) or "" for t in n.inputs)) for n in self.seq)
        return wiring, tuple(pos[id(t)] for t in self.outputs)



def component(nodes: list[gs.Node], new_const: dict[tuple[int, int], np.ndarray], order: dict[int, int],
              index: GraphIndex, attrs: dict[int, dict[str, Any]] | None = None) -> Component:
    """The component made of `nodes` (any order; `order`: id(node) -> graph position) with constants `new_const`
    ((id(node), input index) -> value) and changed attributes `attrs` (id(node) -> name -> value)."""
    seq = sorted({id(n): n for n in nodes}.values(), key=lambda n: order[id(n)])
    inside = {id(n) for n in seq}
    made = {id(t) for n in seq for t in n.outputs}
    ext: dict[int, str] = {}
    tensors: dict[int, gs.Tensor] = {}
    for n in seq:
        for t in n.inputs:
            if t.name and id(t) not in made and id(t) not in ext:
                ext[id(t)] = f"v{len(ext)}"
                tensors[id(t)] = t
    outputs = [t for n in seq for t in n.outputs
               if t.name and (index.is_graph_output(t) or any(id(c) not in inside for c in index.consumers(t)))]
    return Component(seq, ext, outputs, new_const, tensors, dict(attrs or {}))


def component_rule(k: int, comps: list[Component], name: str = "prune-channels") -> tuple[RewriteRule, Plan]:
    """One rule for components of one signature, and the plan that puts each component on its root node: the
    pattern is their common structure, the check confirms the match bound the planned nodes, the replacement
    rebuilds them with the component's new constants."""
    first = comps[0]
    var_names = list(first.ext.values())
    root_pos = next(i for i, n in enumerate(first.seq) if any(t is first.outputs[0] for t in n.outputs))
    plan = Plan((c.seq[root_pos], c) for c in comps)
    pos = {id(t): (i, j) for i, n in enumerate(first.seq) for j, t in enumerate(n.outputs)}
    out_pos = [pos[id(t)] for t in first.outputs]

    def pattern(op, *vs):
        val: dict[int, Any] = {}
        byname = dict(zip(var_names, vs))
        for t_id, nm in first.ext.items():
            val[t_id] = byname[nm]
        for i, n in enumerate(first.seq):
            ins = [val[id(t)] if t.name else None for t in n.inputs]
            outs = getattr(op, n.op)(*ins, _domain=n.domain or None, _outputs=len(n.outputs), _bind=f"n{i}")
            outs = outs if isinstance(outs, tuple) else (outs,)
            for t, o in zip(n.outputs, outs):
                val[id(t)] = o
        res = tuple(val[id(t)] for t in first.outputs)
        return res if len(res) > 1 else res[0]

    pattern.__name__ = f"channel_component_{k}"

    def check(ctx, decision: Component, **b):  # the planned nodes, in any order the wiring allows
        if {id(b.get(f"n{i}")) for i in range(len(decision.seq))} != {id(n) for n in decision.seq}:
            return fail("the match binds other nodes than the planned component")
        return True

    def replacement(op, decision: Component, **b):  # rebuilt from the planned nodes' own inputs, match's order
        val: dict[int, gs.Tensor] = dict(decision.tensors)
        for n in decision.seq:
            ins = []
            for j, t in enumerate(n.inputs):
                if (id(n), j) in decision.consts:
                    ins.append(op.const(decision.consts[(id(n), j)], name=f"{t.name}_pruned"))
                elif not t.name:
                    ins.append(None)
                else:
                    ins.append(val[id(t)])
            outs = getattr(op, n.op)(*ins, _domain=n.domain or None, _outputs=len(n.outputs), _name=n.name,
                                     **{**dict(n.attrs), **decision.attrs.get(id(n), {})})
            outs = outs if isinstance(outs, tuple) else (outs,)
            for t, o in zip(n.outputs, outs):
                val[id(t)] = o
        res = [val[id(b[f"n{i}"].outputs[j])] for i, j in out_pos]
        return tuple(res) if len(res) > 1 else res[0]

    return RewriteRule(f"{name}-{k}", pattern, replacement, check, variables=var_names), plan
