"""Pad fraction of the batches SFT, DPO and reward training forward, padded and padding-free.

    python scripts/bench/padding.py                 # pad fractions only: the tokenizer, no model forward
    python scripts/bench/padding.py --speed         # + DPO steps/s on SmolLM2-135M, padded vs padding_free
    python scripts/bench/padding.py --forward       # + seconds per scoring forward, padded vs padding_free
    python scripts/bench/padding.py --quick --speed --forward   # the timed parts on the tiny model (smoke run)

Rows: scripts/bench/realistic.py's (UltraFeedback-shaped lengths), tokenised by SmolLM2-135M-Instruct's
tokenizer as each recipe tokenises them; micro-batches drawn as the recipes draw them (step_batches,
seed 0) for one epoch. The pad fraction is pad tokens / all tokens in the (B, T) tensors a recipe
forwards: a DPO or reward micro-batch is its pairs' 2B chosen and rejected sequences padded to the
longest; an SFT micro-batch its examples padded to the longest, or, with `packing`, its best-fit-decreasing
rows of max_length padded to the longest (what align did before padding_free). Padding-free forwards
hold no padding at all. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from measure import HERE, ROOT, bench_environment, step_rates

sys.path.append(str(HERE))  # realistic.py sits here; last on the path, so nothing here shadows the toolkit
from realistic import preference_rows, sft_rows  # noqa: E402


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def epoch_batches(n: int, batch: int) -> list[list[int]]:
    from align.data.preference import step_batches

    steps = -(-n // batch)
    return [idx for s in range(steps) for idx in step_batches(n, batch, 1, 0, s)]


def fraction(batches: list[list[int]], padding_free: bool = False) -> dict:
    from align.core.packing import pad_fraction

    pads, total = pad_fraction(batches, padding_free)
    return {"pad_fraction": round(pads / total, 4), "tokens_forwarded": total}


def preference_fractions(tok, data: Path, batch: int, max_length: int) -> dict:
    """DPO and reward forward the same collated pairs (align.data.preference.collate_pairs)."""
    from align.data.preference import load_preferences, tokenize_preferences

    pairs = tokenize_preferences(load_preferences(str(data)).rows, tok, max_length)
    lengths = [[len(pairs[i].prompt_ids) + len(getattr(pairs[i], side)) for side in ("chosen_ids", "rejected_ids")
                for i in idx] for idx in epoch_batches(len(pairs), batch)]
    return {"padded": fraction(lengths), "padding_free": fraction(lengths, True)}


def sft_fractions(tok, data: Path, batch: int, max_length: int) -> dict:
    from align.data.sft import load_sft, pack_examples, tokenize_sft

    examples, _ = tokenize_sft(load_sft(str(data))[0], tok, max_length, on_bad_rows="skip")
    lengths = [[len(examples[i].input_ids) for i in idx] for idx in epoch_batches(len(examples), batch)]
    rows = pack_examples(examples, max_length)
    packed = [[len(rows[i].input_ids) for i in idx] for idx in epoch_batches(len(rows), batch)]
    return {"padded": fraction(lengths), "packing_padded_rows": fraction(packed),
            "padding_free": fraction(lengths, True), "packing_padding_free": fraction(packed, True),
            "examples": len(examples), "packed_rows": len(rows)}


def dpo_speed(model: Path, data: Path, args, padding_free: bool) -> dict:
    """Steps/s of align's DPO step on `model`, after one warm-up step; both modes draw the same batches."""
    from align.recipes.dpo import DPOConfig, DPOTrainer
    from align.train.config_parser import load_config

    with tempfile.TemporaryDirectory() as out:
        sets = [f"model_name_or_path={model}", f"train_file={data}", f"output_dir={out}", "report_to=[none]",
                f"per_device_train_batch_size={args.speed_batch}", f"max_length={args.speed_max_length}",
                "save_steps=0", "eval_fraction=0.0", "learning_rate=5.0e-5", "on_bad_rows=skip",
                f"padding_free={str(padding_free).lower()}"]
        trainer = DPOTrainer(load_config(DPOConfig, ROOT / "configs" / "dpo_tiny.yaml", sets), overwrite=True)
        trainer.setup()
        marks = []  # step ends; the first step (warm-up) only starts the clock
        for _ in range(args.steps + 1):
            trainer.training_step()
            trainer.step += 1
            marks.append(time.perf_counter())
        trainer.close()
    return step_rates(marks)


def forward_speed(model: Path, data: Path, args) -> dict:
    """Seconds per no-grad scoring forward (align's completion log-probs) of the same micro-batches, padded and
    padding-free, interleaved so that a noisy neighbour slows both alike; medians over the batches."""
    import statistics

    import torch

    from align.core.base import SharedBase
    from align.data.preference import collate_pairs, load_preferences, tokenize_preferences
    from align.recipes.dpo_scoring import score_pairs

    base = SharedBase.load(str(model))
    pairs = tokenize_preferences(load_preferences(str(data), on_bad_rows="skip", max_bad_fraction=1.0).rows,
                                 base.tokenizer, args.speed_max_length, on_bad_rows="skip")
    times: dict[str, list[float]] = {"padded": [], "padding_free": []}
    with torch.no_grad():
        for idx in epoch_batches(len(pairs), args.speed_batch)[:args.steps]:
            batch = collate_pairs([pairs[i] for i in idx], base.tokenizer.pad_token_id)
            for mode in times:
                t0 = time.perf_counter()
                score_pairs(base, batch, padding_free=mode == "padding_free")
                times[mode].append(time.perf_counter() - t0)
    return {mode: {"s_per_forward": round(statistics.median(t), 3)} for mode, t in times.items()}


def speed_model(quick: bool, tmp: str) -> Path:
    from align.core.smollm import ensure_smollm2
    from align.core.tiny import build_tiny_model

    return build_tiny_model(Path(tmp) / "tiny") if quick else ensure_smollm2()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="pairs (DPO, reward) or examples/rows (SFT) per micro-batch")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--speed", action="store_true", help="also time DPO steps on SmolLM2-135M, padded vs padding-free")
    p.add_argument("--forward", action="store_true", help="also time no-grad scoring forwards on SmolLM2-135M, "
                                                          "padded vs padding-free (interleaved)")
    p.add_argument("--quick", action="store_true", help="time the tiny model instead of SmolLM2 (a smoke run)")
    p.add_argument("--steps", type=int, default=3, help="timed DPO steps (after a warm-up step) or forwards per mode")
    p.add_argument("--speed-batch", type=int, default=2)
    p.add_argument("--speed-max-length", type=int, default=512)
    args = p.parse_args()
    bench_environment()
    from transformers import AutoTokenizer

    from align.core.smollm import ensure_smollm2

    tok = AutoTokenizer.from_pretrained(str(ensure_smollm2()))
    with tempfile.TemporaryDirectory() as tmp:
        prefs = write_rows(Path(tmp) / "prefs.jsonl", preference_rows(args.rows, seed=0))
        sft = write_rows(Path(tmp) / "sft.jsonl", sft_rows(args.rows, seed=0))
        pref = preference_fractions(tok, prefs, args.batch, args.max_length)
        result = {"rows": args.rows, "batch": args.batch, "max_length": args.max_length, "tokenizer": "SmolLM2-135M-Instruct",
                  "sft": sft_fractions(tok, sft, args.batch, args.max_length), "dpo": pref, "reward": pref}
        print(json.dumps(result, indent=1), flush=True)
        timed = speed_model(args.quick, tmp) if args.speed or args.forward else None
        setting = {"model": timed.name if timed else None, "batch": args.speed_batch,
                   "max_length": args.speed_max_length, "steps": args.steps, "cpu": "shared with other jobs"}
        if args.forward:
            fwd = forward_speed(timed, prefs, args)
            fwd["speedup"] = round(fwd["padded"]["s_per_forward"] / fwd["padding_free"]["s_per_forward"], 3)
            result["dpo_scoring_forward"] = {**setting, **fwd}
            print(json.dumps(result["dpo_scoring_forward"]), flush=True)
        if args.speed:
            speed = {mode: dpo_speed(timed, prefs, args, mode == "padding_free") for mode in ("padded", "padding_free")}
            speed["speedup"] = round(speed["padding_free"]["steps_per_s"] / speed["padded"]["steps_per_s"], 3)
            result["dpo_speed"] = {**setting, **speed}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
