#!/usr/bin/env bash
# The project's main command: runs a shipped workflow headless (see scripts/demo.py --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
zsve_setup
cd "$ZSVE_ROOT"
exec "$PY" scripts/demo.py "$@"
