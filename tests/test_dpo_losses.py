"""Every DPO loss type of TRL 1.16, its combination, WPO, LD-DPO and f-divergences, against values by hand.

(Equality with TRL's own trainer is tests/test_dpo_trl_equality.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from align.recipes.dpo_losses import (
    LOSS_TYPES,
    LossSettings,
    PairLogps,
    check_losses,
    dpo_loss,
    f_divergence_scores,
    per_pair_loss,
    preference_loss,
)
from align.recipes.dpo_scoring import length_split, row_sums, wpo_weights


def ls(x):  # log σ(x)
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1 / (1 + math.exp(-x))


# One pair: policy chosen -1 (2 tokens), rejected -3 (4 tokens); reference -2 and -2.
# ρc = 1, ρr = -1, δ = 2; with β = 0.5: βρc = 0.5, βρr = -0.5, βδ = 1.
ONE = PairLogps(*(torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0)), torch.tensor([2]), torch.tensor([4]))

BY_HAND = {
    "sigmoid": -ls(1),                                                   # 0.3132617
    "hinge": 0.0,                                                        # max(0, 1 - 1)
    "ipo": (1 / 2 - (-1) / 4 - 1) ** 2,                                  # δ̄ = 0.75; (0.75 - 1)² = 0.0625
    # σ(1)(log σ(1) - log 0.9) + σ(-1)(log σ(-1) - log 0.1) = 0.1140821
    "exo_pair": sig(1) * (ls(1) - math.log(0.9)) + sig(-1) * (ls(-1) - math.log(0.1)),
    "nca_pair": -ls(0.5) - 0.5 * ls(-0.5) - 0.5 * ls(0.5),              # 1.1981540
    "robust": (-0.9 * ls(1) + 0.1 * ls(-1)) / 0.8,                       # 0.1882617
    "bco_pair": -ls(0.5) - ls(0.5),                                      # -log σ(0.5) - log σ(--0.5) = 0.9481540
    "sppo_hard": (1 - 1) ** 2 + (-1 + 1) ** 2,                           # 0.5/β = 1: both on target
    "aot": -0.9 * ls(1) - 0.1 * ls(-1),                                  # one pair: nothing to sort; 0.4132617
    "aot_unpaired": -0.9 * ls(1) - 0.1 * ls(-1),                         # ρc - ρr = 2 as well
    "apo_zero": 1 - sig(0.5) + sig(-0.5),                                # 0.7550813
    "apo_down": sig(0.5) + 1 - sig(1),                                   # 0.8914008
    "discopop": -ls(1) * (1 - sig(1 / 0.05)) + math.exp(-1) * sig(1 / 0.05),  # ≈ e^-1: σ(20) ≈ 1
    "sft": 1 / 2,                                                        # -(-1) / 2 chosen tokens
    "sigmoid_norm": -ls(0.5 * 0.75),                                     # δ̄ = 0.75; 0.5231233
}


def test_the_table_covers_trls_list():
    assert set(BY_HAND) == set(LOSS_TYPES) and len(LOSS_TYPES) == 15


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_by_hand(loss_type):
    losses = per_pair_loss(ONE, LossSettings(beta=0.5, label_smoothing=0.1), loss_type)
    assert losses.item() == pytest.approx(BY_HAND[loss_type], abs=1e-6)


def test_more_values_by_hand():
    s = LossSettings(beta=0.25, discopop_tau=1.0)
    # SPPO-hard with β = 0.25: 0.5/β = 2: (1 - 2)² + (-1 + 2)² = 2
    assert per_pair_loss(ONE, s, "sppo_hard").item() == pytest.approx(2.0)
    # DiscoPOP, τ = 1, βδ = 0.5: -log σ(.5)(1 - σ(.5)) + e^-.5 σ(.5)
    expected = -ls(0.5) * (1 - sig(0.5)) + math.exp(-0.5) * sig(0.5)
    assert per_pair_loss(ONE, s, "discopop").item() == pytest.approx(expected, abs=1e-6)


def test_aot_sorts_the_batch_and_aot_unpaired_sorts_each_side():
    # Pairs: policy (c, r) = (0, -1), (-2, 0); reference (c, r) = (-1, -1), (-1, -3); β = 1, ε = 0.
    lp = PairLogps(torch.tensor([0.0, -2.0]), torch.tensor([-1.0, 0.0]), torch.tensor([-1.0, -1.0]),
                   torch.tensor([-1.0, -3.0]))
    s = LossSettings(beta=1.0)
    # aot: policy margins [1, -2] sorted [-2, 1]; reference margins [0, 2] sorted [0, 2]: Δ = [-2, -1]
    assert per_pair_loss(lp, s, "aot").tolist() == pytest.approx([-ls(-2), -ls(-1)], abs=1e-6)
    # aot_unpaired: ρc = [1, -1] sorted [-1, 1]; ρr = [0, 3] sorted [0, 3]: Δ = [-1, -2]
    assert per_pair_loss(lp, s, "aot_unpaired").tolist() == pytest.approx([-ls(-1), -ls(-2)], abs=1e-6)


def test_f_divergence_scores_by_hand():
    rho = torch.tensor([1.0, -1.0])
    fkl = f_divergence_scores(rho, "forward_kl", 0.5)             # 1 - e^-ρ
    assert fkl.tolist() == pytest.approx([1 - math.exp(-1), 1 - math.e], abs=1e-6)
    js = f_divergence_scores(rho, "js_divergence", 0.5)           # log 2 + log σ(ρ)
    assert js.tolist() == pytest.approx([math.log(2) + ls(1), math.log(2) + ls(-1)], abs=1e-6)
    alpha = f_divergence_scores(rho, "alpha_divergence", 0.5)     # (e^(-ρ/2) - 1) / (-1/2)
    assert alpha.tolist() == pytest.approx([-2 * (math.exp(-0.5) - 1), -2 * (math.exp(0.5) - 1)], abs=1e-6)
    assert f_divergence_scores(rho, "alpha_divergence", 1.0).tolist() == [1.0, -1.0]  # α = 1: reverse KL
    # sigmoid under forward KL: δ = 2 sinh 1 = 2.3504024; -log σ(0.5 δ) = 0.2690777
    s = LossSettings(beta=0.5, f_divergence_type="forward_kl")
    assert per_pair_loss(ONE, s, "sigmoid").item() == pytest.approx(-ls(math.sinh(1)), abs=1e-6)


def test_loss_weights_sum_the_means():
    lp = PairLogps(torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -3.0]),
                   torch.tensor([-1.5, -2.0]))
    # h = [1, -2]; β = 0.1: sigmoid [-log σ(.1), -log σ(-.2)], hinge [0.9, 1.2]
    loss, r_c, r_r = preference_loss(lp, LossSettings(beta=0.1), ["sigmoid", "hinge"], [0.5, 2.0])
    expected = 0.5 * (-ls(0.1) - ls(-0.2)) / 2 + 2.0 * (0.9 + 1.2) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert r_c.tolist() == pytest.approx([0.05, -0.1]) and r_r.tolist() == pytest.approx([-0.05, 0.1])
    unweighted, _, _ = preference_loss(lp, LossSettings(beta=0.1), ["sigmoid", "hinge"])  # TRL: 1.0 each
    assert unweighted.item() == pytest.approx((-ls(0.1) - ls(-0.2)) / 2 + (0.9 + 1.2) / 2, abs=1e-6)


def test_wpo_weights_multiply_each_pair():
    # Rows [chosen; rejected], 2 scored tokens each: mean(log p - log Σp²) = -0.5 and -1 -> e^-.5 · e^-1
    per_token = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, -1.0, 0.0]])
    log_sum_sq = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    weights = wpo_weights(per_token, log_sum_sq, mask)
    assert weights.tolist() == pytest.approx([math.exp(-0.5) * math.exp(-1.0)])
    lp = PairLogps(*(torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0)), weights=weights)
    loss, _, _ = preference_loss(lp, LossSettings(beta=0.5), ["sigmoid"])
    assert loss.item() == pytest.approx(-ls(1) * math.exp(-1.5), abs=1e-6)


def test_ld_alpha_weights_the_longer_tail():
    # Chosen scores 2 tokens, rejected 4: shared = first 2 scored tokens of each, tail = rejected's last 2.
    per_token = torch.tensor([[0.0, -1.0, -2.0, 0.0, 0.0], [0.0, -1.0, -1.0, -4.0, -4.0]])
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    shared, tail = length_split(mask)
    shared = shared & mask.bool()  # past a row's end TRL's masks may be set; its log-probs are 0 there
    assert shared.long().tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert tail.long().tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    # chosen -3; rejected -2 + 0.25 · -8 = -4; ld_alpha = 1 is the plain sum, None too
    assert row_sums(per_token, mask, 0.25).tolist() == [-3.0, -4.0]
    assert row_sums(per_token, mask, 1.0).tolist() == row_sums(per_token, mask, None).tolist() == [-3.0, -10.0]


@pytest.mark.parametrize("args,field", [
    ((["nope"], None), "loss_type"), (([], None), "loss_type"), ((["sigmoid", "sft"], [1.0]), "loss_weights"),
    ((["bco_pair"], None, "js_divergence"), "f_divergence_type"), ((["sigmoid"], None, "kl"), "f_divergence_type"),
    ((["aot"], None, "reverse_kl", True), "use_weighting"),
])
def test_refusals_name_the_field(args, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        check_losses(*args)


def test_dpo_loss_keeps_its_signature_for_the_new_types():
    losses, r_c, r_r = dpo_loss(ONE.policy_chosen, ONE.policy_rejected, ONE.ref_chosen, ONE.ref_rejected, 0.5,
                                "sigmoid_norm", 0.0, ONE.chosen_lengths, ONE.rejected_lengths)
    assert losses.item() == pytest.approx(BY_HAND["sigmoid_norm"], abs=1e-6)
    assert (r_c.item(), r_r.item()) == (0.5, -0.5)


def test_label_smoothing_nothing_reads_is_said_once_and_cdpo_reads_it():
    import warnings

    from align.recipes.dpo import DPOConfig

    with pytest.warns(UserWarning, match=r"^label_smoothing: 0.1 has no effect with loss_type sigmoid"):
        DPOConfig(train_file="x.jsonl", label_smoothing=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPOConfig(train_file="x.jsonl", label_smoothing=0.1, cdpo=True)
        DPOConfig(train_file="x.jsonl", label_smoothing=0.1, loss_type=["sigmoid", "robust"])
    with pytest.raises(ValueError, match=r"^label_smoothing: exo_pair needs"):
        DPOConfig(train_file="x.jsonl", loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"^ld_alpha: expected in \[0, 1\]"):
        DPOConfig(train_file="x.jsonl", ld_alpha=1.5)
