"""The Llama-style decoder fixture: a byte-level language model trained here in numpy, exported with onnx.helper.

Architecture (what people deploy now, small enough to train in minutes on 2 cores): byte embeddings (256),
3 blocks of RMSNorm -> grouped-query attention (8 query heads, 2 KV heads, head size 24, rotary position
embedding on half-rotated pairs) -> residual, RMSNorm -> SwiGLU MLP (silu(x Wg) * (x Wu) -> Wd, 640 hidden)
-> residual; final RMSNorm and an untied byte head. Trained with Adam on next-byte cross-entropy over
`sentences.txt` lines 0..339 (a quarter of the windows) and CPython's own documentation text
(`pydoc_data.topics`, 0.46 MB of English in every Python; three quarters): 23 KB of sentences alone overfit
(held-out 3.0 bits/byte and rising). Lines 340..399 are held out for evaluation.

The ONNX graph follows the form `torch.onnx.export` gives a Hugging Face Llama: RMSNorm as Pow/ReduceMean/Add/
Sqrt/Reciprocal/Mul/Mul, SiLU as Sigmoid*x, rotary as Slice halves + Neg + Concat times cos/sin caches sliced to
the sequence length, repeat_kv as Unsqueeze/Expand/Reshape, an additive causal mask sliced from a cache.
Called by build_fixtures.py (which passes its Adam, model finisher and atomic writer).
"""
from __future__ import annotations

from typing import Any

V, D, LAYERS, HQ, HKV, DH, FF = 256, 192, 3, 8, 2, 24, 640
CONTEXT = 128  # rotary/mask caches cover this many positions
TRAIN_SENTENCES = 340
EPS = 1e-5
MASK = -1e9
SEED = 7
STEPS, BATCH, SEQ, LR = 900, 16, 64, 3e-3
SENTENCE_SHARE = 0.25  # of the training windows; the rest come from pydoc_data.topics


def config(**over: int) -> dict[str, int]:
    c = dict(V=V, D=D, L=LAYERS, HQ=HQ, HKV=HKV, DH=DH, FF=FF)
    c.update(over)
    return c


def init_params(cfg: dict[str, int], seed: int = SEED, dtype: Any = None) -> dict:
    import numpy as np

    dtype = dtype or np.float32
    rng = np.random.default_rng(seed)
    d, f, hq, hkv, dh = cfg["D"], cfg["FF"], cfg["HQ"], cfg["HKV"], cfg["DH"]
    std, out_std = 0.02, 0.02 / np.sqrt(2 * cfg["L"])
    p = {"embed": rng.normal(0, 0.3, (cfg["V"], d))}
    for i in range(cfg["L"]):
        p[f"l{i}.ln1"] = np.ones(d)
        p[f"l{i}.wq"] = rng.normal(0, std, (d, hq * dh))
        p[f"l{i}.wk"] = rng.normal(0, std, (d, hkv * dh))
        p[f"l{i}.wv"] = rng.normal(0, std, (d, hkv * dh))
        p[f"l{i}.wo"] = rng.normal(0, out_std, (hq * dh, d))
        p[f"l{i}.ln2"] = np.ones(d)
        p[f"l{i}.wg"] = rng.normal(0, std, (d, f))
        p[f"l{i}.wu"] = rng.normal(0, std, (d, f))
        p[f"l{i}.wd"] = rng.normal(0, out_std, (f, d))
    p["norm"] = np.ones(d)
    p["head"] = rng.normal(0, std, (d, cfg["V"]))
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in p.items()}


def rope_tables(n: int, dh: int, dtype: Any = None):
    """cos, sin [n, dh]: Llama's rotary tables (frequencies repeated for the two halves)."""
    import numpy as np

    inv = 1.0 / (10000.0 ** (np.arange(0, dh, 2) / dh))
    ang = np.arange(n)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(dtype or np.float32), np.sin(ang).astype(dtype or np.float32)


def _rot(x):
    import numpy as np

    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _rot_t(z):
    import numpy as np

    h = z.shape[-1] // 2
    return np.concatenate([z[..., h:], -z[..., :h]], axis=-1)


def _rms(x, g):
    import numpy as np

    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
    n = x * r
    return n * g, (r, n, g)


def _rms_back(dy, c):
    r, n, g = c
    dg = (dy * n).reshape(-1, n.shape[-1]).sum(0)
    dn = dy * g
    return r * (dn - n * (dn * n).mean(-1, keepdims=True)), dg


def forward(p: dict, tok, cfg: dict[str, int]):
    """Logits [B, T, V] of byte ids `tok` [B, T], and the cache the backward pass reads."""
    import numpy as np

    b, t = tok.shape
    hq, hkv, dh, d = cfg["HQ"], cfg["HKV"], cfg["DH"], cfg["D"]
    rep = hq // hkv
    cos, sin = rope_tables(t, dh, p["embed"].dtype)
    mask = np.triu(np.full((t, t), MASK, p["embed"].dtype), 1)
    x = p["embed"][tok]
    caches = []
    for i in range(cfg["L"]):
        h, c1 = _rms(x, p[f"l{i}.ln1"])
        q = (h @ p[f"l{i}.wq"]).reshape(b, t, hkv, rep, dh).transpose(0, 2, 3, 1, 4)
        k = (h @ p[f"l{i}.wk"]).reshape(b, t, hkv, dh).transpose(0, 2, 1, 3)
        v = (h @ p[f"l{i}.wv"]).reshape(b, t, hkv, dh).transpose(0, 2, 1, 3)
        qr, kr = q * cos + _rot(q) * sin, k * cos + _rot(k) * sin
        s = qr @ kr[:, :, None].swapaxes(-1, -2) / np.sqrt(dh) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        pr = s / s.sum(-1, keepdims=True)
        o = pr @ v[:, :, None]  # [b, g, r, t, dh]
        oc = o.transpose(0, 3, 1, 2, 4).reshape(b, t, hq * dh)
        x = x + oc @ p[f"l{i}.wo"]
        h2, c2 = _rms(x, p[f"l{i}.ln2"])
        a, u = h2 @ p[f"l{i}.wg"], h2 @ p[f"l{i}.wu"]
        sg = 1.0 / (1.0 + np.exp(-a))
        m = a * sg * u
        x = x + m @ p[f"l{i}.wd"]
        caches.append((h, c1, qr, kr, v, pr, oc, h2, c2, a, u, sg, m))
    hf, cf = _rms(x, p["norm"])
    return hf @ p["head"], (tok, cos, sin, caches, hf, cf)


def backward(p: dict, cache, dlogits, cfg: dict[str, int]) -> dict:
    """Gradients of every parameter given dLoss/dlogits."""
    import numpy as np

    tok, cos, sin, caches, hf, cf = cache
    b, t = tok.shape
    hq, hkv, dh, d = cfg["HQ"], cfg["HKV"], cfg["DH"], cfg["D"]
    rep = hq // hkv
    g: dict = {}
    g["head"] = hf.reshape(-1, d).T @ dlogits.reshape(-1, cfg["V"])
    dx, g["norm"] = _rms_back(dlogits @ p["head"].T, cf)
    for i in reversed(range(cfg["L"])):
        h, c1, qr, kr, v, pr, oc, h2, c2, a, u, sg, m = caches[i]
        g[f"l{i}.wd"] = m.reshape(-1, m.shape[-1]).T @ dx.reshape(-1, d)
        dm = dx @ p[f"l{i}.wd"].T
        du = dm * a * sg
        da = dm * u * (sg + a * sg * (1.0 - sg))
        g[f"l{i}.wg"] = h2.reshape(-1, d).T @ da.reshape(-1, da.shape[-1])
        g[f"l{i}.wu"] = h2.reshape(-1, d).T @ du.reshape(-1, du.shape[-1])
        dh2 = da @ p[f"l{i}.wg"].T + du @ p[f"l{i}.wu"].T
        dxn, g[f"l{i}.ln2"] = _rms_back(dh2, c2)
        dx = dx + dxn
        g[f"l{i}.wo"] = oc.reshape(-1, oc.shape[-1]).T @ dx.reshape(-1, d)
        do = (dx @ p[f"l{i}.wo"].T).reshape(b, t, hkv, rep, dh).transpose(0, 2, 3, 1, 4)
        vv = v[:, :, None]
        dp = do @ vv.swapaxes(-1, -2)
        dv = (pr.swapaxes(-1, -2) @ do).sum(2)
        ds = pr * (dp - (dp * pr).sum(-1, keepdims=True)) / np.sqrt(dh)
        dqr = ds @ kr[:, :, None]
        dkr = (ds.swapaxes(-1, -2) @ qr).sum(2)
        dq = dqr * cos + _rot_t(dqr * sin)
        dk = dkr * cos + _rot_t(dkr * sin)
        dq2 = dq.transpose(0, 3, 1, 2, 4).reshape(b * t, hq * dh)
        dk2 = dk.transpose(0, 2, 1, 3).reshape(b * t, hkv * dh)
        dv2 = dv.transpose(0, 2, 1, 3).reshape(b * t, hkv * dh)
        hh = h.reshape(-1, d)
        g[f"l{i}.wq"], g[f"l{i}.wk"], g[f"l{i}.wv"] = hh.T @ dq2, hh.T @ dk2, hh.T @ dv2
        dh1 = dq2 @ p[f"l{i}.wq"].T + dk2 @ p[f"l{i}.wk"].T + dv2 @ p[f"l{i}.wv"].T
        dxn, g[f"l{i}.ln1"] = _rms_back(dh1.reshape(b, t, d), c1)
        dx = dx + dxn
    ge = np.zeros_like(p["embed"])
    np.add.at(ge, tok.reshape(-1), dx.reshape(-1, d))
    g["embed"] = ge
    return g


def loss_grad(logits, target):
    """Mean next-byte cross-entropy (nats) and its gradient w.r.t. the logits."""
    import numpy as np

    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    pr = e / e.sum(-1, keepdims=True)
    n = target.size
    flat = pr.reshape(-1, pr.shape[-1])
    loss = -np.log(flat[np.arange(n), target.reshape(-1)] + 1e-30).mean()
    grad = flat.copy()
    grad[np.arange(n), target.reshape(-1)] -= 1.0
    return float(loss), (grad / n).reshape(logits.shape).astype(logits.dtype)


def byte_streams(sentences: list[str]) -> tuple[Any, Any]:
    """(train, held-out) byte streams: sentences joined by newlines."""
    import numpy as np

    def enc(ss):
        return np.frombuffer("\n".join(ss).encode("utf-8"), np.uint8).astype(np.int64)

    return enc(sentences[:TRAIN_SENTENCES]), enc(sentences[TRAIN_SENTENCES:])


def docs_stream():
    """CPython's documentation topics (pydoc_data.topics, sorted by topic) as bytes, and their sha256."""
    import hashlib

    import numpy as np
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    return np.frombuffer(text, np.uint8).astype(np.int64), hashlib.sha256(text).hexdigest()


def train(sentences: list[str], adam_cls, log=None) -> tuple[dict, dict[str, Any]]:
    """Train the decoder; returns float32 parameters and facts (held-out bits per byte, the corpus digest)."""
    import sys

    import numpy as np

    cfg = config()
    p = init_params(cfg)
    tr, te = byte_streams(sentences)
    docs, digest = docs_stream()
    rng = np.random.default_rng(SEED + 1)
    opt = adam_cls(p, lr=LR, wd=0.05, b2=0.98)
    n_sent = int(round(BATCH * SENTENCE_SHARE))
    for step in range(STEPS):
        starts = rng.integers(0, len(tr) - SEQ - 1, n_sent)
        dstarts = rng.integers(0, len(docs) - SEQ - 1, BATCH - n_sent)
        win = np.stack([tr[s: s + SEQ + 1] for s in starts] + [docs[s: s + SEQ + 1] for s in dstarts])
        logits, cache = forward(p, win[:, :-1], cfg)
        loss, dl = loss_grad(logits, win[:, 1:])
        grads = backward(p, cache, dl, cfg)
        norm = np.sqrt(sum(float((gv.astype(np.float64) ** 2).sum()) for gv in grads.values()))
        scale = min(1.0, 1.0 / max(norm, 1e-12))
        warm = min(1.0, (step + 1) / 50)
        lr = LR * warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / STEPS)))
        opt.step({k: (gv * scale).astype(np.float32) for k, gv in grads.items()}, lr=lr)
        if log is not None and step % 100 == 0:
            log(f"step {step} loss {loss / np.log(2):.3f} bits/byte, held-out {heldout_bpb(p, te, cfg):.3f}")
    return p, {"heldout_bits_per_byte": heldout_bpb(p, te, cfg), "docs_sha256": digest,
               "python": sys.version.split()[0]}


def heldout_windows(stream, seq: int = SEQ):
    """Non-overlapping windows [n, seq + 1] of a byte stream."""
    import numpy as np

    n = (len(stream) - 1) // seq
    return np.stack([stream[i * seq: i * seq + seq + 1] for i in range(n)])


def heldout_bpb(p: dict, stream, cfg: dict[str, int]) -> float:
    import numpy as np

    win = heldout_windows(stream)
    logits, _ = forward(p, win[:, :-1], cfg)
    return loss_grad(logits, win[:, 1:])[0] / float(np.log(2))


def to_onnx(p: dict, meta: dict[str, str], finish) -> Any:
    """The decoder as an ONNX graph: input_ids int64 [batch, sequence] -> logits float32 [batch, sequence, 256]."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    cfg = config()
    nodes, inits = [], []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), name))
        return name

    def node(op, ins, name, outs=1, **attrs):
        names = [name] if outs == 1 else [f"{name}_{j}" for j in range(outs)]
        nodes.append(helper.make_node(op, ins, names, name=name, **attrs))
        return names[0] if outs == 1 else names

    for k, v in p.items():
        const(k, v)
    cos, sin = rope_tables(CONTEXT, DH)
    const("rope.cos_cache", cos)
    const("rope.sin_cache", sin)
    const("mask_cache", np.triu(np.full((CONTEXT, CONTEXT), MASK, np.float32), 1))
    i64 = np.int64
    const("c.zero", [0], i64)
    const("c.zero2", [0, 0], i64)
    const("c.axes01", [0, 1], i64)
    const("c.half", [DH // 2], i64)
    const("c.big", [2 ** 62], i64)
    const("c.last", [-1], i64)
    const("c.two", [2.0])
    const("c.eps", [EPS])
    const("c.scale", [1.0 / np.sqrt(DH)])
    const("c.rep", [1, 1, HQ // HKV, 1, 1], i64)
    const("c.q_shape", [0, 0, HQ, DH], i64)
    const("c.kv_shape", [0, 0, HKV, DH], i64)
    const("c.rep_shape", [0, HQ, -1, DH], i64)
    const("c.o_shape", [0, 0, HQ * DH], i64)
    seq = node("Shape", ["input_ids"], "seq_len", start=1, end=2)
    seq2 = node("Concat", [seq, seq], "seq_len2", axis=0)
    cos_t = node("Slice", ["rope.cos_cache", "c.zero", seq, "c.zero"], "rope.cos")
    sin_t = node("Slice", ["rope.sin_cache", "c.zero", seq, "c.zero"], "rope.sin")
    mask = node("Slice", ["mask_cache", "c.zero2", seq2, "c.axes01"], "causal_mask")
    x = node("Gather", ["embed", "input_ids"], "embed_tokens")

    def rms(x, w, pre):
        sq = node("Pow", [x, "c.two"], f"{pre}.pow")
        ms = node("ReduceMean", [sq], f"{pre}.mean", axes=[-1], keepdims=1)
        r = node("Reciprocal", [node("Sqrt", [node("Add", [ms, "c.eps"], f"{pre}.add_eps")], f"{pre}.sqrt")],
                 f"{pre}.rsqrt")
        return node("Mul", [node("Mul", [x, r], f"{pre}.normed"), w], f"{pre}.scaled")

    def rope(t, pre):
        x1 = node("Slice", [t, "c.zero", "c.half", "c.last"], f"{pre}.x1")
        x2 = node("Slice", [t, "c.half", "c.big", "c.last"], f"{pre}.x2")
        rot = node("Concat", [node("Neg", [x2], f"{pre}.neg"), x1], f"{pre}.rotate_half", axis=-1)
        return node("Add", [node("Mul", [t, cos_t], f"{pre}.mul_cos"), node("Mul", [rot, sin_t], f"{pre}.mul_sin")],
                    f"{pre}.rotary")

    for i in range(cfg["L"]):
        pre = f"layers.{i}"
        h = rms(x, f"l{i}.ln1", f"{pre}.input_layernorm")
        a = f"{pre}.self_attn"
        q = node("MatMul", [h, f"l{i}.wq"], f"{a}.q_proj")
        k = node("MatMul", [h, f"l{i}.wk"], f"{a}.k_proj")
        v = node("MatMul", [h, f"l{i}.wv"], f"{a}.v_proj")
        qh = node("Transpose", [node("Reshape", [q, "c.q_shape"], f"{a}.q_view")], f"{a}.q_heads", perm=[0, 2, 1, 3])
        kh = node("Transpose", [node("Reshape", [k, "c.kv_shape"], f"{a}.k_view")], f"{a}.k_heads", perm=[0, 2, 1, 3])
        vh = node("Transpose", [node("Reshape", [v, "c.kv_shape"], f"{a}.v_view")], f"{a}.v_heads", perm=[0, 2, 1, 3])
        qr, kr = rope(qh, f"{a}.q_rope"), rope(kh, f"{a}.k_rope")

        def repeat_kv(t, nm):
            u = node("Unsqueeze", [t, "c.rep_axis"], f"{nm}.unsqueeze")
            e = node("Expand", [u, "c.rep"], f"{nm}.expand")
            return node("Reshape", [e, "c.rep_shape"], f"{nm}.reshape")

        kx, vx = repeat_kv(kr, f"{a}.repeat_k"), repeat_kv(vh, f"{a}.repeat_v")
        kt = node("Transpose", [kx], f"{a}.k_t", perm=[0, 1, 3, 2])
        s = node("Mul", [node("MatMul", [qr, kt], f"{a}.scores"), "c.scale"], f"{a}.scaled")
        pr = node("Softmax", [node("Add", [s, mask], f"{a}.masked")], f"{a}.probs", axis=-1)
        o = node("MatMul", [pr, vx], f"{a}.context")
        oc = node("Reshape", [node("Transpose", [o], f"{a}.context_t", perm=[0, 2, 1, 3]), "c.o_shape"],
                  f"{a}.context_merged")
        x = node("Add", [x, node("MatMul", [oc, f"l{i}.wo"], f"{a}.o_proj")], f"{pre}.residual1")
        h2 = rms(x, f"l{i}.ln2", f"{pre}.post_attention_layernorm")
        mlp = f"{pre}.mlp"
        gt = node("MatMul", [h2, f"l{i}.wg"], f"{mlp}.gate_proj")
        up = node("MatMul", [h2, f"l{i}.wu"], f"{mlp}.up_proj")
        act = node("Mul", [gt, node("Sigmoid", [gt], f"{mlp}.act_fn.sigmoid")], f"{mlp}.act_fn")
        gated = node("Mul", [act, up], f"{mlp}.gated")
        x = node("Add", [x, node("MatMul", [gated, f"l{i}.wd"], f"{mlp}.down_proj")], f"{pre}.residual2")
    hf = rms(x, "norm", "norm")
    nodes.append(helper.make_node("MatMul", [hf, "head"], ["logits"], name="lm_head"))
    const("c.rep_axis", [2], i64)
    graph = helper.make_graph(
        nodes, "llama_bytes",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", V])],
        initializer=inits)
    doc = ("Byte-level Llama-style decoder (RMSNorm, rotary, GQA 8 query / 2 KV heads, SwiGLU), trained by "
           "tools/build_fixtures.py on models/sentences.txt 0..339")
    return finish(graph, doc, meta)
