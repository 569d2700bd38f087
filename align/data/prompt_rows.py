"""Prompt rows for RL (PPO/GRPO/RLOO): from the built-in demo task or any source DPO reads.

    load_prompt_rows(source, *, split="train", config=None, n=None, seed=0, exclude=frozenset(),
                     label=None) -> PromptRows

`source` is "arithmetic" (the demo task, align/tasks/arithmetic.py) or anything
`align.data.sources.read_source` takes: a .jsonl/.json/.parquet/.csv file, a save_to_disk folder, a
folder of data files, a hub id (with `config` and `split`), a `datasets.Dataset` or a list of dicts.

Each row is the source's row as it is: its "prompt" (checked) and every other column (`answer`,
`solution`, `image`, ...) for reward functions. Where a row came from ("prompts.jsonl:3") is kept
beside the rows, in `PromptRows.places`, never inside them, so no column of the user's (a "row"
column included) is overwritten or shadowed. Every bad row is reported at once, before any model
loads: this module touches no model.
"""

from __future__ import annotations

from align.data.issues import DataError, DataIssue, collect_rows
from align.data.sources import describe, read_source

DEMO_TASK = "arithmetic"
# TRL renders every conversational RL prompt with add_generation_prompt=True: the model answers next,
# so the last turn must be one it answers (a system or assistant turn last would be rendered as a closed
# turn followed by an empty assistant header).
ANSWERED_ROLES = ("user", "tool")


class PromptRows(list):
    """A list of prompt rows (plain dicts, exactly the source's columns) with `places`: where each came from.

    It is a list so code that indexes, slices or iterates rows keeps working; a slice or copy is a
    plain list without places (`encode_prompts` then names rows by index).
    """

    def __init__(self, rows=(), places: list[str] | None = None):
        super().__init__(rows)
        self.places = list(places) if places is not None else [f"row {i}" for i in range(len(self))]
        if len(self.places) != len(self):
            raise ValueError(f"PromptRows: {len(self.places)} places for {len(self)} rows")


def _message_issue(message, i: int) -> str | None:
    if not isinstance(message, dict):
        return f"message {i} is a {type(message).__name__}; expected {{\"role\": ..., \"content\": ...}}"
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role:
        return f"message {i} has no \"role\" string (got {role!r}); expected e.g. \"user\""
    if not isinstance(content, str):
        got = "missing" if content is None else f"a {type(content).__name__}"
        return f"message {i} ({role}): \"content\" is {got}; expected a string"
    return None


def prompt_issue(prompt) -> str | None:
    """Why `prompt` cannot be sampled from, or None: a non-empty string, or messages ending with a user turn."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "empty; expected a non-empty string or a list of messages"
    if not isinstance(prompt, list):
        return (f"a {type(prompt).__name__}; expected a non-empty string or a list of "
                f"{{\"role\", \"content\"}} messages")
    if not prompt:
        return "an empty list; expected at least one {\"role\", \"content\"} message"
    for i, message in enumerate(prompt):
        why = _message_issue(message, i)
        if why:
            return why
    if prompt[-1]["role"] not in ANSWERED_ROLES:
        return (f"the last message is a {prompt[-1]['role']!r} turn; expected a user (or tool) turn, the one "
                f"the model answers")
    if not any(m["content"].strip() for m in prompt):
        return "every message is empty; expected some text to answer"
    return None


def validate_prompt_row(record, where: str) -> tuple[dict | None, list[DataIssue]]:
    """(the row as it is, []) or (None, [the issue naming `where`])."""
    if not isinstance(record, dict):
        return None, [DataIssue(where, None, f"a {type(record).__name__}; expected an object with a \"prompt\"")]
    if "prompt" not in record or record["prompt"] is None:
        return None, [DataIssue(where, "prompt", f"missing; expected a string or a list of messages "
                                                 f"(got fields {sorted(record)})")]
    why = prompt_issue(record["prompt"])
    return (None, [DataIssue(where, "prompt", why)]) if why else (dict(record), [])


def _demo_rows(n: int | None, seed: int, exclude) -> PromptRows:
    from align.tasks.arithmetic import make_prompts

    if n is None:
        raise DataError([DataIssue(DEMO_TASK, None, "how many prompts to draw: n is required for the demo task")])
    rows = make_prompts(n, seed, exclude=exclude)
    return PromptRows(rows, [f"{DEMO_TASK}: row {i}" for i in range(len(rows))])


def _kept(records, n: int | None, exclude):
    """The first `n` records whose (string) prompt is not in `exclude`; unreadable ones pass to be reported."""
    kept = 0
    for where, record in records:
        if n is not None and kept >= n:
            return
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if isinstance(prompt, str) and prompt in exclude:
            continue
        kept += 1
        yield where, record


def load_prompt_rows(source, *, split: str = "train", config: str | None = None, n: int | None = None,
                     seed: int = 0, exclude=frozenset(), label: str | None = None) -> PromptRows:
    """Prompt rows of `source` (see the module docstring), every bad one listed in one DataError.

    n: how many rows (the demo task draws n; other sources keep their first n, in order; None: all).
    seed: the demo task's draw; other sources keep their order. exclude: string prompts to leave out
    (held-out ones). label: the name of a Dataset or list in messages ("LABEL: row N").
    """
    if n is not None and n < 0:
        raise DataError([DataIssue(str(label or "prompts"), None, f"n={n}; expected a count >= 0 or None")])
    if isinstance(source, str) and source == DEMO_TASK:
        return _demo_rows(n, seed, exclude)
    places = []

    def validate(record, where):
        row, issues = validate_prompt_row(record, where)
        if row is not None:
            places.append(where)
        return row, issues

    rows, issues, seen_any = collect_rows(_kept(read_source(source, split, config, label), n, exclude), validate)
    if issues:
        raise DataError(issues)
    if not rows and (n is None or n > 0):
        what = "no rows" if not seen_any else "no rows left outside `exclude`"
        raise DataError([DataIssue(label or describe(source), None, f"{what}; expected at least one prompt row")])
    return PromptRows(rows, places)
