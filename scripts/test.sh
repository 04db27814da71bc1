#!/usr/bin/env bash
# The project's test command: venv + ComfyUI discovery + ruff + pytest.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
zsve_venv
zsve_find_comfyui
echo "[zsve] ComfyUI: $COMFYUI_PATH" >&2
cd "$ZSVE_ROOT"
"$PY" -m ruff check .
exec "$PY" -m pytest -q "$@"
