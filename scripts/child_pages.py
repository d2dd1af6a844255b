"""Where an idle connection's memory is: a relay child's private pages, by mapping.

Usage: python scripts/child_pages.py REDIS_PORT -- PROXY_COMMAND...
  e.g. python scripts/child_pages.py 6379 -- .venv/bin/forkproxy
       python scripts/child_pages.py 6379 -- .venv/bin/python -I -S scripts/floor_sketch.py

Starts `PROXY_COMMAND serve -q 127.0.0.1:0=127.0.0.1:REDIS_PORT` (forkproxy's command
line, which floor_sketch.py takes too), opens 20 idle connections through it, and prints,
for the median child, its Private_Dirty memory per mapping from /proc/PID/smaps: the pages
the child wrote, plus those the supervisor wrote after forking it (the child keeps the old
copies). The profile in docs/benchmarks.md was made with it. Linux only; reads /proc.
"""

from __future__ import annotations

import re
import socket
import statistics
import subprocess
import sys
import time

CONNECTIONS = 20


def private_dirty_by_mapping(pid: int) -> dict[str, int]:
    """KiB of Private_Dirty per mapping (file name and permissions, or [heap], [anon], ...)."""
    totals: dict[str, int] = {}
    name = ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split()
                path = fields[5] if len(fields) > 5 else "[anon]"
                name = f"{path.rsplit('/', 1)[-1]} {fields[1]}"
            elif line.startswith("Private_Dirty:"):
                kib = int(line.split()[1])
                if kib:
                    totals[name] = totals.get(name, 0) + kib
    return totals


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    target_port = int(argv[1])
    command = [*argv[3:], "serve", "-q", f"127.0.0.1:0=127.0.0.1:{target_port}"]
    proxy = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout is not None
        found = re.search(r"127\.0\.0\.1:(\d+) ->", proxy.stdout.readline())
        if not found:
            print("no 'listening 127.0.0.1:PORT ->' line", file=sys.stderr)
            return 1
        port = int(found.group(1))
        time.sleep(1)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
        time.sleep(1)
        with open(f"/proc/{proxy.pid}/task/{proxy.pid}/children") as handle:
            children = [int(pid) for pid in handle.read().split()]
        profiles = sorted(
            (private_dirty_by_mapping(pid) for pid in children),
            key=lambda profile: sum(profile.values()),
        )
        median = profiles[len(profiles) // 2]
        totals = [sum(profile.values()) for profile in profiles]
        print(f"{len(children)} children, Private_Dirty KiB: median {statistics.median(totals)}")
        for name, kib in sorted(median.items(), key=lambda item: -item[1]):
            print(f"  {kib:6d}  {name}")
        for client in clients:
            client.close()
    finally:
        proxy.terminate()
        proxy.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
