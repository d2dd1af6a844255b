#!/usr/bin/env python3
"""Wire-level audit: the packets forkproxy, socat and HAProxy put on the wire, per scenario.

Run by hand, as root (tcpdump; `--icmp` adds network namespaces), never in CI:

    sudo .venv/bin/python scripts/wire_audit.py [--only NAME ...] [--proxy KIND ...]
                                                [--icmp] [--json OUT]

Each scenario runs directly (the baseline: the client at the server itself) and through
each proxy on loopback, a port the kernel chose for each hop,
with tcpdump capturing both hops (`port P or port T`). What it prints per scenario and
proxy: how the client's and the server's reads ended (`eof`, `reset`, `open`), and the
FIN/RST packets of each hop in order (`c>p F` the client's FIN to the proxy, `p>s R` the
proxy's reset toward the server, ...), plus what the scenario measures itself (TIME_WAIT
holders, SYN options, segment sizes, window, keepalive probes). docs/wire.md holds the
results and what they mean. The proxies: `forkproxy serve 127.0.0.1:0=127.0.0.1:T`
(`--relay auto`; `forkproxy-splice`, `forkproxy-copy` for the other modes),
`socat TCP4-LISTEN:P,bind=127.0.0.1,fork,reuseaddr TCP4:127.0.0.1:T`, and HAProxy in tcp
mode with `option splice-auto`. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FORKPROXY = str(ROOT / ".venv" / "bin" / "forkproxy")
LINGER_RESET = struct.pack("ii", 1, 0)
# Where the server is, and the interface to capture on: loopback, unless `--icmp` runs the
# audit inside a namespace whose upstream is across a veth (main() changes them there).
UPSTREAM = "127.0.0.1"
INTERFACE = "lo"
ICMP_NS = "wire-audit-{pid}-{host}"
ICMP_PORT = 9  # the far namespace rejects it with an ICMP host unreachable
DROP_PORT = 8  # and drops SYNs to this one: a connect that times out
PACKET = re.compile(
    r"^(?P<time>[0-9.]+) (?:\S+\s+\S+\s+)?IP6? "  # -i any: the interface and direction
    r"(?P<src>\S+)\.(?P<sport>\d+) > (?P<dst>\S+)\.(?P<dport>\d+): "
    r"Flags \[(?P<flags>[^\]]*)\](?P<rest>.*)$")


@dataclass
class Options:
    """What a scenario asks of the proxy, in each proxy's own terms."""

    idle: float | None = None
    keepalive: int | None = None
    connect_timeout: int = 5
    grace: int | None = None  # forkproxy --grace: the stop scenario's


# The proxy process of the scenario running (None for direct): the stop scenario signals it.
RUNNING: list[subprocess.Popen[str]] = []


@dataclass
class Result:
    """What one scenario saw through one proxy."""

    client: str = ""
    server: str = ""
    hops: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


def ended(sock: socket.socket, timeout: float) -> tuple[str, bytes]:
    """Read until EOF, a reset or `timeout`: how the read ended and what came."""
    sock.settimeout(timeout)
    got = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return "eof", bytes(got)
            got += chunk
    except ConnectionResetError:
        return "reset", bytes(got)
    except TimeoutError:
        pass
    return "open", bytes(got)


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


class Server:
    """One listener on 127.0.0.1:0; `handler` serves its first connection in a thread."""

    def __init__(self, handler: Callable[[socket.socket], str] | None) -> None:
        self.sock = socket.socket()
        self.outcome = "none"
        self.thread: threading.Thread | None = None
        if UPSTREAM != "127.0.0.1":  # --icmp: a port of the far namespace, as `handler` says
            self.port = DROP_PORT if handler is _DROPPED else ICMP_PORT
            self.sock.close()
            return
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        if handler is None:  # a port nothing listens on: refused
            self.sock.close()
            return
        self.sock.listen(16)
        self.handler = handler
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(20)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        try:
            self.outcome = self.handler(conn)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def join(self) -> str:
        if self.thread is not None:
            self.thread.join(25)
            self.sock.close()
        return self.outcome


@contextlib.contextmanager
def proxy(kind: str, upstream: int, opts: Options, work: Path) -> Iterator[int]:
    """Start proxy `kind` toward 127.0.0.1:`upstream`; yield its port; stop it."""
    if kind == "direct":  # the baseline: no proxy, the client at the server itself
        yield upstream
        return
    if kind.startswith("forkproxy"):  # forkproxy-splice, forkproxy-copy: that --relay
        args = [FORKPROXY, "serve", "-q", f"127.0.0.1:0={UPSTREAM}:{upstream}"]
        if "-" in kind:
            args += ["--relay", kind.split("-", 1)[1]]
        args += ["--connect-timeout", str(opts.connect_timeout)]
        if opts.idle:
            args += ["--idle-timeout", str(opts.idle)]
        if opts.keepalive:
            args += ["--keepalive", str(opts.keepalive)]
        if opts.grace is not None:
            args += ["--grace", str(opts.grace)]
        env = {**os.environ, "XDG_RUNTIME_DIR": str(work)}
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=env, start_new_session=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line.split()[1].rsplit(":", 1)[1])
    else:
        with socket.socket() as probe:  # a port for socat or haproxy to bind
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if kind == "socat":
            lopts = ropts = ""
            if opts.keepalive:
                k = opts.keepalive
                ka = f",keepalive,keepidle={k},keepintvl={max(1, k // 3)},keepcnt=3"
                lopts = ropts = ka
            timeout = ["-T", str(opts.idle)] if opts.idle else []
            ropts += f",connect-timeout={opts.connect_timeout}"
            args = ["socat", *timeout, f"TCP4-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr{lopts}",
                    f"TCP4:{UPSTREAM}:{upstream}{ropts}"]
        else:
            idle = f"{int((opts.idle or 60) * 1000)}ms"
            tcpka = ""
            if opts.keepalive:
                k = opts.keepalive
                tcpka = (f"    option tcpka\n    clitcpka-idle {k}s\n    clitcpka-intvl "
                         f"{max(1, k // 3)}s\n    clitcpka-cnt 3\n    srvtcpka-idle {k}s\n"
                         f"    srvtcpka-intvl {max(1, k // 3)}s\n    srvtcpka-cnt 3\n")
            cfg = work / f"haproxy-{port}.cfg"
            cfg.write_text(
                "global\n    maxconn 100\n"
                "defaults\n    mode tcp\n    option splice-auto\n"
                f"    timeout connect {opts.connect_timeout}s\n"
                f"    timeout client {idle}\n    timeout server {idle}\n"
                f"listen audit\n    bind 127.0.0.1:{port}\n{tcpka}"
                f"    server up {UPSTREAM}:{upstream}\n")
            args = ["haproxy", "-db", "-f", str(cfg)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                # Not a connect (it would be a connection of its own): is the port bound?
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    break
            time.sleep(0.05)
    RUNNING[:] = [proc]
    try:
        yield port
    finally:
        RUNNING.clear()
        if proc.poll() is None:  # not stopped by the scenario
            proc.send_signal(signal.SIGQUIT if kind.startswith("forkproxy") else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        # Its own session's group: whatever of it is left (socat's children outlive their
        # parent's SIGTERM).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def capture(ports: tuple[int, int], work: Path) -> Iterator[list[str]]:
    """tcpdump on lo for both hops; yields a list filled with its lines at the end."""
    pcap = work / f"cap-{ports[0]}.pcap"
    flt = f"(tcp and (port {ports[0]} or port {ports[1]})) or icmp"
    proc = subprocess.Popen(["tcpdump", "--immediate-mode", "-Z", "root", "-i", INTERFACE, "-nn",
                             "-U", "-s", "128", "-w", str(pcap), flt],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    proc.stderr.readline()  # "listening on lo ..."
    lines: list[str] = []
    try:
        yield lines
    finally:
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        proc.stderr.close()
        out = subprocess.run(["tcpdump", "-nn", "-tt", "-r", str(pcap)], capture_output=True,
                             text=True, check=False).stdout
        lines.extend(out.splitlines())


def hops(lines: list[str], listen: int, upstream: int) -> list[str]:
    """The SYN/FIN/RST events of both hops in order, as `c>p F`, `s>p R`..."""
    events: list[str] = []
    for line in lines:
        if " ICMP " in line:
            events.append("icmp>p " + line.split(" ICMP ", 1)[1].split(",")[0])
            continue
        m = PACKET.match(line)
        if not m:
            continue
        sport, dport, flags = int(m["sport"]), int(m["dport"]), m["flags"]
        if listen == upstream:  # direct: the client's own connection to the server
            who = "c>s" if dport == listen else "s>c"
        elif dport == listen:
            who = "c>p"
        elif sport == listen:
            who = "p>c"
        elif dport == upstream:
            who = "p>s"
        elif sport == upstream:
            who = "s>p"
        else:
            continue
        marks = "".join(f for f in "FR" if f in flags)
        if marks:
            events.append(f"{who} {marks}")
    return events


def squeeze(events: list[str]) -> list[str]:
    """Repeats of one event in a row as one, with a count (`icmp>p ... x8`)."""
    out: list[str] = []
    count = 0
    for i, event in enumerate(events):
        count += 1
        if i + 1 == len(events) or events[i + 1] != event:
            out.append(event if count == 1 else f"{event} x{count}")
            count = 0
    return out


def packets(lines: list[str], src_port: int | None = None,
            dst_port: int | None = None) -> list[dict[str, Any]]:
    """Parsed packets, filtered by source or destination port."""
    out = []
    for line in lines:
        m = PACKET.match(line)
        if not m:
            continue
        if src_port is not None and int(m["sport"]) != src_port:
            continue
        if dst_port is not None and int(m["dport"]) != dst_port:
            continue
        length = re.search(r"length (\d+)", m["rest"])
        win = re.search(r"win (\d+)", m["rest"])
        opts = re.search(r"options \[([^\]]*)\]", m["rest"])
        out.append({"t": float(m["time"]), "flags": m["flags"],
                    "len": int(length[1]) if length else 0,
                    "win": int(win[1]) if win else None,
                    "options": opts[1] if opts else "", "line": line})
    return out


def time_wait(ports: tuple[int, int]) -> dict[str, str]:
    """Which end of each hop holds TIME_WAIT now, from `ss -tan state time-wait`."""
    listen, upstream = ports
    out = subprocess.run(["ss", "-Htan", "state", "time-wait"], capture_output=True,
                         text=True, check=False).stdout
    held = {"client hop": "nobody", "upstream hop": "nobody"}
    for row in out.splitlines():
        parts = row.split()
        if len(parts) < 4:
            continue
        local, peer = int(parts[-2].rsplit(":", 1)[1]), int(parts[-1].rsplit(":", 1)[1])
        if listen == upstream:  # direct: one hop, the client's to the server
            if local == listen:
                held["client hop"] = "server"
            elif peer == listen:
                held["client hop"] = "client"
        elif local == listen:
            held["client hop"] = "proxy"
        elif peer == listen:
            held["client hop"] = "client"
        elif local == upstream:
            held["upstream hop"] = "server"
        elif peer == upstream:
            held["upstream hop"] = "proxy"
    return held


# --- scenarios: each takes (client socket, server, result) after the connect ------------

Scenario = tuple[Callable[[socket.socket], str] | None,
                 Callable[[socket.socket, Result], None], Options]


def s_normal_client_first() -> Scenario:
    def server(conn: socket.socket) -> str:
        how, got = ended(conn, 5)
        conn.sendall(b"bye")
        return f"{how} {len(got)}B"

    def client(sock: socket.socket, r: Result) -> None:
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        how, got = ended(sock, 5)
        r.client = f"{how} {got!r}"
        sock.close()
    return server, client, Options()


def s_normal_server_first() -> Scenario:
    def server(conn: socket.socket) -> str:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        how, got = ended(conn, 5)
        return f"{how} {len(got)}B"

    def client(sock: socket.socket, r: Result) -> None:
        how, got = ended(sock, 5)
        r.client = f"{how} {got!r}"
        sock.sendall(b"thanks")
        sock.close()
    return server, client, Options()


def s_halfclose_client_late_reply() -> Scenario:
    """The client half-closes; the server answers 1.5 s later (socat's -t is 0.5 s)."""
    def server(conn: socket.socket) -> str:
        how, got = ended(conn, 5)
        time.sleep(1.5)
        try:
            conn.sendall(b"late reply")
        except OSError as exc:
            return f"{how} {len(got)}B, send failed: {exc.strerror}"
        return f"{how} {len(got)}B, sent"

    def client(sock: socket.socket, r: Result) -> None:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        how, got = ended(sock, 5)
        r.client = f"{how} {got!r}"
        sock.close()
    return server, client, Options()


def s_halfclose_server_late_data() -> Scenario:
    """The server half-closes first; the client sends 1.5 s later (data after FIN)."""
    def server(conn: socket.socket) -> str:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        how, got = ended(conn, 5)
        return f"{how} {got!r}"

    def client(sock: socket.socket, r: Result) -> None:
        how, got = ended(sock, 2)
        time.sleep(1.5)
        try:
            sock.sendall(b"late data")
            r.client = f"{how} {got!r}, sent"
        except OSError as exc:
            r.client = f"{how} {got!r}, send failed: {exc.strerror}"
        time.sleep(0.5)
        sock.close()
    return server, client, Options()


def s_client_resets() -> Scenario:
    def server(conn: socket.socket) -> str:
        time.sleep(0.5)  # the client's bytes sit unread when its RST arrives
        how, got = ended(conn, 5)
        return f"{how} {len(got)}B"

    def client(sock: socket.socket, r: Result) -> None:
        sock.sendall(b"x" * 100_000)
        time.sleep(0.1)
        reset(sock)
        r.client = "reset sent"
    return server, client, Options()


def s_server_resets() -> Scenario:
    def server(conn: socket.socket) -> str:
        conn.sendall(b"y" * 100_000)
        time.sleep(0.05)
        reset(conn)
        return "reset sent"

    def client(sock: socket.socket, r: Result) -> None:
        time.sleep(0.5)
        how, got = ended(sock, 5)
        r.client = f"{how} {len(got)}B"
        sock.close()
    return server, client, Options()


def s_refused_silent() -> Scenario:
    def client(sock: socket.socket, r: Result) -> None:
        start = time.monotonic()
        how, _ = ended(sock, 12)
        r.client = f"{how} after {time.monotonic() - start:.2f}s"
        sock.close()
    return None, client, Options()


def s_refused_sent() -> Scenario:
    def client(sock: socket.socket, r: Result) -> None:
        sock.sendall(b"hello")
        start = time.monotonic()
        how, _ = ended(sock, 12)
        r.client = f"{how} after {time.monotonic() - start:.2f}s"
        sock.close()
    return None, client, Options()


def s_idle_timeout() -> Scenario:
    def server(conn: socket.socket) -> str:
        how, _ = ended(conn, 8)
        return how

    def client(sock: socket.socket, r: Result) -> None:
        sock.sendall(b"hi")
        start = time.monotonic()
        how, _ = ended(sock, 8)
        r.client = f"{how} after {time.monotonic() - start:.1f}s"
        sock.close()
    return server, client, Options(idle=1.0)


def s_keepalive() -> Scenario:
    def server(conn: socket.socket) -> str:
        how, _ = ended(conn, 6)
        return how

    def client(sock: socket.socket, r: Result) -> None:
        sock.sendall(b"hi")
        how, _ = ended(sock, 5)
        r.client = how
        sock.close()
    return server, client, Options(keepalive=1)


def s_zero_window() -> Scenario:
    """The server reads nothing for 3 s; the client writes all it can, non-blocking."""
    def server(conn: socket.socket) -> str:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        time.sleep(3)
        how, got = ended(conn, 10)
        return f"{how} {len(got)}B"

    def client(sock: socket.socket, r: Result) -> None:
        sock.setblocking(False)
        sent, chunk = 0, b"z" * 65536
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
        r.notes["accepted before the server read"] = f"{sent / 2**20:.1f} MiB"
        sock.setblocking(True)
        sock.close()
    return server, client, Options()


def s_small_writes() -> Scenario:
    """200 writes of 10 bytes, 1 ms apart, client to server: segments on the upstream hop."""
    def server(conn: socket.socket) -> str:
        how, got = ended(conn, 10)
        return f"{how} {len(got)}B"

    def client(sock: socket.socket, r: Result) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(200):
            sock.send(b"0123456789")
            time.sleep(0.001)
        sock.close()
    return server, client, Options()


def s_server_closed_client_sends() -> Scenario:
    """The server closes (not a half-close) after a banner; the client sends 0.5 s later:
    directly, the server's kernel answers those bytes with an RST."""
    def server(conn: socket.socket) -> str:
        conn.sendall(b"banner")
        conn.close()
        return "closed"

    def client(sock: socket.socket, r: Result) -> None:
        how, got = ended(sock, 2)
        time.sleep(0.5)
        sock.sendall(b"late data")
        time.sleep(0.5)
        after, _ = ended(sock, 2)
        try:
            sock.sendall(b"more")
            again = "second send ok"
        except OSError as exc:
            again = f"second send: {exc.strerror}"
        r.client = f"{how} {got!r}, then read: {after}, {again}"
        sock.close()
    return server, client, Options()


def s_client_closed_server_sends() -> Scenario:
    """The mirror: the client closes after its request; the server answers 0.5 s later,
    which the client's kernel answers with an RST."""
    def server(conn: socket.socket) -> str:
        how, got = ended(conn, 2)
        time.sleep(0.5)
        conn.sendall(b"late reply")
        time.sleep(0.5)
        after, _ = ended(conn, 2)
        try:
            conn.sendall(b"more")
            again = "second send ok"
        except OSError as exc:
            again = f"second send: {exc.strerror}"
        return f"{how} {got!r}, then read: {after}, {again}"

    def client(sock: socket.socket, r: Result) -> None:
        sock.sendall(b"request")
        sock.close()
        r.client = "closed"
    return server, client, Options()


def s_halfclosed_client_server_resets() -> Scenario:
    """The client half-closes after its request; the server resets mid-answer."""
    def server(conn: socket.socket) -> str:
        ended(conn, 2)
        conn.sendall(b"a" * 100_000)
        reset(conn)
        return "reset sent"

    def client(sock: socket.socket, r: Result) -> None:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        time.sleep(0.5)
        how, got = ended(sock, 5)
        r.client = f"{how} {len(got)}B"
        sock.close()
    return server, client, Options()


def s_accept_then_reset() -> Scenario:
    """The server accepts and resets at once (a service at its connection limit)."""
    def server(conn: socket.socket) -> str:
        reset(conn)
        return "reset sent"

    def client(sock: socket.socket, r: Result) -> None:
        how, got = ended(sock, 5)
        r.client = f"{how} {len(got)}B"
        sock.close()
    return server, client, Options()


def s_small_writes_down() -> Scenario:
    """200 writes of 10 bytes, 1 ms apart, server to client: segments on the client hop."""
    def server(conn: socket.socket) -> str:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(200):
            conn.send(b"0123456789")
            time.sleep(0.001)
        return "sent"

    def client(sock: socket.socket, r: Result) -> None:
        how, got = ended(sock, 10)
        r.client = f"{how} {len(got)}B"
        sock.close()
    return server, client, Options()


def s_halfclosed_client_resets() -> Scenario:
    """The client half-closes, then resets while the server's 8 MiB reply flows."""
    def server(conn: socket.socket) -> str:
        ended(conn, 2)
        try:
            for _ in range(128):
                conn.sendall(b"d" * 65536)
                time.sleep(0.01)
        except OSError as exc:
            return f"send failed: {exc.strerror}"
        how, _ = ended(conn, 3)
        return f"all sent, then {how}"

    def client(sock: socket.socket, r: Result) -> None:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)
        time.sleep(0.3)
        reset(sock)
        r.client = "reset sent"
    return server, client, Options()


def s_halfclosed_server_resets() -> Scenario:
    """The server half-closes, then resets while the client's 8 MiB upload flows."""
    def server(conn: socket.socket) -> str:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        conn.recv(65536)
        time.sleep(0.3)
        reset(conn)
        return "reset sent"

    def client(sock: socket.socket, r: Result) -> None:
        sock.recv(100)
        try:
            for _ in range(128):
                sock.sendall(b"u" * 65536)
                time.sleep(0.01)
        except OSError as exc:
            r.client = f"send failed: {exc.strerror}"
        else:
            how, _ = ended(sock, 3)
            r.client = f"all sent, then {how}"
        sock.close()
    return server, client, Options()


def s_stop() -> Scenario:
    """The proxy is stopped (SIGTERM; forkproxy with --grace 1) with one idle connection."""
    def server(conn: socket.socket) -> str:
        how, _ = ended(conn, 8)
        return how

    def client(sock: socket.socket, r: Result) -> None:
        sock.sendall(b"hi")
        time.sleep(0.5)
        if RUNNING:
            RUNNING[0].send_signal(signal.SIGTERM)
        start = time.monotonic()
        how, _ = ended(sock, 6)
        r.client = f"{how} after {time.monotonic() - start:.1f}s"
        sock.close()
    return server, client, Options(grace=1)


def _DROPPED(conn: socket.socket) -> str:
    """A marker, never called: the server is DROP_PORT of the far namespace."""
    return "never called"


def s_dropped(sent: bool) -> Callable[[], Scenario]:
    """The upstream drops SYNs; the proxy's connect timeout is 1 s (haproxy retries)."""
    def make() -> Scenario:
        _, client, _ = (s_refused_sent if sent else s_refused_silent)()
        return _DROPPED, client, Options(connect_timeout=1)
    return make


def s_idle_stopped_reader() -> Scenario:
    """--idle-timeout 1 while the proxy holds a reply the client never reads."""
    def server(conn: socket.socket) -> str:
        conn.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            try:
                sent += conn.send(b"r" * 65536)
            except BlockingIOError:
                time.sleep(0.01)
        conn.setblocking(True)
        how, _ = ended(conn, 8)
        return f"{how} (sent {sent / 2**20:.1f} MiB)"

    def client(sock: socket.socket, r: Result) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        time.sleep(4)
        how, got = ended(sock, 5)
        r.client = f"{how} after reading {len(got) / 2**20:.1f} MiB"
        sock.close()
    return server, client, Options(idle=1.0)


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "close, client first": s_normal_client_first,
    "close, server first": s_normal_server_first,
    "client half-closes, reply 1.5 s later": s_halfclose_client_late_reply,
    "server half-closes, client sends 1.5 s later": s_halfclose_server_late_data,
    "client resets, bytes unread upstream": s_client_resets,
    "server resets, bytes in flight": s_server_resets,
    "upstream refuses, client silent": s_refused_silent,
    "upstream refuses, client sent 5 B": s_refused_sent,
    "idle timeout 1 s": s_idle_timeout,
    "idle timeout 1 s, reply held for a client that stopped reading": s_idle_stopped_reader,
    "keepalive 1 s, both idle": s_keepalive,
    "server stops reading (zero window)": s_zero_window,
    "small writes (10 B, 1 ms apart)": s_small_writes,
    "small writes down (10 B, 1 ms apart)": s_small_writes_down,
    "server closes, client sends 0.5 s later": s_server_closed_client_sends,
    "client closes, server sends 0.5 s later": s_client_closed_server_sends,
    "client half-closed, server resets mid-answer": s_halfclosed_client_server_resets,
    "server accepts and resets at once": s_accept_then_reset,
    "proxy stopped (SIGTERM) with an idle connection": s_stop,
    "client half-closed, then resets while the reply flows": s_halfclosed_client_resets,
    "server half-closed, then resets while the upload flows": s_halfclosed_server_resets,
}

ICMP_SCENARIOS = {
    "upstream host unreachable (ICMP), client silent": s_refused_silent,
    "upstream host unreachable (ICMP), client sent 5 B": s_refused_sent,
    "upstream drops SYNs (connect timeout 1 s), client silent": s_dropped(False),
    "upstream drops SYNs (connect timeout 1 s), client sent 5 B": s_dropped(True),
}


@contextlib.contextmanager
def icmp_lab() -> Iterator[str]:
    """Two namespaces and a veth: here 198.18.36.1, there 198.18.36.2, which answers TCP
    to ICMP_PORT with an ICMP host unreachable. Yields the near namespace's name."""
    near, far = (ICMP_NS.format(pid=os.getpid(), host=h) for h in ("near", "far"))
    veth = f"wa{os.getpid() % 100000}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True)
    try:
        ip("netns", "add", near)
        ip("netns", "add", far)
        ip("link", "add", f"{veth}a", "netns", near, "type", "veth", "peer", "name",
           f"{veth}b", "netns", far)
        for ns, dev, addr in ((near, f"{veth}a", "198.18.36.1/24"),
                              (far, f"{veth}b", "198.18.36.2/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", far, "iptables", "-A", "INPUT", "-p", "tcp",
                        "--dport", str(ICMP_PORT), "-j", "REJECT", "--reject-with",
                        "icmp-host-unreachable"], check=True)
        subprocess.run(["ip", "netns", "exec", far, "iptables", "-A", "INPUT", "-p", "tcp",
                        "--dport", str(DROP_PORT), "-j", "DROP"], check=True)
        yield near
    finally:
        for ns in (near, far):
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)


def run(name: str, kind: str, work: Path) -> Result:
    """One scenario through one proxy."""
    handler, client, opts = SCENARIOS[name]()
    server = Server(handler)
    r = Result()
    with proxy(kind, server.port, opts, work) as port, capture((port, server.port), work) as lines:
        host = UPSTREAM if kind == "direct" else "127.0.0.1"
        try:
            sock = socket.create_connection((host, port), timeout=5)
        except OSError as exc:  # direct, to a refusing upstream
            r.client = f"connect: {exc.strerror or exc}"
            r.server = server.join()
        else:
            client(sock, r)
            r.server = server.join()
        if name.startswith("close,"):
            r.notes["TIME_WAIT"] = time_wait((port, server.port))
    r.hops = squeeze(hops(lines, port, server.port))
    if name.startswith("close, client"):
        syn_c = packets(lines, dst_port=port)
        syn_s = packets(lines, dst_port=server.port)
        for label, syns in (("client SYN", syn_c), ("upstream SYN", syn_s)):
            first = next((p["options"] for p in syns if p["flags"] == "S"), "")
            r.notes[label] = re.sub(r"TS val \d+ ecr \d+", "TS", first)
    if name.startswith("small writes down"):
        segs = [p["len"] for p in packets(lines, src_port=port) if p["len"]]
        r.notes["client segments"] = f"{len(segs)} (max {max(segs, default=0)} B)"
    elif name.startswith("small writes"):
        segs = [p["len"] for p in packets(lines, dst_port=server.port) if p["len"]]
        r.notes["upstream segments"] = f"{len(segs)} (max {max(segs, default=0)} B)"
    if name.startswith("server stops"):
        zero = [p for p in packets(lines, src_port=port) if p["win"] == 0]
        r.notes["zero window to client"] = f"{len(zero)} segments"
    if name.startswith("keepalive"):
        # A probe is an empty ACK that no data or FIN asked for, a second or more after it.
        for label, src in (("probes to client", port), ("probes to server", None)):
            sel = packets(lines, src_port=src) if src else [
                p for p in packets(lines, dst_port=server.port)]
            every = packets(lines)
            first = min((p["t"] for p in every), default=0.0)
            end = min((p["t"] for p in every if set(p["flags"]) & {"F", "R"}), default=1e18)
            probes = [round(p["t"] - first, 1) for p in sel if p["flags"] == "."
                      and p["len"] == 0 and first + 0.9 < p["t"] < end]
            r.notes[label] = probes
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[],
                        help="run only scenarios whose name contains this (repeatable)")
    parser.add_argument("--proxy", action="append", default=[],
                        choices=["direct", "forkproxy", "forkproxy-splice", "forkproxy-copy",
                                 "socat", "haproxy"])
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--icmp", action="store_true",
                        help="the ICMP scenarios, in network namespaces of their own")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global UPSTREAM, INTERFACE
    # Bad input first, before minutes of runs or a namespace: one line, exit 2.
    pool = ICMP_SCENARIOS if args.icmp else SCENARIOS
    for only in args.only:
        if not any(only in name for name in pool):
            print(f"{parser.prog}: no scenario{' of --icmp' if args.icmp else ''} matches "
                  f"--only {only!r}", file=sys.stderr)
            return 2
    if args.json is not None and not args.inside:
        try:
            args.json.write_text("{}")
        except OSError as exc:
            print(f"{parser.prog}: cannot write --json {args.json}: {exc.strerror}",
                  file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print(f"{parser.prog}: run as root (tcpdump, network namespaces)", file=sys.stderr)
        return 2
    if args.icmp and not args.inside:
        with icmp_lab() as near:
            return subprocess.run(["ip", "netns", "exec", near, sys.executable, *sys.argv,
                                   "--inside"], check=False).returncode
    if args.inside:
        UPSTREAM, INTERFACE = "198.18.36.2", "any"
        SCENARIOS.clear()
        SCENARIOS.update(ICMP_SCENARIOS)
    for tool in ("tcpdump", "socat", "haproxy", "ss"):
        if shutil.which(tool) is None:
            print(f"{parser.prog}: {tool} not found", file=sys.stderr)
            return 2
    kinds = args.proxy or ["direct", "forkproxy", "socat", "haproxy"]
    names = [n for n in SCENARIOS if not args.only or any(o in n for o in args.only)]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="wire-audit-") as tmp:
        work = Path(tmp)
        for name in names:
            print(f"## {name}")
            for kind in kinds:
                r = run(name, kind, work)
                results.setdefault(name, {})[kind] = r.__dict__
                print(f"  {kind:9} client: {r.client} | server: {r.server}")
                print(f"  {'':9} packets: {', '.join(r.hops) or '-'}")
                for key, value in r.notes.items():
                    print(f"  {'':9} {key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
