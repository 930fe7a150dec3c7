"""Grouped-query (and rotary multi-head) attention blocks, in the form torch.onnx gives Llama-style decoders:

    q = Transpose(Reshape(MatMul(x, Wq) [+ bq], [.., Hq, d]), [0,2,1,3]) -> rotary   (k alike with Hkv heads)
    rotary: Slice / Neg / Concat on the last axis and Mul / Add with cos, sin tables that do not vary per head
    k, v repeated to Hq heads: Reshape(Expand(Unsqueeze(k, 2), [1,1,rep,1,1]), [.., Hq, -1, d])   (absent if rep 1)
    p = Softmax(Add(Mul|Div(MatMul(q, Transpose(k, [0,1,3,2])), scale), mask))
    y = MatMul(Reshape(Transpose(MatMul(p, v), [0,2,1,3]), [.., Hq*d]), Wo) [+ bo]
    or, at opset 23, the scores and context as one ONNX Attention(q, k, v [, mask]) on 4-D heads (no repeat:
    the op shares each KV head among its query heads; head counts from the shapes, so none to rewrite in it)

Query heads are removed alike in every KV group (rep -> rep'): the k/v projections, and so the KV cache, stay;
Wq loses d columns and Wo d rows per removed head, and the head counts in the q Reshape, the repeat's Expand and
Reshape, and the context Reshape are rewritten. Which heads go and how Wo is refitted is decided like a channel
group (channels.py) with block d, one KV group at a time. Or whole KV groups go (Hkv -> Hkv', `head_unit: kv`):
a KV head with its rep query heads, so Wk and Wv lose d columns each too and the k/v Reshapes (and an Expand
that names Hkv) are rewritten; that needs the k/v heads to be read only inside the block (no KV cache output).
The block is found with an engine query rooted at the output projection; the rotary regions between the q and k
projections and the scores are checked node by node.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..rewrite import GraphIndex, fail, find_matches, query
from .heads import check_mask, check_scores, shape_entries

_PERM = (0, 2, 1, 3)
_PERM_KT = (0, 1, 3, 2)
_ROTARY_OPS = frozenset({"Slice", "Neg", "Concat", "Mul", "Add", "Sub"})


def _make_pattern(scale_op: str, masked: bool, repeat: bool):
    def core(op, qr, kx, vx, scale, mask, so, wo):
        s = getattr(op, scale_op)(op.MatMul(qr, op.Transpose(kx, _bind="tk"), _bind="qk"), scale, _bind="scale_node")
        if masked:
            s = op.Add(s, mask, _bind="mask_add")
        c = op.Reshape(op.Transpose(op.MatMul(op.Softmax(s, _bind="sm"), vx, _bind="pv"), _bind="tc"), so,
                       _bind="rc")
        return op.MatMul(c, wo, _bind="mo")

    if repeat:
        def pattern(op, qr, kr, vh, ak, ek, sk, av, ev, sv, scale, mask, so, wo):
            kx = op.Reshape(op.Expand(op.Unsqueeze(kr, ak, _bind="uk"), ek, _bind="ek_node"), sk, _bind="xk")
            vx = op.Reshape(op.Expand(op.Unsqueeze(vh, av, _bind="uv"), ev, _bind="ev_node"), sv, _bind="xv")
            return core(op, qr, kx, vx, scale, mask, so, wo)
    else:
        def pattern(op, qr, kr, vh, scale, mask, so, wo):
            return core(op, qr, kr, vh, scale, mask, so, wo)
    pattern.__name__ = f"gqa_{scale_op.lower()}{'_mask' if masked else ''}{'_repeat' if repeat else ''}"
    return pattern


def _attention_pattern(masked: bool):
    """The same block with ONNX's Attention op (opset 23) as its core: 4-D q/k/v, KV heads shared natively."""
    def pattern(op, qr, kr, vh, mask, so, wo):
        ins = (qr, kr, vh, mask) if masked else (qr, kr, vh)
        c = op.Reshape(op.Transpose(op.Attention(*ins, _bind="att"), _bind="tc"), so, _bind="rc")
        return op.MatMul(c, wo, _bind="mo")

    def unmasked(op, qr, kr, vh, so, wo):
        return pattern(op, qr, kr, vh, None, so, wo)

    fn = pattern if masked else unmasked
    fn.__name__ = f"gqa_attention_op{'_mask' if masked else ''}"
    return fn


_PATTERNS = [_make_pattern(s, m, r) for s in ("Mul", "Div") for m in (True, False) for r in (True, False)] + \
    [_attention_pattern(m) for m in (True, False)]


def _producer(t: gs.Tensor) -> Optional[gs.Node]:
    return t.inputs[0] if t.inputs else None


def _projection(tr: gs.Node) -> Optional[dict[str, Any]]:
    """Transpose([0,2,1,3]) <- Reshape([.., H, d]) <- [Add(bias) <-] MatMul(x, W): the head source, or None."""
    if tr.op != "Transpose" or tuple(tr.attrs.get("perm", ())) != _PERM:
        return None
    rs = _producer(tr.inputs[0])
    if rs is None or rs.op != "Reshape" or len(rs.inputs) < 2:
        return None
    e = shape_entries(rs.inputs[1], 4)
    if e is None or not isinstance(e[2], int) or not isinstance(e[3], int) or e[2] <= 0 or e[3] <= 0:
        return None
    mm = _producer(rs.inputs[0])
    add, bi = None, None
    if mm is not None and mm.op == "Add":
        add = mm
        consts = [i for i, x in enumerate(mm.inputs) if ir.const_value(x) is not None]
        if len(consts) != 1:
            return None
        bi = consts[0]
        mm = _producer(mm.inputs[1 - bi])
    if mm is None or mm.op != "MatMul":
        return None
    w = ir.const_value(mm.inputs[1])
    if w is None or w.ndim != 2 or w.dtype != np.float32 or w.shape[1] != e[2] * e[3]:
        return None
    if add is not None and ir.const_value(add.inputs[bi]).shape != (w.shape[1],):
        return None
    return {"mm": mm, "add": add, "bias_index": bi, "reshape": rs, "transpose": tr, "heads": e[2], "dim": e[3]}


def _head_source(t: gs.Tensor) -> Optional[dict[str, Any]]:
    """The one projection whose heads `t` is computed from (looking back at most 32 tensors), or None."""
    found: dict[int, dict[str, Any]] = {}
    seen: set[int] = set()
    todo = deque([t])
    while todo and len(seen) < 32:
        x = todo.popleft()
        if id(x) in seen or ir.const_value(x) is not None:
            continue
        seen.add(id(x))
        n = _producer(x)
        if n is None:
            continue
        src = _projection(n)
        if src is not None:
            found[id(n)] = src
        elif n.op in _ROTARY_OPS:
            todo.extend(i for i in n.inputs if i.name)
    return next(iter(found.values())) if len(found) == 1 else None


def _no_head_axis(x: gs.Tensor) -> bool:
    """Whether `x` (a cos/sin table) is the same for every head: rank <= 2, or its axis -3 is 1."""
    v = ir.const_value(x)
    shape = list(v.shape) if v is not None else (list(x.shape) if getattr(x, "shape", None) is not None else None)
    if shape is None:
        return False
    return len(shape) <= 2 or shape[-3] == 1


def _rotary_region(index: GraphIndex, head: gs.Tensor, end: gs.Tensor) -> list[gs.Node] | str:
    """The nodes between a projection's head tensor and `end` (what the scores read): rotary ops on the last
    axis only, every other operand the same for all heads, nothing read from outside. Or why not."""
    if head is end:
        return []
    nodes: dict[int, gs.Node] = {}
    tensors = {id(head)}
    todo = [head]
    while todo:
        t = todo.pop()
        if t is end:
            continue
        if index.is_graph_output(t):
            return f"head values '{t.name}' are a graph output"
        for c in index.consumers(t):
            if id(c) in nodes:
                continue
            if c.op not in _ROTARY_OPS or len(nodes) >= 32:
                return f"{c.op} '{c.name}' reads the heads between the projection and the scores"
            nodes[id(c)] = c
            for o in c.outputs:
                tensors.add(id(o))
                todo.append(o)
    if id(end) not in tensors:
        return "the scores do not read the projection's heads"
    for n in nodes.values():
        if n.op == "Slice":
            params = [ir.const_value(x) for x in n.inputs[1:]]
            if any(p is None for p in params) or len(params) < 3 or \
                    any(int(a) not in (-1, 3) for a in params[2].reshape(-1)):
                return f"Slice '{n.name}' is not a constant slice of the last axis"
        elif n.op == "Concat" and n.attrs.get("axis") not in (-1, 3):
            return f"Concat '{n.name}' is not on the last axis"
        for x in n.inputs:
            if x.name and id(x) not in tensors and ir.const_value(x) is None and n.op != "Slice" \
                    and not _no_head_axis(x):
                return f"{n.op} '{n.name}' operand '{x.name}' may differ per head"
            if n.op == "Concat" and id(x) not in tensors:
                return f"Concat '{n.name}' joins the heads with '{x.name}'"
    return list(nodes.values())


def _check_attention_op(ctx, b: dict[str, Any]) -> Any:
    """ONNX Attention with 4-D inputs (head counts from the shapes, not attributes), plain softmax scores and a
    mask that is the same for every head."""
    att = b["att"]
    if (att.domain or "") not in ("", "ai.onnx") or len(att.outputs) != 1:
        return fail("not the ONNX Attention op with one output")
    if any(k in att.attrs for k in ("q_num_heads", "kv_num_heads")):
        return fail("3-D Attention (head counts as attributes) is not rewritten")
    if att.attrs.get("softcap", 0.0) or att.attrs.get("qk_matmul_output_mode", 0):
        return fail("Attention with softcap or an extra scores output")
    return check_mask(b)


def _check(ctx, **b) -> Any:
    if "att" in b:
        if tuple(b["tc"].attrs.get("perm", ())) != _PERM:
            return fail("unexpected context transpose")
        scores = _check_attention_op(ctx, b)
    elif tuple(b["tk"].attrs.get("perm", ())) != _PERM_KT or tuple(b["tc"].attrs.get("perm", ())) != _PERM:
        return fail("unexpected key or context transpose")
    else:
        scores = check_scores(ctx, b)
    if scores is not True:
        return scores
    q, k, v = (_head_source(b[n]) for n in ("qr", "kr", "vh"))
    if q is None or k is None or v is None:
        return fail("q, k or v is not one projection split into heads")
    hq, hkv, d = q["heads"], k["heads"], q["dim"]
    if v["heads"] != hkv or k["dim"] != d or v["dim"] != d or hq % hkv:
        return fail(f"heads do not form groups: q {hq}x{q['dim']}, k {hkv}x{k['dim']}, v {v['heads']}x{v['dim']}")
    rep = hq // hkv
    if "ek" in b:
        for t in ("k", "v"):
            ax, e, s = ctx.const_value(b[f"a{t}"]), shape_entries(b[f"e{t}"], 5), shape_entries(b[f"s{t}"], 4)
            if ax is None or [int(a) for a in ax.reshape(-1)] != [2] or e is None or e[2] != rep \
                    or s is None or s[1] != hq:
                return fail(f"the {t} repeat is not Unsqueeze(2) -> Expand(x{rep}) -> Reshape to {hq} heads")
    elif rep != 1 and "att" not in b:  # the Attention op shares each KV head among its query heads itself
        return fail("fewer KV heads than query heads but no repeat")
    so = shape_entries(b["so"], 3)
    if so is None or so[2] not in (hq * d, -1):
        return fail("the context reshape's last entry is not heads*head_dim")
    wo = ctx.const_value(b["wo"])
    if wo is None or wo.ndim != 2 or wo.shape[0] != hq * d or wo.dtype != np.float32:
        return fail("the output projection is not a constant [heads*head_dim, n] weight")
    return True


def find_blocks(model: ir.Model) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every grouped-query / rotary attention block of the main graph whose query heads can be removed (its
    bindings plus 'q' (the q projection), 'region' (the nodes rebuilt besides the q MatMul and the output MatMul),
    'hq', 'hkv', 'dim', 'sites'), and the blocks refused with the reason."""
    rules = [query(p.__name__, p, _check) for p in _PATTERNS]
    index = GraphIndex(model.graph)
    blocks, refused, seen = [], [], set()
    for f in find_matches(model, rules, exclusive=False):
        b = dict(f.match.bindings)
        if f.graph is not model.graph or id(b["mo"]) in seen:
            continue
        seen.add(id(b["mo"]))
        why = _plan(b, index)
        if isinstance(why, str):
            refused.append({"layer": b["mo"].name, "reason": f"grouped-query attention: {why}"})
        else:
            blocks.append(why)
    return blocks, refused


def _site(t: gs.Tensor, reader: gs.Node, rank: int, pos: int) -> Optional[tuple[gs.Node, int, list[gs.Node]]]:
    """Where entry `pos` of shape tensor `t` (read by `reader` at input 1) is stored: (node, input index, extra
    nodes to rebuild) -- the reader itself for a constant shape, the Concat for a computed one."""
    if ir.const_value(t) is not None:
        return reader, 1, []
    n = _producer(t)
    if n is not None and n.op == "Concat" and ir.const_value(n.inputs[pos]) is not None:
        return n, pos, [n]
    return None


def _plan(b: dict[str, Any], index: GraphIndex) -> dict[str, Any] | str:
    """The block's nodes and the constants its query-head count lives in; why it cannot be rebuilt, if so."""
    q, k = _head_source(b["qr"]), _head_source(b["kr"])
    hq, hkv, d = q["heads"], k["heads"], q["dim"]
    if "ek" not in b:
        rep_nodes: list[gs.Node] = []
    else:
        rep_nodes = [b["ek_node"], b["xk"], b["ev_node"], b["xv"]]
    rot = _rotary_region(index, q["transpose"].outputs[0], b["qr"])
    if isinstance(rot, str):
        return rot
    core = [b[n] for n in ("tk", "qk", "scale_node", "mask_add", "sm", "pv", "att", "tc", "rc") if n in b]
    chain = [x for x in (q["add"], q["reshape"], q["transpose"]) if x is not None]
    region = chain + rot + rep_nodes + core
    sites: dict[str, tuple[gs.Node, int, list[gs.Node]]] = {}
    want = {"q": (q["reshape"], 4, 2)}
    if rep_nodes:
        want.update({"ek": (b["ek_node"], 5, 2), "ev": (b["ev_node"], 5, 2), "sk": (b["xk"], 4, 1),
                     "sv": (b["xv"], 4, 1)})
    if shape_entries(b["so"], 3)[2] != -1:
        want["so"] = (b["rc"], 3, 2)
    for key, (reader, rank, pos) in want.items():
        s = _site(reader.inputs[1], reader, rank, pos)
        if s is None:
            return f"the head count of '{reader.name}' is computed, not a constant"
        sites[key] = s
        region += s[2]
    inside = {id(n) for n in region} | {id(q["mm"]), id(b["mo"])}
    why = _read_outside(region + [q["mm"]], inside, index)
    if why:
        return why
    plan = {**b, "q": q, "region": region, "hq": hq, "hkv": hkv, "dim": d, "sites": sites}
    kv = _kv_plan(plan, index, inside) if hkv > 1 else "a single KV head"
    if isinstance(kv, str):
        plan["kv_refused"] = kv
    else:
        plan["region"] = region + kv["nodes"]
        plan["kv"] = kv
    return plan


def _read_outside(nodes: list[gs.Node], inside: set[int], index: GraphIndex) -> Optional[str]:
    for n in nodes:
        for o in n.outputs:
            if index.is_graph_output(o) or any(id(c) not in inside for c in index.consumers(o)):
                return f"'{o.name}' inside the block is read outside it"
    return None


def _kv_plan(plan: dict[str, Any], index: GraphIndex, inside: set[int]) -> dict[str, Any] | str:
    """What removing whole KV groups rebuilds besides the query-head rewrite: the k and v projections, their
    Reshape/Transpose (and the key's rotary region), the repeat's Unsqueezes, and the sites of every KV-head
    count; or why whole KV groups cannot go."""
    k, v = _head_source(plan["kr"]), _head_source(plan["vh"])
    if v["transpose"].outputs[0] is not plan["vh"]:
        return "the values are changed between their projection and the scores"
    rot = _rotary_region(index, k["transpose"].outputs[0], plan["kr"])
    if isinstance(rot, str):
        return f"key heads: {rot}"
    nodes = [x for src in (k, v) for x in (src["mm"], src["add"], src["reshape"], src["transpose"]) if x is not None]
    nodes += rot + [plan[n] for n in ("uk", "uv") if n in plan]
    sites: dict[str, tuple[gs.Node, int, list[gs.Node]]] = {}
    want = {"k": (k["reshape"], 4, 2), "v": (v["reshape"], 4, 2)}
    if "ek" in plan:
        for t in ("k", "v"):
            if shape_entries(plan[f"e{t}"], 5)[1] != 1:  # [.., Hkv, rep, ..] rather than broadcast 1
                want[f"e{t}_kv"] = (plan[f"e{t}_node"], 5, 1)
    for key, (reader, rank, pos) in want.items():
        s = _site(reader.inputs[1], reader, rank, pos)
        if s is None:
            return f"the KV head count of '{reader.name}' is computed, not a constant"
        sites[key] = s
        nodes += [x for x in s[2] if x not in nodes]
    inside = inside | {id(n) for n in nodes}
    why = _read_outside(nodes, inside, index)
    if why:
        return f"{why} (a KV cache output keeps every KV head)"
    return {"k": k, "v": v, "nodes": nodes, "sites": sites}


def constants(block: dict[str, Any], keep: np.ndarray, current: Callable[[gs.Node, int], np.ndarray]
              ) -> dict[tuple[int, int], np.ndarray]:
    """(id(node), input index) -> new constant for the q projection and every head count when only the query
    heads `keep` remain: equally many per KV group, or whole KV groups (then the k/v projections and the KV-head
    counts too); `current(node, i)` reads a constant as planned so far."""
    d, hkv, hq = block["dim"], block["hkv"], block["hq"]
    rep = hq // hkv
    h2 = len(keep)
    per_group = np.bincount(np.asarray(keep) // rep, minlength=hkv)
    kv_keep = np.flatnonzero(per_group)
    whole = len(kv_keep) < hkv
    if whole and not (np.all(per_group[kv_keep] == rep) and "kv" in block):
        raise ValueError(f"query heads {keep.tolist()} are neither alike per KV group nor whole KV groups")
    if not whole:
        assert np.all(per_group == per_group[0]) and h2 <= hq
    hkv2, rep2 = len(kv_keep), h2 // len(kv_keep)
    new: dict[tuple[int, int], np.ndarray] = {}

    def take(src: dict[str, Any], heads: np.ndarray) -> None:
        cols = _expand_heads(heads, d)
        new[(id(src["mm"]), 1)] = np.ascontiguousarray(current(src["mm"], 1)[:, cols])
        if src["add"] is not None:
            bi = src["bias_index"]
            new[(id(src["add"]), bi)] = np.ascontiguousarray(current(src["add"], bi)[cols])

    take(block["q"], np.asarray(keep))
    sites = dict(block["sites"])
    values = {"q": (2, h2), "ek": (2, rep2), "ev": (2, rep2), "sk": (1, h2), "sv": (1, h2), "so": (2, h2 * d)}
    if whole:
        kv = block["kv"]
        take(kv["k"], kv_keep)
        take(kv["v"], kv_keep)
        sites.update(kv["sites"])
        values.update({"k": (2, hkv2), "v": (2, hkv2), "ek_kv": (1, hkv2), "ev_kv": (1, hkv2)})
    for key, (node, i, _) in sites.items():
        pos, value = values[key]
        arr = new.get((id(node), i))
        if arr is None:
            arr = np.array(current(node, i), copy=True)
        flat = arr.reshape(-1)
        flat[0 if node.op == "Concat" else pos] = value
        new[(id(node), i)] = arr
    return new


def _expand_heads(heads: np.ndarray, d: int) -> np.ndarray:
    return (np.asarray(heads)[:, None] * d + np.arange(d)).reshape(-1)
