"""What the machine can do fast, checked rather than assumed."""

from __future__ import annotations

import functools
import os
from pathlib import Path

# CPU feature flags (/proc/cpuinfo) of bfloat16 matrix units: AMX tiles, or AVX-512 BF16 dot products.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Set to float32 (or bfloat16) to make `dtype: auto` mean that on every machine: the test suite sets
# float32 (tests/conftest.py), so exact comparisons keep their meaning on CPUs with and without bf16.
AUTO_DTYPE_ENV = "ALIGN_AUTO_DTYPE"


def native_bf16_cpu_flag(cpuinfo: str) -> str | None:
    """The first flag in `cpuinfo` (the text of /proc/cpuinfo) that makes bfloat16 native, or None."""
    flags = set(cpuinfo.split())
    return next((f for f in NATIVE_BF16_CPU_FLAGS if f in flags), None)


@functools.cache
def _cpuinfo() -> str:
    try:  # CPU feature flags: Linux only; elsewhere assume the slow path
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


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
    return native_bf16_cpu_flag(_cpuinfo()) is not None


def choose_auto_dtype(device: str, cuda_bf16: bool, cpuinfo: str, override: str | None = None) -> tuple[str, str]:
    """(dtype, why) that `dtype: auto` means on `device`, from the facts passed in (no machine is read):
    bfloat16 on a CUDA GPU that supports it (TRL's `bf16` default), float32 anywhere else. Not yet on a
    CPU with AMX or AVX-512 BF16, though its matrix work is native (DPO steps ~2x faster,
    docs/scaling.md "Precision"): there the in-process vLLM engine's bf16 log-probs missed the sync
    probe's tolerance on the GRPO demo (0.32 > 0.25). `override` (ALIGN_AUTO_DTYPE) wins."""
    if override:
        if override not in ("float32", "bfloat16"):
            raise ValueError(f"{AUTO_DTYPE_ENV}: expected float32 or bfloat16, got {override!r}")
        return override, f"{AUTO_DTYPE_ENV}={override}"
    if device.startswith("cuda"):
        if cuda_bf16:
            return "bfloat16", f"{device} computes bfloat16 natively"
        return "float32", f"{device} has no native bfloat16"
    flag = native_bf16_cpu_flag(cpuinfo) if device.startswith("cpu") else None
    if flag:  # measured: the GRPO demo's first sync drifted 0.32 > the probe's 0.25 with a bf16 base on AMX
        return "float32", (f"{device} computes bfloat16 natively ({flag}), but a bfloat16 base drifts the vLLM "
                           "engine's probe past its tolerance on CPU; bf16: true asks for it")
    return "float32", f"{device} has no native bfloat16 (no {' or '.join(NATIVE_BF16_CPU_FLAGS)}): it would be emulated"


def auto_dtype(device: str) -> tuple[str, str]:
    """(dtype, why) that `dtype: auto` means on `device` of this machine (choose_auto_dtype)."""
    import torch

    cuda_bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpuinfo = _cpuinfo() if device.startswith("cpu") else ""
    return choose_auto_dtype(device, cuda_bf16, cpuinfo, os.environ.get(AUTO_DTYPE_ENV) or None)


def default_dtype(device: str) -> str:
    """What `dtype: auto` means on `device`: bfloat16 where it is native, else float32 (auto_dtype)."""
    return auto_dtype(device)[0]
