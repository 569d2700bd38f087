"""DPO where only a LoRA adapter learns; the reference is the same base with the adapter off.

Recipe lifecycle (torchtune style): setup -> train (eval, checkpoint) -> save -> clean up.

    align dpo --config configs/dpo_tiny.yaml [--resume] [--set beta=0.2 ...]

Why our own loop rather than TRL's DPOTrainer: we score only completion tokens
(no full-vocabulary float32 log-softmax over every position), keep one base copy
in all modes, and write safetensors-only checkpoints that resume exactly.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.checkpoint import (
    latest_checkpoint,
    load_adapter_weights,
    load_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from align.config import dump_config, load_config
from align.data import TokenizedPair, collate_pairs, load_preferences, step_batches, tokenize_preferences
from align.errors import TrainingDiverged, UserError
from align.heap import limit_heap_fragmentation
from align.logprobs import completion_logprobs
from align.losses import LOSS_TYPES, dpo_loss
from align.metrics import MetricsLogger
from align.model import RECOMMENDED_RANKS, LoraSettings, SharedBase
from align.optim import adamw

# LoRA's best learning rate is ~10x full fine-tuning's (Thinking Machines' LoRA study).
# Full-parameter DPO typically uses 5e-7..5e-6, so the LoRA default is 5e-5.
DEFAULT_DPO_LR = 5e-5
# LoRA loses more than full fine-tuning at large batches (same study); warn past this many pairs.
LARGE_BATCH_PAIRS = 256


@dataclass
class DPOConfig:
    """Everything a DPO run depends on. YAML files under configs/ mirror these fields."""

    model: str = field(default="smollm2", metadata={"help": "Model folder, hub id, or 'smollm2' (offline SmolLM2-135M-Instruct)."})
    train_file: str = field(default="", metadata={"help": "Preference data: .jsonl/.json/.parquet or a datasets name."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out preference data (optional)."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Without eval_file: fraction of train rows held out."})
    format: str = field(default="auto", metadata={"help": "auto | standard | conversational."})
    on_bad_rows: str = field(default="error", metadata={"help": "error (abort, listing every bad row) | skip (drop and count)."})
    chat_template: bool = field(default=True, metadata={"help": "Apply the tokenizer's chat template to string rows."})
    max_length: int = field(default=256, metadata={"help": "Token budget for prompt + answer; answers are truncated."})
    output_dir: str = field(default="runs/dpo", metadata={"help": "Run folder: adapter/, checkpoints/, metrics.jsonl, tb/."})
    adapter_name: str = field(default="policy", metadata={"help": "Name of the trained adapter."})
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {LOSS_TYPES}."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL anchor to the reference."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Assumed label noise (sigmoid, robust)."})
    learning_rate: float = field(default=DEFAULT_DPO_LR, metadata={"help": "AdamW lr; ~10x a full fine-tuning lr."})
    weight_decay: float = 0.0
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    lr_schedule: str = field(default="linear", metadata={"help": "After warm-up: linear (decay to 0 at the last step) | constant."})
    batch_size: int = field(default=4, metadata={"help": "Preference pairs per forward pass."})
    grad_accum: int = field(default=1, metadata={"help": "Forward passes per optimizer step."})
    epochs: int = 1
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    max_grad_norm: float = 1.0
    precompute_ref: bool = field(default=False, metadata={"help": "Compute reference log-probs once (adapter off) instead of every step."})
    ref_model_copy: bool = field(default=False, metadata={"help": "Comparison only: keep a separate reference copy (more memory)."})
    gradient_checkpointing: bool = False
    checkpoint_keep_last: int = field(default=0, metadata={"help": "With gradient_checkpointing: the last N decoder layers keep their activations instead of recomputing them in backward; faster steps for a little memory (SmolLM2-135M, 4 pairs x 128 tokens: 8 layers, +45 MB, ~9% faster; scripts/bench/dpo.py)."})
    heap_mmap_threshold_mb: float | None = field(default=None, metadata={"help": "CPU, glibc: allocations of at least this many MB get their own mapping, returned on free (align/heap.py). 1.0 cut peak memory by ~20% but steps ran ~28% slower, measured before the lean LoRA forward (scripts/bench/dpo.py --lean-heap). null: glibc's default."})
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    seed: int = 0
    log_every: int = 1
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    save_every: int = field(default=50, metadata={"help": "Checkpoint every N optimizer steps (0: only at the end)."})
    keep_checkpoints: int = 2
    tensorboard: bool = True

    def __post_init__(self):
        if not self.train_file:
            raise ValueError("train_file: expected a preference data file or dataset name")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: expected in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing: only sigmoid and robust use it, not {self.loss_type}")
        if self.checkpoint_keep_last < 0:
            raise ValueError(f"checkpoint_keep_last: expected a number of layers >= 0, got {self.checkpoint_keep_last}")
        if self.checkpoint_keep_last and not self.gradient_checkpointing:
            raise ValueError("checkpoint_keep_last: only means something with gradient_checkpointing: true")
        if self.heap_mmap_threshold_mb is not None and self.heap_mmap_threshold_mb <= 0:
            raise ValueError(f"heap_mmap_threshold_mb: expected > 0 or null, got {self.heap_mmap_threshold_mb}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ValueError("batch_size, grad_accum and epochs: expected positive integers")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: expected in [0, 1), got {self.eval_fraction}")
        if self.lr_schedule not in ("linear", "constant"):
            raise ValueError(f"lr_schedule: expected 'linear' or 'constant', got {self.lr_schedule!r}")
        if self.on_bad_rows not in ("error", "skip"):
            raise ValueError(f"on_bad_rows: expected 'error' or 'skip', got {self.on_bad_rows!r}")
        if self.precompute_ref and self.ref_model_copy:
            raise ValueError("precompute_ref and ref_model_copy: choose one")
        if self.lora.rank not in RECOMMENDED_RANKS:
            warnings.warn(f"lora.rank={self.lora.rank}: ranks 4-8 are enough for preference tuning", stacklevel=2)
        if self.batch_size * self.grad_accum > LARGE_BATCH_PAIRS:
            warnings.warn(f"effective batch {self.batch_size * self.grad_accum} pairs: LoRA pays more than full "
                          "fine-tuning at large batches; consider fewer pairs per step", stacklevel=2)


def resolve_model(name: str) -> str:
    """'smollm2' -> the offline SmolLM2-135M-Instruct folder (built on first use); else unchanged."""
    if name == "smollm2":
        from align.smollm import ensure_smollm2

        return str(ensure_smollm2())
    return name


def sequence_logprobs(base: SharedBase, batch: dict, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (or mean) of completion log-probs for each row of a collated pair batch -> (chosen, rejected)."""
    logp = completion_logprobs(base, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    mask = batch["completion_mask"][:, 1:].to(logp.dtype)
    per_row = logp.sum(-1)
    if average:
        per_row = per_row / mask.sum(-1).clamp(min=1)
    half = per_row.shape[0] // 2
    return per_row[:half], per_row[half:]


class DPOTrainer:
    def __init__(self, config: DPOConfig, base: SharedBase | None = None):
        """`base`: train on a SharedBase already in memory (e.g. the demo's) instead of loading one."""
        self.config = config
        self.base = base
        self.out = Path(config.output_dir)
        self.ref_cache: dict[str, torch.Tensor] | None = None
        self.ref_copy: SharedBase | None = None

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        if c.heap_mmap_threshold_mb is not None:
            limit_heap_fragmentation(c.heap_mmap_threshold_mb)
        model_path = resolve_model(c.model)
        if self.base is None:
            self.base = SharedBase.load(model_path, c.dtype, c.device, c.trust_remote_code,
                                        c.gradient_checkpointing, c.checkpoint_keep_last)
        if c.adapter_name not in self.base.adapters:
            self.base.add_adapter(c.adapter_name, c.lora)
        self.base.set_active(c.adapter_name)
        if c.ref_model_copy:
            self.ref_copy = SharedBase.load(model_path, c.dtype, c.device, c.trust_remote_code)
        tok = self.base.tokenizer
        train = load_preferences(c.train_file, c.format, c.on_bad_rows)
        self.skipped_rows = len(train.skipped)
        pairs = tokenize_preferences(train.rows, tok, c.max_length, c.chat_template, c.on_bad_rows)
        if c.eval_file:
            ev = load_preferences(c.eval_file, c.format, c.on_bad_rows)
            self.eval_pairs = tokenize_preferences(ev.rows, tok, c.max_length, c.chat_template, c.on_bad_rows)
        elif c.eval_fraction:
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(c.seed)).tolist()
            n_eval = max(1, int(len(pairs) * c.eval_fraction))
            self.eval_pairs = [pairs[i] for i in order[:n_eval]]
            pairs = [pairs[i] for i in sorted(order[n_eval:])]
        else:
            self.eval_pairs = []
        if not pairs:
            raise UserError(f"{c.train_file}: no training pairs left")
        self.pairs = pairs
        self.params = list(self.base.adapter_parameters(c.adapter_name).values())
        self.optimizer = adamw(self.params, lr=c.learning_rate, weight_decay=c.weight_decay)
        self.steps_per_epoch = math.ceil(len(pairs) / (c.batch_size * c.grad_accum))
        total = self.steps_per_epoch * c.epochs
        self.total_steps = min(total, c.max_steps) if c.max_steps else total
        self.step = 0
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(c, self.out / "config.yaml")
        self.logger = MetricsLogger(self.out, c.tensorboard)

    def resume(self) -> bool:
        """Continue from the latest checkpoint in output_dir; False if there is none."""
        ck = latest_checkpoint(self.out)
        if ck is None:
            return False
        tensors, state = load_checkpoint(ck)
        load_adapter_weights(self.base, self.config.adapter_name, ck / "adapters" / self.config.adapter_name)
        load_optimizer_tensors(self.optimizer, tensors, state["optimizer"])
        restore_rng(tensors, state["rng"])
        self.step = state["step"]
        self.logger.truncate_after(self.step)
        print(f"[align] resumed from {ck} at step {self.step}")
        return True

    # -- data order ---------------------------------------------------------------------------
    def batches_for_step(self, step: int) -> list[list[int]]:
        """Pair indices of each micro-batch of optimizer step `step`: a pure function of (seed, step)."""
        c = self.config
        return step_batches(len(self.pairs), c.batch_size, c.grad_accum, c.seed, step)

    # -- reference ----------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logprobs(self, batch: dict, indices: list[int] | None, average: bool):
        if self.ref_cache is not None and indices is not None:
            idx = torch.tensor(indices)
            return self.ref_cache["chosen"][idx], self.ref_cache["rejected"][idx]
        if self.ref_copy is not None:
            return sequence_logprobs(self.ref_copy, batch, average)
        with self.base.reference():
            return sequence_logprobs(self.base, batch, average)

    @torch.no_grad()
    def precompute_reference(self) -> float:
        """One pass over the training pairs with the adapter off; cached in the run folder for resume."""
        import hashlib

        from safetensors.torch import load_file, save
        from tqdm import tqdm

        from align.atomic import atomic_write_bytes

        c = self.config
        key = hashlib.sha256(json.dumps([[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in self.pairs]
                                        + [c.loss_type]).encode()).hexdigest()
        path = self.out / "ref_logprobs.safetensors"
        if path.exists():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("data_sha256") == key:
                    self.ref_cache = load_file(str(path))
                    return 0.0
        t0 = time.perf_counter()
        chosen, rejected = [], []
        for start in tqdm(range(0, len(self.pairs), c.batch_size), desc="reference log-probs"):
            batch = collate_pairs(self.pairs[start:start + c.batch_size], self.base.tokenizer.pad_token_id)
            ch, rj = self.reference_logprobs(batch, None, c.loss_type == "ipo")
            chosen.append(ch)
            rejected.append(rj)
        self.ref_cache = {"chosen": torch.cat(chosen).float(), "rejected": torch.cat(rejected).float()}
        atomic_write_bytes(path, save(self.ref_cache, metadata={"data_sha256": key}))
        return time.perf_counter() - t0

    # -- one step -----------------------------------------------------------------------------
    def loss_on(self, pairs: list[TokenizedPair], indices: list[int] | None, train: bool):
        c = self.config
        batch = collate_pairs(pairs, self.base.tokenizer.pad_token_id)
        batch = {k: v.to(c.device) for k, v in batch.items()}
        average = c.loss_type == "ipo"
        ref_c, ref_r = self.reference_logprobs(batch, indices, average)
        with torch.set_grad_enabled(train):
            pol_c, pol_r = sequence_logprobs(self.base, batch, average)
            losses, r_c, r_r = dpo_loss(pol_c, pol_r, ref_c.to(pol_c), ref_r.to(pol_r), c.beta, c.loss_type,
                                        c.label_smoothing)
        tokens = int(batch["attention_mask"].sum())
        stats = {
            "rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/margin": (r_c - r_r).mean().item(), "rewards/accuracy": (r_c > r_r).float().mean().item(),
            "logps/chosen": pol_c.detach().mean().item(), "logps/rejected": pol_r.detach().mean().item(),
        }
        return losses.mean(), stats, tokens

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): a pure function of the step, so resume is exact."""
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return c.learning_rate * (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return c.learning_rate
        decay_steps = max(1, self.total_steps - c.warmup_steps)
        return c.learning_rate * max(0.0, 1 - (step - c.warmup_steps) / decay_steps)

    def train_step(self) -> dict:
        c = self.config
        t0 = time.perf_counter()
        self.base.model.train()  # gradient checkpointing only acts in train mode
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        micro = self.batches_for_step(self.step)
        agg: dict[str, float] = {}
        tokens = 0
        total_loss = 0.0
        for indices in micro:
            loss, stats, n_tok = self.loss_on([self.pairs[i] for i in indices], indices, train=True)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"step {self.step + 1}: DPO loss is {loss.item()}; stopped before updating. The last good "
                    f"checkpoint is intact in {self.out / 'checkpoints'}. Try a lower learning_rate or beta.")
            (loss / len(micro)).backward()
            total_loss += loss.item() / len(micro)
            tokens += n_tok
            for k, v in stats.items():
                agg[k] = agg.get(k, 0.0) + v / len(micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"step {self.step + 1}: gradient norm is {grad_norm.item()}; stopped before "
                                   f"updating. The last good checkpoint is intact in {self.out / 'checkpoints'}.")
        self.optimizer.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {"loss": total_loss, **agg, "grad_norm": grad_norm.item(), "lr": self.lr_at(self.step - 1),
                "step_s": dt, "tokens_per_s": tokens / dt}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out preference accuracy, reward margin and log-probs."""
        if not self.eval_pairs:
            return {}
        self.base.model.eval()
        c = self.config
        sums: dict[str, float] = {}
        n = 0
        for start in range(0, len(self.eval_pairs), c.batch_size):
            chunk = self.eval_pairs[start:start + c.batch_size]
            loss, stats, _ = self.loss_on(chunk, None, train=False)
            for k, v in {"loss": loss.item(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
            n += len(chunk)
        return {f"eval/{k}": v / n for k, v in sums.items()}

    def save_checkpoint(self) -> Path:
        opt_t, opt_meta = optimizer_tensors(self.optimizer)
        rng_t, rng_meta = rng_tensors()
        return save_checkpoint(self.out, self.step, self.base, [self.config.adapter_name], {**opt_t, **rng_t},
                               {"optimizer": opt_meta, "rng": rng_meta}, keep=self.config.keep_checkpoints)

    # -- the run ------------------------------------------------------------------------------
    def train(self) -> Path:
        from tqdm import tqdm

        c = self.config
        if c.precompute_ref and self.ref_cache is None:
            seconds = self.precompute_reference()
            self.logger.log(self.step, {"precompute_ref_s": seconds})
        bar = tqdm(total=self.total_steps, initial=self.step, desc="dpo", unit="step")
        while self.step < self.total_steps:
            stats = self.train_step()
            if c.eval_every and self.step % c.eval_every == 0:
                stats.update(self.evaluate())
            if self.step % c.log_every == 0 or self.step == self.total_steps:
                self.logger.log(self.step, stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['rewards/accuracy']:.2f}")
            if c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        final = self.evaluate()
        if final:
            self.logger.log(self.step, final)
        self.save_checkpoint()
        adapter = self.base.save_adapter(c.adapter_name, self.out / "adapter")
        from align.atomic import atomic_write_text

        atomic_write_text(self.out / "final_metrics.json",
                          json.dumps({"step": self.step, "skipped_rows": self.skipped_rows, **final}, indent=2))
        self.logger.close()
        return adapter


def train_dpo(config: DPOConfig, resume: bool = False) -> Path:
    """Run DPO end to end and return the saved adapter folder."""
    trainer = DPOTrainer(config)
    trainer.setup()
    if resume and not trainer.resume():
        print(f"[align] no checkpoint in {config.output_dir}; starting fresh")
    return trainer.train()


# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML file mirroring DPOConfig (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set beta=0.2 --set lora.rank=4")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")


def run(args) -> int:
    config = load_config(DPOConfig, args.config, args.overrides)
    adapter = train_dpo(config, resume=args.resume)
    print(f"adapter saved to {adapter}")
    return 0
