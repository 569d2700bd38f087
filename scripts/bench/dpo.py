"""DPO memory and speed: our shared-base trainer vs a reference copy vs plain TRL.

    python scripts/bench/dpo.py            # SmolLM2-135M (offline), ~10 minutes on 2 cores
    python scripts/bench/dpo.py --quick    # tiny model, seconds

Every figure is the median of --repeats runs, each run in its own process (peak RSS
is per process). A run's steps/s is 1 / its median step time, so a noisy neighbour that
stalls a few steps moves it little; the plain mean is kept as steps_per_s_mean. Same model,
data, batch (4 pairs), max_length (128), gradient checkpointing and precision (float32) for every
contender; ours keeps the last --keep-last layers' activations (checkpoint_keep_last, reported in
the JSON), TRL checkpoints every layer. TRL's DPOConfig defaults to bf16 mixed precision
(autocast), which on a CPU with AVX512_BF16 runs its matmuls ~4x faster and on one without is
emulated: so TRL runs with bf16=False for the figures with targets, and once more with its
default (trl_bf16_autocast), which is compared with ours at `bf16: true` (base weights stored in
bfloat16, adapters and Adam state float32): the bf16_* figures. The same four contenders run on
realistic rows too (scripts/bench/realistic.py, --realistic-batch, --realistic-max-length; rows whose prompt leaves no room
for an answer are dropped on both sides): keys dpo_<fp32|bf16>_<arithmetic|realistic>_speed_ratio and
_memory_ratio (scripts/bench/matrix.py). precompute_speed_ratio is paired: the precompute worker's
trainer alternates steps with and without its cached reference in one process (the cross-process
figure is kept as precompute_speed_ratio_across_processes). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from matrix import DATA, figures, fit_rows, interleave, matrix_jobs, write_rows
from measure import ROOT, bench_environment, peak_rss_mb, run_child, step_rates, write_pairs

# The matrix's (side, precision) -> this bench's mode names (scripts/bench/matrix.py).
MATRIX_MODES = {("ours", "fp32"): "shared", ("ours", "bf16"): "shared_bf16",
                ("trl", "fp32"): "trl", ("trl", "bf16"): "trl_bf16_autocast"}


def worker_ours(args) -> dict:
    from align.recipes.dpo import DPOConfig, DPOTrainer
    from align.train.config_parser import load_config

    sets = [f"model_name_or_path={args.model}", f"train_file={args.data}", f"output_dir={args.out}",
            "report_to=[none]", f"per_device_train_batch_size={args.batch}", f"per_device_eval_batch_size={args.batch}",
            f"max_length={args.max_length}", "save_steps=0",
            f"gradient_checkpointing={str(args.grad_ckpt).lower()}", "learning_rate=5.0e-5", "eval_fraction=0.0",
            f"checkpoint_keep_last={args.keep_last if args.grad_ckpt else 0}",
            f"precompute_ref_log_probs={str(args.worker == 'precompute').lower()}",
            f"ref_model_copy={str(args.worker == 'ref_copy').lower()}"]
    if args.worker == "shared_bf16":
        sets.append("bf16=true")  # base weights in bfloat16, adapters and optimizer state float32
    if args.worker == "shared_lean_heap":
        sets.append("heap_mmap_threshold_mb=1.0")  # align/core/heap.py: lower peak memory, slower steps
    trainer = DPOTrainer(load_config(DPOConfig, ROOT / "configs" / "dpo_tiny.yaml", sets), overwrite=True)
    trainer.setup()
    t0 = time.perf_counter()
    if args.worker == "precompute":
        trainer.precompute_reference()
    precompute_s = time.perf_counter() - t0

    def one_step():  # the recipe's own step, as Trainer.train drives it
        trainer.training_step()
        trainer.step += 1

    one_step()  # warm-up
    marks = [time.perf_counter()]
    for _ in range(args.steps):
        one_step()
        marks.append(time.perf_counter())
    paired = paired_shared_steps(trainer, one_step, args.steps) if args.worker == "precompute" else {}
    return {**step_rates(marks), "peak_mb": peak_rss_mb(), "precompute_s": precompute_s,
            "base_mb": trainer.base.base_bytes() / 2**20, **paired}


def paired_shared_steps(trainer, one_step, steps: int) -> dict:
    """The precompute speed-up measured inside one process: steps alternate between the cached reference
    and the live one (ref_cache off), so both see the same heap, threads and machine load. Across
    processes the plain step's rate moved 0.27-0.35 steps/s between repeats on idle cores, more than
    the effect measured."""
    cache, cached, live = trainer.ref_cache, [], []
    for _ in range(steps):
        for durations, ref_cache in ((live, None), (cached, cache)):
            trainer.ref_cache = ref_cache
            t0 = time.perf_counter()
            one_step()
            durations.append(time.perf_counter() - t0)
    trainer.ref_cache = cache
    return {"paired_speed_ratio": statistics.median(live) / statistics.median(cached)}


def worker_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_dataset("json", data_files=str(args.data), split="train")
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    config = DPOConfig(output_dir=str(args.out), per_device_train_batch_size=args.batch, max_length=args.max_length,
                       max_steps=args.steps + 1, learning_rate=5e-5, beta=0.1, logging_steps=1, save_strategy="no",
                       report_to="none", use_cpu=True, gradient_checkpointing=args.grad_ckpt,
                       dataloader_num_workers=0, seed=0, bf16=args.worker == "trl_bf16_autocast")
    lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[Clock()])
    trainer.train()
    return {**step_rates(times), "peak_mb": peak_rss_mb()}


def run_worker(mode: str, args, data: Path, model: str, max_length: int | None = None, batch: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        flags = ["--worker", mode, "--model", model, "--data", str(data), "--out", out, "--steps", str(args.steps),
                 "--batch", str(batch or args.batch), "--max-length", str(max_length or args.max_length),
                 "--keep-last", str(args.keep_last)]
        return run_child(__file__, *flags, *([] if args.grad_ckpt else ["--no-grad-ckpt"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model instead of SmolLM2-135M")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (after one warm-up step)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--realistic-batch", type=int, default=2, help="pairs per step on realistic rows")
    p.add_argument("--realistic-max-length", type=int, default=256,
                   help="realistic rows (scripts/bench/realistic.py; TRL's default is 1024, smaller keeps a CPU step "
                        "short); arithmetic rows use --batch and --max-length")
    p.add_argument("--only-data", nargs="+", choices=DATA, default=list(DATA),
                   help="the matrix's data cells to run, as in sft.py (arithmetic alone gives every figure with a target)")
    p.add_argument("--parallel", type=int, default=1, help="contenders run at a time (scripts/bench/matrix.py)")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false",
                   help="disable gradient checkpointing (on by default, as in TRL)")
    p.add_argument("--lean-heap", action="store_true",
                   help="also time our run with heap_mmap_threshold_mb=1 (less memory, slower steps)")
    p.add_argument("--keep-last", type=int, default=8,
                   help="ours: the last N decoder layers keep their activations (checkpoint_keep_last); TRL "
                        "checkpoints every layer")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = worker_trl(args) if args.worker.startswith("trl") else worker_ours(args)
        print(json.dumps(result))
        return

    args.steps = args.steps or 10
    if "arithmetic" not in args.only_data:
        p.error(f"--only-data: the earlier figures are the arithmetic cells; include arithmetic, got {args.only_data}")
    bench_environment()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from align.core.tiny import build_tiny_model

            model, name = str(build_tiny_model(Path(tmp) / "tiny")), "tiny-llama"
        else:
            from align.core.smollm import ensure_smollm2

            model, name = str(ensure_smollm2()), "SmolLM2-135M-Instruct"
        data = Path(tmp) / "pairs.jsonl"
        write_pairs(data, args.rows)
        realistic = write_rows(Path(tmp) / "realistic.jsonl", "realistic", args.rows)
        kept = fit_rows(realistic, model, args.realistic_max_length)
        files = {"arithmetic": (data, args.max_length, args.batch),
                 "realistic": (realistic, args.realistic_max_length, args.realistic_batch)}
        extra = ["ref_copy", "precompute"] + (["shared_lean_heap"] if args.lean_heap else [])
        jobs = {m: (lambda m=m: run_worker(m, args, data, model)) for m in extra}
        jobs.update(matrix_jobs(lambda side, p, d: run_worker(MATRIX_MODES[side, p], args, files[d][0], model,
                                                              *files[d][1:]),
                                only_data=tuple(args.only_data)))
        runs = interleave(jobs, args.repeats, args.parallel)  # contenders interleaved so drift in machine load hits all alike
        matrix = figures("dpo", {k: v for k, v in runs.items() if isinstance(k, tuple)})
        for (side, p), mode in MATRIX_MODES.items():  # the earlier keys: the arithmetic cells under their names
            runs[mode] = runs.get((side, p, "arithmetic"), [])

    def med(mode, key):
        return statistics.median(x[key] for x in runs[mode])

    base_mb = med("shared", "base_mb")
    out = {
        "model": name, "rows": args.rows, "batch_pairs": args.batch, "max_length": args.max_length,
        "gradient_checkpointing": args.grad_ckpt, "checkpoint_keep_last": args.keep_last if args.grad_ckpt else 0,
        "repeats": args.repeats, "timed_steps": args.steps,
        "base_mb": round(base_mb, 1),
        "peak_mb_shared": round(med("shared", "peak_mb"), 1),
        "peak_mb_ref_copy": round(med("ref_copy", "peak_mb"), 1),
        "saved_base_copies": round((med("ref_copy", "peak_mb") - med("shared", "peak_mb")) / base_mb, 3),
        "trl_peak_mb": round(med("trl", "peak_mb"), 1),
        "trl_steps_per_s": round(med("trl", "steps_per_s"), 4),
        "memory_vs_trl": round(med("shared", "peak_mb") / med("trl", "peak_mb"), 3),
        "steps_per_s": round(med("shared", "steps_per_s"), 4),
        "speed_ratio": round(med("shared", "steps_per_s") / med("trl", "steps_per_s"), 3),
        "precompute_steps_per_s": round(med("precompute", "steps_per_s"), 4),
        # the same trainer stepping with and without its cache, alternately, in one process (paired_shared_steps)
        "precompute_speed_ratio": round(med("precompute", "paired_speed_ratio"), 3),
        "precompute_speed_ratio_per_repeat": [round(x["paired_speed_ratio"], 3) for x in runs["precompute"]],
        "precompute_speed_ratio_across_processes": round(med("precompute", "steps_per_s") / med("shared", "steps_per_s"), 3),
        "precompute_s": round(med("precompute", "precompute_s"), 2),
        "steps_per_s_mean": {m: round(med(m, "steps_per_s_mean"), 4) for m in runs if isinstance(m, str)},
        "trl_precision": "float32 (bf16=False)",
        "trl_bf16_autocast_steps_per_s": round(med("trl_bf16_autocast", "steps_per_s"), 4),
        "trl_bf16_autocast_peak_mb": round(med("trl_bf16_autocast", "peak_mb"), 1),
        "speed_ratio_vs_trl_bf16_autocast": round(med("shared", "steps_per_s") / med("trl_bf16_autocast", "steps_per_s"), 3),
        "memory_vs_trl_bf16_autocast": round(med("shared", "peak_mb") / med("trl_bf16_autocast", "peak_mb"), 3),
        "bf16_steps_per_s": round(med("shared_bf16", "steps_per_s"), 4),
        "bf16_peak_mb": round(med("shared_bf16", "peak_mb"), 1),
        "bf16_speed_ratio_vs_trl_bf16_autocast": round(
            med("shared_bf16", "steps_per_s") / med("trl_bf16_autocast", "steps_per_s"), 3),
        "bf16_memory_vs_trl_bf16_autocast": round(med("shared_bf16", "peak_mb") / med("trl_bf16_autocast", "peak_mb"), 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "realistic_batch_pairs": args.realistic_batch, "realistic_max_length": args.realistic_max_length,
        "realistic_rows_kept": kept, **matrix,
    }
    if args.lean_heap:  # the same run with heap_mmap_threshold_mb=1 (align/core/heap.py): memory saved, speed lost
        out.update({
            "peak_mb_shared_lean_heap": round(med("shared_lean_heap", "peak_mb"), 1),
            "steps_per_s_lean_heap": round(med("shared_lean_heap", "steps_per_s"), 4),
            "memory_vs_trl_lean_heap": round(med("shared_lean_heap", "peak_mb") / med("trl", "peak_mb"), 3),
            "speed_ratio_lean_heap": round(med("shared_lean_heap", "steps_per_s") / med("trl", "steps_per_s"), 3),
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
