"""DPO-family preference losses as pure tensor functions.

All inputs are per-pair sequence log-probabilities, shape (B,): the policy's and the
reference's log p(chosen | prompt) and log p(rejected | prompt). With
h = (pi_c - pi_r) - (ref_c - ref_r), the implicit reward margin:

  sigmoid  (DPO, Rafailov et al. 2023):   -log σ(βh)                       (label smoothing ε: conservative DPO)
  robust   (Chowdhury et al. 2024):       (-(1-ε) log σ(βh) + ε log σ(-βh)) / (1 - 2ε)
  hinge    (SLiC, Zhao et al. 2023):      max(0, 1 - βh)
  ipo      (Azar et al. 2023):            (h - 1/(2β))²    (h from length-averaged log-probs)

The implicit rewards are β·(π - ref) of the SUMMED log-probs for every loss type, as TRL logs
them; IPO alone averages over tokens inside its loss, so it takes the completion lengths.
`single_loss` reads TRL's list form of loss_type (one loss; TRL's weighted sums are not supported).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards β·(π - ref) of chosen and rejected (detached).

    Log-probs are sums over completion tokens. For `ipo`, pass the completion lengths (tokens
    scored) and the loss uses the per-token averages; without them the inputs are taken as averages.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "ipo" and chosen_lengths is not None and rejected_lengths is not None:
        lc, lr = chosen_lengths.to(policy_chosen).clamp(min=1), rejected_lengths.to(policy_rejected).clamp(min=1)
        h = (policy_chosen - ref_chosen) / lc - (policy_rejected - ref_rejected) / lr
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's extra term (Pang et al. 2024; TRL's rpo_alpha): the chosen completions' negative
    log-likelihood per token, over the batch's chosen tokens. `policy_chosen` are summed log-probs."""
    return -policy_chosen.sum() / chosen_lengths.to(policy_chosen).sum().clamp(min=1)


def single_loss(loss_type: str | list[str]) -> str:
    """TRL's `loss_type: [sigmoid]` is sigmoid; several losses (TRL sums them with loss_weights) are refused."""
    if not isinstance(loss_type, list):
        return loss_type
    if len(loss_type) == 1:
        return loss_type[0]
    if not loss_type:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got []")
    hint = " (for sigmoid + sft: loss_type: sigmoid with rpo_alpha: <the sft weight>)" if "sft" in loss_type else ""
    raise ValueError(f"loss_type: {loss_type}: combining several losses is not supported yet; give one{hint}")
