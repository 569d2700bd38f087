"""The recipe-vs-TRL matrix the speed benchmarks share: 2 precisions x 2 data shapes, ours and TRL's.

    fp32: ours dtype float32         vs TRL bf16=False
    bf16: ours bf16: true            vs TRL bf16=True (autocast over float32 weights; TRL's default)
    arithmetic: the demo task's rows (a few dozen tokens)
    realistic:  realistic.py's UltraFeedback-shaped rows (hundreds of tokens, ragged in a batch)

A bench gives `run(side, precision, data) -> {"steps_per_s", "peak_mb", ...}` (one child process per
call); `interleave` runs every cell's ours and TRL's one after the other, repeat after repeat, so drift
in the load of a shared machine hits both alike; `figures` turns the runs into the keys
`<recipe>_<precision>_<data>_speed_ratio` and `..._memory_ratio` (ours over TRL's; targets >= 1.3 and
<= 0.8), with each side's steps/s and peak MB beside them.
"""

from __future__ import annotations  # noqa: I001 (realistic is imported before measure, below)

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# realistic before measure: importing measure takes this folder off sys.path.
from realistic import preference_rows
from measure import bench_environment, run_child, write_pairs

PRECISIONS = ("fp32", "bf16")
DATA = ("arithmetic", "realistic")
SIDES = ("ours", "trl")
SPEED_TARGET, MEMORY_TARGET = 1.3, 0.8


def cells(only_data: tuple[str, ...] = DATA, only_precision: tuple[str, ...] = PRECISIONS) -> list[tuple[str, str]]:
    # Realistic rows first: the long cells, where a failure shows soonest.
    return [(p, d) for d in sorted(only_data, key=lambda d: d != "realistic") for p in PRECISIONS
            if p in only_precision]


def write_rows(path: Path, data: str, n: int, shape: str = "pairs", chat: bool = False) -> Path:
    """`n` rows of `data` (arithmetic | realistic) as JSON lines: preference pairs, or with shape "sft"
    TRL's prompt-completion rows (the chosen answer as completion). Realistic rows are plain strings."""
    if data == "arithmetic" and shape == "pairs":
        return write_pairs(path, n, chat=chat)
    if data == "arithmetic":
        from align.tasks.arithmetic import preference_pairs

        pairs = preference_pairs(n, seed=0)
    else:
        pairs = preference_rows(n, seed=0)
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs] if shape == "sft" else pairs
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit_rows(path: Path, model: str, max_length: int, keep: int = 16) -> int:
    """Drop the rows of `path` whose prompt leaves fewer than `keep` of `max_length` tokens to the answer
    under `model`'s tokenizer, so both sides train on every row they read (ours refuses a row with no
    trained token, TRL's keeps it). Returns the rows left."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) <= max_length - keep]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def interleave(jobs: dict, repeats: int, parallel: int = 1) -> dict:
    """Run each job (a no-argument callable returning a dict) `repeats` times, all jobs once per repeat,
    `parallel` at a time in their order (2: a cell's ours and TRL's side by side, under the same load),
    printing each result to stderr as it comes; returns {key: [result, ...]}."""
    runs: dict = {key: [] for key in jobs}

    def one(r: int, key) -> dict:
        result = jobs[key]()
        print(f"repeat {r + 1} {key}: {result}", file=sys.stderr, flush=True)
        return result

    with ThreadPoolExecutor(max_workers=parallel) as pool:  # each job waits on its own child process
        for r in range(repeats):
            for key, result in zip(jobs, pool.map(one, [r] * len(jobs), list(jobs)), strict=True):
                runs[key].append(result)
    return runs


def matrix_jobs(run: Callable[[str, str, str], dict], only_data: tuple[str, ...] = DATA,
                only_precision: tuple[str, ...] = PRECISIONS) -> dict:
    """{(side, precision, data): job} for every cell, ours before TRL's within a cell."""
    return {(side, p, d): (lambda s=side, p=p, d=d: run(s, p, d)) for p, d in cells(only_data, only_precision)
            for side in SIDES}


def figures(recipe: str, runs: dict) -> dict:
    """The matrix's keys from `runs` {(side, precision, data): [result, ...]}: medians over repeats."""
    def med(side, p, d, key):
        return statistics.median(x[key] for x in runs[side, p, d])

    out: dict = {}
    for p, d in sorted({(p, d) for _, p, d in runs}, key=lambda c: (DATA.index(c[1]), PRECISIONS.index(c[0]))):
        name = f"{recipe}_{p}_{d}"
        for side in SIDES:
            out[f"{name}_{side}_steps_per_s"] = round(med(side, p, d, "steps_per_s"), 4)
            out[f"{name}_{side}_peak_mb"] = round(med(side, p, d, "peak_mb"), 1)
        out[f"{name}_speed_ratio"] = round(med("ours", p, d, "steps_per_s") / med("trl", p, d, "steps_per_s"), 3)
        out[f"{name}_memory_ratio"] = round(med("ours", p, d, "peak_mb") / med("trl", p, d, "peak_mb"), 3)
    out[f"{recipe}_targets_met"] = {
        k[:-len("_speed_ratio")]: v >= SPEED_TARGET and out[k[:-len("speed_ratio")] + "memory_ratio"] <= MEMORY_TARGET
        for k, v in out.items() if k.endswith("_speed_ratio")}
    return out


def add_arguments(p: argparse.ArgumentParser, batch: int, max_length: int) -> None:
    """The options of a matrix bench (sft.py, reward_vs_trl.py), and the hidden ones of its workers."""
    p.add_argument("--quick", action="store_true", help="tiny model instead of SmolLM2-135M")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    p.add_argument("--batch", type=int, default=batch, help="per step, arithmetic rows")
    p.add_argument("--max-length", type=int, default=max_length, help="arithmetic rows")
    p.add_argument("--realistic-batch", type=int, default=2, help="per step, realistic rows")
    p.add_argument("--realistic-max-length", type=int, default=256,
                   help="realistic rows (TRL's default is 1024; smaller keeps a step on 2 shared CPU cores short)")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--parallel", type=int, default=1,
                   help="contenders run at a time, in order (2: a cell's ours and TRL's side by side)")
    p.add_argument("--only-data", nargs="+", choices=DATA, default=list(DATA))
    p.add_argument("--only-precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                   help="fp32 alone on a CPU without native bf16 (no AVX-512 BF16 or AMX), where bf16 is emulated")
    for hidden in ("--worker", "--precision", "--model", "--data", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)


def bench_main(recipe: str, script: str, args: argparse.Namespace, shape: str = "pairs") -> dict:
    """Run the matrix of `script`'s workers (--worker ours|trl) and return the bench's JSON object."""
    bench_environment()
    shapes = {"arithmetic": (args.batch, args.max_length), "realistic": (args.realistic_batch,
                                                                          args.realistic_max_length)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from align.core.tiny import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny"))
        else:
            from align.core.smollm import ensure_smollm2

            model = str(ensure_smollm2())
        files = {d: write_rows(Path(tmp) / f"{d}.jsonl", d, args.rows, shape) for d in args.only_data}
        kept = {d: fit_rows(files[d], model, shapes[d][1]) for d in args.only_data}

        def run(side: str, precision: str, data: str) -> dict:
            with tempfile.TemporaryDirectory() as out:
                return run_child(script, "--worker", side, "--precision", precision, "--model", model,
                                 "--data", str(files[data]), "--out", str(Path(out) / "run"), "--steps",
                                 str(args.steps), "--batch", str(shapes[data][0]), "--max-length",
                                 str(shapes[data][1]))

        runs = interleave(matrix_jobs(run, tuple(args.only_data), tuple(args.only_precision)), args.repeats,
                          args.parallel)
    return {"model": "tiny-llama" if args.quick else "SmolLM2-135M-Instruct", "rows": args.rows, "rows_kept": kept,
            "batch": {d: shapes[d][0] for d in args.only_data}, "max_length": {d: shapes[d][1] for d in args.only_data},
            "gradient_checkpointing": True, "repeats": args.repeats, "parallel": args.parallel,
            "timed_steps": args.steps,
            **figures(recipe, runs), "load_avg_1m": round(os.getloadavg()[0], 2)}
