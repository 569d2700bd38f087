"""GRPO-family losses: values computed by hand, then equality with TRL 1.16's own code.

TRL is run for real: a GRPOTrainer on the tiny Llama with a random (non-zero) LoRA adapter; its
`_compute_loss` scores the same completions as ours, and the reward -> advantage and sampler
correction blocks of `_generate_and_score_completions` are executed from TRL's installed source.
"""

from __future__ import annotations

import inspect
import math
import textwrap
import warnings

import pytest
import torch

from align.recipes.ppo.grpo_losses import (
    GRPOArgumentError,
    group_advantages,
    grpo_loss,
    sampler_correction,
    weighted_rewards,
)

L = math.log
SEED = 1234


# -- by hand -------------------------------------------------------------------------------------
def test_weighted_rewards_nansum_and_all_none_row():
    rpf = torch.tensor([[1.0, math.nan], [math.nan, math.nan], [2.0, 3.0]])
    out = weighted_rewards(rpf, torch.tensor([1.0, 0.5]))
    # row 0: 1*1 (None skipped); row 1: every function None -> NaN (unscorable); row 2: 2 + 0.5*3
    assert out[0].item() == 1.0 and math.isnan(out[1].item()) and out[2].item() == 3.5


def test_group_batch_none_scaling_by_hand():
    r = torch.tensor([1.0, 3.0, 0.0, 2.0])  # groups of 2: means 2 and 1, Bessel std sqrt(2) each
    adv, std, zero = group_advantages(r, 2, "group")
    torch.testing.assert_close(adv, torch.tensor([-1, 1, -1, 1]) / (math.sqrt(2) + 1e-4))
    torch.testing.assert_close(std, torch.full((4,), math.sqrt(2)))
    # batch std: mean 1.5, squares .25+2.25+2.25+.25 = 5, /3 -> sqrt(5/3); the baseline stays the group mean
    adv, std, _ = group_advantages(r, 2, "batch")
    torch.testing.assert_close(adv, torch.tensor([-1, 1, -1, 1]) / (math.sqrt(5 / 3) + 1e-4))
    adv, std, zero = group_advantages(r, 2, "none")  # Dr. GRPO: no division; std still the group's
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1, -1, 1]))
    torch.testing.assert_close(std, torch.full((4,), math.sqrt(2)))
    # TRL's config spellings: True is "group", False is "none"
    torch.testing.assert_close(group_advantages(r, 2, True)[0], group_advantages(r, 2, "group")[0])
    torch.testing.assert_close(group_advantages(r, 2, False)[0], torch.tensor([-1.0, 1, -1, 1]))


def test_nan_rows_zero_std_and_lonely_reward():
    r = torch.tensor([1.0, math.nan, 3.0, 4.0, 4.0, 4.0, math.nan, math.nan, 2.0])
    adv, std, zero = group_advantages(r, 3, "group")
    # group 1 without its NaN: mean 2, std sqrt(2); the NaN row gets 0
    s = math.sqrt(2) + 1e-4
    torch.testing.assert_close(adv[:3], torch.tensor([-1 / s, 0.0, 1 / s]))
    # group 2: all equal -> std 0 -> advantage 0 and is_std_zero
    assert adv[3:6].tolist() == [0.0, 0.0, 0.0] and zero[3:6].all()
    # group 3: one reward -> std NaN (as TRL's nanstd) -> advantage 0, not counted as zero std
    assert adv[6:].tolist() == [0.0, 0.0, 0.0] and math.isnan(std[8].item()) and not zero[6:].any()


OLD = torch.zeros(1, 3)
SAMPLER = torch.tensor([[-1.0, 0.5, 0.0]])  # log-ratio old - sampler: [1, -0.5, 0 (masked)]
MASK = torch.tensor([[1.0, 1.0, 0.0]])


@pytest.mark.parametrize("mode,cap_min,cap_max,expected", [
    ("token_truncate", 0.7, 2.0, [[2.0, 0.7, 1.0]]),           # e^1 -> 2, e^-.5 = .607 -> .7, masked -> e^0
    ("token_mask", 0.7, 2.0, [[0.0, 0.0, 1.0]]),               # both outside [0.7, 2] -> 0
    ("token_mask", None, 3.0, [[math.e, math.exp(-0.5), 1.0]]),
    ("sequence_truncate", None, 1.5, [[1.5]]),                 # e^(1 - .5) = 1.6487 -> 1.5
    ("sequence_mask", None, 1.5, [[0.0]]),
    ("sequence_mask", None, 3.0, [[math.exp(0.5)]]),
])
def test_sampler_correction_by_hand(mode, cap_min, cap_max, expected):
    torch.testing.assert_close(sampler_correction(OLD, SAMPLER, MASK, mode, cap_min, cap_max), torch.tensor(expected))


def test_sampler_nan_logprob_means_no_correction():
    out = sampler_correction(OLD, torch.tensor([[math.nan, 0.0, 0.0]]), MASK, "token_truncate", None, 3.0)
    assert out.tolist() == [[1.0, 1.0, 1.0]]


# Two sequences, three tokens; the second's last token is padding. Ratios r: [1.5, 0.5, 1] and
# [1.1, 0.7, 1]; advantages +1 and -1; ε_low 0.2, ε_high 0.3 (clip range [0.8, 1.3]).
#   row 0 (A=+1): -min(r, clip(r)) = [-1.3 (high-clipped), -0.5, -1]        sum -2.8 over 3 tokens
#   row 1 (A=-1): -min(-r, -clip(r)) = [1.1, 0.8 (low-clipped), (1 masked)]  sum  1.9 over 2 tokens
LOGP = torch.tensor([[L(1.5), L(0.5), 0.0], [L(1.1), L(0.7), 0.0]])
ADV = torch.tensor([1.0, -1.0])
M = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
KW = {"epsilon_low": 0.2, "epsilon_high": 0.3}


@pytest.mark.parametrize("loss_type,extra,expected", [
    ("grpo", {}, (-2.8 / 3 + 1.9 / 2) / 2),                    # mean of per-sequence token means
    ("bnpo", {}, (-2.8 + 1.9) / 5),                            # token mean of the micro-batch
    ("dr_grpo", {"max_completion_length": 4}, -0.9 / (2 * 4)),  # token sum / (B * max length)
    ("dapo", {"tokens_normalizer": 2.5}, -0.9 / 2.5),          # token sum / the caller's normalizer
])
def test_each_normalisation_and_clip_ratios(loss_type, extra, expected):
    loss, stats = grpo_loss(LOGP, torch.zeros(2, 3), ADV, M, loss_type=loss_type, **KW, **extra)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(0.2)   # 1 of 5 tokens
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.2)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(0.4)
    assert "kl" not in stats


def test_gradient_by_hand():
    logp = LOGP.clone().requires_grad_(True)
    grpo_loss(logp, torch.zeros(2, 3), ADV, M, loss_type="grpo", **KW)[0].backward()
    # row 0 token 0 is clipped (no gradient); token 1: d(-r·A / 3 / 2)/dlogp = -0.5/6; row 1 token 2 masked
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[1, 2].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-0.5 / 6)


def test_sequence_level_ratio_gspo():
    loss, stats = grpo_loss(LOGP, torch.zeros(2, 3), ADV, M, loss_type="grpo", importance_sampling_level="sequence",
                            **KW)
    r0, r1 = 0.75 ** (1 / 3), 0.77 ** 0.5  # exp of the mean log-ratio over each sequence's tokens: in range
    assert loss.item() == pytest.approx((-r0 + r1) / 2, abs=1e-6)
    assert stats["clip_ratio/region_mean"].item() == 0.0


def test_kl_with_and_without_bias_correction_and_sampler_weight():
    ref = LOGP + torch.tensor([[L(2.0), 0, 0], [0, 0, 0]])  # k3 at d = log 2: 2 - log 2 - 1
    k3 = 2 - L(2.0) - 1
    loss, stats = grpo_loss(LOGP, torch.zeros(2, 3), ADV, M, loss_type="bnpo", beta=0.04, ref_logp=ref,
                            use_bias_correction_kl=False, **KW)
    assert loss.item() == pytest.approx(-0.9 / 5 + 0.04 * k3 / 5, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(k3 / 5)
    _, stats = grpo_loss(LOGP, torch.zeros(2, 3), ADV, M, loss_type="bnpo", beta=0.04, ref_logp=ref, **KW)
    assert stats["kl"].item() == pytest.approx(1.5 * k3 / 5)  # weighted by that token's ratio 1.5
    w = torch.tensor([[2.0, 1, 1], [1, 1, 1]])  # the sampler weight scales the surrogate, token 0: -1.3 -> -2.6
    loss, _ = grpo_loss(LOGP, torch.zeros(2, 3), ADV, M, loss_type="bnpo", is_ratio=w, **KW)
    assert loss.item() == pytest.approx(-2.2 / 5, abs=1e-6)


@pytest.mark.parametrize("call,name", [
    (lambda: grpo_loss(LOGP, LOGP, ADV, M, loss_type="cispo"), "loss_type"),
    (lambda: grpo_loss(LOGP, LOGP, ADV, M, importance_sampling_level="group"), "importance_sampling_level"),
    (lambda: grpo_loss(LOGP, LOGP, ADV, M), "tokens_normalizer"),
    (lambda: grpo_loss(LOGP, LOGP, ADV, M, loss_type="dr_grpo"), "max_completion_length"),
    (lambda: grpo_loss(LOGP, LOGP, ADV, M, loss_type="grpo", beta=0.1), "ref_logp"),
    (lambda: sampler_correction(OLD, SAMPLER, MASK, "token"), "vllm_importance_sampling_mode"),
    (lambda: sampler_correction(OLD, SAMPLER, MASK, "token_mask", 2.0, 2.0), "vllm_importance_sampling_clip_min"),
    (lambda: sampler_correction(OLD, SAMPLER, MASK, "token_truncate", None, None), "vllm_importance_sampling_clip"),
    (lambda: group_advantages(ADV, 2, "std"), "scale_rewards"),
    (lambda: group_advantages(ADV, 3), "group_size"),
])
def test_refusals_name_the_argument(call, name):
    with pytest.raises(GRPOArgumentError, match=name):
        call()


def test_sequence_level_with_token_sum_warns_as_trl_does():
    with pytest.warns(UserWarning, match="importance_sampling_level='sequence'"):
        grpo_loss(LOGP, LOGP, ADV, M, loss_type="dapo", importance_sampling_level="sequence", tokens_normalizer=5)


# -- equality with TRL's own code ----------------------------------------------------------------
# One micro-batch of B=4 completions (T=3, ragged masks) scored by TRL's GRPOTrainer._compute_loss
# and by grpo_loss on the same log-probs. TRL's settings: gradient_accumulation_steps GA=2,
# steps_per_generation S=4 (one generation batch feeds two optimizer steps), num_processes P=1,
# num_items_in_batch N = completion tokens of the whole generation batch over processes.
# TRL divides grpo/bnpo/dr_grpo by GA and dapo by N/P·GA/S, then sums the GA micro-batches; our
# caller averages them (1/GA), so TRL's loss = ours / GA with tokens_normalizer = N / (P·S):
# the step's tokens (N·GA/S) over its micro-batches (GA·P).
GA, S, N = 2, 4, 37.0
TOLERANCE = {"atol": 1e-6, "rtol": 0.0}


def _trl_block(first: str, last: str, include_last: bool):
    """Lines of TRL's _generate_and_score_completions from `first` to `last`, compiled to run as they are."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    start = next(i for i, line in enumerate(src) if first in line)
    end = next(i for i in range(start + 1, len(src)) if last in src[i]) + include_last
    return compile(textwrap.dedent("\n".join(src[start:end])), "trl_grpo_trainer_block", "exec")


def _run_trl_block(trainer, code, **local):
    from trl.trainer import grpo_trainer
    namespace = {**vars(grpo_trainer), "self": trainer, **local}
    exec(code, namespace)  # TRL's own lines, on TRL's trainer
    return namespace


@pytest.fixture(scope="module")
def trl(tiny_llama, tmp_path_factory):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    print(f"seed {SEED}")
    torch.manual_seed(SEED)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl-grpo")), per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=3, gradient_accumulation_steps=GA,
                      steps_per_generation=S, report_to="none", use_cpu=True, bf16=False, save_strategy="no")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "hi"}] * 8),
                          processing_class=AutoTokenizer.from_pretrained(tiny_llama), peft_config=lora)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = GA  # set by Trainer's loop during train()
    return trainer


def _batch(trainer, seed: int = SEED) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids, completion_ids = torch.randint(3, vocab, (4, 5), generator=g), torch.randint(3, vocab, (4, 3), generator=g)
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    prompt_mask[0, 0] = 0  # left padding
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    with torch.no_grad():
        logp = _policy_logp(trainer, prompt_ids, prompt_mask, completion_ids, completion_mask)
    noise = lambda: 0.5 * torch.randn(logp.shape, generator=g)  # noqa: E731
    old = logp + noise()
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.randn(4, generator=g),
            "old_per_token_logps": old, "ref_per_token_logps": logp + noise(), "sampling": old + noise(),
            "num_items_in_batch": torch.tensor(N)}


def _policy_logp(trainer, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """TRL's own log-prob helper, so both losses see the same log-probs and only the losses differ."""
    ids, attn = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    return trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, completion_ids.size(1))[0]


def _grads(trainer, loss):
    trainer.model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]


def _compare(trainer, inputs, *, loss_type, level, beta, bias=True, trl_ratio=None, our_ratio=None):
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
    trainer.args.use_bias_correction_kl = bias
    trainer.epsilon_low, trainer.epsilon_high = 0.2, 0.28
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = trl_ratio is not None
    trainer._metrics["train"].clear()
    trl_inputs = {**inputs, "importance_sampling_ratio": trl_ratio}
    trl_loss = trainer._compute_loss(trainer.model, trl_inputs)
    trl_grads = _grads(trainer, trl_loss)
    logp = _policy_logp(trainer, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                        inputs["completion_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sequence level with token sums: TRL warns too
        ours, stats = grpo_loss(logp, inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"],
                                loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                                importance_sampling_level=level, beta=beta, ref_logp=inputs["ref_per_token_logps"],
                                is_ratio=our_ratio, max_completion_length=trainer.max_completion_length,
                                tokens_normalizer=N / (trainer.accelerator.num_processes * S),
                                use_bias_correction_kl=bias)
    torch.testing.assert_close(ours.detach() / GA, trl_loss.detach(), **TOLERANCE)
    for ours_g, trl_g in zip(_grads(trainer, ours / GA), trl_grads, strict=True):
        torch.testing.assert_close(ours_g, trl_g, **TOLERANCE)
    assert any(g.abs().max() > 0 for g in trl_grads)
    for key, value in stats.items():
        assert value.item() == pytest.approx(trainer._metrics["train"][key][-1], abs=1e-6), key
    return stats


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias", [(0.0, True), (0.04, True), (0.04, False)])
def test_loss_and_gradient_equal_trl(trl, loss_type, level, beta, bias):
    stats = _compare(trl, _batch(trl), loss_type=loss_type, level=level, beta=beta, bias=bias)
    assert ("kl" in stats) == (beta != 0.0)
    if level == "token":  # the noise clips some tokens, so the clip metrics are exercised
        assert stats["clip_ratio/region_mean"] > 0


SAMPLER_BLOCK = ("if self.use_vllm and self.vllm_importance_sampling_correction:",
                 "# Compute the per-token log probabilities for the reference model", False)


@pytest.mark.parametrize("mode,cap_min,cap_max", [("token_truncate", 0.8, 1.25), ("token_mask", 0.8, 1.25),
                                                  ("sequence_truncate", None, 1.1), ("sequence_mask", 0.8, 1.1)])
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence")])
def test_sampler_correction_equals_trl(trl, mode, cap_min, cap_max, loss_type, level):
    inputs = _batch(trl)
    sampling = inputs["sampling"].clone()
    sampling[0, 1] = math.nan  # a log-prob the engine did not return
    trl.vllm_importance_sampling_mode = mode
    trl.vllm_importance_sampling_clip_min, trl.vllm_importance_sampling_clip_max = cap_min, cap_max
    trl.use_vllm = trl.vllm_importance_sampling_correction = True
    trl_ratio = _run_trl_block(trl, _trl_block(*SAMPLER_BLOCK), old_per_token_logps=inputs["old_per_token_logps"],
                               sampling_per_token_logps=sampling, completion_mask=inputs["completion_mask"],
                               tool_mask=None)["vllm_importance_sampling_ratio"]
    ours = sampler_correction(inputs["old_per_token_logps"], sampling, inputs["completion_mask"], mode, cap_min,
                              cap_max)
    torch.testing.assert_close(ours, trl_ratio, **TOLERANCE)
    raw = sampler_correction(inputs["old_per_token_logps"], sampling, inputs["completion_mask"], mode, 1e-9, 1e9)
    assert (ours != raw).any() and (ours == raw).any()  # the caps act on some ratios, not all
    _compare(trl, inputs, loss_type=loss_type, level=level, beta=0.04, trl_ratio=trl_ratio, our_ratio=ours)


ADVANTAGE_BLOCK = ("unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)",
                   "advantages = torch.nan_to_num(advantages, nan=0.0)", True)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(trl, scale_rewards):
    g = torch.Generator().manual_seed(SEED)
    rpf = torch.randn(9, 2, generator=g)
    rpf[1] = math.nan          # every function returned None: unscorable
    rpf[4, 0] = math.nan       # one function returned None
    rpf[6:8] = math.nan        # a group with one scorable completion
    weights = torch.tensor([1.0, 0.5])
    trl.reward_weights, trl.scale_rewards, trl.multi_objective_aggregation = weights, scale_rewards, "sum_then_normalize"
    ns = _run_trl_block(trl, _trl_block(*ADVANTAGE_BLOCK), rewards_per_func=rpf, device="cpu", num_generations=3)
    adv, std, zero = group_advantages(weighted_rewards(rpf, weights), 3, scale_rewards)
    torch.testing.assert_close(adv, ns["advantages"], **TOLERANCE)
    torch.testing.assert_close(std, ns["std_rewards"], equal_nan=True, **TOLERANCE)
    assert torch.equal(zero, ns["is_std_zero"])
    assert adv[1] == 0 and adv[4] != 0
