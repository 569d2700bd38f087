"""padding_free: true (TRL's name) gives each recipe the numbers of its padded batches, on the tiny real Llama:
SFT (and bfd packing), DPO (per-sequence log-prob sums within 1e-5, loss and gradients), reward (scores at each
sequence's last token) and the RL update (per-token log-probs, a whole PPO step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.core.base import SharedBase
from align.data.preference import collate_pairs, load_preferences, tokenize_preferences
from align.data.sft import collate_sft, load_sft, pack_examples, tokenize_sft
from align.recipes.dpo import DPOConfig, DPOTrainer
from align.recipes.dpo_losses import LossSettings, PairLogps, preference_loss
from align.recipes.dpo_scoring import score_pairs
from align.recipes.ppo.config import PPOConfig
from align.recipes.ppo.trainer import PPOTrainer
from align.recipes.sft import SFTConfig, SFTTrainer, sft_forward
from align.train.config_parser import load_config
from reward.model import RewardModel
from reward.train import RewardConfig, RewardTrainer

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
PREFS = REPO / "tests" / "data" / "prefs_tiny.jsonl"
SFT_DATA = REPO / "tests" / "data" / "sft_tiny.jsonl"


@pytest.fixture(scope="module")
def trained_base(tiny_llama):
    """The tiny base with a 'policy' adapter whose B is not zero (seeded), so gradients reach A and B."""
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.adapter_parameters("policy").values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    base.set_active("policy")
    return base


def pairs_of(base, n: int = 6):
    rows = load_preferences(str(PREFS)).rows[:n]
    return tokenize_preferences(rows, base.tokenizer, 96)


def grads_of(base, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = base.adapter_parameters("policy")
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads, strict=True))


def close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal to float32 rounding: within 1e-5 of the larger tensor's scale."""
    return torch.allclose(x, y, rtol=1e-4, atol=1e-5 * max(x.abs().max().item(), 1e-3))


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert any(g.abs().max() > 1e-4 for g in a.values())  # the gradients are not all zero
    for k in a:
        assert close(a[k], b[k]), k


# -- SFT ---------------------------------------------------------------------------------------------------------
def test_sft_padding_free_and_packing_count_the_same_tokens_with_the_same_loss(trained_base):
    base = trained_base
    examples, _ = tokenize_sft(load_sft(str(SFT_DATA))[0], base.tokenizer, 64)
    pad = base.tokenizer.pad_token_id
    padded_batch, packed_rows = collate_sft(examples, pad), collate_sft(pack_examples(examples, 64), pad)
    padded, _ = sft_forward(base, padded_batch)
    free, _ = sft_forward(base, padded_batch, padding_free=True)
    packed, _ = sft_forward(base, packed_rows, padding_free=True)
    assert free.numel() == padded.numel() == packed.numel()
    assert torch.allclose(free, padded, atol=1e-5)  # same tokens, same order
    assert torch.allclose(packed.sum(), padded.sum(), rtol=1e-6)
    assert_same_grads(grads_of(base, padded.sum()), grads_of(base, sft_forward(base, padded_batch, True)[0].sum()))


def test_sft_run_padding_free_logs_the_padded_runs_losses(tiny_llama, tmp_path):
    def run(name, **over):
        sets = [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / name}", f"train_file={SFT_DATA}",
                "report_to=[none]", "max_steps=2", "save_steps=0", *[f"{k}={v}" for k, v in over.items()]]
        SFTTrainer(load_config(SFTConfig, REPO / "configs" / "sft_tiny.yaml", sets)).train()
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    padded, free = run("padded"), run("free", padding_free="true")
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (padded, free)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    held_out = [[r["eval/loss"] for r in rows if "eval/loss" in r] for rows in (padded, free)]
    assert held_out[0] and held_out[0] == pytest.approx(held_out[1], rel=1e-5)


# -- DPO ---------------------------------------------------------------------------------------------------------
def test_dpo_sequence_logprobs_loss_and_gradients_equal_the_padded_batch(trained_base):
    base = trained_base
    batch = collate_pairs(pairs_of(base), base.tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # the padded batch does pad
    with torch.no_grad(), base.reference():
        ref = score_pairs(base, batch)
    losses, grads = [], []
    for padding_free in (False, True):
        scores = score_pairs(base, batch, ld_alpha=None, with_weights=True, padding_free=padding_free)
        lp = PairLogps(scores.chosen, scores.rejected, ref.chosen, ref.rejected, weights=scores.weights)
        loss, _, _ = preference_loss(lp, LossSettings(beta=0.1), ["sigmoid"])
        losses.append((loss, scores))
        grads.append(grads_of(base, loss))
    (loss_p, sp), (loss_f, sf) = losses
    assert torch.allclose(sp.chosen, sf.chosen, atol=1e-5) and torch.allclose(sp.rejected, sf.rejected, atol=1e-5)
    assert torch.allclose(sp.weights, sf.weights, rtol=1e-5)
    assert torch.allclose(loss_p, loss_f, atol=1e-6)
    assert_same_grads(*grads)


def test_dpo_run_padding_free_matches_the_padded_run(tiny_llama, tmp_path):
    def run(name, *over):
        sets = [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / name}", f"train_file={PREFS}",
                "report_to=[none]", "max_steps=2", "save_steps=0", *over]
        trainer = DPOTrainer(load_config(DPOConfig, REPO / "configs" / "dpo_tiny.yaml", sets))
        trainer.train()
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return rows, {k: v.detach().clone() for k, v in trainer.base.adapter_parameters("policy").items()}

    (padded, a), (free, b) = run("padded"), run("free", "padding_free=true")
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert [r[key] for r in padded if key in r] == pytest.approx([r[key] for r in free if key in r], rel=1e-4)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# -- reward ------------------------------------------------------------------------------------------------------
def test_reward_scores_at_each_sequences_last_token_equal_the_padded_batch(trained_base):
    base = trained_base
    rm = RewardModel.create(base, "rm-pf", seed=0)
    with torch.no_grad():
        for p in base.adapter_parameters("rm-pf").values():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    batch = collate_pairs(pairs_of(base), base.tokenizer.pad_token_id)
    padded = rm.score_ids(batch["input_ids"], batch["attention_mask"])
    free = rm.score_ids(batch["input_ids"], batch["attention_mask"], padding_free=True)
    assert torch.allclose(padded, free, atol=1e-5)
    params = rm.parameters()
    ga = torch.autograd.grad(padded.pow(2).sum(), params)
    gb = torch.autograd.grad(free.pow(2).sum(), params)
    assert all(close(x, y) for x, y in zip(ga, gb, strict=True))
    rm.remove()


def test_reward_run_padding_free_matches_the_padded_run(tiny_llama, tmp_path):
    def run(name, *over):
        sets = [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / name}", f"train_file={PREFS}",
                "max_steps=2", "save_steps=0", *over]
        RewardTrainer(load_config(RewardConfig, REPO / "configs" / "reward_tiny.yaml", sets)).train()
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    padded, free = run("padded"), run("free", "padding_free=true")
    for key in ("loss", "accuracy", "margin", "eval/loss"):
        assert [r[key] for r in padded if key in r] == pytest.approx([r[key] for r in free if key in r], rel=1e-4)


# -- the RL update -----------------------------------------------------------------------------------------------
def test_ppo_step_padding_free_matches_the_padded_step(tiny_llama, tmp_path):
    """Left-padded prompts, right-padded completions: the same per-token log-probs, values and update."""
    def trainer(name, *over):
        cfg = load_config(PPOConfig, REPO / "configs" / "ppo_tiny.yaml",
                          [f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / name}", *over])
        tr = PPOTrainer(cfg)
        tr.setup()
        return tr

    padded, free = trainer("padded"), trainer("free", "padding_free=true")
    batch = padded.rollout(1)
    # the arithmetic prompts and completions come out even: pad them as a rollout of mixed lengths would be
    P = batch.prompt_width
    batch.input_ids[0, :2], batch.attention_mask[0, :2] = 0, 0  # a shorter prompt, left-padded
    batch.input_ids[1, -2:], batch.attention_mask[1, -2:], batch.mask[1, -2:] = 0, 0, 0  # a shorter completion
    assert P > 2
    with torch.no_grad():
        assert torch.allclose(padded._logprobs(batch, "policy"), free._logprobs(batch, "policy"), atol=1e-5)
        assert torch.allclose(padded._values(batch), free._values(batch), atol=1e-5)
    m_padded, m_free = padded.ppo_step(1), free.ppo_step(1)
    for key in ("loss/policy", "loss/value", "kl", "entropy"):
        assert m_padded[key] == pytest.approx(m_free[key], rel=1e-4, abs=1e-6), key
    a, b = padded.base.adapter_parameters("policy"), free.base.adapter_parameters("policy")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    padded.close()
    free.close()


def test_trl_padding_free_key_is_a_field_here_and_refused_where_a_recipe_pads(tmp_path):
    from align.recipes.kto import KTOConfig
    from align.train.config_parser import ConfigError

    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"train_file: {PREFS}\npadding_free: true\n")
    assert load_config(DPOConfig, yaml).padding_free is True
    assert load_config(RewardConfig, yaml).padding_free is True
    with pytest.raises(ConfigError, match=r"padding_free.*this recipe pads each batch \(padding_free is a field of "
                                          r"sft, dpo, reward, ppo, grpo and rloo\)"):
        load_config(KTOConfig, yaml)
