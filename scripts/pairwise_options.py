#!/usr/bin/env python3
"""Pairwise (combinatorial) testing of `forkproxy serve`'s options, against real peers.

A small greedy generator (AETG-like, seeded, no dependency) builds a covering array in
which every PAIR of values of two options appears in at least one row; for each row a
real `forkproxy serve` is started with that combination (options given as flags, as
FORKPROXY_ variables, or both with the variables saying otherwise, where the flag must
win; links as SPECs, --from-env or --env-file) in front of four links: A to an in-process
test upstream, B to a redis-server, C to a closed port, D to a port that drops SYNs. The
same scenario battery runs against every row, and each invariant that breaks is printed:

  bulk         4 MiB up and 4 MiB down, sha256 in = out both ways
  late-reply   a client half-closes and its reply comes 2.5 s later: cut only with
               --idle-timeout or --halfclose-timeout, else delivered whole
  reset        the upstream resets after 1 MiB: the client sees a reset, never a FIN,
               after a prefix of what was sent
  reset-upload the upstream resets during a 4 MiB upload: the client sees a reset, not a FIN
  stalled      a client pauses its download 2.5 s: all of it, or a reset, never a FIN early
  idle         a silent client: cut (a FIN) at ~--idle-timeout, else left open
  burst        6 clients at once: at most --max-children active, the rest queued in
               status, a SIGHUP meanwhile, every one served
  redis        redis-benchmark, 300 requests, no error
  denied       a client from 127.0.0.2: refused only where --allow leaves it out
  dead         link C: the client is closed, no sooner than --connect-retries' backoff
  blackhole    link D drops SYNs: the client is closed after --connect-timeout per attempt
  gives-up     a client resets while its child connects: the child ends before its
               connect would have (client-reset; connect-failed at --connect-timeout 1,
               whose first attempt fails before the client is watched, from 1 s on)
  reload       SIGHUP and `forkproxy reload` with a live connection, which relays on
               (with --env-file, link C rewired to the test upstream, and served there)
  control      `status` and `check` answer; the metrics and SIGUSR1's table agree with
               status; the close lines agree with status's outcomes; every line parses
               (JSON in json mode); no traceback, error, relay-crashed or child-died line
  stop         SIGTERM with a live connection (at --max-children 2, a second and a
               waiting one): it relays during --grace, a SIGHUP is reload-skipped, then it
               is reset (or idle-cut); the waiting one is served or dropped as the log
               says; exit 0, nothing of the proxy's left running

    .venv/bin/python scripts/pairwise_options.py [--print] [--only 3,5] [--triples]
    .venv/bin/python scripts/pairwise_options.py --set idle=1 --set relay=splice  # one row

Not run by CI: about 30 s a row, 17 rows. `--triples` covers every TRIPLE of the timer
options' values (idle, halfclose, keepalive, user-timeout, connect-timeout, grace)
instead, in 12 rows, the others at their first value.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import os
import random
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
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"
LISTEN_ADDR = "127.0.0.3"

FACTORS: dict[str, list[str]] = {
    "relay": ["auto", "splice", "copy"],
    "allow": ["unset", "127.0.0.1/32", "127.0.0.0/8"],
    "verbosity": ["none", "-q", "-v"],
    "source": ["spec", "from-env", "env-file"],
    "idle": ["off", "1"],
    "halfclose": ["off", "1"],
    "keepalive": ["off", "2"],
    "user_timeout": ["off", "1"],
    "max_children": ["default", "2"],
    "connect_timeout": ["2", "1"],
    "connect_retries": ["0", "2"],
    "log_format": ["text", "json"],
    "metrics": ["off", "on"],
    "target": ["address", "name"],
    "resolve_every": ["off", "1"],
    "grace": ["2", "0"],
    "via": ["flags", "env", "both"],
}
# via=both: each option's variable set to this while its flag gives the row's value.
OPPOSITE = {"off": "1", "1": "off", "2": "1", "0": "2", "auto": "copy", "splice": "copy",
            "copy": "splice", "text": "json", "json": "text", LISTEN_ADDR: "127.0.0.1"}
TIMERS = ["idle", "halfclose", "keepalive", "user_timeout", "connect_timeout", "grace"]

Row = dict[str, str]


def covering_array(factors: dict[str, list[str]], strength: int, seed: int = 38) -> list[Row]:
    """Rows covering every `strength`-tuple of values: greedy, best of 40 random candidates."""
    names = list(factors)
    rng = random.Random(seed)
    uncovered: set[tuple[tuple[str, str], ...]] = set()
    for combo in itertools.combinations(names, strength):
        for values in itertools.product(*(factors[name] for name in combo)):
            uncovered.add(tuple(zip(combo, values, strict=True)))

    def gain(row: Row) -> int:
        return sum(1 for combo in itertools.combinations(sorted(row, key=names.index), strength)
                   if tuple((name, row[name]) for name in combo) in uncovered)

    rows: list[Row] = []
    while uncovered:
        best: Row = {}
        best_gain = -1
        for _ in range(40):
            # Seed each candidate with one uncovered tuple, so every row makes progress.
            row: Row = dict(rng.choice(sorted(uncovered)))
            order = [name for name in names if name not in row]
            rng.shuffle(order)
            for name in order:
                choices = factors[name][:]
                rng.shuffle(choices)
                row[name] = max(choices, key=lambda value: gain({**row, name: value}))
            row = {name: row[name] for name in names}
            row_gain = gain(row)
            if row_gain > best_gain:
                best, best_gain = row, row_gain
        rows.append(best)
        for combo in itertools.combinations(names, strength):
            uncovered.discard(tuple((name, best[name]) for name in combo))
    return rows


# --- the test upstream -------------------------------------------------------------------

def pattern(size: int, salt: bytes) -> bytes:
    """`size` deterministic bytes (a sha256 chain), different for each salt."""
    out = bytearray()
    block = salt
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def read_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        line += chunk
    return line.strip()


def read_all(conn: socket.socket) -> bytes:
    parts = []
    while chunk := conn.recv(1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def serve_upstream_conn(conn: socket.socket) -> None:
    """One connection of the test upstream: its first line says what to do."""
    try:
        words = read_line(conn).split()
        if not words:
            return
        if words[0] == b"ECHO":
            while chunk := conn.recv(1 << 16):
                conn.sendall(chunk)
        elif words[0] == b"HASH":
            size, delay = int(words[1]), float(words[2])
            digest = hashlib.sha256(read_all(conn)).hexdigest().encode()
            time.sleep(delay)
            conn.sendall(digest + b"\n" + pattern(size, b"down"))
        elif words[0] == b"RESET":
            conn.sendall(pattern(int(words[1]), b"reset"))
            time.sleep(0.2)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif words[0] == b"RESETUP":
            want, got = int(words[1]), 0
            while got < want and (chunk := conn.recv(min(1 << 16, want - got))):
                got += len(chunk)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif words[0] == b"SEND":
            conn.sendall(pattern(int(words[1]), b"send"))
        elif words[0] == b"HOLD":
            read_all(conn)
    except OSError:
        pass
    finally:
        conn.close()


def start_upstream() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)

    def loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=serve_upstream_conn, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return sock, int(sock.getsockname()[1])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --- one row ---------------------------------------------------------------------------

@dataclass
class Run:
    row: Row
    work: Path
    ports: dict[str, int]
    upstreams: dict[str, int]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    connections: int = 0
    resets_while_connecting: int = 0  # ended with no close line, counted as client-reset

    @property
    def sock_path(self) -> str:
        return str(self.work / "control.sock")

    def fail(self, what: str) -> None:
        self.problems.append(what)

    def connect(self, link: str, timeout: float = 10) -> socket.socket:
        """A client connected to `link`'s port, counted in `connections`."""
        sock = client(timeout=timeout)
        try:
            sock.connect((LISTEN_ADDR, self.ports[link]))
        except OSError:
            sock.close()
            raise
        self.connections += 1
        return sock

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV / "forkproxy"), *args, "--status-socket", self.sock_path],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def status(self) -> dict[str, object]:
        done = self.cli("status", "--json")
        if done.returncode != 0:
            self.fail(f"status exit {done.returncode}: {done.stderr.strip()}")
            return {}
        parsed: dict[str, object] = json.loads(done.stdout)
        return parsed

    def links(self) -> dict[str, dict[str, object]]:
        links = self.status().get("links", {})
        assert isinstance(links, dict)
        return links

    def link_name(self, key: str) -> str:
        if self.row["source"] == "spec":
            return f"{LISTEN_ADDR}:{self.ports[key]}={self.target_host()}:{self.upstreams[key]}"
        return f"{key}_PORT_{self.ports[key]}_TCP"

    def target_host(self) -> str:
        return "localhost" if self.row["target"] == "name" else "127.0.0.1"


def command(run: Run) -> tuple[list[str], dict[str, str]]:
    """The serve command line and environment for the row."""
    row = run.row
    env = {key: value for key, value in os.environ.items() if not key.startswith("FORKPROXY_")}
    args = [str(VENV / "forkproxy"), "serve", "--status-socket", run.sock_path]
    opts: list[tuple[str, str, str]] = [("--relay", "FORKPROXY_RELAY", row["relay"])]
    for name, flag in [("idle", "--idle-timeout"), ("halfclose", "--halfclose-timeout"),
                       ("keepalive", "--keepalive"), ("user_timeout", "--user-timeout"),
                       ("resolve_every", "--resolve-every")]:
        opts.append((flag, "FORKPROXY_" + flag[2:].upper().replace("-", "_"), row[name]))
    opts += [("--connect-timeout", "FORKPROXY_CONNECT_TIMEOUT", row["connect_timeout"]),
             ("--connect-retries", "FORKPROXY_CONNECT_RETRIES", row["connect_retries"]),
             ("--grace", "FORKPROXY_GRACE", row["grace"]),
             ("--log-format", "FORKPROXY_LOG_FORMAT", row["log_format"])]
    if row["max_children"] != "default":
        opts.append(("--max-children", "FORKPROXY_MAX_CHILDREN", row["max_children"]))
    if row["metrics"] == "on":
        opts.append(("--metrics", "FORKPROXY_METRICS", "127.0.0.1:0"))
    if row["source"] != "spec":
        opts.append(("--bind", "FORKPROXY_BIND", LISTEN_ADDR))
    for flag, variable, value in opts:
        if row["via"] == "env":
            env[variable] = value
        else:
            args += [flag, value]
        if row["via"] == "both":
            # The variable says otherwise (or is not even valid): the flag must win.
            env[variable] = OPPOSITE.get(value, "bogus") if flag != "--metrics" else "bogus"
    if row["allow"] != "unset":
        args += ["--allow", row["allow"]]
        if row["via"] == "both":
            env["FORKPROXY_ALLOW"] = "10.0.0.0/8"  # would refuse every client here
    if row["verbosity"] != "none":
        args.append(row["verbosity"])
    links = {f"{key}_PORT_{run.ports[key]}_TCP": f"tcp://{run.target_host()}:{run.upstreams[key]}"
             for key in run.ports}
    if row["source"] == "spec":
        args += [f"{LISTEN_ADDR}:{run.ports[key]}={run.target_host()}:{run.upstreams[key]}"
                 for key in run.ports]
    elif row["source"] == "from-env":
        env.update(links)
        args.append("--from-env")
    else:
        env_file = run.work / "links.env"
        env_file.write_text("".join(f"{name}={value}\n" for name, value in links.items()))
        args += ["--env-file", str(env_file)]
    return args, env


def client(source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(timeout)
    return sock


def recv_until_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the end, and how it ended: fin, reset or timeout."""
    parts = []
    try:
        while chunk := sock.recv(1 << 16):
            parts.append(chunk)
        end = "fin"
    except ConnectionResetError:
        end = "reset"
    except TimeoutError:
        end = "timeout"
    return b"".join(parts), end


def scenario_bulk(run: Run) -> None:
    size = 4 << 20
    up = pattern(size, b"up")
    with run.connect("A", 20) as sock:
        sock.sendall(f"HASH {size} 0.05\n".encode() + up)
        sock.shutdown(socket.SHUT_WR)
        data, end = recv_until_end(sock)
    want = hashlib.sha256(up).hexdigest().encode() + b"\n" + pattern(size, b"down")
    if data != want or end != "fin":
        run.fail(f"bulk: got {len(data)} of {len(want)} bytes, equal={data == want}, end={end}")


def scenario_late_reply(run: Run) -> None:
    cut = run.row["idle"] != "off" or run.row["halfclose"] != "off"
    with run.connect("A", 8) as sock:
        sock.sendall(b"HASH 1000 2.5\nquestion")
        sock.shutdown(socket.SHUT_WR)
        start = time.monotonic()
        data, end = recv_until_end(sock)
        took = time.monotonic() - start
    want = hashlib.sha256(b"question").hexdigest().encode() + b"\n" + pattern(1000, b"down")
    if cut:
        if data or end != "fin" or took > 2.3:
            run.fail(f"late-reply: expected a cut (FIN, nothing) before 2.5 s, got {len(data)} "
                     f"bytes, end={end} after {took:.2f}s")
        else:
            run.notes.append(f"late-reply cut after {took:.2f}s")
    elif data != want or end != "fin":
        run.fail(f"late-reply: expected the whole reply, got {len(data)} bytes, end={end}")


def scenario_reset(run: Run) -> None:
    size = 1 << 20
    with run.connect("A") as sock:
        sock.sendall(f"RESET {size}\n".encode())
        data, end = recv_until_end(sock)
    if end != "reset" or data != pattern(size, b"reset")[:len(data)]:
        run.fail(f"reset: client saw end={end} after {len(data)} of {size} bytes "
                 f"(prefix ok={data == pattern(size, b'reset')[:len(data)]})")
    elif len(data) != size:
        run.notes.append(f"reset: {len(data)} of {size} bytes before the reset")


def scenario_reset_upload(run: Run) -> None:
    """The upstream resets after 64 KiB of a 4 MiB upload: the client must see a reset."""
    with run.connect("A", 20) as sock:
        end = "fin"
        try:
            sock.sendall(b"RESETUP 65536\n" + pattern(4 << 20, b"up"))
            sock.shutdown(socket.SHUT_WR)
            data, end = recv_until_end(sock)
        except (ConnectionResetError, BrokenPipeError):
            data, end = b"", "reset"
    if end != "reset" or data:
        run.fail(f"reset-upload: the client lost its upload and saw end={end}, {len(data)} bytes")


def scenario_stalled_reader(run: Run) -> None:
    """A client stops reading a download for 2.5 s: whole, or reset; never cut with a FIN."""
    for size in (2 << 20, 16 << 20):
        with run.connect("A", 20) as sock:
            sock.sendall(f"SEND {size}\n".encode())
            first = b""
            try:
                while len(first) < 65536:
                    chunk = sock.recv(65536 - len(first))
                    if not chunk:
                        break
                    first += chunk
            except OSError:
                pass
            time.sleep(2.5)
            rest, end = recv_until_end(sock)
        data = first + rest
        want = pattern(size, b"send")
        whole = data == want and end == "fin"
        if not whole and (end != "reset" or data != want[:len(data)]):
            run.fail(f"stalled-reader {size >> 20} MiB: {len(data)} of {size} bytes, "
                     f"end={end}, prefix ok={data == want[:len(data)]}")
        run.notes.append(f"stalled-reader {size >> 20} MiB: {len(data)} bytes, {end}")


def scenario_idle(run: Run) -> None:
    with run.connect("A", 2.5) as sock:
        start = time.monotonic()
        data, end = recv_until_end(sock)
        took = time.monotonic() - start
    if run.row["idle"] != "off":
        if end != "fin" or data:
            run.fail(f"idle: expected a FIN at ~1 s, got end={end}, {len(data)} bytes")
        else:
            run.notes.append(f"idle cut after {took:.2f}s")
    elif end != "timeout":
        run.fail(f"idle: a silent client was ended ({end}) after {took:.2f}s with no idle-timeout")


def scenario_burst(run: Run) -> None:
    limit = 1024 if run.row["max_children"] == "default" else int(run.row["max_children"])
    forked_before = run.links().get(run.link_name("A"), {}).get("connections")
    assert isinstance(forked_before, int)
    socks = []
    for index in range(6):
        sock = run.connect("A")
        sock.sendall(f"ECHO\nburst{index}".encode())
        socks.append(sock)
    time.sleep(0.5)
    status = run.status()
    links = status.get("links", {})
    assert isinstance(links, dict)
    info = links.get(run.link_name("A"), {})
    active = info.get("active")
    if not isinstance(active, int) or active > limit:
        run.fail(f"burst: active={active} with max-children {limit}")
    listeners = status.get("listeners", [])
    assert isinstance(listeners, list)
    queued = [item.get("queued") for item in listeners if item.get("port") == run.ports["A"]]
    forked = info.get("connections")
    assert isinstance(forked, int)
    if limit < 6 and queued != [6 - (forked - forked_before)]:
        # At the limit the rest wait in the kernel's accept queue, which status shows (with
        # --idle-timeout, the first served may have been cut already, and more forked).
        run.fail(f"burst: active={active} queued={queued} forked={forked - forked_before}: "
                 f"6 clients, max-children {limit}")
    assert run.proc is not None
    run.proc.send_signal(signal.SIGHUP)  # a reload while clients wait: they are kept
    served = 0
    for index, sock in enumerate(socks):
        try:
            got = b""
            while len(got) < len(f"burst{index}"):
                chunk = sock.recv(100)
                if not chunk:
                    break
                got += chunk
            served += got == f"burst{index}".encode()
        except OSError as error:
            run.fail(f"burst: client {index}: {error!r}")
        sock.close()
    if served != 6:
        run.fail(f"burst: {served} of 6 clients served")


def scenario_redis(run: Run) -> None:
    done = subprocess.run(["redis-benchmark", "-h", LISTEN_ADDR, "-p", str(run.ports["B"]),
                           "-n", "300", "-c", "2", "-t", "ping,set,get", "-q"],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0 or "error" in (done.stdout + done.stderr).lower():
        run.fail(f"redis: exit {done.returncode}: {(done.stdout + done.stderr)[-300:]!r}")


def scenario_denied(run: Run) -> None:
    refused = run.row["allow"] == "127.0.0.1/32"
    with client("127.0.0.2", timeout=5) as sock:
        sock.connect((LISTEN_ADDR, run.ports["A"]))
        run.connections += 0 if refused else 1
        try:
            sock.sendall(b"ECHO\nhello")
        except OSError:
            pass
        got = b""
        end = "fin"
        try:
            while len(got) < 5:
                chunk = sock.recv(100)
                if not chunk:
                    break
                got += chunk
        except OSError as error:
            end = type(error).__name__
    if refused and got:
        run.fail(f"denied: a client outside --allow got {got!r}")
    if not refused and got != b"hello":
        run.fail(f"denied: an allowed client from 127.0.0.2 got {got!r}, end={end}")


def backoff(retries: int) -> float:
    """The least a client waits in --connect-retries' backoff before its last attempt
    (0.2 s, then 0.4 s more; counted up to two retries here)."""
    return [0.0, 0.2, 0.6][min(retries, 2)]


def hello_until_end(run: Run, link: str, timeout: float) -> tuple[bytes, str, float]:
    """`hello` to `link`, then everything until the end: (bytes, how it ended, seconds)."""
    with run.connect(link, timeout) as sock:
        start = time.monotonic()
        sock.sendall(b"hello")
        data, end = recv_until_end(sock)
        return data, end, time.monotonic() - start


def scenario_dead(run: Run) -> None:
    retries = int(run.row["connect_retries"])
    floor = backoff(retries)
    data, end, took = hello_until_end(run, "C", 30)
    if data or end == "timeout" or took < floor * 0.9:
        run.fail(f"dead: got {len(data)} bytes, end={end} after {took:.2f}s (retries {retries})")


class Pinger:
    """A byte echoed every 0.2 s on an ECHO connection, which keeps off --idle-timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self.ping)
        self.thread.start()

    def ping(self) -> None:
        while not self.stop.is_set():
            try:
                self.sock.sendall(b"p")
                if self.sock.recv(10) != b"p":
                    self.errors.append("no echo")
                    return
            except OSError as error:
                self.errors.append(repr(error))
                return
            time.sleep(0.2)

    def finish(self) -> list[str]:
        self.stop.set()
        self.thread.join()
        return self.errors


def scenario_blackhole(run: Run) -> None:
    """Link D's upstream drops SYNs: the client waits out every attempt's connect timeout."""
    timeout, retries = float(run.row["connect_timeout"]), int(run.row["connect_retries"])
    expected = timeout * (1 + retries) + backoff(retries)
    data, end, took = hello_until_end(run, "D", expected + 15)
    if data or end == "timeout" or took < expected * 0.95:
        run.fail(f"blackhole: got {len(data)} bytes, end={end} after {took:.2f}s, expected "
                 f"{expected:.1f}s (connect-timeout {timeout:g} x {1 + retries} + backoff)")
    else:
        run.notes.append(f"blackhole ended {end} after {took:.2f}s (expected {expected:.1f})")


def scenario_gives_up(run: Run) -> None:
    """A client resets while its child connects to link D: the slot frees before the connect
    would have ended. The child watches its client from 1 s into its first attempt
    (relay.WATCH_CONNECT_AFTER), so with --connect-timeout 1 that attempt fails first, and
    the reset then ends it as a failed connect; else it is a client-reset."""
    timeout, retries = float(run.row["connect_timeout"]), int(run.row["connect_retries"])
    whole = timeout * (1 + retries) + [0.0, 0.2, 0.6][min(retries, 2)]
    expected = "client-reset" if timeout > 1 else "connect-failed"
    info = run.links().get(run.link_name("D"), {})
    before, sum_before = info.get("outcomes", {}), info.get("duration_sum")
    assert isinstance(before, dict) and isinstance(sum_before, float)
    sock = run.connect("D")
    run.resets_while_connecting += expected == "client-reset"
    time.sleep(0.3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    deadline = time.monotonic() + whole + 10
    while run.links().get(run.link_name("D"), {}).get("active") != 0:
        if time.monotonic() > deadline:
            run.fail("gives-up: the child still held its slot 10 s after its connect's end")
            return
        time.sleep(0.05)
    # The child's life, from the histogram's sum (status polls too slowly to time it).
    sum_after = run.links()[run.link_name("D")]["duration_sum"]
    assert isinstance(sum_after, float)
    lived = sum_after - sum_before
    if lived > whole - 0.2 and not (timeout <= 1 and retries == 0):
        run.fail(f"gives-up: the child lived {lived:.2f}s, its client reset at 0.3 s and its "
                 f"connect would have ended by {whole:.1f}s")
    after = run.links().get(run.link_name("D"), {}).get("outcomes", {})
    assert isinstance(after, dict)
    if after.get(expected, 0) != before.get(expected, 0) + 1:
        run.fail(f"gives-up: link D's outcomes {before} -> {after}, expected one {expected}")


def scenario_reload(run: Run) -> None:
    assert run.proc is not None
    with run.connect("A") as sock:
        sock.sendall(b"ECHO\none")
        if sock.recv(10) != b"one":
            run.fail("reload: no echo before")
        pinger = Pinger(sock)
        if run.row["source"] == "env-file":
            # Rewire link C from its closed port to the test upstream.
            env_file = run.work / "links.env"
            env_file.write_text(env_file.read_text().replace(
                f":{run.upstreams['C']}\n", f":{run.upstreams['A']}\n"))
        run.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        done = run.cli("reload")
        if done.returncode != 0:
            run.fail(f"reload: exit {done.returncode}: {done.stderr.strip()}")
        time.sleep(0.3)
        if errors := pinger.finish():
            run.fail(f"reload: the live connection failed across the reloads: {errors}")
    if run.row["source"] == "env-file":
        with run.connect("C") as sock:
            sock.sendall(b"ECHO\nrewired")
            data = b""
            while len(data) < 7 and (chunk := sock.recv(10)):
                data += chunk
            if data != b"rewired":
                run.fail(f"reload: link C rewired to the test upstream answered {data!r}")


def scenario_control(run: Run) -> tuple[dict[str, object], list[int]]:
    """check, status, metrics and the log agree; returns the status and pids to watch."""
    check = run.cli("check")
    if check.returncode != 0:
        run.fail(f"check: exit {check.returncode}: {check.stderr.strip()}")
    deadline = time.monotonic() + 15
    while True:
        status = run.status()
        links = status.get("links", {})
        assert isinstance(links, dict)
        if all(info.get("active") == 0 for info in links.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # Link B's connections are redis-benchmark's, not counted by the battery.
    total = sum(int(info["connections"]) for name, info in links.items()
                if name != run.link_name("B"))
    if total != run.connections:
        run.fail(f"control: status counts {total} connections, the battery made {run.connections}")
    for info in links.values():
        if info.get("active") != 0:
            run.fail(f"control: still active after 15 s: {info.get('active')}")
    pids: list[int] = [int(child["pid"]) for child in status.get("children", [])]  # type: ignore[attr-defined]
    metrics = status.get("metrics")
    if run.row["metrics"] == "on":
        assert isinstance(metrics, dict)
        pids.append(int(metrics["pid"]))
        with urllib.request.urlopen(str(metrics["url"]), timeout=10) as response:
            page = response.read().decode()
        for name, info in links.items():
            wanted = r'^forkproxy_connections_total\{link="' + re.escape(name) + r'"\} (\S+)$'
            line = re.search(wanted, page, re.M)
            if not line or float(line.group(1)) != info["connections"]:
                run.fail(f"metrics: {name} total {line and line.group(1)} != status "
                         f"{info['connections']}")
            scraped = {outcome: float(value) for outcome, value in re.findall(
                r'^forkproxy_connections_ended_total\{link="' + re.escape(name)
                + r'",outcome="([^"]+)"\} (\S+)$', page, re.M) if float(value)}
            if scraped != {k: float(v) for k, v in dict(info.get("outcomes", {})).items() if v}:
                run.fail(f"metrics: {name} ended {scraped} != status {info.get('outcomes')}")
    # SIGUSR1's table (written at any level) agrees with status.
    assert run.proc is not None
    run.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    table: dict[str, dict[str, object]] = {}
    while len(table) < len(links) and time.monotonic() < deadline:
        time.sleep(0.2)
        table = {str(record.get("link")): record for record in parse_log(run)
                 if record.get("event") == "status-link"}
    for name, info in links.items():
        if name not in table or str(table[name].get("total")) != str(info["connections"]):
            run.fail(f"sigusr1: {name}: status-link {table.get(name)} vs status total "
                     f"{info['connections']}")
    # The close lines agree with status's outcomes (no close line without per-connection logs).
    if run.row["verbosity"] != "-q":
        closes: collections.Counter[str] = collections.Counter()
        for record in parse_log(run):
            if record.get("event") == "close":
                closes[str(record.get("outcome"))] += 1
        outcomes: collections.Counter[str] = collections.Counter()
        for info in links.values():
            outcomes.update(info.get("outcomes", {}))
        outcomes.pop("connect-failed", None)
        outcomes["client-reset"] -= run.resets_while_connecting
        outcomes = +outcomes  # drops the zero counts
        if closes != outcomes:
            run.fail(f"log: close lines {dict(closes)} != status outcomes {dict(outcomes)}")
    return status, pids


def scenario_stop(run: Run, pids: list[int]) -> None:
    """SIGTERM with a live connection (and at --max-children 2, a second and a waiting one)."""
    assert run.proc is not None
    grace = float(run.row["grace"])
    live: list[socket.socket] = []
    for _ in range(1 if run.row["max_children"] == "default" else 2):
        sock = run.connect("A", grace + 10)
        sock.sendall(b"ECHO\none")
        if sock.recv(10) != b"one":
            run.fail("stop: no echo before")
        live.append(sock)
    pingers = [Pinger(sock) for sock in live]
    waiter = None
    if run.row["max_children"] != "default":
        # Beyond --max-children: it waits in the backlog, served if a slot frees in the grace.
        waiter = client(timeout=grace + 10)
        waiter.connect((LISTEN_ADDR, run.ports["A"]))
        waiter.sendall(b"ECHO\nwait")
        time.sleep(0.3)
    children = [int(child["pid"]) for child in run.status().get("children", [])]  # type: ignore[attr-defined]
    for pinger in pingers:
        if errors := pinger.finish():
            run.fail(f"stop: a live connection failed before the stop: {errors}")
    run.proc.send_signal(signal.SIGTERM)
    if grace > 0:
        time.sleep(0.1)
        run.proc.send_signal(signal.SIGHUP)  # a reload during the stop: skipped, with a line
        time.sleep(0.1)
        try:
            live[0].sendall(b"two")
            if live[0].recv(10) != b"two":
                run.fail("stop: the live connection did not relay during the grace")
        except OSError as error:
            run.fail(f"stop: the live connection failed during the grace: {error!r}")
    allowed = {"reset"} | ({"fin"} if run.row["idle"] != "off" else set())
    for sock in live:
        data, end = recv_until_end(sock)
        sock.close()
        if end not in allowed or data:
            run.fail(f"stop: the live connection ended {end} with {len(data)} bytes more")
    waiter_served = False
    if waiter is not None:
        data, end = recv_until_end(waiter)
        waiter.close()
        waiter_served = data == b"wait"
        run.connections += waiter_served
        if data not in (b"", b"wait") or end == "timeout" or (waiter_served and end not in allowed):
            run.fail(f"stop: the waiting client got {data!r}, end={end}")
        run.notes.append(f"stop: the waiting client {'was served' if waiter_served else 'was not'}"
                         f", end={end}")
    try:
        code = run.proc.wait(timeout=grace + 15)
    except subprocess.TimeoutExpired:
        run.fail("stop: the supervisor did not exit")
        run.proc.kill()
        code = run.proc.wait()
    if code != 0:
        run.fail(f"stop: exit status {code}")
    if grace > 0 and not any(record.get("event") == "reload-skipped" for record in parse_log(run)):
        run.fail("stop: no reload-skipped line for a SIGHUP during the stop")
    if waiter is not None:
        dropped = [record for record in parse_log(run) if record.get("event") == "dropped"]
        if waiter_served == bool(dropped):
            run.fail(f"stop: waiting client served={waiter_served}, dropped lines {dropped}")
    time.sleep(0.3)
    for pid in pids + children:
        if Path(f"/proc/{pid}").exists():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if "(forkproxy" in stat:
                run.fail(f"stop: process {pid} left running: {stat[:60]}")


def parse_log(run: Run) -> Iterator[dict[str, object]]:
    """The log's records; a line that does not parse is a problem."""
    text_line = re.compile(r'^\d{4}-\d\d-\d\dT\S+Z forkproxy\[\d+\] (debug|info|warning|error) '
                           r'(\S+)((?: [a-z_]+=(?:"(?:[^"\\]|\\.)*"|\S*))*)$')
    pair = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|\S*)')
    for line in run.log_path.read_text(errors="replace").splitlines():
        if run.row["log_format"] == "json":
            try:
                record = json.loads(line)
            except ValueError:
                run.fail(f"log: not JSON: {line[:120]!r}")
                continue
            if not isinstance(record, dict):
                run.fail(f"log: not an object: {line[:120]!r}")
                continue
            yield record
        else:
            match = text_line.match(line)
            if not match:
                run.fail(f"log: unparsed line: {line[:160]!r}")
                continue
            record = {"level": match.group(1), "event": match.group(2)}
            for key, value in pair.findall(match.group(3)):
                record[key] = value.strip('"')
            yield record


def check_log(run: Run) -> None:
    text = run.log_path.read_text(errors="replace")
    if "Traceback" in text:
        run.fail("log: a traceback: " + text[text.index("Traceback"):][:400])
    # SIGUSR1's table is written at level info whatever the level: it was asked for.
    levels = collections.Counter(str(record.get("level")) for record in parse_log(run)
                                 if not str(record.get("event")).startswith("status-"))
    events = collections.Counter(str(record.get("event")) for record in parse_log(run))
    if run.row["verbosity"] == "-q" and (levels["info"] or levels["debug"]):
        run.fail(f"log: -q wrote {levels['info']} info and {levels['debug']} debug lines")
    if run.row["verbosity"] != "-v" and levels["debug"]:
        run.fail(f"log: {levels['debug']} debug lines without -v")
    for event in ("relay-crashed", "child-died", "log-dropped"):
        if events[event]:
            run.fail(f"log: {events[event]} {event} lines")
    errors = [record for record in parse_log(run) if record.get("level") == "error"]
    if errors:
        run.fail(f"log: error lines: {errors[:3]}")
    if run.row["verbosity"] != "-q" and not events["exited"]:
        run.fail("log: no exited line")
    run.notes.append("events " + ",".join(f"{k}={v}" for k, v in sorted(events.items())))


def run_row(row: Row, redis_port: int, keep: bool) -> Run:
    work = Path(tempfile.mkdtemp(prefix="pairwise38-row-"))
    upstream, upstream_port = start_upstream()
    # D: a listener with a backlog of 0 that never accepts, its queue filled: SYNs dropped.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname(), timeout=5)
    ports = {key: free_port(LISTEN_ADDR) for key in "ABCD"}
    run = Run(row, work, ports, {"A": upstream_port, "B": redis_port, "C": free_port(),
                                 "D": int(blackhole.getsockname()[1])})
    args, env = command(run)
    run.log_path = work / "stderr"
    with open(run.log_path, "wb") as log, open(work / "stdout", "wb") as out:
        run.proc = subprocess.Popen(args, env=env, stdout=out, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while not Path(run.sock_path).exists():
            if run.proc.poll() is not None or time.monotonic() > deadline:
                run.fail(f"start: exit {run.proc.poll()}: {run.log_path.read_text()[-400:]}")
                return run
            time.sleep(0.05)
        time.sleep(0.3)
        for scenario in (scenario_bulk, scenario_late_reply, scenario_reset,
                         scenario_reset_upload, scenario_stalled_reader, scenario_idle,
                         scenario_burst, scenario_redis, scenario_denied, scenario_dead,
                         scenario_blackhole, scenario_gives_up,
                         scenario_reload):
            try:
                scenario(run)
            except Exception as error:  # one scenario's failure is a finding: go on
                run.fail(f"{scenario.__name__}: {error!r}")
        _, pids = scenario_control(run)
        scenario_stop(run, pids)
        check_log(run)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        upstream.close()
        filler.close()
        blackhole.close()
        if not keep and not run.problems:
            shutil.rmtree(work, ignore_errors=True)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=0, help="run only the first N rows")
    parser.add_argument("--only", default="", help="run only these rows (1-based, commas)")
    parser.add_argument("--triples", action="store_true", help="triples of the timer options")
    parser.add_argument("--print", action="store_true", help="print the rows and stop")
    parser.add_argument("--keep", action="store_true", help="keep every row's directory")
    parser.add_argument("--set", action="append", default=[], metavar="FACTOR=VALUE",
                        help="run one row: these values, the others at their first")
    opts = parser.parse_args(argv)
    if opts.set:
        rows = [{name: values[0] for name, values in FACTORS.items()}]
        for item in opts.set:
            name, value = item.split("=", 1)
            rows[0][name] = value
    elif opts.triples:
        rows = [{name: values[0] for name, values in FACTORS.items()} | row
                for row in covering_array({name: FACTORS[name] for name in TIMERS}, 3)]
    else:
        rows = covering_array(FACTORS, 2)
    print(f"{len(rows)} rows", flush=True)
    if opts.print:
        for index, row in enumerate(rows, 1):
            print(index, " ".join(f"{k}={v}" for k, v in row.items()))
        return 0
    only = {int(part) for part in opts.only.split(",") if part}
    redis_port = free_port()
    redis_dir = tempfile.mkdtemp(prefix="pairwise38-redis-")
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", redis_dir],
                             stdout=subprocess.DEVNULL)
    failed = 0
    try:
        time.sleep(0.5)
        for index, row in enumerate(rows, 1):
            if (opts.rows and index > opts.rows) or (only and index not in only):
                continue
            run = run_row(row, redis_port, opts.keep)
            failed += bool(run.problems)
            print(f"row {index}: {'FAIL' if run.problems else 'ok'} "
                  + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            for problem in run.problems:
                print(f"    ! {problem}", flush=True)
            for note in run.notes:
                print(f"    . {note}", flush=True)
            if run.problems or opts.keep:
                print(f"    dir {run.work}", flush=True)
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(redis_dir, ignore_errors=True)
    print(f"{failed} rows failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
