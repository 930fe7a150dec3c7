"""Sparsification benchmark: pattern x criterion x sparsity -> task metric, file/gzip size and latency vs fp32.

    python tools/bench_sparsify.py [--models minilm digits_cnn digits_mlp] [--patterns unstructured 2:4 block
        channel] [--methods magnitude wanda sparsegpt] [--sparsities 0.3 0.5 0.7] [--sensitivity]
        [--calib N] [--budget S] [--quick] [--json out.json]

Models, metrics, latency and calibration/evaluation splits are those of tools/bench_quantize.py (same
ModelBench and Runner): MiniLM-L3 embedding cosine vs fp32 and the paraphrase pair_top1; digits CNN/MLP top-1;
the Llama-style byte decoder's next-byte top-1 agreement and bits per byte on held-out text.
Columns: size = file bytes / fp32 file; gzip = gzip-compressed bytes / gzip of the fp32 file (what the zeros
are worth on disk); latency ratios vs fp32 measured interleaved in this process; sparsity = achieved over the
pruned weights. N:M rows take the sparsity the pattern implies (2:4 -> 0.5); block rows use 1x4 tiles.
`--sensitivity` adds sparsegpt rows with `allocation: sensitivity`. `channel` rows need
onnxcomp/algorithms/channels.py. Ratios come from one run on one machine; compare rows within a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import onnxcomp  # noqa: E402
from onnxcomp import testing  # noqa: E402

import bench_quantize as bq  # noqa: E402

ALL_MODELS = ["minilm", "minilm_fused", "digits_cnn", "digits_mlp", "decoder"]


def _gzip(path: str | os.PathLike) -> int:
    return len(zlib.compress(Path(path).read_bytes(), 6))


def _recipes(patterns, methods, sparsities, sensitivity, heads=None, hidden=(), head_units=("query",)
             ) -> list[tuple[str, str, float, dict]]:
    out = []
    for pat in patterns:
        levels = [0.5] if ":" in pat else sparsities
        for m in methods:
            for s in levels:
                p: dict[str, Any] = {"type": "sparsify", "method": m, "pattern": pat}
                if ":" not in pat:
                    p["sparsity"] = s
                if pat == "block":
                    p["block"] = [1, 4]
                out.append((pat, m, s, p))
        if sensitivity and pat in ("unstructured", "block", "channel"):
            for s in levels:
                p = {"type": "sparsify", "method": "sparsegpt", "pattern": pat, "sparsity": s,
                     "allocation": "sensitivity"}
                if pat == "block":
                    p["block"] = [1, 4]
                out.append((pat, "sparsegpt+sens", s, p))
        if heads and pat == "channel":  # attention heads too (uniform fraction, and in the sensitivity budget)
            for unit in head_units:
                tag, hu = (f"heads{heads:g}", {}) if unit == "query" else (f"{unit}heads{heads:g}", {"head_unit": unit})
                for s in [0.0, *levels]:
                    out.append((pat, f"sparsegpt+{tag}+uniform", s,
                                {"type": "sparsify", "method": "sparsegpt", "pattern": pat, "sparsity": s,
                                 "heads": heads, "allocation": "uniform", **hu}))
                for s in levels:
                    out.append((pat, f"sparsegpt+{tag}", s, {"type": "sparsify", "method": "sparsegpt",
                                                            "pattern": pat, "sparsity": s, "heads": heads, **hu}))
                    if sensitivity:
                        out.append((pat, f"sparsegpt+sens+{tag}", s,
                                    {"type": "sparsify", "method": "sparsegpt", "pattern": pat, "sparsity": s,
                                     "heads": heads, "allocation": "sensitivity", **hu}))
        if hidden and pat == "channel":  # residual-stream slicing alone, then with the channel levels
            for hd in hidden:
                out.append((pat, f"hidden{hd:g}", 0.0, {"type": "sparsify", "method": "sparsegpt", "pattern": pat,
                                                        "sparsity": 0.0, "hidden": hd, "allocation": "uniform"}))
                for s in levels:
                    out.append((pat, f"sparsegpt+hidden{hd:g}", s, {"type": "sparsify", "method": "sparsegpt",
                                                                    "pattern": pat, "sparsity": s, "hidden": hd}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=ALL_MODELS, default=ALL_MODELS)
    ap.add_argument("--patterns", nargs="+", default=["unstructured", "2:4", "block", "channel"])
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--sensitivity", action="store_true", help="add sparsegpt rows with allocation: sensitivity")
    ap.add_argument("--heads", type=float, default=None,
                    help="channel rows that also remove this fraction of attention heads")
    ap.add_argument("--head-units", nargs="+", choices=["query", "kv"], default=["query"],
                    help="with --heads: grouped-query blocks lose query heads alike per KV group, or whole KV groups")
    ap.add_argument("--hidden", type=float, nargs="+", default=[],
                    help="channel rows that also slice this fraction of the residual stream (RMSNorm models)")
    ap.add_argument("--calib", type=int, default=128, help="MiniLM calibration sentences (from sentence 200)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per latency column per row")
    ap.add_argument("--quick", action="store_true", help="40 MiniLM evaluation sentences, fewer timed runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if "channel" in args.patterns:
        import importlib.util

        if importlib.util.find_spec("onnxcomp.algorithms.channels") is None:
            print("note: pattern 'channel' skipped (onnxcomp/algorithms/channels.py not present)")
            args.patterns = [p for p in args.patterns if p != "channel"]
    t_start = time.perf_counter()
    facts, log = bq.start_run()
    report: dict[str, Any] = {"machine": facts, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-sparsify-") as tmp:
        for name in args.models:
            bench = bq.model_bench(name, args.quick, testing.session)
            if name in ("minilm", "minilm_fused"):
                bench.calib_oc = testing.minilm_feeds(args.calib, start=200)
            runner = bq.Runner(bench, Path(tmp), testing.session, args.budget, log)
            fp32_gzip = _gzip(bench.path)
            lat_cols = list(bench.latency_feeds)
            rows = []
            base = runner.fp32()
            rows.append(("fp32", "-", 0.0, base, 1.0, None))
            for pat, meth, s, p in _recipes(args.patterns, args.methods, args.sparsities, args.sensitivity, args.heads,
                                            args.hidden, args.head_units):
                log(f" {name}: {pat} {meth} {s}")
                info: dict[str, Any] = {}

                def build(dst: str, p=p, info=info) -> None:
                    res = onnxcomp.compress(str(bench.path), [p], calibration_data=bench.calib_oc, progress=False,
                                            validate=False)
                    rec = res.report.passes[0]
                    if rec.status != "ok":
                        raise RuntimeError(rec.status)
                    info["sparsity"] = rec.details.get("sparsity")
                    res.save(dst)

                label = f"{pat.replace(':', 'of')}_{meth}_{s:g}"
                row = runner.build_and_measure(label, build)
                gz = None if row.error else _gzip(Path(tmp) / f"{bench.name}.{label}.onnx")
                rows.append((pat, meth, s, row, gz, info.get("sparsity")))
            print(f"\n## {name} ({bench.path.name}, {os.path.getsize(bench.path) / 1e6:.2f} MB fp32)")
            mcols = [(k, h, f) for k, h, f in bench.metric_cols if k in ("cosine_mean", "cosine_min", "pair_top1",
                                                                         "top1", "top1_delta_pt", "top1_agreement",
                                                                         "bits_per_byte", "bpb_ratio")]
            hdr = ["pattern", "method", "target", "achieved"] + [h for _, h, _ in mcols] + ["size", "gzip"] + \
                lat_cols + ["build s"]
            print(" | ".join(hdr))
            print(" | ".join("---" for _ in hdr))
            out_rows = []
            for pat, meth, s, row, gz, ach in rows:
                if row.error:
                    print(f"{pat} | {meth} | {s:g} | n/a: {row.error}")
                    out_rows.append({"pattern": pat, "method": meth, "target": s, "error": row.error})
                    continue
                gzr = gz / fp32_gzip if isinstance(gz, int) else gz
                cells = [pat, meth, f"{s:g}", bq._fmt(ach, "{:.3f}")]
                cells += [bq._fmt(row.metrics.get(k), f) for k, _, f in mcols]
                cells += [bq._fmt(row.size_ratio, "{:.3f}"), bq._fmt(gzr, "{:.3f}")]
                cells += [bq._fmt(row.latency.get(c), "{:.2f}") for c in lat_cols]
                cells += [bq._fmt(row.build_s, "{:.1f}")]
                print(" | ".join(cells))
                out_rows.append({"pattern": pat, "method": meth, "target": s, "achieved": ach, "gzip_ratio": gzr,
                                 **row.to_dict()})
            for fn in bench.footnotes:
                if name in ("minilm", "minilm_fused") and fn.startswith("calibration:"):
                    fn = f"calibration: sentences 200..{199 + len(bench.calib_oc)}, unpadded (--calib)"
                print(f"- {fn}")
            sys.stdout.flush()
            report["models"][name] = out_rows
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
