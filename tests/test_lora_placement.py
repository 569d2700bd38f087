"""Adapter placement (lora_target_modules: all-linear / attention / mlp / names; lora_layers_to_transform) and the
trainable-parameter count: predicted from the config alone, equal to what PEFT builds, printed by every recipe.

Real tiny models (Llama, Qwen3-MoE, Mixtral), real PEFT, real runs of SFT, DPO, the reward model and GRPO.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from align.core.base import SharedBase
from align.core.errors import UserError
from align.core.lora import LoraSettings
from align.core.lora_count import count_lora_params
from align.core.smollm import CONFIG as SMOLLM2
from align.recipes.dpo import DPOConfig, DPOTrainer
from align.recipes.ppo import GRPOConfig, PPOTrainer
from align.recipes.sft import SFTConfig, SFTTrainer
from align.train.config_parser import ConfigError, load_config
from reward.train import RewardConfig, RewardTrainer

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
ATTENTION, MLP = {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}
PLACEMENTS = ["all", "attention", "mlp", ["q_proj", "down_proj"]]


def adapted(base: SharedBase, name: str) -> set[tuple[int, str]]:
    """(layer, module leaf) of every LoRA tensor of adapter `name`."""
    out = set()
    for n in base.adapter_parameters(name):
        parts = n.split(".")
        layer = int(parts[parts.index("layers") + 1])
        module = [q for q in parts[:parts.index("lora_A" if "lora_A" in parts else "lora_B")] if q != "base_layer"]
        out.add((layer, module[-1]))  # PEFT nests a second fused expert tensor's wrapper in base_layer
    return out


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, words", [
    ("lora_target_modules", "attn", "lora_target_modules: expected 'all-linear', 'attention', 'mlp' or a non-empty"),
    ("lora_target_modules", "[]", "lora_target_modules: expected"),
    ("lora_layers_to_transform", "-1", "lora_layers_to_transform: expected a layer index >= 0"),
    ("lora_layers_to_transform", "[0, 0]", "lora_layers_to_transform: expected a layer index >= 0 or a non-empty "
                                           "list of distinct indices, got [0, 0]"),
    ("lora_layers_to_transform", "[]", "lora_layers_to_transform: expected"),
])
def test_bad_placement_is_one_line_naming_the_field(key, value, words):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, [f"{key}={value}"])
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_placement_spellings():
    def lora(*sets):
        return load_config(SFTConfig, None, ["train_file=rows.jsonl", *sets]).lora

    assert lora("lora_target_modules=[all-linear]").targets == lora().targets == "all"
    c = lora("lora_target_modules=mlp", "lora_layers_to_transform=3")
    assert (c.targets, c.layer_list, c.describe()) == ("mlp", [3], "r=8 on mlp, layers 3")
    assert lora("lora_layers_to_transform=[5, 1]").layer_list == [1, 5]
    assert lora("lora_target_modules=[q_proj, v_proj]").describe() == "r=8 on q_proj,v_proj, all layers"


def test_layer_outside_the_model_is_one_line(tiny_llama):
    base = SharedBase.load(str(tiny_llama))
    with pytest.raises(UserError, match=r"^lora_layers_to_transform: LlamaForCausalLM has layers 0-1; got \[2\]$"):
        base.add_adapter("p", LoraSettings(layers=[1, 2]))


# -- where the adapters go, and what the folder says ------------------------------------------------
@pytest.mark.parametrize("targets", PLACEMENTS, ids=str)
@pytest.mark.parametrize("layers", [None, 1])
def test_placement_adapts_exactly_those_layers_and_the_folder_verifies(targets, layers, tiny_llama, tmp_path):
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("p", LoraSettings(rank=4, targets=targets, layers=layers))
    names = set(targets) if isinstance(targets, list) else {"all": ATTENTION | MLP, "attention": ATTENTION,
                                                              "mlp": MLP}[targets]
    want = {(i, m) for i in ([0, 1] if layers is None else [layers]) for m in names}
    assert adapted(base, "p") == want
    folder = base.save_adapter("p", tmp_path / "p")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config.get("layers_to_transform") == (None if layers is None else [1])
    assert json.loads((folder / "align_meta.json").read_text())["lora"]["targets"] == targets
    fresh = SharedBase.load(str(tiny_llama))
    fresh.check_adapter_base(folder, "init_adapter")  # exactly the tensors the config implies
    fresh.load_adapter("p", folder)
    assert adapted(fresh, "p") == want
    assert fresh.settings["p"] == base.settings["p"]


def test_moe_placements_and_layers(tiny_models):
    for arch in ("qwen3_moe", "mixtral"):
        base = SharedBase.load(str(tiny_models[arch]))
        base.add_adapter("mlp1", LoraSettings(rank=2, targets="mlp", layers=1))
        base.add_adapter("attn", LoraSettings(rank=2, targets="attention"))
        assert adapted(base, "mlp1") == {(1, "experts")}, arch
        assert adapted(base, "attn") == {(i, m) for i in (0, 1) for m in ATTENTION}, arch


# -- the count --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral"])
def test_predicted_count_equals_what_peft_builds(arch, tiny_models):
    config = AutoConfig.from_pretrained(tiny_models[arch])
    for targets in PLACEMENTS[:3] + [["q_proj", "v_proj"]]:
        for layers in (None, 0, [0, 1]):
            base = SharedBase.load(str(tiny_models[arch]))
            base.add_adapter("p", LoraSettings(rank=3, targets=targets, layers=layers))
            built = sum(p.numel() for p in base.adapter_parameters("p").values())
            assert count_lora_params(config, targets, 3, layers) == built, (arch, targets, layers)


def test_count_by_hand():
    # Tiny Llama: hidden 64, 2 heads x 32 (q, o: 64 -> 64), 1 kv head (k, v: 64 -> 32), MLP 64 <-> 128.
    config = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
              "intermediate_size": 128, "num_hidden_layers": 2}
    assert count_lora_params(config, "attention", 1, 0) == 128 + 96 + 96 + 128
    assert count_lora_params(config, "mlp", 2, None) == 2 * 2 * (192 + 192 + 192)
    assert count_lora_params(config, ["k_proj"], 4, [0, 1]) == 2 * 4 * 96
    with pytest.raises(ValueError, match="targets: expected"):
        count_lora_params(config, "attn", 1)


def test_smollm2_placements_match_at_about_1_84m():
    """The issue's example: attention r=16 ~ MLP r=10 ~ all layers r=6 on SmolLM2-135M (~1.84M each)."""
    counts = {t: count_lora_params(SMOLLM2, t, r) for t, r in (("attention", 16), ("mlp", 10), ("all", 6))}
    assert counts == {"attention": 1_843_200, "mlp": 1_900_800, "all": 1_831_680}
    assert max(counts.values()) / min(counts.values()) < 1.04
    printed = subprocess.run([sys.executable, "-m", "align.core.lora_count"], capture_output=True, text=True,
                             check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    for targets, rank in (("attention", 16), ("mlp", 10), ("all", 6)):
        assert f"{targets} r={rank:<3} {counts[targets]:>12,} parameters" in printed, printed


# -- every recipe: the placement, the printed line, final_metrics.json --------------------------------
def _sft(model, out, sets):
    return SFTTrainer(load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml",
                                  [f"train_file={ROOT / 'tests' / 'data' / 'sft_tiny.jsonl'}", *sets]))


def _dpo(model, out, sets):
    return DPOTrainer(load_config(DPOConfig, ROOT / "configs" / "dpo_tiny.yaml",
                                  [f"train_file={ROOT / 'tests' / 'data' / 'prefs_tiny.jsonl'}", *sets]))


def _reward(model, out, sets):
    return RewardTrainer(load_config(RewardConfig, ROOT / "configs" / "reward_tiny.yaml",
                                     [f"train_file={ROOT / 'tests' / 'data' / 'prefs_tiny.jsonl'}", *sets]))


def _grpo(model, out, sets):
    return PPOTrainer(load_config(GRPOConfig, ROOT / "configs" / "ppo_tiny.yaml", ["algorithm=grpo", *sets]))


@pytest.mark.parametrize("make, adapter, heads", [(_sft, "adapter", 0), (_dpo, "adapter", 0),
                                                  (_reward, "adapter", 64), (_grpo, "policy", 0)],
                         ids=["sft", "dpo", "reward", "grpo"])
def test_every_recipe_places_counts_and_reports(make, adapter, heads, tiny_llama, tmp_path, capsys):
    sets = [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / 'run'}", "max_steps=1", "save_steps=0",
            "report_to=[none]", "lora_target_modules=attention", "lora_layers_to_transform=1", "lora_r=4"]
    trainer = make(tiny_llama, tmp_path, sets)
    trainer.train()
    predicted = count_lora_params(AutoConfig.from_pretrained(tiny_llama), "attention", 4, 1)
    assert adapted(trainer.base, trainer.trained_adapters()[0]) == {(1, m) for m in ATTENTION}
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    base_params = sum(p.numel() for p in trainer.base.base_parameters().values())
    assert final["adapter_params"] == predicted and final["trainable_params"] == predicted + heads
    assert final["base_params"] == base_params and final["lora_placement"] == "r=4 on attention, layers 1"
    line = f"[align] trainable params: {predicted + heads:,} || all params: {predicted + heads + base_params:,}"
    assert line in capsys.readouterr().out
    trainer.close()


def test_a_loaded_init_adapter_is_counted_with_its_own_placement(tiny_llama, tmp_path, capsys):
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("sft", LoraSettings(rank=4, targets="mlp", layers=[0]))
    folder = base.save_adapter("sft", tmp_path / "sft")
    sets = [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / 'run'}", "max_steps=1", "save_steps=0",
            "report_to=[none]", f"init_adapter={folder}"]  # the config's own placement: all-linear, r=8
    _dpo(tiny_llama, tmp_path, sets).train()
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    predicted = count_lora_params(AutoConfig.from_pretrained(tiny_llama), "mlp", 4, [0])
    assert (final["trainable_params"], final["lora_placement"]) == (predicted, "r=4 on mlp, layers 0")
    assert f"(LoRA r=4 on mlp, layers 0: {predicted:,}; base params" in capsys.readouterr().out


def test_placement_that_names_cannot_separate_is_refused():
    """A family whose attention and MLP share a leaf name: leaf matching cannot place one without the other."""
    from torch import nn

    from align.core.lora import lora_target_groups, lora_targets, peft_config

    block = nn.Module()
    block.self_attn, block.mlp = nn.Module(), nn.Module()
    block.self_attn.proj, block.mlp.proj, block.mlp.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 8)
    model = nn.Module()
    model.layers = nn.ModuleList([block])
    assert lora_targets(model) == (["fc", "proj"], [])  # all layers: no ambiguity
    with pytest.raises(ValueError, match="share the names"):  # "mlp" would catch the attention's proj too
        lora_targets(model, "mlp")
    with pytest.raises(UserError, match=r"^lora_target_modules: attention: attention and MLP layers share the "
                                        r"names \['proj'\]"):
        peft_config(lora_target_groups(model), LoraSettings(targets="attention"))
