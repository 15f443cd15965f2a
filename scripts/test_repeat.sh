#!/usr/bin/env bash
# Runs the whole test command (scripts/test.sh) N times in a row, each time in a fresh clone of
# this repository's HEAD with an empty target/ directory, and prints one line per run (pass or
# fail, wall time) and a summary. It shows the suite passes every time, not just once.
#
#   scripts/test_repeat.sh [N]            # N runs, default 5; stops at nothing, reports all
#   KEEP=1 scripts/test_repeat.sh 3       # keep each clone (and its target/) instead of deleting it
#   REPEAT_DIR=/path scripts/test_repeat.sh   # where clones and logs go (default target/repeat)
#
# Only committed work is tested: the clone is of HEAD. Logs stay in $REPEAT_DIR/run-K.log. The
# cargo registry cache (~/.cargo) is shared, as a package mirror would be; build outputs are not.
# Exit status: 0 when every run passed.
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${1:-5}"
case "$runs" in
    '' | *[!0-9]*) echo "test_repeat.sh: N must be a number, got $runs" >&2; exit 2 ;;
esac
root=$(pwd)
dir="${REPEAT_DIR:-$root/target/repeat}"
mkdir -p "$dir"
commit=$(git rev-parse HEAD)
summary="$dir/summary.txt"
printf 'commit %s, %s runs, started %s\n' "$commit" "$runs" "$(date -u +%FT%TZ)" | tee "$summary"

passed=0
for k in $(seq 1 "$runs"); do
    clone="$dir/clone-$k"
    log="$dir/run-$k.log"
    rm -rf "$clone"
    git clone -q --no-hardlinks "$root" "$clone"
    git -C "$clone" checkout -q "$commit"
    start=$(date +%s)
    if (cd "$clone" && scripts/test.sh) >"$log" 2>&1; then
        result=PASS
        passed=$((passed + 1))
    else
        result=FAIL
    fi
    secs=$(($(date +%s) - start))
    line=$(printf 'run %d: %s in %dm%02ds (log %s)' "$k" "$result" $((secs / 60)) $((secs % 60)) "$log")
    if [ "$result" = FAIL ]; then
        # The first failing test, for the summary; the whole story is in the log.
        first=$(grep -m1 -E '^FAILED |^FAIL  |panicked at|^error(\[E[0-9]+\])?: |test result: FAILED' "$log" || true)
        line="$line: ${first:-see log}"
    fi
    echo "$line" | tee -a "$summary"
    [ -n "${KEEP:-}" ] || rm -rf "$clone"
done
printf '%d of %d runs passed\n' "$passed" "$runs" | tee -a "$summary"
[ "$passed" -eq "$runs" ]
