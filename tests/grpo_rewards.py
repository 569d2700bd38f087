"""Reward functions written for TRL's GRPOTrainer, used by dotted path in tests/data/trl/grpo_lora.yaml.

Each records the keyword arguments it was called with (to $GRPO_TEST_CALLS, one JSON line per call)
so a test can check what reached it: every dataset column by name, completions, completion_ids.
"""

from __future__ import annotations

import json
import os


def _record(name: str, completions, kwargs) -> None:
    path = os.environ.get("GRPO_TEST_CALLS")
    if path:
        kinds = sorted({type(c).__name__ for c in completions})
        with open(path, "a") as f:
            f.write(json.dumps({"fn": name, "keys": sorted(kwargs), "completion_types": kinds,
                                "step": kwargs.get("step")}) + "\n")


def correct(completions, solution, **kwargs):
    """1 where the completion contains the row's `solution`; None where the row has no solution."""
    _record("correct", completions, {"solution": solution, **kwargs})
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [None if s is None else float(str(s) in t) for t, s in zip(texts, solution, strict=True)]


def short(completions, completion_ids, trainer_state, log_metric, log_extra, **kwargs):
    """Fewer tokens score higher: -len(completion_ids) / 10. Uses TRL's trainer_state, log_metric and log_extra."""
    _record("short", completions, {"completion_ids": completion_ids, "step": trainer_state.global_step, **kwargs})
    log_metric("short/mean_ids", sum(map(len, completion_ids)) / len(completion_ids))
    log_extra("n_ids", [len(ids) for ids in completion_ids])
    return [-len(ids) / 10 for ids in completion_ids]
