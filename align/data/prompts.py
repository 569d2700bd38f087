"""Prompt token ids for sampling: the one place a prompt becomes what the model is asked.

Rollouts (PPO/GRPO), the demo and the sampled reward pairs all encode prompts here, so a policy
is sampled on exactly the prompt form it is trained and evaluated on.
"""

from __future__ import annotations

from align.core.errors import UserError


def encode_prompt(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of `prompt` as a user turn, ending where the model's answer starts.

    With a chat template: [system turn] + user turn + the assistant header (the template's
    generation prompt). Without one: the plain text's tokens, with the tokenizer's own special
    tokens (e.g. BOS), as `align.data.preference` tokenizes a plain-text prompt for training.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    if system_prompt:
        # Without a template there is no agreed place for it; guessing one would train on a made-up format.
        raise UserError("system_prompt: this tokenizer has no chat template to put a system turn in")
    return list(tokenizer(prompt)["input_ids"])


def encode_prompts(tokenizer, rows: list[dict], system_prompt: str | None = None,
                   max_tokens: int | None = None) -> list[list[int]]:
    """`encode_prompt` of each row's "prompt"; one over `max_tokens` is an error naming its row.

    A row's place is its "row" field (e.g. "prompts.jsonl:3") when it has one, else "row <index>".
    """
    out = []
    for i, row in enumerate(rows):
        ids = encode_prompt(tokenizer, row["prompt"], system_prompt)
        if max_tokens is not None and len(ids) > max_tokens:
            where = row.get("row", f"row {i}")
            raise UserError(f"prompts {where}: {len(ids)} tokens as the model sees them, over "
                            f"max_prompt_length={max_tokens}: {row['prompt'][:60]!r}")
        out.append(ids)
    return out
