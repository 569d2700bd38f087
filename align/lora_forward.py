"""A leaner forward for PEFT's LoRA `Linear`: `base(x) + s * B(A(x))` as one `addmm`.

PEFT computes `result + lora_B(lora_A(x)) * scaling`, which makes three full-size
temporaries per adapted layer (B's output, its scaled copy, the sum). `torch.addmm(result,
A(x), B^T, alpha=s)` is the same sum with one. On CPU the saving is mostly in memory: with
gradient checkpointing every layer's temporaries are freed between the few tensors a step
keeps, and glibc's heap grows around the holes. Fewer, fewer-sized temporaries leave fewer
holes: a SmolLM2-135M DPO step peaked ~190 MB lower (scripts/bench/dpo.py).

Only plain LoRA takes this path: no DoRA or other variants, no LoRA bias, no
`fan_in_fan_out`, no mixed-adapter batches, adapter and activations in one dtype.
Anything else, and adapters switched off or merged, runs PEFT's own forward unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or self.disable_adapters or self.merged or self.lora_variant or self.fan_in_fan_out:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    x2 = x.reshape(-1, x.shape[-1])
    result = torch.nn.functional.linear(x2, base.weight, base.bias)
    shape = (*x.shape[:-1], result.shape[-1])
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if lora_b.bias is not None or not (x.dtype == result.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
            return type(self).forward(self, x, *args, **kwargs)
        result = result.addmm_(lora_a(self.lora_dropout[name](x2)), lora_b.weight.t(), alpha=self.scaling[name])
    return result.view(shape)


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
