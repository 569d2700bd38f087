"""The figures of `align study`, as PNGs beside report.md (matplotlib, no display). Every point is a seed
mean with the seeds' range as its error bar; the title carries the verdict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from align.study.verdict import Verdict, mean


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread(values: Sequence[float]) -> tuple[float, float]:
    m = mean(values)
    return m - min(values), max(values) - m


def _save(fig, plt, path: Path, title: str, verdict: Verdict) -> Path:
    fig.suptitle(f"{title}: {verdict.verdict}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _series(ax, xs: Sequence[float], per_x: Sequence[Sequence[float]], label: str) -> None:
    low, high = zip(*(_spread(v) for v in per_x))
    ax.errorbar(xs, [mean(v) for v in per_x], yerr=[low, high], marker="o", capsize=3, label=label)


def nll_vs_lr(path: Path, grid: Sequence[float], nll: Mapping[str, Mapping[float, Sequence[float]]],
              verdict: Verdict) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, by_lr in nll.items():
        _series(ax, grid, [by_lr[lr] for lr in grid], mode)
        best = verdict.figures.get("optimum_lr", {}).get(mode)
        if best:
            ax.axvline(best, linestyle=":", alpha=0.6)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="held-out NLL (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, plt, path, "lr-ratio", verdict)


def bars(path: Path, values: Mapping[str, Sequence[float]], ylabel: str, verdict: Verdict) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    names = list(values)
    low, high = zip(*(_spread(values[n]) for n in names))
    ax.bar(names, [mean(values[n]) for n in names], yerr=[low, high], capsize=4)
    ax.set(ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, path, "layers", verdict)


def nll_vs_batch(path: Path, nll: Mapping[str, Mapping[int, Sequence[float]]], verdict: Verdict) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, by_batch in nll.items():
        sizes = sorted(by_batch)
        _series(ax, sizes, [by_batch[b] for b in sizes], mode)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size (same examples)", ylabel="held-out NLL (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, plt, path, "batch", verdict)


def capacity(path: Path, data_bits: float, points: Mapping[str, tuple[int, Sequence[float]]],
             verdict: Verdict) -> Path:
    """Bits absorbed vs trainable parameters, log-log, with the 2 bits/parameter line and the data's bits."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (params, bits) in points.items():
        low, high = _spread(bits)
        ax.errorbar([params], [max(mean(bits), 1e-1)], yerr=[[low], [high]], marker="o", capsize=3, label=name)
    xs = sorted(p for p, _ in points.values())
    ax.plot(xs, [2 * x for x in xs], "k--", label="2 bits / parameter")
    ax.axhline(data_bits, color="grey", linestyle=":", label="bits in the data")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="trainable parameters", ylabel="bits absorbed")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path, "capacity", verdict)


def curves(path: Path, curves: Mapping[str, Sequence[dict]], key: str, ylabel: str, verdict: Verdict,
           title: str) -> Path:
    """`key` against step for each named run (its metrics.jsonl rows)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=name)
    ax.set(xlabel="step", ylabel=ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path, title, verdict)
