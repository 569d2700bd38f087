"""The same preference file through align and through TRL 1.16's own DPOTrainer: same tokens, same first loss.

TRL is run for real on the tiny Llama: its DPOTrainer tokenises the file (`_prepare_dataset`), collates
(`DataCollatorForPreference`) and computes the loss (`compute_loss`) with a PEFT LoRA adapter whose
weights are the same random, non-zero ones align's run starts from (reference: the adapter off, in
both). The standard file has a prompt ending in a space (its last token merges with the answer's
first) and an answer cut by max_length; the conversational one has a system turn and two turns.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from align.core.base import SharedBase
from align.recipes.dpo import DPOConfig, DPOTrainer
from align.train.config_parser import load_config

MAX_LENGTH = 40
STANDARD = [
    {"prompt": "What is 2+2? ", "chosen": "4", "rejected": "22"},  # ends in a space: " 4" is one token
    {"prompt": "What is 34+36? Reply with the number only.", "chosen": "70", "rejected": "34 + 36 = 68"},
    {"prompt": "the quick brown fox", "chosen": " jumps over the lazy dog", "rejected": " is good"},
    {"prompt": "What is 5+9? Reply with the number only.", "chosen": " 14",
     "rejected": "the quick brown fox jumps over the lazy dog " * 4},  # cut by max_length
]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


CONVERSATIONAL = [
    {"prompt": [{"role": "system", "content": "Reply with the number only."}, *user("What is 2+2?")],
     "chosen": assistant("4"), "rejected": assistant("22")},
    {"prompt": user("hello") + assistant("hello world") + user("What is 7+8? "),
     "chosen": assistant("15"), "rejected": assistant("the answer is 78")},
    {"prompt": user("What is 3+3?"), "chosen": assistant("6"), "rejected": assistant("yes")},
]


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    """{"plain": the tiny model, "bos": the same with a tokenizer that adds BOS to text}, and a random adapter."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    bos = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(tiny_llama, bos)
    tok = AutoTokenizer.from_pretrained(bos)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.save_pretrained(bos)
    assert AutoTokenizer.from_pretrained(bos)("hi")["input_ids"][0] == tok.bos_token_id

    base = SharedBase.load(str(tiny_llama))
    base.add_adapter("policy")
    g = torch.Generator().manual_seed(7)
    print("adapter seed 7")
    with torch.no_grad():
        for p in base.adapter_parameters("policy").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = base.save_adapter("policy", tmp_path_factory.mktemp("adapter") / "adapter")
    return {"plain": Path(tiny_llama), "bos": bos}, adapter


def ours(model: Path, adapter: Path, data: Path, out: Path, n: int) -> DPOTrainer:
    sets = [f"model_name_or_path={model}", f"train_file={data}", f"output_dir={out}", f"max_length={MAX_LENGTH}",
            f"init_adapter={adapter}", "reference=base", "eval_fraction=0", f"per_device_train_batch_size={n}",
            "gradient_accumulation_steps=1", "beta=0.1", "loss_type=sigmoid", "report_to=[none]"]
    trainer = DPOTrainer(load_config(DPOConfig, None, sets))
    trainer.setup()
    return trainer


def trl_trainer(model: Path, adapter: Path, rows: list[dict], out: Path):
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    args = TRLDPOConfig(output_dir=str(out), per_device_train_batch_size=len(rows), max_length=MAX_LENGTH,
                        beta=0.1, loss_type=["sigmoid"], report_to="none", use_cpu=True, bf16=False,
                        save_strategy="no")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    trainer = TRLDPOTrainer(model=lm, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=AutoTokenizer.from_pretrained(model),
                            peft_config=LoraConfig.from_pretrained(str(adapter)))
    # A new adapter (reference: adapters off, as ours), given the saved random weights ours starts from.
    result = set_peft_model_state_dict(trainer.model, load_file(str(adapter / "adapter_model.safetensors")))
    assert not [k for k in result.unexpected_keys if "lora" in k]
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("kind", ["standard", "standard_bos", "conversational"])
def test_same_file_same_tokens_and_first_loss_as_trl(models, tmp_path, kind):
    paths, adapter = models
    model = paths["bos" if kind == "standard_bos" else "plain"]
    rows = CONVERSATIONAL if kind == "conversational" else STANDARD
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn that the prompt ending in a space is cut
        mine = ours(model, adapter, data, tmp_path / "ours", len(rows))
        trl = trl_trainer(model, adapter, rows, tmp_path / "trl")
    theirs = trl.train_dataset
    assert len(mine.pairs) == len(theirs) == len(rows)
    for pair, row in zip(mine.pairs, theirs, strict=True):
        # TRL keeps whole answers and cuts prompt + answer in the collator; ours cuts the answer: compare whole rows.
        assert pair.prompt_ids == row["prompt_ids"]
        room = MAX_LENGTH - len(row["prompt_ids"])
        assert (pair.chosen_ids, pair.rejected_ids) == (row["chosen_ids"][:room], row["rejected_ids"][:room])
    if kind != "conversational":
        tok = mine.base.tokenizer
        assert not any(t in tok.decode(mine.pairs[0].prompt_ids) for t in ("<|im_start|>user", "assistant"))
        # The prompt ending in a space: its space is the answer's first token (" 4"), as TRL splits it.
        assert len(mine.pairs[0].prompt_ids) < len(tok(STANDARD[0]["prompt"])["input_ids"])
        assert tok.decode(mine.pairs[0].chosen_ids) == " 4" + tok.eos_token
        assert len(mine.pairs[3].rejected_ids) < len(theirs[3]["rejected_ids"])  # max_length did cut it
        assert (mine.pairs[0].prompt_ids[0] == tok.bos_token_id) == (kind == "standard_bos")
    batch = trl.data_collator([theirs[i] for i in range(len(theirs))])
    from align.data.preference import collate_pairs

    collated = collate_pairs(mine.pairs, mine.base.tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(collated[key], batch[key]), key

    trl_loss = trl.compute_loss(trl.model, batch).item()
    our_loss = mine.training_step()["loss"]
    print(f"{kind}: align {our_loss:.8f} TRL {trl_loss:.8f}")
    assert abs(trl_loss - 0.6931471805599453) > 1e-4  # the adapter moved the policy off its reference
    assert our_loss == pytest.approx(trl_loss, rel=1e-6)


def test_tokenize_prompt_completions_by_hand(tiny_llama):
    from trl.data_utils import common_prefix_length as trl_common_prefix_length

    from align.core.loading import load_tokenizer
    from align.data.issues import DataError
    from align.data.trl_tokenize import common_prefix_length, tokenize_prompt_completions

    for a, b, n in [([1, 2, 3], [1, 2, 4], 2), ([1, 2], [1, 2, 3], 2), ([], [1], 0), ([5], [6], 0)]:
        assert common_prefix_length(a, b) == trl_common_prefix_length(a, b) == n
    tok = load_tokenizer(str(tiny_llama))
    eos = tok.eos_token
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompt_ids, (four, twenty_two) = tokenize_prompt_completions("What is 2+2? ", ["4", "22" + eos], tok)
    assert any("not a prefix" in str(w.message) for w in caught)  # the space went to the answers
    assert prompt_ids + four == tok("What is 2+2? 4" + eos)["input_ids"]
    assert prompt_ids + twenty_two == tok("What is 2+2? 22" + eos)["input_ids"]  # EOS not doubled
    assert tok.decode(prompt_ids) == "What is 2+2?"
    # chat_template=True: the string row is its conversational twin.
    twin = tokenize_prompt_completions(user("What is 2+2?"), [assistant("4")], tok)
    assert tokenize_prompt_completions("What is 2+2?", ["4"], tok, chat_template=True) == twin
    tok.chat_template = None
    assert tokenize_prompt_completions("What is 2+2?", ["4"], tok, chat_template=True)[0] == prompt_ids  # plain
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        tokenize_prompt_completions(user("hi"), [assistant("4")], tok, where="f.jsonl:3")
