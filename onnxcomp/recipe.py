"""Recipes: a list of pass specs (or `preset: auto`, a search) plus an accuracy budget and a target; round-trip to
YAML/JSON. Shipped presets (`fast`, `small`, `int8`, ...) are recipe files in `onnxcomp/presets/`.

Parsing is strict: unknown keys or values raise RecipeError naming the key and listing the valid ones.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Union

import yaml

from .errors import RecipeError
from .passes import REGISTRY, Pass
from .targets import TARGETS
from .validation.numerics import OutputError

_TOP_KEYS = ("passes", "preset", "objective", "accuracy_budget", "max_seconds", "executor", "ray_address", "target")
_AUTO_KEYS = ("objective", "max_seconds", "executor", "ray_address")
_BUDGET_KEYS = ("cosine", "max_abs_err", "rel_l2_err")
#: the shipped presets: one recipe file each, its first line a `# description`
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
#: default time budget of an auto search (seconds)
DEFAULT_MAX_SECONDS = 600.0

#: a task metric on the validation samples: (reference outputs, candidate outputs) -> score, higher is better;
#: each maps an output name to the list of that output's arrays over the samples
Metric = Callable[[dict[str, list], dict[str, list]], float]


@dataclass(frozen=True)
class AccuracyBudget:
    """Every validated output must meet every bound given (cosine >=, errors <=)."""

    cosine: Optional[float] = None
    max_abs_err: Optional[float] = None
    rel_l2_err: Optional[float] = None
    metric: Optional[Metric] = None  # a task metric (Python only), which must reach `metric_min`
    metric_min: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.metric is None) != (self.metric_min is None):
            raise RecipeError("accuracy_budget: 'metric' (a callable) and 'min' go together")
        if self.metric is not None and not callable(self.metric):
            raise RecipeError(f"accuracy_budget.metric: expected a callable(ref_outputs, cand_outputs) -> float, "
                              f"got {type(self.metric).__name__}")

    def violations(self, outputs: Mapping[str, OutputError], metric_value: Optional[float] = None) -> list[str]:
        """Human-readable list of (output, metric) pairs outside the budget (NaN never meets a bound);
        `metric_value` is the task metric measured on the validation samples (when the budget has one)."""
        out = []
        if self.metric is not None and not (metric_value is not None and metric_value >= self.metric_min):
            got = "not measured" if metric_value is None else f"{metric_value:.6f}"
            out.append(f"metric {self.metric_name}: {got} < {self.metric_min}")
        for name, m in outputs.items():
            if self.cosine is not None and not (m.cosine >= self.cosine):
                out.append(f"{name}: cosine {m.cosine:.6f} < {self.cosine}")
            if self.max_abs_err is not None and not (m.max_abs_err <= self.max_abs_err):
                out.append(f"{name}: max_abs_err {m.max_abs_err:.3g} > {self.max_abs_err}")
            if self.rel_l2_err is not None and not (m.rel_l2_err <= self.rel_l2_err):
                out.append(f"{name}: rel_l2_err {m.rel_l2_err:.3g} > {self.rel_l2_err}")
        return out

    @property
    def metric_name(self) -> str:
        return getattr(self.metric, "__name__", type(self.metric).__name__)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (a metric is named, not serialized: it can only be given in Python)."""
        d: dict[str, Any] = {k: getattr(self, k) for k in _BUDGET_KEYS if getattr(self, k) is not None}
        if self.metric is not None:
            d.update(metric=self.metric_name, min=self.metric_min)
        return d


#: the budget `preset: auto` uses when the recipe gives none
DEFAULT_AUTO_BUDGET = AccuracyBudget(cosine=0.99)


@dataclass(frozen=True)
class AutoSearch:
    """`preset: auto`: search compositions of passes by measurement for the best model on `objective` that
    meets the accuracy budget, within `max_seconds`, evaluating candidates on `executor`."""

    objective: Literal["latency", "size"] = "latency"
    max_seconds: float = DEFAULT_MAX_SECONDS
    executor: Literal["local", "ray"] = "local"
    ray_address: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        d = {"preset": "auto", "objective": self.objective, "max_seconds": self.max_seconds,
             "executor": self.executor}
        if self.ray_address:
            d["ray_address"] = self.ray_address
        return d


@dataclass(frozen=True)
class Recipe:
    """What to do to a model: passes in order, an optional accuracy budget, the deployment target."""

    passes: tuple[Pass, ...] = field(default_factory=tuple)
    accuracy_budget: Optional[AccuracyBudget] = None
    target: str = "ort-cpu"
    auto: Optional[AutoSearch] = None  # `preset: auto`: search instead of `passes`

    def resolved(self, has_data: bool) -> "Recipe":
        """The same recipe with each pass's data-dependent defaults made concrete (what the report records and
        `result.recipe` replays)."""
        return dataclasses.replace(self, passes=tuple(p.resolve(has_data) for p in self.passes))

    @classmethod
    def default(cls) -> "Recipe":
        """The recipe used when none is given: cleanup, then dynamic int8 quantization (no calibration data
        needed; measured on MiniLM-L3: ~0.5x latency, 0.25x size, embedding cosine 0.998)."""
        return cls(passes=(REGISTRY["cleanup"](), REGISTRY["quantize"](mode="dynamic")))

    @classmethod
    def parse(cls, src: Union["Recipe", dict, list, str, os.PathLike, None]) -> "Recipe":
        """Accept a Recipe, a dict, a list of pass dicts, a shipped preset's name, or a path to a .yaml/.yml/.json
        file."""
        if src is None:
            return cls.default()
        if isinstance(src, Recipe):
            return src
        where = "recipe"
        if isinstance(src, str) and src in presets():
            where, src = f"preset '{src}'", str(PRESETS_DIR / f"{src}.yaml")
        if isinstance(src, (str, os.PathLike)):
            path = Path(os.fspath(src))
            where = str(path)
            if path.suffix.lower() not in (".yaml", ".yml", ".json"):
                raise RecipeError(f"recipe file must end in .yaml, .yml or .json (or name a preset: "
                                  f"{', '.join(presets())}): {path}")
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
        auto = _parse_auto(src, passes, where)
        if auto is not None and budget is None:
            budget = DEFAULT_AUTO_BUDGET
        return cls(passes=passes, accuracy_budget=budget, target=target, auto=auto)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = self.auto.to_dict() if self.auto is not None else {}
        if self.auto is None or self.passes:
            d["passes"] = [_plain(p.to_dict()) for p in self.passes]
        d["target"] = self.target
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
    return build_options(cls, opts, where)


def build_options(cls: type, opts: dict[str, Any], where: str) -> Any:
    """A frozen options dataclass `cls` from a dict of known keys, each value coerced to its field's type."""
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



def presets() -> dict[str, str]:
    """The shipped presets: name -> one-line description (the first `# ` line of its file)."""
    out = {}
    for f in sorted(PRESETS_DIR.glob("*.yaml")):
        first = f.read_text().splitlines()[0] if f.stat().st_size else ""
        out[f.stem] = first.lstrip("# ").strip()
    return out


def _parse_auto(src: dict, passes: tuple[Pass, ...], where: str) -> Optional[AutoSearch]:
    """The `preset: auto` search options; the search keys without `preset: auto` are errors."""
    preset = src.get("preset")
    given = [k for k in _AUTO_KEYS if k in src]
    if preset is None:
        if given:
            raise RecipeError(f"{where}: key(s) {given} belong to 'preset: auto'")
        return None
    if preset != "auto":
        raise RecipeError(f"{where}.preset: invalid value {preset!r}; valid values: ['auto'] (named presets are "
                          f"passed as the recipe itself: {', '.join(presets())})")
    if passes:
        raise RecipeError(f"{where}: a recipe has 'passes' or 'preset: auto', not both")
    opts = {k: src[k] for k in given}
    auto = build_options(AutoSearch, opts, where)
    if auto.max_seconds <= 0:
        raise RecipeError(f"{where}.max_seconds: must be > 0, got {auto.max_seconds}")
    return auto


_BUDGET_INPUT_KEYS = _BUDGET_KEYS + ("metric", "min")


def _parse_budget(b: Any, where: str) -> Optional[AccuracyBudget]:
    if b is None:
        return None
    if isinstance(b, AccuracyBudget):
        return b
    if not isinstance(b, dict):
        raise RecipeError(f"{where}: expected a mapping with keys {list(_BUDGET_INPUT_KEYS)}")
    unknown = sorted(set(b) - set(_BUDGET_INPUT_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; valid keys: {list(_BUDGET_INPUT_KEYS)}")
    b = dict(b)
    metric, metric_min = b.pop("metric", None), b.pop("min", None)
    if metric is not None and not callable(metric):
        raise RecipeError(f"{where}.metric: a task metric is a Python callable(ref_outputs, cand_outputs) -> float "
                          f"(given to compress() in the recipe dict), got {metric!r}")
    if metric_min is not None and (isinstance(metric_min, bool) or not isinstance(metric_min, (int, float))):
        raise RecipeError(f"{where}.min: expected a number, got {metric_min!r}")
    vals: dict[str, Any] = {}
    if metric is not None or metric_min is not None:
        vals.update(metric=metric, metric_min=None if metric_min is None else float(metric_min))
    for k, v in b.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecipeError(f"{where}.{k}: expected a number, got {v!r}")
        vals[k] = float(v)
    if "cosine" in vals and not -1.0 <= vals["cosine"] <= 1.0:
        raise RecipeError(f"{where}.cosine: must be in [-1, 1], got {vals['cosine']}")
    if not vals:
        raise RecipeError(f"{where}: give at least one bound: {list(_BUDGET_INPUT_KEYS)}")
    return AccuracyBudget(**vals)
