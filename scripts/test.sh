#!/usr/bin/env bash
# The whole check, one step after another, stopping at the first that fails: environment, lint, types, tests.
# Arguments go to pytest (e.g. `bash scripts/test.sh -x tests/test_onnx.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
current="start"
step() { current="$1"; printf '\n==> %s\n' "$current"; }
trap 'status=$?; if [ "$status" -ne 0 ]; then printf "\n==> FAILED in step: %s (exit %s)\n" "$current" "$status" >&2; fi' EXIT

step "setup (scripts/setup.sh)"
bash scripts/setup.sh
step "lint (ruff check)"
.venv/bin/ruff check elite elite_cli flows tests benchmarks
step "types (mypy)"
.venv/bin/mypy elite elite_cli flows
step "browser (Debian's chromium, for the report's page checks in tests/browser.py)"
if [ -z "${ELITE_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  as_root=(env DEBIAN_FRONTEND=noninteractive); [ "$(id -u)" -eq 0 ] || as_root=(sudo -n "${as_root[@]}")
  "${as_root[@]}" apt-get install -y -q chromium \
    || { "${as_root[@]}" apt-get update -q && "${as_root[@]}" apt-get install -y -q chromium; }
fi
step "tests (pytest${*:+ $*})"
.venv/bin/python -m pytest "$@"
