"""Full fine-tuning (`use_peft: false`) of a reward model on the tiny model: every base weight trains with the
head, the run writes a sequence classifier that scores as the trained model did (and that GRPO, `align reward
score` and transformers load), and a resumed run equals an uninterrupted one exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from full_finetune_kit import assert_resume_is_exact
from safetensors.torch import load_file

from align.core.errors import UserError
from align.train.config_parser import ConfigError, load_config
from reward.model import find_reward_folder
from reward.sources import load_reward_model
from reward.train import RewardConfig, RewardTrainer

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "prefs_tiny.jsonl"


def config(tiny_llama, out, *sets) -> RewardConfig:
    return load_config(RewardConfig, ROOT / "configs" / "reward_tiny.yaml",
                       [f"model_name_or_path={tiny_llama}", f"output_dir={out}", f"train_file={DATA}",
                        "use_peft=false", "learning_rate=1e-3", *sets])


def test_every_base_weight_trains_and_a_classifier_is_saved(tiny_llama, tmp_path, capsys):
    trainer = RewardTrainer(config(tiny_llama, tmp_path / "run", "max_steps=2", "save_steps=null"))
    trainer.setup()
    assert trainer.config.save_steps == 0  # the default without LoRA: a checkpoint is a whole model
    before = {n: p.detach().clone() for n, p in trainer.base.model.named_parameters()}
    head_before = trainer.rm.head.weight.detach().clone()
    folder = trainer.train()
    assert trainer.base.adapters == []
    after = dict(trainer.base.model.named_parameters())
    # Every weight the score reads trains; the tiny model's untied LM head is not read and stays as it was.
    assert [n for n in before if torch.equal(before[n], after[n])] == ["lm_head.weight"]
    assert not torch.equal(head_before, trainer.rm.head.weight)
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in after.items() if n != "lm_head.weight"} | {id(trainer.rm.head.weight)}
    assert folder == tmp_path / "run" / "reward_model"
    assert find_reward_folder(tmp_path / "run") == (folder, "classifier")
    saved = load_file(str(folder / "model.safetensors"))
    assert torch.equal(saved["score.weight"], trainer.rm.head.weight.detach())
    assert torch.equal(saved["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"])
    meta = json.loads((folder / "reward_meta.json").read_text())
    assert meta["kind"] == "reward_classifier" and meta["max_abs_diff"] <= 1e-4 and meta["trained_steps"] == 2
    out = capsys.readouterr().out
    assert "use_peft: false: checkpoints only at the end (save_steps: 0" in out
    assert "full fine-tuning: every base weight, float32" in out
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["lora_placement"] == "full fine-tuning" and final["adapter_params"] == 0


def test_the_classifier_scores_as_the_trained_model(tiny_llama, tmp_path):
    trainer = RewardTrainer(config(tiny_llama, tmp_path / "run", "max_steps=2"))
    trainer.train()
    # The folder as GRPO's reward_model_name_or_path reads it (the run folder is enough): a classifier, own weights.
    fn = load_reward_model(str(tmp_path / "run"), base=None)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "reward_model")
    assert fn.model.config.num_labels == 1 and type(fn.model) is type(model)
    pairs = trainer.eval_pairs[:3]
    ids = [p.prompt_ids + p.chosen_ids for p in pairs]
    with torch.no_grad():
        want = torch.cat([trainer.scores([p])[0] for p in pairs])
        got = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in ids])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_resume_is_exact(tiny_llama, tmp_path):
    straight, resumed = assert_resume_is_exact(lambda out, steps, resume: RewardTrainer(
        config(tiny_llama, out, f"max_steps={steps}", "lr_scheduler_type=constant", "eval_steps=0"), resume=resume),
        tmp_path)
    assert torch.equal(straight.rm.head.weight, resumed.rm.head.weight)


def test_export_says_there_is_nothing_to_export(tiny_llama, tmp_path):
    from align.export.reward import export_reward

    RewardTrainer(config(tiny_llama, tmp_path / "run", "max_steps=1")).train()
    with pytest.raises(UserError, match="trained with use_peft: false and is already a sequence classifier"):
        export_reward(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sets, words", [
    (["load_in_4bit=true"], "use_peft: false trains every base weight; it cannot with load_in_4bit: true"),
    (["bf16=true"], "use_peft: false trains every base weight in float32; got dtype bfloat16"),
])
def test_refusals_are_one_line(sets, words, tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match=words) as caught:
        config(tiny_llama, tmp_path / "run", *sets)
    assert "\n" not in str(caught.value).strip()
