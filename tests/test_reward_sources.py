"""Reward models from anywhere (reward/sources.py, reward/classifier.py): align's reward folder, its export,
and any transformers sequence classifier score as TRL's GRPOTrainer scores them, called as TRL calls them."""

from __future__ import annotations

import pytest
import torch

from align.core.base import SharedBase
from reward.model import RewardModel, RewardModelError
from reward.sources import load_reward_model

PROMPTS = [[{"role": "user", "content": "What is 2+3?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
           [{"role": "user", "content": "Count to three."}]]
COMPLETIONS = [[{"role": "assistant", "content": "5"}],
               [{"role": "assistant", "content": "Blue, I think, or maybe red."}],
               [{"role": "assistant", "content": "one, two, three, and that is all of them"}]]


@pytest.fixture(scope="module")
def align_reward(tiny_llama, tmp_path_factory):
    """A 'trained' (perturbed) bias-free align reward model, saved, and its export as a classifier."""
    from align.export.reward import export_reward

    rm = RewardModel.create(SharedBase.load(str(tiny_llama)), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    root = tmp_path_factory.mktemp("sources")
    path = rm.save(root / "reward_model")
    exported, bias = export_reward(path, root / "exported")
    return path, exported, bias


def trl_rewards(policy: str, reward_funcs: list, tmp_path) -> tuple[torch.Tensor, list[str]]:
    """TRL's own GRPOTrainer._calculate_rewards on PROMPTS/COMPLETIONS: (rows, funcs) rewards and the names."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, report_to="none", use_cpu=True, bf16=False, save_strategy="no")
    data = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_funcs, args=args, train_dataset=data)
    inputs = [{"prompt": p} for p in PROMPTS]
    rewards = trainer._calculate_rewards(inputs, PROMPTS, COMPLETIONS, [[0]] * len(PROMPTS))
    return rewards.cpu(), trainer.reward_func_names


def test_align_folder_its_export_and_trl_score_the_same(tiny_llama, align_reward, tmp_path):
    import json

    path, exported, bias = align_reward
    assert bias == 0.0 and json.loads((exported / "align_export.json").read_text())["head_bias_left_out"] == 0.0
    base = SharedBase.load(str(tiny_llama))
    from_align = load_reward_model(str(path), base)
    from_export = load_reward_model(str(exported), base, "cpu", "float32", batch_size=2)  # padding in batches
    assert from_align.model.head.bias is None and base.adapters == ["reward"]  # the adapter, on this base
    assert not any(p.requires_grad for p in from_export.model.parameters()) and not from_export.model.training
    assert from_align.__name__ == "reward_model" and from_export.__name__ == "exported"

    # TRL scores the exported folder itself (column 0) and calls both of ours as reward functions, by keyword.
    got, names = trl_rewards(str(tiny_llama), [str(exported), from_export, from_align], tmp_path)
    assert names == ["exported", "exported", "reward_model"]
    assert got[:, 0].std() > 1e-3  # the rows score differently: the comparison is not of a constant
    torch.testing.assert_close(got[:, 1], got[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, 2], got[:, 0], atol=1e-5, rtol=0)
    # Called directly, with the columns TRL adds, the same numbers come back.
    direct = from_align(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[0]] * 3, answer=[None] * 3)
    torch.testing.assert_close(torch.tensor(direct), got[:, 2], atol=1e-6, rtol=0)


@torch.no_grad()
def test_a_classifier_scores_with_its_own_tokenizer_and_template(tiny_llama, own_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    fn = load_reward_model(str(own_classifier), base=None, device="cpu", dtype=torch.float32, batch_size=2)
    got = torch.tensor(fn(PROMPTS, COMPLETIONS, [None] * 3))  # today's positional answers are accepted too
    assert fn.__name__ == "my-rm"

    model = AutoModelForSequenceClassification.from_pretrained(own_classifier).eval()
    tok = AutoTokenizer.from_pretrained(own_classifier)
    texts = [tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert texts[1] == "### system: Be brief.\n### user: Name a colour.\n### assistant: Blue, I think, or maybe red.\n"
    one_by_one = torch.stack([model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
                              for t in texts])
    torch.testing.assert_close(got, one_by_one, atol=1e-5, rtol=0)
    # The policy's template would give other numbers: the test tells the two apart.
    policy_tok = AutoTokenizer.from_pretrained(tiny_llama)
    other = torch.stack([model(**tok(policy_tok.apply_chat_template(p + c, tokenize=False), return_tensors="pt",
                                     add_special_tokens=False)).logits[0, 0] for p, c in zip(PROMPTS, COMPLETIONS)])
    assert (other - got).abs().max() > 1e-3
    # Plain-text rows are joined as TRL joins them: prompt + completion, no template.
    plain = fn(["What is 2+3?", "Say hi."], ["5", " Hi!"])
    want = [model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
            for t in ("What is 2+3?5", "Say hi. Hi!")]
    assert plain == pytest.approx(want, abs=1e-5)


def test_bad_sources_are_refused_in_one_line(tiny_llama, tmp_path):
    cases = [(str(tmp_path), r"expected align.s reward folder \(reward_meta.json\) or a sequence classifier"),
             (str(tiny_llama), r"expected an AutoModelForSequenceClassification .*LlamaForCausalLM"),
             (str(tmp_path / "no" / "such" / "folder"), "not a folder here, nor a hub id"),
             ("nobody-here/no-such-reward-model", "no sequence classifier here or in the hub cache")]
    for spec, message in cases:
        with pytest.raises(RewardModelError, match=message) as e:
            load_reward_model(spec, base=None)
        assert "\n" not in str(e.value) and spec in str(e.value)


def test_an_old_reward_folder_with_a_head_bias_still_scores_with_it(tiny_llama, align_reward, tmp_path):
    """Folders saved before the head lost its bias: attach keeps the bias, so their scores do not change."""
    from safetensors.torch import load_file, save_file

    path, _, _ = align_reward
    old = tmp_path / "old"
    old.mkdir()
    for f in path.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    head = load_file(str(path / "head.safetensors"))
    save_file({**head, "bias": torch.tensor([0.023])}, str(old / "head.safetensors"))

    base = SharedBase.load(str(tiny_llama))
    new = load_reward_model(str(path), base)(PROMPTS, COMPLETIONS)
    rm = RewardModel.attach(base, old, name="old")
    assert rm.head.bias is not None and rm.head.bias.item() == pytest.approx(0.023)
    assert rm.score(PROMPTS, COMPLETIONS).tolist() == pytest.approx([s + 0.023 for s in new], abs=1e-6)
