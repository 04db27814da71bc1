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

# The requirements of a ComfyUI checkout itself (its requirements.txt), minus what the venv pins or headless tests
# never import: torch/torchvision/torchaudio (pinned above, torchaudio has no matching build) and the UI's
# frontend, workflow-templates and embedded-docs packages. Installed per checkout (a newer ComfyUI needs e.g.
# comfy-kitchen), keyed by the filtered list so pip runs again only when those requirements change.
ZSVE_COMFY_REQ_SKIP='^(torch|torchvision|torchaudio|comfyui-frontend-package|comfyui-workflow-templates.*|comfyui-embedded-docs)$'

zsve_comfy_requirements_list() {
  # Prints the checkout's requirements, filtered, one a line.
  local req="$1/requirements.txt" line name
  [ -f "$req" ] || return 0
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line%%#*}"; line="$(echo "$line" | tr -d '[:space:]')"
    [ -n "$line" ] || continue
    [[ "$line" == -* ]] && continue
    name="$(echo "$line" | sed -E 's/[<>=!~;\[].*$//' | tr '[:upper:]_' '[:lower:]-')"
    [[ "$name" =~ $ZSVE_COMFY_REQ_SKIP ]] && continue
    echo "$line"
  done < "$req"
}

zsve_comfy_requirements() {
  # Installs what the ComfyUI checkout $1 needs into the venv (zsve_venv first); torch/torchvision stay pinned.
  local list stamp marker tmp
  list="$(zsve_comfy_requirements_list "$1")"
  [ -n "$list" ] || return 0
  stamp="$(printf '%s\n%s\n' "$ZSVE_TORCH" "$list" | sha256sum | cut -c1-16)"
  marker="$ZSVE_VENV/.zsve-comfy-req-$stamp"
  [ -f "$marker" ] && return 0
  echo "[zsve] installing the requirements of $1 into $ZSVE_VENV" >&2
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2086
  printf '%s\n' $ZSVE_TORCH > "$tmp/constraints.txt"
  printf '%s\n' "$list" > "$tmp/requirements.txt"
  if ! "$ZSVE_VENV/bin/python" -m pip install -q -c "$tmp/constraints.txt" -r "$tmp/requirements.txt" >&2; then
    rm -rf "$tmp"
    echo "[zsve] ERROR: could not install the requirements of $1 (see pip's message above)." >&2
    return 1
  fi
  rm -rf "$tmp"
  echo "$list" > "$marker"
}

zsve_comfy_version() {
  # The version a ComfyUI checkout declares (comfyui_version.py, else pyproject.toml), or "unknown".
  local v=""
  [ -f "$1/comfyui_version.py" ] && v="$(sed -nE 's/^__version__ *= *["'"'"']([^"'"'"']+)["'"'"'].*/\1/p' "$1/comfyui_version.py" | head -1)"
  [ -z "$v" ] && [ -f "$1/pyproject.toml" ] && v="$(sed -nE 's/^version *= *"([^"]+)".*/\1/p' "$1/pyproject.toml" | head -1)"
  echo "${v:-unknown}"
}

zsve_extra_comfyuis() {
  # The further ComfyUI checkouts for the compatibility pass, one a line: COMFYUI_EXTRA_PATHS (colon-separated;
  # set but empty: none), else every other ~/comfy/ComfyUI* directory that is a ComfyUI checkout.
  local main cand real seen=""
  main="$(cd "$COMFYUI_PATH" && pwd -P)"
  if [ -n "${COMFYUI_EXTRA_PATHS+x}" ]; then
    local IFS=:
    for cand in $COMFYUI_EXTRA_PATHS; do
      [ -n "$cand" ] || continue
      if ! zsve_is_comfy "$cand"; then
        echo "[zsve] COMFYUI_EXTRA_PATHS: $cand is not a ComfyUI checkout (no comfy/model_management.py)." >&2
        return 1
      fi
      real="$(cd "$cand" && pwd -P)"
      [ "$real" = "$main" ] && continue
      case ":$seen:" in *":$real:"*) continue ;; esac
      seen="$seen:$real"; echo "$real"
    done
    return 0
  fi
  for cand in "$HOME"/comfy/ComfyUI*; do
    [ -d "$cand" ] && zsve_is_comfy "$cand" || continue
    real="$(cd "$cand" && pwd -P)"
    [ "$real" = "$main" ] && continue
    echo "$real"
  done
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

zsve_browser() {
  # What tests/test_browser.py needs, installed where missing (quick when present; ZSVE_BROWSER=0 skips it):
  # Debian's chromium (apt, as root), Playwright (PyPI; it drives the system browser, never downloads one) and the
  # frontend package ComfyUI's requirements.txt pins (plus spandrel, without which the frontend 1.27 breaks the
  # checkpoint loader's widget: it comes with the checkout's requirements). A failure here only makes the browser
  # test skip, saying what is missing.
  [ "${ZSVE_BROWSER:-1}" = "0" ] && return 0
  local chromium="${ZSVE_CHROMIUM:-/usr/bin/chromium}" want have
  if [ ! -x "$chromium" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[zsve] installing chromium (apt) for the browser test" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
           >/dev/null 2>&1; }; } || echo "[zsve] could not install chromium: the browser test will skip" >&2
  fi
  want="$(sed -nE 's/^comfyui-frontend-package==([^ #]+).*/\1/p' "$1/requirements.txt" 2>/dev/null | head -1)"
  # present and the pinned version (checkouts pin different frontends; the venv holds one): nothing to do
  have="$("$ZSVE_VENV/bin/python" - 2>/dev/null <<'PYEOF'
import importlib.metadata as m
import importlib.util as u
ok = all(u.find_spec(x) for x in ("playwright", "spandrel"))
try:
    print(m.version("comfyui-frontend-package") if ok else "")
except m.PackageNotFoundError:
    print("none")
PYEOF
)"
  [ -n "$have" ] && { [ -z "$want" ] || [ "$have" = "$want" ]; } && return 0
  echo "[zsve] installing playwright${want:+ and comfyui-frontend-package==$want} into $ZSVE_VENV" >&2
  "$ZSVE_VENV/bin/python" -m pip install -q playwright spandrel ${want:+"comfyui-frontend-package==$want"} >&2 \
    || echo "[zsve] could not install playwright / the frontend: the browser test will skip" >&2
}

zsve_setup() {
  # Everything a project command needs: ComfyUI located, the venv with its requirements. Exports PY, COMFYUI_PATH.
  zsve_find_comfyui
  zsve_venv
  zsve_comfy_requirements "$COMFYUI_PATH"
  zsve_browser "$COMFYUI_PATH"
}
