#!/usr/bin/env python3
"""Page faults and CPU per new connection through a proxy started from TREE.

Starts redis-server and `forkproxy serve -q` (or the floor sketch) from TREE (a
checkout; run this with the project's venv Python), makes 500 connections of
`redis-benchmark -t ping_inline -c 20 -k 0` to warm up, then CONNS more, and prints one
line: the supervisor's own page faults (minflt) and its reaped children's (cminflt) per
connection, the proxy tree's CPU per connection (/proc, 10 ms ticks), connections/s and
the supervisor's RssAnon as the measured connections start.

`--after-status N` first holds N idle connections open through a second link, reads
`forkproxy status` once, and closes them: what a status read with many live connections
leaves behind for every later connection (docs/benchmarks.md, "What a status read left
behind").

Fault counts do not depend on how busy the machine is; CPU and rates do. Run trees
alternating, several times each, at paths of EQUAL LENGTH (a path's strings shift the
heap, and with it which objects share a page: docs/benchmarks.md):

    for i in 1 2 3 4 5; do for t in /tmp/ab/a /tmp/ab/b; do
        .venv/bin/python scripts/conn_faults.py $t; done; done
"""

from __future__ import annotations

import argparse
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


def proc_counts(pid: int) -> tuple[int, int, int]:
    """(minflt, cminflt, utime + stime + cutime + cstime) of `pid`."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[8]), sum(int(value) for value in fields[11:15])


def rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon line")


def benchmark(port: int, count: int) -> None:
    subprocess.run(["redis-benchmark", "-p", str(port), "-t", "ping_inline", "-c", "20",
                    "-k", "0", "-n", str(count), "-q"], capture_output=True, check=True)


def status_read_with(idle: int, port: int, upstream: socket.socket, tree: str,
                     env: dict[str, str], sock_path: str) -> None:
    """`idle` connections through `port` (to `upstream`), one status read, all closed."""
    held: list[socket.socket] = []
    try:
        for _ in range(idle):
            held.append(socket.create_connection(("127.0.0.1", port)))
            held.append(upstream.accept()[0])
        time.sleep(0.5)
        subprocess.run([sys.executable, "-m", "forkproxy", "status", "--json",
                        "--status-socket", sock_path], cwd=tree, env=env,
                       capture_output=True, check=True)
    finally:
        for sock in held:
            sock.close()
    time.sleep(2)  # every idle child exits and is reaped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", help="a forkproxy checkout (the directory holding forkproxy/)")
    parser.add_argument("--floor", action="store_true", help="run scripts/floor_sketch.py")
    parser.add_argument("--conns", type=int, default=5000, help="connections measured")
    parser.add_argument("--after-status", type=int, default=0, metavar="N",
                        help="first a status read with N live connections (forkproxy only)")
    args = parser.parse_args()
    if args.floor and args.after_status:
        parser.error("--after-status needs forkproxy's status socket, not the floor")

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    redis_port, listen_port, idle_port = free_port(), free_port(), free_port()
    spec = f"127.0.0.1:{listen_port}=127.0.0.1:{redis_port}"
    work = tempfile.mkdtemp(prefix="fpcf-", dir="/tmp")
    sock_path = os.path.join(work, "s.sock")
    env = {**os.environ, "XDG_RUNTIME_DIR": work}
    upstream = socket.create_server(("127.0.0.1", 0), backlog=max(args.after_status, 1))
    if args.floor:
        command = [sys.executable, "-I", "-S",
                   os.path.join(args.tree, "scripts", "floor_sketch.py"), "serve", "-q", spec]
    else:
        command = [sys.executable, "-m", "forkproxy", "serve", "-q", "--max-children",
                   str(args.after_status + 1024), "--status-socket", sock_path, spec,
                   f"127.0.0.1:{idle_port}=127.0.0.1:{upstream.getsockname()[1]}"]
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    proxy = subprocess.Popen(command, cwd=args.tree, stdout=subprocess.DEVNULL, env=env)
    try:
        time.sleep(2)
        if args.after_status:
            status_read_with(args.after_status, idle_port, upstream, args.tree, env, sock_path)
        benchmark(listen_port, 500)
        time.sleep(0.5)
        anon = rss_anon_kib(proxy.pid)
        before, start = proc_counts(proxy.pid), time.monotonic()
        benchmark(listen_port, args.conns)
        wall = time.monotonic() - start
        time.sleep(1)  # the last children exit and are reaped
        after = proc_counts(proxy.pid)
        own, children, ticks = (b - a for a, b in zip(before, after, strict=True))
        tick = os.sysconf("SC_CLK_TCK")
        print(f"{args.tree} {'floor' if args.floor else 'forkproxy'}: faults per connection "
              f"supervisor {own / args.conns:.1f}, children {children / args.conns:.1f}; "
              f"CPU {ticks * 1e6 / tick / args.conns:.0f} us per connection; "
              f"{args.conns / wall:.0f} connections/s; supervisor RssAnon {anon} KiB")
    finally:
        proxy.terminate()
        proxy.wait(20)
        redis.terminate()
        redis.wait(10)
        upstream.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
