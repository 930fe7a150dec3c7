"""examples/ run as a user runs them (a subprocess, the installed `onnxcomp` command on PATH) on the bundled
fixtures: digits images written as PNG files, MiniLM-L3 with its tokenizer.json and sentences."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp import testing

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(args, cwd, timeout=600) -> str:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    """calib/ (unlabelled, the fixture's 200 calibration images) and val/<digit>/ (300 test images) as PNG."""
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path_factory.mktemp("digits")
    d = testing.digits_data()
    (root / "calib").mkdir()
    for i, x in enumerate(d["x_calib"]):
        Image.fromarray(np.round(x[0] * 255).astype(np.uint8), mode="L").save(root / "calib" / f"{i:03d}.png")
    for i, (x, y) in enumerate(zip(d["x_test"][:300], d["y_test"][:300])):
        (root / "val" / str(int(y))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(x[0] * 255).astype(np.uint8), mode="L").save(root / "val" / str(int(y)) / f"{i}.png")
    return root


def _checked(path: Path) -> None:
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def test_sentence_embeddings_example(tmp_path):
    pytest.importorskip("tokenizers")
    model = testing.minilm_path()
    before = _digest(model)
    out = _run([sys.executable, str(EXAMPLES / "sentence_embeddings.py"), "--calibrate", "24", "--evaluate", "48",
                "--pairs", "24", "-o", str(tmp_path / "m.onnx")], cwd=tmp_path)
    assert "onnxcomp report" in out and "held-out sentences: 48 (calibration: 24 others)" in out
    cos = float(out.split("embedding cosine to the original: mean ")[1].split(",")[0])
    assert cos > 0.99  # static int8 on MiniLM-L3 keeps ~0.999 on held-out sentences
    assert "paraphrase retrieval top-1 over 24 pairs" in out
    _checked(tmp_path / "m.onnx")
    assert _digest(model) == before


def test_image_classifier_example(tmp_path, digit_folders):
    out = _run([sys.executable, str(EXAMPLES / "image_classifier.py"), "--model", str(testing.digits_cnn_path()),
                "--calibration", str(digit_folders / "calib"), "--evaluation", str(digit_folders / "val"),
                "-o", str(tmp_path / "cnn.onnx")], cwd=tmp_path)
    line = next(s for s in out.splitlines() if s.startswith("top-1: original"))
    orig, comp = float(line.split("original ")[1].split(",")[0]), float(line.split("compressed ")[1])
    assert orig > 0.95 and comp >= orig - 0.02, line  # the labels are the fixture's: the folders were read right
    assert "held-out images: 300 (calibration: 200)" in out
    _checked(tmp_path / "cnn.onnx")


def test_cli_example_with_yaml_recipe(tmp_path, digit_folders):
    out = _run(["bash", str(EXAMPLES / "cli.sh"), str(testing.digits_cnn_path()), str(digit_folders / "calib"),
                str(tmp_path / "out")], cwd=tmp_path)
    assert "budget    {'cosine': 0.99} met" in out and "validation: 1 output(s) on 64 user sample(s)" in out
    for name in ("model.compressed.onnx", "report.html", "report.json", "calib.npz"):
        assert (tmp_path / "out" / name).is_file(), name
    _checked(tmp_path / "out" / "model.compressed.onnx")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<table" in html and "sparsify" in html
