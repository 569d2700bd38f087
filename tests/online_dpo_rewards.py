"""A reward function for tests/test_online_dpo.py, by dotted path: every completion of a row with `tie`
scores the same (a tie: no pair), the others score by their length."""

from __future__ import annotations


def tie_or_length(completions, tie, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [0.0 if t else -float(len(text)) for text, t in zip(texts, tie, strict=True)]
