"""Preference pairs for reward models: optional per-pair margins, and the demo task's pairs.

Rows are read and validated by `align.data.preference` (the same formats and errors as DPO). A
reward row may carry one extra field, `margin` (a number, default 0): how much the
chosen answer should win by (Bradley–Terry with margin, as in Llama 2's reward models).
"""

from __future__ import annotations

import json
import math
import os
import random

from align.data.preference import DataError, DataIssue, read_records


def read_margins(source, split: str = "train", config: str | None = None, label: str | None = None
                 ) -> dict[str, float]:
    """{row place ("file:line"): margin} for the rows that have a `margin` field.

    Places match `PreferenceRow.where`, so margins follow rows through skipping and
    tokenization. A margin that is not a finite number is an error naming the row.
    """
    margins: dict[str, float] = {}
    issues: list[DataIssue] = []
    for where, record in read_records(source, split, config, label):
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
    from align.core.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pairs_from_samples(rows: list[dict], texts: list[list[str]], max_per_prompt: int = 3) -> list[dict]:
    """Preference rows from several sampled answers per prompt, ranked by the task reward.

    Every answer with a higher `arithmetic.score` beats every distinct answer with a lower
    one; per prompt the pairs with the largest score gap come first, at most
    `max_per_prompt` of them (pairs of one prompt share answers, so more adds little).
    Prompts whose answers all score the same give no pair.
    """
    from align.tasks.arithmetic import score

    out = []
    for row, group in zip(rows, texts, strict=True):
        scored = {t.strip(): score(t, row["answer"]) for t in group if t.strip()}
        ranked = sorted(scored.items(), key=lambda kv: -kv[1])
        pairs = [(hi, lo) for i, hi in enumerate(ranked) for lo in ranked[i + 1:] if hi[1] > lo[1]]
        pairs.sort(key=lambda p: p[1][1] - p[0][1])  # largest gap first (stable: best answers first)
        out += [{"prompt": row["prompt"], "chosen": hi[0], "rejected": lo[0], "answer": row["answer"]}
                for hi, lo in pairs[:max_per_prompt]]
    return out


def sampled_arithmetic_pairs(base, model_path: str, n: int, seed: int, samples_per_prompt: int = 4,
                             temperature: float = 0.7, max_new_tokens: int = 16, engine: str = "auto",
                             max_rounds: int = 20, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` demo-task pairs made of the base model's own answers, as the DPO demo makes them.

    This is what a reward model for the task meets in PPO: the policy's samples, right and
    wrong, in whatever form the model writes. Prompts are sampled in rounds (vLLM when
    installed, bfloat16 where the hardware has it; adapters off) until `n` pairs exist. Prompts in `exclude`
    are not used (keep held-out prompts out of training).
    """
    from tqdm import tqdm

    from align.core.hardware import fast_bfloat16
    from align.data.prompts import encode_prompts
    from align.engines import make_engine, vllm_available
    from align.tasks.arithmetic import make_prompts

    kind = engine if engine != "auto" else "vllm" if vllm_available() else "hf"
    # bfloat16 samples ~2.4x faster where the CPU has it natively, and several times slower where not.
    fast = kind == "vllm" and fast_bfloat16(str(next(base.model.parameters()).device))
    eng = make_engine(kind, model_path, base, seed=seed, **({"dtype": "bfloat16"} if fast else {}))
    pairs: list[dict] = []
    batch = max(64, n)  # prompts per round; about a third of SmolLM2's prompts yield pairs
    # Rounds take minutes on a busy CPU: the bar counts pairs made, one update per sampled and scored round.
    with tqdm(total=n, desc="demo pairs (sample, score)", unit="pair") as bar:
        try:
            for r in range(max_rounds):
                rows = [row for row in make_prompts(batch, seed=seed * 1000 + r) if row["prompt"] not in exclude]
                if not rows:
                    continue
                outs = eng.generate(encode_prompts(base.tokenizer, rows), n=samples_per_prompt,
                                    max_new_tokens=max_new_tokens, temperature=temperature, adapter=None)
                new = pairs_from_samples(rows, [[o.text for o in group] for group in outs])
                bar.update(min(len(new), n - len(pairs)))
                bar.set_postfix(round=r + 1)
                pairs += new
                if len(pairs) >= n:
                    return pairs[:n]
        finally:
            eng.close()
    raise RuntimeError(f"only {len(pairs)} of {n} demo pairs after {max_rounds} rounds of {batch} prompts: the "
                       "model's answers to a prompt rarely differ in reward; try demo_source: synthetic")
