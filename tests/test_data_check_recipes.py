"""`align data check` checks rows as the recipe they are for reads them; `align advise` gives no advice on
a file with nothing the recipe trains on."""

from __future__ import annotations

import json
from pathlib import Path

from align.cli import main as align_main

DATA = Path(__file__).resolve().parent / "data"
SFT = DATA / "sft_tiny.jsonl"
PREFS = DATA / "prefs_tiny.jsonl"


def test_an_sft_file_is_checked_as_sft_rows(capsys):
    """Before, every SFT row was reported as a preference row missing 'chosen'."""
    assert align_main(["data", "check", str(SFT)]) == 0
    out, err = capsys.readouterr()
    assert "checked as sft rows" in err and "chosen" not in out + err
    assert "OK" in out


def test_bad_rows_are_named_for_each_recipe(tmp_path, capsys):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n" + json.dumps({"messages": "not a list"}) + "\n")
    assert align_main(["data", "check", str(sft)]) == 1
    out, _ = capsys.readouterr()
    assert f"{sft}:2" in out and f"{sft}:1" not in out
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "2+2?", "solution": "4"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    assert align_main(["data", "check", str(prompts)]) == 1
    out, err = capsys.readouterr()
    assert "checked as grpo rows" in err and f"{prompts}:2" in out
    assert align_main(["data", "check", str(PREFS), "--recipe", "dpo"]) == 0


def test_a_file_with_no_recipe_columns_says_so(tmp_path, capsys):
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "?", "answer": "!"}) + "\n")
    assert align_main(["data", "check", str(odd)]) == 1
    assert "give --recipe" in capsys.readouterr().err


def test_advise_refuses_a_file_with_nothing_the_recipe_trains_on(tiny_llama, capsys):
    """Before: 0 completion tokens counted from a preference file, and a rank and learning rate recommended."""
    code = align_main(["advise", str(PREFS), "--model_name_or_path", str(tiny_llama), "--recipe", "sft"])
    out, err = capsys.readouterr()
    assert code == 2 and "none of its rows has tokens a sft run trains on" in err and "lora_r" not in out
    assert align_main(["advise", str(SFT), "--model_name_or_path", str(tiny_llama), "--recipe", "sft"]) == 0
