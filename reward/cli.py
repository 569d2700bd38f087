"""`align reward`: train a reward model from a YAML config, or score text with a saved one.

    align reward --config configs/reward_demo.yaml [--resume] [--learning_rate 2e-4]
    align reward score --model runs/reward_demo/reward_model --pairs pairs.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    from align.train.cli import add_recipe_arguments
    from reward.train import RewardConfig

    p.add_argument("action", nargs="?", choices=["train", "score"], default="train",
                   help="train (default) a reward model, or score prompt/completion rows with a saved one")
    p.add_argument("--model", help="score: a saved reward-model folder (output_dir/reward_model)")
    p.add_argument("--base", help="score: the base model it was trained on (default: the one named in its metadata)")
    p.add_argument("--pairs", help="score: JSONL rows with prompt and completion (or chosen/rejected) fields")
    p.add_argument("--batch-size", type=int, default=16, help="score: sequences per forward pass")
    add_recipe_arguments(p, RewardConfig)


def _train(args) -> int:
    from align.train.cli import train_from_args
    from reward.train import RewardConfig, RewardTrainer, format_calibration

    done = train_from_args(RewardConfig, RewardTrainer, args)
    if done is None:
        return 0
    trainer, path = done
    s = trainer.summary
    if "eval/accuracy" in s:
        print(f"held-out: accuracy {s['eval/accuracy']:.3f} (longer-answer baseline "
              f"{s['eval/length_baseline_accuracy']:.3f}), mean margin {s['eval/margin']:.3f}, "
              f"ECE {s['eval/ece']:.3f} on {s['eval/pairs']} pairs")
        print(format_calibration(s["calibration"]))
    print(f"reward model saved to {path}")
    return 0


def _score(args) -> int:
    from align.core.base import SharedBase
    from align.core.errors import UserError
    from align.core.loading import resolve_model
    from reward.model import RewardModel

    if not args.model or not args.pairs:
        raise UserError("align reward score: --model and --pairs are required")
    meta_path = f"{args.model}/align_meta.json"
    try:
        base_name = args.base or json.load(open(meta_path))["base"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path}: cannot read the base name ({e}); pass --base") from None
    base = SharedBase.load(resolve_model(base_name))
    rm = RewardModel.attach(base, args.model)
    prompts, completions, wheres = [], [], []
    from align.data.preference import DataError, DataIssue, read_jsonl

    for where, row in read_jsonl(Path(args.pairs)):
        if isinstance(row, DataIssue):
            raise DataError([row])
        if not isinstance(row, dict) or "prompt" not in row:
            raise UserError(f"{where}: expected an object with 'prompt' and 'completion' "
                            f"(or 'chosen'/'rejected')")
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                prompts.append(row["prompt"])
                completions.append(row[key])
                wheres.append(f"{where}:{key}")
    if not prompts:
        raise UserError(f"{args.pairs}: no rows with a 'completion', 'chosen' or 'rejected' field")
    scores = rm.score(prompts, completions, args.batch_size)
    for w, s in zip(wheres, scores.tolist(), strict=True):
        print(json.dumps({"where": w, "reward": s}))
    return 0


def run(args) -> int:
    return _score(args) if args.action == "score" else _train(args)
