"""KTO-family losses (TRL 1.16's KTOTrainer) as pure tensor functions.

Inputs are per-example sequence log-probabilities (sums over completion tokens), shape (B,), of the
policy and the reference, and a boolean `labels` (True: desirable). With r = π - ref, the log-ratio:

  kto               (Ethayarajh et al. 2024, eq. 7):  desirable   1 - σ(β(r - z))
                                                      undesirable 1 - σ(β(z - r))
  apo_zero_unpaired (D'Oosterlinck et al. 2024):      desirable   1 - σ(βr)
                                                      undesirable σ(βr)

z is the KL reference point: the mean of π - ref over mismatched (prompt, completion) pairs of the batch,
detached and clamped at 0 (`kl_estimate`). Desirable losses are weighed by desirable_weight, undesirable
ones by undesirable_weight; the batch loss is the mean over all examples (`losses.nanmean()`).
The implicit rewards are β·r, as TRL logs them.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kl_estimate(policy_kl: torch.Tensor, ref_kl: torch.Tensor, across=None) -> torch.Tensor:
    """z = max(0, mean(π - ref)) over the mismatched pairs, without gradient. `across(tensor) -> tensor`
    averages the mean over processes first (TRL gathers it before clamping); None: one process."""
    kl = (policy_kl - ref_kl).mean().detach()
    if across is not None:
        kl = across(kl)
    return kl.clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             loss_type: str = "kto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, desirable rewards, undesirable rewards): losses are the desirable examples' then the
    undesirable ones' (weighted), as TRL concatenates them; rewards are β·(π - ref), detached."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    labels = labels.to(device=policy_logps.device, dtype=torch.bool)
    chosen = policy_logps[labels] - ref_logps[labels].to(policy_logps)
    rejected = policy_logps[~labels] - ref_logps[~labels].to(policy_logps)
    kl = kl.to(policy_logps)
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen)
        rejected_losses = torch.sigmoid(beta * rejected)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, beta * chosen.detach(), beta * rejected.detach()
