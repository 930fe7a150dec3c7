"""Quantization benchmark: onnxcomp's quantize pass vs ONNX Runtime's own quantizers, side by side in one run.

    python tools/bench_quantize.py [--quick] [--models minilm digits_cnn digits_mlp] [--methods ...]
                                   [--threads N] [--json out.json]

One table per model. Rows = methods; columns = size ratio (file bytes vs the fp32 file), latency ratio vs fp32
(CPU EP, batch 1; MiniLM at seq 32 and seq 128), and the task metric:

* MiniLM-L3: embedding cosine mean/min vs fp32, paraphrase ``pair_top1`` and ``neighbor_agreement``
  (``onnxcomp.testing.minilm_metrics``) on the first 200 sentences (the 100 paraphrase pairs), batch 1, unpadded.
* digits CNN / MLP: top-1 on the 500 test images, and its difference from fp32 in points.

Latency is ``onnxcomp.runtime.measure_latency``: each candidate is timed interleaved with the fp32
model in this process (pairs alternate which runs first, medians compared), each session built once and reused.
The seq-32/seq-128 feeds are the evaluation sentences right-padded (or truncated) to that length.

Methods (``--methods`` takes these names):
  fp32                 the reference row
  ort_static_default   ORT quantize_static, all defaults (QDQ, per-tensor, MinMax, int8 activations)
  ort_static_best      ORT quantize_static, the best of a few settings (listed under the table), chosen by
                       task metric (ties: cosine_mean within 0.001, top-1 within 0.2 pt), then latency
  ort_dynamic          ORT quantize_dynamic, per-channel int8 weights, MatMul (and Gemm for the digits models)
  ort_nbits4           ORT MatMulNBitsQuantizer, 4-bit, block 32, symmetric, accuracy_level=4 (MiniLM, MLP)
  ort_nbits4_gather    the same plus the word-embedding Gather -> GatherBlockQuantized (MiniLM only)
  oc_static, oc_static_percentile, oc_dynamic, oc_weight_only_int8, oc_weight_only_int4
                       onnxcomp.compress(...) with the ``quantize`` pass (rows print "n/a: reason" on failure);
                       static rows: *_rtn / *_gptq rounding, *_no_bc without bias correction, *_cle / *_no_cle
                       with / without cross-layer equalization (default: chosen on calibration data),
                       *_per_tensor one weight scale per tensor, *_vnni target ort-cpu-vnni (8-bit weights);
                       weight_only rows use the default rounding (algorithm auto with calibration data: per
                       layer GPTQ or nearest, whichever has the smaller output error); *_rtn / *_gptq force one

ORT's static calibrators need every calibration sample to have one shape, so ORT gets the calibration
sentences padded to the longest of them; onnxcomp gets them unpadded. The quantized models are written to a
temporary directory that is deleted at exit. Ratios come from one run on one machine: compare rows within a
table, not across machines.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import onnxcomp  # noqa: E402
from onnxcomp import testing  # noqa: E402
from onnxcomp.runtime import measure_latency  # noqa: E402

import ort_baselines as ob  # noqa: E402

Feeds = list[dict[str, np.ndarray]]

ALL_MODELS = ["minilm", "minilm_fused", "digits_cnn", "digits_mlp", "decoder"]
ORT_METHODS = ["ort_static_default", "ort_static_best", "ort_dynamic", "ort_nbits4", "ort_nbits4_gather"]
OC_RECIPES: dict[str, dict] = {
    "oc_static": {"passes": [{"type": "quantize", "mode": "static"}]},  # SmoothQuant alpha searched (default)
    "oc_static_no_smooth": {"passes": [{"type": "quantize", "mode": "static", "smoothquant": None}]},
    "oc_static_rtn": {"passes": [{"type": "quantize", "mode": "static", "algorithm": "rtn"}]},
    "oc_static_gptq": {"passes": [{"type": "quantize", "mode": "static", "algorithm": "gptq"}]},
    "oc_static_no_bc": {"passes": [{"type": "quantize", "mode": "static", "bias_correction": False}]},
    "oc_static_rtn_no_bc": {"passes": [{"type": "quantize", "mode": "static", "algorithm": "rtn",
                                        "bias_correction": False}]},
    "oc_static_cle": {"passes": [{"type": "quantize", "mode": "static", "equalize": True}]},
    "oc_static_no_cle": {"passes": [{"type": "quantize", "mode": "static", "equalize": False}]},
    "oc_static_per_tensor": {"passes": [{"type": "quantize", "mode": "static", "per_channel": False,
                                         "equalize": False}]},
    "oc_static_per_tensor_cle": {"passes": [{"type": "quantize", "mode": "static", "per_channel": False,
                                             "equalize": True}]},
    # 8-bit integer weights for CPUs whose u8 x s8 kernels do not saturate (VNNI, ARM64)
    "oc_static_vnni": {"target": "ort-cpu-vnni", "passes": [{"type": "quantize", "mode": "static"}]},
    # ORT's 7-bit weights (reduce_range), what ort-cpu gave before its same-sign weight pairs were bounded instead
    "oc_static_7bit": {"passes": [{"type": "quantize", "mode": "static", "weight_range": "reduced"}]},
    "oc_dynamic_7bit": {"passes": [{"type": "quantize", "mode": "dynamic", "weight_range": "reduced"}]},
    "oc_dynamic_vnni": {"target": "ort-cpu-vnni", "passes": [{"type": "quantize", "mode": "dynamic"}]},
    "oc_static_percentile": {"passes": [{"type": "quantize", "mode": "static", "calibration": "percentile"}]},
    "oc_dynamic": {"passes": [{"type": "quantize", "mode": "dynamic"}]},
    "oc_dynamic_rtn": {"passes": [{"type": "quantize", "mode": "dynamic", "algorithm": "rtn"}]},
    "oc_dynamic_no_smooth": {"passes": [{"type": "quantize", "mode": "dynamic", "smoothquant": None}]},
    "oc_weight_only_int8": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int8"}]},
    "oc_weight_only_int4": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4",
                                        "block_size": 32}]},
    "oc_weight_only_int8_rtn": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int8",
                                            "algorithm": "rtn"}]},
    "oc_weight_only_int4_rtn": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4",
                                            "block_size": 32, "algorithm": "rtn"}]},
    "oc_weight_only_int4_gptq": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4",
                                             "block_size": 32, "algorithm": "gptq"}]},
    "oc_weight_only_int4_b16": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4",
                                            "block_size": 16}]},
    # every MatMul/Gemm however small (min_weight_elements 0: the digits models' layers are under the default)
    "oc_wo_int4_all": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4",
                                   "block_size": 32, "min_weight_elements": 0}]},
    "oc_wo_int4_all_no_bc": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4",
                                         "block_size": 32, "min_weight_elements": 0, "bias_correction": False}]},
    "oc_wo_int4_all_rtn": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4",
                                       "block_size": 32, "min_weight_elements": 0, "algorithm": "rtn"}]},
    "oc_wo_int4_all_rtn_no_bc": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4",
                                             "block_size": 32, "min_weight_elements": 0, "algorithm": "rtn",
                                             "bias_correction": False}]},
    "oc_wo_int4_all_no_cle": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4",
                                          "block_size": 32, "min_weight_elements": 0, "equalize": False}]},
    "oc_wo_int4_conv": {"passes": [{"type": "quantize", "mode": "weight_only", "weight_dtype": "int4",
                                    "block_size": 32, "min_weight_elements": 0, "ops": ["Conv", "Gemm", "MatMul"]}]},
    "oc_default_recipe": None,  # onnxcomp's default recipe (what `onnxcomp compress` does without --recipe)
}
ALL_METHODS = ["fp32"] + ORT_METHODS + list(OC_RECIPES)

# ORT quantize_static settings tried for the "best" row (label -> settings for ort_baselines.static).
# uint8 activations: ORT's x86 kernels are U8S8; int8 activations (the default) ran 1.3-1.4x fp32 here.
_MM_NOOUT = {"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul"]}
MINILM_CANDIDATES: list[tuple[str, dict]] = [
    ("mm_pc_u8", dict(per_channel=True, activation_type="uint8", op_types=["MatMul"],
                      extra_options={"MatMulConstBOnly": True})),
    ("mm_pc_u8_inputs_only", dict(per_channel=True, activation_type="uint8", op_types=["MatMul"],
                                  extra_options=dict(_MM_NOOUT))),
    ("mm_pc_u8_inputs_only_pct", dict(per_channel=True, activation_type="uint8", op_types=["MatMul"],
                                      calibrate="percentile", extra_options=dict(_MM_NOOUT))),
    ("mm_pc_s8_inputs_only", dict(per_channel=True, op_types=["MatMul"], extra_options=dict(_MM_NOOUT))),
    ("mm_pc_u8_inputs_only_rr", dict(per_channel=True, reduce_range=True, activation_type="uint8",
                                     op_types=["MatMul"], extra_options=dict(_MM_NOOUT))),
    ("mm_pc_u8_inputs_only_actsym", dict(per_channel=True, activation_type="uint8", op_types=["MatMul"],
                                         extra_options=dict(_MM_NOOUT, ActivationSymmetric=True))),
    ("mm_gather_pc_u8_inputs_only", dict(per_channel=True, activation_type="uint8", op_types=["MatMul", "Gather"],
                                         extra_options=dict(_MM_NOOUT))),
    ("mm_pc_u8_inputs_only_pre", dict(pre_process=True, per_channel=True, activation_type="uint8",
                                      op_types=["MatMul"], extra_options=dict(_MM_NOOUT))),
]
CNN_CANDIDATES: list[tuple[str, dict]] = [
    ("conv_gemm_pc_u8", dict(per_channel=True, activation_type="uint8", op_types=["Conv", "Gemm"])),
    ("conv_gemm_pc_u8_pct", dict(per_channel=True, activation_type="uint8", op_types=["Conv", "Gemm"],
                                 calibrate="percentile")),
    ("conv_gemm_pc_s8", dict(per_channel=True, op_types=["Conv", "Gemm"])),
    ("all_ops_pc_u8", dict(per_channel=True, activation_type="uint8")),
    ("all_ops_pc_u8_pct", dict(per_channel=True, activation_type="uint8", calibrate="percentile")),
    ("conv_gemm_pc_u8_pre", dict(pre_process=True, per_channel=True, activation_type="uint8",
                                 op_types=["Conv", "Gemm"])),
]
MLP_CANDIDATES: list[tuple[str, dict]] = [
    ("gemm_pc_u8", dict(per_channel=True, activation_type="uint8", op_types=["Gemm"])),
    ("gemm_pc_u8_pct", dict(per_channel=True, activation_type="uint8", op_types=["Gemm"], calibrate="percentile")),
    ("gemm_pc_s8", dict(per_channel=True, op_types=["Gemm"])),
    ("all_ops_pc_u8", dict(per_channel=True, activation_type="uint8")),
    ("gemm_pc_u8_pre", dict(pre_process=True, per_channel=True, activation_type="uint8", op_types=["Gemm"])),
]
QUICK_CANDIDATES = {"minilm": ["mm_pc_u8_inputs_only", "mm_pc_u8"], "digits_cnn": ["conv_gemm_pc_u8", "all_ops_pc_u8"],
                    "digits_mlp": ["gemm_pc_u8", "gemm_pc_s8"]}


# ----------------------------------------------------------------------------------------------- model specs
@dataclass
class ModelBench:
    name: str
    path: Path
    calib_ort: Feeds  # one shape across samples (ORT's calibrators need it)
    calib_oc: Feeds  # what onnxcomp gets (variable length allowed)
    valid_oc: Feeds
    latency_feeds: dict[str, Feeds]  # column header -> feeds
    evaluate: Callable[[ort.InferenceSession], dict[str, float]]
    metric_cols: list[tuple[str, str, str]]  # (key, header, format)
    score_key: str
    tie_tol: float
    candidates: list[tuple[str, dict]]
    dynamic_ops: list[str]
    methods: list[str]
    footnotes: list[str] = field(default_factory=list)
    dynamic_options: dict[str, Any] = field(default_factory=dict)  # extra_options for ORT's quantize_dynamic


def _fixed_len(feeds: Feeds, length: int) -> Feeds:
    """Each batch-1 feed right-padded with pad id 0 / mask 0, or truncated, to ``length`` tokens."""
    out = []
    for f in feeds:
        ids, mask = f["input_ids"][:, :length], f["attention_mask"][:, :length]
        pad = length - ids.shape[1]
        if pad > 0:
            ids = np.pad(ids, ((0, 0), (0, pad)))
            mask = np.pad(mask, ((0, 0), (0, pad)))
        out.append({"input_ids": np.ascontiguousarray(ids), "attention_mask": np.ascontiguousarray(mask)})
    return out


def minilm_bench(quick: bool, sess_fn: Callable[[Any], ort.InferenceSession], fused: bool = False) -> ModelBench:
    """MiniLM-L3 as exported, or (fused) as ORT's transformers optimizer leaves it: then every ratio and metric is
    against the fused fp32 model, and ORT's quantize_dynamic also gets Attention and EmbedLayerNormalization."""
    path = testing.minilm_fused_path() if fused else testing.minilm_path()
    n_eval = 40 if quick else 200
    n_calib = 16 if quick else 64
    n_lat = 8 if quick else 24
    calib_oc = testing.minilm_feeds(n_calib, start=200)
    longest = max(f["input_ids"].shape[1] for f in calib_oc)
    calib_ort = testing.minilm_feeds(n_calib, start=200, pad_to=longest)
    eval_feeds = testing.minilm_feeds(n_eval)
    ref = testing.minilm_embed(sess_fn(path), eval_feeds)

    def evaluate(sess: ort.InferenceSession) -> dict[str, float]:
        m = testing.minilm_metrics(ref, testing.minilm_embed(sess, eval_feeds))
        m["pair_top1_fp32"] = m["ref_pair_top1"]
        return m

    lat_src = eval_feeds[:n_lat]
    cands = MINILM_CANDIDATES
    if quick:
        cands = [c for c in cands if c[0] in QUICK_CANDIDATES["minilm"]]
    notes = []
    if fused:
        base = testing.minilm_metrics(testing.minilm_embed(sess_fn(testing.minilm_path()), eval_feeds),
                                      ref)["cosine_min"]
        notes.append(f"fused by onnxruntime.transformers.optimizer (opt_level 0); its fp32 embeddings vs the "
                     f"exported model's: cosine min {base:.6f}. ORT's quantize_dynamic needs "
                     "DefaultTensorType FLOAT to run on it (it cannot type the contrib ops' outputs)")
    return ModelBench(
        name="minilm_fused" if fused else "minilm", path=path, calib_ort=calib_ort, calib_oc=calib_oc,
        valid_oc=eval_feeds[:8],
        latency_feeds={"lat s32": _fixed_len(lat_src, 32), "lat s128": _fixed_len(lat_src, 128)},
        evaluate=evaluate,
        metric_cols=[("cosine_mean", "cos mean", "{:.4f}"), ("cosine_min", "cos min", "{:.4f}"),
                     ("pair_top1", "pair_top1", "{:.3f}"), ("neighbor_agreement", "nbr agree", "{:.3f}")],
        score_key="cosine_mean", tie_tol=0.001, candidates=cands,
        dynamic_ops=["MatMul", "Attention", "EmbedLayerNormalization"] if fused else ["MatMul"],
        dynamic_options={"DefaultTensorType": onnx.TensorProto.FLOAT} if fused else {},
        methods=list(ALL_METHODS),
        footnotes=notes + [
            f"metrics on sentences 0..{n_eval - 1} (batch 1, unpadded; {n_eval // 2} paraphrase pairs); latency on "
            f"{n_lat} of them padded/truncated to 32 and to 128 tokens, batch 1",
            f"calibration: sentences 200..{199 + n_calib} (unpaired); ORT got them padded to {longest} tokens (the "
            "longest; its calibrators need one shape), onnxcomp got them unpadded",
        ],
    )


def digits_bench(kind: str, quick: bool, sess_fn: Callable[[Any], ort.InferenceSession]) -> ModelBench:
    d = testing.digits_data()
    path = testing.digits_cnn_path() if kind == "digits_cnn" else testing.digits_mlp_path()
    sfx = "" if kind == "digits_cnn" else "_flat"
    xc, xt = d["x_calib" + sfx], d["x_test" + sfx]
    calib = [{"input": xc[i:i + 1]} for i in range(len(xc))]
    n_lat = 16 if quick else 64
    lat = [{"input": xt[i:i + 1]} for i in range(n_lat)]
    lat100 = [{"input": xt[i:i + 100]} for i in range(0, len(xt) - 99, 100)]

    def evaluate(sess: ort.InferenceSession) -> dict[str, float]:
        return {"top1": testing.digits_top1(sess, d["x_test"], d["y_test"])}

    methods = [m for m in ALL_METHODS if m != "ort_nbits4_gather"]
    if kind == "digits_cnn":
        methods.remove("ort_nbits4")
    cands = CNN_CANDIDATES if kind == "digits_cnn" else MLP_CANDIDATES
    if quick:
        cands = [c for c in cands if c[0] in QUICK_CANDIDATES[kind]]
    notes = [f"top-1 on the {len(xt)} test images; latency: {n_lat} test images at batch 1, and the test set in "
             f"{len(lat100)} batches of 100 (at batch 1 these models run in microseconds: per-node overhead)",
             f"calibration: the {len(xc)} x_calib images, one per feed (same for ORT and onnxcomp)"]
    if kind == "digits_mlp":
        notes.append("ort_nbits4: the MLP's Gemms are rewritten to MatMul+Add first (MatMulNBits takes MatMul only)")
    return ModelBench(
        name=kind, path=path, calib_ort=calib, calib_oc=calib, valid_oc=lat[:8],
        latency_feeds={"lat b1": lat, "lat b100": lat100},
        evaluate=evaluate, metric_cols=[("top1", "top-1", "{:.3f}"), ("top1_delta_pt", "Δ pt", "{:+.1f}")],
        score_key="top1", tie_tol=0.002, candidates=cands, dynamic_ops=["MatMul", "Gemm"], methods=methods,
        footnotes=notes,
    )


def decoder_bench(quick: bool, sess_fn: Callable[[Any], ort.InferenceSession]) -> ModelBench:
    """The byte-level Llama-style decoder: next-byte top-1 agreement with fp32 and bits per byte on held-out text."""
    path = testing.decoder_path()
    n_eval = 16 if quick else 64
    n_lat = 4 if quick else 16
    calib = testing.decoder_feeds(testing.decoder_windows("calib", 32), batch_size=4)
    held = testing.decoder_windows("eval", n_eval)
    eval_feeds = testing.decoder_feeds(held)
    ref = testing.decoder_logits(sess_fn(path), eval_feeds)

    def evaluate(sess: ort.InferenceSession) -> dict[str, float]:
        return testing.decoder_metrics(ref, testing.decoder_logits(sess, eval_feeds), held)

    lat64 = testing.decoder_feeds(held[:n_lat], batch_size=1)
    lat128 = testing.decoder_feeds(testing.decoder_windows("eval", n_lat, seq=128), batch_size=1)
    return ModelBench(
        name="decoder", path=path, calib_ort=calib, calib_oc=calib, valid_oc=eval_feeds[:2],
        latency_feeds={"lat s64": lat64, "lat s128": lat128}, evaluate=evaluate,
        metric_cols=[("top1_agreement", "top1 agree", "{:.3f}"), ("bits_per_byte", "bpb", "{:.3f}"),
                     ("bpb_ratio", "bpb ratio", "{:.3f}")],
        score_key="top1_agreement", tie_tol=0.002, candidates=MINILM_CANDIDATES, dynamic_ops=["MatMul"],
        methods=[m for m in ALL_METHODS if m != "ort_nbits4_gather"],
        footnotes=[f"metrics: next-byte top-1 agreement with fp32 and bits per byte on {len(held)} held-out windows "
                   f"of 64 bytes (sentences.txt lines 340..399, never trained on); latency: {n_lat} windows at batch 1 "
                   "of 64 and of 128 bytes",
                   "calibration: 32 windows of 64 bytes of the training text, batch 4 (same for ORT and onnxcomp)"],
    )


def model_bench(name: str, quick: bool, sess_fn: Callable[[Any], ort.InferenceSession]) -> ModelBench:
    """The ModelBench of one fixture: minilm, decoder, digits_cnn or digits_mlp."""
    if name in ("minilm", "minilm_fused"):
        return minilm_bench(quick, sess_fn, fused=name == "minilm_fused")
    if name == "decoder":
        return decoder_bench(quick, sess_fn)
    return digits_bench(name, quick, sess_fn)


# ------------------------------------------------------------------------------------------------ running
@contextlib.contextmanager
def _quiet():
    """Silence ORT quantizer chatter (logging INFO/WARNING, print() from calibrators, Python warnings)."""
    buf = io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160] if text else ''}".rstrip(": ")


@dataclass
class Row:
    method: str
    size_ratio: float | None = None
    latency: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    build_s: float | None = None
    note: str = ""
    error: str | None = None
    fp32_ms: dict[str, float] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class Runner:
    def __init__(self, bench: ModelBench, tmp: Path, sess_fn, budget_s: float, log):
        self.b, self.tmp, self.sess_fn, self.budget_s, self.log = bench, tmp, sess_fn, budget_s, log
        self.fp32_bytes = os.path.getsize(bench.path)
        self.ref_sess = sess_fn(bench.path)
        self.ref_metrics = bench.evaluate(self.ref_sess)
        self.won_settings: str | None = None

    def measure(self, method: str, path: str | os.PathLike, build_s: float, note: str = "") -> Row:
        row = Row(method, build_s=build_s, note=note)
        row.size_ratio = os.path.getsize(path) / self.fp32_bytes
        sess = self.sess_fn(path)
        row.metrics = self.b.evaluate(sess)
        if "top1" in row.metrics:
            row.metrics["top1_delta_pt"] = 100.0 * (row.metrics["top1"] - self.ref_metrics["top1"])
        for col, feeds in self.b.latency_feeds.items():
            # runs: far more than fit, so the time budget decides (tiny models get thousands of pairs)
            res = measure_latency(self.ref_sess, sess, feeds, warmup=5, runs=5000, time_budget_s=self.budget_s)
            row.latency[col] = res.ratio
            row.fp32_ms[col] = res.reference_ms
            row.pairs[col] = res.pairs
        return row

    def fp32(self) -> Row:
        row = self.measure("fp32", self.b.path, 0.0)
        row.build_s, row.note = None, "2nd session vs 1st: noise floor"
        return row

    def build_and_measure(self, method: str, build: Callable[[str], Any], note: str = "") -> Row:
        dst = str(self.tmp / f"{self.b.name}.{method}.onnx")
        t0 = time.perf_counter()
        try:
            with _quiet():
                build(dst)
        except Exception as e:  # one failing method must not stop the table
            return Row(method, error=_first_line(e), build_s=time.perf_counter() - t0)
        build_s = time.perf_counter() - t0
        try:
            return self.measure(method, dst, build_s, note)
        except Exception as e:
            return Row(method, error="built, but fails to run: " + _first_line(e), build_s=build_s)

    def onnxcomp_row(self, method: str) -> Row:
        recipe = OC_RECIPES[method]

        def build(dst: str) -> None:
            res = onnxcomp.compress(str(self.b.path), recipe, calibration_data=self.b.calib_oc,
                                    validation_data=self.b.valid_oc, progress=False, validate=False)
            res.save(dst)

        return self.build_and_measure(method, build)

    def _latency_score(self, row: Row) -> float:
        vals = [v for v in row.latency.values() if v and v > 0]
        return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("inf")

    def static_best(self) -> tuple[Row, list[Row]]:
        tried = []
        for label, settings in self.b.candidates:
            self.log(f"  {self.b.name}: ort_static_best candidate {label}")
            row = self.build_and_measure(
                f"ort_static[{label}]", lambda dst, s=settings: ob.static(self.b.path, dst, self.b.calib_ort, s),
                note=ob.describe(settings))
            tried.append(row)
        ok = [r for r in tried if r.error is None]
        if not ok:
            return Row("ort_static_best", error="every candidate failed"), tried
        top = max(r.metrics[self.b.score_key] for r in ok)
        near = [r for r in ok if r.metrics[self.b.score_key] >= top - self.b.tie_tol]
        best = min(near, key=self._latency_score)
        won = Row(**{**best.__dict__, "method": "ort_static_best"})
        won.note = best.method[len("ort_static["):-1]
        self.won_settings = f"{won.note}: {best.note}"
        return won, tried

    def run(self, methods: Sequence[str]) -> dict:
        rows: list[Row] = []
        tried: list[Row] = []
        for m in methods:
            if m not in self.b.methods:
                continue
            self.log(f"  {self.b.name}: {m}")
            src = self.b.path
            if m == "fp32":
                row = self.fp32()
            elif m == "ort_static_default":
                row = self.build_and_measure(m, lambda dst: ob.static(src, dst, self.b.calib_ort, {}))
            elif m == "ort_static_best":
                row, tried = self.static_best()
            elif m == "ort_dynamic":
                row = self.build_and_measure(m, lambda dst: ob.dynamic(src, dst, self.b.dynamic_ops,
                                                                       extra_options=self.b.dynamic_options),
                                             note="ops " + "+".join(self.b.dynamic_ops))
            elif m == "ort_nbits4":
                row = self.build_and_measure(m, lambda dst: ob.nbits(src, dst, block_size=32, accuracy_level=4))
            elif m == "ort_nbits4_gather":
                row = self.build_and_measure(
                    m, lambda dst: ob.nbits(src, dst, block_size=32, accuracy_level=4, op_types=("MatMul", "Gather")))
            else:
                row = self.onnxcomp_row(m)
            rows.append(row)
        return {"rows": rows, "static_candidates": tried, "fp32_metrics": self.ref_metrics,
                "static_best_settings": self.won_settings}


# ------------------------------------------------------------------------------------------------ printing
def _fmt(v: float | None, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f.format(v)


def format_table(bench: ModelBench, result: dict) -> str:
    lat_cols = list(bench.latency_feeds)
    headers = ["method", "size"] + lat_cols + [h for _, h, _ in bench.metric_cols] + ["build s", "settings / note"]
    lines_rows = []

    def cells(r: Row) -> list[str]:
        if r.error:
            return [r.method, "n/a: " + r.error]
        c = [r.method, _fmt(r.size_ratio, "{:.3f}")]
        c += [_fmt(r.latency.get(k), "{:.2f}") for k in lat_cols]
        c += [_fmt(r.metrics.get(k), f) for k, _, f in bench.metric_cols]
        c += [_fmt(r.build_s, "{:.1f}"), r.note]
        return c

    for r in result["rows"]:
        lines_rows.append(cells(r))
    widths = [len(h) for h in headers]
    for c in lines_rows:
        if len(c) == len(headers):
            for i, x in enumerate(c[:-1]):
                widths[i] = max(widths[i], len(x))

    def join(c: list[str]) -> str:
        if len(c) != len(headers):
            return c[0].ljust(widths[0]) + "  " + c[1]
        return "  ".join(x.rjust(widths[i]) if 0 < i < len(c) - 1 else x.ljust(widths[i])
                         for i, x in enumerate(c)).rstrip()

    out = [join(headers), join(["-" * w for w in widths[:-1]] + ["-" * 15])]
    out += [join(c) for c in lines_rows]
    fp = next((r for r in result["rows"] if r.method == "fp32" and not r.error), None)
    ran = {r.method for r in result["rows"]}
    notes = [n for n in bench.footnotes if not n.startswith("ort_nbits4") or "ort_nbits4" in ran]
    if fp is not None:
        ms = ", ".join(f"{k} {v:.2f} ms" for k, v in fp.fp32_ms.items())
        notes.append(f"fp32 median latency: {ms}; fp32 metrics: " + ", ".join(
            f"{k}={result['fp32_metrics'][k]:.3f}" for k in ("pair_top1", "top1") if k in result["fp32_metrics"]))
    notes.append("size = file bytes / fp32 file bytes; lat = median(candidate) / median(fp32), interleaved pairs")
    out.append("")
    out += [f"  * {n}" for n in notes]
    if result["static_candidates"]:
        out.append(f"  * ort_static_best: best {bench.score_key} (ties within {bench.tie_tol:g}), then the lowest "
                   "latency (geometric mean of the latency columns); candidates tried:")
        for r in result["static_candidates"]:
            c = cells(r)
            if r.error:
                out.append(f"      {r.method}: n/a: {r.error}")
            else:
                lat = " ".join(f"{k}={r.latency[k]:.2f}" for k in lat_cols)
                met = " ".join(f"{h}={_fmt(r.metrics.get(k), f)}" for k, h, f in bench.metric_cols)
                out.append(f"      {r.method}: size={c[1]} {lat} {met}  [{r.note}]")
        if result.get("static_best_settings"):
            out.append(f"  * ort_static_best won: {result['static_best_settings']}")
    return "\n".join(out)


def machine_facts(threads: int) -> dict[str, Any]:
    cpu, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and not cpu:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {
        "cpu": cpu or platform.processor() or "unknown", "isa": isa, "logical_cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "providers": ["CPUExecutionProvider"], "intra_op_threads": threads or "ORT default (one per physical core)",
        "python": platform.python_version(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
    }


def start_run() -> tuple[dict[str, Any], Callable[[str], None]]:
    """Print the machine line the benchmarks open with; return the machine facts and a log() with elapsed time."""
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s]{msg}", file=sys.stderr, flush=True)

    facts = machine_facts(0)
    print(f"machine: {facts['cpu']}, {facts['logical_cpus']} logical CPUs; onnxruntime {facts['onnxruntime']} CPU; "
          f"load average at start {facts['loadavg']}")
    return facts, log


# ------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sentences, candidates and timed runs (< 2 min)")
    ap.add_argument("--models", nargs="+", choices=ALL_MODELS, default=ALL_MODELS)
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=ALL_METHODS,
                    help="fp32 is always measured (it is the reference)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads for every session (0 = ORT default)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timing per latency column per method (default 4, --quick 0.6)")
    ap.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    budget = args.budget if args.budget is not None else (0.6 if args.quick else 4.0)
    methods = ["fp32"] + [m for m in args.methods if m != "fp32"]

    def sess_fn(model: Any) -> ort.InferenceSession:
        if not args.threads:
            return testing.session(model)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = args.threads
        return ort.InferenceSession(os.fspath(model), sess_options=opts, providers=["CPUExecutionProvider"])

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s]{msg}", file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    facts = machine_facts(args.threads)
    print(f"machine: {facts['cpu']} ({', '.join(facts['isa']) or 'no AVX2'}), {facts['logical_cpus']} logical CPUs; "
          f"onnxruntime {facts['onnxruntime']} CPUExecutionProvider; intra-op threads: {facts['intra_op_threads']}; "
          f"python {facts['python']}; load average at start {facts['loadavg']}")
    print("note: every ratio comes from one run on a shared machine (interleaved timing vs fp32 in the same "
          "process); compare rows within a table. Each fp32 row times a 2nd fp32 session against the 1st: "
          "its distance from 1.00 is the noise floor; on a loaded 2-core machine small shapes vary by 10-30% run "
          "to run.")
    report: dict[str, Any] = {"machine": facts, "quick": args.quick, "latency_budget_s": budget, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        for name in args.models:
            t0 = time.perf_counter()
            log(f" {name}: preparing")
            try:
                bench = model_bench(name, args.quick, sess_fn)
            except testing.FixtureUnavailable as e:
                print(f"\n## {name}: skipped ({e})")
                report["models"][name] = {"skipped": str(e)}
                continue
            result = Runner(bench, Path(tmp), sess_fn, budget, log).run(methods)
            secs = time.perf_counter() - t0
            print(f"\n## {name}  ({bench.path.name}, {os.path.getsize(bench.path) / 1e6:.2f} MB fp32; {secs:.0f} s)")
            print(format_table(bench, result))
            sys.stdout.flush()
            report["models"][name] = {
                "file": str(bench.path), "seconds": secs, "fp32_metrics": result["fp32_metrics"],
                "rows": [r.to_dict() for r in result["rows"]],
                "static_candidates": [r.to_dict() for r in result["static_candidates"]],
                "static_best_settings": result["static_best_settings"],
                "footnotes": bench.footnotes,
            }
    total = time.perf_counter() - t_start
    report["seconds"] = total
    end_load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    report["loadavg_end"] = end_load
    print(f"\ntotal wall time: {total:.0f} s; load average at end {end_load}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
