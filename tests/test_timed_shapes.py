"""Latency on stated shapes: generated inputs take the shapes the user states (--shape / input_shapes), shared
symbolic dims follow, bad shapes are typed errors naming the input, and every report names the shapes it timed."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import onnxcomp
from onnxcomp import testing as fx
from onnxcomp.cli import main
from onnxcomp.data import generate_feeds, input_specs
from onnxcomp.errors import CalibrationDataError


def test_stated_shape_sets_the_shared_sequence_dim(minilm):
    m = onnxcomp.ir.load_proto(minilm)
    specs = input_specs(m)
    feeds = generate_feeds(m, specs, n=2, shapes={"input_ids": [1, 128]})
    assert all(v.shape == (1, 128) for f in feeds for v in f.values())  # attention_mask & co follow input_ids
    default = generate_feeds(m, specs, n=1)[0]
    assert default["input_ids"].shape != (1, 128)


@pytest.mark.parametrize("shapes,match", [({"nope": [1, 8]}, "not an input"), ({"input_ids": [1, 8, 2]}, "rank"),
                                          ({"input_ids": ["a", 2]}, "integers")])
def test_bad_shapes_are_typed_errors(minilm, shapes, match):
    with pytest.raises(CalibrationDataError, match=match):
        onnxcomp.compress(minilm, ["cleanup"], progress=False, input_shapes=shapes)


def test_fixed_dim_cannot_be_changed():
    with pytest.raises(CalibrationDataError, match="fixed at 64"):
        generate_feeds(onnxcomp.ir.load_proto(fx.digits_mlp_path()), shapes={"input": [3, 32]})


def test_report_names_the_timed_shapes(minilm):
    res = onnxcomp.compress(minilm, ["cleanup"], progress=False, input_shapes={"input_ids": [1, 64]})
    v = res.report.validation
    assert v.feeds_source == "generated"
    assert v.timed_shapes["input_ids"] == [[1, 64]] and v.timed_shapes["attention_mask"] == [[1, 64]]
    assert v.to_dict()["timed_shapes"]["input_ids"] == [[1, 64]]
    text = str(res.report)
    assert "timed on generated inputs input_ids [1, 64]" in text and "--shape" in text


def test_user_data_is_timed_at_its_own_shapes():
    d = fx.digits_data()
    feeds = [{"input": d["x_calib"][i:i + 4]} for i in range(0, 40, 4)]
    res = onnxcomp.compress(fx.digits_cnn_path(), ["cleanup"], calibration_data=feeds, progress=False,
                            input_shapes={"input": [2, 1, 8, 8]})
    v = res.report.validation
    assert v.feeds_source == "user" and v.timed_shapes == {"input": [[4, 1, 8, 8]]}
    assert any("input_shapes ignored" in w for w in res.report.warnings)


def test_cli_shape_option(minilm, tmp_path):
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["compress", str(minilm), "-o", str(out), "--recipe", _lossless(tmp_path),
                                  "--shape", "input_ids=1,32"])
    assert r.exit_code == 0, r.output
    assert "input_ids [1, 32]" in r.output
    r = CliRunner().invoke(main, ["validate", str(minilm), str(out), "--shape", "input_ids=1,16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["timed_shapes"]["input_ids"] == [[1, 16]]
    r = CliRunner().invoke(main, ["compress", str(minilm), "-o", str(out), "--shape", "input_ids"])
    assert r.exit_code == 2 and "INPUT=D1,D2" in r.output
    r = CliRunner().invoke(main, ["compress", str(minilm), "-o", str(minilm)])
    assert r.exit_code == 2 and "output must differ" in r.output  # a usage error, not an internal one


def _lossless(tmp_path) -> str:
    p = tmp_path / "r.yaml"
    p.write_text("passes:\n  - type: cleanup\n")
    return str(p)
