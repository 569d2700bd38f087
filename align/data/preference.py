"""Preference data: TRL's standard and conversational formats, validated row by row.

Formats (one JSON object per row):
  standard:        {"prompt": str, "chosen": str, "rejected": str}
  conversational:  {"prompt": [{"role", "content"}, ...], "chosen": [...], "rejected": [...]}
Rows without a prompt of their own (implicit-prompt conversations, Anthropic HH strings, the H4
UltraFeedback layout) have it split out as TRL does: align/data/prompt_extraction.py.
Sources (files, save_to_disk folders, dataset names, Dataset objects, lists): align/data/sources.py.

Every problem is reported with its place (`file:line` for JSONL, `SOURCE: row N`
otherwise), the field and what was expected. `on_bad_rows="error"` (default) raises
one DataError listing every bad row; "skip" drops them and counts them. Rows are tokenised as TRL's
DPOTrainer tokenises them (align/data/trl_tokenize.py), cached on disk (align/data/token_cache.py),
so a resumed run does not redo it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from align.data.issues import DataError, DataIssue, bad_rows, check_bad_fraction, collect_rows
from align.data.prompt_extraction import extract_prompt
from align.data.readers import read_jsonl
from align.data.sources import describe, read_source
from align.data.trl_tokenize import tokenize_prompt_completions

__all__ = ["DataError", "DataIssue", "read_jsonl", "read_records"]
read_records = read_source  # the name other modules know

Message = dict
Text = str | list[Message]
ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("auto", "standard", "conversational")


@dataclass
class PreferenceRow:
    prompt: Text
    chosen: Text
    rejected: Text
    where: str


@dataclass
class PreferenceSet:
    rows: list[PreferenceRow]
    skipped: list[DataIssue] = field(default_factory=list)
    source: str = ""


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str


# -- validating ---------------------------------------------------------------------------------
def _check_text(value, name: str, where: str, fmt: str, issues: list[DataIssue], completion: bool) -> str | None:
    """Return the row's format ("standard"/"conversational") or None after recording an issue."""
    if isinstance(value, str):
        if fmt == "conversational":
            issues.append(DataIssue(where, name, "expected a list of {role, content} messages (conversational "
                                                 "format), got a string"))
            return None
        if not value.strip():
            issues.append(DataIssue(where, name, "expected a non-empty string, got an empty one"))
            return None
        return "standard"
    if isinstance(value, list):
        if fmt == "standard":
            issues.append(DataIssue(where, name, "expected a string (standard format), got a list"))
            return None
        if not value:
            issues.append(DataIssue(where, name, "expected a non-empty list of messages, got []"))
            return None
        for i, m in enumerate(value):
            if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
                issues.append(DataIssue(where, f"{name}[{i}]", f"expected {{'role': str, 'content': str}}, got {m!r}"[:200]))
                return None
            if m["role"] not in ROLES:
                issues.append(DataIssue(where, f"{name}[{i}].role", f"expected one of {list(ROLES)}, got {m['role']!r}"))
                return None
            if not isinstance(m["content"], str) or not m["content"].strip():
                issues.append(DataIssue(where, f"{name}[{i}].content", "expected a non-empty string, got "
                                                                        f"{m['content']!r}"[:200]))
                return None
        if completion and value[-1]["role"] != "assistant":
            issues.append(DataIssue(where, name, f"expected the last message to be from the assistant, "
                                                 f"got role {value[-1]['role']!r}"))
            return None
        return "conversational"
    issues.append(DataIssue(where, name, f"expected a string or a list of messages, got {type(value).__name__}"))
    return None


def validate_record(record, where: str, fmt: str = "auto") -> tuple[PreferenceRow | None, list[DataIssue]]:
    """Check one raw row; return the row (or None) and the issues found."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    issues: list[DataIssue] = []
    if not isinstance(record, dict):
        return None, [DataIssue(where, None, f"expected a JSON object with prompt/chosen/rejected, "
                                             f"got {type(record).__name__}")]
    for key in ("chosen", "rejected"):
        if key not in record:
            issues.append(DataIssue(where, key, "missing; expected prompt, chosen and rejected fields"))
    if issues:
        return None, issues
    kinds = {_check_text(record[k], k, where, fmt, issues, completion=True) for k in ("chosen", "rejected")}
    if issues:
        return None, issues
    if len(kinds) > 1:
        return None, [DataIssue(where, "rejected", "expected the same type as chosen (both strings or both "
                                                   "message lists)")]
    kind = kinds.pop()
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if isinstance(prompt, str) and kind == "conversational":
        prompt = None  # H4 UltraFeedback: the answers repeat the prompt turn (prompt_extraction.py)
    if prompt is not None:
        pkind = _check_text(prompt, "prompt", where, fmt, issues, completion=False)
        if issues:
            return None, issues
        if pkind != kind:
            return None, [DataIssue(where, "prompt", f"expected the same format as chosen ({kind}), got {pkind}")]
    else:
        split, why = extract_prompt(chosen, rejected)
        if split is None:
            return None, [DataIssue(where, "prompt" if kind == "standard" else "rejected", why)]
        prompt, chosen, rejected = split
        if kind == "standard" and not (chosen.strip() and rejected.strip()):
            return None, [DataIssue(where, "chosen" if not chosen.strip() else "rejected",
                                    "expected an answer after the last 'Assistant:', got nothing")]
    if chosen == rejected:
        return None, [DataIssue(where, "rejected", "identical to chosen; a preference pair needs two different "
                                                   "answers")]
    return PreferenceRow(prompt, chosen, rejected, where), []


def load_preferences(source, fmt: str = "auto", on_bad_rows: str = "error", split: str = "train",
                     config: str | None = None, label: str | None = None,
                     max_bad_fraction: float | None = None) -> PreferenceSet:
    """Read and validate every row of any source `read_source` takes.

    Raises DataError listing all bad rows unless `on_bad_rows="skip"`; skipping, TooManyBadRows when
    more than `max_bad_fraction` of the rows are bad (None: no limit).
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows: expected 'error' or 'skip', got {on_bad_rows!r}")
    rows, issues, seen_any = collect_rows(read_source(source, split, config, label),
                                          lambda record, where: validate_record(record, where, fmt))
    name = label or describe(source)
    if not seen_any:
        raise DataError([DataIssue(name, None, f"empty {'file' if isinstance(source, (str, os.PathLike)) else 'dataset'}; "
                                                 "expected at least one preference row")])
    if issues and on_bad_rows == "error":
        raise DataError(issues)
    check_bad_fraction(name, issues, len(rows) + bad_rows(issues), max_bad_fraction)
    if not rows:
        raise DataError(issues + [DataIssue(name, None, "no valid rows left")])
    return PreferenceSet(rows, issues, name)


# -- tokenizing ---------------------------------------------------------------------------------
def tokenize_answers(prompt: Text, answers: list[Text], tokenizer, max_length: int | None,
                     chat_template: bool = False, where: str = "") -> tuple[list[int], list[list[int]]]:
    """Prompt ids and each answer's ids, as training reads a preference row (and scoring, one answer).

    Tokenised as TRL 1.16 does (align/data/trl_tokenize.py: string rows untemplated unless
    `chat_template`, EOS appended, the split where prompt and prompt + answer diverge). Answers are
    cut to the room the prompt leaves under `max_length` (at least one token), which is TRL's
    keep_start truncation of prompt + answer. The prompt comes back whole: what a prompt that fills
    `max_length` by itself means is the caller's choice (training refuses the row; a scorer, which
    owes a score, keeps the prompt's end).
    """
    prompt_ids, answer_ids = tokenize_prompt_completions(prompt, answers, tokenizer, chat_template, where)
    room = None if max_length is None else max(1, max_length - len(prompt_ids))
    return prompt_ids, [ids[:room] for ids in answer_ids]


def _tokenize_pair(example: dict, tokenizer, max_length: int, chat_template: bool) -> dict:
    """One row of the cached tokenising map: ids, or the issue that stops the row."""
    prompt, chosen, rejected = json.loads(example["row"])
    prompt_ids, (chosen_ids, rejected_ids) = tokenize_answers(prompt, [chosen, rejected], tokenizer, max_length,
                                                              chat_template, example["where"])
    issue = ""
    if len(prompt_ids) >= max_length:
        issue = f"prompt\t{len(prompt_ids)} tokens leave no room for the answer under max_length={max_length}"
    elif chosen_ids == rejected_ids:
        issue = f"rejected\tidentical to chosen after truncation to max_length={max_length}"
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "issue": issue}


def tokenized_issues(rows: list[PreferenceRow], tokenizer, max_length: int, chat_template: bool = False,
                     ) -> list[DataIssue]:
    """What tokenize_preferences refuses, row by row, keeping no ids and writing no cache: `align data check`
    on a big file holds its rows, never every row's token ids as well (that was ~25x the file's size)."""
    from tqdm import tqdm

    issues = []
    for r in tqdm(rows, desc="tokenizing pairs", unit="row", disable=len(rows) < 1000, leave=False):
        done = _tokenize_pair({"row": json.dumps([r.prompt, r.chosen, r.rejected]), "where": r.where}, tokenizer,
                              max_length, chat_template)
        if done["issue"]:
            name, message = done["issue"].split("\t", 1)
            issues.append(DataIssue(r.where, name, message))
    return issues


def tokenize_preferences(rows: list[PreferenceRow], tokenizer, max_length: int, chat_template: bool = False,
                         on_bad_rows: str = "error") -> list[TokenizedPair]:
    """Tokenize rows; answers are truncated to fit `max_length`, a prompt that leaves no room is an error.

    Cached on disk (align/data/token_cache.py): the same rows, tokenizer and settings
    are tokenised once and read back from the cache afterwards.
    """
    from align.data.token_cache import cache_key, cached_map

    if not rows:
        return []
    texts = [json.dumps([r.prompt, r.chosen, r.rejected]) for r in rows]
    places = [r.where for r in rows]
    key = cache_key(texts, places, tokenizer, max_length=max_length, chat_template=chat_template)
    done = cached_map({"row": texts, "where": places}, _tokenize_pair,
                      {"tokenizer": tokenizer, "max_length": max_length, "chat_template": chat_template},
                      key, desc="tokenizing pairs")
    pairs, issues = [], []
    cols = {k: done[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "issue")}
    for i, where in enumerate(places):
        if cols["issue"][i]:
            name, message = cols["issue"][i].split("\t", 1)
            issues.append(DataIssue(where, name, message))
            continue
        pairs.append(TokenizedPair(cols["prompt_ids"][i], cols["chosen_ids"][i], cols["rejected_ids"][i], where))
    if issues and on_bad_rows == "error":
        raise DataError(issues)
    return pairs


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (2B, T) batch: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected."""
    seqs, comp = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            answer = getattr(p, side)
            seqs.append(p.prompt_ids + answer)
            comp.append([0] * len(p.prompt_ids) + [1] * len(answer))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, c) in enumerate(zip(seqs, comp)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        completion_mask[i, : len(s)] = torch.tensor(c)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def step_batches(n_items: int, batch_size: int, grad_accum: int, seed: int, step: int) -> list[list[int]]:
    """Item indices of each micro-batch of optimizer step `step` (0-based).

    A pure function of its arguments, so a resumed run sees exactly the batches an
    uninterrupted one would: each epoch is a fresh permutation seeded by `seed + epoch`,
    cut into steps of `batch_size * grad_accum` items (the last step of an epoch may be short).
    """
    per_step = batch_size * grad_accum
    steps_per_epoch = -(-n_items // per_step)
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    chunk = order[within * per_step:(within + 1) * per_step]
    return [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]


def global_step_batches(n_items: int, batch_size: int, grad_accum: int, world: int, seed: int,
                        step: int) -> list[list[int]]:
    """Every process's micro-batches of global step `step`: `step_batches` with `world` x the accumulation.

    The global batch is batch_size x grad_accum x world items (TRL's convention), cut exactly as one
    process with world x the accumulation would cut it; process r takes micro-batches r, r+world, ...
    An epoch's short last step is re-cut so that every process gets as many micro-batches.
    """
    micro = step_batches(n_items, batch_size, grad_accum * world, seed, step)
    if len(micro) % world:
        items = [i for mb in micro for i in mb]
        k = min(-(-len(micro) // world) * world, len(items) // world * world)
        micro = [items[j::k] for j in range(k)]
    return micro


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out): a seeded random `fraction` (at least one item) held out, the rest in order."""
    if not fraction:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, int(len(items) * fraction))
    return [items[i] for i in sorted(order[n_eval:])], [items[i] for i in order[:n_eval]]
