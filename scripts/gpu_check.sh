#!/usr/bin/env bash
# One-command GPU check: the `gpu`-marked tests, then a ZeRO-3 PiSSA trial and a 2-worker ZeRO-2 LoRA trial on a
# random-init ~0.5B Llama-shaped base (scripts/gpu_check.py), each printed as tokens/s, MFU and peak memory.
#   scripts/gpu_check.sh            on a CUDA machine (install a CUDA torch, then pip install -e '.[dev,gpu]')
#   scripts/gpu_check.sh --dry-run  anywhere: the trials' code on CPU with a tiny config (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ "${1:-}" == "--dry-run" ]]; then
  exec "$PY" scripts/gpu_check.py --dry-run
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device: torch.cuda.is_available() is False for $PY" \
    "(no GPU, no driver, or a CPU build of torch). Run it on a GPU machine, or use --dry-run." >&2
  exit 2
fi
"$PY" -m pytest -q -m gpu tests
"$PY" scripts/gpu_check.py
