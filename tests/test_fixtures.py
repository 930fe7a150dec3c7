"""The real-model fixtures in models/ (built by tools/build_fixtures.py) and the onnxcomp.testing API."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from onnxcomp import testing as fx

DIGITS = {"mlp": (fx.digits_mlp_path, 0.95, ["batch", 64]), "cnn": (fx.digits_cnn_path, 0.97, ["batch", 1, 8, 8])}


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# --------------------------------------------------------------------------------------- digits


@pytest.mark.parametrize("name", sorted(DIGITS))
def test_digits_model_is_valid_onnx(name: str) -> None:
    path_fn, _, in_dims = DIGITS[name]
    path = path_fn()
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert m.ir_version == 8
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    assert _dims(m.graph.input[0]) == in_dims
    assert _dims(m.graph.output[0]) == ["batch", 10]
    assert all(n.name for n in m.graph.node)
    assert {"fc1.weight", "fc1.bias"} <= {i.name for i in m.graph.initializer}
    assert path.stat().st_size < 5 * 2**20


@pytest.mark.parametrize("name", sorted(DIGITS))
def test_digits_top1(name: str) -> None:
    path_fn, threshold, _ = DIGITS[name]
    d = fx.digits_data()
    acc = fx.digits_top1(path_fn(), d["x_test"], d["y_test"])
    assert acc >= threshold
    # the flattened view gives the same answer (digits_top1 reshapes to the model's input rank)
    assert fx.digits_top1(path_fn(), d["x_test_flat"], d["y_test"]) == acc


def test_digits_data() -> None:
    d = fx.digits_data()
    assert d["x_calib"].shape == (200, 1, 8, 8) and d["x_calib"].dtype == np.float32
    assert d["x_test"].shape == (500, 1, 8, 8) and d["x_test"].dtype == np.float32
    assert d["y_test"].shape == (500,) and d["y_test"].dtype == np.int64
    assert d["x_test_flat"].shape == (500, 64)
    for x in (d["x_calib"], d["x_test"]):
        assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(d["y_test"])) == set(range(10))
    assert np.bincount(d["y_test"]).min() >= 45  # stratified split


def test_session_accepts_path_and_modelproto_with_dynamic_batch() -> None:
    path = fx.digits_cnn_path()
    x = fx.digits_data()["x_test"][:7]
    by_path = fx.session(path).run(None, {"input": x})[0]
    by_proto = fx.session(onnx.load(str(path))).run(None, {"input": x})[0]
    one = fx.session(path).run(None, {"input": x[:1]})[0]
    assert by_path.shape == (7, 10)
    np.testing.assert_array_equal(by_path, by_proto)
    np.testing.assert_allclose(one, by_path[:1], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- sentences


def test_sentences_and_tokens_are_in_sync() -> None:
    s = fx.sentences()
    assert len(s) >= 400 and all(line.strip() for line in s)
    assert len(set(s)) == len(s)
    npz = fx.models_dir() / "minilm-l3" / "sentences_tokens.npz"
    with np.load(npz) as z:
        # a stale committed token file would silently feed the wrong sentences
        digest = hashlib.sha256((fx.models_dir() / "sentences.txt").read_bytes()).hexdigest()
        assert str(z["source_sha256"]) == digest
        assert len(z["offsets"]) == len(s) + 1


def test_minilm_feeds_shapes_and_padding() -> None:
    single = fx.minilm_feeds(n=5)
    assert len(single) == 5
    for f in single:
        ids, mask = f["input_ids"], f["attention_mask"]
        assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape and ids.shape[0] == 1
        assert ids[0, 0] == 101 and ids[0, -1] == 102 and mask.all()  # [CLS] ... [SEP], unpadded
    batched = fx.minilm_feeds(n=5, batch_size=4)
    assert [f["input_ids"].shape[0] for f in batched] == [4, 1]
    lengths = [f["input_ids"].shape[1] for f in single]
    assert batched[0]["input_ids"].shape[1] == max(lengths[:4])
    np.testing.assert_array_equal(batched[0]["attention_mask"].sum(1), lengths[:4])
    fixed = fx.minilm_feeds(n=3, start=2, batch_size=3, pad_to=128)
    assert fixed[0]["input_ids"].shape == (3, 128)
    np.testing.assert_array_equal(fixed[0]["input_ids"][0, : lengths[2]], single[2]["input_ids"][0])
    with pytest.raises(ValueError):
        fx.minilm_feeds(n=2, batch_size=2, pad_to=3)


# --------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm() -> str:
    try:
        return str(fx.minilm_path())
    except fx.FixtureUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def minilm_ref(minilm: str) -> np.ndarray:
    return fx.minilm_embed(minilm, fx.minilm_feeds(batch_size=16))


def test_minilm_interface(minilm: str) -> None:
    sess = fx.session(minilm)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert fx.MINILM_EMBEDDING_OUTPUT in [o.name for o in sess.get_outputs()]


def test_minilm_embeddings_sane_and_padding_invariant(minilm: str, minilm_ref: np.ndarray) -> None:
    emb = fx.minilm_embed(minilm, fx.minilm_feeds(n=20))  # one sentence per run, no padding
    assert emb.shape == (20, 384) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    norms = np.linalg.norm(emb, axis=1)
    assert (norms > 1.0).all() and (norms < 20.0).all()
    # padded batches of 16 give the same embeddings as unpadded single sentences
    m = fx.minilm_metrics(emb, minilm_ref[:20])
    assert m["cosine_min"] > 0.99999


def test_minilm_fp32_retrieval(minilm_ref: np.ndarray) -> None:
    m = fx.minilm_metrics(minilm_ref, minilm_ref)
    assert m["n"] == len(fx.sentences()) and m["n_pairs"] == 100
    assert m["cosine_mean"] == pytest.approx(1.0, abs=1e-6) and m["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["pair_top1"] >= 0.8 and m["pair_top1"] == m["ref_pair_top1"]
    assert m["neighbor_agreement"] == 1.0 and m["similarity_spearman"] == pytest.approx(1.0)


def test_minilm_metrics_detect_damage_and_respect_offset(minilm_ref: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    noisy = minilm_ref + rng.standard_normal(minilm_ref.shape).astype(np.float32) * 0.1
    m = fx.minilm_metrics(minilm_ref, noisy)
    assert 0.9 < m["cosine_mean"] < 0.9999 and m["cosine_min"] <= m["cosine_mean"]
    assert m["similarity_spearman"] < 0.999
    assert fx.minilm_metrics(minilm_ref, -minilm_ref)["cosine_mean"] == pytest.approx(-1.0)
    part = fx.minilm_metrics(minilm_ref[10:30], minilm_ref[10:30], offset=10)
    assert part["n_pairs"] == 10
    odd = fx.minilm_metrics(minilm_ref[11:31], minilm_ref[11:31], offset=11)
    assert odd["n_pairs"] == 9  # lines 11 and 30 lose their partners


def test_minilm_embed_mean_pools_when_pooled_output_is_absent(minilm: str, minilm_ref: np.ndarray) -> None:
    m = onnx.load(minilm)
    keep = [o for o in m.graph.output if o.name == fx.MINILM_TOKEN_OUTPUT]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    emb = fx.minilm_embed(m, fx.minilm_feeds(n=32, batch_size=16))
    np.testing.assert_allclose(emb, minilm_ref[:32], rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------- decoder


def _decoder_module():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_decoder_fixture",
                                                  Path(__file__).parents[1] / "tools" / "decoder_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decoder_trainer_gradients_match_finite_differences() -> None:
    """The hand-written backward of the Llama-style trainer (RMSNorm, rotary, GQA, SwiGLU) in float64."""
    dfx = _decoder_module()
    cfg = dfx.config(V=11, D=8, L=2, HQ=4, HKV=2, DH=2, FF=6)
    rng = np.random.default_rng(0)
    p = {k: v + rng.normal(0, 0.3, v.shape) for k, v in dfx.init_params(cfg, dtype=np.float64).items()}
    tok, tgt = rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 5))
    logits, cache = dfx.forward(p, tok, cfg)
    grads = dfx.backward(p, cache, dfx.loss_grad(logits, tgt)[1], cfg)
    for k in p:
        for _ in range(3):
            idx = tuple(int(rng.integers(0, s)) for s in p[k].shape)
            old = p[k][idx]
            p[k][idx] = old + 1e-6
            up = dfx.loss_grad(dfx.forward(p, tok, cfg)[0], tgt)[0]
            p[k][idx] = old - 1e-6
            down = dfx.loss_grad(dfx.forward(p, tok, cfg)[0], tgt)[0]
            p[k][idx] = old
            assert abs((up - down) / 2e-6 - grads[k][idx]) < 1e-6 * max(1.0, abs(grads[k][idx])), (k, idx)


def test_decoder_model_interface_and_held_out_quality() -> None:
    path = fx.decoder_path()
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert [i.name for i in m.graph.input] == ["input_ids"] and _dims(m.graph.input[0]) == ["batch", "sequence"]
    assert _dims(m.graph.output[0]) == ["batch", "sequence", 256]
    ops = {n.op_type for n in m.graph.node}
    assert {"Sigmoid", "Expand", "Softmax", "ReduceMean", "Neg", "Concat"} <= ops  # SwiGLU, GQA, RMSNorm, rotary
    held = fx.decoder_windows("eval")
    assert held.shape[1] == 65 and len(held) >= 50
    logits = fx.decoder_logits(path, fx.decoder_feeds(held))
    met = fx.decoder_metrics(logits, logits, held)
    assert met["top1_agreement"] == 1.0 and met["bpb_ratio"] == 1.0
    assert met["bits_per_byte"] < 3.0  # a unigram byte model gives ~4.3 on this text
    meta = {p.key: p.value for p in m.metadata_props}
    assert abs(float(meta["heldout_bits_per_byte"]) - met["bits_per_byte"]) < 0.02
    calib = fx.decoder_windows("calib", 8)
    assert not any((calib[i, :16] == held[j, :16]).all() for i in range(len(calib)) for j in range(len(held)))
