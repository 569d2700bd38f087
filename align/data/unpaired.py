"""Unpaired preference data (thumbs up / down), TRL's KTO formats, validated row by row.

Formats (one JSON object per row):
  standard:        {"prompt": str, "completion": str, "label": bool}
  conversational:  {"prompt": [{"role", "content"}, ...], "completion": [{"role": "assistant", ...}], "label": bool}
  paired:          {"prompt": ..., "chosen": ..., "rejected": ...} (or without a prompt, as align/data/preference.py
                   reads it), unpaired on the fly as TRL's `unpair_preference_dataset` does: chosen -> label true,
                   rejected -> label false.
A `label` is a JSON boolean; 0/1 and "true"/"false" (CSV columns are text) are read as one too.

Tokenisation is TRL's KTOTrainer's: the prompt alone and prompt + completion are tokenised (conversational
rows through the chat template, the prompt with the generation prompt; string rows as plain text, the
completion ending with EOS), and the completion starts where the two token lists diverge. A prompt that
fills `max_length` by itself is a bad row (TRL drops it silently); prompt + completion are cut to `max_length`
when a batch is built, so the mismatched KL sequences are cut as TRL's collator cuts them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from align.data.issues import DataError, DataIssue, bad_rows, check_bad_fraction, collect_rows
from align.data.preference import FORMATS, _check_text, validate_record
from align.data.sources import describe, read_source
from align.data.trl_tokenize import tokenize_prompt_completions

LABELS = {"true": True, "false": False, "1": True, "0": False}


@dataclass
class UnpairedRow:
    prompt: str | list
    completion: str | list
    label: bool
    where: str
    field: str = "completion"  # "chosen" / "rejected" for a row unpaired from a pair


@dataclass
class UnpairedSet:
    rows: list[UnpairedRow]
    skipped: list[DataIssue] = field(default_factory=list)
    source: str = ""


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    completion_ids: list[int]  # whole; cut to max_length with the prompt when batched
    label: bool
    where: str


# -- validating ---------------------------------------------------------------------------------
def read_label(value, where: str) -> tuple[bool | None, list[DataIssue]]:
    if isinstance(value, bool):
        return value, []
    if isinstance(value, int) and value in (0, 1):
        return bool(value), []
    if isinstance(value, str) and value.strip().lower() in LABELS:
        return LABELS[value.strip().lower()], []
    return None, [DataIssue(where, "label", f"expected true (desirable) or false (undesirable), got {value!r}"[:200])]


def validate_unpaired_record(record, where: str, fmt: str = "auto") -> tuple[list[UnpairedRow] | None, list[DataIssue]]:
    """One raw row -> its unpaired rows (two for a preference pair) or None, and the issues found."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    if not isinstance(record, dict):
        return None, [DataIssue(where, None, "expected a JSON object with prompt/completion/label (or prompt/"
                                             f"chosen/rejected), got {type(record).__name__}")]
    if "chosen" in record or "rejected" in record:
        pair, issues = validate_record(record, where, fmt)
        if pair is None:
            return None, issues
        return [UnpairedRow(pair.prompt, pair.chosen, True, where, "chosen"),
                UnpairedRow(pair.prompt, pair.rejected, False, where, "rejected")], []
    missing = [k for k in ("prompt", "completion", "label") if k not in record]
    if missing:
        return None, [DataIssue(where, k, "missing; expected prompt, completion and label fields (or prompt, "
                                          "chosen and rejected)") for k in missing]
    issues: list[DataIssue] = []
    label, label_issues = read_label(record["label"], where)
    kind = _check_text(record["completion"], "completion", where, fmt, issues, completion=True)
    pkind = _check_text(record["prompt"], "prompt", where, fmt, issues, completion=False)
    issues += label_issues
    if issues:
        return None, issues
    if pkind != kind:
        return None, [DataIssue(where, "prompt", f"expected the same format as completion ({kind}), got {pkind}")]
    return [UnpairedRow(record["prompt"], record["completion"], label, where)], []


def load_unpaired(source, fmt: str = "auto", on_bad_rows: str = "error", split: str = "train",
                  config: str | None = None, label: str | None = None,
                  max_bad_fraction: float | None = None) -> UnpairedSet:
    """Read and validate every row of any source `read_source` takes (as load_preferences does for pairs)."""
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows: expected 'error' or 'skip', got {on_bad_rows!r}")
    groups, issues, seen_any = collect_rows(read_source(source, split, config, label),
                                            lambda record, where: validate_unpaired_record(record, where, fmt))
    name = label or describe(source)
    if not seen_any:
        kind = "file" if isinstance(source, (str, os.PathLike)) else "dataset"
        raise DataError([DataIssue(name, None, f"empty {kind}; expected at least one prompt/completion/label row")])
    if issues and on_bad_rows == "error":
        raise DataError(issues)
    check_bad_fraction(name, issues, len(groups) + bad_rows(issues), max_bad_fraction)
    if not groups:
        raise DataError(issues + [DataIssue(name, None, "no valid rows left")])
    return UnpairedSet([row for group in groups for row in group], issues, name)


# -- tokenizing (TRL's KTOTrainer._prepare_dataset) ----------------------------------------------
def tokenize_prompt_completion(prompt, completion, tokenizer, chat_template: bool = False,
                               where: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as TRL's KTO tokenises a row: the same split as DPO's
    (align/data/trl_tokenize.py), for one completion."""
    prompt_ids, (completion_ids,) = tokenize_prompt_completions(prompt, [completion], tokenizer, chat_template,
                                                                 where)
    return prompt_ids, completion_ids


def _tokenize_row(example: dict, tokenizer, max_length: int, chat_template: bool) -> dict:
    prompt, completion, _ = json.loads(example["row"])
    prompt_ids, completion_ids = tokenize_prompt_completion(prompt, completion, tokenizer, chat_template,
                                                            example["where"])
    issue = ""
    if len(prompt_ids) >= max_length:
        issue = f"prompt\t{len(prompt_ids)} tokens leave no room for the completion under max_length={max_length}"
    elif not completion_ids:
        issue = "completion\tno completion tokens after the prompt's"
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "issue": issue}


def tokenize_unpaired(rows: list[UnpairedRow], tokenizer, max_length: int, chat_template: bool = False,
                      on_bad_rows: str = "error") -> list[TokenizedExample]:
    """Tokenise rows (cached on disk, align/data/token_cache.py); a prompt that leaves no room is a bad row."""
    from align.data.token_cache import cache_key, cached_map

    if not rows:
        return []
    texts = [json.dumps([r.prompt, r.completion, r.label]) for r in rows]
    places = [f"{r.where}\t{r.field}" for r in rows]
    key = cache_key(texts, places, tokenizer, recipe="kto", max_length=max_length, chat_template=chat_template)
    done = cached_map({"row": texts, "where": [r.where for r in rows]}, _tokenize_row,
                      {"tokenizer": tokenizer, "max_length": max_length, "chat_template": chat_template},
                      key, desc="tokenizing completions")
    examples, issues = [], []
    for i, row in enumerate(rows):
        if done["issue"][i]:
            name, message = done["issue"][i].split("\t", 1)
            issues.append(DataIssue(row.where, row.field if name == "completion" else name, message))
            continue
        examples.append(TokenizedExample(done["prompt_ids"][i], done["completion_ids"][i], row.label, row.where))
    if issues and on_bad_rows == "error":
        raise DataError(issues)
    return examples


# -- batching (TRL's DataCollatorForUnpairedPreference) ------------------------------------------
def _pad(seqs: list[list[int]], masks: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
        completion[i, :len(s)] = torch.tensor(m)
    return input_ids, attention, completion


def collate_unpaired(examples: list[TokenizedExample], pad_id: int, max_length: int | None,
                     kl: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows cut to `max_length`, and `label`. With `kl`, also KL_input_ids /
    KL_attention_mask / KL_completion_mask: prompt i with completion i-1 (completions rotated by one within the
    batch, as TRL pairs them), the mismatched pairs the KL reference point is estimated from."""
    answers = {"": [e.completion_ids for e in examples]}
    if kl:
        answers["KL_"] = answers[""][-1:] + answers[""][:-1]
    out = {}
    for prefix, completions in answers.items():
        seqs, masks = [], []
        for e, answer in zip(examples, completions):
            seqs.append((e.prompt_ids + answer)[:max_length])
            masks.append(([0] * len(e.prompt_ids) + [1] * len(answer))[:max_length])
        ids, attention, completion = _pad(seqs, masks, pad_id)
        out[f"{prefix}input_ids"], out[f"{prefix}attention_mask"] = ids, attention
        out[f"{prefix}completion_mask"] = completion
    out["label"] = torch.tensor([e.label for e in examples])
    return out
