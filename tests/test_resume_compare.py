"""A resume compares the run's settings and process count with its checkpoint's (align/train/resume_check.py):
a changed training setting is refused with every difference listed, --resume_changed accepts and records
it, a harmless one passes silently, a checkpoint written before settings were recorded resumes as before,
and another process count keeps the global batch through gradient_accumulation_steps.

The runs are real tiny SFT runs started in-process through `align.cli.main`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.core.errors import UserError
from align.recipes.sft import SFTConfig
from align.train.config_parser import load_config
from align.train.resume_check import HISTORY, check_resume, config_record, grad_accum_for_world

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "sft_tiny.jsonl"


def sft(model: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--config", str(ROOT / "configs" / "sft_tiny.yaml"), "--train_file", str(DATA),
            "--model_name_or_path", str(model), "--output_dir", str(out), "--report_to", "none",
            "--save_steps", "1", "--max_steps", "2", *extra]


@pytest.fixture(scope="module")
def finished(tiny_llama, tmp_path_factory):
    """A 2-step SFT run, checkpointed at each step; each test resumes a copy of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(sft(tiny_llama, out)) == 0
    return out


@pytest.fixture
def run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def latest_state(out: Path) -> dict:
    name = (out / "checkpoints" / "LATEST").read_text().strip()
    return json.loads((out / "checkpoints" / name / "state.json").read_text())


def test_checkpoints_record_the_resolved_config_and_process_count(finished):
    state = latest_state(finished)
    assert state["world"] == 1
    assert state["config"]["packing"] is False and state["config"]["learning_rate"] == 1e-3
    assert state["config"]["max_steps"] == 2 and state["config"]["output_dir"] == str(finished)


def test_changed_training_settings_are_refused_listing_each(tiny_llama, run, capsys):
    config_before = (run / "config.yaml").read_bytes()
    state_before = latest_state(run)
    capsys.readouterr()
    code = main(sft(tiny_llama, run, "--resume", "--packing", "true", "--learning_rate", "5e-4",
                    "--completion_only_loss", "false"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "3 setting(s) differ from checkpoint step-000002's" in err
    assert "packing: was False, now True" in err
    assert "learning_rate: was 0.001, now 0.0005" in err
    assert "completion_only_loss: was None, now False" in err
    assert "--resume_changed" in err and err.count("error:") == 1
    assert main(sft(tiny_llama, run, "--resume", "--packing", "true", "--check_config")) == 2  # checked up front
    assert "1 setting(s) differ from checkpoint step-000002's:\n  packing: was False, now True" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == config_before  # nothing rewritten
    assert not (run / HISTORY).exists() and latest_state(run) == state_before


def test_resume_changed_accepts_records_and_keeps_config_yaml_loadable(tiny_llama, run, capsys):
    config_before = (run / "config.yaml").read_bytes()
    assert main(sft(tiny_llama, run, "--resume", "--resume_changed", "--learning_rate", "5e-4",
                    "--max_steps", "3")) == 0
    out = capsys.readouterr().out
    assert "--resume_changed: training on from step-000002" in out and "learning_rate: was 0.001, now 0.0005" in out
    assert (run / "config.yaml").read_bytes() == config_before  # the config the run started with
    assert yaml.safe_load((run / HISTORY).read_text()) == [
        {"step": 2, "changed": {"learning_rate": [1e-3, 5e-4], "max_steps": [2, 3]}}]
    assert latest_state(run)["step"] == 3 and latest_state(run)["config"]["learning_rate"] == 5e-4
    assert load_config(SFTConfig, run / "config.yaml").learning_rate == 1e-3  # --config takes it as is
    assert main(["sft", "--config", str(run / "config.yaml"), "--output_dir", str(run.parent / "again"),
                 "--check_config"]) == 0
    # Resuming with the original config now lists what --resume_changed changed since.
    assert main(["sft", "--config", str(run / "config.yaml"), "--output_dir", str(run), "--resume",
                 "--check_config"]) == 2
    assert "learning_rate: was 0.0005, now 0.001" in capsys.readouterr().err
    # The next resume compares with the newest checkpoint: the accepted settings are no change any more.
    assert main(sft(tiny_llama, run, "--resume", "--learning_rate", "5e-4", "--max_steps", "3")) == 0


def test_harmless_change_is_accepted_silently(tiny_llama, run, capsys):
    capsys.readouterr()
    assert main(sft(tiny_llama, run, "--resume", "--logging_steps", "5", "--save_total_limit", "3")) == 0
    said = capsys.readouterr()
    assert "differ" not in said.err + said.out and "--resume_changed" not in said.err + said.out
    assert not (run / HISTORY).exists()


def test_extending_max_steps_is_accepted_said_and_recorded(tiny_llama, run, capsys):
    assert main(sft(tiny_llama, run, "--resume", "--max_steps", "3")) == 0
    assert "max_steps: 2 -> 3, extending the run from checkpoint step-000002" in capsys.readouterr().out
    assert yaml.safe_load((run / HISTORY).read_text()) == [{"step": 2, "changed": {"max_steps": [2, 3]}}]
    assert latest_state(run)["step"] == 3
    assert main(sft(tiny_llama, run, "--max_steps", "2", "--resume", "step-000003")) == 2  # shorter
    assert "max_steps: was 3, now 2" in capsys.readouterr().err


def test_checkpoint_without_recorded_config_resumes_as_before(tiny_llama, run, capsys):
    for state_file in (run / "checkpoints").glob("step-*/state.json"):  # as written before settings were recorded
        state = json.loads(state_file.read_text())
        del state["config"], state["world"]
        state_file.write_text(json.dumps(state))
    assert main(sft(tiny_llama, run, "--resume", "--packing", "true", "--max_steps", "3")) == 0
    out = capsys.readouterr().out
    assert "checkpoint step-000002 records no config" in out and "resuming without comparing" in out
    assert latest_state(run)["config"]["packing"] is True  # the new checkpoint records its settings


@pytest.mark.parametrize("per_device, accum, old, new, expected", [
    (2, 1, 2, 1, 2),   # 2 processes -> 1: twice the accumulation
    (2, 2, 1, 2, 1),   # 1 -> 2: half
    (4, 3, 2, 3, 2),   # 24 over 3 processes of 4
    (2, 1, 2, 4, None),  # a global batch of 4 cannot be shared by 4 processes of 2
    (4, 1, 1, 3, None),
])
def test_grad_accum_for_world_keeps_the_global_batch(per_device, accum, old, new, expected):
    got = grad_accum_for_world(per_device, accum, old, new)
    assert got == expected
    if got is not None:
        assert per_device * got * new == per_device * accum * old


def config(**sets) -> SFTConfig:
    return load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml", [f"{k}={v}" for k, v in sets.items()])


def test_another_process_count_adjusts_accumulation_in_one_line():
    state = {"step": 3, "world": 2, "config": config_record(config(gradient_accumulation_steps=1))}
    said = []
    now = config(gradient_accumulation_steps=1)
    entry = check_resume(now, state, world=1, accept=False, name="step-000003", say=said.append)
    assert now.gradient_accumulation_steps == 2
    assert len(said) == 1 and "gradient_accumulation_steps 1 -> 2 keeps the global batch of 8" in said[0]
    assert entry == {"step": 3, "changed": {"world_size": [2, 1], "gradient_accumulation_steps": [1, 2]}}
    # Given the fitting accumulation already (as docs/scaling.md says to): the same, no difference listed.
    now = config(gradient_accumulation_steps=2)
    assert check_resume(now, state, 1, False, "step-000003", said.append)["changed"]["world_size"] == [2, 1]


def test_a_process_count_that_cannot_keep_the_global_batch_is_refused_in_one_line():
    state = {"step": 3, "world": 1, "config": config_record(config())}
    with pytest.raises(UserError) as e:
        check_resume(config(), state, world=3, accept=False, name="step-000003", say=print)
    assert "\n" not in str(e.value) and "global batch of 4 x 1 x 1 = 4; on 3 processes" in str(e.value)
    now = config()
    entry = check_resume(now, state, world=3, accept=True, name="step-000003", say=print)
    assert entry["changed"] == {"world_size": [1, 3]} and now.gradient_accumulation_steps == 1


def test_two_processes_resumed_on_one_keep_the_global_batch(tiny_llama, tmp_path):
    """A real 2-process run (accelerate launch, gloo) resumed from its step-2 checkpoint by 1 process with the
    same flags trains step 3 on the same global batch: equal to a 1-process run at twice the accumulation."""
    from test_distributed import align_run, common, max_diff, metrics, tensors

    sets = ["per_device_train_batch_size=2", "max_steps=3", "save_steps=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    align_run("sft", "sft_tiny.yaml", common(tiny_llama, one, *sets, "gradient_accumulation_steps=2", data=DATA), 1)
    align_run("sft", "sft_tiny.yaml", common(tiny_llama, two, *sets, "gradient_accumulation_steps=1", data=DATA), 2)
    done = align_run("sft", "sft_tiny.yaml", common(tiny_llama, two, *sets, "gradient_accumulation_steps=1",
                                                    data=DATA), 1, "--resume", "step-000002")
    rel = "adapter/adapter_model.safetensors"
    assert max_diff(tensors(one / rel), tensors(two / rel)) <= 1e-5  # before: step 3 on half the batch
    assert "gradient_accumulation_steps 1 -> 2 keeps the global batch of 4" in done.stdout
    assert [r["step"] for r in metrics(two)] == [1, 2, 3]
    assert yaml.safe_load((two / HISTORY).read_text()) == [
        {"step": 2, "changed": {"world_size": [2, 1], "gradient_accumulation_steps": [1, 2]}}]


def test_two_spellings_of_one_file_are_no_change(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    state = {"step": 1, "world": 1, "config": config_record(config(train_file="tests/data/sft_tiny.jsonl"))}
    assert check_resume(config(train_file=str(DATA)), state, 1, False, "step-000001", print) is None
    with pytest.raises(UserError, match="train_file: was 'tests/data/sft_tiny.jsonl', now '.*prefs_tiny.jsonl'"):
        check_resume(config(train_file=str(ROOT / "tests" / "data" / "prefs_tiny.jsonl")), state, 1, False,
                     "step-000001", print)


def test_python_api_refuses_and_accepts_the_same_way(tiny_llama, run):
    from align.recipes.sft import train_sft

    changed = config(model_name_or_path=tiny_llama, train_file=DATA, output_dir=run, report_to="[none]",
                     save_steps=1, max_steps=2, lora_alpha=16)
    with pytest.raises(UserError, match=r"lora_alpha: was 32, now 16\n.*resume_changed=True in Python"):
        train_sft(changed, resume=True)
    train_sft(changed, resume=True, resume_changed=True)
    assert yaml.safe_load((run / HISTORY).read_text()) == [{"step": 2, "changed": {"lora_alpha": [32, 16]}}]


def test_a_train_file_edited_in_place_is_a_difference(tmp_path):
    """The same path with other rows trains on other data: its content digest is recorded and compared."""
    data = tmp_path / "rows.jsonl"
    shutil.copy(DATA, data)
    state = {"step": 1, "world": 1, "config": config_record(config(train_file=data))}
    assert state["config"]["train_file content"].startswith("sha256:")
    assert check_resume(config(train_file=data), state, 1, False, "step-000001", print) is None  # untouched
    data.write_text(data.read_text().replace('"completion": "72"', '"completion": "seventy-two"'))
    with pytest.raises(UserError, match=r"1 setting\(s\) differ.*\n  train_file content: was 'sha256:[0-9a-f]{16}', "
                                        r"now 'sha256:[0-9a-f]{16}'"):
        check_resume(config(train_file=data), state, 1, False, "step-000001", print)
    entry = check_resume(config(train_file=data), state, 1, True, "step-000001", print)
    assert list(entry["changed"]) == ["train_file content"]
