"""Scaling of the weight passes with graph size: sparsify (unstructured and channel) and lowrank on generated
chains of transformer-style FFN blocks (MatMul -> Relu -> MatMul -> residual Add), the same block at every size,
so the time ratio between sizes measures scaling rather than a different workload.

    python tools/bench_weight_passes.py [--blocks 100 400 1600]

Channel pruning runs on its own (the pass body); sparsify and lowrank run through the Pipeline (import, pass,
export, full onnx.checker). Prints seconds per size and the ratio to the previous size (4x the blocks: ~4x is
linear). Not run by CI: times are for comparing sizes in one run, never for asserting.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from onnxcomp import ir  # noqa: E402
from onnxcomp.passes import PassContext  # noqa: E402
from onnxcomp.pipeline import Pipeline  # noqa: E402
from onnxcomp.algorithms.channels import prune_channels  # noqa: E402
from onnxcomp.passes.lowrank import Lowrank  # noqa: E402
from onnxcomp.passes.sparsify import Sparsify  # noqa: E402


def ffn_chain(blocks: int, d: int, h: int) -> onnx.ModelProto:
    """`blocks` residual FFN blocks x + W2 relu(W1 x) with d -> h -> d random weights."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        inits += [numpy_helper.from_array(rng.standard_normal((d, h)).astype(np.float32) * 0.1, f"W1_{i}"),
                  numpy_helper.from_array(rng.standard_normal((h, d)).astype(np.float32) * 0.1, f"W2_{i}")]
        nodes += [helper.make_node("MatMul", [x, f"W1_{i}"], [f"a{i}"], name=f"up{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", f"W2_{i}"], [f"b{i}"], name=f"down{i}"),
                  helper.make_node("Add", [f"b{i}", x], [f"y{i}"])]
        x = f"y{i}"
    g = helper.make_graph(nodes, "ffn_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, d])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [4, d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", nargs="+", type=int, default=[100, 400, 1600])
    args = ap.parse_args()
    cases = {
        "channel (pass body, 16x32 layers)": lambda n: _channel(ffn_chain(n, 16, 32)),
        "sparsify unstructured (manager, 64x128)": lambda n: _managed(ffn_chain(n, 64, 128),
                                                                      Sparsify(method="magnitude", sparsity=0.5)),
        "lowrank plain (manager, 64x128)": lambda n: _managed(ffn_chain(n, 64, 128), Lowrank(
            whiten=False, params_ratio=0.5, min_weight_elements=0, speed_check=False)),
    }
    print(f"blocks: {args.blocks} (4 nodes each)")
    for name, run in cases.items():
        times = [run(n) for n in args.blocks]
        ratios = ", ".join(f"x{b / a:.1f}" for a, b in zip(times, times[1:]))
        print(f"{name:42s} " + " / ".join(f"{t:.2f}s" for t in times) + f"   ratios {ratios}")


def _channel(proto: onnx.ModelProto) -> float:
    model = ir.Model.from_proto(proto)
    t0 = time.perf_counter()
    out = prune_channels(model, proto, PassContext(), Sparsify(pattern="channel", method="magnitude",
                                                                    sparsity=0.5))
    dt = time.perf_counter() - t0
    assert len(out.details["groups"]) == sum(n.op == "Relu" for n in model.graph.nodes)
    return dt


def _managed(proto: onnx.ModelProto, p) -> float:
    t0 = time.perf_counter()
    _, recs = Pipeline().run(proto, [p])
    dt = time.perf_counter() - t0
    assert recs[0].status == "ok", recs[0].status
    return dt


if __name__ == "__main__":
    main()
