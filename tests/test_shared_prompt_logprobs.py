"""`shared_prompt_logprobs` (each distinct prompt through the decoder once, its keys/values shared by the
rows that repeat it) against `completion_logprobs` (one forward over every whole row): the same
log-probs, entropy and adapter gradients, on real tiny models with a trained-looking LoRA adapter.
In float32 the two differ by summation order only (~5e-5 on these gradients); in float64 they agree to ~1e-6."""

from __future__ import annotations

import pytest
import torch

from align.core.base import SharedBase
from align.core.logprobs import can_share_prompts, completion_logprobs, shared_prompt_logprobs
from align.core.lora import LoraSettings


def _batch(vocab: int, pad: int):
    """3 prompts (lengths 5, 3, 7) x 3 completions each (lengths 1..4), packed as align.recipes.ppo.batch does:
    prompts left-padded to P = 7, completions right-padded to T = 4; rows in a shuffled order."""
    g = torch.Generator().manual_seed(0)
    P, T = 7, 4
    rows = []
    for p_len in (5, 3, 7):
        prompt = torch.randint(3, vocab, (p_len,), generator=g)
        for c_len in (4, 1, 3):
            rows.append((prompt, torch.randint(3, vocab, (c_len,), generator=g)))
    order = torch.randperm(len(rows), generator=g).tolist()
    ids = torch.full((len(rows), P + T), pad)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(len(rows), T)
    for i, j in enumerate(order):
        p, c = rows[j]
        ids[i, P - len(p):P], ids[i, P:P + len(c)] = p, c
        attn[i, P - len(p):P + len(c)] = 1
        mask[i, :len(c)] = 1
    return ids, attn, mask, P


def _nonzero_adapter(base):
    base.add_adapter("policy", LoraSettings(rank=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.adapter_parameters("policy").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # B != 0: the adapter changes the prompt's keys/values
    base.set_active("policy")


# (architecture, decoder dtype, tolerance): MoE experts run on grouped-mm kernels that take no float64.
@pytest.mark.parametrize("arch,dtype,tol", [("llama", torch.float64, 1e-6), ("llama", torch.float32, 1e-4),
                                            ("qwen3_moe", torch.float32, 1e-4), ("mixtral", torch.float32, 1e-4)])
def test_shared_prompts_equal_whole_rows(tiny_models, arch, dtype, tol):
    base = SharedBase.load(str(tiny_models[arch]), "float32", "cpu")
    _nonzero_adapter(base)
    base.model.to(dtype)  # float64: what is left of a difference is lm_head's float32 log-softmax
    base.model.train()
    assert can_share_prompts(base)
    vocab = base.model.config.vocab_size
    ids, attn, mask, P = _batch(vocab, base.tokenizer.pad_token_id)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    params = list(base.adapter_parameters("policy").values())
    results = []
    for shared in (False, True):
        if shared:
            logp, ent = shared_prompt_logprobs(base, ids, attn, P, mask, with_entropy=True)
        else:
            cmask = torch.zeros_like(ids)
            cmask[:, P:] = mask.long()
            logp, ent = (x[:, P - 1:] for x in completion_logprobs(base, ids, attn, cmask, with_entropy=True))
        grads = torch.autograd.grad((logp * weights).sum() + (ent * mask).sum(), params)
        results.append((logp.detach(), ent.detach(), grads))
    (logp_a, ent_a, grads_a), (logp_b, ent_b, grads_b) = results
    assert logp_a.shape == logp_b.shape == mask.shape
    assert (logp_b[mask == 0] == 0).all() and (logp_a[mask == 1] < 0).all()
    torch.testing.assert_close(logp_b, logp_a, rtol=0, atol=tol)
    torch.testing.assert_close(ent_b, ent_a, rtol=0, atol=tol)
    assert max(g.abs().max().item() for g in grads_a) > 1e-3  # the gradients compared are not all ~0
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, rtol=10 * tol, atol=tol)


def test_gradient_checkpointing_has_no_cache(tiny_llama):
    """Checkpointed decoder layers drop the cache in training: the shared path must not be taken then."""
    base = SharedBase.load(str(tiny_llama), "float32", "cpu", gradient_checkpointing=True)
    base.add_adapter("policy")
    base.model.train()
    assert not can_share_prompts(base)
    base.model.eval()
    assert can_share_prompts(base)
