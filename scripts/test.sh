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
# pytest must not treat the pack root as a test package: its __init__.py is the ComfyUI entry point (relative
# imports), and a checkout in a directory whose name has a dot (e.g. mktemp's /tmp/tmp.XXXX) cannot be
# imported as a package, which failed every test. So the collection starts at tests/ (rootdir, confcutdir and
# the path given explicitly; pyproject's testpaths would start it at the root again).
has_path=0
for a in "$@"; do [[ -e "${a%%::*}" ]] && has_path=1; done
[[ $has_path == 1 ]] || set -- "$@" tests
exec "$PY" -m pytest -q --rootdir=tests --confcutdir=tests "$@"
