"""Same as `align ppo`: python scripts/train_ppo.py --config configs/ppo_demo.yaml [--set k=v] [--resume]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # vLLM's in-process engine needs the guard
    from align.cli import main

    sys.exit(main(["ppo", *sys.argv[1:]]))
