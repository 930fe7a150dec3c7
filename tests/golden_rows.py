"""The golden-hash rows: each bench recipe on each fixture, and the SHA-256 of the model it compresses to.
Used by tests/test_golden.py and tools/golden_hashes.py (which records them)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

import onnxcomp
from onnxcomp import testing

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "compress_hashes.json"

_Q = "quantize"
_S = "sparsify"
#: (row name, models, recipe, fast?) — the bench recipes of bench_quantize/bench_sparsify/bench_lowrank
ROWS: list[tuple[str, tuple[str, ...], Any, bool]] = [
    ("default", ("minilm", "digits_cnn", "digits_mlp"), None, True),
    ("cleanup", ("minilm", "digits_cnn", "digits_mlp"), [{"type": "cleanup"}], True),
    ("q_dynamic", ("minilm", "digits_cnn", "digits_mlp"), [{"type": _Q, "mode": "dynamic"}], True),
    ("q_dynamic_rtn", ("minilm", "digits_cnn"), [{"type": _Q, "mode": "dynamic", "algorithm": "rtn"}], True),
    ("q_static", ("digits_cnn", "digits_mlp"), [{"type": _Q, "mode": "static"}], True),
    ("q_static", ("minilm",), [{"type": _Q, "mode": "static"}], False),
    ("q_static_no_smooth", ("minilm", "digits_cnn"), [{"type": _Q, "mode": "static", "smoothquant": None}], True),
    ("q_static_percentile", ("digits_cnn",), [{"type": _Q, "mode": "static", "calibration": "percentile"}], True),
    ("q_wo_int8", ("minilm", "digits_mlp"), [{"type": _Q, "mode": "weight_only", "weight_dtype": "int8"}], True),
    ("q_wo_int4_rtn", ("minilm",), [{"type": _Q, "mode": "weight_only", "weight_dtype": "int4", "block_size": 32,
                                     "algorithm": "rtn"}], True),
    ("q_wo_int4", ("minilm", "digits_mlp"), [{"type": _Q, "mode": "weight_only", "weight_dtype": "int4",
                                              "block_size": 32}], True),
    ("s_unstructured_mag_0.5", ("minilm", "digits_cnn"), [{"type": _S, "method": "magnitude", "sparsity": 0.5,
                                                            "allocation": "uniform"}], True),
    ("s_unstructured_sgpt_0.5", ("digits_cnn", "digits_mlp"), [{"type": _S, "method": "sparsegpt",
                                                                 "sparsity": 0.5}], True),
    ("s_2:4_wanda", ("digits_mlp",), [{"type": _S, "method": "wanda", "pattern": "2:4"}], True),
    ("s_block_mag_0.5", ("digits_cnn",), [{"type": _S, "method": "magnitude", "pattern": "block",
                                           "block": [1, 4], "sparsity": 0.5, "allocation": "uniform"}], True),
    ("s_channel_0.3", ("digits_cnn", "digits_mlp"), [{"type": _S, "pattern": "channel", "sparsity": 0.3}], True),
    ("s_channel_0.3", ("minilm",), [{"type": _S, "pattern": "channel", "sparsity": 0.3}], False),
    ("s_channel_0.3_sens", ("digits_cnn", "digits_mlp"), [{"type": _S, "pattern": "channel", "sparsity": 0.3,
                                                           "allocation": "sensitivity"}], True),
    ("s_unstructured_0.5_sens", ("digits_mlp",), [{"type": _S, "method": "sparsegpt", "sparsity": 0.5,
                                                   "allocation": "sensitivity"}], True),
    ("s_mag_0.8_storage+cleanup", ("minilm",), [{"type": _S, "method": "magnitude", "sparsity": 0.8,
                                                 "storage": "auto", "allocation": "uniform"}, {"type": "cleanup"}],
     True),
    ("lr_plain_p0.5", ("digits_mlp", "digits_cnn"), [{"type": "lowrank", "whiten": False, "params_ratio": 0.5,
                                                      "allocation": "uniform", "speed_check": False}], True),
    ("lr_whitened_e0.99", ("digits_mlp",), [{"type": "lowrank", "energy": 0.99, "speed_check": False}], True),
    ("lr_whitened_p0.5", ("minilm",), [{"type": "lowrank", "params_ratio": 0.5, "speed_check": False}], False),
    ("lr_sens_p0.5", ("digits_mlp",), [{"type": "lowrank", "params_ratio": 0.5, "allocation": "sensitivity",
                                        "speed_check": False}], True),
    ("lr_sens_p0.75+q", ("digits_cnn",), [{"type": "lowrank", "params_ratio": 0.75, "allocation": "sensitivity",
                                           "speed_check": False}, {"type": _Q, "mode": "dynamic"}], True),
    ("channel+static", ("digits_cnn",), [{"type": _S, "pattern": "channel", "sparsity": 0.3},
                                         {"type": _Q, "mode": "static"}], True),
    ("pal_4_plain", ("minilm", "digits_cnn"), [{"type": "palettize", "bits": 4, "weighting": "none",
                                                "allocation": "uniform"}], True),
]


#: rows whose output depends on ORT-computed statistics (calibration, probes): their bytes can differ on a CPU with
#: other float kernels, so the test checks them only on the machine kind that recorded them
#: (quantize's default rounding, algorithm auto, reads the layer inputs' second moment: default/q_dynamic/q_wo_*
#: are calibrated rows; their *_rtn twins stay data-free)
DATA_FREE = {"cleanup", "q_dynamic_rtn", "q_wo_int4_rtn", "s_unstructured_mag_0.5",
             "s_block_mag_0.5", "s_mag_0.8_storage+cleanup", "lr_plain_p0.5", "pal_4_plain"}


def machine() -> dict[str, Any]:
    """What the calibrated hashes depend on: ORT's version and the CPU's vector instruction sets."""
    import onnxruntime

    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd") if f in flags]
    return {"onnxruntime": onnxruntime.__version__, "isa": isa}


def setup(model: str) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """The fixture's path and its fixed calibration feeds (the benchmarks' calibration split)."""
    if model == "minilm":
        return testing.minilm_path(), testing.minilm_feeds(32, start=200)
    path = testing.digits_mlp_path() if model == "digits_mlp" else testing.digits_cnn_path()
    d = testing.digits_data()
    x = d["x_calib_flat" if model == "digits_mlp" else "x_calib"]
    return path, [{"input": x[i:i + 20].astype(np.float32)} for i in range(0, min(len(x), 200), 20)]


def row_hash(model: str, recipe: Any) -> str:
    path, calib = setup(model)
    res = onnxcomp.compress(path, recipe, calibration_data=calib, progress=False, validate=False)
    return hashlib.sha256(res.model.SerializeToString(deterministic=True)).hexdigest()


def rows(only: str = "all") -> list[tuple[str, Any]]:
    """(key 'row/model', recipe) of the chosen rows."""
    return [(f"{name}/{m}", recipe) for name, models, recipe, fast in ROWS for m in models
            if only == "all" or (only == "fast") == fast]
