"""Preference data validation: each bad case gets its own clear error, through the loader and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from align.cli import main as align_main
from align.core.loading import load_tokenizer
from align.data.preference import DataError, collate_pairs, load_preferences, tokenize_preferences

GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
CONV = {
    "prompt": [{"role": "user", "content": "What is 2+2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "22"}],
}


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r).encode() for r in rows] + list(raw_lines)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# (row or raw bytes, field named in the error, words of the expected-message)
BAD_CASES = {
    "missing_field": ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
    "wrong_type": ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "got int"),
    "empty_string": ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen", "non-empty string"),
    "chosen_equals_rejected": ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    "mixed_types": ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
                    "rejected", "same type as chosen"),
    "bad_role": ({"prompt": [{"role": "robot", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0].role", "expected one of"),
    "invalid_utf8": (b'{"prompt": "q", "chosen": "\xff\xfe", "rejected": "b"}', None, "invalid UTF-8"),
    "not_json": (b'{"prompt": "q", "chosen": ', None, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_row_named_with_file_line_and_field(tmp_path, case, capsys):
    row, field, words = BAD_CASES[case]
    raw = [row] if isinstance(row, bytes) else []
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD] + ([] if raw else [row]), raw)
    with pytest.raises(DataError) as err:
        load_preferences(path)
    issues = err.value.issues
    assert len(issues) == 1
    msg = str(issues[0])
    assert msg.startswith(f"{path}:3:"), msg  # third line of the file
    assert words in msg
    if field:
        assert f"field '{field}'" in msg
    # skip mode keeps the good rows and counts the bad one
    data = load_preferences(path, on_bad_rows="skip")
    assert len(data.rows) == 2 and len(data.skipped) == 1
    # `align data check` lists the same row and exits non-zero
    assert align_main(["data", "check", str(path)]) == 1
    assert f"{path}:3:" in capsys.readouterr().out


def test_every_bad_row_is_listed(tmp_path):
    rows = [GOOD, {"prompt": "q", "chosen": "x", "rejected": "x"}, GOOD, {"prompt": "", "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError) as err:
        load_preferences(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [i.where.rsplit(":", 1)[1] for i in err.value.issues] == ["2", "4"]


def test_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n\n")
    with pytest.raises(DataError, match="empty file"):
        load_preferences(path)
    assert align_main(["data", "check", str(path)]) == 1


def test_bom_crlf_and_trailing_blank_lines_are_fine(tmp_path, capsys):
    body = b"\r\n".join(json.dumps(r).encode() for r in [GOOD, CONV, GOOD])
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body + b"\r\n\r\n\n")
    data = load_preferences(path)
    assert len(data.rows) == 3 and not data.skipped
    assert data.rows[0].prompt == "What is 2+2?"  # the BOM is not part of the first key
    assert align_main(["data", "check", str(path)]) == 0


def test_json_and_parquet_and_implicit_prompt(tmp_path):
    implicit = {"chosen": CONV["prompt"] + CONV["chosen"], "rejected": CONV["prompt"] + CONV["rejected"]}
    (tmp_path / "d.json").write_text(json.dumps([GOOD, implicit]))
    data = load_preferences(tmp_path / "d.json")
    assert data.rows[1].prompt == CONV["prompt"] and data.rows[1].chosen == CONV["chosen"]
    import datasets

    datasets.Dataset.from_list([GOOD, {**GOOD, "rejected": "4"}]).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"row 1: field 'rejected': identical"):
        load_preferences(tmp_path / "d.parquet")


def test_prompt_without_room_under_max_length(tmp_path, tiny_llama, capsys):
    tok = load_tokenizer(str(tiny_llama))
    long_prompt = {"prompt": "the quick brown fox " * 40, "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long_prompt])
    rows = load_preferences(path).rows
    with pytest.raises(DataError, match=rf"{path}:2: field 'prompt': \d+ tokens leave no room"):
        tokenize_preferences(rows, tok, max_length=64)
    assert align_main(["data", "check", str(path), "--model_name_or_path", str(tiny_llama), "--max_length", "64"]) == 1
    assert f"{path}:2: field 'prompt'" in capsys.readouterr().out


def test_data_check_tokenises_as_the_recipes_do(tmp_path, tiny_llama, capsys):
    """Plain text by default (as TRL); --chat_template as `chat_template: true`: its turn markers make the prompt
    longer, so a max_length the plain prompt fits is too short for the templated one."""
    tok = load_tokenizer(str(tiny_llama))
    plain = len(tok(GOOD["prompt"])["input_ids"])
    templated = len(tok.apply_chat_template([{"role": "user", "content": GOOD["prompt"]}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"])
    assert templated > plain + 1
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    check = ["data", "check", str(path), "--model_name_or_path", str(tiny_llama), "--max_length", str(plain + 1)]
    assert align_main(check) == 0
    assert align_main(check + ["--chat_template"]) == 1
    assert f"{path}:1: field 'prompt'" in capsys.readouterr().out


def test_chat_template_and_collation(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    from align.data.preference import PreferenceRow

    rows = [PreferenceRow(GOOD["prompt"], "4", "5", "x:1"), PreferenceRow(CONV["prompt"], CONV["chosen"],
                                                                           CONV["rejected"], "x:2")]
    # By default a string row is plain text (as TRL tokenises it): no turn markers, the answer ends with EOS.
    plain = tokenize_preferences(rows, tok, max_length=64)
    assert "<|im_start|>" not in tok.decode(plain[0].prompt_ids + plain[0].chosen_ids)
    assert tok.decode(plain[0].prompt_ids + plain[0].chosen_ids) == GOOD["prompt"] + "4" + tok.eos_token
    assert plain[1].prompt_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # messages: always templated
    pairs = tokenize_preferences(rows, tok, max_length=64, chat_template=True)
    # chat_template=True: a string row is rendered through the chat template exactly like its conversational twin.
    assert pairs[0].prompt_ids == pairs[1].prompt_ids
    assert tok.decode(pairs[0].prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(pairs[0].chosen_ids).startswith("4<|im_end|>")
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    # completion tokens are exactly the answer tokens of each row
    assert int(batch["completion_mask"][0].sum()) == len(pairs[0].chosen_ids)
    assert int(batch["completion_mask"][3].sum()) == len(pairs[1].rejected_ids)


def test_step_batches_cover_each_epoch_once():
    from align.data.preference import step_batches

    # 5 items, 2 pairs x 1 micro-batch per step -> 3 steps per epoch: sizes 2, 2, 1
    epoch0 = [step_batches(5, 2, 1, seed=7, step=s) for s in range(3)]
    assert [[len(m) for m in b] for b in epoch0] == [[2], [2], [1]]
    order0 = [i for b in epoch0 for m in b for i in m]
    assert sorted(order0) == [0, 1, 2, 3, 4]
    # Step 3 starts epoch 1: every item once more, in another order (the documented seed + epoch permutation).
    epoch1 = [step_batches(5, 2, 1, seed=7, step=s) for s in range(3, 6)]
    order1 = [i for b in epoch1 for m in b for i in m]
    assert sorted(order1) == [0, 1, 2, 3, 4]
    assert order1 != order0
    assert order1 == torch.randperm(5, generator=torch.Generator().manual_seed(7 + 1)).tolist()
    # grad_accum splits a step into micro-batches
    assert [len(m) for m in step_batches(8, 2, 2, seed=0, step=0)] == [2, 2]
