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


def test_post_norm_models_are_refused_with_the_reason_and_data_is_required():
    proto = onnx.load(testing.minilm_path())
    why = residual.find_stream(ir.Model.from_proto(proto))
    assert isinstance(why, str) and why.startswith("post-norm stream") and "LayerNorm/LayerNormalization" in why
    assert "experiment_postnorm_slicing" in why and "FFN channels" in why
    with pytest.raises(CalibrationDataError):
        onnxcomp.compress(str(testing.decoder_path()), [{"type": "sparsify", "pattern": "channel",
                                                         "method": "magnitude", "hidden": 0.2}], progress=False)
