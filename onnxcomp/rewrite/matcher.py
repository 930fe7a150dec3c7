"""Match a Pattern against a gs graph starting from a candidate root node.

Backtracking is local to the (small) pattern: commutative nodes try both input orders, multi-output
patterns look for their other output nodes among the consumers of already-bound tensors. Every failure
carries a reason, so `explain` can say why a candidate was rejected.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir import const_value
from .rule import DEFAULT_OPSET
from .index import GraphIndex
from .pattern import AttrVar, ConstPattern, NodeOutput, NodePattern, Pattern, ValuePattern, Var, norm_domain


@dataclass
class Match:
    """A successful match: bindings by name, matched nodes, and the graph tensors of the pattern outputs."""

    bindings: dict[str, Any]
    nodes: list[gs.Node]
    outputs: list[gs.Tensor]


_MISSING = object()


class _State:
    """Bindings of one match attempt, edited in place with an undo trail (backtracking without copies)."""

    __slots__ = ("nodes", "used", "values", "bindings", "trail")

    def __init__(self) -> None:
        self.nodes: dict[int, gs.Node] = {}  # id(NodePattern) -> gs.Node
        self.used: dict[int, int] = {}  # id(gs.Node) -> id(NodePattern)
        self.values: dict[int, gs.Tensor] = {}  # id(ValuePattern) -> tensor
        self.bindings: dict[str, Any] = {}
        self.trail: list[tuple[dict, Any, Any]] = []

    def set(self, d: dict, key: Any, value: Any) -> None:
        self.trail.append((d, key, d.get(key, _MISSING)))
        d[key] = value

    def mark(self) -> int:
        return len(self.trail)

    def undo(self, mark: int) -> None:
        trail = self.trail
        while len(trail) > mark:
            d, key, prev = trail.pop()
            if prev is _MISSING:
                del d[key]
            else:
                d[key] = prev


@functools.lru_cache(maxsize=4096)
def attribute_default(op: str, domain: Optional[str], key: str, opset: int) -> Any:
    """The schema default of an attribute a node leaves out (None when there is none or the op is unknown),
    so a pattern asking for `axis=-1` also matches a node relying on the default."""
    try:
        schema = onnx.defs.get_schema(op, opset, domain or "")
    except Exception:  # unknown op or domain: no default to offer
        return None
    attr = schema.attributes.get(key)
    if attr is None or not attr.default_value.name:
        return None
    return onnx.helper.get_attribute_value(attr.default_value)


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
    """Full backtracking over the pattern: every way a pattern fits at a root is enumerated lazily.

    Commutative nodes try both input orders and a later failure anywhere re-opens the earlier choice;
    multi-output patterns search consumers of bound tensors. When nothing fits, `reason` is the failure
    of the attempt that got furthest.
    """

    def __init__(self, pattern: Pattern, index: GraphIndex, opset: int = DEFAULT_OPSET):
        self.p = pattern
        self.index = index
        self.opset = opset
        self._best: tuple[int, str] = (-1, "no match")

    @property
    def reason(self) -> str:
        return self._best[1]

    def _fail(self, st: _State, reason: str) -> None:
        if len(st.trail) >= self._best[0]:
            self._best = (len(st.trail), reason)

    def matches(self, root: gs.Node) -> Iterator[Match]:
        """Every complete match rooted at `root` (lazily; snapshot per yield)."""
        st = _State()
        for _ in self._node(self.p.root, root, st):
            for _ in self._rest(st):
                nodes = [st.nodes[id(n)] for n in self.p.nodes]
                outputs = [st.nodes[id(o.node)].outputs[o.index] for o in self.p.outputs]
                yield Match(dict(st.bindings), nodes, outputs)

    # -- matching a value position -------------------------------------------------------------
    def _value(self, pv: Optional[ValuePattern], t: Optional[gs.Tensor], st: _State) -> Iterator[None]:
        if pv is None:  # omitted optional input
            if _omitted(t):
                yield
            else:
                self._fail(st, f"expected an omitted input, found '{t.name}'")
            return
        if _omitted(t):
            self._fail(st, "input is omitted")
            return
        bound = st.values.get(id(pv))
        if bound is not None:
            if bound is t:
                yield
            else:
                self._fail(st, f"'{getattr(pv, 'name', '?')}' would bind both '{bound.name}' and '{t.name}'")
            return
        mark = st.mark()
        if isinstance(pv, Var):
            prev = st.bindings.get(pv.name)
            if prev is not None and prev is not t:
                self._fail(st, f"'{pv.name}' would bind both '{prev.name}' and '{t.name}'")
                return
            st.set(st.values, id(pv), t)
            st.set(st.bindings, pv.name, t)
            yield
            st.undo(mark)
            return
        if isinstance(pv, ConstPattern):
            v = const_value(t)
            if v is None:
                self._fail(st, f"'{t.name}' is not a constant (pattern wants {pv.value.tolist()!r})")
                return
            if not pv.matches(v):
                self._fail(st, f"constant '{t.name}' has a different value than {pv.value.tolist()!r}")
                return
            st.set(st.values, id(pv), t)
            if pv.name:
                st.set(st.bindings, pv.name, t)
            yield
            st.undo(mark)
            return
        assert isinstance(pv, NodeOutput)
        if len(t.inputs) != 1:
            self._fail(st, f"'{t.name}' is not produced by a node (wanted {pv.node.op})")
            return
        producer = t.inputs[0]
        if not self.index.alive(producer):
            self._fail(st, f"producer of '{t.name}' is outside this graph")
            return
        if pv.index >= len(producer.outputs) or producer.outputs[pv.index] is not t:
            self._fail(st, f"'{t.name}' is not output #{pv.index} of {producer.op} '{producer.name}'")
            return
        for _ in self._node(pv.node, producer, st):
            inner = st.mark()
            st.set(st.values, id(pv), t)
            yield
            st.undo(inner)

    # -- matching a node -----------------------------------------------------------------------
    def _node(self, pn: NodePattern, n: gs.Node, st: _State) -> Iterator[None]:
        bound = st.nodes.get(id(pn))
        if bound is not None:
            if bound is n:
                yield
            else:
                self._fail(st, f"{pn.op} pattern node would bind two nodes")
            return
        if n.op != pn.op or norm_domain(n.domain) != pn.domain:
            self._fail(st, f"{n.op} '{n.name}' is not {pn.op}")
            return
        if id(n) in st.used:
            self._fail(st, f"{n.op} '{n.name}' already matched by another pattern node")
            return
        if pn.num_outputs is not None and len(n.outputs) != pn.num_outputs:
            self._fail(st, f"{n.op} '{n.name}' has {len(n.outputs)} outputs, pattern wants {pn.num_outputs}")
            return
        actual = list(n.inputs)
        while actual and _omitted(actual[-1]):
            actual.pop()
        wanted = list(pn.inputs)
        while wanted and wanted[-1] is None:
            wanted.pop()
        if len(actual) != len(wanted):
            self._fail(st, f"{n.op} '{n.name}' has {len(actual)} inputs, pattern wants {len(wanted)}")
            return
        mark = st.mark()
        for key, want in pn.attrs.items():
            have = n.attrs[key] if key in n.attrs else attribute_default(n.op, n.domain, key, self.opset)
            if isinstance(want, AttrVar):
                st.set(st.bindings, want.name, have.values if isinstance(have, gs.Constant) else have)
            elif callable(want) and not isinstance(want, (np.ndarray, type)):
                if not want(have):
                    self._fail(st, f"{n.op} '{n.name}': attribute {key}={have!r} rejected")
                    st.undo(mark)
                    return
            elif not _attr_equal(have, want):
                self._fail(st, f"{n.op} '{n.name}': attribute {key}={have!r}, pattern wants {want!r}")
                st.undo(mark)
                return
        st.set(st.nodes, id(pn), n)
        st.set(st.used, id(n), id(pn))
        if pn.bind:
            st.set(st.bindings, pn.bind, n)
        orders = [list(range(len(wanted)))]
        if pn.commutative and len(wanted) == 2:
            orders.append([1, 0])
        for order in orders:
            yield from self._inputs(wanted, actual, order, 0, st)
        st.undo(mark)

    def _inputs(self, wanted: list, actual: list, order: list[int], i: int, st: _State) -> Iterator[None]:
        if i == len(wanted):
            yield
            return
        for _ in self._value(wanted[i], actual[order[i]], st):
            yield from self._inputs(wanted, actual, order, i + 1, st)

    def _rest(self, st: _State) -> Iterator[None]:
        """Bind the pattern nodes not reached from the root, via consumers of already-bound inputs: the first
        pending output, or, when it has no bound input yet, the first pending node that has one."""
        pending = [o.node for o in self.p.outputs if id(o.node) not in st.nodes]
        if not pending:
            yield
            return

        def anchored(n):  # the graph tensors of n's inputs that are bound (or outputs of bound nodes)
            out = []
            for v in n.inputs:
                if v is not None and id(v) in st.values:
                    out.append(st.values[id(v)])
                elif isinstance(v, NodeOutput) and id(v.node) in st.nodes:
                    out.append(st.nodes[id(v.node)].outputs[v.index])
            return out

        pn = pending[0]
        if not anchored(pn):
            pn = next((n for n in self.p.nodes if id(n) not in st.nodes and anchored(n)), pn)
        anchors = anchored(pn)
        if not anchors:
            self._fail(st, f"no bound input to find the {pn.op} output of the pattern from")
            return
        tried: set[int] = set()
        for t in anchors:
            for c in self.index.consumers(t):
                if id(c) in tried or c.op != pn.op or id(c) in st.used or not self.index.alive(c):
                    continue
                tried.add(id(c))
                for _ in self._node(pn, c, st):
                    yield from self._rest(st)
        if not tried:
            self._fail(st, f"no {pn.op} consumer of the bound inputs")
