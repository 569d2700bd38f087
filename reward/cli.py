"""`align reward`: train a reward model from a YAML config; `align reward score`: score text with a saved one.

    align reward --config configs/reward_demo.yaml [--resume] [--learning_rate 2e-4]
    align reward score rows.jsonl --model_name_or_path runs/reward_demo/reward_model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SCORE_HELP = ("Scores prompt/completion rows (or each side of chosen/rejected pairs) with a saved reward model, one JSON "
              "line per\ncompletion: {\"where\": \"file:line:field\", \"reward\": r}.\n\nexample:\n"
              "  align reward score rows.jsonl --model_name_or_path runs/reward_demo/reward_model")


def add_arguments(p) -> None:
    from align.train.cli import add_recipe_arguments
    from reward.train import RewardConfig

    add_recipe_arguments(p, RewardConfig)  # training: `align reward --config FILE`, as every recipe
    sub = p.add_subparsers(dest="action", metavar="score", help="score text with a saved reward model instead of "
                                                                "training one (`align reward score --help`)")
    s = sub.add_parser("score", description=SCORE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    # `--pairs FILE` is FILE's old spelling, kept for old scripts. The positional's SUPPRESS default keeps
    # argparse from overwriting a --pairs value with None when FILE itself is absent.
    s.add_argument("file", nargs="?", default=argparse.SUPPRESS, metavar="FILE",
                   help="JSONL rows with prompt and completion (or chosen/rejected) fields")
    s.add_argument("--pairs", dest="file", default=None, help=argparse.SUPPRESS)
    # `--model` was this flag's name before it took the recipes' name: kept as a hidden alias.
    s.add_argument("--model_name_or_path", "--model", dest="model", required=True, metavar="REWARD_MODEL",
                   help="a saved reward-model folder (a reward run's output_dir/reward_model)")
    s.add_argument("--base", help="the base model it was trained on (default: the one named in its metadata)")
    s.add_argument("--per_device_eval_batch_size", "--batch_size", dest="batch_size", type=int, default=16,
                   metavar="N", help="sequences per forward pass (default: 16)")


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


def _read_rows(source: str) -> tuple[list[str], list[str], list[str]]:
    """(prompts, completions, where each came from): every completion, chosen or rejected of a JSONL file."""
    from align.core.errors import UserError
    from align.data.preference import DataError, DataIssue, read_jsonl

    prompts, completions, wheres = [], [], []
    for where, row in read_jsonl(Path(source)):
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
        raise UserError(f"{source}: no rows with a 'completion', 'chosen' or 'rejected' field")
    return prompts, completions, wheres


def _score(args) -> int:
    from align.core.base import SharedBase
    from align.core.errors import UserError
    from align.core.loading import resolve_model
    from reward.classifier import ClassifierReward
    from reward.model import RewardModel, find_reward_folder

    source = args.file
    if not source:
        raise UserError("align reward score: expected FILE, JSONL rows with prompt and completion fields")
    if args.config or args.overrides or any(k.startswith("field__") for k in vars(args)):
        raise UserError("align reward score: training flags (--config, --set, config fields) do not apply to scoring;"
                        " put `score` first: align reward score FILE --model_name_or_path REWARD_MODEL")
    prompts, completions, wheres = _read_rows(source)  # bad rows are reported before any model loads
    found = find_reward_folder(args.model)
    if found is not None and found[1] == "classifier":  # use_peft: false wrote a sequence classifier
        scores = ClassifierReward(str(found[0]), batch_size=args.batch_size)(prompts, completions)
    else:
        meta_path = f"{args.model}/align_meta.json"
        try:
            base_name = args.base or json.load(open(meta_path))["base"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise UserError(f"{meta_path}: cannot read the base name ({e}); pass --base") from None
        rm = RewardModel.attach(SharedBase.load(resolve_model(base_name)), args.model)
        scores = rm.score(prompts, completions, args.batch_size).tolist()
    for w, s in zip(wheres, scores, strict=True):
        print(json.dumps({"where": w, "reward": s}))
    return 0


def run(args) -> int:
    return _score(args) if args.action == "score" else _train(args)
