#!/usr/bin/env bash
# Installs headless Chromium (Debian's `chromium` package) for the test that opens the
# nightly report page in a real browser (harness/tests/report.rs).
# Idempotent and fast: returns at once when `chromium` (or $LOCKSTEP_CHROMIUM) is there.
# Non-interactive (CI=true, no terminal): apt-get as root, or through sudo when it needs no
# password; otherwise it says what to run and fails.
set -euo pipefail

if [[ -n "${LOCKSTEP_CHROMIUM:-}" && -x "${LOCKSTEP_CHROMIUM}" ]]; then
  exit 0
fi
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_browser: chromium is not installed and this is not a Debian-like system (no apt-get);" \
       "install Chromium and put it on PATH, or set LOCKSTEP_CHROMIUM=/path/to/chromium" >&2
  exit 1
fi
if [[ "$(id -u)" == "0" ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "setup_browser: chromium is not installed; run: sudo apt-get install -y chromium" >&2
  exit 1
fi

echo "setup_browser: installing Debian's chromium (headless browser for the report test)"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing (fresh containers) or stale: refresh once on failure.
if ! "${sudo[@]}" apt-get install -y --no-install-recommends chromium; then
  "${sudo[@]}" apt-get update
  "${sudo[@]}" apt-get install -y --no-install-recommends chromium
fi
command -v chromium >/dev/null 2>&1 || { echo "setup_browser: chromium still not on PATH after installing" >&2; exit 1; }
