"""The quantize pass's rewrite rules: the state one run of the pass gives them (`_Run`: options, calibrated
parameters, caches), the patterns they match, and the rule families per mode (weight-only, dynamic, static,
LSTM)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ... import ir, qmath
from ...rewrite import RewriteRule, fail
from ...rewrite.rule import onnx_dtype
from ...targets import OpPlacement, Target
from ...algorithms import adaround, bias, gptq
from ...algorithms.select import embedding_problem, is_excluded, weight_problem

from ...algorithms.nbits import block_grid, block_layout, nbits_block, pack_nibbles


if TYPE_CHECKING:
    from . import Quantize

#: algorithm auto also tries AdaRound on a weight when rows * cols^2 (the cost of one of its steps) is at most
#: this: on larger layers its few hundred steps cost minutes where GPTQ takes a second
ADAROUND_AUTO_MAX_COST = 1 << 22

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass
class _Plan:
    """What the pass decided before rewriting: tensors to calibrate and their quantization parameters."""

    activations: set
    params: dict  # tensor name -> (scale float32, zero point array)
    ranges: dict  # tensor name -> (lo, hi)
    calibrated: bool = False  # False while planning: rules accept any float activation


class _Run:
    """One application of a Quantize pass: its options plus the plan (calibrated parameters) the rules read."""

    def __init__(self, q: "Quantize", plan: _Plan, tables: Optional[dict] = None):
        self.q = q
        self.tables = {} if tables is None else tables  # embedding table name -> (q, scale): same in every trial
        self.plan = plan
        self.mode = q.mode
        self.nbits8 = False  # the target runs 8-bit MatMulNBits (Quantize._new_run)
        self.act_dtype = "uint8"  # static activations (Quantize._new_run: the option or the target)
        self.act_sym = False
        #: int8 weights of the integer kernels: full | pairs (same-sign K pairs bounded) | reduced (7 bits); set
        #: by Quantize._new_run from the options or the target
        self.weight_range = "full"
        self.fuse_bias = False  # static: MatMul + bias -> MatMulIntegerToFloat (ort-cpu, uint8 activations)
        self.wcache: dict[tuple[int, int], tuple[tuple[gs.Constant, ...], np.ndarray]] = {}  # (q, scale, zp)
        self.dqcache: dict[tuple[int, int], gs.Tensor] = {}  # their DequantizeLinear's output
        self.ccache: dict[tuple[int, bool], list[gs.Constant]] = {}
        self.algorithm = "rtn"  # rtn | gptq | adaround | auto (Quantize._algorithm)
        self.grams: dict[str, np.ndarray] = {}  # layer input name -> E[x x^T] (algorithm gptq/auto)
        self.rounding: dict[str, dict] = {}  # weight name -> {"algorithm", "rtn_error", "gptq_error"}
        self.means: dict[str, np.ndarray] = {}  # layer input name -> E[x] (bias correction)
        self.corrections: list[dict] = []  # per corrected layer: node, mean |shift| / mean |bias|
        #: node -> what an accuracy budget may give it short of float (LayerChange.softer): "int8" for 4-bit
        #: weights, "weight_only" for a static/dynamic MatMul/Gemm (int8 weights, float activations)
        self.softer: dict[str, str] = {}

    def _excluded(self, node: gs.Node) -> bool:
        return self.q._excluded(node)

    # -- shared checks --------------------------------------------------------------------------
    def soften_to_weight_only(self, node: gs.Node) -> None:
        """A static/dynamic MatMul/Gemm a budget may give int8 weights with float activations (where the
        target runs 8-bit MatMulNBits) before it leaves the layer float."""
        if self.mode != "weight_only" and self.nbits8 and node.op in ("MatMul", "Gemm"):
            self.softer[node.name] = "weight_only"

    def _weight_ok(self, ctx, node: gs.Node, w: gs.Tensor, min_ndim: int = 2):
        why = weight_problem(node, w, self.q.exclude, min_ndim)
        return fail(why) if why else True

    def _layer_ok(self, ctx, node: gs.Node, w: gs.Tensor, x: gs.Tensor, min_ndim: int = 2):
        """`_weight_ok` for w, then `_act_ok` for x (static/dynamic: not a node given int8 weights only)."""
        if self.mode != "weight_only" and is_excluded(node, self.q.weight_only_nodes):
            return fail("int8 weights only (weight_only_nodes)")
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
        if not self.grams or node.op not in ("MatMul", "Gemm", "Conv", "Attention") or len(op.ctx.consumers(w)) != 1:
            return None
        if node.op == "Conv":  # collected where GPTQ applies to Convs (Quantize._input_moments, see _conv_key)
            h = self.grams.get(_conv_key(node))
            v = ir.const_value(w)
            return h if h is not None and v is not None and h.shape[0] == int(np.prod(v.shape[1:])) else None
        h = self.grams.get(x.name)
        return h if h is not None and h.shape[0] == int(np.asarray(ir.const_value(w)).shape[
            1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0]) else None

    def _round(self, name: str, wm: np.ndarray, h: Optional[np.ndarray], scale: np.ndarray, zp: np.ndarray,
               qmin: int, qmax: int, block_size: int = 0, pair_limit: int = 0) -> np.ndarray:
        """Integer codes [rows, cols] of the output-major weight `wm` on the grid (scale, zp per row, or per
        row and block of `block_size` inputs): nearest rounding, GPTQ's or AdaRound's against `h` (auto: the
        one with the smallest output error on calibration data, AdaRound tried where its cost is small;
        recorded per weight). `pair_limit`: same-sign column pairs bounded for saturating kernels
        (`qmath.pair_bounded`; zero points 0)."""
        sc = np.asarray(scale, np.float32).reshape(wm.shape[0], -1)
        z = np.broadcast_to(np.asarray(zp, np.float32).reshape(wm.shape[0], -1), sc.shape)
        idx = np.arange(wm.shape[1]) // block_size if block_size else np.zeros(wm.shape[1], np.int64)
        rtn = np.clip(np.rint(wm / sc[:, idx]) + z[:, idx], qmin, qmax)  # QuantizeLinear: rounded, then + zp

        def bounded(c: np.ndarray) -> np.ndarray:
            if not pair_limit:
                return c
            return qmath.pair_bounded(c, wm / sc[:, idx] + z[:, idx], qmax, None if h is None else np.diag(h),
                                      pair_limit)

        if h is None:
            return bounded(rtn)
        codes = {"rtn": bounded(rtn)}
        if self.algorithm in ("gptq", "auto"):
            codes["gptq"] = gptq.quantize_grid(wm, h, sc, z, qmin, qmax, block_size, damping=self.q.gptq_damping,
                                               pair_limit=pair_limit).astype(np.float32)
        if self.algorithm == "adaround" or (self.algorithm == "auto" and
                                            wm.shape[0] * wm.shape[1] ** 2 <= ADAROUND_AUTO_MAX_COST):
            codes["adaround"] = bounded(adaround.adaround_grid(wm, h, sc, z, qmin, qmax, block_size)
                                        .astype(np.float32))
        errors = {k: gptq.output_error(wm, (c - z[:, idx]) * sc[:, idx], h) for k, c in codes.items()}
        use = self.algorithm if self.algorithm in codes and self.algorithm != "rtn" else min(errors, key=errors.get)
        self.rounding[name] = {"algorithm": use, **{f"{k}_error": e for k, e in errors.items()}}
        return codes[use]

    def _round_channels(self, name: str, wm: np.ndarray, h: Optional[np.ndarray], scale: np.ndarray,
                        zp: np.ndarray, qt: qmath.QType, pair_limit: int = 0) -> np.ndarray:
        """`_round` for a per-channel (or per-tensor) grid of `qt` on the output-major `wm`, as `qt`'s dtype."""
        rows = wm.shape[0]
        return self._round(name, wm, h, np.broadcast_to(scale, (rows,)), np.broadcast_to(zp, (rows,)),
                           qt.qmin, qt.qmax, pair_limit=pair_limit).astype(qt.np_dtype)

    def _int8_grid(self, symmetric: bool, qdtype: str = "int8") -> tuple[bool, int]:
        """(7-bit weights?, pair limit) for a weight given to an integer kernel (static/dynamic),
        from `weight_range`: 'pairs' bounds the same-sign pairs of symmetric per-channel int8 weights along the
        kernels' inner dimension (`qmath.PAIR_LIMIT`; `qmath.kernel_rows`) and gives per-tensor or asymmetric ones 7
        bits."""
        if self.mode == "weight_only" or self.weight_range == "full":  # weight_only: no integer kernel
            return False, 0
        if self.weight_range == "pairs" and symmetric and qdtype == "int8" and self.q.per_channel:
            return False, qmath.PAIR_LIMIT
        return True, 0

    def rounding_summary(self) -> dict[str, Any]:
        """Per weight rounded against calibration data: the algorithm used and both output errors."""
        rows = [{"weight": k, **v} for k, v in sorted(self.rounding.items())]
        return {**{k: sum(r["algorithm"] == k for r in rows) for k in ("gptq", "adaround", "rtn")},
                "layers": rows[:500]}

    def _weight_consts(self, op, w: gs.Tensor, axis: int, h: Optional[np.ndarray] = None, saturates: bool = True):
        """(int W, scale, zero point) constants for weight w, per channel along `axis`; made once per (weight,
        axis) even when several nodes share w. With `h` (a 2-D weight's input second moment), rounded by
        `_round` instead of to nearest. `saturates` False: the kernel never saturates (full 8-bit range)."""
        hit = self.wcache.get((id(w), axis))
        if hit is not None:
            return hit
        v = np.asarray(ir.const_value(w), dtype=np.float32)
        q, scale, zp = self._codes(w.name, v, axis, self.q.weight_dtype, self.q.symmetric_weights, h, saturates)
        consts = (op.const(q, name=f"{w.name}_quantized"), op.const(scale, name=f"{w.name}_scale"),
                  op.const(zp, name=f"{w.name}_zero_point"))
        self.wcache[(id(w), axis)] = (consts, scale)
        return consts, scale

    def _codes(self, name: str, v: np.ndarray, axis: int, qd: str, symmetric: bool, h: Optional[np.ndarray],
               saturates: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(integer codes, scale, zero point) of float weight `v`, per channel along `axis` (per tensor without
        per_channel), on the grid `_int8_grid` gives the integer kernels; rounded by `_round` where there is an
        input second moment `h` or the grid bounds pairs, else to nearest."""
        ax = axis if self.q.per_channel else None
        reduce, pairs = self._int8_grid(symmetric, qd) if saturates else (False, 0)
        if v.ndim > 2 and axis != 0:
            pairs, reduce = 0, reduce or bool(pairs)
        scale, zp = qmath.weight_params(v, ax, qd, symmetric, reduce_range=reduce)
        if not ((h is not None or pairs) and (v.ndim == 2 or axis == 0)):
            return qmath.quantize(v, scale, zp, ax, qd), scale, zp
        qt = qmath.reduced(qmath.QTYPES[qd]) if reduce else qmath.QTYPES[qd]
        if pairs or v.ndim == 2:
            wm, order = qmath.kernel_rows(v, axis)
        else:  # Conv [O, I, k...]: output-major rows of its im2col columns (the order of its Gram)
            wm, order = v.reshape(v.shape[0], -1), None
        if pairs:
            scale = qmath.pair_scales(wm, 127) if h is None else qmath.pair_safe_scales(wm, 127)
        hk = h if h is None or order is None else h[np.ix_(order, order)]
        q = qmath.from_kernel_rows(self._round_channels(name, wm, hk, scale, zp, qt, pairs), order, v.shape, axis)
        return q, scale, zp

    def _quant_weight(self, op, w: gs.Tensor, axis: int, h: Optional[np.ndarray] = None, saturates: bool = True):
        """(DequantizeLinear(int W), scale) for weight w (`_weight_consts`); one DequantizeLinear per weight."""
        consts, scale = self._weight_consts(op, w, axis, h, saturates)
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
        self.soften_to_weight_only(node)
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
        if self.mode != "weight_only" and not is_excluded(node, self.q.weight_only_nodes):
            return fail(f"{self.mode} quantization (not in weight_only_nodes)")
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
        bits = 8 if self.q.weight_dtype == "int8" or is_excluded(node, self.q.int8_nodes) else 4
        if bits == 4:
            self.softer[node.name] = "int8"
        bs = nbits_block(self.q.block_size, k)
        blocks = -(-k // bs)
        h = self._gram(op, x, w, node)
        _, scale, zp = block_layout(v.T, None if h is None else np.diag(h), bs, self.q.symmetric_weights, bits)
        codes = np.full((n, blocks * bs), 1 << (bits - 1), np.float32)
        codes[:, :k] = self._round(w.name, v.T, h, scale, zp, 0, (1 << bits) - 1, bs)
        if b is not None:  # the Gemm's bias (MatMulNBits input 5), less the mean shift of the rounded weights
            idx = np.arange(k) // bs
            w_hat = (codes[:, :k] - zp.astype(np.float32)[:, idx]) * scale[:, idx]  # [n, k]
            b = self._bias_minus_shift(op, x, node, b, w_hat.T.astype(np.float64) - v, "MatMul")
        q = codes.reshape(n, blocks, bs).astype(np.uint8)
        if bits == 4:
            q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
            zpk = pack_nibbles(zp).reshape(-1)
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
        if is_excluded(node, self.q.int8_nodes):
            return fail("8-bit table (int8_nodes)")
        bs = self.q.block_size or 32
        if ctx.const_value(w).shape[1] % bs:
            return fail(f"row length {ctx.const_value(w).shape[1]} is not a multiple of block_size {bs}")
        return True

    def _gather4_replacement(self, op, w, idx, node):
        """Table [R, D] -> ORT's GatherBlockQuantized: 4-bit blocks of `block_size` along each row, two values
        a byte (low nibble first), zero point 8; rows are dequantized after the lookup."""
        self.softer[node.name] = "int8"
        v = np.asarray(ir.const_value(w), dtype=np.float32)
        r, d = v.shape
        bs = self.q.block_size or 32
        wb = v.reshape(r, d // bs, bs)
        scale, zp = block_grid(wb, self.q.symmetric_weights)
        q = np.clip(np.rint(wb / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8).reshape(r, d)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
        zps = [] if self.q.symmetric_weights else [op.const(pack_nibbles(zp), name=f"{w.name}_q4_zp")]
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
        self.soften_to_weight_only(node)
        consts = self._kn_consts(op, x, w, node)
        ins = [x, *consts]
        if b is not None:
            v = _gemm_weight(node, np.asarray(ir.const_value(w), dtype=np.float64))
            ins.append(self._corrected_bias(op, x, node, b, v, consts, 1, layout="MatMul"))
        return op.DynamicQuantizeMatMul(*ins, _domain="com.microsoft")

    def _static_gemm_check(self, ctx, x, w, node, b=None):
        """Whether Gemm(x, W[, b]) can be MatMulIntegerToFloat: `_static_bias_ok`, no transA, alpha/beta 1, a
        float bias vector over the output columns."""
        ok = self._static_bias_ok(ctx, x, w, node)
        if not ok:
            return ok
        a = node.attrs
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or (b is not None and a.get("beta", 1.0) != 1.0):
            return fail("Gemm with transA or alpha/beta != 1")
        if b is not None:
            bv = ctx.const_value(b)
            n_out = _gemm_weight(node, ctx.const_value(w)).shape[1]
            if bv is None or bv.ndim != 1 or bv.shape[0] != n_out or bv.dtype != np.float32:
                return fail("bias is not a constant float vector over the output columns")
        return True

    def _static_gemm_replacement(self, op, x, w, node, b=None):
        """Gemm(x, W, b) -> MatMulIntegerToFloat(Q(x), int8 W as [K, N], s_x, s_w, z_x, z_w, b): ORT CPU fuses a
        Q/DQ Gemm (into QGemm) only where a Q follows it, so a Gemm with a float output (a classifier's last
        layer) ran as a float Gemm of its dequantized weight. Digits MLP at batch 100: 0.65x -> 0.57x fp32."""
        self.soften_to_weight_only(node)
        xq, sx, zx = self._q_input(op, x)
        consts = self._kn_consts(op, x, w, node)
        if b is not None:
            v = _gemm_weight(node, np.asarray(ir.const_value(w), dtype=np.float64))
            b = self._corrected_bias(op, x, node, b, v, consts, 1, layout="MatMul")
        return op.MatMulIntegerToFloat(xq, consts[0], sx, consts[1], zx, consts[2], *([b] if b is not None else []),
                                       _domain="com.microsoft")

    def _kn_consts(self, op, x, w, node) -> list[gs.Constant]:
        """(int8 W as [K, N], per-column scales, zero points) of a MatMul/Gemm weight for the integer kernels that
        take B as [K, N] (Gemm's transB undone), rounded against x's second moment where there is one; made once
        per weight and layout, shared by every node reading it."""
        key = (id(w), bool(node.op == "Gemm" and node.attrs.get("transB", 0)))
        consts = self.ccache.get(key)
        if consts is None:
            v = _gemm_weight(node, np.asarray(ir.const_value(w), dtype=np.float32))
            q, scale, zp = self._codes(w.name, v, 1, "int8", True, self._gram(op, x, w, node))
            consts = self.ccache[key] = [op.const(q, name=f"{w.name}_quantized"),
                                         op.const(scale, name=f"{w.name}_scale"),
                                         op.const(zp, name=f"{w.name}_zero_point")]
        return consts


#: GPTQ on Conv weights (im2col Gram), digits CNN, 500 held-out images, logit relative error / top-1 agreement
#: with fp32: 4-bit weight-only 0.00138 / 0.996 (nearest) -> 0.00094 / 0.998; static int8 6e-5 / 1.000 ->
#: 4e-5 / 0.998 and 8-bit weight-only 4e-5 / 1.000 -> 3e-5 / 0.998 (one image): so algorithm auto uses it for
# 4-bit Conv weights only; algorithm gptq uses it at every width.
def _conv_key(node: gs.Node) -> str:
    """The name of a Conv's unfolded input patches (and of their Gram) in quantize's calibration probe."""
    return f"{node.name}::quantize_unfold"


def _gemm_weight(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """The [k, n] matrix a MatMul-style kernel needs (Gemm with transB=1 stores W as [n, k])."""
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return np.ascontiguousarray(w.T)
    return w


def _input_width(node: gs.Node, w: gs.Tensor) -> int:
    """The input size of a MatMul/Gemm (K) or Conv (channels) weight, from its shape (nothing loaded: over 2 GB
    a read is a copy)."""
    shape = tuple(w.shape or ())
    if not shape:
        return 0
    if node.op == "Conv":
        return int(shape[1] * node.attrs.get("group", 1)) if len(shape) > 1 else 0
    return int(shape[1] if node.op == "Gemm" and node.attrs.get("transB", 0) and len(shape) == 2 else shape[0])


def _dq_q_pattern(op, q, s1, z1, s2, z2):
    return op.QuantizeLinear(op.DequantizeLinear(q, s1, z1, _bind="dq"), s2, z2, _bind="qn")


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


def _main_graph_tensors(graph: gs.Graph) -> set[str]:
    names = {t.name for t in graph.inputs}
    for n in graph.nodes:
        names.update(t.name for t in n.outputs)
    return names


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
        flat = v.reshape(-1, v.shape[2])  # rows: gate channels; columns: the kernel's inner dimension
        pairs = q.weight_range != "full"  # the kernel's u8 x s8 GEMM saturates K pairs like the others
        if q.q.per_channel:  # one scale per (direction, gate channel)
            scale, zp = qmath.weight_params(flat, 0, "int8", True)
            if pairs:
                scale = qmath.pair_scales(flat, 127)
            row_scale = scale
        else:  # one per direction (the kernel's per-tensor form), the same for both
            scale, zp = qmath.weight_params(v, None, "int8", True)
            if pairs:  # one scale for every row: the one with which no pair of any row is clipped
                scale = np.float32(max(float(scale), float(qmath.pair_safe_scales(flat, 127).max())))
            row_scale = np.full(flat.shape[0], scale, np.float32)
        qv = qmath.quantize(flat, row_scale, np.zeros(flat.shape[0], np.int8), 0, "int8")
        if pairs:
            qv = qmath.pair_bounded(qv, flat / row_scale[:, None], 127)
        qv = qv.reshape(v.shape).astype(np.int8)
        if q.q.per_channel:
            scale, zp = scale.reshape(v.shape[:2]), zp.reshape(v.shape[:2])
        else:
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
        if is_excluded(node, q.q.weight_only_nodes):
            return fail("int8 weights only (weight_only_nodes)")
        ok = q._act_ok(x)
        if ok and q.fuse_bias and node.op == "MatMul" and q._static_bias_ok(ctx, x, w, node) \
                and _bias_add_follows(ctx, node, ctx.const_value(w).shape[-1]):
            return fail("MatMul followed by a bias Add: fused with its bias (MatMulIntegerToFloat)")
        return ok

    def replacement(op, x, w, node, c=None):
        q.soften_to_weight_only(node)
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
            # ORT's depthwise kernels never saturated, full-range 8-bit weights included (QEMU's Haswell CPU)
            depthwise = node.attrs.get("group", 1) > 1 and np.asarray(ir.const_value(w)).shape[1] == 1
            dqw, sw = q._quant_weight(op, w, 0, q._gram(op, x, w, node), saturates=not depthwise)
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
