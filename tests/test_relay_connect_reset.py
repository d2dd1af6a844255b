"""An upstream that takes a connection and resets it at once, through the real `forkproxy serve`.

A server at its connection limit does this (accept, then close with SO_LINGER 0), and so does
a listener closed with connections in its queue. The child's connect() reads SO_ERROR after
its poll, so an RST that lands in between fails connect() (ECONNRESET, or EPIPE when a FIN
came first) although the upstream took the connection. That must end as a reset right after
the connect does: the client reset, `upstream-reset`, no retry, no connect failure.

The race is made near certain rather than left to luck: the upstream and the proxy share one
CPU, so the upstream, woken by the handshake's last ACK, runs (and resets) before the child
gets back from connect() to read SO_ERROR. Without the fix, 240-255 of 300 connections failed
this way (19 of 300 with nothing pinned).
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from forkproxy import relay
from forkproxy.config import Endpoint

from conftest import FORKPROXY, Proxy, need, read_lines, wait_for

CONNECTIONS = 300
DIRECT = 20  # connections straight to the upstream, for what a client should see

# Accept, print one line, send argv[2] (if not empty: a server at its connection limit
# says so first), reset (SO_LINGER 0, inherited by accepted sockets); with "fin", the
# upstream's FIN goes out before its RST. One line per accept: the test counts them.
RESETTER = """
import os, socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\x01\\0\\0\\0\\0\\0\\0\\0")
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    print("accepted", flush=True)
    conn.sendall(sys.argv[2].encode())
    if sys.argv[1] == "fin":
        conn.shutdown(socket.SHUT_WR)
    conn.close()
"""


def start_resetter(mode: str, first: str,
                   pin: tuple[str, ...]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([*pin, sys.executable, "-c", RESETTER, mode, first],
                            stdout=subprocess.PIPE, text=True)
    [port] = read_lines(proc, 1, 15)
    return proc, int(port)


def what_a_client_sees(port: int) -> str:
    """"ECONNRESET" (a reset), "EOF, EPIPE" (an EOF, then a reset), or "EOF" (no reset within
    5 s), after "data b'...', " when bytes came first: what a direct client of the
    resetting upstream sees, in the same words."""
    with socket.socket() as client:
        client.settimeout(15)
        try:
            # The reset can beat this connect() too, as it beats the child's: the kernel
            # then reports it here, as it would to the child, and still holds what the
            # upstream sent before it.
            client.connect(("127.0.0.1", port))
            ended = ""
        except ConnectionResetError:
            ended = "ECONNRESET"
        except BrokenPipeError:
            ended = "EOF, EPIPE"  # to connect(): the RST came after a FIN
        data = b""
        try:
            while chunk := client.recv(4096):
                data += chunk
        except ConnectionResetError:
            ended = "ECONNRESET"
        seen = f"data {data!r}, " if data else ""
        if ended:
            return seen + ended
        poller = select.poll()
        poller.register(client, 0)  # POLLERR and POLLHUP only: the RST, not the EOF
        if not poller.poll(5000):
            return seen + "EOF"
        error = client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return f"{seen}EOF, {errno.errorcode[error]}"


def status(sock_path: Path) -> dict[str, object]:
    """`forkproxy status --json`, the real CLI: the one link's totals."""
    result = subprocess.run([FORKPROXY, "status", "--json", "--status-socket", str(sock_path)],
                            capture_output=True, text=True, timeout=60, check=True)
    [link] = json.loads(result.stdout)["links"].values()
    assert isinstance(link, dict)
    return link


@pytest.mark.parametrize(("mode", "first"), [("rst", ""), ("fin", ""),
                                             ("rst", "-ERR busy\r\n"), ("fin", "-ERR busy\r\n")])
def test_upstream_that_resets_at_once_resets_every_client(
    start_proxy: Callable[..., Proxy], short_dir: Path, mode: str, first: str
) -> None:
    """Every client sees what a direct client of the upstream sees: what the upstream sent
    first, then the reset (with "fin", its EOF, then the reset). Each connection reaches
    the upstream once, although --connect-retries allows two tries, and each ends as an
    `upstream-reset` close: no connect-failed line, no upstream failure. The bytes sent
    first were lost when the reset beat connect(): the client saw only the reset."""
    pin = (need("taskset"), "-c", str(min(os.sched_getaffinity(0))))
    upstream, port = start_resetter(mode, first, pin)
    try:
        sock_path = short_dir / "status.sock"
        proxy = start_proxy("--status-socket", str(sock_path), "--connect-retries", "1",
                            f"127.0.0.1:0=127.0.0.1:{port}", prefix=pin)
        expected = (f"data {first.encode()!r}, " if first else "") + (
            "ECONNRESET" if mode == "rst" else "EOF, EPIPE")
        for _ in range(DIRECT):
            assert what_a_client_sees(port) == expected  # what the proxy must pass on
        for i in range(CONNECTIONS):
            assert what_a_client_sees(proxy.port) == expected, f"connection {i}"

        def settled() -> bool:
            link = status(sock_path)
            return link["connections"] == CONNECTIONS and link["active"] == 0

        assert wait_for(settled)
        link = status(sock_path)
        assert link["outcomes"] == {"upstream-reset": CONNECTIONS}, link
        assert link["upstream_failures"] == 0, link
        assert link["bytes_down"] == CONNECTIONS * len(first), link
    finally:
        upstream.kill()
        accepted, _ = upstream.communicate(timeout=15)
    assert accepted.splitlines().count("accepted") == DIRECT + CONNECTIONS  # no retries

    error = "Connection reset by peer" if mode == "rst" else "Broken pipe"
    log = proxy.log().splitlines()
    assert not [line for line in log if "connect-failed" in line]
    assert sum(" open " in line for line in log) == CONNECTIONS
    closes = [line for line in log if " close " in line]
    assert len(closes) == CONNECTIONS
    assert all(f'outcome=upstream-reset error="{error}"' in line for line in closes), closes[:3]
    assert all(f"bytes_down={len(first)} " in line for line in closes), closes[:3]


@pytest.mark.parametrize("code", [errno.ECONNRESET, errno.EPIPE])
def test_a_connect_that_fails_with_a_reset_is_reached_then_reset(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The errno itself, for when no kernel can be made to race (the test above could then
    pass without the path ever running): connect() failing with ECONNRESET or EPIPE ends
    connect_upstream with ResetAtConnect at once, its socket open: no other address, no retry."""
    attempts: list[object] = []  # a mock: this errno cannot be had on demand

    class ResetOnConnect(relay.RawSocket):
        def connect(self, address: object) -> None:
            attempts.append(address)
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(relay, "RawSocket", ResetOnConnect)
    addresses: list[relay.Address] = [(int(socket.AF_INET), ("127.0.0.1", 9)),
                                      (int(socket.AF_INET), ("127.0.0.2", 9))]
    with pytest.raises(relay.ResetAtConnect) as ended:
        relay.connect_upstream(addresses, Endpoint("127.0.0.1", 9), 5.0, retries=2)
    assert ended.value.args[0] == relay.UPSTREAM_RESET
    assert ended.value.args[1].errno == code
    # The socket comes along, open: its receive queue may hold what the upstream sent.
    sock = ended.value.args[2]
    assert sock.fileno() >= 0
    sock.close()
    assert attempts == [("127.0.0.1", 9)]  # the first address only, tried once
