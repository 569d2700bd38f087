"""align: preference tuning and RL for language models where only LoRA adapters learn.

One frozen base carries every role (policy, reference = adapters off, critic, reward);
vLLM generates rollouts with the current adapter and serves the result.
"""

__version__ = "0.1.0"
