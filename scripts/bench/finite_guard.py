"""What the finite guard costs: its time per optimizer step beside the step's own time.

    python scripts/bench/finite_guard.py            # SmolLM2-135M DPO (offline), about a minute on 2 cores
    python scripts/bench/finite_guard.py --quick    # tiny model, seconds

Runs a few real DPO steps (each timed whole, the guard included), then times the guard alone on the
same trained tensors and optimizer state, --calls times. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from measure import steady_median, write_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model instead of SmolLM2-135M")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()

    import torch

    from align.recipes.dpo import DPOConfig, DPOTrainer
    from align.train.config_parser import load_config

    tmp = Path(tempfile.mkdtemp(prefix="finite-guard-"))
    model = "smollm2"
    if args.quick:
        from align.core.tiny import build_tiny_model

        model = str(build_tiny_model(tmp / "tiny", "llama"))
    data = write_pairs(tmp / "pairs.jsonl", 64, chat=False)
    config = load_config(DPOConfig, None, [f"model_name_or_path={model}", f"output_dir={tmp / 'run'}",
                                           f"train_file={data}", f"max_steps={args.steps}", "report_to=[none]",
                                           "per_device_train_batch_size=4", "max_length=128", "save_steps=0"])
    trainer = DPOTrainer(config)
    trainer.setup()
    step_s = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.training_step()
        step_s.append(time.perf_counter() - t0)
        trainer.step += 1
    guard_s = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        trainer.gradient_step.check_finite(trainer.optimizer.param_groups[0]["lr"], trainer.step)
        guard_s.append(time.perf_counter() - t0)
    n_tensors = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    trainer.close()
    step = steady_median(step_s)
    guard = statistics.median(guard_s)
    print(f"step {step * 1e3:.1f} ms (median of {len(step_s) - (len(step_s) > 2)}), guard {guard * 1e3:.2f} ms "
          f"(median of {len(guard_s)}) over {n_tensors} trained tensors + their Adam moments")
    print(json.dumps({"model": "tiny" if args.quick else "smollm2", "threads": torch.get_num_threads(),
                      "trained_tensors": n_tensors, "step_ms": round(step * 1e3, 2),
                      "guard_ms": round(guard * 1e3, 3), "guard_share_of_step": round(guard / step, 5)}))


if __name__ == "__main__":
    main()
