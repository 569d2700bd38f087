"""Every bad configuration is one line naming the field (and file:line when it came from a YAML file),
given before any model loads, for every recipe; `--check_config` runs the same checks and exits non-zero.

Each case is a real `python -m align <recipe>` process; "before any model loads" is checked by the
run folder never being created (a run creates it right after the checks, before loading the base).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.recipes.dpo import DPOConfig
from align.recipes.ppo.config import PPOConfig
from align.train.config_parser import ConfigError, load_config
from reward.train import RewardConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "prefs_tiny.jsonl"
RECIPES = {"dpo": (DPOConfig, "configs/dpo_tiny.yaml"), "reward": (RewardConfig, "configs/reward_tiny.yaml"),
           "ppo": (PPOConfig, "configs/ppo_tiny.yaml")}

# (override, the text the one line must hold). Each is wrong for every recipe.
GENERIC = [
    ("learning_rate=0", "--set learning_rate=0: learning_rate: expected a positive number"),
    ("learning_rate=-1e-4", "learning_rate: expected a positive number"),
    ("max_steps=0", "max_steps:"),
    ("max_steps=-2", "max_steps:"),
    ("per_device_train_batch_size=0", "per_device_train_batch_size: expected a positive number"),
    ("per_device_eval_batch_size=-1", "per_device_eval_batch_size: expected a positive number"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps: expected a positive number"),
    ("save_steps=-1", "save_steps: expected a number >= 0"),
    ("eval_steps=-5", "eval_steps: expected a number >= 0"),
    ("logging_steps=0", "logging_steps: expected a positive number"),
    ("logging_steps=-1", "logging_steps: expected a positive number"),
    ("max_grad_norm=0", "max_grad_norm: expected a positive number"),
    ("learning_rate=[1,", "--set 'learning_rate=[1,': the value is not valid YAML"),
    ("model_name_or_path=/no/such/model", "model_name_or_path: '/no/such/model' is neither"),
    ("model_name_or_path=models/missing", "model_name_or_path: 'models/missing' is not a local folder"),
]
SPECIFIC = [
    ("reward", "head_learning_rate=0", "head_learning_rate: expected > 0"),
    ("ppo", "critic_learning_rate=-1e-5", "critic_learning_rate: expected > 0"),
    ("dpo", "num_train_epochs=0", "num_train_epochs: expected a positive number"),
    ("reward", "num_train_epochs=-1", "num_train_epochs: expected a positive number"),
]
# Every generic case runs as a process once, on recipes in turn; all run in-process on every recipe.
PROCESS_CASES = [(sorted(RECIPES)[i % 3], o, m) for i, (o, m) in enumerate(GENERIC)] + SPECIFIC


def command(recipe: str, model: Path, out: Path, *extra: str) -> list[str]:
    _, config = RECIPES[recipe]
    data = ["--train_file", str(DATA)] if recipe != "ppo" else []
    return [sys.executable, "-m", "align", recipe, "--config", config, *data, "--model_name_or_path", str(model),
            "--output_dir", str(out), "--report_to", "none", *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize("recipe,override,expected", PROCESS_CASES, ids=[f"{r}-{o}" for r, o, _ in PROCESS_CASES])
def test_bad_value_is_one_line_before_any_model_loads(recipe, override, expected, tiny_llama, tmp_path):
    out = tmp_path / "run"
    cmd = command(recipe, tiny_llama, out)
    if override.startswith("model_name_or_path="):
        cmd = [a for a in cmd if a != str(tiny_llama)]
        cmd.remove("--model_name_or_path")
    done = run(cmd + ["--set", override])
    assert_one_line(done, expected)
    assert not out.exists(), "the run folder was created: the error came too late"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("override,expected", GENERIC[:13], ids=[o for o, _ in GENERIC[:13]])
def test_every_recipe_rejects_the_generic_cases(recipe, override, expected):
    cls, config = RECIPES[recipe]
    with pytest.raises(ConfigError) as e:
        load_config(cls, ROOT / config, [f"train_file={DATA}"] * (recipe != "ppo") + [override])
    assert expected.split(": ", 1)[-1] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_bad_value_in_a_file_names_its_line(recipe, tiny_llama, tmp_path):
    _, config = RECIPES[recipe]
    path = tmp_path / "bad.yaml"
    kept = [x for x in (ROOT / config).read_text().splitlines() if not x.startswith("learning_rate:")]  # given once
    path.write_text("\n".join(kept) + "\n\n# a comment\nlearning_rate: -3.0e-4\n")
    line = len(path.read_text().splitlines())
    out = tmp_path / "run"
    cmd = command(recipe, tiny_llama, out)
    cmd[cmd.index("--config") + 1] = str(path)
    done = run(cmd + ["--check_config"])
    assert_one_line(done, f"{path}:{line}: learning_rate: expected a positive number, got -0.0003")
    assert not out.exists()


def test_output_dir_that_is_a_file_or_under_one(tiny_llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line(run(command("dpo", tiny_llama, blocker)), f"output_dir: {blocker} is a file")
    assert_one_line(run(command("reward", tiny_llama, blocker / "run", "--check_config")),
                    f"output_dir: {blocker / 'run'} is inside {blocker}, which is a file")


@pytest.mark.parametrize("check", [True, False], ids=["check_config", "run"])
def test_output_dir_where_nothing_can_be_made_is_one_line(tiny_llama, check):
    """/proc takes no new folder, even from root (whom permission bits never stop): one line, not a traceback."""
    done = run(command("dpo", tiny_llama, Path("/proc/align-run"), *(["--check_config"] if check else [])))
    assert_one_line(done, "output_dir: cannot write /proc/align-run: /proc does not take new files or folders")


@pytest.mark.parametrize("recipe", ["ppo", "reward"])
def test_check_config_refuses_a_finished_run_without_resume(recipe, tiny_llama, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    done = run(command(recipe, tiny_llama, out, "--check_config"))
    assert_one_line(done, f"output_dir: {out} already holds a run")
    overwrite = run(command(recipe, tiny_llama, out, "--check_config", "--overwrite"))
    assert overwrite.returncode == 0 and "# config OK" in overwrite.stdout
    assert (out / "metrics.jsonl").exists()  # a check deletes nothing


def test_check_config_passes_a_good_config(tiny_llama, tmp_path):
    done = run(command("dpo", tiny_llama, tmp_path / "run", "--check_config"))
    assert done.returncode == 0, done.stderr
    assert "# config OK: DPOConfig" in done.stdout and not (tmp_path / "run").exists()


def test_a_file_that_is_not_yaml_is_one_line_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nbeta: 0.1\n  learning_rate: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(DPOConfig, path)
    assert str(e.value) == f"{path}:3: not valid YAML (mapping values are not allowed here)"


def test_a_key_given_twice_in_a_file_is_one_line_naming_both(tmp_path):
    """YAML keeps the last of two equal keys without a word: one of the user's values would be ignored."""
    path = tmp_path / "twice.yaml"
    path.write_text("learning_rate: 1.0e-3\nbeta: 0.1\nlearning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(DPOConfig, path, [f"train_file={DATA}"])
    assert str(e.value) == f"{path}:3: learning_rate: given twice (first at line 1); YAML would keep only this one"


@pytest.mark.parametrize("kind", ["sequences", "mappings"])
def test_an_alias_bomb_is_one_line_not_a_hang(tmp_path, kind):
    """Six levels of nine aliases: 9**6 = 531,441 values from ten short lines (each level more would be 9x)."""
    from align.train.config_parser import MAX_YAML_VALUES

    names = "abcdefg"
    if kind == "sequences":
        text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip(names, names[1:]))
        text += "lora_target_modules: *g\n"
    else:
        text = "a: &a {x: 1}\n" + "".join(f"{n}: &{n} {{{', '.join(f'k{i}: *{p}' for i in range(9))}}}\n"
                                          for p, n in zip(names, names[1:]))
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(DPOConfig, path, [f"train_file={DATA}"])
    assert str(e.value).startswith(f"{path}:") and f"expands to more than {MAX_YAML_VALUES} values" in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200
