"""The >2 GB code paths (external data on save, checker by path, ORT session from a path), exercised on a
small real model by lowering the threshold: a real 2 GB model is too big for CI."""
import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp import ir, testing
from onnxcomp.runtime import session as vsession


@pytest.fixture
def tiny_threshold(monkeypatch):
    monkeypatch.setattr(ir, "TWO_GB", 20_000)
    monkeypatch.setattr(vsession, "TWO_GB", 20_000)


def test_compress_save_and_validate_through_external_data(tmp_path, tiny_threshold):
    src = testing.digits_cnn_path()
    res = onnxcomp.compress(src, ["cleanup"], progress=False)
    out = tmp_path / "big.onnx"
    res.save(out)
    assert (tmp_path / "big.onnx.data").is_file()  # weights moved to external data automatically
    assert out.stat().st_size < 20_000
    loaded = ir.load_proto(out)  # external data followed
    assert ir.proto_size(loaded) > 20_000
    ir.check_proto(loaded, full=True)  # checked by path, as for a real >2 GB model
    d = testing.digits_data()
    rep = onnxcomp.validate(src, out, inputs=[{"input": d["x_test"][:4]}], latency=False)
    assert all(o["max_abs_err"] == 0.0 for o in rep.to_dict()["outputs"].values())
    x = d["x_test"][:16]
    np.testing.assert_array_equal(testing.session(src).run(None, {"input": x})[0],
                                  testing.session(str(out)).run(None, {"input": x})[0])


def test_external_data_model_as_input(tmp_path):
    m = onnx.load(str(testing.digits_mlp_path()))
    p = tmp_path / "ext.onnx"
    onnx.save(m, str(p), save_as_external_data=True, location="ext.weights", size_threshold=0)
    res = onnxcomp.compress(p, ["cleanup"], progress=False)
    d = testing.digits_data()
    assert testing.digits_top1(res.model, d["x_test"], d["y_test"]) == testing.digits_top1(
        testing.digits_mlp_path(), d["x_test"], d["y_test"])
