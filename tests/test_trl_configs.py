"""A YAML written for TRL's CLI (`trl dpo|sft|reward --config x.yaml`) loads in `align <recipe> --config x.yaml`.

TRL's own example configs live in tests/data/trl/ (each names its source). Every key either is a field
of the recipe's config, or is mapped or noted in exactly one printed line (align/train/trl_keys.py);
nothing is refused. A config with bad keys lists them all, each with its line, in one message.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml

from align.cli import main as align_main
from align.recipes.dpo import DPOConfig
from align.recipes.sft import SFTConfig
from align.train.config_parser import ConfigError, dump_config, load_config
from align.train.trl_keys import TRL_KEYS
from reward.train import RewardConfig

ROOT = Path(__file__).resolve().parents[1]
TRL = ROOT / "tests" / "data" / "trl"
PREFS = ROOT / "tests" / "data" / "prefs_tiny.jsonl"
SFT_ROWS = ROOT / "tests" / "data" / "sft_tiny.jsonl"
CONFIGS = {"dpo": DPOConfig, "sft": SFTConfig, "reward": RewardConfig}
# (recipe, file, what TRL's keys must resolve to here)
CASES = [
    ("dpo", "dpo_lora.yaml", {"eval_steps": 50, "lora_r": 32, "lora_alpha": 16, "learning_rate": 5e-6,
                              "max_steps": 1000, "gradient_accumulation_steps": 8}),
    ("sft", "sft_lora.yaml", {"eval_steps": 100, "packing": True, "lora_r": 32, "learning_rate": 2e-4}),
    ("reward", "reward_lora.yaml", {"eval_steps": 50, "max_length": 2048, "lora_r": 32, "learning_rate": 1e-4}),
    ("sft", "example_config.yaml", {"report_to": ["none"], "lr_scheduler_type": "cosine", "learning_rate": 1e-4}),
    ("dpo", "clis_dpo.yaml", {}),
    ("reward", "clis_reward.yaml", {}),
    ("sft", "clis_sft.yaml", {}),
]


def key_lines(path: Path) -> dict[str, int]:
    node = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    return {k.value: k.start_mark.line + 1 for k, _ in node.value}


def overrides(recipe: str, model: Path, out: Path) -> list[str]:
    # The files name hub models and datasets (Qwen/..., trl-lib/...); tests run offline, and --check-config
    # checks that the model is there, so the model becomes the tiny local one. The dataset becomes a local
    # file of the recipe's format, as TRL's dataset_name may be, so the same command would also train.
    data = SFT_ROWS if recipe == "sft" else PREFS
    return ["--set", f"model_name_or_path={model}", "--set", f"dataset_name={data}", "--set", f"output_dir={out}"]


@pytest.mark.parametrize("recipe,name,expected", CASES, ids=[name for _, name, _ in CASES])
def test_trl_example_config_loads_with_one_line_per_inert_key(recipe, name, expected, tiny_llama, tmp_path, capsys):
    path = TRL / name
    code = align_main([recipe, "--config", str(path), *overrides(recipe, tiny_llama, tmp_path / "run"),
                       "--check-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.rstrip().endswith(f"# config OK: {CONFIGS[recipe].__name__}")
    assert "error" not in err and "not supported" not in err, err
    fields = {f.name for f in dataclasses.fields(CONFIGS[recipe])}
    overridden = ("model_name_or_path", "dataset_name", "output_dir")  # said, if at all, at their --set
    for key, line in key_lines(path).items():
        if key in overridden:
            continue
        said = [s for s in err.splitlines() if s.startswith(f"[align] {path}:{line}: {key}: ")]
        if key in fields:
            assert not said, said
        else:  # TRL's key: mapped or noted, in exactly one line, with the reason from the table
            assert len(said) == 1, (key, err)
            if TRL_KEYS[key].action == "note":
                assert said[0].endswith(f"no effect here: {TRL_KEYS[key].reason}")
    resolved = yaml.safe_load(out)
    assert {k: resolved[k] for k in expected} == expected
    source = "train_file" if recipe == "sft" else "dataset_name"
    assert resolved[source] == str(SFT_ROWS if recipe == "sft" else PREFS)


def test_the_dpo_yaml_that_was_refused_eight_times_loads_in_one_run(tiny_llama, tmp_path):
    """The eight keys a TRL DPO YAML used to be refused for, one run each, in a real `python -m align` process."""
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_llama}\ndataset_name: {PREFS}\noutput_dir: {tmp_path / 'run'}\n"
                   "eval_strategy: steps\neval_steps: 20\nuse_peft: true\nloss_type: [sigmoid]\n"
                   "save_strategy: steps\nsave_steps: 20\nremove_unused_columns: false\npush_to_hub: false\n"
                   "attn_implementation: flash_attention_2\nenv:\n  CUDA_VISIBLE_DEVICES: '0'\n"
                   "lora_target_modules: [all-linear]\nreport_to: none\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "align", "dpo", "--config", str(cfg), "--check-config"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = yaml.safe_load(done.stdout)
    assert (resolved["loss_type"], resolved["eval_steps"], resolved["save_steps"]) == ("sigmoid", 20, 20)
    assert resolved["lora_target_modules"] == ["all-linear"] and resolved["use_peft"] is True  # a DPO field now
    notes = [line for line in done.stderr.splitlines() if line.startswith(f"[align] {cfg}:")]
    keys = [line.split(": ", 2)[1] for line in notes]
    assert keys == ["eval_strategy", "save_strategy", "remove_unused_columns", "push_to_hub",
                    "attn_implementation", "env"], done.stderr


def test_every_bad_key_is_listed_with_its_line_in_one_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train_file: x.jsonl\nlr: 1e-4\nbetta: 0.2\nnum_processes: 4\nbeta: 0.1\nfp16: true\n"
                   "eval_strategy: epoch\nfrobnicate: 1\nper_device_train_batch_size: two\n")
    with pytest.raises(ConfigError) as caught:
        load_config(DPOConfig, cfg)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{cfg}: 7 problems:"
    assert [line.strip().split(": ")[0:2] for line in lines[1:8]] == [
        [f"{cfg}:2", "lr"], [f"{cfg}:3", "betta"], [f"{cfg}:4", "num_processes"], [f"{cfg}:6", "fp16"],
        [f"{cfg}:7", "eval_strategy"], [f"{cfg}:8", "frobnicate"], [f"{cfg}:9", "per_device_train_batch_size"]]
    assert "lr: renamed; use learning_rate" in lines[1]
    assert "betta: unknown key (did you mean beta?)" in lines[2]
    assert "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N" in lines[3]
    assert "fp16: true is not supported here (only false)" in lines[4]
    assert "expected int, got 'two'" in lines[7]
    assert lines[8].strip().startswith("expected one of [") and "'learning_rate'" in lines[8]


def test_one_bad_key_stays_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train_file: x.jsonl\ndeepspeed: zero3.json\n")
    with pytest.raises(ConfigError) as caught:
        load_config(DPOConfig, cfg)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{cfg}:2: deepspeed: not supported here: no DeepSpeed")


def test_a_mapped_key_with_a_bad_value_is_named_at_its_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_file: x.jsonl\nsave_strategy: best\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:2: save_strategy: best: expected steps or no"):
        load_config(DPOConfig, cfg)
    cfg.write_text("train_file: x.jsonl\nuse_cpu: true\nsave_strategy: no\n")  # a bare `no` is YAML's false
    config = load_config(DPOConfig, cfg)
    assert (config.device, config.save_steps) == ("cpu", 0)


def test_a_split_key_sft_has_no_field_for_is_noted_when_it_is_what_sft_does(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset_name: {SFT_ROWS}\ndataset_train_split: train\n")
    assert load_config(SFTConfig, cfg).train_file == str(SFT_ROWS)
    cfg.write_text(f"dataset_name: {SFT_ROWS}\ndataset_train_split: validation\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:2: dataset_train_split: not supported by this recipe"):
        load_config(SFTConfig, cfg)
    cfg.write_text(f"dataset_name: {PREFS}\ndataset_train_split: validation\n")
    assert load_config(DPOConfig, cfg).dataset_split == "validation"


def test_a_key_align_cannot_honour_is_accepted_only_at_what_align_does(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_file: x.jsonl\noptim: adamw_torch\nadam_beta1: 0.9\nadam_epsilon: 1e-8\n")  # 1e-8: a str
    load_config(DPOConfig, cfg)
    said = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1] for line in said] == ["optim", "adam_beta1", "adam_epsilon"]
    cfg.write_text("train_file: x.jsonl\nadam_beta1: 0.8\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:2: adam_beta1: 0.8 is not supported here \(only 0.9\)"):
        load_config(DPOConfig, cfg)


@pytest.mark.parametrize("loss_type,expected", [(["sigmoid"], "sigmoid"), (["ipo"], "ipo"), ("hinge", "hinge")])
def test_loss_type_takes_trls_one_element_list(loss_type, expected):
    assert DPOConfig(train_file="x.jsonl", loss_type=loss_type).loss_type == expected


def test_a_list_of_losses_loads_and_bad_ones_are_one_line_naming_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_file: x.jsonl\nloss_type: [sigmoid, bco_pair, sft]\nloss_weights: [0.8, 0.2, 1.0]\n")
    config = load_config(DPOConfig, cfg)
    assert (config.loss_types(), config.loss_weights) == (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    cfg.write_text("train_file: x.jsonl\nloss_type: [sigmoid, sft]\nloss_weights: [1.0]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(DPOConfig, cfg)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{cfg}:3: loss_weights: expected one weight per loss_type")
    cfg.write_text("train_file: x.jsonl\nloss_type: [sigmoid, cdpo]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(DPOConfig, cfg)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{cfg}:2: loss_type: expected each in (")
    assert message.endswith("got 'cdpo'")


@pytest.mark.parametrize("cls,argument", [(DPOConfig, "train_dataset="), (RewardConfig, "train_dataset="),
                                          (SFTConfig, "save the rows to a file")])
def test_a_dataset_where_a_path_is_expected_names_the_argument(cls, argument):
    rows = datasets.Dataset.from_list([{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    with pytest.raises(ValueError) as caught:
        cls(train_file=rows)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("train_file: expected text (a path or name), got "
                                                      "datasets.Dataset; ")
    assert argument in message


def test_a_number_in_a_text_field_is_named_without_a_data_hint():
    with pytest.raises(ValueError, match=r"^dtype: expected text \(a path or name\), got int$"):
        DPOConfig(train_file="x.jsonl", dtype=16)


def test_a_path_object_becomes_text_and_the_config_is_written(tmp_path):
    """A pathlib.Path in a config built in Python is written to config.yaml as text (yaml cannot represent it)."""
    config = DPOConfig(train_file=PREFS, output_dir=tmp_path / "run", loss_type=["sigmoid"])
    dump_config(config, tmp_path / "config.yaml")
    again = load_config(DPOConfig, tmp_path / "config.yaml")
    assert (again.train_file, again.output_dir, again.loss_type) == (str(PREFS), str(tmp_path / "run"), "sigmoid")


def test_every_key_of_trls_configs_is_decided():
    """Each key TRL's `trl dpo|sft|reward` (and its ORPOConfig, CPOConfig) takes is a field here or has a line in
    TRL_KEYS."""
    trl = pytest.importorskip("trl")  # the bench extra
    from transformers import TrainingArguments
    from trl.experimental.cpo import CPOConfig as TRLCPOConfig
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.scripts.utils import DatasetMixtureConfig, ScriptArguments

    from align.recipes.cpo import CPOConfig
    from align.recipes.orpo import ORPOConfig

    for trl_config, ours in ((trl.DPOConfig, DPOConfig), (trl.SFTConfig, SFTConfig), (trl.RewardConfig, RewardConfig),
                             (TRLORPOConfig, ORPOConfig), (TRLCPOConfig, CPOConfig)):
        taken = {f.name for f in dataclasses.fields(ours)}
        keys = {f.name for c in (ScriptArguments, DatasetMixtureConfig, trl.ModelConfig, TrainingArguments,
                                 trl_config) for f in dataclasses.fields(c) if f.init}
        undecided = sorted(keys - taken - set(TRL_KEYS))
        assert not undecided, (ours.__name__, undecided)
