"""`lowrank`: factorize the constant weight of MatMul/Gemm/Conv layers into two thinner ops.

A layer y = x·W with W [k, n] becomes y = (x·A)·B with A [k, r], B [r, n], where r·(k+n) < k·n. The bias stays on
the second op (Gemm: the second op is a Gemm with C and beta; MatMul: its Add is untouched). Conv kernels
[C_out, C_in, kh, kw] are factorized as the matrix [C_in·kh·kw, C_out]: a kh×kw Conv with r output channels
(same strides/pads/dilations) followed by a 1×1 Conv with the bias.

How W is factorized (numpy, float64, vectorised per layer):

* plain: truncated SVD W = UΣVᵀ, A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ (Σ split evenly, so both factors have similar
  ranges for a later quantize pass);
* whitened (default, needs calibration data): with the input Gram H = XᵀX of the layer's activations
  (streamed by ``collect_statistics``) and its damped Cholesky factor L Lᵀ = H + λ·mean(diag H)·I, the SVD of
  LᵀW = UΣVᵀ gives A = L⁻ᵀU_rΣ_r^½, B = Σ_r^½V_rᵀ: the rank-r product closest to W *in the layer's output on
  the calibration data* (3–7x less layer error than plain SVD on MiniLM-L3, tools/bench_lowrank.py). Conv layers are whitened by the
  input-channel Gram (H ≈ G_c ⊗ I over kernel positions; spatial correlation is ignored);
* ``refit``: B re-solved by least squares on the calibration activations, B = (AᵀHA)⁻¹AᵀHW.

The layer output error of every rank follows from the decomposition without running the model: the component
i contributes ``c_i`` to ``||X(W - A_r B_r)||²`` (whitened: σ_i² minus its part of the damping; plain:
σ_i²·u_iᵀHu_i), so rank rules and the report read cumulative sums.

Rank rules (exactly one): ``rank``; ``energy`` (fraction of Σσ² kept, on the whitened spectrum when whitening,
where it is about the fraction of the layer's output energy kept: energy e leaves a rel. error near √(1-e));
``params_ratio`` (default 0.5); ``error_budget`` (smallest rank whose layer output rel. L2 error on the
calibration data is within it; without calibration data, the weight's rel. Frobenius error). A rank with
r·(k+n) >= k·n is never used (the layer stays dense and the report says why).

Calibration data: whiten (default true) and allocation "sensitivity" need it and raise CalibrationDataError
without it (no silent fallback to plain SVD); ``whiten: false`` works without data. The default allocation is
uniform (``params_ratio`` per factorized layer, as the API contract says). Only main-graph layers are factorized when data is given (subgraph activations cannot be observed). With ``params_ratio`` and ``allocation: sensitivity`` the ratio is a budget for
all candidate layers together, spent where the model's outputs suffer least: each candidate rank of each layer
is probed end to end (``WeightProbe``: the product A·B fed in place of W) and ``allocate`` picks one per layer.

Under the target, a rank is used only where the factorized pair runs faster than the dense op (``speed_check``):
each (op, shape, rank, rows) is timed once with a tiny ORT model on the context's providers (interleaved
medians, ~50 ms a shape, cached in-process for the session) and the timings are in each layer's report row.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import numpy as np
import onnx

from .. import ir
from ..calibration.chunks import MomentChunks
from ..errors import CalibrationDataError, RecipeError
from ..rewrite import Plan, RewriteRule, apply_rules
from ..runtime.shape_speed import DEFAULT_ROWS, pair_speed
from ..algorithms.select import (ALREADY_QUANTIZED, WeightLayer, check_ops, find_weight_layers,
                                 quantized_weights_note, weight_pattern2, weight_pattern3)
from .base import LayerChange, PassContext, PassOutcome, WeightPass

_OPS = ("MatMul", "Gemm", "Conv")
_RULE_KEYS = ("rank", "energy", "params_ratio", "error_budget")
#: candidate ranks for sensitivity allocation, as fractions of the break-even rank k·n/(k+n)
_CANDIDATE_FRACTIONS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.42, 0.35, 0.28, 0.2, 0.14, 0.08)


# ----------------------------------------------------------------------------------------------- numerics
@dataclass
class Spectrum:
    """One layer's decomposition, ordered by decreasing singular value: W ≈ left[:, :r] @ right[:r]."""

    left: np.ndarray  # [k, p] float64 (A of every rank, columns scaled by σ^½)
    right: np.ndarray  # [p, n] float64 (B of every rank, rows scaled by σ^½)
    sv2: np.ndarray  # [p] squared singular values in the metric the rank rules read (whitened or plain)
    contrib: np.ndarray  # [p] each component's share of the layer output squared error (see module doc)
    total: float  # ||X W||² on the calibration data (or ||W||² without data)
    gram: Optional[np.ndarray]  # [k, k] H, undamped (None: no calibration data, or dropped once not needed)
    measured: bool = False  # errors are in the metric of the inputs (a Gram was given)

    @property
    def full_rank(self) -> int:
        return len(self.sv2)

    def energy_kept(self, r: int) -> float:
        s = float(self.sv2.sum())
        return float(self.sv2[:r].sum() / s) if s > 0 else 1.0

    def rel_errors(self) -> np.ndarray:
        """rel_errors()[r] = relative L2 error of the layer output at rank r (index 0 = rank 0)."""
        tail = np.concatenate([np.cumsum(self.contrib[::-1])[::-1], [0.0]])
        return np.sqrt(np.maximum(tail, 0.0) / self.total) if self.total > 0 else np.zeros(len(tail))

    def factors(self, r: int, refit: bool = False, w: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of rank r; with `refit`, B least-squares refitted to the weight `w` (default: left @ right,
        the weight itself while the decomposition is full rank)."""
        a, b = self.left[:, :r], self.right[:r]
        if refit and self.gram is not None:
            b = refit_second(a, self.left @ self.right if w is None else w, self.gram)
        return a, b


def damped_cholesky(h: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower Cholesky factor of H + damping·mean(diag H)·I (dead inputs get a unit diagonal), and the diagonal
    that was added; the damping grows tenfold until H is numerically positive definite."""
    from ..algorithms.sparsegpt import damped_hessian

    for attempt in range(8):
        hd = damped_hessian(h, damping * 10 ** attempt)
        try:
            return np.linalg.cholesky(hd), np.diag(hd) - np.diag(h)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the input Gram matrix is not positive definite even after extra damping")


def spectrum(w: np.ndarray, gram: Optional[np.ndarray], whiten: bool, damping: float = 0.01,
             kron: int = 1) -> Spectrum:
    """Decompose W [k, n] (y = x·W) plainly or whitened by the input Gram H [k/kron, k/kron] (Conv: the channel
    Gram, expanded as H ⊗ I_kron over the kernel positions of each channel)."""
    w64 = np.asarray(w, np.float64)
    h = None
    if gram is not None:
        h = np.asarray(gram, np.float64)
        if kron > 1:
            h = np.kron(h, np.eye(kron))
    if whiten and h is not None:
        low, added = damped_cholesky(h, damping)
        u, s, vt = np.linalg.svd(low.T @ w64, full_matrices=False)
        left_full = np.linalg.solve(low.T, u * s)  # L⁻ᵀUΣ: columns g_i with W = Σ_i g_i v_iᵀ
        # ||X D||² = ||Lᵀ D||² - Σ_j added_j ||D_j||², D = Σ_{i>r} g_i v_iᵀ with orthonormal v_i
        contrib = s ** 2 - (added @ np.square(left_full))
        root = np.sqrt(s)
        left = np.divide(left_full, root, out=np.zeros_like(left_full), where=root > 0)
        sv2 = s ** 2
    else:
        u, s, vt = np.linalg.svd(w64, full_matrices=False)
        root = np.sqrt(s)
        left = u * root
        sv2 = s ** 2
        contrib = sv2 * (np.sum(u * (h @ u), axis=0) if h is not None else 1.0)
    right = root[:, None] * vt
    total = float(np.sum((h @ w64) * w64)) if h is not None else float(np.sum(w64 * w64))
    return Spectrum(left, right, sv2, np.maximum(contrib, 0.0), total, h, h is not None)


def refit_second(a: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """B minimising ||X(W - A B)||² for inputs with Gram H: (AᵀHA)⁻¹AᵀHW (tiny ridge for stability)."""
    ha = h @ a
    m = a.T @ ha
    m[np.diag_indices_from(m)] += 1e-9 * max(float(np.trace(m)) / max(len(m), 1), 1e-30)
    return np.linalg.solve(m, ha.T @ w)


def output_rel_error(w: np.ndarray, approx: np.ndarray, h: Optional[np.ndarray]) -> float:
    """Relative L2 error of x·approx vs x·W over inputs with Gram H (weight Frobenius error when H is None)."""
    d = np.asarray(approx, np.float64) - w
    if h is None:
        den = float(np.sum(w * w))
        return math.sqrt(float(np.sum(d * d)) / den) if den > 0 else 0.0
    den = float(np.sum((h @ w) * w))
    return math.sqrt(max(float(np.sum((h @ d) * d)), 0.0) / den) if den > 0 else 0.0


def rank_for(rule: str, value: float, spec: Spectrum, k: int, n: int) -> int:
    """The rank a per-layer rule asks for (may be >= the break-even rank: the caller checks the saving)."""
    p = spec.full_rank
    if rule == "rank":
        return int(min(value, p))
    if rule == "params_ratio":
        return int(max(1, min(p, math.floor(value * k * n / (k + n)))))
    if rule == "energy":
        cum = np.cumsum(spec.sv2)
        if cum[-1] <= 0:
            return 1
        return int(min(p, np.searchsorted(cum / cum[-1], value - 1e-12) + 1))
    if rule == "error_budget":
        ok = np.nonzero(spec.rel_errors() <= value)[0]
        return int(max(1, ok[0])) if len(ok) else p
    raise ValueError(rule)


# ----------------------------------------------------------------------------------------------- the pass
@dataclass
class _Layer:
    """A planned layer: where it is, its matrix, decomposition, and what was decided."""

    layer: WeightLayer
    held: Optional[np.ndarray]  # [k, n] float32, y = x @ m (Gemm alpha/transB applied); None: read when needed
    shape: tuple[int, int] = (0, 0)  # of the matrix
    kron: int = 1  # Conv: kernel positions per input channel
    spec: Optional[Spectrum] = None
    ranks: list = field(default_factory=list)  # candidate ranks (fast enough), descending
    rank: int = 0
    skip: str = ""
    speed: dict = field(default_factory=dict)  # rank -> (dense ms, pair ms)
    probe: dict = field(default_factory=dict)  # rank -> end-to-end error

    @property
    def m(self) -> np.ndarray:
        """The weight as a [k, n] float32 matrix: held, or (over 2 GB, where holding every layer's would be the
        model once more) read from the layer each time."""
        return self.held if self.held is not None else self.layer.matrix()

    @property
    def k(self) -> int:
        return self.shape[0]

    @property
    def n(self) -> int:
        return self.shape[1]

    @property
    def dense_params(self) -> int:
        return self.k * self.n

    def params(self, r: int) -> int:
        return r * (self.k + self.n)


@dataclass(frozen=True)
class Lowrank(WeightPass):
    """Factorize MatMul/Gemm/Conv weights into two thinner ops (plain or activation-whitened truncated SVD)."""

    name: ClassVar[str] = "lowrank"
    weight_ops: ClassVar[tuple[str, ...]] = _OPS
    slower_hint: ClassVar[str] = "keep lowrank.speed_check on, or factorize fewer layers"
    # rank rule: exactly one of these four (none given: params_ratio 0.5)
    rank: Optional[int] = None  # fixed rank of every factorized layer
    energy: Optional[float] = None  # keep this fraction of the squared singular values (whitened when whitening)
    params_ratio: Optional[float] = None  # target params per layer (uniform) or of all candidates (sensitivity)
    error_budget: Optional[float] = None  # per layer: smallest rank with output rel. L2 error <= this
    whiten: bool = True  # activation-whitened SVD (needs calibration data; false = plain SVD of W)
    # how params_ratio is spread: per factorized layer ("uniform") or by measured end-to-end sensitivity under one
    # global budget ("sensitivity", needs calibration data: far more accurate at the same size, see
    # tools/bench_lowrank.py); default: sensitivity with calibration data and params_ratio, else uniform
    allocation: Optional[Literal["uniform", "sensitivity"]] = None
    refit: bool = False  # least-squares refit of the second factor on the calibration activations
    min_weight_elements: int = 4096  # smaller weights are left dense
    sensitivity_samples: int = 16  # calibration feeds each end-to-end sensitivity probe runs
    damping: float = 0.01  # whitening: λ in chol(H + λ·mean(diag H)·I)
    speed_check: bool = True  # use a rank only where the factorized pair is measured faster than the dense op
    speed_rows: Optional[int] = None  # rows (batch·sequence) the speed check times; default: calibration average

    def resolve(self, has_data: bool) -> "Lowrank":
        if self.allocation is not None:
            return self
        best = "sensitivity" if has_data and self.params_ratio is not None else "uniform"
        return dataclasses.replace(self, allocation=best)

    def __post_init__(self) -> None:
        given = [k for k in _RULE_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise RecipeError(f"lowrank: give exactly one of {list(_RULE_KEYS)} (the rank rule); got {given}")
        if not given:
            object.__setattr__(self, "params_ratio", 0.5)
        if self.rank is not None and self.rank < 1:
            raise RecipeError(f"lowrank.rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise RecipeError(f"lowrank.energy must be in (0, 1], got {self.energy}")
        if self.params_ratio is not None and not 0 < self.params_ratio < 1:
            raise RecipeError(f"lowrank.params_ratio must be in (0, 1), got {self.params_ratio}")
        if self.error_budget is not None and not 0 < self.error_budget < 1:
            raise RecipeError(f"lowrank.error_budget must be in (0, 1), got {self.error_budget}")
        if self.allocation == "sensitivity" and self.params_ratio is None:
            raise RecipeError(f"lowrank.allocation 'sensitivity' spreads a params_ratio budget across layers; it "
                              f"cannot be combined with {given[0]!r} (a per-layer rule)")
        if self.sensitivity_samples < 1:
            raise RecipeError("lowrank.sensitivity_samples must be >= 1")
        if self.speed_rows is not None and self.speed_rows < 1:
            raise RecipeError("lowrank.speed_rows must be >= 1")
        if not 0 <= self.damping < 10:
            raise RecipeError(f"lowrank.damping must be in [0, 10), got {self.damping}")
        super().__post_init__()

    @property
    def rule(self) -> tuple[str, float]:
        for k in _RULE_KEYS:
            if getattr(self, k) is not None:
                return k, float(getattr(self, k))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def summarize(cls, details: dict[str, Any]) -> list[str]:
        rows = details.get("layers") or []
        lines = [f"{details['method']} SVD, {details['allocation']} allocation: {len(rows)} layer(s) factorized, "
                 f"{details['params_before']:,} -> {details['params_after']:,} weights "
                 f"({details['params_ratio_factorized']:.2f} of those layers); {details.get('skipped_total', 0)} "
                 "layer(s) left dense (reasons in the JSON/HTML report)"]
        worst = sorted(rows, key=lambda r: -r.get("rel_err", r.get("weight_rel_err", 0.0)))[:3]
        if worst:
            lines.append("largest layer errors: " + ", ".join(
                f"{r['node']} (rank {r['rank']} of {min(r['k'], r['n'])}, rel err "
                f"{r.get('rel_err', r.get('weight_rel_err', 0.0)):.3g})" for r in worst))
        return lines

    def run(self, model: ir.Model, source: onnx.ModelProto, ctx: PassContext) -> PassOutcome:
        """Factorize the candidate layers of `model` (`source`: the same model as a ModelProto, for calibration)."""
        notes: list[str] = []
        rule, value = self.rule
        feeds = None if ctx.calibration_data is None else self.calibration_feeds(ctx)
        allocation = self._check_data(feeds)
        method = "whitened" if self.whiten else "plain"
        details: dict[str, Any] = {"method": method, "rule": {rule: value}, "allocation": allocation,
                                   "refit": self.refit, "target": ctx.target}
        plan, skipped = self._plan_layers(model, feeds, notes, hold=not ir.is_big(source))
        grams, rows = self._grams(plan, source, ctx, feeds) if feeds else ({}, None)
        if feeds and not self.whiten and not self.refit:
            notes.append("plain SVD: calibration data used only to report layer output errors")
        speed_rows = self.speed_rows or (int(round(rows)) if rows else DEFAULT_ROWS)
        self._spectra(plan, grams, notes, (rule, value, allocation == "sensitivity"))
        del grams
        if self.speed_check:
            self._check_speed(plan, ctx, speed_rows, not self.speed_rows and not rows, details, notes)
        chosen = self._choose_ranks(plan, source, ctx, feeds, value, allocation, details, notes)
        if self.speed_check:
            _time_chosen(chosen, speed_rows, ctx.providers)
        factors, rows_out = self._factorize(chosen)
        stats, rows_out = _apply(model, factors, rows_out, skipped, notes)
        return _outcome(plan, rows_out, stats, skipped, details, notes)

    # ------------------------------------------------------------------------------------------
    def _check_data(self, feeds: Optional[list]) -> str:
        """The allocation; raises when whitening or sensitivity allocation lacks calibration data (no fallback)."""
        if self.whiten and not feeds:
            raise CalibrationDataError("lowrank: whitened SVD needs calibration_data (the layers' input "
                                       "statistics); give calibration feeds, or set whiten: false for plain SVD")
        allocation = self.allocation or "uniform"  # the public contract: params_ratio is per factorized layer unless asked
        if allocation == "sensitivity" and not feeds:
            raise CalibrationDataError("lowrank: allocation 'sensitivity' needs calibration_data (end-to-end "
                                       "probes); give calibration feeds, or use allocation: uniform")
        return allocation

    def _plan_layers(self, model: ir.Model, feeds: Optional[list], notes: list[str], hold: bool = True
                     ) -> tuple[list[_Layer], list[dict[str, Any]]]:
        """The candidate layers (weight as a float32 matrix, held unless `hold` is false) and the layers skipped
        with the reason."""
        rejections: dict[str, str] = {}
        found = find_weight_layers(model, check_ops(self.ops, _OPS, "lowrank.ops"), self.exclude,
                                   self.min_weight_elements, main_graph_only=feeds is not None,
                                   rejections=rejections)
        skipped: list[dict[str, Any]] = [{"node": k, "reason": v} for k, v in rejections.items()
                                         if not v.startswith("no match")]
        quantized_note = quantized_weights_note(rejections)
        if quantized_note:
            notes.append(quantized_note)
        plan = []
        for wl in found:
            why = _unsupported(wl)
            if why:
                skipped.append({"node": wl.name, "reason": why})
                continue
            w = wl.weight
            kron = int(np.prod(w.shape[2:])) if wl.op == "Conv" else 1
            m = wl.matrix()  # float32 as stored; math upcasts where it runs
            plan.append(_Layer(wl, m if hold else None, tuple(m.shape), kron))
            del m
        return plan, skipped

    def _spectra(self, plan: list[_Layer], grams: dict[str, np.ndarray], notes: list[str], rule: tuple) -> None:
        """Decompose every planned layer, whitened by its input Gram where one of the right size was collected,
        choose its candidate ranks (`rule`: rank rule, value, sensitivity ladder), and keep only the factors up to
        the largest candidate (a full-rank decomposition per layer at once would be several times the weights)."""
        uses: dict[str, int] = {}
        for lay in plan:
            uses[lay.layer.x.name] = uses.get(lay.layer.x.name, 0) + 1
        for lay in plan:
            name = lay.layer.x.name
            g = grams.get(name)
            uses[name] -= 1
            if not uses[name]:  # the last layer reading this input: the dict lets go of its Gram
                grams.pop(name, None)
            if g is not None and g.shape[0] * lay.kron != lay.k:
                g = None
            lay.spec = spectrum(lay.m, g, self.whiten and g is not None, self.damping, lay.kron)
            if self.whiten and g is None:
                notes.append(f"{lay.layer.name}: input statistics unavailable; plain SVD used")
            _candidates(lay, *rule)
            top = max(lay.ranks, default=0)
            # over 2 GB (matrices read when needed) the factors are kept as float32, what they are stored as:
            # every layer's up to its largest candidate rank at float64 was the model's size once more
            dt = np.float64 if lay.held is not None else np.float32
            lay.spec.left = np.ascontiguousarray(lay.spec.left[:, :top], dtype=dt)
            lay.spec.right = np.ascontiguousarray(lay.spec.right[:top], dtype=dt)
            if not self.refit:  # only the refit reads the Gram again (errors come from the spectrum)
                lay.spec.gram = None

    def _check_speed(self, plan: list[_Layer], ctx: PassContext, speed_rows: int, guessed_rows: bool,
                     details: dict[str, Any], notes: list[str]) -> None:
        """Drop the candidate ranks not measured faster than the dense op, and say how the timing was done."""
        self._speed_filter([lay for lay in plan if lay.ranks], ctx, speed_rows)
        details["speed_check"] = {"rows": speed_rows, "providers": list(ctx.providers or ["CPUExecutionProvider"])}
        if guessed_rows:
            notes.append(f"speed check timed at {speed_rows} rows (no calibration data to take the size from)")

    def _choose_ranks(self, plan: list[_Layer], source: onnx.ModelProto, ctx: PassContext, feeds: Optional[list],
                      value: float, allocation: str, details: dict[str, Any], notes: list[str]
                      ) -> dict[str, _Layer]:
        """Set each live layer's rank (its largest candidate, or by sensitivity); the factorized layers by name."""
        live = [lay for lay in plan if lay.ranks and not lay.skip]
        if allocation == "sensitivity":
            details["budget"] = self._allocate(live, source, ctx, feeds, value, notes)
        else:
            for lay in live:
                lay.rank = lay.ranks[0]
        return {lay.layer.name: lay for lay in plan if lay.rank and not lay.skip}

    def _factorize(self, chosen: dict[str, _Layer]) -> tuple[Plan, list[dict[str, Any]]]:
        """The plan (each chosen layer's node -> its float32 factors (A, B)) and each layer's report row."""
        factors = Plan()
        rows_out = []
        for lay in chosen.values():
            a, b = lay.spec.factors(lay.rank, self.refit, lay.m)
            factors.add(lay.layer.node, (a.astype(np.float32), b.astype(np.float32)))
            rows_out.append(self._row(lay, a @ b if self.refit and lay.spec.gram is not None else None))
            if lay.held is None:  # over 2 GB: the factors are in the plan; the spectrum's copy goes
                lay.spec.left = lay.spec.right = lay.spec.gram = None
        return factors, rows_out

    def _grams(self, plan: list[_Layer], source: onnx.ModelProto, ctx: PassContext, feeds: list
               ) -> tuple[dict[str, np.ndarray], float]:
        """Input Gram per activation tensor (Conv: over input channels) and the average rows per feed."""
        axes = {}
        for lay in plan:
            axes[lay.layer.x.name] = 1 if lay.layer.op == "Conv" else -1
        if not axes:
            return {}, 0.0
        if ir.is_big(source):  # all Grams at once would outweigh the weights: a few layers per calibration run
            return self._chunked_grams(plan, axes, source, ctx, feeds)
        stats = ctx.collect(source, [], feeds, histogram=False, gram_axes=axes)
        grams = {n: st.gram for n, st in stats.items() if st.gram is not None and st.gram_rows}
        mm = [st.gram_rows for n, st in stats.items() if axes.get(n) == -1 and st.gram_rows]
        return grams, (float(np.mean(mm)) / len(feeds) if mm else 0.0)

    @staticmethod
    def _chunked_grams(plan: list[_Layer], axes: dict[str, int], source: onnx.ModelProto, ctx: PassContext,
                       feeds: list) -> tuple[Any, float]:
        """`_grams` over 2 GB: the Grams as a MomentChunks view read in plan order (a chunk of layers per
        calibration run; `_spectra` reads them in that order), and the rows per feed of the first chunk."""
        rows: list[int] = []

        def load(ax: dict[str, int]) -> dict[str, tuple[np.ndarray, None]]:
            stats = ctx.collect(source, [], feeds, histogram=False, gram_axes=ax)
            rows.extend(st.gram_rows for n, st in stats.items() if ax.get(n) == -1 and st.gram_rows)
            return {n: (st.gram, None) for n, st in stats.items() if st.gram is not None and st.gram_rows}

        order: dict[str, tuple[str, int, int]] = {}
        for lay in plan:
            order.setdefault(lay.layer.x.name, (lay.layer.x.name, axes[lay.layer.x.name], lay.k // lay.kron))
        grams = MomentChunks(list(order.values()), load).grams
        grams.get(next(iter(order)))  # the first chunk: the rows per feed
        return grams, (float(np.mean(rows)) / len(feeds) if rows else 0.0)

    def _speed_filter(self, plan: list[_Layer], ctx: PassContext, rows: int) -> None:
        """Keep the candidate ranks whose factorized pair is measured faster than the dense op. Ranks are
        tried from the largest down; the first faster one vouches for the smaller ones (fewer FLOPs)."""
        counter = ctx.counter("lowrank: speed checks", sum(len(lay.ranks) for lay in plan))
        for lay in plan:
            conv = _conv_speed_shape(lay.layer) if lay.layer.op == "Conv" else None
            if lay.layer.op == "Conv" and conv is None:
                counter.tick(len(lay.ranks))
                continue  # spatial size unknown: nothing to time (reported in the row)
            kept = []
            for i, r in enumerate(lay.ranks):
                dense_ms, pair_ms = lay.speed[r] = _time_pair(lay, r, conv, rows, ctx.providers)
                counter.tick()
                if pair_ms < dense_ms:
                    kept = lay.ranks[i:]
                    counter.tick(len(kept) - 1)  # the smaller ranks are not timed
                    break
            if not kept:
                r = lay.ranks[-1]
                d, p = lay.speed[r]
                lay.skip = (f"factorized pair not faster on {ctx.target} at rank {r} "
                            f"({p:.4f} ms vs {d:.4f} ms dense, {rows} rows)")
            lay.ranks = kept

    def _allocate(self, live: list[_Layer], source: onnx.ModelProto, ctx: PassContext, feeds: list, ratio: float,
                  notes: list[str]) -> dict[str, Any]:
        """Pick one rank (or dense) per layer so that the candidates' params fit ratio·dense, least end-to-end
        error first (errors probed per layer and rank, taken as additive)."""
        from ..algorithms.sensitivity import WeightProbe, allocate

        inits = {t.name for t in source.graph.initializer}
        users: dict[str, int] = {}
        for lay in live:
            users[lay.layer.w.name] = users.get(lay.layer.w.name, 0) + 1
        probed = [lay for lay in live if lay.layer.w.name in inits and users[lay.layer.w.name] == 1]
        for lay in live:
            if lay not in probed:
                lay.rank = next((r for r in lay.ranks if lay.params(r) <= ratio * lay.dense_params), lay.ranks[-1])
                notes.append(f"{lay.layer.name}: weight shared or not an initializer; uniform rank {lay.rank}")
        choices: dict[str, list[tuple[float, float]]] = {}
        if probed:
            probe = WeightProbe(source, [lay.layer.w.name for lay in probed], feeds[: self.sensitivity_samples],
                                **ctx.probe_args(source, "lowrank: sensitivity probes",
                                                 sum(len(lay.ranks) for lay in probed)))
            for lay in probed:
                opts = [(float(lay.dense_params), 0.0)]
                for r in lay.ranks:
                    a, b = lay.spec.factors(r, self.refit, lay.m)
                    err = probe.error({lay.layer.w.name: lay.layer.stored(a @ b)})
                    lay.probe[r] = err
                    opts.append((float(lay.params(r)), err))
                choices[lay.layer.name] = opts
        fixed = sum(lay.params(lay.rank) for lay in live if lay not in probed)
        total = sum(lay.dense_params for lay in live)
        budget = ratio * total - fixed
        pick = allocate(choices, budget) if choices else {}
        for lay in probed:
            j = pick.get(lay.layer.name, 0)
            lay.rank = lay.ranks[j - 1] if j else 0
        spent = sum(lay.params(lay.rank) if lay.rank else lay.dense_params for lay in live)
        est = sum(lay.probe.get(lay.rank, 0.0) for lay in probed)
        return {"params_target": int(ratio * total), "params_allocated": int(spent), "params_dense": int(total),
                "estimated_output_error": est, "probe_samples": min(len(feeds), self.sensitivity_samples)}

    def _row(self, lay: _Layer, approx: Optional[np.ndarray]) -> dict[str, Any]:
        spec = lay.spec
        err = (output_rel_error(lay.m, approx, spec.gram) if approx is not None  # refit: measured directly
               else float(spec.rel_errors()[lay.rank]))
        row = {"node": lay.layer.name, "op": lay.layer.op, "k": lay.k, "n": lay.n, "rank": lay.rank,
               "params_before": lay.dense_params, "params_after": lay.params(lay.rank),
               "energy_kept": spec.energy_kept(lay.rank),
               ("rel_err" if spec.measured else "weight_rel_err"): err}
        if lay.rank in lay.probe:
            row["output_error"] = lay.probe[lay.rank]
        if lay.rank in lay.speed:
            row["dense_ms"], row["pair_ms"] = lay.speed[lay.rank]
        return row


# ----------------------------------------------------------------------------------------------- helpers
def _candidates(lay: _Layer, rule: str, value: float, ladder: bool) -> None:
    """The ranks a layer may get, largest first: the rule's rank, or (sensitivity) a ladder of fractions of the
    break-even rank k·n/(k+n); never one without a parameter saving (then the layer is skipped, with why)."""
    be = lay.k * lay.n / (lay.k + lay.n)
    if ladder:
        cands = sorted({max(1, int(f * be)) for f in _CANDIDATE_FRACTIONS}, reverse=True)
    else:
        cands = [rank_for(rule, value, lay.spec, lay.k, lay.n)]
    lay.ranks = [r for r in cands if lay.params(r) < lay.dense_params]
    if not lay.ranks:
        r = rank_for(rule, value, lay.spec, lay.k, lay.n)
        lay.skip = (f"rank {r} saves no parameters ({r}·({lay.k}+{lay.n}) >= {lay.k}·{lay.n}; "
                    f"break-even rank {be:.0f})")


def _time_chosen(chosen: dict[str, _Layer], speed_rows: int, providers: Any) -> None:
    """Time the chosen ranks too (those vouched for by a larger faster rank), for the report rows."""
    for lay in chosen.values():
        conv = _conv_speed_shape(lay.layer) if lay.layer.op == "Conv" else None
        if lay.rank not in lay.speed and (conv is not None or lay.layer.op != "Conv"):
            lay.speed[lay.rank] = _time_pair(lay, lay.rank, conv, speed_rows, providers)


def _apply(model: ir.Model, factors: Plan, rows_out: list[dict[str, Any]], skipped: list[dict[str, Any]],
           notes: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    """Rewrite the factorized layers into `model`; the engine's stats and the rows of the layers it rewrote."""
    stats = apply_rules(model, _RULES, plan=factors)
    left = stats.unapplied  # a rewrite the engine refused (its type/shape check) leaves the node dense
    for row in rows_out:
        if row["node"] in left:
            skipped.append({"node": row["node"], "reason": "rewrite rejected by the engine (see notes)"})
    rows_out = [row for row in rows_out if row["node"] not in left]
    for node, reason in sorted(left.items()):
        notes.append(f"node {node}: factorized rewrite rejected: {reason}")
    return stats, rows_out


def _outcome(plan: list[_Layer], rows_out: list[dict[str, Any]], stats: Any, skipped: list[dict[str, Any]],
             details: dict[str, Any], notes: list[str]) -> PassOutcome:
    """The pass outcome: parameter totals, factorized and skipped layers, and notes on the layers left dense."""
    for lay in plan:
        if lay.skip:
            skipped.append({"node": lay.layer.name, "reason": lay.skip})
        elif not lay.rank:
            skipped.append({"node": lay.layer.name, "reason": "left dense by the sensitivity allocation"})
    before = sum(r["params_before"] for r in rows_out)
    after = sum(r["params_after"] for r in rows_out)
    cand_before = sum(lay.dense_params for lay in plan)
    details.update({
        "layers": rows_out,
        "factorized": stats.applied,
        "params_before": before, "params_after": after,
        "params_ratio_factorized": after / before if before else 1.0,
        "params_ratio_candidates": (cand_before - before + after) / cand_before if cand_before else 1.0,
        "skipped": skipped[:500], "skipped_total": len(skipped),
        "rewrites": stats.to_dict(),
    })
    _skip_notes(skipped, notes)
    layers = [LayerChange(r["node"], r.get("rel_err", r.get("weight_rel_err", 0.0)),
                          bytes_saved=4 * (r["params_before"] - r["params_after"])) for r in rows_out]
    return PassOutcome(details=details, notes=notes, layers=layers)


def _skip_notes(skipped: list[dict[str, Any]], notes: list[str]) -> None:
    """A note per layer left dense for a reason worth telling (at most 40 notes in all; the rest in details)."""
    for s in skipped:  # activation x activation MatMuls (attention) are not candidates: details only
        if not s["reason"].startswith(("excluded", "left dense")) and "is not a constant weight" not in s["reason"] \
                and ALREADY_QUANTIZED not in s["reason"]:
            notes.append(f"{s['node']}: not factorized: {s['reason']}")
    if len(notes) > 40:
        notes[:] = notes[:40] + [f"... {len(notes) - 40} more (see details.skipped)"]


def _time_pair(lay: _Layer, r: int, conv: Optional[dict], rows: int, providers: Any) -> tuple[float, float]:
    if conv is not None:
        return pair_speed("Conv", lay.k // lay.kron, lay.n, r, rows, providers, conv)
    return pair_speed("MatMul", lay.k, lay.n, r, rows, providers)


def _unsupported(wl: WeightLayer) -> str:
    if wl.op == "Conv":
        if int(wl.node.attrs.get("group", 1)) != 1:
            return "grouped Conv (group != 1)"
        if wl.node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "Conv with auto_pad SAME_* (the 1x1 second conv would need it too)"
    return ""


def _conv_speed_shape(wl: WeightLayer) -> Optional[dict]:
    shape = wl.x.shape
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    w = wl.weight
    attrs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in wl.node.attrs.items()}
    return {"cin": int(w.shape[1]), "kernel": list(w.shape[2:]), "spatial": list(shape[2:]), "attrs": attrs}


def _matmul(op, x, w, node, decision):
    fa, fb = decision
    h = op.MatMul(x, op.const(fa, name=f"{w.name}_lowrank_a"))
    return op.MatMul(h, op.const(fb, name=f"{w.name}_lowrank_b"))


def _gemm(op, x, w, node, decision, b=None):
    fa, fb = decision
    h = op.MatMul(x, op.const(fa, name=f"{w.name}_lowrank_a"))
    if b is None:
        return op.MatMul(h, op.const(fb, name=f"{w.name}_lowrank_b"))
    t = int(node.attrs.get("transB", 0))  # the second Gemm keeps the layout, C and beta; alpha is in the factors
    return op.Gemm(h, op.const(np.ascontiguousarray(fb.T) if t else fb, name=f"{w.name}_lowrank_b"), b,
                   transB=t, beta=float(node.attrs.get("beta", 1.0)))


def _conv(op, x, w, node, decision, b=None):
    fa, fb = decision
    cout, cin, *kernel = np.asarray(ir.const_value(w)).shape
    r = fa.shape[1]
    ak = np.ascontiguousarray(fa.T.reshape(r, cin, *kernel))
    bk = np.ascontiguousarray(fb.T.reshape(cout, r, *([1] * len(kernel))))
    attrs = {k: v for k, v in node.attrs.items() if k != "kernel_shape"}
    h = op.Conv(x, op.const(ak, name=f"{w.name}_lowrank_a"), kernel_shape=kernel, **attrs)
    ins = [h, op.const(bk, name=f"{w.name}_lowrank_b")] + ([b] if b is not None else [])
    return op.Conv(*ins, kernel_shape=[1] * len(kernel))


#: each planned node -> its two factors (the plan's decision: (A, B))
_RULES = [RewriteRule("lowrank-matmul", weight_pattern2("MatMul"), _matmul),
          RewriteRule("lowrank-gemm-2", weight_pattern2("Gemm"), _gemm),
          RewriteRule("lowrank-gemm-3", weight_pattern3("Gemm"), _gemm),
          RewriteRule("lowrank-conv-2", weight_pattern2("Conv"), _conv),
          RewriteRule("lowrank-conv-3", weight_pattern3("Conv"), _conv)]
