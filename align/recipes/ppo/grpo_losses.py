"""The GRPO loss family of TRL 1.16 as pure tensor functions.

Reward -> advantage (GRPO, Shao et al. 2024, DeepSeekMath), the clipped surrogate with its four
normalisations, sequence-level ratios (GSPO, Zheng et al. 2025) and the sampler (vLLM) correction
(truncated importance sampling, Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"). Each follows trl/trainer/grpo_trainer.py (`_generate_and_score_completions`,
`_compute_loss`) and GRPOConfig's defaults; tests/test_grpo_losses.py runs TRL's own code beside
them. Not covered: TRL's cispo/sapo/luspo/vespo losses, `delta` (two-sided clipping), the entropy
bonus and mask, off-policy masking and `multi_objective_aggregation="normalize_then_sum"`.

Shapes: B sequences, T completion tokens, F reward functions; `mask` (B, T) is 1 on scored tokens.
"""

from __future__ import annotations

import math
import warnings

import torch

from align.core.errors import UserError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
SAMPLER_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class GRPOArgumentError(UserError, ValueError):
    """An argument TRL would refuse too; the message names it and what was expected."""


# -- rewards -> advantages -----------------------------------------------------------------------
def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_f w_f r_f per completion (B,), a None (NaN) reward counting as absent (TRL's nansum).

    A row where every function returned None stays NaN (TRL: unscorable), so the group baseline
    skips it and `group_advantages` gives it advantage 0; nansum alone would make it a reward of 0.
    """
    rewards = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    return rewards.masked_fill(unscorable, math.nan)


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN; NaN where fewer than two values (as trl.trainer.utils.nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.full_like(variance, math.nan))
    std = variance.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


def scale_rewards_mode(scale_rewards: str | bool) -> str:
    """GRPOConfig's spelling: True is "group" (GRPO), False is "none" (Dr. GRPO)."""
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if mode not in SCALE_REWARDS:
        raise GRPOArgumentError(f"scale_rewards: expected one of {SCALE_REWARDS} or True/False, got {scale_rewards!r}")
    return mode


def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale_rewards: str | bool = "group") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO advantages (B,), the std they were scaled by (B,) and is_std_zero (B,) for logging.

    Groups are consecutive blocks of `group_size` completions of one prompt. A = r - mean_group(r),
    divided by (std + 1e-4) unless scale_rewards is "none" (Dr. GRPO); std is the group's
    ("group", GRPO) or the whole batch's ("batch", PPO Lite). NaN rewards (unscorable) are left out
    of mean and std and get advantage 0; a std over fewer than two rewards is NaN, as in TRL.
    """
    mode = scale_rewards_mode(scale_rewards)
    if group_size < 1 or rewards.numel() % group_size:
        raise GRPOArgumentError(f"group_size: expected a positive divisor of {rewards.numel()}, got {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    if mode == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:  # "none" still computes the group std: TRL logs frac_reward_zero_std from it
        std = _nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if mode != "none":
        advantages = advantages / (std + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), std, is_std_zero


# -- the sampler correction ----------------------------------------------------------------------
def _check_sampler_caps(mode: str, cap_min: float | None, cap_max: float | None) -> None:
    if mode not in SAMPLER_MODES:
        raise GRPOArgumentError(f"vllm_importance_sampling_mode: expected one of {SAMPLER_MODES}, got {mode!r}")
    if cap_min is not None and cap_max is not None and cap_min >= cap_max:
        raise GRPOArgumentError(f"vllm_importance_sampling_clip_min: expected below clip_max {cap_max}, got {cap_min}")
    if mode.endswith("_truncate") and cap_min is None and cap_max is None:
        raise GRPOArgumentError(f"vllm_importance_sampling_clip_max: a {mode} mode needs clip_min or clip_max set")


def sampler_correction(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       mode: str = "sequence_mask", cap_min: float | None = None,
                       cap_max: float | None = 3.0) -> torch.Tensor:
    """Truncated (or masked) importance sampling weight π_train / π_sampler, detached.

    Returns (B, T) for token_* modes, (B, 1) for sequence_* modes (one ratio per completion: the
    exp of its summed log-ratio). *_truncate clamps to [cap_min, cap_max]; *_mask zeroes ratios
    outside it. A NaN sampler log-prob (not returned by the engine) gives ratio 1 there, as in TRL.
    Defaults are GRPOConfig's (vllm_importance_sampling_mode/_clip_min/_clip_max).
    """
    _check_sampler_caps(mode, cap_min, cap_max)
    diff = torch.nan_to_num((old_logp - sampler_logp).detach() * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("_truncate"):
        return torch.clamp(ratio, min=cap_min, max=cap_max)
    low = -math.inf if cap_min is None else cap_min
    high = math.inf if cap_max is None else cap_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


# -- the clipped surrogate -----------------------------------------------------------------------
def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                     level: str = "token") -> torch.Tensor:
    """π/π_old per token (B, T) (GRPO), or per sequence (B, 1) from the mean log-ratio over its tokens (GSPO)."""
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return torch.exp(log_ratio)


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π || π_ref), per token: e^(ref - π) - (ref - π) - 1."""
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


def _check_loss_args(loss_type: str, level: str, beta: float, ref_logp, max_completion_length,
                     tokens_normalizer) -> None:
    if loss_type not in LOSS_TYPES:
        raise GRPOArgumentError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if level not in IS_LEVELS:
        raise GRPOArgumentError(f"importance_sampling_level: expected one of {IS_LEVELS}, got {level!r}")
    if beta != 0.0 and ref_logp is None:
        raise GRPOArgumentError(f"ref_logp: beta is {beta}, so the reference log-probs are needed")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise GRPOArgumentError("max_completion_length: loss_type dr_grpo divides by it; expected a positive int")
    if loss_type == "dapo" and tokens_normalizer is None:
        raise GRPOArgumentError("tokens_normalizer: loss_type dapo divides by it; expected the step's tokens per micro-batch")
    if level == "sequence" and loss_type != "grpo":
        # TRL warns (does not refuse): the token sum weights each sequence by its length.
        warnings.warn(f"importance_sampling_level='sequence' with loss_type={loss_type!r} weights each sequence by "
                      "its length; GSPO's setup is loss_type='grpo'", stacklevel=3)


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_completion_length: int | None = None, tokens_normalizer: float | torch.Tensor | None = None
              ) -> torch.Tensor:
    """One micro-batch's loss from per-token losses; see `grpo_loss` for what each type divides by."""
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token_loss.size(0) * max_completion_length)
    return masked.sum() / tokens_normalizer


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's metric mean: over scored tokens, or over sequences when x is one value each (B, 1)."""
    if x.shape[1] == 1:
        return x.sum() / max(x.shape[0], 1)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def per_token_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """(B, 1) from one advantage per sequence, to broadcast over its tokens; (B, T) ones stay as they are."""
    return advantages.reshape(-1, 1) if advantages.dim() == 1 else advantages


def clip_stats(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
               epsilon_high: float) -> dict[str, torch.Tensor]:
    """Fraction of tokens (or sequences) where clipping cut the gradient: below 1-ε_low with A<0, above 1+ε_high with A>0."""
    ratio, adv = ratio.detach(), per_token_advantages(advantages.detach())
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
    return {"clip_ratio/low_mean": _masked_mean(low, mask), "clip_ratio/high_mean": _masked_mean(high, mask),
            "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), mask)}


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              importance_sampling_level: str = "token", beta: float = 0.0, ref_logp: torch.Tensor | None = None,
              is_ratio: torch.Tensor | None = None, max_completion_length: int | None = None,
              tokens_normalizer: float | torch.Tensor | None = None, use_bias_correction_kl: bool = True
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's GRPO-family loss and TRL's metrics for it ("kl" when beta != 0, clip ratios).

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,) one per sequence (or (B, T) per token, as PPO's
    GAE gives them); is_ratio: the
    `sampler_correction` weight, multiplied into the surrogate (not the KL). With r the ratio
    (`importance_ratio`: per token, or per sequence for GSPO) and A the advantage, per token:
      l = -min(r A, clip(r, 1-ε_low, 1+ε_high) A) · is_ratio + β · KL_k3 · (r if use_bias_correction_kl)
    (ε_high > ε_low is DAPO's clip-higher; bias-corrected KL is DeepSeek-V3.2's, TRL's default.)
    The micro-batch loss, whose equal-weight average over the step's micro-batches (what
    align/train/gradient_step.py does) is TRL's loss for the step:
      grpo     mean over sequences of each one's token mean (GRPO)
      bnpo     token mean of the micro-batch
      dr_grpo  token sum / (B · max_completion_length) (Dr. GRPO)
      dapo     token sum / tokens_normalizer (DAPO), where the CALLER passes tokens_normalizer =
               (completion tokens of the optimizer step's whole batch, summed over processes) /
               (micro-batches in that step, over processes); the average then is total token sum
               / total tokens. In TRL's terms: num_items_in_batch / (num_processes · steps_per_generation).
    TRL divides grpo/bnpo/dr_grpo by gradient_accumulation_steps and dapo by its GA-scaled normalizer
    and sums micro-batches; its per-micro-batch loss is this one / gradient_accumulation_steps.
    """
    _check_loss_args(loss_type, importance_sampling_level, beta, ref_logp, max_completion_length, tokens_normalizer)
    mask = mask.to(logp.dtype)
    adv = per_token_advantages(advantages).to(logp.dtype)
    ratio = importance_ratio(logp, old_logp, mask, importance_sampling_level)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if is_ratio is not None:
        per_token = per_token * is_ratio
    stats = clip_stats(ratio, adv, mask, epsilon_low, epsilon_high)
    if beta != 0.0:
        kl = per_token_kl(logp, ref_logp)
        kl = kl * ratio if use_bias_correction_kl else kl
        per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask)
    return aggregate(per_token, mask, loss_type, max_completion_length, tokens_normalizer), stats
