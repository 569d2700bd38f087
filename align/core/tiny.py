"""Tiny, real transformers models and a real BPE tokenizer, built in seconds.

Tests and `--quick` benchmarks use these instead of downloading anything: the
models are ordinary `transformers` models saved as safetensors, so every code
path (PEFT, vLLM, serving) runs on them exactly as on a real checkpoint.
vLLM's CPU attention needs head size >= 32, hence hidden 64 with 2 heads.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# A ChatML template like SmolLM2's: enough to exercise chat formatting.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "What is {a}+{b}? Reply with the number only.",
    "{a} + {b} = {c}",
    "The answer is {c}.",
    "user assistant system hello world good bad yes no maybe please thanks",
    "the quick brown fox jumps over the lazy dog",
]


def build_tokenizer(vocab_size: int = 384):
    """Train a byte-level BPE tokenizer on a small arithmetic/English corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = []
    for a in range(0, 60, 3):
        for b in range(0, 60, 7):
            for template in _CORPUS:
                lines.append(template.format(a=a, b=b, c=a + b))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int):
    """A transformers config for `arch` in {"llama", "qwen3_moe", "mixtral"}."""
    from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected llama, qwen3_moe or mixtral")


def build_tiny_model(path: str | os.PathLike, arch: str = "llama", seed: int = 0) -> Path:
    """Create a randomly initialised tiny causal LM plus tokenizer under `path` (safetensors)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default init so that the random model has a peaked, seed-dependent distribution.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
