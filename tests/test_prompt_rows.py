"""RL prompt rows from every source DPO reads, every column kept; string and conversational prompts
encoded as TRL 1.16's GRPOTrainer encodes them (its own `_tokenize_prompts`, run on the tiny tokenizer)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from test_data_sources import HUB_ID, build_hub_cache, write_data_folder

from align.core.errors import UserError
from align.core.loading import load_tokenizer
from align.data.issues import DataError
from align.data.prompt_rows import PromptRows, load_prompt_rows
from align.data.prompts import encode_prompt, encode_prompts

# A "row" column of the user's own must come back untouched: our bookkeeping lives in `places`.
TEXT = [{"prompt": f"What is {a}+{b}?", "solution": str(a + b), "row": f"id-{a}"} for a, b in
        ((2, 2), (3, 4), (10, 5))]
CHAT = [{"prompt": [{"role": "system", "content": "Answer with a number."},
                    {"role": "user", "content": f"What is {a}+{b}?"}], "solution": str(a + b), "row": f"id-{a}"}
        for a, b in ((2, 2), (3, 4))]


def write_source(kind: str, tmp_path: Path, rows: list[dict]):
    """`rows` as the source `kind`, and the place of row i in messages."""
    import datasets

    if kind == "jsonl":
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path), lambda i: f"{path}:{i + 1}"
    if kind in ("parquet", "csv"):
        path = tmp_path / f"p.{kind}"
        ds = datasets.Dataset.from_list(rows)
        ds.to_parquet(str(path)) if kind == "parquet" else ds.to_csv(str(path), index=False)
    elif kind == "save_to_disk":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind in ("folder_jsonl", "folder_parquet"):
        path = write_data_folder(tmp_path / "repo", rows, kind)
    elif kind == "dataset":
        return datasets.Dataset.from_list(rows), lambda i: f"dataset: row {i}"
    else:
        return [dict(r) for r in rows], lambda i: f"rows: row {i}"
    return str(path), lambda i: f"{path}: row {i}"


KINDS = ["jsonl", "parquet", "csv", "save_to_disk", "folder_jsonl", "folder_parquet", "dataset", "list"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_keeps_every_column(kind, tmp_path, hf_cache):
    source, place = write_source(kind, tmp_path, TEXT)
    rows = load_prompt_rows(source)
    assert isinstance(rows, PromptRows) and rows == TEXT  # CSV cells stay text: "4" is not read as 4
    assert rows.places == [place(i) for i in range(len(TEXT))]
    assert load_prompt_rows(source, n=2) == TEXT[:2]


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "csv"])  # a CSV cell cannot hold a list
def test_conversational_prompts_from_every_source(kind, tmp_path, hf_cache):
    source, place = write_source(kind, tmp_path, CHAT)
    rows = load_prompt_rows(source)
    assert rows == CHAT and rows.places == [place(i) for i in range(len(CHAT))]


def test_hub_id_with_config_and_split(hf_cache):
    build_hub_cache(hf_cache, TEXT)
    rows = load_prompt_rows(HUB_ID, split="train", config="default")
    assert rows == TEXT and rows.places[2] == f"{HUB_ID}: row 2"
    with pytest.raises(DataError, match=rf"{HUB_ID}: could not load dataset: .*validation"):
        load_prompt_rows(HUB_ID, split="validation")


def test_a_folder_gives_the_split_asked_for(tmp_path, hf_cache):
    folder = write_data_folder(tmp_path / "repo", TEXT, "folder_jsonl")
    rows = load_prompt_rows(str(folder), split="test")
    assert rows == TEXT[:2] and rows.places == [f"{folder}[test]: row 0", f"{folder}[test]: row 1"]


def test_arithmetic_is_the_demo_task_and_load_rows_delegates(tmp_path):
    from align.recipes.ppo.batch import load_rows
    from align.tasks.arithmetic import make_prompts

    train = load_prompt_rows("arithmetic", n=5, seed=3)
    assert train == make_prompts(5, 3) and train.places == [f"arithmetic: row {i}" for i in range(5)]
    held_out = load_rows("arithmetic", 5, 4, exclude={r["prompt"] for r in train})
    assert held_out == make_prompts(5, 4, exclude={r["prompt"] for r in train})
    source, place = write_source("jsonl", tmp_path, TEXT)
    rows = load_rows(source, 1, 0)  # n counts arithmetic draws only: a file is read whole, as before
    assert rows == TEXT and rows.places == [place(i) for i in range(3)]
    assert load_prompt_rows(source, exclude={TEXT[0]["prompt"]}, n=1) == [TEXT[1]]


def test_bad_rows_are_all_named_before_any_model(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "fine", "answer": "1"},
        {"question": "no prompt"},
        {"prompt": "   "},
        {"prompt": [{"role": "user"}]},
        {"prompt": [{"content": "who?"}]},
        {"prompt": ["What is 1+1?"]},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"prompt": []},
        {"prompt": 7},
        ["not", "an", "object"],
    ]) + "\n{broken\n")
    with pytest.raises(DataError) as e:
        load_prompt_rows(str(path))
    lines = str(e.value).splitlines()
    assert lines[0] == "10 bad row(s):"
    assert [line.strip() for line in lines[1:]] == [
        f"{path}:2: field 'prompt': missing; expected a string or a list of messages (got fields ['question'])",
        f"{path}:3: field 'prompt': empty; expected a non-empty string or a list of messages",
        f"{path}:4: field 'prompt': message 0 (user): \"content\" is missing; expected a string",
        f"{path}:5: field 'prompt': message 0 has no \"role\" string (got None); expected e.g. \"user\"",
        f"{path}:6: field 'prompt': message 0 is a str; expected {{\"role\": ..., \"content\": ...}}",
        f"{path}:7: field 'prompt': the last message is a 'assistant' turn; expected a user (or tool) turn, "
        f"the one the model answers",
        f"{path}:8: field 'prompt': an empty list; expected at least one {{\"role\", \"content\"}} message",
        f"{path}:9: field 'prompt': a int; expected a non-empty string or a list of {{\"role\", \"content\"}} "
        f"messages",
        f"{path}:10: a list; expected an object with a \"prompt\"",
        f"{path}:11: not valid JSON (Expecting property name enclosed in double quotes at column 2); expected "
        f"one JSON object per line",
    ]
    with pytest.raises(DataError, match=r"^rows: row 1: field 'prompt': missing"):
        load_prompt_rows([{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"p\.parquet: row 1: field 'prompt': empty"):
        load_prompt_rows(write_source("parquet", tmp_path, [{"prompt": "a"}, {"prompt": ""}])[0])


def test_nothing_to_read_is_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=rf"{empty}: no rows; expected at least one prompt row"):
        load_prompt_rows(str(empty))
    with pytest.raises(DataError, match="file not found"):
        load_prompt_rows(str(tmp_path / "missing.parquet"))
    with pytest.raises(DataError, match="n is required"):
        load_prompt_rows("arithmetic")


# -- encoding ------------------------------------------------------------------------------------
def trl_prompt_ids(tok, prompts: list) -> list[list[int]]:
    """TRL 1.16 GRPOTrainer's own prompt tokenisation, run with the attributes it reads (text model,
    no tools, no environments, no chat template override)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = types.SimpleNamespace(processing_class=tok, _is_vlm=False, environment_factories=None, tools=None,
                                    chat_template=None, chat_template_kwargs={})
    return [list(ids) for ids in GRPOTrainer._tokenize_prompts(trainer, prompts)[0]]


def test_conversational_prompts_render_with_the_generation_prompt(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    prompts = [r["prompt"] for r in CHAT] + [[{"role": "user", "content": "Hi"}]]
    ids = encode_prompts(tok, [{"prompt": p} for p in prompts])
    assert ids == [list(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]) for p in prompts]
    assert ids == trl_prompt_ids(tok, prompts)
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    # system_prompt is put first unless the conversation has a system turn of its own.
    user_only = prompts[2]
    assert encode_prompt(tok, user_only, "Be brief.") == encode_prompt(
        tok, [{"role": "system", "content": "Be brief."}, *user_only])
    assert encode_prompt(tok, prompts[0], "Be brief.") == ids[0]


def test_text_prompts_as_trl_treats_them(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    tok.add_bos_token = True  # so "the tokenizer's own special tokens" is something to get right
    texts = [r["prompt"] for r in TEXT]
    plain = encode_prompts(tok, [{"prompt": t} for t in texts], chat_template_for_text=False)
    assert plain == trl_prompt_ids(tok, texts)
    assert plain[0][0] == tok.bos_token_id and plain[0][1:] == tok(texts[0], add_special_tokens=False)["input_ids"]
    # The default wraps a string as a user turn (the arithmetic demo relies on it).
    assert encode_prompt(tok, texts[0]) == encode_prompt(tok, [{"role": "user", "content": texts[0]}])
    with pytest.raises(UserError, match=r"system_prompt: text prompts are used as plain text"):
        encode_prompt(tok, texts[0], "Be brief.", chat_template_for_text=False)


def test_encoding_errors_name_the_place(tiny_llama, tmp_path):
    tok = load_tokenizer(str(tiny_llama))
    source, place = write_source("jsonl", tmp_path, TEXT + [{"prompt": [{"role": "user", "content": "x " * 80}]}])
    rows = load_prompt_rows(source)
    with pytest.raises(UserError, match=rf"^prompts {place(3)}: \d+ tokens .*max_prompt_length=64: 'x x"):
        encode_prompts(tok, rows, max_tokens=64)
    tok.chat_template = None
    with pytest.raises(UserError, match=rf"^prompts {place(3)}: a conversational prompt needs a chat template"):
        encode_prompts(tok, rows)
    # A plain list carries no places: they can be given explicitly.
    with pytest.raises(UserError, match=r"^prompts explicit\.jsonl:9: "):
        encode_prompts(tok, list(rows), places=["a", "b", "c", "explicit.jsonl:9"])
