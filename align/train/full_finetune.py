"""Full fine-tuning (`use_peft: false`, TRL's switch): the control `align study` compares LoRA against.

Every base weight trains, in float32, with the same optimizer, schedule, data order and seeds as a
LoRA run of the same config; no adapter is created. The weights travel in each checkpoint as one
"head" (`BaseWeights`, so TrainState saves and restores them exactly like a reward head), and the
run ends with a plain transformers folder (`model/`, safetensors; a reward model writes a sequence
classifier). Every recipe takes it; `FullFinetuneHooks` is the lifecycle side the policy recipes share.
A reference, where the loss needs one, is a frozen copy of the base taken before the first step
(`frozen_copy`); PPO's critic adapter sits on that copy and travels in checkpoints as `AdapterWeights`.
"""

from __future__ import annotations

import os
from pathlib import Path

from align.core.atomic import atomic_dir
from align.core.errors import UserError
from align.train.config_parser import arg

SAVE_STEPS_NOTE = ("use_peft: false: checkpoints only at the end (save_steps: 0; each holds the whole model); "
                   "set save_steps to checkpoint on the way")


def use_peft_field():
    """The `use_peft` field (TRL's switch), the same on every recipe that takes it."""
    return arg(True, "true: train a LoRA adapter. false: full fine-tuning (every base weight, float32, same "
                     "optimizer, schedule and data order; saves model/; checkpoints only at the end unless "
                     "save_steps is set), the control LoRA is compared with.")


def check_full_finetune(config) -> None:
    """`use_peft: false` wants float32 weights (dtype auto becomes float32) and no 4-bit base; one line if not."""
    if config.use_peft:
        return
    if config.load_in_4bit:
        raise ValueError("use_peft: false trains every base weight; it cannot with load_in_4bit: true")
    if getattr(config, "init_adapter", None):
        raise ValueError("use_peft: false trains the base itself; init_adapter (a LoRA adapter to start from) "
                         "does not apply: merge it first (align export) and give the merged model")
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

        params = self.state_dict()
        if set(tensors) != set(params):
            raise KeyError(f"weights in the checkpoint do not match this model ({len(tensors)} tensors, "
                           f"{len(params)} expected)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])


class AdapterWeights(BaseWeights):
    """One adapter's tensors as a checkpoint head: PPO's critic on the frozen copy of a full fine-tuning run,
    a base the checkpoint's adapters do not come from."""

    def __init__(self, base, name: str):
        self.base, self.name = base, name

    def state_dict(self) -> dict:
        return self.base.adapter_parameters(self.name)


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


def frozen_copy(base, main: bool = True):
    """A frozen deep copy of the base as it is now (the reference of a full fine-tuning run), its memory said
    in one line. Taken in `build`, before a resume restores trained weights: it is the starting model."""
    import copy

    from align.core.base import SharedBase

    model = copy.deepcopy(base.model).eval()
    ref = SharedBase(model, base.tokenizer, base.name_or_path)  # freezes every parameter
    ref.load_dtype = base.load_dtype
    if main:
        print(f"[align] reference: a frozen copy of the base ({ref.base_bytes() / 2**20:.1f} MiB)", flush=True)
    return ref


def full_parameters(trainer) -> list:
    """Every base weight, trainable: the optimizer's parameters of a full fine-tuning run (a lifecycle Trainer's)."""
    if trainer.processes.fsdp:
        raise UserError("use_peft: false: full fine-tuning does not run under FSDP yet")
    if trainer.base.adapters:
        raise UserError(f"use_peft: false trains the base itself, but it holds adapters {trainer.base.adapters} "
                        "(a reward model on the shared base?): give reward_model_name_or_path an exported "
                        "classifier (align export)")
    if trainer.config.save_steps == 0 and trainer.processes.is_main:
        print(f"[align] {SAVE_STEPS_NOTE}", flush=True)
    return unfreeze(trainer.base)


class FullFinetuneHooks:
    """The lifecycle hooks of a policy recipe whose config has `use_peft` (DPO, KTO, ORPO, CPO, online DPO, GRPO):
    with use_peft: false no adapter trains, the checkpoints hold the base weights, and the run delivers
    `model/`. Mixed in before the Trainer."""

    def trained_adapters(self) -> list[str]:
        return super().trained_adapters() if self.config.use_peft else []

    def heads(self) -> dict:
        return super().heads() if self.config.use_peft else {**super().heads(), "base": BaseWeights(self.base.model)}

    def save_final(self, final: dict) -> Path:
        return super().save_final(final) if self.config.use_peft else save_full_model(self.base, self.out / "model")

    def final_path(self) -> Path:
        return super().final_path() if self.config.use_peft else self.out / "model"
