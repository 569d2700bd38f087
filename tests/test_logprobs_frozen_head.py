"""Gradients of align.core.logprobs.gather_logprobs through a frozen lm_head (made in forward) equal autograd's
through log_softmax of the full logits, with and without a logit scale and a softcap; a trainable lm_head
still gets its own gradient (the checkpointed path)."""

from __future__ import annotations

import pytest
import torch

from align.core.logprobs import gather_logprobs


def _plain(hidden, weight, labels, scale, softcap):
    logits = (hidden @ weight.t() * scale).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.25, None), (1.0, 3.0), (2.0, 3.0)])
def test_frozen_head_gradient_equals_autograd(dtype, tol, scale, softcap):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 53, bias=False).to(dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.mul_(8.0)  # logits wide enough that the softmax, scale and cap all matter
    hidden = torch.randn(11, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 53, (11,))
    upstream = torch.randn(11)  # a loss that weighs each token differently
    ours = gather_logprobs(hidden, head, labels, chunk_size=4, transform=(scale, softcap))
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), hidden)
    want = _plain(hidden, head.weight, labels, scale, softcap)
    (g_want,) = torch.autograd.grad((want * upstream).sum(), hidden)
    assert ours.dtype == torch.float32 and g_ours.dtype == dtype
    assert torch.allclose(ours, want, atol=tol, rtol=tol), (ours - want).abs().max()
    assert g_want.abs().max() > 0.1  # the test must be able to fail
    assert torch.allclose(g_ours.float(), g_want.float(), atol=tol, rtol=tol), (g_ours - g_want).abs().max()


def test_trainable_head_still_gets_its_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 53, bias=False)
    hidden = torch.randn(7, 16, requires_grad=True)
    labels = torch.randint(0, 53, (7,))
    g_head, g_hidden = torch.autograd.grad(gather_logprobs(hidden, head, labels, chunk_size=3).sum(),
                                           [head.weight, hidden])
    want_head, want_hidden = torch.autograd.grad(_plain(hidden, head.weight, labels, 1.0, None).sum(),
                                                 [head.weight, hidden])
    assert torch.allclose(g_head, want_head, atol=1e-5) and torch.allclose(g_hidden, want_hidden, atol=1e-5)
