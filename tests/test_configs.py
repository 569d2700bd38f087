"""Every YAML file under configs/ loads into its config dataclass (unknown keys would be errors) and passes
`align <recipe> --check_config` as it is shipped."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from align.train.config_parser import load_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(ROOT.glob("*.yaml"))  # recipe configs; configs/accelerate/ holds launcher configs

# File-name prefix -> config dataclass that the file mirrors, and the command that runs it.
KINDS = {
    "dpo": "align.recipes.dpo:DPOConfig",
    "kto": "align.recipes.kto:KTOConfig",
    "orpo": "align.recipes.orpo:ORPOConfig",
    "cpo": "align.recipes.cpo:CPOConfig",
    "simpo": "align.recipes.cpo:CPOConfig",
    "ppo": "align.recipes.ppo.config:PPOConfig",
    "grpo": "align.recipes.ppo.config:PPOConfig",
    "reward": "reward.train:RewardConfig",
    "sft": "align.recipes.sft:SFTConfig",
    "online": "align.recipes.online_dpo:OnlineDPOConfig",
}
COMMAND = {"grpo": "ppo", "simpo": "cpo", "online": "online-dpo"}  # the others are run by the command of their prefix


def config_class(path: Path):
    prefix = path.stem.split("_")[0]
    assert prefix in KINDS, f"{path.name}: no config class registered for prefix {prefix!r}"
    module, name = KINDS[prefix].split(":")
    return getattr(importlib.import_module(module), name)


def test_configs_found():
    """Every file of configs/ is among those checked below (a .yml or a typo'd name would slip by)."""
    listed = sorted(ROOT / name for name in os.listdir(ROOT) if (ROOT / name).is_file())
    assert CONFIGS and CONFIGS == listed, f"checked {[p.name for p in CONFIGS]}, configs/ holds {listed}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    config = load_config(config_class(path), path)
    # The first lines of each config show the command that runs it.
    head = path.read_text().splitlines()[:4]
    assert any("align " in line or "scripts/" in line for line in head), f"{path.name}: no run command on top"
    assert type(config) is config_class(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_check_config_passes(path, tmp_path, capsys):
    """`align <recipe> --config FILE --check_config` as a user runs it; only output_dir is moved to a fresh
    folder, so a run left in the file's own output_dir (a finished one refuses a restart) cannot decide it."""
    from align.cli import main

    prefix = path.stem.split("_")[0]
    argv = [COMMAND.get(prefix, prefix), "--config", str(path), "--output_dir", str(tmp_path / "run"), "--check_config"]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"# config OK: {config_class(path).__name__}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml"])
def test_accelerate_configs_parse_with_accelerate(name):
    """The launcher configs are read by accelerate's own config class, which rejects unknown keys."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "accelerate" / name))
    assert config.distributed_type.value == ("MULTI_GPU" if name == "ddp.yaml" else "FSDP")


@pytest.mark.parametrize("path", sorted(ROOT.glob("*_tiny.yaml")), ids=lambda p: p.name)
def test_tiny_config_says_how_to_run_it_on_the_tiny_model(path, tiny_llama, tmp_path, capsys):
    """A *_tiny.yaml ships `smollm2` (runs as is) and says on top how to build and pass the tiny model it is
    sized for; its command, with the tiny model the tests build in place of runs/tiny-model, checks out."""
    import shlex

    from align.cli import main

    head = path.read_text().splitlines()[:4]
    assert any("build_tiny_model('runs/tiny-model')" in line for line in head), f"{path.name}: no build line"
    command = next(line for line in head if line.startswith("#   align "))
    argv = [str(tiny_llama) if w == "runs/tiny-model" else w for w in shlex.split(command[len("#   align "):])]
    assert main([*argv, "--output_dir", str(tmp_path / "run"), "--check_config"]) == 0, capsys.readouterr().err
    assert f"model_name_or_path: {tiny_llama}" in capsys.readouterr().out


# The demo's pairs (and so the preference bench, scripts/bench/preference_demo.py, which trains with these
# files' settings) were sampled on prompts encoded by align/data/prompts.py, the chat template's turn.
DEMO_TRAINED = [p for p in CONFIGS if "train_file: runs/demo/pairs.jsonl" in p.read_text()]


@pytest.mark.parametrize("path", DEMO_TRAINED, ids=lambda p: p.name)
def test_demo_pairs_are_trained_on_the_prompt_they_were_sampled_on(path, tiny_llama):
    """Tokenised as the config says, a demo prompt is the very token sequence the answers were sampled after.
    Plain text (chat_template false) trained ORPO and SimPO on a prompt the model is never asked in."""
    from transformers import AutoTokenizer

    from align.data.preference import tokenize_answers
    from align.data.prompts import encode_prompts
    from align.tasks import arithmetic

    config = load_config(config_class(path), path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    row = arithmetic.make_prompts(1, seed=0)[0]
    prompt_ids, _ = tokenize_answers(row["prompt"], [row["answer"]], tokenizer, config.max_length,
                                     config.chat_template)
    assert prompt_ids == encode_prompts(tokenizer, [row])[0], f"{path.name}: chat_template {config.chat_template}"


@pytest.mark.parametrize("name", ["grpo_demo.yaml", "ppo_demo.yaml", "online_dpo_demo.yaml"])
def test_demo_configs_give_the_tasks_own_system_prompt(name):
    # YAML cannot import the constant; the demos and the rl-rank study must still prompt the base alike.
    from align.tasks.arithmetic import SYSTEM_PROMPT

    path = ROOT / name
    assert load_config(config_class(path), path).system_prompt == SYSTEM_PROMPT
