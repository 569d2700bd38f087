"""PPO on a base whose tokenizer has no chat template: prompts are used as plain text (as TRL does for
non-conversational data), not a transformers error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def no_template_model(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(tiny_llama, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_the_tokenizer_really_has_no_template(no_template_model):
    from align.core.loading import load_tokenizer
    from align.data.prompts import encode_prompt

    tok = load_tokenizer(str(no_template_model))
    assert not tok.chat_template
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "1 + 2 ="}], add_generation_prompt=True)
    assert encode_prompt(tok, "What is 1 + 2?") == tok("What is 1 + 2?")["input_ids"]


def test_ppo_trains_on_plain_text_prompts(no_template_model, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "align", "ppo", "--config", "configs/ppo_tiny.yaml", "--model_name_or_path",
           str(no_template_model), "--output_dir", str(out), "--max_steps", "1", "--num_eval_prompts", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "policy" / "adapter_model.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and "reward" in rows[1]
