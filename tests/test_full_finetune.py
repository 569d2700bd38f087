"""Full fine-tuning (`use_peft: false`) in SFT on the tiny model: every base weight trains, no adapter exists,
the saved model/ is the trained model, and a resumed run equals an uninterrupted one exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from full_finetune_kit import assert_model_saved, assert_resume_is_exact

from align.recipes.sft import SFTConfig, SFTTrainer
from align.train.config_parser import ConfigError, load_config

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def config(tiny_llama, out, *sets) -> SFTConfig:
    return load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml",
                       [f"model_name_or_path={tiny_llama}", f"output_dir={out}", "report_to=[none]",
                        f"train_file={ROOT / 'tests' / 'data' / 'sft_tiny.jsonl'}", "use_peft=false",
                        "learning_rate=1e-4", *sets])


def test_every_base_weight_trains_and_the_model_is_saved(tiny_llama, tmp_path, capsys):
    trainer = SFTTrainer(config(tiny_llama, tmp_path / "run", "max_steps=2", "save_steps=0"))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.base.model.named_parameters()}
    eval_before = trainer.evaluate()["eval/loss"]
    folder = trainer.train()
    assert trainer.base.adapters == [] and trainer.base.load_dtype == "float32"
    after = dict(trainer.base.model.named_parameters())
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, unchanged
    assert folder == tmp_path / "run" / "model"
    assert_model_saved(folder, after)
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    total = sum(p.numel() for p in after.values())
    assert (final["trainable_params"], final["adapter_params"], final["all_params"]) == (total, 0, total)
    assert final["lora_placement"] == "full fine-tuning" and final["eval/loss"] < eval_before
    assert f"trainable params: {total:,} || all params: {total:,} || trainable%: 100.0000" in capsys.readouterr().out


def test_resume_is_exact(tiny_llama, tmp_path):
    # A finished run continued with a larger max_steps (constant lr, so the schedule does not depend on it).
    assert_resume_is_exact(lambda out, steps, resume: SFTTrainer(
        config(tiny_llama, out, f"max_steps={steps}", "save_steps=0", "lr_scheduler_type=constant"), resume=resume),
        tmp_path)


@pytest.mark.parametrize("sets, words", [
    (["bf16=true"], "use_peft: false trains every base weight in float32; got dtype bfloat16"),
    (["load_in_4bit=true"], "use_peft: false trains every base weight; it cannot with load_in_4bit: true"),
])
def test_full_finetuning_wants_float32(sets, words, tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match=words):
        config(tiny_llama, tmp_path / "run", *sets)


def test_cli_says_where_the_model_went(tiny_llama, tmp_path, capsys):
    from align.cli import main as align_main

    out = tmp_path / "run"
    assert align_main(["sft", "--config", str(ROOT / "configs" / "sft_tiny.yaml"), "--model_name_or_path",
                       str(tiny_llama), "--train_file", str(ROOT / "tests" / "data" / "sft_tiny.jsonl"),
                       "--output_dir", str(out), "--use_peft", "false", "--max_steps", "1",
                       "--report_to", "none"]) == 0
    assert f"model saved to {out / 'model'}" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file() and not (out / "adapter").exists()
