"""The demo task: "What is a+b? Reply with the number only." with a checkable answer."""

from __future__ import annotations

import random
import re

INSTRUCTION = "What is {a}+{b}? Reply with the number only."


def make_prompts(n: int, seed: int, low: int = 10, high: int = 50) -> list[dict]:
    """`n` rows {"prompt": str, "answer": str} with a, b drawn uniformly from [low, high]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        rows.append({"prompt": INSTRUCTION.format(a=a, b=b), "answer": str(a + b)})
    return rows


_INT = re.compile(r"-?\d+")


def score(completion: str, answer: str) -> float:
    """1.0 for the bare correct number, 0.5 when the last integer is correct, else 0.0."""
    text = completion.strip().rstrip(".").strip()
    if text == answer:
        return 1.0
    numbers = _INT.findall(completion)
    return 0.5 if numbers and numbers[-1] == answer else 0.0


def preference_pairs(n: int, seed: int, low: int = 10, high: int = 50) -> list[dict]:
    """Synthetic standard-format pairs: the bare correct sum beats a wrong worked equation.

    For benchmarks and smoke tests; the demo builds its pairs from the model's own samples.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        rows.append({"prompt": INSTRUCTION.format(a=a, b=b), "chosen": str(a + b),
                     "rejected": f"{a} + {b} = {wrong}"})
    return rows
