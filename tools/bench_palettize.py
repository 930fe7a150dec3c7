"""Palettization benchmark: bits x weighting x group size (and the sensitivity allocation) -> task metric, file
size, latency and session-creation time vs fp32.

    python tools/bench_palettize.py [--models minilm digits_cnn digits_mlp] [--bits 8 6 4 3]
        [--weightings none activation] [--groups 0 16] [--scales default off channel block32] [--allocation 4 5]
        [--quick] [--json out.json]

Models, metrics, latency columns and calibration/evaluation splits are those of tools/bench_quantize.py (same
ModelBench and Runner): MiniLM-L3 embedding cosine vs fp32 on sentences it was not calibrated on; digits CNN/MLP
top-1 on the test images. Rows with `alloc` are `allocation: sensitivity` at the size `bits` would take on every
weight (bits per weight chosen by measured output error); the others are `allocation: uniform`. group 0 = one
codebook per tensor. `--scales`: `default` (the pass's defaults: float16 scale per output channel, and per 32
inputs at <= 4 bits), `off` (channel_scale false: the codebook holds the weights themselves), `channel` (block_size
0), `blockN` (block_size N). `create` = median session-creation time (ORT folds the decode there) / fp32's, over
`--creates` alternating pairs; `load MB` = peak RSS of a fresh process that creates the session (the folded
weights are float in memory either way). The fp32 row is a second session against the first: the noise floor. Ratios come
from one run on one machine; compare rows within a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import onnxruntime as ort  # noqa: E402

import onnxcomp  # noqa: E402
from onnxcomp import testing  # noqa: E402

import bench_quantize as bq  # noqa: E402

ALL_MODELS = ["minilm", "digits_cnn", "digits_mlp", "decoder"]


def _create_ratio(ref: Path, cand: Path, pairs: int) -> tuple[float, float]:
    """(median candidate / fp32 session-creation time, fp32 median ms), alternating the two."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    a, b = [], []
    for _ in range(pairs):
        for path, out in ((ref, a), (cand, b)):
            t = time.perf_counter()
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            out.append(time.perf_counter() - t)
    return statistics.median(b) / statistics.median(a), 1e3 * statistics.median(a)


def _load_peak_mb(path: Path) -> float:
    """Peak RSS (MB) of a fresh process that imports onnxruntime and creates a session on `path`."""
    # VmHWM (this process image's peak), not ru_maxrss: Linux carries the parent's peak into ru_maxrss of a child
    code = ("import onnxruntime as ort; o = ort.SessionOptions(); o.log_severity_level = 3; "
            f"ort.InferenceSession({str(path)!r}, o, providers=['CPUExecutionProvider']); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def _scale_options(scale: str) -> dict:
    """The palettize options of one `--scales` value."""
    if scale == "default":
        return {}
    if scale == "off":
        return {"channel_scale": False}
    if scale == "channel":
        return {"channel_scale": True, "block_size": 0}
    if scale.startswith("block") and scale[5:].isdigit():
        return {"channel_scale": True, "block_size": int(scale[5:])}
    raise SystemExit(f"--scales: {scale!r} is not default, off, channel or blockN")


def _recipes(bits, weightings, groups, scales, alloc) -> list[tuple[str, dict]]:
    out = []
    tags = {sc: "" if scales == ["default"] else f", {sc}" for sc in scales}  # labels name the scales when varied
    for b in bits:
        for w in weightings:
            for g in groups:
                for sc in scales:
                    out.append((f"{b} bits, {w}, group {g}{tags[sc]}",
                                {"type": "palettize", "bits": b, "weighting": w, "group_size": g or None,
                                 "allocation": "uniform", **_scale_options(sc)}))
    for b in alloc:
        for sc in scales:
            out.append((f"{b} bits alloc, activation, group 0{tags[sc]}",
                        {"type": "palettize", "bits": b, "weighting": "activation", "allocation": "sensitivity",
                         **_scale_options(sc)}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=ALL_MODELS, default=ALL_MODELS)
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4, 3])
    ap.add_argument("--weightings", nargs="+", default=["none", "activation"])
    ap.add_argument("--groups", nargs="+", type=int, default=[0, 16], help="output channels per codebook (0: tensor)")
    ap.add_argument("--scales", nargs="+", default=["default"],
                    help="default | off | channel | blockN (scales per output channel / and N inputs)")
    ap.add_argument("--allocation", nargs="*", type=int, default=[4, 5],
                    help="bits of the rows with allocation: sensitivity")
    ap.add_argument("--creates", type=int, default=5, help="session-creation pairs timed per row")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per latency column per row")
    ap.add_argument("--quick", action="store_true", help="40 MiniLM evaluation sentences, fewer timed runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    facts, log = bq.start_run()
    report: dict[str, Any] = {"machine": facts, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-palettize-") as tmp:
        for name in args.models:
            bench = bq.model_bench(name, args.quick, testing.session)
            runner = bq.Runner(bench, Path(tmp), testing.session, args.budget, log)
            lat_cols = list(bench.latency_feeds)
            base = runner.fp32()
            rows = [("fp32", base, _create_ratio(bench.path, bench.path, args.creates))]
            peak = {"fp32": _load_peak_mb(bench.path)}
            for label, p in _recipes(args.bits, args.weightings, args.groups, args.scales, args.allocation):
                log(f" {name}: {label}")

                def build(dst: str, p=p) -> None:
                    res = onnxcomp.compress(str(bench.path), [p], calibration_data=bench.calib_oc, progress=False,
                                            validate=False)
                    if res.report.passes[0].status != "ok":
                        raise RuntimeError(res.report.passes[0].status)
                    res.save(dst)

                row = runner.build_and_measure(label.replace(" ", "").replace(",", "_"), build)
                path = Path(tmp) / f"{bench.name}.{label.replace(' ', '').replace(',', '_')}.onnx"
                create = None if row.error else _create_ratio(bench.path, path, args.creates)
                if not row.error:
                    peak[label] = _load_peak_mb(path)
                rows.append((label, row, create))
            print(f"\n## {name} ({bench.path.name}, {os.path.getsize(bench.path) / 1e6:.2f} MB fp32)")
            mcols = [(k, h, f) for k, h, f in bench.metric_cols if k in ("cosine_mean", "cosine_min", "top1",
                                                                         "top1_delta_pt", "top1_agreement",
                                                                         "bpb_ratio")]
            hdr = ["recipe"] + [h for _, h, _ in mcols] + ["size"] + lat_cols + ["create", "load MB", "build s"]
            print(" | ".join(hdr))
            print(" | ".join("---" for _ in hdr))
            out_rows = []
            for label, row, create in rows:
                if row.error:
                    print(f"{label} | n/a: {row.error}")
                    out_rows.append({"recipe": label, "error": row.error})
                    continue
                cells = [label] + [bq._fmt(row.metrics.get(k), f) for k, _, f in mcols]
                cells += [bq._fmt(row.size_ratio, "{:.3f}")]
                cells += [bq._fmt(row.latency.get(c), "{:.3f}") for c in lat_cols]
                cells += [bq._fmt(create[0] if create else None, "{:.2f}"), f"{peak[label]:.0f}",
                          bq._fmt(row.build_s, "{:.1f}")]
                print(" | ".join(cells))
                out_rows.append({"recipe": label, **row.to_dict(), "create_ratio": create[0] if create else None,
                                 "fp32_create_ms": create[1] if create else None, "load_peak_mb": peak[label]})
            for note in bench.footnotes:
                print(f"- {note}")
            print(f"- fp32 session creation: {rows[0][2][1]:.1f} ms (median of {args.creates})")
            report["models"][name] = out_rows
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
