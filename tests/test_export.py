"""`align export --merge`: a full model whose greedy output equals the adapter's."""

from __future__ import annotations

import json

import pytest
import torch

PROMPTS = ["What is 3+4?", "the quick brown fox", "hello world"]


def make_adapter(base_path, out, rank=4, seed=0, scale=0.5):
    """A real PEFT adapter on `base_path` whose B matrices are random (so it differs from the base)."""
    from align.core.base import SharedBase
    from align.core.lora import LoraSettings

    sb = SharedBase.load(str(base_path))
    torch.manual_seed(seed)  # lora_A is drawn from the global RNG: without this the adapter depends on test order
    sb.add_adapter("policy", LoraSettings(rank=rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sb.adapter_parameters("policy").items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return sb, sb.save_adapter("policy", out)


def test_merged_export_matches_adapter(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from align.export.merge import export_merged, greedy

    sb, adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    with sb.adapter("policy"):
        with_adapter = greedy(sb.model, sb.tokenizer, PROMPTS, 12)
    with sb.reference():
        base_only = greedy(sb.model, sb.tokenizer, PROMPTS, 12)
    # The adapter must change something, or "merged equals adapter" would also pass for a copied base.
    assert with_adapter != base_only

    out = export_merged(adapter, tmp_path / "merged", prompts=PROMPTS, max_new_tokens=12)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    assert not any("adapter" in f for f in files if f != "align_export.json")
    assert json.loads((out / "align_export.json").read_text())["base"] == str(tiny_llama.resolve())

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert greedy(merged, sb.tokenizer, PROMPTS, 12) == with_adapter
    # The merged weight is W + (alpha/r) * B @ A, computed here by hand from the adapter's own tensors.
    peft_q = sb.model.base_model.model.model.layers[0].self_attn.q_proj
    expected_w = peft_q.base_layer.weight + (32 / 4) * peft_q.lora_B["policy"].weight @ peft_q.lora_A["policy"].weight
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, expected_w, atol=1e-6)


def test_export_reads_base_from_adapter_and_cli(tiny_llama, tmp_path, capsys):
    from align.export.merge import add_arguments, run

    _, adapter = make_adapter(tiny_llama, tmp_path / "adapter", seed=1)
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(["--adapter", str(adapter), "--merge", str(tmp_path / "m"), "--max-new-tokens", "4"])) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert "wrote merged model" in capsys.readouterr().out


def test_export_refuses_missing_base_and_wrong_base(tiny_llama, tmp_path):
    from align.core.errors import UserError
    from align.core.tiny import build_tiny_model
    from align.export.merge import export_merged

    _, adapter = make_adapter(tiny_llama, tmp_path / "adapter", seed=2)
    with pytest.raises(UserError, match="base model folder not found"):
        export_merged(adapter, tmp_path / "m", base=tmp_path / "nowhere")
    # The Mixtral tiny model has other architecture/shapes: the adapter was not trained on it.
    with pytest.raises(UserError, match="trained on another base"):
        export_merged(adapter, tmp_path / "m", base=build_tiny_model(tmp_path / "mixtral", "mixtral"))
    assert not (tmp_path / "m").exists()


def test_export_fails_loudly_when_merged_output_differs(tiny_llama, tmp_path):
    """A real failing case, no mock: a 16-bit merge rounds W + (alpha/r) B A, and with this strong adapter
    on the tiny random model the greedy continuation drifts within 24 tokens (seen: bfloat16 and float16)."""
    from align.core.errors import UserError
    from align.export.merge import export_merged

    _, adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    with pytest.raises(UserError, match="greedy output differs from the adapter's"):
        export_merged(adapter, tmp_path / "m", dtype="bfloat16")
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp")]
