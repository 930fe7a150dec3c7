"""`quantize`: integer quantization placed where the target runtime actually runs faster.

Modes (all as rewrite rules on the engine; placement from the target's table in targets.py):
- weight_only: weights stored int8 per channel and dequantized by a DequantizeLinear that ORT fuses into
  the consumer (MatMul/Gemm/Conv); embedding tables (Gather) stored int8 row-wise and dequantized after
  the lookup. Needs no calibration data.
- dynamic: MatMul (+ its bias Add) -> ORT's DynamicQuantizeMatMul (activations quantized at run time).
- static: Q/DQ on activations from calibrated ranges + per-channel weights. MatMul/Gemm get their
  *inputs* quantized (fused into MatMulIntegerToFloat, output stays float: the accurate choice in tools/bench_quantize.py); Conv gets
  inputs, an int32 bias and its output (after a following Relu) quantized so ORT fuses QLinearConv.
One Q/DQ pair per activation tensor is shared by all its quantized consumers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir, qmath
from ..errors import CalibrationDataError, RecipeError
from ..rewrite import Plan, RewriteRule, apply_rules, fail, find_matches, query
from ..runtime import observable_tensors
from ..rewrite.rule import onnx_dtype
from ..rewrite.rules import fold_constant_mul_chain_rule
from ..targets import TARGETS, OpPlacement, Target
from ..algorithms import awq, bias, equalize as cle, gptq
from ..algorithms.unfold import unfold_conv
from ..algorithms.select import embedding_pattern, embedding_problem, is_excluded, weight_problem
from .base import LayerChange, PassContext, PassOutcome, WeightPass

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
#: algorithm auto keeps an input's AWQ scales only where they remove at least this fraction of its weights'
#: output error (each scaled input costs a Mul at run time unless it folds into a constant Mul before it)
AWQ_MIN_GAIN = 0.05


@dataclass
class _Plan:
    """What the pass decided before rewriting: tensors to calibrate and their quantization parameters."""

    activations: set
    params: dict  # tensor name -> (scale float32, zero point array)
    ranges: dict  # tensor name -> (lo, hi)
    calibrated: bool = False  # False while planning: rules accept any float activation


@dataclass(frozen=True)
class Quantize(WeightPass):
    """Insert integer quantization (static QDQ, dynamic, or weight-only) where the target has fast kernels."""

    name: ClassVar[str] = "quantize"
    slower_hint: ClassVar[str] = ("the integer kernels do not pay off for this model/target: try another quantize "
                                  "mode, or raise quantize.min_weight_elements")
    mode: Literal["static", "dynamic", "weight_only", "auto"] = "static"  # auto: static with data, else dynamic
    weight_dtype: Literal["int8", "uint8", "int4", "uint4"] = "int8"
    activation_dtype: Optional[Literal["uint8", "int8", "int16"]] = None  # default: the target's
    symmetric_activations: Optional[bool] = None  # default: the target's
    # default: symmetric for 8-bit weights (what the integer kernels take), asymmetric (a zero point per block)
    # for 4-bit ones: MiniLM-L3 int4 weight-only cosine 0.9878 -> 0.9900 (tools/bench_quantize.py)
    symmetric_weights: Optional[bool] = None
    # 7-bit weights for the integer kernels (static/dynamic with uint8 activations); default: the target's
    reduce_range: Optional[bool] = None
    per_channel: bool = True
    block_size: Optional[int] = None
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    percentile: float = 99.999
    calibration_samples: int = 256
    # how MatMul/Gemm weights are rounded (every mode): rtn rounds each weight to its nearest level; gptq rounds
    # column by column and spreads the error over the columns left (needs calibration data: the inputs' second
    # moment); auto takes, per layer, the one with the smaller output error on calibration data (rtn without
    # calibration data).
    # awq (4-bit weight_only, needs calibration data): activation-aware input-channel scales first
    # (algorithms/awq.py), then nearest rounding; auto also tries AWQ's scales there and keeps them where they
    # lower the layers' output error
    algorithm: Literal["rtn", "gptq", "awq", "auto"] = "auto"
    # fraction of mean(diag H) added to H's diagonal before inverting it; 0.1 rather than GPTQ's usual 0.01: with
    # the few thousand calibration tokens a user has, H is nearly singular (MiniLM-L3 int4, 64 sentences:
    # cosine 0.9900 at 0.01, 0.9921 at 0.1, 0.9922 at 0.3)
    gptq_damping: float = 0.1
    # ops: default every op the target table lists; exclude: node/tensor names or regexes left in float
    embeddings: bool = True  # also store embedding (Gather) tables quantized
    embedding_bits: Optional[Literal[4, 8]] = None  # default: 4 with 4-bit weights (ORT GatherBlockQuantized), else 8
    sensitivity: bool = True  # report the per-layer error of quantized vs float activations
    # static: SmoothQuant-style migration of activation outliers into the MatMul weights, x W = (x/s)(s W),
    # with s_j = max|x_j|^a / max|W_j|^(1-a); a number is a, "auto" searches a per model on calibration data
    smoothquant: Optional[Union[float, Literal["auto"]]] = "auto"
    # cross-layer equalization of producer -> ReLU/pool -> consumer pairs (exact in float, algorithms/equalize.py):
    # true / false; unset: with calibration data, kept when the quantized outputs depart less from the float ones
    # on it (tools/bench_algorithms.py, held-out logit error: it helps under nearest rounding, digits MLP 4-bit
    # 0.0417 -> 0.0367, and is within noise once GPTQ and bias correction run)
    equalize: Optional[bool] = None
    # bias correction (with calibration data): each quantized layer with a bias gets b - (W_q - W)^T E[x], the
    # mean its rounded weights shift the output by on calibration data (NNCF/Quark's bias correction)
    bias_correction: bool = True
    # dynamic/weight_only MatMul/Gemm: smaller weights are left in float (measured on ORT CPU: a 64x128
    # Gemm at batch 1 runs slower as DynamicQuantizeMatMul than in float; 384x384 runs ~2x faster)
    min_weight_elements: int = 16384
    # static: per-activation-tensor settings, e.g. {"x": {"range": [-1, 6]}} or {"x": {"calibration": "mse"}}
    overrides: Any = None

    def resolve(self, has_data: bool) -> "Quantize":
        if self.mode != "auto":
            return self
        return dataclasses.replace(self, mode="static" if has_data else "dynamic")

    def __post_init__(self) -> None:
        if self.weight_dtype in ("int4", "uint4"):
            if self.mode != "weight_only":
                raise RecipeError(f"quantize: weight_dtype {self.weight_dtype!r} is for mode 'weight_only' "
                                  f"(4-bit blocked MatMul weights), not {self.mode!r}")
            if self.block_size is None or self.block_size < 16 or self.block_size & (self.block_size - 1):
                raise RecipeError("quantize: 4-bit weights need block_size, a power of two >= 16 (e.g. 32), "
                                  f"got {self.block_size!r}")
        elif self.block_size is not None:
            raise RecipeError("quantize: block_size applies to 4-bit weights (weight_dtype int4/uint4)")
        if not 0 < self.gptq_damping < 1:
            raise RecipeError(f"quantize.gptq_damping must be in (0, 1), got {self.gptq_damping}")
        if not 0 < self.percentile <= 100:
            raise RecipeError(f"quantize.percentile must be in (0, 100], got {self.percentile}")
        over = {} if self.overrides is None else self.overrides
        if not isinstance(over, dict) or not all(isinstance(v, dict) for v in over.values()):
            raise RecipeError("quantize.overrides: expected {tensor name: {range: [lo, hi]} | {calibration: method}}")
        for name, o in over.items():
            bad = sorted(set(o) - {"range", "calibration", "percentile"})
            if bad:
                raise RecipeError(f"quantize.overrides[{name!r}]: unknown key(s) {bad}; valid: "
                                  "['calibration', 'percentile', 'range']")
            if "range" in o and (not isinstance(o["range"], (list, tuple)) or len(o["range"]) != 2
                                 or not o["range"][0] <= 0 <= o["range"][1]):
                raise RecipeError(f"quantize.overrides[{name!r}].range must be [lo, hi] with lo <= 0 <= hi")
            if o.get("calibration", "minmax") not in ("minmax", "percentile", "entropy", "mse"):
                raise RecipeError(f"quantize.overrides[{name!r}].calibration: unknown method {o['calibration']!r}")
        object.__setattr__(self, "overrides", over)  # normalise None -> {} (frozen dataclass, at construction)
        if self.symmetric_weights is None:
            object.__setattr__(self, "symmetric_weights", self.weight_dtype not in ("int4", "uint4"))
        super().__post_init__()

    def min_opset(self) -> Optional[int]:
        # per-channel DequantizeLinear (axis) needs opset 13; 4-bit per-channel Conv weights (int4/uint4
        # DequantizeLinear, which ORT's CPU EP runs) need 21
        if self.weight_dtype in ("int4", "uint4") and {"Conv", "ConvTranspose"} & set(self.ops or ()):
            return 21
        return 13

    @classmethod
    def summarize(cls, details: dict[str, Any]) -> list[str]:
        lines = []
        sens = details.get("sensitivity") or []
        if sens:
            worst = ", ".join(f"{r['node'] or r['tensor']} (rel err {r['introduced']:.3g})" for r in sens[:3])
            lines.append(f"most sensitive layers: {worst}")
        if details.get("quantized"):
            lines.append(f"quantized: {details['quantized']}; left in float: {details.get('left_float_total', 0)} "
                         "node(s) (reasons in the JSON/HTML report)")
        return lines

    # ------------------------------------------------------------------------------------------
    def run(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext) -> PassOutcome:
        target = TARGETS[ctx.target]
        notes: list[str] = []
        details: dict[str, Any] = {"mode": self.mode, "target": target.name, "weight_dtype": self.weight_dtype}
        tables: dict[str, tuple] = {}  # quantized embedding tables, shared by the smoothquant trials and the result
        source = self._equalize(model, source, ctx, target, notes, details, tables)
        if self.mode == "static" and self.smoothquant is not None:
            self._smooth(model, source, ctx, target, notes, details, tables)
        if self._awq_applies(ctx):
            self._awq(model, source, ctx, notes, details)
        float_model = model.to_proto() if ctx.accuracy_budget and ctx.calibration_data and self.sensitivity else None
        out = self._quantize(model, source, ctx, target, notes, details,
                             reference=source if self.sensitivity else None, tables=tables)
        errors = {r["node"]: r.get("introduced", r["rel_l2_err"]) for r in details.get("sensitivity", [])
                  if r.get("node")}
        if float_model is not None and errors:
            errors = self._end_to_end(float_model, source, ctx, target, tables, sorted(errors))
            details["end_to_end_gain"] = dict(sorted(errors.items(), key=lambda kv: -kv[1]))
        out.layers = [LayerChange(n, e) for n, e in errors.items()]
        return out

    def _end_to_end(self, float_model: onnx.ModelProto, source: onnx.ModelProto, ctx: PassContext, target: Target,
                    tables: dict, layers: list[str]) -> dict[str, float]:
        """Per quantized layer: how much the model's output error on calibration data drops when that layer alone
        stays float (trials with nearest rounding, from `float_model`: the float model as this pass rewrites it,
        smoothed). What an accuracy budget leaves float first: the layers' own output errors misrank them
        (MiniLM-L3: the embedding tables introduce the largest, and keeping them float moved cosine by 2e-5)."""
        ref, feeds = self._trial_reference(source, ctx)
        shaped = ir.shape_inferred(float_model)
        full = self._trial_error(ir.Model.from_proto(float_model, inferred=shaped), source, ctx, target, tables,
                                 ref, feeds)
        gains = {}
        counter = ctx.counter("quantize: layer sensitivity", len(layers))
        for node in layers:
            one = dataclasses.replace(self, exclude=tuple(self.exclude or ()) + (node,), sensitivity=False)
            err = one._trial_error(ir.Model.from_proto(float_model, inferred=shaped), source, ctx, target, tables,
                                   ref, feeds)
            gains[node] = max(0.0, full - err)
            counter.tick()
        return gains

    def _quantize(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext, target: Target,
                  notes: list[str], details: dict[str, Any], reference: Optional[onnx.ModelProto],
                  tables: Optional[dict] = None, trial: bool = False) -> PassOutcome:
        """Plan (find where rules apply), calibrate for static mode (`source` is the float model `model` was
        imported from, before any smoothing), rewrite, report; with a float `reference`, also measure each
        quantized layer's error against it (sensitivity). `tables` caches quantized embedding tables; a `trial`
        (a smoothquant alpha being scored) rounds its weights to nearest."""
        run = self._new_run(target, details, tables)
        rules = self._rules(run, target)
        rejections: dict[str, str] = {}
        found = find_matches(model, rules, rejections=rejections)
        observable = _main_graph_tensors(model.graph)  # what ORT can be asked for as an extra output
        layer_node = {f.match.outputs[0].name: f.match.bindings["node"].name for f in found
                      if isinstance(f.match.bindings.get("node"), gs.Node)}
        layer_outputs = sorted(set(layer_node) & observable)  # output names survive the rewrite
        layer_input = {f.match.outputs[0].name: _unsmoothed(f.match.bindings["x"]).name for f in found
                       if isinstance(f.match.bindings.get("x"), gs.Tensor)}
        run.algorithm = "rtn" if trial else self._algorithm(ctx)
        if not trial and (run.algorithm != "rtn" or self.bias_correction) and ctx.calibration_data:
            grams, run.means = self._input_moments(found, model, source, ctx)
            run.grams = grams if run.algorithm != "rtn" else {}
        details["algorithm"] = run.algorithm
        if self.mode == "static":
            self._plan_activations(run, found, observable, model, source, ctx, target, notes, details)
        left = self._left_float(model, target, rejections)
        stats, quantized = self._rewrite(model, rules, notes)
        if run.rounding:
            details["rounding"] = run.rounding_summary()
        if run.corrections:
            details["bias_correction"] = {"layers": len(run.corrections), "corrections": run.corrections[:500]}
        run.grams.clear()
        details.update({"rewrites": stats.to_dict(), "quantized": quantized,
                        "left_float": left[:500], "left_float_total": len(left)})
        if reference is not None and quantized:
            details["sensitivity"] = self._sensitivity(model, reference, layer_outputs, layer_input, ctx, notes)
            for row in details["sensitivity"]:
                row["node"] = layer_node.get(row["tensor"], "")
        return PassOutcome(details=details, notes=notes)

    def _new_run(self, target: Target, details: dict[str, Any], tables: Optional[dict]) -> "_Run":
        """The state of one quantization run: activation dtype/symmetry, 7-bit weights, static bias fusion."""
        run = _Run(self, _Plan(set(), {}, {}), tables)
        run.act_dtype = self.activation_dtype or target.activation_dtype
        run.act_sym = target.activation_symmetric if self.symmetric_activations is None else self.symmetric_activations
        run.reduce_range = (self.reduce_range if self.reduce_range is not None
                            else target.reduce_range and (self.mode == "dynamic" or run.act_dtype == "uint8"))
        run.fuse_bias = (self.mode == "static" and target.fuse_static_bias and run.act_dtype == "uint8"
                         and not run.act_sym)
        if run.reduce_range and self.mode != "weight_only":
            details["reduce_range"] = True
        return run

    def _plan_activations(self, run: "_Run", found: list, observable: set, model: ir.Model,
                          source: onnx.ModelProto, ctx: PassContext, target: Target, notes: list[str],
                          details: dict[str, Any]) -> None:
        """Static mode: the activations the rules will quantize, calibrated once (their ranges in the plan)."""
        plan = run.plan
        for f in found:
            plan.activations.update(t.name for t in _activation_tensors(f, target) if t.name in observable)
        if plan.activations:
            self._calibrate(plan, model, source, ctx, run.act_dtype, run.act_sym, notes)
        plan.calibrated = True
        details["activation_dtype"] = run.act_dtype
        details["calibration"] = self.calibration
        details["ranges"] = {k: [float(v[0]), float(v[1])] for k, v in sorted(plan.ranges.items())}

    def _left_float(self, model: ir.Model, target: Target, rejections: dict[str, str]) -> list[dict[str, str]]:
        """What stays float and why, from the graph before rewriting: ops the target keeps float, and nodes of
        quantized ops that no rule could take (with the engine's reason)."""
        ops = self._ops(target)
        left = []
        op_of = {}
        for g in ir.iter_graphs(model.graph):
            for n in g.nodes:
                op_of[n.name] = n.op
                if n.op in target.keep_float and n.op not in ops:
                    left.append({"node": n.name, "op": n.op, "reason": target.keep_float[n.op]})
        for name, reason in rejections.items():
            if op_of.get(name) in ops:
                left.append({"node": name, "op": op_of[name], "reason": reason})
        return left

    @staticmethod
    def _rewrite(model: ir.Model, rules: list[RewriteRule], notes: list[str]) -> tuple[Any, dict[str, int]]:
        """Apply the quantization rules, then drop DQ->Q round trips of equal parameters; (stats, per-rule
        counts of what was quantized)."""
        stats = apply_rules(model, rules)
        tidy = apply_rules(model, [RewriteRule("qdq-roundtrip", _dq_q_pattern, _passthrough_q, _same_qparams)])
        if tidy.applied:
            notes.append(f"{tidy.applied} redundant DequantizeLinear->QuantizeLinear pair(s) removed")
        quantized = {r.name: stats.rules[r.name].applied for r in rules if stats.rules[r.name].applied}
        return stats, quantized

    def _algorithm(self, ctx: PassContext) -> str:
        """The weight rounding this run uses: auto needs calibration data (rtn without), gptq insists on it."""
        if self.algorithm == "auto":
            return "auto" if ctx.calibration_data else "rtn"
        if self.algorithm in ("gptq", "awq") and not ctx.calibration_data:
            raise CalibrationDataError(f"quantize.algorithm {self.algorithm!r} needs calibration_data (the layer "
                                       "inputs' second moment); give calibration feeds, or use algorithm 'rtn'")
        return "rtn" if self.algorithm == "awq" else self.algorithm  # awq's scales are applied before; then rtn

    def _awq_applies(self, ctx: PassContext) -> bool:
        """AWQ scales are searched for 4-bit weight-only MatMuls with calibration data (algorithm awq or auto)."""
        four_bit_weights = self.mode == "weight_only" and self.weight_dtype in ("int4", "uint4")
        if self.algorithm == "awq":
            self._algorithm(ctx)  # a CalibrationDataError without data
            if not four_bit_weights:
                raise RecipeError("quantize.algorithm 'awq' scales 4-bit weight_only MatMuls (mode weight_only, "
                                  f"weight_dtype int4/uint4); got mode {self.mode!r}, weight_dtype "
                                  f"{self.weight_dtype!r}: use 'gptq' or 'auto' here")
        return self.algorithm in ("awq", "auto") and bool(ctx.calibration_data) and four_bit_weights

    def _awq(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext, notes: list[str],
             details: dict[str, Any]) -> None:
        """Activation-aware scales for each input of 4-bit MatMuls (algorithms/awq.py), applied exactly in float
        as x/s and diag(s) W where they lower the summed output error under the rounding used later (auto: by at
        least AWQ_MIN_GAIN; awq: any gain). Later steps see the scaled weights and the scaled input's moments."""
        have = _observable(source)
        groups: dict[str, list[np.ndarray]] = {}
        refused: set[str] = set()
        for f in find_matches(model, [query("awq-probe", _matmul_pattern, self._awq_ok)]):
            b = f.match.bindings
            x, w = b["x"], b["w"]
            if f.graph is not model.graph or x.name not in have or len(w.outputs) != 1:
                refused.add(x.name)
                continue
            groups.setdefault(x.name, []).append(np.asarray(ir.const_value(w), np.float32))
        groups = {k: v for k, v in groups.items() if k not in refused}
        if not groups:
            notes.append("awq: no 4-bit MatMul input to scale")
            return
        got = ctx.moments(source, self.calibration_feeds(ctx), {x: -1 for x in groups})
        counter = ctx.counter("quantize: awq scale search", len(groups))
        scales, rows = {}, []
        floor = AWQ_MIN_GAIN if self.algorithm == "auto" else 0.0
        for x, ws in groups.items():
            if x in got and got[x][0].shape[0] == ws[0].shape[0]:
                rows.append(self._awq_input(x, ws, got[x][0], floor, scales))
            counter.tick()
        n = _apply_smoothing(model, scales) if scales else 0
        details["awq"] = {"scaled_inputs": len(scales), "matmuls": n, "inputs": rows[:500]}
        notes.append(f"awq: {len(scales)} of {len(rows)} MatMul input(s) scaled ({n} MatMul(s)); "
                     f"mean output-error gain {np.mean([r['gain'] for r in rows]) if rows else 0:.1%}")

    def _awq_input(self, x: str, ws: list[np.ndarray], h: np.ndarray, floor: float,
                   scales: dict[str, np.ndarray]) -> dict[str, Any]:
        """The AWQ search for one input `x` read by the weights `ws` (input-major) with second moment `h`: its
        scale goes into `scales` when it helps by more than `floor` (auto: under GPTQ too); returns its row."""
        k = ws[0].shape[0]
        bs = _nbits_block(self.block_size, k)
        choice = awq.search_scale(ws, h, lambda wm, hs, bs=bs: _blocked_rtn(
            wm, np.diag(hs), bs, self.symmetric_weights))
        row = {"input": x, "weights": len(ws), "alpha": choice.alpha, "gain": choice.gain,
               "error_unscaled": choice.errors[0.0], "error": choice.errors[choice.alpha]}
        used = choice.alpha > 0 and choice.gain > floor
        if used and self.algorithm == "auto":  # auto rounds by GPTQ later: the scales must help there too
            wms = [awq.sample_rows(w) for w in ws]  # the rows the search scored
            gq = lambda wm, hs, bs=bs: _blocked_gptq(wm, hs, bs, self.symmetric_weights, self.gptq_damping)
            e0 = awq.scaled_error(wms, h, np.ones(k, np.float32), gq)
            e1 = awq.scaled_error(wms, h, choice.scale, gq)
            row.update(gptq_error_unscaled=e0, gptq_error=e1)
            used = e1 < (1.0 - floor) * e0
        if used:
            scales[x] = choice.scale
        return {**row, "used": used}

    def _input_moments(self, found, model: ir.Model, source: onnx.ModelProto, ctx: PassContext
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(E[x x^T], E[x]) of the input x of every matched main-graph MatMul/Gemm (vectors along the last axis)
        and Conv (along the channel axis), from one calibration run of the float `source`: GPTQ rounds MatMul/Gemm
        weights against E[x x^T]; bias correction uses E[x]. A SmoothQuant-scaled input x = u * c (c a constant
        vector) gets diag(c) E[u u^T] diag(c) and c E[u]."""
        have = _observable(source)
        wanted: dict[tuple[str, int], tuple[str, Optional[np.ndarray]]] = {}  # (x, axis) -> (tensor of source, c)
        for f in found:
            node, x = f.match.bindings.get("node"), f.match.bindings.get("x")
            if not (isinstance(node, gs.Node) and node.op in ("MatMul", "Gemm", "Conv") and isinstance(x, gs.Tensor)) \
                    or f.graph is not model.graph:
                continue
            axis = 1 if node.op == "Conv" else -1
            if x.name in have:
                wanted[(x.name, axis)] = (x.name, None)
                continue
            mul = x.inputs[0] if len(x.inputs) == 1 else None
            c = ir.const_value(mul.inputs[1]) if mul is not None and mul.op == "Mul" and len(mul.inputs) == 2 else None
            if c is not None and c.ndim == 1 and c.dtype == np.float32 and mul.inputs[0].name in have and axis == -1:
                wanted[(x.name, axis)] = (mul.inputs[0].name, c.astype(np.float64))
        axes = {u: ax for (_, ax), (u, _) in wanted.items()}
        got = ctx.moments(source, self.calibration_feeds(ctx), axes)
        grams, means = {}, {}
        for (name, axis), (u, c) in wanted.items():
            if u not in got or axes[u] != axis:
                continue
            h, mu = got[u]
            if c is not None and c.shape[0] != h.shape[0]:
                continue
            means[name] = mu if c is None else mu * c
            if axis == -1:
                grams[name] = h if c is None else h * np.outer(c, c)
        algorithm = self._algorithm(ctx)
        if algorithm == "gptq" or (algorithm == "auto" and self.weight_dtype in ("int4", "uint4")):
            grams.update(self._conv_grams(found, model, source, ctx, have))
        return grams, means

    def _conv_grams(self, found, model: ir.Model, source: onnx.ModelProto, ctx: PassContext, have: set[str]
                    ) -> dict[str, np.ndarray]:
        """E[patch patch^T] of the im2col patches of every matched main-graph Conv with group 1 (keyed by
        `_conv_key`), from one calibration run of a private copy of `source` with the unfolding Convs added
        (algorithms/unfold.py): what GPTQ rounds a Conv weight against. Not over 2 GB (the copy)."""
        convs = {}
        for f in found:
            node, x, w = (f.match.bindings.get(k) for k in ("node", "x", "w"))
            if not (isinstance(node, gs.Node) and node.op == "Conv" and isinstance(x, gs.Tensor)) \
                    or f.graph is not model.graph or int(node.attrs.get("group", 1)) != 1 or x.name not in have:
                continue
            v = ir.const_value(w) if isinstance(w, gs.Tensor) else None
            if v is not None and v.ndim >= 3:
                convs[_conv_key(node)] = (x.name, v.shape, dict(node.attrs))
        if not convs or ir.is_big(source):
            return {}
        probe = onnx.ModelProto()
        probe.CopyFrom(source)
        for key, (x, shape, attrs) in convs.items():
            n, kernel = unfold_conv(x, shape, attrs, key)
            probe.graph.node.append(n)
            probe.graph.initializer.append(kernel)
        stats = ctx.collect(probe, [], self.calibration_feeds(ctx), histogram=False,
                            gram_axes={k: 1 for k in convs})
        return {k: st.second_moment for k, st in stats.items() if k in convs and st.second_moment is not None}

    # -- BatchNormalization folding and cross-layer equalization ------------------------------------
    def _equalize(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext, target: Target,
                  notes: list[str], details: dict[str, Any], tables: dict) -> onnx.ModelProto:
        """Fold Conv -> BatchNormalization where Convs get quantized weights, then equalize producer/consumer
        pairs (algorithms/equalize.py) when asked or, with `equalize` unset and calibration data, when the
        quantized model departs less from the float one on calibration data with it. Returns the float model
        calibration then reads (`source`, or `model` exported when either step changed it)."""
        changed = False
        if "Conv" in self._ops(target) and self.mode in ("static", "weight_only"):
            n = cle.fold_batchnorm(model)
            if n:
                notes.append(f"{n} BatchNormalization(s) folded into the preceding Conv (ORT folds a float Conv's "
                             "BatchNormalization at load, not a quantized one's)")
                details["batchnorm_folded"] = n
                changed = True
        exclude = tuple(self.exclude or ())
        if self.equalize is True:
            found = cle.equalize(model, exclude=exclude)
            changed |= self._note_equalized(found, notes, details)
        elif self.equalize is None and not ctx.calibration_data:
            pairs, refused = cle.find_pairs(model, exclude=exclude)
            details["equalize_refused"] = refused[:100]
            if pairs:
                notes.append(f"equalize: {len(pairs)} layer pair(s) could be equalized; left as they are without "
                             "calibration data to measure it (equalize: true forces it)")
        elif self.equalize is None:
            plain = model.to_proto() if changed else source
            trial = ir.Model.from_proto(plain)
            found = cle.equalize(trial, exclude=exclude)
            details["equalize_refused"] = found["refused"][:100]
            if found["pairs"]:
                ref, feeds = self._trial_reference(plain, ctx)
                # scored with the pass's own rounding and bias correction: under nearest rounding alone CLE
                # looked better on the digits MLP (4-bit: 0.050 vs 0.066) and was worse with GPTQ + bias
                # correction on held-out images (logit error 0.0275 vs 0.0263)
                scores = {"off": self._trial_error(ir.Model.from_proto(plain), plain, ctx, target, tables, ref,
                                                   feeds, rounding=True),
                          "on": self._trial_error(trial, trial.to_proto(), ctx, target, tables, ref, feeds,
                                                  rounding=True)}
                details["equalize_search"] = scores
                if scores["on"] < scores["off"]:  # `model` itself is what the pass returns: equalized in place
                    changed |= self._note_equalized(cle.equalize(model, exclude=exclude), notes, details)
        return model.to_proto() if changed else source

    @staticmethod
    def _note_equalized(found: dict[str, Any], notes: list[str], details: dict[str, Any]) -> bool:
        """Report an equalization of the pass's model; whether it changed anything."""
        details["equalize_refused"] = found["refused"][:100]
        if not found["pairs"]:
            return False
        details["equalized"] = found["pairs"]
        notes.append(f"cross-layer equalization: {len(found['pairs'])} layer pair(s)")
        return True

    def _trial_reference(self, source: onnx.ModelProto, ctx: PassContext):
        """The float outputs trials are scored against: `source` on the first 16 calibration samples."""
        from ..validation.layers import reference_values

        feeds = self.calibration_feeds(ctx)[:16]
        return reference_values(source, [o.name for o in source.graph.output], feeds, ctx.providers), feeds

    def _trial_error(self, trial: ir.Model, trial_source: onnx.ModelProto, ctx: PassContext, target: Target,
                     tables: dict, ref, feeds, rounding: bool = False) -> float:
        """Mean relative error of the outputs of `trial` quantized (calibrated on its float `trial_source`; nearest
        rounding, or with `rounding` the pass's own rounding and bias correction) against the float reference
        `ref` (`_trial_reference`)."""
        from ..validation.layers import compare_to

        self._quantize(trial, trial_source, ctx, target, [], {}, reference=None, tables=tables, trial=not rounding)
        errs = compare_to(ref, trial.to_proto(), feeds, providers=ctx.providers)
        rel = [e.rel_l2_err for e in errs.values() if e.exact_match is None]
        return float(np.mean(rel)) if rel else float("inf")

    # -- SmoothQuant ----------------------------------------------------------------------------
    _ALPHAS: ClassVar[tuple[float, ...]] = (0.5, 0.65, 0.8, 0.9)

    def _smooth(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext, target: Target, notes: list[str],
                details: dict[str, Any], tables: dict) -> None:
        """Rewrite `model` (exactly, in float) so activation outliers move into the weights; with "auto",
        pick the alpha whose quantized model departs least from the float one on calibration data."""
        if ctx.calibration_data is None:
            raise CalibrationDataError("smoothquant needs calibration_data (per-channel activation ranges)")
        feeds = self.calibration_feeds(ctx)
        found = find_matches(model, [query("smooth-probe", _matmul_pattern, self._smooth_ok)])
        weights: dict[str, list[np.ndarray]] = {}
        for f in found:
            b = f.match.bindings
            if f.graph is not model.graph or b["x"].name in self.overrides:  # main graph only (calibratable)  # a range given by the user is in the unsmoothed units
                continue
            weights.setdefault(b["x"].name, []).append(np.asarray(ir.const_value(b["w"]), np.float32))
        if not weights:
            notes.append("smoothquant: no MatMul with a constant weight to smooth")
            return
        grams = self._gram_inputs(model, source) if self._algorithm(ctx) != "rtn" else {}
        stats = ctx.collect(source, sorted(weights), feeds, histogram=False, channel_axes={n: -1 for n in weights},
                            gram_axes=grams)
        amax_w = {n: np.max([np.abs(w).max(axis=1) for w in ws], axis=0) for n, ws in weights.items()}
        amax_x = {n: st.channel_absmax for n, st in stats.items() if st.channel_absmax is not None}

        def scales(alpha: float) -> dict[str, np.ndarray]:
            return _smoothing_scales(amax_x, amax_w, alpha)

        alphas = self._ALPHAS if self.smoothquant == "auto" else (float(self.smoothquant),)
        if len(alphas) > 1:
            ref, ref_feeds = self._trial_reference(source, ctx)
            scores = {}
            shaped = ir.shape_inferred(source)
            for a in alphas:  # statistics, shapes, reference outputs and embedding tables are shared by the trials
                trial = ir.Model.from_proto(source, inferred=shaped)
                _apply_smoothing(trial, scales(a))
                scores[a] = self._trial_error(trial, source, ctx, target, tables, ref, ref_feeds)
            best = min(scores, key=scores.get)
            details["smoothquant_search"] = {str(k): v for k, v in scores.items()}
        else:
            best = alphas[0]
        n = _apply_smoothing(model, scales(best))
        details["smoothquant_alpha"] = best
        notes.append(f"smoothquant: alpha {best}, {n} MatMul(s) smoothed")

    @staticmethod
    def _gram_inputs(model: ir.Model, source: onnx.ModelProto) -> dict[str, int]:
        """The inputs (name -> channel axis -1) of every main-graph MatMul/Gemm with a constant weight, and of
        the smoothing Mul folded into one: the Grams GPTQ rounds against, collected in smoothquant's one run
        (_input_moments asks for a subset of them later)."""
        have = _observable(source)
        grams = {}
        probes = [query(f"gram-probe-{i}", p, _const_weight)
                  for i, p in enumerate((_matmul_pattern, _pattern_for("Gemm", 2), _gemm3_bias_pattern))]
        for f in find_matches(model, probes):
            x = f.match.bindings["x"]
            mul = x.inputs[0] if len(x.inputs) == 1 and x.inputs[0].op == "Mul" else None
            # x and, when x = Mul(u, constant), u: a smoothing Mul folded into that one makes u the input
            for t in [x] + ([mul.inputs[0]] if mul is not None and len(mul.inputs) == 2 else []):
                if f.graph is model.graph and t.name in have:
                    grams[t.name] = -1
        return grams

    def _awq_ok(self, ctx, x, w, node):
        """A MatMul the 4-bit weight-only rules would take: constant 2-D float32 weight large enough, float32 x."""
        ok = self._smooth_ok(ctx, x, w, node)
        if not ok:
            return ok
        if self.ops is not None and "MatMul" not in self.ops:
            return fail("MatMul not in ops")
        if ctx.const_value(w).size < self.min_weight_elements:
            return fail(f"weight '{w.name}' has {ctx.const_value(w).size} elements (< min_weight_elements)")
        return True

    def _smooth_ok(self, ctx, x, w, node):
        if self._excluded(node):
            return fail("excluded")
        v = ctx.const_value(w)
        if v is None or v.ndim != 2 or v.dtype != np.float32:
            return fail("weight is not a constant 2-D float32 matrix")
        if onnx_dtype(x) != onnx.TensorProto.FLOAT:
            return fail("activation is not float32")
        return True

    def _sensitivity(self, model: ir.Model, reference: onnx.ModelProto, names: list[str], inputs: dict[str, str],
                     ctx: PassContext, notes: list[str]) -> list[dict[str, Any]]:
        """Per quantized layer: error of its output vs the float model on calibration data, and the part of it
        the layer introduced (output error minus the error its input already carried), worst first."""
        from ..validation.layers import compare_tensors

        feeds = ctx.calibration_data or ctx.validation_data
        if not feeds:
            from ..data import generate_feeds, input_specs

            feeds = generate_feeds(reference, input_specs(reference), n=8)
            notes.append("per-layer sensitivity measured on generated inputs (no calibration/validation data)")
        wanted = sorted(set(names) | {inputs[n] for n in names if n in inputs})
        errs = compare_tensors(reference, model.to_proto(), wanted, list(feeds)[:16], providers=ctx.providers)
        rows = []
        for n in names:
            e = errs.get(n)
            if e is None:
                continue
            ein = errs.get(inputs.get(n, ""))
            carried = ein.rel_l2_err if ein is not None else 0.0
            rows.append({"tensor": n, "rel_l2_err": e.rel_l2_err, "cosine": e.cosine, "max_abs_err": e.max_abs_err,
                         "input_rel_l2_err": carried, "introduced": max(0.0, e.rel_l2_err - carried)})
        return sorted(rows, key=lambda r: -r["introduced"])

    # ------------------------------------------------------------------------------------------
    def _ops(self, target: Target) -> set[str]:
        ops = {op for op, p in target.ops.items() if self.mode in p.modes}
        if self.ops is not None:
            unknown = sorted(set(self.ops) - set(target.ops))
            if unknown:
                raise RecipeError(f"quantize.ops: {unknown} cannot be quantized on {target.name}; "
                                  f"valid: {sorted(target.ops)}")
            # named explicitly: also the ops that only get smaller in this mode (no fused kernel)
            ops |= {op for op in self.ops if self.mode in target.ops[op].size_only_modes}
            ops &= set(self.ops)
        if not self.embeddings:
            ops.discard("Gather")
        return ops

    def _excluded(self, node: gs.Node) -> bool:
        return is_excluded(node, self.exclude)

    def _calibrate(self, plan: _Plan, model: ir.Model, source: onnx.ModelProto, ctx: PassContext, act_dtype: str,
                   act_sym: bool, notes: list[str]) -> None:
        from ..calibration import compute_range

        if ctx.calibration_data is None:
            raise CalibrationDataError("quantize mode 'static' needs calibration_data (activation ranges); "
                                       "give calibration feeds, or use mode 'weight_only' or 'dynamic'")
        feeds = self.calibration_feeds(ctx)
        histogram = self.calibration != "minmax" or any("calibration" in o for o in self.overrides.values())
        stats = None if histogram else _smoothed_stats(model, sorted(plan.activations), source, ctx, feeds)
        if stats is None:  # calibrate the model as it is (smoothed: exported once for ORT)
            current = source if plan.activations <= _observable(source) else model.to_proto()
            stats = ctx.collect(current, sorted(plan.activations), feeds, histogram=histogram)
        for name in sorted(plan.activations):
            st = stats.get(name)
            if st is None:
                continue
            if st.degenerate:
                notes.append(f"activation '{name}': {st.degenerate}; quantized with an exact scale")
            if st.nonfinite:
                notes.append(f"activation '{name}': {st.nonfinite} NaN/inf values seen in calibration; "
                             "left in float")
                continue
            over = self.overrides.get(name, {})
            if "range" in over:
                lo, hi = (float(v) for v in over["range"])
            else:
                lo, hi = compute_range(st, over.get("calibration", self.calibration), qdtype=act_dtype,
                                       symmetric=act_sym, percentile=float(over.get("percentile", self.percentile)))
            plan.ranges[name] = (lo, hi)
            plan.params[name] = qmath.activation_params(lo, hi, act_dtype, act_sym)

    # ------------------------------------------------------------------------------------------ rules
    def _rules(self, run: "_Run", target: Target) -> list[RewriteRule]:
        ops = self._ops(target)
        rules: list[RewriteRule] = []
        if "Gather" in ops:  # embedding tables: int8 row-wise in every mode (no activation involved)
            if self.embedding_bits == 4 or (self.embedding_bits is None and self.weight_dtype in ("int4", "uint4")):
                rules.append(RewriteRule("embedding-4bit", embedding_pattern, run._gather4_replacement,
                                         run._gather4_check))
            rules.append(RewriteRule("embedding-int8", embedding_pattern, run._gather_replacement, run._gather_check))
        if "LSTM" in ops and self.mode in ("dynamic", "static"):
            rules += _lstm_rules(run)
        if self.mode == "weight_only":
            four = self.weight_dtype in ("int4", "uint4")
            for op in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
                if op not in ops:
                    continue
                if op in ("MatMul", "Gemm") and (four or (self.weight_dtype == "int8" and target.cpu)):
                    # MatMulNBits (4-bit; 8-bit on the CPU: MiniLM-L3 latency 0.66x/0.80x fp32 at 32/128 tokens
                    # where DequantizeLinear->MatMul ran 0.85x/0.84x, cosine 0.9998 both); a Gemm's bias goes in
                    bits = "4bit" if four else "8bit"
                    pats = [_matmul_pattern] if op == "MatMul" else [_gemm3_bias_pattern, _pattern_for("Gemm", 2)]
                    rules += [RewriteRule(f"wo-{op.lower()}-{bits}{'-bias' if p is _gemm3_bias_pattern else ''}",
                                          p, run._nbits_replacement, run._nbits_check) for p in pats]
                    if four:
                        continue  # no 4-bit DequantizeLinear fallback
                rules += _weight_only_rules(run, target.ops[op])
        elif self.mode == "dynamic":
            if "MatMul" in ops:
                rules.append(RewriteRule("dyn-matmul-bias", _matmul_bias_pattern, run._dyn_replacement,
                                         run._dyn_check))
                rules.append(RewriteRule("dyn-matmul", _matmul_pattern, run._dyn_replacement, run._dyn_check))
            if "Gemm" in ops:  # Gemm(x, W[, b]) is a MatMul with a bias: same fused kernel
                rules.append(RewriteRule("dyn-gemm-2", _pattern_for("Gemm", 2), run._dyn_replacement, run._dyn_check))
                rules.append(RewriteRule("dyn-gemm-3", _gemm3_bias_pattern, run._dyn_replacement, run._dyn_check))
        else:
            if "MatMul" in ops and run.fuse_bias:
                # MatMul + bias Add as one com.microsoft.MatMulIntegerToFloat with its bias: ORT's QDQ fusion
                # leaves the Add a separate kernel (MiniLM-L3: 18 bias Adds, 1.0 of 6.8 ms at 128 tokens)
                rules.append(RewriteRule("static-matmul-bias", _matmul_bias_pattern, run._static_bias_replacement,
                                         run._static_bias_check))
            for op in ("MatMul", "Gemm"):
                if op in ops:
                    rules += _static_input_rules(run, target.ops[op])
            if "Conv" in ops:  # the table says whether its output is quantized too (QLinearConv needs it)
                rules += _static_conv_rules(run, target.ops["Conv"])
        return rules

class _Run:
    """One application of a Quantize pass: its options plus the plan (calibrated parameters) the rules read."""

    def __init__(self, q: "Quantize", plan: _Plan, tables: Optional[dict] = None):
        self.q = q
        self.tables = {} if tables is None else tables  # embedding table name -> (q, scale): same in every trial
        self.plan = plan
        self.mode = q.mode
        self.act_dtype = "uint8"  # static activations (Quantize._new_run: the option or the target)
        self.act_sym = False
        self.reduce_range = False  # set by Quantize._new_run from the option or the target
        self.fuse_bias = False  # static: MatMul + bias -> MatMulIntegerToFloat (ort-cpu, uint8 activations)
        self.wcache: dict[tuple[int, int], tuple[tuple[gs.Constant, ...], np.ndarray]] = {}  # (q, scale, zp)
        self.dqcache: dict[tuple[int, int], gs.Tensor] = {}  # their DequantizeLinear's output
        self.ccache: dict[tuple[int, bool], list[gs.Constant]] = {}
        self.algorithm = "rtn"  # weight_only/dynamic: rtn | gptq | auto (Quantize._algorithm)
        self.grams: dict[str, np.ndarray] = {}  # layer input name -> E[x x^T] (algorithm gptq/auto)
        self.rounding: dict[str, dict] = {}  # weight name -> {"algorithm", "rtn_error", "gptq_error"}
        self.means: dict[str, np.ndarray] = {}  # layer input name -> E[x] (bias correction)
        self.corrections: list[dict] = []  # per corrected layer: node, mean |shift| / mean |bias|

    def _excluded(self, node: gs.Node) -> bool:
        return self.q._excluded(node)

    # -- shared checks --------------------------------------------------------------------------
    def _weight_ok(self, ctx, node: gs.Node, w: gs.Tensor, min_ndim: int = 2):
        why = weight_problem(node, w, self.q.exclude, min_ndim)
        return fail(why) if why else True

    def _layer_ok(self, ctx, node: gs.Node, w: gs.Tensor, x: gs.Tensor, min_ndim: int = 2):
        """`_weight_ok` for w, then `_act_ok` for x."""
        ok = self._weight_ok(ctx, node, w, min_ndim)
        return self._act_ok(x) if ok else ok

    def _act_ok(self, x: gs.Tensor):
        if onnx_dtype(x) not in _FLOATS:
            return fail(f"activation '{x.name}' is not float")
        if self.mode == "static" and not _is_dq(x) and self.plan.calibrated and x.name not in self.plan.params:
            return fail(f"no calibrated range for '{x.name}' (not observable in the main graph, or degenerate)")
        return True

    def _gram(self, op, x: gs.Tensor, w: gs.Tensor, node: gs.Node) -> Optional[np.ndarray]:
        """The input second moment GPTQ rounds `w` against: None for rtn, an unobserved input, or a weight
        several nodes read (one rounding cannot follow several inputs)."""
        if not self.grams or node.op not in ("MatMul", "Gemm", "Conv") or len(op.ctx.consumers(w)) != 1:
            return None
        if node.op == "Conv":  # collected where GPTQ applies to Convs (Quantize._input_moments, see _conv_key)
            h = self.grams.get(_conv_key(node))
            v = ir.const_value(w)
            return h if h is not None and v is not None and h.shape[0] == int(np.prod(v.shape[1:])) else None
        h = self.grams.get(x.name)
        return h if h is not None and h.shape[0] == int(np.asarray(ir.const_value(w)).shape[
            1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0]) else None

    def _round(self, name: str, wm: np.ndarray, h: Optional[np.ndarray], scale: np.ndarray, zp: np.ndarray,
               qmin: int, qmax: int, block_size: int = 0) -> np.ndarray:
        """Integer codes [rows, cols] of the output-major weight `wm` on the grid (scale, zp per row, or per
        row and block of `block_size` inputs): nearest rounding, or GPTQ's against `h` (auto: whichever has
        the smaller output error on calibration data; recorded per weight)."""
        sc = np.asarray(scale, np.float32).reshape(wm.shape[0], -1)
        z = np.broadcast_to(np.asarray(zp, np.float32).reshape(wm.shape[0], -1), sc.shape)
        idx = np.arange(wm.shape[1]) // block_size if block_size else np.zeros(wm.shape[1], np.int64)
        rtn = np.clip(np.rint(wm / sc[:, idx]) + z[:, idx], qmin, qmax)
        if h is None:
            return rtn
        g = gptq.quantize_grid(wm, h, sc, z, qmin, qmax, block_size, damping=self.q.gptq_damping).astype(np.float32)
        e_rtn = gptq.output_error(wm, (rtn - z[:, idx]) * sc[:, idx], h)
        e_gptq = gptq.output_error(wm, (g - z[:, idx]) * sc[:, idx], h)
        use = "gptq" if self.algorithm == "gptq" or e_gptq < e_rtn else "rtn"
        self.rounding[name] = {"algorithm": use, "rtn_error": e_rtn, "gptq_error": e_gptq}
        return g if use == "gptq" else rtn

    def _round_channels(self, name: str, wm: np.ndarray, h: np.ndarray, scale: np.ndarray, zp: np.ndarray,
                        qt: qmath.QType) -> np.ndarray:
        """`_round` for a per-channel (or per-tensor) grid of `qt` on the output-major `wm`, as `qt`'s dtype."""
        rows = wm.shape[0]
        return self._round(name, wm, h, np.broadcast_to(scale, (rows,)), np.broadcast_to(zp, (rows,)),
                           qt.qmin, qt.qmax).astype(qt.np_dtype)

    def rounding_summary(self) -> dict[str, Any]:
        """Per weight rounded against calibration data: the algorithm used and both output errors."""
        rows = [{"weight": k, **v} for k, v in sorted(self.rounding.items())]
        return {"gptq": sum(r["algorithm"] == "gptq" for r in rows), "rtn": sum(r["algorithm"] == "rtn" for r in rows),
                "layers": rows[:500]}

    def _weight_consts(self, op, w: gs.Tensor, axis: int, h: Optional[np.ndarray] = None):
        """(int W, scale, zero point) constants for weight w, per channel along `axis`; made once per (weight,
        axis) even when several nodes share w. With `h` (a 2-D weight's input second moment), rounded by
        `_round` instead of to nearest."""
        hit = self.wcache.get((id(w), axis))
        if hit is not None:
            return hit
        v = np.asarray(ir.const_value(w), dtype=np.float32)
        qd = self.q.weight_dtype
        ax = axis if self.q.per_channel else None
        reduce = self.reduce_range and self.mode != "weight_only"  # weight_only has no integer kernel
        scale, zp = qmath.weight_params(v, ax, qd, self.q.symmetric_weights, reduce_range=reduce)
        if h is not None and (v.ndim == 2 or axis == 0):
            qt = qmath.reduced(qmath.QTYPES[qd]) if reduce else qmath.QTYPES[qd]
            if v.ndim > 2:  # Conv [O, I, k...]: output-major rows of its im2col columns
                q = self._round_channels(w.name, v.reshape(v.shape[0], -1), h, scale, zp, qt).reshape(v.shape)
            elif axis % 2 == 1:  # [in, out]: round the output-major transpose
                q = self._round_channels(w.name, v.T, h, scale, zp, qt).T
            else:
                q = self._round_channels(w.name, v, h, scale, zp, qt)
        else:
            q = qmath.quantize(v, scale, zp, ax, qd)
        consts = (op.const(q, name=f"{w.name}_quantized"), op.const(scale, name=f"{w.name}_scale"),
                  op.const(zp, name=f"{w.name}_zero_point"))
        self.wcache[(id(w), axis)] = (consts, scale)
        return consts, scale

    def _quant_weight(self, op, w: gs.Tensor, axis: int, h: Optional[np.ndarray] = None):
        """(DequantizeLinear(int W), scale) for weight w (`_weight_consts`); one DequantizeLinear per weight."""
        consts, scale = self._weight_consts(op, w, axis, h)
        dq = self.dqcache.get((id(w), axis))
        if dq is None or not dq.inputs or not op.ctx.index.alive(dq.inputs[0]):
            dq = self.dqcache[(id(w), axis)] = op.DequantizeLinear(
                *consts, **({"axis": axis} if self.q.per_channel else {}))
        return dq, scale

    def _corrected_bias(self, op, x: gs.Tensor, node: gs.Node, b: Optional[gs.Tensor], w: np.ndarray,
                        consts, axis: int, layout: Optional[str] = None) -> Optional[gs.Tensor]:
        """`b` minus the mean shift the quantized weight puts on the output on calibration data, (W_q - W)^T
        E[x]: `w` is the float weight, `consts` (q, scale, zero point along `axis`) its quantization, both in the
        layout of `layout` (default node.op: MatMul [K, N], Gemm as its attributes say, Conv [O, I, kh, kw]).
        `b` itself without E[x] for x or a per-output float bias vector."""
        if b is None or not self.q.bias_correction or x.name not in self.means:
            return b  # (checked here to skip dequantizing; _bias_minus_shift checks the rest)
        q, scale, zp = (np.asarray(ir.const_value(t)) for t in consts)
        dw = qmath.dequantize(q, scale, zp, axis if np.size(scale) > 1 else None).astype(np.float64) - w
        return self._bias_minus_shift(op, x, node, b, dw, layout or node.op)

    def _bias_minus_shift(self, op, x: gs.Tensor, node: gs.Node, b: Optional[gs.Tensor], dw: np.ndarray,
                          kind: str) -> Optional[gs.Tensor]:
        """b - (mean output shift of the weight error `dw` on calibration data); `dw` in `kind`'s layout
        (MatMul [K, N], Gemm as node's attributes say, Conv [O, I, kh, kw]). `b` itself where it cannot be."""
        mu = self.means.get(x.name)
        bv = None if b is None else ir.const_value(b)
        if mu is None or not self.q.bias_correction or bv is None or bv.ndim != 1 or bv.dtype != np.float32:
            return b
        shift = bias.output_mean_shift(kind, node.attrs, dw, mu)
        if shift is None or shift.shape != bv.shape:
            return b
        self.corrections.append({"node": node.name, "relative_shift": float(
            np.abs(shift).mean() / max(float(np.abs(bv).mean()), 1e-12))})
        return op.const((bv - shift).astype(np.float32), name=f"{b.name}_corrected")

    def _bias_after(self, op, x: gs.Tensor, w: gs.Tensor, node: gs.Node, b: Optional[gs.Tensor],
                    axis: int) -> Optional[gs.Tensor]:
        """`_corrected_bias` for node's own weight w, quantized by `_weight_consts` along `axis`."""
        if b is None:
            return b
        consts, _ = self._weight_consts(op, w, axis)
        return self._corrected_bias(op, x, node, b, np.asarray(ir.const_value(w), np.float64), consts, axis)

    def _dq_input(self, op, x: gs.Tensor) -> gs.Tensor:
        """The dequantized view of activation x: an existing one when x already has a Q->DQ pair."""
        if _is_dq(x):
            return x
        xq, s, z = self._q_input(op, x)
        for d in op.ctx.consumers(xq):
            if d.op == "DequantizeLinear" and d.outputs and op.ctx.index.alive(d):
                return d.outputs[0]
        return op.DequantizeLinear(xq, s, z)

    def _q_input(self, op, x: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
        """(QuantizeLinear(x), its scale, its zero point): x's existing quantization (a DQ input's own, or a
        QuantizeLinear of x in this graph), else a new one from the calibrated parameters."""
        if _is_dq(x):
            dq = x.inputs[0]
            return dq.inputs[0], dq.inputs[1], dq.inputs[2]
        for c in op.ctx.consumers(x):  # only one in this graph: x may be read by several If/Loop bodies
            if c.op == "QuantizeLinear" and c.outputs and op.ctx.index.alive(c):
                return c.outputs[0], c.inputs[1], c.inputs[2]
        scale, zp = self.plan.params[x.name]
        s = op.const(np.asarray(scale, np.float32), name=f"{x.name}_scale")
        z = op.const(zp, name=f"{x.name}_zero_point")
        return op.QuantizeLinear(x, s, z), s, z

    def _static_bias_ok(self, ctx, x, w, node):
        """Whether MatMul(x, w) can be MatMulIntegerToFloat: weight and activation quantizable, a 2-D float32
        weight, a float32 input with (or getting) a uint8 per-tensor quantization."""
        ok = self._layer_ok(ctx, node, w, x)
        if not ok:
            return ok
        v = ctx.const_value(w)
        if v.ndim != 2 or v.dtype != np.float32:
            return fail("MatMulIntegerToFloat needs a 2-D float32 weight")
        if onnx_dtype(x) != onnx.TensorProto.FLOAT or (_is_dq(x) and not self._is_u8_dq(x)):
            return fail(f"input '{x.name}' is not float32 with a uint8 quantization")
        return True

    def _static_bias_check(self, ctx, x, w, node, b):
        ok = self._static_bias_ok(ctx, x, w, node)
        if not ok:
            return ok
        bv = ctx.const_value(b)
        if bv is None or bv.ndim != 1 or bv.shape[0] != ctx.const_value(w).shape[1] or bv.dtype != np.float32:
            return fail("bias is not a constant float vector over the output columns")
        return True

    @staticmethod
    def _is_u8_dq(x: gs.Tensor) -> bool:
        zp = ir.const_value(x.inputs[0].inputs[2]) if len(x.inputs[0].inputs) > 2 else None
        return zp is not None and zp.dtype == np.uint8 and zp.size == 1

    def _static_bias_replacement(self, op, x, w, node, b):
        """MatMul(x, W) + b -> MatMulIntegerToFloat(Q(x), int8 W, s_x, s_w, z_x, z_w, b): the kernel ORT makes
        of DQ(Q(x)) -> MatMul -> Add, with the bias Add inside it."""
        xq, sx, zx = self._q_input(op, x)
        consts, _ = self._weight_consts(op, w, 1, self._gram(op, x, w, node))
        b = self._bias_after(op, x, w, node, b, 1)
        return op.MatMulIntegerToFloat(xq, *consts[:1], sx, consts[1], zx, consts[2], b, _domain="com.microsoft")

    def _qdq_output(self, op, y: gs.Tensor, name: str) -> gs.Tensor:
        scale, zp = self.plan.params[name]
        s = op.const(np.asarray(scale, np.float32), name=f"{name}_scale")
        z = op.const(zp, name=f"{name}_zero_point")
        return op.DequantizeLinear(op.QuantizeLinear(y, s, z), s, z)

    # -- embeddings -----------------------------------------------------------------------------
    def _gather_check(self, ctx, w, idx, node):
        why = embedding_problem(node, w, self.q.exclude)
        return fail(why) if why else True

    def _gather_replacement(self, op, w, idx, node):
        hit = self.tables.get(w.name)
        if hit is None or hit[0].shape != tuple(w.shape):
            v = np.asarray(ir.const_value(w), dtype=np.float32)
            scale, zp = qmath.weight_params(v, 0, "int8", True)
            hit = self.tables[w.name] = (qmath.quantize(v, scale, zp, 0, "int8"), scale)
        q, scale = hit
        rows = op.Gather(op.const(q, name=f"{w.name}_quantized"), idx, axis=0)
        row_scale = op.Gather(op.const(scale, name=f"{w.name}_row_scale"), idx, axis=0)
        scale_b = op.Unsqueeze(row_scale, op.const(np.array([-1], np.int64), name=f"{w.name}_unsqueeze_axes"))
        return op.Mul(op.Cast(rows, to=onnx.TensorProto.FLOAT), scale_b)

    # -- 4-bit weights -------------------------------------------------------------------------
    def _nbits_check(self, ctx, x, w, node, b=None):
        ok = self._weight_ok(ctx, node, w)
        if not ok:
            return ok
        if ctx.const_value(w).ndim != 2:
            return fail("MatMulNBits needs a 2-D weight")
        if node.op == "Gemm":
            a = node.attrs
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or (b is not None and a.get("beta", 1.0) != 1.0):
                return fail("Gemm with transA or alpha/beta != 1")
            n_out = _gemm_weight(node, ctx.const_value(w)).shape[1]
            bv = None if b is None else ctx.const_value(b)
            if b is not None and (bv is None or bv.ndim != 1 or bv.shape[0] != n_out or bv.dtype != np.float32):
                return fail("bias is not a constant float vector over the output columns")
        if ctx.const_value(w).size < self.q.min_weight_elements:
            return fail(f"weight '{w.name}' has {ctx.const_value(w).size} elements (< min_weight_elements)")
        if onnx_dtype(x) != onnx.TensorProto.FLOAT:
            return fail(f"input '{x.name}' is not float32")
        if self.q.weight_dtype == "int8" and (len(ctx.consumers(w)) > 1 or any(k[0] == id(w) for k in self.wcache)):
            return fail(f"weight '{w.name}' is read by several nodes: one DequantizeLinear serves them all")
        return True

    def _nbits_replacement(self, op, x, w, node, b=None):
        """W [K, N] -> ORT's MatMulNBits: 4- or 8-bit blocks of `block_size` (8-bit: 128) along K per column.

        Layout (com.microsoft.MatMulNBits): B uint8 [N, K/block, block*bits/8] (4 bits: two values a byte, low
        nibble first); scales float [N * K/block]; zero points (asymmetric) packed the same way, else the
        default 2**(bits-1) (values stored as q + 2**(bits-1))."""
        v = _gemm_weight(node, np.asarray(ir.const_value(w), dtype=np.float32))
        k, n = v.shape
        bits = 8 if self.q.weight_dtype == "int8" else 4
        bs = _nbits_block(self.q.block_size, k)
        blocks = -(-k // bs)
        h = self._gram(op, x, w, node)
        _, scale, zp = _block_layout(v.T, None if h is None else np.diag(h), bs, self.q.symmetric_weights, bits)
        codes = np.full((n, blocks * bs), 1 << (bits - 1), np.float32)
        codes[:, :k] = self._round(w.name, v.T, h, scale, zp, 0, (1 << bits) - 1, bs)
        if b is not None:  # the Gemm's bias (MatMulNBits input 5), less the mean shift of the rounded weights
            idx = np.arange(k) // bs
            w_hat = (codes[:, :k] - zp.astype(np.float32)[:, idx]) * scale[:, idx]  # [n, k]
            b = self._bias_minus_shift(op, x, node, b, w_hat.T.astype(np.float64) - v, "MatMul")
        q = codes.reshape(n, blocks, bs).astype(np.uint8)
        if bits == 4:
            q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
            zpk = _pack_nibbles(zp).reshape(-1)
        else:
            zpk = zp.astype(np.uint8).reshape(-1)
        optional = [None if self.q.symmetric_weights else op.const(zpk, name=f"{w.name}_q{bits}_zp"), None, b]
        while optional and optional[-1] is None:  # zero points, g_idx (unused), bias: trailing absent ones dropped
            optional.pop()
        return op.MatMulNBits(x, op.const(q, name=f"{w.name}_q{bits}"),
                              op.const(scale.reshape(-1), name=f"{w.name}_q{bits}_scale"), *optional,
                              K=int(k), N=int(n), bits=bits, block_size=int(bs), accuracy_level=4,
                              _domain="com.microsoft")

    def _gather4_check(self, ctx, w, idx, node):
        ok = self._gather_check(ctx, w, idx, node)
        if not ok:
            return ok
        bs = self.q.block_size or 32
        if ctx.const_value(w).shape[1] % bs:
            return fail(f"row length {ctx.const_value(w).shape[1]} is not a multiple of block_size {bs}")
        return True

    def _gather4_replacement(self, op, w, idx, node):
        """Table [R, D] -> ORT's GatherBlockQuantized: 4-bit blocks of `block_size` along each row, two values
        a byte (low nibble first), zero point 8; rows are dequantized after the lookup."""
        v = np.asarray(ir.const_value(w), dtype=np.float32)
        r, d = v.shape
        bs = self.q.block_size or 32
        wb = v.reshape(r, d // bs, bs)
        scale, zp = _block_grid(wb, self.q.symmetric_weights)
        q = np.clip(np.rint(wb / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8).reshape(r, d)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
        zps = [] if self.q.symmetric_weights else [op.const(_pack_nibbles(zp), name=f"{w.name}_q4_zp")]
        return op.GatherBlockQuantized(op.const(packed, name=f"{w.name}_q4"), idx,
                                       op.const(scale, name=f"{w.name}_q4_scale"), *zps, gather_axis=0,
                                       quantize_axis=1, block_size=int(bs), bits=4, _domain="com.microsoft")

    # -- dynamic --------------------------------------------------------------------------------
    def _dyn_check(self, ctx, x, w, node, b=None, **_):
        ok = self._layer_ok(ctx, node, w, x)
        if not ok:
            return ok
        if ctx.const_value(w).ndim != 2:
            return fail("DynamicQuantizeMatMul needs a 2-D weight")
        if ctx.const_value(w).size < self.q.min_weight_elements:
            return fail(f"weight '{w.name}' has {ctx.const_value(w).size} elements (< min_weight_elements "
                        f"{self.q.min_weight_elements}): too small for the integer kernel to pay off")
        if node.op == "Gemm":
            a = node.attrs
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or (b is not None and a.get("beta", 1.0) != 1.0):
                return fail("Gemm with transA or alpha/beta != 1")
        wt = _gemm_weight(node, ctx.const_value(w))
        n_out = wt.shape[1]
        if b is not None:
            bv = ctx.const_value(b)
            if bv is None or bv.ndim != 1 or bv.shape[0] != n_out or bv.dtype != np.float32:
                return fail("bias is not a constant float vector over the output columns")
        elif node.op == "MatMul" and _bias_add_follows(ctx, node, n_out):
            return fail("MatMul followed by a bias Add: fused with its bias")
        return True

    def _dyn_replacement(self, op, x, w, node, b=None, **_):
        key = (id(w), bool(node.op == "Gemm" and node.attrs.get("transB", 0)))
        consts = self.ccache.get(key)  # initializers shared by every node reading the same weight
        if consts is None:
            v = _gemm_weight(node, np.asarray(ir.const_value(w), dtype=np.float32))
            scale, zp = qmath.weight_params(v, 1 if self.q.per_channel else None, "int8", True,
                                            reduce_range=self.reduce_range)
            h = self._gram(op, x, w, node)
            if h is None:
                q = qmath.quantize(v, scale, zp, 1 if self.q.per_channel else None, "int8")
            else:
                qt = qmath.reduced(qmath.QTYPES["int8"]) if self.reduce_range else qmath.QTYPES["int8"]
                q = self._round_channels(w.name, v.T, h, scale, zp, qt).T
            consts = self.ccache[key] = [op.const(q, name=f"{w.name}_quantized"),
                                         op.const(scale, name=f"{w.name}_scale"),
                                         op.const(zp, name=f"{w.name}_zero_point")]
        ins = [x, *consts]
        if b is not None:
            v = _gemm_weight(node, np.asarray(ir.const_value(w), dtype=np.float64))
            ins.append(self._corrected_bias(op, x, node, b, v, consts, 1, layout="MatMul"))
        return op.DynamicQuantizeMatMul(*ins, _domain="com.microsoft")



def _block_grid(wb: np.ndarray, symmetric: bool, importance: Optional[np.ndarray] = None, bits: int = 4
                ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per block of wb [..., blocks, block] for unsigned `bits`-bit codes 0..2**bits-1 with
    w ~ (q - zp) * scale. Symmetric: zero point 2**(bits-1) and a shrink of absmax / (2**(bits-1)-1);
    asymmetric: the block's [min, max] (widened to contain 0) shrunk, zero point rounded. The shrink factor
    (searched over a fixed grid, vectorised over all blocks) is the one with the least squared rounding+clipping
    error, each weight's error weighed by `importance` (broadcast to wb; e.g. E[x_j^2] of its input) when given:
    clipping a block's one or two largest weights often lowers the error of all the others."""
    top, half = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:
        amax = np.abs(wb).max(axis=-1)
        base = np.where(amax > 0, amax / (half - 1), 1.0)
        mid = np.full(base.shape, float(half), np.float32)
        best_s, best_z = base.astype(np.float32), mid

        def grid(f: np.float32) -> tuple[np.ndarray, np.ndarray]:
            return (base * f).astype(np.float32), mid
    else:
        lo = np.minimum(wb.min(axis=-1), 0.0)
        hi = np.maximum(wb.max(axis=-1), 0.0)
        best_s, best_z = np.ones(lo.shape, np.float32), np.zeros(lo.shape, np.float32)

        def grid(f: np.float32) -> tuple[np.ndarray, np.ndarray]:
            sc = ((hi - lo) * f / top).astype(np.float32)
            sc = np.where(sc > 0, sc, 1.0).astype(np.float32)
            return sc, np.clip(np.rint(-lo * f / sc), 0, top).astype(np.float32)
    best_err = np.full(best_s.shape, np.inf, np.float32)
    for f in np.linspace(1.0, 0.7, 13, dtype=np.float32):
        sc, zp = grid(f)
        deq = (np.clip(np.rint(wb / sc[..., None]) + zp[..., None], 0, top) - zp[..., None]) * sc[..., None]
        err = ((deq - wb) ** 2 if importance is None else (deq - wb) ** 2 * importance).sum(axis=-1)
        better = err < best_err
        best_s, best_z, best_err = (np.where(better, sc, best_s), np.where(better, zp, best_z),
                                    np.where(better, err, best_err))
    return best_s.astype(np.float32), best_z.astype(np.float32)


#: GPTQ on Conv weights (im2col Gram), digits CNN, 500 held-out images, logit relative error / top-1 agreement
#: with fp32: 4-bit weight-only 0.00138 / 0.996 (nearest) -> 0.00094 / 0.998; static int8 6e-5 / 1.000 ->
#: 4e-5 / 0.998 and 8-bit weight-only 4e-5 / 1.000 -> 3e-5 / 0.998 (one image): so algorithm auto uses it for
# 4-bit Conv weights only; algorithm gptq uses it at every width.
def _conv_key(node: gs.Node) -> str:
    """The name of a Conv's unfolded input patches (and of their Gram) in quantize's calibration probe."""
    return f"{node.name}::quantize_unfold"


def _nbits_block(block_size: Optional[int], k: int) -> int:
    """MatMulNBits' block along K: the option, else 128 (or the next power of two >= 16 below 128 inputs)."""
    return block_size or (128 if k >= 128 else max(16, 1 << (k - 1).bit_length()))


def _block_layout(wm: np.ndarray, importance: Optional[np.ndarray], block_size: int, symmetric: bool, bits: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The output-major weight [n, k] zero-padded to whole blocks [n, blocks, block] and its `_block_grid`
    (scale, zero point) per block, each input channel's error weighed by `importance` [k] when given."""
    n, k = wm.shape
    blocks = -(-k // block_size)
    wb = np.zeros((n, blocks * block_size), np.float32)
    wb[:, :k] = wm
    wb = wb.reshape(n, blocks, block_size)
    imp = None
    if importance is not None:
        imp = np.zeros(blocks * block_size, np.float32)
        imp[:k] = importance
        imp = imp.reshape(blocks, block_size)
    scale, zp = _block_grid(wb, symmetric, imp, bits)
    return wb, scale, zp


def _blocked_rtn(wm: np.ndarray, importance: np.ndarray, block_size: int, symmetric: bool,
                 bits: int = 4) -> np.ndarray:
    """The dequantized output-major weight [n, k] under MatMulNBits' blocked nearest rounding (the grid chosen
    by `_block_grid` with each input channel's importance [k]): what the AWQ search scores."""
    wb, scale, zp = _block_layout(wm, importance, block_size, symmetric, bits)
    q = np.clip(np.rint(wb / scale[..., None]) + zp[..., None], 0, (1 << bits) - 1)
    return ((q - zp[..., None]) * scale[..., None]).reshape(wm.shape[0], -1)[:, :wm.shape[1]]


def _blocked_gptq(wm: np.ndarray, h: np.ndarray, block_size: int, symmetric: bool, damping: float,
                  bits: int = 4) -> np.ndarray:
    """`_blocked_rtn` with GPTQ's rounding against `h` on the same grid (what algorithm auto may use)."""
    k = wm.shape[1]
    _, scale, zp = _block_layout(wm, np.diag(h), block_size, symmetric, bits)
    q = gptq.quantize_grid(wm, h, scale, zp, 0, (1 << bits) - 1, block_size, damping=damping)
    idx = np.arange(k) // block_size
    return (q - zp[:, idx]) * scale[:, idx]


def _pack_nibbles(zp: np.ndarray) -> np.ndarray:
    """4-bit zero points [..., blocks] -> uint8 [..., ceil(blocks / 2)], two a byte, low nibble first."""
    z = np.asarray(zp).astype(np.uint8)
    if z.shape[-1] % 2:
        z = np.concatenate([z, np.full(z.shape[:-1] + (1,), 8, np.uint8)], axis=-1)
    return (z[..., 0::2] | (z[..., 1::2] << 4)).astype(np.uint8)


def _gemm_weight(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """The [k, n] matrix a MatMul-style kernel needs (Gemm with transB=1 stores W as [n, k])."""
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return np.ascontiguousarray(w.T)
    return w


def _dq_q_pattern(op, q, s1, z1, s2, z2):
    return op.QuantizeLinear(op.DequantizeLinear(q, s1, z1, _bind="dq"), s2, z2, _bind="qn")


def _smoothing_scales(amax_x: dict[str, np.ndarray], amax_w: dict[str, np.ndarray], alpha: float
                      ) -> dict[str, np.ndarray]:
    """SmoothQuant's per-input-channel scales max|x|^alpha / max|w|^(1-alpha), finite and in [1e-4, 1e4]."""
    out = {}
    for n, ax in amax_x.items():
        aw = amax_w[n]
        if ax.shape != aw.shape:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.power(ax, alpha) / np.power(aw, 1.0 - alpha)
        sc = np.where(np.isfinite(sc) & (sc > 0), sc, 1.0)
        out[n] = np.clip(sc, 1e-4, 1e4).astype(np.float32)
    return out


def _passthrough_q(op, q, **_: Any):
    return q


def _same_qparams(ctx, q, s1, z1, s2, z2, dq, qn):
    """Q(DQ(q)) with the same scale, zero point, axis and output type is q itself."""
    vals = [ctx.const_value(t) for t in (s1, z1, s2, z2)]
    if any(v is None for v in vals):
        return fail("scales/zero points are not constants")
    if not (np.array_equal(vals[0], vals[2]) and np.array_equal(vals[1], vals[3]) and vals[1].dtype == vals[3].dtype):
        return fail("different quantization parameters")
    if dq.attrs.get("axis", 1) != qn.attrs.get("axis", 1) or qn.attrs.get("saturate", 1) != 1:
        return fail("different axis")
    return True


def _unsmoothed(x: gs.Tensor) -> gs.Tensor:
    """The activation before SmoothQuant's Mul (the tensor the float model also has)."""
    if len(x.inputs) == 1 and x.inputs[0].op == "Mul" and len(x.inputs[0].inputs) == 2 \
            and x.inputs[0].inputs[1].name.startswith(f"{x.inputs[0].inputs[0].name}_smooth_inv"):
        return x.inputs[0].inputs[0]
    return x


def _main_graph_tensors(graph: gs.Graph) -> set[str]:
    names = {t.name for t in graph.inputs}
    for n in graph.nodes:
        names.update(t.name for t in n.outputs)
    return names


def _apply_smoothing(model: ir.Model, scales: dict[str, np.ndarray]) -> int:
    """MatMul(x, W) -> MatMul(Mul(x, 1/s), diag(s) W) for every x in `scales` (one Mul per x, shared): the plan
    puts each main-graph MatMul whose constant 2-D weight fits its input's scales on that MatMul."""

    def target(ctx, x, w, node):
        v = ctx.const_value(w)
        if ctx.graph is not model.graph:
            return fail("subgraph (activations there cannot be calibrated)")
        if x.name not in scales or v is None or v.ndim != 2 or v.shape[0] != scales[x.name].shape[0]:
            return fail("not a smoothing target")
        return True

    plan = Plan((f.match.bindings["node"], scales[f.match.bindings["x"].name])
                for f in find_matches(model, [query("smooth-target", _matmul_pattern, target)]))

    def replacement(op, x, w, node, decision: np.ndarray):
        sc = decision
        xs = None
        for c in op.ctx.consumers(x):
            if c.op == "Mul" and len(c.inputs) == 2 and c.inputs[1].name.startswith(f"{x.name}_smooth_inv"):
                xs = c.outputs[0]
        if xs is None:
            xs = op.Mul(x, op.const((1.0 / sc).astype(np.float32), name=f"{x.name}_smooth_inv"))
            xs.name = op.ctx.index.fresh_name(f"{x.name}_smoothed")
        wv = np.asarray(ir.const_value(w), np.float32) * sc[:, None]
        return op.MatMul(xs, op.const(wv.astype(np.float32), name=f"{w.name}_smoothed"))

    stats = apply_rules(model, [RewriteRule("smooth-matmul", _matmul_pattern, replacement)], plan=plan)
    # a smoothing Mul right after a constant Mul (e.g. GELU's final *0.5) folds into it: no extra op at run time
    apply_rules(model, [fold_constant_mul_chain_rule()])
    return stats.rules["smooth-matmul"].applied


def _observable(proto: onnx.ModelProto) -> set[str]:
    """What calibration can observe in the main graph: what ORT can return, and the initializers."""
    return observable_tensors(proto) | {t.name for t in proto.graph.initializer}


def _smoothed_stats(model: ir.Model, names: list[str], source: onnx.ModelProto, ctx: PassContext,
                    feeds: list) -> Optional[dict[str, Any]]:
    """Min/max statistics of `names` in the smoothed `model`, from one calibration of its float `source`.

    Smoothing is exact in real arithmetic, so a tensor both models have is taken from `source` (the two differ
    by float rounding only, downstream of a smoothed MatMul). A smoothed tensor is Mul(u, c), c a constant vector
    along the last axis and u a tensor of `source`: its min/max are those of u_j * c_j at u's per-channel
    min/max (float rounding is monotone), its counts those of u. So every smoothquant trial and the result
    reuse one calibration run. None when a tensor is neither (then the caller calibrates `model` itself)."""
    from ..calibration import TensorStats

    have = _observable(source)
    tensors = model.graph.tensors()
    plain, smoothed = [], {}
    for n in names:
        if n in have:
            plain.append(n)
            continue
        t = tensors.get(n)
        mul = t.inputs[0] if t is not None and len(t.inputs) == 1 else None
        if mul is None or mul.op != "Mul" or len(mul.inputs) != 2 or mul.inputs[0].name not in have:
            return None
        c = ir.const_value(mul.inputs[1])
        if c is None or c.ndim != 1 or c.dtype != np.float32:
            return None
        smoothed[n] = (mul.inputs[0].name, c)
    users = sorted({u for u, _ in smoothed.values()})
    stats = ctx.collect(source, sorted(set(plain) | set(users)), feeds, histogram=False,
                        channel_axes={u: -1 for u in users})
    out = {n: stats[n] for n in plain if n in stats}
    for n, (u, c) in smoothed.items():
        su = stats.get(u)
        if su is None or su.channel_min is None or su.channel_min.shape != c.shape:
            return None
        ok = su.channel_min <= su.channel_max  # channels with a finite value
        ends = np.stack([su.channel_min[ok].astype(np.float32) * c[ok], su.channel_max[ok].astype(np.float32) * c[ok]])
        lo, hi = (float(ends.min()), float(ends.max())) if ends.size else (math.nan, math.nan)
        out[n] = TensorStats(n, su.dtype, su.count, su.samples, lo, hi, su.nonfinite, zeros=su.zeros)
    return out


def _is_dq(t: gs.Tensor) -> bool:
    return len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear"


def _activation_tensors(found, target: Target) -> list[gs.Tensor]:
    """The activations a static match quantizes: its input, and its output where the target's table says so."""
    b = found.match.bindings
    out = []
    x = b.get("x")
    if isinstance(x, gs.Tensor) and not _is_dq(x):
        out.append(x)
    node = b.get("node")
    place = target.ops.get(node.op) if isinstance(node, gs.Node) else None
    if place is not None and place.quantize_output:
        out.append(found.match.outputs[0])
    return out


# -- patterns -----------------------------------------------------------------------------------
def _bias_add_follows(ctx, node: gs.Node, n_out: int) -> bool:
    """`node`'s output is read only by an Add of a constant float vector over its `n_out` output columns
    (a bias the fused kernels take as an input)."""
    readers = ctx.consumers(node.outputs[0])
    if len(readers) != 1 or readers[0].op != "Add" or ctx.is_graph_output(node.outputs[0]):
        return False
    other = [t for t in readers[0].inputs if t is not node.outputs[0]]
    bv = ctx.const_value(other[0]) if len(other) == 1 else None
    return bv is not None and bv.ndim == 1 and bv.shape[0] == n_out and bv.dtype == np.float32


def _const_weight(ctx, x, w, **_):
    return True if ctx.const_value(w) is not None else fail("weight is not a constant")


def _matmul_pattern(op, x, w):
    return op.MatMul(x, w, _bind="node")


def _matmul_bias_pattern(op, x, w, b):
    return op.Add(op.MatMul(x, w, _bind="node"), b)


def _gemm3_bias_pattern(op, x, w, b):
    return op.Gemm(x, w, b, _bind="node")


def _conv2_pattern(op, x, w):
    return op.Conv(x, w, _bind="node")


def _conv3_pattern(op, x, w, b):
    return op.Conv(x, w, b, _bind="node")


def _conv2_relu_pattern(op, x, w):
    return op.Relu(op.Conv(x, w, _bind="node"))


def _conv3_relu_pattern(op, x, w, b):
    return op.Relu(op.Conv(x, w, b, _bind="node"))


def _pattern_for(op_type: str, arity: int):
    def p2(op, x, w):
        return getattr(op, op_type)(x, w, _bind="node")

    def p3(op, x, w, c):
        return getattr(op, op_type)(x, w, c, _bind="node")

    return p2 if arity == 2 else p3


def _lstm_patterns(n_out: int) -> list:
    """LSTM with 3..8 inputs (X, W, R, B, sequence_lens, initial_h, initial_c, P) and `n_out` outputs."""
    def p3(op, x, w, r):
        return op.LSTM(x, w, r, _outputs=n_out, _bind="node")

    def p4(op, x, w, r, b):
        return op.LSTM(x, w, r, b, _outputs=n_out, _bind="node")

    def p5(op, x, w, r, b, seq):
        return op.LSTM(x, w, r, b, seq, _outputs=n_out, _bind="node")

    def p6(op, x, w, r, b, seq, h0):
        return op.LSTM(x, w, r, b, seq, h0, _outputs=n_out, _bind="node")

    def p7(op, x, w, r, b, seq, h0, c0):
        return op.LSTM(x, w, r, b, seq, h0, c0, _outputs=n_out, _bind="node")

    def p8(op, x, w, r, b, seq, h0, c0, pp):
        return op.LSTM(x, w, r, b, seq, h0, c0, pp, _outputs=n_out, _bind="node")

    return [p3, p4, p5, p6, p7, p8]


def _lstm_rules(q: _Run) -> list[RewriteRule]:
    """LSTM(X, W, R, ...) -> ORT's DynamicQuantizeLSTM: W [dirs, 4H, I] and R [dirs, 4H, H] stored int8 per gate
    channel and transposed to [dirs, I, 4H] / [dirs, H, 4H] (the kernel's layout), scales [dirs, 4H]; the
    activations are quantized at run time, so no calibration is needed (static mode uses the same kernel)."""

    def check(ctx, x, w, r, node, **_):
        for t in (w, r):
            ok = q._weight_ok(ctx, node, t, min_ndim=3)
            if not ok:
                return ok
            if ctx.const_value(t).ndim != 3 or ctx.const_value(t).dtype != np.float32:
                return fail(f"LSTM weight '{t.name}' is not a 3-D float32 constant")
        if node.attrs.get("layout", 0) != 0:
            return fail("LSTM with layout=1 (batch first): DynamicQuantizeLSTM takes sequence-first inputs")
        if onnx_dtype(x) != onnx.TensorProto.FLOAT:
            return fail(f"input '{x.name}' is not float32")
        return True

    def quantized(op, t: gs.Tensor) -> list[gs.Tensor]:
        v = np.asarray(ir.const_value(t), np.float32)  # [dirs, 4H, n]
        if q.q.per_channel:  # one scale per (direction, gate channel)
            flat = v.reshape(-1, v.shape[2])
            scale, zp = qmath.weight_params(flat, 0, "int8", True)
            qv = qmath.quantize(flat, scale, zp, 0, "int8").reshape(v.shape)
            scale, zp = scale.reshape(v.shape[:2]), zp.reshape(v.shape[:2])
        else:  # one per direction (the kernel's per-tensor form), the same for both
            scale, zp = qmath.weight_params(v, None, "int8", True)
            qv = qmath.quantize(v, scale, zp, None, "int8")
            scale, zp = np.full(v.shape[:1], scale, np.float32), np.zeros(v.shape[:1], np.int8)
        return [op.const(np.ascontiguousarray(qv.transpose(0, 2, 1)), name=f"{t.name}_quantized"),
                op.const(scale.astype(np.float32), name=f"{t.name}_scale"),
                op.const(zp.astype(np.int8), name=f"{t.name}_zero_point")]

    def make(n_out: int):
        def replacement(op, x, w, r, node, **opt):
            wq, ws, wz = quantized(op, w)
            rq, rs, rz = quantized(op, r)
            rest = [opt.get(k) if opt.get(k) is not None else gs.Variable.empty()
                    for k in ("b", "seq", "h0", "c0", "pp")]
            attrs = {k: v for k, v in node.attrs.items() if k != "layout"}
            return op.DynamicQuantizeLSTM(x, wq, rq, *rest, ws, wz, rs, rz, _outputs=n_out,
                                          _domain="com.microsoft", **attrs)
        return replacement

    return [RewriteRule(f"lstm-int8-{p.__name__[1:]}in-{n}out", p, make(n), check)
            for n in (1, 2, 3) for p in _lstm_patterns(n)]


def _weight_only_rules(q: _Run, place: OpPlacement) -> list[RewriteRule]:
    """DequantizeLinear(int8 W) -> op, for each arity of the op (with/without bias)."""

    def check(ctx, x, w, node, c=None):
        ok = q._weight_ok(ctx, node, w)
        if not ok:
            return ok
        if onnx_dtype(x) not in _FLOATS:
            return fail(f"input '{x.name}' is not float")
        if place.op in ("MatMul", "Gemm") and ctx.const_value(w).size < q.q.min_weight_elements:
            return fail(f"weight '{w.name}' has {ctx.const_value(w).size} elements (< min_weight_elements "
                        f"{q.q.min_weight_elements}): too small to pay off")
        return True

    def replacement(op, x, w, node, c=None):
        axis = place.weight_axis(node.attrs, np.asarray(ir.const_value(w)).ndim)
        dqw, _ = q._quant_weight(op, w, axis, q._gram(op, x, w, node))
        c = q._bias_after(op, x, w, node, c, axis)
        ins = [x, dqw] + ([c] if c is not None else [])
        return getattr(op, place.op)(*ins, **dict(node.attrs))

    arities = (2,) if place.op == "MatMul" else (2, 3)
    return [RewriteRule(f"wo-{place.op.lower()}-{a}", _pattern_for(place.op, a), replacement, check) for a in arities]


def _static_input_rules(q: _Run, place: OpPlacement) -> list[RewriteRule]:
    """Q/DQ on the activation input and a per-channel DQ weight; output left in float."""

    def check(ctx, x, w, node, c=None):
        ok = q._weight_ok(ctx, node, w)
        if not ok:
            return ok
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return fail("Gemm with transA=1")
        ok = q._act_ok(x)
        if ok and q.fuse_bias and node.op == "MatMul" and q._static_bias_ok(ctx, x, w, node) \
                and _bias_add_follows(ctx, node, ctx.const_value(w).shape[-1]):
            return fail("MatMul followed by a bias Add: fused with its bias (MatMulIntegerToFloat)")
        return ok

    def replacement(op, x, w, node, c=None):
        axis = place.weight_axis(node.attrs, np.asarray(ir.const_value(w)).ndim)
        dqw, _ = q._quant_weight(op, w, axis, q._gram(op, x, w, node))
        c = q._bias_after(op, x, w, node, c, axis)
        ins = [q._dq_input(op, x), dqw] + ([c] if c is not None else [])
        return getattr(op, place.op)(*ins, **dict(node.attrs))

    arities = (2,) if place.op == "MatMul" else (2, 3)
    return [RewriteRule(f"static-{place.op.lower()}-{a}", _pattern_for(place.op, a), replacement, check)
            for a in arities]


def _static_conv_rules(q: _Run, place: OpPlacement) -> list[RewriteRule]:
    """Conv [+ Relu]: Q/DQ input, per-channel weight, int32 bias, Q/DQ output (after the Relu) -> QLinearConv."""

    def check(ctx, x, w, node, b=None, with_relu=False):
        ok = q._layer_ok(ctx, node, w, x, min_ndim=3)
        if not ok:
            return ok
        if not with_relu:
            y = node.outputs[0]
            readers = ctx.consumers(y)
            if len(readers) == 1 and readers[0].op == "Relu":
                return fail("Conv followed by Relu: quantized with its Relu")
        if b is not None:
            bv = ctx.const_value(b)
            if bv is None or bv.dtype != np.float32:
                return fail("bias is not a constant float vector")
        return True

    def make(with_relu: bool, arity: int):
        def replacement(op, x, w, node, b=None):
            sx = np.float32(q.plan.params[x.name][0]) if not _is_dq(x) else _dq_scale(x)
            dqw, sw = q._quant_weight(op, w, 0, q._gram(op, x, w, node))
            ins = [q._dq_input(op, x), dqw]
            b = q._bias_after(op, x, w, node, b, 0)
            if b is not None:
                bv = np.asarray(ir.const_value(b), dtype=np.float32)
                bscale = (sx * sw).astype(np.float32)
                bq = np.rint(bv / bscale)
                if np.all(np.abs(bq) < 2**31 - 1):
                    ins.append(op.DequantizeLinear(op.const(bq.astype(np.int32), name=f"{b.name}_quantized"),
                                                   op.const(bscale, name=f"{b.name}_scale"),
                                                   op.const(np.zeros_like(bq, dtype=np.int32),
                                                            name=f"{b.name}_zero_point"), axis=0))
                else:
                    ins.append(b)
            y = op.Conv(*ins, **dict(node.attrs))
            out_name = (node.outputs[0].outputs[0].outputs[0].name if with_relu else node.outputs[0].name)
            if with_relu:
                y = op.Relu(y)
            if not place.quantize_output or out_name not in q.plan.params:
                return y
            return q._qdq_output(op, y, out_name)

        def chk(ctx, x, w, node, b=None):
            r = check(ctx, x, w, node, b, with_relu)
            if r and place.quantize_output and not with_relu and node.outputs[0].name not in q.plan.params \
                    and q.plan.params:
                return fail(f"no calibrated range for the output '{node.outputs[0].name}'")
            return r

        pat = {(False, 2): _conv2_pattern, (False, 3): _conv3_pattern,
               (True, 2): _conv2_relu_pattern, (True, 3): _conv3_relu_pattern}[(with_relu, arity)]
        return RewriteRule(f"static-conv{'-relu' if with_relu else ''}-{arity}", pat, replacement, chk)

    return [make(True, 2), make(True, 3), make(False, 2), make(False, 3)]


def _dq_scale(t: gs.Tensor) -> np.float32:
    dq = t.inputs[0]
    return np.float32(np.asarray(ir.const_value(dq.inputs[1])).reshape(-1)[0])
