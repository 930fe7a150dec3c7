"""Patterns declared as small Python functions, in the style of onnxscript's rewriter.

    def pattern(op, x, w):
        return op.MatMul(x, w)

Calling the function with an `OpPattern` builder records a small DAG of `NodePattern`s. Arguments of the
function become `Var`s (bind any tensor); Python numbers and numpy arrays become `ConstPattern`s (match a
constant tensor by value); keyword arguments are attribute constraints (a value, a predicate, or an
`AttrVar` that binds the attribute). Commutative ops (Add, Mul, ...) match both input orders natively.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

# Binary ops whose two inputs may be swapped (ONNX semantics incl. broadcasting are symmetric).
COMMUTATIVE_OPS = frozenset({"Add", "Mul", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal", "BitwiseAnd",
                             "BitwiseOr", "BitwiseXor"})
DEFAULT_DOMAINS = ("", "ai.onnx")


def norm_domain(d: Optional[str]) -> str:
    return "" if d in (None, "", "ai.onnx") else d


class ValuePattern:
    """A value (tensor) position in a pattern."""


@dataclass(eq=False)
class Var(ValuePattern):
    """Binds any tensor under `name`; the same Var used twice must bind the same tensor."""

    name: str


@dataclass(eq=False)
class ConstPattern(ValuePattern):
    """Matches a constant tensor (initializer or Constant node) equal to `value` (broadcast, within atol)."""

    value: np.ndarray
    atol: float = 0.0
    name: Optional[str] = None

    def matches(self, v: np.ndarray) -> bool:
        try:
            b = np.broadcast_arrays(np.asarray(v), self.value)
        except ValueError:
            return False
        if np.asarray(v).size == 0:
            return False
        if self.atol == 0.0:
            return bool(np.array_equal(b[0], b[1]))
        return bool(np.allclose(b[0], b[1], atol=self.atol, rtol=0.0))


@dataclass(eq=False)
class NodeOutput(ValuePattern):
    node: "NodePattern"
    index: int


@dataclass(frozen=True)
class AttrVar:
    """Binds the value of an attribute under `name` (None when the attribute is absent)."""

    name: str


AttrConstraint = Union[AttrVar, Callable[[Any], bool], Any]


@dataclass(eq=False)
class NodePattern:
    op: str
    domain: str
    inputs: list[Optional[ValuePattern]]
    attrs: dict[str, AttrConstraint]
    num_outputs: Optional[int]  # None: any number of outputs
    commutative: bool
    bind: Optional[str]  # name under which the matched gs.Node is bound
    outputs: list[NodeOutput] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"NodePattern({self.op})"


class OpPattern:
    """The `op` argument of a pattern function: `op.MatMul(x, w)` records a NodePattern."""

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("__"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: Optional[str] = None, _outputs: Optional[int] = 1,
                 _commute: Optional[bool] = None, _bind: Optional[str] = None, **attrs: Any):
            ins = [_to_value(v) for v in inputs]
            commutative = (op_type in COMMUTATIVE_OPS and len(ins) == 2) if _commute is None else _commute
            node = NodePattern(op_type, norm_domain(_domain), ins, attrs, _outputs, commutative, _bind)
            n = 1 if _outputs is None else _outputs
            node.outputs = [NodeOutput(node, i) for i in range(n)]
            return node.outputs[0] if n == 1 else tuple(node.outputs)

        return make


def _to_value(v: Any) -> Optional[ValuePattern]:
    if v is None or isinstance(v, ValuePattern):
        return v
    if isinstance(v, (int, float, bool, np.ndarray, np.number, list)):
        return ConstPattern(np.asarray(v))
    raise TypeError(f"pattern input must be a pattern value, a number or an array, got {type(v).__name__}")


class Pattern:
    """A pattern DAG built once from a function; outputs are the values the replacement substitutes."""

    def __init__(self, fn: Callable[..., Any], variables: Optional[Sequence[str]] = None):
        """`variables`: the names of the pattern's inputs for a generated `fn(op, *values)` (default: the
        parameters of `fn` after `op`)."""
        self.fn = fn
        if variables is None:
            params = list(inspect.signature(fn).parameters)
            if not params or params[0] != "op":
                raise TypeError(f"pattern function {fn.__name__} must take `op` as its first argument")
            variables = params[1:]
        self.var_names = list(variables)
        out = fn(OpPattern(), *[Var(n) for n in self.var_names])
        outs: Sequence[Any] = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if not isinstance(o, NodeOutput):
                raise TypeError(f"pattern {fn.__name__} must return node outputs, got {o!r}")
        self.outputs: list[NodeOutput] = list(outs)
        self.nodes = self._collect()
        self.root = self.outputs[0].node
        self._check_connected()

    def _collect(self) -> list[NodePattern]:
        seen: dict[int, NodePattern] = {}
        stack = [o.node for o in self.outputs]
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen[id(n)] = n
            stack.extend(v.node for v in n.inputs if isinstance(v, NodeOutput))
        return list(seen.values())

    def _check_connected(self) -> None:
        """Every node must be reachable from the root's cone through shared inputs (the matcher binds the rest
        from consumers of values it has bound)."""
        reached = self.cone(self.root)
        pending = [n for n in self.nodes if id(n) not in reached]
        progress = True
        while pending and progress:
            progress = False
            for n in list(pending):
                if any(v is not None and (id(v) in reached) for v in n.inputs):
                    reached |= self.cone(n)
                    pending.remove(n)
                    progress = True
        if pending:
            raise TypeError(f"pattern {self.fn.__name__}: outputs {pending} share no input with the rest of the pattern")

    def cone(self, node: NodePattern) -> set[int]:
        """ids of pattern nodes and values reachable backwards from node."""
        out: set[int] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if id(n) in out:
                continue
            out.add(id(n))
            for o in n.outputs:
                out.add(id(o))
            for v in n.inputs:
                if v is not None:
                    out.add(id(v))
                    if isinstance(v, NodeOutput):
                        stack.append(v.node)
        return out
