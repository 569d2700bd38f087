"""`log_completions`: what the policy wrote at a logging step, beside what each reward made of it.

One JSON line per completion in `<run>/completions.jsonl` ({"step", "prompt", "completion", "reward",
"advantage", <each reward function>}), the same table to the trackers that take tables (W&B's
`completions`, as TRL names it), and `num_completions_to_print` rows printed. A resumed run drops
the lines of steps after its checkpoint, as metrics.jsonl does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from align.train.metrics import truncate_jsonl_after

COLUMNS = ("step", "prompt", "completion", "reward", "advantage")


def _text(x) -> str:
    if isinstance(x, list):  # a conversation: its turns' contents, each after its role
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in x if isinstance(m, dict))
    return str(x)


def _number(v: float) -> float | None:
    return None if math.isnan(v) else round(float(v), 6)


def completion_rows(step: int, rows: list[dict], texts: list[str], rewards, per_func, names: list[str],
                    advantages, extra: dict[str, list] | None = None) -> list[dict]:
    """The table: one dict per completion; a reward a function left unscored (None) stays null. `extra`:
    columns reward functions added with log_extra (one value per completion; others are left out)."""
    extra = {k: v for k, v in (extra or {}).items() if len(v) == len(texts)}
    table = []
    for i, (row, text) in enumerate(zip(rows, texts, strict=True)):
        entry = {"step": step, "prompt": _text(row["prompt"]), "completion": text,
                 "reward": _number(rewards[i].item()), "advantage": _number(advantages[i].item())}
        entry.update({name: _number(per_func[i, j].item()) for j, name in enumerate(names)})
        entry.update({column: values[i] for column, values in extra.items()})
        table.append(entry)
    return table


class CompletionsLog:
    def __init__(self, run_dir: Path, trackers: list, to_print: int | None):
        self.path = Path(run_dir) / "completions.jsonl"
        self.trackers = trackers
        self.to_print = to_print

    def truncate_after(self, step: int) -> None:
        truncate_jsonl_after(self.path, step)

    def write(self, table: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, default=str) + "\n" for r in table))
        for tracker in self.trackers:
            tracker.log_table(table[0]["step"], "completions", table)
        shown = table if self.to_print is None else table[:self.to_print]
        if shown:
            from tqdm import tqdm

            for r in shown:
                tqdm.write(f"[step {r['step']}] reward {r['reward']}  {r['prompt'][-60:]!r} -> {r['completion'][:80]!r}")
