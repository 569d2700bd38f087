"""KV cache sizing: hand-computed against the formula's parts."""

from types import SimpleNamespace

import pytest

from align.engines.kv_cache import MIB, kv_bytes_per_token, kv_cache_bytes


def config(**kw):
    base = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    base.update(kw)
    return SimpleNamespace(**base)


def test_bytes_per_token_smollm2_shape():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims; K and V; bf16 = 2 bytes.
    assert kv_bytes_per_token(config(), "bfloat16") == 2 * 30 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(config(), "float32") == 46080


def test_head_dim_and_missing_kv_heads():
    assert kv_bytes_per_token(config(head_dim=128), "float32") == 2 * 30 * 3 * 128 * 4
    assert kv_bytes_per_token(config(num_key_value_heads=None), "float32") == 2 * 30 * 9 * 64 * 4


def test_cache_rounds_to_blocks_and_has_a_floor():
    # 16 sequences of 100 tokens -> 7 blocks of 16 = 112 tokens each, 1792 tokens, x 46080 B x 1.25.
    assert kv_cache_bytes(config(), "float32", 100, 16) == int(1792 * 46080 * 1.25)
    tiny = config(num_hidden_layers=2, num_key_value_heads=1, num_attention_heads=1, hidden_size=8)
    assert kv_cache_bytes(tiny, "float32", 64, 1) == 16 * MIB


def test_rejects_nonsense():
    with pytest.raises(ValueError, match="num_sequences"):
        kv_cache_bytes(config(), "float32", 64, 0)
