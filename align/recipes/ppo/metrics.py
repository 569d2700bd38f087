"""What a PPO step logs (TRL's names where TRL has them), and the phase timer behind its time/ keys."""

from __future__ import annotations

import math
import time

import torch

from align.recipes.ppo import algorithms as A
from align.recipes.ppo.batch import Rollout


class Laps:
    """Seconds each phase of a step took, each measured from the end of the one before."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase] = now - self.last
        self.last = now


def step_metrics(batch: Rollout, scores: torch.Tensor, parts: dict, kl: torch.Tensor | None, kl_mean: float,
                 trainer_view: tuple, advantages: torch.Tensor, updates: list[dict], times: dict,
                 old_values: torch.Tensor | None, returns: torch.Tensor | None, kl_coef: float, sync) -> dict:
    """One step's metrics. `kl` is None where no reference forward ran; `trainer_view` is (rows, log-probs,
    entropy) of the trainer's own pi_old; `updates` the gradient steps' statistics; `sync` the last sync's
    report; `old_values` and `returns` are None without a critic."""
    mask = batch.mask
    rows, trainer_logp, entropy = trainer_view
    seen = mask[rows]
    # No reference forward ran: there is no KL to log (TRL logs none at beta 0 either).
    logged_kl = {} if kl is None else {"kl/ref": kl_mean, "kl/ref_per_token": A.masked_mean(kl, mask).item()}
    times = {**times, "forward": times["old_logprobs"] + times["ref_logprobs"] + times["values"]}
    mean = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
    mismatch = (trainer_logp - batch.sampler_logprobs[rows]).abs() * seen
    n_tokens = mask.sum().item()
    out = {
        "reward/mean": scores.mean().item(),
        **{f"reward/{k}": v.nanmean().item() for k, v in parts.items()},  # a None (NaN) is no opinion
        **logged_kl,
        "kl/coef": kl_coef,
        "policy/entropy": A.masked_mean(entropy, seen).item(),
        "policy/clipfrac": mean["policy/clipfrac"],
        "policy/approx_kl": mean["policy/approx_kl"],
        "policy/advantage_std": advantages[mask.bool()].std().item() if n_tokens > 1 else 0.0,
        "loss": mean["loss"],
        "loss/policy": mean["loss/policy"],
        "grad_norm": mean["grad_norm"],
        "learning_rate": updates[-1]["learning_rate"],
        "logprob/mismatch_mean": (mismatch.sum() / max(seen.sum().item(), 1)).item(),
        "logprob/mismatch_max": mismatch.max().item(),
        "response/length": mask.sum(1).mean().item(),
        "response/stopped": batch.stopped.mean().item(),
        "sync/bytes": sync.bytes,
        **({"allreduce_bytes": mean["allreduce_bytes"]} if "allreduce_bytes" in mean else {}),
        "sync/max_abs_diff": sync.max_abs_diff if sync.max_abs_diff is not None else math.nan,
        **{f"time/{k}": v for k, v in times.items()},
        "tokens_per_s/rollout": n_tokens / max(times["rollout"], 1e-9),
        "tokens_per_s/step": n_tokens / max(sum(v for k, v in times.items() if k != "forward"), 1e-9),
    }
    if old_values is not None:
        out.update({"loss/value": mean["loss/value"], "value/clipfrac": mean["value/clipfrac"],
                    "value/explained_variance": A.explained_variance(old_values, returns, mask),
                    "value/mean": A.masked_mean(old_values, mask).item()})
    return out
