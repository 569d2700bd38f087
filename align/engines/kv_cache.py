"""How much KV cache a vLLM engine needs, from the model and the work asked of it.

vLLM-CPU otherwise takes a share of all RAM (or VLLM_CPU_KVCACHE_SPACE whole GiB): a 2-layer
test model would hold gigabytes. The cache holds, per token, one key and one value vector per
layer and KV head; vLLM allocates it in blocks of `block_size` tokens per sequence, and at least
one sequence of `max_model_len` must fit or the engine refuses to start.

Pass the result to vLLM as `kv_cache_memory_bytes`. On CPU, a VLLM_CPU_KVCACHE_SPACE in the
environment overrides that argument (vLLM's CPU platform check reads it later), so the engine
that passes bytes must also remove that variable inside its build scope.
"""

from __future__ import annotations

import math

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MIB = 1 << 20


def kv_bytes_per_token(hf_config, dtype: str) -> int:
    """Bytes of K and V for one token across all layers of `hf_config` (a transformers config)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def kv_cache_bytes(hf_config, dtype: str, max_model_len: int, num_sequences: int,
                   block_size: int = 16, headroom: float = 1.25, floor_mib: int = 16) -> int:
    """KV cache for `num_sequences` concurrent sequences of up to `max_model_len` tokens.

    `headroom` covers blocks that a sequence holds while it is being scheduled; `floor_mib` keeps
    a tiny model's cache from rounding to nothing.
    """
    if max_model_len < 1 or num_sequences < 1:
        raise ValueError(f"kv_cache_bytes: max_model_len and num_sequences must be >= 1, "
                         f"got {max_model_len} and {num_sequences}")
    blocks_per_sequence = math.ceil(max_model_len / block_size)
    tokens = blocks_per_sequence * block_size * num_sequences
    need = int(tokens * kv_bytes_per_token(hf_config, dtype) * headroom)
    return max(need, floor_mib * MIB)
