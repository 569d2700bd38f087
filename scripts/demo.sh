#!/usr/bin/env bash
# Set up (if needed) and run the offline demo on SmolLM2-135M-Instruct (<= 15 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
       HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/align demo "$@"
