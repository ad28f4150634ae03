#!/usr/bin/env bash
# Fuzzes every decoder of network or Redis input (fuzz/, cargo-fuzz + libFuzzer).
#
#   scripts/fuzz.sh smoke            build all targets, then 20,000 runs of each from its seeds
#   scripts/fuzz.sh long [TARGET...] 10 million runs or 30 minutes of each (all by default)
#   scripts/fuzz.sh list             the targets
#
# Works on the stable toolchain: targets are built with `--sanitizer none` (AddressSanitizer
# needs nightly's -Zsanitizer; the crates forbid unsafe code, so a panic is the failure that
# matters). One fuzz process runs at a time, under `nice -n ${FUZZ_NICE:-19}`.
#
# Seeds are committed under fuzz/seeds/<target>/ (`cargo run --manifest-path fuzz/Cargo.toml
# --example seeds` rewrites them); each run copies them into the working corpus
# fuzz/corpus/<target>/, which grows across runs and is not committed. A crash leaves its
# input in fuzz/artifacts/<target>/ and makes the script exit non-zero, after the other
# targets have run.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
TARGETS=(client_json server_json client_postcard server_postcard wakeup postcard_batch ids
  entry_id token batch_body)
TRIPLE=x86_64-unknown-linux-gnu
# Its own target dir, whatever CARGO_TARGET_DIR says: the instrumented builds share nothing
# with the workspace's.
TARGET_DIR="$PWD/fuzz/target"
BUILD_FLAGS=(--sanitizer none --target "$TRIPLE" --target-dir "$TARGET_DIR")
BIN_DIR="$TARGET_DIR/$TRIPLE/release"
LOG_DIR="fuzz/target/logs"
NICE="${FUZZ_NICE:-19}"

usage() {
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

ensure_cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: installing $CARGO_FUZZ_VERSION" >&2
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
  fi
  cargo fuzz --version
}

build() {
  # cargo fuzz build takes no --locked: check the committed lock file first. A crate that
  # gained a dependency leaves it out of date: CI refuses that, a developer's run updates it
  # (to be committed with the change).
  if ! cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null 2>&1; then
    if [ -n "${CI:-}" ]; then
      echo "fuzz/Cargo.lock is out of date (a crate's dependencies changed): run" >&2
      echo "  cargo metadata --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null" >&2
      echo "and commit fuzz/Cargo.lock" >&2
      exit 1
    fi
    echo "fuzz/Cargo.lock is out of date (a crate's dependencies changed): updating it; commit it" >&2
    cargo metadata --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
  fi
  local start=$SECONDS
  cargo fuzz build "${BUILD_FLAGS[@]}"
  echo "fuzz targets built in $((SECONDS - start)) s"
}

# Copies the seeds of $1 into its working corpus, keeping what earlier runs found.
prepare_corpus() {
  local t=$1 f
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "$LOG_DIR"
  for f in "fuzz/seeds/$t"/*; do
    [ -e "$f" ] || continue
    [ -e "fuzz/corpus/$t/$(basename "$f")" ] || cp "$f" "fuzz/corpus/$t/"
  done
}

RESULTS=()
FAILED=()

# Runs target $1 with the libFuzzer options that follow; records its figures.
run_target() {
  local t=$1
  shift
  prepare_corpus "$t"
  local log="$LOG_DIR/$t.log" start rc=0 crashes before new
  before=$(find "fuzz/artifacts/$t" -type f | sort)
  start=$(date +%s.%N)
  nice -n "$NICE" "$BIN_DIR/$t" "$@" -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  local secs execs rate
  secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')
  execs=$(awk '/^stat::number_of_executed_units:/ { n = $2 } END { print n + 0 }' "$log")
  # libFuzzer's own average (whole seconds), or ours for runs shorter than a second.
  rate=$(awk -v n="$execs" -v s="$secs" '/^stat::average_exec_per_sec:/ { r = $2 }
    END { if (r + 0 == 0 && s > 0) r = n / s; printf "%d", r }' "$log")
  new=$(comm -13 <(echo "$before") <(find "fuzz/artifacts/$t" -type f | sort) | sed '/^$/d')
  crashes=$(printf '%s' "$new" | grep -c . || true)
  if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
    crashes=1 # died without writing an artifact: still a failure
  fi
  RESULTS+=("$(printf '%-16s %12s %9s s %9s %8s' "$t" "$execs" "$secs" "$rate" "$crashes")")
  printf '%-16s executions %s, %s s, %s exec/s, crashes %s\n' "$t" "$execs" "$secs" "$rate" "$crashes"
  if [ "$crashes" -ne 0 ]; then
    FAILED+=("$t")
    echo "--- $t failed (exit $rc); its log, $log, ends with:" >&2
    tail -n 40 "$log" >&2
    printf '%s\n' "$new" | sed '/^$/d' | while read -r a; do
      echo "artifact $a (hex): $(od -An -tx1 -v "$a" | tr -d ' \n' | head -c 4000)" >&2
    done
  fi
}

report() {
  echo
  printf '%-16s %12s %11s %9s %8s\n' target executions duration exec/s crashes
  printf '%s\n' "${RESULTS[@]}"
  if [ "${#FAILED[@]}" -ne 0 ]; then
    echo "crashes in: ${FAILED[*]} (inputs under fuzz/artifacts/, logs under $LOG_DIR/)" >&2
    exit 1
  fi
}

check_targets() {
  local t known
  for t in "$@"; do
    known=0
    for k in "${TARGETS[@]}"; do [ "$k" = "$t" ] && known=1; done
    if [ "$known" -eq 0 ]; then
      echo "unknown target $t; the targets: ${TARGETS[*]}" >&2
      exit 2
    fi
  done
}

mode="${1:-}"
[ $# -gt 0 ] && shift
case "$mode" in
  smoke)
    [ $# -eq 0 ] || usage
    ensure_cargo_fuzz
    build
    for t in "${TARGETS[@]}"; do
      run_target "$t" -runs=20000
    done
    report
    ;;
  long)
    selected=("$@")
    [ $# -gt 0 ] || selected=("${TARGETS[@]}")
    check_targets "${selected[@]}"
    ensure_cargo_fuzz
    build
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%MZ)"
    for t in "${selected[@]}"; do
      run_target "$t" -runs=10000000 -max_total_time=1800
    done
    report
    ;;
  list)
    printf '%s\n' "${TARGETS[@]}"
    ;;
  *)
    usage
    ;;
esac
