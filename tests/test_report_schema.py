"""Every report's JSON follows onnxcomp/schemas/report.schema.json: plain recipes, a budget with back-off, a
search, no validation, and the CLI's --report file; the schema's closed objects catch a key added without it."""
import json

import pytest

jsonschema = pytest.importorskip("jsonschema")

import onnxcomp  # noqa: E402
from onnxcomp import testing  # noqa: E402
from onnxcomp.report import report_schema  # noqa: E402
from tests.test_cli import cli  # noqa: E402


def _check(report_dict):
    jsonschema.validate(report_dict, report_schema(), cls=jsonschema.Draft202012Validator)


@pytest.fixture(scope="module")
def digits():
    d = testing.digits_data()
    return str(testing.digits_cnn_path()), [{"input": d["x_calib"][i:i + 1]} for i in range(0, 60)]


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(report_schema())


@pytest.mark.parametrize("recipe", [
    None,
    {"passes": [{"type": "quantize", "mode": "static"}], "accuracy_budget": {"cosine": 0.99999}},
    {"passes": [{"type": "sparsify", "pattern": "channel", "sparsity": 0.3}, {"type": "palettize", "bits": 4}]},
    {"preset": "auto", "objective": "size", "max_seconds": 20},
], ids=["default", "budget-backoff", "channel+palettize", "auto-size"])
def test_reports_follow_the_schema(recipe, digits):
    path, calib = digits
    res = onnxcomp.compress(path, recipe, calibration_data=calib, progress=False)
    d = json.loads(res.report.to_json())
    _check(d)
    if recipe and "accuracy_budget" in recipe:
        assert d["accuracy_budget"]["backoff"]  # the back-off rounds are in the checked document


def test_report_without_validation_follows_the_schema(digits):
    res = onnxcomp.compress(digits[0], [{"type": "cleanup"}], progress=False, validate=False)
    d = res.report.to_dict()
    assert d["validation"] is None
    _check(d)


def test_an_unknown_key_fails_the_schema(digits):
    d = onnxcomp.compress(digits[0], [{"type": "cleanup"}], progress=False).report.to_dict()
    for where in (d, d["validation"], d["before"], d["passes"][0]):
        where["surprise"] = 1
        with pytest.raises(jsonschema.ValidationError, match="surprise"):
            _check(d)
        del where["surprise"]


def test_cli_report_file_follows_the_schema(tmp_path, digits):
    out = tmp_path / "m.onnx"
    r = cli("compress", digits[0], "-o", out, "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    _check(json.loads((tmp_path / "r.json").read_text()))
