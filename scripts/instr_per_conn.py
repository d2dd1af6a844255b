#!/usr/bin/env python3
"""Instructions per connection: the supervisor's and a relay child's, counted by callgrind.

Run by hand (slow: valgrind; one run at a time on a shared machine), never in CI:

    python3 scripts/instr_per_conn.py [--venv .venv] [--conns 200] [--pings 10000] [--keep DIR]

Instruction counts, unlike timings, repeat on a loaded machine, so builds (commits) can be
compared by them. It starts a redis-server on 127.0.0.1 and, under `valgrind
--tool=callgrind --trace-children=yes`, `VENV/bin/forkproxy serve -q 127.0.0.1:0=...`,
then makes `--conns` sequential connections (connect, PING, +PONG, close) and one
persistent connection with `--pings` PINGs. Callgrind dumps (and zeroes) its counts after
each `PyOS_AfterFork_Parent` (in the supervisor: one part per connection, from one fork to
the next: accept, fork, reap and account the one before) and after `PyOS_AfterFork_Child`
(in a child: what follows is fork to exit). Printed, as one JSON line:

- sup_instr_per_conn: median instructions of the supervisor's parts between forks;
- sup_total_minus_idle_per_conn: (supervisor's total - that of a run with no connection) / N;
- child_instr_per_conn: median instructions of the one-PING children, fork to exit;
- rr_instr_per_request: (persistent child - median one-PING child) / (pings - 1);
- child_dirty_kib: median Private_Dirty (smaps_rollup) of 5 idle children, without valgrind.

`--keep DIR` keeps the callgrind files (for `callgrind_annotate DIR/cg.PID.N`). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def free_port() -> int:
    """A port the kernel picks on 127.0.0.1 (closed again: redis binds it next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_serve(command: list[str], out: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start `command`, return it and the port of its `listening 127.0.0.1:PORT ->` line."""
    with open(out, "wb") as sink:
        proxy = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"listening 127\.0\.0\.1:(\d+) ->", out.read_text(errors="replace"))
        if found:
            return proxy, int(found.group(1))
        if proxy.poll() is not None:
            break
        time.sleep(0.2)
    proxy.kill()
    raise SystemExit(f"instr_per_conn.py: no 'listening' line: {out.read_text()!r}")


def ping(sock: socket.socket) -> None:
    """One PING and its whole +PONG."""
    sock.sendall(b"PING\r\n")
    got = b""
    while not got.endswith(b"\r\n"):
        chunk = sock.recv(64)
        if not chunk:
            raise SystemExit("instr_per_conn.py: connection closed before +PONG")
        got += chunk


def stop(proxy: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait (callgrind writes its last dump at exit)."""
    proxy.send_signal(signal.SIGTERM)
    try:
        proxy.wait(120)
    except subprocess.TimeoutExpired:
        proxy.kill()
        proxy.wait()


def dumps(work: Path) -> dict[int, dict[int, int]]:
    """Per pid, dump number -> instructions (the final dump, at exit, is number 1 << 30)."""
    parts: dict[int, dict[int, int]] = {}
    for path in work.glob("cg.*"):
        found = re.fullmatch(r"cg\.(\d+)(?:\.(\d+))?(?:-\d+)?", path.name)
        text = path.read_text(errors="replace")
        total = TOTAL.search(text)
        if not found or not total:
            continue
        number = int(found.group(2)) if found.group(2) else 1 << 30
        parts.setdefault(int(found.group(1)), {})[number] = int(total.group(1))
    return parts


def parents(work: Path) -> dict[int, int]:
    """Per traced pid, its parent's (valgrind's log of it: `==PID== Parent PID: N`)."""
    found: dict[int, int] = {}
    for path in work.glob("vg.*"):
        line = re.search(r"^==(\d+)== Parent PID: (\d+)$", path.read_text(errors="replace"), re.M)
        if line:
            found[int(line.group(1))] = int(line.group(2))
    return found


def pid_max() -> int:
    """Where the kernel's pids wrap around (to 300, past those of its own threads)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 1 << 22


def processes(parts: dict[int, dict[int, int]], parent: dict[int, int],
              wrap: int) -> tuple[int, list[int]]:
    """The supervisor's pid (the one traced process no traced process started) and its
    children's, in the order it forked them. Not by their numbers: pids wrap around at
    `wrap` (32768 by default), so after a wrap the smallest was a child's, whose parts had
    nothing between its first and last (`no median for empty data`), and the child
    sorted last not the one that was forked last."""
    roots = [pid for pid in parts if parent.get(pid) not in parts]
    if len(roots) != 1:
        raise SystemExit(f"instr_per_conn.py: expected one supervisor among the traced "
                         f"processes, found {len(roots)} without a traced parent: {roots}")
    supervisor = roots[0]
    children = sorted((pid for pid in parts if parent.get(pid) == supervisor),
                      key=lambda pid: (pid - supervisor) % wrap)
    return supervisor, children


def summary(load: dict[int, dict[int, int]], load_parents: dict[int, int],
            idle: dict[int, dict[int, int]], idle_parents: dict[int, int],
            conns: int, pings: int, wrap: int) -> dict[str, object]:
    """The numbers of a run's dumps (see the module docstring)."""
    supervisor, forked = processes(load, load_parents, wrap)
    sup_parts = load[supervisor]
    between = [sup_parts[n] for n in sorted(sup_parts)[1:-1]]  # not startup, not stop
    children = [load[pid][max(load[pid])] for pid in forked]
    if not between or len(children) < 2:
        raise SystemExit(
            f"instr_per_conn.py: the supervisor (pid {supervisor}) dumped {len(sup_parts)} "
            f"parts and {len(children)} children were traced, for {conns} connections and "
            "a persistent one: too few to measure (see the vg.* logs: --keep DIR)")
    one_ping, persistent = children[:-1], children[-1]
    child = statistics.median(one_ping)
    idle_supervisor, _ = processes(idle, idle_parents, wrap)
    return {
        "conns": conns,
        "pings": pings,
        "children": len(children),
        "sup_instr_per_conn": statistics.median(between[:conns]),
        "sup_total_minus_idle_per_conn": round(
            (sum(sup_parts.values()) - sum(idle[idle_supervisor].values())) / (conns + 1)),
        "child_instr_per_conn": child,
        "rr_instr_per_request": round((persistent - child) / max(pings - 1, 1)),
    }


def callgrind_run(
    venv: Path, redis_port: int, work: Path, conns: int, pings: int,
) -> dict[int, dict[int, int]]:
    """One serve under callgrind with `conns` one-PING connections and one `pings` connection."""
    command = [
        "valgrind", "--tool=callgrind", "--trace-children=yes",
        "--dump-after=PyOS_AfterFork_Parent", "--dump-after=PyOS_AfterFork_Child",
        f"--log-file={work}/vg.%p", f"--callgrind-out-file={work}/cg.%p",
        str(venv / "bin" / "forkproxy"), "serve", "-q", f"127.0.0.1:0=127.0.0.1:{redis_port}",
    ]
    proxy, port = start_serve(command, work / "serve.out")
    try:
        time.sleep(1)
        for _ in range(conns):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                ping(sock)
        if pings:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for _ in range(pings):
                    ping(sock)
        time.sleep(3)  # the last children exit and are reaped
    finally:
        stop(proxy)
    return dumps(work)


def dirty_kib(venv: Path, redis_port: int, work: Path) -> float:
    """Median Private_Dirty KiB of 5 idle children (no valgrind)."""
    proxy, port = start_serve(
        [str(venv / "bin" / "forkproxy"), "serve", "-q", f"127.0.0.1:0=127.0.0.1:{redis_port}"],
        work / "native.out",
    )
    try:
        time.sleep(1)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        for client in clients:
            ping(client)
        time.sleep(1)
        with open(f"/proc/{proxy.pid}/task/{proxy.pid}/children") as handle:
            children = [int(pid) for pid in handle.read().split()]
        kib = []
        for pid in children:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                found = re.search(r"^Private_Dirty:\s+(\d+)", rollup.read(), re.M)
            if found:
                kib.append(int(found.group(1)))
        for client in clients:
            client.close()
        return statistics.median(kib) if kib else 0.0
    finally:
        stop(proxy)


def measure(venv: Path, conns: int, pings: int, keep: Path | None) -> dict[str, object]:
    """All the numbers for one venv."""
    work = Path(tempfile.mkdtemp(prefix="instr-per-conn-"))
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        (work / "idle").mkdir()
        (work / "load").mkdir()
        # First, without valgrind: it also writes the .pyc files the idle run would compile.
        dirty = dirty_kib(venv, redis_port, work)
        idle = callgrind_run(venv, redis_port, work / "idle", 0, 0)
        load = callgrind_run(venv, redis_port, work / "load", conns, pings)
        numbers = summary(load, parents(work / "load"), idle, parents(work / "idle"),
                          conns, pings, pid_max())
        return {"venv": str(venv), **numbers, "child_dirty_kib": dirty}
    finally:
        redis.terminate()
        redis.wait()
        if keep:
            shutil.copytree(work, keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def positive(text: str) -> int:
    """A whole number above 0, for argparse."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(".venv"),
                        help="a venv with forkproxy installed (.venv)")
    parser.add_argument("--conns", type=positive, default=200, help="one-PING connections (200)")
    parser.add_argument("--pings", type=positive, default=10000,
                        help="PINGs on the persistent connection (10000)")
    parser.add_argument("--keep", type=Path, help="copy the callgrind files into this directory")
    args = parser.parse_args()
    for tool in ("valgrind", "redis-server"):
        if not shutil.which(tool):
            print(f"instr_per_conn.py: {tool} is not installed", file=sys.stderr)
            return 2
    if not os.access(args.venv / "bin" / "forkproxy", os.X_OK):
        print(f"instr_per_conn.py: --venv {args.venv}: no bin/forkproxy there", file=sys.stderr)
        return 2
    print(json.dumps(measure(args.venv.absolute(), args.conns, args.pings, args.keep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
