"""Auto-mode benchmark: every single bench recipe and `preset: auto` side by side in one run, per model.

    python tools/bench_auto.py [--models minilm digits_cnn digits_mlp] [--budget-s 1.0] [--quick] [--json out.json]

Rows: fp32 (a second session against the first: the timing noise floor), the single-pass recipes of the other
benchmarks (quantize modes, channel pruning, low-rank, one composition), then `auto` with objective latency and
size under `accuracy_budget: {cosine: 0.99}`, and latency under a task-metric budget (MiniLM: nearest-neighbour
agreement of the embeddings >= 0.95 on the validation sentences; digits: top-1 agreement >= 0.99).

Every row is built from the same calibration data (MiniLM: sentences 200.., digits: the x_calib images), and
measured on data calibration never saw: `budget cos` is onnxcomp's budget metric (worst output cosine, the
number `cosine: 0.99` bounds) on the evaluation set (MiniLM: sentences 0..199; digits: the 500 test images),
then the task metrics, size ratio (file bytes) and latency ratios (interleaved with fp32, `measure_latency`).
The last lines compare, per objective, auto against the best single recipe that met the budget on the
evaluation set. Ratios come from one run on one machine.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxcomp  # noqa: E402
from onnxcomp import testing  # noqa: E402

import bench_quantize as bq  # noqa: E402

ALL_MODELS = ["minilm", "digits_cnn", "digits_mlp", "decoder"]
_Q, _S = "quantize", "sparsify"
SINGLES: list[tuple[str, Any]] = [
    ("default", None),
    ("q_dynamic", [{"type": _Q, "mode": "dynamic"}]),
    ("q_static", [{"type": _Q, "mode": "static"}]),
    ("q_wo_int8", [{"type": _Q, "mode": "weight_only", "weight_dtype": "int8"}]),
    ("q_wo_int4", [{"type": _Q, "mode": "weight_only", "weight_dtype": "int4", "block_size": 32}]),
    ("s_channel_0.3", [{"type": _S, "pattern": "channel", "sparsity": 0.3}]),
    ("s_channel_0.5", [{"type": _S, "pattern": "channel", "sparsity": 0.5}]),
    ("lr_p0.5", [{"type": "lowrank", "params_ratio": 0.5}]),
    ("channel0.3+static", [{"type": _S, "pattern": "channel", "sparsity": 0.3}, {"type": _Q, "mode": "static"}]),
]


def _neighbours(emb: np.ndarray) -> np.ndarray:
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def neighbour_agreement(ref: dict, cand: dict) -> float:
    """MiniLM task metric for the budget: fraction of validation sentences whose nearest other sentence is the
    same under both models (sentence embeddings = the pooled output, one row per sample)."""
    name = "461" if "461" in ref else next(iter(ref))
    r = np.concatenate([a.reshape(a.shape[0], -1) for a in ref[name]])
    c = np.concatenate([a.reshape(a.shape[0], -1) for a in cand[name]])
    return float((_neighbours(r) == _neighbours(c)).mean())


def top1_agreement(ref: dict, cand: dict) -> float:
    """Digits task metric for the budget: fraction of validation images with the same predicted class."""
    r = np.concatenate([a.argmax(-1) for a in ref["logits"]])
    c = np.concatenate([a.argmax(-1) for a in cand["logits"]])
    return float((r == c).mean())


def _eval_feeds(bench_name: str) -> list:
    if bench_name == "minilm":
        return testing.minilm_feeds(200)
    d = testing.digits_data()
    x = d["x_test"] if bench_name == "digits_cnn" else d["x_test_flat"]
    return [{"input": x[i:i + 50]} for i in range(0, len(x), 50)]


def _autos(name: str) -> list[tuple[str, dict]]:
    task = ({"metric": neighbour_agreement, "min": 0.95} if name == "minilm" else
            {"metric": top1_agreement, "min": 0.99})
    return [("auto latency cos0.99", {"preset": "auto", "objective": "latency", "accuracy_budget": {"cosine": 0.99}}),
            ("auto size cos0.99", {"preset": "auto", "objective": "size", "accuracy_budget": {"cosine": 0.99}}),
            ("auto latency task", {"preset": "auto", "objective": "latency", "accuracy_budget": task})]


def run_model(name: str, args, log) -> dict[str, Any]:
    bench = bq.model_bench(name, args.quick, testing.session)
    if name == "minilm":
        bench.calib_oc = testing.minilm_feeds(32 if args.quick else 64, start=200)
    eval_feeds = _eval_feeds(name)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-auto-") as tmp:
        runner = bq.Runner(bench, Path(tmp), testing.session, args.budget_s, log)
        fp32 = runner.fp32()
        rows.append({"row": "fp32 (noise floor)", "kind": "fp32", **_cells(fp32), "budget_cos": 1.0})
        for label, recipe in SINGLES + _autos(name):
            log(f" {name}: {label}")
            info: dict[str, Any] = {}

            def build(dst: str, recipe=recipe, info=info) -> None:
                res = onnxcomp.compress(str(bench.path), recipe, calibration_data=bench.calib_oc, progress=False,
                                        validate=False)
                res.save(dst)
                info["search"] = res.report.search
                info["recipe"] = [p["type"] + (f":{p.get('mode') or p.get('pattern') or ''}" if p["type"] != "cleanup"
                                                else "") for p in res.report.recipe.get("passes", [])]

            row = runner.build_and_measure(label.replace(" ", "_"), build)
            cells = {"row": label, "kind": "auto" if label.startswith("auto") else "single", **_cells(row)}
            if row.error is None:
                dst = Path(tmp) / f"{bench.name}.{label.replace(' ', '_')}.onnx"
                v = onnxcomp.validate(bench.path, dst, inputs=eval_feeds, latency=False)
                cells["budget_cos"] = min(o.cosine for o in v.outputs.values())
                if info.get("search"):
                    s = info["search"]
                    cells["auto"] = {"winner": s["winner"], "reason": s["reason"], "seconds": s["seconds"],
                                     "trials": len(s["trials"]), "recipe": info["recipe"]}
            rows.append(cells)
    return {"rows": rows, "metric_cols": [k for k, _, _ in bench.metric_cols], "lat_cols": list(bench.latency_feeds),
            "notes": bench.footnotes}


def _cells(row) -> dict[str, Any]:
    return {"error": row.error, "size": row.size_ratio, "latency": dict(row.latency), "metrics": dict(row.metrics),
            "build_s": row.build_s}


def _geo(lat: dict[str, float]) -> float:
    vals = [v for v in lat.values() if v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else math.inf


def print_model(name: str, res: dict[str, Any]) -> None:
    mcols, lcols = res["metric_cols"], res["lat_cols"]
    hdr = ["row", "budget cos"] + mcols + ["size"] + lcols + ["build s", "auto chose"]
    print(f"\n## {name}")
    print(" | ".join(hdr))
    print(" | ".join("---" for _ in hdr))
    for r in res["rows"]:
        if r["error"]:
            print(f"{r['row']} | n/a: {r['error']}")
            continue
        a = r.get("auto")
        chose = f"{a['winner']} ({'+'.join(a['recipe'])}; {a['trials']} trials, {a['seconds']:.0f} s)" if a else ""
        cells = [r["row"], f"{r.get('budget_cos', float('nan')):.5f}"]
        cells += [f"{r['metrics'].get(k, float('nan')):.4f}" for k in mcols]
        cells += [f"{r['size']:.3f}"] + [f"{r['latency'].get(c, float('nan')):.3f}" for c in lcols]
        cells += ["-" if r["build_s"] is None else f"{r['build_s']:.1f}", chose]
        print(" | ".join(cells))
    for note in res["notes"]:
        print(f"- {note}")
    met = [r for r in res["rows"] if not r["error"] and r["kind"] == "single" and r.get("budget_cos", 0) >= 0.99]
    for label, key in (("auto latency cos0.99", lambda r: _geo(r["latency"])), ("auto size cos0.99",
                                                                               lambda r: r["size"])):
        auto = next((r for r in res["rows"] if r["row"] == label and not r["error"]), None)
        if auto is None or not met:
            continue
        best = min(met, key=key)
        print(f"- {label}: {key(auto):.3f} (budget cos {auto['budget_cos']:.5f} on held-out data) vs best single "
              f"meeting cos 0.99 on held-out data, {best['row']}: {key(best):.3f}; noise floor (fp32 vs fp32) "
              f"{_geo(res['rows'][0]['latency']):.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=ALL_MODELS, default=ALL_MODELS)
    ap.add_argument("--budget-s", type=float, default=1.0, help="seconds of timing per latency column per row")
    ap.add_argument("--quick", action="store_true", help="fewer MiniLM evaluation/calibration sentences")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    facts, log = bq.start_run()
    out = {"machine": facts, "models": {}}
    for name in args.models:
        out["models"][name] = run_model(name, args, log)
        print_model(name, out["models"][name])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
