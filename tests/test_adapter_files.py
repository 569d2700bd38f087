"""Adapter and base folders on disk: vLLM's LoRA ranks, the all-zero adapter, a base folder's identity."""

from __future__ import annotations

import pytest
import torch

from align.core.adapter_files import BaseInfo, ZeroAdapter, vllm_max_lora_rank


def test_lora_rank_rounds_up_to_what_vllm_accepts():
    # vLLM accepts 1, 8, 16, 32, ...: 4 -> 8, 9 -> 16, 1 stays 1, nothing given -> 8 (the default rank).
    assert [vllm_max_lora_rank([r]) for r in (1, 2, 4, 8, 9, 16, 17, 320, 321)] == [1, 8, 8, 8, 16, 16, 32, 320, 512]
    assert [vllm_max_lora_rank(r) for r in ([4, 9], [33, 1], [])] == [16, 64, 8]
    with pytest.raises(ValueError, match="exceeds vLLM's largest max_lora_rank 512"):
        vllm_max_lora_rank([513])


def test_zero_adapter_from_a_base_folder_is_all_zero_and_covers_every_layer(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    base = BaseInfo.read(tiny_llama)
    folder = ZeroAdapter(base.shapes, str(base.path)).write(tmp_path / "zero")
    tensors = load_file(folder / "adapter_model.safetensors")
    # tiny llama: 2 layers x 7 projections (q, k, v, o, gate, up, down) x (A, B) = 28 tensors.
    assert len(tensors) == 28
    assert all(t.abs().max().item() == 0.0 for t in tensors.values())
    # q_proj of the tiny model is (2 heads x 32) x 64: A is 1 x 64, B is 64 x 1.
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (1, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 1)
    with pytest.raises(ValueError, match="none of"):
        ZeroAdapter(base.shapes, str(base.path), targets=("c_attn",)).write(tmp_path / "none")


def test_zero_adapter_of_a_trainer_loads_in_peft_and_adds_exactly_zero(tiny_llama, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from align.core.base import SharedBase
    from align.core.lora import LoraSettings

    shared = SharedBase.load(str(tiny_llama))
    shared.add_adapter("policy", LoraSettings(rank=4))  # PEFT renames the base weights it wraps
    folder = ZeroAdapter.for_trainer(shared).write(tmp_path / "zero")
    # The same adapter as one written from the base folder: names as in the plain model, every projection.
    from_folder = BaseInfo.read(tiny_llama)
    other = ZeroAdapter(from_folder.shapes, str(from_folder.path)).write(tmp_path / "other")
    got, want = (load_file(f / "adapter_model.safetensors") for f in (folder, other))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}

    ids = torch.tensor([[3, 17, 42, 99, 7, 250]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = plain(ids).logits
        model = PeftModel.from_pretrained(plain, folder).eval()
        assert len(model.peft_config["default"].target_modules) == 7
        assert torch.equal(model(ids).logits, expected)


def test_base_folder_fingerprint_agrees_with_the_trainers(tiny_llama):
    from align.core.base import SharedBase

    # What check_adapter compares with an adapter's align_meta.json base_fingerprint (written by the trainer).
    folder = BaseInfo.read(tiny_llama).fingerprint()
    trainer = SharedBase.load(str(tiny_llama)).fingerprint()
    assert folder == {k: trainer[k] for k in folder}
    assert set(folder) == {"architecture", "model_type", "hidden_size", "num_hidden_layers", "vocab_size"}
