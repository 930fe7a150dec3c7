"""What this machine's CPU does with ONNX Runtime's integer kernels (read once from the OS, no ORT call)."""
from __future__ import annotations

import functools
import platform
from typing import Optional


@functools.lru_cache(maxsize=1)
def u8s8_saturates() -> Optional[bool]:
    """Whether ORT CPU's uint8 x int8 MatMul kernels can saturate here: True on x86-64 without VNNI (AVX2's
    16-bit pairwise sums), False on x86-64 with AVX512-VNNI/AVX-VNNI and on ARM64, None when unknown."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return False
    if machine not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))
