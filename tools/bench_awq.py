"""AWQ side by side on 4-bit weight-only MatMuls: MiniLM-L3 embedding cosine and the decoder's next-byte agreement
on data calibration never saw, for nearest rounding, AWQ (scales + nearest), auto without AWQ, auto.

    python tools/bench_awq.py [--models minilm decoder] [--block-size 32]

MiniLM-L3: calibrated on sentences 200..263, cosine to fp32 on sentences 0..199. Decoder: 64 calibration
windows, metrics on the held-out windows. "auto without AWQ" raises quantize.AWQ_MIN_GAIN so that no scale is kept
(the default auto keeps an input's scales where GPTQ's error drops >= 5%). Accuracy only; latency of the extra Muls:
time the two int4 models with onnxcomp.validate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import onnxcomp  # noqa: E402
import onnxcomp.passes.quantize as quantize  # noqa: E402
from onnxcomp import testing  # noqa: E402

VARIANTS = ("rtn", "awq", "auto without AWQ", "auto")


def _compress(path, calib, variant: str, block: int, extra: dict):
    default_gain = quantize.AWQ_MIN_GAIN
    quantize.AWQ_MIN_GAIN = 10.0 if variant == "auto without AWQ" else default_gain
    try:
        alg = "auto" if variant.startswith("auto") else variant
        spec = {"type": "quantize", "mode": "weight_only", "weight_dtype": "int4", "block_size": block,
                "algorithm": alg, **extra}
        t0 = time.perf_counter()
        res = onnxcomp.compress(path, [spec], calibration_data=calib, progress=False, validate=False)
        return res, time.perf_counter() - t0
    finally:
        quantize.AWQ_MIN_GAIN = default_gain


def _scaled(res) -> str:
    rows = res.report.passes[0].details.get("awq", {}).get("inputs", [])
    return f"{sum(r['used'] for r in rows)} of {len(rows)}" if rows else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "decoder"], choices=["minilm", "decoder"])
    ap.add_argument("--block-size", type=int, default=32)
    args = ap.parse_args()
    if "minilm" in args.models:
        calib, evalf = testing.minilm_feeds(64, start=200), testing.minilm_feeds(200, start=0)
        ref = testing.minilm_embed(testing.minilm_path(), evalf)
        print("\n## MiniLM-L3 int4 weight-only (cosine to fp32, sentences 0..199)")
        print(f"{'variant':18s} {'cos mean':>9s} {'cos min':>9s} {'scaled':>9s} {'seconds':>8s}")
        for v in VARIANTS:
            res, dt = _compress(testing.minilm_path(), calib, v, args.block_size, {})
            m = testing.minilm_metrics(ref, testing.minilm_embed(res.model, evalf))
            print(f"{v:18s} {m['cosine_mean']:9.5f} {m['cosine_min']:9.5f} {_scaled(res):>9s} {dt:8.1f}", flush=True)
    if "decoder" in args.models:
        calib = testing.decoder_feeds(testing.decoder_windows("calib", 64), batch_size=8)
        ev = testing.decoder_windows("eval", 64)
        evf = testing.decoder_feeds(ev, batch_size=8)
        ref = testing.decoder_logits(testing.decoder_path(), evf)
        print("\n## decoder int4 weight-only (next-byte top-1 agreement with fp32, bits-per-byte ratio)")
        print(f"{'variant':18s} {'agree':>7s} {'bpb ratio':>10s} {'scaled':>9s} {'seconds':>8s}")
        for v in VARIANTS:
            res, dt = _compress(testing.decoder_path(), calib, v, args.block_size, {"min_weight_elements": 0})
            m = testing.decoder_metrics(ref, testing.decoder_logits(res.model, evf), ev)
            print(f"{v:18s} {m['top1_agreement']:7.4f} {m['bpb_ratio']:10.4f} {_scaled(res):>9s} {dt:8.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
