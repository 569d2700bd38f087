"""`align demo --quick`: the whole pipeline (sampling with vLLM, pairs, DPO, sync, eval) as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import fmean

import pytest

pytest.importorskip("vllm")


def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    res = subprocess.run([sys.executable, "-m", "align.cli", "demo", "--quick", "--output_dir", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"metric", "before", "after", "adapter"} <= result.keys()
    assert result["engine"] == "VLLMEngine"
    # Every long phase shows a bar, in the order it runs: nothing is silent between the engine line and the pairs.
    place = 0
    for mark in ["[demo] engine:", "evaluate before", "sample x4", " pairs from ", "dpo", "evaluate after"]:
        place = res.stderr.find(mark, place)
        assert place >= 0, f"{mark!r} missing or out of order in:\n{res.stderr[-3000:]}"
    adapter = Path(result["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((out / "demo_result.json").read_text()) == result
    # pairs were written as a valid preference file that `align data check` accepts
    check = subprocess.run([sys.executable, "-m", "align.cli", "data", "check", str(out / "pairs.jsonl")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # A random tiny model scores 0 on held-out sums before and after, so DPO's effect is measured where it
    # acts: the trained adapter must widen log p(chosen) - log p(rejected) on the pairs it was trained on.
    before, after = pair_margins(out)
    gains = [a - b for a, b in zip(after, before, strict=True)]
    print(f"held-out reward {result['before']} -> {result['after']}; mean pair margin "
          f"{fmean(before):.4f} -> {fmean(after):.4f} nats, gain {fmean(gains):.4f} (smallest {min(gains):.4f})")
    # The fixed-seed run gives a mean gain of ~0.15 nats and every pair >= 0.06; a third of it is the bar.
    assert fmean(gains) > 0.05 and min(gains) > 0, gains


def pair_margins(out: Path) -> tuple[list[float], list[float]]:
    """log p(chosen) - log p(rejected) of each pair in pairs.jsonl, base alone and with the demo's adapter.

    Computed with transformers and PEFT directly, not with the trainer's own code."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tiny-model")
    model = AutoModelForCausalLM.from_pretrained(out / "tiny-model", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, out / "dpo" / "adapter").eval()
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]

    def logp(prompt: str, answer: str) -> float:
        p = list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"])
        a = tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0, len(p) - 1:-1]
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(a)[:, None]).sum().item()

    def margins() -> list[float]:
        return [logp(x["prompt"], x["chosen"]) - logp(x["prompt"], x["rejected"]) for x in pairs]

    after = margins()
    with model.disable_adapter():
        before = margins()
    return before, after


def test_build_pairs_best_vs_worst_and_the_gold_answer_where_no_sample_is_right():
    from types import SimpleNamespace as Sample

    from align.recipes.demo import build_pairs

    rows = [{"prompt": "What is 1+2?", "answer": "3"}, {"prompt": "What is 2+2?", "answer": "4"}]
    samples = [[Sample(text="3"), Sample(text="1 + 2 = 5")], [Sample(text="2 + 2 = 5"), Sample(text="5")]]
    pairs, mean_reward = build_pairs(rows, samples)
    assert pairs == [{"prompt": "What is 1+2?", "chosen": "3", "rejected": "1 + 2 = 5"}]  # row 2: all score 0
    assert mean_reward == 0.25
    gold, _ = build_pairs(rows, samples, gold=True)
    assert gold == pairs + [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "2 + 2 = 5"}]
