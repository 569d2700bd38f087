"""QLoRA: a 4-bit (bitsandbytes NF4) base under DPO on the tiny model, its adapter on the full base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.core.base import SharedBase
from align.core.loading import FourBit
from align.recipes.dpo import DPOConfig, DPOTrainer
from align.train.config_parser import load_config

bnb = pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"


def config(model, out, **over) -> DPOConfig:
    sets = [f"model_name_or_path={model}", f"output_dir={out}", f"train_file={DATA}", "report_to=[none]",
            "load_in_4bit=true", "max_steps=4", "save_steps=0", "eval_fraction=0", "learning_rate=0.01"]
    return load_config(DPOConfig, REPO / "configs" / "dpo_tiny.yaml", sets + [f"{k}={v}" for k, v in over.items()])


def decoder_linears(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)
            and "lora_" not in n}


def test_dpo_on_a_4bit_base_trains_and_saves_a_peft_adapter_for_the_full_base(tiny_llama, tmp_path):
    trainer = DPOTrainer(config(tiny_llama, tmp_path / "run"))
    trainer.setup()
    base = trainer.base
    full = SharedBase.load(str(tiny_llama))
    # Every decoder linear is a bitsandbytes Linear4bit holding half a byte per weight, NF4, double quant.
    four = [m for m in base.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    plain = decoder_linears(full.model)
    assert len(four) == len(plain) == 14
    packed = sum(m.weight.numel() * m.weight.element_size() for m in four)
    assert packed * 2 == sum(m.weight.numel() for m in plain.values())
    assert {m.weight.quant_state.quant_type for m in four} == {"nf4"}
    assert all(m.weight.quant_state.nested for m in four)  # double quantisation
    assert {m.compute_dtype for m in four} == {torch.bfloat16}
    assert base.base_bytes() < full.base_bytes()
    trained = [n for n, p in base.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)

    out = trainer.train()
    rows = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and max(losses) - min(losses) > 1e-3, losses

    # The usual PEFT folder, which loads onto the unquantised base and changes its output.
    adapter = out
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in adapter.iterdir()}
    meta = json.loads((adapter / "align_meta.json").read_text())
    assert meta["base_fingerprint"] == full.fingerprint()  # `align serve` accepts it for the full base
    ids = torch.tensor([base.tokenizer("What is 3+4? Reply with the number only. 7")["input_ids"]])
    with torch.no_grad():
        before = full.model(ids).logits
        full.load_adapter("policy", adapter)
        after = full.model(ids).logits
        with full.reference():
            ref = full.model(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.equal(before, ref)


def test_reference_is_the_same_4bit_base_with_adapters_off(tiny_llama):
    four = FourBit(bnb_4bit_compute_dtype="float32")
    base = SharedBase.load(str(tiny_llama), load_in_4bit=four)
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        plain = base.model(ids).logits
        base.add_adapter("policy")
        for p in base.adapter_parameters("policy").values():
            p.add_(0.05)  # a nonzero B: the adapter now changes the output
        with base.reference():
            ref = base.model(ids).logits
        on = base.model(ids).logits
    assert torch.equal(plain, ref)
    assert not torch.allclose(on, ref, atol=1e-4)
    # The 4-bit model is not the full one: the quantisation is real.
    full = SharedBase.load(str(tiny_llama))
    with torch.no_grad():
        assert not torch.allclose(full.model(ids).logits, plain, atol=1e-5)


@pytest.mark.parametrize("field,value", [("bnb_4bit_quant_type", "int3"), ("bnb_4bit_compute_dtype", "int8")])
def test_bad_4bit_settings_name_the_field(tiny_llama, tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        config(tiny_llama, tmp_path, **{field: value})


def test_ppo_steps_on_a_4bit_base(tiny_llama, tmp_path):
    from align.recipes.ppo.config import PPOConfig
    from align.recipes.ppo.trainer import PPOTrainer

    cfg = load_config(PPOConfig, REPO / "configs" / "ppo_tiny.yaml", [
        f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / 'run'}", "load_in_4bit=true", "engine=auto"])
    trainer = PPOTrainer(cfg)
    trainer.setup()
    try:
        assert type(trainer.engine).__name__ == "HFEngine"  # samples from the 4-bit policy itself
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.base.model.modules())
        first, second = trainer.ppo_step(1), trainer.ppo_step(2)
        assert first["kl"] == 0.0 and second["kl"] != 0.0  # the adapter trained through 4-bit layers
        assert second["logprob/mismatch_max"] < 1e-3
    finally:
        trainer.close()
