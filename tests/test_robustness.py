"""Every mode over the ONNX models shipped in the `onnx` package: a valid model or a typed error, never a crash,
and no model that compressed before now fails (tests/golden/robustness_ok.json, recorded per onnxruntime and
onnx version with `python -m tests.test_robustness --write`)."""
import json
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from tests.corpus import RECIPES, corpus, key, run_one

GOLDEN = Path(__file__).resolve().parent / "golden" / "robustness_ok.json"
VERSIONS = {"onnx": onnx.__version__, "onnxruntime": ort.__version__}


def _outcomes(mode: str) -> dict[str, tuple[str, str]]:
    return {key(p): run_one(p, mode) for p in corpus()}


@pytest.mark.parametrize("mode", list(RECIPES))
def test_backend_corpus_never_crashes_nor_regresses(mode):
    assert len(corpus()) > 100
    outcomes = _outcomes(mode)
    crashes = {k: v[1] for k, v in outcomes.items() if v[0] == "CRASH"}
    assert not crashes, crashes
    golden = json.loads(GOLDEN.read_text())
    if golden["versions"] != VERSIONS:
        pytest.skip(f"ok-list recorded with {golden['versions']}, this is {VERSIONS}: crash check only")
    lost = {k: outcomes[k] for k in golden["ok"][mode] if outcomes.get(k, ("missing",))[0] != "ok"}
    assert not lost, f"{mode}: compressed before, not now: {lost}"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    ok = {m: sorted(k for k, v in _outcomes(m).items() if v[0] == "ok") for m in RECIPES}
    GOLDEN.write_text(json.dumps({"versions": VERSIONS, "ok": ok}, indent=1) + "\n")
    print({m: len(v) for m, v in ok.items()}, "of", len(corpus()))
