"""onnxcomp.calibration: streaming statistics against numpy goldens, range methods, memory, MiniLM ranges."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from onnxcomp import testing as fx
from onnxcomp.calibration import (
    RANGE_METHODS,
    TensorStats,
    collect_statistics,
    compute_range,
    stats_from_arrays,
)
from onnxcomp.calibration.ranges import _entropy_threshold
from onnxcomp.errors import CalibrationDataError, RecipeError

# every (qdtype, symmetric) combination the quantize pass uses for activations
SETTINGS = [("uint8", False), ("int8", True), ("int8", False), ("int16", True)]
BINS = 256


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _chain() -> onnx.ModelProto:
    """x [b, s, 8] -> MatMul W1 [8, 16] -> "h" -> Relu -> "r" -> MatMul W2 [16, 4] -> "y"; also "s" = Shape(x)."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")
    nodes = [
        h.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        h.make_node("Relu", ["h"], ["r"], name="relu"),
        h.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
        h.make_node("Shape", ["x"], ["s"], name="shape"),
    ]
    return _model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT, ["b", "seq", 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["b", "seq", 4]), h.make_tensor_value_info("s", T.INT64, [3])],
        [w1, w2],
    )


def _var_feeds(n: int, seed: int = 0, vary_batch: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        b = 1 + i % 3 if vary_batch else 1
        s = 3 + (i * 7) % 13  # sequence lengths 3..15
        feeds.append({"x": (rng.standard_normal((b, s, 8)) * (1 + i % 4)).astype(np.float32)})
    return feeds


def _golden(model: onnx.ModelProto, names, feeds) -> dict[str, list[np.ndarray]]:
    """Every value of `names` per feed, from a plain ORT session on a copy that outputs them all."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for n in names:
        m.graph.output.add().name = n
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for f in feeds:
        for n, v in zip(names, sess.run(list(names), f)):
            out[n].append(v)
    return out


def _flat(arrs) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrs])


def _check_range(lo: float, hi: float) -> None:
    assert math.isfinite(lo) and math.isfinite(hi)
    assert lo <= 0.0 <= hi


# ------------------------------------------------------------------------------------------ statistics
def test_stats_match_numpy_over_variable_length_feeds():
    model = _chain()
    feeds = _var_feeds(12)
    names = ["x", "h", "r", "y", "W1"]
    stats = collect_statistics(model, names, feeds, bins=BINS, channel_axes={"h": -1, "x": 2, "r": 2})
    gold = _golden(model, ["x", "h", "r", "y"], feeds)
    gold["W1"] = [numpy_helper.to_array(model.graph.initializer[0])] * len(feeds)
    assert set(stats) == set(names)
    for n in names:
        st, flat = stats[n], _flat(gold[n])
        assert st.name == n and st.dtype == np.float32
        assert st.samples == len(feeds)
        assert st.count == flat.size and st.nonfinite == 0
        assert st.min == float(flat.min()) and st.max == float(flat.max())  # exact
        assert st.zeros == int(np.count_nonzero(flat == 0))
        assert st.hist.sum() == st.count and len(st.hist) == BINS
        np.testing.assert_array_equal(st.hist, np.histogram(flat, bins=BINS, range=(st.min, st.max))[0])
        np.testing.assert_allclose(st.hist_edges[[0, -1]], [st.min, st.max])
        assert st.degenerate is None
    for n in ("x", "h", "r"):
        want = np.max([np.abs(a).max(axis=(0, 1)) for a in gold[n]], axis=0)
        np.testing.assert_array_equal(stats[n].channel_absmax, want)
    assert stats["y"].channel_absmax is None
    assert stats["r"].min == 0.0 and stats["r"].zeros > 0


def test_dynamic_batch_and_length_every_method():
    """ORT's own Percentile/Entropy calibrators fail here ("inhomogeneous shape"); reductions are per run."""
    model = _chain()
    feeds = _var_feeds(9, seed=3, vary_batch=True)
    assert len({f["x"].shape for f in feeds}) > 3
    stats = collect_statistics(model, ["x", "h", "r", "y"], feeds, bins=BINS)
    gold = _golden(model, ["h"], feeds)
    assert stats["h"].count == sum(a.size for a in gold["h"])
    for st in stats.values():
        for method in RANGE_METHODS:
            for qdtype, sym in SETTINGS:
                lo, hi = compute_range(st, method, qdtype=qdtype, symmetric=sym)
                _check_range(lo, hi)
                if not sym:  # clipped ranges stay inside the minmax one
                    assert min(st.min, 0.0) <= lo and hi <= max(st.max, 0.0)
    # ReLU output: nothing below 0 in any method
    assert all(compute_range(stats["r"], m)[0] == 0.0 for m in RANGE_METHODS)


def test_nonfinite_values_counted_and_excluded():
    """l = Log(x): x == 0 gives -inf, x < 0 gives NaN; both are counted and kept out of min/max/hist."""
    model = _model(
        [h.make_node("Log", ["x"], ["l"]), h.make_node("Abs", ["l"], ["y"])],
        [h.make_tensor_value_info("x", T.FLOAT, [None, 6])],
        [h.make_tensor_value_info("y", T.FLOAT, [None, 6])],
    )
    rng = np.random.default_rng(0)
    feeds = []
    for i in range(5):
        x = rng.uniform(0.1, 5.0, size=(2 + i, 6)).astype(np.float32)
        x[0, : i % 3] = 0.0
        x[1, 3 : 3 + i % 2] = -1.0
        feeds.append({"x": x})
    feeds.append({"x": np.full((1, 6), np.inf, np.float32)})
    stats = collect_statistics(model, ["l", "x"], feeds, bins=64, channel_axes={"l": 1})
    flat = _flat(_golden(model, ["l"], feeds)["l"])
    fin = flat[np.isfinite(flat)]
    st = stats["l"]
    assert st.nonfinite == int((~np.isfinite(flat)).sum()) > 0
    assert st.count == flat.size
    assert st.min == float(fin.min()) and st.max == float(fin.max())
    assert st.hist.sum() == fin.size == st.count - st.nonfinite
    want = np.abs(np.where(np.isfinite(flat), flat, 0).reshape(-1, 6)).max(axis=0)
    np.testing.assert_array_equal(st.channel_absmax, want)
    assert stats["x"].nonfinite == 6  # the +inf input row
    for m in RANGE_METHODS:
        _check_range(*compute_range(st, m))


def test_all_zero_and_constant_tensors_are_degenerate():
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
    three = numpy_helper.from_array(np.array([3.0], np.float32), "three")
    model = _model(
        [h.make_node("Mul", ["x", "zero"], ["z"]), h.make_node("Add", ["z", "three"], ["c"]),
         h.make_node("Sub", ["z", "three"], ["n"])],
        [h.make_tensor_value_info("x", T.FLOAT, [None, 4])],
        [h.make_tensor_value_info("c", T.FLOAT, [None, 4]), h.make_tensor_value_info("n", T.FLOAT, [None, 4])],
        [zero, three],
    )
    feeds = [{"x": np.random.default_rng(i).standard_normal((i + 1, 4)).astype(np.float32)} for i in range(4)]
    stats = collect_statistics(model, ["z", "c", "n"], feeds, bins=32)
    assert stats["z"].degenerate == "all zero"
    assert stats["c"].degenerate == "constant value 3.0"
    assert stats["n"].degenerate == "constant value -3.0"
    assert stats["z"].hist.sum() == stats["z"].count == 40
    for m in RANGE_METHODS:
        for qdtype, sym in SETTINGS:
            assert compute_range(stats["z"], m, qdtype=qdtype, symmetric=sym) == (0.0, 0.0)
            assert compute_range(stats["c"], m, qdtype=qdtype, symmetric=sym) == (0.0, 3.0)
            assert compute_range(stats["n"], m, qdtype=qdtype, symmetric=sym) == (-3.0, 0.0)


def test_tensorstats_by_hand():
    """The dataclass the quantize pass reads, built directly: minmax needs no histogram."""
    st = TensorStats(name="t", dtype=np.dtype(np.float32), count=10, samples=2, min=-1.5, max=4.0, nonfinite=0,
                     hist=None, hist_edges=None, channel_absmax=None)
    assert st.degenerate is None and st.absmax == 4.0
    assert compute_range(st, "minmax") == (-1.5, 4.0)
    assert compute_range(st, "minmax", qdtype="int8", symmetric=True) == (-4.0, 4.0)
    assert TensorStats("e", np.dtype(np.float32), 0, 3, math.nan, math.nan, 0, None, None, None).degenerate == "empty"
    assert compute_range(TensorStats("e", np.dtype(np.float32), 0, 3, math.nan, math.nan, 0), "mse") == (0.0, 0.0)


def test_no_finite_values_raises_in_compute_range():
    st = stats_from_arrays("t", [np.array([np.nan, np.inf], np.float32)], bins=8)
    assert st.degenerate == "no finite values" and st.nonfinite == 2 and math.isnan(st.min)
    with pytest.raises(CalibrationDataError, match="'t'.*no finite value"):
        compute_range(st, "minmax")


@pytest.mark.parametrize("elem", [T.BFLOAT16, T.FLOAT16, T.DOUBLE], ids=["bfloat16", "float16", "double"])
def test_other_float_types(elem):
    """float16/double come back as they are; ORT cannot hand bfloat16 to numpy, so a bfloat16 tensor is
    read through a float32 Cast added to the augmented copy."""
    np_dtype = np.dtype(h.tensor_dtype_to_np_dtype(elem))
    model = _model(
        [h.make_node("Cast", ["x"], ["b"], to=elem), h.make_node("Cast", ["b"], ["y"], to=T.FLOAT)],
        [h.make_tensor_value_info("x", T.FLOAT, [None])],
        [h.make_tensor_value_info("y", T.FLOAT, [None])],
    )
    feeds = [{"x": np.random.default_rng(i).standard_normal(50).astype(np.float32)} for i in range(3)]
    st = collect_statistics(model, ["b"], feeds, bins=16)["b"]
    flat = _flat([f["x"] for f in feeds]).astype(np_dtype).astype(np.float64)
    assert st.dtype == np_dtype
    assert st.min == float(flat.min()) and st.max == float(flat.max()) and st.count == 150
    assert st.hist.sum() == 150


def test_non_float_tensors_have_no_entry():
    model = _chain()
    stats = collect_statistics(model, ["s", "h"], _var_feeds(2), bins=8)
    assert set(stats) == {"h"}  # "s" (int64 Shape output) is left out, not an error


def test_unknown_tensor_name_raises_naming_it():
    with pytest.raises(CalibrationDataError, match="'no_such_tensor'"):
        collect_statistics(_chain(), ["h", "no_such_tensor"], _var_feeds(2))


def test_input_model_not_mutated(tmp_path):
    model = _chain()
    before = model.SerializeToString()
    stats = collect_statistics(model, ["h", "r"], _var_feeds(3), bins=8)
    assert model.SerializeToString() == before
    path = tmp_path / "chain.onnx"
    path.write_bytes(before)
    from_path = collect_statistics(path, ["h", "r"], _var_feeds(3), bins=8)
    assert path.read_bytes() == before
    np.testing.assert_array_equal(from_path["h"].hist, stats["h"].hist)


def test_argument_errors():
    model, feeds = _chain(), _var_feeds(2)
    with pytest.raises(CalibrationDataError, match="empty"):
        collect_statistics(model, ["h"], [])
    with pytest.raises(RecipeError, match="bins"):
        collect_statistics(model, ["h"], feeds, bins=0)
    with pytest.raises(CalibrationDataError, match="channel axis 3"):
        collect_statistics(model, ["h"], feeds, channel_axes={"h": 3})
    st = collect_statistics(model, ["h"], feeds, histogram=False)["h"]
    assert st.hist is None and st.hist_edges is None
    assert compute_range(st, "minmax") == (min(st.min, 0.0), max(st.max, 0.0))
    for m in ("percentile", "entropy", "mse"):
        with pytest.raises(CalibrationDataError, match="histogram=True"):
            compute_range(st, m)
    with pytest.raises(RecipeError, match="valid: minmax, percentile, entropy, mse"):
        compute_range(st, "kl")
    with pytest.raises(RecipeError, match="quantized dtype"):
        compute_range(st, "minmax", qdtype="fp8")
    with pytest.raises(RecipeError, match="percentile"):
        compute_range(st, "minmax", percentile=101)


def test_progress_reports_every_sample_of_each_pass(capsys):
    seen = []
    stats = collect_statistics(_chain(), ["h"], _var_feeds(3), bins=8, progress=lambda s, d, t: seen.append((s, d, t)))
    assert stats["h"].samples == 3
    assert seen == [("calibration: ranges", i, 3) for i in range(4)] + [("calibration: histograms", i, 3)
                                                                       for i in range(4)]
    plain = collect_statistics(_chain(), ["h"], _var_feeds(3), bins=8, progress=True)  # a tqdm bar on stderr
    assert plain["h"].samples == 3 and "calibration: ranges" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ range methods
def _quant_mse(x: np.ndarray, lo: float, hi: float, qdtype: str, symmetric: bool) -> float:
    """Mean squared error of quantize-dequantize of x with the range, as the quantize pass would set it."""
    qmin, qmax = {"uint8": (0, 255), "int8": (-128, 127), "int4": (-8, 7), "uint4": (0, 15)}[qdtype]
    if symmetric:
        t = max(-lo, hi)
        qmin = -qmax if qmin < 0 else qmin
        scale = 2 * t / (qmax - qmin)
        zp = 0 if qmin < 0 else (qmin + qmax + 1) // 2
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return float(np.mean(((q - zp) * scale - x.astype(np.float64)) ** 2))


@pytest.fixture(scope="module")
def heavy_tail():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(1_000_000).astype(np.float32), np.full(5, 50.0, np.float32)])
    return x, stats_from_arrays("heavy", [x[:500_000], x[500_000:]])


def test_heavy_tail_clipped_by_percentile_and_entropy(heavy_tail):
    x, st = heavy_tail
    assert compute_range(st, "minmax")[1] == 50.0
    assert compute_range(st, "minmax", symmetric=True) == (-50.0, 50.0)
    for m in ("percentile", "entropy"):
        for qdtype, sym in SETTINGS:
            lo, hi = compute_range(st, m, qdtype=qdtype, symmetric=sym)
            assert hi < 6.0 and lo > -6.0, (m, qdtype, sym, lo, hi)
    # the brief's 1e5 + 5 outliers: 99.999% leaves ~1 element for 5 outliers, so it keeps 50; 99.99 clips
    st_small = stats_from_arrays("small", [x[:100_000], x[-5:]])
    assert compute_range(st_small, "percentile")[1] > 45
    assert compute_range(st_small, "percentile", percentile=99.99)[1] < 6.0
    assert compute_range(st_small, "entropy")[1] < 6.0


def test_mse_minimises_real_quantization_error(heavy_tail):
    """mse clips what costs less to clip than to round: a far smaller error than minmax for 8 bits, and
    for 4 bits it clips the outliers well below 50 (for 8 bits, clipping 5 values at 50 costs more squared
    error than the rounding it saves, so the mse-optimal range keeps most of it)."""
    x, st = heavy_tail
    for qdtype, sym in [("uint8", False), ("int8", True), ("int4", True), ("uint4", False)]:
        errs = {m: _quant_mse(x, *compute_range(st, m, qdtype=qdtype, symmetric=sym), qdtype, sym)
                for m in ("minmax", "percentile", "mse")}
        assert errs["mse"] <= 1.02 * min(errs.values()), (qdtype, sym, errs)
        assert errs["mse"] < 0.9 * errs["minmax"], (qdtype, sym, errs)
    assert compute_range(st, "mse", qdtype="int4", symmetric=True)[1] < 10.0
    assert compute_range(st, "mse", qdtype="uint4")[1] < 10.0
    assert compute_range(st, "mse", qdtype="int8", symmetric=True)[1] < 40.0


@pytest.mark.parametrize("dist", ["normal", "laplace", "relu"])
def test_mse_beats_or_matches_other_methods(dist):
    rng = np.random.default_rng(5)
    x = {"normal": rng.standard_normal(300_000), "laplace": rng.laplace(size=300_000),
         "relu": np.maximum(rng.standard_normal(300_000), 0)}[dist].astype(np.float32)
    st = stats_from_arrays(dist, [x])
    errs = {m: _quant_mse(x, *compute_range(st, m), "uint8", False) for m in RANGE_METHODS}
    assert errs["mse"] <= 1.02 * min(errs.values()), errs
    # exact zeros do not drag entropy down on ReLU outputs (a spike in bin 0 used to clip at ~45% of max)
    assert errs["entropy"] < 1.3 * errs["minmax"], errs


def test_range_always_contains_zero():
    rng = np.random.default_rng(2)
    pos = stats_from_arrays("pos", [rng.uniform(1.0, 2.0, 10_000).astype(np.float32)], bins=128)
    neg = stats_from_arrays("neg", [rng.uniform(-2.0, -1.0, 10_000).astype(np.float32)], bins=128)
    for m in RANGE_METHODS:
        for qdtype, sym in SETTINGS:
            lo, hi = compute_range(pos, m, qdtype=qdtype, symmetric=sym)
            assert lo <= 0.0 and 1.0 < hi <= 2.0
            lo, hi = compute_range(neg, m, qdtype=qdtype, symmetric=sym)
            assert -2.0 <= lo < -1.0 and hi >= 0.0


def test_percentile_matches_numpy_quantiles():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(400_000).astype(np.float32) * 2 + 0.5
    st = stats_from_arrays("x", [x], bins=4096)
    width = (st.max - st.min) / 4096
    lo, hi = compute_range(st, "percentile", percentile=99.0)
    assert abs(lo - np.quantile(x, 0.01)) < 2 * width and abs(hi - np.quantile(x, 0.99)) < 2 * width
    lo, hi = compute_range(st, "percentile", symmetric=True, percentile=99.0)
    assert abs(hi - np.quantile(np.abs(x), 0.99)) < 2 * width and lo == -hi


def _entropy_reference(hist: np.ndarray, edges: np.ndarray, nq: int) -> float:
    """Plain loop over candidates, building P and Q bin by bin (what the prefix-sum version must equal)."""
    best, best_t = np.inf, None
    for i in range(nq, len(hist) + 1):
        p = hist[:i].astype(np.float64).copy()
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        level = (np.arange(i) * nq) // i
        for g in range(nq):
            sel = level == g
            nz = (p[sel] != 0).sum()
            if nz:
                q[sel] = np.where(p[sel] != 0, hist[:i][sel].sum() / nz, 0.0)
        q = np.where((p > 0) & (q == 0), 1e-4, q)
        pn, qn = p / p.sum(), q / hist[:i].sum()
        kl = float(np.sum(np.where(pn > 0, pn * np.log(np.where(pn > 0, pn, 1) / np.where(qn > 0, qn, 1)), 0)))
        if kl < best - 1e-12:
            best, best_t = kl, float(edges[i])
    return best_t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_prefix_sums_equal_the_plain_loop(seed):
    rng = np.random.default_rng(seed)
    hist = np.histogram(np.abs(rng.standard_t(3, 20_000)), bins=200)[0]
    hist[rng.integers(0, 200, 30)] = 0  # empty bins exercise the non-empty counts
    edges = np.linspace(0.0, 7.0, 201)
    assert _entropy_threshold(hist.astype(np.float64), edges, nq=16) == pytest.approx(
        _entropy_reference(hist, edges, 16)
    )


# ------------------------------------------------------------------------------------------ memory
def _relu_mlp() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W")
    return _model(
        [h.make_node("MatMul", ["x", "W"], ["h"]), h.make_node("Relu", ["h"], ["y"])],
        [h.make_tensor_value_info("x", T.FLOAT, [None, 64])],
        [h.make_tensor_value_info("y", T.FLOAT, [None, 64])],
        [w],
    )


def _peak(model, feeds) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        stats = collect_statistics(model, ["x", "h", "y"], feeds, bins=512, channel_axes={"h": -1})
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert stats["h"].samples == len(feeds)
    return peak


def test_memory_flat_in_the_number_of_samples():
    model = _relu_mlp()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((32, 64)).astype(np.float32)} for _ in range(200)]  # 8 KiB per sample
    _peak(model, feeds[:5])  # warm-up: first-use allocations of ORT/numpy/tqdm
    p20, p200 = _peak(model, feeds[:20]), _peak(model, feeds)
    # storing activations would add 3 tensors x 8 KiB x 180 samples = 4.3 MiB
    assert p200 <= p20 + 64 * 1024, (p20, p200)


# ------------------------------------------------------------------------------------------ MiniLM
def test_minilm_matmul_input_ranges():
    try:
        path = fx.minilm_path()
        feeds = fx.minilm_feeds(32)
    except fx.FixtureUnavailable as e:
        pytest.skip(str(e))
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    names = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits})
    assert len({f["input_ids"].shape[1] for f in feeds}) > 1  # variable sequence lengths
    stats = collect_statistics(model, names, feeds)
    assert set(stats) == set(names)
    for name, st in stats.items():
        assert st.nonfinite == 0 and st.hist.sum() == st.count
        for m in RANGE_METHODS:
            for qdtype, sym in SETTINGS:
                _check_range(*compute_range(st, m, qdtype=qdtype, symmetric=sym))
    ffn_down = [n for n in names if "intermediate_act_fn" in n]  # GELU outputs feeding the FFN-down MatMuls
    assert len(ffn_down) == 3
    print()
    for n in ffn_down:
        st = stats[n]
        mm, pc = compute_range(st, "minmax"), compute_range(st, "percentile")
        en, ms = compute_range(st, "entropy"), compute_range(st, "mse")
        print(f"{n}: minmax [{mm[0]:.3f}, {mm[1]:.3f}]  p99.999 [{pc[0]:.3f}, {pc[1]:.3f}]  "
              f"entropy [{en[0]:.3f}, {en[1]:.3f}]  mse [{ms[0]:.3f}, {ms[1]:.3f}]")
        assert mm[0] > -0.2  # GELU's minimum is -0.17
    assert max(stats[n].max for n in ffn_down) > 10  # measured: MiniLM-L3's GELU outputs reach ~25


def test_gram_matches_numpy_over_variable_length_feeds():
    """X^T X of the vectors along the Gram axis, rows from every sample (any batch/length), NaN rows skipped."""
    m = h.make_model(h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                                  [h.make_tensor_value_info("x", T.FLOAT, ["b", "s", 6])],
                                  [h.make_tensor_value_info("y", T.FLOAT, ["b", "s", 6])]),
                     opset_imports=[h.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((b, s, 6)).astype(np.float32)} for b, s in [(1, 3), (2, 5), (3, 1)]]
    feeds[1]["x"][1, 2, 4] = np.nan
    st = collect_statistics(m, [], feeds, histogram=False, gram_axes={"y": -1, "x": 2})
    for name, f in (("x", lambda a: a), ("y", lambda a: np.maximum(a, 0))):
        rows = np.concatenate([f(fd["x"]).reshape(-1, 6) for fd in feeds]).astype(np.float64)
        rows = rows[np.isfinite(rows).all(axis=1)]
        np.testing.assert_allclose(st[name].gram, rows.T @ rows, rtol=1e-5, atol=1e-5)
        assert st[name].gram_rows == rows.shape[0] == 3 + 10 - 1 + 3
        np.testing.assert_allclose(st[name].gram_sum, rows.sum(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(st[name].second_moment, rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(CalibrationDataError, match="Gram axis 3 is out of range"):
        collect_statistics(m, [], feeds, histogram=False, gram_axes={"x": 3})
    with pytest.raises(RecipeError, match="Gram axis"):
        collect_statistics(m, [], feeds, histogram=False, gram_axes={"x": "last"})


def test_moment_chunks_hold_one_chunk_and_collect_each_once_in_order():
    """MomentChunks (models over 2 GB): a chunk holds inputs up to its byte budget; reading in order collects
    each input once; reading an input outside the chunk held drops it first (never two chunks at once)."""
    from onnxcomp.calibration.chunks import MomentChunks

    loads = []

    def load(axes):
        loads.append(sorted(axes))
        return {n: (np.full((4, 4), i, np.float64), np.full(4, i, np.float64)) for i, n in enumerate(axes)
                if n != "unseen"}

    mc = MomentChunks([("a", -1, 4), ("b", -1, 4), ("c", -1, 4), ("unseen", -1, 4)], load, chunk_bytes=2 * 8 * 16)
    grams, means = mc.grams, mc.means
    assert grams and "a" in grams and "z" not in means and grams.get("z") is None
    assert grams.get("a").shape == (4, 4) and means.get("b").shape == (4,)
    assert loads == [["a", "b"]]
    assert grams.get("c") is not None and grams.get("unseen") is None and loads == [["a", "b"], ["c", "unseen"]]
    assert means.get("a") is not None and loads[-1] == ["a", "b"] and mc.collections == 3
    assert [sorted(c) for c in mc.chunks()] == [["a", "b"], ["c"]]
    grams.clear()
    assert grams.get("b") is not None and loads[-1] == ["b", "c"]
    one = MomentChunks([("big", -1, 100)], load, chunk_bytes=1)  # a chunk holds one input at least
    assert one.get("big") is not None and loads[-1] == ["big"]
