"""Supervised fine-tuning of a LoRA adapter on one frozen base (TRL's SFT formats and names).

    align sft --config configs/sft_tiny.yaml [--resume] [--packing true] [--set learning_rate=1e-4]

The lifecycle (setup, steps, checkpoints, resume, metrics, folder policy) is align.train.lifecycle's;
this file is the SFT part: the data (align/data/sft.py), the token-level cross-entropy and its
statistics under TRL's SFT names (loss, mean_token_accuracy, num_tokens). The saved `adapter/`
is a PEFT folder that DPO and PPO accept as `init_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from align.core.errors import UserError
from align.core.fsdp import full_tensor
from align.data.issues import bad_rows
from align.data.preference import split_held_out
from align.data.sft import collate_sft, load_sft, pack_examples, tokenize_sft
from align.train.cli import adapter_recipe
from align.train.config import TrainConfig, check_fraction
from align.train.config_parser import arg
from align.train.full_finetune import (
    BaseWeights,
    check_full_finetune,
    full_parameters,
    save_full_model,
    use_peft_field,
)
from align.train.lifecycle import StepBatches, Trainer


@dataclass
class SFTConfig(TrainConfig):
    """Everything an SFT run depends on. YAML files under configs/ mirror these fields."""

    output_dir: str = arg("runs/sft", "Run folder: adapter/, checkpoints/, metrics.jsonl, tb/.")
    learning_rate: float = arg(2e-4, "AdamW peak learning rate; ~10x TRL's full fine-tuning SFT default (2e-5).")
    adapter_name: str = arg("policy", "Name of the trained adapter.")
    train_file: str = arg("", "SFT data: .jsonl/.json/.parquet/.csv, a folder (save_to_disk or of data files), or a "
                              "datasets name.")
    eval_file: str | None = arg(None, "Held-out SFT data (optional).")
    eval_fraction: float = arg(0.0, "Without eval_file: this fraction of the training rows is held out.")
    on_bad_rows: str = arg("error", "error (abort, listing every bad row) | skip (drop and count them).")
    max_bad_fraction: float = arg(0.1, "With on_bad_rows: skip, stop before training when more than this fraction "
                                       "of the rows are bad.")
    dataset_text_field: str = arg("text", "The field holding the text of language-modelling rows.")
    chat_template: bool = arg(True, "Apply the tokenizer's chat template to string prompt-completion rows, so the "
                                    "adapter learns the chat format (DPO's chat_template: true; TRL's SFTTrainer "
                                    "and align's DPO default leave string rows plain).")
    max_length: int = arg(1024, "Tokens per example (longer ones are cut, keeping the start); with packing, the "
                                "length of each packed row.")
    packing: bool = arg(False, "Pack whole examples into rows of max_length (best-fit decreasing, TRL's bfd); "
                               "attention and loss stay inside each example. Implies padding_free, as TRL's bfd.")
    padding_free: bool = arg(False, "Forward each micro-batch as one row without padding, position ids restarting "
                                    "at each example (TRL's name); the loss is the padded batch's. Checked on the "
                                    "model before training.")
    completion_only_loss: bool | None = arg(None, "Prompt-completion rows: loss on completion tokens only (null: "
                                                  "yes, TRL's default; false: on every token).")
    assistant_only_loss: bool = arg(True, "Conversational rows: loss on assistant turns only (TRL's default is "
                                          "false; true is what instruction tuning wants).")
    use_peft: bool = use_peft_field()

    def __post_init__(self):
        super().__post_init__()
        check_full_finetune(self)
        if not self.train_file:
            raise ValueError("train_file: expected an SFT data file or dataset name (TRL's dataset_name is read "
                             "as train_file)")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: expected in [0, 1), got {self.eval_fraction}")
        if self.on_bad_rows not in ("error", "skip"):
            raise ValueError(f"on_bad_rows: expected 'error' or 'skip', got {self.on_bad_rows!r}")
        check_fraction(self.max_bad_fraction)
        if self.max_length < 2:
            raise ValueError(f"max_length: expected at least 2, got {self.max_length}")
        if not self.dataset_text_field:
            raise ValueError("dataset_text_field: expected a field name")


def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight).float()
    logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    correct = (logits.argmax(-1) == labels).to(logp.dtype)
    return torch.stack([-logp, correct], dim=-1)


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) negative log-likelihood of `labels` under logits hidden @ weight.T, and (N,) 1.0 where argmax == label.

    The (chunk x vocab) logits are rebuilt in backward instead of kept (checkpointed chunks).
    """
    outs = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            outs.append(checkpoint(_chunk_nll, h, weight, y, use_reentrant=False))
        else:
            outs.append(_chunk_nll(h, weight, y))
    out = torch.cat(outs) if outs else hidden.new_zeros((0, 2), dtype=torch.float32)
    return out[:, 0], out[:, 1].detach()


def sft_forward(base, batch: dict, padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target-token (nll, correct) of a collated SFT batch under the active adapter.

    Packed rows carry position_ids: no 2-D mask, restarting positions, so transformers builds a block-diagonal
    causal mask (one block per example). `padding_free`: the batch's rows run as one row without padding.
    """
    hidden = base.hidden(batch["input_ids"], batch["attention_mask"], padding_free, batch.get("position_ids"))
    targets = batch["loss_mask"][:, 1:].bool()
    if getattr(base.lm_head, "bias", None) is not None:
        raise NotImplementedError("lm_head with a bias is not supported")
    weight = full_tensor(base.lm_head.weight)  # sharded under FSDP (align/core/fsdp.py)
    return token_nll(hidden[:, :-1][targets], weight, batch["input_ids"][:, 1:][targets])


class SFTTrainer(Trainer):
    name = "sft"
    fsdp_ready = True

    def read_data(self) -> None:
        """Read and validate the rows before the base loads: a data error never waits for a model."""
        c = self.config
        self.rows, self.skipped = self.read_rows(c.train_file)
        self.eval_rows = self.read_rows(c.eval_file)[0] if c.eval_file else []

    def read_rows(self, source: str) -> tuple[list, list]:
        """(rows, skipped issues) of one source; what `on_bad_rows: skip` dropped is shown and bounded."""
        c = self.config
        rows, skipped = load_sft(source, c.dataset_text_field, c.on_bad_rows, max_bad_fraction=c.max_bad_fraction)
        self.report_skipped(source, skipped, len(rows) + bad_rows(skipped), c.max_bad_fraction)
        return rows, skipped

    def build(self) -> list[dict]:
        c = self.config
        tok = self.base.tokenizer
        examples, dropped = tokenize_sft(self.rows, tok, c.max_length, c.completion_only_loss, c.assistant_only_loss,
                                         c.chat_template, c.on_bad_rows)
        self.skipped_rows = len(self.skipped) + len(dropped)
        if dropped:  # rows with no trained token left count against max_bad_fraction too
            everything = self.skipped + dropped
            self.report_skipped(c.train_file, everything, len(self.rows) + bad_rows(self.skipped), c.max_bad_fraction)
        if c.eval_file:
            self.eval_examples, _ = tokenize_sft(self.eval_rows, tok, c.max_length, c.completion_only_loss,
                                                 c.assistant_only_loss, c.chat_template, c.on_bad_rows)
        else:  # one row is all training
            examples, self.eval_examples = split_held_out(examples, c.eval_fraction if len(examples) > 1 else 0, c.seed)
        if not examples:
            raise UserError(f"{c.train_file}: no training rows left")
        self.train_examples = len(examples)
        # Packing happens once, deterministically, so a resumed run sees the same rows.
        self.items = pack_examples(examples, c.max_length) if c.packing else examples
        self.padding_free = c.padding_free or c.packing  # TRL: bfd packing is padding-free
        if self.padding_free:
            self.base.check_padding_free()  # before the first step: a model that mixes sequences is refused
        self.num_tokens = 0
        if not c.use_peft:
            return [{"params": full_parameters(self), "lr": c.learning_rate}]
        if c.adapter_name not in self.base.adapters:
            self.base.add_adapter(c.adapter_name, c.lora)
        self.base.set_active(c.adapter_name)
        return [{"params": list(self.base.adapter_parameters(c.adapter_name).values()), "lr": c.learning_rate}]

    def num_steps(self) -> int:
        return self.data_parallel_steps(len(self.items), "rows")

    def trained_adapters(self) -> list[str]:
        return [self.config.adapter_name] if self.config.use_peft else []

    def heads(self) -> dict:
        # Full fine-tuning: the base weights are what each checkpoint must hold.
        return {} if self.config.use_peft else {"base": BaseWeights(self.base.model)}

    def state_extra(self) -> dict:
        return {"num_tokens": self.num_tokens}

    def load_extra(self, extra: dict) -> None:
        self.num_tokens = extra.get("num_tokens", 0)

    def collate(self, items) -> dict:
        batch = collate_sft(items, self.base.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def micro_batches(self, step: int) -> StepBatches:
        """This process's collated micro-batches of step `step`, each with the scale of its token sum.

        The step's loss is the mean over all its target tokens (as TRL's, across accumulated micro-batches
        and processes): each micro-batch's sum is divided by the global batch's count, times the number
        of micro-batches because the gradient step weighs each micro-batch 1/that number.
        """
        every = self.global_batches_for_step(len(self.items), step)  # all processes' micro-batches
        rows = [self.items[i] for idx in every for i in idx]
        scale = len(every) / max(sum(sum(r.loss_mask[1:]) for r in rows), 1)
        local = [(self.collate([self.items[i] for i in idx]), scale) for idx in self.processes.shard(every)]
        return StepBatches(local, len(every), {"tokens": sum(len(r.input_ids) for r in rows)})

    def loss(self, micro_batch: tuple[dict, float]):
        batch, scale = micro_batch
        nll, correct = sft_forward(self.base, batch, self.padding_free)
        return nll.sum() * scale, {"mean_token_accuracy": correct.sum().item() * scale}

    def after_step(self, stats: dict) -> dict:
        self.num_tokens += stats["tokens"]
        return {"num_tokens": self.num_tokens}

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.3f}", "acc": f"{stats['mean_token_accuracy']:.2f}"}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss and mean token accuracy, over every held-out target token."""
        if not self.eval_examples:
            return {}
        self.base.model.eval()
        size = self.config.per_device_eval_batch_size
        nll_sum = correct_sum = count = 0.0
        for start in range(0, len(self.eval_examples), size):
            nll, correct = sft_forward(self.base, self.collate(self.eval_examples[start:start + size]),
                                       self.padding_free)
            nll_sum, correct_sum, count = nll_sum + nll.sum().item(), correct_sum + correct.sum().item(), \
                count + nll.numel()
        return {"eval/loss": nll_sum / max(count, 1), "eval/mean_token_accuracy": correct_sum / max(count, 1)}

    def save_final(self, final: dict) -> Path:
        if not self.config.use_peft:
            return save_full_model(self.base, self.out / "model")
        return self.base.save_adapter(self.config.adapter_name, self.out / "adapter")

    def summary_extra(self) -> dict:
        return {"skipped_rows": self.skipped_rows, "train_examples": self.train_examples,
                "train_rows": len(self.items), "num_tokens": self.num_tokens}


def train_sft(config: SFTConfig, resume: bool | str | None = None, overwrite: bool = False,
              resume_changed: bool = False) -> Path:
    """Run SFT end to end and return the saved adapter folder."""
    return SFTTrainer(config, resume=resume, overwrite=overwrite, resume_changed=resume_changed).train()


# -- CLI ----------------------------------------------------------------------------------------
add_arguments, run = adapter_recipe(SFTConfig, SFTTrainer)
