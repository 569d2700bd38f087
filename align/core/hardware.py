"""What the machine can do fast, checked rather than assumed."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def fast_bfloat16(device: str = "cpu") -> bool:
    """True where bfloat16 matrix work runs natively: a CUDA GPU that supports it, or a CPU with
    AMX or AVX-512 BF16. Elsewhere (e.g. an AVX2-only CPU) bfloat16 is emulated and several times
    slower than float32, so sampling in bfloat16 would cost time instead of saving it.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if not device.startswith("cpu"):
        return False
    try:  # CPU feature flags: Linux only; elsewhere assume the slow path
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_dtype(device: str) -> str:
    """What `dtype: auto` means on `device`: bfloat16 on a CUDA GPU that supports it (TRL's `bf16`
    default: half the base's memory, its fast matmuls), float32 anywhere else.

    Not bfloat16 on a CPU, even one with AVX512_BF16 or AMX where it is native (DPO steps ~2x faster,
    docs/design.md): many CPUs emulate it (several times slower), and on a CPU runs are compared
    exactly (processes at 1e-5, a float32 vLLM's log-probs at 1e-4). `bf16: true` asks for it.
    """
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"
