"""Apply a RuleSet to a fixpoint with a worklist, transactionally, in the main graph and every subgraph.

Each rewrite is checked *before* it is committed: the replacement nodes are type-checked by
onnx.checker + strict shape inference on a small model made of just those nodes (cached by signature,
so a rule applied 10k times is checked once per distinct shape), and the output dtypes/shapes must agree
with the tensors they replace. A rewrite that fails is not applied (nothing to undo) and is recorded with
its reason. Cost per rewrite is O(size of the match + degree of the touched tensors): the driver never
rescans the graph.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir import Model, gc_paused, iter_graphs
from .index import GraphIndex, remove_from
from .matcher import Match, Matcher
from .plan import Plan
from .rule import DEFAULT_OPSET, GraphBuilder, RewriteContext, RewriteRule, RuleSet, onnx_dtype

_MAX_ALTERNATIVES = 8  # matches tried per root when checks reject the first ones
_SIBLING_LIMIT = 16  # re-queue siblings of removed nodes only for tensors with few readers
_SMALL_CONST = 64  # constants up to this many elements are embedded (values matter to shape inference)


@dataclass
class RuleStats:
    """Per rule: how many candidates were tried, how many were rewritten, and why the rest were not."""

    tried: int = 0
    applied: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one node name it happened at

    def reject(self, reason: str, where: str) -> None:
        self.rejected[reason] += 1
        self.examples.setdefault(reason, where)


@dataclass
class RewriteStats:
    rules: dict[str, RuleStats]
    iterations: int = 0
    fixpoint: bool = True
    #: with a plan: planned node name -> why it was not rewritten (empty when the whole plan was applied)
    unapplied: dict[str, str] = field(default_factory=dict)

    @property
    def applied(self) -> int:
        return sum(r.applied for r in self.rules.values())

    def explain(self, top: int = 5) -> str:
        """Per rule: matches applied and the most common reasons candidates were rejected."""
        lines = []
        for name, s in self.rules.items():
            lines.append(f"{name}: {s.applied} applied of {s.tried} candidates")
            for reason, k in s.rejected.most_common(top):
                lines.append(f"    {k:6d} x {reason}   (e.g. at '{s.examples[reason]}')")
        if not self.fixpoint:
            lines.append(f"warning: stopped after {self.iterations} steps without reaching a fixpoint")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "fixpoint": self.fixpoint,
            "rules": {n: {"tried": s.tried, "applied": s.applied, "rejected": dict(s.rejected)}
                      for n, s in self.rules.items()},
        }


class _Reject(Exception):
    pass


def _omitted(t: Any) -> bool:
    return isinstance(t, gs.Variable) and not t.name


class RewriteDriver:
    """Runs rules to a fixpoint over a Model (main graph first, then If/Loop/Scan bodies)."""

    def __init__(self, rules: RuleSet, opsets: dict[str, int], max_steps_factor: int = 20,
                 plan: Optional[Plan] = None):
        self.rules = rules
        self.opsets = opsets
        self.max_steps_factor = max_steps_factor
        self.plan = plan
        self._check_cache: dict[Any, Optional[str]] = {}
        self.stats = RewriteStats({r.name: RuleStats() for r in rules})
        self._applied: set[int] = set()  # planned nodes rewritten
        self._refused: dict[int, str] = {}  # root node -> the last reason no rule applied there

    def run(self, model: Model) -> RewriteStats:
        with gc_paused():
            for g in list(iter_graphs(model.graph)):
                self._run_graph(g)
        if self.plan is not None:
            self.stats.unapplied = {n.name: self._refused.get(id(n), "no rule matched it")
                                    for n in self.plan.nodes() if id(n) not in self._applied}
        return self.stats

    # ------------------------------------------------------------------------------------------
    def _run_graph(self, graph: gs.Graph) -> None:
        index = GraphIndex(graph)
        ctx = RewriteContext(index, self.opsets)
        work: deque[gs.Node] = deque(graph.nodes)
        queued = {id(n) for n in graph.nodes}
        limit = self.max_steps_factor * (len(graph.nodes) + 10)
        steps = 0
        changed = False
        while work:
            node = work.popleft()
            queued.discard(id(node))
            if not index.alive(node) or (self.plan is not None and self.plan.anchor is None and node not in self.plan):
                continue
            steps += 1
            if steps > limit:
                self.stats.fixpoint = False
                break
            for rule in self.rules.for_op(node.op):
                touched = self._try(rule, node, index, ctx)
                if touched is not None:
                    changed = True
                    for n in touched:
                        if id(n) not in queued and index.alive(n):
                            queued.add(id(n))
                            work.append(n)
                    break
        self.stats.iterations += steps
        if changed:
            index.commit()

    def _try(self, rule: RewriteRule, node: gs.Node, index: GraphIndex, ctx: RewriteContext) -> Optional[list]:
        """Try the rule at `node`: the first of its matches (at most _MAX_ALTERNATIVES) that passes the
        rule's check and the type checks is committed; otherwise the last reason is recorded."""
        st = self.stats.rules[rule.name]
        st.tried += 1
        cands = _Candidates(rule, node, index, ctx, self.opsets.get("", DEFAULT_OPSET), check_prefix="check failed: ",
                            plan=self.plan)
        for m in cands:
            builder = GraphBuilder(ctx)
            try:
                new = rule.replacement_fn(builder, **m.bindings)
                new_outs = list(new) if isinstance(new, (tuple, list)) else [new]
                if len(new_outs) != len(m.outputs):
                    raise _Reject(f"replacement returned {len(new_outs)} values for {len(m.outputs)} pattern outputs")
                if all(a is b for a, b in zip(new_outs, m.outputs)) and not builder.nodes:
                    raise _Reject("replacement is the matched subgraph itself")
                self._name_new(builder, index, m.nodes[0].name or rule.name, rule.name)
                self._check_types(builder, m.outputs, new_outs)
                self._check_graph_outputs(builder, m, new_outs, index)
            except _Reject as e:
                for n in builder.nodes:  # gs registered the unused new nodes as readers of their inputs: undo
                    for t in n.inputs:
                        remove_from(t.outputs, n)
                cands.refusal = str(e)
                continue
            if self.plan is not None:
                self._applied.add(id(self.plan.anchor_of(node, m.bindings)))
            return self._commit(builder, m, new_outs, index, st)
        reason = cands.refusal if cands.refusal is not None else f"no match: {cands.matcher.reason}"
        st.reject(reason, node.name)
        if self.plan is not None:
            self._refused[id(node)] = reason
        return None

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_intermediates(nodes: list[gs.Node], outputs: list[gs.Tensor], index: GraphIndex) -> None:
        """Values computed inside the match must not be used outside it (they would disappear)."""
        inside = {id(n) for n in nodes}
        outs = {id(t) for t in outputs}
        for n in nodes:
            for t in n.outputs:
                if id(t) in outs:
                    continue
                if index.is_graph_output(t):
                    raise _Reject(f"intermediate '{t.name}' is a graph output")
                for c in index.consumers(t):
                    if id(c) not in inside:
                        raise _Reject(f"intermediate '{t.name}' is also used by {c.op} '{c.name}'")

    @staticmethod
    def _name_new(builder: GraphBuilder, index: GraphIndex, base: str, rule: str) -> None:
        base = base.split(f"/{rule}")[0]  # a rule rewriting its own output does not grow the name each time
        for n in builder.nodes:
            if not n.name:
                n.name = index.fresh_name(f"{base}/{rule}")
            for i, t in enumerate(n.outputs):
                if not t.name:
                    t.name = index.fresh_name(f"{n.name}:{i}" if len(n.outputs) > 1 else f"{n.name}:out")
        for c in builder.constants:  # explicit names too: two folds must not create two initializers of one name
            c.name = index.fresh_name(c.name or f"{base}/{rule}/const")

    def _check_types(self, builder: GraphBuilder, olds: list[gs.Tensor], news: list[gs.Tensor]) -> None:
        if builder.nodes:
            self._infer_new(builder)
        for old, new in zip(olds, news):
            a, b = onnx_dtype(old), onnx_dtype(new)
            if a is not None and b is not None and a != b:
                raise _Reject(f"rewrite changes dtype of '{old.name}' from {onnx.helper.tensor_dtype_to_string(a)} "
                              f"to {onnx.helper.tensor_dtype_to_string(b)} (rolled back)")
            sa, sb = _shape(old), _shape(new)
            if sa is not None and sb is not None:
                if len(sa) != len(sb) or any(isinstance(x, int) and isinstance(y, int) and x != y
                                             for x, y in zip(sa, sb)):
                    raise _Reject(f"rewrite changes shape of '{old.name}' from {list(sa)} to {list(sb)} (rolled back)")

    def _infer_new(self, builder: GraphBuilder) -> None:
        """onnx.checker + strict shape inference on a model made of the new nodes only.

        Tensors get canonical names (i0.., n0_0..) so the result is cached by signature: a rule applied
        10k times to same-shaped tensors runs the checker once.
        """
        canon: dict[int, str] = {}
        ext: list[gs.Tensor] = []
        for j, n in enumerate(builder.nodes):
            for k, t in enumerate(n.outputs):
                canon[id(t)] = f"n{j}_{k}"
        for n in builder.nodes:
            for t in n.inputs:
                if id(t) not in canon and not _omitted(t):
                    canon[id(t)] = f"i{len(ext)}"
                    ext.append(t)
        key_parts: list[Any] = []
        for t in ext:
            if isinstance(t, gs.Constant) and _volume(t) <= _SMALL_CONST:
                key_parts.append(("c", t.values.dtype.str, t.values.shape, t.values.tobytes()))
            else:
                shp = _shape(t)
                key_parts.append(("v", onnx_dtype(t), None if shp is None else tuple(shp)))
        for n in builder.nodes:
            ins = tuple("" if _omitted(t) else canon[id(t)] for t in n.inputs)
            key_parts.append((n.op, n.domain, repr(sorted((k, _attr_key(v)) for k, v in n.attrs.items())), ins,
                              len(n.outputs)))
        key = tuple(key_parts)
        cached = self._check_cache.get(key)
        if cached is None:
            cached = self._run_local_check(builder, ext, canon)
            self._check_cache[key] = cached
        err, types = cached
        if err:
            raise _Reject(f"replacement fails onnx checker/shape inference: {err} (rolled back)")
        for n in builder.nodes:
            for t in n.outputs:
                ty = types.get(canon[id(t)])
                if ty is not None:
                    t.dtype = onnx.helper.tensor_dtype_to_np_dtype(ty[0]) if ty[0] else None
                    t.shape = ty[1]

    def _run_local_check(self, builder: GraphBuilder, ext: list[gs.Tensor], canon: dict[int, str]):
        inputs, inits = [], []
        for t in ext:
            name = canon[id(t)]
            if isinstance(t, gs.Constant) and _volume(t) <= _SMALL_CONST:
                inits.append(onnx.numpy_helper.from_array(np.asarray(t.values), name))
                continue
            dt = onnx_dtype(t)
            if dt is None:
                return (None, {})  # untyped input: nothing can be inferred locally; the pass-level check decides
            shape = _shape(t)
            inputs.append(onnx.helper.make_tensor_value_info(name, dt, list(shape) if shape is not None else None))
        nodes = []
        for j, n in enumerate(builder.nodes):
            attrs = {k: _attr_proto_value(v) for k, v in n.attrs.items()}
            nodes.append(onnx.helper.make_node(n.op, ["" if _omitted(t) else canon[id(t)] for t in n.inputs],
                                               [canon[id(t)] for t in n.outputs], name=f"node{j}",
                                               domain=n.domain or "", **attrs))
        outs = [onnx.ValueInfoProto(name=canon[id(t)]) for n in builder.nodes for t in n.outputs]
        g = onnx.helper.make_graph(nodes, "local", inputs, outs, inits)
        versions = dict(self.opsets)
        for n in builder.nodes:  # a rule may introduce a domain the model does not import yet
            versions.setdefault(n.domain or "", 1)
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in versions.items()]
        m = onnx.helper.make_model(g, opset_imports=opsets)
        try:
            inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True, check_type=True)
            known = {vi.name: vi for vi in inferred.graph.value_info}
            typed_outs = [known.get(o.name) for o in inferred.graph.output]
            if any(vi is None for vi in typed_outs):
                if all(n.domain in ("", "ai.onnx") for n in nodes):
                    missing = [o.name for o, vi in zip(inferred.graph.output, typed_outs) if vi is None]
                    return (f"output type of {missing} cannot be inferred", {})
                return (None, {})  # custom-domain ops: onnx cannot type them; the pass-level check decides
            del inferred.graph.output[:]
            inferred.graph.output.extend(typed_outs)
            onnx.checker.check_model(inferred)
        except Exception as e:  # checker and inference raise several types; all mean "invalid"
            msg = str(e).strip().splitlines()
            return (" ".join(x.strip() for x in msg[:3])[:300] or type(e).__name__, {})
        types = {}
        for vi in inferred.graph.output:
            if not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            shape = None
            if tt.HasField("shape"):
                shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            types[vi.name] = (tt.elem_type, shape)
        return (None, types)

    def _check_graph_outputs(self, builder: GraphBuilder, m, news: list[gs.Tensor], index: GraphIndex) -> None:
        created = {id(t) for n in builder.nodes for t in n.outputs}
        for old, new in zip(m.outputs, news):
            if not index.is_graph_output(old) or old is new or id(new) in created:
                continue
            # only a tensor produced by a node of this graph may be renamed (not one of an outer scope)
            if (isinstance(new, gs.Constant) or index.is_graph_input(new) or index.is_graph_output(new)
                    or not any(index.alive(p) for p in new.inputs)):
                raise _Reject(f"'{old.name}' is a graph output and its replacement '{new.name}' cannot take its name")

    def _commit(self, builder: GraphBuilder, m, news: list[gs.Tensor], index: GraphIndex, st: RuleStats) -> list:
        for n in builder.nodes:
            index.add_node(n)
        renames = []
        touched = list(builder.nodes)
        for old, new in zip(m.outputs, news):
            if old is new:
                continue
            if isinstance(new, gs.Variable) and new.dtype is None and isinstance(old, gs.Variable):
                new.dtype, new.shape = old.dtype, old.shape  # ops onnx cannot type (custom domains)
            if index.is_graph_output(old):
                renames.append((old, new))
            touched.extend(index.consumers(old))  # the readers that now see `new` (not all readers of `new`)
            index.replace_all_uses(old, new)
        removed = index.remove_dead(m.nodes)
        created = {id(t) for n in builder.nodes for t in n.outputs}
        for old, new in zip(m.outputs, news):  # the replacement keeps the replaced tensor's name
            if old is not new and id(new) in created and not old.inputs and not index.is_graph_output(old) \
                    and (old, new) not in renames:
                name = old.name
                old.name = index.fresh_name(name + "__replaced")
                new.name = name
        for old, new in renames:  # graph outputs keep their names
            name = old.name
            old.name = index.fresh_name(name + "__replaced")
            new.name = name
        st.applied += 1
        for t in news:
            touched.extend(t.inputs)
        for n in builder.nodes:
            for t in n.inputs:
                touched.extend(t.inputs)
        for n in removed:  # upstream may match now; siblings too, unless the tensor is widely shared
            for t in n.inputs:
                touched.extend(t.inputs)
                if len(t.outputs) <= _SIBLING_LIMIT:
                    touched.extend(index.consumers(t))
        return touched


def _volume(t: gs.Constant) -> int:
    """Elements of a constant, from its shape (its values are not loaded)."""
    return int(np.prod(t.shape, dtype=np.int64))


def _shape(t: gs.Tensor):
    if isinstance(t, gs.Constant):
        return list(t.shape)
    return None if t.shape is None else list(t.shape)


def _attr_key(v: Any) -> Any:
    if isinstance(v, gs.Constant):
        return ("T", v.values.dtype.str, v.values.shape, v.values.tobytes() if v.values.size <= 4096 else id(v))
    if isinstance(v, np.ndarray):
        return ("A", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, gs.Graph):
        return ("G", id(v))
    return v


def _attr_proto_value(v: Any) -> Any:
    if isinstance(v, gs.Constant):
        return onnx.numpy_helper.from_array(np.asarray(v.values))
    if isinstance(v, gs.Graph):
        return gs.export_onnx(v, do_type_check=False).graph
    return v


def apply_rules(model: Model, rules: RuleSet | list[RewriteRule], opsets: Optional[dict[str, int]] = None,
                plan: Optional[Plan] = None) -> RewriteStats:
    """Apply rules to a fixpoint over the model; returns per-rule statistics (see RewriteStats.explain). With a
    `plan` (see plan.py) the rules apply only where it has a decision, which check and replacement receive as
    `decision`; `stats.unapplied` lists the planned nodes left as they were, with why."""
    rs = rules if isinstance(rules, RuleSet) else RuleSet(rules)
    queries = [r.name for r in rs if r.replacement_fn is None]
    if queries:
        raise ValueError(f"apply_rules: {queries} are queries (no replacement); use find_matches")
    if opsets is None:
        opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.meta.opset_import}
    return RewriteDriver(rs, opsets, plan=plan).run(model)


class _Candidates:
    """The matches of `rule` rooted at `node` (at most _MAX_ALTERNATIVES tried) whose intermediate values are
    read only inside the match (when `exclusive`) and that pass the rule's check, in order: what both the driver
    and find_matches start from. `refusal` is why the last one tried was refused (None: none was)."""

    def __init__(self, rule: RewriteRule, node: gs.Node, index: GraphIndex, ctx: RewriteContext, opset: int,
                 exclusive: bool = True, check_prefix: str = "", plan: Optional[Plan] = None):
        self.rule, self.node, self.index, self.ctx = rule, node, index, ctx
        self.matcher = Matcher(rule.pattern, index, opset)
        self.exclusive, self.check_prefix, self.plan = exclusive, check_prefix, plan
        self.refusal: Optional[str] = None

    def __iter__(self):
        for k, m in enumerate(self.matcher.matches(self.node)):
            if k >= _MAX_ALTERNATIVES:
                return
            try:
                if self.exclusive:
                    RewriteDriver._check_intermediates(m.nodes, m.outputs, self.index)
            except _Reject as e:
                self.refusal = str(e)
                continue
            if self.plan is not None:  # the pass's decision for this match, given to check and replacement
                anchor = self.plan.anchor_of(self.node, m.bindings)
                if anchor is None or anchor not in self.plan:
                    self.refusal = "not in the plan"
                    continue
                m = Match({**m.bindings, "decision": self.plan.decision(anchor)}, m.nodes, m.outputs)
            res = self.rule.check(self.ctx, m.bindings)
            if not res:
                self.refusal = self.check_prefix + res.reason
                continue
            yield m


@dataclass
class Found:
    """A match that passed its rule's check, found without rewriting (see find_matches)."""

    rule: RewriteRule
    match: Any  # matcher.Match
    graph: gs.Graph


def find_matches(model: Model, rules: RuleSet | list[RewriteRule], opsets: Optional[dict[str, int]] = None,
                 rejections: Optional[dict[str, str]] = None, exclusive: bool = True) -> list[Found]:
    """Every place a rule would apply (its check passing), in the main graph and subgraphs, without changing
    anything: passes use it to plan (which tensors to calibrate, which weights to touch). `rejections`, when
    given, receives node name -> why no rule applied, for nodes some rule was rooted at. `exclusive=False` also
    reports matches whose intermediate values are read outside the match (a plan that first reroutes those
    readers, e.g. Shape nodes, before rewriting)."""
    rs = rules if isinstance(rules, RuleSet) else RuleSet(rules)
    if opsets is None:
        opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.meta.opset_import}
    found: list[Found] = []
    for g in list(iter_graphs(model.graph)):
        index = GraphIndex(g)
        ctx = RewriteContext(index, opsets)
        for node in list(g.nodes):
            reason = None
            for rule in rs.for_op(node.op):
                cands = _Candidates(rule, node, index, ctx, opsets.get("", DEFAULT_OPSET), exclusive=exclusive)
                m = next(iter(cands), None)
                if m is not None:
                    found.append(Found(rule, m, g))
                    reason = None
                    break
                if cands.refusal is not None:
                    reason = cands.refusal
                elif reason is None:
                    reason = f"no match: {cands.matcher.reason}"
            if reason is not None and rejections is not None:
                rejections[node.name] = reason
    return found
