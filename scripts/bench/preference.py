"""KTO, ORPO and SimPO speed and memory: align's trainers vs TRL's KTOTrainer, ORPOTrainer, CPOTrainer + PEFT.

    python scripts/bench/preference.py                            # SmolLM2-135M (offline), minutes on 2 cores
    python scripts/bench/preference.py --model runs/tiny-model --steps 3 --repeats 1    # a smoke run

Every contender runs in its own process (peak RSS is per process), on the same rows (the arithmetic
task's pairs, conversational, so both sides apply the chat template; KTO reads them unpaired, TRL's
way: each pair gives a desirable chosen and an undesirable rejected row), the same batch (--batch pairs,
KTO 2 x --batch rows), max_length, LoRA (rank 8, alpha 32, every linear layer, no dropout), learning
rate and precision (float32: TRL with bf16=False), gradient checkpointing off on both sides unless
--grad-ckpt. Steps/s is 1 / the median step time after a warm-up step: ours from its metrics.jsonl
`step_s`, TRL's from step-end times (so TRL's also holds its between-step work). Ratios are ours over
TRL's. KTO is `align.recipes.kto` where this checkout has it; without it, KTO is skipped and said so.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from measure import bench_environment, peak_rss_mb, run_child, steady_median, step_rates, write_pairs

ALGOS = ("kto", "orpo", "simpo")
LR = 5e-5
SIMPO = {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 0.5}


def unpaired(pairs: Path, out: Path) -> Path:
    """TRL's unpaired (KTO) rows of a pair file: chosen -> label true, rejected -> label false."""
    rows = []
    for line in pairs.read_text().splitlines():
        r = json.loads(line)
        rows += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                 {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def batch_rows(args) -> int:
    return 2 * args.batch if args.algo == "kto" else args.batch


def worker_ours(args) -> dict:
    common = {"model_name_or_path": args.model, "train_file": args.data, "output_dir": args.out,
              "report_to": ["none"], "per_device_train_batch_size": batch_rows(args), "max_length": args.max_length,
              "max_steps": args.steps + 1, "save_steps": 0, "learning_rate": LR, "eval_fraction": 0.0,
              "lora_r": 8, "lora_alpha": 32, "logging_steps": 1, "gradient_checkpointing": args.grad_ckpt,
              "dtype": "float32", "seed": 0}
    if args.algo == "kto":
        from align.recipes.kto import KTOConfig, train_kto

        train_kto(KTOConfig(**common, beta=0.1))
    elif args.algo == "orpo":
        from align.recipes.orpo import ORPOConfig, train_orpo

        train_orpo(ORPOConfig(**common, beta=0.1))
    else:
        from align.recipes.cpo import CPOConfig, train_cpo

        train_cpo(CPOConfig(**common, **SIMPO))
    rows = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["step_s"] for r in rows if "step_s" in r]
    return {"steps_per_s": 1 / steady_median(seconds), "peak_mb": peak_rss_mb(), "steps": len(seconds)}


def trl_config(args, use_cpu: bool):
    import trl
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    common = {"output_dir": args.out, "per_device_train_batch_size": batch_rows(args), "max_length": args.max_length,
              "max_steps": args.steps + 1, "learning_rate": LR, "logging_steps": 1, "save_strategy": "no",
              "report_to": "none", "use_cpu": use_cpu, "gradient_checkpointing": args.grad_ckpt, "bf16": False,
              "dataloader_num_workers": 0, "seed": 0}
    if args.algo == "kto":
        return trl.KTOConfig(**common, beta=0.1), trl.KTOTrainer
    if args.algo == "orpo":
        from trl.experimental.orpo import ORPOTrainer

        return ORPOConfig(**common, beta=0.1), ORPOTrainer
    from trl.experimental.cpo import CPOTrainer

    return CPOConfig(**common, **SIMPO), CPOTrainer


def worker_trl(args) -> dict:
    import time

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_dataset("json", data_files=str(args.data), split="train")
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    config, trainer_cls = trl_config(args, use_cpu=not torch.cuda.is_available())
    lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = trainer_cls(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora,
                          callbacks=[Clock()])
    trainer.train()
    return {**step_rates(times), "peak_mb": peak_rss_mb(), "steps": len(times)}


def kto_available() -> bool:
    try:
        from align.recipes.kto import KTOConfig, train_kto  # noqa: F401
    except ImportError as e:
        print(f"KTO skipped: align.recipes.kto is not in this checkout ({e})", file=sys.stderr)
        return False
    return True


def run_worker(side: str, algo: str, args, data: Path, model: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        flags = ["--worker", side, "--algo", algo, "--model", model, "--data", str(data), "--out", str(Path(out) / "run"),
                 "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length)]
        return run_child(__file__, *flags, *(["--grad-ckpt"] if args.grad_ckpt else []))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a local model folder (e.g. the tiny model); default SmolLM2-135M")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (after one warm-up step)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step (KTO: twice as many unpaired rows)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rows", type=int, default=256, help="preference pairs written for the run")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on both sides")
    p.add_argument("--only", nargs="+", choices=ALGOS, default=list(ALGOS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--algo", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.worker:
        print(json.dumps(worker_ours(args) if args.worker == "ours" else worker_trl(args)))
        return
    bench_environment()
    algos = [a for a in args.only if a != "kto" or kto_available()]
    if args.model is None:
        from align.core.smollm import ensure_smollm2

        args.model = str(ensure_smollm2())
    runs: dict[tuple[str, str], list[dict]] = {(a, s): [] for a in algos for s in ("ours", "trl")}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_pairs(Path(tmp) / "pairs.jsonl", args.rows)
        data = {"kto": unpaired(pairs, Path(tmp) / "unpaired.jsonl"), "orpo": pairs, "simpo": pairs}
        for r in range(args.repeats):  # interleaved, so drift in machine load hits every contender alike
            for algo, side in runs:
                runs[algo, side].append(run_worker(side, algo, args, data[algo], args.model))
                print(f"repeat {r + 1} {algo} {side}: {runs[algo, side][-1]}", file=sys.stderr, flush=True)

    def med(algo, side, key):
        return statistics.median(x[key] for x in runs[algo, side])

    out = {"model": Path(args.model).name, "rows": args.rows, "batch_pairs": args.batch, "max_length": args.max_length,
           "gradient_checkpointing": args.grad_ckpt, "precision": "float32", "repeats": args.repeats,
           "timed_steps": args.steps, "kto_ran": "kto" in algos}
    for algo in ALGOS:
        ran = algo in algos
        for side in ("ours", "trl"):
            out[f"{algo}_{side}_steps_per_s"] = round(med(algo, side, "steps_per_s"), 4) if ran else None
            out[f"{algo}_{side}_peak_mb"] = round(med(algo, side, "peak_mb"), 1) if ran else None
        out[f"{algo}_speed_ratio"] = round(med(algo, "ours", "steps_per_s") / med(algo, "trl", "steps_per_s"),
                                           3) if ran else None
        out[f"{algo}_memory_ratio"] = round(med(algo, "ours", "peak_mb") / med(algo, "trl", "peak_mb"),
                                            3) if ran else None
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
