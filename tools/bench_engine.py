"""Benchmark the rewrite engine: load -> rules to fixpoint -> save on generated graphs of 1k/10k/100k nodes.

Graphs: 80% a chain of (Identity -> MatMul -> Add(bias)) blocks, 20% a wide fan-out where one tensor feeds
n/10 Identity->Relu consumers (10k at 100k nodes: the case where gs's per-consumer list removal is
quadratic); the same mix at every size, so t(100k)/t(10k) measures scaling, not a different workload. The
weight and bias initializers are shared by every block (tens of thousands of consumers each). Rules: remove
Identity, fuse MatMul+Add into Gemm (2-D input).

    python tools/bench_engine.py [--sizes 1000 10000 100000] [--profile]

Prints the time of each phase and t(100k)/t(10k); the target is < 10 s at 100k nodes and a ratio <= 12.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from onnxcomp import ir  # noqa: E402
from onnxcomp.passes.cleanup import remove_identity_rule  # noqa: E402
from onnxcomp.rewrite import apply_rules  # noqa: E402
from onnxcomp.rewrite.rules import matmul_add_to_gemm_rule  # noqa: E402


def make_graph(n_nodes: int, fanout: int) -> onnx.ModelProto:
    """~n_nodes nodes: chain blocks of 3 nodes, plus `fanout` consumers of one tensor (2 nodes each)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 0.1, "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    nodes = []
    fan = min(fanout, n_nodes // 10)  # same mix at every size: 20% fan-out nodes, 80% chain
    chain_blocks = max(1, (n_nodes - 2 * fan) // 3)
    prev = "x"
    for i in range(chain_blocks):
        nodes.append(helper.make_node("Identity", [prev], [f"i{i}"], name=f"id{i}"))
        nodes.append(helper.make_node("MatMul", [f"i{i}", "w"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Add", ["b", f"m{i}"], [f"a{i}"], name=f"add{i}"))
        prev = f"a{i}"
    outputs = [helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, [4, 8])]
    fan_outs = []
    for j in range(fan):
        nodes.append(helper.make_node("Identity", ["x"], [f"f{j}"], name=f"fid{j}"))
        nodes.append(helper.make_node("Relu", [f"f{j}"], [f"r{j}"], name=f"relu{j}"))
        fan_outs.append(f"r{j}")
    if fan_outs:  # one Sum over chunks keeps every fan-out branch live
        chunk = 1000
        partial = []
        for k in range(0, len(fan_outs), chunk):
            nodes.append(helper.make_node("Sum", fan_outs[k:k + chunk], [f"s{k}"], name=f"sum{k}"))
            partial.append(f"s{k}")
        nodes.append(helper.make_node("Sum", partial, ["fan_total"], name="sum_total"))
        outputs.append(helper.make_tensor_value_info("fan_total", onnx.TensorProto.FLOAT, [4, 8]))
    g = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 8])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


RULES = [remove_identity_rule(), matmul_add_to_gemm_rule()]


def run_once(n: int, fanout: int, tmp: str) -> dict:
    src = os.path.join(tmp, f"in{n}.onnx")
    onnx.save(make_graph(n, fanout), src)
    t0 = time.perf_counter()
    proto = ir.load_proto(src)
    model = ir.Model.from_proto(proto, infer_shapes=True)
    t1 = time.perf_counter()
    stats = apply_rules(model, RULES)
    t2 = time.perf_counter()
    out = model.to_proto()
    ir.save_proto(out, os.path.join(tmp, f"out{n}.onnx"))
    t3 = time.perf_counter()
    return {"nodes": len(proto.graph.node), "out_nodes": len(out.graph.node), "applied": stats.applied,
            "load": t1 - t0, "rewrite": t2 - t1, "save": t3 - t2, "total": t3 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--fanout", type=int, default=10000, help="consumers of the one wide tensor")
    ap.add_argument("--profile", action="store_true", help="cProfile the largest size")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            if args.profile and n == max(args.sizes):
                import cProfile
                import pstats
                prof = cProfile.Profile()
                prof.enable()
                rows.append(run_once(n, args.fanout, tmp))
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(20)
            else:
                rows.append(run_once(n, args.fanout, tmp))
    print(f"{'nodes':>8} {'->':>2} {'out':>7} {'rewrites':>8} {'load s':>7} {'rules s':>7} {'save s':>7} {'total s':>8}")
    for r in rows:
        print(f"{r['nodes']:8d} -> {r['out_nodes']:7d} {r['applied']:8d} {r['load']:7.2f} {r['rewrite']:7.2f} "
              f"{r['save']:7.2f} {r['total']:8.2f}")
    by_n = {r["nodes"]: r["total"] for r in rows}
    big = sorted(by_n)
    if len(big) >= 2:
        a, b = big[-2], big[-1]
        print(f"ratio t({b})/t({a}) = {by_n[b] / by_n[a]:.2f} (size ratio {b / a:.1f})")


if __name__ == "__main__":
    main()
