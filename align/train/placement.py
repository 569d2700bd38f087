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


def precision_note(device: str, recipe: str) -> str:
    """The note for a `recipe` run where auto chose float32 on a `device` with native bfloat16. The speed-up
    measured (docs/scaling.md, "Precision") is DPO's: only a DPO run is told a speed as its own."""
    speed = "ran DPO ~2x faster" if recipe == "dpo" else f"{recipe} speed not measured; DPO ran ~2x faster"
    return (f"[align] {recipe}: dtype auto is float32 on {device}, which computes bfloat16 natively: --bf16 true "
            f"halves the base's memory ({speed}; docs/scaling.md, \"Precision\")")


def check_precision(device: str, dtype: str, requested: str, main: bool, recipe: str) -> None:
    """Warn about bfloat16 where it is emulated; point out bfloat16 where auto chose float32 but it is native.
    `main` false: no note (another process says it, or the base was handed in, so --bf16 would not apply)."""
    from align.core.hardware import fast_bfloat16

    native = fast_bfloat16(device)  # reads /proc/cpuinfo on a CPU: once
    if dtype == "bfloat16" and not native:
        warnings.warn(f"dtype bfloat16 on {device}: this machine emulates bfloat16 matrix "
                      "work (several times slower than float32); use float32 here", stacklevel=2)
    elif native and requested == "auto" and dtype == "float32" and main:
        print(precision_note(device, recipe))
