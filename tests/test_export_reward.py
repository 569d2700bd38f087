"""`align export --reward`: a trained tiny reward model becomes a transformers sequence classifier whose
logits equal RewardModel's scores (an old head's bias, which transformers' score layer cannot hold, left out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align_main
from align.train.config_parser import load_config
from reward.model import RewardModel, encode
from reward.train import RewardConfig, RewardTrainer

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("What is 2+3?", "5"), ("What is 2+3?", "The answer is 2 + 3 = 6, I think."),
         ("Name a colour.", "Blue"), ("Count to three.", "one, two, three, and that is all of them")]


def test_exported_classifier_scores_like_the_reward_model(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.core.base import SharedBase

    run = tmp_path / "run"
    config = load_config(RewardConfig, ROOT / "configs" / "reward_tiny.yaml", [
        f"model_name_or_path={tiny_llama}", f"output_dir={run}", f"train_file={ROOT / 'tests/data/prefs_tiny.jsonl'}",
        "max_steps=3", "save_steps=0"])
    RewardTrainer(config).train()
    saved = load_file(str(run / "reward_model" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())  # the adapter learned something

    out = tmp_path / "exported"
    assert align_main(["export", "--reward", str(run), str(out)]) == 0
    assert "sequence-classification reward model" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert not list(out.glob("adapter_*"))  # merged: no PEFT needed to load it

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # EOS ends every sequence: it cannot be padding

    rm = RewardModel.attach(SharedBase.load(str(tiny_llama)), run / "reward_model")
    want = rm.score([p for p, _ in PAIRS], [c for _, c in PAIRS])
    assert set(load_file(str(run / "reward_model" / "head.safetensors"))) == {"weight"}  # trained without a bias
    # The classifier reads the sequences as RewardModel does (same ids), padded by its own tokenizer.
    seqs = [encode(tokenizer, p, c, rm.chat_template, rm.max_length) for p, c in PAIRS]
    assert len({len(s) for s in seqs}) > 1  # different lengths: padding is exercised
    batch = tokenizer.pad({"input_ids": seqs}, return_tensors="pt")
    with torch.no_grad():
        got = model(**batch).logits[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # the same numbers, not the same up to a shift
    assert want.std() > 1e-3  # the scores differ between pairs: the check is not of a constant
    meta = json.loads((out / "align_export.json").read_text())
    assert meta["head_bias_left_out"] == 0.0 and meta["max_abs_diff"] <= 1e-5


def test_an_old_head_with_a_bias_exports_without_it_and_says_so(tiny_llama, tmp_path):
    """Reward folders saved before the head lost its bias: the export leaves it out and records it."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.core.base import SharedBase
    from align.export.reward import export_reward

    rm = RewardModel.create(SharedBase.load(str(tiny_llama)), seed=0)
    with torch.no_grad():
        rm.head.weight.mul_(10)  # scores that differ between pairs
    path = rm.save(tmp_path / "old")
    save_file({"weight": rm.head.weight.detach().contiguous(), "bias": torch.tensor([0.023])},
              str(path / "head.safetensors"))
    old = RewardModel.attach(SharedBase.load(str(tiny_llama)), path)
    want = old.score([p for p, _ in PAIRS], [c for _, c in PAIRS])

    out, bias = export_reward(path, tmp_path / "exported")
    assert bias == json.loads((out / "align_export.json").read_text())["head_bias_left_out"] == pytest.approx(0.023)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer.pad({"input_ids": [old.encode(p, c) for p, c in PAIRS]}, return_tensors="pt")
    with torch.no_grad():
        got = model(**batch).logits[:, 0]
    torch.testing.assert_close(got, want - 0.023, atol=1e-5, rtol=0)
    assert want.std() > 1e-3


def test_export_reward_refuses_a_folder_without_a_reward_model(tmp_path, capsys):
    assert align_main(["export", "--reward", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "expected a reward run folder" in err and not (tmp_path / "out").exists()
