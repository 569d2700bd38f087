"""The calibration pass of `align study`: time a short probe run, then fit the step counts to --minutes.

Every run of a study is one condition (a mode, placement, rank, batch size, learning rate or seed). Its
cost is modelled as overhead (load, evaluate, save: the probe's wall time less its steps) plus steps x
the step time of its mode. A run's steps are `units x steps_per_unit` (1 for most studies; the batch
study keeps the examples seen equal, so batch 1 takes 16 steps where batch 16 takes one), and the plan
picks the number of units that fills what is left of the budget after the probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SAFETY = 0.85  # the CPU is shared and a run's time varies: plan to end before the budget does
MIN_UNITS = 2


@dataclass
class Cost:
    """What one probe measured for a mode: seconds per optimizer step and per run besides the steps."""

    step_s: float
    overhead_s: float


@dataclass
class Run:
    """One planned training run: its mode (whose cost applies), steps per unit and cost of a step there."""

    key: str
    mode: str
    steps_per_unit: int = 1
    step_factor: float = 1.0  # a step here costs this many of the probe's steps (larger batches)


@dataclass
class Plan:
    study: str
    budget_s: float
    spent_s: float  # the calibration probes
    costs: dict[str, Cost]
    runs: list[Run]
    units: int = 0
    capped: bool = False
    notes: list[str] = field(default_factory=list)

    def steps(self, run: Run) -> int:
        return max(1, self.units * run.steps_per_unit)

    def estimate_s(self, units: int | None = None) -> float:
        units = self.units if units is None else units
        return sum(self.costs[r.mode].overhead_s + max(1, units * r.steps_per_unit) * r.step_factor
                   * self.costs[r.mode].step_s for r in self.runs)

    def lines(self) -> list[str]:
        """What the plan prints (and report.md repeats): the probes' figures and the chosen steps."""
        out = [f"calibration: {mode} step {c.step_s:.2f} s, {c.overhead_s:.1f} s per run besides steps"
               for mode, c in self.costs.items()]
        out.append(f"plan: {len(self.runs)} runs, steps per run: {self.units}"
                   + (" (capped by --max_steps)" if self.capped else "")
                   + f", estimated {self.estimate_s() / 60:.1f} min + {self.spent_s / 60:.1f} min of calibration, "
                     f"budget {self.budget_s / 60:.1f} min")
        return out + self.notes


def choose_units(plan: Plan, max_units: int | None = None) -> Plan:
    """Fill the budget left after calibration: the most units whose estimate fits SAFETY x what is left."""
    left = SAFETY * (plan.budget_s - plan.spent_s)
    fixed = sum(plan.costs[r.mode].overhead_s for r in plan.runs)
    per_unit = sum(r.steps_per_unit * r.step_factor * plan.costs[r.mode].step_s for r in plan.runs)
    fitted = math.floor((left - fixed) / per_unit) if per_unit > 0 else MIN_UNITS
    units = max(fitted, MIN_UNITS)
    if max_units is not None and units > max_units:
        units, plan.capped = max_units, True
    if fitted < MIN_UNITS:
        plan.notes.append(f"warning: the budget leaves {max(fitted, 0)} steps per run; running {units}, which "
                          f"will take about {plan.estimate_s(units) / 60:.1f} min (give more --minutes)")
    plan.units = units
    return plan


def cost_from_probe(wall_s: float, step_seconds: list[float]) -> Cost:
    """A mode's cost from a probe run: its steady step time (the steps after the first, which warms up) and
    the rest of its wall time as the per-run overhead."""
    steady = step_seconds[1:] or step_seconds
    step_s = sorted(steady)[len(steady) // 2]
    return Cost(step_s=step_s, overhead_s=max(0.0, wall_s - sum(step_seconds)))
