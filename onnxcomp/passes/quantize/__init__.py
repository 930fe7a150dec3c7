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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ... import ir, qmath
from ...calibration.chunks import MomentChunks
from ...errors import CalibrationDataError, RecipeError
from ...rewrite import RewriteRule, apply_rules, fail, find_matches, query
from ...rewrite.rule import onnx_dtype
from ...targets import TARGETS, Target
from ...algorithms import awq, equalize as cle
from ...algorithms.unfold import with_patches
from ...algorithms.select import check_exclude, embedding_pattern, is_excluded
from ..base import LayerChange, PassContext, PassOutcome, WeightPass

from .rules import (_Plan, _Run, _activation_tensors, _const_weight, _conv_key, _dq_q_pattern, _gemm3_bias_pattern,
                    _gemm_weight, _input_width, _lstm_rules, _main_graph_tensors, _matmul_bias_pattern, _matmul_pattern,
                    _passthrough_q, _pattern_for, _same_qparams, _static_conv_rules, _static_input_rules,
                    _weight_only_rules)
from .fused import ATTENTION_PATTERNS, attention_rules, unfuse_embed_layernorm
from .smooth import _apply_smoothing, _observable, _smoothed_stats, _smoothing_scales, _unsmoothed
from ...algorithms.nbits import blocked_gptq, blocked_rtn, nbits_block

#: algorithm auto keeps an input's AWQ scales only where they remove at least this fraction of its weights'
#: output error (each scaled input costs a Mul at run time unless it folds into a constant Mul before it)
AWQ_MIN_GAIN = 0.05


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
    # the int8 weights of the integer kernels (static/dynamic with uint8 activations): full, pairs (8-bit, each
    # even-aligned same-sign pair along the inner dimension within 128: never saturates ORT CPU's AVX2 kernels;
    # Convs get 7 bits) or reduced (7 bits); default: the target's (ort-cpu: pairs)
    weight_range: Optional[Literal["full", "pairs", "reduced"]] = None
    # ORT's name for 7-bit weights: true is weight_range reduced, false full (weight_range wins when both are set)
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
    # adaround (needs calibration data): each weight rounded up or down as learned against the same second moment
    # (algorithms/adaround.py)
    algorithm: Literal["rtn", "gptq", "awq", "adaround", "auto"] = "auto"
    # fraction of mean(diag H) added to H's diagonal before inverting it; 0.1 rather than GPTQ's usual 0.01: with
    # the few thousand calibration tokens a user has, H is nearly singular (MiniLM-L3 int4, 64 sentences:
    # cosine 0.9900 at 0.01, 0.9921 at 0.1, 0.9922 at 0.3)
    gptq_damping: float = 0.1
    # ops: default every op the target table lists; exclude: node/tensor names or regexes left in float
    embeddings: bool = True  # also store embedding (Gather) tables quantized
    embedding_bits: Optional[Literal[4, 8]] = None  # default: 4 with 4-bit weights (ORT GatherBlockQuantized), else 8
    sensitivity: bool = True  # report the per-layer error of quantized vs float activations
    # static, and dynamic with calibration data: SmoothQuant-style migration of activation outliers into the MatMul
    # weights, x W = (x/s)(s W),
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
    # 4-bit weight_only: MatMul/Gemm/Gather nodes (names or regexes) whose weights get 8 bits instead (mixed
    # precision: an accuracy budget's back-off gives these layers 8 bits before it leaves any float)
    int8_nodes: tuple[str, ...] = ()
    # static/dynamic: MatMul/Gemm nodes (names or regexes) given int8 weights with float activations (8-bit
    # MatMulNBits on the CPU targets) instead: what an accuracy budget's back-off tries before leaving one float
    weight_only_nodes: tuple[str, ...] = ()

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
        if self.int8_nodes and self.weight_dtype not in ("int4", "uint4"):
            raise RecipeError("quantize.int8_nodes applies to 4-bit weights (weight_dtype int4/uint4)")
        check_exclude(self.int8_nodes, "quantize.int8_nodes")
        if self.weight_only_nodes and self.mode == "weight_only":
            raise RecipeError("quantize.weight_only_nodes applies to modes static and dynamic")
        check_exclude(self.weight_only_nodes, "quantize.weight_only_nodes")
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

    def soften(self, nodes: list[str]) -> "Quantize":
        """These layers compressed less: 4-bit weights at 8 bits (`int8_nodes`); static/dynamic layers with int8
        weights and float activations (`weight_only_nodes`)."""
        key = "int8_nodes" if self.mode == "weight_only" else "weight_only_nodes"
        have = getattr(self, key)
        return dataclasses.replace(self, **{key: tuple(have) + tuple(n for n in nodes if n not in have)})

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
        if details.get("quantized") or details.get("left_float_total"):
            lines.append(f"quantized: {details.get('quantized') or 'nothing'}; left in float: {details.get('left_float_total', 0)} "
                         "node(s) (reasons in the JSON/HTML report)")
        return lines

    # ------------------------------------------------------------------------------------------
    def run(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext) -> PassOutcome:
        target = TARGETS[ctx.target]
        notes: list[str] = []
        details: dict[str, Any] = {"mode": self.mode, "target": target.name, "weight_dtype": self.weight_dtype}
        tables: dict[str, tuple] = {}  # quantized embedding tables, shared by the smoothquant trials and the result
        source = self._unfuse(model, source, target, notes, details)
        source = self._equalize(model, source, ctx, target, notes, details, tables)
        # dynamic too, where there is data: MiniLM-L3 dynamic cosine 0.9979 -> 0.9992 (1 - cos 2.6x smaller) at
        # 0.43x/0.42x fp32 latency instead of 0.40x/0.40x (tools/bench_quantize.py, oc_dynamic vs *_no_smooth)
        if self.smoothquant is not None and (self.mode == "static" or (self.mode == "dynamic" and
                                                                       ctx.calibration_data)):
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
        softer = details.get("softer", {})  # what a budget may do for a layer before leaving it float
        out.layers = [LayerChange(n, e, softer=softer.get(n)) for n, e in errors.items()]
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
        measured = (self._sensitivity_reference(reference, layer_outputs, layer_input, ctx, notes)
                    if reference is not None and found else None)
        stats, quantized = self._rewrite(model, rules, notes)
        if run.rounding:
            details["rounding"] = run.rounding_summary()
        if run.corrections:
            details["bias_correction"] = {"layers": len(run.corrections), "corrections": run.corrections[:500]}
        if run.softer:
            details["softer"] = dict(sorted(run.softer.items()))
        run.grams.clear()
        details.update({"rewrites": stats.to_dict(), "quantized": quantized,
                        "left_float": left[:500], "left_float_total": len(left)})
        if measured is not None and quantized:
            details["sensitivity"] = self._sensitivity(model, *measured, layer_outputs, layer_input, ctx)
            for row in details["sensitivity"]:
                row["node"] = layer_node.get(row["tensor"], "")
        return PassOutcome(details=details, notes=notes)

    def _new_run(self, target: Target, details: dict[str, Any], tables: Optional[dict]) -> "_Run":
        """The state of one quantization run: activation dtype/symmetry, int8 weight range, static bias fusion."""
        run = _Run(self, _Plan(set(), {}, {}), tables)
        run.act_dtype = self.activation_dtype or target.activation_dtype
        run.act_sym = target.activation_symmetric if self.symmetric_activations is None else self.symmetric_activations
        if self.weight_range is not None:
            run.weight_range = self.weight_range
        elif self.reduce_range is not None:
            run.weight_range = "reduced" if self.reduce_range else "full"
        else:
            run.weight_range = (target.weight_range if self.mode == "dynamic" or run.act_dtype == "uint8"
                                else "full")
        run.fuse_bias = (self.mode == "static" and target.fuse_static_bias and run.act_dtype == "uint8"
                         and not run.act_sym)
        if self.mode != "weight_only":
            details["weight_range"] = run.weight_range
        run.nbits8 = target.cpu
        return run

    def _plan_activations(self, run: "_Run", found: list, observable: set, model: ir.Model,
                          source: onnx.ModelProto, ctx: PassContext, target: Target, notes: list[str],
                          details: dict[str, Any]) -> None:
        """Static mode: the activations the rules will quantize, calibrated once (their ranges in the plan)."""
        plan = run.plan
        for f in found:
            if f.rule.name.startswith("wo-"):  # weight_only_nodes: int8 weights, float activations
                continue
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
                elif n.op in ops or len(n.inputs) < 2 or ir.const_value(n.inputs[1]) is None:
                    continue  # taken by a rule (or rejected: below), or no constant weight to leave float
                elif self.mode in getattr(target.ops.get(n.op), "no_kernel", {}):
                    left.append({"node": n.name, "op": n.op, "reason": target.ops[n.op].no_kernel[self.mode]})
                elif self.mode in getattr(target.ops.get(n.op), "size_only_modes", ()):
                    left.append({"node": n.name, "op": n.op, "reason": (
                        f"{self.mode} {n.op} has no fused kernel on {target.name} (its weights would be dequantized "
                        f"every run: smaller, not faster); name it in quantize.ops to store it quantized anyway")})
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
        if self.algorithm in ("gptq", "awq", "adaround") and not ctx.calibration_data:
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
        groups: dict[str, list[tuple[gs.Node, gs.Tensor]]] = {}  # weights read a chunk at a time (over 2 GB)
        refused: set[str] = set()
        probes = [query("awq-probe", _matmul_pattern, self._awq_ok)]
        if self.algorithm == "awq":  # auto keeps Gemms unscaled: digits int4 held-out logit error MLP 0.0211 ->
            # 0.0230, CNN 0.0197 -> 0.0172 with the scales (tools/bench_algorithms.py): not better by default
            probes += [query("awq-probe-gemm-2", _pattern_for("Gemm", 2), self._awq_ok),
                       query("awq-probe-gemm-3", _gemm3_bias_pattern, self._awq_ok)]
        for f in find_matches(model, probes):
            b = f.match.bindings
            x, w = b["x"], b["w"]
            if f.graph is not model.graph or x.name not in have or len(w.outputs) != 1:
                refused.add(x.name)
                continue
            groups.setdefault(x.name, []).append((b["node"], w))
        groups = {k: v for k, v in groups.items() if k not in refused}
        if not groups:
            notes.append("awq: no 4-bit MatMul/Gemm input to scale")
            return
        feeds = self.calibration_feeds(ctx)
        chunks = MomentChunks([(x, -1, _input_width(*nws[0])) for x, nws in groups.items()],
                              lambda axes: ctx.moments(source, feeds, axes),
                              chunk_bytes=None if ir.is_big(source) else 1 << 62)  # small: one run
        counter = ctx.counter("quantize: awq scale search", len(groups))
        scales, rows = {}, []
        floor = AWQ_MIN_GAIN if self.algorithm == "auto" else 0.0
        for got in chunks.chunks():
            for x in [x for x in groups if x in got]:  # graph order, as in one run
                if got[x][0].shape[0] == _input_width(*groups[x][0]):
                    ws = [_gemm_weight(n, np.asarray(ir.const_value(w), np.float32)) for n, w in groups[x]]
                    rows.append(self._awq_input(x, ws, got[x][0], floor, scales))
                counter.tick()
        n = _apply_smoothing(model, scales) if scales else 0
        details["awq"] = {"scaled_inputs": len(scales), "layers": n, "inputs": rows[:500]}
        notes.append(f"awq: {len(scales)} of {len(rows)} MatMul/Gemm input(s) scaled ({n} layer(s)); "
                     f"mean output-error gain {np.mean([r['gain'] for r in rows]) if rows else 0:.1%}")

    def _awq_input(self, x: str, ws: list[np.ndarray], h: np.ndarray, floor: float,
                   scales: dict[str, np.ndarray]) -> dict[str, Any]:
        """The AWQ search for one input `x` read by the weights `ws` (input-major) with second moment `h`: its
        scale goes into `scales` when it helps by more than `floor` (auto: under GPTQ too); returns its row."""
        k = ws[0].shape[0]
        bs = nbits_block(self.block_size, k)
        choice = awq.search_scale(ws, h, lambda wm, hs, bs=bs: blocked_rtn(
            wm, np.diag(hs), bs, self.symmetric_weights))
        row = {"input": x, "weights": len(ws), "alpha": choice.alpha, "gain": choice.gain,
               "error_unscaled": choice.errors[0.0], "error": choice.errors[choice.alpha]}
        used = choice.alpha > 0 and choice.gain > floor
        if used and self.algorithm == "auto":  # auto rounds by GPTQ later: the scales must help there too
            wms = [awq.sample_rows(w) for w in ws]  # the rows the search scored
            gq = lambda wm, hs, bs=bs: blocked_gptq(wm, hs, bs, self.symmetric_weights, self.gptq_damping)
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
        if ir.is_big(source):  # all Grams at once would outweigh the weights: a few layers per calibration run
            return self._chunked_moments(found, wanted, source, ctx)
        axes = {u: ax for (_, ax), (u, _) in wanted.items()}
        got = ctx.moments(source, self.calibration_feeds(ctx), axes)
        grams, means = {}, {}
        for (name, axis), (u, c) in wanted.items():
            m = _scaled_moments(got, u, c, axis) if axes[u] == axis else None
            if m is not None:
                means[name] = m[1]
                if m[0] is not None:
                    grams[name] = m[0]
        algorithm = self._algorithm(ctx)
        if algorithm in ("gptq", "adaround") or (algorithm == "auto" and self.weight_dtype in ("int4", "uint4")):
            grams.update(self._conv_grams(found, model, source, ctx, have))
        return grams, means

    def _chunked_moments(self, found, wanted: dict, source: onnx.ModelProto, ctx: PassContext):
        """`_input_moments` over 2 GB: the input moments as MomentChunks views, collected a chunk at a time in graph
        order as the rewrite reads them (Conv inputs: their means; no patch Grams, they need a copy of the model)."""
        feeds = self.calibration_feeds(ctx)
        spec = {name: uc for (name, _), uc in wanted.items()}
        axis_of = {name: axis for name, axis in wanted}
        order, seen = [], set()
        for f in found:
            x, w = f.match.bindings.get("x"), f.match.bindings.get("w")
            if isinstance(x, gs.Tensor) and x.name in spec and x.name not in seen and isinstance(w, gs.Tensor):
                order.append((x.name, axis_of[x.name], _input_width(f.match.bindings["node"], w)))
                seen.add(x.name)

        def load(axes: dict[str, int]) -> dict[str, tuple[Optional[np.ndarray], np.ndarray]]:
            got = ctx.moments(source, feeds, {spec[n][0]: ax for n, ax in axes.items()})
            return {n: m for n in axes for m in [_scaled_moments(got, *spec[n], axes[n])] if m is not None}

        chunks = MomentChunks(order, load)
        return chunks.grams, chunks.means

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
        stats = ctx.collect(with_patches(source, convs), [], self.calibration_feeds(ctx), histogram=False,
                            gram_axes={k: 1 for k in convs})
        return {k: st.second_moment for k, st in stats.items() if k in convs and st.second_moment is not None}

    # -- BatchNormalization folding and cross-layer equalization ------------------------------------
    def _unfuse(self, model: ir.Model, source: onnx.ModelProto, target: Target, notes: list[str],
                details: dict[str, Any]) -> onnx.ModelProto:
        """ORT-fused embeddings (EmbedLayerNormalization) back to Gathers + LayerNormalization, so that their
        tables are quantized row-wise (fused.unfuse_embed_layernorm); the float model calibration reads."""
        if not {"EmbedLayerNormalization", "Gather"} <= self._ops(target):
            return source
        n = unfuse_embed_layernorm(model)
        if not n:
            return source
        details["unfused_embeddings"] = n
        notes.append(f"{n} EmbedLayerNormalization unfused (Gathers + LayerNormalization): its tables are then "
                     "int8 per row; its quantized kernel takes them uint8 per tensor (fused MiniLM-L3 static cosine "
                     "0.99815 that way, 0.99897 unfused)")
        return model.to_proto()

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
        elif self.equalize is None and (not ctx.calibration_data or ir.is_big(source)):
            # over 2 GB a trial is a float copy and two quantizations more: not measured either
            pairs, refused = cle.find_pairs(model, exclude=exclude)
            details["equalize_refused"] = refused[:100]
            why = "not measured on a model over 2 GB (each trial quantizes a copy of it)" if ctx.calibration_data \
                else "without calibration data to measure it"
            if pairs:
                notes.append(f"equalize: {len(pairs)} layer pair(s) could be equalized; left as they are {why} "
                             "(equalize: true forces it)")
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

    def _trial_reference(self, source: onnx.ModelProto, ctx: PassContext, feeds: Optional[list] = None):
        """The float outputs trials are scored against: `source` on `feeds` (default: the first 16 calibration
        samples)."""
        from ...validation.layers import reference_values

        feeds = self.calibration_feeds(ctx)[:16] if feeds is None else feeds
        return reference_values(source, [o.name for o in source.graph.output], feeds, ctx.providers), feeds

    #: trials that choose a fitted setting (SmoothQuant's alpha) score on the last quarter of the calibration
    #: samples, at most this many, fitting on the rest; with fewer than 8 samples they score in sample
    HELD_OUT_TRIAL_SAMPLES: ClassVar[int] = 16

    def _held_out_split(self, ctx: PassContext) -> tuple[PassContext, list]:
        """(a context whose calibration data leaves out the held-out samples, those samples); (ctx, the first 16)
        when there are too few samples to split."""
        feeds = self.calibration_feeds(ctx)
        n = min(self.HELD_OUT_TRIAL_SAMPLES, len(feeds) // 4)
        if len(feeds) < 8 or n < 2:
            return ctx, feeds[:16]
        return dataclasses.replace(ctx, calibration_data=feeds[:-n]), feeds[-n:]

    def _trial_error(self, trial: ir.Model, trial_source: onnx.ModelProto, ctx: PassContext, target: Target,
                     tables: dict, ref, feeds, rounding: bool = False) -> float:
        """Mean relative error of the outputs of `trial` quantized (calibrated on its float `trial_source`; nearest
        rounding, or with `rounding` the pass's own rounding and bias correction) against the float reference
        `ref` (`_trial_reference`)."""
        from ...validation.layers import compare_to

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
            # scored on calibration samples that neither the trials' scales nor their ranges saw: scored in
            # sample, a larger alpha always looks better (its scales fit those very samples' outliers), and on
            # held-out text it was worse (MiniLM-L3 static, 51 sentences: 0.9 chosen, cosine 0.99932 where 0.8
            # gives 0.99947)
            trial_ctx, held = self._held_out_split(ctx)
            ref, ref_feeds = self._trial_reference(source, ctx, held)
            if trial_ctx is not ctx:
                fit = trial_ctx.collect(source, sorted(weights), self.calibration_feeds(trial_ctx), histogram=False,
                                        channel_axes={n: -1 for n in weights})
                fit_x = {n: st.channel_absmax for n, st in fit.items() if st.channel_absmax is not None}
            else:
                fit_x = amax_x
            scores = {}
            shaped = ir.shape_inferred(source)
            for a in alphas:  # statistics, shapes, reference outputs and embedding tables are shared by the trials
                trial = ir.Model.from_proto(source, inferred=shaped)
                _apply_smoothing(trial, _smoothing_scales(fit_x, amax_w, a))
                scores[a] = self._trial_error(trial, source, trial_ctx, target, tables, ref, ref_feeds)
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
                  for i, p in enumerate((_matmul_pattern, _pattern_for("Gemm", 2), _gemm3_bias_pattern,
                                         *ATTENTION_PATTERNS))]
        for f in find_matches(model, probes):
            x = f.match.bindings["x"]
            mul = x.inputs[0] if len(x.inputs) == 1 and x.inputs[0].op == "Mul" else None
            # x and, when x = Mul(u, constant), u: a smoothing Mul folded into that one makes u the input
            for t in [x] + ([mul.inputs[0]] if mul is not None and len(mul.inputs) == 2 else []):
                if f.graph is model.graph and t.name in have:
                    grams[t.name] = -1
        return grams

    def _awq_ok(self, ctx, x, w, node, b=None):
        """A MatMul/Gemm the 4-bit weight-only rules would take: constant 2-D float32 weight large enough, float32
        x (a Gemm without transA, alpha or beta)."""
        ok = self._smooth_ok(ctx, x, w, node)
        if not ok:
            return ok
        if self.ops is not None and node.op not in self.ops:
            return fail(f"{node.op} not in ops")
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0
                                  or (b is not None and node.attrs.get("beta", 1.0) != 1.0)):
            return fail("Gemm with transA or alpha/beta != 1")
        if ctx.const_value(w).size < self.min_weight_elements:
            return fail(f"weight '{w.name}' has {ctx.const_value(w).size} elements (< min_weight_elements)")
        if is_excluded(node, self.int8_nodes):
            return fail("8-bit weights (int8_nodes)")
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

    def _sensitivity_reference(self, reference: onnx.ModelProto, names: list[str], inputs: dict[str, str],
                               ctx: PassContext, notes: list[str]):
        """The float values that `_sensitivity` compares against, with their feeds: taken before the rewrite,
        so that the float model's session never runs beside the quantized model (over 2 GB, that is the
        peak memory of the pass)."""
        from ...validation.layers import reference_values

        feeds = ctx.calibration_data or ctx.validation_data
        if not feeds:
            from ...data import generate_feeds, input_specs

            feeds = generate_feeds(reference, input_specs(reference), n=8)
            notes.append("per-layer sensitivity measured on generated inputs (no calibration/validation data)")
        feeds = list(feeds)[:16]
        wanted = sorted(set(names) | {inputs[n] for n in names if n in inputs})
        return reference_values(reference, wanted, feeds, providers=ctx.providers), feeds

    def _sensitivity(self, model: ir.Model, ref, feeds: list, names: list[str], inputs: dict[str, str],
                     ctx: PassContext) -> list[dict[str, Any]]:
        """Per quantized layer: error of its output vs the float model on calibration data, and the part of it
        the layer introduced (output error minus the error its input already carried), worst first."""
        from ...validation.layers import compare_to

        errs = compare_to(ref, model.to_proto(), feeds, providers=ctx.providers)
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
            ops -= {"Gather", "EmbedLayerNormalization"}
        return ops

    def _excluded(self, node: gs.Node) -> bool:
        return is_excluded(node, self.exclude)

    def _calibrate(self, plan: _Plan, model: ir.Model, source: onnx.ModelProto, ctx: PassContext, act_dtype: str,
                   act_sym: bool, notes: list[str]) -> None:
        from ...calibration import compute_range

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
    def _weight_only_node_rules(self, run: "_Run", target: Target, ops) -> list[RewriteRule]:
        """Static/dynamic: 8-bit MatMulNBits for the `weight_only_nodes` (first: their static rules refuse them)."""
        if not self.weight_only_nodes or not target.cpu:
            return []
        rules = []
        for op in ("MatMul", "Gemm"):
            if op in ops:
                pats = [_matmul_pattern] if op == "MatMul" else [_gemm3_bias_pattern, _pattern_for("Gemm", 2)]
                rules += [RewriteRule(f"wo-{op.lower()}-8bit{'-bias' if p is _gemm3_bias_pattern else ''}", p,
                                      run._nbits_replacement, run._nbits_check) for p in pats]
        return rules

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
        if "Attention" in ops and self.mode in ("dynamic", "static"):  # ORT-optimized attention: QAttention
            rules += attention_rules(run)
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
        else:
            rules += self._weight_only_node_rules(run, target, ops)
        if self.mode == "dynamic":
            if "MatMul" in ops:
                rules.append(RewriteRule("dyn-matmul-bias", _matmul_bias_pattern, run._dyn_replacement,
                                         run._dyn_check))
                rules.append(RewriteRule("dyn-matmul", _matmul_pattern, run._dyn_replacement, run._dyn_check))
            if "Gemm" in ops:  # Gemm(x, W[, b]) is a MatMul with a bias: same fused kernel
                rules.append(RewriteRule("dyn-gemm-2", _pattern_for("Gemm", 2), run._dyn_replacement, run._dyn_check))
                rules.append(RewriteRule("dyn-gemm-3", _gemm3_bias_pattern, run._dyn_replacement, run._dyn_check))
        elif self.mode == "static":
            if "MatMul" in ops and run.fuse_bias:
                # MatMul + bias Add as one com.microsoft.MatMulIntegerToFloat with its bias: ORT's QDQ fusion
                # leaves the Add a separate kernel (MiniLM-L3: 18 bias Adds, 1.0 of 6.8 ms at 128 tokens)
                rules.append(RewriteRule("static-matmul-bias", _matmul_bias_pattern, run._static_bias_replacement,
                                         run._static_bias_check))
            if "Gemm" in ops and run.fuse_bias:
                # likewise Gemm (ORT fuses a Q/DQ Gemm into QGemm only where a Q follows it: a Gemm with a float
                # output ran as a float Gemm of its dequantized weight; digits MLP batch 100: 0.65x -> 0.57x fp32)
                rules.append(RewriteRule("static-gemm-bias", _gemm3_bias_pattern, run._static_gemm_replacement,
                                         run._static_gemm_check))
                rules.append(RewriteRule("static-gemm", _pattern_for("Gemm", 2), run._static_gemm_replacement,
                                         run._static_gemm_check))
            for op in ("MatMul", "Gemm"):
                if op in ops:
                    rules += _static_input_rules(run, target.ops[op])
            if "Conv" in ops:  # the table says whether its output is quantized too (QLinearConv needs it)
                rules += _static_conv_rules(run, target.ops["Conv"])
        return rules


def _scaled_moments(got: dict, u: str, c: Optional[np.ndarray], axis: int
                    ) -> Optional[tuple[Optional[np.ndarray], np.ndarray]]:
    """(E[x x^T], E[x]) of x = u * c (c: a SmoothQuant scale vector, or None) from u's moments in `got`; the Gram
    only along the last axis (MatMul/Gemm inputs; a Conv's channel Gram is not what GPTQ reads). None when u was
    not observed or c does not fit."""
    if u not in got:
        return None
    h, mu = got[u]
    if c is not None and c.shape[0] != h.shape[0]:
        return None
    gram = None if axis != -1 else (h if c is None else h * np.outer(c, c))
    return gram, (mu if c is None else mu * c)
