"""The robustness corpus: the ONNX models shipped in the `onnx` package (backend-test data), and the outcome of one
compression of one model: a valid model that loads and runs in ORT, a typed onnxcomp error, or a crash (a bug).
Used by tests/test_robustness.py and tools/robustness_corpus.py."""
from __future__ import annotations

import traceback
from pathlib import Path

import onnx

import onnxcomp
from onnxcomp import ir
from onnxcomp.data import generate_feeds, input_specs

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


def key(path: Path) -> str:
    """A corpus model's stable name (its test folder)."""
    return path.name if path.name != "model.onnx" else path.parent.name
