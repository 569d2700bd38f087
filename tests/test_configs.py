"""Every YAML file under configs/ loads into its config dataclass (unknown keys would be errors)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from align.train.config_parser import load_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(ROOT.glob("*.yaml"))  # recipe configs; configs/accelerate/ holds launcher configs

# File-name prefix -> config dataclass that the file mirrors.
KINDS = {
    "dpo": "align.recipes.dpo:DPOConfig",
    "ppo": "align.recipes.ppo.config:PPOConfig",
    "grpo": "align.recipes.ppo.config:PPOConfig",
    "reward": "reward.train:RewardConfig",
    "sft": "align.recipes.sft:SFTConfig",
}


def config_class(path: Path):
    prefix = path.stem.split("_")[0]
    assert prefix in KINDS, f"{path.name}: no config class registered for prefix {prefix!r}"
    module, name = KINDS[prefix].split(":")
    return getattr(importlib.import_module(module), name)


def test_configs_found():
    assert len(CONFIGS) >= 2, "configs/ should hold the shipped configs"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    config = load_config(config_class(path), path)
    # The first lines of each config show the command that runs it.
    head = path.read_text().splitlines()[:4]
    assert any("align " in line or "scripts/" in line for line in head), f"{path.name}: no run command on top"
    assert type(config) is config_class(path)


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml"])
def test_accelerate_configs_parse_with_accelerate(name):
    """The launcher configs are read by accelerate's own config class, which rejects unknown keys."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "accelerate" / name))
    assert config.distributed_type.value == ("MULTI_GPU" if name == "ddp.yaml" else "FSDP")
