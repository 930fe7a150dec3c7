"""onnxcomp.data: feed sources, feed checks (errors name the culprit), and generated feeds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from onnxcomp import compress
from onnxcomp import testing as fx
from onnxcomp.data import InputSpec, check_feeds, generate_feeds, input_specs, load_feeds
from onnxcomp.errors import CalibrationDataError, UnsupportedModelError
from onnxcomp.validation import validate


def _model(nodes, inputs, outputs, inits=(), ir_version=8):
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = ir_version
    return m


def _two_input_model() -> onnx.ModelProto:
    """x float [batch, 4], ids int64 [batch, seq] -> y = x @ W (W [4,3]), e = Gather(table[10,2], ids)."""
    w = h.make_tensor("W", T.FLOAT, [4, 3], np.arange(12, dtype=np.float32) / 10)
    table = h.make_tensor("table", T.FLOAT, [10, 2], np.arange(20, dtype=np.float32))
    return _model(
        [h.make_node("MatMul", ["x", "W"], ["y"]), h.make_node("Gather", ["table", "ids"], ["e"])],
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4]), h.make_tensor_value_info("ids", T.INT64, ["batch", "seq"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", 3]), h.make_tensor_value_info("e", T.FLOAT, ["batch", "seq", 2])],
        [w, table],
    )


@pytest.fixture
def specs() -> list[InputSpec]:
    return input_specs(_two_input_model())


def _feed(b=1, seq=5, **over):
    f = {"x": np.ones((b, 4), np.float32), "ids": np.zeros((b, seq), np.int64)}
    f.update(over)
    return f


# ------------------------------------------------------------------------------------------ specs
def test_input_specs_shapes_dtypes_and_initializer_inputs_excluded() -> None:
    w = h.make_tensor("W", T.FLOAT, [4, 3], np.zeros(12, np.float32))
    m = _model(
        [h.make_node("MatMul", ["x", "W"], ["y"])],
        [h.make_tensor_value_info("x", T.FLOAT16, ["batch", None, 4]), h.make_tensor_value_info("W", T.FLOAT, [4, 3])],
        [h.make_tensor_value_info("y", T.FLOAT16, None)],
        [w],
        ir_version=3,
    )
    (s,) = input_specs(m)
    assert (s.name, s.elem_type, s.dtype, s.shape) == ("x", T.FLOAT16, np.dtype(np.float16), ("batch", None, 4))
    m2 = _model([], [h.make_tensor_value_info("q", T.BOOL, None)], [h.make_tensor_value_info("q", T.BOOL, None)])
    assert input_specs(m2) == [InputSpec("q", T.BOOL, np.dtype(bool), None)]


# ------------------------------------------------------------------------------------------ sources
def test_list_of_dicts(specs) -> None:
    feeds = load_feeds([_feed(), _feed(b=2, seq=3)], specs)
    assert len(feeds) == 2 and feeds[1]["ids"].shape == (2, 3)


def test_generator_is_consumed_lazily_up_to_limit(specs) -> None:
    pulled = []

    def gen():
        for i in range(100):
            pulled.append(i)
            yield _feed()

    feeds = load_feeds(gen(), specs, limit=3)
    assert len(feeds) == 3 and pulled == [0, 1, 2]


def test_calibration_data_reader(specs) -> None:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([_feed(), _feed(), _feed()])

        def get_next(self):
            return next(self.it, None)

    assert len(load_feeds(Reader(), specs)) == 3
    r = Reader()
    assert len(load_feeds(r, specs, limit=2)) == 2
    assert r.get_next() is not None  # the third sample was not consumed

    class Duck:  # not a subclass: anything with get_next() works
        def __init__(self):
            self.n = 2

        def get_next(self):
            self.n -= 1
            return _feed() if self.n >= 0 else None

    assert len(load_feeds(Duck(), specs)) == 2


def test_npz_stacked_on_axis0_keeps_batch_dim_1(tmp_path, specs) -> None:
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    ids = np.arange(6 * 5, dtype=np.int64).reshape(6, 5) % 10
    p = tmp_path / "d.npz"
    np.savez(p, x=x, ids=ids)
    for src in (p, str(p)):
        feeds = load_feeds(src, specs)
        assert len(feeds) == 6
        assert feeds[2]["x"].shape == (1, 4) and feeds[2]["ids"].shape == (1, 5)
        np.testing.assert_array_equal(feeds[2]["x"][0], x[2])
    assert len(load_feeds(p, specs, limit=4)) == 4


def test_npz_with_one_extra_dim_is_indexed(tmp_path) -> None:
    m = _model([h.make_node("Relu", ["x"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, [3, 2])],
               [h.make_tensor_value_info("y", T.FLOAT, [3, 2])])
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((5, 3, 2), np.float32))
    feeds = load_feeds(p, input_specs(m))
    assert len(feeds) == 5 and feeds[0]["x"].shape == (3, 2)


def test_directory_of_npz_sorted_by_name(tmp_path, specs) -> None:
    for i, name in enumerate(["b.npz", "a.npz", "c.npz"]):
        np.savez(tmp_path / name, **_feed(seq=i + 1))
    (tmp_path / "README.txt").write_text("ignored")
    feeds = load_feeds(tmp_path, specs)
    assert [f["ids"].shape[1] for f in feeds] == [2, 1, 3]  # a (seq 2), b (seq 1), c (seq 3)
    assert len(load_feeds(tmp_path, specs, limit=2)) == 2


def test_real_digits_npz(tmp_path) -> None:
    try:
        path, data = fx.digits_mlp_path(), fx.digits_data()
    except fx.FixtureUnavailable as e:
        pytest.skip(str(e))
    p = tmp_path / "calib.npz"
    np.savez(p, input=data["x_calib_flat"].astype(np.float32))
    feeds = load_feeds(p, input_specs(onnx.load(str(path))), limit=10)
    assert len(feeds) == 10 and feeds[0]["input"].shape == (1, 64)


# ------------------------------------------------------------------------------------------ errors
def _err(src, specs, **kw) -> str:
    with pytest.raises(CalibrationDataError) as ei:
        load_feeds(src, specs, **kw)
    return str(ei.value)


def test_empty_sources(tmp_path, specs) -> None:
    assert "empty" in _err([], specs)
    assert "empty" in _err(iter(()), specs, what="validation data")
    assert "no .npz" in _err(tmp_path, specs)


def test_missing_path_and_corrupt_npz(tmp_path, specs) -> None:
    assert "not found" in _err(tmp_path / "nope.npz", specs)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    assert "bad.npz" in _err(bad, specs)
    good = tmp_path / "good.npz"
    np.savez(good, **_feed())
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[:60])
    assert "trunc.npz" in _err(trunc, specs)
    np.savez(tmp_path / "uneven.npz", x=np.ones((3, 4), np.float32), ids=np.zeros((2, 5), np.int64))
    msg = _err(tmp_path / "uneven.npz", specs)
    assert "'x': 3" in msg and "'ids': 2" in msg
    np.save(tmp_path / "one.npy", np.ones((3, 4), np.float32))
    assert ".npy" in _err(tmp_path / "one.npy", specs)


def test_non_dict_items_and_bad_source_types(specs) -> None:
    msg = _err([_feed(), [1, 2]], specs)
    assert "sample 1" in msg and "list" in msg
    assert "single mapping" in _err(_feed(), specs)
    assert "numpy array" in _err(np.zeros((2, 4), np.float32), specs)
    assert "int" in _err(42, specs)


def test_missing_and_unknown_names(specs) -> None:
    msg = _err([{"x": np.ones((1, 4), np.float32)}], specs)
    assert "'ids'" in msg and "'x'" in msg and "lacks" in msg
    msg = _err([_feed(extra=np.ones(1))], specs)
    assert "'extra'" in msg and "unknown" in msg


def test_dtype_errors_and_safe_casts(specs) -> None:
    msg = _err([_feed(x=np.ones((1, 4), np.float64))], specs)
    assert "'x'" in msg and "float64" in msg and "float32" in msg
    msg = _err([_feed(ids=np.zeros((1, 5), np.float32))], specs)
    assert "'ids'" in msg and "float32" in msg and "int64" in msg
    # lossless: int32 -> int64, python ints/floats (no dtype of their own) -> the input's dtype
    (f,) = load_feeds([_feed(ids=np.zeros((1, 5), np.int32), x=[[1.0, 2.0, 3.0, 4.0]])], specs)
    assert f["ids"].dtype == np.int64 and f["x"].dtype == np.float32
    (f,) = load_feeds([_feed(ids=[[1, 2, 3]])], specs)
    assert f["ids"].dtype == np.int64 and f["ids"].shape == (1, 3)


def test_rank_and_dim_errors(specs) -> None:
    msg = _err([_feed(x=np.ones((4,), np.float32))], specs)
    assert "'x'" in msg and "rank is 1" in msg and "rank 2" in msg
    msg = _err([_feed(x=np.ones((1, 5), np.float32))], specs)
    assert "'x'" in msg and "dim 1 is 5" in msg and "4" in msg
    # one symbolic dim, two values in one sample
    msg = _err([_feed(b=1, x=np.ones((2, 4), np.float32))], specs)
    assert "'batch'" in msg and "'ids'" in msg


def test_nan_and_inf_are_legitimate_inputs(specs) -> None:
    from onnxcomp.data.feeds import nonfinite_values

    x = np.ones((1, 4), np.float32)
    x[0, 2] = np.nan
    y = x.copy()
    y[0, 0] = -np.inf
    out = check_feeds([_feed(), _feed(x=x), _feed(x=y)], specs)
    assert np.isnan(out[1]["x"][0, 2]) and np.isneginf(out[2]["x"][0, 0])
    assert nonfinite_values(out) == {"x": 3}


def test_check_feeds_does_not_mutate(specs) -> None:
    f = _feed(ids=np.zeros((1, 5), np.int32))
    out = check_feeds([f], specs, "data")
    assert f["ids"].dtype == np.int32 and out[0]["ids"].dtype == np.int64 and out[0] is not f


# ------------------------------------------------------------------------------------------ generate
def test_generate_feeds_follow_names_and_gather_tables() -> None:
    table = h.make_tensor("table", T.FLOAT, [7, 2], np.arange(14, dtype=np.float32))
    pos_table = h.make_tensor("pos_table", T.FLOAT, [64, 2], np.zeros(128, dtype=np.float32))
    shape = h.make_tensor("shape", T.INT64, [1], [-1])
    m = _model(
        [
            h.make_node("Cast", ["input_ids"], ["ids32"], to=T.INT32),
            h.make_node("Reshape", ["ids32", "shape"], ["flat"]),
            h.make_node("Gather", ["table", "flat"], ["e"]),
            h.make_node("Gather", ["pos_table", "position_ids"], ["p"]),
            h.make_node("Cast", ["attention_mask"], ["mf"], to=T.FLOAT),
            h.make_node("Cast", ["token_type_ids"], ["tf"], to=T.FLOAT),
            h.make_node("Cast", ["flag"], ["ff"], to=T.FLOAT),
            h.make_node("Cast", ["other"], ["of"], to=T.FLOAT),
            h.make_node("Cast", ["half"], ["hf"], to=T.FLOAT),
        ],
        [
            h.make_tensor_value_info("input_ids", T.INT64, ["batch_size", "sequence_length"]),
            h.make_tensor_value_info("attention_mask", T.INT64, ["batch_size", "sequence_length"]),
            h.make_tensor_value_info("token_type_ids", T.INT32, ["batch_size", "sequence_length"]),
            h.make_tensor_value_info("position_ids", T.INT64, ["batch_size", "sequence_length"]),
            h.make_tensor_value_info("flag", T.BOOL, [None, 3]),
            h.make_tensor_value_info("other", T.INT64, ["batch_size", "other_len"]),
            h.make_tensor_value_info("half", T.FLOAT16, ["batch_size", 2, "k"]),
        ],
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("e", "p", "mf", "tf", "ff", "of", "hf")],
        [table, pos_table, shape],
    )
    (f,) = generate_feeds(m, input_specs(m), seed=1)
    assert f["input_ids"].shape == f["attention_mask"].shape == f["token_type_ids"].shape == (1, 16)
    assert f["input_ids"].dtype == np.int64 and f["token_type_ids"].dtype == np.int32
    assert 0 <= f["input_ids"].min() and f["input_ids"].max() < 7 and len(np.unique(f["input_ids"])) > 1
    assert (f["attention_mask"] == 1).all() and (f["token_type_ids"] == 0).all()
    np.testing.assert_array_equal(f["position_ids"][0], np.arange(16))
    assert f["flag"].dtype == bool and f["flag"].shape == (1, 3)
    assert set(np.unique(f["other"])) <= {0, 1}
    assert f["half"].dtype == np.float16 and f["half"].shape == (1, 2, 16)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, f)
    # dim_values, n, determinism, and the result passes check_feeds
    feeds = generate_feeds(m, None, n=3, seed=1, dim_values={"sequence_length": 5, "batch_size": 2})
    assert len(feeds) == 3 and feeds[0]["input_ids"].shape == (2, 5) and feeds[0]["other"].shape == (2, 16)
    check_feeds(feeds, input_specs(m), "generated")
    again = generate_feeds(m, None, n=3, seed=1, dim_values={"sequence_length": 5, "batch_size": 2})
    for a, b in zip(feeds, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_generate_feeds_refuses_what_it_cannot_make() -> None:
    seq = h.make_value_info("s", h.make_sequence_type_proto(h.make_tensor_type_proto(T.FLOAT, None)))
    m = _model([h.make_node("SequenceLength", ["s"], ["t"])], [seq], [h.make_tensor_value_info("t", T.INT64, [])])
    with pytest.raises(UnsupportedModelError, match="'s' of type non-tensor"):
        generate_feeds(m, input_specs(m))
    m2 = _model([h.make_node("Identity", ["u"], ["v"])], [h.make_tensor_value_info("u", T.FLOAT, None)],
                [h.make_tensor_value_info("v", T.FLOAT, None)])
    with pytest.raises(UnsupportedModelError, match="'u'"):
        generate_feeds(m2, input_specs(m2))


def test_generated_string_feeds_validate_a_string_model() -> None:
    """String inputs get random words (they were refused, so cleanup on a StringNormalizer model without
    validation data failed); the validator compares string outputs exactly."""
    m = _model([h.make_node("StringNormalizer", ["s"], ["t"], stopwords=["monday"], is_case_sensitive=1)],
               [h.make_tensor_value_info("s", T.STRING, [1, 5])], [h.make_tensor_value_info("t", T.STRING, [1, None])])
    f1, f2 = generate_feeds(m, input_specs(m), n=2, seed=0)
    assert f1["s"].shape == (1, 5) and f1["s"].dtype == object and all(isinstance(w, str) and w for w in f1["s"].flat)
    assert (f1["s"] != f2["s"]).any()
    res = compress(m, ["cleanup"], progress=False)
    assert res.report.validation.outputs["t"].max_abs_err == 0.0


def test_generate_feeds_minilm() -> None:
    try:
        path = fx.minilm_path()
    except fx.FixtureUnavailable as e:
        pytest.skip(str(e))
    m = onnx.load(str(path))
    feeds = generate_feeds(m, input_specs(m), n=2, seed=0)
    for f in feeds:
        ids, mask = f["input_ids"], f["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == 1 and ids.dtype == mask.dtype == np.int64
        assert (mask == 1).all()
        assert ids.min() >= 0 and ids.max() < 30522 and ids.max() > 1  # indices into the 30522-row vocabulary
    emb = fx.minilm_embed(fx.session(path), feeds)
    assert emb.shape == (2, 384) and np.isfinite(emb).all()


def test_generated_feeds_keep_rank_zero_inputs():
    """A scalar (rank-0) input stays rank 0 (np.ascontiguousarray would make it [1])."""
    g = h.make_graph([h.make_node("Add", ["a", "b"], ["c"])], "g",
                     [h.make_tensor_value_info("a", T.FLOAT, []), h.make_tensor_value_info("b", T.FLOAT, [])],
                     [h.make_tensor_value_info("c", T.FLOAT, [])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    (feed,) = generate_feeds(m, input_specs(m), n=1)
    assert feed["a"].shape == () and feed["b"].shape == ()
    rep = validate(m, m)
    assert rep.outputs["c"].max_abs_err == 0.0


def test_compress_checks_each_sample_once_through_calibration_validation_and_backoff(monkeypatch) -> None:
    """The user's data is checked once (api), then reused by calibration, validation and every back-off round."""
    import onnxcomp
    from onnxcomp.data import feeds as feeds_mod

    data = fx.digits_data()
    x = data["x_test_flat"].astype(np.float32)
    samples = [{"input": x[i:i + 10]} for i in range(0, 120, 10)]
    held = [{"input": x[i:i + 10]} for i in range(200, 240, 10)]
    calls = []
    real = feeds_mod._check_sample
    monkeypatch.setattr(feeds_mod, "_check_sample", lambda feed, i, *a: calls.append(i) or real(feed, i, *a))
    recipe = {"passes": [{"type": "sparsify", "sparsity": 0.9}], "accuracy_budget": {"cosine": 0.99999}}
    try:
        result = onnxcomp.compress(fx.digits_mlp_path(), recipe, calibration_data=samples, validation_data=held)
    except onnxcomp.AccuracyBudgetError as e:
        result = e.result
    assert len(result.report.budget["backoff"]) >= 1  # back-off rounds calibrated and validated again
    assert len(calls) == len(samples) + len(held)
