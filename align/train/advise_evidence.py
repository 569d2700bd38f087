"""What `align advise` rests its advice on: a measured bound on the data's information, and the study's claims.

Information. A rule of thumb (1 bit per completion token) says little about a given dataset: text the
base already predicts well carries far less. So advise runs the base over the first rows once (no
training) and sums the log-loss of every trained token, in bits. That is the data's code length
under the base: an upper bound on what an adapter must store to fit it (the base's mistakes, not
the text), never an estimate from below. Scaled from the rows measured to all rows by tokens.

Claims. Each piece of advice names the claim of "LoRA Without Regret" (Schulman et al., Thinking
Machines, 2025) it follows from, and the `align study` that checks the claim on this machine. When
that study has been run (a `result.json` under the study folder), advise cites its verdict and path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# claim key -> (the claim, in the post's terms; the `align study` that tests it)
CLAIMS = {
    "capacity": ("LoRA falls behind full fine-tuning once the data holds more information than the adapter "
                 "can store (about 2 bits per parameter)", "capacity"),
    "lr": ("LoRA's best learning rate is about 10x full fine-tuning's (fitted 9.8, independent of rank)",
           "lr-ratio"),
    "batch": ("LoRA loses more than full fine-tuning at large batch sizes, whatever the rank", "batch"),
    "rl": ("in RL, LoRA matches full fine-tuning even at rank 1 (little information per episode)", "rl-rank"),
}
RANKS = (1, 4, 8, 16, 32, 64, 128, 256)


def measured_bits(source, model_path: str, rows: int, max_length: int, split: str = "train",
                  config: str | None = None, chat_template: bool = True) -> dict:
    """Log-loss in bits of the base on the trained tokens of the first `rows` SFT rows, scaled to all rows."""
    import torch
    from tqdm.auto import tqdm

    from align.core.base import SharedBase
    from align.core.loading import load_tokenizer
    from align.data.sft import load_sft, tokenize_sft

    all_rows, _ = load_sft(source, on_bad_rows="skip", split=split)
    tokenizer = load_tokenizer(model_path)
    examples, _ = tokenize_sft(all_rows, tokenizer, max_length, chat_template=chat_template, on_bad_rows="skip")
    if not examples:
        return {"measured_rows": 0}
    sample = examples[:rows]
    base = SharedBase.load(model_path, dtype="float32", device="cpu")
    nats = tokens = 0.0
    with torch.inference_mode():
        for ex in tqdm(sample, desc="advise: log-loss under the base", unit="row"):
            ids = torch.tensor([ex.input_ids])
            logits = base.model(input_ids=ids).logits[0, :-1].float()
            mask = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
            picked = torch.log_softmax(logits[mask], -1).gather(1, ids[0, 1:][mask, None])
            nats -= picked.sum().item()
            tokens += int(mask.sum())
    total_tokens = sum(sum(ex.loss_mask[1:]) for ex in examples)
    bits_per_token = nats / math.log(2) / tokens if tokens else 0.0
    return {"measured_rows": len(sample), "measured_tokens": int(tokens), "bits_per_token": bits_per_token,
            "trained_tokens": int(total_tokens), "information_bits_measured": bits_per_token * total_tokens}


def capacity_by_rank(parameters_at_rank, bits_per_param: float) -> list[dict]:
    """[{rank, parameters, capacity_bits}] for the usual ranks; `parameters_at_rank(r)` counts LoRA's parameters."""
    return [{"rank": r, "parameters": parameters_at_rank(r), "capacity_bits": bits_per_param * parameters_at_rank(r)}
            for r in RANKS]


def study_results(study_dir: str | Path) -> dict[str, dict]:
    """{study name: {"verdict", "path"}} for every `align study` result.json in `study_dir` or a folder in it
    (`align study` writes runs/study-NAME/ by default; newest wins)."""
    found: dict[str, dict] = {}
    root = Path(study_dir)
    if not root.is_dir():
        return found
    paths = [*root.glob("result.json"), *root.glob("*/result.json")]  # not deeper: run folders hold many files
    for path in sorted(paths, key=lambda p: p.stat().st_mtime):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a half-written or foreign file is no evidence
        name = (result.get("study") or result.get("name")) if isinstance(result, dict) else None
        if isinstance(name, str) and isinstance(result.get("verdict"), str):
            found[name] = {"verdict": result["verdict"], "path": str(path.parent)}
    return found


def evidence_lines(claims: list[str], studies: dict[str, dict]) -> list[str]:
    """One line per claim the advice used: the claim, and its study's verdict here or how to run it."""
    lines = []
    for key in claims:
        claim, study = CLAIMS[key]
        seen = studies.get(study)
        where = (f"`align study {study}` here: {seen['verdict']} ({seen['path']}/report.md)" if seen else
                 f"not checked on this machine yet: `align study {study}`")
        lines.append(f"{claim} — {where}")
    return lines
