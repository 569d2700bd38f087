"""What ORPO and CPO/SimPO share: preference pairs, one adapter, and no reference model at all.

The policy scores a batch of pairs in one forward (align.core.logprobs: completion tokens only, no
full-vocabulary logits), and the loss reads the per-pair sums or per-token averages and the chosen
rows' NLL from that single pass. Nothing is computed with the adapter off and nothing is cached: a
step costs one forward and one backward of the policy (DPO pays a reference forward as well). With no
reference, full fine-tuning (`use_peft: false`) needs no frozen copy either: the base itself trains.

The lifecycle (data, steps, checkpoints, exact resume, --check_config, trackers, N processes) is
align.train.lifecycle's and align.train.preference's, as for DPO (align/recipes/dpo.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.core.logprobs import completion_logprobs
from align.core.policy_init import attach_policy, check_adapter_folder
from align.data.preference import TokenizedPair, collate_pairs
from align.recipes.dpo_losses import chosen_nll
from align.train.config import PreferenceDataConfig, TrainConfig
from align.train.config_parser import arg
from align.train.full_finetune import FullFinetuneHooks, check_full_finetune, full_parameters, use_peft_field
from align.train.preference import PreferenceTrainer


@dataclass
class ReferenceFreeConfig(PreferenceDataConfig, TrainConfig):
    """The fields ORPOConfig and CPOConfig share (TRL's names)."""

    # LoRA's best learning rate is ~10x full fine-tuning's (TRL's ORPO/CPO default is 1e-6, full-parameter).
    learning_rate: float = arg(5e-5, "AdamW peak learning rate; ~10x a full fine-tuning lr.")
    per_device_train_batch_size: int = arg(4, "Preference pairs per forward pass.")
    per_device_eval_batch_size: int = arg(4, "Preference pairs per forward pass in evaluation.")
    adapter_name: str = arg("policy", "Name of the trained adapter.")
    beta: float = arg(0.1, "Weight of the preference term (see the recipe's loss).")
    init_adapter: str | None = arg(None, "PEFT adapter folder the trained adapter starts from (e.g. an SFT run's "
                                         "adapter/); there is no reference to anchor to.")
    use_peft: bool = use_peft_field()

    def __post_init__(self):
        super().__post_init__()
        check_full_finetune(self)
        if self.beta <= 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")
        if self.init_adapter is not None:
            check_adapter_folder(self.init_adapter, "init_adapter")
        self.check_batch()


@dataclass
class PairScores:
    """One batch of pairs scored by the policy: summed completion log-probs and completion lengths (B,) of
    chosen and rejected, and the chosen rows' NLL (tokens as the recipe counts them)."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    nll: torch.Tensor | None

    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token average log-probs (TRL's average_log_prob=True)."""
        return self.chosen_sum / self.chosen_len.clamp(min=1), self.rejected_sum / self.rejected_len.clamp(min=1)


def score_pairs(base, batch: dict, nll: str | None) -> PairScores:
    """Score a collated pair batch (collate_pairs) in one forward of the active adapter.

    nll: None (no NLL), "completion" (the chosen completions' tokens: CPO) or "sequence" (the chosen rows'
    prompt and completion tokens: ORPO, as TRL computes it).
    """
    completion = batch["completion_mask"]
    half = completion.shape[0] // 2
    scored = completion.clone()
    if nll == "sequence":  # the chosen rows' prompt tokens are scored too, for the NLL only
        scored[:half] = batch["attention_mask"][:half]
    logp = completion_logprobs(base, batch["input_ids"], batch["attention_mask"], scored)
    comp = completion[:, 1:].to(logp)
    sums, lengths = (logp * comp).sum(-1), comp.sum(-1)
    loss_nll = None
    if nll is not None:
        mask = scored[:half, 1:].to(logp)
        loss_nll = chosen_nll((logp[:half] * mask).sum(-1), mask.sum(-1))
    return PairScores(sums[:half], sums[half:], lengths[:half], lengths[half:], loss_nll)


def reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                 rejected_logps: torch.Tensor) -> dict[str, float]:
    """TRL's rewards/* and logps/* metrics of one batch."""
    return {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": chosen_logps.detach().mean().item(), "logps/rejected": rejected_logps.detach().mean().item()}


class ReferenceFreeTrainer(FullFinetuneHooks, PreferenceTrainer):
    """A PreferenceTrainer with one trained adapter (or, use_peft: false, the base itself) and no reference; a
    recipe gives `objective`."""

    nll: str | None = None  # what score_pairs computes the NLL over (see there)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.require_train_source()

    def build(self) -> list[dict]:
        c = self.config
        if c.use_peft:
            attach_policy(self.base, c.adapter_name, c.lora, c.init_adapter, "base")
        self.load_pairs(*self.data_sources())
        params = list(self.base.adapter_parameters(c.adapter_name).values()) if c.use_peft else full_parameters(self)
        return [{"params": params, "lr": c.learning_rate}]

    def nll_over(self) -> str | None:
        return self.nll

    def objective(self, scores: PairScores) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, TRL's metrics) of one scored batch."""
        raise NotImplementedError

    def pair_loss(self, pairs: list[TokenizedPair], indices: list[int] | None, train: bool):
        batch = collate_pairs(pairs, self.base.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.set_grad_enabled(train):
            return self.objective(score_pairs(self.base, batch, self.nll_over()))
