"""Where one training step's time goes: torch.profiler over one step of a matrix bench's worker, ours or TRL's.

    python scripts/bench/profile_step.py sft ours bf16            # SmolLM2, realistic rows, batch 2, max_length 256
    python scripts/bench/profile_step.py dpo trl bf16 --data arithmetic --batch 4 --max-length 128
    python scripts/bench/profile_step.py reward ours fp32 --quick

Runs the worker of scripts/bench/sft.py, dpo.py or reward_vs_trl.py in this process, unchanged, and
records the third optimizer step (the first two warm up: allocator, first-call paths): a global
optimizer-step hook advances the profiler's schedule, so the same code profiles our lifecycle and
TRL's Trainer alike. Prints the top --top ops by self CPU time, and as the last line one JSON object
with them (name, self CPU ms, share of the step, calls).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

from matrix import fit_rows, write_rows
from measure import HERE, bench_environment

SCRIPTS = {"sft": "sft.py", "dpo": "dpo.py", "reward": "reward_vs_trl.py"}
DPO_MODES = {("ours", "fp32"): "shared", ("ours", "bf16"): "shared_bf16",
             ("trl", "fp32"): "trl", ("trl", "bf16"): "trl_bf16_autocast"}


def load_bench(recipe: str):
    """The bench module by its file (this folder is off sys.path once measure is imported)."""
    spec = importlib.util.spec_from_file_location(f"bench_{recipe}", HERE / SCRIPTS[recipe])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_args(a, data: Path, model: str, out: str) -> argparse.Namespace:
    """The namespace the bench's worker reads: two timed steps after a warm-up step (three in all)."""
    common = {"model": model, "data": str(data), "out": out, "steps": 2, "batch": a.batch, "max_length": a.max_length}
    if a.recipe == "dpo":  # dpo.py's contenders are modes; ours keeps its bench's checkpoint_keep_last
        return argparse.Namespace(**common, worker=DPO_MODES[a.side, a.precision], grad_ckpt=True, keep_last=8)
    return argparse.Namespace(**common, worker=a.side, precision=a.precision)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", choices=tuple(SCRIPTS))
    p.add_argument("side", choices=("ours", "trl"))
    p.add_argument("precision", choices=("fp32", "bf16"))
    p.add_argument("--data", choices=("arithmetic", "realistic"), default="realistic")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny model instead of SmolLM2-135M")
    a = p.parse_args()
    bench_environment()
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    bench = load_bench(a.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        if a.quick:
            from align.core.tiny import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny"))
        else:
            from align.core.smollm import ensure_smollm2

            model = str(ensure_smollm2())
        data = write_rows(Path(tmp) / "rows.jsonl", a.data, a.rows, "sft" if a.recipe == "sft" else "pairs",
                          chat=a.recipe == "dpo" and a.data == "arithmetic")  # as each bench writes them
        fit_rows(data, model, a.max_length)
        args = worker_args(a, data, model, str(Path(tmp) / "run"))
        worker = bench.worker_trl if a.side == "trl" else bench.worker_ours
        with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=2, warmup=0, active=1)) as prof:
            hook = register_optimizer_step_post_hook(lambda *_: prof.step())
            try:
                worker(args)
            finally:
                hook.remove()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
            "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:a.top]]
    for row in top:
        print(f"{row['share']:6.1%} {row['self_cpu_ms']:10.1f} ms {row['calls']:6d}  {row['op']}")
    print(json.dumps({"recipe": a.recipe, "side": a.side, "precision": a.precision, "data": a.data,
                      "batch": a.batch, "max_length": a.max_length, "step_self_cpu_ms": round(total / 1e3, 1),
                      "threads": torch.get_num_threads(), "top": top}))


if __name__ == "__main__":
    main()
