"""A prompt and its completions tokenised exactly as TRL 1.16 tokenises them (DPOTrainer, SFTTrainer).

Standard (string) rows: each completion ends with EOS (appended only when missing), and the tokenizer
reads the prompt alone and prompt + completion as one string, adding its own special tokens (BOS where
it adds one). No chat template: TRL does not template a string row. Conversational rows:
`apply_chat_template(prompt, add_generation_prompt=True)` and `apply_chat_template(prompt + completion)`.

The completion starts where the prompt's ids and every prompt + completion's ids stop agreeing (TRL's
`common_prefix_length`, the minimum over the completions), not after the prompt tokenised alone: a
prompt ending in a space, whose last token merges with the completion's first ("Q: " + "4" -> "Q:" +
" 4"), gives that token to the completion, so the sequence is the one TRL trains on.

With `chat_template=True` (opt-in) a string row is written as a user turn and an assistant turn and
then read as a conversational row; a tokenizer without a template leaves it plain text.

KTO, ORPO, CPO and reward rows are (prompt, completion(s)) too: they call `tokenize_prompt_completions`.
"""

from __future__ import annotations

import warnings

from align.data.issues import DataError, DataIssue
from align.data.prompt_extraction import common_prefix_length  # TRL's data_utils.common_prefix_length

PROMPT_CUT_WARNING = (
    "The tokenized prompt is not a prefix of the tokenized prompt+completion (a chat template that renders "
    "the prompt alone differently, or tokens merging across the boundary, e.g. a prompt ending in a space): "
    "as TRL does, the completion starts where they diverge and that end of the prompt is left out of the "
    "prompt ids. End prompts on a token boundary to avoid it.")


def _as_messages(x, role: str) -> list[dict]:
    return x if isinstance(x, list) else [{"role": role, "content": x}]


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def tokenize_prompt_completions(prompt, completions: list, tokenizer, chat_template: bool = False,
                                where: str = "") -> tuple[list[int], list[list[int]]]:
    """(prompt ids, each completion's ids), split as TRL splits them; nothing is truncated here.

    `prompt` and each completion are strings (standard) or lists of {role, content} messages
    (conversational). prompt ids + a completion's ids are exactly the ids of prompt + completion.
    """
    conversational = isinstance(prompt, list) or any(isinstance(c, list) for c in completions)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if conversational and not has_template:
        raise DataError([DataIssue(where, None, "conversational rows need a tokenizer with a chat template")])
    if conversational or (chat_template and has_template):
        messages = _as_messages(prompt, "user")
        prompt_ids = _template_ids(tokenizer, messages, add_generation_prompt=True)
        full = [_template_ids(tokenizer, messages + _as_messages(c, "assistant")) for c in completions]
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = [tokenizer(prompt + (c if c.endswith(eos) else c + eos))["input_ids"] for c in completions]
    cut = min(common_prefix_length(prompt_ids, ids) for ids in full)
    if cut < len(prompt_ids):
        warnings.warn(PROMPT_CUT_WARNING, stacklevel=2)  # one fixed text: Python shows it once per place
    return prompt_ids[:cut], [ids[cut:] for ids in full]
