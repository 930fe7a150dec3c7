"""int8 weights that ORT CPU's uint8 x int8 kernels run exactly on x86 CPUs without VNNI.

Those kernels (AVX2, AVX512BW) add the products of each even-aligned pair of inner-dimension elements in int16
and saturate (vpmaddubsw); target ort-cpu bounds such pairs (`weight_range: pairs`, `qmath.PAIR_LIMIT`). The same
models run under QEMU's user-mode emulator as a Haswell CPU (AVX2: ORT picks its saturating kernels) and as a
Nehalem CPU (SSE4.1: ORT's kernels widen to 16 bits first and never saturate): bounded weights give the same
outputs on both, full-range 8-bit weights do not. Skipped where qemu-user is not installed (`.ci/run` installs
it on Debian).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxcomp
from tests.graphs import const, make_model, vi

QEMU = shutil.which("qemu-x86_64")

pytestmark = pytest.mark.skipif(
    QEMU is None or platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"),
    reason="needs qemu-user's qemu-x86_64 on Linux x86-64 (apt-get install qemu-user) to run ORT as an AVX2 CPU")

_RUNNER = '''
import sys, numpy as np, onnxruntime as ort
feeds = dict(np.load(sys.argv[1]))
out = {}
for path in sys.argv[3:]:
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    out[path] = s.run(None, {n: feeds[n] for n in names})[0]
np.savez(sys.argv[2], **{str(i): out[p] for i, p in enumerate(sys.argv[3:])})
'''


def _run_as(cpu: str, paths: list[Path], feeds: dict, tmp: Path) -> list[np.ndarray]:
    """Outputs of each model under qemu-x86_64 -cpu `cpu` (one emulated process for all of them)."""
    runner, inputs, out = tmp / "runner.py", tmp / "feeds.npz", tmp / f"out_{cpu}.npz"
    runner.write_text(_RUNNER)
    np.savez(inputs, **feeds)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])))
    env.pop("PYTHONHOME", None)
    cmd = [QEMU, "-cpu", cpu, os.path.realpath(sys.executable), str(runner), str(inputs), str(out),
           *map(str, paths)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(out)
    return [got[str(i)] for i in range(len(paths))]


def _saturating_weights(rng, rows: int, cols: int) -> np.ndarray:
    """[rows, cols] weights whose even-aligned pairs along `rows` (K) mostly share a sign and are large: full
    8-bit codes of such pairs add up past 128."""
    return (rng.uniform(0.5, 1.0, (rows, cols)) * np.where(rng.random(cols) < 0.5, -1, 1)).astype(np.float32)


def _models(rng):
    """(name, float model, quantize options, feeds) cases: each integer kernel family ORT runs on CPU."""
    k, n = 64, 32
    w = _saturating_weights(rng, k, n)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.uniform(0, 1, (8, k)).astype(np.float32)  # uint8 codes up to 255
    matmul = make_model([helper.make_node("MatMul", ["x", "W"], ["t"], name="mm"),
                         helper.make_node("Add", ["t", "B"], ["y"], name="bias")],
                        [vi("x", ["b", k])], [vi("y", ["b", n])], [const("W", w), const("B", b)])
    gemm = make_model([helper.make_node("Gemm", ["x", "Wt", "B"], ["y"], name="gemm", transB=1)],
                      [vi("x", ["b", k])], [vi("y", ["b", n])], [const("Wt", np.ascontiguousarray(w.T)),
                                                                  const("B", b)])
    a = rng.uniform(0.1, 0.9, (k // 2, n))
    tight = np.stack([a, 1 - a], axis=1).reshape(k, n) * np.where(rng.random(n) < 0.5, -1, 1)
    on_bound = make_model([helper.make_node("MatMul", ["x", "W"], ["t"], name="mm"),
                           helper.make_node("Add", ["t", "B"], ["y"], name="bias")],
                          [vi("x", ["b", k])], [vi("y", ["b", n])], [const("W", tight.astype(np.float32)),
                                                                     const("B", b)])
    hidden = 16  # gate pre-activations of order 1, so that sigmoid/tanh do not hide the kernel's error
    wl = 0.02 * _saturating_weights(rng, k, 4 * hidden).T[None]  # [1, 4H, K]: pairs along K
    rl = 0.02 * _saturating_weights(rng, hidden, 4 * hidden).T[None]
    lstm = make_model([helper.make_node("LSTM", ["xs", "W", "R"], ["ys"], name="lstm", hidden_size=hidden)],
                      [vi("xs", [3, 2, k])], [vi("ys", [3, 1, 2, hidden])], [const("W", wl), const("R", rl)])
    xs = rng.uniform(0, 1, (3, 2, k)).astype(np.float32)
    heads, seq = 2, 4  # ORT's fused attention (transformers optimizer): QAttention
    wa = 0.05 * _saturating_weights(rng, k, 3 * k)
    attn = helper.make_model(helper.make_graph(
        [helper.make_node("Attention", ["xa", "Wa", "Ba"], ["ya"], name="attn", domain="com.microsoft",
                          num_heads=heads)], "g", [vi("xa", [1, seq, k])], [vi("ya", [1, seq, k])],
        [const("Wa", wa), const("Ba", np.zeros(3 * k, np.float32))]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    xa = rng.uniform(0, 1, (1, seq, k)).astype(np.float32)
    convs = []
    for c, group in ((3, 1), (8, 2), (8, 8)):  # odd channels (pairs straddle two offsets), grouped, depthwise
        o = 8
        wc = 0.05 * np.abs(rng.uniform(0.5, 1.0, (o, c // group, 3, 3))).astype(np.float32)
        wc *= np.where(rng.random(o) < 0.5, -1, 1)[:, None, None, None].astype(np.float32)
        conv = make_model([helper.make_node("Conv", [f"xc{c}", "Wc"], ["yc"], name="conv", pads=[1, 1, 1, 1],
                                            group=group)],
                          [vi(f"xc{c}", [1, c, 6, 6])], [vi("yc", [1, o, 6, 6])], [const("Wc", wc)])
        convs.append((f"conv{c}-group{group}-static", conv, {"mode": "static"},
                      {f"xc{c}": rng.uniform(0, 1, (1, c, 6, 6)).astype(np.float32)}))
    return [*convs,
            ("matmul-static", matmul, {"mode": "static"}, {"x": x}),
            # integer codebooks keep the bound: every pair of this weight sits on it, so nearest codebook values
            # would break it for about half of them
            ("matmul-static-palettized", on_bound, {"mode": "static"}, {"x": x}),
            ("matmul-dynamic", matmul, {"mode": "dynamic", "smoothquant": None}, {"x": x}),
            ("gemm-dynamic", gemm, {"mode": "dynamic", "smoothquant": None}, {"x": x}),
            ("lstm-dynamic", lstm, {"mode": "dynamic"}, {"xs": xs}),
            ("attention-dynamic", attn, {"mode": "dynamic", "smoothquant": None}, {"xa": xa})]


def test_pair_bounded_weights_run_exactly_on_avx2_kernels_and_full_range_ones_do_not(tmp_path):
    rng = np.random.default_rng(0)
    paths, feeds, cases = [], {}, []
    for name, model, opts, inputs in _models(rng):
        calib = [{k: v[2 * i:2 * i + 2] if len(v) == 8 else v * (1 - 0.1 * i) for k, v in inputs.items()}
                 for i in range(4)]
        for wr in ("pairs", "full"):
            passes = [{"type": "quantize", "min_weight_elements": 0, "sensitivity": False, "weight_range": wr, **opts}]
            if "palettized" in name:
                passes.append({"type": "palettize", "bits": 4, "min_weight_elements": 0})
            res = onnxcomp.compress(model, {"passes": passes}, calibration_data=calib, progress=False)
            if "palettized" in name:
                assert res.report.passes[1].details["layers"], res.report.passes[1].details
            ops = {n.op_type for n in res.model.graph.node}
            assert ops & {"MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention",
                          "QuantizeLinear"}, (name, ops)  # an integer kernel (QLinearConv: Q/DQ around the Conv)
            if "group8" in name:  # depthwise: full-range 8-bit weights whatever weight_range says
                (wq,) = [numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name.endswith("_quantized")]
                assert np.abs(wq.astype(np.int32)).max() == 127
            path = tmp_path / f"{name}-{wr}.onnx"
            res.save(path)
            paths.append(path)
            cases.append((name, wr))
        feeds.update(inputs)
    avx2 = _run_as("Haswell", paths, feeds, tmp_path)
    sse = _run_as("Nehalem", paths, feeds, tmp_path)
    for (name, wr), a, s in zip(cases, avx2, sse):
        gap = float(np.abs(a - s).max() / np.abs(s).max())
        if "group8" in name:  # depthwise: ORT's kernels do not saturate, so the weights keep the full range
            assert gap < 1e-4, (name, wr, gap)
        elif wr == "pairs":
            assert gap < 1e-5, (name, gap)  # float rounding only
        else:
            assert gap > 0.01, (name, gap)  # saturated: the test can tell
