"""Full fine-tuning (`use_peft: false`) in ORPO, CPO, KTO and online DPO on the tiny model: every base weight
trains, a reference where the loss reads one is a frozen copy of the starting base, the run saves model/, and a
resumed run equals an uninterrupted one exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from full_finetune_kit import assert_model_saved, assert_resume_is_exact, checkpoint_names, metric_series

from align.recipes.cpo import CPOConfig, CPOTrainer
from align.recipes.kto import KTOConfig, KTOTrainer
from align.recipes.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from align.recipes.orpo import ORPOConfig, ORPOTrainer
from align.train.config_parser import ConfigError, load_config

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PAIRS = f"train_file={ROOT / 'tests' / 'data' / 'prefs_tiny.jsonl'}"
# recipe -> (config class, trainer class, tiny config, settings, whether a frozen reference copy is kept)
RECIPES = {
    "orpo": (ORPOConfig, ORPOTrainer, "orpo_tiny.yaml", [PAIRS], False),
    "cpo": (CPOConfig, CPOTrainer, "cpo_tiny.yaml", [PAIRS], False),
    "kto": (KTOConfig, KTOTrainer, "kto_tiny.yaml", [f"train_file={ROOT / 'tests' / 'data' / 'kto_tiny.jsonl'}"],
            True),
    # transformers generate on the shared base samples the weights being trained; GRPO's test covers vLLM's sync.
    "online-dpo": (OnlineDPOConfig, OnlineDPOTrainer, "online_dpo_tiny.yaml", ["engine=hf"], True),
}


def make(recipe, tiny_llama, out, *sets, resume=False):
    config_cls, trainer_cls, yaml, fixed, _ = RECIPES[recipe]
    config = load_config(config_cls, ROOT / "configs" / yaml,
                         [f"model_name_or_path={tiny_llama}", f"output_dir={out}", "report_to=[none]",
                          "use_peft=false", "learning_rate=1e-4", "save_steps=null", "lr_scheduler_type=constant",
                          *fixed, *sets])
    return trainer_cls(config, resume=resume)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_base_weight_trains_and_the_model_is_saved(recipe, tiny_llama, tmp_path, capsys):
    trainer = make(recipe, tiny_llama, tmp_path / "run", "max_steps=2")
    try:
        trainer.setup()
        assert trainer.config.save_steps == 0  # the default without LoRA: a checkpoint is a whole model
        before = {n: p.detach().clone() for n, p in trainer.base.model.named_parameters()}
        folder = trainer.train()
        after = dict(trainer.base.model.named_parameters())
        assert trainer.base.adapters == [] and not [n for n in before if torch.equal(before[n], after[n])]
        held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in after.values()}
        keeps_copy = RECIPES[recipe][4]
        assert (getattr(trainer, "ref_copy", None) is not None) == keeps_copy
        if keeps_copy:  # frozen, and still the starting model
            ref = dict(trainer.ref_copy.model.named_parameters())
            assert all(torch.equal(ref[n], before[n]) and not ref[n].requires_grad for n in ref)
        assert folder == tmp_path / "run" / "model"
        assert_model_saved(folder, after)
        assert checkpoint_names(tmp_path / "run") == ["step-000002"]
        out = capsys.readouterr().out
        assert ("[align] reference: a frozen copy of the base" in out) == keeps_copy
        final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
        assert final["lora_placement"] == "full fine-tuning" and final["adapter_params"] == 0
    finally:
        trainer.close()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_is_exact(recipe, tiny_llama, tmp_path):
    assert_resume_is_exact(lambda out, steps, resume: make(recipe, tiny_llama, out, f"max_steps={steps}",
                                                           resume=resume), tmp_path)
    assert len(metric_series(tmp_path / "a", "loss")) == 4


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_refusals_are_one_line(recipe, tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="use_peft: false trains every base weight in float32; got dtype bfloat16"
                       ) as caught:
        make(recipe, tiny_llama, tmp_path / "run", "bf16=true")
    assert "\n" not in str(caught.value).strip()


def test_online_dpo_refuses_a_remote_engine(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="use_peft: false: a remote engine receives adapters only"):
        make("online-dpo", tiny_llama, tmp_path / "run", "engine=remote", "vllm_server_base_url=http://127.0.0.1:9")
