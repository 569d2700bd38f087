#!/usr/bin/env bash
# One short check that every recipe trains on a CUDA machine (a few minutes on one H100/H200):
#   bash scripts/gpu_check.sh              # SFT (when present), DPO, reward, PPO on the tiny model
#   bash scripts/gpu_check.sh --allow-cpu  # no GPU: the same checks on the CPU (what the tests run)
# Needs torch, transformers, peft and accelerate only (no datasets, vLLM or network). With two or more
# GPUs it also runs a 2-process `accelerate launch` DPO. The last line is one JSON object: pass/fail,
# step times and peak GPU memory per recipe. Exit 0 when every recipe passed; without CUDA it exits 2
# unless --allow-cpu is given.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
