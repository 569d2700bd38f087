"""Full fine-tuning (`use_peft: false`) in GRPO on the tiny model: every base weight trains, the reference is a
frozen copy of the starting base (none at beta 0), resume is exact, and the in-process vLLM engine receives the
full weights after each update (the sync probe holds its log-probs to the trainer's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from full_finetune_kit import assert_model_saved, assert_resume_is_exact, checkpoint_names

from align.recipes.ppo.config import GRPOConfig
from align.recipes.ppo.trainer import PPOTrainer
from align.train.config_parser import ConfigError, load_config

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def token_reward(completions, completion_ids, **kwargs):
    """A reward that differs between completions of a random model (the arithmetic task scores them all 0)."""
    return [float(sum(ids) % 5) for ids in completion_ids]


def config(tiny_llama, out, *sets) -> GRPOConfig:
    return load_config(GRPOConfig, ROOT / "configs" / "ppo_tiny.yaml",
                       [f"model_name_or_path={tiny_llama}", f"output_dir={out}", "algorithm=grpo",
                        "use_peft=false", "learning_rate=1e-4", "save_steps=null", *sets])


def trainer(cfg, **kwargs) -> PPOTrainer:
    return PPOTrainer(cfg, reward_funcs=[token_reward], **kwargs)


def params(t: PPOTrainer) -> dict:
    return dict(t.base.model.named_parameters())


def test_every_base_weight_trains_against_a_frozen_copy(tiny_llama, tmp_path, capsys):
    tr = trainer(config(tiny_llama, tmp_path / "run", "max_steps=2"))
    try:
        tr.setup()
        before = {n: p.detach().clone() for n, p in params(tr).items()}
        folder = tr.train()
        after = params(tr)
        assert tr.base.adapters == [] and not [n for n in before if torch.equal(before[n], after[n])]
        ref = dict(tr.ref_base.model.named_parameters())  # beta 0.05: a frozen copy of the starting model
        assert all(torch.equal(ref[n], before[n]) and not ref[n].requires_grad for n in ref)
        assert folder == tmp_path / "run" / "model"
        assert_model_saved(folder, after)
        assert checkpoint_names(tmp_path / "run") == ["step-000002"]
        out = capsys.readouterr().out
        assert "[align] reference: a frozen copy of the base (0.5 MiB)" in out
        assert "use_peft: false: checkpoints only at the end (save_steps: 0" in out
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "reward" in r]
        assert steps[0]["kl"] == 0.0 and steps[1]["kl"] != 0.0  # the copy stays put while the policy moves
    finally:
        tr.close()


def test_resume_is_exact(tiny_llama, tmp_path):
    assert_resume_is_exact(lambda out, steps, resume: trainer(config(tiny_llama, out, f"max_steps={steps}"),
                                                              resume=resume), tmp_path, ("reward", "kl", "loss/policy"))


@pytest.mark.vllm
def test_vllm_receives_the_full_weights_after_each_update(tiny_llama, tmp_path):
    pytest.importorskip("vllm")
    from align.engines import probe_ids, trainer_logprobs

    tr = trainer(config(tiny_llama, tmp_path / "run", "engine=vllm", "max_steps=2", "beta=0"))
    try:
        tr.setup()
        assert tr.ref_base is None  # beta 0: no reference at all
        prompt, completion = probe_ids(tr.base.tokenizer)
        start = trainer_logprobs(tr.base, prompt, completion, None)
        tr.train()
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "reward" in r]
        assert [r["step"] for r in steps] == [1, 2]
        for r in steps:  # every base weight travels: float32 bytes of the whole model
            assert r["sync/bytes"] == sum(p.numel() * 4 for p in params(tr).values())
            assert r["sync/max_abs_diff"] <= 1e-4 and r["logprob/mismatch_max"] < 1e-4
        want = trainer_logprobs(tr.base, prompt, completion, None)
        got = tr.engine.logprobs(prompt, completion, adapter=None)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
        assert max(abs(a - b) for a, b in zip(want, start, strict=True)) > 1e-3  # the probe sees the update
    finally:
        tr.close()


def test_ppo_keeps_its_critic_on_the_frozen_copy(tiny_llama, tmp_path):
    # The base being trained carries no adapter; the critic adapter and value head train on the reference copy,
    # whose own weights stay the starting model.
    tr = trainer(config(tiny_llama, tmp_path / "run", "algorithm=ppo", "max_steps=2", "beta=0"))
    try:
        tr.setup()
        before = {n: p.detach().clone() for n, p in params(tr).items()}
        critic_before = {n: p.detach().clone() for n, p in tr.ref_base.adapter_parameters("critic").items()}
        assert tr.train() == tmp_path / "run" / "model"
        after = params(tr)
        assert tr.base.adapters == [] and not [n for n in before if torch.equal(before[n], after[n])]
        assert tr.ref_base.adapters == ["critic"]  # beta 0: the copy is kept for the critic alone
        copy = list(tr.ref_base.base_parameters().values())  # PEFT renames them; the order stays
        assert len(copy) == len(before) and all(torch.equal(a, b) for a, b in zip(copy, before.values(), strict=True))
        critic = tr.ref_base.adapter_parameters("critic")
        assert critic and all(not torch.equal(critic[n], critic_before[n]) for n in critic if "lora_B" in n)
    finally:
        tr.close()


def test_ppo_resume_restores_the_critic_on_the_copy(tiny_llama, tmp_path):
    straight, resumed = assert_resume_is_exact(lambda out, steps, resume: trainer(
        config(tiny_llama, out, "algorithm=ppo", f"max_steps={steps}", "beta=0"), resume=resume), tmp_path,
        ("reward", "loss/value", "loss/policy"))
    ca, cb = straight.ref_base.adapter_parameters("critic"), resumed.ref_base.adapter_parameters("critic")
    assert ca and all(torch.equal(ca[n], cb[n]) for n in ca)
    assert torch.equal(straight.value_head.linear.weight, resumed.value_head.linear.weight)


@pytest.mark.parametrize("sets, words", [
    (["engine=remote", "vllm_server_base_url=http://127.0.0.1:9"],
     "use_peft: false: a remote engine receives adapters only"),
    (["load_in_4bit=true"], "use_peft: false trains every base weight; it cannot with load_in_4bit: true"),
])
def test_refusals_are_one_line(sets, words, tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match=words) as caught:
        config(tiny_llama, tmp_path / "run", *sets)
    assert "\n" not in str(caught.value).strip()


def test_save_steps_default_follows_use_peft(tiny_llama, tmp_path):
    assert config(tiny_llama, tmp_path, "use_peft=true").save_steps == 10
    assert config(tiny_llama, tmp_path).save_steps == 0
