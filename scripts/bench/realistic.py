"""Benchmark rows shaped like real preference/SFT data, generated offline and deterministically.

The arithmetic rows the other benchmarks use are a few dozen tokens long, where the LM head and the
per-step overhead dominate. Data people align with (UltraFeedback, HH, Tulu) is longer and ragged
inside a batch, where attention, MLP and padding dominate. These rows reproduce that shape without a
download: lengths are drawn from log-normals fitted to the quantiles below, and each text is made of
common English words so that one word is close to one token for a Llama/SmolLM2 tokenizer
(`python scripts/bench/realistic.py` prints the token quantiles it actually produced).

Target quantiles, in tokens (p10 / p50 / p90), after UltraFeedback's binarized preference split:
    prompt  20 / 90 / 400   (capped at 500)
    answer  95 / 250 / 650  (capped at 1,000; chosen and rejected drawn independently)
These are the shape we aim at, stated, not measured here (no dataset hub on this machine); the dataset
card's size agrees with their means (397 MB of train_prefs over 61,966 rows: ~6.4 kB per row, which
holds the prompt once and the chosen answer twice beside the rejected one).

    from realistic import preference_rows, sft_rows, prompt_rows
    rows = preference_rows(256, seed=0)   # [{"prompt", "chosen", "rejected"}]
"""

from __future__ import annotations

import json
import math
import random
import sys

# (median, p90, cap) in tokens; a log-normal through median and p90 (p10 follows from its symmetry).
PROMPT = (90, 400, 500)
ANSWER = (250, 650, 1000)
Z90 = 1.2816  # the standard normal's 90th percentile

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no what up out who them some could more "
    "time two may then do first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came right used take three "
    "small large number water point house system answer model data value example question result method simple "
    "function list step reason because therefore however first second finally consider note check write explain"
).split()


def _length(rng: random.Random, shape: tuple[int, int, int]) -> int:
    median, p90, cap = shape
    sigma = math.log(p90 / median) / Z90
    return max(4, min(cap, round(median * math.exp(rng.gauss(0.0, sigma)))))


def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    for i in range(0, n_words, 12):  # sentences, so the text tokenises like prose (capitals, full stops)
        words[i] = words[i].capitalize()
        if i:
            words[i - 1] += "."
    return " ".join(words) + "."


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` rows of TRL's standard preference format: {"prompt", "chosen", "rejected"} (plain text)."""
    rng = random.Random(seed)
    return [{"prompt": _text(rng, _length(rng, PROMPT)), "chosen": " " + _text(rng, _length(rng, ANSWER)),
             "rejected": " " + _text(rng, _length(rng, ANSWER))} for _ in range(n)]


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` rows of TRL's prompt-completion format: {"prompt", "completion"}."""
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(n, seed)]


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` prompt-only rows: {"prompt"} (for RL rollouts)."""
    return [{"prompt": r["prompt"]} for r in preference_rows(n, seed)]


def quantiles(values: list[int]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9), "max": ordered[-1]}


def token_quantiles(rows: list[dict], tokenizer) -> dict:
    """The token-length quantiles of `rows` under `tokenizer`: prompt and answer (chosen and rejected)."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    answers = [count(r[k]) for r in rows for k in ("chosen", "rejected")]
    return {"prompt": quantiles([count(r["prompt"]) for r in rows]), "answer": quantiles(answers)}


if __name__ == "__main__":
    import measure  # noqa: F401  (the import path: this checkout first)
    from transformers import AutoTokenizer

    from align.core.smollm import ensure_smollm2

    rows = preference_rows(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
    print(json.dumps(token_quantiles(rows, AutoTokenizer.from_pretrained(str(ensure_smollm2())))))
