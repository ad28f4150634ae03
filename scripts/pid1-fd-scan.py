#!/usr/bin/env python3
"""Shows what PID 1 costs this machine as the number of open file descriptors grows.

On the VM this project is developed on, PID 1 is the sandbox's agent (`/process_api`, nice
-10). With many descriptors open it burns a core in the kernel for ~170 ms about every 3.1 s
(BENCHMARKS.md, "What limits steady at 100K"). This script opens `--fds` descriptors of
/dev/null spread over processes of at most 19,000 each (the per-process limit is 20,000),
samples PID 1's CPU time every 10 ms for `--seconds`, then does the same with none open, and
prints the bursts it saw: no gapless process is involved.

    python3 scripts/pid1-fd-scan.py --fds 190000 --seconds 15
"""

import argparse
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def pid1_cpu_ms():
    with open("/proc/1/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def bursts(seconds):
    """PID 1's CPU per 10 ms sample; returns the bursts (start s, CPU ms, length ms)."""
    samples = []
    end = time.monotonic() + seconds
    last = pid1_cpu_ms()
    while time.monotonic() < end:
        time.sleep(0.01)
        now = pid1_cpu_ms()
        samples.append((time.monotonic(), now - last))
        last = now
    found, current = [], None
    for t, ms in samples:
        if ms > 0:
            if current and t - current[2] <= 0.05:
                current[1] += ms
                current[2] = t
            else:
                if current:
                    found.append(current)
                current = [t, ms, t]
    if current:
        found.append(current)
    t0 = samples[0][0] if samples else 0
    return [(s - t0, ms, (e - s) * 1000) for s, ms, e in found if ms >= 40]


def report(label, found, seconds):
    print(f"{label}: {len(found)} bursts of >= 40 ms of PID 1 CPU in {seconds} s")
    for start, ms, length in found:
        print(f"  at {start:6.2f} s: {ms:5.0f} ms of CPU over {length:4.0f} ms")
    if len(found) > 1:
        gaps = [b[0] - a[0] for a, b in zip(found, found[1:])]
        print(f"  mean period {sum(gaps) / len(gaps):.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fds", type=int, default=190000)
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    try:
        pid1_cpu_ms()
    except OSError as e:
        sys.exit(f"cannot read /proc/1/stat: {e}")

    holders, left = [], args.fds
    hold = "import os,sys\n[os.open('/dev/null', os.O_RDONLY) for _ in range(int(sys.argv[1]))]\nprint('ok', flush=True)\nsys.stdin.read()\n"
    while left > 0:
        n = min(left, 19000)
        p = subprocess.Popen([sys.executable, "-c", hold, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if p.stdout.readline().strip() != "ok":
            sys.exit("a holder could not open its descriptors")
        holders.append(p)
        left -= n
    time.sleep(2)
    report(f"{args.fds} descriptors open", bursts(args.seconds), args.seconds)
    for p in holders:
        p.stdin.close()
        p.wait()
    time.sleep(2)
    report("none open", bursts(args.seconds), args.seconds)


if __name__ == "__main__":
    main()
