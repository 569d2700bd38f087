"""Reference-free preference losses (ORPO, CPO, SimPO, AlphaPO) as pure tensor functions.

Inputs are the policy's per-pair log-probabilities of the chosen and rejected completions, shape (B,):
sums over completion tokens, or per-token averages where the method says so. No reference model:

  ORPO   (Hong et al. 2024):   β · log σ(log odds(c) - log odds(r)),  odds(y) = p / (1 - p), p from the
                               per-token AVERAGE log-prob; TRL's ORPOTrainer subtracts it from the NLL.
  CPO    (Xu et al. 2024), with x = β·(π_c - π_r) on SUMMED log-probs (sigmoid, hinge) or on AVERAGES (ipo):
         sigmoid  -(1-ε) log σ(x) - ε log σ(-x)
         hinge    max(0, 1 - x)
         ipo      (π_c - π_r - 1/(2β))²
  SimPO  (Meng et al. 2024):   sigmoid on AVERAGED log-probs with the target margin γ: x = β·(π_c - π_r) - γ
  AlphaPO (Gupta et al. 2025): alpha != 0 replaces each log-prob π by (1 - exp(π)^(-α)) / α before any of these.

The rewards logged are β·π (β times the transformed reward under AlphaPO), TRL's `rewards/*`.
Every definition and name is TRL 1.16's (trl/experimental/orpo, trl/experimental/cpo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
AVERAGED = ("ipo", "simpo")  # CPO loss types that score per-token averages (TRL: average_log_prob)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """ORPO's odds-ratio term from per-token AVERAGE log-probs (B,).

    Returns `ratio_loss` (B,): -β·log σ(log odds ratio), added to the NLL (TRL: nll - β·ratio); the
    rewards β·π; `log_odds_ratio` (mean of log σ(·)) and `log_odds_chosen` (mean log odds ratio), TRL's metrics.
    """
    chosen, rejected = chosen.float(), rejected.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return {"ratio_loss": -beta * ratio, "chosen_rewards": beta * chosen.detach(),
            "rejected_rewards": beta * rejected.detach(), "log_odds_ratio": ratio.detach().mean(),
            "log_odds_chosen": log_odds.detach().mean()}


def alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape (1 - p^(-α)) / α of p = exp(logps); alpha = 0 keeps the log-prob itself."""
    if alpha == 0.0:
        return logps
    return (1 - torch.exp(logps).pow(-alpha)) / alpha


def cpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
             alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair CPO/SimPO losses (B,) and the rewards β·r of chosen and rejected (detached).

    `chosen`/`rejected`: summed log-probs for sigmoid and hinge, per-token averages for ipo and simpo
    (AVERAGED). The behaviour-cloning NLL (cpo_alpha) is added by the caller.
    """
    r_c, r_r = alphapo_reward(chosen, alpha), alphapo_reward(rejected, alpha)
    logits = r_c - r_r
    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        if loss_type == "simpo":
            logits = logits - simpo_gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type: expected one of {CPO_LOSS_TYPES}, got {loss_type!r}")
    return losses, beta * r_c.detach(), beta * r_r.detach()

