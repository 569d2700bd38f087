"""Full fine-tuning (`use_peft: false`) in DPO on the tiny model: every base weight trains, the reference is a
frozen copy of the starting base (or precomputed from it, or none for a reference-free loss), the run saves
model/, and a resumed run equals an uninterrupted one exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from full_finetune_kit import assert_model_saved, assert_resume_is_exact, checkpoint_names

from align.recipes.dpo import DPOConfig, DPOTrainer
from align.train.config_parser import ConfigError, load_config

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "prefs_tiny.jsonl"


def config(tiny_llama, out, *sets) -> DPOConfig:
    return load_config(DPOConfig, ROOT / "configs" / "dpo_tiny.yaml",
                       [f"model_name_or_path={tiny_llama}", f"output_dir={out}", f"train_file={DATA}",
                        "report_to=[none]", "use_peft=false", "learning_rate=1e-4", *sets])


def test_every_base_weight_trains_against_a_frozen_copy(tiny_llama, tmp_path, capsys):
    trainer = DPOTrainer(config(tiny_llama, tmp_path / "run", "max_steps=2", "save_steps=null"))
    trainer.setup()
    assert trainer.config.save_steps == 0  # the default without LoRA: a checkpoint is a whole model
    before = {n: p.detach().clone() for n, p in trainer.base.model.named_parameters()}
    folder = trainer.train()
    assert trainer.base.adapters == [] and trainer.base.load_dtype == "float32"
    after = dict(trainer.base.model.named_parameters())
    assert not [n for n in before if torch.equal(before[n], after[n])]
    ref = dict(trainer.ref_copy.model.named_parameters())  # frozen, and still the starting model
    assert ref.keys() == before.keys() and all(torch.equal(ref[n], before[n]) for n in ref)
    assert not any(p.requires_grad for p in ref.values())
    assert all(ref[n].data_ptr() != after[n].data_ptr() for n in ref)
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in after.values()}
    assert folder == tmp_path / "run" / "model"
    assert_model_saved(folder, after)
    out = capsys.readouterr().out
    mb = sum(p.numel() * 4 for p in before.values()) / 2**20
    assert f"[align] reference: a frozen copy of the base ({mb:.1f} MiB)" in out
    assert "use_peft: false: checkpoints only at the end (save_steps: 0" in out
    assert checkpoint_names(tmp_path / "run") == ["step-000002"]
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["lora_placement"] == "full fine-tuning" and final["adapter_params"] == 0


@pytest.mark.parametrize("precompute", [False, True])
def test_resume_is_exact(precompute, tiny_llama, tmp_path):
    fixed = ["lr_scheduler_type=constant", f"precompute_ref_log_probs={str(precompute).lower()}"]
    straight, resumed = assert_resume_is_exact(lambda out, steps, resume: DPOTrainer(
        config(tiny_llama, out, f"max_steps={steps}", *fixed), resume=resume), tmp_path, ("loss", "rewards/margins"))
    assert (resumed.ref_copy is None) == precompute
    assert straight.summary["eval/loss"] == resumed.summary["eval/loss"]  # the copy is the starting model


def test_precomputed_reference_equals_the_frozen_copy(tiny_llama, tmp_path):
    # Training and held-out reference log-probs both come from the base before the first step.
    runs = {}
    for precompute in ("false", "true"):
        trainer = DPOTrainer(config(tiny_llama, tmp_path / precompute, "max_steps=3",
                                    f"precompute_ref_log_probs={precompute}"))
        trainer.train()
        runs[precompute] = trainer
    a, b = (dict(runs[k].base.model.named_parameters()) for k in ("false", "true"))
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5
    cache = runs["true"].ref_cache
    assert cache["eval_chosen"].shape == (len(runs["true"].eval_pairs),)
    ev = [runs[k].summary["eval/rewards/margins"] for k in ("false", "true")]
    assert ev[0] == pytest.approx(ev[1], abs=1e-4)


def test_a_reference_free_loss_keeps_no_copy(tiny_llama, tmp_path, capsys):
    trainer = DPOTrainer(config(tiny_llama, tmp_path / "run", "max_steps=1", "loss_type=sft"))
    trainer.train()
    assert trainer.ref_copy is None and trainer.ref_cache is None
    assert "frozen copy" not in capsys.readouterr().out


@pytest.mark.parametrize("sets, words", [
    (["load_in_4bit=true"], "use_peft: false trains every base weight; it cannot with load_in_4bit: true"),
    (["bf16=true"], "use_peft: false trains every base weight in float32; got dtype bfloat16"),
])
def test_refusals_are_one_line(sets, words, tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match=words) as caught:
        config(tiny_llama, tmp_path / "run", *sets)
    assert "\n" not in str(caught.value).strip()


def test_save_steps_default_follows_use_peft():
    assert DPOConfig(train_file=str(DATA)).save_steps == 50
    assert DPOConfig(train_file=str(DATA), use_peft=False).save_steps == 0
    assert DPOConfig(train_file=str(DATA), use_peft=False, save_steps=5).save_steps == 5
