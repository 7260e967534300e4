#!/usr/bin/env bash
# Fuzzes every decoder of bytes from outside (fuzz/, see docs/reliability.md "Fuzzing"):
# builds the targets with cargo-fuzz on the stable toolchain, runs each for RUNS inputs
# under libFuzzer, one at a time with one job, and prints per target the inputs tried, the
# crashes and the time taken. Every input that once crashed a target (fuzz/regressions/)
# is run first. Exits non-zero if any target crashed, hung or went over the memory limits;
# the input that did it is kept in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh                      every target, 10,000,000 inputs each
#   scripts/fuzz.sh -n 100000 presence   one target, 100,000 inputs
#   scripts/fuzz.sh -t 600               every target for 10,000,000 inputs or 600 s, if sooner
#   scripts/fuzz.sh -m                   then merge what was found into fuzz/corpus (minimized)
#
# Environment: RUNS (as -n), RSS_LIMIT_MB (512), MALLOC_LIMIT_MB (64: the most one
# allocation may take), TIMEOUT (10: seconds one input may take), MAX_LEN (1024 bytes),
# FUZZ_BIN (a directory of targets built before: no build).
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-10000000}
RSS_LIMIT_MB=${RSS_LIMIT_MB:-512}
MALLOC_LIMIT_MB=${MALLOC_LIMIT_MB:-64}
TIMEOUT=${TIMEOUT:-10}
MAX_LEN=${MAX_LEN:-1024}
SECONDS_EACH=0
MERGE=0
while getopts "n:t:mh" option; do
    case $option in
        n) RUNS=$OPTARG ;;
        t) SECONDS_EACH=$OPTARG ;;
        m) MERGE=1 ;;
        *) sed -n '2,17p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

ALL=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^kiwimq-fuzz$')
TARGETS=${*:-$ALL}

if ! command -v cargo-fuzz > /dev/null; then
    cargo install cargo-fuzz --version ^0.13 --locked
fi
# cargo-fuzz passes -Z flags to rustc; RUSTC_BOOTSTRAP lets the stable compiler take them.
# No sanitizer (kiwimq has no unsafe code; the limits are checked by fuzz/src/lib.rs), but
# debug assertions on: an arithmetic overflow is a crash.
export RUSTC_BOOTSTRAP=1
if [ -n "${FUZZ_BIN:-}" ]; then
    BIN=$FUZZ_BIN # targets built before (copied aside, so a rebuild meanwhile is harmless)
else
    cargo fuzz build --fuzz-dir fuzz --sanitizer none --debug-assertions
    BIN=fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release
fi
export KIWIMQ_FUZZ_MALLOC_LIMIT_MB=$MALLOC_LIMIT_MB

failed=0
summary=()
for target in $TARGETS; do
    corpus=fuzz/corpus/$target
    found=fuzz/corpus-new/$target
    artifacts=fuzz/artifacts/$target
    log=fuzz/artifacts/$target.log
    mkdir -p "$corpus" "$found" "$artifacts"
    echo "== $target: $RUNS inputs (log: $log)"
    start=$(date +%s)
    stamp=$(mktemp)
    status=0
    : > "$log"
    # Every input that once crashed this target, run first, whole (fuzzing truncates an
    # input to MAX_LEN).
    regressions=fuzz/regressions/$target
    if [ -d "$regressions" ]; then
        "$BIN/$target" -rss_limit_mb="$RSS_LIMIT_MB" -malloc_limit_mb="$MALLOC_LIMIT_MB" \
            -timeout="$TIMEOUT" -artifact_prefix="$artifacts/" "$regressions"/* \
            >> "$log" 2>&1 || status=$?
        if [ "$status" -ne 0 ]; then
            echo "a regression input crashes $target again (see $log)"
        fi
    fi
    # New inputs go to corpus-new/ (the first directory); the kept corpus is only read.
    "$BIN/$target" -runs="$RUNS" -max_total_time="$SECONDS_EACH" -rss_limit_mb="$RSS_LIMIT_MB" \
        -malloc_limit_mb="$MALLOC_LIMIT_MB" -timeout="$TIMEOUT" -max_len="$MAX_LEN" \
        -artifact_prefix="$artifacts/" -print_final_stats=1 \
        "$found" "$corpus" >> "$log" 2>&1 || status=$?
    seconds=$(( $(date +%s) - start ))
    # The journal target's scratch directory (it replays into real files).
    rm -rf /dev/shm/kiwimq-fuzz-journal-* "${TMPDIR:-/tmp}"/kiwimq-fuzz-journal-*
    tried=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    crashes=$(find "$artifacts" -type f -newer "$stamp" | wc -l)
    rm -f "$stamp"
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        crashes=$(( crashes > 0 ? crashes : 1 ))
        grep -m1 -E "^==[0-9]+== ERROR|panicked at|==kiwimq-fuzz==|deadly signal|timeout|out-of-memory" "$log" || true
    fi
    if [ "$MERGE" -eq 1 ]; then
        merged=$(mktemp -d)
        # A set cover of the edges (not of their hit counts): a few hundred inputs a target.
        "$BIN/$target" -set_cover_merge=1 -use_counters=0 -max_len="$MAX_LEN" \
            -rss_limit_mb="$RSS_LIMIT_MB" \
            -timeout="$TIMEOUT" "$merged" "$corpus" "$found" > "$log.merge" 2>&1
        rm -rf "$corpus" && mv "$merged" "$corpus" && rm -rf "$found"
    fi
    line=$(printf '%-24s %12s inputs %8s exec/s %3s crashes %6ss' \
        "$target" "${tried:-?}" "${speed:-?}" "$crashes" "$seconds")
    echo "$line"
    summary+=("$line")
done

echo
echo "target                         inputs tried   exec/s   crashes   time"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "FAILED: a target crashed, hung or went over a limit (fuzz/artifacts/)" >&2
    exit 1
fi
