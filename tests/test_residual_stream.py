"""Slicing the residual stream (SliceGPT-style) of the Llama-style decoder: exact at no slicing, shapes shrink."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp import ir, testing
from onnxcomp.algorithms import residual
from onnxcomp.errors import CalibrationDataError


def _calib():
    return testing.decoder_feeds(testing.decoder_windows("calib", 16), batch_size=4)


def test_stream_found_and_any_rotation_is_exact_when_nothing_is_sliced():
    m = ir.Model.from_proto(onnx.load(testing.decoder_path()))
    st = residual.find_stream(m)
    assert not isinstance(st, str), st
    assert (st.dim, len(st.norms), len(st.adds)) == (192, 7, 6)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((192, 192)))
    residual.slice_stream(m, st, q)
    out = m.to_proto()
    onnx.checker.check_model(out, full_check=True)
    f = testing.decoder_feeds(testing.decoder_windows("eval", 4))
    np.testing.assert_allclose(testing.decoder_logits(out, f), testing.decoder_logits(testing.decoder_path(), f),
                               rtol=1e-4, atol=1e-4)


def test_slicing_a_fifth_of_the_stream_keeps_next_byte_predictions_on_held_out_text():
    res = onnxcomp.compress(str(testing.decoder_path()), [{"type": "sparsify", "pattern": "channel",
                                                           "sparsity": 0.0, "hidden": 0.2,
                                                           "allocation": "uniform"}],
                            calibration_data=_calib(), progress=False)
    r = res.report.passes[0].details["residual"]
    assert (r["dim"], r["kept"]) == (192, 152) and r["weights_after"] < 0.85 * r["weights"]
    shapes = {t.name: tuple(t.dims) for t in res.model.graph.initializer}
    assert [s for n, s in shapes.items() if n.startswith("embed")] == [(256, 152)]
    held = testing.decoder_windows("eval", 32)
    feeds = testing.decoder_feeds(held)
    met = testing.decoder_metrics(testing.decoder_logits(testing.decoder_path(), feeds),
                                  testing.decoder_logits(res.model, feeds), held)
    assert met["top1_agreement"] >= 0.97 and met["bpb_ratio"] < 1.01, met
    # the sliced norms divide by the root mean square: the form ORT fuses into SimplifiedLayerNormalization
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("Div") == 7 and "Reciprocal" not in ops
    assert _ort_ops(res.model).count("SimplifiedLayerNormalization") == 7


def _ort_ops(model: onnx.ModelProto) -> list[str]:
    """The op types of `model` as ORT's CPU session optimizes it (extended level)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = f"{d}/opt.onnx"
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(f"{d}/opt.onnx").graph.node]


def test_post_norm_models_are_refused_with_the_reason_and_data_is_required():
    proto = onnx.load(testing.minilm_path())
    why = residual.find_stream(ir.Model.from_proto(proto))
    assert isinstance(why, str) and why.startswith("post-norm stream") and "LayerNorm/LayerNormalization" in why
    assert "experiment_postnorm_slicing" in why and "FFN channels" in why
    with pytest.raises(CalibrationDataError):
        onnxcomp.compress(str(testing.decoder_path()), [{"type": "sparsify", "pattern": "channel",
                                                         "method": "magnitude", "hidden": 0.2}], progress=False)


def _fused_norm_decoder(op: str = "RMSNormalization") -> onnx.ModelProto:
    """The decoder fixture at opset 23 with every RMSNorm subgraph (Pow ... gain Mul) as one RMSNormalization
    node (what torch.onnx exports at opset 23)."""
    from onnx import helper, numpy_helper, version_converter

    m = version_converter.convert_version(onnx.load(testing.decoder_path()), 23)
    eps = float(numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "c.eps")).reshape(-1)[0])
    by_name = {n.name: n for n in m.graph.node}
    prefixes = [n.name[: -len(".pow")] for n in m.graph.node if n.op_type == "Pow" and n.name.endswith(".pow")]
    drop, fused = set(), {}
    for p in prefixes:
        parts = [by_name[f"{p}.{s}"] for s in ("pow", "mean", "add_eps", "sqrt", "rsqrt", "normed", "scaled")]
        drop.update(n.name for n in parts)
        fused[f"{p}.scaled"] = helper.make_node(op, [parts[0].input[0], parts[-1].input[1]], [parts[-1].output[0]],
                                                name=f"{p}.rms", axis=-1, epsilon=eps)
    nodes = [fused.get(n.name, n) for n in m.graph.node if n.name not in drop or n.name in fused]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    inits = [t for t in m.graph.initializer if t.name in used]  # the folded norms' constants go
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def test_fused_rms_norms_are_sliced_like_the_exported_form():
    op = "RMSNormalization"
    fused = _fused_norm_decoder(op)
    f = testing.decoder_feeds(testing.decoder_windows("eval", 4))
    ref = testing.decoder_logits(testing.decoder_path(), f)
    np.testing.assert_allclose(testing.decoder_logits(fused, f), ref, rtol=1e-4, atol=1e-4)
    m = ir.Model.from_proto(fused)  # exact at no slicing, for any rotation
    st = residual.find_stream(m)
    assert not isinstance(st, str), st
    assert (st.dim, len(st.norms), all(n.fused for n in st.norms)) == (192, 7, True)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((192, 192)))
    residual.slice_stream(m, st, q)
    np.testing.assert_allclose(testing.decoder_logits(m.to_proto(), f), ref, rtol=1e-4, atol=1e-4)
    # sliced by a fifth: the same rotation as the exported form (the Gram of g * normed over g g^T), so the same
    # model up to float rounding, with each norm's eps * D/k as its attribute
    recipe = [{"type": "sparsify", "pattern": "channel", "sparsity": 0.0, "hidden": 0.2, "allocation": "uniform"}]
    a = onnxcomp.compress(fused, recipe, calibration_data=_calib(), progress=False)
    b = onnxcomp.compress(str(testing.decoder_path()), recipe, calibration_data=_calib(), progress=False)
    assert a.report.passes[0].details["residual"]["kept"] == b.report.passes[0].details["residual"]["kept"] == 152
    norms = [n for n in a.model.graph.node if n.op_type == op]
    eps = next(x.f for n in fused.graph.node if n.op_type == op for x in n.attribute if x.name == "epsilon")
    assert len(norms) == 7
    for n in norms:  # the mean is over 152 values now
        np.testing.assert_allclose(next(x.f for x in n.attribute if x.name == "epsilon"), eps * 192 / 152, rtol=1e-6)
    np.testing.assert_allclose(testing.decoder_logits(a.model, f), testing.decoder_logits(b.model, f),
                               rtol=2e-3, atol=2e-3)
