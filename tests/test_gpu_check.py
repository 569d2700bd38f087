"""scripts/gpu_check.sh: refuses a machine without CUDA unless told, then runs every recipe on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--steps", "2", *args], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHON=sys.executable))


def test_without_cuda_it_says_so_and_fails_unless_allowed():
    proc = run()
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stderr and "--allow-cpu" in proc.stderr


def test_allow_cpu_runs_every_recipe_without_datasets_or_vllm():
    proc = run("--allow-cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["ok"] is True
    for name in ("dpo", "reward", "ppo"):
        r = report["recipes"][name]
        assert r["ok"] is True and r["steps"] == 2 and len(r["step_s"]) == 2 and all(t > 0 for t in r["step_s"])
        assert r["peak_gpu_mb"] is None
    assert report["recipes"]["dpo_2proc"]["skipped"]
    assert "sft" in report["recipes"]  # run, or skipped with a note
    assert report["imported"] == {"datasets": False, "vllm": False, "trl": False}
