#!/usr/bin/env bash
# `make fuzz`: builds lockstep's fuzz targets (fuzz/: libFuzzer through libfuzzer-sys, with the
# sanitizer-coverage flags `cargo fuzz run --sanitizer none` uses, on stable Rust; no
# cargo-fuzz needed) and runs each for FUZZ_SECONDS (default 600), one after another.
#
#   FUZZ_SECONDS=60 FUZZ_TARGETS="gguf suite" scripts/fuzz.sh
#   FUZZ_ARGS="-fork=1 -ignore_crashes=1" scripts/fuzz.sh   # keep going after a crash
#
# Each target starts from the committed seeds (fuzz/corpus/<target>/, never written) and
# keeps what it finds in fuzz/work/<target>/ (ignored by git); a crashing, hanging or
# memory-exhausting input is saved in fuzz/artifacts/<target>/. Reproduce one with
# `fuzz/target/<host>/release/<target> <file>`. Exit status 1 when any target failed.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL="gguf safetensors hf_config tokenizer chat_template lora_config suite trace arrays"
TARGETS=${FUZZ_TARGETS:-$ALL}
SECS=${FUZZ_SECONDS:-600}
: "${PYO3_PYTHON:=${LOCKSTEP_VENV:-$PWD/.venv}/bin/python}"
export PYO3_PYTHON

host=$(rustc -vV | sed -n 's/^host: //p')
# --target: the flags reach the targets' code only, never build scripts or proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
bins=()
for t in $TARGETS; do bins+=(--bin "$t"); done
cargo build --release --locked --manifest-path fuzz/Cargo.toml --target "$host" --target-dir fuzz/target "${bins[@]}"
[ "$SECS" = 0 ] && exit 0

failed=()
summary=()
for t in $TARGETS; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    log="fuzz/work/$t.log"
    echo "fuzz: $t for ${SECS}s (log: $log)"
    set +e
    # -timeout: one input taking 10 s is a hang; -rss_limit_mb: the default 2 GiB.
    "fuzz/target/$host/release/$t" "fuzz/work/$t" "fuzz/corpus/$t" -max_total_time="$SECS" \
        -timeout=10 -rss_limit_mb=2048 -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 \
        ${FUZZ_ARGS:-} >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    corpus=$(ls "fuzz/work/$t" | wc -l)
    crashes=$(ls "fuzz/artifacts/$t" | wc -l)
    line="$t: rc=$rc execs=${execs:-?} corpus=$corpus artifacts=$crashes"
    echo "fuzz: $line"
    summary+=("$line")
    if [ "$rc" != 0 ]; then
        failed+=("$t")
        grep -m1 -A12 -E "panicked|ERROR: libFuzzer|==ERROR" "$log" || tail -20 "$log"
    fi
done
printf 'fuzz summary (%ss each):\n' "$SECS"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failed: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
