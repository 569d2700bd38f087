"""Data parallelism on 2 CPU processes (gloo) started by a real `accelerate launch`.

Two processes at per_device_train_batch_size B and gradient_accumulation_steps A train on the same
global batch as one process at B and 2A, so after K steps their adapters must agree (float32, 1e-5),
and only the main process may have written into the run folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.core.distributed import Processes, resolve_device
from align.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"
DDP = REPO / "configs" / "accelerate" / "ddp.yaml"

# Two processes sum gradients in another order than one; Adam's normalised steps carry that rounding into the
# adapters (seen up to 1.75e-5 after the FSDP DPO run on an AVX2-only CPU). A lost micro-batch or a wrong
# all-reduce moves them by orders of magnitude more.
ADAPTER_TOL = 5e-5

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def align_run(recipe: str, config: str, sets: list[str], processes: int, *extra: str,
              launch: Path = DDP) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file ddp.yaml --num_processes N -m align ...`, or `python -m align ...` for 1.

    `launch`: another accelerate config (e.g. fsdp.yaml)."""
    args = ["-m", "align", recipe, "--config", str(REPO / "configs" / config), *extra]
    for s in sets:
        args += ["--set", s]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
               "--num_processes", str(processes), "--main_process_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def common(model, out, *more, data: Path = DATA) -> list[str]:
    return [f"model_name_or_path={model}", f"output_dir={out}", f"train_file={data}", "report_to=[none]",
            "eval_fraction=0.0", "device=auto", *more]


def compare_runs(one: Path, two: Path, final: str, steps: int) -> None:
    """The 2-process run equals the 1-process run: adapter, per-step loss and gradient norm, and files."""
    assert files(two) == files(one), files(two) ^ files(one)  # nothing more (no rank-1 files), nothing less
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m2] == list(range(1, steps + 1))  # each step logged once: one writer
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert [v for k, v in b.items() if k.endswith("_per_s")][0] > 0
    assert m2[-1]["allreduce_bytes"] > 0 and "allreduce_bytes" not in m1[-1]
    assert max_diff(tensors(one / final), tensors(two / final)) <= ADAPTER_TOL


def test_dpo_two_processes_equal_one_at_the_same_global_batch(tiny_llama, tmp_path):
    steps = 3
    sets = ["per_device_train_batch_size=2", f"max_steps={steps}", "save_steps=1", "learning_rate=1e-2"]
    align_run("dpo", "dpo_tiny.yaml", common(tiny_llama, tmp_path / "one", *sets, "gradient_accumulation_steps=2"), 1)
    align_run("dpo", "dpo_tiny.yaml", common(tiny_llama, tmp_path / "two", *sets, "gradient_accumulation_steps=1"), 2)
    compare_runs(tmp_path / "one", tmp_path / "two", "adapter/adapter_model.safetensors", steps)
    # the adapter moved: equality above is not two untouched initialisations
    init = tensors(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in init.items() if "lora_B" in k) > 1e-3
    m = metrics(tmp_path / "two")[-1]
    adapter_bytes = sum(v.numel() * 4 for v in init.values())
    assert m["allreduce_bytes"] < adapter_bytes + 1024  # adapter-sized: the frozen base is never reduced


@pytest.mark.parametrize("recipe", ["orpo", "cpo"])
def test_reference_free_two_processes_equal_one_at_the_same_global_batch(recipe, tiny_llama, tmp_path):
    """ORPO and CPO (NLL included: a per-micro-batch token mean, as TRL's) on 2 processes equal 1 process."""
    steps = 3
    sets = ["per_device_train_batch_size=2", f"max_steps={steps}", "save_steps=1", "learning_rate=1e-2"]
    config = f"{recipe}_tiny.yaml"
    align_run(recipe, config, common(tiny_llama, tmp_path / "one", *sets, "gradient_accumulation_steps=2"), 1)
    align_run(recipe, config, common(tiny_llama, tmp_path / "two", *sets, "gradient_accumulation_steps=1"), 2)
    compare_runs(tmp_path / "one", tmp_path / "two", "adapter/adapter_model.safetensors", steps)
    assert metrics(tmp_path / "two")[-1]["nll_loss"] == pytest.approx(metrics(tmp_path / "one")[-1]["nll_loss"],
                                                                      abs=1e-5)


def test_sft_two_processes_equal_one_at_the_same_global_batch(tiny_llama, tmp_path):
    """SFT's loss is a mean over the global batch's target tokens: each process divides by the global count."""
    steps, data = 3, REPO / "tests" / "data" / "sft_tiny.jsonl"
    sets = ["per_device_train_batch_size=2", f"max_steps={steps}", "save_steps=1"]
    align_run("sft", "sft_tiny.yaml", common(tiny_llama, tmp_path / "one", *sets, "gradient_accumulation_steps=2",
                                             data=data), 1)
    align_run("sft", "sft_tiny.yaml", common(tiny_llama, tmp_path / "two", *sets, "gradient_accumulation_steps=1",
                                             data=data), 2)
    compare_runs(tmp_path / "one", tmp_path / "two", "adapter/adapter_model.safetensors", steps)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["num_tokens"] for r in m2] == [r["num_tokens"] for r in m1]  # the global batch's tokens, counted once
    assert m2[-1]["mean_token_accuracy"] == pytest.approx(m1[-1]["mean_token_accuracy"], abs=1e-6)


def test_reward_two_processes_equal_one_and_resume_with_another_process_count(tiny_llama, tmp_path):
    """2 processes for 2 steps, then the same run continued by 1 process (same global batch) to step 3."""
    sets = ["per_device_train_batch_size=2", "save_steps=1", "lr_scheduler_type=constant", "warmup_steps=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    align_run("reward", "reward_tiny.yaml", common(tiny_llama, one, *sets, "max_steps=3",
                                                   "gradient_accumulation_steps=2"), 1)
    align_run("reward", "reward_tiny.yaml", common(tiny_llama, two, *sets, "max_steps=2",
                                                   "gradient_accumulation_steps=1"), 2)
    first = metrics(two)
    assert [r["step"] for r in first] == [1, 2] and first[-1]["allreduce_bytes"] > 0
    for a, b in zip(metrics(one), first):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    align_run("reward", "reward_tiny.yaml", common(tiny_llama, two, *sets, "max_steps=3",
                                                   "gradient_accumulation_steps=2"), 1, "--resume")
    for rel in ("reward_model/adapter_model.safetensors", "reward_model/head.safetensors"):
        assert max_diff(tensors(one / rel), tensors(two / rel)) <= 1e-5, rel
    assert [r["step"] for r in metrics(two)] == [1, 2, 3]
    # The resume says what it changed (tests/test_resume_compare.py): the process count, with the accumulation
    # that keeps the global batch, and the longer run.
    assert yaml.safe_load((two / "config_history.yaml").read_text()) == [{"step": 2, "changed": {
        "world_size": [2, 1], "gradient_accumulation_steps": [1, 2], "max_steps": [2, 3]}}]
    assert files(two) == files(one) | {"config_history.yaml"}  # nothing written by a second process, nothing missing


def test_ppo_two_processes_run_write_once_and_sync(tiny_llama, tmp_path):
    run = tmp_path / "ppo"
    sets = [f"model_name_or_path={tiny_llama}", f"output_dir={run}", "engine=hf", "device=auto",
            "prompts_per_step=2", "max_steps=2", "save_steps=1"]
    align_run("ppo", "ppo_tiny.yaml", sets, 2)
    rows = metrics(run)
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]  # each step once: one writer
    for r in rows:
        if "reward" in r:
            assert r["sync/max_abs_diff"] < 1e-4  # the engine's probe log-probs match the trainer's
            assert 0 < r["allreduce_bytes"]
    assert {"policy/adapter_model.safetensors", "critic/adapter_model.safetensors", "value_head/value_head.safetensors",
            "config.yaml", "final_metrics.json"} <= files(run)
    assert not [f for f in files(run) if "rank" in f or f.endswith(".tmp")]


def test_each_process_takes_a_disjoint_share_of_the_global_batch(tiny_llama, tmp_path):
    """The shards of 2 processes partition the step's micro-batches, also on an epoch's short last step."""
    from align.recipes.dpo import DPOConfig, DPOTrainer
    from align.train.config_parser import load_config

    cfg = load_config(DPOConfig, REPO / "configs" / "dpo_tiny.yaml",
                      common(tiny_llama, tmp_path / "run", "per_device_train_batch_size=4"))
    tr = DPOTrainer(cfg)
    tr.setup()
    shards = []
    for rank in range(2):
        tr.processes.world, tr.processes.rank = 2, rank
        shards.append([tr.micro_batches(s).local for s in range(3)])
    tr.processes.world, tr.processes.rank = 1, 0
    # 24 pairs, global batch 8: steps 0-2 are one epoch; one process with 2x accumulation sees the same pairs
    tr.config.gradient_accumulation_steps = 2
    for s in range(3):
        whole = sorted(i for mb in tr.micro_batches(s).local for i in mb)
        a = [i for mb in shards[0][s] for i in mb]
        b = [i for mb in shards[1][s] for i in mb]
        assert not set(a) & set(b) and sorted(a + b) == whole and len(a) == len(b) == 4
    # a short last step (10 pairs, global batch 8 -> 2 left) is shared 1 + 1
    tr.pairs = tr.pairs[:10]
    tr.config.gradient_accumulation_steps = 1
    tr.processes.world = 2
    parts = [None, None]
    for rank in range(2):
        tr.processes.rank = rank
        parts[rank] = tr.micro_batches(1).local
    assert sorted(len(mb) for p in parts for mb in p) == [1, 1] and len(parts[0]) == len(parts[1])
    tr.processes.world, tr.processes.rank = 1, 0
    tr.close()


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="device: expected auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda", local_rank=1, processes=2) == "cuda:1"
        with pytest.raises(UserError, match="one GPU"):
            resolve_device("cuda:0", processes=2)
    single = Processes("auto")
    assert single.world == 1 and single.is_main and not single.distributed
    assert single.shard([1, 2, 3]) == [1, 2, 3]
