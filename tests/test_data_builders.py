"""Feed builders: sentences through tokenizer.json and image files into feeds that compress accepts (MiniLM-L3,
digits CNN), checked against the model (errors name the input and what it expects), and to_npz round trips."""
import numpy as np
import pytest

import onnxcomp
from onnxcomp import testing
from onnxcomp.data import from_arrays, from_images, from_texts, load_feeds, input_specs, to_npz
from onnxcomp.errors import CalibrationDataError
from tests.test_cli import cli

pytest.importorskip("tokenizers", reason="from_texts needs the tokenizers package (dev extra)")
TOKENIZER = testing.models_dir() / "tokenizer.json"


def test_from_texts_matches_the_fixture_tokens_and_compress_accepts_them():
    sents = testing.sentences()[:20]
    feeds = from_texts(sents, tokenizer=TOKENIZER, model=testing.minilm_path())
    ref = testing.minilm_feeds(20)
    assert len(feeds) == 20
    for f, r in zip(feeds, ref):
        np.testing.assert_array_equal(f["input_ids"], r["input_ids"])
        np.testing.assert_array_equal(f["attention_mask"], r["attention_mask"])
    res = onnxcomp.compress(testing.minilm_path(), "lossless", calibration_data=feeds, progress=False)
    assert res.report.validation.samples == 4 and res.report.validation.feeds_source == "user"
    batched = from_texts(sents, tokenizer=TOKENIZER, model=testing.minilm_path(), batch_size=8, pad_to=24)
    assert [f["input_ids"].shape for f in batched] == [(8, 24), (8, 24), (4, 24)]
    assert batched[0]["attention_mask"][0].sum() == ref[0]["attention_mask"].sum()


def test_from_texts_names_what_does_not_fit():
    with pytest.raises(CalibrationDataError, match="cannot tell which model input.*'input'"):
        from_texts(["a sentence"], tokenizer=TOKENIZER, model=testing.digits_cnn_path())
    with pytest.raises(CalibrationDataError, match="tokenizer file not found"):
        from_texts(["a sentence"], tokenizer="nope/tokenizer.json")


def _digit_pngs(tmp_path, n=30):
    from PIL import Image

    d = testing.digits_data()
    for i in range(n):
        px = np.round(d["x_test"][i, 0] * 255).astype(np.uint8)  # the fixture's pixels are in [0, 1]
        Image.fromarray(px, mode="L").save(tmp_path / f"{i:03d}.png")
    return d["x_test"][:n], d["y_test"][:n]


def test_from_images_gives_the_fixture_inputs_and_compress_accepts_them(tmp_path):
    x, y = _digit_pngs(tmp_path)
    cnn = testing.digits_cnn_path()
    feeds = from_images(tmp_path, model=cnn)  # size and channels from the model's input [N, 1, 8, 8]
    got = np.concatenate([f["input"] for f in feeds])
    assert got.shape == x.shape and np.abs(got - x).max() <= 0.5 / 255 + 1e-6
    sess = testing.session(cnn)
    assert (sess.run(None, {"input": got})[0].argmax(1) == sess.run(None, {"input": x})[0].argmax(1)).all()
    res = onnxcomp.compress(cnn, "int8", calibration_data=feeds, progress=False, validate=False)
    assert res.recipe.passes[1].mode == "static"
    assert [f["input"].shape for f in from_images(tmp_path, model=cnn, batch_size=16)] == [(16, 1, 8, 8),
                                                                                          (14, 1, 8, 8)]


def test_from_images_wrong_size_names_the_input_and_its_shape(tmp_path):
    _digit_pngs(tmp_path, n=2)
    with pytest.raises(CalibrationDataError, match=r"'input'.*8"):
        from_images(tmp_path, model=testing.digits_cnn_path(), size=(16, 16))
    with pytest.raises(CalibrationDataError, match="not found"):
        from_images(tmp_path / "missing.png")


def test_to_npz_round_trips_stacked_and_ragged(tmp_path):
    d = testing.digits_data()
    spec = input_specs(onnxcomp.ir.load_proto(testing.digits_mlp_path()))
    feeds = from_arrays({"input": d["x_calib_flat"][:10]}, model=testing.digits_mlp_path(), batch_size=4)
    assert [f["input"].shape for f in feeds] == [(4, 64), (4, 64), (2, 64)]
    back = load_feeds(to_npz(feeds, tmp_path / "c.npz"), spec)
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in back]), d["x_calib_flat"][:10])
    ragged = from_texts(testing.sentences()[:6], tokenizer=TOKENIZER)
    with pytest.raises(CalibrationDataError, match="different shapes"):
        to_npz(ragged, tmp_path / "t.npz")
    folder = to_npz(ragged, tmp_path / "texts")
    again = load_feeds(folder, input_specs(onnxcomp.ir.load_proto(testing.minilm_path())))
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(again, ragged))


def test_cli_data_verbs_feed_compress(tmp_path):
    _digit_pngs(tmp_path / "imgs" if (tmp_path / "imgs").mkdir() is None else tmp_path)
    r = cli("data", "images", tmp_path / "imgs", "--model", testing.digits_cnn_path(), "-o", tmp_path / "c.npz")
    assert r.returncode == 0 and "wrote 30 feed(s)" in r.stdout, r.stderr
    c = cli("compress", testing.digits_cnn_path(), "-o", tmp_path / "o.onnx", "--preset", "int8",
            "--calibration", tmp_path / "c.npz")
    assert c.returncode == 0, c.stderr
    bad = cli("data", "images", tmp_path / "imgs", "--model", testing.digits_cnn_path(), "--size", "4", "4",
              "-o", tmp_path / "x.npz")
    assert bad.returncode == 2 and "'input'" in bad.stderr
    (tmp_path / "s.txt").write_text("\n".join(testing.sentences()[:5]))
    t = cli("data", "texts", tmp_path / "s.txt", "--tokenizer", TOKENIZER, "--model", testing.minilm_path(),
            "-o", tmp_path / "t.npz", "--pad-to", 32)
    assert t.returncode == 0 and "(1, 32)" in t.stdout, t.stderr
