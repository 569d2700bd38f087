"""Every recipe, killed with SIGKILL at a random moment (checkpoints included) and resumed, ends
bit-identical to an uninterrupted run, and its metrics hold each step once.

The runs are real `python -m align` processes on the tiny model; the kill is a real SIGKILL,
not a clean stop. The kill moment is random; its seed is printed and in every failure message, and
ALIGN_TEST_KILL_SEED=<seed> replays it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "prefs_tiny.jsonl"

# recipe -> (arguments, steps in the run, files whose tensors must match)
RECIPES = {
    "dpo": (["dpo", "--config", "configs/dpo_tiny.yaml", "--train_file", str(DATA)], 10,
            ["adapter/adapter_model.safetensors"]),
    "kto": (["kto", "--config", "configs/kto_tiny.yaml", "--train_file", str(ROOT / "tests" / "data" / "kto_tiny.jsonl")],
            12, ["adapter/adapter_model.safetensors"]),
    "orpo": (["orpo", "--config", "configs/orpo_tiny.yaml", "--train_file", str(DATA)], 10,
             ["adapter/adapter_model.safetensors"]),
    "simpo": (["cpo", "--config", "configs/cpo_tiny.yaml", "--train_file", str(DATA), "--loss_type", "simpo",
               "--cpo_alpha", "0", "--beta", "2.0"], 10, ["adapter/adapter_model.safetensors"]),
    "reward": (["reward", "--config", "configs/reward_tiny.yaml", "--train_file", str(DATA)], 9,
               ["reward_model/adapter_model.safetensors", "reward_model/head.safetensors"]),
    "sft": (["sft", "--config", "configs/sft_tiny.yaml", "--train_file", str(ROOT / "tests" / "data" / "sft_tiny.jsonl")],
            6, ["adapter/adapter_model.safetensors"]),
    "ppo": (["ppo", "--config", "configs/ppo_tiny.yaml", "--max_steps", "4"], 4,
            ["policy/adapter_model.safetensors", "critic/adapter_model.safetensors",
             "value_head/value_head.safetensors"]),
}


def command(recipe: str, model: Path, out: Path, *extra: str) -> list[str]:
    args, _, _ = RECIPES[recipe]
    return [sys.executable, "-m", "align", *args, "--model_name_or_path", str(model), "--output_dir", str(out),
            "--save_steps", "1", "--report_to", "none", *extra]


def environment() -> dict:
    # One thread: the same reduction order in every process, so equal inputs give equal bits.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def trained_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r or "reward" in r]


def run_to_end(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_at_random(cmd: list[str], out: Path, total: int, rng: random.Random, seed: int) -> bool:
    """Start the run, SIGKILL it once it has logged a random number of steps plus a random delay.

    Returns False when the run finished before the kill landed (then nothing was interrupted).
    """
    after = rng.randint(1, total - 1)
    delay = rng.uniform(0.0, 0.4)
    print(f"seed {seed}: kill after {after} logged steps + {delay:.3f} s")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while len(trained_steps(out)) < after and proc.poll() is None:
        assert time.monotonic() < deadline, f"seed {seed}: the run made no progress"
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        assert proc.returncode == 0, f"seed {seed}: {proc.stderr.read()[-3000:]}"
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return True


def kill_seed() -> int:
    """ALIGN_TEST_KILL_SEED when set (to replay a failure), else a fresh one; printed either way."""
    given = os.environ.get("ALIGN_TEST_KILL_SEED")
    seed = int(given) if given else random.randrange(2**32)
    print(f"kill seed {seed} (replay: ALIGN_TEST_KILL_SEED={seed})")
    return seed


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_sigkill_then_resume_equals_uninterrupted(recipe, tiny_llama, tmp_path):
    _, total, files = RECIPES[recipe]
    seed = kill_seed()
    rng = random.Random(seed)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(recipe, tiny_llama, straight), ROOT)

    kills = 0
    cmd = command(recipe, tiny_llama, killed)
    for attempt in range(2):  # killed twice: the second kill hits a run that was itself resumed
        kills += kill_at_random(cmd + (["--resume"] if attempt else []), killed, total, rng, seed)
    assert kills, f"seed {seed}: the run always finished before the kill"
    run_to_end(cmd + ["--resume"], ROOT)

    for name in files:
        a, b = load_file(str(straight / name)), load_file(str(killed / name))
        assert a.keys() == b.keys(), f"seed {seed}: {name}"
        for key in a:
            assert torch.equal(a[key], b[key]), f"seed {seed}: {name} {key} differs after kill and resume"
    assert trained_steps(killed) == list(range(1, total + 1)), f"seed {seed}: steps logged more than once"
    assert trained_steps(straight) == list(range(1, total + 1))
