"""LoRA settings and where adapters go: by default every linear layer of every block, MoE experts included.

`lora_targets` finds the layers on a plain model (routers, embeddings and lm_head stay frozen), all of them
or one placement (attention or MLP, `PLACEMENTS`); `peft_config` turns settings into PEFT's LoraConfig, on
every decoder layer or on some (`layers`, PEFT's layers_to_transform); `saved_lora_settings` reads a saved
adapter's shape.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from align.core.errors import UserError

# Where an adapter may go, besides a list of module names: every block linear, attention only, MLP only.
PLACEMENTS = ("all", "attention", "mlp")
DEFAULT_RANK = 8
DEFAULT_ALPHA = 32
# Ranks the design recommends for RL/preference tuning; others work but are warned about.
RECOMMENDED_RANKS = range(4, 9)


@dataclass
class LoraSettings:
    """How an adapter is shaped and placed: `targets` is a placement (`PLACEMENTS`) or module names;
    `layers` the decoder layer indices that get adapters (None: all)."""

    rank: int = field(default=DEFAULT_RANK, metadata={"help": "LoRA rank r (4-8 recommended for RL and DPO)."})
    alpha: int = field(
        default=DEFAULT_ALPHA,
        metadata={"help": "LoRA alpha; the update is scaled by alpha/r. Keep it fixed (32) and tune the lr."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    targets: str | list[str] = field(
        default="all",
        metadata={"help": "'all' (attention, MLP and MoE experts of every block), 'attention' (q/k/v/o), "
                          "'mlp' (gate/up/down and experts) or a list of module names."},
    )
    layers: int | list[int] | None = field(
        default=None, metadata={"help": "Decoder layer index or indices that get adapters (None: every layer)."})

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank: expected a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha: expected a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: expected a number in [0, 1), got {self.dropout}")
        if self.targets not in PLACEMENTS and not (
            isinstance(self.targets, list) and self.targets and all(isinstance(t, str) and t for t in self.targets)
        ):
            raise ValueError(f"lora.targets: expected 'all-linear', 'attention', 'mlp' or a non-empty list of module "
                             f"names, got {self.targets!r}")
        wanted = [self.layers] if _index(self.layers) else self.layers
        if wanted is not None and not (isinstance(wanted, list) and wanted and all(_index(i) for i in wanted)
                                       and len(set(wanted)) == len(wanted)):
            raise ValueError(f"lora.layers: expected a layer index >= 0 or a non-empty list of distinct indices, "
                             f"got {self.layers!r}")

    @property
    def layer_list(self) -> list[int] | None:
        """The layer indices, sorted (None: every layer)."""
        return None if self.layers is None else sorted([self.layers] if _index(self.layers) else self.layers)

    def describe(self) -> str:
        """The placement in a few words, e.g. "r=16 on attention, layers 0,3"."""
        where = ",".join(self.targets) if isinstance(self.targets, list) else self.targets
        layers = "all layers" if self.layers is None else "layers " + ",".join(map(str, self.layer_list))
        return f"r={self.rank} on {where}, {layers}"


def _index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_router(parent: nn.Module) -> bool:
    # A MoE block holds `experts` next to its router; the router must stay frozen.
    return hasattr(parent, "experts")


def _in_attention(name: str) -> bool:
    # self_attn, attention, cross_attn, linear_attn...: the block's attention, whatever the family calls it.
    return any("attn" in part or "attention" in part for part in name.split("."))


def lora_target_groups(model: nn.Module) -> dict[str, tuple[set[str], set[str]]]:
    """The block linears of `model` by placement: {"attention"|"mlp": (leaf names, fused expert tensors)},
    and "routers": (leaf names of MoE routers, which never get adapters, set())."""
    groups = {"attention": (set(), set()), "mlp": (set(), set()), "routers": (set(), set())}
    named = dict(model.named_modules())
    for name, module in named.items():
        if ".layers." not in f".{name}" and not name.startswith("layers."):
            continue
        parent_name, _, leaf = name.rpartition(".")
        if isinstance(module, nn.Linear):
            router = _is_router(named.get(parent_name, nn.Module()))
            groups["routers" if router else "attention" if _in_attention(name) else "mlp"][0].add(leaf)
        elif leaf == "experts":
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() == 3:
                    # e.g. "mlp.experts.gate_up_proj": suffix-matched against full parameter names.
                    groups["mlp"][1].add(f"{parent_name.rpartition('.')[2]}.experts.{pname}")
    return groups


def select_targets(groups: dict[str, tuple[set[str], set[str]]], placement: str = "all",
                   model_name: str = "the model") -> tuple[list[str], list[str]]:
    """`(target_modules, target_parameters)` of one placement (`PLACEMENTS`) from `lora_target_groups`."""
    chosen = ("attention", "mlp") if placement == "all" else (placement,)
    modules = set().union(*(groups[g][0] for g in chosen))
    parameters = set().union(*(groups[g][1] for g in chosen))
    if not modules and not parameters:
        what = "linear" if placement == "all" else f"{placement} linear"
        raise ValueError(f"no {what} layers found in {model_name}: cannot place LoRA adapters")
    # Leaf-name matching would also catch a router (or the other placement's layer) of the same name.
    clash = groups["routers"][0] & modules
    if clash:
        raise ValueError(f"router and expert layers share the names {sorted(clash)}; pass lora.targets explicitly")
    shared = groups["attention"][0] & groups["mlp"][0]
    if placement != "all" and shared:
        raise ValueError(f"attention and MLP layers share the names {sorted(shared)} in {model_name}; "
                         "pass lora.targets as a list of module names")
    return sorted(modules), sorted(parameters)


def lora_targets(model: nn.Module, placement: str = "all") -> tuple[list[str], list[str]]:
    """Find what "all layers" (or attention/MLP only) means for this model.

    Returns `(target_modules, target_parameters)`: the leaf names of every
    `nn.Linear` inside the decoder blocks (attention q/k/v/o, MLP gate/up/down,
    unfused experts), and the fused 3-D expert tensors of MoE blocks (PEFT's
    `target_parameters`). Routers, embeddings and lm_head are excluded.
    """
    return select_targets(lora_target_groups(model), placement, type(model).__name__)


def peft_config(groups: dict[str, tuple[set[str], set[str]]], lora: LoraSettings, num_layers: int | None = None,
                model_name: str = "the model"):
    """PEFT config for `lora`; `groups` is `lora_target_groups(model)` taken before any adapter exists, and
    `num_layers` the model's decoder layers (the range `lora.layers` is checked against)."""
    from peft import LoraConfig

    if isinstance(lora.targets, list):
        modules, parameters = list(lora.targets), []
    elif lora.targets == "all":
        modules, parameters = select_targets(groups, "all", model_name)
    else:
        try:
            modules, parameters = select_targets(groups, lora.targets, model_name)
        except ValueError as e:  # a placement this model cannot take: one line, before any training
            raise UserError(f"lora_target_modules: {lora.targets}: {e}") from None
    layers = lora.layer_list
    outside = [i for i in layers or [] if num_layers is not None and i >= num_layers]
    if outside:
        raise UserError(f"lora_layers_to_transform: {model_name} has layers 0-{num_layers - 1}; got {outside}")
    if layers is None:  # leaf names would also match outside the blocks: anchor them to the decoder layers
        targets = r".*\.layers\.\d+\.(?:.*\.)?(?:" + "|".join(modules) + r")$" if modules else []
        where = {}
    else:
        # PEFT's own fields, so adapter_config.json says which layers (PEFT turns a regex into leaf names on
        # MoE models, which would lose them); target_parameters knows no layers_to_transform: name each.
        targets, where = modules, {"layers_to_transform": layers, "layers_pattern": "layers"}
        parameters = [f"layers.{i}.{p}" for i in layers for p in parameters]
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
        **where,
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
                        targets=targets if isinstance(targets, list) and targets else "all",
                        layers=config.get("layers_to_transform"))
