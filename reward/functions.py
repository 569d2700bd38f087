"""Programmatic rewards: plain functions with one batch interface.

A reward function takes the batch `(prompts, completions, answers)` and returns one
float per row; `answers` holds reference answers (or None) for tasks that have them.
Built-in ones are looked up by name; a user's own is named `module:function` in a
config. `combine` adds several with weights, and `compute_rewards` is the one place
that checks what a function returned, so a bad row is reported by its index.

    fn = combine([("arithmetic", 1.0), ("length_penalty(limit=8)", 0.1)])
    rewards = compute_rewards(fn, prompts, completions, answers)
"""

from __future__ import annotations

import ast
import importlib
import math
import re
from collections.abc import Callable, Sequence

from align.core.errors import UserError

RewardFn = Callable[[list[str], list[str], "list[str | None] | None"], list[float]]


class RewardError(UserError, ValueError):
    """A reward function that cannot be found, raised on a row, or returned a bad value."""


# -- built-in rewards ---------------------------------------------------------------------------


def _need_answers(answers, n: int, who: str) -> list:
    if answers is None:
        raise RewardError(f"{who}: needs reference answers (the `answer` of each prompt), got none")
    return list(answers)


def arithmetic(prompts: list[str], completions: list[str], answers: list[str | None] | None) -> list[float]:
    """The demo task's verifiable reward (align/tasks/arithmetic.py `score`): 1 for the bare
    correct number, 0.5 when the last integer is correct, else 0."""
    from align.tasks.arithmetic import score

    answers = _need_answers(answers, len(completions), "arithmetic")
    out = []
    for i, (c, a) in enumerate(zip(completions, answers, strict=True)):
        if a is None:
            raise RewardError(f"arithmetic: row {i} has no reference answer")
        out.append(score(c, str(a)))
    return out


_BARE_NUMBER = re.compile(r"-?\d+")


def answer_format(prompts: list[str], completions: list[str], answers: list[str | None] | None = None,
                  ) -> list[float]:
    """1 when the completion is a bare integer ("Reply with the number only"), else 0.
    Correctness is not checked: combine with `arithmetic` for that."""
    return [1.0 if _BARE_NUMBER.fullmatch(c.strip().rstrip(".").strip()) else 0.0 for c in completions]


def length_penalty(prompts: list[str], completions: list[str], answers: list[str | None] | None = None,
                   *, limit: int = 0, per_char: float = 0.01) -> list[float]:
    """-per_char for every character beyond `limit` (default: -0.01 per character), never positive.
    Spec form with arguments: "length_penalty(limit=16, per_char=0.05)"."""
    return [-per_char * max(0, len(c) - limit) for c in completions]


REGISTRY: dict[str, Callable] = {
    "arithmetic": arithmetic,
    "format": answer_format,
    "length_penalty": length_penalty,
}


# -- lookup ---------------------------------------------------------------------------------------

_CALL = re.compile(r"^\s*([A-Za-z_][\w]*)\s*\((.*)\)\s*$", re.S)


def _parse_kwargs(spec: str, body: str) -> dict:
    """`limit=16, per_char=0.05` -> {"limit": 16, "per_char": 0.05}: literals only, nothing is executed."""
    try:
        call = ast.parse(f"f({body})", mode="eval").body
        if call.args:
            raise ValueError("positional arguments")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise RewardError(f"reward {spec!r}: expected name(key=literal, ...), e.g. "
                          f"'length_penalty(limit=16)': {e}") from None


def get_reward_fn(spec: str) -> RewardFn:
    """A built-in reward by name (optionally `name(key=value, ...)`), or a user's `module:function`."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward: expected a name from {sorted(REGISTRY)} or 'module:function', got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        return _import_fn(spec)
    name, kwargs = spec, {}
    m = _CALL.match(spec)
    if m:
        name, kwargs = m.group(1), _parse_kwargs(spec, m.group(2))
    if name not in REGISTRY:
        raise RewardError(f"reward {spec!r}: unknown name; expected one of {sorted(REGISTRY)} "
                          f"or 'module:function' for your own")
    fn = REGISTRY[name]
    if not kwargs:
        return fn
    import inspect

    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise RewardError(f"reward {spec!r}: unknown argument(s) {unknown}; {name} takes {allowed or 'none'}")

    def bound(prompts, completions, answers=None):
        return fn(prompts, completions, answers, **kwargs)

    bound.__name__ = spec
    return bound


def _import_fn(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward {spec!r}: expected 'module:function', e.g. 'my_rewards:exact_match'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r} ({e}); "
                          f"is it on PYTHONPATH?") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {spec!r}: {attr!r} is a {type(obj).__name__}, expected a function "
                          f"(prompts, completions, answers) -> list of floats")
    return obj


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


# -- validation -----------------------------------------------------------------------------------


def as_text(x) -> str:
    """A completion or prompt as text: chat messages are reduced to their contents, joined by newlines."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and all(isinstance(m, dict) and "content" in m for m in x):
        return "\n".join(str(m["content"]) for m in x)
    raise RewardError(f"expected text or a list of chat messages, got {type(x).__name__}")


def _row(prompts, completions, i: int) -> str:
    c = completions[i]
    return f"row {i} (prompt {str(prompts[i])[:60]!r}, completion {str(c)[:60]!r})"


def compute_rewards(fn: RewardFn | str, prompts: Sequence, completions: Sequence,
                    answers: Sequence | None = None) -> list[float]:
    """Call `fn` on the batch and check the result: one finite number per row.

    A function that raises is re-run row by row to find the row it fails on; the
    RewardError names that row, the function and the original error.
    """
    if isinstance(fn, str):
        fn = get_reward_fn(fn)
    name = _name(fn)
    n = len(completions)
    if len(prompts) != n or (answers is not None and len(answers) != n):
        raise RewardError(f"reward {name}: got {len(prompts)} prompts, {n} completions and "
                          f"{'no' if answers is None else len(answers)} answers; expected equal lengths")
    prompts = [as_text(p) for p in prompts]
    completions = [as_text(c) for c in completions]
    answers = None if answers is None else list(answers)
    try:
        values = fn(prompts, completions, answers)
    except RewardError:
        raise
    except Exception as batch_error:  # noqa: BLE001 - any failure of user code is reported by row
        for i in range(n):
            try:
                fn(prompts[i:i + 1], completions[i:i + 1], None if answers is None else answers[i:i + 1])
            except Exception as e:  # noqa: BLE001
                raise RewardError(f"reward {name} failed on {_row(prompts, completions, i)}: "
                                  f"{type(e).__name__}: {e}") from e
        raise RewardError(f"reward {name} failed on the batch of {n} rows (no single row fails alone): "
                          f"{type(batch_error).__name__}: {batch_error}") from batch_error
    try:
        values = [v.item() if hasattr(v, "item") else v for v in values]
    except TypeError:
        raise RewardError(f"reward {name}: returned {type(values).__name__}, expected a list of "
                          f"{n} floats") from None
    if len(values) != n:
        raise RewardError(f"reward {name}: returned {len(values)} values for {n} rows")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RewardError(f"reward {name} returned {v!r} ({type(v).__name__}) on "
                              f"{_row(prompts, completions, i)}; expected a float")
        if not math.isfinite(v):
            raise RewardError(f"reward {name} returned {v} on {_row(prompts, completions, i)}; "
                              f"expected a finite number")
        out.append(float(v))
    return out


# -- combining ------------------------------------------------------------------------------------


class CombinedReward:
    """sum_k weight_k * reward_k, each part checked by `compute_rewards`; `parts()` shows them apart."""

    def __init__(self, specs: list[tuple[str | RewardFn, float]]):
        if not specs:
            raise RewardError("combine: expected at least one (reward, weight) pair")
        self.fns: list[tuple[str, RewardFn, float]] = []
        names: dict[str, int] = {}
        for k, item in enumerate(specs):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise RewardError(f"combine: item {k} is {item!r}; expected (reward, weight)")
            spec, weight = item
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise RewardError(f"combine: item {k} ({spec!r}) has weight {weight!r}; expected a finite number")
            fn = get_reward_fn(spec) if isinstance(spec, str) else spec
            name = spec if isinstance(spec, str) else _name(fn)
            if name in names:  # the same reward twice keeps both, under distinct names
                names[name] += 1
                name = f"{name}#{names[name]}"
            else:
                names[name] = 0
            self.fns.append((name, fn, float(weight)))
        self.__name__ = " + ".join(f"{w:g}*{n}" for n, _, w in self.fns)

    def parts(self, prompts, completions, answers=None) -> dict[str, list[float]]:
        """Unweighted values of each part, keyed by its name."""
        return {name: compute_rewards(fn, prompts, completions, answers) for name, fn, _ in self.fns}

    def total_and_parts(self, prompts, completions, answers=None) -> tuple[list[float], dict[str, list[float]]]:
        """The weighted sum and the unweighted parts it was made of, each part computed once."""
        parts = self.parts(prompts, completions, answers)
        total = [0.0] * len(completions)
        for name, _, w in self.fns:
            total = [t + w * v for t, v in zip(total, parts[name], strict=True)]
        return total, parts

    def __call__(self, prompts, completions, answers=None) -> list[float]:
        return self.total_and_parts(prompts, completions, answers)[0]


def combine(specs: list[tuple[str | RewardFn, float]]) -> CombinedReward:
    """Weighted sum of rewards given as (name, 'module:function' or a function, weight)."""
    return CombinedReward(specs)
