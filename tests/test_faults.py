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
