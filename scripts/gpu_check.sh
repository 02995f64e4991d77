#!/usr/bin/env bash
# The GPU checks as one table: parity with the official SAM on CUDA in float32 and float16
# (SAM_HALF), the SAM bench for base and huge shapes, the click bench (HTTP, every result form) and
# the session bench. On a machine without
# CUDA the same script runs the CPU rows and names the rows it skipped. Exit 1 when a parity
# row fails. On a GPU host install a CUDA torch first (TORCH_SPEC, see README).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && [ -x .venv-ls/bin/label-studio ] || bash scripts/install.sh --test >&2
exec .venv/bin/python -m benchmarks.gpu_check "$@"
