"""glibc heap settings that keep a training step's peak memory near what is actually live.

glibc serves an allocation from the heap unless it is larger than the mmap threshold,
and that threshold adapts upward to the largest block freed so far (up to 32 MiB). After
the first large logits chunk is freed, every per-layer activation of a step (1-6 MB on
SmolLM2 at 4 pairs x 128 tokens) comes from the heap; the holes left between the ones a
checkpointed forward keeps alive cannot be returned, and the process peaks ~400 MB above
its live need (measured: scripts/bench/dpo.py). A fixed threshold turns the adaptation off:
blocks at or above it get their own mapping and go back to the OS when freed.

It is a CPU-run setting: the Trainer applies it only where the base lives on the CPU
(`Trainer.cpu_only`); on a GPU the activations are not in this heap.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def limit_heap_fragmentation(mmap_threshold_mb: float) -> bool:
    """Fix glibc's mmap threshold at `mmap_threshold_mb` and trim the heap top early.

    Affects allocations made after the call, process-wide. Returns False (and changes
    nothing) where the allocator is not glibc's.
    """
    if mmap_threshold_mb <= 0:
        raise ValueError(f"mmap_threshold_mb: expected > 0, got {mmap_threshold_mb}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return False
    threshold = int(mmap_threshold_mb * 2**20)
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, 4 * threshold))
