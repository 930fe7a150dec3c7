"""The HTML report: one self-contained page built from the report's typed data (Report.to_dict, the document the
JSON schema describes), not from its Markdown.

Summary cards (size, latency on the stated shapes and provider, accuracy on the stated samples, task metric,
session creation); plots (weight bytes by storage dtype, bytes by op type, per-layer error, the auto search);
the whole recipe per layer (one sortable row per weight layer: what was done, settings, error, bytes before and
after, filterable by what was done); per pass its own summary, a sortable / filterable per-layer table, and every
candidate left as it was, grouped by reason; the validation table, warnings, suggestions and the recipe. No network, no external script.
"""
from __future__ import annotations

import html
import io
import json
from collections import Counter
from typing import Any, Optional

from .summary import human_bytes

__all__ = ["render"]

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:1em 0}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:170px;background:#fafafa}
.card b{display:block;font-size:1.6em}.card span{color:#555;font-size:.85em}
.good b{color:#1a7f37}.bad b{color:#b42318}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3;cursor:pointer;user-select:none}td.n{text-align:right;font-variant-numeric:tabular-nums}
details{margin:.3em 0}summary{cursor:pointer}pre{background:#f6f6f6;padding:8px;overflow:auto}
input.filter{margin:.4em 0;padding:3px 6px;width:22em}.wide{overflow-x:auto}.plots svg{max-width:100%;height:auto}
"""

_JS = """
function sortTable(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),
b=t.tBodies[0],rows=[...b.rows],asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const v=r=>{const c=r.cells[i].dataset.v??r.cells[i].textContent;const x=parseFloat(c);return isNaN(x)?c:x};
rows.sort((p,q)=>{const a=v(p),c=v(q);return (a>c?1:a<c?-1:0)*(asc?1:-1)});rows.forEach(r=>b.appendChild(r))}
function filterTable(inp){const q=inp.value.toLowerCase();const t=document.getElementById(inp.dataset.table);
[...t.tBodies[0].rows].forEach(r=>{r.style.display=r.textContent.toLowerCase().includes(q)?'':'none'})}
function pickDone(sel){const t=document.getElementById(sel.dataset.table),
i=[...t.tHead.rows[0].cells].findIndex(c=>c.textContent==='done');
[...t.tBodies[0].rows].forEach(r=>{r.style.display=!sel.value||r.cells[i].textContent===sel.value?'':'none'})}
"""

#: per-layer tables: at most this many rows per pass (the JSON has them all)
_MAX_ROWS = 400
#: detail lists that hold candidates a pass left as they were, and the key naming the node in each
_LEFT_KEYS = (("left_float", "node"), ("left_dense", "node"), ("refused", "layer"), ("skipped", "node"))
#: detail lists that hold per-layer rows
_ROW_KEYS = ("layers", "groups", "sensitivity")
#: columns shown first in per-layer tables (what the row is), the rest in the pass's own order
_FIRST = ("name", "node", "weight", "layer", "producer", "tensor", "nodes", "consumers", "kind", "op", "shape", "dtype")


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _card(title: str, value: str, note: str, tone: str = "") -> str:
    return f"<div class='card {tone}'><span>{_e(title)}</span><b>{_e(value)}</b><span>{_e(note)}</span></div>"


def _cards(d: dict[str, Any]) -> str:
    v = d.get("validation")
    out = [_card("file size", f"{d['size_ratio']:.3f}x",
                 f"{human_bytes(d['before']['model_bytes'])} -> {human_bytes(d['after']['model_bytes'])}",
                 "good" if d["size_ratio"] < 1 else "")]
    if v and v.get("latency_ratio") is not None:
        shapes = "; ".join(f"{k} {x[0] if len(x) == 1 else f'{len(x)} shapes'}" for k, x in v["timed_shapes"].items())
        out.append(_card("latency", f"{v['latency_ratio']:.3f}x",
                         f"{v['feeds_source']} inputs {shapes}, {', '.join(v['providers'])}",
                         "good" if v["latency_ratio"] < 0.97 else "bad" if v["latency_ratio"] > 1.05 else ""))
    if v and v.get("outputs"):
        worst = min(v["outputs"].items(), key=lambda kv: kv[1]["cosine"] if kv[1]["cosine"] is not None else 2)
        out.append(_card("worst cosine", f"{worst[1]['cosine']:.5f}" if worst[1]["cosine"] is not None else "-",
                         f"output '{worst[0]}' over {v['samples']} {v['feeds_source']} sample(s)"))
    if v and v.get("metric"):
        out.append(_card(f"task metric {v['metric']['name']}", _num(v["metric"]["value"]), "on the same samples"))
    if v and v.get("session_ms"):
        s = v["session_ms"]
        out.append(_card("session creation", f"{s['candidate']:.0f} ms", f"original {s['reference']:.0f} ms"))
    b = d.get("accuracy_budget")
    if b:
        rounds = b.get("backoff", [])
        less = sum(len(r.get("softened", ())) for r in rounds)
        left = sum(len(r["left_float"]) for r in rounds)
        after = f"; after {len(rounds)} back-off round(s): {less} layer(s) compressed less, {left} left as they were"
        out.append(_card("accuracy budget", "met" if b["met"] else "missed",
                         json.dumps(b["bounds"]) + (after if rounds else ""), "good" if b["met"] else "bad"))
    if not v:
        out.append(_card("validation", "skipped", "validate=False"))
    return "<div class='cards'>" + "".join(out) + "</div>"


# ------------------------------------------------------------------------------------------------ plots
def _plots(d: dict[str, Any]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the page is complete without them
        return "<p><em>(matplotlib not installed: no plots)</em></p>"
    panels = [_storage_plot, _op_bytes_plot, _layer_error_plot] + ([_front_plot] if d.get("search") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6))
    for ax, draw in zip(axes, panels):
        draw(ax, d)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return "<div class='plots'>" + svg[svg.find("<svg"):] + "</div>"


def _storage_plot(ax, d: dict[str, Any]) -> None:
    """Weight bytes by how they are stored, before and after (stacked): not a parameter count, which rises with
    quantization's scales while the bytes fall."""
    before, after = d["before"]["bytes_by_storage"], d["after"]["bytes_by_storage"]
    kinds = sorted(set(before) | set(after), key=lambda k: -(before.get(k, 0) + after.get(k, 0)))
    bottom = [0.0, 0.0]
    for k in kinds:
        vals = [before.get(k, 0) / 2**20, after.get(k, 0) / 2**20]
        ax.bar(["original", "compressed"], vals, bottom=bottom, label=k)
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax.set_ylabel("MiB")
    ax.set_title("weight bytes by storage")
    ax.legend(fontsize=7)


def _op_bytes_plot(ax, d: dict[str, Any]) -> None:
    before, after = d["before"]["bytes_by_op"], d["after"]["bytes_by_op"]
    ops = sorted(set(before) | set(after), key=lambda k: -max(before.get(k, 0), after.get(k, 0)))[:8]
    y = range(len(ops))
    ax.barh([i + 0.2 for i in y], [before.get(o, 0) / 2**20 for o in ops], 0.4, label="original")
    ax.barh([i - 0.2 for i in y], [after.get(o, 0) / 2**20 for o in ops], 0.4, label="compressed")
    ax.set_yticks(list(y), ops, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB read by the op")
    ax.set_title("bytes by op type")
    ax.legend(fontsize=7)


def _layer_error_plot(ax, d: dict[str, Any]) -> None:
    rows = [(lay["error"], p["name"], lay["node"]) for p in d["passes"] for lay in p["layers"]
            if lay.get("error") is not None]
    if not rows:
        ax.axis("off")
        ax.set_title("per-layer error: no layer compressed")
        return
    rows.sort(key=lambda r: -r[0])
    rows = rows[:25]
    names = sorted({r[1] for r in rows})
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    ax.barh(range(len(rows)), [r[0] for r in rows], color=[colors[r[1]] for r in rows])
    ax.set_yticks(range(len(rows)), [r[2][-28:] for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("relative output error the layer introduced")
    ax.set_title("largest per-layer errors")
    if len(names) > 1:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=colors[n], label=n) for n in names], fontsize=7)


def _front_plot(ax, d: dict[str, Any]) -> None:
    s = d["search"]
    key = "size_ratio" if s["objective"] == "size" else "latency_ratio"
    trials = [t for t in s["trials"] if t.get(key) is not None and t.get("accuracy") is not None]
    front = set(s.get("front", []))
    for t in trials:
        color = "red" if t["name"] == s["winner"] else "C0" if t["met"] else "0.6"
        ax.scatter(t[key], t["accuracy"], c=color, s=40 if t["name"] in front else 15)
        ax.annotate(t["name"], (t[key], t["accuracy"]), fontsize=6)
    ax.set_xlabel(key.replace("_", " "))
    ax.set_ylabel("accuracy (budget metric)")
    ax.set_title(f"auto search ({s['objective']})")  # the winner is the red point (its name is long)


# ------------------------------------------------------------------------------------------------ tables
def _table(rows: list[dict[str, Any]], tid: str, columns: Optional[list[str]] = None) -> str:
    if not rows:
        return ""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if all(not isinstance(r.get(k), (dict, list)) or _short_list(r.get(k)) for r in rows)]
    cols = columns or sorted(keys, key=lambda k: _FIRST.index(k) if k in _FIRST else len(_FIRST))
    head = "".join(f"<th onclick='sortTable(this)'>{_e(c)}</th>" for c in cols)
    body = []
    for r in rows[:_MAX_ROWS]:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, list):
                v = ", ".join(map(str, v))
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f"<td class='n' data-v='{v}'>{_e(_num(v))}</td>" if num else f"<td>{_e(_num(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p>({len(rows) - _MAX_ROWS} more rows in the JSON report)</p>" if len(rows) > _MAX_ROWS else ""
    return (f"<input class='filter' placeholder='filter rows' data-table='{tid}' oninput='filterTable(this)'>"
            f"<div class='wide'><table id='{tid}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"</table></div>{more}")


def _short_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 8 and all(not isinstance(x, (dict, list)) for x in v)


def _left_as_they_were(details: dict[str, Any]) -> str:
    """Every candidate the pass did not change, grouped by reason (largest group first)."""
    by_reason: dict[str, list[str]] = {}
    for key, name_key in _LEFT_KEYS:
        for r in details.get(key) or []:
            if isinstance(r, dict) and "reason" in r:
                by_reason.setdefault(str(r["reason"]), []).append(str(r.get(name_key, r.get("node", "?"))))
    if not by_reason:
        return ""
    total = sum(len(v) for v in by_reason.values())
    parts = [f"<h4>left as they were: {total} candidate(s), {len(by_reason)} reason(s)</h4>"]
    for reason, nodes in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(nodes[:60]) + (f" ... ({len(nodes) - 60} more)" if len(nodes) > 60 else "")
        parts.append(f"<details><summary>{len(nodes)} x {_e(reason)}</summary><p>{_e(shown)}</p></details>")
    return "".join(parts)


def _pass_section(i: int, p: dict[str, Any]) -> str:
    det = p.get("details") or {}
    out = [f"<h3>{_e(p['name'])}</h3>",
           f"<p class='sub'>{_e(p['status'])}; nodes {p['nodes_before']} -> {p['nodes_after']}; "
           f"{human_bytes(p['bytes_before'])} -> {human_bytes(p['bytes_after'])}; {p['seconds']:.2f} s</p>"]
    if p.get("summary"):
        out.append("<ul>" + "".join(f"<li>{_e(s)}</li>" for s in p["summary"]) + "</ul>")
    if p.get("notes"):
        out.append("<details><summary>notes</summary><ul>" + "".join(f"<li>{_e(n)}</li>" for n in p["notes"])
                   + "</ul></details>")
    for key in _ROW_KEYS:
        rows = det.get(key)
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            out.append(f"<h4>per layer ({key}, {len(rows)} row(s); click a header to sort)</h4>")
            out.append(_table(rows, f"t{i}_{key}"))
            break
    else:
        if p.get("layers"):
            out.append(f"<h4>per layer ({len(p['layers'])})</h4>" + _table(p["layers"], f"t{i}_layers"))
    out.append(_left_as_they_were(det))
    return "".join(out)


def _common_prefix(names: list[str]) -> str:
    """The longest prefix ending in '/' that every name shares (exported graphs repeat one for every node)."""
    if len(names) < 2:
        return ""
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[: first.rfind("/", 0, i) + 1] if i else ""


def _layers(rows: list[dict[str, Any]]) -> str:
    """The whole recipe per layer: one row per weight layer of the input, a filter by what was done."""
    if not rows:
        return ""
    options = "".join(f"<option value='{_e(k)}'>{_e(k)} ({n})</option>"
                      for k, n in Counter(r["done"] for r in rows).most_common())
    prefix = _common_prefix([r["node"] for r in rows])
    shown = [{**r, "node": r["node"][len(prefix):], "shape": "x".join(map(str, r["shape"]))} for r in rows]
    cols = ["node", "op", "shape", "done", "settings", "error", "bytes_before", "bytes_after", "ratio",
            "storage_after"]
    before, after = sum(r["bytes_before"] for r in rows), sum(r["bytes_after"] for r in rows)
    return (f"<h2 id='layers'>Layers ({len(rows)} weight layers: {human_bytes(before)} -> {human_bytes(after)})</h2>"
            "<p class='sub'>one row per weight layer of the input over the whole recipe; error: the largest "
            "relative output error a pass introduced there; click a header to sort"
            + (f"; node names without their common prefix <code>{_e(prefix)}</code>" if prefix else "") + "</p>"
            f"<select class='filter' data-table='layers_table' onchange='pickDone(this)'>"
            f"<option value=''>every layer ({len(rows)})</option>{options}</select>"
            + _table(shown, "layers_table", cols))


def _validation(v: Optional[dict[str, Any]]) -> str:
    if not v:
        return "<h2>Validation</h2><p>skipped (validate=False)</p>"
    rows = [{"output": n, **{k: o[k] for k in ("cosine", "rel_l2_err", "max_abs_err", "mean_abs_err", "nonfinite")},
             "shape": "[" + ", ".join("?" if x is None else str(x) for x in o["shape"]) + "]", "dtype": o["dtype"]}
            for n, o in v["outputs"].items()]
    lat = ""
    if v.get("latency_ms"):
        lat = (f"<p>latency median {v['latency_ms']['reference']:.3f} ms -> {v['latency_ms']['candidate']:.3f} ms "
               f"({v['latency_pairs']} interleaved pairs), {v['feeds_source']} inputs of shapes "
               f"{_e(json.dumps(v['timed_shapes']))} on {_e(', '.join(v['providers']))}</p>")
    notes = "".join(f"<li>{_e(n)}</li>" for n in v.get("notes", []))
    return (f"<h2>Validation ({v['samples']} {v['feeds_source']} sample(s))</h2>{lat}" + _table(rows, "validation")
            + (f"<details><summary>notes</summary><ul>{notes}</ul></details>" if notes else ""))


def _search(s: Optional[dict[str, Any]]) -> str:
    if not s:
        return ""
    rows = [{k: t.get(k) for k in ("name", "met", "accuracy", "size_ratio", "latency_ratio", "backoff_rounds",
                                    "seconds", "verdict")} for t in s["trials"]]
    return (f"<h2>Auto search: {_e(s['winner'])}</h2><p>{_e(s['reason'])} (objective {_e(s['objective'])}, "
            f"{s['seconds']:.0f} s, executor {_e(s['executor'])}"
            + (f"; not run within max_seconds: {_e(', '.join(s['not_run']))}" if s.get("not_run") else "")
            + ")</p>" + _table(rows, "search"))


def render(d: dict[str, Any]) -> str:
    """The page for one report dict (Report.to_dict())."""
    passes = " -> ".join(p["name"] for p in d["passes"]) or "no pass"
    parts = [f"<h1>onnxcomp report: {_e(d['source'])}</h1>",
             f"<p class='sub'>recipe {_e(passes)}; target {_e(d['recipe'].get('target'))}; "
             f"{d['seconds']:.1f} s</p>", _cards(d), _plots(d)]
    if d.get("warnings") or d.get("suggestions"):
        parts.append("<h2>Warnings and suggestions</h2><ul>"
                     + "".join(f"<li><b>warning</b>: {_e(w)}</li>" for w in d.get("warnings", []))
                     + "".join(f"<li>{_e(s)}</li>" for s in d.get("suggestions", [])) + "</ul>")
    parts.append(_search(d.get("search")))
    parts.append(_layers(d.get("layers") or []))
    parts.append("<h2>Passes</h2>" + "".join(_pass_section(i, p) for i, p in enumerate(d["passes"])))
    parts.append(_validation(d.get("validation")))
    if d.get("data"):
        parts.append("<h2>Data</h2><ul>" + "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in d["data"].items())
                     + "</ul>")
    parts.append("<h2>Recipe applied</h2><pre>" + _e(json.dumps(d["recipe"], indent=1, default=str)) + "</pre>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>onnxcomp report</title>"
            f"<style>{_CSS}</style><script>{_JS}</script></head><body>" + "".join(parts) + "</body></html>")
