"""Deployment targets as data: which ORT execution providers run a target (placement tables grow here)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One deployment target: its name and the ORT providers used to validate and time it."""

    name: str
    providers: tuple[str, ...]
    description: str


TARGETS: dict[str, Target] = {
    "ort-cpu": Target("ort-cpu", ("CPUExecutionProvider",), "ONNX Runtime, CPU execution provider"),
    "ort-cuda": Target("ort-cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"),
                       "ONNX Runtime, CUDA execution provider (falls back to CPU where no GPU)"),
    "tensorrt": Target("tensorrt", ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
                       "TensorRT via ONNX Runtime's TensorRT execution provider"),
}
