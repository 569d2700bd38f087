"""PPO/GRPO/RLOO math against values worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from align.recipes.ppo import algorithms as A
from align.recipes.ppo.grpo_losses import group_advantages

TOL = 1e-5


def close(x, expected):
    x = torch.as_tensor(x, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert x.shape == expected.shape, (x.shape, expected.shape)
    assert torch.allclose(x, expected, atol=TOL, rtol=0), (x, expected)


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [5.0, 99.0, 99.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # mean of 1, 2, 3, 5 = 11/4 = 2.75; padded 99s ignored
    close(A.masked_mean(x, m), 2.75)
    # deviations -1.75, -0.75, 0.25, 2.25; squares 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75; /3 = 2.916667
    close(A.masked_var(x, m), 8.75 / 3)
    std = math.sqrt(8.75 / 3)  # 1.707825
    close(A.masked_whiten(x, m, eps=0.0),
          [[-1.75 / std, -0.75 / std, 0.25 / std], [2.25 / std, 0.0, 0.0]])
    # shift_mean=False adds the mean 2.75 back on real tokens only
    close(A.masked_whiten(x, m, shift_mean=False, eps=0.0),
          [[-1.75 / std + 2.75, -0.75 / std + 2.75, 0.25 / std + 2.75], [2.25 / std + 2.75, 0.0, 0.0]])


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    # k1 = logp - ref = 0.5, -1.0
    close(A.kl_penalty(logp, ref, "k1"), [0.5, -1.0])
    # k3 = exp(ref - logp) - 1 - (ref - logp): exp(-0.5) - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307
    #                                          exp(1.0) - 1 - 1.0 = 2.7182818 - 2 = 0.7182818
    close(A.kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2.0])
    # identical distributions: both estimators are exactly 0
    assert A.kl_penalty(logp, logp, "k3").abs().max().item() == 0.0
    with pytest.raises(ValueError, match="k2"):
        A.kl_penalty(logp, ref, "k2")


def test_token_rewards_put_score_on_last_real_token():
    scores = torch.tensor([1.0, 0.5])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # coef 0.5: row 0 = -0.05, -0.1, -0.15 + 1.0 = 0.85; row 1 = -0.2 + 0.5 = 0.3, padding 0
    close(A.token_rewards(scores, kl, mask, 0.5), [[-0.05, -0.1, 0.85], [0.3, 0.0, 0.0]])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    # delta_2 = 1.0 + 0.9*0 - 0.7 = 0.3                 A_2 = 0.3
    # delta_1 = 0 + 0.9*0.7 - 0.6 = 0.03                A_1 = 0.03 + 0.72*0.3 = 0.246
    # delta_0 = 0 + 0.9*0.6 - 0.5 = 0.04                A_0 = 0.04 + 0.72*0.246 = 0.21712
    adv, ret = A.gae_advantages(rewards, values, mask, gamma, lam)
    close(adv, [[0.21712, 0.246, 0.3]])
    # returns = A + V = 0.71712, 0.846, 1.0
    close(ret, [[0.71712, 0.846, 1.0]])


def test_gae_padding_ends_the_episode():
    rewards = torch.tensor([[0.0, 2.0, 5.0]])
    values = torch.tensor([[1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # last real token t=1: delta_1 = 2 + 1.0*0 - 1 = 1            A_1 = 1
    # delta_0 = 0 + 1.0*1 - 1 = 0                                  A_0 = 0 + 1.0*0.5*1 = 0.5
    adv, ret = A.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.5, 1.0, 0.0]])
    close(ret, [[1.5, 2.0, 0.0]])


def test_gae_two_ways_agree_and_ignore_masked_values():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 9, generator=g)
    values = torch.randn(5, 9, generator=g)
    lengths = torch.tensor([9, 1, 4, 7, 2])
    mask = (torch.arange(9).unsqueeze(0) < lengths.unsqueeze(1)).float()
    adv, ret = A.gae_advantages(rewards, values, mask, 0.97, 0.9)
    adv2, ret2 = A.gae_advantages_closed_form(rewards, values, mask, 0.97, 0.9)
    close(adv, adv2)
    close(ret, ret2)
    # whatever sits in the padded positions must not change anything
    noisy = torch.where(mask.bool(), values, 100 * torch.randn(5, 9, generator=g))
    noisy_r = torch.where(mask.bool(), rewards, 100 * torch.randn(5, 9, generator=g))
    adv3, ret3 = A.gae_advantages(noisy_r, noisy, mask, 0.97, 0.9)
    assert torch.equal(adv3, adv) and torch.equal(ret3, ret)
    # gamma = lam = 1, zero values: the advantage is the sum of the rewards still to come
    adv4, _ = A.gae_advantages(rewards, torch.zeros_like(values), mask, 1.0, 1.0)
    close(adv4, (rewards * mask).flip(1).cumsum(1).flip(1) * mask)


def test_rloo_advantages_by_hand_and_loop():
    scores = torch.tensor([1.0, 0.0, 0.5, 3.0, 1.0, 2.0])
    # group (1, 0, 0.5): baselines (0+0.5)/2 = 0.25, (1+0.5)/2 = 0.75, (1+0)/2 = 0.5
    #   advantages 0.75, -0.75, 0.0
    # group (3, 1, 2): baselines 1.5, 2.5, 2.0 -> 1.5, -1.5, 0.0
    adv = A.rloo_advantages(scores, 3)
    close(adv, [0.75, -0.75, 0.0, 1.5, -1.5, 0.0])
    # two ways agree: rloo = k/(k-1) * (r - group mean)
    close(adv, 3 / 2 * group_advantages(scores, 3, "none")[0])
    with pytest.raises(ValueError, match="at least 2"):
        A.rloo_advantages(scores, 1)


def test_value_clipping_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.55]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    # clip 0.2: clipped values 0.7, 0.3, 0.55
    # token 0: (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69 (clipped bigger)
    # token 1: (0-0)^2 = 0, (0.3-0)^2 = 0.09 -> 0.09 (clipped bigger)
    # token 2: (0.55-1)^2 = 0.2025 both -> 0.2025
    # loss = 0.5 * (1.69 + 0.09 + 0.2025)/3 = 0.5 * 0.660833 = 0.3304167; clip fraction 2/3
    loss, frac = A.value_loss(values, old, returns, mask, 0.2)
    close(loss, 0.5 * (1.69 + 0.09 + 0.2025) / 3)
    close(frac, 2 / 3)
    # no clipping: 0.5 * (1 + 0 + 0.2025)/3
    loss, _ = A.value_loss(values, old, returns, mask, None)
    close(loss, 0.5 * 1.2025 / 3)


def test_explained_variance_and_kl_controller():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    # perfect values explain everything; constant values (=mean) explain nothing
    close(A.explained_variance(returns, returns, mask), 1.0)
    close(A.explained_variance(torch.full_like(returns, 2.5), returns, mask), 0.0)
    # values 1,2,3,3: residuals 0,0,0,1: var = (3*0.0625 + 0.5625)/3 = 0.25; Var(R) = 5/3; 1 - 0.15 = 0.85
    close(A.explained_variance(torch.tensor([[1.0, 2.0, 3.0, 3.0]]), returns, mask), 0.85)
    # kl twice the target: error clipped to 0.2; 0.1 * (1 + 0.2 * 8 / 100) = 0.1016
    close(A.adaptive_kl_coef(0.1, 2.0, 1.0, 100, 8), 0.1016)
    # kl at 0.9 of target: error -0.1; 0.1 * (1 - 0.1 * 10 / 100) = 0.099
    close(A.adaptive_kl_coef(0.1, 0.9, 1.0, 100, 10), 0.099)
