"""Models as ORT's transformers optimizer leaves them (com.microsoft Attention, EmbedLayerNormalization, BiasGelu,
SkipLayerNormalization): contrib-op outputs are typed (ORT's symbolic shape inference), so the MatMuls after
them are quantized; packed-QKV Attention becomes QAttention, and the fused embeddings are unfused so that their
tables are quantized per row; channel and head pruning see through BiasGelu and the fused Attention."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import qmath, testing
from tests.graphs import const, random_feeds, vi

MS = "com.microsoft"


def _ms_model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _left(res, op):
    return {x["node"]: x["reason"] for x in res.report.passes[-1].details["left_float"] if x["op"] == op}


def _attention_block(rng, hidden=64, heads=4, attrs=None):
    """x -> com.microsoft Attention (packed QKV, bias, int32 mask index) -> MatMul: the optimizer's form."""
    w = (rng.standard_normal((hidden, 3 * hidden)) / np.sqrt(hidden)).astype(np.float32)
    b = (0.1 * rng.standard_normal(3 * hidden)).astype(np.float32)
    wo = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [helper.make_node("Attention", ["x", "Wqkv", "Bqkv", "mask"], ["ctx"], name="attn", domain=MS,
                              num_heads=heads, **(attrs or {})),
             helper.make_node("MatMul", ["ctx", "Wo"], ["y"], name="out_proj")]
    return _ms_model(nodes, [vi("x", [2, 8, hidden]), vi("mask", [2], TensorProto.INT32)], [vi("y", [2, 8, hidden])],
                     [const("Wqkv", w), const("Bqkv", b), const("Wo", wo)])


def _feeds(rng, n=8, hidden=64):
    return [{"x": rng.standard_normal((2, 8, hidden)).astype(np.float32), "mask": np.array([8, 5], np.int32)}
            for _ in range(n)]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _with_weights(m, **values):
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return out


def _u8(x, scale, zp):
    """x through a uint8 QuantizeLinear/DequantizeLinear pair."""
    return ((np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale).astype(np.float32)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_packed_qkv_attention_becomes_qattention(mode):
    """Golden numerics: QAttention computes the float Attention of the dequantized weight on the quantized input
    (x's calibrated range in static mode, its own range per run in dynamic mode), to float rounding."""
    rng = np.random.default_rng(0)
    m = _attention_block(rng)
    calib, held = _feeds(rng), _feeds(rng, 2)
    res = onnxcomp.compress(m, [{"type": "quantize", "mode": mode, "min_weight_elements": 0,
                                 "exclude": ["out_proj"]}], calibration_data=calib, progress=False)
    ops = _ops(res.model)
    assert "Attention" not in ops and ops.count("QAttention") == 1, ops
    qa = next(n for n in res.model.graph.node if n.op_type == "QAttention")
    assert qa.domain == MS and {a.name: a.i for a in qa.attribute}["num_heads"] == 4
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    wq, ws = inits[qa.input[1]], inits[qa.input[4]]
    assert wq.dtype == np.int8 and wq.shape == (64, 192) and ws.shape == (192,)  # one scale per output column
    assert qmath.pairs_fit(wq.T) and int(np.abs(wq.astype(np.int32)).max()) > 64  # ort-cpu: bounded K pairs
    assert ops[0] == ("DynamicQuantizeLinear" if mode == "dynamic" else "QuantizeLinear")
    emulated = testing.session(_with_weights(m, Wqkv=(wq * ws).astype(np.float32), Bqkv=inits[qa.input[2]]))
    ref, got = testing.session(m), testing.session(res.model)
    for f in held:
        x = f["x"]
        if mode == "static":
            sx, zx = float(inits[qa.input[3]]), int(inits[qa.input[6]])
        else:  # DynamicQuantizeLinear: the range of x and 0, uint8
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            sx = np.float32((hi - lo) / 255)
            zx = int(np.clip(np.rint(-lo / sx), 0, 255))
        y = got.run(None, f)[0]
        assert _rel(emulated.run(None, {**f, "x": _u8(x, sx, zx)})[0], y) < 1e-4
        assert _rel(ref.run(None, f)[0], y) < 0.03


def test_attention_forms_qattention_lacks_are_left_float_with_the_reason():
    rng = np.random.default_rng(1)
    m = _attention_block(rng, attrs={"qkv_hidden_sizes": [64, 64, 64]})
    res = onnxcomp.compress(m, [{"type": "quantize", "mode": "dynamic", "min_weight_elements": 0}],
                            calibration_data=_feeds(rng), progress=False)
    assert "Attention" in _ops(res.model) and "QAttention" not in _ops(res.model)
    assert "qkv_hidden_sizes" in _left(res, "Attention")["attn"]
    assert "DynamicQuantizeMatMul" in _ops(res.model)  # the MatMul after it: its input typed through the op


def test_static_int8_activations_leave_the_fused_attention_float_with_the_reason():
    rng = np.random.default_rng(7)
    res = onnxcomp.compress(_attention_block(rng), [{"type": "quantize", "mode": "static", "activation_dtype": "int8",
                                                     "min_weight_elements": 0}],
                            calibration_data=_feeds(rng), progress=False)
    assert "uint8" in _left(res, "Attention")["attn"] and "QAttention" not in _ops(res.model)


def test_weight_only_says_why_the_fused_attention_stays_float():
    rng = np.random.default_rng(6)
    res = onnxcomp.compress(_attention_block(rng), [{"type": "quantize", "mode": "weight_only",
                                                     "min_weight_elements": 0}],
                            calibration_data=_feeds(rng), progress=False)
    assert "QAttention" in _left(res, "Attention")["attn"] and "MatMulNBits" in _ops(res.model)


def test_matmul_after_a_contrib_op_is_quantized():
    """BiasGelu's output has no type for ONNX inference: the MatMul reading it used to be left float as
    'activation is not float'; ORT's symbolic inference types it."""
    rng = np.random.default_rng(2)
    w1 = (rng.standard_normal((32, 128)) / 6).astype(np.float32)
    w2 = (rng.standard_normal((128, 32)) / 11).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
             helper.make_node("BiasGelu", ["h", "B1"], ["a"], name="gelu", domain=MS),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    m = _ms_model(nodes, [vi("x", [4, 32])], [vi("y", [4, 32])],
                  [const("W1", w1), const("B1", np.zeros(128, np.float32)), const("W2", w2)])
    res = onnxcomp.compress(m, [{"type": "quantize", "mode": "dynamic", "min_weight_elements": 0}],
                            calibration_data=[random_feeds(m, seed=s) for s in range(4)], progress=False)
    assert _ops(res.model).count("DynamicQuantizeMatMul") == 2, _ops(res.model)


def test_ort_fused_minilm_dynamic_and_static(fused):
    """The real MiniLM-L3 through ORT's optimizer: every weight gets an integer kernel (9 MatMuls, 3 packed
    attentions) or int8 rows (the word and position tables, unfused from EmbedLayerNormalization), a quarter of
    the size, embeddings close to fp32 on held-out sentences."""
    calib, held = testing.minilm_feeds(32, start=200), testing.minilm_feeds(60)
    ref = testing.minilm_embed(fused, held)
    for mode, kernel, floor in (("dynamic", "DynamicQuantizeMatMul", 0.998), ("static", None, 0.998)):
        res = onnxcomp.compress(str(fused), [{"type": "quantize", "mode": mode}], calibration_data=calib,
                                progress=False)
        ops = _ops(res.model)
        assert ops.count("QAttention") == 3 and ops.count("LayerNormalization") == 1, ops
        assert "Attention" not in ops and "EmbedLayerNormalization" not in ops
        int8_tables = {n.input[0] for n in res.model.graph.node if n.op_type == "Gather"} & \
            {t.name for t in res.model.graph.initializer if t.data_type == TensorProto.INT8}
        assert len(int8_tables) == 2, int8_tables  # word and position rows (the 2-row segment table is too small)
        if kernel:
            assert ops.count(kernel) == 9
        declared = {v.name: v.type for v in onnx.load(str(fused), load_external_data=False).graph.output}
        assert {v.name: v.type for v in res.model.graph.output}["463"] == declared["463"]  # its dims as declared
        assert res.report.size_ratio < 0.3
        m = testing.minilm_metrics(ref, testing.minilm_embed(res.model, held))
        assert m["cosine_mean"] > floor, (mode, m)


def test_embeddings_false_keeps_the_fused_embedding_float(fused):
    res = onnxcomp.compress(str(fused), [{"type": "quantize", "mode": "dynamic", "embeddings": False}],
                            calibration_data=testing.minilm_feeds(8, start=200), progress=False)
    ops = _ops(res.model)
    assert "EmbedLayerNormalization" in ops and "LayerNormalization" not in ops
    assert ops.count("QAttention") == 3


def test_channel_pruning_slices_the_bias_of_a_fused_gelu():
    """MatMul -> com.microsoft BiasGelu(h, bias) -> MatMul is one channel group: the bias is sliced with the
    channels; channels the consumer never reads (zero rows) go first and the output is unchanged."""
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((32, 128)) / 6).astype(np.float32)
    b1 = (0.2 * rng.standard_normal(128)).astype(np.float32)
    w2 = (rng.standard_normal((128, 32)) / 11).astype(np.float32)
    dead = rng.permutation(128)[:64]
    w2[dead] = 0.0
    for op in ("BiasGelu", "FastGelu"):
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
                 helper.make_node(op, ["h", "B1"], ["a"], name="gelu", domain=MS),
                 helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
        m = _ms_model(nodes, [vi("x", [4, 32])], [vi("y", [4, 32])],
                      [const("W1", w1), const("B1", b1), const("W2", w2)])
        calib = [random_feeds(m, seed=s) for s in range(8)]
        res = onnxcomp.compress(m, [{"type": "sparsify", "pattern": "channel", "sparsity": 0.5}],
                                calibration_data=calib, progress=False)
        inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
        gelu = next(n for n in res.model.graph.node if n.op_type == op)
        assert inits[gelu.input[1]].shape == (64,), op
        np.testing.assert_array_equal(np.sort(np.setdiff1d(np.arange(128), dead)),
                                      np.flatnonzero(np.isin(b1, inits[gelu.input[1]])))
        f = random_feeds(m, seed=99)
        np.testing.assert_allclose(testing.session(res.model).run(None, f)[0], testing.session(m).run(None, f)[0],
                                   atol=1e-5)


def test_ort_fused_minilm_ffn_channels(fused):
    """The fused MiniLM's FFNs (MatMul -> BiasGelu -> MatMul) prune like the exported ones; the residual
    stream (SkipLayerNormalization) is refused with the reason."""
    calib, held = testing.minilm_feeds(64, start=200), testing.minilm_feeds(60)
    res = onnxcomp.compress(str(fused), [{"type": "sparsify", "pattern": "channel", "sparsity": 0.5}],
                            calibration_data=calib, progress=False)
    d = res.report.passes[0].details
    assert len([r for r in d["groups"] if r["removed"]]) == 3, d["groups"]
    assert all("SkipLayerNormalization" in r["reason"] for r in d["refused"])
    m = testing.minilm_metrics(testing.minilm_embed(fused, held), testing.minilm_embed(res.model, held))
    assert m["cosine_mean"] > 0.95, m


def test_unfused_embeddings_compute_what_the_fused_kernel_does(fused):
    """EmbedLayerNormalization -> Gathers + LayerNormalization and ReduceSum(mask) for its mask_index: the same
    outputs as ORT's kernel, on padded batches too."""
    from onnxcomp import ir
    from onnxcomp.passes.quantize.fused import unfuse_embed_layernorm

    model = ir.Model.from_proto(onnx.load(str(fused)))
    assert unfuse_embed_layernorm(model) == 1
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    a, b = testing.session(fused), testing.session(out)
    for f in testing.minilm_feeds(8, batch_size=4):
        for x, y in zip(a.run(None, f), b.run(None, f)):
            np.testing.assert_allclose(x, y, atol=2e-5)


def _heads_of(model):
    n = next(n for n in model.graph.node if n.op_type == "Attention")
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}["num_heads"], n


def test_fused_attention_dead_heads_are_removed_exactly():
    """Heads whose rows of the output projection are zero go first: num_heads, the packed q/k/v columns of the
    kept heads (the same heads in each part), the bias and Wo's rows change; the output does not."""
    rng = np.random.default_rng(4)
    m = _attention_block(rng)
    w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "Wqkv"))
    wo = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "Wo")).copy()
    wo[16:32] = 0.0  # head 1 of 4 (head size 16)
    wo[48:64] = 0.0  # head 3
    m = _with_weights(m, Wo=wo)
    res = onnxcomp.compress(m, [{"type": "sparsify", "pattern": "channel", "sparsity": 0.0, "heads": 0.5,
                                 "allocation": "uniform"}], calibration_data=_feeds(rng), progress=False)
    heads, node = _heads_of(res.model)
    assert heads == 2
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    kept = np.concatenate([np.arange(0, 16), np.arange(32, 48)])
    cols = np.concatenate([p * 64 + kept for p in range(3)])
    np.testing.assert_array_equal(inits[node.input[1]], w[:, cols])
    (row,) = [g for g in res.report.passes[0].details["groups"] if g["kind"] == "heads"]
    assert row["form"] == "fused" and row["kept"] == 2
    for f in _feeds(rng, 2):
        np.testing.assert_allclose(testing.session(res.model).run(None, f)[0], testing.session(m).run(None, f)[0],
                                   atol=2e-5)
    # without data (magnitude: each head's q/k/v column energy x its Wo rows) the same heads go
    plain = onnxcomp.compress(m, [{"type": "sparsify", "pattern": "channel", "sparsity": 0.0, "heads": 0.5,
                                   "method": "magnitude"}], progress=False)
    np.testing.assert_array_equal(numpy_helper.to_array(next(
        t for t in plain.model.graph.initializer if t.name == _heads_of(plain.model)[1].input[1])), w[:, cols])


@pytest.mark.parametrize("attrs, why", [({"qkv_hidden_sizes": [64, 32, 96]}, "unequal qkv_hidden_sizes"),
                                        ({"do_rotary": 1}, "rotary")])
def test_fused_attention_forms_without_separable_heads_are_refused(attrs, why):
    rng = np.random.default_rng(5)
    m = _attention_block(rng, attrs=attrs)
    if "qkv_hidden_sizes" in attrs:  # a packed weight of those sizes
        w = (rng.standard_normal((64, 192)) / 8).astype(np.float32)
        m = _with_weights(m, Wqkv=w)
    res = onnxcomp.compress(m, [{"type": "sparsify", "pattern": "channel", "sparsity": 0.0, "heads": 0.5}],
                            calibration_data=_feeds(rng), progress=False, validate=False)
    reasons = [r["reason"] for r in res.report.passes[0].details["refused"] if r["layer"] == "attn"]
    assert reasons and why in reasons[0], reasons
    assert _heads_of(res.model)[0] == 4


def test_ort_fused_minilm_heads_match_the_exported_form(minilm, fused):
    """Head pruning on the fused MiniLM keeps the same heads with the same refit as on the exported graph:
    the same embeddings."""
    calib, held = testing.minilm_feeds(32, start=200), testing.minilm_feeds(40)
    recipe = [{"type": "sparsify", "pattern": "channel", "sparsity": 0.0, "heads": 0.25, "allocation": "uniform"}]
    a = onnxcomp.compress(minilm, recipe, calibration_data=calib, progress=False)
    b = onnxcomp.compress(str(fused), recipe, calibration_data=calib, progress=False)
    rows = [[(g["kept"], round(g["rel_err"], 5)) for g in r.report.passes[0].details["groups"] if g["kind"] == "heads"]
            for r in (a, b)]
    assert rows[0] == rows[1] and [k for k, _ in rows[1]] == [9, 9, 9], rows
    assert [_heads_of(b.model)[0]] == [9]
    ea, eb = testing.minilm_embed(a.model, held), testing.minilm_embed(b.model, held)
    assert testing.minilm_metrics(ea, eb)["cosine_min"] > 0.9999
