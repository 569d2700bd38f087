"""GRPO-family losses: values computed by hand, then equality with TRL 1.16's own code.

TRL is run for real: a GRPOTrainer on the tiny Llama with a random (non-zero) LoRA adapter; its
`_compute_loss` scores the same completions as ours, and the reward -> advantage and sampler
correction blocks of `_generate_and_score_completions` are executed from TRL's installed source.
"""

from __future__ import annotations

import inspect
import math
import textwrap
import warnings

import pytest
import torch

from align.recipes.ppo.grpo_losses import (GRPOArgumentError, group_advantages, grpo_loss, sampler_correction,
                                           weighted_rewards)

L = math.log
SEED = 1234


# -- by hand -------------------------------------------------------------------------------------
def test_weighted_rewards_nansum_and_all_none_row():
    rpf = torch.tensor([[1.0, math.nan], [math.nan, math.nan], [2.0, 3.0]])
    out = weighted_rewards(rpf, torch.tensor([1.0, 0.5]))
    # row 0: 1*1 (None skipped); row 1: every function None -> NaN (unscorable); row 2: 2 + 0.5*3
    assert out[0].item() == 1.0 and math.isnan(out[1].item()) and out[2].item() == 3.5


def test_group_batch_none_scaling_by_hand():
    r = torch.tensor([1.0, 3.0, 0.0, 2.0])  # groups of 2: means 2 and 1, Bessel std sqrt(2) each
    adv, std, zero = group_advantages(r, 2, "group")
    torch.testing.assert_close(adv, torch.tensor([-1, 1, -1, 1]) / (math.sqrt(2) + 1e-4))
    torch.testing.assert_close(std, torch.full((4,), math.sqrt(2)))
    # batch std: mean 1.5, squares .25+2.25+2.25+.25 = 5, /3 -> sqrt(5/3); the baseline stays the group mean
    adv, std, _ = group_advantages(r, 2, "batch")
    torch.testing.assert_close(adv, torch.tensor([-1, 1, -1, 1]) / (math.sqrt(5 / 3) + 1e-4))
    adv, std, zero = group_advantages(r, 2, "none")  # Dr. GRPO: no division; std still the group's
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1, -1, 1]))
    torch.testing.assert_close(std, torch.full((4,), math.sqrt(2)))
    # TRL's config spellings: True is "group", False is "none"
    torch.testing.assert_close(group_advantages(r, 2, True)[0], group_advantages(r, 2, "group")[0])
    torch.testing.assert_close(group_advantages(r, 2, False)[0], torch.tensor([-1.0, 1, -1, 1]))


def test_nan_rows_zero_std_and_lonely_reward():
    r = torch.tensor([1.0, math.nan, 3.0, 4.0, 4.0, 4.0, math.nan, math.nan, 2.0])
    adv, std, zero = group_advantages(r, 3, "group")
    # group 1 without its NaN: mean 2, std sqrt(2); the NaN row gets 0
    s = math.sqrt(2) + 1e-4
    torch.testing.assert_close(adv[:3], torch.tensor([-1 / s, 0.0, 1 / s]))
    # group 2: all equal -> std 0 -> advantage 0 and is_std_zero
    assert adv[3:6].tolist() == [0.0, 0.0, 0.0] and zero[3:6].all()
    # group 3: one reward -> std NaN (as TRL's nanstd) -> advantage 0, not counted as zero std
    assert adv[6:].tolist() == [0.0, 0.0, 0.0] and math.isnan(std[8].item()) and not zero[6:].any()


OLD = torch.zeros(1, 3)
SAMPLER = torch.tensor([[-1.0, 0.5, 0.0]])  # log-ratio old - sampler: [1, -0.5, 0 (masked)]
MASK = torch.tensor([[1.0, 1.0, 0.0]])


@pytest.mark.parametrize("mode,cap_min,cap_max,expected", [
    ("token_truncate", 0.7, 2.0, [[2.0, 0.7, 1.0]]),           # e^1 -> 2, e^-.5 = .607 -> .7, masked -> e^0
    ("token_mask", 0.7, 2.0, [[0.0, 0.0, 1.0]]),               # both outside [0.7, 2] -> 0
    ("token_mask", None, 3.0, [[math.e, math.exp(-0.5), 1.0]]),
    ("sequence_truncate", None, 1.5, [[1.5]]),                 # e^(1 - .5) = 1.6487 -> 1.5
    ("sequence_mask", None, 1.5, [[0.0]]),
    ("sequence_mask", None, 3.0, [[math.exp(0.5)]]),
])
def test_sampler_correction_by_hand(mode, cap_min, cap_max, expected):
    torch.testing.assert_close(sampler_correction(OLD, SAMPLER, MASK, mode, cap_min, cap_max), torch.tensor(expected))


def test_sampler_nan_logprob_means_no_correction():
    out = sampler_correction(OLD, torch.tensor([[math.nan, 0.0, 0.0]]), MASK, "token_truncate", None, 3.0)
    assert out.tolist() == [[1.0, 1.0, 1.0]]


# Two sequences, three tokens; the second's last token is padding. Ratios r: [1.5, 0.5, 1] and
# [1.1, 0.7, 1]; advantages +1 and -1; ε_low 0.2, ε_high 0.3 (clip range [0.8, 1.3]).
#   row 0 (A=+1): -min(r, clip(r)) = [-1.3 (high-clipped), -0.5, -1]        sum -2.8 over 3 tokens
#   row 1 (A=-1): -min(-r, -clip(r)) = [1.1, 0.8 (low-clipped), (1 masked)]  sum  1.9 over 2 tokens
LOGP = torch.tensor([[L(1.5), L(0.5), 0.0], [L(1.1), L(0.7), 0.0]])
ADV = torch.tensor([1.0, -1.0])
M = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
KW = {"epsilon_low": 0.2, "epsilon_high": 0.3}


@pytest.mark.parametrize("loss_type,extra,expected", [
    ("grpo", {}, (-2.8 / 3 + 1.9 / 2) / 2),                    # mean of per-sequence token means
    ("bnpo", {}, (-2.8 + 1.9) / 5),                            # token mean of the micro-batch
    ("dr_grpo", {"max_completion_length": 4}, -0.9 / (2 * 4)),  # token sum / (B * max length)
    ("dapo", {"tokens_normalizer": 2.5}, -0.9 / 2.5),          # token sum / the caller's normalizer
])
def test_each_normalisation_and_clip_ratios(loss_type, extra, expected):
    loss, stats = grpo_loss(LOGP, torch.zeros(2, 3), ADV, M, loss_type=loss_type, **KW, **extra)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(0.2)   # 1 of 5 tokens
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.2)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(0.4)
    assert "kl" not in stats


def test_gradient_by_hand():
    logp = LOGP.clone().requires_grad_(True)
    grpo_loss(logp, torch.zeros(2, 3), ADV, M, loss_type="grpo", **KW)[0].backward()
    # row 0 token 0 is clipped (no gradient); token 1: d(-r·A / 3 / 2)/dlogp = -0.5/6; row 1 token 2 masked
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[1, 2].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-0.5 / 6)


def test_sequence_level_ratio_gspo():
    loss, stats = grpo_loss(LOGP, torch.zeros(2, 3), ADV, M, loss_type="grpo", importance_sampling_level="sequence",
                            **KW)
    r0, r1 = 0.75 ** (1 / 3), 0.77 ** 0.5  # exp of the mean log-ratio over each sequence's tokens: in range
    assert loss.item() == pytest.approx((-r0 + r1) / 2, abs=1e-6)
    assert stats["clip_ratio/region_mean"].item() == 0.0


def test_kl_with_and_without_bias_correction_and_sampler_weight():
    ref = LOGP + torch.tensor([[L(2.0), 0, 0], [0, 0, 0]])  # k3 at d = log 2: 2 - log 2 - 1
    k3 = 2 - L(2.0) - 1
    loss, stats = grpo_loss(LOGP, torch.zeros(2, 3), ADV, M, loss_type="bnpo", beta=0.04, ref_logp=ref,
                            use_bias_correction_kl=False, **KW)
    assert loss.item() == pytest.approx(-0.9 / 5 + 0.04 * k3 / 5, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(k3 / 5)
    _, stats = grpo_loss(LOGP, torch.zeros(2, 3), ADV, M, loss_type="bnpo", beta=0.04, ref_logp=ref, **KW)
    assert stats["kl"].item() == pytest.approx(1.5 * k3 / 5)  # weighted by that token's ratio 1.5
    w = torch.tensor([[2.0, 1, 1], [1, 1, 1]])  # the sampler weight scales the surrogate, token 0: -1.3 -> -2.6
    loss, _ = grpo_loss(LOGP, torch.zeros(2, 3), ADV, M, loss_type="bnpo", is_ratio=w, **KW)
    assert loss.item() == pytest.approx(-2.2 / 5, abs=1e-6)


@pytest.mark.parametrize("call,name", [
    (lambda: grpo_loss(LOGP, LOGP, ADV, M, loss_type="cispo"), "loss_type"),
    (lambda: grpo_loss(LOGP, LOGP, ADV, M, importance_sampling_level="group"), "importance_sampling_level"),
    (lambda: grpo_loss(LOGP, LOGP, ADV, M), "tokens_normalizer"),
    (lambda: grpo_loss(LOGP, LOGP, ADV, M, loss_type="dr_grpo"), "max_completion_length"),
    (lambda: grpo_loss(LOGP, LOGP, ADV, M, loss_type="grpo", beta=0.1), "ref_logp"),
    (lambda: sampler_correction(OLD, SAMPLER, MASK, "token"), "vllm_importance_sampling_mode"),
    (lambda: sampler_correction(OLD, SAMPLER, MASK, "token_mask", 2.0, 2.0), "vllm_importance_sampling_clip_min"),
    (lambda: sampler_correction(OLD, SAMPLER, MASK, "token_truncate", None, None), "vllm_importance_sampling_clip"),
    (lambda: group_advantages(ADV, 2, "std"), "scale_rewards"),
    (lambda: group_advantages(ADV, 3), "group_size"),
])
def test_refusals_name_the_argument(call, name):
    with pytest.raises(GRPOArgumentError, match=name):
        call()


def test_sequence_level_with_token_sum_warns_as_trl_does():
    with pytest.warns(UserWarning, match="importance_sampling_level='sequence'"):
        grpo_loss(LOGP, LOGP, ADV, M, loss_type="dapo", importance_sampling_level="sequence", tokens_normalizer=5)
