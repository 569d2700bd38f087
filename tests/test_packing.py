"""Padding-free rows (align/core/packing.py): the pure functions by hand, and the attention check on real tiny
models (Llama, Qwen3-MoE, Qwen2: kept apart; OPT and Bloom, whose masks ignore position ids: refused)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from align.core.base import SharedBase
from align.core.errors import UserError
from align.core.logprobs import completion_logprobs
from align.core.packing import (
    check_packed_attention,
    last_positions,
    pack_batch,
    pack_sequences,
    pad_fraction,
    sequence_sums,
    split_sequences,
    unpack_tokens,
)
from align.core.tiny import build_tokenizer

torch.set_num_threads(1)


def test_pack_sequences_by_hand():
    out = pack_sequences([[5, 6, 7], [8], [9, 10]], masks=[[1, 1, 1], [1], [0, 1]])
    assert out["input_ids"] == [5, 6, 7, 8, 9, 10]
    assert out["position_ids"] == [0, 1, 2, 0, 0, 1]
    assert out["seq_lens"] == [3, 1, 2] and out["cu_seqlens"] == [0, 3, 4, 6]
    # each sequence's first token is never a target: the token before it belongs to another sequence
    assert out["mask"] == [0, 1, 1, 0, 0, 1]
    assert split_sequences(out["input_ids"], out["seq_lens"]) == [[5, 6, 7], [8], [9, 10]]
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pack_sequences([[1], []])
    with pytest.raises(ValueError, match="seq_lens sum to 3"):
        split_sequences([1, 2], [1, 2])


def test_pack_batch_left_and_right_padding_by_hand():
    ids = torch.tensor([[0, 0, 4, 5], [6, 7, 8, 0], [1, 2, 3, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    packed = pack_batch(ids, mask)
    assert packed.input_ids.tolist() == [[4, 5, 6, 7, 8, 1, 2, 3, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 0, 1, 2, 0, 1, 2, 3]]
    assert packed.seq_lens.tolist() == [2, 3, 4] and packed.cu_seqlens.tolist() == [0, 2, 5, 9]
    assert last_positions(packed.seq_lens).tolist() == [1, 4, 8]
    back = unpack_tokens(packed.input_ids[0].float(), packed)
    assert back.tolist() == [[0, 0, 4, 5], [6, 7, 8, 0], [1, 2, 3, 9]]
    assert sequence_sums(torch.arange(9.0), packed.seq_lens).tolist() == [1.0, 9.0, 26.0]


def test_pack_batch_keeps_packed_rows_restarts_and_refuses_holes():
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 0, 1, 0], [0, 1, 2, 0, 1]])  # SFT's packed rows: two examples each
    packed = pack_batch(ids, mask, pos)
    assert packed.position_ids.tolist() == [[0, 1, 0, 1, 0, 1, 2, 0, 1]]
    assert packed.seq_lens.tolist() == [2, 2, 3, 2]
    with pytest.raises(ValueError, match="one contiguous run"):
        pack_batch(ids, torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="one contiguous run"):
        pack_batch(ids, torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]))


def test_pad_fraction_by_hand():
    # batch 1: 3 and 5 tokens -> padded to 5: 2 pads; batch 2: 4 alone: none
    assert pad_fraction([[3, 5], [4]]) == (2, 14)
    assert pad_fraction([[3, 5], [4]], padding_free=True) == (0, 12)


# -- real models ----------------------------------------------------------------------------------------------
def decoder_of(model_type: str, **kw):
    cfg = AutoConfig.for_model(model_type, vocab_size=300, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).get_decoder()


def test_qwen2_keeps_packed_sequences_apart():
    check_packed_attention(decoder_of("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1), 300, "tiny qwen2")


@pytest.mark.parametrize("model_type, kw", [
    ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=64)),
    ("bloom", dict(hidden_size=64, n_layer=2, n_head=2)),  # ALiBi: no position ids at all
])
def test_a_mask_that_ignores_position_ids_is_refused(model_type, kw):
    with pytest.raises(UserError, match=rf"padding_free: tiny {model_type} \(attention \w+\) lets packed sequences "
                                        r"attend to each other .*set padding_free: false"):
        check_packed_attention(decoder_of(model_type, **kw), 300, f"tiny {model_type}")


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_packed_row_equals_padded_batch_and_sequences_do_not_mix(tiny_models, arch):
    base = SharedBase.load(str(tiny_models[arch]))
    base.check_padding_free()
    gen = torch.Generator().manual_seed(1)
    lens = [7, 3, 5]
    seqs = [torch.randint(3, 300, (n,), generator=gen) for n in lens]
    ids = torch.zeros((3, 7), dtype=torch.long)
    mask = torch.zeros((3, 7), dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding, as RL prompts are
        ids[i, 7 - len(s):], mask[i, 7 - len(s):] = s, 1
    scored = mask.clone()
    scored[torch.arange(3), 7 - torch.tensor(lens)] = 0  # a first token has nothing before it to predict it
    with torch.no_grad():
        padded = completion_logprobs(base, ids, mask, scored)
        free = completion_logprobs(base, ids, mask, scored, padding_free=True)
        assert torch.allclose(padded, free, atol=1e-5)
        # change every token of sequence 0 but its last: sequences 1 and 2 (after it in the row) must not move
        other = ids.clone()
        other[0, :-1] = (other[0, :-1] + 11) % 300
        moved = completion_logprobs(base, other, mask, scored, padding_free=True)
    assert not torch.allclose(moved[0], free[0], atol=1e-3)  # the change is visible where it should be
    assert torch.equal(moved[1:], free[1:])


@pytest.mark.parametrize("recipe, flags", [
    ("dpo", ["--padding_free", "true"]),
    ("reward", ["--padding_free", "true", "--train_file", "tests/data/prefs_tiny.jsonl"]),
    ("sft", ["--packing", "true"]),  # bfd packing is padding-free, as TRL's
])
def test_refused_before_any_step_on_a_model_whose_mask_ignores_position_ids(tmp_path, capsys, recipe, flags):
    """An OPT base (learned positions, a causal mask that never reads position ids): one line, exit 2."""
    from align.cli import main as align_main

    tok = build_tokenizer()
    cfg = AutoConfig.for_model("opt", vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                               num_attention_heads=2, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    out = tmp_path / "run"
    code = align_main([recipe, "--config", f"configs/{recipe}_tiny.yaml", "--model_name_or_path",
                       str(tmp_path / "opt"), "--output_dir", str(out), "--report_to", "none", *flags])
    err = capsys.readouterr().err
    assert code == 2
    line = next(x for x in err.splitlines() if "padding_free:" in x)
    assert f"padding_free: {tmp_path / 'opt'} (opt) (attention sdpa) lets packed sequences attend to each other" in line
    assert line.endswith("for this model")
    assert not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text()
