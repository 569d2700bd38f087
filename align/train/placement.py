"""Where a run's tensors live and in what precision, resolved once at setup.

The config keeps what the user wrote (`device: auto`, `dtype: auto`), so config.yaml says it too;
the trainer keeps the resolved values beside it (`trainer.device`, `trainer.dtype`), and recipes
read those.
"""

from __future__ import annotations

import warnings

import torch


def resolve_placement(config, process_device: str, base=None) -> tuple[str, str]:
    """(device, dtype) of this process's run: the process's device and the dtype `auto` means there;
    a base already in memory (e.g. the demo's) stays where it is, in the dtype it was loaded in."""
    from align.core.hardware import default_dtype

    device = str(next(base.model.parameters()).device) if base is not None else process_device
    dtype = config.dtype
    if dtype == "auto":
        dtype = base.load_dtype if base is not None else default_dtype(device)
    return device, dtype


def apply_cpu_settings(config, device: str, main: bool) -> None:
    """CPU-process settings (torch threads, the glibc heap); the heap's only where the base is on the CPU."""
    from align.core.heap import limit_heap_fragmentation

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if config.heap_mmap_threshold_mb is None:
        return
    if device == "cpu":
        limit_heap_fragmentation(config.heap_mmap_threshold_mb)
    elif main:
        print(f"[align] heap_mmap_threshold_mb applies to CPU runs; ignored on {device}")


def auto_note(device: str, dtype: str) -> str:
    """The run log's one line on what `dtype: auto` chose on `device`, and why (align.core.hardware.auto_dtype)."""
    from align.core.hardware import auto_dtype

    chosen, why = auto_dtype(device)
    if chosen != dtype:  # only a base handed in (the demo's) differs: it keeps the dtype it was loaded in
        return f"[align] dtype auto: {dtype}, the dtype the base handed in was loaded in"
    return f"[align] dtype auto: {dtype} ({why})"


def check_precision(device: str, dtype: str, requested: str, main: bool) -> None:
    """Warn about bfloat16 where it is emulated; say what auto chose and why (main process only)."""
    from align.core.hardware import fast_bfloat16

    if dtype == "bfloat16" and not fast_bfloat16(device):  # reads /proc/cpuinfo on a CPU: once
        warnings.warn(f"dtype bfloat16 on {device}: this machine emulates bfloat16 matrix "
                      "work (several times slower than float32); use float32 here", stacklevel=2)
    if requested == "auto" and main:
        print(auto_note(device, dtype))
