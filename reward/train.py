"""Train a reward model (LoRA adapter + scalar head) with the Bradley–Terry loss.

Recipe lifecycle: setup -> train (eval, checkpoint) -> save -> clean up.

    align reward --config configs/reward_demo.yaml [--resume] [--set learning_rate=2e-4 ...]

Preference rows are read and validated by `align.data`, exactly as for DPO; a row may
add `margin` (how much chosen should win by). Both sides of a pair go through one
forward pass of the base with the reward adapter on; the head reads the last token.
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
from align.config import dump_config
from align.data import TokenizedPair, collate_pairs, load_preferences, step_batches, tokenize_preferences
from align.errors import TrainingDiverged, UserError
from align.metrics import MetricsLogger
from align.model import RECOMMENDED_RANKS, LoraSettings, SharedBase
from align.optim import adamw
from reward.losses import (
    DEFAULT_BUCKETS,
    bradley_terry_loss,
    calibration,
    expected_calibration_error,
    pair_stats,
)
from reward.model import RewardModel

# LoRA's best learning rate is ~10x full fine-tuning's (Thinking Machines' LoRA study).
# Full-parameter reward models are typically trained at 1e-5..2e-5, so the LoRA default is 1e-4.
DEFAULT_REWARD_LR = 1e-4
# LoRA loses more than full fine-tuning at large batches (same study); warn past this many pairs.
LARGE_BATCH_PAIRS = 256


@dataclass
class RewardConfig:
    """Everything a reward-model run depends on. YAML files under configs/ mirror these fields."""

    model: str = field(default="smollm2", metadata={"help": "Model folder, hub id, or 'smollm2' (offline SmolLM2-135M-Instruct)."})
    train_file: str = field(default="", metadata={"help": "Preference data: .jsonl/.json/.parquet or a datasets name (rows may add `margin`)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out preference data (optional)."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Without eval_file: fraction of train rows held out."})
    demo_pairs: int = field(default=0, metadata={"help": "Instead of train_file: generate this many arithmetic-demo pairs (and demo_eval_pairs held out) into output_dir/data/."})
    demo_source: str = field(default="samples", metadata={"help": "samples: the base model's own answers, ranked by the task reward (as the DPO demo builds pairs; held-out prompts never appear in training) | synthetic: the correct sum vs a near miss of equal length."})
    demo_eval_pairs: int = field(default=200, metadata={"help": "Held-out demo pairs (with demo_pairs)."})
    demo_bare_share: float = field(default=0.25, metadata={"help": "Share of demo pairs answered with the bare number; the rest read 'a + b = c', as SmolLM2 answers."})
    format: str = field(default="auto", metadata={"help": "auto | standard | conversational."})
    on_bad_rows: str = field(default="error", metadata={"help": "error (abort, listing every bad row) | skip (drop and count)."})
    chat_template: bool = field(default=True, metadata={"help": "Apply the tokenizer's chat template to string rows."})
    max_length: int = field(default=256, metadata={"help": "Token budget for prompt + answer; answers are truncated."})
    output_dir: str = field(default="runs/reward", metadata={"help": "Run folder: reward_model/, checkpoints/, metrics.jsonl, tb/."})
    adapter_name: str = field(default="reward", metadata={"help": "Name of the reward adapter on the base."})
    lora: LoraSettings = field(default_factory=LoraSettings)
    use_margins: bool = field(default=True, metadata={"help": "Use each row's `margin` field (Bradley–Terry with margin) when present."})
    center_coef: float = field(default=0.0, metadata={"help": "Weight of mean((r_chosen + r_rejected)^2): keeps rewards centred on 0 (e.g. 0.01)."})
    learning_rate: float = field(default=DEFAULT_REWARD_LR, metadata={"help": "AdamW lr for adapter and head; ~10x a full fine-tuning lr."})
    head_learning_rate: float | None = field(default=None, metadata={"help": "lr of the scalar head (default: learning_rate). The head starts random and is tiny; a larger lr (~10x) lets it keep up with the adapter."})
    weight_decay: float = 0.0
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps, then constant."})
    batch_size: int = field(default=8, metadata={"help": "Preference pairs per forward pass (2x sequences)."})
    grad_accum: int = field(default=1, metadata={"help": "Forward passes per optimizer step."})
    epochs: int = 1
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    max_grad_norm: float = 1.0
    calibration_buckets: list[float] = field(default_factory=lambda: list(DEFAULT_BUCKETS),
                                             metadata={"help": "Lower edges of the |margin| buckets of the calibration table."})
    gradient_checkpointing: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    seed: int = 0
    num_threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default). On a CPU shared with other jobs, 1 avoids thread oversubscription, which can make steps 5-10x slower."})
    log_every: int = 1
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    save_every: int = field(default=50, metadata={"help": "Checkpoint every N optimizer steps (0: only at the end)."})
    keep_checkpoints: int = 2
    tensorboard: bool = True

    def __post_init__(self):
        if not self.train_file and not self.demo_pairs:
            raise ValueError("train_file: expected a preference data file or dataset name (or demo_pairs > 0)")
        if self.train_file and self.demo_pairs:
            raise ValueError("train_file and demo_pairs: choose one")
        if self.demo_source not in ("samples", "synthetic"):
            raise ValueError(f"demo_source: expected 'samples' or 'synthetic', got {self.demo_source!r}")
        if self.demo_pairs < 0 or self.demo_eval_pairs < 0:
            raise ValueError("demo_pairs and demo_eval_pairs: expected non-negative integers")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ValueError("batch_size, grad_accum and epochs: expected positive integers")
        if self.max_length < 2:
            raise ValueError(f"max_length: expected at least 2, got {self.max_length}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: expected in [0, 1), got {self.eval_fraction}")
        if self.on_bad_rows not in ("error", "skip"):
            raise ValueError(f"on_bad_rows: expected 'error' or 'skip', got {self.on_bad_rows!r}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads: expected >= 0 (0: torch's default), got {self.num_threads}")
        if self.center_coef < 0:
            raise ValueError(f"center_coef: expected >= 0, got {self.center_coef}")
        if self.head_learning_rate is not None and self.head_learning_rate <= 0:
            raise ValueError(f"head_learning_rate: expected > 0, got {self.head_learning_rate}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: expected > 0, got {self.learning_rate}")
        edges = self.calibration_buckets
        if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"calibration_buckets: expected increasing edges starting at 0, got {edges}")
        if self.lora.rank not in RECOMMENDED_RANKS:
            warnings.warn(f"lora.rank={self.lora.rank}: ranks 4-8 are enough for reward models", stacklevel=2)
        if self.batch_size * self.grad_accum > LARGE_BATCH_PAIRS:
            warnings.warn(f"effective batch {self.batch_size * self.grad_accum} pairs: LoRA pays more than full "
                          "fine-tuning at large batches; consider fewer pairs per step", stacklevel=2)


def length_baseline_accuracy(pairs: list[TokenizedPair]) -> float:
    """Accuracy of "the longer answer wins" (in tokens; ties count half) on the same pairs."""
    if not pairs:
        return float("nan")
    wins = [1.0 if len(p.chosen_ids) > len(p.rejected_ids) else 0.5 if len(p.chosen_ids) == len(p.rejected_ids)
            else 0.0 for p in pairs]
    return sum(wins) / len(wins)


class RewardTrainer:
    def __init__(self, config: RewardConfig):
        self.config = config
        self.out = Path(config.output_dir)

    # -- setup --------------------------------------------------------------------------------
    def demo_stamp(self, model_path: str) -> str:
        """What sampled demo pairs depend on; stored next to them as data/demo.json."""
        c = self.config
        return json.dumps({"source": c.demo_source, "pairs": c.demo_pairs, "eval_pairs": c.demo_eval_pairs,
                           "seed": c.seed, "model": model_path}, sort_keys=True)

    def _demo_files(self, model_path: str) -> tuple[str, str | None]:
        from align.atomic import atomic_write_text
        from reward.pairs import arithmetic_pairs, sampled_arithmetic_pairs, write_jsonl

        c = self.config
        data = self.out / "data"
        if c.demo_source == "samples":
            # Sampling takes minutes and is not bit-repeatable everywhere: a resumed run reuses the
            # pairs its first start wrote, when they were made with the same settings.
            key = self.demo_stamp(model_path)
            stamp, train_path, eval_path = data / "demo.json", data / "train.jsonl", data / "eval.jsonl"
            if stamp.is_file() and stamp.read_text() == key and train_path.is_file():
                return str(train_path), str(eval_path) if c.demo_eval_pairs and eval_path.is_file() else None
            t0 = time.perf_counter()
            ev = sampled_arithmetic_pairs(self.base, model_path, c.demo_eval_pairs, c.seed + 10_000) \
                if c.demo_eval_pairs else []
            train = sampled_arithmetic_pairs(self.base, model_path, c.demo_pairs, c.seed,
                                             exclude={r["prompt"] for r in ev})
            print(f"[align] sampled {len(train)} + {len(ev)} demo pairs in {time.perf_counter() - t0:.0f} s")
            files = write_jsonl(train, train_path), write_jsonl(ev, eval_path) if ev else None
            atomic_write_text(stamp, key)  # last: the stamp vouches for files already complete
            return files
        share = c.demo_bare_share
        train = write_jsonl(arithmetic_pairs(c.demo_pairs, c.seed, bare_share=share), data / "train.jsonl")
        # A different seed: held-out pairs are drawn independently of the training ones.
        ev = write_jsonl(arithmetic_pairs(c.demo_eval_pairs, c.seed + 10_000, bare_share=share),
                         data / "eval.jsonl") if c.demo_eval_pairs else None
        return train, ev

    def _load_pairs(self, source: str) -> tuple[list[TokenizedPair], dict[str, float], int]:
        from reward.pairs import read_margins

        c = self.config
        data = load_preferences(source, c.format, c.on_bad_rows)
        pairs = tokenize_preferences(data.rows, self.base.tokenizer, c.max_length, c.chat_template, c.on_bad_rows)
        margins = read_margins(source) if c.use_margins else {}
        return pairs, margins, len(data.skipped)

    def setup(self) -> None:
        from align.model import resolve_model

        c = self.config
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        torch.manual_seed(c.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        model_path = resolve_model(c.model)
        self.base = SharedBase.load(model_path, c.dtype, c.device, c.trust_remote_code, c.gradient_checkpointing)
        train_file, eval_file = (c.train_file, c.eval_file) if c.train_file else self._demo_files(model_path)
        self.rm = RewardModel.create(self.base, c.adapter_name, c.lora, c.chat_template, c.max_length, seed=c.seed)
        pairs, self.margins, self.skipped_rows = self._load_pairs(train_file)
        if eval_file:
            self.eval_pairs, eval_margins, _ = self._load_pairs(eval_file)
            self.margins.update(eval_margins)
        elif c.eval_fraction:
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(c.seed)).tolist()
            n_eval = max(1, int(len(pairs) * c.eval_fraction))
            self.eval_pairs = [pairs[i] for i in order[:n_eval]]
            pairs = [pairs[i] for i in sorted(order[n_eval:])]
        else:
            self.eval_pairs = []
        if not pairs:
            raise UserError(f"{train_file}: no training pairs left")
        self.pairs = pairs
        self.params = self.rm.parameters()
        adapter = list(self.base.adapter_parameters(c.adapter_name).values())
        head_lr = c.head_learning_rate or c.learning_rate
        # "peak_lr" is the group's lr before warm-up; it travels with the optimizer state on resume.
        self.optimizer = adamw(
            [{"params": adapter, "lr": c.learning_rate, "peak_lr": c.learning_rate},
             {"params": list(self.rm.head.parameters()), "lr": head_lr, "peak_lr": head_lr}],
            weight_decay=c.weight_decay)
        self.steps_per_epoch = math.ceil(len(pairs) / (c.batch_size * c.grad_accum))
        total = self.steps_per_epoch * c.epochs
        self.total_steps = min(total, c.max_steps) if c.max_steps else total
        self.step = 0
        dump_config(c, self.out / "config.yaml")
        self.logger = MetricsLogger(self.out, c.tensorboard)

    def resume(self) -> bool:
        """Continue from the latest checkpoint in output_dir; False if there is none."""
        ck = latest_checkpoint(self.out)
        if ck is None:
            return False
        tensors, state = load_checkpoint(ck)
        name = self.config.adapter_name
        load_adapter_weights(self.base, name, ck / "adapters" / name)
        with torch.no_grad():
            self.rm.head.weight.copy_(tensors["head.weight"])
            self.rm.head.bias.copy_(tensors["head.bias"])
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

    # -- one step -----------------------------------------------------------------------------
    def scores(self, pairs: list[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards, each (B,), from one forward pass over the 2B sequences."""
        batch = collate_pairs(pairs, self.base.tokenizer.pad_token_id)
        dev = self.config.device
        r = self.rm.score_ids(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
        return r[:len(pairs)], r[len(pairs):]

    def margin_of(self, pairs: list[TokenizedPair]) -> torch.Tensor | None:
        if not self.margins:
            return None
        return torch.tensor([self.margins.get(p.where, 0.0) for p in pairs], dtype=torch.float32)

    def warmup(self, step: int) -> float:
        """Linear warm-up factor for optimizer step `step` (0-based), then 1."""
        w = self.config.warmup_steps
        return min(1.0, (step + 1) / w) if w else 1.0

    def train_step(self) -> dict:
        c = self.config
        t0 = time.perf_counter()
        for g in self.optimizer.param_groups:
            g["lr"] = g["peak_lr"] * self.warmup(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        micro = self.batches_for_step(self.step)
        agg: dict[str, float] = {}
        total_loss, n_pairs = 0.0, 0
        for indices in micro:
            chunk = [self.pairs[i] for i in indices]
            chosen, rejected = self.scores(chunk)
            loss = bradley_terry_loss(chosen, rejected, self.margin_of(chunk), c.center_coef)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"step {self.step + 1}: reward loss is {loss.item()}; stopped before updating. The last good "
                    f"checkpoint is intact in {self.out / 'checkpoints'}. Try a lower learning_rate.")
            (loss / len(micro)).backward()
            total_loss += loss.item() / len(micro)
            n_pairs += len(chunk)
            for k, v in pair_stats(chosen, rejected).items():
                agg[k] = agg.get(k, 0.0) + v / len(micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"step {self.step + 1}: gradient norm is {grad_norm.item()}; stopped before "
                                   f"updating. The last good checkpoint is intact in {self.out / 'checkpoints'}.")
        self.optimizer.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {"loss": total_loss, **agg, "grad_norm": grad_norm.item(), "lr": self.optimizer.param_groups[0]["lr"],
                "step_s": dt, "pairs_per_s": n_pairs / dt, "pairs": n_pairs}

    @torch.no_grad()
    def evaluate(self) -> tuple[dict, list[dict]]:
        """Held-out loss, pairwise accuracy, mean margin, calibration by |margin| bucket, length baseline."""
        if not self.eval_pairs:
            return {}, []
        c = self.config
        chosen, rejected = [], []
        for start in range(0, len(self.eval_pairs), c.batch_size):
            ch, rj = self.scores(self.eval_pairs[start:start + c.batch_size])
            chosen.append(ch)
            rejected.append(rj)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        buckets = calibration(chosen, rejected, tuple(c.calibration_buckets))
        stats = {"loss": bradley_terry_loss(chosen, rejected, self.margin_of(self.eval_pairs), c.center_coef).item(),
                 **pair_stats(chosen, rejected), "ece": expected_calibration_error(buckets),
                 "length_baseline_accuracy": length_baseline_accuracy(self.eval_pairs), "pairs": len(chosen)}
        return {f"eval/{k}": v for k, v in stats.items()}, buckets

    def save_checkpoint(self) -> Path:
        opt_t, opt_meta = optimizer_tensors(self.optimizer)
        rng_t, rng_meta = rng_tensors()
        head = {"head.weight": self.rm.head.weight, "head.bias": self.rm.head.bias}
        return save_checkpoint(self.out, self.step, self.base, [self.config.adapter_name],
                               {**opt_t, **rng_t, **head}, {"optimizer": opt_meta, "rng": rng_meta},
                               keep=self.config.keep_checkpoints)

    # -- the run ------------------------------------------------------------------------------
    def train(self) -> Path:
        from tqdm import tqdm

        from align.atomic import atomic_write_text

        c = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, desc="reward", unit="step")
        t_train, pairs_seen = 0.0, 0
        while self.step < self.total_steps:
            stats = self.train_step()
            t_train += stats["step_s"]
            pairs_seen += stats.pop("pairs")
            if c.eval_every and self.step % c.eval_every == 0:
                stats.update(self.evaluate()[0])
            if self.step % c.log_every == 0 or self.step == self.total_steps:
                self.logger.log(self.step, stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
            if c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        final, buckets = self.evaluate()
        if final:
            self.logger.log(self.step, final)
        self.save_checkpoint()
        path = self.rm.save(self.out / "reward_model", extra={"trained_steps": self.step, **final})
        summary = {"step": self.step, "skipped_rows": self.skipped_rows, "train_pairs": len(self.pairs),
                   "train_pairs_per_s": pairs_seen / t_train if t_train else None, **final,
                   "calibration": buckets}
        atomic_write_text(self.out / "final_metrics.json", json.dumps(summary, indent=2))
        self.logger.close()
        self.summary = summary
        return path


def train_reward(config: RewardConfig, resume: bool = False) -> Path:
    """Train a reward model end to end and return the saved reward-model folder."""
    trainer = RewardTrainer(config)
    trainer.setup()
    if resume and not trainer.resume():
        print(f"[align] no checkpoint in {config.output_dir}; starting fresh")
    return trainer.train()


def format_calibration(buckets: list[dict]) -> str:
    lines = ["|margin| bucket   pairs  accuracy  predicted"]
    for b in buckets:
        high = "inf" if b["high"] is None else f"{b['high']:g}"
        lines.append(f"[{b['low']:g}, {high})".ljust(17) + f"{b['count']:>5}  {b['accuracy']:8.3f}  "
                     f"{b['predicted']:9.3f}")
    return "\n".join(lines)

