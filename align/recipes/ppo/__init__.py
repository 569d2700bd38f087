"""PPO, GRPO and RLOO where only LoRA adapters (and a value head) learn; all roles share one base.

    from align.recipes.ppo import PPOConfig, PPOTrainer
    trainer = PPOTrainer(load_config(PPOConfig, "configs/ppo_demo.yaml")); trainer.train(); trainer.close()
"""

from align.recipes.ppo.config import PPOConfig
from align.recipes.ppo.trainer import PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]
