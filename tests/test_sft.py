"""SFT end to end on a tiny real model: TRL's metric names, packing without cross-talk, the token loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from align.cli import main as align_main
from align.core.base import SharedBase
from align.data.sft import collate_sft, load_sft, pack_examples, tokenize_sft
from align.recipes.sft import SFTConfig, SFTTrainer, sft_forward, token_nll
from align.train.config_parser import load_config

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "sft_tiny.yaml"
DATA = REPO / "tests" / "data" / "sft_tiny.jsonl"


def tiny_config(model, out, **over) -> SFTConfig:
    sets = [f"model_name_or_path={model}", f"output_dir={out}", f"train_file={DATA}", "report_to=[none]"]
    return load_config(SFTConfig, TINY_CONFIG, sets + [f"{k}={v}" for k, v in over.items()])


def test_token_nll_by_hand():
    # Two positions, vocab 3, identity lm_head: logits are the hidden states themselves.
    hidden = torch.tensor([[0.0, 0.0, math.log(2.0)], [1.0, 0.0, 0.0]])
    nll, correct = token_nll(hidden, torch.eye(3), torch.tensor([2, 1]))
    # softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]: -ln(1/2); softmax([1, 0, 0])[1] = 1 / (e + 2)
    assert torch.allclose(nll, torch.tensor([math.log(2.0), math.log(math.e + 2.0)]))
    assert correct.tolist() == [1.0, 0.0]


def test_sft_trains_the_adapter_and_logs_trl_names(tiny_llama, tmp_path):
    trainer = SFTTrainer(tiny_config(tiny_llama, tmp_path / "run", save_steps=0))
    trainer.setup()
    base_before = {n: p.detach().clone() for n, p in trainer.base.base_parameters().items()}
    eval_before = trainer.evaluate()["eval/loss"]
    trainer.train()
    assert all(torch.equal(base_before[n], p) for n, p in trainer.base.base_parameters().items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))  # 12 training rows, 4 a step, 2 epochs
    for key in ("loss", "learning_rate", "grad_norm", "epoch", "num_tokens", "mean_token_accuracy"):
        assert all(key in r for r in steps), key
    assert steps[-1]["epoch"] == 2.0
    tokens = [r["num_tokens"] for r in steps]
    assert tokens == sorted(tokens) and tokens[0] > 0 and len(set(tokens)) == len(tokens)
    assert all(0.0 <= r["mean_token_accuracy"] <= 1.0 for r in steps)
    assert steps[-1]["eval/loss"] < eval_before  # the held-out rows got likelier
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["train_examples"] == 12 and final["num_tokens"] == tokens[-1]


def test_packed_rows_give_the_same_loss_as_separate_rows(tiny_llama):
    """Attention and loss stay inside each packed example: the same per-token losses, summed."""
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy")
    rows, _ = load_sft(str(DATA))
    examples, _ = tokenize_sft(rows, base.tokenizer, 64)
    packed = pack_examples(examples, 64)
    assert len(packed) < len(examples)  # several examples share a row
    with torch.no_grad():
        alone, _ = sft_forward(base, collate_sft(examples, base.tokenizer.pad_token_id))
        together, _ = sft_forward(base, collate_sft(packed, base.tokenizer.pad_token_id))
    assert together.numel() == alone.numel()
    assert torch.allclose(together.sum(), alone.sum(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(together.sort().values, alone.sort().values, atol=1e-4)


def test_packing_run_and_cli(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    code = align_main(["sft", "--config", str(TINY_CONFIG), "--model_name_or_path", str(tiny_llama),
                       "--output_dir", str(out), "--train_file", str(DATA), "--packing", "true",
                       "--report_to", "none"])
    assert code == 0
    assert f"adapter saved to {out / 'adapter'}" in capsys.readouterr().out
    meta = json.loads((out / "adapter" / "align_meta.json").read_text())
    assert meta["lora"]["rank"] == 8 and meta["lora"]["targets"] == "all"
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["train_rows"] < final["train_examples"]


def test_bad_row_is_one_clear_line(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    code = align_main(["sft", "--config", str(TINY_CONFIG), "--model_name_or_path", str(tiny_llama),
                       "--output_dir", str(tmp_path / "run"), "--train_file", str(bad)])
    assert code == 2
    assert f"{bad}:2: field 'completion': missing" in capsys.readouterr().err


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_file: x.jsonl\nmax_length: 1\n")
    with pytest.raises(ValueError, match="max_length: expected at least 2"):
        load_config(SFTConfig, bad)
