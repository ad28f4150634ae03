#!/usr/bin/env bash
# Runs every check CI runs: installs redis-server when missing (tests start their own
# redis-server processes on free ports), then format check, clippy and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is missing: installing it with apt-get" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
    # The tests start their own servers; the packaged service is not needed.
    $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
  else
    echo "redis-server is not installed and apt-get is not available: install Redis 7 (redis-server, redis-cli, redis-benchmark) and re-run" >&2
    exit 1
  fi
fi
redis-server --version

# The openssl CLI makes fresh keys for the RS256/ES256 token tests.
if ! command -v openssl >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl >/dev/null
  else
    echo "the openssl CLI is not installed: install it and re-run" >&2
    exit 1
  fi
fi

# The browser tests drive Debian's chromium through playwright-core (pinned in
# edge/tests/browser/package-lock.json; it never downloads a browser).
if [ ! -x /usr/bin/chromium ] || ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "chromium or node is missing: installing them with apt-get" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    pkgs="chromium"
    command -v node >/dev/null 2>&1 || pkgs="$pkgs nodejs"
    command -v npm >/dev/null 2>&1 || pkgs="$pkgs npm"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $pkgs >/dev/null
  else
    echo "chromium and node are not installed and apt-get is not available: install them and re-run" >&2
    exit 1
  fi
fi
# `npm ci` where the lock changed since the last install: the edge's browser tests and the
# browser client (clients/js: typescript, esbuild, playwright-core, pinned in its lock).
for node_dir in edge/tests/browser clients/js; do
  if [ ! -f "$node_dir/node_modules/.package-lock.json" ] \
    || ! cmp -s "$node_dir/package-lock.json" "$node_dir/node_modules/.gapless-lock"; then
    (cd "$node_dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
    cp "$node_dir/package-lock.json" "$node_dir/node_modules/.gapless-lock"
  fi
done
# The committed bundle `gapless dev` embeds must be what the sources build to.
(cd clients/js && npm run --silent check)

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The test suite: cargo-nextest where installed (each test in its own process, test binaries
# run side by side: the suite is mostly waiting on real processes, so this is several minutes
# shorter), plus the doc tests, which nextest does not run; else cargo test.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked
fi

# The browser client's tests (clients/js): unit tests of its state machine, and end-to-end
# tests in headless Chromium against real redis-server, ingest and edges started from the
# debug binaries.
cargo build --workspace --locked
target_dir="${CARGO_TARGET_DIR:-target}"
bin_dir="$(realpath -m "$target_dir")/debug"
(cd clients/js && GAPLESS_BIN_DIR="$bin_dir" npm test)

# The operations files (compose.yaml, deploy/): compose validated with docker-compose, the
# Prometheus config and alert rules with promtool (rule unit tests included), and every
# dashboard and alert query run against a real Prometheus scraping a real system of the
# debug binaries under real traffic (about 15 s; installs prometheus and docker-compose
# from apt when missing).
GAPLESS_BIN_DIR="$bin_dir" ./scripts/check-deploy.sh

# The ingest's OpenAPI document (GET /openapi.json, generated from the handlers' types):
# validated with openapi-spec-validator, then schemathesis against a real ingest with it
# (no 5xx, every answer as documented; about 10 s, plus a one-time pip install into
# target/openapi-venv).
GAPLESS_BIN_DIR="$bin_dir" ./scripts/check-openapi.sh

# The CI-sized fault drill (about 2 minutes, every fault kind at least once) against the
# debug binaries the tests just built: exits non-zero on any lost, out-of-order or
# unexplained duplicate notification.
"$target_dir/debug/gapless-bench" drill --duration 100s --devices 200 --users 80 --rate 100 --edges 3 \
  --json "$target_dir/drill-ci.json"

# The same drill on a local Redis Cluster (3 primaries, 3 replicas; the ingest at
# --min-replicas-ack 1), with the slot-migration and primary-failover fault kinds: about 80 s.
"$target_dir/debug/gapless-bench" drill --cluster --duration 80s --devices 120 --users 48 --rate 80 \
  --edges 3 --json "$target_dir/drill-cluster-ci.json"

# A smoke run of the load generator (2,000 connections from two load processes, 10 s at
# 500 notifications/s): it must complete with nothing lost. No timing thresholds here;
# performance is measured with release builds (BENCHMARKS.md).
"$target_dir/debug/gapless-bench" load --scenario steady --connections 2000 --procs 2 \
  --duration 10 --rate 500 --json "$target_dir/load-smoke.json" --html "$target_dir/load-smoke.html"

# Every decoder of network or Redis input under libFuzzer: installs cargo-fuzz when missing,
# builds the targets of fuzz/ and runs each for a fixed number of executions from its seeds
# (no time thresholds); exits non-zero on any crash. Long runs: RELIABILITY.md, "Fuzzing".
./scripts/fuzz.sh smoke
