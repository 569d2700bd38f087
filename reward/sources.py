"""A reward model from anywhere, as one reward function: `load_reward_model(spec, base, device, dtype)`.

What `spec` names decides how it scores:
- align's reward folder (reward_meta.json; or a reward run folder holding reward_model/): its adapter is
  attached to the trainer's own base as "reward", frozen; no second copy of the base is loaded.
- a folder whose config.json is a sequence classifier (what `align export --reward` writes, what a
  `use_peft: false` reward run writes, or any `AutoModelForSequenceClassification`): its own weights and
  tokenizer, frozen, scored as TRL does (reward/classifier.py).
- anything else that is not a folder here: a hub id, read from the hub cache (offline runs) or the hub.
The result is called as TRL calls a reward function, fn(prompts=..., completions=..., **columns).
"""

from __future__ import annotations

from pathlib import Path

import torch

from reward.model import META, RewardModelError, find_reward_folder


def _looks_like_hub_id(spec: str) -> bool:
    """`name` or `org/name`; a path that points somewhere (/x, ./x, ~/x, a/b/c) is not one."""
    return spec.count("/") <= 1 and not spec.startswith((".", "/", "~"))


def load_reward_model(spec: str, base, device: str | torch.device = "cpu",
                      dtype: str | torch.dtype = "float32", batch_size: int = 16):
    """A reward function fn(prompts, completions, **kwargs) -> list[float] for the model `spec` names.

    `base` (a SharedBase) carries an align reward adapter; `device` and `dtype` place a classifier.
    `fn.__name__` is the last part of `spec` (TRL's name for a model reward); `fn.model` is what scores
    (the RewardModel, or the transformers classifier).
    """
    from align.core.loading import resolve_dtype
    from reward.classifier import ClassifierReward

    path = Path(spec).expanduser()
    name = str(spec).rstrip("/").split("/")[-1]
    if path.is_dir():
        found = find_reward_folder(path)
        if found is not None and found[1] == "adapter":
            from reward.model import RewardModel

            fn = RewardModel.attach(base, found[0], name="reward").as_reward_fn(batch_size)
            fn.__name__ = name
            return fn
        if found is not None:  # a full fine-tuning reward run: its folder is a classifier
            spec = str(found[0])
        elif not (path / "config.json").is_file():
            raise RewardModelError(f"reward_model {spec}: expected align's reward folder ({META}) or a sequence "
                                   f"classifier folder (config.json), found neither")
    elif path.exists() or not _looks_like_hub_id(str(spec)):
        raise RewardModelError(f"reward_model {spec}: not a folder here, nor a hub id (org/name); expected align's "
                               f"reward folder, a sequence classifier folder or a hub id")
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    return ClassifierReward(str(spec), device, dtype, batch_size)
