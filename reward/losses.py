"""Bradley–Terry reward-model loss and held-out metrics, as pure tensor functions.

Under the Bradley–Terry model, P(chosen ≻ rejected) = sigmoid(r_c - r_r). Training
minimises the negative log of that probability; an optional per-pair margin m asks
the chosen side to win by at least m (Llama-2 style: sigmoid(r_c - r_r - m)), and an
optional centering term coef * mean((r_c + r_r)^2) keeps rewards near zero, since
the loss alone is blind to a constant offset (Eisenstein et al., 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Mean Bradley–Terry loss over pairs.

    Args:
        chosen, rejected: (B,) scalar rewards of the two sides of each pair.
        margin: optional (B,) margin each pair must be won by (0 = plain Bradley–Terry).
        center_coef: weight of mean((chosen + rejected)^2), which pulls the reward mean to 0.
    Returns:
        scalar: mean(-logsigmoid(chosen - rejected - margin)) + center_coef * mean((chosen + rejected)^2)
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must both be (B,), got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    diff = chosen.float() - rejected.float()
    if margin is not None:
        if margin.shape != diff.shape:
            raise ValueError(f"margin must be (B,) like the rewards, got {tuple(margin.shape)}")
        diff = diff - margin.to(diff)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * (chosen.float() + rejected.float()).pow(2).mean()
    return loss


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (chosen scored higher; ties count half) and the mean margin r_c - r_r over (B,) rewards."""
    diff = (chosen.float() - rejected.float()).detach()
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    return {"accuracy": wins.mean().item(), "margin": diff.mean().item(),
            "reward_mean": torch.cat([chosen, rejected]).float().mean().item()}


DEFAULT_BUCKETS = (0.0, 0.5, 1.0, 2.0, 4.0)


def calibration(chosen: torch.Tensor, rejected: torch.Tensor,
                edges: tuple[float, ...] = DEFAULT_BUCKETS) -> list[dict]:
    """Accuracy by |margin| bucket, next to the accuracy the model claims.

    A pair with |r_c - r_r| = d is predicted right with probability sigmoid(d) under
    Bradley–Terry. For each bucket [edges[i], edges[i+1]) (the last one open-ended: high None) this
    returns {"low", "high", "count", "accuracy", "predicted"}; a calibrated model has
    accuracy ≈ predicted in every bucket. Empty buckets are left out.
    """
    diff = (chosen.float() - rejected.float()).detach()
    size = diff.abs()
    out = []
    for i, low in enumerate(edges):
        high = edges[i + 1] if i + 1 < len(edges) else None
        inside = (size >= low) & (size < (math.inf if high is None else high))
        n = int(inside.sum())
        if n == 0:
            continue
        d = diff[inside]
        acc = ((d > 0).float() + 0.5 * (d == 0).float()).mean().item()
        out.append({"low": low, "high": high, "count": n, "accuracy": acc,
                    "predicted": torch.sigmoid(d.abs()).mean().item()})
    return out


def expected_calibration_error(buckets: list[dict]) -> float:
    """Count-weighted mean |accuracy - predicted| over the buckets of `calibration`."""
    total = sum(b["count"] for b in buckets)
    if total == 0:
        return float("nan")
    return sum(b["count"] * abs(b["accuracy"] - b["predicted"]) for b in buckets) / total
