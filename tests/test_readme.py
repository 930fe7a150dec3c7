"""The README's quick-start code runs verbatim on a bundled real model: model.onnx = the digits CNN and
feeds.npz = its calibration images, in a scratch folder (the input file is checked untouched)."""
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np

from onnxcomp import testing

README = Path(__file__).resolve().parent.parent / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_runs_verbatim(tmp_path, capsys):
    shutil.copy(testing.digits_cnn_path(), tmp_path / "model.onnx")
    np.savez(tmp_path / "feeds.npz", input=testing.digits_data()["x_calib"][:100])
    digest = hashlib.sha256((tmp_path / "model.onnx").read_bytes()).hexdigest()
    code = _quick_start()
    assert 'compress("model.onnx", "fast"' in code  # the block this test is about
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, str(README) + ":quick-start", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "model.compressed.onnx").is_file()
    assert hashlib.sha256((tmp_path / "model.onnx").read_bytes()).hexdigest() == digest
    assert "onnxcomp report" in capsys.readouterr().out
