"""Timers measured from cause to effect, with bounds both ways.

A test that only waits for a timer's effect "eventually" passes when the timer fires
late by a factor: `--idle-timeout` cut a receiver that took nothing after twice the
timeout, and its tests passed. These measure the delay of each timer a real `serve`
runs and bound it below (never early) and above (well under twice the documented
delay, with room for a loaded 2-core machine).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import (
    Proxy,
    TcpServer,
    echo,
    frozen,
    processes_under,
    sweep_stale_cgroups,
    wait_for,
)

ServerFactory = Callable[[Callable[[socket.socket], None]], TcpServer]


@pytest.fixture
def held(tcp_server: ServerFactory) -> Iterator[threading.Event]:
    """Set once the test is over (torn down before tcp_server, which joins its handlers):
    what ends `hold`'s wait after the EOF. A fixed 3 s sleep there held each test's
    teardown 2 to 3 s after its measurement was made, for nothing."""
    over = threading.Event()
    yield over
    over.set()


def hold(over: threading.Event) -> Callable[[socket.socket], None]:
    """A handler that reads to EOF, answering nothing, and keeps the connection open
    after it until the test is `over` (at most 30 s): an upstream that says nothing and
    does not finish (the timers under test end it)."""
    def handle(conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            return
        over.wait(30)
    return handle


def seconds_to_end(sock: socket.socket, limit: float = 20.0) -> float:
    """Seconds until `sock` reads its end (a FIN or a reset)."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        pytest.fail(f"the connection did not end within {limit} s")
    except OSError:
        pass  # a reset is an end too
    return time.monotonic() - start


def close_duration(proxy: Proxy, outcome: str) -> float:
    """The `duration=` of the connection's close line with this outcome."""
    pattern = re.compile(rf" close .*duration=([0-9.]+) outcome={outcome}\b")
    assert wait_for(lambda: pattern.search(proxy.log()) is not None, timeout=20), (
        proxy.log()[-2000:])
    found = pattern.search(proxy.log())
    assert found is not None
    return float(found[1])


def test_connect_retries_back_off_as_documented(
        start_proxy: Callable[..., Proxy]) -> None:
    """--connect-retries 3 against a refusing upstream: 0.2 + 0.4 + 0.8 = 1.4 s in all."""
    refusing = socket.socket()  # bound, not listening: every connect is refused at once
    refusing.bind(("127.0.0.1", 0))
    with refusing:
        proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{refusing.getsockname()[1]}",
                            "--connect-retries", "3")
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            waited = seconds_to_end(client)
    assert 1.35 <= waited <= 2.6, waited


@pytest.mark.parametrize("relay", ["auto", "splice", "copy"])
def test_idle_timeout_cuts_when_due(start_proxy: Callable[..., Proxy],
                                    tcp_server: ServerFactory, held: threading.Event,
                                    relay: str) -> None:
    """Idle both ways, the cut comes at the timeout, at most an eighth of it later."""
    server = tcp_server(hold(held))
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}", "--idle-timeout", "1",
                        "--relay", relay)
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.sendall(b"x")  # the last byte moved: the idle count starts about here
        waited = seconds_to_end(client)
    assert 0.95 <= waited <= 1.8, waited


def test_halfclose_timeout_after_the_clients_end(start_proxy: Callable[..., Proxy],
                                                 tcp_server: ServerFactory,
                                                 held: threading.Event) -> None:
    """The client finished (FIN) and the upstream stays silent: ended at the timeout."""
    server = tcp_server(hold(held))
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}", "--halfclose-timeout", "1")
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.shutdown(socket.SHUT_WR)
        waited = seconds_to_end(client)
    assert 0.95 <= waited <= 1.8, waited


def test_halfclose_timeout_after_the_upstreams_end(start_proxy: Callable[..., Proxy],
                                                   tcp_server: ServerFactory,
                                                   held: threading.Event) -> None:
    """The upstream finished and the client stays silent. The client, which read the
    FIN already, sees nothing of the end: the close line's duration tells it."""

    def finish_then_hold(conn: socket.socket) -> None:
        conn.shutdown(socket.SHUT_WR)
        hold(held)(conn)  # the proxy's end, its reset, comes before the client's (never)

    server = tcp_server(finish_then_hold)
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}", "--halfclose-timeout", "1")
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.settimeout(10)
        assert client.recv(1) == b""
        duration = close_duration(proxy, "halfclose-timeout")
    assert 0.95 <= duration <= 1.8, duration


def test_grace_then_kill_one_second_after_term(start_proxy: Callable[..., Proxy],
                                               tcp_server: ServerFactory,
                                               held: threading.Event) -> None:
    """A stop with a child that cannot act on its TERM (stopped): --grace, then TERM,
    then KILL 1 s later: the supervisor exits after grace + 1 s, inside docker stop's
    10 s for the default 8."""
    server = tcp_server(hold(held))
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}", "--grace", "1")
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.sendall(b"x")
        assert wait_for(lambda: len(processes_under(proxy.pid)) == 1), (
            processes_under(proxy.pid))
        [(child, _)] = processes_under(proxy.pid)
        os.kill(child, signal.SIGSTOP)
        start = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.stop(timeout=15) == 0
        waited = time.monotonic() - start
    assert 1.9 <= waited <= 3.5, waited


def test_a_pause_past_the_idle_timeout_cuts_only_the_connections_idle_before_it(
        start_proxy: Callable[..., Proxy], tcp_server: ServerFactory) -> None:
    """`docker pause` (the freezer) of the whole proxy, 3 s against --idle-timeout 1: on
    the thaw the connection that was moving bytes until the pause goes on, every byte
    through in order (the kernel queued what its peers sent meanwhile, and the relay reads
    that before it looks at the clock); only the one that was idle before the pause is cut,
    as socat's -T cuts it. Timers are wall-clock, the pause counts: a relay that judged the
    time since its last byte before looking at its sockets would cut them all."""
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("a freezer cgroup of our own needs root")
    server = tcp_server(echo)
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}", "--idle-timeout", "1")
    idle = socket.create_connection(("127.0.0.1", proxy.port))
    busy = socket.create_connection(("127.0.0.1", proxy.port))
    sent, got = hashlib.sha256(), hashlib.sha256()
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            chunk = os.urandom(4096)
            busy.sendall(chunk)  # blocks once the paused proxy's buffers are full
            sent.update(chunk)
            time.sleep(0.02)
        busy.shutdown(socket.SHUT_WR)

    with idle, busy:
        idle.sendall(b"x")
        idle.settimeout(5)
        assert idle.recv(1) == b"x"
        writer = threading.Thread(target=send, daemon=True)
        writer.start()
        assert wait_for(lambda: len(processes_under(proxy.pid)) == 2), (
            processes_under(proxy.pid))
        busy.settimeout(10)
        got.update(busy.recv(65536))  # moving before the pause
        with frozen(proxy.pid, *(pid for pid, _ in processes_under(proxy.pid))):
            time.sleep(3)
        thawed = time.monotonic()
        idle.settimeout(3)
        assert idle.recv(1) == b"", "the connection idle before the pause was not cut"
        assert time.monotonic() - thawed < 1.5
        time.sleep(1.5)  # past the timeout again, the busy one moving all along
        stop.set()
        writer.join(10)
        while chunk := busy.recv(65536):
            got.update(chunk)
    assert got.hexdigest() == sent.hexdigest(), "bytes lost or changed across the pause"
    log = proxy.log()
    assert len(re.findall(r" close .*outcome=idle-timeout", log)) == 1, log
    assert wait_for(lambda: re.search(r" close .*outcome=closed", proxy.log()) is not None), (
        proxy.log())


# A run killed outright (SIGKILL: a CI job's timeout, the OOM killer) inside `frozen`: a
# process of its own frozen in a fresh cgroup; it prints that process's pid, then waits.
KILLED_WHILE_FROZEN = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
import conftest
sleeper = subprocess.Popen(["sleep", "600"])
with conftest.frozen(sleeper.pid):
    print(sleeper.pid, flush=True)
    sys.stdin.read()
"""


def test_a_killed_runs_frozen_cgroup_is_swept_and_its_processes_killed() -> None:
    """A run killed inside `frozen` (or any fresh_cgroup) never reached its `finally`: the
    cgroup stayed, frozen, its process in it for good, and the next run made one beside
    it. The next fresh_cgroup sweeps it now: thawed, its processes killed, removed."""
    if os.geteuid() != 0:
        pytest.fail("cgroups need root (run ./scripts/test as root)")
    run = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_FROZEN,
                            str(Path(__file__).parent)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert run.stdout is not None and run.stdin is not None
    sleeper = int(run.stdout.readline())
    run.kill()
    run.wait(30)
    run.stdin.close()
    run.stdout.close()
    [group] = [Path(line.split(":", 2)[2].strip()) for line in
               Path(f"/proc/{sleeper}/cgroup").read_text().splitlines()
               if "forkproxy-test-" in line]
    mount = Path("/sys/fs/cgroup") / ("freezer" if Path("/sys/fs/cgroup/freezer").is_dir()
                                      else "")
    left = mount / group.relative_to("/")
    assert left.name.startswith(f"forkproxy-test-{run.pid}-"), left
    try:
        assert left in sweep_stale_cgroups(left.parent)
        assert not left.exists()
        assert wait_for(lambda: not Path(f"/proc/{sleeper}").exists()
                        or Path(f"/proc/{sleeper}/stat").read_text().split()[2] == "Z")
    finally:  # without the sweep: nothing of this test left behind
        if left.exists():
            for state, off in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
                if (left / state).exists():
                    (left / state).write_text(off)
            os.kill(sleeper, signal.SIGKILL)
            assert wait_for(lambda: not (left / "cgroup.procs").read_text().split())
            left.rmdir()
