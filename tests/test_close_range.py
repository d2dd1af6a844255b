"""Where close_range(2) is missing (Linux before 5.9, a seccomp profile that refuses it, a
Python built on glibc before 2.34), os.closerange() calls close() on every number of its
range. tests/no_close_range.py runs forkproxy so, and kills it at a close() of a number
no descriptor has: where a child's or a helper's descriptor cleanup went.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import no_close_range
import psutil
import pytest

from conftest import Proxy, ServerFactory, control, echo

NO_CLOSE_RANGE = str(Path(__file__).with_name("no_close_range.py"))


def _targets(pid: int) -> dict[int, str]:
    """What each descriptor of `pid` above stdio is (a socket's, a pipe's inode)."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        if int(name) > 2:
            try:
                found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
            except FileNotFoundError:
                pass  # the listing's own
    return found


def test_children_close_what_they_inherit_without_close_range(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory, short_dir: Path,
) -> None:
    """A connection's child closed the numbers from its highest kept descriptor up to
    2**20 one at a time there: ~1M system calls, ~0.3 s of CPU per connection before it
    connected upstream (2 connections/s where ~1,000 were served), and as much for each
    status read's reporter. The supervisor now tells at start whether os.closerange()
    is close_range(2); where not, children close the descriptors /proc/self/fd lists.
    Under the filter the loop is a kill (SIGSYS): no answer. And what they close is the
    same: a child shares no descriptor with the supervisor but the ended pipe."""
    if not no_close_range.supported():
        pytest.fail("tests/no_close_range.py knows the seccomp ABI of x86_64 and aarch64 only")
    server = tcp_server(echo)
    sock_path = short_dir / "s.sock"
    proxy = start_proxy("--status-socket", str(sock_path),
                        f"127.0.0.1:0=127.0.0.1:{server.port}",
                        prefix=(sys.executable, NO_CLOSE_RANGE))
    for byte in (b"a", b"b"):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
            client.sendall(byte)
            assert client.recv(1) == byte, proxy.log()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        client.sendall(b"c")
        assert client.recv(1) == b"c", proxy.log()
        [child] = psutil.Process(proxy.pid).children()
        theirs, ours = _targets(child.pid), set(_targets(proxy.pid).values())
        shared = sorted(target for target in theirs.values() if target in ours)
        assert len(theirs) == 3 and [t[:5] for t in shared] == ["pipe:"], (theirs, shared)
        # A reporter answers status: it closes what it inherits as well.
        [link] = control(sock_path, "status")["links"].values()
        assert link["active"] == 1, link
    assert proxy.stop() == 0
    assert "killed" not in proxy.log() and "crashed" not in proxy.log(), proxy.log()
