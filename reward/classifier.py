"""Any transformers sequence classifier as a reward function, scored the way TRL's GRPOTrainer scores it.

A local folder or hub id of an `AutoModelForSequenceClassification` with one label (a reward model from
the hub, or what `align export --reward` writes), loaded frozen on the trainer's device with its own
tokenizer. A (prompt, completion) row becomes text as TRL makes it: message lists are joined and
rendered by *this* tokenizer's chat template (not the policy's), strings are concatenated; the texts are
tokenized with no special tokens added, padded on the right, and the reward is `logits[:, 0]`.
"""

from __future__ import annotations

import torch

from reward.model import RewardModelError


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m for m in x)


def _as_messages(x, role: str) -> list[dict]:
    return x if _is_messages(x) else [{"role": role, "content": x}]


def reward_text(prompt, completion, tokenizer) -> str:
    """One row as the classifier reads it: a conversation through its chat template, or prompt + completion."""
    if not _is_messages(prompt):
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise RewardModelError(f"reward classifier: expected a text or chat-message prompt and completion, "
                                   f"got {type(prompt).__name__} and {type(completion).__name__}")
        return prompt + completion
    if not getattr(tokenizer, "chat_template", None):
        raise RewardModelError(f"{tokenizer.name_or_path}: conversational rows need the reward tokenizer to have a "
                               f"chat template, and it has none")
    return tokenizer.apply_chat_template(prompt + _as_messages(completion, "assistant"), tokenize=False)


def check_classifier_config(config, spec: str) -> None:
    """A sequence classifier with one label: anything else would score with a head it does not have."""
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise RewardModelError(f"{spec}: expected an AutoModelForSequenceClassification (config architectures "
                               f"*ForSequenceClassification), got architectures {archs}")
    if config.num_labels != 1:
        raise RewardModelError(f"{spec}: expected a scalar reward model (num_labels=1), got num_labels="
                               f"{config.num_labels}")


class ClassifierReward:
    """`ClassifierReward(spec)(prompts, completions, **kwargs) -> list[float]`, one reward per row.

    `__name__` is the last part of the model's name or path, as TRL names a model reward in its logs.
    """

    def __init__(self, spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 16):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from align.core.loading import load_tokenizer

        try:
            config = AutoConfig.from_pretrained(spec, trust_remote_code=False)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RewardModelError(f"{spec}: no sequence classifier here or in the hub cache ({first})") from None
        check_classifier_config(config, spec)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            spec, num_labels=1, dtype=dtype, use_safetensors=True, trust_remote_code=False).to(device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = load_tokenizer(spec)  # no pad token: EOS pads, as TRL does
        # transformers reads the last token that is not pad_token_id: it must be the tokenizer's.
        self.model.config.get_text_config().pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.__name__ = getattr(self.model.config, "_name_or_path", "").split("/")[-1] or spec

    def texts(self, prompts: list, completions: list) -> list[str]:
        if len(prompts) != len(completions):
            raise RewardModelError(f"{self.__name__}: got {len(prompts)} prompts and {len(completions)} completions")
        return [reward_text(p, c, self.tokenizer) for p, c in zip(prompts, completions, strict=True)]

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, *_, **__) -> list[float]:
        """Rewards of the rows; other columns TRL passes (completion_ids, answers, ...) are not read."""
        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(text=texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False).to(device)
            out += self.model(**batch).logits[:, 0].float().tolist()
        return out
