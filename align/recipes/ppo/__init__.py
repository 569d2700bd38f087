"""PPO, GRPO and RLOO where only LoRA adapters (and a value head) learn; all roles share one base.

    from align.recipes.ppo import GRPOConfig, train_grpo
    train_grpo(GRPOConfig(output_dir="runs/mine"), train_dataset=rows, reward_funcs=[my_reward])
"""

from align.recipes.ppo.api import train_grpo, train_ppo, train_rloo
from align.recipes.ppo.config import GRPOConfig, PPOConfig, RLOOConfig
from align.recipes.ppo.trainer import PPOTrainer

GRPOTrainer = RLOOTrainer = PPOTrainer  # one trainer; the config's algorithm decides

__all__ = ["GRPOConfig", "GRPOTrainer", "PPOConfig", "PPOTrainer", "RLOOConfig", "RLOOTrainer", "train_grpo",
           "train_ppo", "train_rloo"]
