"""Faults while writing: a full disk or an unwritable place is a SaveError that leaves no partial file and the old
file unchanged; a process killed (SIGKILL) in the middle of a save leaves the old model or the new one, never a
truncated one; the input file's bytes and mtime never change, including on failed runs."""
import errno
import os
import signal
import subprocess
import sys
import time

import onnx
import pytest

import onnxcomp
from onnxcomp import ir, testing
from onnxcomp.errors import SaveError


def test_full_disk_is_a_save_error_and_leaves_nothing(tmp_path, monkeypatch):
    proto = ir.load_proto(testing.digits_mlp_path())
    out = tmp_path / "m.onnx"
    ir.save_proto(proto, out)
    before = out.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    res = onnxcomp.compress(proto, "lossless", progress=False, validate=False)
    with pytest.raises(SaveError, match="No space left on device"):
        res.save(out)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_unwritable_place_is_a_save_error():
    res = onnxcomp.compress(testing.digits_mlp_path(), "lossless", progress=False, validate=False)
    with pytest.raises(SaveError, match="cannot write"):
        res.save("/proc/onnxcomp-cannot-write-here.onnx")  # not writable even for root
    with pytest.raises(SaveError):
        res.report.to_html("/proc/onnxcomp-report.html")


def test_cli_save_failure_exits_2_and_keeps_the_input(tmp_path):
    src = testing.digits_mlp_path()
    stat, data = os.stat(src), src.read_bytes()
    r = subprocess.run([sys.executable, "-m", "onnxcomp", "compress", str(src), "-o", "/proc/x/y.onnx",
                        "--no-validate"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert src.read_bytes() == data and os.stat(src).st_mtime_ns == stat.st_mtime_ns


_SAVER = """
import sys, onnx
from onnxcomp import ir
m = onnx.load(sys.argv[1])
for i in range(1000):
    m.doc_string = f"round {i}"
    ir.save_proto(m, sys.argv[2])
"""


def test_sigkill_during_save_leaves_old_or_new_never_truncated(tmp_path):
    src = testing.minilm_path()  # ~66 MB: a save takes long enough to be interrupted
    out = tmp_path / "m.onnx"
    base = onnx.load(str(src))
    ir.save_proto(base, out)
    for delay in (0.3, 0.7, 1.1):
        child = subprocess.Popen([sys.executable, "-c", _SAVER, str(src), str(out)], stderr=subprocess.DEVNULL)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        m = onnx.load(str(out))  # a truncated file would not parse
        onnx.checker.check_model(m)
        assert m.doc_string == base.doc_string or m.doc_string.startswith("round ")
        assert len(m.graph.initializer) == len(base.graph.initializer)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    from onnx import helper

    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                             opset_imports=[helper.make_opsetid("", opset)])


def _bad_inputs(tmp_path):
    """(name, model, recipe, feeds, expected error class or None for a correct result, text the message names)."""
    import numpy as np
    from onnx import helper

    from tests.graphs import const, vi

    w = np.ones((4, 4), np.float32)
    mm = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    dyn = [{"type": "quantize", "mode": "dynamic", "min_weight_elements": 0}]
    ext = _model(mm, [vi("x", [2, 64])], [vi("y", [2, 64])], [const("W", np.ones((64, 64), np.float32))])
    onnx.save_model(ext, str(tmp_path / "e.onnx"), save_as_external_data=True, location="e.data", size_threshold=0)
    custom = _model([helper.make_node("Foo", ["x"], ["y"], domain="my.domain")], [vi("x", [2, 4])], [vi("y", [2, 4])])
    custom.opset_import.append(helper.make_opsetid("my.domain", 1))
    return [
        ("output is an initializer", _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 4])],
                                            [vi("y", [2, 4]), vi("W", [4, 4])], [const("W", w)]), dyn, None, None, ""),
        ("zero-size tensors", _model(mm, [vi("x", [0, 4])], [vi("y", [0, 4])], [const("W", w)]),
         [{"type": "quantize", "mode": "static", "min_weight_elements": 0}], [{"x": np.zeros((0, 4), np.float32)}] * 3,
         None, ""),
        ("duplicated names", _model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])],
                                    [vi("x", [2, 4])], [vi("y", [2, 4])]), "lossless", None,
         onnxcomp.InvalidModelError, "'y'"),
        ("custom-domain op", custom, "lossless", None, onnxcomp.InvalidModelError, "my.domain:Foo"),
        ("external data not loaded", onnx.load(str(tmp_path / "e.onnx"), load_external_data=False), "lossless",
         None, onnxcomp.InvalidModelError, "'W'"),
        ("fully symbolic shapes", _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["a", "b"])],
                                         [vi("y", ["a", "b"])]), "fast", None, None, ""),
        ("inconsistent calibration shapes", _model(mm, [vi("x", [2, 4])], [vi("y", [2, 4])], [const("W", w)]),
         "int8", [{"x": np.ones((2, 4), np.float32)}, {"x": np.ones((3, 4), np.float32)}],
         onnxcomp.CalibrationDataError, "sample 1, input 'x': dim 0 is 3"),
        ("recipe with a wrong type", _model(mm, [vi("x", [2, 4])], [vi("y", [2, 4])], [const("W", w)]),
         [{"type": "quantize", "mode": 3}], None, onnxcomp.RecipeError, "mode"),
    ]


def test_bad_inputs_give_a_typed_error_naming_the_culprit_or_a_correct_result(tmp_path):
    for name, model, recipe, feeds, error, text in _bad_inputs(tmp_path):
        if error is None:
            res = onnxcomp.compress(model, recipe, calibration_data=feeds, progress=False)
            onnx.checker.check_model(res.model, full_check=True)
            assert res.report.validation.ok, name
            continue
        with pytest.raises(error) as e:
            onnxcomp.compress(model, recipe, calibration_data=feeds, progress=False)
        assert text in str(e.value), (name, str(e.value))
