"""FSDP on 2 CPU processes (gloo) started by a real `accelerate launch --config_file configs/accelerate/fsdp.yaml`.

The frozen base is sharded (each process holds about half of its bytes); the adapters train inside it,
their gradients reduced by FSDP itself. As for DDP (tests/test_distributed.py), 2 processes at
gradient_accumulation_steps A train on the same global batch as 1 plain process at 2A, so the saved
adapters must agree (float32, 1e-5), and only the main process may have written into the run folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_distributed import ADAPTER_TOL, REPO, align_run, common, compare_runs, max_diff, metrics, tensors

from align.core.errors import UserError
from align.core.fsdp import refuse_unsupported

FSDP = REPO / "configs" / "accelerate" / "fsdp.yaml"
SFT_DATA = REPO / "tests" / "data" / "sft_tiny.jsonl"


def check_sharded(done, run: Path) -> None:
    """Each process said it holds about half the base's bytes, and the main one logged it."""
    held = re.findall(r"FSDP: process (\d) holds (\d+) of the base's (\d+) bytes", done.stdout + done.stderr)
    assert sorted(int(r) for r, _, _ in held) == [0, 1], held
    for _, mine, full in held:
        assert 0.45 < int(mine) / int(full) < 0.55, held
    m = metrics(run)[-1]
    assert m["fsdp_base_bytes_local"] == pytest.approx(m["fsdp_base_bytes_full"] / 2, rel=0.1)
    # only statistics (and heads) go through align's own all-reduce: FSDP reduces the adapters' gradients
    assert 0 < m["allreduce_bytes"] < 1024


def fsdp_run(recipe: str, config: str, sets: list[str], *extra: str):
    return align_run(recipe, config, sets, 2, *extra, launch=FSDP)


def optimizer_moments(run: Path, step: int) -> dict:
    saved = tensors(run / "checkpoints" / f"step-{step:06d}" / "tensors.safetensors")
    return {k: v for k, v in saved.items() if k.startswith("optim.")}


def test_dpo_fsdp_equals_one_process_and_resumes(tiny_llama, tmp_path):
    """2 FSDP processes for 2 steps, then resumed (FSDP again) to step 3: equal to 1 process's 3 steps."""
    sets = ["per_device_train_batch_size=2", "save_steps=1", "learning_rate=1e-2", "lr_scheduler_type=constant",
            "warmup_steps=0", "eval_fraction=0.25"]  # evaluation runs on every process under FSDP: exercised here
    one, two = tmp_path / "one", tmp_path / "two"
    align_run("dpo", "dpo_tiny.yaml", common(tiny_llama, one, *sets, "max_steps=3", "gradient_accumulation_steps=2"), 1)
    done = fsdp_run("dpo", "dpo_tiny.yaml", common(tiny_llama, two, *sets, "max_steps=2"))
    check_sharded(done, two)
    assert [r["step"] for r in metrics(two)] == [1, 2]
    done = fsdp_run("dpo", "dpo_tiny.yaml", common(tiny_llama, two, *sets, "max_steps=3"), "--resume")
    assert "resumed from" in done.stdout and "step-000002" in done.stdout
    assert "max_steps: 2 -> 3, extending the run" in done.stdout  # recorded, and the only difference in files
    (two / "config_history.yaml").unlink()
    compare_runs(one, two, "adapter/adapter_model.safetensors", 3)
    assert metrics(two)[-1]["eval/loss"] == pytest.approx(metrics(one)[-1]["eval/loss"], abs=1e-5)
    # checkpoints hold full tensors, as 1 process writes them: the adapter and the Adam moments
    rel = "checkpoints/step-000003/adapters/policy/adapter_model.safetensors"
    assert max_diff(tensors(one / rel), tensors(two / rel)) <= ADAPTER_TOL
    assert max_diff(optimizer_moments(one, 3), optimizer_moments(two, 3)) <= 1e-5
    final = tensors(two / "adapter" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in final.items() if "lora_B" in k) > 1e-3  # it trained


def test_sft_fsdp_equals_one_process(tiny_llama, tmp_path):
    steps = 3
    sets = ["per_device_train_batch_size=2", f"max_steps={steps}", "save_steps=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    align_run("sft", "sft_tiny.yaml", common(tiny_llama, one, *sets, "gradient_accumulation_steps=2",
                                             data=SFT_DATA), 1)
    done = fsdp_run("sft", "sft_tiny.yaml", common(tiny_llama, two, *sets, "gradient_accumulation_steps=1",
                                                   data=SFT_DATA))
    compare_runs(one, two, "adapter/adapter_model.safetensors", steps)
    check_sharded(done, two)
    assert [r["num_tokens"] for r in metrics(two)] == [r["num_tokens"] for r in metrics(one)]


def test_reward_fsdp_equals_one_process(tiny_llama, tmp_path):
    """The reward head is outside the base: replicated, its gradient averaged by align's own all-reduce."""
    steps = 3
    sets = ["per_device_train_batch_size=2", f"max_steps={steps}", "save_steps=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    align_run("reward", "reward_tiny.yaml", common(tiny_llama, one, *sets, "gradient_accumulation_steps=2"), 1)
    done = fsdp_run("reward", "reward_tiny.yaml", common(tiny_llama, two, *sets))
    compare_runs(one, two, "reward_model/adapter_model.safetensors", steps)
    check_sharded(done, two)
    assert max_diff(tensors(one / "reward_model/head.safetensors"), tensors(two / "reward_model/head.safetensors")) \
        <= 1e-5
    assert metrics(two)[-1]["allreduce_bytes"] >= 4 * 65  # the head's weight (64) and bias


def test_what_fsdp_refuses_is_refused_in_one_line(monkeypatch):
    from align.recipes.dpo import DPOTrainer
    from align.recipes.ppo.trainer import PPOTrainer
    from align.recipes.sft import SFTTrainer
    from reward.train import RewardTrainer

    assert DPOTrainer.fsdp_ready and SFTTrainer.fsdp_ready and RewardTrainer.fsdp_ready
    assert not PPOTrainer.fsdp_ready
    with pytest.raises(UserError, match="ppo with FSDP is not supported"):
        refuse_unsupported(object(), "ppo", False)

    class FourBit:
        four_bit = object()
        ref_model_copy = False

    with pytest.raises(UserError, match="load_in_4bit with FSDP"):
        refuse_unsupported(FourBit(), "dpo", True)
    FourBit.four_bit, FourBit.ref_model_copy = None, True
    with pytest.raises(UserError, match="ref_model_copy with FSDP"):
        refuse_unsupported(FourBit(), "dpo", True)
    FourBit.ref_model_copy = False
    refuse_unsupported(FourBit(), "dpo", True)
    for var, what in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                      ("FSDP_ACTIVATION_CHECKPOINTING", "gradient_checkpointing")):
        monkeypatch.setenv(var, "true")
        with pytest.raises(UserError, match=what):
            refuse_unsupported(FourBit(), "dpo", True)
        monkeypatch.delenv(var)
