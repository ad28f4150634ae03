#!/usr/bin/env bash
# What one notification costs each gapless process under the peers harness's load (one
# ingest, one edge, one Redis without persistence, a one-item POST per notification, an ack
# per notification): CPU, context switches, syscalls by kind, and Redis time by command.
#
# Differential, so that connecting, the idle-memory wait and the resume phase cancel out:
# two peers runs that differ only in --msgs (SMALL, then BIG), each under `perf stat -p` on
# the ingest, the edge and redis-server from its start to its end, Redis's commandstats reset
# at the start; per notification = (BIG run - SMALL run) / (BIG - SMALL). The longer latency
# phase of the BIG run includes its idle cost (heartbeats, lease refreshes) as the peers'
# own CPU figure does.
#
#   cargo build --release --workspace && scripts/profile-peers.sh
#   N=10000 RATE=2000 BIG=30000 scripts/profile-peers.sh
#
# Needs perf (linux-perf) with access to the syscall tracepoints (root, or
# perf_event_paranoid <= 1) and the peers harness (PEERS, default ../shared/peers).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=$(cd "${PEERS:-$ROOT/../shared/peers}" && pwd)
N=${N:-10000}
RATE=${RATE:-500}
SMALL=${SMALL:-1000}
BIG=${BIG:-15000}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gapless-profile.XXXXXX")}
mkdir -p "$OUT"
export GAPLESS_CHECKOUT=$ROOT
export PEERS_WORK=${PEERS_WORK:-${TMPDIR:-/tmp}/gapless-peers}
RUN=$PEERS_WORK/run
REDIS_PORT=${REDIS_PORT:-6391}
EVENTS=task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter
for s in futex epoll_wait write writev sendto sendmsg read recvfrom; do
  EVENTS+=",syscalls:sys_enter_$s"
done

command -v perf >/dev/null || { echo "perf is missing: apt-get install linux-perf" >&2; exit 1; }
trap '"$PEERS/stop-all.sh" >/dev/null 2>&1' EXIT

for msgs in "$SMALL" "$BIG"; do
  "$PEERS/stop-all.sh" >/dev/null 2>&1
  "$PEERS/start-gapless.sh" >"$OUT/start-$msgs.log"
  sleep 2
  redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
  perfs=()
  for proc in ingest edge redis; do
    case $proc in
      redis) pid=$(cat "$RUN/redis.pid") ;;
      *) pid=$(cat "$RUN/gapless-$proc.pid") ;;
    esac
    perf stat -x, -e "$EVENTS" -p "$pid" -o "$OUT/$msgs.$proc.csv" &
    perfs+=($!)
  done
  sleep 1
  "$PEERS/bench.sh" gapless "$N" --rate "$RATE" --msgs "$msgs" --label "profile-$msgs" \
    >"$OUT/bench-$msgs.json"
  kill -INT "${perfs[@]}"
  wait "${perfs[@]}" || true
  redis-cli -p "$REDIS_PORT" INFO commandstats >"$OUT/$msgs.commandstats"
done
"$PEERS/stop-all.sh" >/dev/null 2>&1

python3 - "$OUT" "$SMALL" "$BIG" <<'EOF'
import json, re, sys
out, small, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
n = big - small

def perf(msgs, proc):
    counts = {}
    for line in open(f"{out}/{msgs}.{proc}.csv"):
        f = line.strip().split(",")
        if len(f) < 3 or line.startswith("#"):
            continue
        try:
            counts[f[2]] = float(f[0])
        except ValueError:
            pass
    return counts

def commandstats(msgs):
    stats = {}
    for m in re.finditer(r"cmdstat_(\w+):calls=(\d+),usec=(\d+)", open(f"{out}/{msgs}.commandstats").read()):
        stats[m[1]] = (int(m[2]), int(m[3]))
    return stats

for msgs in (small, big):
    lat = json.loads(open(f"{out}/bench-{msgs}.json").read().strip().splitlines()[-1])["latency"]
    print(f"run --msgs {msgs}: sent {lat['sent']}, delivered {lat['delivered']}, lost {lat['lost']}, "
          f"p50 {lat['p50_ms']} / p99 {lat['p99_ms']} / p99.9 {lat['p999_ms']} ms")
print(f"\nper notification ({n} notifications: the --msgs {big} run less the --msgs {small} run)\n")
names = {"task-clock": "CPU µs", "context-switches": "context switches", "cpu-migrations": "migrations",
         "raw_syscalls:sys_enter": "syscalls"}
procs = ("ingest", "edge", "redis")
print("| per notification | " + " | ".join(procs) + " |")
print("| --- |" + " --- |" * len(procs))
rows = {}
for proc in procs:
    a, b = perf(small, proc), perf(big, proc)
    for k in b:
        rows.setdefault(k, {})[proc] = (b[k] - a.get(k, 0)) / n * (1000 if k == "task-clock" else 1)
for k, per in rows.items():
    label = names.get(k, k.replace("syscalls:sys_enter_", ""))
    print(f"| {label} | " + " | ".join(f"{per.get(p, 0):.2f}" for p in procs) + " |")
a, b = commandstats(small), commandstats(big)
print("\n| Redis command | calls per notification | µs per notification | µs per call |")
print("| --- | --- | --- | --- |")
for cmd in sorted(b, key=lambda c: -(b[c][1] - a.get(c, (0, 0))[1])):
    calls = b[cmd][0] - a.get(cmd, (0, 0))[0]
    usec = b[cmd][1] - a.get(cmd, (0, 0))[1]
    if calls <= 0:
        continue
    print(f"| {cmd} | {calls / n:.3f} | {usec / n:.2f} | {usec / calls:.2f} |")
print("\n(an fcall's time includes the commands it runs, which are also counted on their own rows)")
print(f"\nraw counts in {out}")
EOF
