"""The compression report: what each pass changed, size, latency and accuracy ratios, warnings.

One object, four renderings: `to_dict()` (JSON-safe), `to_markdown()`, `to_html(path)` (with a chart), and
`str(report)` (a short readable summary for the terminal).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .pipeline import PassRecord
from .summary import format_storage, human_bytes


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _json_safe(x.item())
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


#: JSON Schema of Report.to_dict() (and of `onnxcomp compress --report r.json`)
REPORT_SCHEMA = Path(__file__).resolve().parent / "schemas" / "report.schema.json"


def report_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that every report's JSON follows."""
    return json.loads(REPORT_SCHEMA.read_text())


@dataclass
class Report:
    """Everything a user needs to decide whether to ship the compressed model."""

    source: str
    recipe: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    passes: list[PassRecord]
    validation: Any = None  # onnxcomp.validation.ValidationReport
    budget: Optional[dict[str, Any]] = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    search: Optional[dict[str, Any]] = None  # the auto search: trials, front, winner and why
    data: Optional[dict[str, Any]] = None  # calibration / validation samples and where validation came from
    suggestions: list[str] = field(default_factory=list)  # what more the user could get, and how
    #: one row per weight layer of the input over the whole recipe (layer_table.layer_rows)
    layers: list[dict[str, Any]] = field(default_factory=list)

    # -- headline ratios ------------------------------------------------------------------------
    @property
    def size_ratio(self) -> float:
        return self.after["model_bytes"] / max(1, self.before["model_bytes"])

    @property
    def latency_ratio(self) -> Optional[float]:
        return None if self.validation is None else self.validation.latency_ratio

    def _outputs(self) -> dict[str, dict[str, Any]]:
        return {} if self.validation is None else self.validation.to_dict().get("outputs", {})

    def to_dict(self) -> dict[str, Any]:
        d = {
            "source": self.source,
            "recipe": self.recipe,
            "size_ratio": self.size_ratio,
            "latency_ratio": self.latency_ratio,
            "before": self.before,
            "after": self.after,
            "passes": [p.to_dict() for p in self.passes],
            "validation": None if self.validation is None else self.validation.to_dict(),
            "accuracy_budget": self.budget,
            "warnings": list(self.warnings),
            "seconds": self.seconds,
            "search": self.search,
            "data": self.data,
            "suggestions": list(self.suggestions),
            "layers": list(self.layers),
        }
        return _json_safe(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # -- text -----------------------------------------------------------------------------------
    def __str__(self) -> str:
        b, a = self.before, self.after
        passes = ", ".join(p["type"] for p in self.recipe.get("passes", [])) or "(none)"
        lines = [f"onnxcomp report: {self.source}  (recipe: {passes}; target {self.recipe.get('target')})",
                 f"  size      {human_bytes(b['model_bytes'])} -> {human_bytes(a['model_bytes'])}"
                 f"   ratio {self.size_ratio:.3f}",
                 f"  nodes     {b['nodes']} -> {a['nodes']}",
                 f"  weights   {format_storage(b.get('bytes_by_storage', {}))} -> "
                 f"{format_storage(a.get('bytes_by_storage', {}))}"]
        v = self.validation
        if v is not None:
            if v.latency_ratio is not None:
                lines.append(f"  latency   ratio {v.latency_ratio:.3f} (compressed/original, median ms "
                             f"{v.latency_ms['candidate']:.3f} vs {v.latency_ms['reference']:.3f}, "
                             f"{', '.join(v.providers)})")
                lines.append(f"            timed on {v.feeds_source} inputs {v.shapes_text() or '(none)'}"
                             + (" -- generated: pass validation data, or --shape name=dims, to time the lengths "
                                "the model will see" if v.feeds_source == "generated" else ""))
            if v.session_ms is not None:
                lines.append(f"  load      session creation {v.session_ms['candidate']:.1f} ms vs "
                             f"{v.session_ms['reference']:.1f} ms (one each; ORT's optimisation and folding)")
            outs = self._outputs()
            if outs:
                worst_cos = min(o["cosine"] for o in outs.values())
                worst_abs = max(o["max_abs_err"] for o in outs.values())
                worst_rel = max(o["rel_l2_err"] for o in outs.values())
                lines.append(f"  accuracy  worst cosine {worst_cos:.6f}, worst rel_l2 {worst_rel:.3g}, worst max_abs "
                             f"{worst_abs:.3g} over {len(outs)} outputs, {v.samples} samples ({v.feeds_source} feeds)")
        else:
            lines.append("  validation skipped")
        if self.budget is not None:
            state = "met" if self.budget.get("met") else "NOT met: " + "; ".join(self.budget.get("violations", []))
            left = sum(len(s["left_float"]) for s in self.budget.get("backoff", []))
            softened = sum(len(s.get("softened", ())) for s in self.budget.get("backoff", []))
            gave = [f"compressing {softened} most sensitive layer(s) less (e.g. 8-bit weights)"] if softened else []
            gave += [f"leaving {left} most sensitive layer(s) uncompressed"] if left else []
            if gave:
                state += " after " + " and ".join(gave)
            lines.append(f"  budget    {self.budget.get('bounds')} {state}")
        lines.append("  passes:")
        for p in self.passes:
            delta = p.nodes_after - p.nodes_before
            removed = ", ".join(f"{k} -{v}" for k, v in sorted(p.ops_removed.items()))
            added = ", ".join(f"{k} +{v}" for k, v in sorted(p.ops_added.items()))
            change = "; ".join(x for x in (removed, added) if x) or "no change"
            lines.append(f"    {p.name:<10} {p.status[:60]:<10} nodes {delta:+d} ({change}), "
                         f"{human_bytes(p.bytes_after - p.bytes_before)}, {p.seconds:.2f} s")
            for n in p.notes:
                lines.append(f"        note: {n}")
            for line in p.summary:
                lines.append(f"        {line}")
        lines += self._search_lines()
        if self.data:
            lines.append(f"  data      {self.data.get('calibration_samples', 0)} calibration sample(s); validation on "
                         f"{self.data.get('validation_samples', 0)} sample(s): {self.data.get('validation')}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        for s in self.suggestions:
            lines.append(f"  tip: {s}")
        return "\n".join(lines)

    def _search_rows(self) -> list[list[str]]:
        rows = []
        for t in (self.search or {}).get("trials", []):
            acc = "-" if t["accuracy"] is None else f"{t['accuracy']:.4f}"
            lat = "-" if t["latency_ratio"] is None else f"{t['latency_ratio']:.3f}"
            rows.append([t["name"], acc, lat, f"{t['size_ratio']:.3f}", "yes" if t["met"] else "no",
                         str(t["left_float"]), f"{t['seconds']:.1f}", t["verdict"]])
        return rows

    def _search_lines(self) -> list[str]:
        s = self.search
        if not s:
            return []
        lines = [f"  auto      objective {s['objective']}: {len(s['trials'])} candidate(s) measured in "
                 f"{s['seconds']:.0f} s ({s['executor']}); chosen {s['winner']}: {s['reason']}",
                 f"            {'candidate':<26} {'accuracy':>8} {'latency':>7} {'size':>6} met  float  verdict"]
        for r in self._search_rows():
            lines.append(f"            {r[0]:<26} {r[1]:>8} {r[2]:>7} {r[3]:>6} {r[4]:<4} {r[5]:>5}  {r[7][:70]}")
        if s.get("not_run"):
            lines.append(f"            not run (max_seconds): {', '.join(s['not_run'])}")
        return lines

    def to_markdown(self) -> str:
        b, a = self.before, self.after
        md = [f"# onnxcomp report: `{self.source}`", "",
              "| | original | compressed | ratio |", "|---|---:|---:|---:|",
              f"| size | {human_bytes(b['model_bytes'])} | {human_bytes(a['model_bytes'])} | {self.size_ratio:.3f} |",
              f"| nodes | {b['nodes']} | {a['nodes']} | {a['nodes'] / max(1, b['nodes']):.3f} |",
              f"| weights by storage | {format_storage(b.get('bytes_by_storage', {}))} | "
              f"{format_storage(a.get('bytes_by_storage', {}))} | "
              f"{a['parameter_bytes'] / max(1, b['parameter_bytes']):.3f} |"]
        v = self.validation
        if v is not None and v.latency_ratio is not None:
            md.append(f"| latency (median ms; {v.feeds_source} inputs {v.shapes_text()}) | "
                      f"{v.latency_ms['reference']:.3f} | {v.latency_ms['candidate']:.3f} | {v.latency_ratio:.3f} |")
        if v is not None and v.session_ms is not None:
            r, c = v.session_ms["reference"], v.session_ms["candidate"]
            md.append(f"| session creation (ms, one each) | {r:.1f} | {c:.1f} | {c / r if r > 0 else float('nan'):.3f} |")
        outs = self._outputs()
        if outs:
            md += ["", f"## Accuracy ({v.samples} samples, {v.feeds_source} feeds, {', '.join(v.providers)})", "",
                   "| output | cosine | rel L2 | max abs | mean abs |", "|---|---:|---:|---:|---:|"]
            for name, o in outs.items():
                md.append(f"| `{name}` | {o['cosine']:.6f} | {o['rel_l2_err']:.3g} | {o['max_abs_err']:.3g} | "
                          f"{o['mean_abs_err']:.3g} |")
        md += ["", "## Passes", "", "| pass | status | nodes | removed | added | bytes | time |",
               "|---|---|---:|---|---|---:|---:|"]
        for p in self.passes:
            md.append(f"| {p.name} | {p.status} | {p.nodes_before} → {p.nodes_after} | "
                      f"{', '.join(f'{k} {v}' for k, v in sorted(p.ops_removed.items()))} | "
                      f"{', '.join(f'{k} {v}' for k, v in sorted(p.ops_added.items()))} | "
                      f"{p.bytes_after - p.bytes_before:+,} | {p.seconds:.2f} s |")
        for p in self.passes:  # what each pass says about its own work (notes, its summary lines)
            lines = [*p.notes, *p.summary]
            if lines:
                md += ["", f"### {p.name}", ""] + [f"- {line}" for line in lines]
        if self.search:
            s = self.search
            md += ["", f"## Auto search (objective {s['objective']}, {s['executor']} executor, {s['seconds']:.0f} s)",
                   "", f"Chosen: **{s['winner']}** — {s['reason']}. Accuracy is the task metric when the budget has "
                   "one, else the worst output cosine, on the validation samples; latency and size are ratios to "
                   "the input (the lossless row is the timing noise floor).", "",
                   "| candidate | accuracy | latency | size | met | left float | seconds | verdict |",
                   "|---|---:|---:|---:|---|---:|---:|---|"]
            md += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in self._search_rows()]
            if s.get("not_run"):
                md += ["", f"Not run (max_seconds reached): {', '.join(s['not_run'])}"]
        if self.data:
            md += ["", "## Data", "", f"- calibration: {self.data.get('calibration_samples', 0)} sample(s)",
                   f"- validation: {self.data.get('validation_samples', 0)} sample(s), {self.data.get('validation')}"]
        if self.warnings:
            md += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        if self.suggestions:
            md += ["", "## What more you could get", ""] + [f"- {w}" for w in self.suggestions]
        md += ["", "## Recipe", "", "```json", json.dumps(self.recipe, indent=2), "```"]
        return "\n".join(md) + "\n"

    # -- html -----------------------------------------------------------------------------------
    def to_html(self, path: str | os.PathLike) -> Path:
        """Write the self-contained HTML page (html_report.render of the report's data), atomically."""
        from .html_report import render
        from .ir import atomic_write

        p = Path(os.fspath(path))
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, render(self.to_dict()).encode())
        return p


