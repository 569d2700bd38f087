"""How many parameters a LoRA adapter has, predicted from the model's config alone (no model is built).

`count_lora_params(config, targets, rank, layers)` walks the decoder blocks of a Llama-style config
(attention q/k/v/o, a dense MLP gate/up/down, or fused MoE experts as transformers >= 5 stores them)
and sums r * (in + out) per adapted matrix, E copies for an expert tensor: the figure that lets
placements be matched on trainable parameters (attention-only vs MLP-only vs all layers).
`python -m align.core.lora_count` prints SmolLM2-135M's matched placements (`MATCHED`).
"""

from __future__ import annotations

from collections.abc import Mapping

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Placements at about the same parameters on SmolLM2-135M (~1.84M each): what the `layers` study compares.
MATCHED = (("attention", 16), ("mlp", 10), ("all", 6))


def _get(config, key: str, default=None):
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return default if value is None else value


def _sparse(config, layer: int) -> bool:
    """Whether decoder layer `layer` holds MoE experts (Mixtral: all; Qwen3-MoE: decoder_sparse_step,
    mlp_only_layers)."""
    experts = _get(config, "num_experts", _get(config, "num_local_experts", 0))
    if not experts or layer in (_get(config, "mlp_only_layers", []) or []):
        return False
    return (layer + 1) % _get(config, "decoder_sparse_step", 1) == 0


def layer_matrices(config, layer: int) -> list[tuple[str, str, int, int, int]]:
    """(name, placement, in, out, copies) of every matrix LoRA may adapt in decoder layer `layer`."""
    if _get(config, "shared_expert_intermediate_size", 0) or _get(config, "n_shared_experts", 0):
        raise ValueError(f"count_lora_params: shared experts ({_get(config, 'model_type', '?')}) are not "
                         "counted; count the built model instead")
    hidden = _get(config, "hidden_size")
    heads = _get(config, "num_attention_heads")
    head_dim = _get(config, "head_dim", hidden // heads)
    kv = _get(config, "num_key_value_heads", heads)
    out = [("q_proj", "attention", hidden, heads * head_dim, 1), ("k_proj", "attention", hidden, kv * head_dim, 1),
           ("v_proj", "attention", hidden, kv * head_dim, 1), ("o_proj", "attention", heads * head_dim, hidden, 1)]
    if _sparse(config, layer):
        experts = _get(config, "num_experts", _get(config, "num_local_experts", 0))
        inner = _get(config, "moe_intermediate_size", _get(config, "intermediate_size"))
        out += [("experts.gate_up_proj", "mlp", hidden, 2 * inner, experts),
                ("experts.down_proj", "mlp", inner, hidden, experts)]
    else:
        inner = _get(config, "intermediate_size")
        out += [("gate_proj", "mlp", hidden, inner, 1), ("up_proj", "mlp", hidden, inner, 1),
                ("down_proj", "mlp", inner, hidden, 1)]
    return out


def _chosen(name: str, placement: str, targets) -> bool:
    if isinstance(targets, (list, tuple)):
        return name in targets  # module names: plain linears only (experts are parameters, PEFT's other list)
    return targets in ("all", "all-linear") or placement == targets


def count_lora_params(model_config, targets: str | list[str], rank: int, layers: int | list[int] | None = None
                      ) -> int:
    """Trainable parameters of a LoRA adapter of rank `rank` on `targets` ('all'/'all-linear', 'attention',
    'mlp' or a list of module names) in decoder `layers` (an index, a list, or None for every layer),
    from a transformers config (or its dict): sum of copies * r * (in + out) over the adapted matrices."""
    if isinstance(targets, str) and targets not in ("all", "all-linear", "attention", "mlp"):
        raise ValueError(f"targets: expected 'all-linear', 'attention', 'mlp' or module names, got {targets!r}")
    if isinstance(targets, (list, tuple)):
        unknown = sorted(set(targets) - set(ATTENTION + MLP))
        if unknown:
            raise ValueError(f"targets: count_lora_params knows {list(ATTENTION + MLP)}, got {unknown}")
    n_layers = _get(model_config, "num_hidden_layers")
    chosen = range(n_layers) if layers is None else [layers] if isinstance(layers, int) else layers
    total = 0
    for layer in chosen:
        for name, placement, d_in, d_out, copies in layer_matrices(model_config, layer):
            if _chosen(name, placement, targets):
                total += copies * rank * (d_in + d_out)
    return total


def matched_lines(model_config, pairs=MATCHED, layers=None) -> list[str]:
    """One line per (placement, rank) of `pairs`: its adapter parameters on `model_config`."""
    return [f"{targets:>9} r={rank:<3} {count_lora_params(model_config, targets, rank, layers):>12,} parameters"
            for targets, rank in pairs]


if __name__ == "__main__":
    from align.core.smollm import CONFIG

    print("SmolLM2-135M, LoRA on every decoder layer:")
    print("\n".join(matched_lines(CONFIG)))
