#!/usr/bin/env bash
# The project's test command: venv + ComfyUI discovery + ruff + pytest, then a compatibility pass on every
# further ComfyUI checkout.
# Usage: bash scripts/test.sh [pytest args...]
#
# 1. The whole suite (or the pytest args given) on the ComfyUI found: COMFYUI_PATH, else the ComfyUI whose
#    custom_nodes/ holds this checkout, else ~/comfy/ComfyUI (scripts/env.sh).
# 2. Without pytest args, a compatibility pass (the tests marked `compat`: the pack loads, node schemas, the
#    shipped workflows headless, context windows, the attention dispatcher) on each further checkout:
#    COMFYUI_EXTRA_PATHS (colon-separated; set it empty for none), else every other ~/comfy/ComfyUI* that is a
#    ComfyUI checkout. ZSVE_COMPAT=0 skips the pass, ZSVE_COMPAT=1 runs it even with pytest args.
# One summary line per ComfyUI, then a closing line with the totals; the exit status is non-zero if any failed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
zsve_setup
echo "[zsve] ComfyUI: $COMFYUI_PATH ($(zsve_comfy_version "$COMFYUI_PATH"))" >&2
cd "$ZSVE_ROOT"
"$PY" -m ruff check .

# pytest must not treat the pack root as a test package: its __init__.py is the ComfyUI entry point (relative
# imports), and a checkout in a directory whose name has a dot (e.g. mktemp's /tmp/tmp.XXXX) cannot be
# imported as a package, which failed every test. So the collection starts at tests/ (rootdir, confcutdir and
# the path given explicitly; pyproject's testpaths would start it at the root again).
has_path=0
for a in "$@"; do [[ -e "${a%%::*}" ]] && has_path=1; done
compat="${ZSVE_COMPAT:-}"
[[ -z "$compat" ]] && { [[ $# == 0 ]] && compat=1 || compat=0; }
[[ $has_path == 1 ]] || set -- "$@" tests

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
summaries=()
total_passed=0
total_failed=0
status=0

# run_pytest LABEL COMFYUI LOG [pytest args...]: runs pytest against COMFYUI (output shown and kept in LOG),
# adds its counts to the totals and a summary line.
run_pytest() {
  local label="$1" comfy="$2" log="$3"; shift 3
  local rc=0 t0 secs line passed failed errors
  t0=$(date +%s)
  COMFYUI_PATH="$comfy" "$PY" -m pytest -q --rootdir=tests --confcutdir=tests "$@" 2>&1 | tee "$log" || rc=$?
  secs=$(( $(date +%s) - t0 ))
  line="$(grep -E '^=*[^=]*(passed|failed|error|no tests ran)' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')"
  passed=$(echo "$line" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || true)
  failed=$(echo "$line" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+' || true)
  errors=$(echo "$line" | grep -oE '[0-9]+ errors?' | grep -oE '[0-9]+' || true)
  passed=${passed:-0}; failed=$(( ${failed:-0} + ${errors:-0} ))
  if [[ $rc != 0 && $failed == 0 ]]; then failed=1; fi   # collection/internal error, or no test selected
  total_passed=$(( total_passed + passed )); total_failed=$(( total_failed + failed ))
  [[ $rc == 0 ]] || status=1
  [[ -n "$line" ]] || line="no pytest result (exit status $rc)"
  summaries+=("[zsve] ComfyUI $(zsve_comfy_version "$comfy") (${comfy/#$HOME/\~}): $label${label:+ }$line [${secs}s]")
}

run_pytest "" "$COMFYUI_PATH" "$logs/main.log" "$@"

if [[ $compat == 1 ]]; then
  extras=()
  if found="$(zsve_extra_comfyuis)"; then
    [[ -z "$found" ]] || mapfile -t extras <<< "$found"
  else
    summaries+=("[zsve] COMFYUI_EXTRA_PATHS names a directory that is not a ComfyUI checkout: compat not run")
    total_failed=$(( total_failed + 1 )); status=1
  fi
  for extra in "${extras[@]}"; do
    [[ -n "$extra" ]] || continue
    echo "[zsve] compatibility pass: ComfyUI $(zsve_comfy_version "$extra") at $extra" >&2
    if ! zsve_comfy_requirements "$extra"; then
      summaries+=("[zsve] ComfyUI $(zsve_comfy_version "$extra") (${extra/#$HOME/\~}): compat not run (requirements)")
      total_failed=$(( total_failed + 1 )); status=1
      continue
    fi
    run_pytest compat "$extra" "$logs/compat.log" -m compat tests
  done
fi

echo
printf '%s\n' "${summaries[@]}"
echo "total: $total_passed passed, $total_failed failed"
exit $status
