"""The `align` command. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; this file only routes, writes the help's
first lines and gives every flag its one spelling (TRL's underscore names).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

ABOUT = ("align is a toolkit that aligns language models with LoRA adapters (DPO, KTO, ORPO, CPO/SimPO, "
         "SFT, reward models, PPO/GRPO/RLOO), with rollouts and serving by vLLM.")

# name -> (module, what it does in one sentence, an example). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("align.recipes.demo", "Runs the whole loop offline: samples answers, trains a DPO adapter, scores it.",
             "align demo --quick"),
    "dpo": ("align.recipes.dpo", "Trains a DPO adapter from a YAML config.",
            "align dpo --config configs/dpo_smollm2.yaml --beta 0.2"),
    "kto": ("align.recipes.kto", "Trains a KTO adapter from thumbs up / down rows (TRL's KTO formats; pairs are "
            "unpaired).", "align kto --config configs/kto_smollm2.yaml --train_file my_feedback.jsonl"),
    "orpo": ("align.recipes.orpo", "Trains an ORPO adapter (SFT NLL + odds-ratio term; no reference model).",
             "align orpo --config configs/orpo_smollm2.yaml --beta 0.1"),
    "cpo": ("align.recipes.cpo", "Trains a CPO or SimPO adapter (loss_type: simpo; no reference model).",
            "align cpo --config configs/simpo_smollm2.yaml --simpo_gamma 0.5"),
    "sft": ("align.recipes.sft", "Trains a LoRA adapter by supervised fine-tuning on TRL's SFT formats.",
            "align sft --config configs/sft_smollm2.yaml --train_file my_rows.jsonl"),
    "reward": ("reward.cli", "Trains a reward model, or scores text with one (`align reward score`).",
               "align reward --config configs/reward_demo.yaml"),
    "online-dpo": ("align.recipes.online_dpo", "Trains a policy adapter with online DPO: it samples, the rewards "
                   "pick best vs worst, DPO learns (TRL's OnlineDPOConfig names).",
                   "align online-dpo --config configs/online_dpo_demo.yaml --max_steps 20"),
    "grpo": ("align.recipes.ppo.cli", "Trains a policy adapter with GRPO (TRL's GRPOConfig names; a `trl grpo` "
             "YAML runs as is).", "align grpo --config configs/grpo_demo.yaml --max_steps 20"),
    "rloo": ("align.recipes.ppo.cli", "Trains a policy adapter with RLOO (leave-one-out baseline), as `align grpo`.",
             "align rloo --config configs/grpo_demo.yaml --output_dir runs/rloo"),
    "ppo": ("align.recipes.ppo.cli", "Trains a policy adapter with PPO (a critic adapter + value head) on one "
            "frozen base.", "align ppo --config configs/ppo_demo.yaml --max_steps 20"),
    "data": ("align.data.cli", "Checks a dataset as a recipe reads it (preference, SFT or RL prompt rows) and lists every bad row.",
             "align data check my_pairs.jsonl --model_name_or_path smollm2 --max_length 256"),
    "advise": ("align.train.advise", "Weighs a dataset against an adapter's capacity and suggests a rank and lr.",
               "align advise my_pairs.jsonl --model_name_or_path smollm2 --recipe dpo"),
    "study": ("align.study.cli", "Checks a LoRA-versus-full-fine-tuning finding (rl-rank, lr-ratio, layers, batch, "
              "capacity) within a time budget, with a verdict from >= 2 seeds.", "align study layers --minutes 15"),
    "plot": ("align.train.plot", "Draws the metrics.jsonl curves of a run, or of every run in a folder, to PNGs.",
             "align plot runs/"),
    "serve": ("align.serve", "Serves a base model and its LoRA adapters through an OpenAI-compatible API.",
              "align serve --base runs/demo/tiny-model --adapter policy=runs/demo/dpo/adapter --port 8000"),
    "export": ("align.export.merge", "Merges an adapter into its base, or exports a reward model for transformers.",
               "align export --adapter runs/dpo/adapter --merge exported/"),
}


def describe(sentence: str, example: str) -> str:
    """A command's help head: what it does (a sentence), then an example to copy."""
    return f"{textwrap.fill(sentence, 100)}\n\nexample:\n  {example}"


def _overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {sentence}" for name, (_, sentence, _) in COMMANDS.items()]
    return "commands:\n" + "\n".join(lines) + "\n\nRun `align COMMAND --help` for a command's flags and an example."


def one_spelling(parser: argparse.ArgumentParser) -> None:
    """Show each long flag in TRL's underscore spelling; every other spelling it was given still parses.

    `--max-length` and `--max_length` (and an old name such as `--model` listed after the canonical
    one) reach the same action, hidden from the help. argparse has no public way to alias an existing
    action, hence its option table. Abbreviations are off: beside the aliases they would be ambiguous.
    """
    parser.allow_abbrev = False
    table = parser._option_string_actions
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                one_spelling(sub)
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs:
            continue
        canonical = "--" + longs[0][2:].replace("-", "_")
        for spelling in {canonical, *longs, *("--" + o[2:].replace("_", "-") for o in longs)}:
            table.setdefault(spelling, action)
        action.option_strings = [o for o in action.option_strings if not o.startswith("--")] + [canonical]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, just that command's module is imported (fast start)."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="align", description=ABOUT, epilog=_overview(), formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands below")
    for name, (module, sentence, example) in COMMANDS.items():
        p = sub.add_parser(name, description=describe(sentence, example), formatter_class=raw)
        p.set_defaults(_module=module)
        if only is None or only == name:
            importlib.import_module(module).add_arguments(p)
    one_spelling(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a first try: what align is and its commands, not only "COMMAND is required"
        build_parser("").print_help(sys.stderr)
        return 2
    command = next((a for a in argv if not a.startswith("-")), None)
    # Without a known command only the overview (or an error) is printed: no command's module is needed.
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    from align.core.distributed import leave_launched_process
    from align.core.errors import UserError

    try:
        code = importlib.import_module(args._module).run(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    leave_launched_process(code)  # one of N launched processes ends here (align/core/distributed.py says why)
    return code


if __name__ == "__main__":
    sys.exit(main())
