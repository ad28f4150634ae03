#!/usr/bin/env bash
# Checks the deployment files (compose.yaml, deploy/) and runs the monitoring against a real
# system:
#   1. installs what it needs when missing (prometheus, which brings promtool, docker-compose,
#      redis-server, curl, python3-yaml) with apt-get, and stops the packaged Prometheus
#      service apt may start;
#   2. validates compose.yaml with `docker-compose config` (needs no Docker engine);
#   3. promtool: checks prometheus.yml and the alert rules, runs the rules' unit tests;
#   4. checks the Grafana dashboard's JSON, that every panel and query takes its data source
#      from the `datasource` variable, and the provisioning files;
#   5. starts a real system from the debug binaries (${GAPLESS_BIN_DIR:-target/debug}):
#      redis-server, `gapless migrate`, one ingest and two edges on free loopback ports, and
#      a real Prometheus scraping them with deploy/prometheus/prometheus.yml (targets and
#      scrape interval replaced) and the alert rules;
#   6. makes traffic: devices over SSE, long-poll and WebSocket (Node's built-in client, when
#      the `node` on PATH has one), single, batch and NDJSON appends, acks, resumes that
#      replay, devices leaving, and the rarer events the alerts watch: refused credentials,
#      a user connecting too often, a flood of unauthenticated connections from one address,
#      a reset (the user's log lost), a lost wakeup found by the sweep, and Redis pausing
#      writes so an append times out (a 503 and a Redis error);
#   7. asks Prometheus whether each of those events moved the counter that shows it, then
#      runs every query of the dashboard (Grafana's variables replaced) and of the alert rules
#      through its HTTP API, and fails on each one that errors or returns no series (for an
#      alert, its expression without the final threshold comparison: a healthy system fires
#      nothing, yet the query under it must find its series);
#   8. stops everything it started, whatever happened (trap on EXIT).
# One line per check. About 11 s once the packages are installed (Prometheus alone waits 5 s
# before its first scrape, overlapped with the rest). Works from any directory (it moves to
# the repository root). Loopback traffic only.
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$(date +%s%N)
bin_dir="${GAPLESS_BIN_DIR:-target/debug}"
failures=0
t_step=$t0
ok() { # one line per check, with the time it took
  local now
  now=$(date +%s%N)
  printf 'ok    %s (%d ms)\n' "$*" "$(((now - t_step) / 1000000))"
  t_step=$now
}
bad() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
die() { printf 'FAIL  %s\n' "$*"; exit 1; }
elapsed() { echo "$(( ($(date +%s%N) - t0) / 1000000 ))"; }

# --- 1. tools -----------------------------------------------------------------------------
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
pkgs=()
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || pkgs+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || pkgs+=(docker-compose)
{ command -v redis-server && command -v redis-cli; } >/dev/null 2>&1 || pkgs+=(redis-server redis-tools)
command -v curl >/dev/null 2>&1 || pkgs+=(curl)
# The YAML of the alert rules is read with Debian's python3 (docker-compose brings it too).
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import yaml' >/dev/null 2>&1 || pkgs+=(python3 python3-yaml)
if [ "${#pkgs[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "missing ${pkgs[*]} and apt-get is not available: install them and re-run"
  echo "installing ${pkgs[*]} with apt-get" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  # The checks start their own Prometheus and Redis on free ports; the packaged services
  # are not wanted (on systemd machines apt starts them; elsewhere the init script may).
  $SUDO systemctl disable --now prometheus prometheus-node-exporter redis-server >/dev/null 2>&1 || true
  for svc in prometheus redis-server; do
    if [ -x "/etc/init.d/$svc" ] && "/etc/init.d/$svc" status >/dev/null 2>&1; then
      $SUDO "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
      $SUDO update-rc.d "$svc" disable >/dev/null 2>&1 || true
    fi
  done
fi
PY=/usr/bin/python3
ok "tools: $(prometheus --version 2>&1 | head -n1 | cut -d' ' -f1,3), $(promtool --version 2>&1 | head -n1 | cut -d' ' -f1,3), docker-compose $(dpkg-query -W -f '${Version}' docker-compose 2>/dev/null || echo '(not from apt)'), $(redis-server --version | cut -d' ' -f1,3)"

# --- 2. compose.yaml ----------------------------------------------------------------------
# `config` resolves the file (anchors, defaults of the ${VARIABLES}) and validates it against
# the Compose schema; it talks to no Docker engine.
compose_out=$(docker-compose -f compose.yaml config 2>&1) || die "compose.yaml: docker-compose config: $compose_out"
services=$($PY -c 'import sys, yaml; print(" ".join(sorted(yaml.safe_load(sys.stdin)["services"])))' <<<"$compose_out")
for s in edge-1 edge-2 grafana ingest migrate prometheus redis; do
  [[ " $services " == *" $s "* ]] || bad "compose.yaml: no service $s (has: $services)"
done
for f in deploy/Dockerfile deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml \
  deploy/grafana/provisioning/datasources deploy/grafana/provisioning/dashboards \
  deploy/grafana/dashboards/gapless.json; do
  [ -e "$f" ] || bad "compose.yaml refers to $f, which is missing"
done
compose_v2=""
if docker compose version >/dev/null 2>&1; then
  out=$(docker compose -f compose.yaml config -q 2>&1) || bad "compose.yaml: docker compose (v2) config: $out"
  compose_v2=" and docker compose v2"
fi
ok "compose.yaml: valid for docker-compose$compose_v2; services: $services"

# --- 3. promtool --------------------------------------------------------------------------
out=$(promtool check config deploy/prometheus/prometheus.yml 2>&1) || die "promtool check config: $out"
ok "promtool check config deploy/prometheus/prometheus.yml (its rule files included)"
out=$(promtool check rules deploy/prometheus/alerts.yml 2>&1) || die "promtool check rules: $out"
ok "promtool check rules deploy/prometheus/alerts.yml: $(grep -o '[0-9]* rules found' <<<"$out")"
out=$(cd deploy/prometheus && promtool test rules alerts.test.yml 2>&1) || die "promtool test rules: $out"
# Every alert says how bad it is and what to do, and its unit tests make it fire at least
# once and hold it quiet at least once.
out=$($PY - <<'EOF' 2>&1
import sys, yaml
rules = [r for g in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"] for r in g["rules"] if "alert" in r]
tests = yaml.safe_load(open("deploy/prometheus/alerts.test.yml"))["tests"]
cases = [c for t in tests for c in t.get("alert_rule_test", [])]
problems = []
for r in rules:
    name = r["alert"]
    if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
        problems.append(f"{name}: no severity label (critical, warning or info)")
    for a in ("summary", "description"):
        if not r.get("annotations", {}).get(a, "").strip():
            problems.append(f"{name}: no {a} annotation")
    mine = [c for c in cases if c["alertname"] == name]
    if not any(c.get("exp_alerts") for c in mine):
        problems.append(f"{name}: no unit test where it fires")
    if not any(not c.get("exp_alerts") for c in mine):
        problems.append(f"{name}: no unit test where it must not fire")
print("\n".join(problems) or f"{len(rules)} alerts")
sys.exit(1 if problems else 0)
EOF
) || die "alert rules: $out"
ok "promtool test rules deploy/prometheus/alerts.test.yml passes; each of the $out has a severity, a summary and a description, fires in a test and stays quiet in another"

# --- 4. Grafana ---------------------------------------------------------------------------
out=$($PY - <<'EOF' 2>&1
import json, sys, yaml
problems = []
d = json.load(open("deploy/grafana/dashboards/gapless.json"))
want = {"type": "prometheus", "uid": "${datasource}"}
if d.get("uid") != "gapless" or d.get("title") != "gapless":
    problems.append("uid and title must both be 'gapless'")
variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
v = variables.get("datasource")
if not v or v.get("type") != "datasource" or v.get("query") != "prometheus":
    problems.append("no templating variable `datasource` of type datasource with query prometheus")
for name, var in variables.items():
    if var.get("type") == "query" and var.get("datasource") != want:
        problems.append(f"variable {name}: datasource is {var.get('datasource')}")
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
n = queries = 0
ids = set()
for p in panels(d.get("panels", [])):
    if p.get("id") in ids:
        problems.append(f"panel id {p.get('id')} used twice")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    n += 1
    title = p.get("title", "?")
    if p.get("datasource") != want:
        problems.append(f"panel {title!r}: datasource is {p.get('datasource')}")
    if not p.get("targets"):
        problems.append(f"panel {title!r}: no queries")
    refs = set()
    for t in p.get("targets", []):
        queries += 1
        if t.get("datasource") != want:
            problems.append(f"panel {title!r} query {t.get('refId')}: datasource is {t.get('datasource')}")
        if not t.get("expr"):
            problems.append(f"panel {title!r} query {t.get('refId')}: no expr")
        if t.get("refId") in refs:
            problems.append(f"panel {title!r}: refId {t.get('refId')} used twice")
        refs.add(t.get("refId"))
ds = yaml.safe_load(open("deploy/grafana/provisioning/datasources/prometheus.yaml"))
prom = [x for x in ds.get("datasources", []) if x.get("type") == "prometheus"]
if not prom or not prom[0].get("uid") or prom[0].get("url") != "http://prometheus:9090":
    problems.append("datasource provisioning: no prometheus datasource at http://prometheus:9090 with a uid")
dp = yaml.safe_load(open("deploy/grafana/provisioning/dashboards/gapless.yaml"))
paths = [p.get("options", {}).get("path") for p in dp.get("providers", [])]
if "/var/lib/grafana/dashboards" not in paths:
    problems.append(f"dashboard provisioning: no provider reads /var/lib/grafana/dashboards ({paths})")
compose = yaml.safe_load(open("compose.yaml"))
mounts = compose["services"]["grafana"].get("volumes", [])
for m in ("./deploy/grafana/provisioning:/etc/grafana/provisioning", "./deploy/grafana/dashboards:/var/lib/grafana/dashboards"):
    if not any(str(x).startswith(m) for x in mounts):
        problems.append(f"compose.yaml: grafana does not mount {m}")
for p in problems:
    print(p)
print(f"{n} panels, {queries} queries")
sys.exit(1 if problems else 0)
EOF
) || die "Grafana: $out"
ok "Grafana: dashboard JSON parses, uid gapless, $(tail -n1 <<<"$out"), all on \${datasource}; provisioning files and mounts agree"

# --- 5. a real system ---------------------------------------------------------------------
for b in gapless gapless-ingest gapless-edge; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing: build it first (cargo build --workspace) or set GAPLESS_BIN_DIR"
done
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gapless-check-deploy.XXXXXX")
pids=()
cleanup() {
  local status=$?
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$status" -ne 0 ] && [ -d "$tmp" ]; then
    for f in "$tmp"/*.log; do
      [ -s "$f" ] && { echo "--- last lines of $(basename "$f")"; tail -n 15 "$f"; echo; }
    done
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
start() { # name, command...: starts a background process logging to $tmp/name.log; its pid in $last_pid
  local name=$1
  shift
  "$@" >"$tmp/$name.log" 2>&1 &
  last_pid=$!
  pids+=("$last_pid")
}
reap() { # pid: waits for a process started here (its status is returned) and forgets it
  local rc=0 p kept=()
  wait "$1" || rc=$?
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || kept+=("$p"); done
  pids=("${kept[@]}")
  return "$rc"
}
wait_for() { # what, tries (0.1 s apart), command...
  local what=$1 tries=$2 n
  shift 2
  for ((n = 0; n < tries; n++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$what"
}

read -r redis_port ingest_port edge1_port edge2_port prom_port < <($PY -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
redis_url="redis://127.0.0.1:$redis_port"
ingest="http://127.0.0.1:$ingest_port"
edge1="http://127.0.0.1:$edge1_port"
edge2="http://127.0.0.1:$edge2_port"
prom="http://127.0.0.1:$prom_port"
key="check-deploy-key-$RANDOM$RANDOM"
secret=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')

# Prometheus first: it scrapes a new target only some 5 s after it starts (its target
# discovery sends updates at most every 5 s), which the system's start and traffic overlap.
# Its configuration is deploy/prometheus/prometheus.yml with the three targets pointed at
# this system's ports and 1 s intervals; the alert rules beside it, as in compose.
mkdir -p "$tmp/prometheus"
cp deploy/prometheus/alerts.yml "$tmp/prometheus/"
for target in ingest:8081 edge-1:8080 edge-2:8080; do
  grep -q "^ *- $target\$" deploy/prometheus/prometheus.yml || die "deploy/prometheus/prometheus.yml has no target $target to replace"
done
sed -e "s/^\( *- \)ingest:8081\$/\1127.0.0.1:$ingest_port/" \
  -e "s/^\( *- \)edge-1:8080\$/\1127.0.0.1:$edge1_port/" \
  -e "s/^\( *- \)edge-2:8080\$/\1127.0.0.1:$edge2_port/" \
  -e 's/^\(  scrape_interval:\).*/\1 1s/' -e 's/^\(  scrape_timeout:\).*/\1 1s/' \
  -e 's/^\(  evaluation_interval:\).*/\1 1s/' \
  deploy/prometheus/prometheus.yml >"$tmp/prometheus/prometheus.yml"
out=$(promtool check config "$tmp/prometheus/prometheus.yml" 2>&1) || die "the generated prometheus.yml: $out"
start prometheus prometheus --config.file="$tmp/prometheus/prometheus.yml" \
  --storage.tsdb.path="$tmp/prometheus/data" --web.listen-address="127.0.0.1:$prom_port" --log.level=warn

start redis redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp"
wait_for "redis-server did not start" 50 redis-cli -p "$redis_port" ping
"$bin_dir/gapless" migrate --redis "$redis_url" >"$tmp/migrate.log" 2>&1 || die "gapless migrate: $(cat "$tmp/migrate.log")"
export GAPLESS_LOG=warn GAPLESS_REDIS_URL="$redis_url"
# --redis-timeout-ms 300: the append made while Redis pauses writes times out quickly.
start ingest env GAPLESS_API_KEYS="$key" "$bin_dir/gapless-ingest" --listen "127.0.0.1:$ingest_port" --redis-timeout-ms 300
# --sweep-ms 500: the entry whose wakeup is lost is found within half a second; a short
# drain, so that stopping them at the end takes no seconds.
edge_flags=(--sweep-ms 500 --drain-window-ms 200 --shutdown-grace-ms 3000)
start edge-1 env GAPLESS_JWT_SECRET="$secret" "$bin_dir/gapless-edge" --listen "127.0.0.1:$edge1_port" --edge-id edge-1 "${edge_flags[@]}"
start edge-2 env GAPLESS_JWT_SECRET="$secret" "$bin_dir/gapless-edge" --listen "127.0.0.1:$edge2_port" --edge-id edge-2 "${edge_flags[@]}"
unset GAPLESS_LOG GAPLESS_REDIS_URL
for u in "$ingest" "$edge1" "$edge2"; do wait_for "$u/readyz did not answer 200" 100 curl -fsS "$u/readyz"; done
wait_for "Prometheus did not become ready" 100 curl -fsS "$prom/-/ready"
ok "system: redis-server, gapless migrate, ingest, edge-1, edge-2 (debug binaries of $bin_dir) ready; Prometheus $prom with the generated prometheus.yml"

# --- 6. traffic ---------------------------------------------------------------------------
token() { "$bin_dir/gapless" token --user "$1" --device "$2" --jwt-secret "$secret"; }
append() { # JSON body: prints the answer; fails unless 200
  curl -fsS -H "Authorization: Bearer $key" -H 'Content-Type: application/json' -d "$1" "$ingest/v1/notifications"
}
status_of() { curl -sS -o /dev/null -w '%{http_code}' "$@" || true; }
epoch_of() { [[ $1 =~ \"epoch\":\"([0-9a-f]+)\" ]] && echo "${BASH_REMATCH[1]}"; }
metric() { # url, series: its value (0 when absent)
  curl -fsS "$1/metrics" | awk -v s="$2" '$1 == s { v = $2 } END { print v + 0 }'
}
at_least() { [ "$(grep -c "$2" "$1" 2>/dev/null || true)" -ge "$3" ]; } # file, pattern, n

t_laptop=$(token alice laptop)
t_phone=$(token alice phone)
t_tablet=$(token alice tablet)
t_watch=$(token bob watch)

# Devices: alice's laptop on SSE at edge-1, her tablet holding a long-poll at edge-2 and her
# phone on a WebSocket at edge-2; bob's watch holding a long-poll at edge-1.
start sse-laptop curl -sN --max-time 30 "$edge1/v1/sse?token=$t_laptop"
sse_laptop_pid=$last_pid
start poll-tablet curl -sS --max-time 30 "$edge2/v1/poll?token=$t_tablet&wait_ms=20000"
poll_tablet_pid=$last_pid
start poll-watch curl -sS --max-time 30 "$edge1/v1/poll?token=$t_watch&wait_ms=20000"
poll_watch_pid=$last_pid
cat >"$tmp/ws.mjs" <<'EOF'
// A WebSocket device: a first session acks every notification until it has `want`, then
// closes; a second resumes after seq 1 of that epoch, so the rest is replayed. Node's
// built-in WebSocket (Node 22, or Node 20 with --experimental-websocket).
const [url, token, want] = [process.argv[2], process.argv[3], Number(process.argv[4])];
if (typeof WebSocket === 'undefined') { console.log('no-websocket'); process.exit(0); }
function session(resume, expect, onReady) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${url}/v1/ws?token=${token}`, 'gapless.v1.json');
    const seqs = [];
    let epoch;
    const timer = setTimeout(() => { ws.close(); reject(new Error(`timeout after ${JSON.stringify(seqs)}`)); }, 10000);
    ws.onerror = (e) => reject(new Error(`websocket error ${e.message ?? ''}`));
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.type === 'welcome') { ws.send(JSON.stringify({ type: 'resume', ...resume })); onReady(); }
      else if (m.type === 'ping') ws.send('{"type":"pong"}');
      else if (m.type === 'notification') {
        seqs.push(m.seq); epoch = m.epoch;
        ws.send(JSON.stringify({ type: 'ack', seq: m.seq }));
        if (seqs.length >= expect) { clearTimeout(timer); ws.close(1000); resolve({ epoch, seqs }); }
      }
    };
  });
}
const first = await session({}, want, () => console.log('ready'));
console.log(`live ${first.seqs.join(',')}`);
const again = await session({ epoch: first.epoch, after: 1 }, want - 1, () => {});
console.log(`replayed ${again.seqs.join(',')}`);
EOF
ws=0
if command -v node >/dev/null 2>&1; then
  node_flags=()
  if ! node -e 'process.exit(typeof WebSocket === "undefined" ? 1 : 0)' 2>/dev/null \
    && node --experimental-websocket -e 'process.exit(typeof WebSocket === "undefined" ? 1 : 0)' 2>/dev/null; then
    node_flags=(--experimental-websocket)
  fi
  start ws-phone node "${node_flags[@]}" "$tmp/ws.mjs" "${edge2/http/ws}" "$t_phone" 5
  ws_pid=$last_pid
  for ((n = 0; n < 100; n++)); do
    grep -q -e '^ready' -e '^no-websocket' "$tmp/ws-phone.log" 2>/dev/null && break
    kill -0 "$ws_pid" 2>/dev/null || break
    sleep 0.1
  done
  if grep -q '^ready' "$tmp/ws-phone.log"; then ws=1; fi
fi
wait_for "the SSE device got no welcome" 50 grep -q '^event: welcome' "$tmp/sse-laptop.log"
held() { [ "$(metric "$edge2" gapless_edge_polls_held)" -ge 1 ] && [ "$(metric "$edge1" gapless_edge_polls_held)" -ge 1 ]; }
wait_for "the long-polls are not held" 50 held

# Five notifications for alice (one sent twice with its idempotency key), two for bob, one
# rejected item.
a1=$(append '{"user":"alice","payload":{"n":1}}') || die "append: $a1"
epoch=$(epoch_of "$a1")
append '{"user":"alice","payload":{"n":2},"idempotency_key":"check-2"}' >/dev/null
dup=$(append '{"user":"alice","payload":{"n":2},"idempotency_key":"check-2"}')
[[ $dup == *'"duplicate":true'* ]] || bad "a repeated idempotency key was not answered as a duplicate: $dup"
batch=$(curl -fsS -H "Authorization: Bearer $key" -H 'Content-Type: application/json' "$ingest/v1/notifications/batch" \
  -d '[{"user":"alice","payload":{"n":3}},{"user":"alice","payload":{"n":4}},{"user":"bob","payload":1},{"user":"not valid","payload":0}]')
[[ $batch == *'"invalid_user"'* ]] || bad "the batch's invalid item was not rejected: $batch"
printf '%s\n' '{"user":"alice","payload":{"n":5}}' '{"user":"bob","payload":2}' \
  | curl -fsS -H "Authorization: Bearer $key" -H 'Content-Type: application/x-ndjson' --data-binary @- \
    "$ingest/v1/notifications/batch" >/dev/null
wait_for "the SSE device did not receive alice's 5 notifications" 50 at_least "$tmp/sse-laptop.log" '^event: notification' 5

# Acks: the laptop by POST /v1/ack, the tablet by naming its position in its next poll.
code=$(status_of -H "Authorization: Bearer $t_laptop" -H 'Content-Type: application/json' \
  -d "{\"epoch\":\"$epoch\",\"seq\":5}" "$edge1/v1/ack")
[ "$code" = 204 ] || bad "POST /v1/ack answered $code, not 204"
reap "$poll_tablet_pid" || bad "the held poll ended in error: $(cat "$tmp/poll-tablet.log")"
grep -q '"type":"notification"' "$tmp/poll-tablet.log" || bad "the held poll returned no notification: $(cat "$tmp/poll-tablet.log")"
last=$(grep -o '"seq":[0-9]*' "$tmp/poll-tablet.log" | tail -n1 | cut -d: -f2)
curl -fsS --max-time 5 "$edge2/v1/poll?token=$t_tablet&epoch=$epoch&after=$last&wait_ms=200" >/dev/null \
  || bad "the next poll (acking seq $last) failed"

# Resumes that replay: the laptop leaves and comes back at edge-2 with Last-Event-ID after
# seq 1 (2..5 again; in the background, the stream stays open for 1.5 s), the tablet polls
# from seq 1 at edge-1.
kill "$sse_laptop_pid" 2>/dev/null || true
start sse-laptop-again curl -sN --max-time 1.5 -H "Last-Event-ID: $epoch:1" "$edge2/v1/sse?token=$t_laptop"
sse_again_pid=$last_pid
curl -fsS --max-time 5 "$edge1/v1/poll?token=$t_tablet&epoch=$epoch&after=1&wait_ms=200" | grep -q '"seq":5' \
  || bad "a poll from seq 1 did not replay up to seq 5"

# A client in a reconnect loop: 40 SSE connects of one device within a second, more than
# --user-connects-per-s allows (10/s, burst 30): some are refused with 429 (and each new
# stream of the device closes the oldest beyond --max-connections-per-device: `replaced`).
# In the background: the admitted streams stay open for 1 s.
t_loop=$(token looping device)
urls=()
for ((n = 0; n < 40; n++)); do urls+=(-o /dev/null "$edge1/v1/sse?token=$t_loop"); done
start sse-loop curl -s --no-progress-meter --parallel --parallel-immediate --max-time 1 -w '%{http_code}\n' "${urls[@]}"
sse_loop_pid=$last_pid

# Refused credentials: a forged token at an edge, a wrong and a missing API key at the ingest.
code=$(status_of "$edge1/v1/poll?token=not.a.token&wait_ms=1")
[ "$code" = 401 ] || bad "a forged token was answered $code, not 401"
code=$(status_of -H 'Authorization: Bearer wrong' -H 'Content-Type: application/json' -d '{"user":"alice","payload":0}' "$ingest/v1/notifications")
[ "$code" = 403 ] || bad "a wrong API key was answered $code, not 403"
code=$(status_of -H 'Content-Type: application/json' -d '{"user":"alice","payload":0}' "$ingest/v1/notifications")
[ "$code" = 401 ] || bad "a missing API key was answered $code, not 401"

# An address holding more unauthenticated connections than --max-pending-per-source: the
# one over the cap is closed at once (gapless_listener_refused_total{reason="source_cap"}).
cap=$(metric "$edge1" 'gapless_listener_limit{budget="pending_per_source"}')
$PY - "$edge1_port" "$cap" <<'EOF' || bad "opening $cap+1 idle connections from 127.0.0.2 failed"
import socket, sys, time
port, cap = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(cap + 1):
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.connect(("127.0.0.1", port))
    socks.append(s)
time.sleep(0.2)
for s in socks:
    s.close()
EOF

# A reset: a device of `lost` has seen seq 2 of an epoch; the log is lost (deleted here) and
# starts again; its next poll from there gets `reset` (epoch_changed), then the new seq 1.
l1=$(append '{"user":"lost","payload":1}')
append '{"user":"lost","payload":2}' >/dev/null
redis-cli -p "$redis_port" DEL 'gl:{lost}:m' 'gl:{lost}:s' >/dev/null
append '{"user":"lost","payload":3}' >/dev/null
t_lost=$(token lost device)
curl -fsS --max-time 5 "$edge1/v1/poll?token=$t_lost&epoch=$(epoch_of "$l1")&after=2&wait_ms=200" | grep -q '"reason":"epoch_changed"' \
  || bad "a poll from a lost epoch got no epoch_changed reset"

# A lost wakeup: the user's registry entry is deleted, so the ingest wakes no edge; the
# edge's sweep finds the entry (gapless_edge_sweep_catches_total).
t_sweep=$(token swept device)
start sse-swept curl -sN --max-time 30 "$edge1/v1/sse?token=$t_sweep"
sse_swept_pid=$last_pid
wait_for "the SSE device of the sweep got no welcome" 50 grep -q '^event: welcome' "$tmp/sse-swept.log"
redis-cli -p "$redis_port" DEL 'gl:{swept}:r' >/dev/null
append '{"user":"swept","payload":1}' >/dev/null
wait_for "the edge's sweep did not deliver the entry whose wakeup was lost" 30 grep -q '^event: notification' "$tmp/sse-swept.log"

# Redis takes no writes for a second: the append times out (--redis-timeout-ms 300) and is
# answered 503, counted as a 5xx and as a Redis error.
redis-cli -p "$redis_port" CLIENT PAUSE 1000 WRITE >/dev/null
code=$(status_of -H "Authorization: Bearer $key" -H 'Content-Type: application/json' -d '{"user":"paused","payload":1}' "$ingest/v1/notifications")
[ "$code" = 503 ] || bad "an append while Redis pauses writes was answered $code, not 503"

# The background devices finish; the others leave.
reap "$sse_again_pid" || true
[ "$(grep -c '^event: notification' "$tmp/sse-laptop-again.log" || true)" -eq 4 ] \
  || bad "an SSE resume after seq 1 did not replay seqs 2..5: $(tr '\n' ' ' <"$tmp/sse-laptop-again.log")"
reap "$sse_loop_pid" || true
codes=$(grep -E '^[0-9]{3}$' "$tmp/sse-loop.log" | sort | uniq -c | tr -s ' \n' ' ')
[[ $codes == *" 429"* ]] || bad "40 connects of one user within a second were all admitted: $codes"
if [ "$ws" = 1 ]; then
  reap "$ws_pid" || bad "the WebSocket device failed: $(cat "$tmp/ws-phone.log")"
  grep -q '^replayed 2,3,4,5$' "$tmp/ws-phone.log" || bad "the WebSocket device: $(tr '\n' ' ' <"$tmp/ws-phone.log")"
  ws_note="WebSocket (1..5 live and acked, then resumed after 1: 2..5 replayed)"
else
  ws_note="no WebSocket device (this node has no built-in WebSocket)"
fi
kill "$sse_swept_pid" "$poll_watch_pid" 2>/dev/null || true
ok "traffic: SSE, long-poll and $ws_note devices; single, batch, NDJSON and duplicate appends; acks; resumes; a reconnect loop (HTTP status count:$codes); refused credentials; a source flood; a reset; a sweep catch; a 503"

# --- 7. every query -----------------------------------------------------------------------
targets_up() {
  [ "$(curl -fsS "$prom/api/v1/query" --data-urlencode 'query=count(up{job=~"gapless-ingest|gapless-edge"} == 1)' \
    | grep -o '"value":\[[^]]*\]' | grep -o '"[0-9]*"]' | tr -d '"]')" = 3 ]
}
wait_for "Prometheus does not scrape all three servers as jobs gapless-ingest and gapless-edge" 100 targets_up
# Two more scrapes after the last event, so that every counter has samples to take a rate of.
sleep 2.2
out=$($PY - "$prom" "$ws" <<'EOF'
import json, re, sys, urllib.parse, urllib.request
import yaml
prom, ws = sys.argv[1], sys.argv[2] == "1"
def query(expr):
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        return None, json.load(e).get("error", str(e))
    if body.get("status") != "success":
        return None, body.get("error", "status " + str(body.get("status")))
    return body["data"]["result"], None
failed, checked, notes = [], 0, []

# The traffic's events, each seen by Prometheus in the counter an alert or a panel reads.
events = {
    'sum(gapless_edge_connects_total{transport="sse"})': "SSE connects",
    'sum(gapless_edge_connects_total{transport="poll"})': "poll connects",
    'sum(gapless_edge_delivered_total{path="live"})': "live deliveries",
    'sum(gapless_edge_delivered_total{path="replay"})': "replayed deliveries (three resumes after seq 1 of 5)",
    'sum(gapless_edge_acks_total{transport="sse"})': "SSE acks",
    'sum(gapless_edge_acks_total{transport="poll"})': "poll acks",
    'sum(gapless_edge_delivery_latency_seconds_count)': "delivery latency samples",
    'sum(gapless_edge_disconnects_total{reason="client_closed"})': "client closes",
    'sum(gapless_edge_disconnects_total{reason="replaced"})': "connections replaced by a newer one of the device",
    'sum(gapless_edge_polls_total{outcome="messages"})': "polls answered with messages",
    'sum(gapless_edge_resets_total{reason="epoch_changed"})': "an epoch_changed reset",
    'sum(gapless_edge_sweep_catches_total)': "a sweep catch",
    'sum(gapless_edge_wakeups_total{result="ok"})': "wakeups received",
    'sum(gapless_edge_refused_total{reason="user_connect_rate"})': "user_connect_rate refusals",
    'sum(gapless_edge_auth_failures_total)': "refused device tokens",
    'sum(gapless_listener_refused_total{job="gapless-edge", reason="source_cap"})': "a source_cap refusal",
    'sum(gapless_redis_duration_seconds_count{job="gapless-edge", op="ack"})': "ack flushes",
    'sum(gapless_ingest_items_total{result="appended"})': "appended items",
    'sum(gapless_ingest_items_total{result="duplicate"})': "a duplicate item",
    'sum(gapless_ingest_items_total{result="rejected"})': "a rejected item",
    'sum(gapless_ingest_wakeups_total)': "wakeups published",
    'sum(gapless_ingest_auth_failures_total)': "refused API keys",
    'sum(gapless_ingest_requests_total{status="503"})': "a 503",
    'sum(gapless_redis_errors_total{job="gapless-ingest"})': "a Redis error at the ingest",
}
if ws:
    events['sum(gapless_edge_connects_total{transport="ws"})'] = "WebSocket connects"
    events['sum(gapless_edge_acks_total{transport="ws"})'] = "WebSocket acks"
for expr, what in events.items():
    checked += 1
    result, err = query(expr)
    if err or not result or float(result[0]["value"][1]) <= 0:
        failed.append(f"event not counted: {what}: {expr} = {err or (result[0]['value'][1] if result else 'no series')}")

# Grafana's variables, replaced by what they stand for on this Prometheus (1 s scrapes).
subs = {"$__rate_interval": "10s", "${__rate_interval}": "10s", "$__interval": "2s", "${__interval}": "2s",
        "$__range": "1m", "${__range}": "1m", "${edge}": ".*", "$edge": ".*"}
def grafana(expr):
    for k in sorted(subs, key=len, reverse=True):
        expr = expr.replace(k, subs[k])
    return expr
d = json.load(open("deploy/grafana/dashboards/gapless.json"))
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(d["panels"]):
    for t in p.get("targets", []):
        expr = grafana(t["expr"])
        checked += 1
        if "$" in expr:
            failed.append(f"dashboard {p['title']!r} {t['refId']}: unknown variable in {expr}")
            continue
        result, err = query(expr)
        if err or not result:
            failed.append(f"dashboard {p['title']!r} {t['refId']}: {err or 'no series'}: {expr}")
for v in d.get("templating", {}).get("list", []):
    if v.get("type") != "query":
        continue
    q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
    checked += 1
    result, err = query(m.group(1)) if m else (None, "not label_values(series, label)")
    if err or not result or not all(m.group(2) in s["metric"] for s in result):
        failed.append(f"dashboard variable {v['name']}: {err or 'no series with label ' + m.group(2)}: {q}")

# An alert's expression returns nothing while all is well, so what must return series is its
# query without the final comparison with the threshold; the whole expression must still
# evaluate, and what it returns now is listed (usually nothing: the traffic was over before
# Prometheus' first scrape, so no rate has moved).
threshold = re.compile(r"^(?P<query>.*\S)\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?[0-9.eE+]+\s*$", re.S)
for group in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"]:
    for rule in group["rules"]:
        name = rule.get("alert") or rule.get("record")
        expr = rule["expr"].strip()
        checked += 1
        result, err = query(expr)
        if err:
            failed.append(f"alert {name}: {err}: {expr}")
            continue
        if result and rule.get("alert"):
            notes.append(f"{name}({len(result)})")
        if rule.get("alert"):
            m = threshold.match(expr)
            if not m:
                failed.append(f"alert {name}: the expression does not end in a comparison with a number: {expr}")
                continue
            expr = m.group("query")
            result, err = query(expr)
        if err or not result:
            failed.append(f"alert {name}: {err or 'no series'}: {expr}")
for f in failed:
    print(f)
print(f"{len(events)} event counters, {checked - len(events)} dashboard and alert queries, {len(failed)} failed; "
      f"alert conditions true right now: {', '.join(notes) or 'none'}")
sys.exit(1 if failed else 0)
EOF
) && status=0 || status=$?
summary=$(tail -n1 <<<"$out")
if [ "$status" -eq 0 ]; then
  ok "queries: every event counted, every dashboard query and alert query returns series on the live Prometheus: $summary"
else
  while IFS= read -r line; do [ "$line" = "$summary" ] || bad "$line"; done <<<"$out"
  bad "queries: $summary"
fi

# --- 8. the end ---------------------------------------------------------------------------
if [ "$failures" -gt 0 ]; then
  printf 'FAIL  check-deploy: %d check(s) failed (%d ms)\n' "$failures" "$(elapsed)"
  exit 1
fi
printf 'ok    check-deploy: all checks passed (%d ms)\n' "$(elapsed)"
