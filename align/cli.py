"""The `align` command. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; this file only routes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("align.recipes.demo", "Offline end-to-end demo: SmolLM2-135M, arithmetic task, DPO adapter."),
    "dpo": ("align.recipes.dpo", "Train a DPO adapter from a YAML config."),
    "sft": ("align.recipes.sft", "Supervised fine-tuning of a LoRA adapter (TRL's SFT formats) from a YAML config."),
    "reward": ("reward.cli", "Train a reward model (LoRA + scalar head, Bradley-Terry), or score text with one."),
    "data": ("align.data.cli", "Validate a preference dataset (`align data check FILE`)."),
    "advise": ("align.train.advise", "Count a dataset's training tokens against a LoRA adapter's capacity; suggest rank and lr."),
    "ppo": ("align.recipes.ppo.cli", "PPO / GRPO / RLOO with policy, reference, critic and reward on one frozen base."),
    "plot": ("align.train.plot", "Draw a run's metrics.jsonl curves to a PNG."),
    "serve": ("align.serve", "Serve a base model and its LoRA adapters through vLLM's OpenAI-compatible API."),
    "export": ("align.export.merge", "Merge an adapter into its base: a full safetensors model for engines without LoRA."),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, just that command's module is imported (fast start)."""
    parser = argparse.ArgumentParser(prog="align", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if only is None or only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    from align.core.distributed import leave_launched_process
    from align.core.errors import UserError

    try:
        code = importlib.import_module(args._module).run(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    leave_launched_process(code)  # one of N launched processes ends here (align/distributed.py says why)
    return code


if __name__ == "__main__":
    sys.exit(main())
