"""The verdict rules of `align study` on synthetic per-seed results, on both sides of every threshold.

Figures are chosen so that each case sits clearly on one side (0.02 or more from the threshold), and the
noise rule is exercised by widening one condition's seed spread until it swallows the effect.
"""

from __future__ import annotations

import math

import pytest

from align.study.verdict import (
    CONFIRM,
    INCONCLUSIVE,
    REFUTE,
    RULES,
    batch,
    capacity,
    layers,
    lr_ratio,
    parabola_optimum,
    rl_rank,
    rule_text,
    seed_spread,
)


def test_seed_spread_is_the_largest_range():
    assert seed_spread([1.0, 1.5], [2.0, 2.1, 2.9]) == pytest.approx(0.9)
    assert math.isnan(seed_spread([1.0], [2.0, 3.0]))  # one seed: no noise estimate


# -- rl-rank ----------------------------------------------------------------------------------------
BASE = [0.30, 0.30]


@pytest.mark.parametrize("full, lora, want", [
    ([0.50, 0.52], {"1": [0.48, 0.49], "8": [0.50, 0.51]}, CONFIRM),  # gain 0.21, gaps 0.025 and 0.005
    ([0.50, 0.52], {"1": [0.40, 0.41], "8": [0.50, 0.51]}, REFUTE),  # rank 1 trails by 0.105 > 0.05
    ([0.37, 0.39], {"1": [0.30, 0.30]}, INCONCLUSIVE),  # full gains 0.08 < 0.10: nothing to match
    ([0.50, 0.52], {"1": [0.60, 0.61]}, CONFIRM),  # LoRA better than full fine-tuning is no gap
])
def test_rl_rank_thresholds(full, lora, want):
    v = rl_rank(BASE, full, lora)
    assert v.verdict == want, v.figures["reason"]
    assert v.noise == pytest.approx(0.02)


def test_rl_rank_noise_widens_the_tolerance():
    # Rank 1 trails by 0.08: more than 0.05, but the seeds of full fine-tuning spread over 0.10.
    v = rl_rank(BASE, [0.46, 0.56], {"1": [0.42, 0.44]})
    assert v.noise == pytest.approx(0.10) and v.figures["tolerance"] == pytest.approx(0.10)
    assert v.verdict == CONFIRM
    assert rl_rank(BASE, [0.50, 0.52], {"1": [0.42, 0.44]}).verdict == REFUTE  # same gap, tight seeds


# -- lr-ratio ---------------------------------------------------------------------------------------
GRID = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]


def bowl(best: float, depth: float = 1.0):
    """NLL per learning rate of the grid: a parabola in log10(lr) with its minimum at `best`, two seeds."""
    return {lr: [2.0 + depth * (math.log10(lr) - math.log10(best)) ** 2 + d for d in (0.0, 0.01)] for lr in GRID}


def test_parabola_recovers_the_vertex_by_hand():
    # Points on y = (x + 4)^2 at x = -4.5, -4, -3.5 (lr 10^x): the vertex is lr 1e-4.
    lr, why = parabola_optimum([10 ** -4.5, 1e-4, 10 ** -3.5], [0.25, 0.0, 0.25])
    assert lr == pytest.approx(1e-4) and why == ""
    assert parabola_optimum(GRID, [5, 4, 3, 2, 1, 0])[0] is None  # best at the edge


@pytest.mark.parametrize("lora_best, full_best, want", [
    (2e-4, 2e-5, CONFIRM),  # ratio 10
    (1.1e-4, 4e-5, REFUTE),  # ratio 2.75 < 3
    (1.5e-3, 4e-5, REFUTE),  # ratio 37.5 > 30
    (9e-4, 3.2e-5, CONFIRM),  # ratio 28.1, just inside
])
def test_lr_ratio_thresholds(lora_best, full_best, want):
    v = lr_ratio(GRID, {"lora": bowl(lora_best), "full": bowl(full_best)})
    assert v.verdict == want, v.figures["reason"]
    assert v.figures["ratio"] == pytest.approx(lora_best / full_best, rel=1e-6)
    assert v.noise == pytest.approx(0.01)


def test_lr_ratio_edge_and_downward_parabola_are_inconclusive():
    at_edge = lr_ratio(GRID, {"lora": bowl(3e-3), "full": bowl(2e-5)})  # LoRA's best is the grid's last lr
    assert at_edge.verdict == INCONCLUSIVE and "lora: the lowest loss is at the grid's edge" in at_edge.figures["reason"]
    # The lowest inside the grid, but of the three best the middle one (in lr) is the highest: opens downwards.
    dome = {lr: [nll, nll + 0.01] for lr, nll in zip(GRID, [3.0, 1.00, 5.0, 1.05, 1.02, 3.2], strict=True)}
    v = lr_ratio(GRID, {"lora": bowl(2e-4), "full": dome})
    assert v.verdict == INCONCLUSIVE and "opens downwards" in v.figures["reason"]


# -- layers -----------------------------------------------------------------------------------------
PARAMS = {"attention": 1_843_200, "mlp": 1_900_800, "all": 1_831_680}


@pytest.mark.parametrize("attention, mlp, all_, want", [
    ([2.10, 2.11], [2.00, 2.01], [2.02, 2.03], CONFIRM),  # both beat attention by 0.10 and 0.08 > 0.01
    ([2.00, 2.01], [2.10, 2.11], [2.05, 2.06], REFUTE),  # attention better by more than the noise
    ([2.10, 2.11], [2.00, 2.01], [2.10, 2.11], INCONCLUSIVE),  # all-layer ties attention
])
def test_layers_thresholds(attention, mlp, all_, want):
    v = layers({"attention": attention, "mlp": mlp, "all": all_}, PARAMS)
    assert v.verdict == want, v.figures["reason"]


def test_layers_noise_and_matched_parameters():
    # The same 0.10 margins, but one placement's seeds spread over 0.20: within the noise.
    wide = layers({"attention": [2.00, 2.20], "mlp": [2.00, 2.01], "all": [2.00, 2.01]}, PARAMS)
    assert wide.verdict == INCONCLUSIVE and wide.noise == pytest.approx(0.20)
    with pytest.raises(ValueError, match="matched on parameters"):
        layers({"attention": [2.0, 2.0], "mlp": [2.0, 2.0], "all": [2.0, 2.0]}, {**PARAMS, "mlp": 2_100_000})


# -- batch ------------------------------------------------------------------------------------------
FULL = {1: [2.00, 2.01], 4: [2.00, 2.01], 16: [2.00, 2.01]}


@pytest.mark.parametrize("lora, want", [
    ({1: [2.02, 2.03], 4: [2.05, 2.06], 16: [2.10, 2.11]}, CONFIRM),  # gap 0.02 -> 0.10
    ({1: [2.10, 2.11], 4: [2.05, 2.06], 16: [2.02, 2.03]}, REFUTE),  # gap 0.10 -> 0.02
    ({1: [2.05, 2.06], 4: [2.05, 2.06], 16: [2.055, 2.065]}, INCONCLUSIVE),  # grows 0.005 < 0.01
])
def test_batch_thresholds(lora, want):
    v = batch(lora, FULL)
    assert v.verdict == want, v.figures["reason"]
    assert v.figures["batch_sizes"] == [1, 4, 16]


def test_batch_noise_swallows_the_growth():
    v = batch({1: [2.02, 2.03], 16: [2.10, 2.11]}, {1: [2.00, 2.01], 16: [1.95, 2.05]})
    assert v.noise == pytest.approx(0.10) and v.verdict == INCONCLUSIVE  # gap grew 0.08 < 0.10


# -- capacity ---------------------------------------------------------------------------------------
def test_capacity_thresholds():
    data = 100_000.0
    small = {"one-layer": (5_000, [10_000.0, 10_100.0]), "attention": (20_000, [40_000.0, 40_050.0]),
             "all": (1_000_000, [100_000.0, 100_000.0])}
    v = capacity(data, small)
    # The two that fell short of the data: (10,050 + 40,025) / 25,000 = 2.003 bits/param.
    assert v.verdict == CONFIRM and v.figures["saturated"] == ["one-layer", "attention"]
    assert v.figures["capacity"] == pytest.approx(50_075 / 25_000)
    low = capacity(data, {"a": (50_000, [20_000.0, 20_010.0]), "b": (1_000_000, [100_000.0, 100_000.0])})
    assert low.verdict == REFUTE and low.figures["capacity"] == pytest.approx(0.4001)  # < 1 bit/param
    high = capacity(data, {"a": (10_000, [50_000.0, 50_010.0])})
    assert high.verdict == REFUTE and high.figures["capacity"] == pytest.approx(5.0005)  # > 4 bits/param
    none = capacity(data, {"a": (1_000_000, [99_990.0, 100_000.0])})  # short by 5 bits < noise 10: stored it all
    assert none.verdict == INCONCLUSIVE and none.figures["saturated"] == []


# -- every rule -------------------------------------------------------------------------------------
def test_one_seed_is_inconclusive_everywhere():
    cases = [rl_rank([0.3], [0.6], {"1": [0.6]}),
             lr_ratio(GRID, {m: {lr: v[:1] for lr, v in bowl(b).items()} for m, b in (("lora", 2e-4),
                                                                                      ("full", 2e-5))}),
             layers({"attention": [2.1], "mlp": [2.0], "all": [2.0]}, PARAMS),
             batch({1: [2.0], 16: [2.5]}, {1: [2.0], 16: [2.0]}),
             capacity(100.0, {"a": (10, [20.0])})]
    for v in cases:
        assert v.verdict == INCONCLUSIVE and "fewer than 2 seeds" in v.figures["reason"] and math.isnan(v.noise)


def test_every_rule_states_its_thresholds_before_the_numbers():
    assert set(RULES) == {"rl-rank", "lr-ratio", "layers", "batch", "capacity"}
    for study, words in (("rl-rank", "max(0.05, noise)"), ("lr-ratio", "[3, 30]"), ("layers", "more than the noise"),
                         ("batch", "grows by more than the noise"), ("capacity", "[1, 4] bits per parameter")):
        text = rule_text(study)
        assert text.startswith(f"{study}:") and words in text and all(v in text for v in (CONFIRM, REFUTE,
                                                                                          INCONCLUSIVE))
