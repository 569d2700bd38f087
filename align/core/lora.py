"""LoRA settings and where adapters go: every linear layer of every block, MoE experts included.

`lora_targets` finds the layers on a plain model (routers, embeddings and lm_head stay frozen);
`peft_config` turns settings into PEFT's LoraConfig; `saved_lora_settings` reads a saved adapter's shape.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

DEFAULT_RANK = 8
DEFAULT_ALPHA = 32
# Ranks the design recommends for RL/preference tuning; others work but are warned about.
RECOMMENDED_RANKS = range(4, 9)


@dataclass
class LoraSettings:
    """How an adapter is shaped. `targets="all"` means every linear layer of every block."""

    rank: int = field(default=DEFAULT_RANK, metadata={"help": "LoRA rank r (4-8 recommended for RL and DPO)."})
    alpha: int = field(
        default=DEFAULT_ALPHA,
        metadata={"help": "LoRA alpha; the update is scaled by alpha/r. Keep it fixed (32) and tune the lr."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    targets: str | list[str] = field(
        default="all",
        metadata={"help": "'all' (attention, MLP and MoE experts of every block) or a list of module names."},
    )

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank: expected a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha: expected a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: expected a number in [0, 1), got {self.dropout}")
        if self.targets != "all" and not (
            isinstance(self.targets, list) and self.targets and all(isinstance(t, str) for t in self.targets)
        ):
            raise ValueError(f"lora.targets: expected 'all' or a non-empty list of module names, got {self.targets!r}")


def _is_router(parent: nn.Module) -> bool:
    # A MoE block holds `experts` next to its router; the router must stay frozen.
    return hasattr(parent, "experts")


def lora_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """Find what "all layers" means for this model.

    Returns `(target_modules, target_parameters)`: the leaf names of every
    `nn.Linear` inside the decoder blocks (attention q/k/v/o, MLP gate/up/down,
    unfused experts), and the fused 3-D expert tensors of MoE blocks (PEFT's
    `target_parameters`). Routers, embeddings and lm_head are excluded.
    """
    modules: set[str] = set()
    parameters: set[str] = set()
    named = dict(model.named_modules())
    for name, module in named.items():
        if ".layers." not in f".{name}" and not name.startswith("layers."):
            continue
        parent_name, _, leaf = name.rpartition(".")
        if isinstance(module, nn.Linear):
            if _is_router(named.get(parent_name, nn.Module())):
                continue
            modules.add(leaf)
        elif leaf == "experts":
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() == 3:
                    # e.g. "mlp.experts.gate_up_proj": suffix-matched against full parameter names.
                    parameters.add(f"{parent_name.rpartition('.')[2]}.experts.{pname}")
    if not modules and not parameters:
        raise ValueError(f"no linear layers found in {type(model).__name__}: cannot place LoRA adapters")
    # A router named like an MLP projection would be caught by leaf-name matching; refuse to guess.
    routers = {n.rpartition(".")[2] for n, m in named.items() if isinstance(m, nn.Linear)
               and _is_router(named.get(n.rpartition(".")[0], nn.Module()))}
    clash = routers & modules
    if clash:
        raise ValueError(f"router and expert layers share the names {sorted(clash)}; pass lora.targets explicitly")
    return sorted(modules), sorted(parameters)


def peft_config(all_targets: tuple[list[str], list[str]], lora: LoraSettings):
    """PEFT config for `lora`; `all_targets` is `lora_targets(model)` taken before any adapter exists."""
    from peft import LoraConfig

    if lora.targets == "all":
        modules, parameters = all_targets
    else:
        modules, parameters = list(lora.targets), []
    # Leaf names would also match outside the blocks; anchor them to the decoder layers.
    regex = r".*\.layers\.\d+\.(?:.*\.)?(?:" + "|".join(modules) + r")$"
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=regex,
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def saved_lora_settings(path: str | os.PathLike) -> LoraSettings:
    """An adapter folder's LoRA shape: align_meta.json's when present, else PEFT's adapter_config.json."""
    folder = Path(path)
    meta = folder / "align_meta.json"
    if meta.is_file():
        lora = json.loads(meta.read_text()).get("lora")
        if lora:
            return LoraSettings(**lora)
    config = json.loads((folder / "adapter_config.json").read_text())
    targets = config.get("target_modules")
    return LoraSettings(rank=config["r"], alpha=config.get("lora_alpha", config["r"]),
                        dropout=config.get("lora_dropout", 0.0),
                        targets=targets if isinstance(targets, list) and targets else "all")
