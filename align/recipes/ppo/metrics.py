"""What an RL step logs: TRL's GRPO names where TRL has the quantity, ours (time/, sync/, logprob/) beside.

TRL's: reward, reward_std, rewards/<fn>/mean, rewards/<fn>/std, kl, entropy, clip_ratio/low_mean,
clip_ratio/high_mean, clip_ratio/region_mean, completions/mean_length (and min, max),
completions/clipped_ratio, frac_reward_zero_std, num_tokens, loss, grad_norm, learning_rate.
"""

from __future__ import annotations

import math
import time

import torch

from align.recipes.ppo import algorithms as A
from align.recipes.ppo.batch import Rollout
from align.recipes.ppo.scoring import group_reward_stats

# Averaged over the step's gradient steps, under the names the loss functions give them.
UPDATE_MEANS = ("loss", "loss/policy", "grad_norm", "kl_loss", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "loss/value", "value/clipfrac", "allreduce_bytes")


class Laps:
    """Seconds each phase of a step took, each measured from the end of the one before."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase] = now - self.last
        self.last = now


def advantages_per_sequence(advantages: torch.Tensor) -> torch.Tensor:
    """(B,) one advantage per completion: GRPO/RLOO's own, or PPO's at the first token."""
    return advantages if advantages.dim() == 1 else advantages[:, 0]


def _nan_std(x: torch.Tensor) -> float:
    seen = x[~torch.isnan(x)]
    return seen.std().item() if len(seen) > 1 else 0.0


def step_metrics(batch: Rollout, scores: torch.Tensor, per_func: torch.Tensor, names: list[str],
                 kl: torch.Tensor | None, kl_mean: float, trainer_view: tuple, advantages: torch.Tensor,
                 zero_std: torch.Tensor, updates: list[dict], times: dict, old_values: torch.Tensor | None,
                 returns: torch.Tensor | None, kl_coef: float, sync, num_tokens: int) -> dict:
    """One step's metrics. `kl` is None where no reference forward ran; `trainer_view` is (rows, log-probs,
    entropy) of the trainer's own pi_old; `updates` the gradient steps' statistics; `sync` the last sync's
    report; `old_values` and `returns` are None without a critic."""
    mask = batch.mask
    rows, trainer_logp, entropy = trainer_view
    seen = mask[rows]
    lengths = mask.sum(1)
    # No reference forward ran: there is no KL to log (TRL logs none at beta 0 either).
    logged_kl = {} if kl is None else {"kl": A.masked_mean(kl, mask).item(), "kl/sequence": kl_mean}
    times = {**times, "forward": times["old_logprobs"] + times["ref_logprobs"] + times["values"]}
    mean = {k: sum(u[k] for u in updates) / len(updates) for k in UPDATE_MEANS if k in updates[0]}
    mismatch = (trainer_logp - batch.sampler_logprobs[rows]).abs() * seen
    n_tokens = mask.sum().item()
    out = {
        "reward": scores.nanmean().item(),
        "reward_std": _nan_std(scores),
        **group_reward_stats(per_func, names),
        "frac_reward_zero_std": zero_std.float().mean().item(),
        **logged_kl,
        "beta": kl_coef,
        "entropy": A.masked_mean(entropy, seen).item(),
        **mean,
        "advantages/std": advantages_per_sequence(advantages).std().item() if len(advantages) > 1 else 0.0,
        "learning_rate": updates[-1]["learning_rate"],
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - batch.stopped.mean().item(),
        "num_tokens": num_tokens,
        "logprob/mismatch_mean": (mismatch.sum() / max(seen.sum().item(), 1)).item(),
        "logprob/mismatch_max": mismatch.max().item(),
        "sync/bytes": sync.bytes,
        "sync/max_abs_diff": sync.max_abs_diff if sync.max_abs_diff is not None else math.nan,
        **{f"time/{k}": v for k, v in times.items()},
        "tokens_per_s/rollout": n_tokens / max(times["rollout"], 1e-9),
        "tokens_per_s/step": n_tokens / max(sum(v for k, v in times.items() if k != "forward"), 1e-9),
    }
    if old_values is not None:
        out.update({"value/explained_variance": A.explained_variance(old_values, returns, mask),
                    "value/mean": A.masked_mean(old_values, mask).item()})
    return out
