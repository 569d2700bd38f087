"""Every YAML file under configs/ loads into its config dataclass (unknown keys would be errors)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from align.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))

# File-name prefix -> config dataclass that the file mirrors.
KINDS = {
    "dpo": "align.dpo:DPOConfig",
    "ppo": "align.ppo.config:PPOConfig",
    "grpo": "align.ppo.config:PPOConfig",
    "reward": "reward.train:RewardConfig",
    "sft": "align.sft:SFTConfig",
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
    assert config is not None
