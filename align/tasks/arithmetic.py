"""The demo task: "What is a+b? Reply with the number only." with a checkable answer."""

from __future__ import annotations

import random
import re

INSTRUCTION = "What is {a}+{b}? Reply with the number only."
# The demo configs' system prompt (configs/grpo_demo.yaml): without it SmolLM2-135M-Instruct explains before it
# answers and a short completion scores 0, with it the base scores ~0.18 greedy, inside the band RL can move.
SYSTEM_PROMPT = "You are a calculator. Reply with the result only, for example: 42"


def make_prompts(n: int, seed: int, low: int = 10, high: int = 50, exclude=frozenset()) -> list[dict]:
    """`n` rows {"prompt": str, "answer": str} with a, b drawn uniformly from [low, high].

    Prompts in `exclude` (a held-out set) are skipped and drawn again, so training rows never hold
    an evaluation prompt: with [10, 50] there are only 1,681 sums and 300 + 100 random draws share
    about 18.
    """
    rng = random.Random(seed)
    rows = []
    draws = 0
    while len(rows) < n:
        draws += 1
        if draws > 100 * n + 10_000:  # an exclude set covering every sum would loop forever
            raise ValueError(f"arithmetic prompts: found {len(rows)} of {n} outside the {len(exclude)} excluded")
        a, b = rng.randint(low, high), rng.randint(low, high)
        prompt = INSTRUCTION.format(a=a, b=b)
        if prompt not in exclude:
            rows.append({"prompt": prompt, "answer": str(a + b)})
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
