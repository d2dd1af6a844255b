#!/usr/bin/env python3
"""What a `status` read with many live connections costs every later connection.

Starts `forkproxy serve -q` from TREE (a checkout; run this with the project's venv
Python), opens IDLE connections through it, reads `forkproxy status` once, closes them,
then makes CONNS connections with `redis-benchmark -t ping_inline -c 20 -k 0` through a
second link to a redis-server it starts. Prints one JSON line: the supervisor's RssAnon
when the connections start, the proxy tree's CPU per connection (its own and its reaped
children's, from /proc, 10 ms ticks) and connections/s.

Compare two trees at paths of equal length, alternating (docs/benchmarks.md, "What a
status read left behind"):

    for i in 1 2 3 4 5; do for t in /tmp/ab/a /tmp/ab/b; do
        .venv/bin/python scripts/status_cost.py $t; done; done
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon line")


def tree_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime: the process and its reaped children."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", help="a forkproxy checkout (the directory holding forkproxy/)")
    parser.add_argument("--idle", type=int, default=2000, help="live connections at the read")
    parser.add_argument("--conns", type=int, default=5000, help="connections measured after")
    args = parser.parse_args()

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = tempfile.mkdtemp(prefix="fpsc-", dir="/tmp")
    redis_port, idle_port, conn_port = free_port(), free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    upstream = socket.create_server(("127.0.0.1", 0), backlog=args.idle)
    sock_path = os.path.join(work, "s.sock")
    env = {**os.environ, "XDG_RUNTIME_DIR": work}
    proxy = subprocess.Popen(
        [sys.executable, "-m", "forkproxy", "serve", "-q", "--max-children",
         str(args.idle + 100), "--status-socket", sock_path,
         f"127.0.0.1:{idle_port}=127.0.0.1:{upstream.getsockname()[1]}",
         f"127.0.0.1:{conn_port}=127.0.0.1:{redis_port}"],
        cwd=args.tree, env=env, stdout=subprocess.DEVNULL)
    held: list[socket.socket] = []
    try:
        time.sleep(1.5)
        for _ in range(args.idle):
            held.append(socket.create_connection(("127.0.0.1", idle_port)))
            held.append(upstream.accept()[0])
        time.sleep(0.5)
        subprocess.run([sys.executable, "-m", "forkproxy", "status", "--json",
                        "--status-socket", sock_path], cwd=args.tree, env=env,
                       capture_output=True, check=True)
        for sock in held:
            sock.close()
        time.sleep(2)  # every idle child exits and is reaped
        anon, ticks, start = rss_anon_kib(proxy.pid), tree_ticks(proxy.pid), time.monotonic()
        subprocess.run(["redis-benchmark", "-p", str(conn_port), "-t", "ping_inline", "-c", "20",
                        "-k", "0", "-n", str(args.conns), "-q"], capture_output=True, check=True)
        wall = time.monotonic() - start
        time.sleep(0.5)
        used = tree_ticks(proxy.pid) - ticks
        tick = os.sysconf("SC_CLK_TCK")
        print(json.dumps({"tree": args.tree, "rss_anon_kib": anon,
                          "cpu_us_per_conn": used * 1e6 / tick / args.conns,
                          "conn_per_s": round(args.conns / wall)}))
    finally:
        for sock in held:
            sock.close()
        proxy.terminate()
        proxy.wait(20)
        redis.terminate()
        redis.wait(10)
        upstream.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
