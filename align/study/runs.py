"""One condition of a study, run in this process through a recipe's Python API, reduced to its figures.

A study names each run by a key (e.g. "lora/lr=0.0001/seed=0"); the run's folder is OUT/runs/<key>.
What the comparison needs (final held-out figures, the curve, trainable parameters) is read back from
the run's final_metrics.json and metrics.jsonl; the weights are deleted unless a later measurement
needs them (`keep=True`), so a sweep of full fine-tuning runs does not fill the disk.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from align.train.metrics import read_metrics

HEAVY = ("checkpoints", "model", "adapter", "policy", "tb")  # policy/: a GRPO run's adapter


@dataclass
class Context:
    """What every run of a study shares: the base, where runs go, the seeds and the hidden test limits."""

    model: str
    out: Path
    seeds: list[int]
    num_threads: int = 0
    max_units: int | None = None  # hidden --max_steps: tests cap the steps the calibration chooses
    results: dict[str, dict] = field(default_factory=dict)  # key -> figures of every finished run

    def run_dir(self, key: str) -> Path:
        return self.out / "runs" / key.replace("=", "-")


def common_fields(ctx: Context, key: str, seed: int) -> dict:
    """Settings every study run shares: constant learning rate (the post's schedule), no warm-up,
    checkpoints only at the end, metrics to metrics.jsonl only."""
    return {"model_name_or_path": ctx.model, "output_dir": str(ctx.run_dir(key)), "seed": seed,
            "lr_scheduler_type": "constant", "save_steps": 0, "save_total_limit": 1, "report_to": ["none"],
            "logging_steps": 1, "num_threads": ctx.num_threads, "lora_alpha": 32}


def finish(ctx: Context, key: str, wall_s: float, keep: bool) -> dict:
    """The figures of a finished run (final metrics, curve, wall time); its weights go unless `keep`."""
    folder = ctx.run_dir(key)
    final = json.loads((folder / "final_metrics.json").read_text())
    rows = read_metrics(folder)
    figures = {**final, "wall_s": wall_s, "step_seconds": [r["step_s"] for r in rows if "step_s" in r],
               "curve": [{k: r[k] for k in r if k in ("step", "loss", "eval/loss", "eval/reward")} for r in rows]}
    if not keep:
        drop_weights(ctx, key)
    ctx.results[key] = figures
    return figures


def drop_weights(ctx: Context, key: str) -> None:
    """Delete a run's weights and checkpoints (a full fine-tuning run's are ~1.6 GB on SmolLM2)."""
    for name in HEAVY:
        shutil.rmtree(ctx.run_dir(key) / name, ignore_errors=True)


def sft_run(ctx: Context, key: str, seed: int, train_file: Path, eval_file: Path, steps: int,
            keep: bool = False, **fields) -> dict:
    """Train one SFT condition (`fields`: SFTConfig fields such as learning_rate, use_peft, lora_r) and return
    its figures; eval/loss is the held-out NLL per target token."""
    from align.recipes.sft import SFTConfig, train_sft

    settings = {**common_fields(ctx, key, seed), "train_file": str(train_file), "eval_file": str(eval_file),
                "max_steps": steps, "chat_template": True, "per_device_eval_batch_size": 16, "max_length": 128,
                **fields}
    print(f"[study] {key}: {steps} steps", flush=True)
    t0 = time.perf_counter()
    train_sft(SFTConfig(**settings), overwrite=True)
    return finish(ctx, key, time.perf_counter() - t0, keep)


def grpo_run(ctx: Context, key: str, seed: int, steps: int, eval_steps: int, **fields) -> dict:
    """Train one GRPO condition on the arithmetic task; eval/reward is the held-out greedy score."""
    from align.recipes.ppo import GRPOConfig, train_grpo

    settings = {**common_fields(ctx, key, seed), "max_steps": steps, "eval_steps": eval_steps, "beta": 0.0,
                "use_vllm": False, "train_file": "arithmetic", **fields}
    print(f"[study] {key}: {steps} steps", flush=True)
    t0 = time.perf_counter()
    train_grpo(GRPOConfig(**settings), overwrite=True)
    return finish(ctx, key, time.perf_counter() - t0, keep=False)


def by_seed(ctx: Context, prefix: str, metric: str) -> list[float]:
    """The figure `metric` of every seed of the condition `prefix` (keys prefix/seed=N), in seed order."""
    return [ctx.results[f"{prefix}/seed={s}"][metric] for s in ctx.seeds]
