"""What `preset: auto` tries, from what the model contains and whether calibration data was given.

Stage 0 are single compressions (each after cleanup); each later stage follows up what met the budget: the next
channel-pruning level, and each structural candidate composed with the best quantization (prune / factorize
first, then quantize, so the second calibrates on the first's output). The order is cheap to expensive, so a
`max_seconds` budget cuts the costly ones first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional

import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..algorithms.channels import find_groups
from ..algorithms.select import find_weight_layers
from ..passes import REGISTRY, Pass

Objective = Literal["latency", "size"]

#: channel-pruning levels: the search starts at CHANNEL_START, goes up after a level met the budget and down
#: after one missed it
CHANNEL_LEVELS = (0.15, 0.3, 0.5, 0.7)
CHANNEL_START = 1
#: low-rank parameter ratio tried (sensitivity allocation, speed-checked ranks)
LOWRANK_RATIO = 0.75
#: palettization bit widths (objective size): the search starts at PALETTE_START, goes down after a width met the
#: budget without back-off and up after one missed it (MiniLM-L3: 5 bits cosine 0.994 at 0.17x the file)
PALETTE_BITS = (8, 6, 5, 4, 3)
PALETTE_START = 2


@dataclass(frozen=True)
class ModelFacts:
    """What the candidates depend on: weight layers by kind, embedding tables, prunable channel groups."""

    matmul_layers: int
    conv_layers: int
    embedding_tables: int
    channel_groups: int
    attention_blocks: int

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass(frozen=True)
class Candidate:
    """One recipe to measure: its name (for the report), passes, and its kind (what follow-ups build on)."""

    name: str
    passes: tuple[Pass, ...]
    kind: Literal["lossless", "quantize", "structure", "composed"] = "quantize"
    # passes (by index) whose layers the budget may leave uncompressed; structural passes are not backed off
    # (a costly re-run per round): a lower level is tried instead
    backoff: tuple[int, ...] = ()


class Outcome(NamedTuple):
    """What a candidate gave, as the follow-ups need it."""

    candidate: Candidate
    passes: tuple[Pass, ...]  # as really applied (after back-off)
    met: bool
    backed_off: bool  # the budget was met only by leaving layers uncompressed
    size_ratio: float


def model_facts(proto: onnx.ModelProto) -> ModelFacts:
    """Count what the passes could act on (no change to the model)."""
    model = ir.Model.from_proto(proto)
    layers = find_weight_layers(model, ops=("MatMul", "Gemm", "Conv"))
    tables = [n for n in model.graph.nodes if n.op == "Gather" and n.inputs and isinstance(n.inputs[0], gs.Constant)]
    try:
        groups, _ = find_groups(model, heads=True)
    except Exception:  # a graph the channel analysis cannot read simply offers no groups to the search
        groups = []
    return ModelFacts(matmul_layers=sum(lay.op != "Conv" for lay in layers),
                      conv_layers=sum(lay.op == "Conv" for lay in layers), embedding_tables=len(tables),
                      channel_groups=sum(g.attention is None for g in groups),
                      attention_blocks=sum(g.attention is not None for g in groups))


def _p(kind: str, **opts) -> Pass:
    return REGISTRY[kind](**opts)


def candidates(facts: ModelFacts, objective: Objective, has_data: bool) -> list[Candidate]:
    """Stage 0: lossless, the quantize modes that apply, the first structural levels (with data)."""
    clean = (_p("cleanup"),)
    out = [Candidate("lossless", clean, kind="lossless")]
    if facts.matmul_layers:
        out.append(Candidate("int8-dynamic", clean + (_p("quantize", mode="dynamic"),), backoff=(1,)))
    if objective == "latency" and has_data and facts.matmul_layers:
        # with data, dynamic runs SmoothQuant by default: more accurate but its Muls cost time (MiniLM-L3 0.43x
        # instead of 0.40x fp32), so the fastest within a loose budget may be the plain one
        out.append(Candidate("int8-dynamic-unsmoothed", clean + (_p("quantize", mode="dynamic", smoothquant=None),),
                             backoff=(1,)))
    if has_data and (facts.matmul_layers or facts.conv_layers):
        out.append(Candidate("int8-static", clean + (_p("quantize", mode="static"),), backoff=(1,)))
    if objective == "size" and facts.matmul_layers:
        out.append(Candidate("int4-weights", clean + (_p("quantize", mode="weight_only", weight_dtype="int4",
                                                          block_size=32),), backoff=(1,)))
    if objective == "size" and (facts.matmul_layers or facts.conv_layers or facts.embedding_tables):
        out.append(_palette(PALETTE_BITS[PALETTE_START], clean))
    if has_data and facts.channel_groups:
        level = CHANNEL_LEVELS[CHANNEL_START]
        out.append(Candidate(f"channel-{level}", clean + (_channel(level),), kind="structure"))
    if has_data and facts.matmul_layers:
        out.append(Candidate(f"lowrank-{LOWRANK_RATIO}", clean + (_p("lowrank", params_ratio=LOWRANK_RATIO),),
                             kind="structure"))
    return out


def _channel(level: float) -> Pass:
    return _p("sparsify", pattern="channel", sparsity=level)


def _ladder_steps(by_name: dict[str, Outcome], prefix: str, ladder: tuple) -> list[tuple[Outcome, Any]]:
    """(outcome, next level) for each level of `ladder` that ran as `<prefix>-<level>`: one step further along the
    ladder after it met the budget without back-off, one step back after it missed."""
    out = []
    for i, level in enumerate(ladder):
        o = by_name.get(f"{prefix}-{level}")
        if o is None:
            continue
        j = i + 1 if o.met and not o.backed_off else i - 1 if not o.met else None
        if j is not None and 0 <= j < len(ladder):
            out.append((o, ladder[j]))
    return out


def _palette(bits: int, before: tuple[Pass, ...]) -> Candidate:
    return Candidate(f"palettize-{bits}", before + (_p("palettize", bits=bits),), backoff=(len(before),))


def followups(done: list[Outcome], best_quantize: Optional[Candidate]) -> list[Candidate]:
    """The next stage, from what ran so far: the next channel level (and palettization width) after each one that
    met the budget without back-off (one that needed it would need more), and each structural candidate that met
    the budget and still changed the model, followed by `best_quantize` (the quantization that met the budget and
    beat the input on the objective)."""
    by_name = {o.candidate.name: o for o in done}
    out = [Candidate(f"channel-{lv}", o.passes[:-1] + (_channel(lv),), kind="structure")
           for o, lv in _ladder_steps(by_name, "channel", CHANNEL_LEVELS)]
    out += [_palette(bits, o.candidate.passes[:-1]) for o, bits in _ladder_steps(by_name, "palettize", PALETTE_BITS)]
    if best_quantize is not None:
        q = best_quantize.passes[-1]
        for o in by_name.values():
            if o.met and o.candidate.kind == "structure" and o.size_ratio < 0.99:
                out.append(Candidate(f"{o.candidate.name}+{best_quantize.name}", o.passes + (q,), kind="composed",
                                     backoff=(len(o.passes),)))
    return out
