"""Supervised fine-tuning data: TRL's SFT formats, validated row by row, tokenised with a loss mask.

Formats (one JSON object per row; TRL's names):
  language modelling       {"text": str}                         (the field is `dataset_text_field`)
  prompt-completion        {"prompt": str, "completion": str}
  conversational           {"messages": [{"role", "content"}, ...]}
  conv. prompt-completion  {"prompt": [messages], "completion": [messages]}

Every token carries a loss-mask bit: 1 when the token is a training target. Language modelling
trains on every token; prompt-completion on the completion only (`completion_only_loss`, TRL's
default); conversations on the assistant turns only (`assistant_only_loss`). Prompts and answers
are rendered exactly as align.data.preference renders preference rows, so an SFT adapter learns the format
that DPO and PPO later see. Problems name `file:line`, the field and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.data.issues import bad_rows, check_bad_fraction, collect_rows
from align.data.preference import DataError, DataIssue, _check_text, read_records, tokenize_answers

KINDS = ("language_modeling", "prompt_completion", "conversational")


@dataclass
class SFTRow:
    kind: str
    where: str
    text: str | None = None
    prompt: str | list | None = None
    completion: str | list | None = None
    messages: list | None = None


@dataclass
class SFTExample:
    """One tokenised row: `loss_mask[i]` is 1 when token i is a target (predicted from tokens < i)."""

    input_ids: list[int]
    loss_mask: list[int]
    where: str


# -- reading and validating -----------------------------------------------------------------------
def validate_sft_record(record, where: str, text_field: str = "text") -> tuple[SFTRow | None, list[DataIssue]]:
    """Check one raw row; the format is told by its fields: messages, prompt+completion, or text."""
    issues: list[DataIssue] = []
    if not isinstance(record, dict):
        return None, [DataIssue(where, None, f"expected a JSON object with '{text_field}', prompt/completion or "
                                             f"messages, got {type(record).__name__}")]
    if "messages" in record:
        kind = _check_text(record["messages"], "messages", where, "conversational", issues, completion=False)
        return (SFTRow("conversational", where, messages=record["messages"]) if kind else None), issues
    if "completion" in record or "prompt" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                issues.append(DataIssue(where, key, "missing; a prompt-completion row needs both prompt and "
                                                    "completion"))
        if issues:
            return None, issues
        ckind = _check_text(record["completion"], "completion", where, "auto", issues, completion=True)
        pkind = _check_text(record["prompt"], "prompt", where, "auto", issues, completion=False)
        if issues:
            return None, issues
        if pkind != ckind:
            return None, [DataIssue(where, "completion", f"expected the same format as prompt ({pkind}), got {ckind}")]
        return SFTRow("prompt_completion", where, prompt=record["prompt"], completion=record["completion"]), []
    if text_field in record:
        value = record[text_field]
        if not isinstance(value, str) or not value.strip():
            return None, [DataIssue(where, text_field, f"expected a non-empty string, got {value!r}"[:200])]
        return SFTRow("language_modeling", where, text=value), []
    return None, [DataIssue(where, None, f"expected a '{text_field}' field (language modelling), prompt and "
                                         f"completion, or messages; got fields {sorted(record)}")]


def load_sft(source: str, text_field: str = "text", on_bad_rows: str = "error", split: str = "train",
             max_bad_fraction: float | None = None) -> tuple[list[SFTRow], list[DataIssue]]:
    """Read and validate every row -> (rows, skipped issues). Raises DataError listing all bad rows unless skip;
    skipping, TooManyBadRows when more than `max_bad_fraction` of the rows are bad (None: no limit)."""
    rows, issues, seen_any = collect_rows(read_records(source, split),
                                          lambda record, where: validate_sft_record(record, where, text_field))
    if not seen_any:
        raise DataError([DataIssue(str(source), None, "empty file; expected at least one SFT row")])
    if issues and on_bad_rows == "error":
        raise DataError(issues)
    check_bad_fraction(str(source), issues, len(rows) + bad_rows(issues), max_bad_fraction)
    if not rows:
        raise DataError(issues + [DataIssue(str(source), None, "no valid rows left")])
    return rows, issues


# -- tokenising -----------------------------------------------------------------------------------
def conversation_segments(messages: list[dict], tokenizer, where: str = "") -> list[tuple[str, bool]]:
    """The chat-templated conversation cut into (text, is_assistant_turn) pieces that concatenate to it.

    An assistant turn is what rendering it adds after the generation prompt of the turns before it
    (its content and end-of-turn marker), as align.data.preference cuts a preference answer from its prompt.
    """
    def rendered(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    if not getattr(tokenizer, "chat_template", None):
        raise DataError([DataIssue(where, "messages", "conversational rows need a tokenizer with a chat template")])
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        context, full = rendered(messages[:i], True), rendered(messages[:i + 1], False)
        if not context.startswith(done) or not full.startswith(context):
            raise DataError([DataIssue(where, f"messages[{i}]", "the chat template does not render earlier turns "
                                                                 "as a prefix of later ones; cannot find the "
                                                                 "assistant's tokens")])
        segments += [(context[len(done):], False), (full[len(context):], True)]
        done = full
    whole = rendered(messages, False)
    if not whole.startswith(done):
        raise DataError([DataIssue(where, "messages", "the chat template does not render earlier turns as a prefix "
                                                      "of the whole conversation")])
    segments.append((whole[len(done):], False))
    return [(t, a) for t, a in segments if t]


def tokenize_row(row: SFTRow, tokenizer, max_length: int, completion_only_loss: bool | None = None,
                 assistant_only_loss: bool = True, chat_template: bool = True) -> SFTExample:
    """Token ids and loss mask of one row, cut to `max_length` tokens (the start is kept, as TRL does)."""
    if row.kind == "language_modeling":
        eos = tokenizer.eos_token or ""
        text = row.text if row.text.endswith(eos) else row.text + eos  # TRL appends EOS to plain text
        ids = tokenizer(text)["input_ids"]
        mask = [1] * len(ids)
    elif row.kind == "prompt_completion":
        prompt_ids, (completion_ids,) = tokenize_answers(row.prompt, [row.completion], tokenizer, None,
                                                          chat_template, row.where)
        ids = prompt_ids + completion_ids
        keep_prompt = completion_only_loss is False
        mask = [int(keep_prompt)] * len(prompt_ids) + [1] * len(completion_ids)
    else:
        ids, mask = [], []
        for text, assistant in conversation_segments(row.messages, tokenizer, row.where):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [int(assistant or not assistant_only_loss)] * len(piece)
    return SFTExample(ids[:max_length], mask[:max_length], row.where)


def tokenize_sft(rows: list[SFTRow], tokenizer, max_length: int, completion_only_loss: bool | None = None,
                 assistant_only_loss: bool = True, chat_template: bool = True,
                 on_bad_rows: str = "error") -> tuple[list[SFTExample], list[DataIssue]]:
    """Tokenise every row; a row with no target token left under `max_length` is an issue naming it."""
    examples, issues = [], []
    for row in rows:
        ex = tokenize_row(row, tokenizer, max_length, completion_only_loss, assistant_only_loss, chat_template)
        if sum(ex.loss_mask[1:]) == 0:  # token 0 is never predicted
            field = {"language_modeling": None, "prompt_completion": "prompt"}.get(row.kind, "messages")
            issues.append(DataIssue(row.where, field, f"no trained token within max_length={max_length} "
                                                      f"({len(ex.input_ids)} tokens kept); expected a shorter "
                                                      f"prompt or a larger max_length"))
            continue
        examples.append(ex)
    if issues and on_bad_rows == "error":
        raise DataError(issues)
    return examples, issues


# -- packing and batching -------------------------------------------------------------------------
@dataclass
class PackedRow:
    """Several examples laid end to end; `position_ids` restart at 0 where each one begins."""

    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int]


def pack_examples(examples: list[SFTExample], max_length: int) -> list[PackedRow]:
    """Best-fit decreasing (TRL's "bfd"): whole examples into rows of at most `max_length` tokens.

    No example is split. Each example's first token stays unmasked-out of the loss (mask 0), so no
    token is ever predicted from the end of the previous example; attention is kept inside each
    example by the restarting position ids (see align/recipes/sft.py).
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        fits = [b for b in range(len(bins)) if room[b] >= n]
        if fits:
            b = min(fits, key=lambda k: (room[k], k))
        else:
            bins.append([])
            room.append(max_length)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= n
    rows = []
    for members in bins:
        ids, mask, pos = [], [], []
        for i in members:
            ex = examples[i]
            ids += ex.input_ids
            mask += [0] + ex.loss_mask[1:]
            pos += list(range(len(ex.input_ids)))
        rows.append(PackedRow(ids, mask, pos))
    return rows


def collate_sft(items: list[SFTExample | PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) batch: input_ids, attention_mask, loss_mask, and position_ids for packed rows.

    Packed rows' padding restarts its positions too, so it forms a segment of its own that no real
    token attends to.
    """
    width = max(len(x.input_ids) for x in items)
    out = {k: torch.zeros((len(items), width), dtype=torch.long)
           for k in ("input_ids", "attention_mask", "loss_mask")}
    out["input_ids"].fill_(pad_id)
    packed = isinstance(items[0], PackedRow)
    if packed:
        out["position_ids"] = torch.zeros((len(items), width), dtype=torch.long)
    for r, x in enumerate(items):
        n = len(x.input_ids)
        out["input_ids"][r, :n] = torch.tensor(x.input_ids)
        out["attention_mask"][r, :n] = 1
        out["loss_mask"][r, :n] = torch.tensor(x.loss_mask)
        if packed:
            out["position_ids"][r, :n] = torch.tensor(x.position_ids)
            out["position_ids"][r, n:] = torch.arange(width - n)
    return out
