"""Experiment (issue 16): can the residual stream of a post-norm (BERT-style) model be sliced SliceGPT-style?

    python tools/experiment_postnorm_slicing.py [--calib 200] [--fractions 0.1 0.2 0.3] [--basis n|h|z]

MiniLM-L3 is post-norm: every block is h' = LayerNorm(h + f(h)), so the stream carries LayerNorm's gain gamma
on its skip path and gamma cannot be folded into the readers as it is for pre-norm RMSNorm models
(onnxcomp/algorithms/residual.py). This script builds the exact alternative with onnx.helper, outside the pass:
the stream is kept in the basis B = [Q_k, u] (u = 1/sqrt(D), Q_k orthonormal and orthogonal to u, chosen as the
principal directions of the calibration stream), each LayerNorm becomes Slice(first k coordinates) -> RMS norm
(eps * D/k) -> MatMul(G = sqrt(D/k) Q_k^T diag(gamma) B) -> Add(beta B), and every embedding table, reader and
writer is rotated. Exact when nothing is sliced (k = D - 1 plus u); the cost is the dense k x (k+1) G per norm,
two per layer. It prints the embedding cosine on held-out sentences (0..199; calibration starts at 200) and the
latency ratio against fp32 (batch 1, 24 sentences padded to 32 and 128 tokens, interleaved), with the noise
floor (fp32 against itself). What it measured is in issue 16's closing note: it does not pay on MiniLM-L3.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper as nh

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from onnxcomp import testing  # noqa: E402


def _capture(model: onnx.ModelProto, names: list[str], feeds, d: int) -> list[np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for nm in names:
        m.graph.output.append(helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [s.run(names, f) for f in feeds]
    return [np.concatenate([o[i].reshape(-1, d) for o in outs]) for i in range(len(names))]


def _centered_cov(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(1, keepdims=True)  # LayerNorm's mean subtraction, per token
    c = x.T @ x / len(x)
    return c / np.trace(c)


def basis(model: onnx.ModelProto, feeds, kind: str, d: int) -> np.ndarray:
    """Q [D, D-1]: orthonormal, orthogonal to the ones vector, by decreasing energy of the stream (summed over
    every LayerNorm): kind n = normalised input, h = output, z = input."""
    lns = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    inits = {t.name: nh.to_array(t) for t in model.graph.initializer}
    hs = _capture(model, [n.output[0] for n in lns], feeds, d)
    zs = _capture(model, [n.input[0] for n in lns], feeds, d) if kind == "z" else None
    c = np.zeros((d, d))
    for i, n in enumerate(lns):
        x = {"n": lambda: (hs[i] - inits[n.input[2]]) / inits[n.input[1]], "h": lambda: hs[i],
             "z": lambda: zs[i]}[kind]()
        c += _centered_cov(x)
    u = np.ones(d) / np.sqrt(d)
    perp = np.linalg.qr(np.c_[u, np.random.default_rng(0).standard_normal((d, d - 1))])[0][:, 1:]
    _, v = np.linalg.eigh(perp.T @ c @ perp)
    return perp @ v[:, ::-1]


def sliced(model: onnx.ModelProto, q: np.ndarray, k: int, d: int) -> onnx.ModelProto:
    """The model with its stream in the basis [q[:, :k], u] (see the module doc)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    ini = {t.name: t for t in g.initializer}
    val = lambda name: nh.to_array(ini[name]).astype(np.float64)  # noqa: E731
    setw = lambda name, a: ini[name].CopyFrom(nh.from_array(a.astype(np.float32), name))  # noqa: E731
    b = np.c_[q[:, :k], np.ones(d) / np.sqrt(d)]
    consumers, producer = {}, {o: n for n in g.node for o in n.output}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in g.node:
        if n.op_type == "Gather" and n.input[0] in ini and val(n.input[0]).ndim == 2:
            setw(n.input[0], val(n.input[0]) @ b)
    lns = [n for n in g.node if n.op_type == "LayerNormalization"]
    new = {}
    for li, n in enumerate(lns):
        last = li == len(lns) - 1
        out_basis = np.eye(d) if last else b
        gmat = np.sqrt(d / k) * (q[:, :k].T @ (val(n.input[1])[:, None] * out_basis))
        eps = next(a.f for a in n.attribute if a.name == "epsilon")
        p = f"ln{li}_"
        g.initializer.extend([helper.make_tensor(p + "st", 7, [1], [0]), helper.make_tensor(p + "en", 7, [1], [k]),
                              helper.make_tensor(p + "ax", 7, [1], [-1]), helper.make_tensor(p + "two", 1, [], [2.0]),
                              helper.make_tensor(p + "eps", 1, [], [eps * d / k]),
                              nh.from_array(gmat.astype(np.float32), p + "G"),
                              nh.from_array(np.ones(k, np.float32), p + "g"),
                              nh.from_array((val(n.input[2]) @ out_basis).astype(np.float32), p + "b")])
        new[id(n)] = [helper.make_node("Slice", [n.input[0], p + "st", p + "en", p + "ax"], [p + "c"]),
                      helper.make_node("Pow", [p + "c", p + "two"], [p + "sq"]),
                      helper.make_node("ReduceMean", [p + "sq", p + "ax"], [p + "ms"], keepdims=1),
                      helper.make_node("Add", [p + "ms", p + "eps"], [p + "me"]),
                      helper.make_node("Sqrt", [p + "me"], [p + "sd"]),
                      helper.make_node("Div", [p + "c", p + "sd"], [p + "nr"]),
                      helper.make_node("Mul", [p + "nr", p + "g"], [p + "ng"]),  # the form ORT fuses
                      helper.make_node("MatMul", [p + "ng", p + "G"], [p + "mm"]),
                      helper.make_node("Add", [p + "mm", p + "b"], [n.output[0]])]
        if last:
            continue
        for r in consumers[n.output[0]]:
            if r.op_type == "MatMul":  # a reader
                setw(r.input[1], b.T @ val(r.input[1]))
            elif r.op_type == "Add":  # the residual Add: its other input is a writer MatMul + bias
                bias_add = producer[next(i for i in r.input if i != n.output[0])]
                setw(next(i for i in bias_add.input if i in ini), val(next(i for i in bias_add.input if i in ini)) @ b)
                mm = producer[next(i for i in bias_add.input if i not in ini)]
                setw(mm.input[1], val(mm.input[1]) @ b)
    nodes = [x for n in g.node for x in new.get(id(n), [n])]
    del g.node[:]
    g.node.extend(nodes)
    m.opset_import[0].version = max(m.opset_import[0].version, 18)
    onnx.checker.check_model(m, full_check=True)
    return m


def latency(models: list[bytes], feeds, reps: int = 3) -> list[float]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = [ort.InferenceSession(m, so, providers=["CPUExecutionProvider"]) for m in models]
    for s in sessions:
        for f in feeds[:4]:
            s.run(None, f)
    total = [0.0] * len(sessions)
    for _ in range(reps):
        for j, s in enumerate(sessions):
            t = time.perf_counter()
            for f in feeds:
                s.run(None, f)
            total[j] += time.perf_counter() - t
    return [t / total[0] for t in total]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=200, help="calibration sentences, from sentence 200 on")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--basis", choices=["n", "h", "z"], default="n")
    args = ap.parse_args()
    path = str(testing.minilm_path())
    model = onnx.load(path)
    d = testing.MINILM_DIM
    q = basis(model, testing.minilm_feeds(args.calib, start=200), args.basis, d)
    held_out = testing.minilm_feeds(200, start=0)
    ref = testing.minilm_embed(path, held_out)
    exact = sliced(model, q, d - 1, d).SerializeToString()
    print(f"nothing sliced: cosine {testing.minilm_metrics(ref, testing.minilm_embed(exact, held_out))['cosine_mean']:.6f}")
    fp32 = open(path, "rb").read()
    models, labels = [fp32, fp32], ["fp32 (noise)"]
    for frac in args.fractions:
        k = d - 1 - int(round(frac * d))
        m = sliced(model, q, k, d).SerializeToString()
        met = testing.minilm_metrics(ref, testing.minilm_embed(m, held_out))
        print(f"hidden {frac:g}: stream {d} -> {k + 1}, cosine mean {met['cosine_mean']:.5f} min {met['cosine_min']:.4f}")
        models.append(m)
        labels.append(f"hidden {frac:g}")
    for pad in (32, 128):
        ratios = latency(models, testing.minilm_feeds(24, start=0, pad_to=pad))
        print(f"latency vs fp32, padded to {pad}: " + ", ".join(f"{lab} {r:.3f}" for lab, r in zip(labels, ratios[1:])))


if __name__ == "__main__":
    main()
