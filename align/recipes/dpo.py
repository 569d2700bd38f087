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
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from align.core.base import SharedBase
from align.core.errors import UserError
from align.core.fsdp import full_tensor
from align.core.policy_init import attach_policy, check_init_fields, reference_model
from align.data.preference import TokenizedPair, collate_pairs
from align.recipes.dpo_losses import (
    F_DIVERGENCE_LOSSES,
    LOSS_TYPES,
    SMOOTHED_LOSSES,
    LossSettings,
    PairLogps,
    check_losses,
    chosen_nll,
    loss_list,
    preference_loss,
)
from align.recipes.dpo_scoring import score_pairs
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
    loss_type: str | list[str] = arg("sigmoid", f"One of {LOSS_TYPES}, or a list of them summed with "
                                                "loss_weights (TRL's MPO form: [sigmoid, bco_pair, sft]).")
    loss_weights: list[float] | None = arg(None, "One weight per loss_type (null: 1.0 each): the loss is "
                                                 "Σ weight · mean over pairs.")
    beta: float = arg(0.1, "Strength of the KL anchor to the reference (IPO's τ).")
    label_smoothing: float = arg(0.0, "Assumed label noise ε in [0, 0.5): read by robust, exo_pair (needs > 0), aot "
                                      "and aot_unpaired, as TRL 1.16. sigmoid ignores it (as TRL 1.16) unless cdpo.")
    cdpo: bool = arg(False, "Conservative DPO (Mitchell 2023): sigmoid reads label_smoothing, "
                            "-(1-ε)·log σ(βh) - ε·log σ(-βh), as TRL before 1.0 did. Opt-in: TRL 1.16 does not.")
    use_weighting: bool = arg(False, "WPO: weight each pair by the policy's length-normalised probabilities of its "
                                     "two completions (TRL's use_weighting; not with aot, aot_unpaired).")
    ld_alpha: float | None = arg(None, "LD-DPO: completion tokens past the shorter answer's length count ld_alpha "
                                       "times in the log-probs (0..1; null: plain sums).")
    f_divergence_type: str = arg("reverse_kl", "f-DPO's divergence: reverse_kl | forward_kl | js_divergence | "
                                               f"alpha_divergence (other than reverse_kl: {F_DIVERGENCE_LOSSES}).")
    f_alpha_divergence_coef: float = arg(0.5, "α of f_divergence_type: alpha_divergence.")
    discopop_tau: float = arg(0.05, "DiscoPOP's τ (loss_type: discopop).")
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
    padding_free: bool = arg(False, "Forward the chosen and rejected sequences of all pairs of a micro-batch as one "
                                    "row without padding (TRL's name); same log-probs. Checked on the model "
                                    "before training.")
    use_peft: bool = use_peft_field()

    RENAMED = {**TrainConfig.RENAMED, "precompute_ref": "precompute_ref_log_probs"}

    def __post_init__(self):
        super().__post_init__()
        check_full_finetune(self)
        self.check_losses()
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha: expected >= 0 or null, got {self.rpo_alpha}")
        if self.precompute_ref_log_probs and self.ref_model_copy:
            raise ValueError("precompute_ref_log_probs and ref_model_copy: choose one")
        check_init_fields(self)
        self.check_batch()

    def loss_types(self) -> list[str]:
        return loss_list(self.loss_type)

    def loss_settings(self) -> LossSettings:
        return LossSettings(self.beta, self.label_smoothing, self.f_divergence_type, self.f_alpha_divergence_coef,
                            self.discopop_tau, self.cdpo)

    def check_losses(self) -> None:
        """TRL's refusals plus ours (ranges), each one line naming the field, before any model loads."""
        if isinstance(self.loss_type, list) and len(self.loss_type) == 1:
            self.loss_type = self.loss_type[0]  # TRL's [sigmoid] is sigmoid
        types = self.loss_types()
        check_losses(types, self.loss_weights, self.f_divergence_type, self.use_weighting)
        if self.beta <= 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: expected in [0, 0.5), got {self.label_smoothing}")
        if "exo_pair" in types and self.label_smoothing == 0:
            raise ValueError("label_smoothing: exo_pair needs ε > 0 (the EXO paper suggests 1e-3)")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ValueError(f"ld_alpha: expected in [0, 1] or null, got {self.ld_alpha}")
        if self.discopop_tau <= 0:
            raise ValueError(f"discopop_tau: expected > 0, got {self.discopop_tau}")
        readers = set(SMOOTHED_LOSSES) | ({"sigmoid"} if self.cdpo else set())
        if self.label_smoothing and not readers & set(types):
            # TRL 1.16 ignores it too; said once rather than silently (cdpo: sigmoid reads it)
            warnings.warn(f"label_smoothing: {self.label_smoothing} has no effect with loss_type {self.loss_type} "
                          f"(read by {SMOOTHED_LOSSES}, and by sigmoid with cdpo: true)", stacklevel=2)


def sequence_logprobs(base: SharedBase, batch: dict, ld_alpha: float | None = None, padding_free: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion log-probs for each row of a collated pair batch -> (chosen, rejected); LD-DPO's
    weighted sums with `ld_alpha` (align/recipes/dpo_scoring.py)."""
    scores = score_pairs(base, batch, ld_alpha, padding_free=padding_free)
    return scores.chosen, scores.rejected


def completion_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens scored in each row -> (chosen, rejected); IPO's loss averages over them."""
    n = batch["completion_mask"][:, 1:].sum(-1)
    half = n.shape[0] // 2
    return n[:half], n[half:]


class DPOTrainer(FullFinetuneHooks, PreferenceTrainer):
    name = "dpo"

    def __init__(self, config: DPOConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.require_train_source()

    def build(self) -> list[dict]:
        c = self.config
        self.ref_cache: dict[str, torch.Tensor] | None = None
        self.ref_copy = None
        self.base_print = self.base.fingerprint()  # before a resume restores trained weights (use_peft: false)
        self.reference_free = not c.use_peft and set(c.loss_types()) <= {"sft"}
        if not c.use_peft:
            # TRL's DPOTrainer without PEFT: a reference copy of the starting model, unless its log-probs are
            # precomputed (here from the base before the first step) or no loss reads them.
            self.ref_adapter = None
            if not (c.precompute_ref_log_probs or self.reference_free):
                self.ref_copy = frozen_copy(self.base, self.processes.is_main)
            self.load_pairs(*self.data_sources())
            return [{"params": full_parameters(self), "lr": c.learning_rate}]
        self.ref_adapter = attach_policy(self.base, c.adapter_name, c.lora, c.init_adapter, c.reference)
        if c.ref_model_copy:
            self.ref_copy = SharedBase.load(self.model_path, self.dtype, self.device, c.trust_remote_code)
            if self.ref_adapter is not None:
                self.ref_copy.load_adapter(self.ref_adapter, c.init_adapter)
        self.load_pairs(*self.data_sources())
        if c.padding_free:
            self.base.check_padding_free()  # before the first step: a model that mixes sequences is refused
        return [{"params": list(self.base.adapter_parameters(c.adapter_name).values()), "lr": c.learning_rate}]

    # -- reference ----------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logprobs(self, batch: dict, indices: list[int] | None, pairs: list | None = None):
        """The reference's (chosen, rejected) sums: cached (training `indices`, or held-out `pairs` under
        use_peft: false), or computed now."""
        if self.ref_cache is not None and indices is not None:
            idx = torch.tensor(indices)
            return self.ref_cache["chosen"][idx], self.ref_cache["rejected"][idx]
        c = self.config
        if self.ref_cache is not None and pairs is not None and "eval_chosen" in self.ref_cache:
            rows = {id(p): i for i, p in enumerate(self.eval_pairs)}
            idx = torch.tensor([rows[id(p)] for p in pairs])
            return self.ref_cache["eval_chosen"][idx], self.ref_cache["eval_rejected"][idx]
        if self.reference_free:  # loss_type sft reads no reference: rewards/* are then beta * log pi
            zeros = torch.zeros(batch["input_ids"].shape[0] // 2, device=self.device)
            return zeros, zeros
        with reference_model(self.base, self.ref_adapter, self.ref_copy) as model:
            return sequence_logprobs(model, batch, c.ld_alpha, c.padding_free)

    def reference_key(self) -> str:
        """What cached reference log-probs depend on: the base, its dtype, max_length, loss type, ld_alpha and
        the tokens.

        The cache holds sums for every loss type ("sums": a cache of IPO's old averages never matches); with
        ld_alpha, LD-DPO's weighted sums.
        """
        c = self.config
        what = {"base": self.base_print, "reference": self.reference_identity(), "dtype": self.dtype,
                "max_length": c.max_length, "loss_type": c.loss_type, "sums": True,
                **({"ld_alpha": c.ld_alpha} if c.ld_alpha is not None else {}),
                **{f"{prefix}pairs": [[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs]
                   for prefix, pairs in self.reference_sets().items()}}
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
        if self.step and not self.config.use_peft:  # the base has trained: it is no longer the reference
            raise UserError(f"{path}: missing or made for other data; with use_peft: false the reference log-probs "
                            "come from the base before the first step: start the run again (--overwrite)")
        self.ref_cache = {}
        size = c.per_device_eval_batch_size
        for prefix, pairs in self.reference_sets().items():
            chosen, rejected = [torch.zeros(0)], [torch.zeros(0)]
            for start in tqdm(range(0, len(pairs), size), desc=f"reference log-probs{prefix and ' (held out)'}"):
                batch = collate_pairs(pairs[start:start + size], self.base.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                ch, rj = self.reference_logprobs(batch, None)
                chosen.append(ch.cpu())
                rejected.append(rj.cpu())
            self.ref_cache.update({f"{prefix}chosen": torch.cat(chosen).float(),
                                   f"{prefix}rejected": torch.cat(rejected).float()})
        if self.processes.is_main:  # every process computed the same values; one writes them
            atomic_write_bytes(path, save(self.ref_cache, metadata={"key_sha256": key}))
        return True

    def reference_sets(self) -> dict[str, list[TokenizedPair]]:
        """The pairs whose reference log-probs are precomputed, by cache prefix: the training pairs, and with
        use_peft: false the held-out ones too (the base itself trains, so it cannot be the reference later)."""
        return {"": self.pairs, **({} if self.config.use_peft else {"eval_": self.eval_pairs})}

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
        ref_c, ref_r = self.reference_logprobs(batch, indices, pairs)
        len_c, len_r = completion_lengths(batch)
        with torch.set_grad_enabled(train):
            scores = score_pairs(self.base, batch, c.ld_alpha, c.use_weighting, c.padding_free)
            nll = chosen_nll(scores.chosen_raw, len_c)
            pol_c, pol_r = scores.chosen, scores.rejected
            pairs_logps = PairLogps(pol_c, pol_r, ref_c.to(pol_c), ref_r.to(pol_r), len_c, len_r, nll, scores.weights)
            loss, r_c, r_r = preference_loss(pairs_logps, c.loss_settings(), c.loss_types(), c.loss_weights)
            if c.rpo_alpha is not None:
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
