"""Data read safely: skipped rows are counted, shown and bounded; hostile lines are bad rows, not crashes;
CSV errors name the row; a JSON array is read in bounded pieces; data errors come before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.core.errors import UserError
from align.data.preference import DataError, load_preferences
from align.data.sft import load_sft
from align.recipes.dpo import DPOConfig, DPOTrainer
from align.recipes.sft import SFTConfig, SFTTrainer
from align.train.config_parser import load_config
from reward.train import RewardConfig, RewardTrainer

REPO = Path(__file__).resolve().parents[1]
PREFS = [json.loads(line) for line in (REPO / "tests" / "data" / "prefs_tiny.jsonl").read_text().splitlines()]
SFT_ROWS = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in PREFS]
RECIPES = {"sft": (SFTConfig, SFTTrainer, "sft_tiny.yaml"), "dpo": (DPOConfig, DPOTrainer, "dpo_tiny.yaml"),
           "reward": (RewardConfig, RewardTrainer, "reward_tiny.yaml")}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def config(recipe: str, model, out: Path, **over):
    cls, _, yaml = RECIPES[recipe]
    sets = [f"model_name_or_path={model}", f"output_dir={out}", "report_to=[none]", "max_steps=1", "save_steps=0",
            "eval_fraction=0", "lora_r=4", "per_device_train_batch_size=2"]
    return load_config(cls, REPO / "configs" / yaml, sets + [f"{k}={v}" for k, v in over.items()])


def train(recipe: str, cfg):
    trainer = RECIPES[recipe][1](cfg)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


# -- skipped rows ----------------------------------------------------------------------------------
def test_skip_stops_when_most_rows_are_bad(tmp_path, tiny_llama):
    bad = [{"prompt": "q", "completion": ""}] * 8
    path = write_jsonl(tmp_path / "mostly_bad.jsonl", [SFT_ROWS[0]] + bad)
    cfg = config("sft", tiny_llama, tmp_path / "run", train_file=path, on_bad_rows="skip")
    with pytest.raises(UserError) as e:
        train("sft", cfg)
    first = str(e.value).splitlines()[0]
    assert "8 of 9 rows are bad" in first and "max_bad_fraction=0.1" in first
    assert f"{path}:2: field 'completion'" in str(e.value)  # the first reasons come with it
    assert not (tmp_path / "run" / "final_metrics.json").exists()


def test_skip_of_one_in_twenty_trains_and_prints_the_count(tmp_path, tiny_llama, capsys):
    rows = PREFS[:19] + [{"prompt": "q", "chosen": "same", "rejected": "same"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = config("dpo", tiny_llama, tmp_path / "run", train_file=path, on_bad_rows="skip")
    trainer, _ = train("dpo", cfg)
    assert len(trainer.pairs) == 19
    out = capsys.readouterr().out
    assert "skipped 1 of 20 rows" in out
    assert f"{path}:20: field 'rejected': identical" in out
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["skipped_rows"] == 1


def test_max_bad_fraction_is_checked(tmp_path):
    from align.train.config import PreferenceDataConfig

    with pytest.raises(ValueError, match="max_bad_fraction"):
        PreferenceDataConfig(train_file="x.jsonl", max_bad_fraction=1.5)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        config("sft", "smollm2", tmp_path / "run", max_bad_fraction=-0.1)


# -- hostile lines ---------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [65, 200_000])
def test_deep_nesting_is_a_bad_row_named_by_its_line(tmp_path, depth):
    deep = "[" * depth + "]" * depth
    for load, rows in ((load_preferences, PREFS), (load_sft, SFT_ROWS)):
        path = write_jsonl(tmp_path / f"deep-{load.__name__}.jsonl", [rows[0], deep, rows[1]])
        with pytest.raises(DataError) as e:
            load(str(path))
        assert [i.where for i in e.value.issues] == [f"{path}:2"]
        assert "nested deeper than 64" in str(e.value)
        kept = load(str(path), on_bad_rows="skip")
        rows, skipped = kept if load is load_sft else (kept.rows, kept.skipped)
        assert (len(rows), len(skipped)) == (2, 1)


def test_deep_nesting_in_a_json_array_is_named(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" + json.dumps(PREFS[0]) + ",\n" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(DataError) as e:
        load_preferences(str(path))
    assert f"{path}:2" in str(e.value) and "nested deeper than 64" in str(e.value)


def test_an_oversized_line_is_a_bad_row_named_by_its_line(tmp_path):
    from align.data.readers import MAX_ROW_BYTES

    path = tmp_path / "big.jsonl"
    huge = json.dumps({**PREFS[1], "chosen": "x" * (MAX_ROW_BYTES + 10)})
    path.write_text(json.dumps(PREFS[0]) + "\n" + huge + "\n" + json.dumps(PREFS[2]) + "\n")
    with pytest.raises(DataError) as e:
        load_preferences(str(path))
    assert [i.where for i in e.value.issues] == [f"{path}:2"]
    assert "longer than" in str(e.value)
    assert [r.prompt for r in load_preferences(str(path), on_bad_rows="skip").rows] == [PREFS[0]["prompt"],
                                                                                        PREFS[2]["prompt"]]


# -- CSV -------------------------------------------------------------------------------------------
def test_a_ragged_csv_names_the_row(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text('prompt,chosen,rejected\n"What is 34+36?",70,68\n"What is 1+1?",2,3,extra\nq,"a, b",c\n')
    with pytest.raises(DataError) as e:
        load_preferences(str(path))
    assert [i.where for i in e.value.issues] == [f"{path}:3"]
    assert "4 fields; expected 3" in str(e.value)
    data = load_preferences(str(path), on_bad_rows="skip")
    assert [(r.chosen, r.rejected) for r in data.rows] == [("70", "68"), ("a, b", "c")]  # cells stay text


# -- JSON arrays in pieces --------------------------------------------------------------------------
def test_a_json_array_read_in_small_pieces_gives_every_row(tmp_path):
    from align.data.readers import read_json

    path = tmp_path / "rows.json"
    path.write_text("\ufeff[\n" + ",\n".join(json.dumps(r, indent=1) for r in PREFS) + "\n]\n", encoding="utf-8")
    got = list(read_json(path, chunk_chars=7))
    assert [r for _, r in got] == PREFS
    assert got[0][0] == f"{path}: row 0"


def test_a_broken_json_array_names_the_line(tmp_path):
    from align.data.readers import read_json

    path = tmp_path / "broken.json"
    path.write_text("[\n" + json.dumps(PREFS[0]) + ",\n" + '{"prompt": "q", "chosen": }' + "\n]")
    issues = [r for _, r in read_json(path, chunk_chars=5) if not isinstance(r, dict)]
    assert len(issues) == 1 and issues[0].where == f"{path}:3"


# -- data errors before the model ------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["sft", "dpo", "reward"])
@pytest.mark.parametrize("source", ["missing_file", "uncached_name"])
def test_a_data_error_comes_before_the_model(recipe, source, tmp_path, hf_cache):
    missing = str(tmp_path / "nowhere" / "train.jsonl") if source == "missing_file" else "someorg/not_cached"
    no_model = tmp_path / "no-such-model"  # loading it would fail loudly, naming model_name_or_path
    cfg = config(recipe, no_model, tmp_path / "run", train_file=missing)
    with pytest.raises(UserError) as e:
        train(recipe, cfg)
    assert str(e.value).startswith(missing) and "model_name_or_path" not in str(e.value)
    assert not (tmp_path / "run").exists()


# -- a key given twice -----------------------------------------------------------------------------
def test_a_key_given_twice_is_a_bad_row_in_jsonl_and_json_arrays(tmp_path):
    """json keeps the last of two equal keys silently: the row would train on a value its author may not mean."""
    from align.data.readers import read_json

    twice = json.dumps(PREFS[1])[:-1] + ', "chosen": "other"}'
    path = write_jsonl(tmp_path / "twice.jsonl", [PREFS[0], twice, PREFS[2]])
    with pytest.raises(DataError) as e:
        load_preferences(str(path))
    assert [i.where for i in e.value.issues] == [f"{path}:2"] and "key 'chosen' appears twice" in str(e.value)
    assert [r.prompt for r in load_preferences(str(path), on_bad_rows="skip").rows] == [PREFS[0]["prompt"],
                                                                                        PREFS[2]["prompt"]]
    nested = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
              "rejected": [{"role": "assistant", "content": "Bye"}]}
    inner = json.dumps(nested).replace('"content": "Hello"}', '"content": "Hello", "role": "user"}')
    array = tmp_path / "twice.json"
    array.write_text("[\n" + json.dumps(PREFS[0]) + ",\n" + inner + ",\n" + json.dumps(PREFS[2]) + "\n]\n")
    got = list(read_json(array, chunk_chars=16))  # pieces smaller than a row: the bad row is read on whole
    assert [r for _, r in got if isinstance(r, dict)] == [PREFS[0], PREFS[2]]
    issues = [r for _, r in got if not isinstance(r, dict)]
    assert len(issues) == 1 and issues[0].where == f"{array}:3" and "key 'role' appears twice" in issues[0].message


def test_data_check_with_a_tokenizer_holds_no_more_than_reading(tmp_path, tiny_llama, hf_cache):
    """`align data check --model_name_or_path` on 10,000 rows: checking lengths costs no memory beyond the rows
    (Python allocations, traced); it held every row's token ids at once before (3.5x the reading's peak)."""
    import tracemalloc

    from align.cli import main
    from align.core.loading import load_tokenizer

    rows = [{**PREFS[i % len(PREFS)], "prompt": f"{PREFS[i % len(PREFS)]['prompt']} #{i}"} for i in range(10_000)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    load_tokenizer(str(tiny_llama))  # its imports are not the check's memory

    def peak(*extra: str) -> int:
        tracemalloc.start()
        try:
            assert main(["data", "check", str(path), "--recipe", "dpo", *extra]) == 0
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    reading = peak()
    assert peak("--model_name_or_path", str(tiny_llama), "--max_length", "96") < 1.5 * reading


def test_a_control_character_in_a_line_is_named_once(tmp_path):
    """A NUL inside a string: json says "Invalid control character at"; the message says "at column" once."""
    line = json.dumps(PREFS[1])[:-2] + '\x00"}'
    path = tmp_path / "nul.jsonl"
    path.write_text(json.dumps(PREFS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        load_preferences(str(path))
    assert [str(i) for i in e.value.issues] == [f"{path}:2: not valid JSON (Invalid control character at column "
                                                f"{len(line) - 2}); expected one JSON object per line"]
