"""Reward-model benchmark on the demo task: held-out accuracy vs the "longer answer wins" baseline,
training throughput (pairs/s) and scoring throughput (sequences/s).

    python scripts/bench/reward.py            # SmolLM2-135M-Instruct, configs/reward_demo.yaml (~8 min on 2 cores)
    python scripts/bench/reward.py --quick    # tiny model, seconds
Targets (SmolLM2): heldout_accuracy >= 0.80 and >= 0.15 above length_baseline_accuracy.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import measure  # noqa: F401 - first: this file is named reward.py; measure.py lets `import reward` find the package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, a few steps (a smoke test of the path)")
    ap.add_argument("--config", default="configs/reward_demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. --set demo_pairs=256")
    ap.add_argument("--out", help="run folder (default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=3, help="scoring-throughput repetitions (median reported)")
    args = ap.parse_args()

    import torch

    from align.train.config_parser import load_config
    from align.train.metrics import read_metrics
    from reward.train import RewardConfig, RewardTrainer, format_calibration

    tmp = tempfile.TemporaryDirectory()
    out = args.out or str(Path(tmp.name) / "run")
    overrides = [f"output_dir={out}", "report_to=[none]", "save_steps=0"]
    if args.quick:
        from align.core.tiny import build_tiny_model

        tiny = build_tiny_model(Path(tmp.name) / "tiny", "llama")
        overrides += [f"model_name_or_path={tiny}", "demo_pairs=48", "demo_eval_pairs=32", "demo_source=synthetic",
                      "learning_rate=1.0e-2", "num_train_epochs=2"]
    config = load_config(RewardConfig, args.config, overrides + args.overrides)

    trainer = RewardTrainer(config)
    trainer.setup()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    s = trainer.summary

    # Scoring throughput: (prompt, completion) texts through RewardModel.score, as PPO would call it.
    rows = [json.loads(line) for line in (Path(out) / "data" / "eval.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    trainer.rm.score(prompts[:16], completions[:16])  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        scores = trainer.rm.score(prompts, completions, batch_size=16)
        times.append(time.perf_counter() - t)
    n = len(rows)
    wins = (scores[:n] > scores[n:]).tolist()
    text_accuracy = sum(wins) / n
    # Accuracy where length points each way: on "chosen is longer" pairs the shorter-wins rule is always wrong.
    tok = trainer.base.tokenizer
    by_length: dict[str, list[bool]] = {"chosen_longer": [], "rejected_longer": [], "same_length": []}
    for r, win in zip(rows, wins, strict=True):
        lc, lr = len(tok(r["chosen"])["input_ids"]), len(tok(r["rejected"])["input_ids"])
        by_length["chosen_longer" if lc > lr else "rejected_longer" if lr > lc else "same_length"].append(win)

    step_rates = [r["pairs_per_s"] for r in read_metrics(out) if "pairs_per_s" in r]
    print(format_calibration(s["calibration"]))
    result = {
        "model": "tiny-llama" if args.quick else config.model_name_or_path,
        "train_pairs": s["train_pairs"], "eval_pairs": s["eval/pairs"], "steps": s["step"],
        "learning_rate": config.learning_rate, "lora_rank": config.lora.rank, "lora_alpha": config.lora.alpha,
        "heldout_accuracy": round(s["eval/accuracy"], 4),
        "length_baseline_accuracy": round(s["eval/length_baseline_accuracy"], 4),
        # The better of "longer wins" and "shorter wins" (ties count half either way): what length alone can do.
        "best_length_rule_accuracy": round(max(s["eval/length_baseline_accuracy"],
                                               1 - s["eval/length_baseline_accuracy"]), 4),
        "heldout_accuracy_via_score": round(text_accuracy, 4),
        "heldout_accuracy_by_length": {k: {"pairs": len(v), "accuracy": round(sum(v) / len(v), 4) if v else None}
                                       for k, v in by_length.items()},
        "heldout_mean_margin": round(s["eval/margin"], 4), "heldout_ece": round(s["eval/ece"], 4),
        # Median over steps (robust to the slow first steps and to noisy neighbours); the overall rate next to it.
        "pairs_per_s": round(statistics.median(step_rates), 3),
        "pairs_per_s_overall": round(s["train_pairs_per_s"], 3),
        "score_per_s": round(len(prompts) / statistics.median(times), 2),
        "train_s": round(train_s, 1), "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
