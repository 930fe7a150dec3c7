"""The engine's mutation layer: a gs.Graph's node set keyed by identity, with O(degree) edits.

Every graph change the engine commits goes through a GraphIndex (the driver, and the sweeps passes run
through the engine), so no edit rescans the graph.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable

import onnx_graphsurgeon as gs

from ..ir import iter_graphs, toposort


def remove_from(lst: list, obj: object) -> None:
    """Remove one occurrence of obj by identity, bypassing gs's synchronisation and __eq__."""
    for i in range(len(lst) - 1, -1, -1):
        if lst[i] is obj:
            list.__delitem__(lst, i)
            return


class GraphIndex:
    """Node set of one gs.Graph keyed by identity, with O(degree) node edits and O(k) use rewiring.

    gs keeps producer/consumer lists on tensors (tensor.inputs / tensor.outputs); this class only makes
    sure edits go through identity-based, non-quadratic paths and that graph.nodes is rebuilt once.
    """

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.nodes: dict[int, gs.Node] = {id(n): n for n in graph.nodes}
        self._outputs = {id(t) for t in graph.outputs}
        self._inputs = {id(t) for t in graph.inputs}
        self._name_counter = 0
        self._names: set[str] | None = None
        self._removed: set[int] = set()
        self._stale: dict[int, tuple[gs.Tensor, int]] = {}  # id(tensor) -> (tensor, tombstones)

    def alive(self, node: gs.Node) -> bool:
        return id(node) in self.nodes

    def is_graph_output(self, t: gs.Tensor) -> bool:
        return id(t) in self._outputs

    def is_graph_input(self, t: gs.Tensor) -> bool:
        return id(t) in self._inputs

    def fresh_name(self, base: str) -> str:
        if self._names is None:
            self._names = set()
            for g in iter_graphs(self.graph):
                for n in g.nodes:
                    self._names.add(n.name)
                    for t in list(n.outputs) + list(n.inputs):  # inputs: initializers and outer-scope names
                        self._names.add(t.name)
                for t in list(g.inputs) + list(g.outputs):
                    self._names.add(t.name)
        name = base
        while name in self._names:
            self._name_counter += 1
            name = f"{base}__{self._name_counter}"
        self._names.add(name)
        return name

    def add_node(self, node: gs.Node) -> None:
        self.nodes[id(node)] = node
        self._removed.discard(id(node))  # a re-added node (or a new one reusing a freed id) is a live consumer

    def consumers(self, t: gs.Tensor) -> list[gs.Node]:
        """Nodes reading `t` (this graph and subgraphs), skipping removed ones."""
        if not self._stale:
            return list(t.outputs)
        return [c for c in t.outputs if id(c) not in self._removed]

    def has_consumers(self, t: gs.Tensor) -> bool:
        return any(id(c) not in self._removed for c in t.outputs)

    def remove_node(self, node: gs.Node) -> None:
        """Detach a node. Consumer lists of its inputs keep a tombstone until compacted (amortised O(1)):
        removing each of k consumers of one tensor would otherwise cost O(k) each, O(k^2) in all."""
        if self.nodes.pop(id(node), None) is None:
            return
        self._removed.add(id(node))
        for t in node.inputs:
            if len(t.outputs) <= 8:
                remove_from(t.outputs, node)
                continue
            key = id(t)
            self._stale[key] = (t, self._stale.get(key, (t, 0))[1] + 1)
            if 2 * self._stale[key][1] > len(t.outputs):
                self._compact(t)
        for t in node.outputs:
            remove_from(t.inputs, node)
        list.clear(node.inputs)
        list.clear(node.outputs)

    def _compact(self, t: gs.Tensor) -> None:
        keep = [c for c in t.outputs if id(c) not in self._removed]
        list.clear(t.outputs)
        list.extend(t.outputs, keep)
        self._stale.pop(id(t), None)

    def replace_all_uses(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """Point every consumer of `old` (and graph outputs) at `new` in one O(k) sweep."""
        if old is new:
            return
        seen: set[int] = set()
        for n in old.outputs:
            if id(n) in seen or id(n) in self._removed:
                continue
            seen.add(id(n))
            for i, t in enumerate(n.inputs):
                if t is old:
                    list.__setitem__(n.inputs, i, new)
                    list.append(new.outputs, n)
        list.clear(old.outputs)
        self._stale.pop(id(old), None)
        # consumers inside subgraphs that capture `old` are in old.outputs too (gs shares tensors)
        if id(old) in self._outputs:
            for i, t in enumerate(self.graph.outputs):
                if t is old:
                    self.graph.outputs[i] = new
            self._outputs.discard(id(old))
            self._outputs.add(id(new))

    def remove_dead(self, candidates: Iterable[gs.Node]) -> list[gs.Node]:
        """Remove candidate nodes (and, transitively, their producers) whose outputs are unused."""
        removed = []
        work = deque(candidates)
        while work:
            n = work.popleft()
            if not self.alive(n):
                continue
            if any(id(t) in self._outputs or self.has_consumers(t) for t in n.outputs):
                continue
            producers = [p for t in n.inputs for p in t.inputs]
            self.remove_node(n)
            removed.append(n)
            work.extend(producers)
        return removed

    def commit(self) -> None:
        """Compact consumer lists, write the node set back to graph.nodes and sort it."""
        for t, _ in list(self._stale.values()):
            self._compact(t)
        self.graph.nodes = list(self.nodes.values())
        toposort(self.graph)
