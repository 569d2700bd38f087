"""One prompt encoder for every recipe, engine and demo: chat template when the tokenizer has one."""

from __future__ import annotations

from align.errors import UserError


def encode_prompts(tokenizer, rows: list[dict], system_prompt: str | None, max_tokens: int) -> list[list[int]]:
    """Chat-format and tokenize each row's prompt; a prompt over `max_tokens` is an error naming its row."""
    out = []
    for i, row in enumerate(rows):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": row["prompt"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if len(ids) > max_tokens:
            where = row.get("row", f"row {i}")
            raise UserError(f"prompts {where}: {len(ids)} tokens with the chat template, over max_prompt_length="
                            f"{max_tokens}: {row['prompt'][:60]!r}")
        out.append(list(ids))
    return out

