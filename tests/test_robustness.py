"""Every mode over the ONNX models shipped in the `onnx` package: a valid model or a typed error, never a crash."""
import pytest

from tools.robustness_corpus import corpus, run_one


@pytest.mark.parametrize("mode", ["cleanup", "dynamic", "weight_only", "static", "sparsify", "channel", "lowrank"])
def test_backend_corpus_never_crashes(mode):
    models = corpus()
    assert len(models) > 100
    outcomes = {p.name if p.name != "model.onnx" else p.parent.name: run_one(p, mode) for p in models}
    crashes = {k: v[1] for k, v in outcomes.items() if v[0] == "CRASH"}
    assert not crashes, crashes
    ok = sum(v[0] == "ok" for v in outcomes.values())
    assert ok > 0.6 * len(models)  # the rest are typed errors (e.g. opset-1/6 ops ORT cannot run)
