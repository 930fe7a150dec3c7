"""Grouped-query attention with rotary embeddings (the Llama form): query heads pruned alike per KV group."""
from __future__ import annotations

import numpy as np
import pytest
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


def test_a_dead_kv_group_is_removed_whole_and_every_kv_head_count_is_rewritten():
    m = _decoder(dead=(4, 5, 6, 7))  # the query heads of KV group 1 contribute nothing
    out, res = _prune(m, method="magnitude", sparsity=0.0, heads=0.5, head_unit="kv")
    rows = [r for r in res.details["groups"] if r.get("form") == "gqa"]
    assert [(r["kept"], r["channels"], r["kv_heads"], r["unit"]) for r in rows] == [(4, 8, 1, "kv")] * 3
    assert res.details["params_removed"] == 3 * (2 * 96 * 192 + 2 * 24 * 192)  # Wq, Wo and Wk, Wv per layer
    shapes = _init_shapes(out)
    for w, shape in (("wq", (192, 96)), ("wk", (192, 24)), ("wv", (192, 24)), ("wo", (96, 192))):
        assert [s for n, s in shapes.items() if n.startswith(f"l0.{w}")] == [shape]
    consts = [numpy_helper.to_array(t).tolist() for t in out.graph.initializer if t.data_type == 7]
    assert [0, 0, 1, 24] in consts  # k and v: 1 KV head of 24
    assert [1, 1, 4, 1, 1] in consts and [0, 4, -1, 24] in consts  # the repeat stays 4 per KV head
    assert [0, 0, 4, 24] in consts and [0, 0, 96] in consts
    for f in _feeds():
        np.testing.assert_allclose(_run(out, f)[0], _run(m, f)[0], rtol=1e-4, atol=1e-4)


def test_kv_groups_with_data_drop_the_group_that_costs_nothing():
    m = _decoder(dead=(0, 1, 2, 3))  # KV group 0 is dead: the group-OBS cost of removing it is zero
    calib = testing.decoder_feeds(testing.decoder_windows("calib", 8), batch_size=4)
    out, res = _prune(m, calib, method="sparsegpt", sparsity=0.0, heads=0.5, head_unit="kv")
    rows = [r for r in res.details["groups"] if r.get("form") == "gqa"]
    assert all(r["unit"] == "kv" and r["kv_heads"] == 1 and r["rel_err"] < 0.05 for r in rows), rows
    before = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for i in range(3):  # group 1 kept: the q columns of heads 4..7, the k/v columns of KV head 1
        np.testing.assert_array_equal(after[f"l{i}.wq_pruned"], before[f"l{i}.wq"][:, 96:])
        np.testing.assert_array_equal(after[f"l{i}.wk_pruned"], before[f"l{i}.wk"][:, 24:])
        np.testing.assert_array_equal(after[f"l{i}.wv_pruned"], before[f"l{i}.wv"][:, 24:])
    held = testing.decoder_windows("eval", 16)
    feeds = testing.decoder_feeds(held)
    got = testing.decoder_metrics(testing.decoder_logits(m, feeds), testing.decoder_logits(out, feeds), held)
    assert got["top1_agreement"] > 0.99 and abs(got["bpb_ratio"] - 1) < 0.005, got  # only the damped refit


def test_kv_groups_read_outside_the_block_fall_back_to_query_heads_with_the_reason():
    m = _decoder()
    # a KV-cache-like output: the rotated keys of layer 0 leave the graph, so its KV heads must all stay
    m.graph.output.append(helper.make_tensor_value_info("layers.0.self_attn.k_rope.rotary", onnx.TensorProto.FLOAT,
                                                        None))
    groups, refused = find_groups(ir.Model.from_proto(m), heads=True, head_unit="kv")
    units = {g.attention["mo"].name: g.attention["unit"] for g in groups if g.is_gqa}
    assert units == {f"layers.{i}.self_attn.o_proj": ("query" if i == 0 else "kv") for i in range(3)}
    why = [r["reason"] for r in refused if r["layer"] == "layers.0.self_attn.o_proj" and "KV" in r["reason"]]
    assert why and "whole KV groups" in why[0] and "KV cache" in why[0] and "k_rope.rotary" in why[0], refused
    out, res = _prune(m, method="magnitude", sparsity=0.0, heads=0.5, head_unit="kv")
    kept = {r["consumers"][0]: (r["kept"], r["kv_heads"]) for r in res.details["groups"] if r.get("form") == "gqa"}
    assert kept["layers.0.self_attn.o_proj"] == (4, 2) and kept["layers.1.self_attn.o_proj"] == (4, 1)
    sess = testing.session(out)
    assert sess.run(None, _feeds(1)[0])[1].shape[1] == 2  # the output still has both KV heads


def test_head_unit_needs_heads_and_a_known_value():
    from onnxcomp.errors import RecipeError
    from onnxcomp.passes.sparsify import Sparsify

    with pytest.raises(RecipeError, match="head_unit applies with heads"):
        Sparsify(pattern="channel", head_unit="kv")
    with pytest.raises(RecipeError, match="valid: 'query', 'kv'"):
        Sparsify(pattern="channel", heads=0.5, head_unit="kv_groups")


def test_fused_ort_attention_is_refused_with_what_to_do_instead():
    # the ORT transformers optimizer's form: one com.microsoft GroupQueryAttention node between the projections
    # and o_proj (built here as a graph only: the refusal is decided before anything runs)
    nodes = [helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total"], ["ctx"],
                              name="attn", domain="com.microsoft", num_heads=8, kv_num_heads=2),
             helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="o_proj")]
    ins = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4, d]) for n, d in (("q", 64), ("k", 16),
                                                                                           ("v", 16))]
    ins += [helper.make_tensor_value_info("seqlens", onnx.TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total", onnx.TensorProto.INT32, [])]
    g = helper.make_graph(nodes, "fused", ins, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.zeros((64, 32), np.float32), "wo")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    groups, refused = find_groups(ir.Model.from_proto(m), heads=True)
    assert not [g for g in groups if g.attention is not None]
    why = [r["reason"] for r in refused if r["layer"] == "attn"]
    assert why and "GroupQueryAttention" in why[0] and "before ORT's transformers optimizer" in why[0], refused


def _attention_op_decoder(dead=()) -> onnx.ModelProto:
    """The decoder fixture at opset 23 with each block's scores, softmax and context as one ONNX Attention node on
    the 4-D rotated heads (what torch.onnx exports there: no repeat_kv, the op shares KV heads itself)."""
    from onnx import version_converter

    m = version_converter.convert_version(_decoder(dead), 23)
    scale = float(numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "c.scale")).reshape(-1)[0])
    gone = (".repeat_k.", ".repeat_v.", ".k_t", ".scores", ".scaled", ".masked", ".probs")
    nodes = []
    for n in m.graph.node:
        if ".self_attn." in n.name and any(x in n.name for x in gone):
            continue
        if n.name.endswith(".self_attn.context"):
            p = n.name[: -len(".context")]
            n = helper.make_node("Attention", [f"{p}.q_rope.rotary", f"{p}.k_rope.rotary", f"{p}.v_heads",
                                               "causal_mask"], [n.output[0]], name=f"{p}.attention", scale=scale)
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    inits = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("unit,dead,kept,kv", [("query", DEAD, 6, 2), ("kv", (4, 5, 6, 7), 4, 1)])
def test_the_onnx_attention_op_form_loses_dead_heads_exactly(unit, dead, kept, kv):
    m = _attention_op_decoder(dead)
    f = _feeds(4)
    np.testing.assert_allclose(_run(m, f[0])[0], _run(_decoder(dead), f[0])[0], rtol=1e-4, atol=1e-4)
    out, res = _prune(m, method="magnitude", sparsity=0.0, heads=0.25 if unit == "query" else 0.5, head_unit=unit)
    rows = [r for r in res.details["groups"] if r.get("form") == "gqa"]
    assert [(r["kept"], r["kv_heads"], r["unit"]) for r in rows] == [(kept, kv, unit)] * 3
    assert sum(n.op_type == "Attention" for n in out.graph.node) == 3
    shapes = _init_shapes(out)
    assert [s for n, s in shapes.items() if n.startswith("l0.wq")] == [(192, kept * 24)]
    assert [s for n, s in shapes.items() if n.startswith("l0.wk")] == [(192, kv * 24)]
    for feed in f:
        np.testing.assert_allclose(_run(out, feed)[0], _run(m, feed)[0], rtol=1e-4, atol=1e-4)
