"""KTO (thumbs up / down) where only a LoRA adapter learns; the reference is the same base with the adapter off
(with `use_peft: false`, every base weight trains and the reference is a frozen copy of the starting base).

With `init_adapter` (e.g. an SFT run's adapter/) the trained adapter starts from it and, by default, the
reference is that starting adapter, frozen, on the same base (align/core/policy_init.py).

    align kto --config configs/kto_tiny.yaml [--resume] [--beta 0.2] [--set desirable_weight=1.33]

Data are TRL's unpaired rows (prompt / completion / label) or preference pairs unpaired on the fly
(align/data/unpaired.py). The lifecycle (setup, steps, checkpoints, resume, metrics) is align.train.lifecycle's
through align.train.preference; this file is the KTO part: the log-probs of each completion and of the
mismatched KL pairs under the policy and the reference, the loss (align/recipes/kto_losses.py) and TRL's
metrics. The KL pairs are made within each micro-batch (completions rotated by one), so micro-batches can be
shuffled each epoch: TRL makes them once, in dataset order, and must train on the data in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from align.core.errors import UserError
from align.core.logprobs import completion_logprobs
from align.core.policy_init import attach_policy, check_init_fields, reference_model
from align.data.issues import bad_rows
from align.data.unpaired import (
    TokenizedExample,
    UnpairedSet,
    collate_unpaired,
    load_unpaired,
    tokenize_unpaired,
)
from align.recipes.kto_losses import LOSS_TYPES, kl_estimate, kto_loss
from align.train.cli import adapter_recipe
from align.train.config import PreferenceDataConfig, TrainConfig
from align.train.config_parser import arg
from align.train.full_finetune import (
    FullFinetuneHooks,
    check_full_finetune,
    frozen_copy,
    full_parameters,
    use_peft_field,
)
from align.train.lifecycle import StepBatches
from align.train.preference import PreferenceTrainer

# Sums and counts each micro-batch reports; `kto_metrics` turns them into TRL's per-example means.
_SIDES = {"chosen": True, "rejected": False}


@dataclass
class KTOConfig(PreferenceDataConfig, TrainConfig):
    """Everything a KTO run depends on (TRL's KTOConfig names). YAML files under configs/ mirror these fields."""

    output_dir: str = arg("runs/kto", "Run folder: adapter/, checkpoints/, metrics.jsonl, tb/.")
    train_file: str = arg("", "Unpaired rows (prompt, completion, label) or preference pairs (prompt, chosen, "
                              "rejected): .jsonl/.json/.parquet/.csv, a save_to_disk folder, a folder of data "
                              "files, or a dataset name for datasets.load_dataset.")
    max_length: int = arg(1024, "Token budget for prompt + completion; longer sequences are cut from the right "
                                "(TRL's default 1024).")
    chat_template: bool = arg(False, "Wrap string rows in the tokenizer's chat template (as one user and one "
                                     "assistant message). TRL's KTO tokenises strings as they are: false.")
    # LoRA's best learning rate is ~10x full fine-tuning's (TRL's KTO default, 1e-6, is for full fine-tuning).
    learning_rate: float = arg(5e-5, "AdamW peak learning rate; ~10x a full fine-tuning lr.")
    per_device_train_batch_size: int = arg(4, "Examples per forward pass; the KL reference point is estimated "
                                              "within it, so at least 2 for loss_type kto.")
    per_device_eval_batch_size: int = arg(4, "Examples per forward pass in evaluation.")
    adapter_name: str = arg("policy", "Name of the trained adapter.")
    loss_type: str = arg("kto", f"One of {LOSS_TYPES}.")
    beta: float = arg(0.1, "Strength of the KL anchor to the reference.")
    desirable_weight: float = arg(1.0, "Weight of the desirable (label true) examples' losses; counters unequal "
                                       "numbers of desirable and undesirable examples.")
    undesirable_weight: float = arg(1.0, "Weight of the undesirable (label false) examples' losses.")
    precompute_ref_log_probs: bool = arg(False, "Not supported for KTO: the KL pairs change with each epoch's "
                                                "shuffle, so the reference is scored every step (adapter off).")
    init_adapter: str | None = arg(None, "PEFT adapter folder the trained adapter starts from (e.g. an SFT run's "
                                         "adapter/).")
    reference: str | None = arg(None, "'init': the reference is the starting adapter, frozen, on the same base "
                                      "(default with init_adapter); 'base': adapters off (default without).")
    use_peft: bool = use_peft_field()

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if self.loss_type == "kto" and self.per_device_train_batch_size < 2:
            raise ValueError("per_device_train_batch_size: expected at least 2 for loss_type kto (the KL reference "
                             "point pairs each prompt with another example's completion)")
        if self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs: not supported for KTO; the reference is scored every step")
        check_init_fields(self)
        check_full_finetune(self)
        self.check_batch()

    @property
    def calculate_kl(self) -> bool:
        return self.loss_type == "kto"


def sequence_logprobs(base, batch: dict, prefix: str = "") -> torch.Tensor:
    """Sum of completion log-probs of each row of a collated batch (KL_ rows with prefix="KL_")."""
    logp = completion_logprobs(base, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                               batch[f"{prefix}completion_mask"])
    return logp.sum(-1)


def kto_metrics(stats: dict) -> dict:
    """TRL's rewards/* and logps/* (means over the desirable or undesirable examples) from the summed
    statistics, which add across micro-batches and processes; the sums and counts themselves are dropped."""
    out = {k: v for k, v in stats.items() if not k.startswith("_")}
    for side in _SIDES:
        n = stats.get(f"_n_{side}", 0)
        if n > 0:
            out[f"rewards/{side}"] = stats[f"_rewards_{side}"] / n
            out[f"logps/{side}"] = stats[f"_logps_{side}"] / n
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


class KTOTrainer(FullFinetuneHooks, PreferenceTrainer):
    """self.pairs / self.eval_pairs hold TokenizedExamples (one completion and its label each)."""

    name = "kto"

    def __init__(self, config: KTOConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # Checked here, not in KTOConfig: the Python API may pass train_dataset instead. Still before any model loads.
        if self.train_dataset is None and not config.train_source():
            raise UserError("train_file: expected unpaired rows (prompt/completion/label) or preference pairs: a "
                            "data file, a folder or a dataset name (or dataset_name; or train_dataset= in Python)")

    # -- data ----------------------------------------------------------------------------------
    def read(self, source, split: str = "train", label: str | None = None) -> UnpairedSet:
        c = self.config
        data = load_unpaired(source, c.format, c.on_bad_rows, split, c.dataset_config, label, c.max_bad_fraction)
        self.report_skipped(data.source, data.skipped, len(data.rows) + bad_rows(data.skipped), c.max_bad_fraction)
        return data

    def tokenize(self, data: UnpairedSet) -> list[TokenizedExample]:
        c = self.config
        return tokenize_unpaired(data.rows, self.base.tokenizer, c.max_length, c.chat_template, c.on_bad_rows)

    def build(self) -> list[dict]:
        c = self.config
        self.ref_copy = None
        if not c.use_peft:  # TRL's KTOTrainer without PEFT: the reference is a copy of the starting model
            self.ref_adapter = None
            self.ref_copy = frozen_copy(self.base, self.processes.is_main)
            params = full_parameters(self)
        else:
            self.ref_adapter = attach_policy(self.base, c.adapter_name, c.lora, c.init_adapter, c.reference)
            params = list(self.base.adapter_parameters(c.adapter_name).values())
        self.load_pairs(*self.data_sources())
        self.advise_weights()
        return [{"params": params, "lr": c.learning_rate}]

    def advise_weights(self) -> None:
        """TRL's advice (KTO paper, eq. 8) when desirable and undesirable examples are unbalanced."""
        c = self.config
        good = max(sum(e.label for e in self.pairs), 1)
        bad = max(len(self.pairs) - good, 1)
        if good == bad or not self.processes.is_main:
            return
        d_lo, d_hi = round(bad * c.undesirable_weight / good, 2), round(bad * c.undesirable_weight / good * 1.33, 2)
        u_lo, u_hi = round(good * c.desirable_weight / bad / 1.33, 2), round(good * c.desirable_weight / bad, 2)
        if not (d_lo <= c.desirable_weight <= d_hi or u_lo <= c.undesirable_weight <= u_hi):
            print(f"[align] {good} desirable and {bad} undesirable examples: set EITHER desirable_weight in "
                  f"[{d_lo}, {d_hi}] or undesirable_weight in [{u_lo}, {u_hi}] (not both)")

    def num_steps(self) -> int:
        return self.data_parallel_steps(len(self.pairs), "examples")

    def micro_batches(self, step: int) -> StepBatches:
        """This process's share of step `step`'s micro-batches (example indices); `pairs` counts examples."""
        every = self.global_batches_for_step(len(self.pairs), step)
        chosen = [self.pairs[i] for idx in every for i in idx]
        tokens = sum(len(e.prompt_ids) + len(e.completion_ids) for e in chosen)
        return StepBatches(self.processes.shard(every), len(every), {"pairs": len(chosen), "tokens": tokens})

    # -- the loss -------------------------------------------------------------------------------
    def logprobs(self, batch: dict, kl: bool, base=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(completion log-prob sums, KL pair log-prob sums or None) under the active adapter of `base` (default
        the policy's); KL without gradient."""
        base = base or self.base
        kl_logps = None
        if kl:
            with torch.no_grad():
                kl_logps = sequence_logprobs(base, batch, "KL_")
        return sequence_logprobs(base, batch), kl_logps

    @torch.no_grad()
    def reference_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`logprobs` under the reference: the frozen copy (use_peft: false), or the base with the adapter off."""
        with reference_model(self.base, self.ref_adapter, self.ref_copy) as model:
            return self.logprobs(batch, self.config.calculate_kl, model)

    def pair_loss(self, examples: list[TokenizedExample], indices: list[int] | None, train: bool):
        c = self.config
        batch = collate_unpaired(examples, self.base.tokenizer.pad_token_id, c.max_length, c.calculate_kl)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ref_logps, ref_kl = self.reference_logprobs(batch)
        with torch.set_grad_enabled(train):
            logps, policy_kl = self.logprobs(batch, c.calculate_kl)
            across = self.mean_over_processes if train and self.processes.distributed else None
            kl = kl_estimate(policy_kl, ref_kl, across) if c.calculate_kl else logps.new_zeros(())
            losses, r_chosen, r_rejected = kto_loss(logps, ref_logps, batch["label"], kl, c.beta,
                                                    c.desirable_weight, c.undesirable_weight, c.loss_type)
            loss = losses.nanmean()
        labels = batch["label"].bool()
        stats = {"kl": kl.item()}
        for side, rewards in (("chosen", r_chosen), ("rejected", r_rejected)):
            mask = labels if _SIDES[side] else ~labels
            stats[f"_n_{side}"] = float(mask.sum().item())
            stats[f"_rewards_{side}"] = rewards.sum().item()
            stats[f"_logps_{side}"] = logps.detach()[mask].sum().item()
        return loss, stats

    def mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.processes.mean({"v": value.item()})["v"], device=value.device, dtype=value.dtype)

    def training_step(self) -> dict:
        return kto_metrics(super().training_step())

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.3f}", "kl": f"{stats['kl']:.3f}"}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, KL, rewards and log-probs (TRL's names under eval/)."""
        if not self.eval_pairs:
            return {}
        self.base.model.eval()
        sums: dict[str, float] = {}
        for chunk in self.eval_chunks():
            loss, stats = self.pair_loss(chunk, None, train=False)
            for k, v in {"loss": loss.item(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + (v if k.startswith("_") else v * len(chunk))
        means = {k: v if k.startswith("_") else v / len(self.eval_pairs) for k, v in sums.items()}
        return {f"eval/{k}": v for k, v in kto_metrics(means).items()}

    def summary_extra(self) -> dict:
        good = sum(e.label for e in self.pairs)
        return {"skipped_rows": self.skipped_rows, "train_examples": len(self.pairs), "desirable": good,
                "undesirable": len(self.pairs) - good}


def train_kto(config: KTOConfig, resume: bool | str | None = None, overwrite: bool = False,
              train_dataset=None, eval_dataset=None, resume_changed: bool = False) -> Path:
    """Run KTO end to end and return the saved adapter folder, or model/ with use_peft: false (datasets: a Dataset
    or a list of dicts)."""
    return KTOTrainer(config, resume=resume, overwrite=overwrite, train_dataset=train_dataset,
                      eval_dataset=eval_dataset, resume_changed=resume_changed).train()


# -- CLI ----------------------------------------------------------------------------------------
add_arguments, run = adapter_recipe(KTOConfig, KTOTrainer)
