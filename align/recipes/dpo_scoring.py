"""A DPO batch's sequence log-probs, with LD-DPO's length split and WPO's weights, from completion tokens only.

Our scoring (align.core.logprobs.completion_logprobs) runs the decoder once and builds logits only at
completion positions, in chunks. What TRL's ld_alpha and use_weighting need is taken from
that same pass, at no extra forward and no full-sequence logits:

- LD-DPO (ld_alpha, Liu et al. 2024): per-token log-probs are already there; the first min(|y_c|, |y_r|)
  completion tokens of each row are "shared", the rest its "tail", and a row's log-prob is
  Σ shared + α·Σ tail (TRL's two sums, in its order). The reference is scored the same way.
- WPO (use_weighting, Zhou et al. 2024): a row's weight is exp(mean over its completion tokens of
  log p(y_t) - log Σ_v p_v²). log Σ_v p_v² comes from the logits each chunk already holds (one more
  logsumexp over the chunk's vocabulary), detached as TRL's is; a pair's weight is w_chosen · w_rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.core.logprobs import completion_logprobs


@dataclass
class PairScores:
    chosen: torch.Tensor  # (B,) summed completion log-probs (LD-weighted with ld_alpha)
    rejected: torch.Tensor
    chosen_raw: torch.Tensor  # (B,) plain sums (sft / rpo NLL, TRL's per-token log-probs)
    weights: torch.Tensor | None  # (B,) WPO pair weights, no gradient; None without use_weighting


def length_split(shift_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared, tail) masks (2B, T-1) of a [chosen; rejected] batch's scored tokens (TRL's LD-DPO split)."""
    position = shift_mask.cumsum(dim=1)
    lengths = shift_mask.sum(dim=1).long()
    chosen, rejected = lengths.chunk(2, dim=0)
    shared = torch.minimum(chosen, rejected)
    shared = torch.cat([shared, shared], dim=0).unsqueeze(1)
    return (position > 0) & (position <= shared), position > shared


def row_sums(per_token: torch.Tensor, shift_mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Each row's completion log-prob: the sum, or Σ shared + ld_alpha · Σ tail."""
    if ld_alpha is None:
        return per_token.sum(dim=1)
    shared, tail = length_split(shift_mask)
    return (per_token * shared).sum(dim=1) + ld_alpha * (per_token * tail).sum(dim=1)


def wpo_weights(per_token: torch.Tensor, log_sum_sq: torch.Tensor, shift_mask: torch.Tensor) -> torch.Tensor:
    """WPO's pair weights (B,) from a [chosen; rejected] batch (Zhou et al. 2024, Eq. 2, as TRL computes it)."""
    with torch.no_grad():
        aligned = (per_token - log_sum_sq) * shift_mask
        weights = torch.exp(aligned.sum(dim=1) / shift_mask.sum(dim=1).clamp_min(1))
    chosen, rejected = weights.chunk(2, dim=0)
    return chosen * rejected


def score_pairs(base, batch: dict, ld_alpha: float | None = None, with_weights: bool = False,
                padding_free: bool = False) -> PairScores:
    """Score a collated pair batch (align.data.preference.collate_pairs) under `base`'s active adapter;
    `padding_free`: its 2B sequences forwarded as one packed row."""
    shift_mask = batch["completion_mask"][:, 1:]
    out = completion_logprobs(base, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                              with_sum_sq=with_weights, padding_free=padding_free)
    per_token, log_sum_sq = out if with_weights else (out, None)
    sums = row_sums(per_token, shift_mask, ld_alpha)
    raw = sums if ld_alpha is None else per_token.sum(dim=1)
    half = sums.shape[0] // 2
    weights = wpo_weights(per_token, log_sum_sq, shift_mask) if with_weights else None
    return PairScores(sums[:half], sums[half:], raw[:half], weights)
