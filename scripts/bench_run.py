#!/usr/bin/env python3
"""Benchmark forkproxy against socat, HAProxy and a direct connection (issue 6).

Run it through ``scripts/bench``, which installs the peers and a venv first. Every
listener is on 127.0.0.1. Candidates are interleaved within each round (the order
rotates from round to round), every sample gets a freshly started proxy, and the
report gives medians of the rounds and ratios against socat and HAProxy.

Workloads (real clients):
  bulk  iperf3, one stream, Gbit/s received
  rr    redis-benchmark PING_INLINE, 50 persistent clients, req/s (+ p50/p99 latency)
  conn  redis-benchmark PING_INLINE -k 0 (new connection per request), 20 clients, conn/s
  mem   PSS of the proxy's whole process tree per idle connection, 300 idle connections

Standard library only; matplotlib (the ``bench`` extra) is used for the chart when present.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CANDIDATES = ("direct", "socat", "haproxy", "floor", "forkproxy")
FLOOR_SKETCH = REPO / "scripts" / "floor_sketch.py"
WORKLOADS = ("bulk", "rr", "conn", "mem")
REFERENCES = ("socat", "haproxy")
DOC_BEGIN = "<!-- BEGIN scripts/bench output -->"
DOC_END = "<!-- END scripts/bench output -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NA = "n/a"
COLORS = {
    "direct": "tab:gray",
    "socat": "tab:orange",
    "haproxy": "tab:blue",
    "floor": "tab:olive",
    "forkproxy": "tab:green",
}


class BenchError(Exception):
    """A sample, a peer or the setup failed; the message says which."""


@dataclass(frozen=True)
class Metric:
    key: str
    workload: str
    title: str
    unit: str
    higher_is_better: bool
    fmt: str


METRICS = (
    Metric("bulk", "bulk", "bulk: iperf3, 1 stream", "Gbit/s", True, "{:.2f}"),
    Metric("rr", "rr", "rr: redis-benchmark PING_INLINE", "req/s", True, "{:,.0f}"),
    Metric("conn", "conn", "conn: redis-benchmark PING_INLINE -k 0", "conn/s", True, "{:,.0f}"),
    Metric("p50", "rr", "latency p50 (rr run)", "ms", False, "{:.3f}"),
    Metric("p99", "rr", "latency p99 (rr run)", "ms", False, "{:.3f}"),
    Metric("mem", "mem", "mem: PSS (anonymous) per idle connection", "KiB", False, "{:.1f}"),
)


@dataclass(frozen=True)
class Target:
    metric: str
    reference: str
    op: str  # ">=" or "<="
    want: float


# The targets for forkproxy (medians of one run, on the 2-core machine kind).
TARGETS = (
    Target("bulk", "socat", ">=", 1.5),
    Target("bulk", "haproxy", ">=", 1.0),
    Target("rr", "socat", ">=", 1.3),
    Target("conn", "socat", ">=", 1.0),
    Target("mem", "socat", "<=", 4.0),
)


@dataclass(frozen=True)
class Sizes:
    rounds: int
    bulk_seconds: int
    rr_requests: int
    rr_clients: int
    conn_requests: int
    conn_clients: int
    mem_conns: int


FULL = Sizes(
    rounds=3,
    bulk_seconds=4,
    rr_requests=200_000,
    rr_clients=50,
    conn_requests=10_000,
    conn_clients=20,
    mem_conns=300,
)
SMOKE = Sizes(
    rounds=1,
    bulk_seconds=1,
    rr_requests=5_000,
    rr_clients=50,
    conn_requests=500,
    conn_clients=20,
    mem_conns=20,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc helpers


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on 127.0.0.1 or 0.0.0.0 (from /proc/net/tcp)."""
    ports: set[int] = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            addr, port = parts[1].split(":")
            if parts[3] == "0A" and addr in ("0100007F", "00000000"):
                ports.add(int(port, 16))
    return ports


def wait_listening(
    port: int, proc: subprocess.Popen[bytes] | None, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while port not in listening_ports():
        if proc is not None and proc.poll() is not None:
            raise BenchError(
                f"{what} exited with status {proc.returncode} before listening on {port}"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not listening on 127.0.0.1:{port} after {timeout:.0f} s")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm may hold spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """root and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            ppid = int(_stat_fields(int(entry))[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


@dataclass(frozen=True)
class TreeMemory:
    pss: int  # KiB, Pss over the process tree
    pss_anon: int  # KiB, Pss_Anon + Pss_Shmem: what the tree's own pages cost
    pte: int  # KiB of page tables (VmPTE): kernel memory, not in PSS
    procs: int


def tree_memory(root: int) -> TreeMemory:
    """Memory of the process tree, from /proc/PID/smaps_rollup and /proc/PID/status."""
    pss = anon = pte = count = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            fields: dict[str, int] = {}
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("Pss", "Pss_Anon", "Pss_Shmem"):
                        fields[key] = int(rest.split()[0])
            with open(f"/proc/{pid}/status") as f:
                pte_line = next((ln for ln in f if ln.startswith("VmPTE:")), "VmPTE: 0 kB")
            pss += fields["Pss"]
            anon += fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0)
            pte += int(pte_line.split()[1])
            count += 1
    return TreeMemory(pss, anon, pte, count)


@dataclass
class TreeUsage:
    """What a process tree has spent: live processes plus the children they have reaped."""

    user: float = 0.0  # CPU seconds
    system: float = 0.0
    faults: int = 0  # minor page faults: copy-on-write copies, mostly, in a forking proxy

    def __sub__(self, other: TreeUsage) -> TreeUsage:
        return TreeUsage(
            self.user - other.user, self.system - other.system, self.faults - other.faults
        )


def tree_usage(root: int) -> TreeUsage:
    usage = TreeUsage()
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = _stat_fields(pid)
            # Fields of stat from 10 (index 7 here): minflt, cminflt, majflt, cmajflt,
            # utime, stime, cutime, cstime.
            usage.faults += int(f[7]) + int(f[8])
            usage.user += (int(f[11]) + int(f[13])) / CLK_TCK
            usage.system += (int(f[12]) + int(f[14])) / CLK_TCK
    return usage


# --------------------------------------------------------------------------- processes


@dataclass
class Running:
    """A started server or proxy; the process leads its own session."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None
    logdir: Path
    command: list[str] = field(default_factory=list)
    stopped: bool = False  # and reaped: its PID may be another process's now

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.stopped:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.proc.pid}) ignored SIGTERM for 10 s: SIGKILL")
        # Whatever is left of its session (children still closing): ours, end it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.stopped = True

    def stderr_tail(self) -> str:
        p = self.logdir / f"{self.name}.err"
        return p.read_text(errors="replace")[-2000:] if p.exists() else ""


def spawn(name: str, argv: list[str], logdir: Path) -> subprocess.Popen[bytes]:
    with open(logdir / f"{name}.out", "wb") as out, open(logdir / f"{name}.err", "wb") as err:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )


class Lab:
    """Targets (redis-server, iperf3 -s) and the candidates' proxies in front of them."""

    def __init__(
        self, logdir: Path, forkproxy: Path, forkproxy_args: list[str], nbthread: int
    ) -> None:
        self.logdir = logdir
        self.forkproxy = forkproxy
        self.forkproxy_args = forkproxy_args
        self.nbthread = nbthread
        self.redis: Running | None = None
        self.iperf: Running | None = None
        self.seq = 0
        # Everything started, stopped or not: a Ctrl-C between a start and the try/finally
        # that stops it (while waiting for a proxy's `listening` line) leaves it to
        # stop_all. Each leads its own session, so the terminal's SIGINT never reaches it.
        self.started: list[Running] = []

    def _spawn(self, name: str, port: int, argv: list[str]) -> Running:
        run = Running(name, port, None, self.logdir, argv)
        self.started.append(run)
        run.proc = spawn(name, argv, self.logdir)
        return run

    # targets -----------------------------------------------------------------

    def start_targets(self, need_redis: bool, need_iperf: bool) -> None:
        if need_redis:
            port = free_port()
            argv = [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxclients",
                "10000",
                "--loglevel",
                "warning",
                "--daemonize",
                "no",
            ]
            self.redis = self._spawn("redis-server", port, argv)
            wait_listening(port, self.redis.proc, 10, "redis-server")
        if need_iperf:
            self.restart_iperf()

    def restart_iperf(self) -> None:
        if self.iperf is not None:
            self.iperf.stop()
        port = free_port()
        argv = ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)]
        self.iperf = self._spawn("iperf3-server", port, argv)
        wait_listening(port, self.iperf.proc, 10, "iperf3 -s")

    def stop_all(self) -> None:
        """Stop whatever is still running, the targets last."""
        for run in reversed(self.started):
            run.stop()

    def target_port(self, workload: str) -> int:
        t = self.iperf if workload == "bulk" else self.redis
        assert t is not None
        return t.port

    # candidates --------------------------------------------------------------

    def command(self, candidate: str, target: int | str, port: int | str = "P") -> list[str]:
        if candidate == "socat":
            return [
                "socat",
                f"TCP4-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                f"TCP4:127.0.0.1:{target}",
            ]
        if candidate == "haproxy":
            return ["haproxy", "-db", "-f", "haproxy.cfg"]
        if candidate == "floor":
            # The same interpreter as forkproxy's, run the way forkproxy runs its own.
            python = self.forkproxy.parent / "python"
            return [str(python), "-I", "-S", str(FLOOR_SKETCH), "serve", "-q",
                    f"127.0.0.1:0=127.0.0.1:{target}"]
        if candidate == "forkproxy":
            return [
                str(self.forkproxy),
                "serve",
                "-q",
                f"127.0.0.1:0=127.0.0.1:{target}",
                *self.forkproxy_args,
            ]
        raise ValueError(candidate)

    def haproxy_cfg(self, port: int | str, target: int | str) -> str:
        return (
            "global\n"
            "    maxconn 4096\n"
            f"    nbthread {self.nbthread}\n"
            "defaults\n"
            "    mode tcp\n"
            "    option splice-auto\n"
            "    timeout connect 5s\n"
            "    timeout client 10m\n"
            "    timeout server 10m\n"
            "frontend fe\n"
            f"    bind 127.0.0.1:{port}\n"
            "    maxconn 4096\n"
            "    default_backend be\n"
            "backend be\n"
            f"    server target 127.0.0.1:{target} maxconn 4096\n"
        )

    def start(self, candidate: str, workload: str) -> Running:
        target = self.target_port(workload)
        if candidate == "direct":
            return Running("direct", target, None, self.logdir)
        self.seq += 1
        name = f"{candidate}-{workload}-{self.seq}"
        if candidate in ("forkproxy", "floor"):
            return self._start_announced(name, target, candidate)
        port = free_port()
        argv = self.command(candidate, target, port)
        if candidate == "haproxy":
            cfg = self.logdir / f"{name}.cfg"
            cfg.write_text(self.haproxy_cfg(port, target))
            argv = ["haproxy", "-db", "-f", str(cfg)]
        run = self._spawn(name, port, argv)
        try:
            wait_listening(port, run.proc, 10, name)
        except BenchError as e:
            run.stop()
            raise BenchError(f"{e}\n{run.stderr_tail()}") from None
        return run

    def _start_announced(self, name: str, target: int, candidate: str = "forkproxy") -> Running:
        """forkproxy or the floor sketch: ready once it prints its `listening` line."""
        argv = self.command(candidate, target)
        run = self._spawn(name, 0, argv)
        proc = run.proc
        assert proc is not None
        # Readiness is the `listening 127.0.0.1:PORT -> ...` line on stdout.
        pattern = re.compile(r"^listening 127\.0\.0\.1:(\d+) -> ", re.M)
        deadline = time.monotonic() + 15
        out = self.logdir / f"{name}.out"
        while True:
            m = pattern.search(out.read_text(errors="replace"))
            if m:
                run.port = int(m.group(1))
                return run
            if proc.poll() is not None or time.monotonic() > deadline:
                run.stop()
                raise BenchError(
                    f"{name}: no 'listening' line (status {proc.returncode})\n{run.stderr_tail()}"
                )
            time.sleep(0.02)


# --------------------------------------------------------------------------- workloads


def run_client(argv: list[str], timeout: float) -> str:
    try:
        p = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{shlex.join(argv)}: no result after {timeout:.0f} s") from None
    out = p.stdout.decode(errors="replace")
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace")
        raise BenchError(f"{shlex.join(argv)}: exit {p.returncode}\n{out[-1500:]}{err[-1500:]}")
    return out


def redis_benchmark(port: int, requests: int, clients: int, keepalive: bool) -> dict[str, float]:
    argv = [
        "redis-benchmark",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-t",
        "ping_inline",
        "-n",
        str(requests),
        "-c",
        str(clients),
        "--csv",
    ]
    if not keepalive:
        argv += ["-k", "0"]
    out = run_client(argv, timeout=300)
    rows = list(csv.DictReader(io.StringIO(out)))
    for row in rows:
        if row.get("test") == "PING_INLINE":
            return {k: float(v) for k, v in row.items() if k != "test"}
    raise BenchError(f"redis-benchmark printed no PING_INLINE row:\n{out[-1500:]}")


def redis_connected_clients(port: int) -> int:
    out = run_client(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "info", "clients"], timeout=10
    )
    m = re.search(r"^connected_clients:(\d+)", out, re.M)
    if not m:
        raise BenchError(f"redis-cli info clients: no connected_clients in {out!r}")
    return int(m.group(1))


def settle(root: int | None, seconds: float = 0.3) -> None:
    """Give the proxy time to reap children of earlier connections (probes, previous work)."""
    if root is None:
        time.sleep(0.1)
        return
    deadline = time.monotonic() + 5
    last = len(process_tree(root))
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = len(process_tree(root))
        if now == last:
            return
        last = now


def sample_bulk(lab: Lab, run: Running, sizes: Sizes) -> dict[str, float]:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(run.port), "-t", str(sizes.bulk_seconds), "-J"]
    for attempt in range(3):
        try:
            data = json.loads(run_client(argv, timeout=sizes.bulk_seconds + 60))
        except (BenchError, json.JSONDecodeError) as e:
            # iperf3 -s serves one test at a time and can stay "busy" after a broken one.
            if attempt == 2:
                raise BenchError(f"iperf3 failed three times: {e}") from None
            log(f"  iperf3 failed ({str(e).splitlines()[0]}); retrying")
            time.sleep(1)
            continue
        if "error" in data:
            raise BenchError(f"iperf3: {data['error']}")
        bps = float(data["end"]["sum_received"]["bits_per_second"])
        return {"bulk": bps / 1e9, "bytes": float(data["end"]["sum_received"]["bytes"])}
    raise AssertionError("unreachable")


def sample_rr(lab: Lab, run: Running, sizes: Sizes) -> dict[str, float]:
    r = redis_benchmark(run.port, sizes.rr_requests, sizes.rr_clients, keepalive=True)
    return {
        "rr": r["rps"],
        "p50": r["p50_latency_ms"],
        "p99": r["p99_latency_ms"],
        "ops": float(sizes.rr_requests),
    }


def sample_conn(lab: Lab, run: Running, sizes: Sizes) -> dict[str, float]:
    r = redis_benchmark(run.port, sizes.conn_requests, sizes.conn_clients, keepalive=False)
    return {"conn": r["rps"], "ops": float(sizes.conn_requests)}


def sample_mem(lab: Lab, run: Running, sizes: Sizes) -> dict[str, float]:
    assert run.pid is not None and lab.redis is not None
    settle(run.pid)
    base_clients = redis_connected_clients(lab.redis.port)
    idle = tree_memory(run.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(sizes.mem_conns):
            socks.append(socket.create_connection(("127.0.0.1", run.port), timeout=10))
        # Wait until every connection is established upstream (redis sees it).
        deadline = time.monotonic() + 60
        while (seen := redis_connected_clients(lab.redis.port) - base_clients) < sizes.mem_conns:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"only {seen} of {sizes.mem_conns} connections reached redis after 60 s"
                )
            time.sleep(0.05)
        settle(run.pid, 0.5)
        loaded = tree_memory(run.pid)
    finally:
        for s in socks:
            s.close()
    n = sizes.mem_conns
    return {
        # The headline is the anonymous part of PSS: file pages (program text, libraries)
        # are shared with every process on the machine that maps them, so their share
        # moves whenever unrelated processes start or stop; what a connection costs is
        # in the anonymous pages. Full PSS is kept beside it.
        "mem": (loaded.pss_anon - idle.pss_anon) / n,
        "mem_pss": (loaded.pss - idle.pss) / n,
        "pte_per_conn_kib": (loaded.pte - idle.pte) / n,
        "pss_idle_kib": float(idle.pss),
        "pss_loaded_kib": float(loaded.pss),
        "procs_idle": float(idle.procs),
        "procs_loaded": float(loaded.procs),
    }


# Beside the table: what each proxy spends, medians over the rounds. key -> (title, unit)
SIDE = {
    "cpu_bulk": ("proxy CPU per GB relayed (bulk)", "s"),
    "cpu_rr": ("proxy CPU per request (rr)", "µs"),
    "user_rr": ("of which in user space (rr)", "µs"),
    "cpu_conn": ("proxy CPU per connection (conn)", "µs"),
    "user_conn": ("of which in user space (conn)", "µs"),
    "faults_conn": ("page faults per connection, whole tree (conn)", "faults"),
    "mem_pss": ("PSS per idle connection including file pages (mem)", "KiB"),
    "pte_per_conn_kib": ("page tables per idle connection (mem; kernel memory, not in PSS)", "KiB"),
}

SAMPLERS = {"bulk": sample_bulk, "rr": sample_rr, "conn": sample_conn, "mem": sample_mem}


# --------------------------------------------------------------------------- the run


@dataclass
class Results:
    samples: dict[str, dict[str, list[float]]] = field(
        default_factory=dict
    )  # metric -> cand -> values
    side: dict[str, dict[str, list[float]]] = field(
        default_factory=dict
    )  # side metric -> cand -> values
    extra: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, metric: str, candidate: str, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(candidate, []).append(value)

    def median(self, metric: str, candidate: str) -> float | None:
        vals = self.samples.get(metric, {}).get(candidate)
        return statistics.median(vals) if vals else None


def rotated(items: Sequence[str], k: int) -> list[str]:
    k %= len(items)
    return [*items[k:], *items[:k]]


def wait_quiet(max_busy: float, max_wait: float) -> float:
    """Between samples nothing of ours runs: wait (bounded) while other work keeps the CPUs busy.

    Returns the busy fraction seen last, recorded with the sample.
    """
    busy = cpu_busy(0.5)
    deadline = time.monotonic() + max_wait
    while busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy(0.5)
    return busy


def run_benchmark(
    lab: Lab,
    candidates: list[str],
    workloads: list[str],
    sizes: Sizes,
    max_busy: float = 1.0,
    max_wait: float = 0.0,
) -> Results:
    res = Results()
    for rnd in range(sizes.rounds):
        for workload in workloads:
            for cand in rotated(candidates, rnd):
                if workload == "mem" and cand == "direct":
                    continue  # no proxy, no process tree
                tag = f"[round {rnd + 1}/{sizes.rounds}] {workload:<4} {cand:<9}"
                busy = wait_quiet(max_busy, max_wait) if max_busy < 1.0 else -1.0
                if busy > max_busy:
                    log(f"{tag} the CPUs are still {busy:.0%} busy with other work: measuring")
                try:
                    run = lab.start(cand, workload)
                except BenchError as e:
                    res.errors.append(f"{tag}: {e}")
                    log(f"{tag} FAILED to start: {e}")
                    continue
                try:
                    if run.pid is not None:
                        settle(run.pid, 0.1)
                    before = tree_usage(run.pid) if run.pid is not None else TreeUsage()
                    values = SAMPLERS[workload](lab, run, sizes)
                    if run.pid is not None:
                        settle(run.pid, 0.1)
                        spent = tree_usage(run.pid) - before
                        ops = values.get("ops") or values.get("bytes", 0.0) / 1e9
                        if ops:
                            # us per request/connection, or CPU seconds per GB for bulk
                            scale = 1.0 if workload == "bulk" else 1e6
                            values[f"cpu_{workload}"] = (spent.user + spent.system) / ops * scale
                            values[f"user_{workload}"] = spent.user / ops * scale
                            values[f"faults_{workload}"] = spent.faults / ops
                except BenchError as e:
                    res.errors.append(f"{tag}: {e}")
                    log(f"{tag} FAILED: {e}\n{run.stderr_tail()}")
                    if workload == "bulk":
                        lab.restart_iperf()
                    continue
                finally:
                    run.stop()
                for key in SIDE:
                    if key in values:
                        res.side.setdefault(key, {}).setdefault(cand, []).append(values[key])
                shown = []
                for m in METRICS:
                    if m.key in values:
                        res.add(m.key, cand, values[m.key])
                        shown.append(f"{m.fmt.format(values[m.key])} {m.unit}")
                res.extra.append(
                    {
                        "round": rnd + 1,
                        "workload": workload,
                        "candidate": cand,
                        "load1": os.getloadavg()[0],
                        "busy_before": busy,
                        **values,
                    }
                )
                log(f"{tag} {', '.join(shown)}")
    return res


# --------------------------------------------------------------------------- report


def ratio(res: Results, metric: str, cand: str, ref: str) -> float | None:
    a, b = res.median(metric, cand), res.median(metric, ref)
    if a is None or b is None or b == 0:
        return None
    return a / b


# The ratios the table shows, of those whose two candidates ran.
RATIOS = (
    ("haproxy", "socat"),
    ("floor", "socat"),
    ("forkproxy", "socat"),
    ("forkproxy", "haproxy"),
    ("forkproxy", "floor"),
)


def ratio_columns(candidates: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in RATIOS if a in candidates and b in candidates]


def target_rows(res: Results) -> list[dict[str, Any]]:
    rows = []
    for t in TARGETS:
        got = ratio(res, t.metric, "forkproxy", t.reference)
        ok = None if got is None else (got >= t.want if t.op == ">=" else got <= t.want)
        rows.append(
            {
                "metric": t.metric,
                "vs": t.reference,
                "op": t.op,
                "want": t.want,
                "got": got,
                "ok": ok,
            }
        )
    return rows


def metric_title(m: Metric, sizes: Sizes) -> str:
    """The metric's title with the workload's size, as this run used it."""
    detail = {
        "bulk": f", {sizes.bulk_seconds} s",
        "rr": f", {sizes.rr_clients} persistent clients, {sizes.rr_requests:,} requests",
        "conn": f" (new connection per request), {sizes.conn_clients} clients,"
        f" {sizes.conn_requests:,} requests",
        "mem": f", {sizes.mem_conns} idle",
    }
    return m.title + detail.get(m.key, "")


def markdown(res: Results, candidates: list[str], sizes: Sizes) -> str:
    cols = ratio_columns(candidates)
    head = ["metric", "unit", *candidates, *(f"{c} / {r}" for c, r in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METRICS:
        if m.key not in res.samples:
            continue
        cells = [
            metric_title(m, sizes),
            m.unit + (" (higher is better)" if m.higher_is_better else " (lower is better)"),
        ]
        for cand in candidates:
            v = res.median(m.key, cand)
            cells.append(NA if v is None else m.fmt.format(v))
        for cand, ref in cols:
            r = ratio(res, m.key, cand, ref)
            cells.append(NA if r is None else f"{r:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    if "forkproxy" in candidates:
        out += "\nTargets for forkproxy (issue 6):\n\n"
        out += "| metric | vs | target | measured | met |\n|---|---|---|---|---|\n"
        for t in target_rows(res):
            if t["metric"] not in res.samples:
                continue
            got = NA if t["got"] is None else f"{t['got']:.2f}x"
            met = {True: "yes", False: "**no**", None: NA}[t["ok"]]
            out += f"| {t['metric']} | {t['vs']} | {t['op']} {t['want']}x | {got} | {met} |\n"
    if res.side:
        procs = [c for c in candidates if c != "direct"]
        # The ratios of what each proxy spends, lower is better: on two shared cores a
        # rate scatters with whatever else the scheduler runs (one build's conn/s moved
        # 0.57x-1.05x of the floor across runs), while the CPU a connection costs the
        # proxy is steadier, so these columns are the better guide between runs.
        side_cols = ratio_columns(procs)
        head = ["unit", *procs, *(f"{c} / {r}" for c, r in side_cols)]
        out += "\nWhat the proxy process tree spends (medians; CPU from /proc, 10 ms ticks;"
        out += " ratios: lower is better):\n\n"
        out += "| | " + " | ".join(head) + " |\n|" + "---|" * (len(head) + 1) + "\n"
        for key, (title, unit) in SIDE.items():
            if key in res.side:
                spent = res.side[key]
                meds = {c: statistics.median(spent[c]) for c in procs if spent.get(c)}
                cells = [NA if c not in meds else f"{meds[c]:.2f}" for c in procs]
                for cand, ref in side_cols:
                    a, b = meds.get(cand), meds.get(ref)
                    cells.append(NA if a is None or not b else f"{a / b:.2f}x")
                out += f"| {title} | {unit} | " + " | ".join(cells) + " |\n"
    return out


def chart(res: Results, candidates: list[str], path: Path) -> bool:
    try:
        # Imported by name: matplotlib is optional (the `bench` extra), and type checkers
        # without it installed must not fail on this file.
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        log("matplotlib not installed (the 'bench' extra): no chart")
        return False
    refs = [r for r in REFERENCES if r in candidates]
    metrics = [m for m in METRICS if m.key in res.samples]
    if not refs or not metrics:
        return False
    fig, axes = plt.subplots(1, len(refs), figsize=(6.5 * len(refs), 4.8), squeeze=False)
    for ax, ref in zip(axes[0], refs, strict=True):
        cands = [c for c in candidates if c != ref]
        width = 0.8 / max(1, len(cands))
        for i, cand in enumerate(cands):
            xs, ys = [], []
            for j, m in enumerate(metrics):
                r = ratio(res, m.key, cand, ref)
                if r is not None:
                    xs.append(j + (i - (len(cands) - 1) / 2) * width)
                    ys.append(r)
            bars = ax.bar(xs, ys, width, label=cand, color=COLORS.get(cand))
            labels = [f"{y:.2g}" if y < 10 else f"{y:.0f}" for y in ys]
            ax.bar_label(bars, labels=labels, fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels(
            [f"{m.key}\n({'higher' if m.higher_is_better else 'lower'} better)" for m in metrics],
            fontsize=8,
        )
        ax.set_title(f"median ratio vs {ref} (1.0 = {ref})")
        ax.legend(fontsize=8)
    fig.suptitle("forkproxy benchmark (scripts/bench)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def tool_version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (p.stdout + p.stderr).decode(errors="replace").strip()
    return re.sub(r"\s*-?\s*https?://\S+", "", text.splitlines()[0]) if text else "?"


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat): others' load before we start."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


def machine_info(forkproxy: Path) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    commit = "unknown"
    with contextlib.suppress(OSError):
        git = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        )
        commit = git.stdout.strip() if git.returncode == 0 else commit
    socat = tool_version(["socat", "-V"])
    socat_line = next(
        (
            ln
            for ln in subprocess.run(["socat", "-V"], capture_output=True, check=False)
            .stdout.decode(errors="replace")
            .splitlines()
            if "socat version" in ln
        ),
        socat,
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version() + f" ({sys.prefix})",
        "forkproxy": str(forkproxy),
        "git_commit": commit,
        "loadavg_at_start": os.getloadavg()[0],
        "cpu_busy_at_start": cpu_busy(),
        "peers": {
            "socat": socat_line.strip(),
            "haproxy": tool_version(["haproxy", "-v"]),
            "redis-benchmark": tool_version(["redis-benchmark", "--version"]),
            "redis-server": tool_version(["redis-server", "--version"]),
            "iperf3": tool_version(["iperf3", "--version"]),
        },
    }


def report_json(
    res: Results,
    candidates: list[str],
    workloads: list[str],
    sizes: Sizes,
    machine: dict[str, Any],
    commands: dict[str, str],
    rerun: str,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for m in METRICS:
        if m.key not in res.samples:
            continue
        results[m.key] = {
            "title": metric_title(m, sizes),
            "unit": m.unit,
            "higher_is_better": m.higher_is_better,
            "candidates": {
                c: {"samples": v, "median": statistics.median(v)}
                for c, v in res.samples[m.key].items()
            },
            "ratios": {f"{c}/{r}": ratio(res, m.key, c, r) for c, r in ratio_columns(candidates)},
        }
    return {
        "schema": 1,
        "machine": machine,
        "rerun": rerun,
        "candidates": candidates,
        "workloads": workloads,
        "sizes": sizes.__dict__,
        "commands": commands,
        "results": results,
        "side": {
            k: {"title": SIDE[k][0], "unit": SIDE[k][1]}
            | {c: statistics.median(v) for c, v in d.items()}
            for k, d in res.side.items()
        },
        "targets": target_rows(res) if "forkproxy" in candidates else [],
        "samples": res.extra,
        "errors": res.errors,
    }


def doc_block(
    table: str,
    machine: dict[str, Any],
    commands: dict[str, str],
    rerun: str,
    png: str | None,
    sizes: Sizes,
) -> str:
    peers = machine["peers"]
    lines = [
        DOC_BEGIN,
        f"Run {machine['date']} at commit `{machine['git_commit']}`,"
        f" {sizes.rounds} rounds, medians.",
        "",
        f"- machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB,"
        f" Linux {machine['kernel']}; before the run the CPUs were"
        f" {machine['cpu_busy_at_start']:.0%} busy with other work"
        + (
            f"; other work between samples: median {during['median']:.0%}, max {during['max']:.0%}"
            if (during := machine.get("busy_before_samples"))
            else ""
        ),
        f"- {machine['duration_s']:.0f} s in all;"
        f" forkproxy from a venv: Python {machine['python'].split()[0]}",
        f"- peers: {peers['socat']}; {peers['haproxy']};"
        f" {peers['redis-benchmark']}; {peers['iperf3']}",
        f"- rerun: `{rerun}`",
        "",
        table.rstrip(),
        "",
        "Commands (P = listen port, T = target port):",
        "",
        *[f"- {k}: `{v}`" for k, v in commands.items() if k != "haproxy.cfg"],
        "",
        "HAProxy configuration:",
        "",
        "```",
        commands.get("haproxy.cfg", "").rstrip(),
        "```",
    ]
    if png:
        lines += ["", f"![ratios vs socat and HAProxy]({png})"]
    lines.append(DOC_END)
    return "\n".join(lines) + "\n"


def update_doc(doc: Path, block: str) -> None:
    text = (
        doc.read_text() if doc.exists() else "# Benchmarks\n\n" + DOC_BEGIN + "\n" + DOC_END + "\n"
    )
    start, end = text.find(DOC_BEGIN), text.find(DOC_END)
    if start < 0 or end < start:
        raise BenchError(f"{doc}: no {DOC_BEGIN} ... {DOC_END} block to replace")
    doc.write_text(text[:start] + block + text[end + len(DOC_END) + 1 :])


# --------------------------------------------------------------------------- main


def csv_list(allowed: Sequence[str]) -> Any:
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {value!r})")
        return [a for a in allowed if a in items]

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        epilog="scripts/bench itself also takes --venv PATH (use that venv as it is, install"
        " nothing) and reads FORKPROXY_BENCH_VENV (where it keeps its own venv).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # scripts/bench reads --smoke itself (no chart, no matplotlib): an abbreviation it
        # would not see as one.
        allow_abbrev=False,
    )
    p.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --smoke)")
    p.add_argument(
        "--only",
        type=csv_list(WORKLOADS),
        default=list(WORKLOADS),
        metavar="W[,W]",
        help=f"workloads to run, of {','.join(WORKLOADS)} (latency comes with rr)",
    )
    p.add_argument(
        "--candidates",
        type=csv_list(CANDIDATES),
        default=list(CANDIDATES),
        metavar="C[,C]",
        help=f"candidates, of {','.join(CANDIDATES)}",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny workloads (~1 s each), 1 round: keeps the harness working",
    )
    p.add_argument(
        "--forkproxy",
        type=Path,
        default=Path(sys.prefix) / "bin" / "forkproxy",
        help="forkproxy executable (default: the one of the venv running this)",
    )
    p.add_argument(
        "--forkproxy-args",
        default="",
        metavar="ARGS",
        help="extra arguments for `forkproxy serve`, one shell-quoted string",
    )
    p.add_argument(
        "--haproxy-nbthread",
        type=int,
        default=os.cpu_count() or 1,
        help="HAProxy nbthread (default: nproc, like its own default)",
    )
    p.add_argument("--mem-conns", type=int, help="idle connections for mem (default 300)")
    p.add_argument(
        "--max-busy",
        type=float,
        help="before each sample, wait while other work keeps the CPUs busier than this"
        " fraction (default 0.25; 1 = never wait; --smoke: 1)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=30.0,
        help="seconds to wait for --max-busy before measuring anyway (default 30)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="directory for benchmarks.json and benchmarks.png"
        " (default: a temporary directory; docs/ with --update-docs)",
    )
    p.add_argument(
        "--update-docs",
        action="store_true",
        help="write docs/benchmarks.{json,png} and the generated block of docs/benchmarks.md",
    )
    return p.parse_args(argv)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop what we started


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.max_busy is None:
        args.max_busy = 1.0 if args.smoke else 0.25
    if args.rounds is not None:
        sizes = Sizes(**{**sizes.__dict__, "rounds": args.rounds})
    if args.mem_conns is not None:
        sizes = Sizes(**{**sizes.__dict__, "mem_conns": args.mem_conns})
    if sizes.rounds < 1 or sizes.mem_conns < 1:
        log("scripts/bench: --rounds and --mem-conns must be >= 1")
        return 2
    if args.update_docs and (
        args.smoke
        or args.only != list(WORKLOADS)
        or args.candidates != list(CANDIDATES)
        or sizes.rounds < 3
    ):
        log(
            "scripts/bench: --update-docs wants a full run:"
            " every workload and candidate, >= 3 rounds, no --smoke"
        )
        return 2
    candidates: list[str] = args.candidates
    workloads: list[str] = args.only
    if "forkproxy" in candidates and not os.access(args.forkproxy, os.X_OK):
        log(
            f"scripts/bench: {args.forkproxy} not found or not executable"
            " (pass --forkproxy PATH, or --candidates direct,socat,haproxy)"
        )
        return 2
    for tool in ("redis-server", "redis-cli", "redis-benchmark", "socat", "haproxy", "iperf3"):
        if shutil.which(tool) is None:
            log(f"scripts/bench: {tool} not found (scripts/bench installs it as root)")
            return 2

    out_dir: Path = args.out or (
        REPO / "docs" if args.update_docs else Path(tempfile.mkdtemp(prefix="forkproxy-bench-"))
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    used_venv = os.environ.get("FORKPROXY_BENCH_USED_VENV")  # scripts/bench --venv PATH
    rerun = shlex.join(["scripts/bench", *(["--venv", used_venv] if used_venv else []), *argv])

    with tempfile.TemporaryDirectory(prefix="forkproxy-bench-logs-") as tmp:
        lab = Lab(
            Path(tmp),
            args.forkproxy.absolute(),
            shlex.split(args.forkproxy_args),
            args.haproxy_nbthread,
        )
        commands = {c: shlex.join(lab.command(c, "T")) for c in candidates if c != "direct"}
        if "forkproxy" in commands:
            commands["forkproxy"] = commands["forkproxy"].replace(str(lab.forkproxy), "forkproxy")
        if "floor" in commands:  # the venv's python and this tree's script, without their paths
            commands["floor"] = shlex.join(
                ["python", "-I", "-S", "scripts/floor_sketch.py", *lab.command("floor", "T")[4:]]
            )
        if "haproxy" in commands:
            commands["haproxy.cfg"] = lab.haproxy_cfg("P", "T")
        machine = machine_info(args.forkproxy)
        if machine["cpu_busy_at_start"] > 0.2:
            log(
                f"scripts/bench: warning: the CPUs were {machine['cpu_busy_at_start']:.0%} busy"
                " before the run started: other work on this machine will skew the numbers"
            )
        log(
            f"scripts/bench: {sizes.rounds} round(s) of {','.join(workloads)}"
            f" over {','.join(candidates)}; logs in {tmp}"
        )
        started = time.monotonic()
        try:
            lab.start_targets(
                need_redis=bool({"rr", "conn", "mem"} & set(workloads)),
                need_iperf="bulk" in workloads,
            )
            res = run_benchmark(lab, candidates, workloads, sizes, args.max_busy, args.max_wait)
        finally:
            # A second Ctrl-C (or a TERM) must not cut the stopping short: what is left
            # runs on in its own session.
            handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
            lab.stop_all()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        machine["duration_s"] = round(time.monotonic() - started, 1)
        loads = [float(x["load1"]) for x in res.extra]
        if loads:
            machine["load1_during"] = {"median": statistics.median(loads), "max": max(loads)}
        busy = [float(x["busy_before"]) for x in res.extra if x["busy_before"] >= 0]
        if busy:
            machine["busy_before_samples"] = {"median": statistics.median(busy), "max": max(busy)}

    table = markdown(res, candidates, sizes)
    print(table, flush=True)
    data = report_json(res, candidates, workloads, sizes, machine, commands, rerun)
    if args.update_docs and res.errors and args.out is None:
        # docs/ keeps its JSON and chart beside the benchmarks.md they match, which a run
        # with failed samples leaves as it was (below).
        out_dir = Path(tempfile.mkdtemp(prefix="forkproxy-bench-"))
    json_path = out_dir / "benchmarks.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    log(f"JSON: {json_path}")
    png_path = out_dir / "benchmarks.png"
    drew = chart(res, candidates, png_path)
    if drew:
        log(f"chart: {png_path}")
    if args.update_docs:
        if res.errors:
            log("scripts/bench: samples failed; docs/ left as it was (this run's files above)")
        else:
            doc = REPO / "docs" / "benchmarks.md"
            update_doc(
                doc,
                doc_block(
                    table, machine, commands, rerun, "benchmarks.png" if drew else None, sizes
                ),
            )
            log(f"updated {doc}")
    if res.errors:
        log(f"scripts/bench: {len(res.errors)} sample(s) failed:")
        for e in res.errors:
            log("  " + e.splitlines()[0])
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        # Ctrl-C: what the run started is stopped by now (the finally blocks); a traceback
        # would only say where it was waiting.
        log("scripts/bench: interrupted")
        sys.exit(130)
