"""What a forked child inherits from the supervisor, and what a fork can catch half-done:
signals sent to a child before it has set its own handlers, and the state (descriptors,
signal dispositions, mask) each kind of child starts its life with, read from /proc.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from test_metrics_process import serving_metrics_pid
from test_supervisor import injected

from conftest import Proxy, ServerFactory, echo, processes_under, wait_for

TERM_BIT = 1 << (signal.SIGTERM - 1)


def status_fields(pid: int) -> dict[str, str]:
    """/proc/PID/status as name -> value."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def stopped(pid: int) -> bool:
    """Whether `pid` is stopped (T, or t under a tracer)."""
    return status_fields(pid)["State"][0] in "Tt"


def term_pending(pid: int) -> bool:
    """Whether a SIGTERM waits for `pid` (sent to it, not delivered yet)."""
    fields = status_fields(pid)
    return bool((int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)) & TERM_BIT)


def test_a_term_sent_to_a_child_before_its_handler_is_set_resets_its_connection(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory,
) -> None:
    """The supervisor TERMs a child (a stop whose grace is over, SIGQUIT's at once) as
    soon as its fork has returned there, while the child may not have run yet. Such a
    TERM was lost: taken by the C-level handler in the child's first instants, whose flag
    CPython's after-fork code then cleared (or, a moment later, only noted by the handler
    inherited from the supervisor). The child went on relaying until the stop's SIGKILL
    1 s later, and its client got a FIN, a cut stream passed off as whole. SIGTERM is
    blocked across the fork now, and the child takes it once its own handler is set: an
    RST. The child is held in that instant for real: strace, attached to the supervisor
    and the children it forks, stops each child at its first gettid(2), in CPython's
    after-fork code, before it clears the signals' flags. The TERM is the test's own (the
    stop's would come with its SIGKILL 1 s later): the same signal in the same instant."""
    server = tcp_server(echo)
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}")
    with injected(proxy.pid, "gettid", "signal=SIGSTOP:when=1", children=True), \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as client:
        assert wait_for(lambda: any(stopped(pid) for pid, _ in processes_under(proxy.pid)))
        [(child, _)] = processes_under(proxy.pid)
        os.kill(child, signal.SIGTERM)
        assert wait_for(lambda: term_pending(child)), proxy.log()
        os.kill(child, signal.SIGCONT)
        try:
            client.sendall(b"x")
            got: bytes | None = client.recv(1)
        except ConnectionResetError:
            got = None  # the RST
        assert got is None, f"{got!r}: the TERM was lost, the child relays on\n{proxy.log()}"
        # Its death, as any TERM not the stop's is logged (the stop's: a `close` line).
        assert wait_for(lambda: 'status="killed by SIGTERM"' in proxy.log()), proxy.log()
    assert proxy.stop() == 0


def test_no_signal_stays_blocked_in_the_supervisor_or_its_children(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory,
) -> None:
    """SIGTERM is blocked across each connection's fork (above): unblocked again in the
    supervisor once fork() returns, and in the child once its handler is set. One left
    blocked would make the supervisor deaf to `docker stop`, or a child to the stop's
    TERM (killed 1 s later, its client seeing a FIN). Read from /proc, with a connection
    live and after a second one, so that the supervisor has forked since."""
    server = tcp_server(echo)
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as first, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as second:
        for client in (first, second):
            client.sendall(b"x")
            assert client.recv(1) == b"x"
        children = [pid for pid, _ in processes_under(proxy.pid)]
        assert len(children) == 2
        for pid in (proxy.pid, *children):
            assert int(status_fields(pid)["SigBlk"], 16) == 0, (pid, status_fields(pid))
    assert proxy.stop() == 0


def test_a_term_sent_to_the_metrics_process_before_its_exec_ends_it(
    start_proxy: Callable[..., Proxy],
) -> None:
    """The same instant in the metrics process, forked then exec'd: a TERM (a stop's,
    which waits METRICS_EXIT_WAIT for it, then kills it) that came before the child set
    SIGTERM back to its default action was lost, and the metrics process it then exec'd
    served on. SIGTERM is blocked across that fork too now, and taken once the default
    action is back: it dies of it. Held there as above; the fork is a restart (the first
    one is killed), as the tracer is attached only once the supervisor is running."""
    proxy = start_proxy("--metrics", "127.0.0.1:0", "127.0.0.1:0=127.0.0.1:1", expect=2)
    first = serving_metrics_pid(proxy)
    with injected(proxy.pid, "gettid", "signal=SIGSTOP:when=1", children=True):
        os.kill(first, signal.SIGKILL)  # started again METRICS_RESTART s later

        def restarted() -> list[int]:
            return [pid for pid, _ in processes_under(proxy.pid) if pid != first and stopped(pid)]

        assert wait_for(lambda: bool(restarted()), timeout=60), proxy.log()
        [second] = restarted()
        os.kill(second, signal.SIGTERM)
        assert wait_for(lambda: term_pending(second)), proxy.log()
        os.kill(second, signal.SIGCONT)
        assert wait_for(lambda: proxy.log().count("metrics-died") == 2), proxy.log()
    [_, died] = [line for line in proxy.log().splitlines() if " metrics-died " in line]
    assert 'status="killed by SIGTERM"' in died, proxy.log()
    assert proxy.stop() == 0
