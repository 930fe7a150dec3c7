"""The sparsify pass: patterns verified element by element, exact sparsity, SparseGPT's reconstruction, storage,
composition with quantize, recipe errors, and real fixtures end to end."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxcomp
from onnxcomp.data import split_holdout
from onnxcomp import storage, testing
from onnxcomp.errors import CalibrationDataError, RecipeError
from onnxcomp.algorithms import sparsegpt as sg
from onnxcomp.recipe import Recipe
from tests.graphs import const, make_model, run_one_pass, vi


def _sp(model, calib=None, **opts):
    """Sparsify with `opts` (allocation uniform unless given: these tests check the per-layer mechanics)."""
    opts.setdefault("allocation", "uniform")
    return run_one_pass(model, {"type": "sparsify", **opts}, calib)


def _weights(model):
    """Every float weight of the model, dense (sparse Constant nodes included)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    storage.densify(m)
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _run(model, feeds):
    return testing.session(model).run(None, feeds)[0]


def _anisotropic(n, k, seed=0):
    """Inputs with very different channel scales and correlated channels (where OBS beats magnitude); one
    distribution per k, `seed` draws the samples."""
    dist = np.random.default_rng(k)
    mix = dist.standard_normal((k, k)) * 0.3 + np.eye(k)
    scale = np.exp(dist.uniform(-2, 2, k))
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((n, k)) @ mix * scale).astype(np.float32)} for _ in range(4)]


def _matmul(k=48, n=32, seed=0, name="W"):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", name], ["y"], name="mm")], [vi("x", ["b", k])],
                   [vi("y", ["b", n])], [const(name, w)])
    return m, w


def _output_major(w_new, op="MatMul"):
    return w_new.T if op == "MatMul" else w_new.reshape(w_new.shape[0], -1)


# ------------------------------------------------------------------------------------------------ patterns
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "1:3"])
def test_nm_pattern_on_every_group(method, nm):
    n, mm = (int(v) for v in nm.split(":"))
    m, w = _matmul(k=50)  # 50 inputs: a partial last group for both patterns
    res = _sp(m, _anisotropic(64, 50), method=method, pattern=nm)
    wt = _output_major(_weights(res.model)["W"])
    for row in wt:
        for g in range(0, 50, mm):
            assert np.count_nonzero(row[g:g + mm]) <= n
            if g + mm <= 50:
                assert np.count_nonzero(row[g:g + mm]) == n  # full groups keep exactly N (no weight was zero)
    assert res.report.passes[0].details["requested_sparsity"] == pytest.approx(1 - n / mm)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
@pytest.mark.parametrize("block", [[1, 4], [4, 4]])
def test_block_pattern_zeroes_whole_tiles(method, block):
    m, w = _matmul(k=64, n=32)
    res = _sp(m, _anisotropic(64, 64), method=method, pattern="block", block=block, sparsity=0.5)
    wt = _output_major(_weights(res.model)["W"])  # [32 outputs, 64 inputs]
    r, c = block
    tiles = (wt == 0).reshape(32 // r, r, 64 // c, c).transpose(0, 2, 1, 3).reshape(-1, r * c)
    assert set(tiles.sum(axis=1)) <= {0, r * c}  # every tile all zero or all kept
    assert (tiles.all(axis=1)).sum() == round(0.5 * len(tiles))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.55])
def test_achieved_sparsity_is_exact_across_layouts(method, sparsity):
    rng = np.random.default_rng(3)
    wg = rng.standard_normal((24, 40)).astype(np.float32)  # Gemm transB: [out, in]
    wc = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)  # Conv group 2: Cin 6
    m = make_model([helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),
                    helper.make_node("Flatten", ["c"], ["f"]),
                    helper.make_node("Gemm", ["f", "Wg", "bg"], ["y"], name="gemm", transB=1)],
                   [vi("x", [1, 6, 2, 2])], [vi("y", [1, 24])],
                   [const("Wc", wc), const("Wg", wg[:, :32].copy()), const("bg", np.ones(24, np.float32))])
    feeds = [{"x": rng.standard_normal((1, 6, 2, 2)).astype(np.float32)} for _ in range(8)]
    res = _sp(m, feeds, method=method, sparsity=sparsity)
    w = _weights(res.model)
    for name, size in (("Wc", wc.size), ("Wg", 24 * 32)):
        assert np.count_nonzero(w[name] == 0) == round(sparsity * size), name
    assert np.all(w["bg"] == 1)  # biases untouched
    d = res.report.passes[0].details
    assert d["params_zeroed"] == round(sparsity * wc.size) + round(sparsity * 24 * 32)
    assert all(r["rel_err"] is not None for r in d["layers"])
    _run(res.model, feeds[0])


def test_convtranspose_groups_nm_along_input_channels():
    rng = np.random.default_rng(5)
    wt = rng.standard_normal((8, 3, 2, 2)).astype(np.float32)  # ConvTranspose group 2: Cin 8, Cout 6
    m = make_model([helper.make_node("ConvTranspose", ["x", "Wt"], ["y"], name="deconv", group=2)],
                   [vi("x", [1, 8, 3, 3])], [vi("y", [1, 6, 4, 4])], [const("Wt", wt)])
    feeds = [{"x": rng.standard_normal((1, 8, 3, 3)).astype(np.float32)} for _ in range(4)]
    res = _sp(m, feeds, method="sparsegpt", pattern="2:4")
    w = _weights(res.model)["Wt"]
    for g in range(2):  # the reduction axis is the group's 4 input channels, for every (output, tap)
        np.testing.assert_array_equal(np.count_nonzero(w[4 * g:4 * g + 4], axis=0), np.full((3, 2, 2), 2))
    _run(res.model, feeds[0])


# ------------------------------------------------------------------------------------------------ criteria
def test_sparsegpt_beats_wanda_beats_magnitude_on_layer_output_error():
    m, w = _matmul(k=64, n=48, seed=1)
    calib = _anisotropic(128, 64, seed=2)
    test = _anisotropic(128, 64, seed=3)[0]
    ref = _run(m, test)
    err = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        res = _sp(m, calib, method=method, sparsity=0.5)
        y = _run(res.model, test)
        err[method] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        rel = res.report.passes[0].details["layers"][0]["rel_err"]  # on calibration data, from X^T X
        seen = split_holdout(calib)[0]  # what calibration saw (every 5th sample is held back for validation)
        assert rel == pytest.approx(_calib_err(m, res.model, seen), rel=1e-3)
    assert err["sparsegpt"] < 0.95 * err["wanda"] and err["wanda"] < 0.5 * err["magnitude"], err


def _calib_err(ref, cand, feeds):
    num = sum(np.sum((_run(cand, f).astype(np.float64) - _run(ref, f)) ** 2) for f in feeds)
    den = sum(np.sum(_run(ref, f).astype(np.float64) ** 2) for f in feeds)
    return float(np.sqrt(num / den))


def test_sparsegpt_update_lowers_error_of_its_own_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 32)) @ (rng.standard_normal((32, 32)) * 0.5 + np.eye(32))
    h = x.T @ x
    w = rng.standard_normal((16, 32))
    for pattern in (sg.SparsityPattern("unstructured"), sg.SparsityPattern("nm", 2, 4),
                    sg.SparsityPattern("block", block=(2, 4))):
        new, mask = sg.sparsegpt(w, h, pattern, 0.5, damping=1e-6)
        assert np.all(new[mask] == 0) and np.count_nonzero(mask) == w.size // 2
        masked = np.where(mask, 0.0, w)
        assert sg.error_terms(w, new, h)[0] < 0.8 * sg.error_terms(w, masked, h)[0]


# ------------------------------------------------------------------------------------------------ shared weights
def test_shared_weight_pruned_once_and_weight_read_by_gather_left_dense():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    e = rng.standard_normal((16, 16)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["a"], name="m1"),
                    helper.make_node("MatMul", ["a", "W"], ["b"], name="m2"),
                    helper.make_node("Gather", ["E", "ids"], ["g"], name="emb"),
                    helper.make_node("MatMul", ["b", "E"], ["y"], name="tied")],
                   [vi("x", [2, 16]), vi("ids", [2], onnx.TensorProto.INT64)], [vi("y", [2, 16]), vi("g", [2, 16])],
                   [const("W", w), const("E", e)])
    res = _sp(m, method="magnitude", sparsity=0.5)
    out = _weights(res.model)
    assert set(out) == {"W", "E"}  # one pruned W (same name), no copy
    assert np.count_nonzero(out["W"] == 0) == 128
    np.testing.assert_array_equal(out["E"], e)
    d = res.report.passes[0].details
    assert d["layers"][0]["nodes"] == ["m1", "m2"]
    assert any(r["node"] == "tied" and "Gather" in r["reason"] for r in d["left_dense"])


# ------------------------------------------------------------------------------------------------ storage
def test_sparse_storage_round_trips_to_identical_weights(tmp_path):
    m, w = _matmul(k=96, n=64)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)}
    dense = _sp(m, method="magnitude", sparsity=0.8, storage="dense")
    auto = _sp(m, method="magnitude", sparsity=0.8, storage="auto")
    assert any(n.op_type == "Constant" for n in auto.model.graph.node)  # 20% density: smaller sparse
    assert not any(n.op_type == "Constant" for n in dense.model.graph.node)
    size = auto.report.passes[0].details["size"]
    assert size["sparse_tensors"] == 1 and size["file_bytes_after"] < size["file_bytes_before"]
    path = tmp_path / "sparse.onnx"
    auto.save(path)
    again = onnxcomp.ir.load_proto(path)
    np.testing.assert_array_equal(_weights(again)["W"], _weights(dense.model)["W"])
    np.testing.assert_array_equal(_run(again, feeds), _run(dense.model, feeds))
    # low sparsity: sparse would be bigger, so stored dense
    low = _sp(m, method="magnitude", sparsity=0.5)
    assert low.report.passes[0].details["size"]["sparse_tensors"] == 0


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_sparsify_then_quantize_keeps_zeros_exact(mode):
    m, w = _matmul(k=128, n=128)
    res = onnxcomp.compress(m, [{"type": "sparsify", "method": "magnitude", "sparsity": 0.6},
                                {"type": "quantize", "mode": mode, "min_weight_elements": 0}],
                            progress=False, validate=False)
    assert [r.status for r in res.report.passes] == ["ok", "ok"]
    onnx.checker.check_model(res.model, full_check=True)
    pruned = _sp(m, method="magnitude", sparsity=0.6)
    zeros = _weights(pruned.model)["W"] == 0
    ints = [v for v in _weights(res.model).values() if v.dtype == np.int8 and v.shape == w.shape]
    nbits = [n for n in res.model.graph.node if n.op_type == "MatMulNBits"]
    if mode == "weight_only":  # ort-cpu: 8-bit MatMulNBits, codes [N, blocks, block] stored as q + 128
        (node,) = nbits
        codes = _weights(res.model)[node.input[1]]
        assert codes.dtype == np.uint8 and len(node.input) == 3  # symmetric: zero point 128 implied
        ints = [(codes.reshape(w.shape[1], -1)[:, :w.shape[0]].T.astype(np.int32) - 128)]
    assert len(ints) == 1
    np.testing.assert_array_equal(ints[0] == 0, zeros)  # zero pattern survives (and no new zeros at this scale)
    _run(res.model, {"x": np.ones((2, 128), np.float32)})


# ------------------------------------------------------------------------------------------------ recipe errors
@pytest.mark.parametrize("opts, match", [
    ({"pattern": "4:2"}, "0 < N < M"),
    ({"pattern": "2:x"}, "invalid value"),
    ({"pattern": 124}, "quoted"),
    ({"pattern": "2:4", "sparsity": 0.7}, "contradicts"),
    ({"sparsity": 1.0}, r"\[0, 1\)"),
    ({"sparsity": -0.1}, r"\[0, 1\)"),
    ({"block": [0, 4], "pattern": "block"}, "block"),
    ({"method": "svd"}, "valid values"),
    ({"pattern": "2:4", "allocation": "sensitivity"}, "N:M"),
    ({"ops": ["Gather"]}, "not supported"),
    ({"sparse": 0.5}, "unknown key"),
    ({"heads": 0.2}, "channel"),
    ({"pattern": "channel", "heads": 1.0}, "heads"),
])
def test_recipe_errors(opts, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.parse([{"type": "sparsify", **opts}])


@pytest.mark.parametrize("opts", [{"method": "wanda"}, {"method": "sparsegpt"},
                                  {"method": "magnitude", "allocation": "sensitivity"}])
def test_missing_calibration_data_is_a_clear_error(opts):
    m, _ = _matmul()
    with pytest.raises(CalibrationDataError, match="calibration_data"):
        onnxcomp.compress(m, [{"type": "sparsify", **opts}], progress=False, validate=False)


def test_auto_method_and_defaults_round_trip():
    p = Recipe.parse([{"type": "sparsify", "pattern": "1:4"}]).passes[0]
    assert p.sparsity == pytest.approx(0.75)
    assert Recipe.parse([p.to_dict()]).passes[0] == p
    m, _ = _matmul()
    res = _sp(m)
    assert res.report.passes[0].details["method"] == "magnitude"
    assert any("auto" in n for n in res.report.passes[0].notes)


# ------------------------------------------------------------------------------------------------ real models
def test_digits_cnn_end_to_end_sparsegpt_keeps_top1():
    d = testing.digits_data()
    path = testing.digits_cnn_path()
    calib = [{"input": d["x_calib"][i:i + 16]} for i in range(0, 128, 16)]
    res = onnxcomp.compress(str(path), {"passes": [{"type": "sparsify", "sparsity": 0.5}]}, calibration_data=calib,
                            progress=False)
    rec = res.report.passes[0]
    assert rec.status == "ok" and rec.details["method"] == "sparsegpt"
    assert {r["op"] for r in rec.details["layers"]} >= {"Conv"}
    assert rec.details["sparsity"] == pytest.approx(0.5, abs=1e-3)
    onnx.checker.check_model(res.model, full_check=True)
    base = testing.digits_top1(path, d["x_test"], d["y_test"])
    top1 = testing.digits_top1(res.model, d["x_test"], d["y_test"])
    assert top1 >= base - 0.02, (base, top1)
    assert res.report.validation is not None


def test_sensitivity_allocation_meets_budget_with_less_error_than_uniform():
    d = testing.digits_data()
    path = testing.digits_mlp_path()
    calib = [{"input": d["x_calib_flat"][i:i + 32]} for i in range(0, 128, 32)]
    out = {}
    for alloc in ("uniform", "sensitivity"):
        res = onnxcomp.compress(str(path), [{"type": "sparsify", "method": "wanda", "sparsity": 0.7,
                                             "allocation": alloc}], calibration_data=calib, progress=False,
                                validate=False)
        det = res.report.passes[0].details
        out[alloc] = res, det
        assert det["sparsity"] == pytest.approx(0.7, abs=1e-3)
    det = out["sensitivity"][1]
    assert len({round(r["sparsity"], 2) for r in det["layers"]}) > 1  # levels differ per layer
    x = d["x_test_flat"][:200]

    def err(model):
        ref = _run(onnxcomp.ir.load_proto(path), {"input": x})
        return np.linalg.norm(_run(model, {"input": x}) - ref) / np.linalg.norm(ref)

    assert err(out["sensitivity"][0].model) < err(out["uniform"][0].model)


def test_channel_pattern_dispatches_to_channels_module(monkeypatch):
    """pattern: channel runs the structured pruning (algorithms.channels.prune_channels) with this pass's options,
    and its outcome is the pass's; the unstructured path is not taken."""
    from onnxcomp.algorithms import channels

    p = Recipe.parse([{"type": "sparsify", "pattern": "channel", "sparsity": 0.25}]).passes[0]
    seen = []
    real = channels.prune_channels

    def spy(model, source, ctx, opts):
        seen.append(opts)
        return real(model, source, ctx, opts)

    monkeypatch.setattr(channels, "prune_channels", spy)
    res = onnxcomp.compress(testing.digits_mlp_path(), [p.to_dict()], progress=False, validate=False)
    assert seen == [p.resolve(has_data=False)]  # allocation made concrete: uniform without data
    details = res.report.passes[0].details
    assert details["pattern"] == "channel" and details["groups"] and details["params_removed"] > 0
