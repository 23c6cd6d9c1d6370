#!/usr/bin/env bash
# The CUDA path on one GPU in one run (see scripts/gpu_check.py): `make gpu-check`, or
#   OUT=/some/dir bash scripts/gpu_check.sh            # on a machine with an NVIDIA GPU
#   GPU_CHECK_DRY=1 OUT=/tmp/o bash scripts/gpu_check.sh  # the CPU dry run
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
exec "$PY" scripts/gpu_check.py "$@"
