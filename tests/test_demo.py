"""`align demo --quick`: the whole pipeline (sampling with vLLM, pairs, DPO, sync, eval) as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    adapter = Path(result["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((out / "demo_result.json").read_text()) == result
    # pairs were written as a valid preference file that `align data check` accepts
    check = subprocess.run([sys.executable, "-m", "align.cli", "data", "check", str(out / "pairs.jsonl")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


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
