"""metrics.jsonl holds each step once after a run is SIGKILLed before its first checkpoint or after its
last one and then resumed (real processes, real kills)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "prefs_tiny.jsonl"


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def kill_when(cmd: list[str], ready, timeout: float = 180) -> bool:
    """Start `cmd`, SIGKILL it as soon as `ready()`; False if it had finished by then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return True


def finish(cmd: list[str]) -> str:
    done = subprocess.run(cmd, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_killed_before_the_first_checkpoint(tiny_llama, tmp_path):
    """PPO logs its 'before' evaluation at step 0 and trains: killed with no checkpoint, then resumed."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "align", "ppo", "--config", "configs/ppo_tiny.yaml", "--model_name_or_path",
           str(tiny_llama), "--output_dir", str(out), "--max_steps", "3", "--save_steps", "0"]
    assert kill_when(cmd, lambda: 1 in steps(out)), "the run finished before the kill"
    assert not (out / "checkpoints").exists() and steps(out)[:2] == [0, 1]
    assert "starting fresh" in finish(cmd + ["--resume"])
    assert steps(out) == [0, 1, 2, 3]


def test_killed_after_the_last_checkpoint(tiny_llama, tmp_path):
    """DPO killed once its final checkpoint is in place (or finished just before): resumed, nothing doubles."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "align", "dpo", "--config", "configs/dpo_tiny.yaml", "--train_file", str(DATA),
           "--model_name_or_path", str(tiny_llama), "--output_dir", str(out), "--report_to", "none",
           "--max_steps", "3", "--save_steps", "1"]
    latest = out / "checkpoints" / "LATEST"
    kill_when(cmd, lambda: latest.exists() and latest.read_text() == "step-000003")
    assert steps(out) == [1, 2, 3]
    finish(cmd + ["--resume"])
    assert steps(out) == [1, 2, 3]
    finish(cmd + ["--resume"])  # and again: a finished run resumed twice
    assert steps(out) == [1, 2, 3]


def test_a_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    from align.train.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    logger = MetricsLogger(tmp_path, report_to=[])
    logger.truncate_after(2)
    logger.log(3, {"loss": 0.3})
    assert steps(tmp_path) == [1, 2, 3]
