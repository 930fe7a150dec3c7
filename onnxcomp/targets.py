"""Deployment targets as data: providers, and where quantization pays off on each (placement tables).

Passes read these tables instead of branching on provider names. A row says, for one op type, which
quantization modes the target has fast kernels for, where the weight is and its per-channel axis, and
whether the output must be quantized too for the runtime to fuse an integer kernel (ORT CPU fuses
DQ->Conv->Q into QLinearConv only with the output quantized; a MatMul fuses into MatMulIntegerToFloat with
its inputs quantized and its output left in float, measured as the accurate choice on MiniLM-L3 by tools/bench_quantize.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

Attrs = Mapping[str, Any]


def _last_axis(attrs: Attrs, ndim: int) -> int:
    return ndim - 1


def _gemm_axis(attrs: Attrs, ndim: int) -> int:
    return 0 if attrs.get("transB", 0) else 1


def _axis0(attrs: Attrs, ndim: int) -> int:
    return 0


def _axis1(attrs: Attrs, ndim: int) -> int:
    return 1


@dataclass(frozen=True)
class OpPlacement:
    """How one op type is quantized on a target."""

    op: str
    weight_axis: Callable[[Attrs, int], int]  # output-channel axis of the weight, for per-channel scales
    modes: tuple[str, ...]  # quantization modes with a fast kernel on this target
    quantize_output: bool = False  # static: Q/DQ on the output too (needed for a fused integer kernel)
    #: modes that work but have no fused kernel (weights dequantized every run: smaller, not faster);
    #: used only when the recipe names the op in `ops`
    size_only_modes: tuple[str, ...] = ()
    #: modes with no kernel at all for the op's weights: mode -> why, listed where such a node stays float
    no_kernel: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One deployment target: ORT providers to validate/time with, and its quantization placement table."""

    name: str
    providers: tuple[str, ...]
    activation_dtype: str = "uint8"
    activation_symmetric: bool = False
    #: the int8 weights of the integer kernels (static/dynamic): "full"; "pairs": 8-bit with the codes of each
    #: even-aligned same-sign pair along the kernels' inner dimension (a Conv's in NHWC im2col order) adding up to
    #: at most 128 (`qmath.PAIR_LIMIT`), what ORT CPU's uint8 x int8 kernels on x86 without VNNI (AVX2) sum in
    #: int16 without saturating (depthwise Convs, whose kernel does not saturate, keep the full range);
    #: "reduced": 7 bits (ORT's reduce_range). 8-bit weights saturate there: MiniLM-L3 dynamic embedding cosine
    #: 0.986 with 8-bit, 0.997 with 7-bit
    weight_range: str = "full"
    #: static MatMul + bias Add emitted as one com.microsoft.MatMulIntegerToFloat with its bias (ORT CPU's QDQ
    #: fusion leaves the Add a separate kernel: MiniLM-L3, 18 Adds, 1.0 of 6.8 ms at 128 tokens)
    fuse_static_bias: bool = False
    ops: Mapping[str, OpPlacement] = field(default_factory=dict)

    #: op types never quantized, with the reason the report gives
    keep_float: Mapping[str, str] = field(default_factory=dict)

    @property
    def cpu(self) -> bool:
        """Runs on ONNX Runtime's CPU execution provider (its com.microsoft CPU kernels are available)."""
        return self.providers == ("CPUExecutionProvider",)


_KEEP_FLOAT = {
    "LayerNormalization": "normalisation is sensitive to rounding and has no integer kernel",
    "SkipLayerNormalization": "normalisation is sensitive to rounding and has no integer kernel",
    "BatchNormalization": "folded into the preceding Conv by ORT; quantizing it only adds Q/DQ",
    "Softmax": "probabilities need float resolution; no integer kernel",
    "Erf": "transcendental; no integer kernel", "Tanh": "transcendental; no integer kernel",
    "Sigmoid": "transcendental; no integer kernel", "Gelu": "transcendental; no integer kernel",
    "Div": "elementwise; Q/DQ around it only adds work", "Sqrt": "elementwise; no integer kernel",
    "Pow": "elementwise; no integer kernel", "ReduceMean": "reduction; no integer kernel",
    "Shape": "shape computation (integer)", "Gather": "index/shape path (weights only in weight_only mode)",
    "Where": "mask arithmetic", "Equal": "mask arithmetic", "Cast": "type conversion",
}

# inputs quantized, output float: fuses into MatMulIntegerToFloat
_MATMUL = OpPlacement("MatMul", _last_axis, ("static", "dynamic", "weight_only"))
# inputs quantized (QGemm); bias kept float
_GEMM = OpPlacement("Gemm", _gemm_axis, ("static", "dynamic"), size_only_modes=("weight_only",))
# CPU: weight_only Gemm too, as ORT's MatMulNBits with the Gemm's bias (4- or 8-bit blocks; not dequantized every run)
_GEMM_CPU = OpPlacement("Gemm", _gemm_axis, ("static", "dynamic", "weight_only"))
# inputs, int32 bias and output (after its Relu) quantized: fuses into QLinearConv
_CONV = OpPlacement("Conv", _axis0, ("static",), quantize_output=True, size_only_modes=("weight_only",))
# weights only (output channels on axis 1)
_CONVT = OpPlacement("ConvTranspose", _axis1, (), size_only_modes=("weight_only",))
# embedding table stored int8 row-wise, rows dequantized after the lookup (weight is input 0)
_GATHER = OpPlacement("Gather", _axis0, ("static", "dynamic", "weight_only"))

# W/R int8 per gate channel, activations quantized at run time: ORT's DynamicQuantizeLSTM (no QDQ form: static
# mode uses it too)
_LSTM = OpPlacement("LSTM", _axis1, ("dynamic", "static"))

# ORT's transformers optimizer's fused ops (com.microsoft, CPU kernels): the packed QKV weight of Attention as
# QAttention (activations quantized at run time in dynamic mode, calibrated in static); EmbedLayerNormalization
# unfused so that its tables are quantized like the embedding Gathers (every mode)
_ATTENTION = OpPlacement("Attention", _last_axis, ("dynamic", "static"), no_kernel={
    "weight_only": "weight_only: ORT has no weight-only kernel for the fused Attention's packed QKV weight (it would "
                   "be dequantized every run); mode dynamic or static gives it QAttention"})
_EMBED_LN = OpPlacement("EmbedLayerNormalization", _axis0, ("static", "dynamic", "weight_only"))
_CPU_OPS = (_MATMUL, _GEMM_CPU, _CONV, _CONVT, _GATHER, _LSTM, _ATTENTION, _EMBED_LN)

TARGETS: dict[str, Target] = {
    "ort-cpu": Target(
        "ort-cpu", ("CPUExecutionProvider",),  # ONNX Runtime, CPU execution provider, any x86-64 or ARM CPU
        activation_dtype="uint8", activation_symmetric=False, weight_range="pairs", fuse_static_bias=True,
        ops={p.op: p for p in _CPU_OPS}, keep_float=_KEEP_FLOAT),
    # the same for CPUs whose u8 x s8 kernels do not saturate (x86 with AVX512-VNNI or AVX-VNNI, ARM64): full
    # 8-bit weights; MiniLM-L3 static int8 cosine 0.99951 (ort-cpu's bounded pairs) -> 0.99954 (GPTQ rounding,
    # 64 calibration sentences)
    "ort-cpu-vnni": Target(
        "ort-cpu-vnni", ("CPUExecutionProvider",),
        activation_dtype="uint8", activation_symmetric=False, fuse_static_bias=True,
        ops={p.op: p for p in _CPU_OPS}, keep_float=_KEEP_FLOAT),
    "ort-cuda": Target(
        "ort-cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"),  # falls back to CPU where no GPU
        activation_dtype="int8", activation_symmetric=True,
        ops={p.op: p for p in (_MATMUL, _GEMM, _CONV, _CONVT, _GATHER)}, keep_float=_KEEP_FLOAT),
    "tensorrt": Target(
        "tensorrt", ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
        # TensorRT via ONNX Runtime's TensorRT execution provider (symmetric int8 only)
        activation_dtype="int8", activation_symmetric=True,
        ops={p.op: p for p in (_MATMUL, _GEMM, _CONV, _CONVT)}, keep_float=_KEEP_FLOAT),
}
