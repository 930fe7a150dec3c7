"""Mixed precision under an accuracy budget: back-off that first compresses layers less (4-bit weights at 8 bits;
static/dynamic layers as int8 weights with float activations), against back-off that can only leave layers
float (what it did before), on MiniLM-L3.

    python tools/bench_mixed_precision.py [--mode int4|static|dynamic] [--budgets 0.995 0.998]

Calibration on sentences 200-263, the budget checked on 264-295 (validation_data), the task metrics on
sentences 0-99 (100 sentences = 50 paraphrase pairs, seen by neither). Size and latency are the report's
(latency: the compressed model against the original in one interleaved run; the noise floor of that
measurement is the original against itself, printed first).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import onnxcomp  # noqa: E402
from onnxcomp import budget as budget_mod, testing  # noqa: E402


def _float_only(passes, records, only=None):
    """next_backoff as if no pass could compress a layer less: every chosen layer is left float."""
    plain = [dataclasses.replace(r, layers=[dataclasses.replace(lay, softer=None) for lay in r.layers])
             for r in records]
    return _real(passes, plain, only)


_real = budget_mod.next_backoff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["int4", "static", "dynamic"], default="int4")
    ap.add_argument("--budgets", type=float, nargs="+", default=None, help="default: 0.995 0.998 (int4), 0.9995")
    args = ap.parse_args()
    budgets = args.budgets or ([0.995, 0.998] if args.mode == "int4" else [0.9995])
    calib, valid = testing.minilm_feeds(64, start=200), testing.minilm_feeds(32, start=264)
    held = testing.minilm_feeds(100, start=0)
    ref = testing.minilm_embed(testing.minilm_path(), held)
    floor = onnxcomp.validate(testing.minilm_path(), testing.minilm_path(), inputs=valid, progress=False)
    print(f"noise floor (original vs itself): latency {floor.latency_ratio:.3f}")
    print(f"{'budget':>7s} {'back-off':12s} {'met':>4s} {'rounds':>6s} {'float':>5s} {'less':>5s} {'size':>6s} "
          f"{'latency':>7s} {'cos mean':>9s} {'cos min':>8s} {'pair top1':>9s} {'s':>5s}")
    q = ({"type": "quantize", "mode": "weight_only", "weight_dtype": "int4", "block_size": 32} if args.mode == "int4"
         else {"type": "quantize", "mode": args.mode})
    print(f"MiniLM-L3 {q}")
    for b in budgets:
        for label, nb in (("float only", _float_only), ("mixed", _real)):
            budget_mod.next_backoff = nb
            t = time.perf_counter()
            try:
                r = onnxcomp.compress(testing.minilm_path(), {"passes": [q], "accuracy_budget": {"cosine": b}},
                                      calibration_data=calib, validation_data=valid, progress=False)
            except onnxcomp.AccuracyBudgetError as e:
                r = e.result
            finally:
                budget_mod.next_backoff = _real
            sec = time.perf_counter() - t
            rounds = r.report.budget["backoff"]
            m = testing.minilm_metrics(ref, testing.minilm_embed(r.model, held))
            print(f"{b:7.4f} {label:12s} {str(r.report.budget['met']):>4s} {len(rounds):6d} "
                  f"{sum(len(x['left_float']) for x in rounds):5d} {sum(len(x['softened']) for x in rounds):5d} "
                  f"{r.report.size_ratio:6.3f} {r.report.validation.latency_ratio:7.3f} {m['cosine_mean']:9.5f} "
                  f"{m['cosine_min']:8.5f} {m['pair_top1']:9.3f} {sec:5.0f}")


if __name__ == "__main__":
    main()
