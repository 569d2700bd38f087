"""How every study runs: calibrate, plan, run the conditions, write the report.

A study module (sft_studies, capacity, rl_rank) gives a `Study`: its claim, the modes it calibrates,
the runs it plans, and `execute(ctx, plan) -> Outcome`. The calibration pass runs each mode's probe
for PROBE_STEPS steps, and plan.py turns the measured times into step counts for --minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from align.study.plan import Plan, Run, choose_units, cost_from_probe
from align.study.runs import Context
from align.study.verdict import Verdict

PROBE_STEPS = 3  # the first step warms up; the others give the steady step time


@dataclass
class Outcome:
    verdict: Verdict
    setup: list[str]  # report.md's setup lines: data, settings, what each condition is
    tables: list[str] = field(default_factory=list)  # markdown tables of the per-seed figures
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # caveats the reader needs next to the verdict


@dataclass
class Study:
    name: str
    claim: str
    probes: dict[str, Callable[[Context, str, int], dict]]  # mode -> (ctx, key, steps) -> a run's figures
    planned: Callable[[Context], list[Run]]
    execute: Callable[[Context, Plan], Outcome]
    check: Callable[[Context], None] = lambda ctx: None  # what must hold before anything loads


def warm_up(model: str) -> None:
    """Import what the first run would import (transformers' model class, PEFT), so the probe's overhead is a
    run's, not the process's first."""
    import peft  # noqa: F401
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.core.loading import resolve_model

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model)))


def calibrate(study: Study, ctx: Context, budget_s: float) -> Plan:
    """Probe each mode, then choose the steps per run that fill the budget; prints the plan. The budget
    counts from here: the probes are part of it."""
    t0 = time.perf_counter()
    warm_up(ctx.model)
    costs = {}
    for mode, probe in study.probes.items():
        figures = probe(ctx, f"calibration/{mode}", PROBE_STEPS)
        costs[mode] = cost_from_probe(figures["wall_s"], figures["step_seconds"])
    plan = Plan(study.name, budget_s, time.perf_counter() - t0, costs, study.planned(ctx))
    choose_units(plan, ctx.max_units)
    for line in plan.lines():
        print(f"[study] {line}", flush=True)
    return plan


def sweep_then_seeds(ctx: Context, prefix: str, lrs: Sequence[float], run: Callable[[str, int, float], dict],
                     metric: str, lower_is_better: bool = True) -> tuple[float, list[float], dict[float, float]]:
    """Each learning rate of `lrs` on the first seed, then the other seeds at the best one.

    Returns (best lr, the metric per seed at it, the first seed's metric per lr). Sweeping on one seed
    and reseeding only the winner costs len(lrs) + seeds - 1 runs instead of len(lrs) x seeds.
    """
    first, rest = ctx.seeds[0], ctx.seeds[1:]
    sweep = {lr: run(f"{prefix}/lr={lr:g}/seed={first}", first, lr)[metric] for lr in lrs}
    best = (min if lower_is_better else max)(sweep, key=sweep.get)
    values = [sweep[best]] + [run(f"{prefix}/lr={best:g}/seed={s}", s, best)[metric] for s in rest]
    return best, values, sweep


def sweep_runs(prefix: str, mode: str, lrs: Sequence[float], seeds: Sequence[int]) -> list[Run]:
    """The runs `sweep_then_seeds` will make (the reseeded ones under the first lr's name: only the count matters)."""
    return ([Run(f"{prefix}/lr={lr:g}", mode) for lr in lrs]
            + [Run(f"{prefix}/seed={s}", mode) for s in seeds[1:]])


def seed_table(title: str, rows: dict[str, Sequence[float]], seeds: Sequence[int], fmt: str = ".4f") -> str:
    """A markdown table: one row per condition, one column per seed, then the mean and the range."""
    names = (s if isinstance(s, str) else f"seed {s}" for s in seeds)  # seeds, or the columns' own labels
    head = f"| {title} | " + " | ".join(names) + " | mean | range |"
    lines = [head, "|" + "---|" * (len(seeds) + 3)]
    for name, values in rows.items():
        cells = " | ".join(format(v, fmt) for v in values)
        lines.append(f"| {name} | {cells} | {format(sum(values) / len(values), fmt)} | "
                     f"{format(max(values) - min(values), fmt)} |")
    return "\n".join(lines)
