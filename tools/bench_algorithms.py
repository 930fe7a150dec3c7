"""Accuracy-recovery algorithms side by side on the digits models: held-out logit error and top-1 per quantize setting.

    python tools/bench_algorithms.py [--models digits_mlp digits_cnn]

Rows switch one algorithm at a time against the defaults (GPTQ-or-nearest rounding per layer, bias correction,
cross-layer equalization chosen on calibration data): rtn rounding, bias correction off, CLE forced on/off,
per-tensor weights, 4-bit weights (every Gemm, and the Convs). Calibration: the 200 x_calib images; metrics on
the 500 x_test images: relative L2 error of the logits against fp32 and top-1. Accuracy only (no timing: the
digits models run in microseconds; tools/bench_quantize.py times the same recipes).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import onnxcomp  # noqa: E402
from onnxcomp import testing  # noqa: E402

_W4 = {"mode": "weight_only", "weight_dtype": "int4", "block_size": 32, "min_weight_elements": 0}
ROWS: dict[str, dict] = {
    "static (defaults)": {"mode": "static"},
    "static rtn": {"mode": "static", "algorithm": "rtn"},
    "static no bias correction": {"mode": "static", "bias_correction": False},
    "static rtn, no bias correction": {"mode": "static", "algorithm": "rtn", "bias_correction": False},
    "static CLE on": {"mode": "static", "equalize": True},
    "static CLE off": {"mode": "static", "equalize": False},
    "static per-tensor, rtn, no bc, CLE off": {"mode": "static", "per_channel": False, "algorithm": "rtn",
                                               "bias_correction": False, "equalize": False},
    "static per-tensor, rtn, no bc, CLE on": {"mode": "static", "per_channel": False, "algorithm": "rtn",
                                              "bias_correction": False, "equalize": True},
    "int4 weights (Gemm/MatMul), defaults": dict(_W4),
    "int4 weights, rtn": dict(_W4, algorithm="rtn"),
    "int4 weights, rtn, CLE off": dict(_W4, algorithm="rtn", equalize=False),
    "int4 weights, rtn, no bc, CLE off": dict(_W4, algorithm="rtn", bias_correction=False, equalize=False),
    "int4 weights incl. Conv, defaults": dict(_W4, ops=["Conv", "Gemm", "MatMul"]),
    "int4 weights incl. Conv, rtn, no bc, CLE off": dict(_W4, ops=["Conv", "Gemm", "MatMul"], algorithm="rtn",
                                                        bias_correction=False, equalize=False),
    "int4 weights incl. Conv, rtn": dict(_W4, ops=["Conv", "Gemm", "MatMul"], algorithm="rtn"),
    "static gptq (Convs too)": {"mode": "static", "algorithm": "gptq"},
    "static adaround (Convs too)": {"mode": "static", "algorithm": "adaround"},
    "int4 weights, gptq": dict(_W4, algorithm="gptq"),
    "int4 weights, adaround": dict(_W4, algorithm="adaround"),
    "int4 weights, awq": dict(_W4, algorithm="awq"),
    "int4 weights incl. Conv, gptq": dict(_W4, ops=["Conv", "Gemm", "MatMul"], algorithm="gptq"),
    "int4 weights incl. Conv, adaround": dict(_W4, ops=["Conv", "Gemm", "MatMul"], algorithm="adaround"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits_mlp", "digits_cnn"], choices=["digits_mlp", "digits_cnn"])
    ap.add_argument("--rows", nargs="+", default=None, help="only the rows whose label contains one of these")
    args = ap.parse_args()
    d = testing.digits_data()
    for name in args.models:
        path = str(testing.digits_mlp_path() if name == "digits_mlp" else testing.digits_cnn_path())
        shape = (64,) if name == "digits_mlp" else (1, 8, 8)
        calib = [{"input": d["x_calib"][i:i + 1].reshape(1, *shape).astype(np.float32)} for i in range(200)]
        x = {"input": d["x_test"].reshape(len(d["x_test"]), *shape).astype(np.float32)}
        ref = testing.session(path).run(None, x)[0]
        fp32 = testing.digits_top1(path, d["x_test"], d["y_test"])
        print(f"\n## {name} (fp32 top-1 {fp32:.3f})")
        print(f"{'recipe':46s} {'size':>6s} {'logit err':>10s} {'top-1':>6s}  choices")
        for label, q in ROWS.items():
            if args.rows and not any(r in label for r in args.rows):
                continue
            if name == "digits_mlp" and "Conv" in (q.get("ops") or ()):
                continue
            res = onnxcomp.compress(path, {"passes": [{"type": "quantize", **q}]}, calibration_data=calib,
                                    validate=False, progress=False)
            out = testing.session(res.model).run(None, x)[0]
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            det = res.report.passes[0].details
            rounding = det.get("rounding", {})
            notes = [f"gptq {rounding.get('gptq', 0)}/adaround {rounding.get('adaround', 0)}/rtn {rounding.get('rtn', 0)}"
                     if rounding else "rtn",
                     f"bc {det.get('bias_correction', {}).get('layers', 0)}",
                     f"CLE {'on' if det.get('equalized') else 'off'}"]
            print(f"{label:46s} {res.report.size_ratio:6.3f} {err:10.4f} "
                  f"{testing.digits_top1(res.model, d['x_test'], d['y_test']):6.3f}  {', '.join(notes)}")


if __name__ == "__main__":
    main()
