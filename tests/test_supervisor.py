"""The supervisor's own properties: a lean, single-threaded forking process that reaps."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import forkproxy
from forkproxy.config import Options, Sources, parse_spec
from forkproxy.listeners import Listener
from forkproxy.log import Logger
from forkproxy.supervisor import Supervisor

from conftest import Proxy, TcpServer, echo

ROOT = Path(forkproxy.__file__).resolve().parent.parent
HEAVY = ("threading", "logging", "psutil", "typer", "click", "prometheus_client", "random")


def test_the_forking_process_imports_nothing_heavy() -> None:
    """What `forkproxy serve` execs into: every module here makes each fork dearer."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import forkproxy._serve; "
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True, check=True)
    modules = set(out.stdout.split())
    assert "forkproxy.supervisor" in modules
    assert modules.isdisjoint(HEAVY), modules & set(HEAVY)


def test_serving_supervisor_is_one_thread_and_keeps_its_pid(
    start_proxy: Callable[..., Proxy],
    tcp_server: Callable[[Callable[[socket.socket], None]], TcpServer],
) -> None:
    server = tcp_server(echo)
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}")
    supervisor = psutil.Process(proxy.pid)  # the pid we started: exec kept it
    assert "_serve.py" in " ".join(supervisor.cmdline())
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        assert supervisor.num_threads() == 1
        [child] = supervisor.children()
        assert child.num_threads() == 1


def test_reaps_children_that_are_not_its_own() -> None:
    """As PID 1, orphans are re-parented to us: they must not stay zombies."""
    supervisor = Supervisor(Sources(("0=127.0.0.1:1",), options=Options()), {}, Logger())
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    psutil.Process(pid)  # exists until reaped
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped yet
    supervisor.handle_chld()
    assert supervisor.accounting.orphans_reaped == 1
    assert not psutil.pid_exists(pid)


class _CountingListenSock:
    """A real listening socket whose accept() calls are counted."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.family = real.family
        self.calls = 0

    def fileno(self) -> int:
        return self.real.fileno()

    def _accept(self) -> tuple[int, object]:
        self.calls += 1
        return self.real._accept()  # type: ignore[attr-defined, no-any-return]


def test_a_lone_client_costs_one_accept_and_a_burst_accepts_until_eagain(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """After the first client of a wakeup the loop asks the listener's own poll whether
    another is waiting, rather than calling accept() until it raises (the exception
    allocates, and between forks every page written is copied). fork is replaced
    here: the loop's logic is under test, not the children."""
    pids = iter(range(900_000, 900_100))
    monkeypatch.setattr(os, "fork", lambda: next(pids))
    link = parse_spec("127.0.0.1:0=127.0.0.1:1")
    with socket.create_server(("127.0.0.1", 0)) as real, open(tmp_path / "log", "wb") as log:
        real.setblocking(False)
        counting = _CountingListenSock(real)
        listener = Listener(link, counting, 0)  # type: ignore[arg-type]
        sup = Supervisor(Sources(link.names, options=Options()), {}, Logger(fd=log.fileno()))
        sup.listeners = [listener]
        clients = [socket.create_connection(real.getsockname())]
        sup.handle_accept(listener)
        assert len(sup.accounting.children) == 1 and counting.calls == 1
        clients += [socket.create_connection(real.getsockname()) for _ in range(3)]
        sup.handle_accept(listener)
        # three clients, then the accept() that says there are no more
        assert len(sup.accounting.children) == 4 and counting.calls == 5
        sup.handle_accept(listener)  # a wakeup with nobody there (it can happen) is harmless
        assert len(sup.accounting.children) == 4 and counting.calls == 6
        for client in clients:
            client.close()
