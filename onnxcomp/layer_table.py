"""The report's per-layer table over the whole recipe: one row per weight layer of the input model, with what
every pass did to it, the error it introduced, and its weight bytes before and after by storage class.

Passes name the initializers they write after the weight they replace (`W` -> `W_quantized`, `W_scale`,
`W_lowrank_a`, `W_palette_indices`, `W_pruned`...), so each initializer of the result is charged to the input
weight whose name is its longest prefix ending at a `_`; the layer that read that weight owns the bytes."""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence

from .pipeline import PassRecord

#: keys by which a pass's detail rows name their node, and whether the value is a list of node names
_NAME_KEYS = (("node", False), ("nodes", True), ("layer", False), ("producer", False))
#: detail-row fields that say how far a layer was compressed, with the label shown
_SETTINGS = (("bits", "bits"), ("rank", "rank"), ("sparsity", "sparsity"), ("kept", "kept"))
_ROW_LISTS = ("layers", "groups")


def _owner(name: str, originals: set[str]) -> Optional[str]:
    """The input initializer `name` was made from: itself, or its longest prefix ending before a '_'."""
    if name in originals:
        return name
    cut = name.rfind("_")
    while cut > 0:
        if name[:cut] in originals:
            return name[:cut]
        cut = name.rfind("_", 0, cut)
    return None


def _origin(node: str, table: dict[str, Any]) -> Optional[str]:
    """The input layer a node of some pass's output stands for: itself, or (the engine names the nodes a rule
    makes `<anchor>/<rule>`) its longest prefix ending before a '/'."""
    while node:
        if node in table:
            return node
        cut = node.rfind("/")
        if cut <= 0:
            return None
        node = node[:cut]
    return None


def _settings(records: Sequence[PassRecord], table: dict[str, Any]) -> dict[str, list[str]]:
    """node -> what each pass's detail rows say about it ("lowrank rank 23", "palettize bits 4")."""
    out: dict[str, list[str]] = {}
    for rec in records:
        for key in _ROW_LISTS:
            rows = rec.details.get(key)
            if not isinstance(rows, list):
                continue
            for row in rows:
                if not isinstance(row, dict):
                    continue
                parts = [f"{label} {_fmt(row[k])}" + (f"/{row['channels']}" if k == "kept" and "channels" in row
                                                         else "")
                         for k, label in _SETTINGS if k in row and row[k] is not None]
                if not parts:
                    continue
                for node in _row_nodes(row):
                    node = _origin(node, table)
                    if node is not None:
                        out.setdefault(node, []).append(f"{rec.name} " + ", ".join(parts))
    return out


def _row_nodes(row: dict[str, Any]) -> list[str]:
    for key, is_list in _NAME_KEYS:
        v = row.get(key)
        if v is None:
            continue
        return [str(x) for x in v] if is_list and isinstance(v, list) else [str(v)]
    return []


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def layer_rows(before: dict[str, dict[str, Any]], after: dict[str, tuple[int, str]],
               records: Sequence[PassRecord]) -> list[dict[str, Any]]:
    """Rows for every weight layer of the input (`summary.weight_layers` of it), given the result's
    initializers (`summary.initializer_storage`) and the pass records; largest layers first."""
    reader: dict[str, str] = {}
    for node, lay in before.items():
        for init in lay["initializers"]:
            reader.setdefault(init, node)
    originals = set(reader)
    bytes_after: Counter = Counter()
    storage_after: dict[str, Counter] = {}
    for name, (nbytes, storage) in after.items():
        src = _owner(name, originals)
        if src is None:
            continue
        node = reader[src]
        bytes_after[node] += nbytes
        storage_after.setdefault(node, Counter())[storage] += nbytes
    done: dict[str, list[str]] = {}  # node -> the passes that replaced one of its initializers, in recipe order
    errors: dict[str, list[float]] = {}
    for rec in records:
        for name in rec.initializers_replaced:
            src = _owner(name, originals)
            if src is not None:
                done.setdefault(reader[src], []).append(rec.name)
        for ch in rec.layers:
            node = _origin(ch.node, before)
            if node is not None:
                errors.setdefault(node, []).append(float(ch.error))
    settings = _settings(records, before)
    rows = []
    for node, lay in before.items():
        after_b = int(bytes_after.get(node, 0))
        errs = errors.get(node, [])
        rows.append({
            "node": node, "op": lay["op"], "shape": lay["shape"],
            "done": " + ".join(dict.fromkeys(done.get(node, []))) or "unchanged",
            "settings": "; ".join(dict.fromkeys(settings.get(node, []))),
            "error": max(errs) if errs else None,
            "bytes_before": int(lay["bytes"]), "bytes_after": after_b,
            "ratio": after_b / lay["bytes"] if lay["bytes"] else None,
            "storage_after": " + ".join(k for k, _ in storage_after.get(node, Counter()).most_common()),
        })
    rows.sort(key=lambda r: -r["bytes_before"])
    return rows
