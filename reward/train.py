"""Train a reward model (LoRA adapter + scalar head; `use_peft: false`: every base weight + head) with the
Bradley–Terry loss.

    align reward --config configs/reward_demo.yaml [--resume] [--learning_rate 2e-4]

The lifecycle (setup, steps, checkpoints, resume, metrics) is align.train.lifecycle's; this file is
the reward part. Preference rows are read, validated and tokenised exactly as for DPO; a
row may add `margin` (how much chosen should win by). Both sides of a pair go through one
forward pass of the base with the reward adapter on; the head reads the last token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from align.data.preference import PreferenceSet, TokenizedPair, collate_pairs
from align.train.config import PreferenceDataConfig, TrainConfig
from align.train.config_parser import arg
from align.train.full_finetune import BaseWeights, check_full_finetune, full_parameters, use_peft_field
from align.train.preference import PreferenceTrainer
from reward.losses import (
    DEFAULT_BUCKETS,
    bradley_terry_loss,
    calibration,
    expected_calibration_error,
    pair_stats,
)
from reward.model import RewardModel


@dataclass
class RewardConfig(PreferenceDataConfig, TrainConfig):
    """Everything a reward-model run depends on. YAML files under configs/ mirror these fields."""

    train_file: str = arg("", "Preference data: .jsonl/.json/.parquet or a datasets name (rows may add `margin`).")
    output_dir: str = arg("runs/reward", "Run folder: reward_model/, checkpoints/, metrics.jsonl, tb/.")
    # Full-parameter reward models are trained at 1e-5..2e-5; LoRA's best is ~10x that.
    learning_rate: float = arg(1e-4, "AdamW peak lr of the adapter; ~10x a full fine-tuning lr.")
    lr_scheduler_type: str = arg("constant_with_warmup", "transformers.get_scheduler name (linear, cosine, "
                                                         "constant, constant_with_warmup, ...).")
    demo_pairs: int = arg(0, "Instead of train_file: generate this many arithmetic-demo pairs (and demo_eval_pairs "
                             "held out) into output_dir/data/.")
    demo_source: str = arg("samples", "samples: the base model's own answers, ranked by the task reward (held-out "
                                      "prompts never appear in training) | synthetic: the correct sum vs a near miss.")
    demo_eval_pairs: int = arg(200, "Held-out demo pairs (with demo_pairs).")
    demo_bare_share: float = arg(0.25, "Synthetic demo pairs: share answered with the bare number; the rest read "
                                       "'a + b = c', as SmolLM2 answers.")
    adapter_name: str = arg("reward", "Name of the reward adapter on the base.")
    use_peft: bool = use_peft_field()
    use_margins: bool = arg(True, "Use each row's `margin` field (Bradley–Terry with margin) when present.")
    center_rewards_coefficient: float = arg(0.0, "Weight of mean((r_chosen + r_rejected)^2): keeps rewards "
                                                 "centred on 0 (TRL's name; e.g. 0.01).")
    head_learning_rate: float | None = arg(None, "lr of the scalar head (default: learning_rate). The head starts "
                                                 "random and is tiny; ~10x lets it keep up with the adapter.")
    calibration_buckets: list[float] = arg(list(DEFAULT_BUCKETS), "Lower edges of the |margin| buckets of the "
                                                                  "calibration table.")
    padding_free: bool = arg(False, "Forward the chosen and rejected sequences of a micro-batch as one row without "
                                    "padding (TRL's name); each score is read at its sequence's last token, as "
                                    "padded. Checked on the model before training.")

    RENAMED = {**TrainConfig.RENAMED, "center_coef": "center_rewards_coefficient"}

    def __post_init__(self):
        super().__post_init__()
        if not self.train_source() and not self.demo_pairs:
            raise ValueError("train_file: expected a preference data file or dataset name (or demo_pairs > 0)")
        if self.train_source() and self.demo_pairs:
            raise ValueError("train_file and demo_pairs: choose one")
        if self.demo_source not in ("samples", "synthetic"):
            raise ValueError(f"demo_source: expected 'samples' or 'synthetic', got {self.demo_source!r}")
        if self.demo_pairs < 0 or self.demo_eval_pairs < 0:
            raise ValueError("demo_pairs and demo_eval_pairs: expected non-negative integers")
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient: expected >= 0, got {self.center_rewards_coefficient}")
        if self.head_learning_rate is not None and self.head_learning_rate <= 0:
            raise ValueError(f"head_learning_rate: expected > 0, got {self.head_learning_rate}")
        edges = self.calibration_buckets
        if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"calibration_buckets: expected increasing edges starting at 0, got {edges}")
        check_full_finetune(self)
        self.check_batch()


def reward_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """TRL RewardTrainer's names: accuracy, margin, min_reward, mean_reward, max_reward."""
    rewards = torch.cat([chosen, rejected]).detach().float()
    stats = pair_stats(chosen, rejected)
    return {"accuracy": stats["accuracy"], "margin": stats["margin"], "min_reward": rewards.min().item(),
            "mean_reward": stats["reward_mean"], "max_reward": rewards.max().item()}


def length_baseline_accuracy(pairs: list[TokenizedPair]) -> float:
    """Accuracy of "the longer answer wins" (in tokens; ties count half) on the same pairs."""
    if not pairs:
        return float("nan")
    wins = [1.0 if len(p.chosen_ids) > len(p.rejected_ids) else 0.5 if len(p.chosen_ids) == len(p.rejected_ids)
            else 0.0 for p in pairs]
    return sum(wins) / len(wins)


class RewardTrainer(PreferenceTrainer):
    name = "reward"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.margins: dict[str, float] = {}  # by row place; read with the rows, before the base loads

    # -- setup --------------------------------------------------------------------------------
    def build(self) -> list[dict]:
        c = self.config
        train_file, eval_file = self.data_sources() if c.train_source() else self._demo_files()
        name = c.adapter_name if c.use_peft else None  # use_peft: false: no adapter, the base itself trains
        self.rm = RewardModel.create(self.base, name, c.lora, c.chat_template, c.max_length, seed=c.seed)
        self.load_pairs(train_file, eval_file)
        if c.padding_free:
            self.base.check_padding_free()  # before the first step: a model that mixes sequences is refused
        head_lr = c.head_learning_rate or c.learning_rate
        body = list(self.base.adapter_parameters(name).values()) if c.use_peft else self.decoder_parameters()
        return [{"params": body, "lr": c.learning_rate}, {"params": list(self.rm.head.parameters()), "lr": head_lr}]

    def trained_adapters(self) -> list[str]:
        return [self.config.adapter_name] if self.config.use_peft else []

    def decoder_parameters(self) -> list:
        """use_peft: false: every base weight the score reads. An untied LM head is not read (the score is
        the head on the last hidden state) and stays frozen, as in TRL's sequence classifier, which has none."""
        decoder = {id(p) for p in self.base.decoder.parameters()}
        params = full_parameters(self)
        for p in params:
            p.requires_grad_(id(p) in decoder)
        return [p for p in params if id(p) in decoder]

    def heads(self) -> dict:
        # use_peft: false: the base weights travel in each checkpoint beside the head, as DPO's do.
        return {"score": self.rm.head, **({} if self.config.use_peft else {"base": BaseWeights(self.base.model)})}

    def has_sources(self) -> bool:
        return bool(self.config.train_source())

    def read(self, source, split: str = "train", label: str | None = None) -> PreferenceSet:
        from reward.pairs import read_margins

        data = super().read(source, split, label)
        if self.config.use_margins:
            self.margins.update(read_margins(source, split, self.config.dataset_config, label))
        return data

    def demo_stamp(self, model_path: str) -> str:
        """What sampled demo pairs depend on; stored next to them as data/demo.json."""
        c = self.config
        return json.dumps({"source": c.demo_source, "pairs": c.demo_pairs, "eval_pairs": c.demo_eval_pairs,
                           "seed": c.seed, "model": model_path}, sort_keys=True)

    def _demo_files(self) -> tuple[str, str | None]:
        """Demo pairs in output_dir/data/: every process makes them (sampling runs the base, which
        under FSDP needs every process), the main one writes them, and all read what it wrote."""
        train_path, eval_path = self._make_demo_files(write=self.processes.is_main)
        self.processes.barrier()
        return train_path, eval_path

    def _make_demo_files(self, write: bool) -> tuple[str, str | None]:
        from align.core.atomic import atomic_write_text
        from reward.pairs import arithmetic_pairs, sampled_arithmetic_pairs, write_jsonl

        c = self.config
        data = self.out / "data"
        train_path, eval_path = data / "train.jsonl", data / "eval.jsonl"

        def keep(rows: list[dict], path) -> str | None:
            if not rows:
                return None
            return write_jsonl(rows, path) if write else str(path)

        if c.demo_source == "synthetic":
            share = c.demo_bare_share
            # A different seed: held-out pairs are drawn independently of the training ones.
            ev = arithmetic_pairs(c.demo_eval_pairs, c.seed + 10_000, bare_share=share) if c.demo_eval_pairs else []
            return keep(arithmetic_pairs(c.demo_pairs, c.seed, bare_share=share), train_path), keep(ev, eval_path)
        # Sampling takes minutes and is not bit-repeatable everywhere: a resumed run reuses the
        # pairs its first start wrote, when they were made with the same settings.
        key = self.demo_stamp(self.model_path)
        stamp = data / "demo.json"
        if stamp.is_file() and stamp.read_text() == key and train_path.is_file():
            return str(train_path), str(eval_path) if c.demo_eval_pairs and eval_path.is_file() else None
        t0 = time.perf_counter()
        ev = sampled_arithmetic_pairs(self.base, self.model_path, c.demo_eval_pairs, c.seed + 10_000) \
            if c.demo_eval_pairs else []
        train = sampled_arithmetic_pairs(self.base, self.model_path, c.demo_pairs, c.seed,
                                         exclude={r["prompt"] for r in ev})
        if write:
            print(f"[align] sampled {len(train)} + {len(ev)} demo pairs in {time.perf_counter() - t0:.0f} s")
        files = keep(train, train_path), keep(ev, eval_path)
        if write:
            atomic_write_text(stamp, key)  # last: the stamp vouches for files already complete
        return files

    # -- one step -----------------------------------------------------------------------------
    def scores(self, pairs: list[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards, each (B,), from one forward pass over the 2B sequences."""
        batch = collate_pairs(pairs, self.base.tokenizer.pad_token_id)
        dev = self.device
        r = self.rm.score_ids(batch["input_ids"].to(dev), batch["attention_mask"].to(dev), self.config.padding_free)
        return r[:len(pairs)], r[len(pairs):]

    def margin_of(self, pairs: list[TokenizedPair]) -> torch.Tensor | None:
        if not self.margins:
            return None
        return torch.tensor([self.margins.get(p.where, 0.0) for p in pairs], dtype=torch.float32)

    def pair_loss(self, pairs: list[TokenizedPair], indices: list[int] | None, train: bool):
        chosen, rejected = self.scores(pairs)
        loss = bradley_terry_loss(chosen, rejected, self.margin_of(pairs), self.config.center_rewards_coefficient)
        return loss, reward_stats(chosen, rejected)

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.3f}", "acc": f"{stats['accuracy']:.2f}"}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, pairwise accuracy, mean margin, calibration by |margin| bucket, length baseline."""
        self.calibration = []
        if not self.eval_pairs:
            return {}
        self.base.model.eval()
        c = self.config
        chosen, rejected = zip(*(self.scores(chunk) for chunk in self.eval_chunks()))
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        self.calibration = calibration(chosen, rejected, tuple(c.calibration_buckets))
        loss = bradley_terry_loss(chosen, rejected, self.margin_of(self.eval_pairs), c.center_rewards_coefficient)
        stats = {"loss": loss.item(), **reward_stats(chosen, rejected),
                 "ece": expected_calibration_error(self.calibration),
                 "length_baseline_accuracy": length_baseline_accuracy(self.eval_pairs), "pairs": len(chosen)}
        return {f"eval/{k}": v for k, v in stats.items()}

    # -- the end ------------------------------------------------------------------------------
    def save_final(self, final: dict) -> Path:
        return self.rm.save(self.out / "reward_model", extra={"trained_steps": self.step, **final})

    def summary_extra(self) -> dict:
        per_s = self.pairs_seen / self.train_seconds if self.train_seconds else None
        return {**super().summary_extra(), "train_pairs_per_s": per_s, "calibration": self.calibration}


def format_calibration(buckets: list[dict]) -> str:
    lines = ["|margin| bucket   pairs  accuracy  predicted"]
    for b in buckets:
        high = "inf" if b["high"] is None else f"{b['high']:g}"
        lines.append(f"[{b['low']:g}, {high})".ljust(17) + f"{b['count']:>5}  {b['accuracy']:8.3f}  "
                     f"{b['predicted']:9.3f}")
    return "\n".join(lines)
