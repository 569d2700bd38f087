"""A TRL GRPO setup runs unchanged: `align grpo --config x.yaml` with TRL's keys, datasets and reward functions.

tests/data/trl/grpo_lora.yaml is written as for `trl grpo`; here it trains the tiny model for two steps
(transformers rollouts: use_vllm false) on prompt rows with a `solution` column in every format TRL
users keep them, string and conversational. The reward functions (tests/grpo_rewards.py) take TRL's
keyword call and record what reached them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from align.cli import main as align_main
from align.recipes.ppo import GRPOConfig, PPOTrainer, train_grpo
from align.train.config_parser import ConfigError, load_config
from align.train.metrics import read_metrics
from align.train.trl_keys import TRL_KEYS

ROOT = Path(__file__).resolve().parents[1]
TRL_YAML = ROOT / "tests" / "data" / "trl" / "grpo_lora.yaml"
ROWS = [{"prompt": f"What is {a} + {b}?", "solution": str(a + b), "level": a % 3} for a, b in
        [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (9, 9), (4, 0), (8, 3)]]
TRL_METRICS = ("reward", "reward_std", "rewards/correct/mean", "rewards/correct/std", "rewards/short/mean",
               "rewards/short/std", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
               "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
               "frac_reward_zero_std", "num_tokens", "loss", "grad_norm", "learning_rate")


def conversational(rows):
    return [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]


def write_rows(kind: str, folder: Path) -> Path:
    """The prompt rows as `kind`: jsonl, parquet, save_to_disk, a folder of data files, or conversational jsonl."""
    rows = conversational(ROWS) if kind == "conversational" else ROWS
    ds = datasets.Dataset.from_list(rows)
    if kind in ("jsonl", "conversational"):
        path = folder / "prompts.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        path = folder / "prompts.parquet"
        ds.to_parquet(str(path))
    elif kind == "save_to_disk":
        path = folder / "saved"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    else:  # a cloned hub dataset repository: data files under data/, split by name
        path = folder / "repo"
        (path / "data").mkdir(parents=True)
        ds.to_parquet(str(path / "data" / "train-00000-of-00001.parquet"))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "save_to_disk", "folder", "conversational"])
def test_trl_grpo_yaml_runs_unchanged(kind, tiny_llama, tmp_path, monkeypatch, capsys):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("GRPO_TEST_CALLS", str(calls))
    data, out = write_rows(kind, tmp_path), tmp_path / "run"
    code = align_main(["grpo", "--config", str(TRL_YAML), "--set", f"model_name_or_path={tiny_llama}",
                       "--set", f"dataset_name={data}", "--set", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "unknown key" not in err and "not supported" not in err
    steps = [r for r in read_metrics(out) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in TRL_METRICS:
        assert key in steps[-1], key
    # reward = 1.0 * correct + 0.5 * short, TRL's weighted sum (no row is unscored here)
    for r in steps:
        assert r["reward"] == pytest.approx(r["rewards/correct/mean"] + 0.5 * r["rewards/short/mean"], abs=1e-5)
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    assert {c["fn"] for c in seen} == {"correct", "short"}
    for c in seen:  # every other column by name, and TRL's completion_ids
        assert {"solution", "level", "completion_ids"} <= set(c["keys"]), c
        assert c["completion_types"] == (["list"] if kind == "conversational" else ["str"])
    table = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {t["step"] for t in table} == {1, 2} and {"correct", "short", "reward", "advantage"} <= set(table[0])
    # TRL's extras reach the functions: trainer_state (the step before this one), log_metric, log_extra
    assert [c["step"] for c in seen if c["fn"] == "short"] == [0, 1]
    for r in steps:
        assert r["short/mean_ids"] == pytest.approx(r["completions/mean_length"])
    assert all(t["n_ids"] == round(-10 * t["short"]) for t in table)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["loss_type"], resolved["epsilon_high"], resolved["algorithm"]) == ("dapo", 0.28, "grpo")
    assert (out / "policy" / "adapter_model.safetensors").is_file()


def test_every_trl_grpo_key_is_a_field_or_has_a_stated_meaning():
    trl = pytest.importorskip("trl")
    from trl.scripts.grpo import GRPOScriptArguments

    ours = {f.name for f in dataclasses.fields(GRPOConfig)}
    theirs = set()
    for cls in (trl.GRPOConfig, GRPOScriptArguments, trl.ModelConfig):
        theirs |= {f.name for f in dataclasses.fields(cls)}
    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    missing = sorted(k for k in theirs if k not in ours and k not in TRL_KEYS and k not in inherited)
    assert not missing, missing


def test_defaults_are_trls_where_the_idea_is_trls():
    trl = pytest.importorskip("trl")
    theirs, ours = trl.GRPOConfig(output_dir="x", use_cpu=True, bf16=False), GRPOConfig()
    for name in ("beta", "epsilon", "epsilon_high", "num_iterations", "num_generations", "loss_type",
                 "importance_sampling_level", "scale_rewards", "mask_truncated_completions", "temperature",
                 "top_p", "top_k", "min_p", "repetition_penalty", "max_completion_length", "log_completions",
                 "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                 "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "vllm_mode",
                 "entropy_coef", "use_bias_correction_kl"):
        assert getattr(ours, name) == getattr(theirs, name), name
    # TRL resolves its batch shape in __post_init__; ours by the same rule when asked
    assert ours.micro_batches_per_rollout() == theirs.steps_per_generation
    assert ours.prompts_per_rollout() * ours.num_generations == theirs.generation_batch_size


@pytest.mark.parametrize("old,new", [("kl_coef=0.1", "beta"), ("cliprange=0.2", "epsilon"),
                                     ("num_ppo_epochs=2", "num_iterations"), ("prompts=x.jsonl", "train_file"),
                                     ("reward_functions={arithmetic: 1.0}", "reward_funcs"),
                                     ("engine_url=http://127.0.0.1:1", "vllm_server_base_url")])
def test_an_old_name_is_an_error_naming_the_new_one(old, new):
    with pytest.raises(ConfigError, match=rf"renamed; use {new}"):
        load_config(GRPOConfig, None, [old])


def test_beta_is_settable_from_the_command_line_as_help_shows(tmp_path, capsys):
    code = align_main(["grpo", "--set", "beta=0.04", "--set", f"output_dir={tmp_path / 'r'}", "--check_config"])
    assert code == 0
    assert yaml.safe_load(capsys.readouterr().out.split("# config OK")[0])["beta"] == 0.04


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_python_api_takes_a_dataset_and_callables(tiny_llama, tmp_path):
    config = GRPOConfig(model_name_or_path=str(tiny_llama), output_dir=str(tmp_path / "run"), max_steps=1,
                        num_generations=2, per_device_train_batch_size=4, max_completion_length=4,
                        use_vllm=False, report_to=["none"], save_steps=0, reward_funcs=[])
    policy = train_grpo(config, train_dataset=datasets.Dataset.from_list(ROWS), reward_funcs=[length_reward])
    assert (policy / "adapter_model.safetensors").is_file()
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[0]["rewards/length_reward/mean"] > 0 and rows[0]["reward"] == rows[0]["rewards/length_reward/mean"]
    assert "length_reward" not in (tmp_path / "run" / "config.yaml").read_text()


def test_a_callable_in_the_config_is_one_line_naming_the_argument():
    with pytest.raises(ValueError, match=r"^reward_funcs: .*pass Python functions to the trainer as reward_funcs="):
        GRPOConfig(reward_funcs=[length_reward])


def _first_step(tiny_llama, tmp_path, *overrides):
    cfg = load_config(GRPOConfig, None, [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / 'r'}",
                                         "use_vllm=false", "report_to=[none]", "num_generations=4",
                                         "per_device_train_batch_size=8", "max_completion_length=6",
                                         "reward_funcs=[tests.test_grpo_trl.length_reward]", "num_train_prompts=16",
                                         "num_eval_prompts=2", "seed=3", *overrides])
    tr = PPOTrainer(cfg)
    tr.setup()
    before = {k: v.detach().clone() for k, v in tr.base.adapter_parameters("policy").items()}
    m = tr.ppo_step(1)
    moved = any(not torch.equal(before[k], v) for k, v in tr.base.adapter_parameters("policy").items())
    tr.close()
    return m, moved


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_each_loss_type_trains_with_kl_on_and_off(loss_type, beta, tiny_llama, tmp_path):
    m, moved = _first_step(tiny_llama, tmp_path, f"loss_type={loss_type}", f"beta={beta}")
    assert moved and torch.isfinite(torch.tensor(m["loss"]))
    assert ("kl" in m) == (beta > 0)  # no reference forward at beta 0, as TRL logs no kl there
    if beta > 0:
        assert m["kl"] == 0.0  # first step: the policy is the reference


def test_the_loss_type_reaches_the_loss(tiny_llama, tmp_path):
    """First step, one micro-batch: the ratio is 1, so each token's loss is -A. bnpo averages over the
    real tokens, dr_grpo divides the same sum by B x max_completion_length: their ratio is the mean
    completion length over max_completion_length."""
    # vLLM stops at any of these ids: completions of different lengths (the tiny model rarely says EOS).
    stop = ["use_vllm=true", "generation_kwargs={stop_token_ids: [" + ", ".join(map(str, range(3, 60))) + "]}"]
    bnpo, _ = _first_step(tiny_llama, tmp_path / "a", "loss_type=bnpo", *stop)
    dr, _ = _first_step(tiny_llama, tmp_path / "b", "loss_type=dr_grpo", *stop)
    assert bnpo["completions/min_length"] < 6 == bnpo["completions/max_length"]
    assert bnpo["completions/mean_length"] == dr["completions/mean_length"]  # the same rollout (seeded)
    assert abs(bnpo["loss"]) > 1e-6
    assert dr["loss"] == pytest.approx(bnpo["loss"] * bnpo["completions/mean_length"] / 6, rel=1e-5)


def test_sequence_level_importance_sampling_and_scale_rewards_run(tiny_llama, tmp_path):
    m, moved = _first_step(tiny_llama, tmp_path, "importance_sampling_level=sequence", "loss_type=grpo",
                           "scale_rewards=batch")
    assert moved and m["clip_ratio/region_mean"] == 0.0  # ratio 1 on the first step: nothing clipped


def test_truncated_completions_are_masked_out_when_asked(tiny_llama, tmp_path):
    """Every completion of 1 token is cut at max_completion_length: masked, nothing trains."""
    m, moved = _first_step(tiny_llama, tmp_path, "max_completion_length=1", "mask_truncated_completions=true")
    assert m["completions/clipped_ratio"] == 1.0 and not moved
    m, moved = _first_step(tiny_llama, tmp_path / "b", "max_completion_length=1")
    assert moved


def test_a_classifier_reward_model_beside_the_functions(own_classifier, tiny_llama, tmp_path, monkeypatch):
    """reward_model_name_or_path + reward_funcs, weighted in TRL's order (the model first)."""
    monkeypatch.setenv("GRPO_TEST_CALLS", str(tmp_path / "calls.jsonl"))
    data, out = write_rows("conversational", tmp_path), tmp_path / "run"
    code = align_main(["grpo", "--config", str(TRL_YAML), "--set", f"model_name_or_path={tiny_llama}",
                       "--set", f"dataset_name={data}", "--set", f"output_dir={out}", "--set",
                       f"reward_model_name_or_path={own_classifier}", "--set", "reward_weights=[0.5, 1.0, 0.5]",
                       "--set", "max_steps=1"])
    assert code == 0
    (row,) = [r for r in read_metrics(out) if "reward" in r]
    model = row["rewards/my-rm/mean"]
    assert model != 0.0 and row["rewards/my-rm/std"] > 0  # the classifier scored, and told completions apart
    expected = 0.5 * model + row["rewards/correct/mean"] + 0.5 * row["rewards/short/mean"]
    assert row["reward"] == pytest.approx(expected, abs=1e-5)
    # the classifier's weights are the ones saved: frozen, and not part of the policy adapter
    from safetensors.torch import load_file

    saved = load_file(str(out / "policy" / "adapter_model.safetensors"))
    assert not any("score" in k for k in saved)


def test_trls_own_reward_names_and_a_module_beside_the_config(tmp_path, monkeypatch):
    """`reward_funcs: [think_format_reward]` is TRL's function; `my_rewards.fn` imports from the working
    folder, as `trl grpo` imports it."""
    trl_rewards = pytest.importorskip("trl.rewards")
    from reward.functions import load_reward_func

    assert load_reward_func("think_format_reward") is trl_rewards.think_format_reward
    (tmp_path / "my_rewards_here.py").write_text("def fn(completions, **kw):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert load_reward_func("my_rewards_here.fn")(completions=["a"]) == [0.0]
