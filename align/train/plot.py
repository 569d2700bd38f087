"""`align plot RUN_DIR`: draw the curves of metrics.jsonl to a PNG."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("run", help="run folder (or its metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default: RUN/metrics.png)")
    p.add_argument("--keys", nargs="*", help="metrics to draw (default: all numeric)")


def run(args) -> int:
    from align.train.metrics import plot_metrics

    print(plot_metrics(args.run, args.out, args.keys))
    return 0
