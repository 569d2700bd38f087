"""SFT rows -> token ids and loss masks, checked against masks computed by hand.

The tokenizer here is a word-level one with a fixed vocabulary, so every expected id below is
read off the table: one word or special token, one id.
"""

from __future__ import annotations

import json

import pytest
import torch

from align.core.tiny import CHAT_TEMPLATE
from align.data.preference import DataError
from align.data.sft import (
    PackedRow,
    SFTExample,
    SFTRow,
    collate_sft,
    load_sft,
    pack_examples,
    tokenize_row,
    tokenize_sft,
    validate_sft_record,
)

VOCAB = ["<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hi", "there", "ok", "more", "yes",
         "[UNK]"]
PAD, START, END, USER, ASSISTANT, SYSTEM, HI, THERE, OK, MORE, YES = range(11)


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="[UNK]")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def row(record, where="f.jsonl:1"):
    r, issues = validate_sft_record(record, where)
    assert not issues, issues
    return r


def test_text_rows_train_every_token_and_end_with_eos(tok):
    ex = tokenize_row(row({"text": "hi there"}), tok, 16)
    assert ex.input_ids == [HI, THERE, END]
    assert ex.loss_mask == [1, 1, 1]


def test_prompt_completion_trains_the_completion_only_by_default(tok):
    # The row is read as one string, prompt + completion, as TRL reads it: the completion carries its space.
    r = row({"prompt": "hi there", "completion": " ok"})
    plain = tokenize_row(r, tok, 16, chat_template=False)
    glued = tokenize_row(row({"prompt": "hi there", "completion": "ok"}), tok, 16, chat_template=False)
    assert glued.input_ids == [HI, tok.unk_token_id, END] and glued.loss_mask == [0, 1, 1]  # "thereok": one word
    assert plain.input_ids == [HI, THERE, OK, END]
    assert plain.loss_mask == [0, 0, 1, 1]
    assert tokenize_row(r, tok, 16, completion_only_loss=False, chat_template=False).loss_mask == [1, 1, 1, 1]
    # Through the chat template: "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n" + "ok<|im_end|>\n"
    templated = tokenize_row(r, tok, 16)
    assert templated.input_ids == [START, USER, HI, THERE, END, START, ASSISTANT, OK, END]
    assert templated.loss_mask == [0, 0, 0, 0, 0, 0, 0, 1, 1]


def test_conversational_prompt_completion_masks_the_prompt(tok):
    r = row({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yes"}]})
    ex = tokenize_row(r, tok, 16)
    assert ex.input_ids == [START, USER, HI, END, START, ASSISTANT, YES, END]
    assert ex.loss_mask == [0, 0, 0, 0, 0, 0, 1, 1]


def test_messages_train_every_assistant_turn_and_nothing_else(tok):
    r = row({"messages": [{"role": "system", "content": "hi"}, {"role": "user", "content": "hi there"},
                          {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"},
                          {"role": "assistant", "content": "yes"}]})
    ex = tokenize_row(r, tok, 32)
    assert ex.input_ids == [START, SYSTEM, HI, END, START, USER, HI, THERE, END, START, ASSISTANT, OK, END,
                            START, USER, MORE, END, START, ASSISTANT, YES, END]
    assert ex.loss_mask == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1,
                            0, 0, 0, 0, 0, 0, 1, 1]
    assert tokenize_row(r, tok, 32, assistant_only_loss=False).loss_mask == [1] * 21


def test_truncation_keeps_the_start_and_a_row_with_no_target_left_is_named(tok):
    r = row({"prompt": "hi there", "completion": "ok"}, where="data.jsonl:7")
    assert tokenize_row(r, tok, 8).loss_mask == [0, 0, 0, 0, 0, 0, 0, 1]
    with pytest.raises(DataError, match=r"data.jsonl:7: field 'prompt': no trained token within max_length=7"):
        tokenize_sft([r], tok, 7)
    kept, skipped = tokenize_sft([r], tok, 7, on_bad_rows="skip")
    assert kept == [] and len(skipped) == 1


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"text": "fine"},
        {"prompt": "no completion"},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"text": ""},
        {"other": 1},
        {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
    ]) + "\n")
    with pytest.raises(DataError) as e:
        load_sft(str(path))
    text = str(e.value)
    assert "5 bad row(s)" in text
    assert f"{path}:2: field 'completion': missing" in text
    assert f"{path}:3: field 'messages[0].role': expected one of" in text
    assert f"{path}:4: field 'text': expected a non-empty string" in text
    assert f"{path}:5: expected a 'text' field" in text
    assert f"{path}:6: field 'completion': expected the same format as prompt (standard), got conversational" in text
    rows, skipped = load_sft(str(path), on_bad_rows="skip")
    assert [r.text for r in rows] == ["fine"] and len(skipped) == 5


def test_text_field_is_configurable():
    r, issues = validate_sft_record({"content": "hi"}, "x:1", text_field="content")
    assert not issues and r == SFTRow("language_modeling", "x:1", text="hi")


def test_packing_is_best_fit_decreasing_and_masks_every_example_start():
    a = SFTExample([10, 11, 12, 13, 14], [0, 0, 1, 1, 1], "a")
    b = SFTExample([20, 21, 22], [1, 1, 1], "b")
    c = SFTExample([30, 31], [1, 1], "c")
    rows = pack_examples([c, a, b], max_length=6)
    # Decreasing lengths 5, 3, 2: a opens row 0 (1 left), b opens row 1 (3 left), c fits row 1 best.
    assert rows == [PackedRow([10, 11, 12, 13, 14], [0, 0, 1, 1, 1], [0, 1, 2, 3, 4]),
                    PackedRow([20, 21, 22, 30, 31], [0, 1, 1, 0, 1], [0, 1, 2, 0, 1])]
    batch = collate_sft(rows[::-1] + [PackedRow([40], [0], [0])], pad_id=0)
    assert batch["input_ids"].tolist() == [[20, 21, 22, 30, 31], [10, 11, 12, 13, 14], [40, 0, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    # Padding restarts its positions: a segment of its own.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]


def test_unpacked_collate_right_pads():
    batch = collate_sft([SFTExample([5, 6, 7], [0, 1, 1], "a"), SFTExample([8], [1], "b")], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch
    assert batch["input_ids"].dtype == torch.long
