"""What a run trains, counted once at its start: the line every run prints and the figures its
final_metrics.json keeps (`trainable_params`), so runs of different placements and ranks can be
matched on parameters (align/core/lora_count.py predicts the same count from a config alone).
"""

from __future__ import annotations


def _numel(p) -> int:
    # A 4-bit base weight is packed two to a byte; its quant_state knows the unpacked shape.
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(shape.numel()) if shape is not None else p.numel()


FULL = "full fine-tuning"  # the placement of a run that trains the base weights themselves (use_peft: false)


def placement(base, adapters: list[str]) -> str:
    """The trained adapters' shape and placement as they were built (an init_adapter's own, if loaded)."""
    described = dict.fromkeys(base.settings[a].describe() for a in adapters if a in base.settings)
    return "; ".join(described) or FULL


def trainable_counts(base, groups: list[dict], adapters: list[str]) -> dict:
    """Counts of the optimizer's tensors (adapters plus any heads) and of the frozen base, and the placement
    of the trained `adapters`."""
    adapter_ids = {id(p) for n, p in base.model.named_parameters() if "lora_" in n}
    params = {id(p): p for g in groups for p in g["params"]}  # a tensor listed twice is counted once
    trainable = sum(p.numel() for p in params.values())
    lora = sum(p.numel() for i, p in params.items() if i in adapter_ids)
    weights = base.base_parameters().values()
    frozen = sum(_numel(p) for p in weights if id(p) not in params)  # full fine-tuning trains the base itself
    return {"trainable_params": trainable, "adapter_params": lora, "base_params": sum(_numel(p) for p in weights),
            "all_params": trainable + frozen, "trainable_percent": 100.0 * trainable / max(1, trainable + frozen),
            "lora_placement": placement(base, adapters)}


def trainable_line(counts: dict) -> str:
    """PEFT's print_trainable_parameters figures (percent of all parameters), then the adapters' placement."""
    heads = counts["trainable_params"] - counts["adapter_params"]
    extra = f" + heads {heads:,}" if heads else ""
    what = (f"{FULL}: every base weight, float32" if counts["lora_placement"] == FULL else
            f"LoRA {counts['lora_placement']}: {counts['adapter_params']:,}{extra}")
    return (f"trainable params: {counts['trainable_params']:,} || all params: {counts['all_params']:,} || trainable%: "
            f"{counts['trainable_percent']:.4f} ({what}; base params: {counts['base_params']:,})")


def announce_trainable(base, groups: list[dict], adapters: list[str], main: bool) -> dict:
    """Count what the run trains (before FSDP shards it: whole tensors); the main process prints it (one line).
    Returns the counts."""
    counts = trainable_counts(base, groups, adapters)
    if main:
        print(f"[align] {trainable_line(counts)}")
    return counts
