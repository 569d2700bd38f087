"""The PPO loop on a tiny real Llama with the transformers rollout engine (one shared base)."""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from align.core.errors import TrainingDiverged, UserError
from align.recipes.ppo.batch import prompt_indices
from align.recipes.ppo.config import PPOConfig
from align.recipes.ppo.scoring import Scorer
from align.recipes.ppo.trainer import PPOTrainer
from align.train.config_parser import ConfigError, load_config

torch.set_num_threads(1)  # tiny tensors: thread hand-off costs more than it saves on a shared 2-core box

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def make(tiny_llama, tmp_path, *overrides):
    """A set-up trainer on the tiny model (transformers engine), ready for `ppo_step`."""
    cfg = load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml",
                      [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / 'run'}", *overrides])
    trainer = PPOTrainer(cfg)
    trainer.setup()
    return trainer


def snapshot(params: dict) -> dict:
    return {k: v.detach().clone() for k, v in params.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 3\nalgorithm: ppo\nclip_epsilon: 0.2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: clip_epsilon: unknown key"):
        load_config(PPOConfig, bad)
    bad.write_text("algorithm: grpo\nnum_generations: 1\n")
    with pytest.raises(ConfigError, match="num_generations.*>= 2"):
        load_config(PPOConfig, bad)


def test_first_step_kl_is_exactly_zero_then_the_policy_moves(tiny_llama, tmp_path):
    tr = make(tiny_llama, tmp_path)
    m1 = tr.ppo_step(1)
    # policy B = 0 at the start, so policy and reference log-probs are the same numbers
    assert m1["kl"] == 0.0 and m1["kl/sequence"] == 0.0
    # the training side recomputes the sampler's log-probs (same base, transformers engine)
    assert m1["logprob/mismatch_max"] < 1e-4
    m2 = tr.ppo_step(2)
    assert m2["kl"] != 0.0  # after one update the policy differs from the reference
    for key in ("clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "loss/value",
                "value/explained_variance", "entropy", "time/rollout", "time/sync", "time/score", "time/update",
                "tokens_per_s/rollout", "completions/mean_length", "completions/clipped_ratio", "num_tokens"):
        assert key in m2, key
    tr.close()


@pytest.fixture(scope="module")
def reward_adapter(tiny_llama, tmp_path_factory):
    """A saved reward model (adapter + head) with non-zero weights, as `align reward` would write it."""
    from align.core.base import SharedBase
    from reward.model import RewardModel

    base = SharedBase.load(str(tiny_llama))
    rm = RewardModel.create(base, seed=0)
    with torch.no_grad():
        for p in base.adapter_parameters("reward").values():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("rm") / "reward"
    rm.save(path)
    return path


def test_update_trains_policy_and_critic_only(tiny_llama, tmp_path, reward_adapter):
    tr = make(tiny_llama, tmp_path, f"reward_model_name_or_path={reward_adapter}",
             "reward_weights=[0.5, 1.0]")
    before = {name: snapshot(tr.base.adapter_parameters(name)) for name in ("policy", "critic", "reward")}
    assert all(v.abs().sum() > 0 for v in before["reward"].values())
    base_before = snapshot(tr.base.base_parameters())
    head_before = snapshot(dict(tr.value_head.named_parameters()))
    rm_head_before = snapshot(dict(tr.reward_model.head.named_parameters()))
    m = tr.ppo_step(1)
    # the reward adapter scored the completions: total = arithmetic + 0.5 * reward model
    model = f"rewards/{reward_adapter.name}/mean"  # TRL names a reward model by its folder
    assert m["reward"] == pytest.approx(m["rewards/arithmetic/mean"] + 0.5 * m[model], abs=1e-6)
    assert m[model] != 0.0
    assert not same(before["policy"], snapshot(tr.base.adapter_parameters("policy")))
    assert not same(before["critic"], snapshot(tr.base.adapter_parameters("critic")))
    assert not same(head_before, snapshot(dict(tr.value_head.named_parameters())))
    assert same(before["reward"], snapshot(tr.base.adapter_parameters("reward")))
    assert same(rm_head_before, snapshot(dict(tr.reward_model.head.named_parameters())))
    assert same(base_before, snapshot(tr.base.base_parameters()))
    # and nothing but the policy/critic adapters and the value head is handed to the optimizer
    trained = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    allowed = {id(p) for n in ("policy", "critic") for p in tr.base.adapter_parameters(n).values()}
    allowed |= {id(p) for p in tr.value_head.parameters()}
    assert trained == allowed
    tr.close()


def broken_reward(completions, answer, **kwargs):
    """Fails on rows whose answer is $PPO_TEST_BAD_ANSWER (used below through its dotted path)."""
    assert "row" not in kwargs  # our bookkeeping is never passed as a column
    return [1.0 / (a != os.environ["PPO_TEST_BAD_ANSWER"]) for a in answer]


def test_failing_reward_function_names_the_row(tiny_llama, tmp_path, monkeypatch):
    tr = make(tiny_llama, tmp_path, "reward_funcs=[tests.test_ppo_trainer.broken_reward]")
    idx = prompt_indices(len(tr.train_rows), tr.config.prompts_per_rollout(), tr.config.seed, 1)
    answers = [tr.train_rows[i]["answer"] for i in idx for _ in range(2)]
    monkeypatch.setenv("PPO_TEST_BAD_ANSWER", answers[-1])  # the second prompt's rows divide by zero
    bad = answers.index(answers[-1])
    with pytest.raises(UserError, match=rf"broken_reward failed on row {bad} .*ZeroDivisionError"):
        tr.ppo_step(1)
    tr.close()


def base_copies_in_memory(base) -> float:
    """How many copies of the base weights live in this process: distinct storages equal to a base tensor."""
    gc.collect()  # live copies only: an engine closed by an earlier test may await the cycle collector
    params = list(base.base_parameters().values())
    shapes = {(tuple(p.shape), p.dtype) for p in params}
    seen, copies = set(), 0
    for obj in gc.get_objects():
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or (tuple(obj.shape), obj.dtype) not in shapes:
            continue
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        if any(p.shape == obj.shape and torch.equal(p.detach(), obj.detach()) for p in params):
            copies += 1
    distinct = len({p.untyped_storage().data_ptr() for p in params})
    return copies / distinct


def test_one_copy_of_the_base_during_a_step(tiny_llama, tmp_path):
    tr = make(tiny_llama, tmp_path)
    # other tests in this worker may keep their own model of the same tiny base alive (fixtures, caches):
    # what must hold is that the step itself adds no copy to those already here
    before = base_copies_in_memory(tr.base)
    assert before >= 1.0
    counts = []
    values = tr._values

    def counting_values(batch):  # called inside the update, with the policy graph alive
        counts.append(base_copies_in_memory(tr.base))
        return values(batch)

    tr._values = counting_values
    tr.ppo_step(1)
    assert counts and all(c == before for c in counts), (before, counts)
    # the count sees a second copy when there is one
    extra = copy.deepcopy(tr.base.model)
    assert base_copies_in_memory(tr.base) == before + 1.0
    del extra
    assert tr.base.base_bytes() == sum(p.numel() * 4 for p in tr.base.base_parameters().values())
    tr.close()


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_nan_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_llama, tmp_path):
    tr = make(tiny_llama, tmp_path)
    tr.ppo_step(1)
    tr.step = 1
    good = tr.save_checkpoint()
    digest = _tree_hash(good)
    # a NaN gradient stops the run before the optimizer writes it into the adapter
    lora_b = next(p for n, p in tr.base.adapter_parameters("policy").items() if "lora_B" in n)
    hook = lora_b.register_hook(lambda g: g * float("nan"))
    before = snapshot(tr.base.adapter_parameters("policy"))
    with pytest.raises(TrainingDiverged, match=r"step 2: the gradient norm is nan.*step-000001, verified intact"):
        tr.ppo_step(2)
    hook.remove()
    assert same(before, snapshot(tr.base.adapter_parameters("policy")))
    assert _tree_hash(good) == digest
    # exploding (finite) KL stops too
    with torch.no_grad():
        next(p for n, p in tr.base.adapter_parameters("policy").items() if "lora_B" in n).normal_(0, 5.0)
    tr.config.max_kl = 1e-3
    with pytest.raises(TrainingDiverged, match=r"step 3: KL to the reference is .*max_kl=0.001.*step-000001, verified intact"):
        tr.ppo_step(3)
    assert _tree_hash(good) == digest
    tr.close()


def test_long_prompt_names_its_row(tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 1+2?", "answer": "3"}\n\n'
                       + json.dumps({"prompt": "the quick brown fox " * 40, "answer": "0"}) + "\n")
    with pytest.raises(UserError, match=r"prompts\.jsonl:3: \d+ tokens .*max_prompt_length=64"):
        make(tiny_llama, tmp_path, f"train_file={prompts}")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_estimators_train_the_policy_only(tiny_llama, tmp_path, estimator):
    tr = make(tiny_llama, tmp_path, f"algorithm={estimator}", "whiten_advantages=false", "kl_in_reward=false",
              "kl_estimator=k3", "num_generations=4", "steps_per_generation=2", "temperature=1.0")
    assert "critic" not in tr.base.adapters
    before = snapshot(tr.base.adapter_parameters("policy"))
    # the tiny random model never solves arithmetic: give it a reward that varies within a group
    def length(completions, **kwargs):
        return [float(len(x)) for x in completions]

    tr.scorer = Scorer([length], [1.0])
    m = tr.ppo_step(1)
    assert "loss/value" not in m
    assert not same(before, snapshot(tr.base.adapter_parameters("policy")))
    tr.close()


def test_align_ppo_command_runs_and_plots(tiny_llama, tmp_path):
    from align.cli import main

    out = tmp_path / "cli"
    args = ["ppo", "--config", str(CONFIGS / "ppo_tiny.yaml"), "--model_name_or_path", str(tiny_llama),
            "--output_dir", str(out), "--max_steps", "1"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and "eval/reward" in rows[1]
    assert (out / "policy" / "adapter_model.safetensors").is_file()
    assert (out / "config.yaml").is_file()
    assert main(args) == 2  # a second run into the same folder refuses to overwrite it
    assert main(args + ["--eval_only"]) == 0  # scores the latest checkpoint and logs it at its step
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["eval/reward"] == rows[1]["eval/reward"]
    assert main(["plot", str(out)]) == 0 and (out / "metrics.png").stat().st_size > 0
    assert main(["ppo", "--config", str(CONFIGS / "ppo_tiny.yaml"), "--set", "kl_estimator=k2"]) == 2


def reference_forwards(trainer) -> list[int]:
    """Counts, through a real forward hook on one LoRA layer, forwards run with every adapter off."""
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in trainer.base.model.modules() if isinstance(m, LoraLayer))
    calls = [0]

    def hook(module, args):
        if module.disable_adapters:  # set by SharedBase.reference() (PEFT's disable_adapter)
            calls[0] += 1

    layer.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("kl_coef,log_kl,runs", [(0.0, False, False), (0.05, False, True), (0.0, True, True)])
def test_reference_forward_runs_only_when_its_kl_is_used(tiny_llama, tmp_path, kl_coef, log_kl, runs):
    tr = make(tiny_llama, tmp_path, "algorithm=grpo", f"beta={kl_coef}", f"log_reference_kl={log_kl}",
              "sampler_logprobs_as_old=false")  # the pi_old forward stays, as the yardstick of the timing check
    calls = reference_forwards(tr)
    m1 = tr.ppo_step(1)
    m2 = tr.ppo_step(2)
    assert (calls[0] > 0) == runs, calls
    assert ("kl" in m1 and "kl" in m2) == runs
    for key in ("time/old_logprobs", "time/ref_logprobs", "time/update", "time/sync", "time/forward"):
        assert key in m2, key
    if not runs:
        assert m2["time/ref_logprobs"] < m2["time/old_logprobs"]
    tr.close()


def test_pi_old_from_the_sampler_trains_like_the_trainers_forward(tiny_llama, tmp_path):
    """In float32 the sampler's log-probs are the trainer's (within ~1e-6), so taking pi_old from them
    (one forward pass less per step) trains the same adapter, and the mismatch is still measured."""
    adapters, metrics = {}, {}
    for flag in (True, False):
        tr = make(tiny_llama, tmp_path / str(flag), "algorithm=grpo", f"sampler_logprobs_as_old={flag}",
                  "beta=0", "reward_funcs=[length_penalty]")
        assert tr.old_from_sampler() is flag
        metrics[flag] = [tr.ppo_step(s) for s in (1, 2, 3)]
        adapters[flag] = snapshot(tr.base.adapter_parameters("policy"))
        tr.close()
    a, b = adapters[True], adapters[False]
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # the policy moved
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    for m in metrics[True]:
        assert m["logprob/mismatch_max"] < 1e-4 and m["time/old_logprobs"] < 0.01
        assert m["entropy"] > 0
    # null (the default) means: an in-process engine sampling in the training dtype
    for sets, expected in ((["beta=0"], True), ([], False), (["beta=0", "rollout_dtype=bfloat16"], False),
                           (["beta=0", "engine=remote", "vllm_server_base_url=http://127.0.0.1:1"], False)):
        cfg = load_config(PPOConfig, CONFIGS / "ppo_tiny.yaml", [f"model_name_or_path={tiny_llama}", *sets])
        assert PPOTrainer(cfg).old_from_sampler() is expected, sets
