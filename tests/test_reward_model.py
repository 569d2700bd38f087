"""RewardModel on the shared base: last-token head under any padding, attach next to a policy, save/load,
and scoring that reads a pair exactly as training did."""

import json

import pytest
import torch
from safetensors.torch import load_file

from align.core.base import SharedBase
from align.core.logprobs import completion_logprobs
from align.data.preference import collate_pairs, load_preferences, tokenize_preferences
from reward.model import RewardModel, RewardModelError, last_token_index, pad_sequences

PROMPTS = ["What is 12+30? Reply with the number only.", "What is 41+17? Reply with the number only.",
           "hello"]
COMPLETIONS = ["42", "41 + 17 = 58", "the quick brown fox jumps over the lazy dog"]


def _perturb(params, seed):
    """Stand-in for training: move every adapter/head tensor away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def saved_reward(tiny_llama, tmp_path_factory):
    """A 'trained' (perturbed) reward model saved to disk, and its scores on PROMPTS/COMPLETIONS."""
    base = SharedBase.load(str(tiny_llama))
    rm = RewardModel.create(base, seed=0)
    _perturb(rm.parameters(), seed=1)
    path = rm.save(tmp_path_factory.mktemp("rm") / "reward_model")
    return path, rm.score(PROMPTS, COMPLETIONS)


def test_last_token_index_by_hand():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]
    with pytest.raises(ValueError, match=r"rows \[1\] have no tokens"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_head_reads_last_real_token_under_left_and_right_padding(tiny_llama):
    base = SharedBase.load(str(tiny_llama))
    rm = RewardModel.create(base, seed=0)
    _perturb(rm.parameters(), seed=2)
    seqs = [rm.encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert len({len(s) for s in seqs}) == 3  # different lengths, so padding really happens
    with torch.no_grad():
        alone = torch.stack([rm.score_ids(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in seqs])
        right = rm.score_ids(*pad_sequences(seqs, base.tokenizer.pad_token_id, "right"))
        left = rm.score_ids(*pad_sequences(seqs, base.tokenizer.pad_token_id, "left"))
        # Reading the final position instead of the last real token would score a pad token on the right.
        naive = rm.head(base.hidden(*pad_sequences(seqs, base.tokenizer.pad_token_id, "right"))[:, -1]).squeeze(-1)
    assert right.dtype == torch.float32 and right.shape == (3,)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    assert (naive - alone).abs().max() > 1e-3
    # score() (sorted, batched) agrees with one-by-one scoring.
    torch.testing.assert_close(rm.score(PROMPTS, COMPLETIONS, batch_size=2), alone, atol=1e-5, rtol=0)


def _storages(base):
    return {p.untyped_storage().data_ptr() for p in base.base_parameters().values()}


def test_attach_next_to_a_trained_policy_changes_nothing_else(tiny_llama, saved_reward):
    path, saved_scores = saved_reward
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy")
    _perturb(base.adapter_parameters("policy").values(), seed=3)
    tok = base.tokenizer
    ids = torch.tensor([tok("What is 12+30? Reply with the number only. 42")["input_ids"]])
    mask = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, 5:] = 1
    with torch.no_grad(), base.adapter("policy"):
        before = completion_logprobs(base, ids, mask, comp)
    with torch.no_grad(), base.reference():
        reference = completion_logprobs(base, ids, mask, comp)
    assert (before - reference).abs().max() > 1e-3  # the policy adapter really changes outputs
    bytes_before, storages_before = base.base_bytes(), _storages(base)

    base.model.train()  # a policy mid-training; PEFT would switch the model to eval when loading
    rm = RewardModel.attach(base, path)
    assert base.model.training
    base.model.eval()

    assert base.adapters == ["policy", "reward"]
    assert base.peft.active_adapter == "policy"  # attaching does not switch the active adapter
    assert all(p.requires_grad for p in base.adapter_parameters("policy").values())  # policy still trains
    assert not any(p.requires_grad for p in rm.parameters())  # reward model is frozen
    scores = rm.score(PROMPTS, COMPLETIONS)
    assert torch.equal(scores, saved_scores)
    with torch.no_grad():
        after = completion_logprobs(base, ids, mask, comp)  # active adapter: still the policy
        with base.adapter("policy"):
            after_ctx = completion_logprobs(base, ids, mask, comp)
    assert torch.equal(after, before) and torch.equal(after_ctx, before)
    assert base.base_bytes() == bytes_before
    assert _storages(base) == storages_before


def test_save_and_load_reproduce_scores_exactly(tiny_llama, saved_reward, tmp_path):
    path, saved_scores = saved_reward
    base = SharedBase.load(str(tiny_llama))  # a plain base, no adapters yet
    rm = RewardModel.attach(base, path)
    assert torch.equal(rm.score(PROMPTS, COMPLETIONS), saved_scores)
    # And a second round trip: save what was loaded, load it onto another fresh base.
    again = RewardModel.attach(SharedBase.load(str(tiny_llama)), rm.save(tmp_path / "copy"))
    assert torch.equal(again.score(PROMPTS, COMPLETIONS), saved_scores)
    assert (path / "adapter_model.safetensors").is_file() and (path / "head.safetensors").is_file()
    # No bias, as transformers' score layer: `align export --reward` then scores exactly as this model does.
    assert rm.head.bias is None and set(load_file(str(path / "head.safetensors"))) == {"weight"}


def test_a_different_base_is_refused(tmp_path, saved_reward):
    from align.core.tiny import build_tiny_model

    path, _ = saved_reward
    other = SharedBase.load(str(build_tiny_model(tmp_path / "other", "llama", seed=1)))  # same shape, other weights
    with pytest.raises(RewardModelError, match=r"trained on a different base.*weights_sha256"):
        RewardModel.attach(other, path)
    assert other.adapters == []


def test_attach_refuses_bad_folders_and_name_clashes(tiny_llama, saved_reward, tmp_path):
    path, _ = saved_reward
    with pytest.raises(RewardModelError, match="missing adapter_model.safetensors"):
        RewardModel.attach(SharedBase.load(str(tiny_llama)), tmp_path)
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("reward")
    with pytest.raises(RewardModelError, match="adapter 'reward' already exists"):
        RewardModel.attach(base, path)
    rm = RewardModel.attach(base, path, name="judge")
    assert rm.name == "judge" and base.peft.active_adapter == "reward"


# Standard strings, conversational messages, and an answer long enough to be cut at MAX_LENGTH (its
# prompt is 2-12 tokens, the answer 37-38: it keeps 20-30; the other rows fit whole, at most 27 tokens).
TRAINING_ROWS = [
    {"prompt": "What is 12+30? Reply with the number only.", "chosen": "42", "rejected": "41"},
    {"prompt": [{"role": "user", "content": "What is 41+17?"}],
     "chosen": [{"role": "assistant", "content": "58"}], "rejected": [{"role": "assistant", "content": "57"}]},
    {"prompt": "hello", "chosen": " ".join(["the quick brown fox jumps over the lazy dog"] * 4),
     "rejected": "no"},
]
MAX_LENGTH = 32


@pytest.mark.parametrize("chat_template", [True, False])
def test_scoring_reads_a_pair_exactly_as_training(tiny_llama, tmp_path, chat_template):
    base = SharedBase.load(str(tiny_llama))
    rm = RewardModel.create(base, chat_template=chat_template, max_length=MAX_LENGTH, seed=0)
    _perturb(rm.parameters(), seed=4)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRAINING_ROWS))
    rows = load_preferences(path).rows
    # Training's side, as RewardTrainer builds it: tokenized pairs, collated, one forward over both sides.
    pairs = tokenize_preferences(rows, base.tokenizer, MAX_LENGTH, chat_template)
    assert len(pairs[2].prompt_ids) + len(pairs[2].chosen_ids) == MAX_LENGTH  # the long answer was cut
    batch = collate_pairs(pairs, base.tokenizer.pad_token_id)
    with torch.no_grad():
        trained = rm.score_ids(batch["input_ids"], batch["attention_mask"])[:len(pairs)]

    fed = []  # every sequence score() hands to the model, padding removed
    score_ids = rm.score_ids

    def recording(ids, mask):
        fed.extend(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))
        return score_ids(ids, mask)

    rm.score_ids = recording
    scored = rm.score([r.prompt for r in rows], [r.chosen for r in rows])
    assert sorted(fed) == sorted(p.prompt_ids + p.chosen_ids for p in pairs)
    torch.testing.assert_close(scored, trained, atol=1e-5, rtol=0)
