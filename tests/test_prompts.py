"""Prompt encoding for sampling: the tokenizer's own chat template, plain text without one, errors by row."""

from __future__ import annotations

import pytest

from align.core.errors import UserError
from align.core.loading import load_tokenizer
from align.data.prompts import encode_prompt, encode_prompts

PROMPT = "What is 12+7? Reply with the number only."
SYSTEM = "You answer with a number."


def _template_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def test_chat_template_with_and_without_system_prompt(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    user = {"role": "user", "content": PROMPT}
    assert encode_prompt(tok, PROMPT) == _template_ids(tok, [user])
    with_system = encode_prompt(tok, PROMPT, SYSTEM)
    assert with_system == _template_ids(tok, [{"role": "system", "content": SYSTEM}, user])
    # The ids end with the assistant header: the model's answer comes next.
    assert tok.decode(with_system).startswith("<|im_start|>system\n" + SYSTEM)
    assert tok.decode(with_system).endswith("<|im_start|>assistant\n")


def test_plain_text_without_a_template(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    tok.chat_template = None
    assert encode_prompt(tok, PROMPT) == tok(PROMPT)["input_ids"]
    with pytest.raises(UserError, match="no chat template"):
        encode_prompt(tok, PROMPT, SYSTEM)


def test_encode_prompts_limit_names_the_row(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    rows = [{"prompt": PROMPT}, {"prompt": "the quick brown fox " * 20, "row": "p.jsonl:2"}, {"prompt": "hi"}]
    short = encode_prompts(tok, [rows[0], rows[2]], SYSTEM, max_tokens=64)
    assert short == [encode_prompt(tok, r["prompt"], SYSTEM) for r in (rows[0], rows[2])]
    assert len(encode_prompts(tok, rows)) == 3  # no limit given: none applied
    n = len(encode_prompt(tok, rows[1]["prompt"]))
    assert n > 64
    with pytest.raises(UserError, match=rf"prompts p\.jsonl:2: {n} tokens .*max_prompt_length=64"):
        encode_prompts(tok, rows, None, max_tokens=64)
    # A row without a place is named by its index; exactly max_tokens is still allowed.
    with pytest.raises(UserError, match=r"prompts row 0: "):
        encode_prompts(tok, [{"prompt": rows[1]["prompt"]}], None, max_tokens=n - 1)
    assert len(encode_prompts(tok, [rows[1]], None, max_tokens=n)[0]) == n
