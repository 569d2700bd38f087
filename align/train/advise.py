"""`align advise DATA`: how much the data asks of a LoRA adapter, and a rank and learning rate for it.

    align advise data.jsonl --model_name_or_path smollm2 --recipe dpo [--lora_r 8] [--json]

It counts the training tokens (SFT: completion tokens; DPO: pairs and chosen/rejected tokens),
counts the adapter's parameters from the model's config alone (no weights are loaded: LoRA on
every linear layer of the decoder blocks, r * (in + out) each), and compares the two with rules
of thumb (docs/design.md, "LoRA facts behind the defaults"):

  capacity      ~2 bits per adapter parameter (a rule of thumb for what a network can store)
  information   SFT: at most ~1 bit per completion token (rule of thumb: an upper bound; text the
                base already predicts carries less). DPO: ~1 bit per pair (one binary choice).
  learning rate LoRA's best is ~10x full fine-tuning's.
  batch         LoRA loses more than full fine-tuning at large effective batches.
"""

from __future__ import annotations

import json
import math

BITS_PER_PARAM = 2.0
BITS_PER_COMPLETION_TOKEN = 1.0
BITS_PER_PAIR = 1.0
# Typical full fine-tuning learning rates; LoRA's best is ~10x these.
FULL_FT_LR = {"sft": 2e-5, "dpo": 5e-6}
LORA_LR_FACTOR = 10
RECIPES = ("sft", "dpo")


# -- the adapter --------------------------------------------------------------------------------
def lora_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, in, out, copies) of every tensor LoRA adapts on all linear layers, from a model config.

    The model is built on the meta device (no memory, no weights) and searched with the same
    `lora_targets` training uses. A fused 3-D expert tensor (E, in, out) counts E copies.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from align.core.lora import lora_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules, parameters = lora_targets(model)
    shapes = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if ".layers." in f".{name}." and leaf in modules and isinstance(module, torch.nn.Linear):
            shapes.append((name, module.in_features, module.out_features, 1))
    for name, p in model.named_parameters():
        if p.dim() == 3 and any(name.endswith(t) for t in parameters):
            experts, d_in, d_out = p.shape
            shapes.append((name, d_in, d_out, experts))
    return shapes


def lora_parameters(shapes: list[tuple[str, int, int, int]], rank: int) -> int:
    """Parameters of LoRA at `rank` on `shapes`: A (r x in) plus B (out x r) per adapted matrix."""
    return sum(copies * rank * (d_in + d_out) for _, d_in, d_out, copies in shapes)


# -- the data ----------------------------------------------------------------------------------
def count_dpo(source, tokenizer, max_length: int, split: str = "train", config: str | None = None) -> dict:
    from align.data.preference import load_preferences, tokenize_preferences

    data = load_preferences(source, split=split, config=config, on_bad_rows="skip")
    pairs = tokenize_preferences(data.rows, tokenizer, max_length, on_bad_rows="skip")
    chosen = sum(len(p.chosen_ids) for p in pairs)
    rejected = sum(len(p.rejected_ids) for p in pairs)
    return {"rows": len(data.rows) + len(data.skipped), "pairs": len(pairs), "prompt_tokens":
            sum(len(p.prompt_ids) for p in pairs), "chosen_tokens": chosen, "rejected_tokens": rejected,
            "training_tokens": chosen + rejected, "information_bits": BITS_PER_PAIR * len(pairs)}


def _completion_texts(record) -> list[str]:
    """What an SFT row trains on, in TRL's SFT formats: messages, prompt/completion, or text."""
    if not isinstance(record, dict):
        return []
    if isinstance(record.get("messages"), list):
        return [m["content"] for m in record["messages"] if isinstance(m, dict) and m.get("role") == "assistant"
                and isinstance(m.get("content"), str)]
    completion = record.get("completion")
    if isinstance(completion, list):
        return [m["content"] for m in completion if isinstance(m, dict) and isinstance(m.get("content"), str)]
    if isinstance(completion, str):
        return [completion]
    return [record["text"]] if isinstance(record.get("text"), str) else []


def count_sft(source, tokenizer, split: str = "train", config: str | None = None) -> dict:
    """Completion tokens of SFT rows (each answer plus its end-of-turn token)."""
    from align.data.sources import read_all

    rows = tokens = used = 0
    for _, record in read_all(source, split, config):
        rows += 1
        texts = _completion_texts(record)
        used += bool(texts)
        tokens += sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    return {"rows": rows, "rows_with_completions": used, "completion_tokens": tokens, "training_tokens": tokens,
            "information_bits": BITS_PER_COMPLETION_TOKEN * tokens}


# -- the advice --------------------------------------------------------------------------------
def recommend_rank(shapes, information_bits: float, recipe: str) -> tuple[int, bool]:
    """(rank, fits): the smallest power-of-two rank from 8 up whose capacity covers the data (at most 512)."""
    rank = 8
    while BITS_PER_PARAM * lora_parameters(shapes, rank) < information_bits and rank < 512:
        rank *= 2
    return rank, BITS_PER_PARAM * lora_parameters(shapes, rank) >= information_bits


def advise(source, model: str = "smollm2", recipe: str = "dpo", lora_r: int = 8, batch_size: int = 8,
           grad_accum: int = 1, max_length: int = 1024, split: str = "train", config: str | None = None,
           measure_rows: int = 0, study_dir: str = "runs") -> dict:
    """Everything `align advise` prints, as one dict (the --json output).

    `measure_rows` > 0 (SFT): the information comes from the base's log-loss on that many rows
    (align/train/advise_evidence.py), not from the 1-bit-per-token rule of thumb."""
    from transformers import AutoConfig

    from align.core.loading import load_tokenizer, resolve_model
    from align.train.advise_evidence import capacity_by_rank, evidence_lines, measured_bits, study_results
    from align.train.config import LARGE_BATCH

    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {RECIPES}, got {recipe!r}")
    path = resolve_model(model)
    shapes = lora_shapes(AutoConfig.from_pretrained(path))
    tokenizer = load_tokenizer(path)
    counts = (count_dpo(source, tokenizer, max_length, split, config) if recipe == "dpo"
              else count_sft(source, tokenizer, split, config))
    if not counts["training_tokens"]:  # advice on nothing would still print a rank and a learning rate
        from align.core.errors import UserError

        raise UserError(f"{source}: none of its rows has tokens a {recipe} run trains on (check the columns "
                        f"with `align data check {source}`); no advice")
    if recipe == "sft" and measure_rows > 0:
        measured = measured_bits(source, path, measure_rows, max_length, split, config)
        if measured.get("measured_tokens"):
            counts = {**counts, **measured, "information_bits_rule": counts["information_bits"],
                      "information_bits": measured["information_bits_measured"]}
    params = lora_parameters(shapes, lora_r)
    capacity = BITS_PER_PARAM * params
    claims = ["capacity", "lr"] + (["batch"] if batch_size * grad_accum > LARGE_BATCH else [])
    rank, fits = recommend_rank(shapes, counts["information_bits"], recipe)
    effective = batch_size * grad_accum
    lr = FULL_FT_LR[recipe] * LORA_LR_FACTOR
    return {"source": str(source) if isinstance(source, str) else type(source).__name__, "model": model,
            "recipe": recipe, **counts, "lora_r": lora_r, "adapted_matrices": sum(c for *_, c in shapes),
            "lora_parameters": params, "capacity_bits": capacity,
            "data_to_capacity": counts["information_bits"] / capacity if capacity else math.inf,
            "effective_batch": effective, "large_batch": effective > LARGE_BATCH, "large_batch_limit": LARGE_BATCH,
            "recommended_lora_r": rank, "recommended_rank_fits": fits, "recommended_learning_rate": lr,
            "reasons": reasons(recipe, counts, lora_r, capacity, rank, fits, effective, LARGE_BATCH, lr),
            "capacity_by_rank": capacity_by_rank(lambda r: lora_parameters(shapes, r), BITS_PER_PARAM),
            "evidence": evidence_lines(claims, study_results(study_dir))}


def reasons(recipe, counts, lora_r, capacity, rank, fits, effective, large, lr) -> list[str]:
    """The advice in plain words, one sentence each."""
    unit = "preference pair (one binary choice)" if recipe == "dpo" else "completion token (an upper bound)"
    info = counts["information_bits"]
    if "bits_per_token" in counts:
        data = (f"the data's log-loss under the base, {counts['bits_per_token']:.3g} bits per trained token over "
                f"{counts['measured_rows']} rows, an upper bound on what the adapter must store")
    else:
        data = f"the data carries about 1 bit per {unit}"
    out = [f"An adapter stores about {BITS_PER_PARAM:g} bits per parameter, and {data}: ~{info:,.0f} bits "
           f"against ~{capacity:,.0f} bits of capacity at rank {lora_r}."]
    if info > capacity:
        out.append(f"At rank {lora_r} the data outgrows the adapter: LoRA keeps learning but more slowly than "
                   f"full fine-tuning would; rank {rank} {'holds it' if fits else 'is the most this advisor suggests'}.")
    elif recipe == "dpo":
        out.append("Preference data needs little capacity: ranks 4-8 are enough, higher ranks buy nothing.")
    else:
        out.append(f"Rank {rank} holds this data; a higher rank would not learn it faster.")
    full = FULL_FT_LR[recipe]
    out.append(f"Learning rate: LoRA's best is about {LORA_LR_FACTOR}x full fine-tuning's ({full:g} is typical "
               f"for full {recipe.upper()}), so {lr:g}; a rate copied from full fine-tuning leaves LoRA barely moving.")
    if effective > large:
        out.append(f"Effective batch {effective} (batch x accumulation) is above {large}: LoRA loses more than full "
                   f"fine-tuning at large batches and a higher rank does not fix it; use fewer examples per step.")
    return out


def render(report: dict) -> str:
    r = report
    what = (f"{r['pairs']} pairs ({r['rows']} rows): prompt {r['prompt_tokens']:,}, chosen {r['chosen_tokens']:,}, "
            f"rejected {r['rejected_tokens']:,} tokens" if r["recipe"] == "dpo" else
            f"{r['rows']} rows, {r['completion_tokens']:,} completion tokens")
    lines = [f"data      {r['source']} ({r['recipe']}): {what}",
             f"adapter   LoRA r={r['lora_r']} on {r['adapted_matrices']} linear matrices of {r['model']}: "
             f"{r['lora_parameters']:,} parameters, ~{r['capacity_bits']:,.0f} bits",
             f"data/capacity  {r['data_to_capacity']:.3g}",
             f"recommend lora_r={r['recommended_lora_r']}  learning_rate={r['recommended_learning_rate']:g}"]
    if r["large_batch"]:
        lines.append(f"warning   effective batch {r['effective_batch']} > {r['large_batch_limit']}")
    if "bits_per_token" in r:
        lines.insert(1, f"measured  {r['bits_per_token']:.3g} bits/token under the base ({r['measured_rows']} rows, "
                        f"{r['measured_tokens']:,} tokens); rule of thumb {r['information_bits_rule']:,.0f} bits")
    ranks = "  ".join(f"r{c['rank']}:{c['capacity_bits']:,.0f}" for c in r["capacity_by_rank"])
    lines.append(f"capacity  bits by rank  {ranks}")
    return "\n".join(lines + ["why:"] + [f"  - {s}" for s in r["reasons"]] + ["rests on:"]
                     + [f"  - {s}" for s in r["evidence"]])


# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("data", help="the training data: a file, a folder (save_to_disk or of data files) or a dataset name")
    # `--model` was this flag's name before it took the recipes' name: kept as a hidden alias.
    p.add_argument("--model_name_or_path", "--model", dest="model", default="smollm2", metavar="MODEL",
                   help="model folder, 'smollm2' or hub id whose config and tokenizer to use")
    p.add_argument("--recipe", default="dpo", choices=RECIPES, help="what the data trains")
    p.add_argument("--lora_r", type=int, default=8, help="the rank to judge")
    p.add_argument("--per_device_train_batch_size", type=int, default=8, help="examples per optimizer micro-step")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--max_length", type=int, default=1024, help="DPO: token budget for prompt + answer")
    p.add_argument("--dataset_config", default=None, help="a dataset name's configuration")
    p.add_argument("--dataset_split", default="train", help="the split, for a dataset name or a DatasetDict")
    p.add_argument("--measure_rows", type=int, default=64,
                   help="SFT: run the base over this many rows to measure the data's log-loss in bits (0: the "
                        "1-bit-per-token rule of thumb, no model loaded)")
    p.add_argument("--study_dir", default="runs", help="where `align study` reports are looked for (DIR/result.json "
                                                     "or DIR/*/result.json, e.g. runs/study-capacity), to cite")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    if args.lora_r < 1:
        from align.core.errors import UserError

        raise UserError(f"--lora_r: expected a positive integer, got {args.lora_r}")
    if args.measure_rows < 0:
        from align.core.errors import UserError

        raise UserError(f"--measure_rows: expected 0 (no measurement) or a positive integer, got {args.measure_rows}")
    report = advise(args.data, args.model, args.recipe, args.lora_r, args.per_device_train_batch_size,
                    args.gradient_accumulation_steps, args.max_length, args.dataset_split, args.dataset_config,
                    args.measure_rows, args.study_dir)
    print(json.dumps(report) if args.json else render(report))
    return 0
