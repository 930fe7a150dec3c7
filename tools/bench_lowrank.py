"""Low-rank benchmark: the `lowrank` pass, method (plain / whitened SVD) x budget, on the fixtures, in one run.

    python tools/bench_lowrank.py [--models minilm digits_mlp digits_cnn] [--rows ROW ...] [--calib N]
                                  [--latency-s S] [--speed-check] [--json out.json]

One table per model. Rows = method x budget; columns = task metric, parameter ratio of the candidate layers
(every MatMul/Gemm/Conv the pass may factorize), file size ratio and latency ratio vs fp32, pass time:

* MiniLM-L3: sentence-embedding cosine mean/min vs fp32 (``testing.minilm_metrics``) on the first 200
  sentences, batch 1 unpadded; calibration = the next ``--calib`` sentences (default 128).
* digits MLP / CNN: top-1 on the 500 test images (fp32 in the header); calibration = the 200 calibration images.

Budgets: ``p0.75``/``p0.5`` = params_ratio per layer (allocation uniform), ``e0.9``/``e0.99`` = energy
(whitened spectrum for whitened rows), ``err0.2`` = error_budget (layer output rel. L2 error <= 0.2),
``sens-p0.5``/``sens-p0.75`` = params_ratio spread by measured end-to-end sensitivity (whitened only),
``+s`` = with the pass's speed check on, ``+q`` = followed by ``quantize mode: dynamic``; ``q-only`` is
``quantize mode: dynamic`` alone.

Latency: ``onnxcomp.runtime.measure_latency`` (interleaved with fp32 in this process, medians),
batch 1: ``lat`` on 32 evaluation sentences unpadded (digits: 32 single images), ``lat128`` (MiniLM) on 32
sentences padded to 128 tokens; sessions with ``--threads`` intra-op threads (default 1). The pass's own speed check (skip layers whose factorized pair is not
faster) is off unless ``--speed-check``: it times tiny models and is noisy on a loaded machine. Ratios come from
one run on one machine: compare rows within a table, not across machines.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's SVDs: 2-thread OpenBLAS thrashes on a busy 2-core box

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import onnxcomp  # noqa: E402
from onnxcomp import testing  # noqa: E402
from onnxcomp.runtime import measure_latency  # noqa: E402

BUDGETS: dict[str, dict[str, Any]] = {
    "p0.75": {"params_ratio": 0.75, "allocation": "uniform"},
    "p0.5": {"params_ratio": 0.5, "allocation": "uniform"},
    "e0.9": {"energy": 0.9},
    "e0.99": {"energy": 0.99},
    "err0.2": {"error_budget": 0.2},
    "sens-p0.75": {"params_ratio": 0.75, "allocation": "sensitivity"},
    "sens-p0.5": {"params_ratio": 0.5, "allocation": "sensitivity"},
}
DEFAULT_ROWS = ([f"{m}/{b}" for m in ("plain", "whitened") for b in ("p0.75", "p0.5", "e0.9", "e0.99", "err0.2")]
                + ["whitened/sens-p0.75", "whitened/sens-p0.5", "q-only", "whitened/sens-p0.75+q"])


def recipe_for(row: str, speed_check: bool) -> list[dict[str, Any]]:
    if row == "q-only":
        return [{"type": "quantize", "mode": "dynamic"}]
    quant = row.endswith("+q")
    base = row.removesuffix("+q")
    speed_check = speed_check or base.endswith("+s")
    method, budget = base.removesuffix("+s").split("/")
    lr = {"type": "lowrank", "whiten": method == "whitened", "speed_check": speed_check, **BUDGETS[budget]}
    return [lr] + ([{"type": "quantize", "mode": "dynamic"}] if quant else [])


def minilm_setup(n_calib: int):
    path = testing.minilm_path()
    ev = testing.minilm_feeds(200)
    calib = testing.minilm_feeds(n_calib, start=200)
    ref = testing.minilm_embed(path, ev)

    def evaluate(model) -> dict[str, float]:
        m = testing.minilm_metrics(ref, testing.minilm_embed(model, ev))
        return {"cos_mean": m["cosine_mean"], "cos_min": m["cosine_min"]}

    lat = {"lat": ev[:32], "lat128": testing.minilm_feeds(32, pad_to=128)}
    return path, calib, lat, evaluate, "cosine mean / min"


def digits_setup(kind: str):
    path = testing.digits_mlp_path() if kind == "digits_mlp" else testing.digits_cnn_path()
    d = testing.digits_data()
    key = "x_calib_flat" if kind == "digits_mlp" else "x_calib"
    calib = [{"input": d[key][i:i + 20].astype(np.float32)} for i in range(0, len(d[key]), 20)]
    lat = {"lat": [{"input": d[key][i:i + 1].astype(np.float32)} for i in range(32)]}
    base = testing.digits_top1(path, d["x_test"], d["y_test"])

    def evaluate(model) -> dict[str, float]:
        return {"top1": testing.digits_top1(model, d["x_test"], d["y_test"]), "fp32_top1": base}

    return path, calib, lat, evaluate, f"top-1 (fp32 {base:.3f})"


def make_session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_row(path: Path, row: str, calib, lat_feeds, evaluate: Callable, tmp: Path, speed_check: bool,
            latency_s: float, threads: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        res = onnxcomp.compress(path, recipe_for(row, speed_check), calibration_data=calib, progress=False,
                                validate=False)
    except onnxcomp.OnnxCompError as e:
        return {"row": row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    secs = time.perf_counter() - t0
    out = tmp / (row.replace("/", "_") + ".onnx")
    res.save(out)
    lr = next((r for r in res.report.passes if r.name == "lowrank"), None)
    d = lr.details if lr is not None else {}
    ref_s, cand_s = make_session(path, threads), make_session(out, threads)
    lats = {k: measure_latency(ref_s, cand_s, f, warmup=3, time_budget_s=latency_s).ratio for k, f in lat_feeds.items()}
    return {"row": row, **evaluate(cand_s), "params_ratio": d.get("params_ratio_candidates"),
            "layers": len(d.get("layers", [])), "size_ratio": os.path.getsize(out) / os.path.getsize(path),
            **lats, "pass_s": secs, "status": lr.status if lr is not None else "ok"}


def fmt(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['row']:<22} | n/a: {r['error']} |"
    metric = (f"{r['cos_mean']:.4f} / {r['cos_min']:.3f}" if "cos_mean" in r else f"{r['top1']:.3f}")
    pr = "-" if r["params_ratio"] is None else f"{r['params_ratio']:.3f}"
    lat = " | ".join(f"{r[k]:.3f}" for k in ("lat", "lat128") if k in r)
    return (f"| {r['row']:<22} | {metric:>15} | {pr:>6} | {r['layers']:>3} | {r['size_ratio']:.3f} | {lat} | "
            f"{r['pass_s']:6.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "digits_mlp", "digits_cnn"],
                    choices=["minilm", "digits_mlp", "digits_cnn"])
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="method/budget[+q] names, or q-only")
    ap.add_argument("--calib", type=int, default=128, help="MiniLM calibration sentences")
    ap.add_argument("--latency-s", type=float, default=4.0, help="time budget of each latency measurement")
    ap.add_argument("--threads", type=int, default=1,
                    help="ORT intra-op threads of the timed sessions (0 = ORT default; 1 is steadier on a busy box)")
    ap.add_argument("--speed-check", action="store_true", help="keep the pass's per-layer speed check on")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lowrank-") as tmp:
        for name in args.models:
            try:
                path, calib, lat, evaluate, header = (minilm_setup(args.calib) if name == "minilm"
                                                      else digits_setup(name))
            except testing.FixtureUnavailable as e:
                print(f"\n## {name}: skipped ({e})")
                continue
            print(f"\n## {name}  ({path.name}; metric: {header})", flush=True)
            l128 = " lat128 |" if "lat128" in lat else ""
            print(f"| row                    |          metric | params | lyr | size  | lat   |{l128} pass s |")
            print(f"|------------------------|-----------------|--------|-----|-------|-------|{'-------|' if l128 else ''}"
                  "--------|", flush=True)
            rows = []
            for row in args.rows:
                r = run_row(path, row, calib, lat, evaluate, Path(tmp), args.speed_check, args.latency_s,
                            args.threads)
                rows.append(r)
                print(fmt(r), flush=True)
            results[name] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
