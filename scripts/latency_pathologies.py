#!/usr/bin/env python3
"""Latency pathologies: forkproxy against socat, HAProxy and a direct connection (loopback).

Cases, each on one connection unless said (time.perf_counter_ns; p50/p99/max in µs):
  wwr    write-write-read: an 8-byte header and a 100-byte body in two send()s, the server
         answers (32 bytes) only after both; client and server with and without
         TCP_NODELAY (c1s0: client NODELAY on, server off)
  tiny   20,000 echoed messages of 1-100 bytes pipelined (a writer thread): msgs/s, and
         latency from send to echo (queueing dominates it)
  after  a 32-byte request/response right after a 1 MiB response (auto switches to splice)
  first  connect, request, response on a new connection each time (fork + connect included)
  bulk   a request/response while another connection of the same proxy downloads
  two    an upstream that answers 16 bytes, pauses 10 ms, answers 16 more: time to the
         first part (a proxy holding it back would show ~10 ms) and to the whole
  upl    a 256 KiB request, then a 32-byte response

Each case stops at its sample count or its time budget, whichever comes first (`n` says
which). Needs socat and haproxy. Usage:

    scripts/latency_pathologies.py [CASE...] [--only direct,forkproxy-auto,...]
        [--forkproxy PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

HDR = struct.Struct("!cxxxI")  # command, body length
BIG = b"x" * (1024 * 1024)
ns = time.perf_counter_ns
Stats = dict[str, float]


# -- the upstream (this script with --server PORT NODELAY) -------------------------------


def _exact(s: socket.socket, n: int) -> bytearray:
    buf = bytearray(max(n, 1))
    view, got = memoryview(buf), 0
    while got < n:
        k = s.recv_into(view[got:], n - got)
        if not k:
            raise EOFError
        got += k
    return buf


def _handle(s: socket.socket, nodelay: int) -> None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, nodelay)
    try:
        while True:
            cmd, n = HDR.unpack(_exact(s, HDR.size))
            body = _exact(s, n)[:n]
            if cmd == b"r":
                s.sendall(b"R" * 32)
            elif cmd == b"B":
                s.sendall(BIG)
            elif cmd == b"t":
                s.sendall(b"1" * 16)
                time.sleep(0.01)
                s.sendall(b"2" * 16)
            elif cmd == b"e":
                s.sendall(body)
            elif cmd == b"S":
                for _ in range(n):
                    s.sendall(BIG)
    except (OSError, EOFError):
        pass
    finally:
        s.close()


def run_server(port: int, nodelay: int) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(512)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=_handle, args=(c, nodelay), daemon=True).start()


# -- the proxies -------------------------------------------------------------------------


class Procs:
    """The processes this run started (only those are ever stopped)."""

    def __init__(self, logdir: str) -> None:
        self.logdir, self.procs = logdir, list[subprocess.Popen[bytes]]()

    def start(self, cmd: list[str], port: int) -> None:
        log = open(os.path.join(self.logdir, f"log-{port}"), "wb")  # noqa: SIM115
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"{cmd[0]}: nothing listening on port {port} after 10 s")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def proxies(procs: Procs, sport: int, forkproxy: str, modes: tuple[str, ...]) -> dict[str, int]:
    out = {"direct": sport}
    for mode in modes:
        p = free_port()
        procs.start([forkproxy, "serve", f"127.0.0.1:{p}=127.0.0.1:{sport}", "--relay", mode], p)
        out[f"forkproxy-{mode}"] = p
    p = free_port()
    procs.start(["socat", f"TCP4-LISTEN:{p},fork,reuseaddr,bind=127.0.0.1",
                 f"TCP4:127.0.0.1:{sport}"], p)
    out["socat"] = p
    p = free_port()
    cfg = os.path.join(procs.logdir, f"haproxy-{p}.cfg")
    with open(cfg, "w") as f:
        f.write(f"global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n"
                f"  timeout client 300s\n  timeout server 300s\nfrontend f\n"
                f"  bind 127.0.0.1:{p}\n  default_backend b\nbackend b\n"
                f"  server s 127.0.0.1:{sport}\n")
    procs.start(["haproxy", "-f", cfg, "-db"], p)
    out["haproxy"] = p
    return out


# -- the cases ---------------------------------------------------------------------------


def stats(xs: list[int]) -> Stats:
    xs = sorted(xs)
    n = len(xs)

    def q(f: float) -> float:
        return round(xs[min(n - 1, int(f * n))] / 1e3, 1)

    return {"n": n, "p50": q(0.5), "p99": q(0.99), "max": round(xs[-1] / 1e3, 1)}


def sample(one: Callable[[], int], n: int, seconds: float) -> list[int]:
    out: list[int] = []
    end = time.monotonic() + seconds
    while len(out) < n and time.monotonic() < end:
        out.append(one())
    return out


def connect(port: int, nodelay: int = 1) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, nodelay)
    return s


def wwr(port: int, nodelay: int) -> Stats:
    s, hdr, body = connect(port, nodelay), HDR.pack(b"r", 100), b"b" * 100
    for _ in range(20):  # past the connection's quick-ACK start
        s.send(hdr)
        s.send(body)
        _exact(s, 32)

    def one() -> int:
        t = ns()
        s.send(hdr)
        s.send(body)
        _exact(s, 32)
        return ns() - t

    r = sample(one, 2000, 25)
    s.close()
    return stats(r)


def tiny(port: int, n: int = 20000) -> Stats:
    s = connect(port)
    sizes = [random.randint(1, 100) for _ in range(n)]
    msgs = [HDR.pack(b"e", k) + b"m" * k for k in sizes]
    sent, lat = [0] * n, []

    def writer() -> None:
        for i, m in enumerate(msgs):
            sent[i] = ns()
            s.sendall(m)

    t0 = ns()
    th = threading.Thread(target=writer)
    th.start()
    for i, k in enumerate(sizes):
        _exact(s, k)
        lat.append(ns() - sent[i])
    elapsed = ns() - t0
    th.join()
    s.close()
    out = stats(lat)
    out["msgs_per_s"] = round(n / (elapsed / 1e9))
    return out


def request_after(port: int, first: bytes, first_reply: int, second: bytes) -> Stats:
    s = connect(port)

    def one() -> int:
        if first:
            s.sendall(first)
            _exact(s, first_reply)
        t = ns()
        s.sendall(second)
        _exact(s, 32)
        return ns() - t

    r = sample(one, 2000, 40)
    s.close()
    return stats(r)


def first(port: int) -> Stats:
    req = HDR.pack(b"r", 0)

    def one() -> int:
        t = ns()
        s = connect(port)
        s.send(req)
        _exact(s, 32)
        d = ns() - t
        s.close()
        return d

    return stats(sample(one, 2000, 40))


def under_bulk(port: int) -> Stats:
    b = socket.create_connection(("127.0.0.1", port))
    b.sendall(HDR.pack(b"S", 1_000_000))
    stop = threading.Event()

    def drain() -> None:  # a thread: the GIL is given up in recv
        buf = bytearray(1 << 20)
        while not stop.is_set() and b.recv_into(buf):
            pass

    th = threading.Thread(target=drain)
    th.start()
    time.sleep(0.5)
    try:
        return request_after(port, b"", 0, HDR.pack(b"r", 0))
    finally:
        stop.set()
        b.shutdown(socket.SHUT_RDWR)
        th.join(10)
        b.close()


def two_parts(port: int) -> dict[str, Stats]:
    s, req, parts = connect(port), HDR.pack(b"t", 0), list[int]()

    def one() -> int:
        t = ns()
        s.send(req)
        _exact(s, 16)
        parts.append(ns() - t)
        _exact(s, 16)
        return ns() - t

    total = sample(one, 2000, 30)
    s.close()
    return {"first": stats(parts), "total": stats(total)}


CASES = ("wwr", "tiny", "after", "first", "bulk", "two", "upl")


def run_case(case: str, port: int) -> object:
    """One case but wwr (which needs the servers without NODELAY too) on one target."""
    if case == "tiny":
        return tiny(port)
    if case == "after":
        return request_after(port, HDR.pack(b"B", 0), len(BIG), HDR.pack(b"r", 0))
    if case == "first":
        return first(port)
    if case == "bulk":
        return under_bulk(port)
    if case == "two":
        return two_parts(port)
    upload = HDR.pack(b"r", 256 * 1024) + b"u" * (256 * 1024)
    return request_after(port, b"", 0, upload)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cases", nargs="*", default=list(CASES))
    ap.add_argument("--only", default="", help="targets, comma-separated")
    ap.add_argument("--forkproxy", default=shutil.which("forkproxy") or "forkproxy")
    ap.add_argument("--json", default="")
    ap.add_argument("--server", nargs=2, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.server:
        run_server(*a.server)
        return
    for case in a.cases:
        if case not in CASES:
            print(f"latency_pathologies.py: unknown case {case!r} (one of {', '.join(CASES)})",
                  file=sys.stderr)
            sys.exit(2)
    only = set(filter(None, a.only.split(",")))
    results: dict[str, object] = {}
    procs = Procs(tempfile.mkdtemp(prefix="latency-"))
    try:
        ports = {}
        for nodelay in (1, 0):
            sport = free_port()
            procs.start([sys.executable, __file__, "--server", str(sport), str(nodelay)], sport)
            ports[nodelay] = proxies(procs, sport, a.forkproxy,
                                     ("auto", "splice", "copy") if nodelay else ("auto",))
        for case in a.cases:
            for name, port in ports[1].items():
                if only and name not in only:
                    continue
                got: dict[str, object] = {}
                if case == "wwr":
                    for cnd in (1, 0):
                        for snd in (1, 0):
                            if name in ports[snd]:
                                got[f"wwr c{cnd}s{snd} {name}"] = wwr(ports[snd][name], cnd)
                else:
                    got[f"{case} {name}"] = run_case(case, port)
                for key, value in got.items():
                    print(key, value, flush=True)
                results.update(got)
    finally:
        procs.stop()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
