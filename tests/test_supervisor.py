"""The supervisor's own properties: a lean, single-threaded forking process that reaps."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

import forkproxy
from forkproxy.config import Options, Sources
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
