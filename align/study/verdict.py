"""The verdict rules of `align study`: pure functions from per-seed results to CONFIRM / REFUTE / INCONCLUSIVE.

Each study's function takes its results as plain numbers, one per seed, and returns a `Verdict`
(verdict, figures, noise). Its docstring is the rule, printed in report.md before the numbers
(`rule_text`), so a reader sees what would have confirmed or refuted the claim before seeing
whether it did.

The noise estimate is the seed spread: for every condition (a mode, rank, placement, batch size
or learning rate) the range max - min of its per-seed values, and the largest of those ranges.
It is deliberately the conservative one (a range, not a standard deviation): with 2-3 seeds a
standard deviation says little, and a gap smaller than what reseeding alone moves is no finding.
Fewer than 2 seeds give no noise estimate, so every rule answers INCONCLUSIVE then.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

CONFIRM, REFUTE, INCONCLUSIVE = "CONFIRM", "REFUTE", "INCONCLUSIVE"
MIN_FULL_GAIN = 0.10  # rl-rank: full fine-tuning must learn the task for a comparison to mean anything
MIN_GAP = 0.05  # rl-rank: an accuracy gap below this is a match, whatever the seeds say
LR_RATIO_RANGE = (3.0, 30.0)  # lr-ratio: the post's ~10 (9.8 fitted), higher for very short runs
CAPACITY_RANGE = (1.0, 4.0)  # capacity: the post's ~2 bits per parameter
MATCHED_PARAMS = 1.10  # layers: placements are "matched" when their parameter counts differ by < 10%


class Verdict(NamedTuple):
    verdict: str  # CONFIRM, REFUTE or INCONCLUSIVE
    figures: dict  # the numbers the rule read, and "reason": which branch of the rule decided
    noise: float  # the seed spread (module docstring)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def seed_spread(*conditions: Sequence[float]) -> float:
    """The largest max - min over the per-seed values of each condition (nan with fewer than 2 seeds)."""
    if not conditions or min(len(c) for c in conditions) < 2:
        return math.nan
    return max(max(c) - min(c) for c in conditions)


def _no_noise(figures: dict) -> Verdict:
    return Verdict(INCONCLUSIVE, {**figures, "reason": "fewer than 2 seeds: no noise estimate"}, math.nan)


def rule_text(study: str) -> str:
    """The rule of `study` as report.md prints it: its function's docstring."""
    return inspect.cleandoc(RULES[study].__doc__)


# -- rl-rank -------------------------------------------------------------------------------------------
def rl_rank(base: Sequence[float], full: Sequence[float], lora: Mapping[str, Sequence[float]]) -> Verdict:
    """rl-rank: LoRA matches full fine-tuning in RL, even at rank 1.

    Inputs: held-out greedy accuracy per seed of the base model (`base`), of full fine-tuning (`full`) and of
    LoRA at each rank (`lora`: rank -> per-seed accuracy), each at its best learning rate.
    Gain = mean(full) - mean(base). Gap of a rank = mean(full) - mean(LoRA at that rank) (LoRA doing better
    than full fine-tuning is no gap). Tolerance = max(0.05, noise).
    - INCONCLUSIVE when the gain is below 0.10: full fine-tuning did not learn the task, nothing to match.
    - CONFIRM when the gain is at least 0.10 and every rank's gap is within the tolerance.
    - REFUTE when the gain is at least 0.10 and some rank's gap exceeds the tolerance.
    """
    noise = seed_spread(base, full, *lora.values())
    gain = mean(full) - mean(base)
    gaps = {rank: mean(full) - mean(acc) for rank, acc in lora.items()}
    tolerance = max(MIN_GAP, noise)
    figures = {"base_accuracy": mean(base), "full_accuracy": mean(full),
               "lora_accuracy": {rank: mean(acc) for rank, acc in lora.items()}, "full_gain": gain, "gaps": gaps,
               "tolerance": tolerance}
    if math.isnan(noise):
        return _no_noise(figures)
    if gain < MIN_FULL_GAIN:
        return Verdict(INCONCLUSIVE, {**figures, "reason": f"full fine-tuning gained {gain:.3f} < {MIN_FULL_GAIN}"},
                       noise)
    worst = max(gaps, key=gaps.get)
    if gaps[worst] > tolerance:
        return Verdict(REFUTE, {**figures, "reason": f"rank {worst} trails full fine-tuning by {gaps[worst]:.3f} "
                                                     f"> {tolerance:.3f}"}, noise)
    return Verdict(CONFIRM, {**figures, "reason": f"every rank within {tolerance:.3f} of full fine-tuning"}, noise)


# -- lr-ratio ------------------------------------------------------------------------------------------
def parabola_optimum(grid: Sequence[float], losses: Sequence[float]) -> tuple[float | None, str]:
    """(the optimal learning rate, "") from a parabola in log10(lr) through the three lowest losses of the grid,
    or (None, why not): the lowest loss at the grid's edge, a parabola opening downwards, a vertex off the grid."""
    if len(grid) < 3:
        return None, "fewer than 3 learning rates"
    order = sorted(range(len(grid)), key=lambda i: losses[i])
    if grid[order[0]] in (min(grid), max(grid)):
        return None, f"the lowest loss is at the grid's edge (lr {grid[order[0]]:g})"
    (x1, y1), (x2, y2), (x3, y3) = ((math.log10(grid[i]), losses[i]) for i in sorted(order[:3], key=grid.__getitem__))
    # Divided differences: y = a x^2 + b x + c through the three points.
    a = ((y3 - y2) / (x3 - x2) - (y2 - y1) / (x2 - x1)) / (x3 - x1)
    if a <= 0:
        return None, "the parabola through the three best points opens downwards"
    b = (y2 - y1) / (x2 - x1) - a * (x1 + x2)
    vertex = -b / (2 * a)
    if not math.log10(min(grid)) <= vertex <= math.log10(max(grid)):
        return None, f"the parabola's optimum (lr {10 ** vertex:.3g}) lies off the grid"
    return 10 ** vertex, ""


def lr_ratio(grid: Sequence[float], nll: Mapping[str, Mapping[float, Sequence[float]]]) -> Verdict:
    """lr-ratio: LoRA's best learning rate is about 10x full fine-tuning's.

    Inputs: the learning-rate grid (the same for both modes, so the ratio is not built into it) and held-out
    NLL per seed (`nll`: "lora" and "full" -> learning rate -> per-seed NLL). Each mode's optimum comes from a
    parabola in log10(learning rate) through the three grid points of lowest mean NLL.
    - INCONCLUSIVE when either mode's lowest NLL is at the first or last learning rate of the grid, or its
      parabola opens downwards, or its optimum lies off the grid: the optimum was not bracketed.
    - CONFIRM when the ratio of optima LoRA / full lies in [3, 30] (the post fitted 9.8; short runs go higher).
    - REFUTE when the ratio lies outside [3, 30].
    """
    noise = seed_spread(*(seeds for mode in nll.values() for seeds in mode.values()))
    means = {mode: [mean(by_lr[lr]) for lr in grid] for mode, by_lr in nll.items()}
    optima, why = {}, {}
    for mode in ("lora", "full"):
        optima[mode], why[mode] = parabola_optimum(grid, means[mode])
    figures = {"grid": list(grid), "mean_nll": means, "optimum_lr": optima}
    if math.isnan(noise):
        return _no_noise(figures)
    missing = [f"{mode}: {why[mode]}" for mode in optima if optima[mode] is None]
    if missing:
        return Verdict(INCONCLUSIVE, {**figures, "reason": "; ".join(missing)}, noise)
    ratio = optima["lora"] / optima["full"]
    low, high = LR_RATIO_RANGE
    verdict = CONFIRM if low <= ratio <= high else REFUTE
    return Verdict(verdict, {**figures, "ratio": ratio, "reason": f"ratio {ratio:.2f} "
                                                                   f"{'in' if verdict == CONFIRM else 'outside'} "
                                                                   f"[{low:g}, {high:g}]"}, noise)


# -- layers --------------------------------------------------------------------------------------------
def layers(nll: Mapping[str, Sequence[float]], params: Mapping[str, int]) -> Verdict:
    """layers: LoRA on the MLP (or all layers) beats attention-only LoRA at the same number of parameters.

    Inputs: held-out NLL per seed of each placement at its best learning rate (`nll`: "attention", "mlp", "all")
    and their trainable parameters (`params`), which must match (largest / smallest < 1.10).
    Margin of a placement = mean NLL of attention-only - its mean NLL (positive: it beats attention-only).
    - CONFIRM when both MLP-only and all-layer beat attention-only by more than the noise.
    - REFUTE when attention-only beats MLP-only or all-layer by more than the noise.
    - INCONCLUSIVE otherwise: the differences are within what reseeding moves.
    """
    if max(params.values()) / min(params.values()) >= MATCHED_PARAMS:
        raise ValueError(f"layers: placements must be matched on parameters (within 10%), got {dict(params)}")
    noise = seed_spread(*nll.values())
    margins = {p: mean(nll["attention"]) - mean(nll[p]) for p in ("mlp", "all")}
    figures = {"mean_nll": {p: mean(v) for p, v in nll.items()}, "params": dict(params), "margins": margins}
    if math.isnan(noise):
        return _no_noise(figures)
    if all(m > noise for m in margins.values()):
        return Verdict(CONFIRM, {**figures, "reason": f"MLP-only and all-layer beat attention-only by more than "
                                                      f"{noise:.4f}"}, noise)
    if any(m < -noise for m in margins.values()):
        return Verdict(REFUTE, {**figures, "reason": f"attention-only is better by more than {noise:.4f}"}, noise)
    return Verdict(INCONCLUSIVE, {**figures, "reason": f"the margins are within the noise {noise:.4f}"}, noise)


# -- batch ---------------------------------------------------------------------------------------------
def batch(lora: Mapping[int, Sequence[float]], full: Mapping[int, Sequence[float]]) -> Verdict:
    """batch: LoRA loses more than full fine-tuning at large batch sizes.

    Inputs: held-out NLL per seed after the same examples, at each batch size, for LoRA and full fine-tuning
    (`lora`, `full`: batch size -> per-seed NLL). Gap at a batch size = mean LoRA NLL - mean full NLL.
    Growth = gap at the largest batch size (16) - gap at the smallest (1).
    - CONFIRM when the gap grows by more than the noise.
    - REFUTE when the gap shrinks by more than the noise.
    - INCONCLUSIVE otherwise.
    """
    sizes = sorted(lora)
    if sorted(full) != sizes or len(sizes) < 2:
        raise ValueError(f"batch: expected the same two or more batch sizes for both modes, got {sizes} and "
                         f"{sorted(full)}")
    noise = seed_spread(*lora.values(), *full.values())
    gaps = {b: mean(lora[b]) - mean(full[b]) for b in sizes}
    growth = gaps[sizes[-1]] - gaps[sizes[0]]
    figures = {"gaps": gaps, "growth": growth, "batch_sizes": sizes}
    if math.isnan(noise):
        return _no_noise(figures)
    if growth > noise:
        return Verdict(CONFIRM, {**figures, "reason": f"the gap grew by {growth:.4f} > {noise:.4f}"}, noise)
    if growth < -noise:
        return Verdict(REFUTE, {**figures, "reason": f"the gap shrank by {-growth:.4f} > {noise:.4f}"}, noise)
    return Verdict(INCONCLUSIVE, {**figures, "reason": f"the gap moved {growth:+.4f}, within {noise:.4f}"}, noise)


# -- capacity ------------------------------------------------------------------------------------------
def capacity(data_bits: float, adapters: Mapping[str, tuple[int, Sequence[float]]]) -> Verdict:
    """capacity: an adapter stores about 2 bits per parameter, and falls behind once the data holds more.

    Inputs: the information in the synthetic data set in bits (`data_bits`, counted exactly) and, per adapter,
    its trainable parameters and the bits it absorbed per seed (`adapters`: name -> (params, per-seed bits)).
    An adapter is saturated when its mean absorbed bits fall short of `data_bits` by more than the noise
    (it could not store everything). Capacity = bits absorbed by the saturated adapters / their parameters
    (pooled: a line through the origin on the bits-vs-parameters plot).
    - INCONCLUSIVE when no adapter saturated: every one stored the whole set, which bounds nothing.
    - CONFIRM when the capacity lies in [1, 4] bits per parameter (the post's ~2).
    - REFUTE when it lies outside [1, 4].
    """
    noise = seed_spread(*(bits for _, bits in adapters.values()))
    absorbed = {name: mean(bits) for name, (_, bits) in adapters.items()}
    saturated = [name for name in adapters if absorbed[name] < data_bits - (0.0 if math.isnan(noise) else noise)]
    per_param = {name: absorbed[name] / adapters[name][0] for name in adapters}
    figures = {"data_bits": data_bits, "absorbed_bits": absorbed, "bits_per_param": per_param,
               "saturated": saturated}
    if math.isnan(noise):
        return _no_noise(figures)
    if not saturated:
        return Verdict(INCONCLUSIVE, {**figures, "reason": "no adapter saturated"}, noise)
    fitted = sum(absorbed[n] for n in saturated) / sum(adapters[n][0] for n in saturated)
    low, high = CAPACITY_RANGE
    verdict = CONFIRM if low <= fitted <= high else REFUTE
    return Verdict(verdict, {**figures, "capacity": fitted, "reason": f"{fitted:.2f} bits/param "
                                                                      f"{'in' if verdict == CONFIRM else 'outside'} "
                                                                      f"[{low:g}, {high:g}]"}, noise)


RULES = {"rl-rank": rl_rank, "lr-ratio": lr_ratio, "layers": layers, "batch": batch, "capacity": capacity}
