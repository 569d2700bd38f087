"""ORPO, CPO, SimPO and AlphaPO losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from align.recipes.reference_free_losses import alphapo_reward, cpo_loss, log1mexp, orpo_loss

LN = math.log


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_orpo_odds_ratio_by_hand():
    # p_c = 1/2: odds 1, log odds 0. p_r = 1/4: odds 1/3, log odds -ln 3. Ratio ln 3; log σ(ln 3) = ln(3/4).
    out = orpo_loss(t(LN(0.5)), t(LN(0.25)), beta=0.1)
    assert out["log_odds_chosen"].item() == pytest.approx(LN(3))
    assert out["log_odds_ratio"].item() == pytest.approx(LN(0.75))
    assert out["ratio_loss"].item() == pytest.approx(-0.1 * LN(0.75))
    assert (out["chosen_rewards"].item(), out["rejected_rewards"].item()) == pytest.approx((0.1 * LN(0.5),
                                                                                             0.1 * LN(0.25)))
    # equal odds: log σ(0) = -ln 2 whatever β scales it by
    assert orpo_loss(t(-1.0), t(-1.0), beta=2.0)["ratio_loss"].item() == pytest.approx(2 * LN(2))


def test_log1mexp_is_exact_on_both_branches():
    for p in (1e-12, 0.3, 0.5, 0.7, 1 - 1e-9):
        assert log1mexp(t(LN(p))).item() == pytest.approx(LN(1 - p), rel=1e-9)


def test_cpo_sigmoid_hinge_ipo_by_hand():
    # x = β (π_c - π_r) = 0.5 · 2 = 1: -log σ(1) = log(1 + e^-1)
    losses, r_c, r_r = cpo_loss(t(-1.0), t(-3.0), beta=0.5)
    assert losses.item() == pytest.approx(LN(1 + math.exp(-1)))
    assert (r_c.item(), r_r.item()) == (-0.5, -1.5)
    smoothed, _, _ = cpo_loss(t(-1.0), t(-3.0), beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * LN(1 + math.exp(-1)) + 0.1 * LN(1 + math.e))
    hinge, _, _ = cpo_loss(t(-1.0, -1.0), t(-3.0, -2.0), beta=0.5, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([0.0, 0.5])  # max(0, 1 - 1), max(0, 1 - 0.5)
    ipo, _, _ = cpo_loss(t(-1.0, -1.0), t(-2.0, -3.0), beta=0.5, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([0.0, 1.0])  # (1 - 1/(2·0.5))², (2 - 1)²


def test_simpo_margin_by_hand():
    # averages -1, -2; γ/β = 1/2: logits 1 - 0.5, β·logits = 1
    losses, r_c, r_r = cpo_loss(t(-1.0), t(-2.0), beta=2.0, loss_type="simpo", simpo_gamma=1.0)
    assert losses.item() == pytest.approx(LN(1 + math.exp(-1)))
    assert (r_c.item(), r_r.item()) == (-2.0, -4.0)
    # without the margin it is the sigmoid loss on the same inputs
    plain, _, _ = cpo_loss(t(-1.0), t(-2.0), beta=2.0, loss_type="simpo", simpo_gamma=0.0)
    assert plain.item() == pytest.approx(cpo_loss(t(-1.0), t(-2.0), beta=2.0)[0].item())


def test_alphapo_reward_shape_by_hand():
    # α = 1: r = 1 - 1/p; p = 1/2 -> -1, p = 1/4 -> -3; then x = 0.5 · 2 = 1
    assert alphapo_reward(t(LN(0.5), LN(0.25)), 1.0).tolist() == pytest.approx([-1.0, -3.0])
    losses, r_c, r_r = cpo_loss(t(LN(0.5)), t(LN(0.25)), beta=0.5, alpha=1.0)
    assert losses.item() == pytest.approx(LN(1 + math.exp(-1)))
    assert (r_c.item(), r_r.item()) == pytest.approx((-0.5, -1.5))
    assert torch.equal(alphapo_reward(t(-2.0), 0.0), t(-2.0))


def test_unknown_loss_type_is_named():
    with pytest.raises(ValueError, match="loss_type: expected one of"):
        cpo_loss(t(-1.0), t(-2.0), beta=0.1, loss_type="kto_pair")
