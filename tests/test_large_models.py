"""Models over 2 GB: the part-by-part paths (skeleton check and shape inference, digest, size, external-data save,
uncached weights, one validation session at a time) tested on the real digits MLP with the "big" threshold
lowered, so that they run in CI in seconds; the real > 2 GB run is tools/bench_big.py (slow-marked test below)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp import ir, testing
from onnxcomp.calibration import model_digest
from onnxcomp.errors import InvalidModelError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "cleanup": [{"type": "cleanup"}],
    # min_weight_elements 0: the MLP's Gemms (8192 weights at most) are below the default size; equalize off:
    # over 2 GB it is not measured (test below), so both routes are compared without it
    "dynamic": [{"type": "cleanup"}, {"type": "quantize", "mode": "dynamic", "min_weight_elements": 0,
                                      "equalize": False}],
    "int4": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4", "block_size": 32,
              "min_weight_elements": 0, "equalize": False}],
    "static": [{"type": "quantize", "mode": "static", "min_weight_elements": 0, "equalize": False}],
    "channel": [{"type": "sparsify", "pattern": "channel", "sparsity": 0.3, "allocation": "uniform"}],
    # speed_check off: whether a pair this small times faster depends on the machine, and these tests need factors
    "lowrank": [{"type": "lowrank", "params_ratio": 0.6, "allocation": "uniform", "speed_check": False}],
}


@pytest.fixture
def big(monkeypatch):
    """Every model with over 4 KB of weights counts as over 2 GB; tensors over 1 KB go to the skeleton's file."""
    monkeypatch.setattr(ir, "BIG_BYTES", 4096)
    monkeypatch.setattr(ir, "SKELETON_MIN_BYTES", 1024)


def _data():
    d = testing.digits_data()
    return [{"input": d["x_calib_flat"][i:i + 8]} for i in range(0, 160, 8)], d


def _weights(m: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_big_path_makes_the_same_model(name, tmp_path, monkeypatch):
    """The over-2-GB route (skeleton, part-by-part, uncached weights, sequential validation) gives the same
    weights and outputs as the usual one, and its output is written with external data that ORT loads."""
    calib, d = _data()
    path = testing.digits_mlp_path()
    small = onnxcomp.compress(str(path), RECIPES[name], calibration_data=calib, progress=False)
    monkeypatch.setattr(ir, "BIG_BYTES", 4096)
    monkeypatch.setattr(ir, "SKELETON_MIN_BYTES", 1024)
    res = onnxcomp.compress(str(path), RECIPES[name], calibration_data=calib, progress=False)
    assert _weights(res.model) == _weights(small.model)
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in small.model.graph.node]
    assert any("one after the other" in n for n in res.report.validation.notes)
    assert res.report.validation.size_bytes["reference"] == pytest.approx(
        small.report.validation.size_bytes["reference"], rel=0.02)
    out = res.save(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").is_file()  # written as a big model: weights beside the file
    onnx.checker.check_model(str(out), full_check=True)
    x = d["x_test_flat"][:64]
    y_big = testing.session(str(out)).run(None, {"input": x})[0]
    y_small = testing.session(small.model).run(None, {"input": x})[0]
    np.testing.assert_array_equal(y_big, y_small)
    assert testing.digits_top1(str(out), d["x_test"], d["y_test"]) > 0.85


def test_proto_size_digest_and_check_part_by_part(big):
    m = ir.load_proto(testing.digits_mlp_path())
    whole = m.ByteSize()
    assert ir.is_big(m)
    assert abs(ir.proto_size(m) - whole) < 0.01 * whole  # skeleton + moved bytes: the serialized size
    assert model_digest(m) == model_digest(ir.load_proto(testing.digits_mlp_path()))
    changed = ir.load_proto(testing.digits_mlp_path())
    w = next(t for t in changed.graph.initializer if ir._tensor_nbytes(t) >= 1024)
    a = onnx.numpy_helper.to_array(w).copy()
    a.flat[0] += 1.0
    w.CopyFrom(onnx.numpy_helper.from_array(a, w.name))
    assert model_digest(changed) != model_digest(m)
    ir.check_proto(m, full=True)  # the skeleton passes the full checker
    broken = ir.load_proto(testing.digits_mlp_path())
    broken.graph.node[0].input[0] = "no_such_tensor"
    with pytest.raises(InvalidModelError, match="no_such_tensor"):
        ir.check_proto(broken, full=True)


def test_models_from_stream_bytes_on_are_hashed_and_compressed_part_by_part(monkeypatch):
    """Under 2 GB too, a model of STREAM_BYTES or more is streamed tensor by tensor (sparsify's gzip size of a
    1.1 GB pruned model held its whole serialization beside it): same compressed size, same digest for the same
    content, no chunk the size of the model."""
    from onnxcomp import storage

    m = ir.load_proto(testing.digits_mlp_path())
    whole = storage.compressed_size(ir.serialized_chunks(m))
    monkeypatch.setattr(ir, "STREAM_BYTES", 4096)
    monkeypatch.setattr(ir, "SKELETON_MIN_BYTES", 1024)
    assert not ir.is_big(m)
    chunks = list(ir.serialized_chunks(m))
    assert len(chunks) > 2 and max(map(len, chunks)) < 0.6 * m.ByteSize()
    assert abs(storage.compressed_size(iter(chunks)) - whole) < 0.02 * whole
    assert model_digest(m) == model_digest(ir.load_proto(testing.digits_mlp_path()))


def test_skeleton_copies_no_weight_and_keeps_the_model(big, tmp_path):
    m = ir.load_proto(testing.digits_mlp_path())
    before = m.SerializeToString()
    sk, moved = ir.skeleton(m, "x.data")
    assert moved and all(t.data_location == onnx.TensorProto.EXTERNAL
                         for t in sk.graph.initializer if t.name in {t2.name for _, t2 in moved})
    assert m.SerializeToString() == before  # the source is not modified
    assert sk.ByteSize() < 0.2 * len(before)
    p = ir.write_skeleton(m, tmp_path / "w.onnx", with_data=True)
    back = onnx.load(str(p))  # loads its external data
    assert _weights(back) == _weights(m)
    for _, t in moved:  # big tensors sit at page-aligned offsets when over 1 MiB, else packed
        assert ir._tensor_nbytes(t) > 0


def test_uncached_weights_are_read_only(big):
    m = ir.Model.from_proto(ir.load_proto(testing.digits_mlp_path()))
    consts = [t for t in m.graph.tensors().values() if isinstance(t, ir._UncachedConstant)]
    assert consts
    v = ir.const_value(consts[0])
    assert not v.flags.writeable
    with pytest.raises(ValueError):
        v[...] = 0  # a write would be lost: it fails loudly
    assert ir.const_value(consts[0]) is not v  # read again, not cached
    consts[0].values = np.zeros(consts[0].shape, np.float32)  # assigning works as for any Constant
    assert not np.asarray(consts[0].values).any()


def test_validate_big_reference_from_path_reads_structure_only(big, tmp_path):
    """A reference on disk with external data is validated from its path (its weights are not loaded here)."""
    m = ir.load_proto(testing.digits_mlp_path())
    p = ir.save_proto(m, tmp_path / "ref.onnx")
    assert (tmp_path / "ref.onnx.data").is_file()
    _, d = _data()
    r = onnxcomp.validate(str(p), m, inputs=[{"input": d["x_test_flat"][:16]}], latency=True)
    assert r.ok and r.outputs["logits"].max_abs_err == 0
    assert r.size_bytes["reference"] == pytest.approx(r.size_bytes["candidate"], rel=0.02)
    assert r.latency_ratio is not None and r.latency_ratio > 0


def test_compress_save_and_validate_through_external_data(tmp_path, big):
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


@pytest.mark.slow
def test_over_2gb_end_to_end(tmp_path):
    """tools/bench_big.py: a 2.28 GB model (34 x 4096^2 fp32) through cleanup, dynamic int8, weight-only int4,
    channel pruning and low-rank, each in a fresh process: exit 0, the output reloads, passes the checker and runs;
    peak RSS within 2.5x the weights (the issue's target; the figures are in the closing note of the session that
    added the tensor store). About an hour on 2 cores."""
    out = tmp_path / "big.json"
    recipes = ["cleanup", "dynamic", "weight_only_int4", "channel", "lowrank"]
    subprocess.run([sys.executable, str(ROOT / "tools" / "bench_big.py"), "--dir", str(tmp_path), "--json",
                    str(out), "--recipes", *recipes], check=True, env={**os.environ})
    rows = json.loads(out.read_text())
    assert [r["recipe"] for r in rows["rows"]] == recipes
    for r in rows["rows"]:
        assert r["reload_ok"], r
        assert r["peak_rss"] <= 2.5 * rows["weight_bytes"], r


@pytest.mark.parametrize("name", ["dynamic", "int4", "lowrank"])
def test_moments_collected_a_layer_at_a_time_make_the_same_model(name, monkeypatch):
    """Over 2 GB, GPTQ's (and AWQ's) input moments and lowrank's whitening Grams come a chunk of layers per
    calibration run (all Grams of a 34 x 4096^2 model at once are 4.6 GB): with one layer per chunk the weights
    are byte-identical to one run's, and the chunks take one calibration run each."""
    from onnxcomp.calibration import cache, chunks

    calib, _ = _data()
    path = testing.digits_mlp_path()
    small = onnxcomp.compress(str(path), RECIPES[name], calibration_data=calib, progress=False, validate=False)
    monkeypatch.setattr(ir, "BIG_BYTES", 4096)
    monkeypatch.setattr(ir, "SKELETON_MIN_BYTES", 1024)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)
    runs = []
    real = cache.collect_statistics
    monkeypatch.setattr(cache, "collect_statistics",
                        lambda m, names, feeds, **kw: runs.append(sorted(kw.get("gram_axes") or {})) or
                        real(m, names, feeds, **kw))
    res = onnxcomp.compress(str(path), RECIPES[name], calibration_data=calib, progress=False, validate=False)
    assert _weights(res.model) == _weights(small.model)
    gram_runs = [r for r in runs if r]
    layers = sum(n.op_type in ("MatMul", "Gemm") for n in onnx.load(str(path)).graph.node)
    layers -= name == "lowrank"  # fc3 (640 weights) is below lowrank's min_weight_elements
    assert layers >= 2 and all(len(r) == 1 for r in gram_runs) and len(gram_runs) >= layers, runs
    if name != "lowrank":
        assert res.report.passes[-1].details["rounding"]  # the GPTQ-or-nearest choice was made per weight


def test_equalization_is_not_measured_over_2gb(big):
    """Deciding on cross-layer equalization quantizes the model twice more (with and without it) on a float copy:
    over 2 GB the pass leaves the pairs as they are and says so (equalize: true still applies it)."""
    calib, _ = _data()
    recipe = [{"type": "quantize", "mode": "dynamic", "min_weight_elements": 0}]
    res = onnxcomp.compress(str(testing.digits_mlp_path()), recipe, calibration_data=calib, progress=False,
                            validate=False)
    d = res.report.passes[0].details
    assert "equalize_search" not in d and "equalized" not in d
    assert any("not measured on a model over 2 GB" in n for n in res.report.passes[0].notes)
    forced = onnxcomp.compress(str(testing.digits_mlp_path()), [{**recipe[0], "equalize": True}],
                               calibration_data=calib, progress=False, validate=False)
    assert forced.report.passes[0].details["equalized"]


def test_conv_means_for_bias_correction_come_in_chunks_too(monkeypatch):
    """Static int8 with bias correction on the digits CNN over 2 GB, one input per chunk: the Conv inputs' means
    come from the chunks as well, so every bias the usual route corrects is corrected, to the same values (to
    float rounding: over 2 GB the calibration sessions do not prepack weights, and MLAS sums the Convs in
    another order)."""
    from onnxcomp.calibration import chunks

    d = testing.digits_data()
    calib = [{"input": d["x_calib"][i:i + 8]} for i in range(0, 160, 8)]
    recipe = [{"type": "quantize", "mode": "static", "min_weight_elements": 0, "equalize": False,
               "bias_correction": True}]
    path = str(testing.digits_cnn_path())
    small = onnxcomp.compress(path, recipe, calibration_data=calib, progress=False, validate=False)
    assert any(n.endswith("bias_corrected") for n in _weights(small.model))
    monkeypatch.setattr(ir, "BIG_BYTES", 4096)
    monkeypatch.setattr(ir, "SKELETON_MIN_BYTES", 1024)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)
    res = onnxcomp.compress(path, recipe, calibration_data=calib, progress=False, validate=False)
    big_w = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    small_w = {t.name: onnx.numpy_helper.to_array(t) for t in small.model.graph.initializer}
    assert big_w.keys() == small_w.keys()
    rows = {r["node"]: r["relative_shift"] for r in small.report.passes[0].details["bias_correction"]["corrections"]}
    big_rows = {r["node"]: r["relative_shift"] for r in res.report.passes[0].details["bias_correction"]["corrections"]}
    assert {"conv1", "conv2"} <= set(rows) and big_rows.keys() == rows.keys()
    for n, shift in rows.items():
        assert big_rows[n] == pytest.approx(shift, rel=1e-3), n
    for n, v in small_w.items():
        if v.dtype == np.float32:
            np.testing.assert_allclose(big_w[n], v, rtol=1e-4, atol=1e-6, err_msg=n)


def test_weights_are_written_to_disk_once_for_all_sessions(monkeypatch, tmp_path):
    """Over 2 GB the pipeline keeps the weights in its tensor store: each float weight is written to disk once,
    at the first pass, and read from there by every session of every pass (a calibration run per chunk of
    moments, the sensitivity's float reference). Before, each session wrote the whole model again (17 chunks of
    the 2.3 GB bench model: 39 GB written) and the ModelProto held every weight beside the sessions' copies.
    The result holds its data again, and the store's files are gone."""
    from onnxcomp.calibration import chunks

    calib, _ = _data()
    path = testing.digits_mlp_path()
    small = onnxcomp.compress(str(path), RECIPES["dynamic"], calibration_data=calib, progress=False, validate=False)
    monkeypatch.setattr(ir, "BIG_BYTES", 4096)
    monkeypatch.setattr(ir, "SKELETON_MIN_BYTES", 1024)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)  # one layer's moments per calibration run
    writes, sessions = [], []
    real_write = ir.write_tensor_data
    folders = set()
    monkeypatch.setattr(ir, "write_tensor_data", lambda moved, p, with_data=True: folders.add(Path(p).parent) or
                        writes.append([(t.name, t.data_type) for _, t in moved] if with_data else []) or
                        real_write(moved, p, with_data))
    from onnxcomp.runtime import session
    real_session = session.make_session
    monkeypatch.setattr(session, "make_session", lambda m, providers=None, **kw: sessions.append(kw.get("name"))
                        or real_session(m, providers, **kw))
    res = onnxcomp.compress(str(path), RECIPES["dynamic"], calibration_data=calib, progress=False)
    assert _weights(res.model) == _weights(small.model)
    assert not ir.has_stored(res.model) and not list(ir.external_tensors(res.model))
    float_writes = [n for w in writes for n, dt in w if dt == onnx.TensorProto.FLOAT]
    weights = [t.name for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT
               and t.ByteSize() >= 1024]
    assert sorted(float_writes) == sorted(weights), writes  # each float weight once
    assert sessions.count("calibration model") >= 2 and "reference (layers)" in sessions, sessions
    store = [f for f in folders if f.name.startswith(ir.STORE_PREFIX)]
    assert len(store) == 1 and not store[0].exists() and ir.store_dir() is None, folders
    out = res.save(tmp_path / "m.onnx")
    onnx.checker.check_model(str(out), full_check=True)


def test_back_off_rounds_write_the_input_once(big):
    """A budget reruns the pipeline on the same input: over 2 GB its weights go to the store once, not once per
    round (each round rewrote the whole model to disk)."""
    from onnxcomp.errors import AccuracyBudgetError

    calib, _ = _data()
    writes = []
    real_write = ir.write_tensor_data

    def spy(moved, p, with_data=True):
        if with_data:
            writes.extend(t.name for _, t in moved if t.data_type == onnx.TensorProto.FLOAT)
        return real_write(moved, p, with_data)

    recipe = {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4", "block_size": 32,
                          "min_weight_elements": 0, "equalize": False}], "accuracy_budget": {"cosine": 0.99999}}
    import unittest.mock

    with unittest.mock.patch.object(ir, "write_tensor_data", spy):
        try:
            res = onnxcomp.compress(str(testing.digits_mlp_path()), recipe, calibration_data=calib, progress=False)
        except AccuracyBudgetError as e:
            res = e.result
    rounds = res.report.budget["backoff"]
    assert len(rounds) >= 2, rounds
    weights = [t.name for t in onnx.load(str(testing.digits_mlp_path())).graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT and t.ByteSize() >= 1024]
    # the store's copy once; validation's float sessions read the input's own file
    assert sorted(w for w in writes if w in weights) == sorted(weights), writes


def test_a_full_disk_while_keeping_the_weights_on_disk_is_a_save_error(big, monkeypatch):
    """No room in the temporary folder for the store: a SaveError that says how much room it needs and where,
    and nothing is left in the temporary folder."""
    import errno

    from onnxcomp.errors import SaveError

    real_write = ir.write_tensor_data
    folders = []

    def full(moved, p, with_data=True):
        if ir.STORE_PREFIX not in str(p):
            return real_write(moved, p, with_data)
        folders.append(Path(p).parent)
        with open(p, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ir, "write_tensor_data", full)
    calib, _ = _data()
    with pytest.raises(SaveError, match="No space left on device.*TMPDIR"):
        onnxcomp.compress(str(testing.digits_mlp_path()), RECIPES["dynamic"], calibration_data=calib,
                          progress=False)
    assert folders and not any(f.exists() for f in folders)  # the partial file and the store's folder
    assert ir.store_dir() is None and not ir._STORE_FILES


def test_stores_that_killed_compressions_left_are_swept(big, tmp_path, monkeypatch):
    """SIGKILL skips the store's cleanup, and it is the size of the model: the next store removes the folders of
    processes that are gone, once left for STALE_STORE_S; a live process's store and a fresh one are spared."""
    import tempfile
    import time

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead = int(gone.stdout)
    assert not ir._pid_alive(dead)
    old = time.time() - ir.STALE_STORE_S - 60
    folders = {}
    for label, pid, mtime in [("dead_old", dead, old), ("dead_fresh", dead, None), ("alive_old", os.getppid(), old),
                              ("other", None, old)]:
        f = tmp_path / (f"{ir.STORE_PREFIX}{pid}-{label}" if pid else f"unrelated-{label}")
        f.mkdir()
        (f / f"{ir.STORE_PREFIX}{pid}-0.data").write_bytes(b"\0" * 64)
        if mtime is not None:
            os.utime(f, (mtime, mtime))
        folders[label] = f
    calib, _ = _data()
    res = onnxcomp.compress(str(testing.digits_mlp_path()), RECIPES["dynamic"], calibration_data=calib,
                            progress=False)
    onnx.checker.check_model(res.model, full_check=True)
    assert not folders["dead_old"].exists()
    assert all(folders[k].exists() for k in ("dead_fresh", "alive_old", "other"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f"{ir.STORE_PREFIX}{os.getpid()}-")]


@pytest.mark.parametrize("name", ["int4", "channel", "lowrank"])
def test_new_weights_of_a_pass_wait_in_the_store(name, big, monkeypatch):
    """Over 2 GB a pass's new weights (quantized, refitted, factors) are written to the store as they are made,
    not held until the pass ends; the result holds every one of them, as the usual route makes them."""
    calib, _ = _data()
    stored = []
    real = ir.stored_constant
    def spy(n, v):
        c = real(n, v)
        if c is not None:
            stored.append(n)
        return c

    monkeypatch.setattr(ir, "stored_constant", spy)
    from onnxcomp.rewrite import rule
    monkeypatch.setattr(rule, "stored_constant", ir.stored_constant)
    res = onnxcomp.compress(str(testing.digits_mlp_path()), RECIPES[name], calibration_data=calib, progress=False)
    assert stored, "no new weight went through the store"
    kept = {t.name for t in res.model.graph.initializer}
    assert not ir.has_stored(res.model) and not list(ir.external_tensors(res.model))
    assert kept & {n for n in stored if n}, (stored, kept)
    monkeypatch.setattr(ir, "BIG_BYTES", ir.TWO_GB)
    small = onnxcomp.compress(str(testing.digits_mlp_path()), RECIPES[name], calibration_data=calib, progress=False)
    assert _weights(res.model) == _weights(small.model)
