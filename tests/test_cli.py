"""The CLI as a user runs it: exit codes 0/1/2, readable errors without tracebacks."""
import json
import subprocess
import sys

import numpy as np

from onnxcomp import testing


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxcomp", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_inspect_digits():
    r = cli("inspect", testing.digits_cnn_path())
    assert r.returncode == 0, r.stderr
    for word in ("Conv", "Gemm", "parameters", "input", "logits", "opsets"):
        assert word in r.stdout
    j = cli("inspect", testing.digits_cnn_path(), "--json")
    s = json.loads(j.stdout)
    assert s["ops"]["Conv"] == 2 and s["parameters"] > 30000
    assert s["params_by_op"]["Conv"] + s["params_by_op"]["Gemm"] == s["parameters"]
    ch = s["passes"]["sparsify_channel"]
    assert [(g["producer"], g["channels"]) for g in ch["groups"]] == [("conv1", 16), ("conv2", 32), ("fc1", 64)]
    assert ch["not_prunable"] == [{"layer": "fc2", "reason": "channels reach the graph output 'logits'"}]
    assert "3 prunable channel group(s)" in r.stdout
    # conv2 [32, 16, 3, 3] and fc1 [64, 512] have >= 4096 weights; break-even k*n/(k+n)
    assert [(x["layer"], x["k"], x["n"], x["break_even_rank"]) for x in s["passes"]["lowrank"]] == [
        ("conv2", 144, 32, 26), ("fc1", 512, 64, 56)]
    pal = s["passes"]["palettize"]
    assert [(x["weight"], x["op"], x["bytes"]) for x in pal["weights"]] == [
        ("conv2.weight", "Conv", 4 * 4608), ("fc1.weight", "Gemm", 4 * 32768)]
    assert "palettize: 2 weight(s) of 149,504 bytes" in r.stdout


def test_compress_and_validate(tmp_path):
    out = tmp_path / "cnn.onnx"
    d = testing.digits_data()
    np.savez(tmp_path / "calib.npz", input=d["x_calib"][:6])
    (tmp_path / "cleanup.yaml").write_text("passes: [cleanup]\n")
    r = cli("compress", testing.digits_cnn_path(), "-o", out, "--calibration", tmp_path / "calib.npz",
            "--report", tmp_path / "r.json", "--explain", "--recipe", tmp_path / "cleanup.yaml")
    assert r.returncode == 0, r.stderr
    assert out.exists() and "latency" in r.stdout and "remove-identity" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["validation"]["samples"] == 1  # the 5th of 6 calibration samples, held back for validation
    assert rep["data"]["calibration_samples"] == 5
    v = cli("validate", testing.digits_cnn_path(), out, "--json")
    assert v.returncode == 0, v.stderr
    vj = json.loads(v.stdout)
    assert all(o["max_abs_err"] == 0.0 for o in vj["outputs"].values())
    assert vj["latency_ratio"] > 0


def test_bad_input_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not onnx")
    r = cli("compress", bad, "-o", tmp_path / "o.onnx")
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "o.onnx").exists()
    r = cli("inspect", tmp_path / "missing.onnx")
    assert r.returncode == 2 and "not found" in r.stderr


def test_bad_recipe_exit_2(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("passes:\n  - type: cleanup\n    dedup: true\n")
    r = cli("compress", testing.digits_mlp_path(), "-o", tmp_path / "o.onnx", "--recipe", rec)
    assert r.returncode == 2 and "dedup" in r.stderr and "Traceback" not in r.stderr


def test_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(testing.digits_mlp_path().read_bytes())
    before = src.read_bytes()
    r = cli("compress", src, "-o", src)
    assert r.returncode != 0 and src.read_bytes() == before


def test_compress_with_a_preset_objective_and_budget(tmp_path):
    d = testing.digits_data()
    np.savez(tmp_path / "calib.npz", input=d["x_calib_flat"][:60])
    out = tmp_path / "mlp.onnx"
    r = cli("compress", testing.digits_mlp_path(), "-o", out, "--preset", "fast", "--objective", "size",
            "--budget", "cosine=0.999", "--calibration", tmp_path / "calib.npz", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["search"]["objective"] == "size" and rep["accuracy_budget"]["bounds"] == {"cosine": 0.999}
    assert rep["accuracy_budget"]["met"] and "auto      objective size" in r.stdout
    assert rep["data"]["validation_samples"] == 12  # every 5th of the 60 samples
    bad = cli("compress", testing.digits_mlp_path(), "-o", tmp_path / "x.onnx", "--preset", "lossless",
              "--objective", "size")
    assert bad.returncode == 2 and "apply to the auto search" in bad.stderr
    unknown = cli("compress", testing.digits_mlp_path(), "-o", tmp_path / "x.onnx", "--preset", "quick")
    assert unknown.returncode == 2 and "unknown preset 'quick'" in unknown.stderr
    listed = cli("presets")
    assert listed.returncode == 0 and all(n in listed.stdout for n in ("lossless", "fast", "small", "int8"))


def test_report_suffix_is_checked_before_any_work(tmp_path):
    r = cli("compress", testing.digits_cnn_path(), "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.html",
            "--report", tmp_path / "r.txt")
    assert r.returncode == 2 and "r.txt" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "r.html").exists()
