"""Full fine-tuning (`use_peft: false`, TRL's switch): the control `align study` compares LoRA against.

Every base weight trains, in float32, with the same optimizer, schedule, data order and seeds as a
LoRA run of the same config; no adapter is created. The weights travel in each checkpoint as one
"head" (`BaseWeights`, so TrainState saves and restores them exactly like a reward head), and the
run ends with a plain transformers folder (`model/`, safetensors). SFT only so far (issue 24).
"""

from __future__ import annotations

import os
from pathlib import Path

from align.core.atomic import atomic_dir


def check_full_finetune(config) -> None:
    """`use_peft: false` wants float32 weights (dtype auto becomes float32) and no 4-bit base; one line if not."""
    if config.use_peft:
        return
    if config.load_in_4bit:
        raise ValueError("use_peft: false trains every base weight; it cannot with load_in_4bit: true")
    if config.dtype not in ("auto", "float32"):
        raise ValueError(f"use_peft: false trains every base weight in float32; got dtype {config.dtype} "
                         "(bf16: true sets bfloat16)")
    config.dtype = "float32"


class BaseWeights:
    """The base model's parameters as a checkpoint head: each tensor once (tied weights under one name)."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        return dict(self.model.named_parameters())  # named_parameters names a tied tensor once

    def load_state_dict(self, tensors: dict) -> None:
        import torch

        params = dict(self.model.named_parameters())
        if set(tensors) != set(params):
            raise KeyError(f"base weights in the checkpoint do not match this model ({len(tensors)} tensors, "
                           f"{len(params)} expected)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])


def unfreeze(base) -> list:
    """Every base weight, now trainable (each tensor once); the SharedBase holds no adapter."""
    if base.adapters:
        raise ValueError(f"use_peft: false: this base already holds adapters {base.adapters}")
    params = list(base.model.parameters())  # parameters() yields a tied tensor once
    for p in params:
        p.requires_grad_(True)
    return params


def save_full_model(base, path: str | os.PathLike) -> Path:
    """The trained model as a transformers folder (safetensors) with its tokenizer, written atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        base.model.save_pretrained(tmp, safe_serialization=True)
        base.tokenizer.save_pretrained(tmp)
    return path
