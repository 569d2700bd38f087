"""Preference pairs for reward models: optional per-pair margins, and the demo task's pairs.

Rows are read and validated by `align.data` (the same formats and errors as DPO). A
reward row may carry one extra field, `margin` (a number, default 0): how much the
chosen answer should win by (Bradley–Terry with margin, as in Llama 2's reward models).
"""

from __future__ import annotations

import json
import math
import os
import random

from align.data import DataError, DataIssue, read_records


def read_margins(source: str | os.PathLike, split: str = "train") -> dict[str, float]:
    """{row place ("file:line"): margin} for the rows that have a `margin` field.

    Places match `PreferenceRow.where`, so margins follow rows through skipping and
    tokenization. A margin that is not a finite number is an error naming the row.
    """
    margins: dict[str, float] = {}
    issues: list[DataIssue] = []
    for where, record in read_records(source, split):
        if not isinstance(record, dict) or record.get("margin") is None:
            continue
        m = record["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            issues.append(DataIssue(where, "margin", f"expected a finite number (how much chosen should win by), "
                                                     f"got {m!r}"))
            continue
        margins[where] = float(m)
    if issues:
        raise DataError(issues)
    return margins


def _wrong_near(c: int, rng: random.Random) -> int:
    """A wrong sum with the same number of digits as `c`: the units or the tens digit is off."""
    while True:
        delta = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30]) * rng.choice([-1, 1])
        w = c + delta
        if w > 0 and w != c and len(str(w)) == len(str(c)):
            return w


def arithmetic_pairs(n: int, seed: int, low: int = 10, high: int = 50, bare_share: float = 0.25) -> list[dict]:
    """`n` preference rows for the demo task (align/tasks/arithmetic.py), length-balanced.

    chosen is the correct sum and rejected a wrong one with the same number of digits,
    written in the same form, so "the longer answer wins" is no better than a coin: only
    correctness separates them. Most rows use the form SmolLM2 itself answers in, "a + b = c"
    (what a PPO policy on this task samples); a `bare_share` of rows give the number alone.
    A 135M base separates bare-number pairs at chance (it would have to add in its head),
    so a mostly-bare set measures the base's arithmetic, not the reward model.
    """
    if not 0.0 <= bare_share <= 1.0:
        raise ValueError(f"bare_share: expected a fraction in [0, 1], got {bare_share}")
    from align.tasks.arithmetic import INSTRUCTION

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        c, w = a + b, _wrong_near(a + b, rng)
        form = "{c}" if rng.random() < bare_share else "{a} + {b} = {c}"
        rows.append({"prompt": INSTRUCTION.format(a=a, b=b), "chosen": form.format(a=a, b=b, c=c),
                     "rejected": form.format(a=a, b=b, c=w), "answer": str(c)})
    return rows


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> str:
    from align.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
