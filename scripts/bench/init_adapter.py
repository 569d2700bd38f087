"""Peak memory of DPO from an init adapter (reference = that adapter, frozen) vs DPO from scratch (reference = base).

    python scripts/bench/init_adapter.py            # SmolLM2-135M (offline)
    python scripts/bench/init_adapter.py --quick    # tiny model, seconds

The reference of `init_adapter` + `reference: init` is a second named adapter on the same base,
so the two runs should differ by one frozen rank-8 adapter (a few MB), not by a base copy. Each
run is its own process; peak RSS is its ru_maxrss (loading included), median of --repeats runs.
Same data, batch and max_length for both. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from measure import ROOT, peak_rss_mb, run_child, write_pairs


def make_adapter(model: str, out: Path) -> None:
    """A rank-8 all-linear adapter with non-zero weights, saved as an SFT run would save it."""
    import torch

    from align.core.base import SharedBase
    from align.core.loading import resolve_model

    base = SharedBase.load(resolve_model(model))
    base.add_adapter("policy")
    with torch.no_grad():
        for p in base.adapter_parameters("policy").values():
            p.normal_(0, 0.01)
    base.save_adapter("policy", out)


def worker(args) -> dict:
    from align.recipes.dpo import DPOConfig, DPOTrainer
    from align.train.config_parser import load_config

    sets = [f"model_name_or_path={args.model}", f"train_file={args.data}", f"output_dir={args.out}",
            "report_to=[none]", f"per_device_train_batch_size={args.batch}", f"max_length={args.max_length}",
            "save_steps=0", "eval_fraction=0.0", f"max_steps={args.steps}"]
    if args.init:
        sets.append(f"init_adapter={args.init}")
    trainer = DPOTrainer(load_config(DPOConfig, ROOT / "configs" / "dpo_tiny.yaml", sets), overwrite=True)
    trainer.setup()
    t0 = time.perf_counter()
    trainer.train()
    return {"peak_rss_mb": peak_rss_mb(),
            "train_s": time.perf_counter() - t0, "reference": trainer.config.reference,
            "adapters": trainer.base.adapters}


def run_worker(args, init: str | None, tmp: Path) -> dict:
    return run_child(__file__, "--worker", "--model", args.model, "--data", str(tmp / "pairs.jsonl"),
                     "--out", str(tmp / "run"), "--steps", str(args.steps), "--batch", str(args.batch),
                     "--max-length", str(args.max_length), *(["--init", init] if init else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.quick:
            from align.core.tiny import build_tiny_model

            args.model = str(build_tiny_model(tmp / "tiny"))
        write_pairs(tmp / "pairs.jsonl", 64)
        make_adapter(args.model, tmp / "init")
        runs = {"reference_base": [], "reference_init": []}
        for _ in range(args.repeats):
            runs["reference_base"].append(run_worker(args, None, tmp))
            runs["reference_init"].append(run_worker(args, str(tmp / "init"), tmp))
    peak = {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
    ratio = peak["reference_init"] / peak["reference_base"]
    print(json.dumps({"bench": "dpo_init_adapter_rss", "model": "tiny" if args.quick else args.model,
                      "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
                      "repeats": args.repeats, "peak_rss_mb": peak, "ratio": round(ratio, 4),
                      "target_ratio_max": 1.10, "within_target": ratio <= 1.10,
                      "adapters": {k: v[0]["adapters"] for k, v in runs.items()},
                      "train_s": {k: statistics.median(r["train_s"] for r in v) for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
