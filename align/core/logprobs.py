"""Per-token log-probabilities without materialising full-vocabulary logits for every position.

Only completion positions need logits. We run the decoder once, gather the hidden
states at the positions that are scored, and push them through lm_head in
chunks. Under autograd, a frozen lm_head's chunk keeps d logp / d logits, made in forward
(_FrozenHeadLogprobs); a trainable one's is checkpointed, so the (chunk x vocab) logits are
rebuilt in backward instead of being kept for the whole batch.

Going around the model's `forward` skips what some families do to the logits there:
Cohere multiplies by `logit_scale`, Granite divides by `logits_scaling`, Gemma-2/3 cap them
with `final_logit_softcapping`. `logit_transform` reads those from the config and the chunks
apply them exactly once, as `forward` would; paths that call `forward` (generation) already
get them from transformers and must not apply them again.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from align.core.fsdp import full_tensor

# model_type -> (config field, "mul" | "div"): how each family's forward scales lm_head's output.
LOGIT_SCALES = {
    **{t: ("logit_scale", "mul") for t in ("cohere", "cohere2", "cohere2_moe")},
    **{t: ("logits_scaling", "div") for t in ("granite", "granite_swa", "granitemoe", "granitemoe_swa",
                                              "granitemoeshared", "granitemoehybrid", "minicpm3")},
    "hyperclovax": ("logits_scaling", "mul"),
    "falcon_h1": ("lm_head_multiplier", "mul"),
}
SCALE_FIELDS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) that the model's own forward applies to lm_head's output: logits * scale,
    then softcap * tanh(logits / softcap) when softcap is set."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "")
    scale = 1.0
    if model_type in LOGIT_SCALES:
        field, how = LOGIT_SCALES[model_type]
        value = float(getattr(text, field, 1.0) or 1.0)
        scale = value if how == "mul" else 1.0 / value
    else:
        unknown = [f for f in SCALE_FIELDS if getattr(text, f, None) not in (None, 1, 1.0)]
        if unknown:
            raise NotImplementedError(f"model_type {model_type!r} sets {unknown[0]}: align does not know how its "
                                      f"forward applies it to the logits, so its log-probs would be wrong")
    softcap = getattr(text, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    with_entropy: bool, scale: float = 1.0, softcap: float | None = None,
                    with_sum_sq: bool = False) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight)
    if scale != 1.0:  # in the model's dtype, as its forward does
        logits = logits * scale
    logits = logits.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logz
    if not with_entropy and not with_sum_sq:
        return logp
    columns = [logp]
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        columns.append(logz - (probs * logits).sum(-1))
    if with_sum_sq:  # log Σ_v p_v² (WPO's weights): from the logits this chunk holds anyway; no gradient
        columns.append((torch.logsumexp(2 * logits, dim=-1) - 2 * logz).detach())
    return torch.stack(columns, dim=-1)


class _FrozenHeadLogprobs(torch.autograd.Function):
    """_chunk_logprobs' log-probs (no entropy) for a frozen lm_head, with d logp / d logits made in forward.

    d logp / d logits = onehot(y) - softmax(logits) is known once the forward has the logits, so
    forward keeps it (in the logits' own buffer) and backward multiplies it through lm_head: one
    vocabulary-sized matmul and one logsumexp fewer than checkpointing the chunk, which rebuilt the
    logits in backward. Backward scales it by the incoming gradient before the matmul, in
    autograd's order, so gradients match log_softmax's to float32 rounding.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, softcap):
        logits = torch.nn.functional.linear(hidden, weight)
        if scale != 1.0:  # in the model's dtype, as its forward does
            logits = logits * scale
        logits = logits.float()
        slope = None
        if softcap is not None:
            logits = torch.tanh(logits / softcap)
            slope = 1 - logits * logits  # d(softcap * tanh(z / softcap)) / dz
            logits = logits * softcap
        logz = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logz
        grad = logits.sub_(logz.unsqueeze(-1)).exp_().neg_()  # -softmax, in the logits' buffer
        at_label = torch.ones_like(logp)  # d logp / d logit_y = 1 - softmax_y: the 1, added in backward
        if slope is not None:
            grad.mul_(slope)
            at_label = at_label * slope.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        if scale != 1.0:
            grad.mul_(scale)
            at_label = at_label * scale
        ctx.save_for_backward(grad, at_label, labels, weight)
        ctx.hidden_dtype = hidden.dtype
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        neg_softmax, at_label, labels, weight = ctx.saved_tensors
        d_logits = grad_logp.unsqueeze(-1) * neg_softmax
        d_logits.scatter_add_(-1, labels.unsqueeze(-1), (grad_logp * at_label).unsqueeze(-1))
        return (d_logits.to(weight.dtype) @ weight).to(ctx.hidden_dtype), None, None, None, None


def gather_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                    chunk_size: int = 512, with_entropy: bool = False,
                    transform: tuple[float, float | None] = (1.0, None), with_sum_sq: bool = False) -> torch.Tensor:
    """log p(labels | hidden) for flat `hidden` (N, H) and `labels` (N,).

    `transform`: (scale, softcap) of the logits, from `logit_transform(model.config)`.
    Returns (N,), or (N, 1 + k) holding (logprob, [entropy], [log Σ_v p_v²]) when asked for k of them.
    """
    if getattr(lm_head, "bias", None) is not None:
        raise NotImplementedError("lm_head with a bias is not supported")
    weight = full_tensor(lm_head.weight)  # sharded under FSDP, and no forward of lm_head gathers it for us
    outs = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad and not (with_entropy or with_sum_sq or weight.requires_grad):
            outs.append(_FrozenHeadLogprobs.apply(h, weight, y, *transform))
        elif torch.is_grad_enabled() and h.requires_grad:
            outs.append(checkpoint(_chunk_logprobs, h, weight, y, with_entropy, *transform, with_sum_sq,
                                   use_reentrant=False))
        else:
            outs.append(_chunk_logprobs(h, weight, y, with_entropy, *transform, with_sum_sq))
    if not outs:
        extra = int(with_entropy) + int(with_sum_sq)
        return hidden.new_zeros((0, 1 + extra) if extra else (0,), dtype=torch.float32)
    return torch.cat(outs)


def completion_logprobs(base, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, with_entropy: bool = False,
                        chunk_size: int = 512, with_sum_sq: bool = False, padding_free: bool = False):
    """Per-token log-probs of the completion tokens under the active adapter of `base`.

    Args:
        base: an `align.core.base.SharedBase` (the active adapter, or none inside `reference()`).
        input_ids, attention_mask: (B, T) prompt + completion, left or right padded.
        completion_mask: (B, T) 1 on completion tokens that are scored.
        padding_free: run the rows as one packed row without padding (align/core/packing.py); same values.
    Returns:
        logprobs (B, T-1) float32 aligned with `input_ids[:, 1:]`, zero where not scored;
        with `with_entropy`, also entropy (B, T-1) of the full next-token distribution; with `with_sum_sq`,
        also log Σ_v p_v² (B, T-1) of it (no gradient), after the entropy when both are asked.
    """
    hidden = base.hidden(input_ids, attention_mask, padding_free)[:, :-1]
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()
    transform = logit_transform(base.model.config)
    picked = gather_logprobs(hidden[mask], base.lm_head, labels[mask], chunk_size, with_entropy, transform,
                             with_sum_sq)
    shape = labels.shape
    if with_entropy or with_sum_sq:
        return tuple(picked.new_zeros(shape).masked_scatter(mask, picked[:, i]) for i in range(picked.shape[1]))
    return picked.new_zeros(shape).masked_scatter(mask, picked)


def shared_prompt_logprobs(base, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                           completion_mask: torch.Tensor, with_entropy: bool = False, chunk_size: int = 512):
    """`completion_logprobs` for rows that repeat prompts (GRPO's groups), each distinct prompt run once.

    input_ids, attention_mask: (B, P + T), prompts left-padded to P = `prompt_width`, completions
    right-padded to T; completion_mask (B, T). The distinct prompts go through the decoder once, and every
    row's completion attends to its prompt's keys/values (a cache, gradients flowing back into it): the
    same function as one forward over each whole row, with 1 prompt pass per group of G rows instead of G.
    Returns log-probs (B, T) of input_ids[:, P:] (and entropy (B, T) with `with_entropy`), zero where not scored.
    """
    P = prompt_width
    # Rows with equal prompt ids and mask share one prefix (left padding makes equal prompts equal tensors).
    key = torch.cat([input_ids[:, :P], attention_mask[:, :P]], dim=1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    prompt_ids, prompt_mask = unique[:, :P], unique[:, P:]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    prefix = base.decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                          position_ids=(prompt_mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=True)
    cache = prefix.past_key_values
    cache.batch_select_indices(inverse)  # each row's copy of its prompt's keys/values (indexing: gradients sum back)
    rest = base.decoder(input_ids=input_ids[:, P:], attention_mask=attention_mask, position_ids=positions[:, P:],
                        past_key_values=cache, use_cache=True).last_hidden_state
    # Token t of the completion is predicted from position P - 1 + t: the prompt's last, then the completion's.
    hidden = torch.cat([prefix.last_hidden_state[inverse, P - 1:P], rest[:, :-1]], dim=1)
    labels, mask = input_ids[:, P:], completion_mask.bool()
    picked = gather_logprobs(hidden[mask], base.lm_head, labels[mask], chunk_size, with_entropy,
                             logit_transform(base.model.config))
    if with_entropy:
        return tuple(picked.new_zeros(labels.shape).masked_scatter(mask, picked[:, i]) for i in range(2))
    return picked.new_zeros(labels.shape).masked_scatter(mask, picked)


def can_share_prompts(base) -> bool:
    """Whether `shared_prompt_logprobs` applies: the decoder keeps a cache in this mode (gradient
    checkpointing in training drops it) and the model is not sharded across processes."""
    model = base._plain_model()
    return not (model.training and getattr(model, "is_gradient_checkpointing", False)) and not base.sharded
