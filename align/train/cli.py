"""The command-line face every training recipe shares (`align dpo|reward|ppo ...`).

    align dpo --config configs/dpo_tiny.yaml --learning_rate 1e-4 --set beta=0.2
    align dpo --config ... --resume                 # continue from the latest checkpoint
    align dpo --config ... --resume step-000020     # or from a named one
    align dpo --config ... --resume --resume_changed  # resume although training settings changed (recorded)
    align dpo --config ... --overwrite              # delete the run in output_dir and start over
    align dpo --config ... --check_config           # validate and print the resolved config, load nothing

Flags use TRL's underscore names; `align` also accepts the dashed spelling of each (`--check-config`).
"""

from __future__ import annotations

import argparse

import yaml

from align.train.config_parser import add_config_arguments, config_from_args, to_dict


def add_recipe_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    add_config_arguments(p, cls)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run in output_dir from its latest checkpoint (or the one named: "
                        "step-000010 or a checkpoint folder)")
    p.add_argument("--resume_changed", action="store_true",
                   help="with --resume: train on although settings that change the training differ from the "
                        "checkpoint's (listed, and recorded in config_history.yaml); without it such a resume is "
                        "refused")
    p.add_argument("--overwrite", action="store_true",
                   help="output_dir holds a run: delete it and start over")
    p.add_argument("--check_config", action="store_true",
                   help="validate the config, print it resolved (defaults included) and exit")


def config_or_check(cls: type, args: argparse.Namespace):
    """The config the arguments describe; with --check_config, check it fully, print it and return None."""
    config = config_from_args(cls, args)
    if args.check_config:
        preflight(config, getattr(args, "resume", None), getattr(args, "overwrite", False),
                  getattr(args, "resume_changed", False))
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        print(f"# config OK: {cls.__name__}")
        return None
    return config


def preflight(config, resume=None, overwrite: bool = False, resume_changed: bool = False) -> None:
    """What a run checks before it loads a model, without loading or changing anything.

    The model path (a local folder, 'smollm2', or a hub id cached when offline), the output
    folder policy (a file, a finished run without --resume/--overwrite, a damaged checkpoint) and
    what a resume compares with its checkpoint (align/train/resume_check.py; processes: WORLD_SIZE).
    """
    import os
    from pathlib import Path

    from align.core.loading import resolve_model
    from align.train.resume_check import check_resume
    from align.train.run_folder import check_model_available, prepare_output_dir
    from align.train.state import read_state

    name = config.model_name_or_path
    if name != "smollm2":  # resolving 'smollm2' may build it: that is the run's job, not a check's
        check_model_available(name, resolve_model(name))
    checkpoint = prepare_output_dir(Path(config.output_dir), resume, overwrite, dry_run=True)
    if checkpoint is not None:
        check_resume(config, read_state(checkpoint), int(os.environ.get("WORLD_SIZE", "1")), resume_changed,
                     checkpoint.name)


def train_from_args(config_cls: type, trainer_cls: type, args: argparse.Namespace):
    """Build the config, then train it to the end; returns (trainer, what it saved), or None for --check_config."""
    config = config_or_check(config_cls, args)
    if config is None:
        return None
    trainer = trainer_cls(config, resume=args.resume, overwrite=args.overwrite,
                          resume_changed=getattr(args, "resume_changed", False))
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


def adapter_recipe(config_cls: type, trainer_cls: type):
    """`add_arguments(parser)` and `run(args)` for a recipe whose result is one adapter folder (DPO, SFT)."""

    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_recipe_arguments(p, config_cls)

    def run(args: argparse.Namespace) -> int:
        done = train_from_args(config_cls, trainer_cls, args)
        if done is not None and done[0].processes.is_main:  # said once, by the process that wrote it
            what = "adapter" if getattr(done[0].config, "use_peft", True) else "model"  # use_peft: false (SFT)
            print(f"{what} saved to {done[1]}")
        return 0

    return add_arguments, run
