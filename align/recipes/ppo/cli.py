"""`align ppo|grpo|rloo --config FILE`: one trainer, three algorithms (TRL's PPOConfig/GRPOConfig/RLOOConfig names).

A `trl grpo --config x.yaml` file runs as `align grpo --config x.yaml` (docs/ppo.md, "From TRL").
"""

from __future__ import annotations


def config_class(command: str):
    from align.recipes.ppo.config import GRPOConfig, PPOConfig, RLOOConfig

    return {"ppo": PPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}[command]


def add_arguments(p) -> None:
    from align.train.cli import add_recipe_arguments

    add_recipe_arguments(p, config_class(p.prog.split()[-1]))
    p.add_argument("--eval_only", action="store_true",
                   help="score the held-out prompts greedily with the latest checkpoint (or the base) and stop")


def run(args) -> int:
    from align.recipes.ppo.trainer import PPOTrainer
    from align.train.cli import config_or_check, train_from_args

    cls = config_class(args.command)
    if args.eval_only:
        config = config_or_check(cls, args)
        return 0 if config is None else evaluate_only(config)
    done = train_from_args(cls, PPOTrainer, args)
    if done is None:
        return 0
    trainer, policy = done
    if trainer.processes.is_main:
        for key in ("eval/reward_before", "eval/reward"):
            if key in trainer.summary:
                print(f"{key}: {trainer.summary[key]:.4f}")
        what = "policy adapter" if trainer.config.use_peft else "policy model"  # use_peft: false saves model/
        print(f"{what}: {policy}   curves: align plot {trainer.out}")
    return 0


def evaluate_only(config) -> int:
    """Score the held-out prompts with the run's latest checkpoint (or the bare policy) and log it at its step."""
    from align.recipes.ppo.trainer import PPOTrainer
    from align.train.state import latest_checkpoint

    resume = True if latest_checkpoint(config.output_dir) is not None else None
    trainer = PPOTrainer(config, resume=resume)
    try:
        trainer.setup()
        score = trainer.evaluate()["eval/reward"]
        trainer.logger.log(trainer.step, {"eval/reward": score})
    finally:
        trainer.close()
    print(f"eval/reward at step {trainer.step}: {score:.4f}")
    return 0
