"""Data parallelism on one machine: 1 process x 2 threads vs 2 processes x 1 thread, same global batch.

    python scripts/bench/scale.py                 # DPO on SmolLM2-135M (offline), a few minutes on 2 cores
    python scripts/bench/scale.py --model PATH    # any local model folder

Both runs train DPO for --steps steps on the same pairs at the same global batch
(--batch pairs per micro-batch; 1 process accumulates 2 micro-batches, each of 2 processes takes 1),
the second started by `accelerate launch --config_file configs/accelerate/ddp.yaml`. Reported:
  adapter_max_abs_diff      largest difference between the two final adapters (target <= 1e-4)
  dp_efficiency             steps/s of 2 processes / steps/s of 1 process (target >= 0.85); steps/s is
                            1 / the median step time after the first (warm-up) step
  allreduce_bytes_per_step  what each process all-reduced per optimizer step, beside the adapter's size
                            and the base's size (it must be the adapter's, not the model's)
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import ROOT, child_env, steady_median, write_pairs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, data: Path, out: Path, processes: int, threads: int) -> dict:
    sets = [f"model_name_or_path={args.model}", f"train_file={data}", f"output_dir={out}", "report_to=[none]",
            f"per_device_train_batch_size={args.batch}", f"gradient_accumulation_steps={2 // processes}",
            f"max_steps={args.steps}", f"max_length={args.max_length}", "eval_fraction=0.0", "save_steps=0",
            f"num_threads={threads}", "learning_rate=1.0e-4", "device=auto"]
    align = ["-m", "align", "dpo", "--config", str(ROOT / "configs" / "dpo_tiny.yaml")]
    for s in sets:
        align += ["--set", s]
    if processes == 1:
        cmd = [sys.executable, *align]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(free_port()), *align]
    env = child_env(OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{processes} process(es) failed:\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_s"] for r in rows if "step_s" in r]
    median = steady_median(steps)
    return {"wall_s": time.perf_counter() - t0, "step_s_median": median, "steps_per_s": 1 / median,
            "step_s": steps, "loss": [r["loss"] for r in rows if "loss" in r],
            "allreduce_bytes_per_step": rows[-1].get("allreduce_bytes", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from align.core.loading import resolve_model

    args.model = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "pairs.jsonl"
        write_pairs(data, args.pairs, chat=False)
        one = run(args, data, tmp / "one", processes=1, threads=2)
        two = run(args, data, tmp / "two", processes=2, threads=1)
        a = load_file(str(tmp / "one" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(tmp / "two" / "adapter" / "adapter_model.safetensors"))
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        adapter_bytes = sum(v.numel() * v.element_size() for v in a.values())
        base_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    summary = {
        "bench": "scale", "model": Path(args.model).name, "recipe": "dpo", "steps": args.steps,
        "global_batch_pairs": 2 * args.batch, "max_length": args.max_length, "torch": torch.__version__,
        "one_process": {k: v for k, v in one.items()}, "two_processes": {k: v for k, v in two.items()},
        "adapter_max_abs_diff": diff, "adapter_max_abs_diff_target": 1e-4,
        "dp_efficiency": two["steps_per_s"] / one["steps_per_s"], "dp_efficiency_target": 0.85,
        "allreduce_bytes_per_step": two["allreduce_bytes_per_step"], "adapter_bytes": adapter_bytes,
        "base_safetensors_bytes": base_bytes, "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
