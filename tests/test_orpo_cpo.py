"""ORPO and CPO/SimPO end to end on the tiny model: real runs learn, resume is exact, no reference is ever used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align_main
from align.recipes.cpo import CPOConfig, CPOTrainer, train_cpo
from align.recipes.orpo import ORPOConfig, ORPOTrainer, train_orpo
from align.train.config_parser import load_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"
RECIPES = {"orpo": (ORPOConfig, ORPOTrainer, train_orpo, "orpo_tiny.yaml"),
           "cpo": (CPOConfig, CPOTrainer, train_cpo, "cpo_tiny.yaml"),
           "simpo": (CPOConfig, CPOTrainer, train_cpo, "cpo_tiny.yaml")}
OVERRIDES = {"simpo": {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 0.5}}


def config(recipe: str, model, out, **over):
    cls, _, _, yaml_name = RECIPES[recipe]
    sets = [f"model_name_or_path={model}", f"output_dir={out}", f"train_file={DATA}", "report_to=[none]"]
    sets += [f"{k}={v}" for k, v in {**OVERRIDES.get(recipe, {}), **over}.items()]
    return load_config(cls, REPO / "configs" / yaml_name, sets)


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_held_out_loss_goes_down_and_only_the_adapter_learns(recipe, tiny_llama, tmp_path):
    trainer = RECIPES[recipe][1](config(recipe, tiny_llama, tmp_path / "run", save_steps=0))
    trainer.setup()
    assert trainer.base.adapters == ["policy"]  # no reference adapter, no second base
    before_base = {n: p.detach().clone() for n, p in trainer.base.base_parameters().items()}
    before = trainer.evaluate()
    trainer.train()
    after = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    print(recipe, before["eval/loss"], "->", after["eval/loss"])
    assert after["eval/loss"] < before["eval/loss"] - 0.05
    if recipe != "cpo":  # CPO's NLL (weight 1) outweighs its preference term, which is already near 0 here
        assert after["eval/rewards/margins"] > before["eval/rewards/margins"]
    assert all(torch.equal(before_base[n], p) for n, p in trainer.base.base_parameters().items())
    trainer.close()


@pytest.mark.parametrize("recipe", ["orpo", "cpo"])
def test_cli_end_to_end_with_trls_metric_names(recipe, tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    yaml_name = RECIPES[recipe][3]
    code = align_main([recipe, "--config", str(REPO / "configs" / yaml_name), "--model_name_or_path", str(tiny_llama),
                       "--output_dir", str(out), "--set", f"train_file={DATA}", "--report_to", "none"])
    assert code == 0
    assert f"adapter saved to {out / 'adapter'}" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not list((out / "adapter").glob("*.bin"))
    steps = [r for r in metric_rows(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    names = {"loss", "learning_rate", "grad_norm", "epoch", "rewards/chosen", "rewards/rejected",
             "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss"}
    if recipe == "orpo":
        names |= {"log_odds_ratio", "log_odds_chosen"}
    assert names <= set(steps[0])
    assert not (out / "ref_logprobs.safetensors").exists()


@pytest.mark.parametrize("recipe", ["orpo", "simpo"])
def test_resume_from_a_checkpoint_is_exact(recipe, tiny_llama, tmp_path):
    """A run resumed from its step-3 checkpoint ends bit-identical to the uninterrupted run, each step logged once."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train = RECIPES[recipe][2]
    train(config(recipe, tiny_llama, straight, max_steps=6, save_steps=1, save_total_limit=10, eval_steps=2))
    shutil.copytree(straight, resumed)
    # What a run killed after step 3's checkpoint leaves: later checkpoints, the final files gone; its metrics
    # may hold later steps (the resume drops them).
    for later in ("step-000004", "step-000005", "step-000006"):
        shutil.rmtree(resumed / "checkpoints" / later)
    (resumed / "checkpoints" / "LATEST").write_text("step-000003")
    shutil.rmtree(resumed / "adapter")
    (resumed / "final_metrics.json").unlink()
    train(config(recipe, tiny_llama, resumed, max_steps=6, save_steps=1, save_total_limit=10, eval_steps=2),
          resume=True)
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metric_rows(resumed) if "loss" in r] == list(range(1, 7))
    assert untimed(metric_rows(resumed)) == untimed(metric_rows(straight))  # losses, metrics, evaluations


def untimed(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock fields (those differ between two runs of the same steps)."""
    return [{k: v for k, v in r.items() if not (k.endswith("_per_s") or k == "step_s")} for r in rows]


def test_config_errors_name_the_field(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="loss_type: expected one of"):
        config("cpo", tiny_llama, tmp_path / "a", loss_type="kto_pair")
    with pytest.raises(ValueError, match="label_smoothing: only sigmoid and simpo"):
        config("cpo", tiny_llama, tmp_path / "b", loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type: expected one of"):
        CPOConfig(train_file="x.jsonl", loss_type=["simpo", "sigmoid"])
    assert CPOConfig(train_file="x.jsonl", loss_type=["simpo"]).loss_type == "simpo"
    with pytest.raises(ValueError, match="beta: expected > 0"):
        config("orpo", tiny_llama, tmp_path / "c", beta=0)
    alphapo = config("cpo", tiny_llama, tmp_path / "d", loss_type="alphapo", alpha=0.5)
    assert (alphapo.loss_type, alphapo.cpo_alpha, alphapo.alpha) == ("simpo", 0.0, 0.5)  # TRL's shorthand


def test_bad_data_is_one_line_before_any_model_loads(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    code = align_main(["orpo", "--config", str(REPO / "configs" / "orpo_tiny.yaml"), "--model_name_or_path",
                       str(tmp_path / "no-such-model"), "--output_dir", str(tmp_path / "run"), "--train_file", str(bad)])
    assert code == 2
    assert f"{bad}:2: field 'rejected': missing" in capsys.readouterr().err


def test_a_trl_simpo_yaml_loads(tmp_path, capsys):
    """A CPOConfig YAML as TRL's SimPO examples write it: TRL's own keys are fields or noted, none refused."""
    cfg = tmp_path / "simpo.yaml"
    cfg.write_text("model_name_or_path: smollm2\ndataset_name: org/pairs\nloss_type: simpo\ncpo_alpha: 0.0\n"
                   "simpo_gamma: 0.5\nbeta: 2.0\nuse_peft: true\nlora_r: 8\nbf16: false\n"
                   "generate_during_eval: false\nmax_completion_length: null\npadding_value: null\n"
                   "gradient_checkpointing: true\n")
    config = load_config(CPOConfig, cfg)
    assert (config.loss_type, config.cpo_alpha, config.simpo_gamma, config.beta) == ("simpo", 0.0, 0.5, 2.0)
    assert config.dataset_name == "org/pairs" and config.dtype == "float32"
    assert "generate_during_eval: no effect here" in capsys.readouterr().err
    cfg.write_text("train_file: x.jsonl\ngenerate_during_eval: true\n")
    with pytest.raises(ValueError, match="generate_during_eval"):
        load_config(ORPOConfig, cfg)
