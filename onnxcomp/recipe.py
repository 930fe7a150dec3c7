"""Recipes: a list of pass specs plus an optional accuracy budget and a target; round-trips to YAML/JSON.

Parsing is strict: unknown keys or values raise RecipeError naming the key and listing the valid ones.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from .errors import RecipeError
from .passes import REGISTRY, Pass
from .targets import TARGETS
from .validation.numerics import OutputError

_TOP_KEYS = ("passes", "accuracy_budget", "target")
_BUDGET_KEYS = ("cosine", "max_abs_err", "rel_l2_err")


@dataclass(frozen=True)
class AccuracyBudget:
    """Every validated output must meet every bound given (cosine >=, errors <=)."""

    cosine: Optional[float] = None
    max_abs_err: Optional[float] = None
    rel_l2_err: Optional[float] = None

    def violations(self, outputs: Mapping[str, OutputError]) -> list[str]:
        """Human-readable list of (output, metric) pairs outside the budget (NaN never meets a bound)."""
        out = []
        for name, m in outputs.items():
            if self.cosine is not None and not (m.cosine >= self.cosine):
                out.append(f"{name}: cosine {m.cosine:.6f} < {self.cosine}")
            if self.max_abs_err is not None and not (m.max_abs_err <= self.max_abs_err):
                out.append(f"{name}: max_abs_err {m.max_abs_err:.3g} > {self.max_abs_err}")
            if self.rel_l2_err is not None and not (m.rel_l2_err <= self.rel_l2_err):
                out.append(f"{name}: rel_l2_err {m.rel_l2_err:.3g} > {self.rel_l2_err}")
        return out

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in _BUDGET_KEYS if getattr(self, k) is not None}


@dataclass(frozen=True)
class Recipe:
    """What to do to a model: passes in order, an optional accuracy budget, the deployment target."""

    passes: tuple[Pass, ...] = field(default_factory=tuple)
    accuracy_budget: Optional[AccuracyBudget] = None
    target: str = "ort-cpu"

    @classmethod
    def default(cls) -> "Recipe":
        """The recipe used when none is given: cleanup, then dynamic int8 quantization (no calibration data
        needed; measured on MiniLM-L3: ~0.5x latency, 0.25x size, embedding cosine 0.998)."""
        return cls(passes=(REGISTRY["cleanup"](), REGISTRY["quantize"](mode="dynamic")))

    @classmethod
    def parse(cls, src: Union["Recipe", dict, list, str, os.PathLike, None]) -> "Recipe":
        """Accept a Recipe, a dict, a list of pass dicts, or a path to a .yaml/.yml/.json file."""
        if src is None:
            return cls.default()
        if isinstance(src, Recipe):
            return src
        where = "recipe"
        if isinstance(src, (str, os.PathLike)):
            path = Path(os.fspath(src))
            where = str(path)
            if path.suffix.lower() not in (".yaml", ".yml", ".json"):
                raise RecipeError(f"recipe file must end in .yaml, .yml or .json: {path}")
            if not path.is_file():
                raise RecipeError(f"recipe file not found: {path}")
            try:
                text = path.read_text()
                src = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
                raise RecipeError(f"{path}: cannot parse recipe: {e}") from None
        if isinstance(src, list):
            src = {"passes": src}
        if not isinstance(src, dict):
            raise RecipeError(f"{where}: a recipe is a mapping with keys {list(_TOP_KEYS)} or a list of passes, "
                              f"got {type(src).__name__}")
        unknown = sorted(set(src) - set(_TOP_KEYS))
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {unknown}; valid keys: {list(_TOP_KEYS)}")
        passes_src = src.get("passes") or []
        if not isinstance(passes_src, list):
            raise RecipeError(f"{where}.passes: expected a list of passes")
        passes = tuple(_parse_pass(p, f"{where}.passes[{i}]") for i, p in enumerate(passes_src))
        target = src.get("target", "ort-cpu")
        if target not in TARGETS:
            raise RecipeError(f"{where}.target: unknown target {target!r}; valid values: {list(TARGETS)}")
        budget = _parse_budget(src.get("accuracy_budget"), f"{where}.accuracy_budget")
        return cls(passes=passes, accuracy_budget=budget, target=target)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"passes": [_plain(p.to_dict()) for p in self.passes], "target": self.target}
        if self.accuracy_budget is not None:
            d["accuracy_budget"] = self.accuracy_budget.to_dict()
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _parse_pass(p: Any, where: str) -> Pass:
    if isinstance(p, str):
        p = {"type": p}
    if not isinstance(p, dict):
        raise RecipeError(f"{where}: a pass is a mapping with a 'type' key, got {p!r}")
    if "type" not in p:
        raise RecipeError(f"{where}: missing 'type'; valid types: {sorted(REGISTRY)}")
    kind = p["type"]
    if kind not in REGISTRY:
        raise RecipeError(f"{where}: unknown pass type {kind!r}; valid types: {sorted(REGISTRY)}")
    opts = {k: v for k, v in p.items() if k != "type"}
    return build_pass(REGISTRY[kind], opts, where)


def build_pass(cls: type[Pass], opts: dict[str, Any], where: str) -> Pass:
    """The pass `cls` from a recipe dict; unknown keys and ill-typed values are RecipeErrors naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(opts) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown} for pass '{cls.name}'; valid keys: "
                          f"{sorted(fields) or '(none)'}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}") for k, v in opts.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from None

def _coerce(v: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return v
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if v is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(v, a, where)
            except RecipeError as e:
                errs.append(str(e))
        raise RecipeError(errs[0] if errs else f"{where}: invalid value {v!r}")
    if origin is typing.Literal:
        if v not in args:
            raise RecipeError(f"{where}: invalid value {v!r}; valid values: {list(args)}")
        return v
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {v!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(x, inner, where) for x in v)
    if hint is bool:
        if not isinstance(v, bool):
            raise RecipeError(f"{where}: expected true/false, got {v!r}")
        return v
    if hint is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise RecipeError(f"{where}: expected an integer, got {v!r}")
        return v
    if hint is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if hint is str:
        if not isinstance(v, str):
            raise RecipeError(f"{where}: expected a string, got {v!r}")
        return v
    return v



def _parse_budget(b: Any, where: str) -> Optional[AccuracyBudget]:
    if b is None:
        return None
    if not isinstance(b, dict):
        raise RecipeError(f"{where}: expected a mapping with keys {list(_BUDGET_KEYS)}")
    unknown = sorted(set(b) - set(_BUDGET_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; valid keys: {list(_BUDGET_KEYS)}")
    vals = {}
    for k, v in b.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecipeError(f"{where}.{k}: expected a number, got {v!r}")
        vals[k] = float(v)
    if "cosine" in vals and not -1.0 <= vals["cosine"] <= 1.0:
        raise RecipeError(f"{where}.cosine: must be in [-1, 1], got {vals['cosine']}")
    return AccuracyBudget(**vals)
