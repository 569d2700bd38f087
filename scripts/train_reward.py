"""Train a reward model from a YAML config: the same as `align reward --config ...`.

    python scripts/train_reward.py --config configs/reward_demo.yaml [--resume] [--set KEY=VALUE]
"""

import sys

from align.cli import main

if __name__ == "__main__":
    sys.exit(main(["reward", *sys.argv[1:]]))
