"""The skeleton every recipe shares: config fields with help, TRL-style flags, renamed keys, and one
output-folder policy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.recipes.dpo import DPOConfig
from align.recipes.ppo.config import PPOConfig
from align.train.config_parser import ConfigError, load_config
from reward.train import RewardConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "prefs_tiny.jsonl"
RECIPES = {"dpo": (DPOConfig, "configs/dpo_tiny.yaml"), "reward": (RewardConfig, "configs/reward_tiny.yaml"),
           "ppo": (PPOConfig, "configs/ppo_tiny.yaml")}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_field_has_help_and_the_help_lists_it(recipe, capsys):
    cls, _ = RECIPES[recipe]
    fields = [f for f in dataclasses.fields(cls) if f.init]
    missing = [f.name for f in fields if not f.metadata.get("help")]
    assert not missing, f"{cls.__name__} fields without help: {missing}"
    with pytest.raises(SystemExit):
        main([recipe, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in fields:
        assert f"--{f.name} VALUE" in text, f.name
    assert "--lora_r VALUE LoRA rank" in text and "(default: 'all-linear')" in text


def test_flags_and_set_override_the_file_in_order(capsys):
    args = ["dpo", "--config", "configs/dpo_tiny.yaml", "--learning_rate", "3e-4", "--lora_r", "4",
            "--report_to", "none", "--beta", "0.3", "--set", "beta=0.5", "--check_config"]
    assert main(args) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["learning_rate"] == 3e-4 and shown["lora_r"] == 4 and shown["report_to"] == ["none"]
    assert shown["beta"] == 0.5  # --set comes last
    assert shown["max_length"] == 96  # from the file


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_renamed_keys_name_their_new_spelling(recipe, tmp_path):
    cls, _ = RECIPES[recipe]
    assert cls.RENAMED
    for old, new in cls.RENAMED.items():
        path = tmp_path / "old.yaml"
        path.write_text(f"seed: 1\n{old}: 1\n")
        with pytest.raises(ConfigError, match=rf"old.yaml:2: {old}: renamed; use {new.split(' ')[0]}"):
            load_config(cls, path)
        assert new.split(" ")[0] not in cls.RENAMED or old == new


def _train_args(recipe: str, model: Path, out: Path) -> list[str]:
    cls, config = RECIPES[recipe]
    args = [recipe, "--config", config, "--model_name_or_path", str(model), "--output_dir", str(out),
            "--max_steps", "1", "--report_to", "none"]
    return args + (["--train_file", str(DATA)] if recipe != "ppo" else [])


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(recipe, tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    args = _train_args(recipe, tiny_llama, out)
    assert main(args) == 0
    first = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"output_dir: {out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "config.yaml").read_text() == first  # nothing touched
    assert main(args + ["--resume"]) == 0  # finished: resumes at its last step, nothing left to train
    assert main(args + ["--overwrite", "--seed", "7"]) == 0
    assert "seed: 7" in (out / "config.yaml").read_text()
    assert not (out / "checkpoints" / "step-000002").exists()
    assert main(args + ["--resume", "step-000009"]) == 2
    assert "--resume step-000009: no checkpoint of that name" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_refused(tiny_llama, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("not a folder")
    assert main(_train_args("dpo", tiny_llama, out)) == 2
    assert f"output_dir: {out} is a file" in capsys.readouterr().err


def test_resume_from_a_named_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "run"
    args = _train_args("dpo", tiny_llama, out)[:-4] + ["--max_steps", "3", "--save_steps", "1",
                                                        "--save_total_limit", "3", "--report_to", "none"]
    assert main(args) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-000001", "step-000002", "step-000003"]
    from align.recipes.dpo import DPOTrainer

    config = load_config(DPOConfig, ROOT / "configs/dpo_tiny.yaml",
                         [f"model_name_or_path={tiny_llama}", f"output_dir={out}", f"train_file={DATA}",
                          "max_steps=3", "report_to=[none]"])
    trainer = DPOTrainer(config, resume="step-000001")
    trainer.setup()
    assert trainer.step == 1
    trainer.close()


@pytest.mark.parametrize("sets, dtype", [([], "auto"), (["bf16=true"], "bfloat16"), (["bf16=false"], "float32"),
                                         (["dtype=float16"], "float16"), (["dtype=bfloat16", "bf16=false"], "bfloat16")])
def test_bf16_and_dtype_settle_the_base_dtype(sets, dtype):
    assert load_config(DPOConfig, None, sets).dtype == dtype


@pytest.mark.parametrize("sets, message", [(["dtype=float64"], "dtype: expected auto, float32, bfloat16 or float16"),
                                           (["dtype=float16", "bf16=true"], "bf16: true contradicts dtype: float16")])
def test_bad_dtype_settings_are_named(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DPOConfig, None, sets)


def test_dtype_auto_resolves_where_the_base_lives_and_config_yaml_keeps_auto(tiny_llama, tmp_path, capsys):
    """auto (pinned to float32 in the suite, tests/conftest.py) resolves where the base lives; a base handed
    in keeps its own dtype. What auto chooses per machine: test_auto_dtype_is_bfloat16_where_native."""
    import torch

    from align.core.base import SharedBase
    from align.core.hardware import default_dtype
    from align.recipes.dpo import DPOTrainer

    assert default_dtype("cpu") == "float32"
    sets = [f"model_name_or_path={tiny_llama}", f"train_file={DATA}", "max_steps=1", "report_to=[none]",
            "device=cpu"]
    trainer = DPOTrainer(load_config(DPOConfig, ROOT / "configs/dpo_tiny.yaml", sets + [f"output_dir={tmp_path / 'a'}"]))
    trainer.train()
    trainer.close()
    assert {p.dtype for p in trainer.base.model.parameters() if not p.requires_grad} == {torch.float32}
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["dtype"] == "auto"
    assert "[align] dtype auto: float32 (ALIGN_AUTO_DTYPE=float32)" in capsys.readouterr().out

    base = SharedBase.load(str(tiny_llama), dtype="bfloat16", device="cpu")
    trainer = DPOTrainer(load_config(DPOConfig, ROOT / "configs/dpo_tiny.yaml", sets + [f"output_dir={tmp_path / 'b'}"]),
                         base=base)
    trainer.train()
    trainer.close()
    assert trainer.dtype == "bfloat16" and trainer.config.dtype == "auto"  # the cache and engines read trainer.dtype
    logged = [line for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert logged and all(torch.isfinite(torch.tensor(yaml.safe_load(line)["loss"])) for line in logged)


SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ZEN3 = "flags\t\t: fpu sse2 avx2 fma\n"


@pytest.mark.parametrize("device, cuda_bf16, cpuinfo, override, expected", [
    ("cpu", False, SAPPHIRE_RAPIDS, None, ("float32", "cpu computes bfloat16 natively (amx_bf16), but a bfloat16 base drifts the vLLM engine's probe past its "
                                    "tolerance on CPU; bf16: true asks for it")),
    ("cpu", False, "flags\t\t: avx2 avx512f avx512_bf16\n", None,
     ("float32", "cpu computes bfloat16 natively (avx512_bf16), but a bfloat16 base drifts the vLLM engine's probe past its "
                                    "tolerance on CPU; bf16: true asks for it")),
    ("cpu", False, ZEN3, None, ("float32", "cpu has no native bfloat16 (no amx_bf16 or avx512_bf16): it would "
                                           "be emulated")),
    ("cpu", False, "", None, ("float32", "cpu has no native bfloat16 (no amx_bf16 or avx512_bf16): it would "
                                         "be emulated")),  # no /proc/cpuinfo (macOS, Windows)
    ("cpu", False, "flags: avx512_bf16_like\n", None, ("float32", "cpu has no native bfloat16 (no amx_bf16 or "
                                                                  "avx512_bf16): it would be emulated")),
    ("cuda:0", True, ZEN3, None, ("bfloat16", "cuda:0 computes bfloat16 natively")),
    ("cuda", False, SAPPHIRE_RAPIDS, None, ("float32", "cuda has no native bfloat16")),  # e.g. a V100
    ("cpu", False, SAPPHIRE_RAPIDS, "float32", ("float32", "ALIGN_AUTO_DTYPE=float32")),
    ("cpu", False, ZEN3, "bfloat16", ("bfloat16", "ALIGN_AUTO_DTYPE=bfloat16")),
])
def test_auto_dtype_is_bfloat16_on_a_native_gpu(device, cuda_bf16, cpuinfo, override, expected):
    """The choice from the facts passed in, so it means the same on every machine that runs the test."""
    from align.core.hardware import choose_auto_dtype

    assert choose_auto_dtype(device, cuda_bf16, cpuinfo, override) == expected


def test_auto_dtype_override_must_be_a_dtype_auto_could_choose():
    from align.core.hardware import choose_auto_dtype

    with pytest.raises(ValueError, match="ALIGN_AUTO_DTYPE: expected float32 or bfloat16, got 'fp16'"):
        choose_auto_dtype("cpu", False, ZEN3, "fp16")


TRAINERS = {"dpo": ("align.recipes.dpo", "DPOConfig", "DPOTrainer", "configs/dpo_tiny.yaml", DATA),
            "reward": ("reward.train", "RewardConfig", "RewardTrainer", "configs/reward_tiny.yaml", DATA),
            "sft": ("align.recipes.sft", "SFTConfig", "SFTTrainer", "configs/sft_tiny.yaml",
                    ROOT / "tests" / "data" / "sft_tiny.jsonl"),
            "ppo": ("align.recipes.ppo", "PPOConfig", "PPOTrainer", "configs/ppo_tiny.yaml", None)}


@pytest.mark.parametrize("recipe", sorted(TRAINERS))
def test_a_run_and_its_resume_leave_the_config_as_given(recipe, tiny_llama, tmp_path):
    """device and dtype auto resolve beside the config (trainer.device, trainer.dtype); the config object
    itself is the same after a run, and after a resumed one, as before it."""
    import copy
    import importlib

    module, config_name, trainer_name, yaml_file, data = TRAINERS[recipe]
    mod = importlib.import_module(module)
    sets = [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / 'run'}", "max_steps=2", "save_steps=1",
            "report_to=[none]", "device=auto", "dtype=auto"] + ([f"train_file={data}"] if data else [])
    config = load_config(getattr(mod, config_name), ROOT / yaml_file, sets)
    given = copy.deepcopy(config)
    for resume in (None, True):
        trainer = getattr(mod, trainer_name)(config, resume=resume)
        try:
            trainer.train()
        finally:
            trainer.close()
        assert dataclasses.asdict(config) == dataclasses.asdict(given)
    assert (trainer.device, trainer.dtype) == ("cpu", "float32") or trainer.device.startswith("cuda")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["device"] == "auto"
