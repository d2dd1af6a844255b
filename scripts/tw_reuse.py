#!/usr/bin/env python3
"""TIME_WAIT and net.ipv4.tcp_tw_reuse: the proxy's local ports toward a remote upstream.

Run by hand, as root (network namespaces), never in CI:

    sudo .venv/bin/python scripts/tw_reuse.py [--cycles 300] [--rate 50] [--ports 100]

For each setting (tcp_tw_reuse 0, 1, 2 with TCP timestamps on; 1 with them off) it makes
two network namespaces joined by a veth (198.18.36.1 here, 198.18.36.2 there, where
redis-server listens), sets the near one's `ip_local_port_range` to `--ports` ports and
the setting (the machine's own sysctls stay as they are), runs `forkproxy serve
127.0.0.1:6379=198.18.36.2:6380` there, and makes `--cycles` connect, `PING`, close cycles
through it at `--rate` per second, each from a port of the client's own outside that
range. The client closes first, so each cycle leaves the proxy a TIME_WAIT on one of
those ports. Prints per setting how many were answered, how many failed, the errors of
forkproxy's `connect-failed` lines, and the TIME_WAITs toward the upstream at the end.
docs/wire.md ("TIME_WAIT") holds the results. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORKPROXY = str(ROOT / ".venv" / "bin" / "forkproxy")
NEAR, FAR = "198.18.36.1", "198.18.36.2"
UPSTREAM_PORT, LISTEN_PORT = 6380, 6379
FIRST_PORT = 40000  # the proxy's ports: FIRST_PORT .. FIRST_PORT + --ports - 1
CLIENT_PORT = 50000  # the client's own, one per cycle, outside the proxy's range
# (tcp_tw_reuse, tcp_timestamps) in the near namespace
SETTINGS = ((0, 1), (1, 1), (2, 1), (1, 0))


def ip(*args: str) -> None:
    """`ip ARGS`, failing loudly."""
    subprocess.run(["ip", *args], check=True)


@contextlib.contextmanager
def lab(tag: str) -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth, lo up in each; yields (near, far) names."""
    near, far = (f"tw-reuse-{os.getpid()}-{tag}-{side}" for side in ("near", "far"))
    veth = f"tw{os.getpid() % 100000}"
    try:
        ip("netns", "add", near)
        ip("netns", "add", far)
        ip("link", "add", f"{veth}a", "netns", near, "type", "veth", "peer", "name",
           f"{veth}b", "netns", far)
        for ns, dev, addr in ((near, f"{veth}a", NEAR), (far, f"{veth}b", FAR)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield near, far
    finally:
        for ns in (near, far):
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)


def wait_until(check: list[str], what: str) -> None:
    """Until the command `check` succeeds with output, for up to 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(check, capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} never came up")


def setting(reuse: int, timestamps: int, args: argparse.Namespace, work: Path) -> dict[str, object]:
    """One setting, in namespaces of its own (no TIME_WAIT left from another)."""
    with lab(f"{reuse}{timestamps}") as (near, far):
        for name, value in (("net.ipv4.ip_local_port_range",
                             f"{FIRST_PORT} {FIRST_PORT + args.ports - 1}"),
                            ("net.ipv4.tcp_tw_reuse", str(reuse)),
                            ("net.ipv4.tcp_timestamps", str(timestamps))):
            ip("netns", "exec", near, "sysctl", "-qw", f"{name}={value}")
        redis = subprocess.Popen(
            ["ip", "netns", "exec", far, "redis-server", "--bind", FAR, "--port",
             str(UPSTREAM_PORT), "--save", "", "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL)
        log = work / f"forkproxy-{reuse}{timestamps}.log"
        with log.open("w") as err:
            proxy = subprocess.Popen(
                ["ip", "netns", "exec", near, FORKPROXY, "serve",
                 f"127.0.0.1:{LISTEN_PORT}={FAR}:{UPSTREAM_PORT}"], stderr=err)
        try:
            wait_until(["ip", "netns", "exec", far, "redis-cli", "-h", FAR, "-p",
                        str(UPSTREAM_PORT), "ping"], "redis-server")
            wait_until(["ip", "netns", "exec", near, "ss", "-Hltn",
                        f"sport = :{LISTEN_PORT}"], "forkproxy")
            client = subprocess.run(
                ["ip", "netns", "exec", near, sys.executable, __file__, "--client",
                 "--cycles", str(args.cycles), "--rate", str(args.rate)],
                capture_output=True, text=True, check=True)
            waits = subprocess.run(
                ["ip", "netns", "exec", near, "ss", "-Htan", "state", "time-wait",
                 "dst", f"{FAR}:{UPSTREAM_PORT}"], capture_output=True, text=True, check=True)
        finally:
            for process in (proxy, redis):
                process.terminate()
                process.wait(30)
        errors: Counter[str] = Counter()
        for m in re.finditer(r' connect-failed .*?error="([^"]*)" failures=(\d+)',
                             log.read_text()):
            errors[m.group(1)] += int(m.group(2))  # folded: a line per 10 s, with its count
        return {"tcp_tw_reuse": reuse, "tcp_timestamps": timestamps,
                **json.loads(client.stdout),
                "connect-failed": dict(errors),
                "proxy TIME_WAITs": len(waits.stdout.splitlines())}


def cycles(count: int, rate: float) -> dict[str, object]:
    """`count` connect, PING, close cycles at `rate` per second (runs in the namespace)."""
    answered, failed = 0, 0
    start = time.monotonic()
    took = 0.0
    for i in range(count):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", CLIENT_PORT + i))
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", LISTEN_PORT))
                sock.sendall(b"PING\r\n")
                ok = sock.recv(64).startswith(b"+PONG")
            except OSError:
                ok = False
            answered, failed = answered + ok, failed + (not ok)
        took = time.monotonic() - start
    return {"answered": answered, "failed": failed, "seconds": round(took, 1)}


def positive(text: str) -> int:
    """An argument that must be a whole number above 0."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=positive, default=300)
    parser.add_argument("--rate", type=positive, default=50, help="cycles per second")
    parser.add_argument("--ports", type=positive, default=100,
                        help="the proxy's ip_local_port_range, in ports")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    # Bad input: one line and exit 2, not argparse's usage block.
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: {message}\n")  # type: ignore[method-assign]
    args = parser.parse_args()
    if args.client:
        print(json.dumps(cycles(args.cycles, args.rate)))
        return 0
    if args.cycles > 10000 or args.ports > 10000:
        print(f"{parser.prog}: --cycles and --ports at most 10000 (the client's ports and "
              "the proxy's must not meet)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(f"{parser.prog}: run as root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("ip", "ss", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            print(f"{parser.prog}: {tool} not found", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="tw-reuse-") as tmp:
        for reuse, timestamps in SETTINGS:
            print(json.dumps(setting(reuse, timestamps, args, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
