"""Layer shapes timed on the target: two tiny generated ORT models, the same input, interleaved runs.

What the weight passes ask before (lowrank: is the factorized pair faster than the dense layer?) and after
(channel pruning: how much time did the removed channels save?) they change a layer. Each pair of shapes is
timed once per process (cached by shape, rows and providers): models repeat their layer shapes.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["DEFAULT_ROWS", "matmul_chain", "pair_speed", "time_pair"]

#: rows (batch x sequence) a shape is timed at when there is no calibration data to take them from
DEFAULT_ROWS = 32

_CACHE: dict[tuple, tuple[float, float]] = {}


def _init(rng: np.random.Generator, name: str, shape: Sequence[int]) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), name)


def _model(nodes: list, x_shape: Sequence[int], inits: list) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = helper.make_model(helper.make_graph(nodes, "speed", [x], [y], inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def time_pair(key: tuple, a: onnx.ModelProto, b: onnx.ModelProto, providers: Any = None,
              budget_s: float = 0.05, rounds: int = 1) -> tuple[float, float]:
    """(a ms, b ms) per run of two models that read the same input "x", median of interleaved runs (with
    `rounds`, the smallest of that many rounds' medians, each with budget_s / rounds: sub-millisecond layers
    on a shared machine have slow phases that a single median keeps); cached under `key` (which must name
    everything the two models are built from)."""
    from .latency import measure_latency
    from .session import make_session

    key = (*key, repr(providers))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    shape = [d.dim_value for d in a.graph.input[0].type.tensor_type.shape.dim]
    feed = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    sa = make_session(a, providers, name="speed check (before)", spinning=False).session
    sb = make_session(b, providers, name="speed check (after)", spinning=False).session
    res = [measure_latency(sa, sb, [feed], warmup=2, time_budget_s=budget_s / rounds) for _ in range(rounds)]
    _CACHE[key] = (min(r.reference_ms for r in res), min(r.candidate_ms for r in res))
    return _CACHE[key]


def _pair_model(op: str, k: int, n: int, r: Optional[int], rows: int, conv: Optional[dict]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    if op == "Conv":
        cin, kernel, spatial, attrs = conv["cin"], conv["kernel"], conv["spatial"], conv["attrs"]
        if r is None:
            return _model([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], [1, cin, *spatial],
                          [_init(rng, "w", [n, cin, *kernel])])
        ones = [1] * len(kernel)
        return _model([helper.make_node("Conv", ["x", "a"], ["h"], **attrs),
                       helper.make_node("Conv", ["h", "b"], ["y"], kernel_shape=ones)], [1, cin, *spatial],
                      [_init(rng, "a", [r, cin, *kernel]), _init(rng, "b", [n, r, *ones])])
    if r is None:
        return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [rows, k], [_init(rng, "w", [k, n])])
    return _model([helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])],
                  [rows, k], [_init(rng, "a", [k, r]), _init(rng, "b", [r, n])])


def pair_speed(op: str, k: int, n: int, r: int, rows: int, providers: Any = None, conv: Optional[dict] = None,
               budget_s: float = 0.05) -> tuple[float, float]:
    """(dense ms, factorized pair ms) per run of one layer shape: x[rows, k] W[k, n] against (x A[k, r]) B[r, n]
    (Conv: the kxk conv against a rank-r conv and a 1x1 conv)."""
    return time_pair(("pair", op, k, n, r, rows, repr(conv)), _pair_model(op, k, n, None, rows, conv),
                     _pair_model(op, k, n, r, rows, conv), providers, budget_s)


def matmul_chain(k: int, n: int, widths: tuple[int, int], rows: int, gates: int = 0, providers: Any = None,
                 budget_s: float = 0.3) -> tuple[float, float]:
    """(ms at widths[0], ms at widths[1]) per run of a channel group's MatMuls: x[rows, k] -> c channels (times
    `gates` more producers multiplied in, a gated MLP) -> Relu -> n outputs, at c = each width."""
    def build(c: int) -> onnx.ModelProto:
        rng = np.random.default_rng(0)
        nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"])]
        inits = [_init(rng, "w0", [k, c])]
        h = "h0"
        for i in range(gates):
            nodes += [helper.make_node("MatMul", ["x", f"g{i}"], [f"hg{i}"]),
                      helper.make_node("Mul", [h, f"hg{i}"], [f"hm{i}"])]
            inits.append(_init(rng, f"g{i}", [k, c]))
            h = f"hm{i}"
        nodes += [helper.make_node("Relu", [h], ["r"]), helper.make_node("MatMul", ["r", "w1"], ["y"])]
        inits.append(_init(rng, "w1", [c, n]))
        return _model(nodes, [rows, k], inits)

    return time_pair(("chain", k, n, widths, rows, gates), build(widths[0]), build(widths[1]), providers, budget_s,
                     rounds=3)
