"""Checkpoints that cannot poison a run: checksums verified on resume, fallback to the newest good
checkpoint, LATEST confined to the run folder, rotation only after verification, and temporaries of
killed writes swept at the next start.

The runs are real `python -m align dpo` processes on the tiny model; the damage is done to the real
files they wrote; kills are real SIGKILLs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from align.train.state import CheckpointError, latest_checkpoint, sha256_file, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "prefs_tiny.jsonl"


def dpo(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "align", "dpo", "--config", "configs/dpo_tiny.yaml", "--train_file", str(DATA),
            "--model_name_or_path", str(model), "--output_dir", str(out), "--report_to", "none",
            "--max_steps", "3", "--save_steps", "1", *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tmp_path_factory):
    """A 3-step DPO run checkpointed every step: step-000002 and step-000003 are kept."""
    out = tmp_path_factory.mktemp("reliab") / "run"
    done = run(dpo(tiny_llama, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def fresh_copy(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def rewrite_tensors(path: Path, change) -> None:
    """Change the tensors of a checkpoint file and fix up its checksum, as a careless tool would."""
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    ckpt = next(p for p in path.parents if (p / "state.json").exists())
    state = json.loads((ckpt / "state.json").read_text())
    state["files"][path.relative_to(ckpt).as_posix()] = sha256_file(path)
    (ckpt / "state.json").write_text(json.dumps(state))


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _nan_moment(t: dict) -> None:
    key = next(k for k in t if k.endswith(".exp_avg"))
    t[key] = torch.full_like(t[key], float("nan"))


def _negative_moment(t: dict) -> None:
    key = next(k for k in t if k.endswith(".exp_avg_sq"))
    t[key] = -torch.ones_like(t[key])


# damage -> (what to do to step-000003, the file the message must name)
DAMAGE = {
    "flipped byte in tensors": (lambda c: _flip_byte(c / "tensors.safetensors"), "tensors.safetensors"),
    "truncated adapter": (lambda c: (c / "adapters/policy/adapter_model.safetensors").write_bytes(
        (c / "adapters/policy/adapter_model.safetensors").read_bytes()[:100]), "adapter_model.safetensors"),
    "deleted tensors": (lambda c: (c / "tensors.safetensors").unlink(), "tensors.safetensors"),
    "state.json not JSON": (lambda c: (c / "state.json").write_text('{"step": 3, "adap'), "state.json"),
    "state.json missing": (lambda c: (c / "state.json").unlink(), "state.json"),
    "NaN optimizer moment, checksum fixed up": (
        lambda c: rewrite_tensors(c / "tensors.safetensors", _nan_moment), "tensors.safetensors"),
    "negative second moment, checksum fixed up": (
        lambda c: rewrite_tensors(c / "tensors.safetensors", _negative_moment), "tensors.safetensors"),
}


def test_checkpoints_record_and_pass_their_checksums(finished_run):
    ck = finished_run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "step-000002", "step-000003"]
    state = json.loads((ck / "step-000003" / "state.json").read_text())
    assert {"tensors.safetensors", "adapters/policy/adapter_model.safetensors",
            "adapters/policy/adapter_config.json"} <= set(state["files"])
    assert set(state["files"]) == {p.relative_to(ck / "step-000003").as_posix()
                                   for p in (ck / "step-000003").rglob("*") if p.is_file() and p.name != "state.json"}
    for rel, digest in state["files"].items():
        assert sha256_file(ck / "step-000003" / rel) == digest
    assert verify_checkpoint(ck / "step-000003")["step"] == 3


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_skipped(damage, finished_run, tmp_path):
    out = fresh_copy(finished_run, tmp_path)
    do, filename = DAMAGE[damage]
    do(out / "checkpoints" / "step-000003")
    said = []
    assert latest_checkpoint(out, say=said.append) == out / "checkpoints" / "step-000002"
    assert len(said) == 2, said
    assert said[0].startswith("[align] skipping checkpoint step-000003: ") and filename in said[0]
    assert "\n" not in said[0]
    assert said[1] == "[align] falling back to checkpoint step-000002, the newest good one"


def test_no_good_checkpoint_is_one_error_not_a_fresh_start(finished_run, tmp_path):
    out = fresh_copy(finished_run, tmp_path)
    for name in ("step-000002", "step-000003"):
        _flip_byte(out / "checkpoints" / name / "tensors.safetensors")
    with pytest.raises(CheckpointError, match=r"no good checkpoint to resume from .*tensors.safetensors: checksum"):
        latest_checkpoint(out, say=lambda _: None)


@pytest.mark.parametrize("pointer", ["../../outside", "/tmp", "step-000003/../../x", "", "step-3"])
def test_latest_names_only_a_checkpoint_of_this_run(pointer, finished_run, tmp_path):
    out = fresh_copy(finished_run, tmp_path)
    (tmp_path / "outside" / "state.json").parent.mkdir()
    (tmp_path / "outside" / "state.json").write_text('{"step": 99}')
    (out / "checkpoints" / "LATEST").write_text(pointer)
    said = []
    assert latest_checkpoint(out, say=said.append) == out / "checkpoints" / "step-000003"
    assert "is not a checkpoint name of this run" in said[0] and len(said) == 1


def test_resume_over_a_damaged_checkpoint(finished_run, tiny_llama, tmp_path):
    out = fresh_copy(finished_run, tmp_path)
    rewrite_tensors(out / "checkpoints" / "step-000003" / "tensors.safetensors", _nan_moment)
    done = run(dpo(tiny_llama, out, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    assert "Traceback" not in text
    assert "skipping checkpoint step-000003: " in text and "tensors.safetensors: tensor optim." in text
    assert "falling back to checkpoint step-000002" in text and "resumed from" in text
    assert verify_checkpoint(out / "checkpoints" / "step-000003")["step"] == 3  # retrained and rewritten
    assert steps_logged(out) == [1, 2, 3]


def test_a_checkpoint_that_fails_verification_never_replaces_older_ones(tiny_llama, tmp_path, monkeypatch):
    """Rotation deletes old checkpoints only after the new one reads back intact."""
    from align.recipes.dpo import DPOConfig, DPOTrainer
    from align.train import state as train_state
    from align.train.config_parser import load_config

    out = tmp_path / "run"
    config = load_config(DPOConfig, ROOT / "configs/dpo_tiny.yaml",
                         [f"model_name_or_path={tiny_llama}", f"output_dir={out}", f"train_file={DATA}",
                          "max_steps=3", "save_steps=1", "save_total_limit=1", "report_to=[none]"])
    trainer = DPOTrainer(config)
    trainer.setup()
    try:
        trainer.step = 1
        trainer.save_checkpoint()
        real = train_state.file_checksums
        monkeypatch.setattr(train_state, "file_checksums",  # the disk returns other bytes than were written
                            lambda folder: {k: "0" * 64 for k in real(folder)})
        trainer.step = 2
        with pytest.raises(CheckpointError, match="step-000002/.*checksum mismatch"):
            trainer.save_checkpoint()
    finally:
        trainer.close()
    assert (out / "checkpoints" / "LATEST").read_text() == "step-000001"
    assert verify_checkpoint(out / "checkpoints" / "step-000001")["step"] == 1


def test_temporaries_of_a_killed_write_are_swept_at_the_next_start(finished_run, tiny_llama, tmp_path):
    """SIGKILL a process in the middle of an atomic checkpoint write and of an atomic file write."""
    out = fresh_copy(finished_run, tmp_path)
    writer = ("import sys, time\n"
              "from pathlib import Path\n"
              "from align.core.atomic import atomic_dir\n"
              "out = Path(sys.argv[1])\n"
              "with atomic_dir(out / 'checkpoints' / 'step-000004') as tmp:\n"
              "    (tmp / 'tensors.safetensors').write_bytes(b'half')\n"
              "    print('writing', flush=True)\n"
              "    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", writer, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (out / ".metrics.jsonl.tmp-abc123").write_text("half a file")  # what atomic_write_bytes leaves when killed
    leftovers = [p.name for p in out.rglob("*") if ".tmp-" in p.name]
    assert any(name.startswith(".step-000004.tmp-") for name in leftovers), leftovers

    done = run(dpo(tiny_llama, out, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert "removed .step-000004.tmp-" in done.stdout


def test_a_copy_moved_aside_by_a_killed_replace_is_put_back(tmp_path):
    from align.core.atomic import sweep_stale_temps

    (tmp_path / ".step-000002.old-4242").mkdir()
    (tmp_path / ".step-000002.old-4242" / "state.json").write_text("{}")
    (tmp_path / ".step-000001.old-4243").mkdir()
    (tmp_path / "step-000001").mkdir()
    assert sweep_stale_temps(tmp_path) == [".step-000001.old-4243"]
    assert (tmp_path / "step-000002" / "state.json").exists() and (tmp_path / "step-000001").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]


def kill_mid_checkpoint(cmd: list[str], out: Path) -> list[str]:
    """Run `cmd`; once one checkpoint is complete, SIGKILL it the moment the next one's temporary folder
    appears. Returns the temporary folders the kill left behind: the run's own evidence that the kill
    landed mid-write (none when that write finished first, or the run ended before one began)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ck = out / "checkpoints"
    deadline = time.monotonic() + 300
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        if (ck / "LATEST").exists() and next(ck.glob(".step-*.tmp-*"), None) is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return sorted(p.name for p in ck.glob(".step-*.tmp-*"))
        time.sleep(0.002)  # a tiny model's checkpoint takes ~100 ms to write
    return []


def test_kill_during_a_checkpoint_write_then_resume_leaves_no_temporaries(tiny_llama, tmp_path):
    """A real training run SIGKILLed while it writes a checkpoint (checked, not hoped for), then resumed."""
    out = tmp_path / "run"
    cmd = dpo(tiny_llama, out, "--max_steps", "8")
    tries = []
    for attempt in range(4):  # a kill that came just after the write finished is tried again, resumed
        tries.append(kill_mid_checkpoint(cmd + (["--resume"] if attempt else []), out))
        print(f"kill {attempt + 1}: left {tries[-1] or 'no temporary folder (the write had finished)'}")
        if tries[-1]:
            break
    assert tries[-1], f"no kill landed in the middle of a checkpoint write: {tries}"
    leftover = tries[-1][0]
    done = run(cmd + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"removed {leftover}" in done.stdout, done.stdout[-3000:]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert steps_logged(out) == list(range(1, 9))
