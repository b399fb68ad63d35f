#!/usr/bin/env bash
# The test step of `make test`: every test binary runs even when one fails (cargo's
# --no-fail-fast; without it the first failing binary hides every later one), then a summary
# of what failed, binary by binary, so one failure never hides another.
#
# Arguments go to `cargo test` (the Makefile passes --release --locked --workspace).
# Exit status: cargo's (0 when everything passed).
set -uo pipefail
log="$(mktemp -t lockstep-test.XXXXXX)"
trap 'rm -f "$log"' EXIT

start=$SECONDS
"${CARGO:-cargo}" test --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# Test names per binary: cargo prints `Running tests/NAME.rs (target/...)` (or `Doc-tests
# CRATE`) before a binary's output and `test NAME ... FAILED` for each failing test.
summary="$(awk '
  /^ *Running / { bin = $2; next }
  /^ *Doc-tests / { bin = "doc-tests " $2; next }
  / \.\.\. FAILED$/ { sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); print "  " bin "  " $0 }
' "$log")"
passed="$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')"
failed="$(grep -Eo '; [0-9]+ failed' "$log" | awk '{s += $2} END {print s + 0}')"

echo
echo "== make test: $passed passed, $failed failed, in $((SECONDS - start)) s (--no-fail-fast: every test binary ran)"
if [[ $status -ne 0 ]]; then
  if [[ -n "$summary" ]]; then
    echo "== failing tests (binary, test):"
    echo "$summary"
  else
    echo "== cargo test exited $status before a test failed (a build error? see above)"
  fi
fi
exit "$status"
