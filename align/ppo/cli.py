"""`align ppo --config FILE`: PPO / GRPO / RLOO with every role on one frozen base."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML mirroring align.ppo.config.PPOConfig (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set steps=20 --set lora.rank=4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--eval-only", action="store_true",
                   help="score the held-out prompts greedily with the latest checkpoint (or the base) and stop")


def run(args) -> int:
    from align.config import dump_config, load_config
    from align.ppo.config import PPOConfig
    from align.ppo.trainer import PPOTrainer

    config = load_config(PPOConfig, args.config, args.overrides)
    if args.eval_only:
        from align.checkpoint import latest_checkpoint

        trainer = PPOTrainer(config, resume=latest_checkpoint(config.output_dir) is not None)
        try:
            score = trainer.evaluate()
            trainer.metrics.log(trainer.step_done, {"eval/reward": score})
        finally:
            trainer.close()
        print(f"eval/reward at step {trainer.step_done}: {score:.4f}")
        return 0
    trainer = PPOTrainer(config, resume=args.resume)
    dump_config(config, trainer.run_dir / "config.yaml")
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    for key, value in summary.items():
        print(f"{key}: {value:.4f}")
    print(f"policy adapter: {trainer.run_dir / 'policy'}   curves: align plot {trainer.run_dir}")
    return 0
