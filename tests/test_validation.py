"""onnxcomp.validation: golden numerics, streaming metrics, report contents, sessions and typed errors."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from onnxcomp import testing as fx
from onnxcomp.errors import CalibrationDataError, InvalidModelError
from onnxcomp.runtime import make_session
from onnxcomp.validation import OutputError, ValidationReport, validate
from onnxcomp.runtime import measure_latency
from onnxcomp.validation.numerics import OutputAccumulator
from onnxcomp.runtime import run_session

API_OUTPUT_KEYS = {"max_abs_err", "mean_abs_err", "rel_l2_err", "cosine"}
QUICK = dict(warmup=1, runs=5)  # latency settings that keep tests fast


def _mlp(scale: float = 1.0, outputs=("y", "z"), extra_output: bool = False) -> onnx.ModelProto:
    """x [batch, seq?] ... : x float [batch, 4] -> y = x @ W + b [batch, 3], z = Relu(y); W scaled by `scale`."""
    rng = np.random.default_rng(42)
    w = (rng.standard_normal((4, 3)) * scale).astype(np.float32)
    b = np.array([0.1, -0.2, 0.3], np.float32)
    nodes = [
        h.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
        h.make_node("Add", ["xw", "b"], ["y"], name="add"),
        h.make_node("Relu", ["y"], ["z"], name="relu"),
    ]
    outs = {"y": h.make_tensor_value_info("y", T.FLOAT, ["batch", 3]), "z": h.make_tensor_value_info("z", T.FLOAT, ["batch", 3])}
    graph_outs = [outs[o] for o in outputs]
    if extra_output:
        graph_outs.append(h.make_tensor_value_info("xw", T.FLOAT, ["batch", 3]))
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])], graph_outs,
                     [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _feeds(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((i % 3 + 1, 4)).astype(np.float32)} for i in range(n)]


def _numpy_metrics(refs: list[np.ndarray], cands: list[np.ndarray]) -> dict[str, float]:
    r = np.concatenate([a.ravel() for a in refs]).astype(np.float64)
    c = np.concatenate([a.ravel() for a in cands]).astype(np.float64)
    d = c - r
    return {
        "max_abs_err": float(np.abs(d).max()),
        "mean_abs_err": float(np.abs(d).mean()),
        "rel_l2_err": float(np.linalg.norm(d) / max(np.linalg.norm(r), 1e-12)),
        "cosine": float(r @ c / (np.linalg.norm(r) * np.linalg.norm(c))),
    }


# ------------------------------------------------------------------------------------------ numerics
def test_streaming_equals_batch_computation() -> None:
    rng = np.random.default_rng(3)
    refs = [rng.standard_normal((k, 7)).astype(np.float32) for k in (1, 4, 2, 9)]
    cands = [(r + rng.normal(0, 0.05, r.shape)).astype(np.float32) for r in refs]
    acc = OutputAccumulator("o")
    for r, c in zip(refs, cands):
        acc.update(r, c)
    got = acc.result()
    want = _numpy_metrics(refs, cands)
    for k, v in want.items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-12, abs=1e-15), k
    assert got.shape == [None, 7] and got.dtype == "float32" and got.nonfinite == 0 and got.exact_match is None
    assert got.elements == sum(r.size for r in refs) and got.samples == 4


def test_zero_outputs_integer_outputs_and_nonfinite() -> None:
    acc = OutputAccumulator("zeros")
    acc.update(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    z = acc.result()
    assert (z.max_abs_err, z.rel_l2_err, z.cosine) == (0.0, 0.0, 1.0)

    acc = OutputAccumulator("ids")
    acc.update(np.array([[1, 2, 3, 4]]), np.array([[1, 2, 0, 4]]))
    i = acc.result()
    assert i.exact_match == 0.75 and i.max_abs_err == 3.0 and i.dtype == "int64"

    ref = np.ones((1, 4), np.float32)
    cand = ref.copy()
    cand[0, 1] = np.nan
    cand[0, 3] = np.inf
    acc = OutputAccumulator("bad")
    acc.update(ref, cand)  # does not raise
    b = acc.result()
    assert b.nonfinite == 2 and not b.ok
    assert math.isinf(b.max_abs_err) and math.isnan(b.cosine)  # never looks good

    ref2 = np.array([[1.0, np.nan, 2.0]], np.float32)  # NaN in the reference, matched by the candidate
    acc = OutputAccumulator("refnan")
    acc.update(ref2, ref2.copy())
    rn = acc.result()
    assert rn.ok and rn.ref_nonfinite == 1 and rn.max_abs_err == 0 and rn.cosine == 1.0

    acc = OutputAccumulator("shape")
    acc.update(np.ones((1, 3)), np.ones((1, 4)))
    s = acc.result()
    assert not s.ok and "shape mismatch" in s.problem


# ------------------------------------------------------------------------------------------ validate
def test_identical_models_are_exact() -> None:
    m = _mlp()
    rep = validate(m, m, _feeds(), **QUICK)
    assert isinstance(rep, ValidationReport) and set(rep.outputs) == {"y", "z"}
    for o in rep.outputs.values():
        assert isinstance(o, OutputError)
        assert o.max_abs_err == 0 and o.mean_abs_err == 0 and o.rel_l2_err == 0 and o.cosine == 1
    assert rep.latency_ratio is not None and math.isfinite(rep.latency_ratio) and rep.latency_ratio > 0
    assert rep.latency_ms["reference"] > 0 and rep.latency_ms["candidate"] > 0
    assert rep.size_ratio == 1.0 and rep.providers == ["CPUExecutionProvider"]
    assert rep.samples == 6 and rep.feeds_source == "user" and rep.ok


def test_perturbed_model_golden_numerics(tmp_path) -> None:
    ref, cand = _mlp(), _mlp(scale=1.01)
    feeds = _feeds(8)
    ref_path, cand_path = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(ref, str(ref_path))
    onnx.save(cand, str(cand_path))
    rep = validate(ref_path, cand, feeds, latency=False)  # a path and a ModelProto
    assert rep.latency_ratio is None and rep.latency_ms is None
    sr, sc = fx.session(ref), fx.session(cand)
    for name in ("y", "z"):
        refs = [sr.run([name], f)[0] for f in feeds]
        cands = [sc.run([name], f)[0] for f in feeds]
        want = _numpy_metrics(refs, cands)
        got = rep.outputs[name]
        assert got.max_abs_err > 0 and got.cosine < 1
        for k, v in want.items():
            assert getattr(got, k) == pytest.approx(v, rel=1e-9), (name, k)
    assert rep.worst("max_abs_err")[1] == max(o.max_abs_err for o in rep.outputs.values())
    assert rep.worst("cosine")[1] == min(o.cosine for o in rep.outputs.values())


def test_to_dict_is_json_and_has_api_keys() -> None:
    rep = validate(_mlp(), _mlp(scale=1.01), _feeds(3), **QUICK)
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert set(d["outputs"]) == {"y", "z"}
    for o in d["outputs"].values():
        assert set(o) == API_OUTPUT_KEYS | {"shape", "dtype", "nonfinite"}
        assert all(isinstance(o[k], float) for k in API_OUTPUT_KEYS)
        assert o["shape"] == [None, 3] and o["dtype"] == "float32" and o["nonfinite"] == 0
    assert isinstance(d["latency_ratio"], float) and d["latency_ratio"] > 0
    assert isinstance(d["size_ratio"], float) and d["providers"] == ["CPUExecutionProvider"]
    assert set(d["latency_ms"]) == {"reference", "candidate"} and set(d["size_bytes"]) == {"reference", "candidate"}
    assert d["samples"] == 3 and d["feeds_source"] == "user"
    md, text = rep.to_markdown(), str(rep)
    for s in (md, text):
        assert "max_abs_err" in s and "cosine" in s and "latency" in s and "| y |" in md


def test_nonfinite_candidate_is_reported_not_raised() -> None:
    ref = _mlp()
    cand = _mlp()
    cand.graph.node[2].op_type = "Log"  # z = log(y): NaN for negative y
    rep = validate(ref, cand, _feeds(4), latency=False)
    z = rep.outputs["z"]
    assert z.nonfinite > 0 and not rep.ok and math.isinf(z.max_abs_err)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["outputs"]["z"]["nonfinite"] == z.nonfinite and math.isnan(d["outputs"]["z"]["cosine"])
    assert not (d["outputs"]["z"]["cosine"] >= 0.5) and not (d["outputs"]["z"]["max_abs_err"] <= 1e9)
    assert any("NaN/inf" in n for n in rep.notes)
    assert rep.worst("cosine")[0] == "z"


def test_missing_and_extra_candidate_outputs() -> None:
    rep = validate(_mlp(), _mlp(outputs=("y",), extra_output=True), _feeds(2), latency=False)
    assert set(rep.outputs) == {"y"} and rep.missing_outputs == ["z"] and not rep.ok
    assert rep.to_dict()["missing_outputs"] == ["z"]
    assert "z" in str(rep) and any("xw" in n for n in rep.notes)
    rep = validate(_mlp(), _mlp(extra_output=True), _feeds(2), latency=False)
    assert set(rep.outputs) == {"y", "z"} and rep.ok


def test_dynamic_dims_and_generated_feeds() -> None:
    rep = validate(_mlp(), _mlp(scale=1.01), None, max_samples=3, seed=1, **QUICK)
    assert rep.feeds_source == "generated" and rep.samples == 3
    assert rep.outputs["y"].shape == [1, 3] and rep.outputs["y"].max_abs_err > 0
    assert any("generated" in n for n in rep.notes)


def test_inputs_from_npz(tmp_path) -> None:
    p = tmp_path / "val.npz"
    np.savez(p, x=np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    rep = validate(_mlp(), _mlp(), p, latency=False)
    assert rep.samples == 5 and rep.outputs["y"].shape == [1, 3]


def test_bad_inputs_raise_calibration_error() -> None:
    with pytest.raises(CalibrationDataError, match="float64"):
        validate(_mlp(), _mlp(), [{"x": np.ones((1, 4))}], latency=False)
    with pytest.raises(CalibrationDataError, match="'x'"):
        validate(_mlp(), _mlp(), [{"inp": np.ones((1, 4), np.float32)}], latency=False)


def test_model_errors(tmp_path) -> None:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    with pytest.raises(InvalidModelError, match="candidate.*corrupt.onnx"):
        validate(_mlp(), bad, _feeds(1))
    good = tmp_path / "good.onnx"
    onnx.save(_mlp(), str(good))
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good.read_bytes()[:50])
    with pytest.raises(InvalidModelError, match="trunc.onnx"):
        validate(good, trunc, _feeds(1))
    with pytest.raises(InvalidModelError, match="not found"):
        validate(good, tmp_path / "missing.onnx")
    other = _mlp()
    other.graph.input[0].name = "pixels"
    other.graph.node[0].input[0] = "pixels"
    with pytest.raises(InvalidModelError, match="lacks input.*'x'.*extra input.*'pixels'"):
        validate(_mlp(), other, _feeds(1))
    with pytest.raises(InvalidModelError, match="candidate model.*not a readable ONNX model"):
        validate(_mlp(), b"\x08\x07junk")
    assert good.read_bytes() == onnx.load(str(good)).SerializeToString()  # inputs untouched


def test_session_errors_name_model_and_node() -> None:
    m = _mlp()
    shape = numpy_helper.from_array(np.array([5, 7], np.int64), "shape")
    m.graph.initializer.append(shape)
    m.graph.node.append(h.make_node("Reshape", ["z", "shape"], ["r"], name="bad_reshape"))
    m.graph.output.append(h.make_tensor_value_info("r", T.FLOAT, None))
    made = make_session(m, name="cand.onnx")
    with pytest.raises(InvalidModelError, match="bad_reshape") as ei:
        run_session(made.session, _feeds(1)[0], name="cand.onnx", sample=0)
    assert "cand.onnx" in str(ei.value) and "Reshape" in str(ei.value)
    with pytest.raises(InvalidModelError, match="bad_reshape"):
        validate(_mlp(), m, _feeds(1), latency=False)
    broken = _mlp()
    broken.graph.node[2].op_type = "NoSuchOp"
    with pytest.raises(InvalidModelError, match="my model: ONNX Runtime cannot load"):
        make_session(broken, name="my model")


def test_float16_candidate_gets_cast_feeds() -> None:
    cand = _mlp()
    cand.graph.input[0].type.tensor_type.elem_type = T.FLOAT16
    cand.graph.node.insert(0, h.make_node("Cast", ["x"], ["x32"], to=T.FLOAT))
    cand.graph.node[1].input[0] = "x32"
    rep = validate(_mlp(), cand, _feeds(3), latency=False)
    y = rep.outputs["y"]
    assert 0 < y.max_abs_err < 1e-2 and y.cosine > 0.9999
    assert any("float16" in n and "cast" in n for n in rep.notes)


def test_sessions_for_big_or_external_data_models(tmp_path, monkeypatch) -> None:
    from onnxcomp import ir

    p = tmp_path / "ext.onnx"
    onnx.save(_mlp(), str(p), save_as_external_data=True, location="ext.data", size_threshold=0)
    lazy = onnx.load(str(p), load_external_data=False)
    with pytest.raises(InvalidModelError, match="external data"):
        make_session(lazy)
    feed = _feeds(1)[0]
    want = fx.session(_mlp()).run(None, feed)
    got = run_session(make_session(lazy, path=p).session, feed)
    np.testing.assert_array_equal(got[0], want[0])
    rep = validate(p, _mlp(), [feed], latency=False)
    assert rep.outputs["y"].max_abs_err == 0
    monkeypatch.setattr(ir, "BIG_BYTES", 64)  # "over 2 GB": goes through a temporary file
    got = run_session(make_session(_mlp()).session, feed)
    np.testing.assert_array_equal(got[0], want[0])


def test_providers_unavailable_are_skipped_with_a_note() -> None:
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    made = make_session(_mlp(), wanted)
    if "CUDAExecutionProvider" in ort.get_available_providers():  # a GPU machine: CUDA really used, no note
        assert made.providers[0] == "CUDAExecutionProvider" and not any("CUDA" in n for n in made.notes)
    else:
        assert made.providers == ["CPUExecutionProvider"] and any("CUDAExecutionProvider" in n for n in made.notes)
    # a provider no ORT build has: skipped with a note on every machine, and the validator says so too
    made = make_session(_mlp(), ["NoSuchExecutionProvider"])
    assert made.providers == ["CPUExecutionProvider"] and any("NoSuchExecutionProvider" in n for n in made.notes)
    rep = validate(_mlp(), _mlp(), _feeds(1), providers=["NoSuchExecutionProvider"], latency=False)
    assert rep.providers == ["CPUExecutionProvider"] and any("NoSuchExecutionProvider" in n for n in rep.notes)


def test_latency_runs_and_budget() -> None:
    s = make_session(_mlp()).session
    lat = measure_latency(s, s, _feeds(2), warmup=1, runs=7)
    assert lat.pairs == 7 and lat.reference_ms > 0 and math.isfinite(lat.ratio) and lat.ratio > 0
    lat = measure_latency(s, s, _feeds(2), warmup=1, runs=None, time_budget_s=0.0)
    assert lat.pairs == 1 and lat.notes  # the budget cut it short, and it says so


# ------------------------------------------------------------------------------------------ real models
def test_digits_perturbed_from_npz(tmp_path) -> None:
    try:
        path, data = fx.digits_mlp_path(), fx.digits_data()
    except fx.FixtureUnavailable as e:
        pytest.skip(str(e))
    cand = onnx.load(str(path))
    for init in cand.graph.initializer:
        if init.name == "fc1.weight":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01), init.name))
    p = tmp_path / "val.npz"
    np.savez(p, input=data["x_test_flat"].astype(np.float32))
    rep = validate(path, cand, p, max_samples=20, **QUICK)
    assert rep.samples == 20 and rep.outputs["logits"].shape == [1, 10]
    lg = rep.outputs["logits"]
    assert 0 < lg.max_abs_err < 1 and 0.99 < lg.cosine < 1
    x = data["x_test_flat"][:20].astype(np.float32)
    r = fx.session(path).run(None, {"input": x})[0]
    c = fx.session(cand).run(None, {"input": x})[0]
    want = _numpy_metrics([r], [c])
    assert lg.rel_l2_err == pytest.approx(want["rel_l2_err"], rel=1e-4)  # batched vs per-sample runs
    assert lg.cosine == pytest.approx(want["cosine"], rel=1e-6)


def test_minilm_self_validation() -> None:
    try:
        path = fx.minilm_path()
        feeds = fx.minilm_feeds(4)
    except fx.FixtureUnavailable as e:
        pytest.skip(str(e))
    for inputs in (None, feeds):
        rep = validate(path, path, inputs, max_samples=4, **QUICK)
        assert set(rep.outputs) == {"output", "463", "461", fx.MINILM_TOKEN_OUTPUT}
        for o in rep.outputs.values():
            assert o.max_abs_err == 0 and o.cosine == 1 and o.nonfinite == 0
        assert math.isfinite(rep.latency_ratio) and rep.latency_ratio > 0
        assert rep.feeds_source == ("generated" if inputs is None else "user")
        json.dumps(rep.to_dict(), allow_nan=False)
