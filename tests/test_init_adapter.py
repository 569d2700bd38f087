"""DPO and PPO started from a saved adapter, with that adapter (frozen, on the same base) as the reference."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.core.base import SharedBase
from align.core.errors import UserError
from align.recipes.dpo import DPOConfig, DPOTrainer
from align.recipes.ppo.config import PPOConfig
from align.recipes.ppo.trainer import PPOTrainer
from align.train.config_parser import ConfigError, load_config

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"


@pytest.fixture(scope="module")
def init_adapter(tiny_llama, tmp_path_factory):
    """A saved policy adapter with random, non-zero A and B: it changes the model's log-probs."""
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.adapter_parameters("policy").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return base.save_adapter("policy", tmp_path_factory.mktemp("init") / "adapter")


def dpo(tiny_llama, out, **over) -> DPOTrainer:
    sets = [f"model_name_or_path={tiny_llama}", f"output_dir={out}", f"train_file={DATA}", "report_to=[none]"]
    trainer = DPOTrainer(load_config(DPOConfig, REPO / "configs" / "dpo_tiny.yaml",
                                     sets + [f"{k}={v}" for k, v in over.items()]))
    trainer.setup()
    return trainer


def test_dpo_from_init_adapter_starts_at_ln2_with_zero_rewards(tiny_llama, tmp_path, init_adapter):
    tr = dpo(tiny_llama, tmp_path / "init", init_adapter=init_adapter)
    assert tr.config.reference == "init" and tr.ref_copy is None
    assert sorted(tr.base.adapters) == ["policy", "reference"]  # two adapters, one base
    saved = load_file(str(init_adapter / "adapter_model.safetensors"))
    live = {n.replace(".policy", ""): p for n, p in tr.base.adapter_parameters("policy").items()}
    assert len(saved) == len(live) and all(torch.equal(saved[n], live[n]) for n in saved)
    ref_before = {n: p.detach().clone() for n, p in tr.base.adapter_parameters("reference").items()}
    assert not any(p.requires_grad for p in tr.base.adapter_parameters("reference").values())

    stats = tr.training_step()
    assert abs(stats["loss"] - math.log(2.0)) < 1e-5
    assert abs(stats["rewards/chosen"]) < 1e-6 and abs(stats["rewards/rejected"]) < 1e-6
    # The update moved the policy, not the reference.
    assert all(torch.equal(ref_before[n], p) for n, p in tr.base.adapter_parameters("reference").items())
    second = tr.training_step()
    assert abs(second["loss"] - math.log(2.0)) > 1e-6  # the policy left its reference


def test_dpo_from_init_adapter_with_the_base_as_reference_is_not_at_ln2(tiny_llama, tmp_path, init_adapter):
    tr = dpo(tiny_llama, tmp_path / "base", init_adapter=init_adapter, reference="base")
    assert tr.base.adapters == ["policy"]
    stats = tr.training_step()
    assert abs(stats["loss"] - math.log(2.0)) > 1e-3  # the init adapter is far from the base


def test_precomputed_reference_uses_the_init_adapter(tiny_llama, tmp_path, init_adapter):
    tr = dpo(tiny_llama, tmp_path / "pre", init_adapter=init_adapter, precompute_ref_log_probs="true")
    tr.before_train()
    stats = tr.training_step()
    assert abs(stats["loss"] - math.log(2.0)) < 1e-5


def ppo(tiny_llama, out, *overrides) -> PPOTrainer:
    cfg = load_config(PPOConfig, REPO / "configs" / "ppo_tiny.yaml",
                      [f"model_name_or_path={tiny_llama}", f"output_dir={out}", *overrides])
    trainer = PPOTrainer(cfg)
    trainer.setup()
    return trainer


@pytest.mark.parametrize("reference", ["init", "base"])
def test_ppo_from_init_adapter_kl_at_first_step(tiny_llama, tmp_path, init_adapter, reference):
    tr = ppo(tiny_llama, tmp_path / "run", f"init_adapter={init_adapter}", f"reference={reference}")
    try:
        m1 = tr.ppo_step(1)
    finally:
        tr.close()
    if reference == "init":
        assert m1["kl"] == 0.0 and m1["kl/sequence"] == 0.0
    else:
        assert abs(m1["kl/sequence"]) > 1e-3


def test_bad_init_adapter_is_one_clear_line_before_any_model_loads(tmp_path, init_adapter, tiny_llama):
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"train_file: {DATA}\ninit_adapter: {tmp_path / 'nowhere'}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: init_adapter: .*nowhere is not a folder"):
        load_config(DPOConfig, yaml)
    empty = tmp_path / "empty"
    empty.mkdir()
    yaml.write_text(f"train_file: {DATA}\ninit_adapter: {empty}\n")
    with pytest.raises(ConfigError, match="init_adapter: .*has no adapter_config.json"):
        load_config(DPOConfig, yaml)
    (empty / "adapter_config.json").write_text("{}")
    (empty / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no adapter_model.safetensors .only safetensors"):
        load_config(PPOConfig, _ppo_yaml(tmp_path, empty))
    yaml.write_text(f"train_file: {DATA}\nreference: init\n")
    with pytest.raises(ConfigError, match="reference: 'init' needs init_adapter"):
        load_config(DPOConfig, yaml)
    yaml.write_text(f"train_file: {DATA}\nreference: policy\n")
    with pytest.raises(ConfigError, match="reference: expected one of"):
        load_config(DPOConfig, yaml)


def _ppo_yaml(tmp_path, folder) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"init_adapter: {folder}\n")
    return path


def test_adapter_of_another_base_is_refused(tiny_llama, tmp_path, init_adapter):
    other = tmp_path / "other"
    shutil.copytree(init_adapter, other)
    meta = json.loads((other / "align_meta.json").read_text())
    meta["base_fingerprint"]["weights_sha256"] = "0" * 64
    (other / "align_meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"init_adapter: .*other: trained on another base: align_meta.json "
                                        r"base_fingerprint.weights_sha256"):
        dpo(tiny_llama, tmp_path / "run", init_adapter=other)
