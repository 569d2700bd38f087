"""The data sets of `align study`, written as TRL prompt-completion .jsonl files the SFT recipe reads.

- Arithmetic rows (lr-ratio, layers, batch): "What is a+b?" -> the sum, three-digit operands, so the
  held-out NLL measures a skill learnt, not rows remembered. Held-out prompts never appear in training.
- The capacity set: random keys mapped to random digit strings. Its information content is known
  exactly: each value digit is uniform over 10 and independent of everything else, so the set holds
  keys x digits x log2(10) bits, whatever a model knows beforehand.
"""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path

from align.tasks.arithmetic import make_prompts

SUM_RANGE = (100, 999)
KEY_LETTERS = 6


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arithmetic_rows(n: int, seed: int, exclude=frozenset()) -> list[dict]:
    """`n` prompt-completion rows of three-digit sums, none of whose prompts is in `exclude`."""
    low, high = SUM_RANGE
    return [{"prompt": r["prompt"], "completion": r["answer"]}
            for r in make_prompts(n, seed, low=low, high=high, exclude=exclude)]


def arithmetic_files(folder: Path, n_train: int, n_eval: int, seed: int = 1234) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) in `folder`: the held-out set first, then training rows outside it."""
    held_out = arithmetic_rows(n_eval, seed)
    train = arithmetic_rows(n_train, seed + 1, exclude=frozenset(r["prompt"] for r in held_out))
    return write_jsonl(train, folder / "train.jsonl"), write_jsonl(held_out, folder / "eval.jsonl")


def capacity_rows(keys: int, digits: int, seed: int) -> list[dict]:
    """`keys` rows {"prompt": "key: <6 letters> value:", "completion": " <digits random digits>"}; keys unique."""
    if keys > len(string.ascii_lowercase) ** KEY_LETTERS:
        raise ValueError(f"capacity set: {keys} keys do not fit in {KEY_LETTERS} letters")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < keys:
        key = "".join(rng.choice(string.ascii_lowercase) for _ in range(KEY_LETTERS))
        if key in seen:  # a repeated key with two values would hold fewer bits than counted
            continue
        seen.add(key)
        value = "".join(rng.choice(string.digits) for _ in range(digits))
        rows.append({"prompt": f"key: {key} value:", "completion": f" {value}"})
    return rows


def capacity_bits(keys: int, digits: int) -> float:
    """The information in a capacity set, exactly: every value digit is a uniform, independent choice of 10."""
    return keys * digits * math.log2(10)
