"""The optimizer the recipes share: AdamW over adapter (and head) parameters."""

from __future__ import annotations

import torch


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, **kwargs)`, on torch's fused kernel where it applies.

    On CPU torch's default AdamW is a Python loop over tensors, and an adapter has two per
    adapted layer (420 on SmolLM2-135M): ~22 ms a step looped, a few ms fused (measured in
    the DPO step profile). Fused needs floating-point parameters on CPU or CUDA.
    """
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in tensors)
    return torch.optim.AdamW(groups, fused=fused, **kwargs)
