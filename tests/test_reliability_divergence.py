"""The finite guard: a step that leaves the trained tensors or the optimizer state non-finite stops
the run with one line naming the step and the likely cause, before anything is saved; a checkpoint
is never written from non-finite tensors, and the older good checkpoint stays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from align.core.errors import TrainingDiverged
from align.train.state import sha256_file, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "prefs_tiny.jsonl"


def dpo(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "align", "dpo", "--config", "configs/dpo_tiny.yaml", "--train_file", str(DATA),
            "--model_name_or_path", str(model), "--output_dir", str(out), "--report_to", "none",
            "--save_steps", "1", *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The error lines, each starting a line of its own (not glued to the progress bar's)."""
    return [line for line in done.stderr.replace("\r", "\n").split("\n") if line.startswith("error: ")]


def test_absurd_learning_rate_stops_before_saving_and_keeps_the_good_checkpoint(tiny_llama, tmp_path):
    """Warm-up from 0: step 1 updates nothing (a good checkpoint); step 2's update overflows to infinity."""
    out = tmp_path / "run"
    done = run(dpo(tiny_llama, out, "--max_steps", "4", "--learning_rate", "1e39", "--warmup_steps", "3",
                   "--lr_scheduler_type", "constant_with_warmup"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = error_lines(done)
    assert line.startswith("error: step 2: the trained tensors turned NaN or infinite after the update")
    assert "learning rate" in line and "too high" in line and "Stopped before saving anything" in line
    assert f"{out / 'checkpoints' / 'step-000001'}, verified intact" in line
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "step-000001"]
    assert verify_checkpoint(ck / "step-000001")["step"] == 1
    for f in ck.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(f)).values()), f


def garble_moments(ck: Path) -> None:
    """Optimizer moments garbled to finite values no gradients could give; the checksum fixed up to match."""
    tensors = load_file(str(ck / "tensors.safetensors"))
    for k in tensors:
        if k.endswith(".exp_avg"):
            tensors[k] = torch.full_like(tensors[k], 3e38)
        if k.endswith(".exp_avg_sq"):
            tensors[k] = torch.full_like(tensors[k], 1e-30)
    save_file(tensors, str(ck / "tensors.safetensors"))
    state = json.loads((ck / "state.json").read_text())
    state["files"]["tensors.safetensors"] = sha256_file(ck / "tensors.safetensors")
    (ck / "state.json").write_text(json.dumps(state))


def test_garbled_optimizer_state_is_refused_at_resume(tiny_llama, tmp_path):
    out = tmp_path / "run"
    assert run(dpo(tiny_llama, out, "--max_steps", "2")).returncode == 0
    garble_moments(out / "checkpoints" / "step-000001")
    before = (out / "checkpoints" / "step-000002" / "tensors.safetensors").read_bytes()
    done = run(dpo(tiny_llama, out, "--max_steps", "2", "--resume", "step-000001"))
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = error_lines(done)
    assert f"{out / 'checkpoints' / 'step-000001' / 'tensors.safetensors'}: the optimizer moments of optim." in line
    assert line.endswith("a corrupted optimizer state") and "Traceback" not in done.stderr
    assert (out / "checkpoints" / "step-000002" / "tensors.safetensors").read_bytes() == before


def test_garbled_optimizer_state_in_memory_stops_the_step_before_saving(tiny_llama, tmp_path):
    """Past every load check (e.g. memory corruption): the update goes non-finite, the guard names the cause."""
    from align.recipes.dpo import DPOConfig, DPOTrainer
    from align.train.config_parser import load_config

    out = tmp_path / "run"
    config = load_config(DPOConfig, ROOT / "configs/dpo_tiny.yaml",
                         [f"model_name_or_path={tiny_llama}", f"output_dir={out}", f"train_file={DATA}",
                          "max_steps=3", "save_steps=1", "report_to=[none]"])
    trainer = DPOTrainer(config)
    trainer.setup()
    try:
        trainer.step = 1
        trainer.training_step()
        trainer.save_checkpoint()
        for st in trainer.optimizer.state.values():
            st["exp_avg"].fill_(3e38)
            st["exp_avg_sq"].fill_(1e-30)
        with pytest.raises(TrainingDiverged, match=r"step 2: the trained tensors turned NaN or infinite after the "
                                                   r"update; likely cause: a corrupted optimizer state"):
            trainer.training_step()
    finally:
        trainer.close()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["LATEST", "step-000001"]


def test_train_state_refuses_to_write_non_finite_tensors(tiny_llama, tmp_path):
    """The last line of defence: TrainState.save itself, whatever the loop checked."""
    from align.recipes.dpo import DPOConfig, DPOTrainer
    from align.train.config_parser import load_config

    out = tmp_path / "run"
    config = load_config(DPOConfig, ROOT / "configs/dpo_tiny.yaml",
                         [f"model_name_or_path={tiny_llama}", f"output_dir={out}", f"train_file={DATA}",
                          "max_steps=2", "report_to=[none]"])
    trainer = DPOTrainer(config)
    trainer.setup()
    try:
        trainer.step = 1
        trainer.save_checkpoint()
        name, param = next(iter(trainer.base.adapter_parameters("policy").items()))
        with torch.no_grad():
            param[0, 0] = float("nan")
        trainer.step = 2
        with pytest.raises(TrainingDiverged, match=rf"step 2: adapter.policy.{name} holds NaN.*not written"):
            trainer.save_checkpoint()
    finally:
        trainer.close()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["LATEST", "step-000001"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
