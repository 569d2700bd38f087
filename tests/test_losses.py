"""DPO-family losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from align.recipes.dpo_losses import dpo_loss

# One pair: policy chosen -1, rejected -3; reference chosen -2, rejected -2.
# h = (-1 - -3) - (-2 - -2) = 2; beta = 0.5 -> beta*h = 1.
PC, PR, RC, RR = (torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0))


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type,eps,expected", [
    # -log σ(1) = log(1 + e^-1) = 0.3132617
    ("sigmoid", 0.0, 0.31326169),
    # TRL 1.16's sigmoid does not read label_smoothing (cdpo: true does; test_cdpo_is_an_opt_in)
    ("sigmoid", 0.1, 0.31326169),
    # (0.9*0.3132617 - 0.1*1.3132617) / 0.8 = (0.2819355 - 0.1313262) / 0.8 = 0.1882617
    ("robust", 0.1, 0.18826169),
    # max(0, 1 - 1) = 0
    ("hinge", 0.0, 0.0),
    # (h - 1/(2 beta))^2 = (2 - 1)^2 = 1
    ("ipo", 0.0, 1.0),
])
def test_dpo_losses_by_hand(loss_type, eps, expected):
    losses, rc, rr = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type=loss_type, label_smoothing=eps)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    # implicit rewards: beta*(pi - ref) = 0.5*(-1+2) = 0.5 and 0.5*(-3+2) = -0.5
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


def test_cdpo_is_an_opt_in():
    # -(0.9) log σ(1) - 0.1 log σ(-1) = 0.9*0.3132617 + 0.1*1.3132617 = 0.4132617
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1, cdpo=True)
    assert losses.item() == pytest.approx(0.41326169, abs=1e-6)


def test_sigmoid_matches_formula_on_a_batch():
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -3.0]), torch.tensor([-1.5, -2.0])
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # h = [1 - 0, -3 - -1] = [1, -2]
    assert losses.tolist() == pytest.approx([-_log_sigmoid(0.1), -_log_sigmoid(-0.2)], abs=1e-6)
    # Hinge is 1 - beta*h when beta*h < 1: [0.9, 1.2]
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([0.9, 1.2], abs=1e-6)


def test_gradient_pushes_chosen_up():
    pc = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, PR, RC, RR, beta=0.5)
    losses.sum().backward()
    # d/dpc of -log σ(β h) = -β (1 - σ(β h)); h = 1 here -> -0.5*(1 - σ(0.5)) = -0.1887703
    assert pc.grad.item() == pytest.approx(-0.5 * (1 - 1 / (1 + math.exp(-0.5))), abs=1e-6)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="nope")


def test_ipo_averages_in_the_loss_but_rewards_use_sums():
    # Summed log-probs: policy chosen -4 over 4 tokens, rejected -9 over 3; reference -6 and -6.
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-4.0, -9.0, -6.0, -6.0))
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo",
                                chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([3]))
    # h = (-4 - -6)/4 - (-9 - -6)/3 = 0.5 + 1 = 1.5; (h - 1/(2*0.5))^2 = 0.25
    assert losses.item() == pytest.approx(0.25, abs=1e-6)
    # implicit rewards from the sums (TRL's): 0.5*(-4 + 6) = 1.0 and 0.5*(-9 + 6) = -1.5
    assert r_c.item() == pytest.approx(1.0) and r_r.item() == pytest.approx(-1.5)


def test_chosen_nll_is_per_token_over_the_batch():
    from align.recipes.dpo_losses import chosen_nll

    # Two chosen completions: summed log-probs -3 over 2 tokens and -1 over 4 tokens.
    # (3 + 1) / (2 + 4) = 0.6666667, not the mean of per-sequence averages ((1.5 + 0.25) / 2 = 0.875).
    value = chosen_nll(torch.tensor([-3.0, -1.0]), torch.tensor([2, 4]))
    assert value.item() == pytest.approx(0.66666667, abs=1e-7)
    # A gradient flows to the policy's log-probs: d/dx of -(x1 + x2)/6 is -1/6 each.
    x = torch.tensor([-3.0, -1.0], requires_grad=True)
    chosen_nll(x, torch.tensor([2, 4])).backward()
    assert torch.allclose(x.grad, torch.full((2,), -1 / 6))
