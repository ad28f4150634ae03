#!/usr/bin/env bash
# Runs the whole system on this machine (README, "The two commands"): installs redis-server
# when it is missing (apt-get, as root or with sudo), builds the release binaries and runs
# `gapless dev`, which starts Redis with AOF under ./.gapless/, applies the migrations and
# serves the ingest, an edge and the demo page. Arguments go to `gapless dev`
# (`scripts/dev.sh --help` lists them).
set -euo pipefail
cd "$(dirname "$0")/.."

# With --redis (or GAPLESS_REDIS_URL), gapless dev starts no Redis of its own.
uses_own_redis=1
for arg in "$@"; do
  case "$arg" in --redis|--redis=*) uses_own_redis=0 ;; esac
done
if [ -n "${GAPLESS_REDIS_URL:-}" ]; then uses_own_redis=0; fi

if [ "$uses_own_redis" -eq 1 ] && ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; then
    echo "redis-server is missing: installing it with apt-get" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    # `gapless dev` starts its own redis-server on its own port; the packaged service is not
    # needed.
    $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
  else
    echo "redis-server is not installed, and this script cannot install it here." >&2
    echo "Install Redis 7 or later so that redis-server is on PATH, then run this again:" >&2
    echo "  Debian/Ubuntu: sudo apt-get install redis-server" >&2
    echo "  Fedora:        sudo dnf install redis" >&2
    echo "  macOS:         brew install redis" >&2
    echo "Or point gapless dev at a Redis you run: scripts/dev.sh --redis redis://host:6379" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust 1.95 or later (https://rustup.rs), then run this again" >&2
  exit 1
fi

exec cargo run --release --locked --quiet --bin gapless -- dev "$@"
