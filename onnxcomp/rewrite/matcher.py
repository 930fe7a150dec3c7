"""Match a Pattern against a gs graph starting from a candidate root node.

Backtracking is local to the (small) pattern: commutative nodes try both input orders, multi-output
patterns look for their other output nodes among the consumers of already-bound tensors. Every failure
carries a reason, so `explain` can say why a candidate was rejected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import GraphIndex, const_value
from .pattern import AttrVar, ConstPattern, NodeOutput, NodePattern, Pattern, ValuePattern, Var, norm_domain


@dataclass
class Match:
    """A successful match: bindings by name, matched nodes, and the graph tensors of the pattern outputs."""

    bindings: dict[str, Any]
    nodes: list[gs.Node]
    outputs: list[gs.Tensor]


class MatchFailure(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _State:
    nodes: dict[int, gs.Node] = field(default_factory=dict)  # id(NodePattern) -> gs.Node
    used: dict[int, int] = field(default_factory=dict)  # id(gs.Node) -> id(NodePattern)
    values: dict[int, gs.Tensor] = field(default_factory=dict)  # id(ValuePattern) -> tensor
    bindings: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> "_State":
        return _State(dict(self.nodes), dict(self.used), dict(self.values), dict(self.bindings))


def _omitted(t: Optional[gs.Tensor]) -> bool:
    return t is None or (isinstance(t, gs.Variable) and not t.name)


def _attr_equal(actual: Any, expected: Any) -> bool:
    if isinstance(actual, gs.Constant):
        actual = actual.values
    if isinstance(actual, np.ndarray) or isinstance(expected, np.ndarray):
        return np.array_equal(np.asarray(actual), np.asarray(expected))
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        return list(actual) == list(expected)
    return actual == expected


class Matcher:
    def __init__(self, pattern: Pattern, index: GraphIndex):
        self.p = pattern
        self.index = index

    def match(self, root: gs.Node) -> Match:
        st = _State()
        st = self._node(self.p.root, root, st)
        for out in self.p.outputs[1:]:
            if id(out.node) not in st.nodes:
                st = self._anchor(out.node, st)
        nodes = [st.nodes[id(n)] for n in self.p.nodes]
        outputs = [st.nodes[id(o.node)].outputs[o.index] for o in self.p.outputs]
        return Match(st.bindings, nodes, outputs)

    # -- matching a value position -------------------------------------------------------------
    def _value(self, pv: Optional[ValuePattern], t: Optional[gs.Tensor], st: _State) -> _State:
        if pv is None:  # omitted optional input
            if _omitted(t):
                return st
            raise MatchFailure(f"expected an omitted input, found '{t.name}'")
        if _omitted(t):
            raise MatchFailure("input is omitted")
        bound = st.values.get(id(pv))
        if bound is not None:
            if bound is not t:
                raise MatchFailure(f"'{getattr(pv, 'name', '?')}' would bind both '{bound.name}' and '{t.name}'")
            return st
        if isinstance(pv, Var):
            prev = st.bindings.get(pv.name)
            if prev is not None and prev is not t:
                raise MatchFailure(f"'{pv.name}' would bind both '{prev.name}' and '{t.name}'")
            st.values[id(pv)] = t
            st.bindings[pv.name] = t
            return st
        if isinstance(pv, ConstPattern):
            v = const_value(t)
            if v is None:
                raise MatchFailure(f"'{t.name}' is not a constant (pattern wants {pv.value.tolist()!r})")
            if not pv.matches(v):
                raise MatchFailure(f"constant '{t.name}' has a different value than {pv.value.tolist()!r}")
            st.values[id(pv)] = t
            if pv.name:
                st.bindings[pv.name] = t
            return st
        assert isinstance(pv, NodeOutput)
        if len(t.inputs) != 1:
            raise MatchFailure(f"'{t.name}' is not produced by a node (wanted {pv.node.op})")
        producer = t.inputs[0]
        if not self.index.alive(producer):
            raise MatchFailure(f"producer of '{t.name}' is outside this graph")
        if pv.index >= len(producer.outputs) or producer.outputs[pv.index] is not t:
            raise MatchFailure(f"'{t.name}' is not output #{pv.index} of {producer.op} '{producer.name}'")
        st = self._node(pv.node, producer, st)
        st.values[id(pv)] = t
        return st

    # -- matching a node -----------------------------------------------------------------------
    def _node(self, pn: NodePattern, n: gs.Node, st: _State) -> _State:
        bound = st.nodes.get(id(pn))
        if bound is not None:
            if bound is not n:
                raise MatchFailure(f"{pn.op} pattern node would bind two nodes")
            return st
        if n.op != pn.op or norm_domain(n.domain) != pn.domain:
            raise MatchFailure(f"{n.op} '{n.name}' is not {pn.op}")
        if id(n) in st.used:
            raise MatchFailure(f"{n.op} '{n.name}' already matched by another pattern node")
        if pn.num_outputs is not None and len(n.outputs) != pn.num_outputs:
            raise MatchFailure(f"{n.op} '{n.name}' has {len(n.outputs)} outputs, pattern wants {pn.num_outputs}")
        actual = list(n.inputs)
        while actual and _omitted(actual[-1]):
            actual.pop()
        wanted = list(pn.inputs)
        while wanted and wanted[-1] is None:
            wanted.pop()
        if len(actual) != len(wanted):
            raise MatchFailure(f"{n.op} '{n.name}' has {len(actual)} inputs, pattern wants {len(wanted)}")
        for key, want in pn.attrs.items():  # callers copy the state at branch points; failures discard it
            have = n.attrs.get(key)
            if isinstance(want, AttrVar):
                st.bindings[want.name] = have.values if isinstance(have, gs.Constant) else have
            elif callable(want) and not isinstance(want, (np.ndarray, type)):
                if not want(have):
                    raise MatchFailure(f"{n.op} '{n.name}': attribute {key}={have!r} rejected")
            elif not _attr_equal(have, want):
                raise MatchFailure(f"{n.op} '{n.name}': attribute {key}={have!r}, pattern wants {want!r}")
        st.nodes[id(pn)] = n
        st.used[id(n)] = id(pn)
        if pn.bind:
            st.bindings[pn.bind] = n
        orders = [list(range(len(wanted)))]
        if pn.commutative and len(wanted) == 2:
            orders.append([1, 0])
        last: Optional[MatchFailure] = None
        for k, order in enumerate(orders):
            trial = st.copy() if k + 1 < len(orders) else st  # copy only where an alternative remains
            try:
                for pi, gi in enumerate(order):
                    trial = self._value(wanted[pi], actual[gi], trial)
                return trial
            except MatchFailure as e:
                last = e
        assert last is not None
        raise last

    def _anchor(self, pn: NodePattern, st: _State) -> _State:
        """Find the node for an extra pattern output among consumers of an already-bound input."""
        anchors = [(i, st.values[id(v)]) for i, v in enumerate(pn.inputs) if v is not None and id(v) in st.values]
        if not anchors:
            raise MatchFailure(f"no bound input to find the {pn.op} output of the pattern from")
        last = MatchFailure(f"no {pn.op} consumer of the bound inputs matches")
        for _, t in anchors:
            for c in self.index.consumers(t):
                if c.op != pn.op or id(c) in st.used or not self.index.alive(c):
                    continue
                try:
                    return self._node(pn, c, st.copy())
                except MatchFailure as e:
                    last = e
        raise last
