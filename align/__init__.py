"""align: preference tuning and RL for language models where only LoRA adapters learn.

One frozen base carries every role (policy, reference = adapters off, critic, reward);
vLLM generates rollouts with the current adapter and serves the result.
"""

import logging

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed, and bitsandbytes' CPU backend then tries to fetch
# an optional kernel from the hub and warns when it cannot: expected offline, and noise before every
# one-line error. Its slower built-in path is used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
