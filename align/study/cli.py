"""`align study NAME`: check a LoRA-versus-full-fine-tuning finding on this machine, within a time budget.

    align study layers --minutes 15 --output_dir runs/study-layers

NAME is rl-rank, lr-ratio, layers, batch or capacity. A calibration pass times a short probe run per
mode and scales every run's steps to --minutes (printing the plan); then each condition trains in
this process through the recipes' Python API, for every seed. OUTPUT_DIR gets report.md (the rule,
then the numbers), PNG plots and result.json (verdict, seeds, figures, noise).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from align.core.errors import UserError

NAMES = ("rl-rank", "lr-ratio", "layers", "batch", "capacity")


def add_arguments(p) -> None:
    p.add_argument("name", metavar="NAME", choices=NAMES, help=f"the study: {', '.join(NAMES)}")
    p.add_argument("--minutes", type=float, default=30.0, help="time budget; the calibration fits the step counts "
                                                               "to it (default 30)")
    p.add_argument("--output_dir", default=None, help="where report.md, the PNGs, result.json and runs/ go "
                                                      "(default runs/study-NAME)")
    p.add_argument("--model", "--model_name_or_path", dest="model", default="smollm2",
                   help="the base: 'smollm2' (SmolLM2-135M-Instruct, the default) or a local model folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds, at least 2 (default 0 1): their "
                                                                        "spread is the noise estimate")
    p.add_argument("--num_threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--plan_only", action="store_true", help="calibrate, print the plan and stop")
    # Tests: a cap on the steps the calibration chooses, so a tiny model's study ends in a minute.
    p.add_argument("--max_steps", type=int, default=None, help=argparse.SUPPRESS)


def studies() -> dict:
    from align.study.capacity import CAPACITY
    from align.study.rl_rank import RL_RANK
    from align.study.sft_studies import BATCH_STUDY, LAYERS, LR_RATIO

    return {s.name: s for s in (RL_RANK, LR_RATIO, LAYERS, BATCH_STUDY, CAPACITY)}


def check(args) -> None:
    """Everything that can be wrong with the command line, before any model loads."""
    if len(set(args.seeds)) < 2:
        raise UserError(f"--seeds: expected at least 2 different seeds (their spread is the noise), got {args.seeds}")
    if not args.minutes > 0:
        raise UserError(f"--minutes: expected a positive number, got {args.minutes}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max_steps: expected at least 1, got {args.max_steps}")
    if args.model != "smollm2" and not Path(args.model).is_dir():
        raise UserError(f"--model: {args.model} is not a model folder (or 'smollm2')")


def run(args) -> int:
    from align.study import report
    from align.study.runner import calibrate
    from align.study.runs import Context

    check(args)
    study = studies()[args.name]
    out = Path(args.output_dir or f"runs/study-{args.name}")
    ctx = Context(args.model, out, list(dict.fromkeys(args.seeds)), args.num_threads, args.max_steps)
    study.check(ctx)
    print(f"[study] {args.name}: {study.claim} Seeds {ctx.seeds}, budget {args.minutes:g} min, output {out}",
          flush=True)
    t0 = time.perf_counter()
    plan = calibrate(study, ctx, args.minutes * 60)
    if args.plan_only:
        return 0
    ctx.results.clear()  # the probes are calibration, not results
    outcome = study.execute(ctx, plan)
    path = report.write(study, ctx, plan, outcome, args.minutes, time.perf_counter() - t0)
    v = outcome.verdict
    print(f"[study] {args.name}: {v.verdict} ({v.figures.get('reason')}); report: {path}", flush=True)
    return 0
