#!/usr/bin/env bash
# Checks the ingest's OpenAPI document against the real ingest (README, "Operate"):
#   1. starts redis-server on a free port, applies the migrations, starts gapless-ingest
#      (the debug binaries of ${GAPLESS_BIN_DIR:-target/debug});
#   2. fetches GET /openapi.json and validates it with openapi-spec-validator;
#   3. runs schemathesis against that ingest with the document: generated and mutated
#      requests to every operation, every check (no 5xx, every answer's status, headers and
#      body as the document says, auth enforced, schema-violating requests refused; see
#      scripts/openapi/schemathesis.toml for the one exception).
# Installs the Python tools into a virtualenv under the target directory (pinned versions)
# the first time. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
bin_dir="${GAPLESS_BIN_DIR:-$target_dir/debug}"
venv="$target_dir/openapi-venv"
SCHEMATHESIS_VERSION=4.32.5
VALIDATOR_VERSION=0.9.0

for b in gapless gapless-ingest; do
  [ -x "$bin_dir/$b" ] || { echo "$bin_dir/$b is missing: run cargo build --workspace first" >&2; exit 1; }
done

if [ ! -x "$venv/bin/schemathesis" ] \
  || ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    if command -v apt-get >/dev/null 2>&1; then
      SUDO=""
      if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    else
      echo "python3 with venv is needed: install python3-venv and re-run" >&2
      exit 1
    fi
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "schemathesis==$SCHEMATHESIS_VERSION" "openapi-spec-validator==$VALIDATOR_VERSION"
fi

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work" --save '' --appendonly no \
  --logfile "$work/redis.log" &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
"$bin_dir/gapless" migrate --redis "redis://127.0.0.1:$redis_port" >/dev/null

key="openapi-check-key"
ingest_port="$(free_port)"
# Failed authentications are not rate limited here: schemathesis sends many requests
# without a key or with a wrong one, and each must get its 401 or 403, not a 429.
GAPLESS_LOG=warn "$bin_dir/gapless-ingest" --listen "127.0.0.1:$ingest_port" \
  --redis "redis://127.0.0.1:$redis_port" --api-keys "$key" --auth-failures-per-s 0 \
  2>"$work/ingest.log" &
pids+=($!)
base="http://127.0.0.1:$ingest_port"
for _ in $(seq 200); do curl -sf "$base/readyz" >/dev/null 2>&1 && break; sleep 0.05; done

curl -sf "$base/openapi.json" -o "$work/openapi.json"
"$venv/bin/openapi-spec-validator" "$work/openapi.json"
echo "ok    openapi.json: a valid OpenAPI document ($(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(len(d['paths']), 'paths,', sum(len(v) for v in d['paths'].values()), 'operations')" "$work/openapi.json"))"

(
  cd scripts/openapi
  PYTHONPATH=. "$OLDPWD/$venv/bin/schemathesis" --config-file schemathesis.toml run \
    "$base/openapi.json" \
    --header "Authorization: Bearer $key" \
    --max-examples "${OPENAPI_MAX_EXAMPLES:-25}" \
    --seed "${OPENAPI_SEED:-17}" \
    --report-dir "$work/reports" \
    --no-color
) >"$work/schemathesis.log" 2>&1 || {
  cat "$work/schemathesis.log"
  echo "--- ingest log" >&2
  tail -50 "$work/ingest.log" >&2
  echo "FAIL  schemathesis found answers off the document (above)" >&2
  exit 1
}
grep -E 'Test cases:' -A1 "$work/schemathesis.log" | tail -1 | sed 's/^ */ok    schemathesis: /'
if grep -q ' 5[0-9][0-9] ' "$work/ingest.log"; then
  echo "FAIL  the ingest logged a 5xx during the run" >&2
  exit 1
fi
echo "ok    check-openapi: the document is valid and the ingest answers as it says"
