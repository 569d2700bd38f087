"""Training metrics a person can plot: one JSON line per step, mirrored to the `report_to` trackers
(accelerate's, through align.train.trackers).

`plot_metrics` draws the curves of a run folder to a PNG (the `align plot` command).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Keep the lines of a per-step JSONL log (metrics.jsonl, completions.jsonl) up to `step`.

    A line torn by a kill mid-write is dropped too; step -1 (a fresh start) drops everything.
    """
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= step:
            keep.append(line)
    from align.core.atomic import atomic_write_text

    atomic_write_text(path, "".join(line + "\n" for line in keep))


class MetricsLogger:
    """Appends `{"step": N, **metrics}` to `<run>/metrics.jsonl` and logs it to align.train.trackers' backends."""

    def __init__(self, run_dir: str | os.PathLike, report_to: bool | list[str] = True, config: dict | None = None):
        """`report_to`: accelerate tracker names (align.train.trackers); True/False: the old TensorBoard switch."""
        from align.train.trackers import open_trackers

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if isinstance(report_to, bool):
            report_to = ["tensorboard"] if report_to else []
        self.trackers = open_trackers(report_to, self.run_dir, config)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the curve has no duplicates."""
        truncate_jsonl_after(self.path, step)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step}
        for k, v in metrics.items():
            v = float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v
            row[k] = v
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers:
            from align.train.trackers import scalars

            numbers = scalars(row)
            for tracker in self.trackers:
                tracker.log(step, numbers)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []  # close once, though train() and close() both call it
        for tracker in trackers:
            tracker.close()


class NullLogger:
    """What a process other than the main one logs to: nothing (only the main process writes)."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON object: {e}") from None
    return rows


def plot_metrics(run: str | os.PathLike, out: str | os.PathLike | None = None,
                 keys: list[str] | None = None) -> Path:
    """Draw every numeric metric of a run against step, one small panel each, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    if not rows:
        raise ValueError(f"{run}: no metrics to plot")
    if keys is None:
        keys = sorted({k for r in rows for k, v in r.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    cols = 3
    nrows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(pts) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    run = Path(run)
    out = Path(out) if out else (run if run.is_dir() else run.parent) / "metrics.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
