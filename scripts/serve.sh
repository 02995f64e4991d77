#!/usr/bin/env bash
# Installs the backend (idempotent) and starts it under gunicorn on $PORT (default 9090).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m ml_backend serve
