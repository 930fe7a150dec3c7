"""The ONNX Runtime layer: sessions (providers, >2 GB models, typed errors), graphs with extra outputs, timing.

Calibration, validation and the passes all reach ORT through here.
"""
from __future__ import annotations

from .latency import LatencyResult, measure_latency, time_session
from .outputs import observable_tensors, session_with_outputs, with_outputs
from .session import MadeSession, ProviderLike, make_session, ort_message, run_session

__all__ = ["LatencyResult", "MadeSession", "ProviderLike", "make_session", "measure_latency", "observable_tensors",
           "ort_message", "run_session", "session_with_outputs", "time_session", "with_outputs"]
