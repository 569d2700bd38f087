"""KTO equals TRL 1.16's own KTOTrainer on identical inputs.

TRL is run for real: a KTOTrainer on the tiny Llama with a random (non-zero) LoRA adapter prepares the rows
(tokenising, KL completions), its collator builds the batch and its `compute_loss` scores it. Ours is a
KTOTrainer on the same base with the same adapter weights, copied tensor by tensor. Compared: the token ids,
the batch, the loss, the KL reference point, the rewards and log-probs TRL logs, and every LoRA gradient.
"""

from __future__ import annotations

import pytest
import torch

from align.recipes.kto import KTOConfig, KTOTrainer, kto_metrics
from align.train.config_parser import load_config

SEED = 1234
RTOL = 1e-6
STANDARD = [
    {"prompt": "What is 34+36? Reply with the number only.", "completion": "70", "label": True},
    {"prompt": "What is 26+42?", "completion": "26 + 42 = 70, I think", "label": False},
    {"prompt": "Name a colour.", "completion": "Blue.", "label": True},
    {"prompt": "What is 35+29? Be brief.", "completion": "35 + 29 = 66", "label": False},
    {"prompt": "Say hi.", "completion": "Hello there!", "label": False},
    {"prompt": "What is 1+1?", "completion": "2", "label": True},
    {"prompt": "Count to three.", "completion": "1, 2, 3", "label": True},
    {"prompt": "What is 9+9?", "completion": "19", "label": False},
    {"prompt": "Is water wet?", "completion": "Yes.", "label": True},
    {"prompt": "What is 12+30? Reply with the number only.", "completion": "The answer is 43.", "label": False},
    {"prompt": "Spell cat.", "completion": "c-a-t", "label": True},
    {"prompt": "What is 2+2?", "completion": "4", "label": False},
]
STARTS = (0, 4, 8)


def conversational(rows):
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]} for r in rows]


CASES = {  # name -> (rows, TRL's KTOConfig fields)
    "kto": (STANDARD, {}),
    "kto-weighted": (STANDARD, {"desirable_weight": 1.3, "undesirable_weight": 0.7, "beta": 0.5}),
    "kto-conversational": (conversational(STANDARD), {}),
    "apo_zero_unpaired": (STANDARD, {"loss_type": "apo_zero_unpaired", "beta": 0.3}),
    # prompts of 6-16 tokens: most sequences, matched and mismatched, are cut at 18
    "kto-truncated": (STANDARD, {"max_length": 18}),
}


def trl_trainer(model_path, out, rows, fields):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer as TRLKTOTrainer

    torch.manual_seed(SEED)
    fields = {"max_length": 40, **fields}
    args = TRLKTOConfig(output_dir=str(out), per_device_train_batch_size=4, report_to="none", use_cpu=True,
                        bf16=False, save_strategy="no", gradient_checkpointing=False, **fields)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # init_lora_weights=False: B is random too, so the policy differs from the reference and KL, rewards are not 0
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return TRLKTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_path), peft_config=lora)


def our_trainer(model_path, out, rows, fields):
    sets = [f"model_name_or_path={model_path}", f"output_dir={out}", "report_to=[none]", "lora_r=4",
            "lora_alpha=8", "max_length=40", "per_device_train_batch_size=4", "dtype=float32", "save_steps=0"]
    # later --set values win: a case's max_length replaces the 40
    sets += [f"{k}={v}" for k, v in fields.items()]
    trainer = KTOTrainer(load_config(KTOConfig, None, sets), train_dataset=rows)
    trainer.setup()
    return trainer


def copy_lora(trl, ours) -> None:
    """Our adapter takes TRL's (random) LoRA weights, tensor by tensor."""
    theirs = {n.replace(".default.", ".policy."): p for n, p in trl.model.named_parameters() if p.requires_grad}
    mine = ours.base.adapter_parameters("policy")
    assert theirs.keys() == mine.keys()
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(theirs[name])


def grads(params: dict) -> dict:
    return {n: p.grad.detach().clone() for n, p in params.items()}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tiny_llama, tmp_path_factory):
    rows, fields = CASES[request.param]
    print(f"seed {SEED}")
    trl = trl_trainer(tiny_llama, tmp_path_factory.mktemp("trl-kto"), rows, fields)
    ours = our_trainer(tiny_llama, tmp_path_factory.mktemp("kto"), rows, fields)
    copy_lora(trl, ours)
    yield request.param, trl, ours
    ours.close()


def close(a, b, what: str) -> float:
    """Relative to the tensor's scale: |a - b| <= RTOL x max|b| everywhere (float32 sums of many terms leave
    ~1e-7 of the largest term in an element near zero, which an elementwise relative bound would reject)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
    assert err <= RTOL, f"{what}: relative difference {err:.3g} > {RTOL:g}"
    return err


def test_tokens_and_batches_equal_trls(pair):
    name, trl, ours = pair
    prepared = trl.train_dataset
    assert [e.prompt_ids for e in ours.pairs] == prepared["prompt_ids"]
    assert [e.completion_ids for e in ours.pairs] == prepared["completion_ids"]
    assert [e.label for e in ours.pairs] == prepared["label"]
    from align.data.unpaired import collate_unpaired

    for start in STARTS:
        theirs = trl.data_collator([prepared[i] for i in range(start, start + 4)])
        mine = collate_unpaired(ours.pairs[start:start + 4], ours.base.tokenizer.pad_token_id, ours.config.max_length,
                                kl=name != "apo_zero_unpaired")
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
        cut = mine["attention_mask"].sum(1) < torch.tensor([len(e.prompt_ids) + len(e.completion_ids)
                                                            for e in ours.pairs[start:start + 4]])
        assert cut.any() == (name == "kto-truncated")


def test_loss_kl_rewards_and_lora_gradients_equal_trls(pair):
    name, trl, ours = pair
    prepared = trl.train_dataset
    checked_kl = False
    for start in STARTS:
        batch = trl.data_collator([prepared[i] for i in range(start, start + 4)])
        trl.model.train()
        trl._metrics["train"].clear()
        trl.model.zero_grad()
        trl_loss = trl.compute_loss(trl.model, batch)
        trl_loss.backward()
        theirs = {n.replace(".default.", ".policy."): p.grad.detach().clone()
                  for n, p in trl.model.named_parameters() if p.requires_grad}
        metrics = {k: v[-1] for k, v in trl._metrics["train"].items() if v}

        ours.base.model.train()
        params = ours.base.adapter_parameters("policy")
        for p in params.values():
            p.grad = None
        loss, stats = ours.pair_loss(ours.pairs[start:start + 4], None, train=True)
        loss.backward()
        close(loss.item(), trl_loss.item(), f"{name} loss")
        ours_stats = kto_metrics(stats)
        for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert (key in ours_stats) == (key in metrics), key
            if key in metrics:
                close(ours_stats[key], metrics[key], f"{name} {key}")
        print(f"{name} batch {start}: kl {ours_stats['kl']:.4f}")
        checked_kl |= ours_stats["kl"] > 0
        mine = grads(params)
        assert mine.keys() == theirs.keys()
        assert any(g.abs().max() > 0 for g in theirs.values())
        worst = max(close(mine[key], theirs[key], f"{name} grad {key}") for key in mine)
        print(f"{name} batch {start}: largest relative gradient difference {worst:.2g}")
    # With these weights the conversational rows' mismatched pairs are likelier under the reference (KL < 0,
    # clamped to 0); the string rows' KL is positive in two batches, so the point itself is compared there.
    assert checked_kl or name in ("apo_zero_unpaired", "kto-conversational"), "the KL point was 0 in every batch"


def test_pairs_are_unpaired_as_trl_unpairs_them(tiny_llama, tmp_path):
    """Preference pairs become one desirable and one undesirable row each, tokenised as TRL tokenises them."""
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": s["completion"]}
             for r, s in zip(STANDARD[::2], STANDARD[1::2])]
    trl = trl_trainer(tiny_llama, tmp_path / "trl", pairs, {})
    ours = our_trainer(tiny_llama, tmp_path / "ours", pairs, {})
    mine = sorted((e.prompt_ids, e.completion_ids, e.label) for e in ours.pairs)
    prepared = trl.train_dataset
    theirs = sorted(zip(prepared["prompt_ids"], prepared["completion_ids"], prepared["label"]))
    assert mine == theirs and len(mine) == 2 * len(pairs)
    ours.close()
