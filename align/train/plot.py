"""`align plot PATH`: draw the curves of a run's metrics.jsonl to a PNG, or of every run in a folder of runs.

    align plot runs/dpo-tiny          # -> runs/dpo-tiny/metrics.png
    align plot runs/                  # every metrics.jsonl in runs/ or below, each to its own metrics.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from align.core.errors import UserError


def add_arguments(p) -> None:
    p.add_argument("run", metavar="PATH", help="a run folder (or its metrics.jsonl), or a folder of runs: every "
                                               "metrics.jsonl in it or below is drawn")
    # `--out` was this flag's name: kept as a hidden alias.
    p.add_argument("--output_file", "--out", dest="out", metavar="PNG",
                   help="where to write the PNG of a single run (default: RUN/metrics.png); a folder of runs writes "
                        "each run's beside its metrics.jsonl")
    p.add_argument("--keys", nargs="*", help="metrics to draw (default: all numeric)")


def find_runs(path: str | Path) -> list[Path]:
    """The runs `path` names: itself (a run folder or a metrics.jsonl), else every run folder below it."""
    path = Path(path)
    if path.is_file() or (path / "metrics.jsonl").is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: neither a run folder, a metrics.jsonl, nor a folder of runs")
    runs = sorted(p.parent for p in path.rglob("metrics.jsonl"))
    if not runs:
        raise UserError(f"{path}: no metrics.jsonl in it or in any folder below it")
    return runs


def run(args) -> int:
    from align.train.metrics import plot_metrics

    runs = find_runs(args.run)
    if len(runs) == 1:
        try:
            print(plot_metrics(runs[0], args.out, args.keys))
        except ValueError as e:  # an empty or damaged metrics.jsonl: its own message says which line
            raise UserError(str(e)) from None
        return 0
    if args.out:
        raise UserError(f"--output_file names one PNG, but {args.run} holds {len(runs)} runs; leave it out and "
                        f"each run's PNG is written beside its metrics.jsonl")
    drawn = 0
    for folder in runs:
        try:
            png = plot_metrics(folder, None, args.keys)
        except ValueError as e:  # one bad run does not stop the others
            print(f"skipped {folder}: {e}", file=sys.stderr)
            continue
        drawn += 1
        print(f"{folder}: {png}")
    print(f"{drawn} of {len(runs)} runs drawn", file=sys.stderr)
    return 0 if drawn == len(runs) else 1
