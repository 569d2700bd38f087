"""Datasets the way people have them: every source through `align data check` and into a DPO run.

Sources: .jsonl/.json/.parquet/.csv files, save_to_disk folders, folders of data files (a cloned
dataset repository), a hub id read from a real local `datasets` cache (offline), and in Python a
Dataset or a list of dicts. Also TRL's prompt extraction (HH strings, H4 UltraFeedback) and the
tokenisation cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align.core.loading import load_tokenizer
from align.data.preference import DataError, load_preferences, tokenize_preferences, validate_record
from align.recipes.dpo import DPOConfig, DPOTrainer
from align.train.config_parser import load_config

REPO = Path(__file__).resolve().parents[1]
ROWS = [json.loads(line) for line in (REPO / "tests" / "data" / "prefs_tiny.jsonl").read_text().splitlines()][:8]
HUB_ID = "someorg/tiny_prefs"


def build_hub_cache(cache: Path, rows: list[dict], repo_id: str = HUB_ID) -> Path:
    """Lay `rows` out in `cache` exactly as `load_dataset(repo_id)` online leaves them: an Arrow file under
    org___name/default/VERSION/HASH/, which datasets' offline mode finds by the id."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    org, name = repo_id.split("/")
    raw = cache.parent / f"{name}-raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build = cache.parent / f"{name}-build"
    builder = Json(cache_dir=str(build), dataset_name=name, hash="0123abcd",
                   data_files=DataFilesDict.from_patterns({"train": [str(raw)]}))
    builder.download_and_prepare()
    config_dir = Path(builder.cache_dir).parents[1]  # .../name/default-XXXX
    target = cache / f"{org}___{name}" / "default"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(config_dir), str(target))
    shutil.rmtree(build)
    return cache


def make_source(kind: str, tmp_path: Path, rows: list[dict], hf_cache: Path) -> str:
    import datasets

    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif kind == "save_to_disk":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "save_to_disk_dict":
        path = tmp_path / "saved-dict"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(path))
    elif kind == "hub":
        build_hub_cache(hf_cache, rows)
        return HUB_ID
    elif kind in ("folder_jsonl", "folder_parquet"):
        path = tmp_path / "cloned-repo"
        write_data_folder(path, rows, kind)
    return str(path)


def write_data_folder(path: Path, rows: list[dict], kind: str) -> Path:
    """A folder of data files as a cloned hub dataset repository holds them: split-named files
    (train.jsonl + test.jsonl, or data/train-00000-of-00001.parquet), a README and a .git folder."""
    import datasets

    (path / ".git").mkdir(parents=True)
    (path / ".git" / "config.json").write_text("{}")  # hidden: datasets (and we) leave it out
    (path / "README.md").write_text("# A dataset card\n")
    if kind == "folder_jsonl":
        for split, part in (("train", rows), ("test", rows[:2])):
            (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    else:
        (path / "data").mkdir()
        datasets.Dataset.from_list(rows).to_parquet(str(path / "data" / "train-00000-of-00001.parquet"))
        datasets.Dataset.from_list(rows[:2]).to_parquet(str(path / "data" / "test-00000-of-00001.parquet"))
    return path


def data_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", "data", "check", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)


def dpo_config(model, out, **over) -> DPOConfig:
    sets = [f"model_name_or_path={model}", f"output_dir={out}", "report_to=[none]", "max_steps=1",
            "per_device_train_batch_size=2", "save_steps=0", "eval_fraction=0", "lora_r=4", "train_file=''"]
    return load_config(DPOConfig, REPO / "configs" / "dpo_tiny.yaml", sets + [f"{k}={v}" for k, v in over.items()])


def train_one_step(config, **datasets_kw) -> DPOTrainer:
    trainer = DPOTrainer(config, **datasets_kw)
    try:
        adapter = trainer.train()
    finally:
        trainer.close()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((config_out(config) / "final_metrics.json").read_text())["step"] == 1
    return trainer


def config_out(config) -> Path:
    return Path(config.output_dir)


SOURCES = ["jsonl", "json", "parquet", "csv", "save_to_disk", "save_to_disk_dict", "hub", "folder_jsonl",
           "folder_parquet"]


@pytest.mark.parametrize("kind", SOURCES)
def test_source_checks_and_trains(kind, tmp_path, tiny_llama, hf_cache):
    source = make_source(kind, tmp_path, ROWS, hf_cache)
    done = data_check(source)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{source}: {len(ROWS)} rows, {len(ROWS)} valid, OK" in done.stdout
    where = {"dataset_name": source} if kind == "hub" else {"train_file": source}
    trainer = train_one_step(dpo_config(tiny_llama, tmp_path / "run", **where))
    assert len(trainer.pairs) == len(ROWS)
    assert trainer.pairs[0].where.startswith(f"{source}:")
    # the prompt of the first row really reached the model's input
    tok = trainer.base.tokenizer
    assert ROWS[0]["prompt"] in tok.decode(trainer.pairs[0].prompt_ids)


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "hub", "folder_parquet"])
def test_bad_row_is_named_by_row_index(kind, tmp_path, hf_cache):
    rows = ROWS[:3] + [{"prompt": "q", "chosen": "same", "rejected": "same"}]
    source = make_source(kind, tmp_path, rows, hf_cache)
    done = data_check(source)
    assert done.returncode == 1
    assert f"{source}: row 3: field 'rejected': identical" in done.stdout


@pytest.mark.parametrize("kind", ["folder_jsonl", "folder_parquet"])
def test_a_folder_of_data_files_gives_each_recipe_its_splits(kind, tmp_path, tiny_llama, hf_cache):
    """Preference (DPO), reward and SFT readers all read a cloned dataset folder, by split."""
    from align.data.sft import load_sft
    from reward.pairs import read_margins
    from reward.train import RewardConfig, RewardTrainer

    folder = write_data_folder(tmp_path / "prefs", [{**r, "margin": float(i)} for i, r in enumerate(ROWS)], kind)
    test = load_preferences(str(folder), split="test")
    assert [(r.prompt, r.where) for r in test.rows] == [(r["prompt"], f"{folder}[test]: row {i}")
                                                       for i, r in enumerate(ROWS[:2])]
    assert read_margins(str(folder)) == {f"{folder}: row {i}": float(i) for i in range(len(ROWS))}
    config = load_config(RewardConfig, REPO / "configs" / "reward_tiny.yaml", [
        f"model_name_or_path={tiny_llama}", f"output_dir={tmp_path / 'rm'}", f"train_file={folder}",
        f"eval_file={folder}"])
    trainer = RewardTrainer(config)
    trainer.setup()  # train_file reads the train split, eval_file the test split (TRL's dataset_test_split)
    assert (len(trainer.pairs), len(trainer.eval_pairs)) == (len(ROWS), 2)
    assert trainer.margin_of(trainer.pairs).tolist() == [float(i) for i in range(len(ROWS))]
    trainer.close()

    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS]
    sft_folder = write_data_folder(tmp_path / "sft", sft_rows, kind)
    rows, skipped = load_sft(str(sft_folder))
    assert not skipped and [(r.prompt, r.completion, r.where) for r in rows] == [
        (r["prompt"], r["completion"], f"{sft_folder}: row {i}") for i, r in enumerate(sft_rows)]
    assert len(load_sft(str(sft_folder), split="test")[0]) == 2


def test_a_folder_without_data_files_or_the_split_is_one_line(tmp_path, hf_cache):
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match=r"notes: a folder, but neither written by save_to_disk .* nor holding "
                                        r"data files \(\.jsonl"):
        load_preferences(str(empty))
    folder = write_data_folder(tmp_path / "repo", ROWS, "folder_jsonl")
    with pytest.raises(DataError) as e:
        load_preferences(str(folder), split="validation")
    assert str(e.value) == (f"{folder}: could not load the folder of data files: Unknown split \"validation\". "
                            f"Should be one of ['train', 'test'].")


def test_python_api_takes_a_dataset_or_a_list(tmp_path, tiny_llama):
    import datasets

    config = dpo_config(tiny_llama, tmp_path / "a")
    trainer = train_one_step(config, train_dataset=datasets.Dataset.from_list(ROWS),
                             eval_dataset=datasets.Dataset.from_list(ROWS[:2]))
    assert len(trainer.pairs) == len(ROWS) and len(trainer.eval_pairs) == 2
    assert trainer.pairs[1].where == "train_dataset: row 1"
    trainer = train_one_step(dpo_config(tiny_llama, tmp_path / "b"), train_dataset=ROWS)
    assert len(trainer.pairs) == len(ROWS)
    with pytest.raises(DataError, match=r"train_dataset: row 1: field 'rejected': missing"):
        DPOTrainer(dpo_config(tiny_llama, tmp_path / "c"), train_dataset=[ROWS[0], {"prompt": "q", "chosen": "a"}]
                   ).train()


def test_no_source_is_one_clear_error(tmp_path, tiny_llama):
    from align.core.errors import UserError

    with pytest.raises(UserError, match="train_file: expected"):
        DPOTrainer(dpo_config(tiny_llama, tmp_path / "run"))


def test_uncached_hub_id_offline_is_one_line(hf_cache):
    done = data_check("someorg/not_cached_anywhere")
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("someorg/not_cached_anywhere: dataset not in the local datasets cache")
    assert str(hf_cache) in lines[0] and "offline" in lines[0]
    assert "Traceback" not in done.stderr


def test_missing_local_files_are_not_sent_to_datasets(tmp_path):
    for missing in (str(tmp_path / "nope.jsonl"), "data/train.parquet", "./x"):
        with pytest.raises(DataError, match="file not found"):
            load_preferences(missing)


# -- prompt extraction (TRL's maybe_extract_prompt) -----------------------------------------------
HH_PROMPT = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"


def test_anthropic_hh_strings():
    row, issues = validate_record({"chosen": HH_PROMPT + " Six.", "rejected": HH_PROMPT + " Seven."}, "x:1")
    assert not issues
    assert (row.prompt, row.chosen, row.rejected) == (HH_PROMPT, " Six.", " Seven.")
    # Answers that begin alike: the common prefix runs into them, the prompt still ends at "Assistant:".
    row, _ = validate_record({"chosen": HH_PROMPT + " The answer is 6.", "rejected": HH_PROMPT + " The answer is 7."},
                             "x:2")
    assert (row.prompt, row.chosen, row.rejected) == (HH_PROMPT, " The answer is 6.", " The answer is 7.")
    # Earlier turns that differ are not part of the prompt: it ends at the last shared "Assistant:".
    row, _ = validate_record({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Bye!",
                              "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}, "x:3")
    assert row.prompt == "\n\nHuman: Hi\n\nAssistant:"
    assert row.chosen == " Hello\n\nHuman: Bye\n\nAssistant: Bye!" and row.rejected == " Go away"
    # Plain strings without a prompt and without the marker stay an error naming the field.
    _, issues = validate_record({"chosen": "4", "rejected": "5"}, "x:4")
    assert str(issues[0]).startswith("x:4: field 'prompt': missing")


def test_h4_ultrafeedback_layout():
    user = {"role": "user", "content": "What is 2+2?"}
    record = {"prompt": "What is 2+2?", "prompt_id": "abc", "score_chosen": 8.0, "score_rejected": 3.0,
              "chosen": [user, {"role": "assistant", "content": "4"}],
              "rejected": [user, {"role": "assistant", "content": "5"}],
              "messages": [user, {"role": "assistant", "content": "4"}]}
    row, issues = validate_record(record, "x:1")
    assert not issues
    assert row.prompt == [user]
    assert row.chosen == [{"role": "assistant", "content": "4"}]
    assert row.rejected == [{"role": "assistant", "content": "5"}]


def test_implicit_prompt_conversations():
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Hi"}
    row, _ = validate_record({"chosen": [system, user, {"role": "assistant", "content": "Hello"}],
                              "rejected": [system, user, {"role": "assistant", "content": "Go away"}]}, "x:1")
    assert row.prompt == [system, user] and row.chosen == [{"role": "assistant", "content": "Hello"}]


# -- the tokenisation cache -------------------------------------------------------------------------
def test_tokenisation_is_cached_on_disk(tmp_path, tiny_llama, hf_cache, monkeypatch):
    import align.data.preference

    calls = []
    real = align.data.preference.tokenize_answers

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(align.data.preference, "tokenize_answers", counting)
    tok = load_tokenizer(str(tiny_llama))
    path = tmp_path / "d.jsonl"
    long = {"prompt": "the quick brown fox " * 20, "chosen": "a", "rejected": "b"}
    path.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, long]))
    rows = load_preferences(path).rows
    first = tokenize_preferences(rows, tok, 64, on_bad_rows="skip")
    assert len(calls) == len(rows) and len(first) == len(ROWS)
    files = list((hf_cache / "align_tokenized").glob("*.safetensors"))
    assert len(files) == 1
    again = tokenize_preferences(load_preferences(path).rows, tok, 64, on_bad_rows="skip")
    assert len(calls) == len(rows)  # nothing tokenised the second time
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.where) for p in again] == \
           [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.where) for p in first]
    # a row's problem is still named by file:line when it comes from the cache
    with pytest.raises(DataError, match=rf"{path}:{len(ROWS) + 1}: field 'prompt': \d+ tokens leave no room"):
        tokenize_preferences(rows, tok, 64)
    # anything the tokens depend on makes a new entry
    tokenize_preferences(rows, tok, 96)
    assert len(calls) == 2 * len(rows)
    assert len(list((hf_cache / "align_tokenized").glob("*.safetensors"))) == 2
    # other rows under the same settings are tokenised afresh, not served another set's tokens
    assert len(tokenize_preferences(rows[:3], tok, 96)) == 3
    assert len(calls) == 2 * len(rows) + 3


def test_a_damaged_cache_file_is_tokenised_again(tmp_path, tiny_llama, hf_cache):
    tok = load_tokenizer(str(tiny_llama))
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    first = tokenize_preferences(load_preferences(path).rows, tok, 64)
    (cached,) = (hf_cache / "align_tokenized").glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:50])  # torn, as by a full disk
    again = tokenize_preferences(load_preferences(path).rows, tok, 64)
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in again] == \
           [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in first]
    assert len(cached.read_bytes()) > 50  # and the file was written whole again


def test_local_jsonl_is_tokenised_without_importing_datasets(tmp_path, tiny_llama):
    """`datasets` (and pyarrow, pandas) cost ~120 MB resident: a local file must not pull them in."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = ("import sys; from align.data.preference import load_preferences, tokenize_preferences; "
            "from align.core.loading import load_tokenizer; "
            f"pairs = tokenize_preferences(load_preferences({str(path)!r}).rows, load_tokenizer({str(tiny_llama)!r}), 64); "
            "print(len(pairs), sorted(m for m in ('datasets', 'pyarrow', 'pandas') if m in sys.modules))")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(len(ROWS)), "[]"]
    assert list((tmp_path / "cache" / "align_tokenized").glob("*.safetensors"))  # and it was cached
