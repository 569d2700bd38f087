#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
       HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two workers, whole files each (a module's server or engine starts once): much of the suite waits on
# process starts and servers, so two cores overlap it. `bash scripts/test.sh -n 0 ...` runs serially.
# --durations: the slowest tests are printed, so a suite creeping towards its time budget shows where.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
