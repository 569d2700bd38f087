"""What the full fine-tuning tests of every recipe check alike, once: the saved model/ is the trained model,
only the last checkpoint is kept, and a resumed run equals an uninterrupted one (4 steps straight against
2 steps then a resume to 4: every base weight and the per-step metrics)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file


def metric_series(run: Path, key: str) -> list:
    """Each logged value of `key` in a run folder's metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def assert_model_saved(folder: Path, trained: dict) -> None:
    """`folder`/model.safetensors holds exactly the `trained` tensors (name -> tensor), no more, no fewer."""
    saved = load_file(str(folder / "model.safetensors"))
    assert saved.keys() == trained.keys() and all(torch.equal(saved[n], trained[n]) for n in saved)


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def assert_resume_is_exact(make: Callable, tmp_path: Path, keys: tuple[str, ...] = ("loss",)):
    """`make(out, max_steps, resume)` builds a trainer. Returns (straight, resumed), both closed, after checking
    that the resumed run starts at step 2 and ends with every base weight and every logged `keys` value of the
    straight run, exactly."""
    straight, first = make(tmp_path / "a", 4, False), make(tmp_path / "b", 2, False)
    resumed = None
    try:
        straight.train()
        first.train()
        first.close()
        resumed = make(tmp_path / "b", 4, True)
        resumed.setup()
        assert resumed.step == 2
        resumed.train()
        a, b = dict(straight.base.model.named_parameters()), dict(resumed.base.model.named_parameters())
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        for key in keys:
            want = metric_series(tmp_path / "a", key)
            assert want and want == metric_series(tmp_path / "b", key), key
        return straight, resumed
    finally:
        for t in (straight, first, resumed):
            if t is not None:
                t.close()
