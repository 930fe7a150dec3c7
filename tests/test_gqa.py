"""Grouped-query attention with rotary embeddings (the Llama form): query heads pruned alike per KV group."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp import ir, testing
from onnxcomp.algorithms.channels import find_groups
from tests.test_channels import _init_shapes, _prune, _run

DEAD = (1, 6)  # query heads whose output-projection rows are zero: head 1 of KV group 0, head 2 of group 1


def _decoder(dead=()) -> onnx.ModelProto:
    """The trained decoder fixture, with the o_proj rows of query heads `dead` zeroed in every layer."""
    m = onnx.load(testing.decoder_path())
    for t in m.graph.initializer:
        if t.name.endswith(".wo") and dead:
            w = numpy_helper.to_array(t).copy()
            for h in dead:
                w[h * 24:(h + 1) * 24] = 0.0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return m


def _feeds(n=8):
    return testing.decoder_feeds(testing.decoder_windows("eval", n), batch_size=4)


def test_gqa_blocks_are_recognised_with_their_head_counts():
    notes: list[str] = []
    groups, refused = find_groups(ir.Model.from_proto(_decoder()), heads=True, notes=notes)
    att = [g for g in groups if g.attention is not None]
    assert len(att) == 3, refused
    assert all((g.attention["hq"], g.attention["hkv"], g.attention["dim"]) == (8, 2, 24) for g in att)
    assert any("grouped-query attention: 3 block(s)" in n for n in notes)


def test_dead_query_heads_are_removed_exactly_and_every_head_count_is_rewritten():
    m = _decoder(DEAD)
    out, res = _prune(m, method="magnitude", sparsity=0.0, heads=0.25)
    rows = [r for r in res.details["groups"] if r.get("form") == "gqa"]
    assert [(r["kept"], r["channels"], r["kv_heads"]) for r in rows] == [(6, 8, 2)] * 3
    shapes = _init_shapes(out)
    assert [s for n, s in shapes.items() if n.startswith("l0.wq")] == [(192, 144)]
    assert [s for n, s in shapes.items() if n.startswith("l0.wo")] == [(144, 192)]
    assert [s for n, s in shapes.items() if n.startswith("l0.wk")] == [(192, 48)]  # the KV heads stay
    consts = {t.name: numpy_helper.to_array(t).tolist() for t in out.graph.initializer if t.data_type == 7}
    assert [1, 1, 3, 1, 1] in consts.values()  # the repeat of each KV head: 4 -> 3 query heads
    assert [0, 0, 6, 24] in consts.values() and [0, 6, -1, 24] in consts.values() and [0, 0, 144] in consts.values()
    for f in _feeds():
        np.testing.assert_allclose(_run(out, f)[0], _run(m, f)[0], rtol=1e-4, atol=1e-4)


def test_nothing_removed_keeps_outputs_bit_identical():
    m = _decoder()
    out, res = _prune(m, method="magnitude", sparsity=0.0, heads=0.0)
    assert all(r["kept"] == r["channels"] for r in res.details["groups"] if r.get("form") == "gqa")
    f = _feeds(4)[0]
    np.testing.assert_array_equal(_run(out, f)[0], _run(m, f)[0])


def test_heads_with_data_are_refitted_and_beat_magnitude_on_held_out_text():
    m = _decoder()
    calib = testing.decoder_feeds(testing.decoder_windows("calib", 16), batch_size=4)
    held = testing.decoder_windows("eval", 24)
    feeds = testing.decoder_feeds(held)
    ref = testing.decoder_logits(m, feeds)
    fitted, res = _prune(m, calib, method="sparsegpt", sparsity=0.0, heads=0.25)
    rows = [r for r in res.details["groups"] if r.get("form") == "gqa"]
    assert all(r["kept"] == 6 and 0 < r["rel_err"] < 1 for r in rows)
    plain, _ = _prune(m, method="magnitude", sparsity=0.0, heads=0.25)
    got = testing.decoder_metrics(ref, testing.decoder_logits(fitted, feeds), held)
    base = testing.decoder_metrics(ref, testing.decoder_logits(plain, feeds), held)
    assert got["bits_per_byte"] < base["bits_per_byte"] and got["top1_agreement"] > base["top1_agreement"]


def test_blocks_whose_inside_is_read_elsewhere_are_refused_with_the_reason():
    m = _decoder()
    m.graph.output.append(helper.make_tensor_value_info("layers.0.self_attn.probs", onnx.TensorProto.FLOAT, None))
    groups, refused = find_groups(ir.Model.from_proto(m), heads=True)
    assert len([g for g in groups if g.attention is not None]) == 2
    assert any(r["layer"] == "layers.0.self_attn.o_proj" and "grouped-query attention" in r["reason"]
               for r in refused), refused
