"""Prompt token ids for sampling: the one place a prompt becomes what the model is asked.

Rollouts (PPO/GRPO), the demo and the sampled reward pairs all encode prompts here, so a policy
is sampled on exactly the prompt form it is trained and evaluated on. A prompt is a string or a
conversation (a list of {"role", "content"} messages; align/data/prompt_rows.py checks its shape).
"""

from __future__ import annotations

from align.core.errors import UserError


def _template_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation rendered by the tokenizer's own chat template, ending where the model's answer starts."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    # A conversation's own system turn wins: two system turns are a format no template was trained on.
    if not system_prompt or any(m.get("role") == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def encode_prompt(tokenizer, prompt: str | list[dict], system_prompt: str | None = None, *,
                  chat_template_for_text: bool = True) -> list[int]:
    """Token ids of `prompt`, ending where the model's answer starts.

    A conversation (list of messages): `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`,
    with `system_prompt` put first as a system turn unless the messages have one. This is what TRL
    1.16's GRPOTrainer does with a conversational prompt (`_tokenize_prompts`). Needs a chat template.

    A string, `chat_template_for_text=True` (the default; the arithmetic demo relies on it): with a
    chat template, [system turn] + the string as a user turn + the assistant header; without one, the
    plain text's tokens with the tokenizer's own special tokens (e.g. BOS), as `align.data.preference`
    tokenizes a plain-text prompt for training.

    A string, `chat_template_for_text=False`: what TRL 1.16's GRPOTrainer does with a non-conversational
    prompt, `tokenizer(text=prompt)["input_ids"]`: no chat template even when the tokenizer has one,
    the tokenizer's own special tokens added (add_special_tokens defaults to True). There is then no
    turn to put `system_prompt` in, so giving one is an error.
    """
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("a conversational prompt needs a chat template, and this tokenizer has none; give "
                            "string prompts or a model whose tokenizer has a chat template")
        return _template_ids(tokenizer, _with_system(prompt, system_prompt))
    if chat_template_for_text and getattr(tokenizer, "chat_template", None):
        return _template_ids(tokenizer, _with_system([{"role": "user", "content": prompt}], system_prompt))
    if system_prompt:
        # Without a template there is no agreed place for it; guessing one would train on a made-up format.
        why = "this tokenizer has no chat template" if chat_template_for_text else \
            "text prompts are used as plain text (chat_template_for_text=False), with no turn"
        raise UserError(f"system_prompt: {why} to put a system turn in")
    return list(tokenizer(text=prompt)["input_ids"])


def _shown(prompt) -> str:
    text = prompt if isinstance(prompt, str) else " | ".join(str(m.get("content", "")) for m in prompt)
    return repr(text[:60])


def encode_prompts(tokenizer, rows: list[dict], system_prompt: str | None = None,
                   max_tokens: int | None = None, *, places: list[str] | None = None,
                   chat_template_for_text: bool = True) -> list[list[int]]:
    """`encode_prompt` of each row's "prompt"; an error (e.g. over `max_tokens`) names the row's place.

    A row's place is `places[i]`, else `rows.places[i]` when `rows` is a `PromptRows`
    (align/data/prompt_rows.py), else the row's own "row" field (e.g. "prompts.jsonl:3"), else "row <i>".
    """
    places = places if places is not None else getattr(rows, "places", None)
    out = []
    for i, row in enumerate(rows):
        where = places[i] if places is not None else row.get("row", f"row {i}")
        try:
            ids = encode_prompt(tokenizer, row["prompt"], system_prompt, chat_template_for_text=chat_template_for_text)
        except UserError as e:
            raise UserError(f"prompts {where}: {e}") from None
        if max_tokens is not None and len(ids) > max_tokens:
            raise UserError(f"prompts {where}: {len(ids)} tokens as the model sees them, over "
                            f"max_prompt_length={max_tokens}: {_shown(row['prompt'])}")
        out.append(ids)
    return out
