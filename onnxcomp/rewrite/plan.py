"""A pass's decisions, handed to the engine: which nodes to rewrite and what to rewrite each one into.

Passes that decide on the whole graph first (lowrank ranks, sparsify masks, palettes, channel groups, attention
heads) put each decision on the node it is about; `apply_rules(model, rules, plan=plan)` then tries the rules
only where the plan has a decision and gives that decision to the rule's check and replacement as the
`decision` argument. Planned nodes the engine did not rewrite are listed with the reason
(`RewriteStats.unapplied`), so a pass never has to diff node names to find out.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import onnx_graphsurgeon as gs


class Plan:
    """Node -> decision. `anchor` names the pattern binding the decision is looked up by (None: the match's root,
    the node producing the pattern's first output)."""

    def __init__(self, decisions: Iterable[tuple[gs.Node, Any]] = (), anchor: Optional[str] = None):
        self.anchor = anchor
        self._by_id: dict[int, tuple[gs.Node, Any]] = {}
        for node, decision in decisions:
            self.add(node, decision)

    def add(self, node: gs.Node, decision: Any) -> None:
        """Decide `decision` for `node` (one decision per node: a second one is a planning bug)."""
        if id(node) in self._by_id:
            raise ValueError(f"plan: node '{node.name}' has two decisions")
        self._by_id[id(node)] = (node, decision)

    def update(self, other: "Plan") -> None:
        """Add every decision of `other` (same anchor)."""
        assert other.anchor == self.anchor, "plans with different anchors"
        for node, decision in other._by_id.values():
            self.add(node, decision)

    def __contains__(self, node: object) -> bool:
        return id(node) in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def decision(self, node: gs.Node) -> Any:
        """The decision for `node` (KeyError when it has none)."""
        return self._by_id[id(node)][1]

    def nodes(self) -> Iterator[gs.Node]:
        return (n for n, _ in self._by_id.values())

    def anchor_of(self, root: gs.Node, bindings: dict[str, Any]) -> Optional[gs.Node]:
        """The node of a match the decision is looked up by."""
        return root if self.anchor is None else bindings.get(self.anchor)
