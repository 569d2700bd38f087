"""Train a DPO adapter from a YAML config: the same as `align dpo`.

    python scripts/train_dpo.py --config configs/dpo_smollm2.yaml [--resume] [--set beta=0.2]
"""

import sys

from align.cli import main

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
