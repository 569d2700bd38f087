"""Per-token log-probabilities without materialising full-vocabulary logits for every position.

Only completion positions need logits. We run the decoder once, gather the hidden
states at the positions that are scored, and push them through lm_head in
chunks. Under autograd each chunk is checkpointed, so the (chunk x vocab) logits
are rebuilt in backward instead of being kept for the whole batch.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    with_entropy: bool) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight).float()
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logz
    if not with_entropy:
        return logp
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)
    return torch.stack([logp, entropy], dim=-1)


def gather_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                    chunk_size: int = 512, with_entropy: bool = False) -> torch.Tensor:
    """log p(labels | hidden) for flat `hidden` (N, H) and `labels` (N,).

    Returns (N,), or (N, 2) holding (logprob, entropy) when `with_entropy`.
    """
    if getattr(lm_head, "bias", None) is not None:
        raise NotImplementedError("lm_head with a bias is not supported")
    weight = lm_head.weight
    outs = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            outs.append(checkpoint(_chunk_logprobs, h, weight, y, with_entropy, use_reentrant=False))
        else:
            outs.append(_chunk_logprobs(h, weight, y, with_entropy))
    if not outs:
        return hidden.new_zeros((0, 2) if with_entropy else (0,), dtype=torch.float32)
    return torch.cat(outs)


def completion_logprobs(base, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, with_entropy: bool = False,
                        chunk_size: int = 512):
    """Per-token log-probs of the completion tokens under the active adapter of `base`.

    Args:
        base: an `align.model.SharedBase` (the active adapter, or none inside `reference()`).
        input_ids, attention_mask: (B, T) prompt + completion, left or right padded.
        completion_mask: (B, T) 1 on completion tokens that are scored.
    Returns:
        logprobs (B, T-1) float32 aligned with `input_ids[:, 1:]`, zero where not scored;
        with `with_entropy`, also entropy (B, T-1) of the full next-token distribution.
    """
    hidden = base.hidden(input_ids, attention_mask)[:, :-1]
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()
    picked = gather_logprobs(hidden[mask], base.lm_head, labels[mask], chunk_size, with_entropy)
    shape = labels.shape
    if with_entropy:
        logp = picked.new_zeros(shape).masked_scatter(mask, picked[:, 0])
        ent = picked.new_zeros(shape).masked_scatter(mask, picked[:, 1])
        return logp, ent
    return picked.new_zeros(shape).masked_scatter(mask, picked)
