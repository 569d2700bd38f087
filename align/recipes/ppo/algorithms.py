"""The math of PPO, GRPO and RLOO as pure tensor functions.

Every function takes tensors and plain numbers (never a config) and documents
its shapes. Shapes: B = sequences in the batch, T = completion tokens (right
padded), `mask` (B, T) is 1 on real completion tokens and 0 on padding.
Names follow the papers and CleanRL's ppo.py (`delta`, `lastgaelam`).
"""

from __future__ import annotations

import torch


# -- masked statistics ---------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (every real token weighs the same)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries (n-1 in the denominator, like torch.var)."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries; padding stays 0. `shift_mean=False` keeps the mean."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask


# -- KL to the reference -------------------------------------------------------------------------
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1/k3).

    k1 = log p - log q                    (unbiased, can be negative per token)
    k3 = (q/p) - 1 - log(q/p)             (unbiased, always >= 0, lower variance)
    with p the policy, q the reference. Shapes (B, T) -> (B, T).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"kl estimator: expected 'k1' or 'k3', got {estimator!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL on every token, plus the sequence score on its last token.

    scores (B,), kl (B, T), mask (B, T) right-padded -> (B, T).
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last.unsqueeze(1), (scores * (mask.sum(1) > 0)).unsqueeze(1).to(rewards.dtype))


# -- advantages ----------------------------------------------------------------------------------
def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, a reverse scan over time (CleanRL's loop).

    rewards, values, mask (B, T). The episode ends after the last real token, so the
    value after it is 0. Returns (advantages, returns), both (B, T), 0 on padding.
    """
    values = values * mask          # padded values never leak in (there is no state there)
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t + 1 < T else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]
        advantages[:, t] = lastgaelam
    returns = (advantages + values) * mask
    return advantages, returns


def gae_advantages_closed_form(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                               gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same GAE without a loop: A_t = sum_l (gamma*lam)^l * delta_{t+l}, as one matrix product.

    Exists so the scan above can be checked against a second derivation; O(T^2) memory.
    """
    values = values * mask
    rewards = rewards * mask
    nextvalues = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    delta = (rewards + gamma * nextvalues - values) * mask
    T = delta.shape[1]
    t = torch.arange(T, dtype=delta.dtype)
    power = t.unsqueeze(0) - t.unsqueeze(1)                      # power[t, s] = s - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    advantages = (delta @ discount.T) * mask                     # A[b, t] = sum_s discount[t, s] delta[b, s]
    return advantages, (advantages + values) * mask


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: r_i - mean of the other k-1 rewards of the same prompt.

    scores (B,) ordered so that each run of `group_size` rows shares a prompt; needs group_size >= 2.
    """
    if group_size < 2:
        raise ValueError("rloo needs at least 2 generations per prompt")
    groups = _groups(scores, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores: expected shape (B,) with B a multiple of {group_size}, got {tuple(scores.shape)}")
    return scores.float().view(-1, group_size)


# -- losses --------------------------------------------------------------------------------------
def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = old + clamp(V - old, -clip, clip).

    All (B, T). `clip=None` is the plain squared error. Returns (loss, clip fraction).
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(unclipped, mask), values.new_zeros(())
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


# -- diagnostics and KL control ------------------------------------------------------------------
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over masked entries; nan when returns are constant."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al.'s proportional controller: coef *= 1 + clip(kl/target - 1, -0.2, 0.2) * n/horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)
