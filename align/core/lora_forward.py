"""A leaner forward for PEFT's LoRA `Linear`: `base(x) + s * B(A(x))` with one in-place `addmm`.

PEFT computes `result + lora_B(lora_A(x)) * scaling`, which makes three full-size
temporaries per adapted layer (B's output, its scaled copy, the sum). `result.addmm_(A(x),
B^T, alpha=s)` adds the same term in place, with none. On CPU the saving is mostly in memory: with
gradient checkpointing every layer's temporaries are freed between the few tensors a step
keeps, and glibc's heap grows around the holes. Fewer, fewer-sized temporaries leave fewer
holes: a SmolLM2-135M DPO step peaked ~190 MB lower (scripts/bench/dpo.py).

Only plain LoRA takes this path: no DoRA or other variants, no LoRA bias, no
`fan_in_fan_out`, no mixed-adapter batches, no autocast, base, adapter and activations in
one dtype. Anything else, and adapters switched off or merged, runs PEFT's own forward unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _plain_lora(self, name: str, dtype: torch.dtype) -> bool:
    a, b = self.lora_A[name], self.lora_B[name]
    return b.bias is None and a.weight.dtype == b.weight.dtype == self.base_layer.weight.dtype == dtype


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = [n for n in self.active_adapters if n in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or self.lora_variant or self.fan_in_fan_out
            or torch.is_autocast_enabled(x.device.type) or not all(_plain_lora(self, n, x.dtype) for n in names)):
        return type(self).forward(self, x, *args, **kwargs)
    x2 = x.reshape(-1, x.shape[-1])
    # A fresh 2-D output (not a view), so adding the LoRA term in place is safe under autograd:
    # the base matmul's backward does not need its output.
    result = torch.nn.functional.linear(x2, self.base_layer.weight, self.base_layer.bias)
    for name in names:
        h = self.lora_A[name](self.lora_dropout[name](x2))
        result.addmm_(h, self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return result.view(*x.shape[:-1], result.shape[-1])


def use_lean_lora_forward(model: nn.Module) -> int:
    """Give every PEFT LoRA `Linear` in `model` the lean forward; returns how many now have it.

    Idempotent: call it again after adding adapters (new wrapped layers get it, others keep it).
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is nn.Linear:
            if getattr(module.forward, "__func__", None) is not _lean_forward:
                module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
