"""RewriteRule = pattern + replacement + check; RuleSet groups rules applied by one driver.

    def pattern(op, x):            return op.Identity(x)
    def replacement(op, x, **_):   return x
    rule = RewriteRule("remove-identity", pattern, replacement)

`check(ctx, **bindings)` returns True/False or a MatchResult; a failed MatchResult carries the reason
shown by `explain`. `replacement(op, **bindings)` builds new nodes with a `GraphBuilder` and returns the
value(s) replacing the pattern's output(s).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir import const_value, stored_constant
from .index import GraphIndex
from .pattern import Pattern


@dataclass
class MatchResult:
    """Outcome of a check: ok, or not ok with the reason why."""

    ok: bool = True
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    @classmethod
    def fail(cls, reason: str) -> "MatchResult":
        return cls(False, reason)


def fail(reason: str) -> MatchResult:
    """Shorthand for a failed check with its reason."""
    return MatchResult.fail(reason)


@dataclass
class RewriteContext:
    """What a check or replacement may look at: the graph being rewritten and model-level facts."""

    index: GraphIndex
    opsets: dict[str, int]

    @property
    def graph(self) -> gs.Graph:
        return self.index.graph

    @property
    def opset(self) -> int:
        return self.opsets.get("", DEFAULT_OPSET)

    @staticmethod
    def const_value(t: gs.Tensor) -> Optional[np.ndarray]:
        return const_value(t)

    def is_graph_output(self, t: gs.Tensor) -> bool:
        return self.index.is_graph_output(t)

    def consumers(self, t: gs.Tensor) -> list[gs.Node]:
        return self.index.consumers(t)

    def is_graph_input(self, t: gs.Tensor) -> bool:
        return self.index.is_graph_input(t)


class GraphBuilder:
    """The `op` of a replacement: `op.Gemm(a, b, c, transB=1)` creates a detached gs.Node and returns its output."""

    def __init__(self, ctx: Optional["RewriteContext"] = None):
        self.nodes: list[gs.Node] = []
        self.constants: list[gs.Constant] = []
        self.ctx = ctx  # the graph being rewritten: lets a replacement reuse what is already there

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("__"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: Optional[str] = None, _outputs: int = 1, _name: Optional[str] = None,
                 **attrs: Any):
            ins = [self._as_tensor(v) for v in inputs]
            outs = [gs.Variable("") for _ in range(_outputs)]
            node = gs.Node(op_type, name=_name or "", attrs=dict(attrs), inputs=ins, outputs=outs, domain=_domain)
            self.nodes.append(node)
            return outs[0] if _outputs == 1 else tuple(outs)

        return make

    def const(self, value: Any, name: Optional[str] = None, dtype: Any = None) -> gs.Constant:
        """A new initializer holding `value` (over 2 GB, a big one waits in the tensor store: `ir.stored_constant`)."""
        arr = np.asarray(value, dtype=dtype)
        c = stored_constant(name or "", arr) or gs.Constant(name or "", arr)
        self.constants.append(c)
        return c

    def _as_tensor(self, v: Any) -> gs.Tensor:
        if v is None:
            return gs.Variable("")
        if isinstance(v, gs.Tensor):
            return v
        raise TypeError(f"replacement input must be a tensor (use op.const for values), got {type(v).__name__}")


CheckFn = Callable[..., Any]

#: default-domain opset assumed when a model does not say (the engine's one default: matcher, driver, context)
DEFAULT_OPSET = 21


@dataclass
class RewriteRule:
    """A named pattern → replacement, optionally guarded by a check that explains its refusals. Without a
    replacement it is a query (see `query`): `find_matches` reports where it matches, `apply_rules` refuses it."""

    name: str
    pattern_fn: Callable[..., Any]
    replacement_fn: Optional[Callable[..., Any]]
    check_fn: Optional[CheckFn] = None
    #: input names of a generated pattern function `fn(op, *values)` (default: its parameters after `op`)
    variables: Optional[Sequence[str]] = None
    pattern: Pattern = field(init=False)

    def __post_init__(self) -> None:
        self.pattern = Pattern(self.pattern_fn, self.variables)

    @property
    def root_op(self) -> str:
        return self.pattern.root.op

    def check(self, ctx: RewriteContext, bindings: dict[str, Any]) -> MatchResult:
        if self.check_fn is None:
            return MatchResult()
        r = self.check_fn(ctx, **bindings)
        if isinstance(r, MatchResult):
            return r
        return MatchResult() if r else MatchResult.fail("check returned False")


def query(name: str, pattern_fn: Callable[..., Any], check_fn: Optional[CheckFn] = None) -> RewriteRule:
    """A pattern with a check and no replacement, for `find_matches` (planning: where would this apply?)."""
    return RewriteRule(name, pattern_fn, None, check_fn)


class RuleSet:
    """An ordered collection of rules, indexed by the op type of each pattern's root for O(1) dispatch."""

    def __init__(self, rules: Iterable[RewriteRule]):
        self.rules = list(rules)
        names = [r.name for r in self.rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate rule names: {sorted(dup)}")
        self.by_op: dict[str, list[RewriteRule]] = {}
        for r in self.rules:
            self.by_op.setdefault(r.root_op, []).append(r)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def for_op(self, op: str) -> Sequence[RewriteRule]:
        return self.by_op.get(op, ())


def onnx_dtype(t: gs.Tensor) -> Optional[int]:
    """The ONNX elem_type of a gs tensor, or None when unknown."""
    if isinstance(t, gs.Constant):
        d = t.dtype  # LazyValues know their dtype: the values are not loaded
    else:
        d = t.dtype
    if d is None:
        return None
    if isinstance(d, int):
        return d
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(d))
    except (TypeError, KeyError, ValueError):
        return None
