"""`align advise`: adapter parameters counted by hand for the tiny model, tokens counted, advice given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.train.advise import lora_parameters, lora_shapes, recommend_rank

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "prefs_tiny.jsonl"

# The tiny Llama (align/core/tiny.py): hidden 64, 2 heads of 32, 1 KV head, MLP 128, 2 layers.
# Per layer, r * (in + out) for each linear:
#   q 64->64: 128   k 64->32: 96   v 64->32: 96   o 64->64: 128
#   gate 64->128: 192   up 64->128: 192   down 128->64: 192        sum 1024 per unit of rank
TINY_LLAMA_PER_RANK = 2 * 1024


def advise_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", "advise", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)


def test_parameters_by_hand_and_as_peft_builds_them(tiny_llama):
    from transformers import AutoConfig

    from align.core.base import SharedBase
    from align.core.lora import LoraSettings

    shapes = lora_shapes(AutoConfig.from_pretrained(tiny_llama))
    assert len(shapes) == 14
    assert lora_parameters(shapes, 1) == TINY_LLAMA_PER_RANK
    assert lora_parameters(shapes, 8) == 8 * TINY_LLAMA_PER_RANK == 16384
    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("x", LoraSettings(rank=4))
    real = sum(p.numel() for p in base.adapter_parameters("x").values())
    assert real == lora_parameters(shapes, 4) == 8192


def test_moe_experts_count_once_per_expert(tiny_models):
    from transformers import AutoConfig

    from align.core.base import SharedBase
    from align.core.lora import LoraSettings

    path = tiny_models["qwen3_moe"]
    shapes = lora_shapes(AutoConfig.from_pretrained(path))
    base = SharedBase.load(str(path))
    base.add_adapter("x", LoraSettings(rank=2))
    assert sum(p.numel() for p in base.adapter_parameters("x").values()) == lora_parameters(shapes, 2)


def test_recommended_rank_is_the_smallest_that_holds_the_data():
    shapes = [("w", 64, 64, 1)]  # 128 parameters per unit of rank, 256 bits
    assert recommend_rank(shapes, 10, "dpo") == (8, True)
    assert recommend_rank(shapes, 256 * 8 + 1, "sft") == (16, True)
    assert recommend_rank(shapes, 256 * 32, "sft") == (32, True)
    assert recommend_rank(shapes, 256 * 10_000, "sft") == (512, False)


def test_dpo_advice_counts_pairs_and_tokens(tiny_llama):
    from align.core.loading import load_tokenizer
    from align.data.preference import load_preferences, tokenize_preferences

    done = advise_cli(str(DATA), "--model_name_or_path", str(tiny_llama), "--recipe", "dpo", "--lora_r", "4", "--json",
                      "--max_length", "96")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    pairs = tokenize_preferences(load_preferences(DATA).rows, load_tokenizer(str(tiny_llama)), 96)
    assert report["pairs"] == len(pairs) == 24
    assert report["chosen_tokens"] == sum(len(p.chosen_ids) for p in pairs)
    assert report["rejected_tokens"] == sum(len(p.rejected_ids) for p in pairs)
    assert report["lora_parameters"] == 4 * TINY_LLAMA_PER_RANK
    assert report["capacity_bits"] == 2 * 4 * TINY_LLAMA_PER_RANK
    assert report["information_bits"] == 24
    assert report["recommended_lora_r"] == 8
    assert report["recommended_learning_rate"] == pytest.approx(5e-5)
    assert not report["large_batch"]
    assert any("10x" in r for r in report["reasons"])


def test_sft_advice_past_capacity_and_large_batch(tiny_llama, tmp_path):
    from align.core.loading import load_tokenizer

    answer = "the quick brown fox jumps over the lazy dog " * 60
    rows = [{"messages": [{"role": "user", "content": f"say it {i}"}, {"role": "assistant", "content": answer}]}
            for i in range(40)] + [{"prompt": "hello", "completion": "good"}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(str(tiny_llama))
    tokens = 40 * (len(tok(answer, add_special_tokens=False)["input_ids"]) + 1)
    tokens += len(tok("good", add_special_tokens=False)["input_ids"]) + 1
    assert tokens > 2 * 4 * TINY_LLAMA_PER_RANK  # past capacity at rank 4, by construction
    done = advise_cli(str(path), "--model_name_or_path", str(tiny_llama), "--recipe", "sft", "--lora_r", "4", "--json",
                      "--per_device_train_batch_size", "64", "--gradient_accumulation_steps", "8",
                      "--measure_rows", "0")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["completion_tokens"] == tokens
    assert report["rows"] == 41
    rank = 8
    while 2 * rank * TINY_LLAMA_PER_RANK < tokens:
        rank *= 2
    assert report["recommended_lora_r"] == rank
    assert report["data_to_capacity"] == pytest.approx(tokens / (2 * 4 * TINY_LLAMA_PER_RANK))
    assert report["large_batch"] and report["effective_batch"] == 512
    assert report["recommended_learning_rate"] == pytest.approx(2e-4)
    text = advise_cli(str(path), "--model_name_or_path", str(tiny_llama), "--recipe", "sft", "--lora_r", "4",
                      "--measure_rows", "0")
    assert text.returncode == 0
    assert f"recommend lora_r={rank}" in text.stdout and "outgrows the adapter" in text.stdout


def test_bad_data_is_one_line(tmp_path, tiny_llama):
    done = advise_cli(str(tmp_path / "missing.jsonl"), "--model_name_or_path", str(tiny_llama))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.jsonl'}: file not found"


def test_sft_information_measured_under_the_base_and_claims_cited(tiny_llama, tmp_path):
    """The measured bits equal the base's own token loss (transformers' loss, labels -100 off the answer), scaled
    from the rows measured to all rows by trained tokens; a study's result.json under --study_dir is cited."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from align.core.loading import load_tokenizer
    from align.data.sft import load_sft, tokenize_sft

    rows = [{"prompt": f"count {i}", "completion": " one two three four" * (1 + i % 3)} for i in range(6)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    study = tmp_path / "studies" / "capacity"
    study.mkdir(parents=True)
    (study / "result.json").write_text(json.dumps({"study": "capacity", "verdict": "INCONCLUSIVE", "seeds": [0, 1]}))
    (tmp_path / "studies" / "broken").mkdir()
    (tmp_path / "studies" / "broken" / "result.json").write_text("{half")  # a half-written one is not evidence
    done = advise_cli(str(path), "--model_name_or_path", str(tiny_llama), "--recipe", "sft", "--json",
                      "--measure_rows", "4", "--study_dir", str(tmp_path / "studies"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)

    examples, _ = tokenize_sft(load_sft(str(path))[0], load_tokenizer(str(tiny_llama)), 1024)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    nats = tokens = 0
    for ex in examples[:4]:
        ids = torch.tensor([ex.input_ids])
        labels = torch.where(torch.tensor([ex.loss_mask]).bool(), ids, -100)
        n = int(sum(ex.loss_mask[1:]))
        with torch.no_grad():
            nats += model(input_ids=ids, labels=labels).loss.item() * n
        tokens += n
    all_tokens = sum(sum(ex.loss_mask[1:]) for ex in examples)
    assert report["measured_rows"] == 4 and report["measured_tokens"] == tokens
    assert report["bits_per_token"] == pytest.approx(nats / math.log(2) / tokens, rel=1e-4)
    assert report["information_bits"] == pytest.approx(nats / math.log(2) / tokens * all_tokens, rel=1e-4)
    assert [c["rank"] for c in report["capacity_by_rank"]][:3] == [1, 4, 8]
    assert report["capacity_by_rank"][2]["capacity_bits"] == 2 * 8 * TINY_LLAMA_PER_RANK
    cited = [line for line in report["evidence"] if "capacity" in line]
    assert cited and "INCONCLUSIVE" in cited[0] and str(study) in cited[0]
    assert any("not checked on this machine yet: `align study lr-ratio`" in line for line in report["evidence"])
    bad = advise_cli(str(path), "--model_name_or_path", str(tiny_llama), "--recipe", "sft", "--measure_rows", "-1")
    assert bad.returncode == 2 and "--measure_rows" in bad.stderr.strip().splitlines()[-1]
