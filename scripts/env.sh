#!/usr/bin/env bash
# Shared environment setup for the project's commands (sourced, not run).
# Creates (and reuses) a virtual environment with a CPU-capable torch and ComfyUI's runtime
# requirements, then locates ComfyUI. Exports PY (the venv's python) and COMFYUI_PATH.
set -euo pipefail

ZSVE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ZSVE_VENV="${ZSVE_VENV:-$HOME/.cache/zero-shot-video-edit/venv}"
# Pinned ComfyUI version the pack is tested against (used only when a checkout must be made).
ZSVE_COMFYUI_REF="${ZSVE_COMFYUI_REF:-a125cd84b054a57729b5eecab930ca9408719832}"
ZSVE_TORCH="${ZSVE_TORCH:-torch==2.14.1 torchvision==0.29.1}"

# Runtime packages ComfyUI imports headless (its requirements.txt minus torch*, frontend packages,
# sentencepiece/alembic/SQLAlchemy/spandrel), plus requests which server.py needs.
ZSVE_COMFY_DEPS=(torchsde "numpy>=1.25.0" einops "transformers>=4.37.2" "tokenizers>=0.13.3"
  "safetensors>=0.4.2" "aiohttp>=3.11.8" "yarl>=1.18.0" pyyaml Pillow scipy tqdm psutil "av>=14.2.0"
  requests "pydantic~=2.0" "pydantic-settings~=2.0" packaging)
ZSVE_DEV_DEPS=(pytest ruff)

zsve_stamp() {
  # Changes whenever the dependency lists or the pack's requirements change.
  { echo "$ZSVE_TORCH"; printf '%s\n' "${ZSVE_COMFY_DEPS[@]}" "${ZSVE_DEV_DEPS[@]}";
    cat "$ZSVE_ROOT/requirements.txt"; } | sha256sum | cut -c1-16
}

zsve_venv() {
  local stamp; stamp="$(zsve_stamp)"
  if [ ! -x "$ZSVE_VENV/bin/python" ]; then
    echo "[zsve] creating virtual environment at $ZSVE_VENV" >&2
    mkdir -p "$(dirname "$ZSVE_VENV")"
    python3 -m venv "$ZSVE_VENV"
  fi
  if [ "$(cat "$ZSVE_VENV/.zsve-stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "[zsve] installing packages into $ZSVE_VENV (first run takes several minutes)" >&2
    "$ZSVE_VENV/bin/python" -m pip install -q --upgrade pip >&2
    # shellcheck disable=SC2086
    "$ZSVE_VENV/bin/python" -m pip install -q $ZSVE_TORCH >&2
    "$ZSVE_VENV/bin/python" -m pip install -q "${ZSVE_COMFY_DEPS[@]}" "${ZSVE_DEV_DEPS[@]}" \
      -r "$ZSVE_ROOT/requirements.txt" >&2
    echo "$stamp" > "$ZSVE_VENV/.zsve-stamp"
  fi
  PY="$ZSVE_VENV/bin/python"
  export PY
}

zsve_is_comfy() { [ -f "$1/comfy/model_management.py" ] && [ -f "$1/execution.py" ]; }

zsve_find_comfyui() {
  local cand
  if [ -n "${COMFYUI_PATH:-}" ]; then
    if zsve_is_comfy "$COMFYUI_PATH"; then export COMFYUI_PATH; return 0; fi
    echo "[zsve] COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no comfy/model_management.py)." >&2
    return 1
  fi
  cand="$(cd "$ZSVE_ROOT/../.." 2>/dev/null && pwd || true)"
  if [ "$(basename "$(dirname "$ZSVE_ROOT")")" = "custom_nodes" ] && zsve_is_comfy "$cand"; then
    COMFYUI_PATH="$cand"; export COMFYUI_PATH; return 0
  fi
  if zsve_is_comfy "$HOME/comfy/ComfyUI"; then
    COMFYUI_PATH="$HOME/comfy/ComfyUI"; export COMFYUI_PATH; return 0
  fi
  # Last resort: a checkout of the pinned version, where the network allows it.
  local dest="$HOME/.cache/zero-shot-video-edit/ComfyUI"
  if zsve_is_comfy "$dest"; then COMFYUI_PATH="$dest"; export COMFYUI_PATH; return 0; fi
  echo "[zsve] ComfyUI not found; trying a checkout of $ZSVE_COMFYUI_REF into $dest" >&2
  if git clone -q https://github.com/Comfy-Org/ComfyUI "$dest" 2>/dev/null \
      && git -C "$dest" checkout -q "$ZSVE_COMFYUI_REF" 2>/dev/null; then
    COMFYUI_PATH="$dest"; export COMFYUI_PATH; return 0
  fi
  rm -rf "$dest"
  cat >&2 <<MSG
[zsve] ERROR: ComfyUI was not found and could not be checked out.
  Provide one of:
    - COMFYUI_PATH=/path/to/ComfyUI (a checkout containing comfy/ and execution.py)
    - this pack placed in ComfyUI/custom_nodes/
    - a ComfyUI checkout at ~/comfy/ComfyUI (comfy-cli's default workspace)
  Tested against ComfyUI commit $ZSVE_COMFYUI_REF (v0.3.64).
MSG
  return 1
}
