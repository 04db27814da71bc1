#!/usr/bin/env bash
# Run a project script with the project's virtual environment and ComfyUI located.
# Usage: bash scripts/run.sh scripts/some_script.py [args...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
zsve_setup
cd "$ZSVE_ROOT"
exec "$PY" "$@"
