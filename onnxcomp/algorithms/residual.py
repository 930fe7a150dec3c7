"""Slicing the residual stream (SliceGPT-style, one rotation for the whole stream) of pre-norm RMSNorm models.

The stream starts at an embedding Gather and passes through residual Adds; every block reads it through an
RMSNorm (Pow/ReduceMean/Add eps/Sqrt/Reciprocal|Div/Mul, then a gain Mul; or ONNX's fused RMSNormalization,
opset 23) into MatMuls, and writes a MatMul output back with the Add; a last RMSNorm feeds the head. RMSNorm
commutes with an orthogonal rotation Q once its gain is moved into the weights that read it, so with Q every
weight touching the stream changes exactly:

    embedding E -> E Q,  readers W -> Q^T diag(g) W,  writers W (+ b) -> W Q (+ b Q),  gains -> 1

Q holds the principal directions of the normalised stream on the calibration data (the eigenvectors of the summed
Gram of every RMSNorm's normalised input, largest first). Keeping its first k columns slices the stream from D
to k dimensions: every such weight, every stream tensor and every norm shrink. The norms then average over k
values instead of D, which the new gain sqrt(D/k) and eps * D/k compensate for the energy kept. Exact in float
when nothing is sliced (k = D); what is sliced is the stream energy outside the kept directions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..rewrite import GraphIndex, apply_rules, fail, find_matches, query
from .components import component, component_rule


def _rms_pattern(div: bool, axes_input: bool):
    def pattern(op, x, two, eps, g, axes):
        sq = op.Pow(x, two, _bind="pow")
        mean = op.ReduceMean(sq, axes, _bind="mean") if axes_input else op.ReduceMean(sq, _bind="mean")
        std = op.Sqrt(op.Add(mean, eps, _bind="add_eps"), _bind="sqrt")
        normed = op.Div(x, std, _bind="normed") if div else op.Mul(x, op.Reciprocal(std, _bind="recip"),
                                                                   _bind="normed")
        return op.Mul(normed, g, _bind="gain")

    if not axes_input:
        def pattern2(op, x, two, eps, g):
            return pattern(op, x, two, eps, g, None)
        pattern2.__name__ = f"rmsnorm{'_div' if div else ''}"
        return pattern2
    pattern.__name__ = f"rmsnorm{'_div' if div else ''}_axes"
    return pattern


_PATTERNS = [_rms_pattern(d, a) for d in (False, True) for a in (False, True)]


def _check(ctx, **b) -> Any:
    two, eps, g = (ctx.const_value(b[k]) for k in ("two", "eps", "g"))
    if two is None or two.size != 1 or float(two.reshape(-1)[0]) != 2.0:
        return fail("not a square")
    if eps is None or eps.size != 1:
        return fail("eps is not a constant scalar")
    if g is None or g.ndim != 1 or g.dtype != np.float32:
        return fail("the gain is not a constant vector")
    mean = b["mean"]
    axes = ctx.const_value(b["axes"]) if "axes" in b else np.array(mean.attrs.get("axes", []))
    if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] != [-1] or mean.attrs.get("keepdims", 1) != 1:
        return fail("ReduceMean is not over the last axis with keepdims")
    return True


@dataclass
class Norm:
    """One RMSNorm on the stream: its bindings and the MatMuls that read its output."""

    b: dict[str, Any]
    readers: list[gs.Node]

    @property
    def fused(self) -> bool:
        """One RMSNormalization node (its gain is input 1, eps an attribute)."""
        return "fused" in self.b

    @property
    def nodes(self) -> list[gs.Node]:
        return [self.b[k] for k in ("pow", "mean", "add_eps", "sqrt", "recip", "normed", "gain") if k in self.b]

    @property
    def observed(self) -> str:
        """The tensor whose Gram gives this norm's share of the rotation: the normalised (pre-gain) input, or a
        fused norm's output (its Gram divided by g g^T in `rotation`: the same matrix)."""
        return (self.b["gain"] if self.fused else self.b["normed"]).outputs[0].name


#: fused RMSNorm ops: ONNX RMSNormalization (opset 23). ORT's SimplifiedLayerNormalization is not here: onnx.checker
#: rejects it (it is registered by ORT only), so such a model is refused as input before any pass runs
_FUSED_NORMS = frozenset({"RMSNormalization"})


def _fused_norms(model: ir.Model) -> dict[int, dict[str, Any]]:
    """id(input) -> bindings of every fused RMSNorm over the last axis with a constant, nowhere-zero gain."""
    out = {}
    for n in model.graph.nodes:
        if n.op not in _FUSED_NORMS or (n.domain or "") not in ("", "ai.onnx") or len(n.inputs) != 2 \
                or len(n.outputs) != 1 or n.attrs.get("stash_type", 1) != 1:
            continue
        g = ir.const_value(n.inputs[1])
        x = n.inputs[0]
        rank = len(x.shape) if getattr(x, "shape", None) is not None else None
        if g is None or g.ndim != 1 or g.dtype != np.float32 or not np.all(g != 0):
            continue
        if n.attrs.get("axis", -1) != -1 and (rank is None or n.attrs.get("axis") != rank - 1):
            continue
        out.setdefault(id(x), {"x": x, "fused": n, "gain": n, "g": n.inputs[1]})
    return out


@dataclass
class Stream:
    """The residual stream of a pre-norm model: width, embedding, norms (in order), residual Adds, writers."""

    dim: int
    embed: gs.Node
    norms: list[Norm]
    adds: list[gs.Node]
    writers: list[tuple[gs.Node, Optional[gs.Node]]] = field(default_factory=list)  # (MatMul, its bias Add)

    @property
    def normed(self) -> list[str]:
        """The tensors whose Grams give the rotation (Norm.observed)."""
        return [n.observed for n in self.norms]


def _weight(n: gs.Node, i: int) -> Optional[np.ndarray]:
    v = ir.const_value(n.inputs[i]) if len(n.inputs) > i else None
    return v if v is not None and v.ndim == 2 and v.dtype == np.float32 else None


def _writer(t: gs.Tensor, d: int) -> Optional[tuple[gs.Node, Optional[gs.Node]]]:
    """t = MatMul(y, W[n, d]) [+ b]: the writer MatMul and its bias Add."""
    n = t.inputs[0] if t.inputs else None
    add = None
    if n is not None and n.op == "Add":
        consts = [x for x in n.inputs if ir.const_value(x) is not None]
        others = [x for x in n.inputs if ir.const_value(x) is None]
        if len(consts) != 1 or len(others) != 1 or ir.const_value(consts[0]).shape != (d,):
            return None
        add, n = n, (others[0].inputs[0] if others[0].inputs else None)
    if n is None or n.op != "MatMul":
        return None
    w = _weight(n, 1)
    return (n, add) if w is not None and w.shape[1] == d else None


def find_stream(model: ir.Model) -> Stream | str:
    """The residual stream of the main graph, or why it is not one this module can slice."""
    index = GraphIndex(model.graph)
    norms = {}
    for f in find_matches(model, [query(p.__name__, p, _check) for p in _PATTERNS], exclusive=True):
        if f.graph is model.graph:
            norms.setdefault(id(f.match.bindings["x"]), dict(f.match.bindings))
    for k, b in _fused_norms(model).items():
        norms.setdefault(k, b)
    if not norms:
        return _post_norm_reason(model, index) or \
            "no RMSNorm (the Pow/ReduceMean/Sqrt/... form, or RMSNormalization) found"
    embeds = [n for n in model.graph.nodes if n.op == "Gather" and _weight(n, 0) is not None
              and n.attrs.get("axis", 0) == 0 and id(n.outputs[0]) in norms]
    if len(embeds) != 1:
        return f"{len(embeds)} embedding Gathers feed an RMSNorm (need exactly one)"
    embed = embeds[0]
    d = int(_weight(embed, 0).shape[1])
    s = embed.outputs[0]
    found, adds, writers = [], [], []
    while True:
        if index.is_graph_output(s):
            return f"the stream tensor '{s.name}' is a graph output"
        readers = index.consumers(s)
        b = norms.get(id(s))
        if b is None:
            return f"'{s.name}' on the stream is not read by an RMSNorm"
        norm_nodes = {id(b["fused"])} if "fused" in b else {id(b["pow"]), id(b["normed"])}
        rest = [c for c in readers if id(c) not in norm_nodes]
        gain_out = b["gain"].outputs[0]
        mm = index.consumers(gain_out)
        if index.is_graph_output(gain_out) or not mm or any(
                c.op != "MatMul" or c.inputs[0] is not gain_out or _weight(c, 1) is None
                or _weight(c, 1).shape[0] != d for c in mm):
            return f"RMSNorm '{b['gain'].name}' output is read by something other than MatMuls with [{d}, n] weights"
        if ir.const_value(b["g"]).shape != (d,):
            return f"RMSNorm '{b['gain'].name}' gain is not [{d}]"
        found.append(Norm(b, mm))
        if not rest:  # the final norm: the stream ends here
            break
        if len(rest) != 1 or rest[0].op != "Add":
            return f"'{s.name}' on the stream is read by {', '.join(c.op + ' ' + repr(c.name) for c in rest)}"
        add = rest[0]
        other = [x for x in add.inputs if x is not s]
        w = _writer(other[0], d) if len(other) == 1 else None
        if w is None:
            return f"residual Add '{add.name}' does not add a MatMul output of width {d}"
        if index.consumers(w[0].outputs[0]) != ([w[1]] if w[1] is not None else [add]):
            return f"the output of '{w[0].name}' is read outside the residual Add"
        adds.append(add)
        writers.append(w)
        s = add.outputs[0]
    return Stream(d, embed, found, adds, writers)


def _post_norm_reason(model: ir.Model, index: GraphIndex) -> Optional[str]:
    """Why a post-norm stream (h' = LayerNormalization(h + f(h)), BERT's form) is not sliced, when the model has
    one: None otherwise."""
    for n in model.graph.nodes:
        src = n.inputs[0].inputs[0] if n.op == "LayerNormalization" and n.inputs and n.inputs[0].inputs else None
        if src is not None and src.op == "Add" and any(c.op == "Add" for c in index.consumers(n.outputs[0])):
            return (f"post-norm stream (LayerNormalization '{n.name}' reads a residual Add and feeds the next "
                    "one): its gain sits on the skip path, so a rotated stream needs a dense k x k MatMul after every "
                    "norm; on MiniLM-L3 that saves no time up to 20% sliced (cosine 0.95) and 4-8% at 30% "
                    "(cosine 0.91) (tools/experiment_postnorm_slicing.py): prune FFN channels and heads instead")
    return None


def rotation(stream: Stream, stats: dict[str, Any]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(Q [D, D], energies [D]): directions by decreasing energy of the normalised stream; None without
    statistics."""
    c = np.zeros((stream.dim, stream.dim))
    for nm in stream.norms:
        st = stats.get(nm.observed)
        if st is None or st.gram is None or not st.gram_rows:
            return None
        m = st.gram / st.gram_rows
        if nm.fused:  # y = g * normed: E[normed normed^T] = E[y y^T] / (g g^T)
            g = ir.const_value(nm.b["g"]).astype(np.float64)
            m = m / np.outer(g, g)
        c += m
    vals, vecs = np.linalg.eigh(c)
    return vecs[:, ::-1].copy(), vals[::-1].copy()


def kept_dims(d: int, hidden: float) -> int:
    """Stream width kept when slicing `hidden` of it (a multiple of 8 for wide streams)."""
    k = d - int(round(hidden * d))
    if d >= 64:
        k = max(8, int(round(k / 8.0)) * 8)
    return max(1, min(d, k))


def slice_stream(model: ir.Model, stream: Stream, q: np.ndarray) -> tuple[int, int]:
    """Rotate and slice the stream to q's columns (q: [D, k], orthonormal columns), through one engine rule.
    Returns the weights of the touched layers before and after."""
    d, k = q.shape
    q64 = q.astype(np.float64)
    new: dict[tuple[int, int], np.ndarray] = {}
    attrs: dict[int, dict[str, Any]] = {}
    before = after = 0

    def put(node: gs.Node, i: int, v: np.ndarray) -> None:
        nonlocal before, after
        old = ir.const_value(node.inputs[i])
        if old.ndim == 2:
            before, after = before + old.size, after + v.size
        new[(id(node), i)] = np.ascontiguousarray(v, dtype=np.float32)

    put(stream.embed, 0, _weight(stream.embed, 0).astype(np.float64) @ q64)
    nodes: list[gs.Node] = [stream.embed, *stream.adds]
    scale = np.sqrt(d / k)
    for nm in stream.norms:
        b = nm.b
        g = ir.const_value(b["g"]).astype(np.float64)
        gi = list(b["gain"].inputs).index(b["g"])
        put(b["gain"], gi, np.full(k, scale))
        if nm.fused:  # the mean is over k values now: eps * D/k keeps the norm exact on the kept energy
            attrs[id(b["fused"])] = {"epsilon": float(b["fused"].attrs.get("epsilon", 1e-5)) * d / k}
        else:
            ei = list(b["add_eps"].inputs).index(b["eps"])
            eps = ir.const_value(b["eps"])
            new[(id(b["add_eps"]), ei)] = (eps * (d / k)).astype(eps.dtype)
        for r in nm.readers:
            put(r, 1, q64.T @ (g[:, None] * _weight(r, 1).astype(np.float64)))
        nodes += nm.nodes + nm.readers
    for mm, add in stream.writers:
        put(mm, 1, _weight(mm, 1).astype(np.float64) @ q64)
        nodes.append(mm)
        if add is not None:
            bi = next(i for i, x in enumerate(add.inputs) if ir.const_value(x) is not None)
            new[(id(add), bi)] = (ir.const_value(add.inputs[bi]).astype(np.float64) @ q64).astype(np.float32)
            nodes.append(add)
    order = {id(n): i for i, n in enumerate(model.graph.nodes)}
    spec = component(nodes, new, order, GraphIndex(model.graph), attrs)
    rule, plan = component_rule(0, [spec], name="slice-residual-stream")
    stats = apply_rules(model, [rule], plan=plan)
    if stats.unapplied:
        from ..errors import InvalidModelError

        raise InvalidModelError(f"residual-stream slicing was not applied: {sorted(stats.unapplied.values())[:3]}")
    if k < d:
        divided_norms(model)
    return before, after


def divided_norms(model: ir.Model) -> int:
    """x * Reciprocal(Sqrt(mean + eps)) -> x / Sqrt(mean + eps) in every RMSNorm: ORT fuses the Div form into
    SimplifiedLayerNormalization, not the Reciprocal form (decoder fixture, hidden 0.2: 0.839x / 0.850x of fp32 at
    64 / 128 bytes -> 0.813x / 0.828x). Not bit-exact (one rounding fewer), so only where slicing changes the
    norms anyway. Returns how many."""
    from ..rewrite import RewriteRule

    def replacement(op, x, two, eps, g, mean, axes=None, **_):
        sq = op.Pow(x, two)
        m = op.ReduceMean(sq, *([] if axes is None else [axes]), **dict(mean.attrs))
        return op.Mul(op.Div(x, op.Sqrt(op.Add(m, eps))), g)

    rules = [RewriteRule(f"rmsnorm-div-{p.__name__}", p, replacement, _check) for p in _PATTERNS[:2]]
    return apply_rules(model, rules).applied
