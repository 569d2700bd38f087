"""The capacity study: how many bits of random key -> digits pairs adapters of growing size absorb.

The set's information is exact (align/study/data.py: keys x digits x log2 10 bits). Bits absorbed by a
trained model, per row: max(0, the row's bits - the model's NLL of its value in bits), summed over rows.
NLL is over every completion token, the end-of-sequence one included, with the full vocabulary, so the
figure is a lower bound: a model that knew nothing scores 0, one that learnt everything all the bits.
"""

from __future__ import annotations

import math

import torch

from align.study import plots
from align.study.data import capacity_bits, capacity_rows, write_jsonl
from align.study.plan import Plan, Run
from align.study.runner import Outcome, Study, seed_table
from align.study.runs import Context, drop_weights, sft_run
from align.study.verdict import capacity as capacity_rule

KEYS, DIGITS = 256, 6
BATCH = 16
LRS = {"lora": 1e-3, "full": 1e-4}  # memorising wants a high rate; full fine-tuning's ~10x lower


def ladder(model: str) -> dict[str, dict]:
    """Adapters from a few thousand parameters (q_proj at rank 1 on one middle layer) to ~10^6 (rank 4 on every
    linear layer of SmolLM2), then full fine-tuning, the ceiling."""
    from transformers import AutoConfig

    from align.core.loading import resolve_model

    middle = [AutoConfig.from_pretrained(resolve_model(model)).num_hidden_layers // 2]
    return {"q_proj-r1-1layer": {"lora_r": 1, "lora_target_modules": ["q_proj"], "lora_layers_to_transform": middle},
            "attention-r1-1layer": {"lora_r": 1, "lora_target_modules": "attention",
                                      "lora_layers_to_transform": middle},
            "all-r1-1layer": {"lora_r": 1, "lora_target_modules": "all-linear", "lora_layers_to_transform": middle},
            "all-r1": {"lora_r": 1, "lora_target_modules": "all-linear"},
            "all-r4": {"lora_r": 4, "lora_target_modules": "all-linear"},
            "full": {"use_peft": False}}


def mode(fields: dict) -> str:
    return "full" if fields.get("use_peft") is False else "lora"


@torch.no_grad()
def absorbed_bits(model_dir: str, adapter: str | None, data_file, bits_per_row: float) -> float:
    """Sum over rows of max(0, bits_per_row - NLL of the row's completion in bits), under the trained model."""
    from align.core.base import SharedBase
    from align.core.loading import resolve_model
    from align.data.sft import collate_sft, load_sft, tokenize_sft
    from align.recipes.sft import sft_forward

    base = SharedBase.load(resolve_model(model_dir), device="cpu")
    if adapter:
        base.load_adapter("policy", adapter)
    base.model.eval()
    rows, _ = load_sft(str(data_file))
    examples, _ = tokenize_sft(rows, base.tokenizer, 128, chat_template=False)
    total = 0.0
    for start in range(0, len(examples), 32):
        chunk = examples[start:start + 32]
        nll, _ = sft_forward(base, collate_sft(chunk, base.tokenizer.pad_token_id))
        counts = [sum(ex.loss_mask[1:]) for ex in chunk]  # targets are taken row by row
        for row_nll in torch.split(nll, counts):
            total += max(0.0, bits_per_row - row_nll.sum().item() / math.log(2))
    return total


def train_and_measure(ctx: Context, key: str, seed: int, data_file, steps: int, fields: dict) -> dict:
    figures = sft_run(ctx, key, seed, data_file, data_file, steps, keep=True, chat_template=False,
                      learning_rate=LRS[mode(fields)], per_device_train_batch_size=BATCH, **fields)
    folder = ctx.run_dir(key)
    full = mode(fields) == "full"
    figures["absorbed_bits"] = absorbed_bits(str(folder / "model") if full else ctx.model,
                                             None if full else str(folder / "adapter"), data_file, DIGITS * math.log2(10))
    drop_weights(ctx, key)
    return figures


def data_file(ctx: Context):
    return write_jsonl(capacity_rows(KEYS, DIGITS, seed=4321), ctx.out / "data" / "capacity.jsonl")


def probe(fields: dict):
    def run(ctx: Context, key: str, steps: int) -> dict:
        return train_and_measure(ctx, key, ctx.seeds[0], data_file(ctx), steps, fields)
    return run


def planned(ctx: Context) -> list[Run]:
    return [Run(f"{name}/seed={s}", mode(fields)) for name, fields in ladder(ctx.model).items() for s in ctx.seeds]


def execute(ctx: Context, plan: Plan) -> Outcome:
    rows = data_file(ctx)
    bits = capacity_bits(KEYS, DIGITS)
    points = {}
    for name, fields in ladder(ctx.model).items():
        runs = [train_and_measure(ctx, f"{name}/seed={s}", s, rows, plan.units, fields) for s in ctx.seeds]
        points[name] = (runs[0]["trainable_params"], [r["absorbed_bits"] for r in runs])
    adapters = {n: p for n, p in points.items() if n != "full"}
    verdict = capacity_rule(bits, adapters)
    table = seed_table("bits absorbed", {f"{n} ({p:,} params)": b for n, (p, b) in points.items()}, ctx.seeds, ".1f")
    epochs = plan.units * BATCH / KEYS
    return Outcome(verdict, [f"model `{ctx.model}`; seeds {ctx.seeds}; {KEYS} random 6-letter keys -> {DIGITS} random "
                             f"digits: {bits:.1f} bits exactly; {plan.units} steps of batch {BATCH} ({epochs:.1f} "
                             f"epochs); lr LoRA {LRS['lora']:g}, full {LRS['full']:g}; constant schedule, alpha 32.",
                             "Bits absorbed per row = max(0, row bits - NLL of its completion in bits), full "
                             "vocabulary, end token included: a lower bound."],
                   [table], [plots.capacity(ctx.out / "capacity.png", bits, points, verdict)],
                   notes=["Full fine-tuning is the ceiling and is plotted, not fitted.",
                          "An adapter counts as saturated when it fell short of the data's bits by more than the "
                          "noise; a short run falls short from too few epochs as well, which the rule cannot tell "
                          "from a full adapter: read the epochs above."])


CAPACITY = Study("capacity", "An adapter stores about 2 bits per parameter.",
                 {"lora": probe({"lora_r": 1, "lora_target_modules": "all-linear"}), "full": probe({"use_peft": False})},
                 planned, execute)
