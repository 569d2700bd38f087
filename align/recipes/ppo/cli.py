"""`align ppo --config FILE`: PPO / GRPO / RLOO with every role on one frozen base."""

from __future__ import annotations


def add_arguments(p) -> None:
    from align.recipes.ppo.config import PPOConfig
    from align.train.cli import add_recipe_arguments

    add_recipe_arguments(p, PPOConfig)
    p.add_argument("--eval_only", action="store_true",
                   help="score the held-out prompts greedily with the latest checkpoint (or the base) and stop")


def run(args) -> int:
    from align.recipes.ppo.config import PPOConfig
    from align.recipes.ppo.trainer import PPOTrainer
    from align.train.cli import config_or_check, train_from_args

    if args.eval_only:
        config = config_or_check(PPOConfig, args)
        return 0 if config is None else evaluate_only(config)
    done = train_from_args(PPOConfig, PPOTrainer, args)
    if done is None:
        return 0
    trainer, policy = done
    for key in ("eval/reward_before", "eval/reward"):
        if key in trainer.summary:
            print(f"{key}: {trainer.summary[key]:.4f}")
    print(f"policy adapter: {policy}   curves: align plot {trainer.out}")
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
