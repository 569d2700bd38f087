"""DPO where only a LoRA adapter learns; the reference is the same base with the adapter off.

With `init_adapter` (e.g. an SFT run's adapter/) the trained adapter starts from it and, by
default, the reference is that starting adapter, frozen, on the same base (align/core/policy_init.py).

    align dpo --config configs/dpo_tiny.yaml [--resume] [--beta 0.2] [--set learning_rate=1e-4]

The lifecycle (setup, steps, checkpoints, resume, metrics) is align.train.lifecycle's; this file is
the DPO part: the reference log-probs, the loss, and its statistics. Why our own loop rather
than TRL's DPOTrainer: we score only completion tokens (no full-vocabulary float32
log-softmax over every position), keep one base copy in all modes, and write
safetensors-only checkpoints that resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from align.core.base import SharedBase
from align.core.fsdp import full_tensor
from align.core.logprobs import completion_logprobs
from align.core.policy_init import attach_policy, check_init_fields, reference_context
from align.data.preference import TokenizedPair, collate_pairs
from align.recipes.dpo_losses import LOSS_TYPES, chosen_nll, dpo_loss, single_loss
from align.train.cli import adapter_recipe
from align.train.config import PreferenceDataConfig, TrainConfig
from align.train.config_parser import arg
from align.train.preference import PreferenceTrainer


@dataclass
class DPOConfig(PreferenceDataConfig, TrainConfig):
    """Everything a DPO run depends on. YAML files under configs/ mirror these fields."""

    output_dir: str = arg("runs/dpo", "Run folder: adapter/, checkpoints/, metrics.jsonl, tb/.")
    # LoRA's best learning rate is ~10x full fine-tuning's; full-parameter DPO uses 5e-7..5e-6.
    learning_rate: float = arg(5e-5, "AdamW peak learning rate; ~10x a full fine-tuning lr.")
    per_device_train_batch_size: int = arg(4, "Preference pairs per forward pass.")
    per_device_eval_batch_size: int = arg(4, "Preference pairs per forward pass in evaluation.")
    adapter_name: str = arg("policy", "Name of the trained adapter.")
    loss_type: str | list[str] = arg("sigmoid", f"One of {LOSS_TYPES}; TRL's list form ([sigmoid]) takes one "
                                                "loss.")
    beta: float = arg(0.1, "Strength of the KL anchor to the reference.")
    label_smoothing: float = arg(0.0, "Assumed label noise (sigmoid, robust).")
    rpo_alpha: float | None = arg(None, "Weight of the chosen completions' per-token NLL added to the loss (RPO, "
                                        "TRL's name; 1.0 in the paper): keeps the chosen answers likely while "
                                        "the margin grows. null: plain DPO.")
    precompute_ref_log_probs: bool = arg(False, "Compute reference log-probs once (adapter off) before training "
                                                "instead of every step.")
    ref_model_copy: bool = arg(False, "Comparison only: keep a separate reference copy of the base (more memory).")
    init_adapter: str | None = arg(None, "PEFT adapter folder the trained adapter starts from (e.g. an SFT run's "
                                         "adapter/).")
    reference: str | None = arg(None, "'init': the reference is the starting adapter, frozen, on the same base "
                                      "(default with init_adapter); 'base': adapters off (default without).")

    RENAMED = {**TrainConfig.RENAMED, "precompute_ref": "precompute_ref_log_probs"}

    def __post_init__(self):
        super().__post_init__()
        self.loss_type = single_loss(self.loss_type)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: expected in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing: only sigmoid and robust use it, not {self.loss_type}")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha: expected >= 0 or null, got {self.rpo_alpha}")
        if self.precompute_ref_log_probs and self.ref_model_copy:
            raise ValueError("precompute_ref_log_probs and ref_model_copy: choose one")
        check_init_fields(self)
        self.check_batch()


def sequence_logprobs(base: SharedBase, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion log-probs for each row of a collated pair batch -> (chosen, rejected)."""
    logp = completion_logprobs(base, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    per_row = logp.sum(-1)
    half = per_row.shape[0] // 2
    return per_row[:half], per_row[half:]


def completion_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens scored in each row -> (chosen, rejected); IPO's loss averages over them."""
    n = batch["completion_mask"][:, 1:].sum(-1)
    half = n.shape[0] // 2
    return n[:half], n[half:]


class DPOTrainer(PreferenceTrainer):
    name = "dpo"

    def __init__(self, config: DPOConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.require_train_source()

    def build(self) -> list[dict]:
        c = self.config
        self.ref_cache: dict[str, torch.Tensor] | None = None
        self.ref_copy = None
        self.ref_adapter = attach_policy(self.base, c.adapter_name, c.lora, c.init_adapter, c.reference)
        if c.ref_model_copy:
            self.ref_copy = SharedBase.load(self.model_path, self.dtype, self.device, c.trust_remote_code)
            if self.ref_adapter is not None:
                self.ref_copy.load_adapter(self.ref_adapter, c.init_adapter)
        self.load_pairs(*self.data_sources())
        return [{"params": list(self.base.adapter_parameters(c.adapter_name).values()), "lr": c.learning_rate}]

    # -- reference ----------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logprobs(self, batch: dict, indices: list[int] | None):
        if self.ref_cache is not None and indices is not None:
            idx = torch.tensor(indices)
            return self.ref_cache["chosen"][idx], self.ref_cache["rejected"][idx]
        if self.ref_copy is not None:
            return sequence_logprobs(self.ref_copy, batch)
        with reference_context(self.base, self.ref_adapter):
            return sequence_logprobs(self.base, batch)

    def reference_key(self) -> str:
        """What cached reference log-probs depend on: the base, its dtype, max_length, loss type and the tokens.

        The cache holds sums for every loss type ("sums": a cache of IPO's old averages never matches).
        """
        c = self.config
        what = {"base": self.base.fingerprint(), "reference": self.reference_identity(), "dtype": self.dtype,
                "max_length": c.max_length, "loss_type": c.loss_type, "sums": True,
                "pairs": [[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in self.pairs]}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def reference_identity(self) -> str | None:
        """A hash of the reference adapter's weights (None: the bare base), so a cache never outlives them."""
        if self.ref_adapter is None:
            return None
        h = hashlib.sha256()
        for name, p in sorted(self.base.adapter_parameters(self.ref_adapter).items()):
            h.update(name.encode())
            h.update(full_tensor(p.detach()).float().cpu().numpy().tobytes())  # FSDP: gathered by every process
        return h.hexdigest()

    @torch.no_grad()
    def precompute_reference(self) -> bool:
        """One pass over the training pairs with the adapter off, cached in the run folder for resume.

        Returns False when a cache with the same key was reused, True when it was computed.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file, save
        from tqdm import tqdm

        from align.core.atomic import atomic_write_bytes

        c = self.config
        key = self.reference_key()
        path = self.out / "ref_logprobs.safetensors"
        if path.exists():
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key_sha256") == key:
                    self.ref_cache = load_file(str(path))
                    return False
        chosen, rejected = [], []
        size = c.per_device_eval_batch_size
        for start in tqdm(range(0, len(self.pairs), size), desc="reference log-probs"):
            batch = collate_pairs(self.pairs[start:start + size], self.base.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            ch, rj = self.reference_logprobs(batch, None)
            chosen.append(ch.cpu())
            rejected.append(rj.cpu())
        self.ref_cache = {"chosen": torch.cat(chosen).float(), "rejected": torch.cat(rejected).float()}
        if self.processes.is_main:  # every process computed the same values; one writes them
            atomic_write_bytes(path, save(self.ref_cache, metadata={"key_sha256": key}))
        return True

    def before_train(self) -> None:
        if self.config.precompute_ref_log_probs and self.ref_cache is None:
            t0 = time.perf_counter()
            if self.precompute_reference():
                self.logger.log(self.step, {"precompute_ref_s": time.perf_counter() - t0})

    # -- the loss -----------------------------------------------------------------------------
    def pair_loss(self, pairs: list[TokenizedPair], indices: list[int] | None, train: bool):
        c = self.config
        batch = collate_pairs(pairs, self.base.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ref_c, ref_r = self.reference_logprobs(batch, indices)
        len_c, len_r = completion_lengths(batch)
        with torch.set_grad_enabled(train):
            pol_c, pol_r = sequence_logprobs(self.base, batch)
            losses, r_c, r_r = dpo_loss(pol_c, pol_r, ref_c.to(pol_c), ref_r.to(pol_r), c.beta, c.loss_type,
                                        c.label_smoothing, len_c, len_r)
            loss = losses.mean()
            if c.rpo_alpha is not None:
                nll = chosen_nll(pol_c, len_c)
                loss = loss + c.rpo_alpha * nll
        stats = {
            "rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracies": (r_c > r_r).float().mean().item(),
            "logps/chosen": pol_c.detach().mean().item(), "logps/rejected": pol_r.detach().mean().item(),
        }
        if c.rpo_alpha is not None:
            stats["nll_loss"] = nll.item()
        return loss, stats


def train_dpo(config: DPOConfig, resume: bool | str | None = None, overwrite: bool = False,
              train_dataset=None, eval_dataset=None, resume_changed: bool = False) -> Path:
    """Run DPO end to end and return the saved adapter folder (datasets: a Dataset or a list of dicts)."""
    return DPOTrainer(config, resume=resume, overwrite=overwrite, train_dataset=train_dataset,
                      eval_dataset=eval_dataset, resume_changed=resume_changed).train()


# -- CLI ----------------------------------------------------------------------------------------
add_arguments, run = adapter_recipe(DPOConfig, DPOTrainer)
