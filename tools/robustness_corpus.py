"""Run every pass mode over the ONNX models shipped inside the `onnx` package (backend-test corpus) and
classify each outcome: a valid model that loads in ORT, a typed onnxcomp error, or a crash (a bug).

    python tools/robustness_corpus.py [--modes cleanup dynamic weight_only static sparsify channel lowrank] [--limit N] [-v]

Never a traceback from deep inside a dependency, never a silently invalid model: every "crash" row is a bug.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import onnx  # noqa: E402

import onnxcomp  # noqa: E402
from onnxcomp import ir  # noqa: E402
from onnxcomp.data import generate_feeds, input_specs  # noqa: E402

RECIPES = {
    "cleanup": ["cleanup"],
    "dynamic": [{"type": "quantize", "mode": "dynamic", "min_weight_elements": 0}],
    "weight_only": [{"type": "quantize", "mode": "weight_only", "min_weight_elements": 0}],
    "static": [{"type": "quantize", "mode": "static", "min_weight_elements": 0}],
    "sparsify": [{"type": "sparsify", "method": "sparsegpt", "pattern": "2:4", "min_weight_elements": 0}],
    "channel": [{"type": "sparsify", "method": "sparsegpt", "pattern": "channel", "sparsity": 0.5}],
    "lowrank": [{"type": "lowrank", "params_ratio": 0.5, "min_weight_elements": 0, "speed_check": False}],
}
#: modes whose passes read calibration data (generated valid feeds are given)
DATA_MODES = ("static", "sparsify", "channel", "lowrank")


def corpus() -> list[Path]:
    base = Path(onnx.__file__).parent / "backend" / "test" / "data"
    return sorted(p for p in base.rglob("*.onnx") if "_output_" not in p.name and "input_" not in p.name)


def run_one(path: Path, mode: str) -> tuple[str, str]:
    try:
        proto = ir.load_proto(path)
        feeds = generate_feeds(proto, input_specs(proto), n=4) if mode in DATA_MODES else None
        res = onnxcomp.compress(path, RECIPES[mode], calibration_data=feeds, progress=False, validate=False)
        onnx.checker.check_model(res.model, full_check=True)
        onnxcomp.validate(proto, res.model, inputs=feeds, latency=False)  # both load and run in ORT
        status = [p.status for p in res.report.passes]
        rolled = any(s != "ok" for s in status)
        return ("rolled back" if rolled else "ok"), "; ".join(s for s in status if s != "ok")[:200]
    except onnxcomp.OnnxCompError as e:
        return f"typed:{type(e).__name__}", str(e).splitlines()[0][:200]
    except Exception as e:  # a bug: should have been a typed error or a valid model
        return "CRASH", f"{type(e).__name__}: {e}".splitlines()[0][:200] + "\n" + traceback.format_exc(limit=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=list(RECIPES))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    models = corpus()[: args.limit]
    print(f"{len(models)} models from the onnx package's backend-test data")
    for mode in args.modes:
        counts: collections.Counter = collections.Counter()
        crashes = []
        for p in models:
            kind, msg = run_one(p, mode)
            counts[kind.split(":")[0] if kind.startswith("typed") else kind] += 1
            if kind == "CRASH" or (args.verbose and kind != "ok"):
                crashes.append((p.relative_to(p.parents[2]), kind, msg))
        print(f"{mode:12s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for name, kind, msg in crashes:
            print(f"    {kind:24s} {name}: {msg}")


if __name__ == "__main__":
    main()
