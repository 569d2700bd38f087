"""Online DPO: each step the current policy samples, the rewards rank, and DPO learns from best vs worst.

    align online-dpo --config configs/online_dpo_tiny.yaml --model_name_or_path runs/tiny-model

One step (1-based `s`):
  1. sample `num_generations` completions for each of the step's prompts from the policy adapter on
     the rollout engine (vLLM in this process by default; after every update only the adapter travels
     to it, then a probe's log-probs must match the trainer's: align/recipes/rollout_run.py);
  2. score them with the reward functions and/or the reward model, as GRPO does
     (align/recipes/ppo/scoring.py; `missing_eos_penalty` is subtracted where no EOS came, as TRL does);
  3. pair each prompt's best completion against its worst (`best_worst_pairs`); a prompt whose
     completions all scored the same gives no pair and is counted in `ties`;
  4. one DPO step on those pairs (align/recipes/dpo_losses.py), the reference being the starting policy:
     the base with adapters off, or `init_adapter`'s frozen copy (align/core/policy_init.py); with
     `use_peft: false` every base weight trains and the reference is a frozen copy of the starting base;
  5. sync the engine (the adapter, or with use_peft: false every weight).

TRL's OnlineDPOTrainer samples 2 completions per prompt and pairs them; `num_generations: 2` is that.
Metrics keep TRL's names (`loss`, `rewards/chosen|rejected|margins|accuracies`, `logps/chosen|rejected`,
`objective/scores`, `objective/scores_margin`, `objective/kl`, `objective/entropy`,
`val/contain_eos_token`, `beta`); `objective/kl` and `/entropy` are over the paired completions, under
the policy before the step (TRL's over its two completions: the same when num_generations is 2).
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from align.core.policy_init import reference_model
from align.data.preference import TokenizedPair, collate_pairs
from align.data.prompt_rows import PromptRows
from align.recipes.dpo import completion_lengths, sequence_logprobs
from align.recipes.dpo_losses import dpo_loss
from align.recipes.ppo.batch import prompt_indices
from align.recipes.ppo.metrics import Laps
from align.recipes.ppo.scoring import RewardState, group_reward_stats
from align.recipes.rollout_config import RolloutConfig
from align.recipes.rollout_run import RolloutRun
from align.train.config_parser import arg
from align.train.full_finetune import FullFinetuneHooks, frozen_copy, full_parameters

ONLINE_LOSS_TYPES = ("sigmoid", "ipo")  # what TRL's OnlineDPOTrainer computes


@dataclass
class OnlineDPOConfig(RolloutConfig):
    """Every knob of `align online-dpo`: TRL's OnlineDPOConfig names where TRL has the idea."""

    output_dir: str = arg("runs/online-dpo", "Run folder: metrics.jsonl, tb/, checkpoints/, the final policy "
                                             "adapter (policy/; use_peft: false: model/).")
    learning_rate: float = arg(5e-5, "AdamW peak learning rate (TRL's 5e-7 is for full fine-tuning; LoRA's best "
                                     "is ~10x a full fine-tuning lr).")
    max_steps: int = arg(-1, "Steps (-1: num_train_epochs passes over the prompts). Each step samples, pairs and "
                             "takes one optimizer step.")
    per_device_train_batch_size: int = arg(4, "Prompts per forward pass; each gives at most one pair (TRL's "
                                              "meaning). A step samples this x gradient_accumulation_steps x "
                                              "processes prompts.")
    num_generations: int = arg(2, "Completions sampled per prompt; the best against the worst is its pair "
                                  "(TRL samples 2).")
    temperature: float = arg(0.9, "Sampling temperature (TRL's default).")
    max_new_tokens: int = arg(64, "Completion length limit in tokens (TRL's name).")
    missing_eos_penalty: float | None = arg(None, "Subtracted from the score of a completion that did not end with "
                                                  "EOS (TRL's; null: none).")
    beta: float | list[float] = arg(0.1, "Strength of the KL anchor to the reference (TRL's list form takes one "
                                         "value).")
    loss_type: str | list[str] = arg("sigmoid", f"One of {ONLINE_LOSS_TYPES}, as TRL's online DPO.")
    reward_model_path: str | None = arg(None, "A reward model: align's reward folder (an adapter on the shared "
                                              "base), an exported classifier, or any "
                                              "AutoModelForSequenceClassification folder or hub id (TRL's name).")

    REWARD_MODEL_FIELD = "reward_model_path"
    RENAMED = {**RolloutConfig.RENAMED, "max_completion_length": "max_new_tokens (TRL's OnlineDPOConfig name)",
               "reward_model_name_or_path": "reward_model_path (TRL's OnlineDPOConfig name)",
               "reward_model": "reward_model_path", "generations_per_prompt": "num_generations"}

    def __post_init__(self):
        if isinstance(self.beta, list):  # TRL: one beta per epoch; here one for the whole run
            if len(self.beta) != 1:
                raise ValueError(f"beta: {self.beta}: a beta per epoch is not supported; give one number")
            self.beta = self.beta[0]
        super().__post_init__()
        if isinstance(self.loss_type, list) and len(self.loss_type) == 1:  # TRL's list form of one loss
            self.loss_type = self.loss_type[0]
        if self.loss_type not in ONLINE_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {ONLINE_LOSS_TYPES}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations: a pair needs two completions of a prompt; expected >= 2, "
                             f"got {self.num_generations}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive integer, got {self.max_new_tokens}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty: expected >= 0 or null, got {self.missing_eos_penalty}")
        if self.num_train_epochs != 1 and self.max_steps != -1:
            raise ValueError("num_train_epochs: with max_steps set, the run takes max_steps steps; set one of them")

    @property
    def max_completion_length(self) -> int:
        """What the shared rollout code reads (align/recipes/rollout_run.py)."""
        return self.max_new_tokens

    @property
    def reward_model_name_or_path(self) -> str | None:
        return self.reward_model_path

    def prompts_per_step(self, world: int = 1) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world

    def steps(self, num_prompts: int, world: int = 1) -> int:
        if self.max_steps != -1:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * num_prompts / self.prompts_per_step(world)))


def best_worst_pairs(scores: torch.Tensor) -> tuple[list[tuple[int, int, int]], int]:
    """Scores (P, G) of G completions per prompt -> ([(prompt, best, worst), ...], ties).

    Best and worst are the first completion with the highest and the lowest score (NaN: unscored, left
    out). A prompt with fewer than two scored completions, or whose scores are all equal, gives no pair
    and counts as a tie."""
    pairs, ties = [], 0
    for p, row in enumerate(scores):
        seen = ~torch.isnan(row)
        if seen.sum() < 2:
            ties += 1
            continue
        best = int(torch.where(seen, row, -math.inf).argmax())
        worst = int(torch.where(seen, row, math.inf).argmin())
        if row[best] == row[worst]:
            ties += 1
            continue
        pairs.append((p, best, worst))
    return pairs, ties


PAIR_STATS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "objective/kl", "objective/entropy")


class OnlineDPOTrainer(FullFinetuneHooks, RolloutRun):
    name = "online-dpo"

    def build(self) -> list[dict]:
        c = self.config
        self.build_rollout()
        world = self.processes.world
        if self.processes.is_main:
            print(f"[align] online-dpo: each step samples {c.prompts_per_step(world)} prompts x "
                  f"{c.num_generations} generations, pairs best against worst, one DPO step; "
                  f"{self.num_steps()} steps", flush=True)
        if self.policy is None:  # use_peft: false: the reference (beta > 0 always) is the starting base, copied
            self.ref_copy = frozen_copy(self.base, self.processes.is_main)
            return [{"params": full_parameters(self), "lr": c.learning_rate}]
        self.ref_copy = None
        return [{"params": list(self.base.adapter_parameters("policy").values()), "lr": c.learning_rate}]

    def num_steps(self) -> int:
        c, world = self.config, self.processes.world
        self.steps_per_epoch = max(1, math.ceil(len(self.train_rows) / c.prompts_per_step(world)))  # for `epoch`
        return c.steps(len(self.train_rows), world)

    def rollout_sequences(self) -> int:
        return self.config.prompts_per_step(self.processes.world) * self.config.num_generations

    # -- one step --------------------------------------------------------------------------------
    def training_step(self) -> dict:
        step, c, laps = self.step + 1, self.config, Laps()
        rows, samples = self.rollout(step)
        laps.lap("rollout")
        scores, per_func, stopped = self.score(rows, samples)
        laps.lap("score")
        found, ties = best_worst_pairs(scores.view(len(rows), c.num_generations))
        pairs = [TokenizedPair(list(samples[p][b].prompt_ids), list(samples[p][b].completion_ids),
                               list(samples[p][w].completion_ids), rows.places[p])
                 for p, b, w in found]
        stats = self.update(step, pairs)
        laps.lap("update")
        self.last_sync = self.engine.sync(self.base, adapter=self.policy)
        laps.lap("sync")
        margins = [float(scores[p, b] - scores[p, w]) for p, b, w in found]
        self.scorer.pop_logged()
        return {**stats, "objective/scores": scores.nanmean().item(),
                "objective/scores_margin": sum(margins) / len(margins) if margins else math.nan,
                "val/contain_eos_token": stopped.float().mean().item(), "beta": c.beta,
                "reward": scores.nanmean().item(), "ties": ties, "num_pairs": len(pairs), "pairs": len(pairs),
                "tokens": sum(len(s.prompt_ids) + len(s.completion_ids) for g in samples for s in g),
                **group_reward_stats(per_func, self.scorer.names),
                "sync/bytes": self.last_sync.bytes,
                "sync/max_abs_diff": math.nan if self.last_sync.max_abs_diff is None else self.last_sync.max_abs_diff,
                **{f"time/{k}": v for k, v in laps.times.items()}}

    def rollout(self, step: int):
        """This process's share of step `step`'s prompt rows, and num_generations samples of each."""
        c = self.config
        idx = self.processes.shard(prompt_indices(len(self.train_rows), c.prompts_per_step(self.processes.world),
                                                  c.seed, step))
        samples = self.engine.generate([self.train_ids[i] for i in idx], n=c.num_generations,
                                       max_new_tokens=c.max_new_tokens, seed=self._seed(step) + self.processes.rank,
                                       adapter=self.policy, **c.sampling())
        return PromptRows([self.train_rows[i] for i in idx], [self.train_rows.places[i] for i in idx]), samples

    def score(self, rows, samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, G) scores (NaN where no reward scored), (P*G, F) each reward's, (P*G,) ended with EOS."""
        c = self.config
        flat = [(row, s) for row, group in zip(rows, samples, strict=True) for s in group]
        places = [p for p in rows.places for _ in range(c.num_generations)]
        state = RewardState(global_step=self.step, max_steps=self.total_steps, epoch=self.epoch())
        total, per_func = self.scorer.score([r for r, _ in flat], [s.text for _, s in flat],
                                            [list(s.completion_ids) for _, s in flat], places, state)
        stopped = torch.tensor([s.finish_reason == "stop" for _, s in flat])
        if c.missing_eos_penalty is not None:
            total = torch.where(stopped, total, total - c.missing_eos_penalty)
        return total.view(len(rows), c.num_generations), per_func, stopped

    def update(self, step: int, pairs: list[TokenizedPair]) -> dict:
        """One optimizer step over the pairs, per_device_train_batch_size of them per micro-batch. A step
        whose prompts all tied takes none, but its learning rate is scheduled as if it had."""
        size = self.config.per_device_train_batch_size
        local = [pairs[i:i + size] for i in range(0, len(pairs), size)]
        global_count = round(self.processes.mean({"m": float(len(local))})["m"] * self.processes.world)
        if global_count == 0:
            with warnings.catch_warnings():  # torch warns of a schedule stepped before any optimizer step
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            return {"learning_rate": self.optimizer.param_groups[0]["lr"]}
        # Another process has pairs and this one none: it still joins the step's all-reduce, with nothing to add.
        return self.gradient_step(local or [[]], self.pair_loss, step, global_count)

    def pair_loss(self, pairs: list[TokenizedPair]) -> tuple[torch.Tensor, dict]:
        c = self.config
        if not pairs:
            return torch.zeros((), requires_grad=True), dict.fromkeys(PAIR_STATS, 0.0)
        batch = collate_pairs(pairs, self.base.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.no_grad():
            ref_c, ref_r = self.reference_logprobs(batch)
        len_c, len_r = completion_lengths(batch)
        with self.base.adapter("policy") if self.policy else nullcontext():
            pol_c, pol_r = sequence_logprobs(self.base, batch)
        losses, r_c, r_r = dpo_loss(pol_c, pol_r, ref_c.to(pol_c), ref_r.to(pol_r), c.beta, c.loss_type,
                                    chosen_lengths=len_c, rejected_lengths=len_r)
        pol = torch.cat([pol_c, pol_r]).detach()
        return losses.mean(), {
            "rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracies": (r_c > r_r).float().mean().item(),
            "logps/chosen": pol_c.detach().mean().item(), "logps/rejected": pol_r.detach().mean().item(),
            "objective/kl": (pol - torch.cat([ref_c, ref_r]).to(pol)).mean().item(),
            "objective/entropy": -pol.mean().item()}

    def reference_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's (chosen, rejected) sums: the frozen copy (use_peft: false), or the base with the
        adapter off (or the init adapter on)."""
        with reference_model(self.base, self.ref_adapter, self.ref_copy) as model:
            return sequence_logprobs(model, batch)

    def progress(self, stats: dict) -> dict:
        shown = {"reward": f"{stats['reward']:.3f}", "pairs": stats["num_pairs"]}
        if "eval/reward" in stats:
            shown["eval"] = f"{stats['eval/reward']:.3f}"
        return shown


def train_online_dpo(config: OnlineDPOConfig, resume: bool | str | None = None, overwrite: bool = False,
                     train_dataset=None, eval_dataset=None, reward_funcs: list | None = None,
                     resume_changed: bool = False) -> Path:
    """Train with online DPO; returns the policy adapter's folder (use_peft: false: model/). `reward_funcs`:
    callables or dotted paths (replacing config.reward_funcs); `train_dataset` / `eval_dataset`: a
    datasets.Dataset or a list of rows with a "prompt" (replacing config.train_file / eval_file)."""
    trainer = OnlineDPOTrainer(config, resume=resume, overwrite=overwrite, train_dataset=train_dataset,
                               eval_dataset=eval_dataset, reward_funcs=reward_funcs, resume_changed=resume_changed)
    try:
        return trainer.train()
    finally:
        trainer.close()


# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    from align.train.cli import add_recipe_arguments

    add_recipe_arguments(p, OnlineDPOConfig)


def run(args) -> int:
    from align.train.cli import train_from_args

    done = train_from_args(OnlineDPOConfig, OnlineDPOTrainer, args)
    if done is not None and done[0].processes.is_main:
        trainer, policy = done
        for key in ("eval/reward_before", "eval/reward"):
            if key in trainer.summary:
                print(f"{key}: {trainer.summary[key]:.4f}")
        what = "policy adapter" if trainer.config.use_peft else "policy model"  # use_peft: false saves model/
        print(f"{what}: {policy}   curves: align plot {trainer.out}")
    return 0
