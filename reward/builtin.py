"""The built-in programmatic rewards, in TRL's reward-function signature.

Each is called by keyword as TRL's GRPOTrainer calls a reward function:
`fn(prompts=..., completions=..., completion_ids=..., **columns)`, where `columns` are the
dataset's other columns (one value per row). Completions are strings for string prompts and
`[{"role": "assistant", "content": text}]` for conversational ones; both are read here.
A row may be scored None ("no opinion"): it becomes NaN and other functions decide it.
"""

from __future__ import annotations

import re
from collections.abc import Callable


def as_text(x) -> str:
    """A completion or prompt as text: chat messages are reduced to their contents, joined by newlines."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and all(isinstance(m, dict) and "content" in m for m in x):
        return "\n".join(str(m["content"]) for m in x)
    raise TypeError(f"expected text or a list of chat messages, got {type(x).__name__}")


def arithmetic(completions: list, answer: list, **kwargs) -> list[float | None]:
    """The demo task's verifiable reward (align/tasks/arithmetic.py `score`): 1 for the bare
    correct number, 0.5 when the last integer is correct, else 0; None where `answer` is None."""
    from align.tasks.arithmetic import score

    return [None if a is None else score(as_text(c), str(a)) for c, a in zip(completions, answer, strict=True)]


_BARE_NUMBER = re.compile(r"-?\d+")


def answer_format(completions: list, **kwargs) -> list[float]:
    """1 when the completion is a bare integer ("Reply with the number only"), else 0.
    Correctness is not checked: weigh it with `arithmetic` for that."""
    return [1.0 if _BARE_NUMBER.fullmatch(as_text(c).strip().rstrip(".").strip()) else 0.0 for c in completions]


def length_penalty(completions: list, *, limit: int = 0, per_char: float = 0.01, **kwargs) -> list[float]:
    """-per_char for every character beyond `limit` (default: -0.01 per character), never positive.
    Spec form with arguments: "length_penalty(limit=16, per_char=0.05)"."""
    return [-per_char * max(0, len(as_text(c)) - limit) for c in completions]


# Config names -> functions. Their keyword-only parameters are what "name(key=value)" may set.
REGISTRY: dict[str, Callable] = {
    "arithmetic": arithmetic,
    "format": answer_format,
    "length_penalty": length_penalty,
}
