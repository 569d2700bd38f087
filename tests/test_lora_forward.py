"""The lean LoRA forward computes what PEFT's forward computes, values and gradients."""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from align.core.base import SharedBase
from align.core.lora_forward import _lean_forward


def _randomise_adapter(base: SharedBase, name: str, seed: int) -> None:
    # A fresh adapter has B = 0, which would hide a wrong B term.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.adapter_parameters(name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _lora_linears(base: SharedBase) -> list[LoraLinear]:
    return [m for m in base.model.modules() if type(m) is LoraLinear]


def test_every_lora_linear_uses_the_lean_forward(tiny_llama):
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy")
    layers = _lora_linears(base)
    assert len(layers) == 2 * 7
    assert all(m.forward.__func__ is _lean_forward for m in layers)
    base.add_adapter("critic")  # a second adapter reuses the wrapped layers: still lean
    assert all(m.forward.__func__ is _lean_forward for m in _lora_linears(base))


def test_lean_forward_matches_peft_values_and_gradients(tiny_llama):
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy")
    _randomise_adapter(base, "policy", seed=1)
    for layer in _lora_linears(base):
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
        results = []
        for forward in (layer, lambda t, m=layer: LoraLinear.forward(m, t)):  # lean, then PEFT's own
            xi = x.clone().requires_grad_(True)
            out = forward(xi)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads = [xi.grad] + [p.grad.clone() for p in (layer.lora_A["policy"].weight, layer.lora_B["policy"].weight)]
            for p in (layer.lora_A["policy"].weight, layer.lora_B["policy"].weight):
                p.grad = None
            results.append((out.detach(), grads))
        (lean_out, lean_grads), (peft_out, peft_grads) = results
        assert lean_out.shape == peft_out.shape
        torch.testing.assert_close(lean_out, peft_out, rtol=1e-5, atol=1e-6)
        for a, b in zip(lean_grads, peft_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_switched_off_and_other_dtypes_fall_back_to_peft(tiny_llama):
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy")
    _randomise_adapter(base, "policy", seed=3)
    layer = _lora_linears(base)[0]
    x = torch.randn(2, 4, layer.in_features)
    with base.reference():
        assert torch.equal(layer(x), layer.base_layer(x))  # adapters off: exactly the base
    assert not torch.allclose(layer(x), layer.base_layer(x))  # on: the adapter adds something
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: PEFT's path, which casts as autocast wants
        torch.testing.assert_close(layer(x), LoraLinear.forward(layer, x))
    # Activations in another dtype than the adapter: PEFT's own casting path, same numbers as PEFT.
    xb = x.to(torch.bfloat16)
    layer.base_layer.to(torch.bfloat16)
    torch.testing.assert_close(layer(xb), LoraLinear.forward(layer, xb))


def test_partial_checkpointing_gives_the_same_gradients(tiny_llama):
    """checkpoint_keep_last: the top layers keep activations, the rest recompute; gradients do not change."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from align.core.logprobs import completion_logprobs

    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    done = torch.zeros_like(ids)
    done[:, 6:] = 1
    grads = {}
    for ckpt, keep in ((False, 0), (True, 0), (True, 1)):
        base = SharedBase.load(str(tiny_llama), gradient_checkpointing=ckpt, checkpoint_keep_last=keep)
        base.add_adapter("policy")
        _randomise_adapter(base, "policy", seed=5)
        base.model.train()
        layers = [m for m in base.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert [m.gradient_checkpointing for m in layers] == [ckpt, ckpt and keep < 1]
        completion_logprobs(base, ids, mask, done).sum().backward()
        grads[(ckpt, keep)] = {n: p.grad.clone() for n, p in base.adapter_parameters("policy").items()}
    reference = grads[(False, 0)]
    for key in ((True, 0), (True, 1)):
        assert grads[key].keys() == reference.keys()
        for name, g in reference.items():
            torch.testing.assert_close(grads[key][name], g, rtol=1e-5, atol=1e-7)
