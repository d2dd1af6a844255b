"""Kernel network limits changed live in a network namespace of the test's own (its own
sysctls, never the host's), under a real forkproxy with real peers (sysctl38): what
forkproxy says there must fit the limits in force."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator

import pytest
from test_host_variance import connect_failed, started

from conftest import netns_lab, wait_for
from netns import Lab, Namespace

pytestmark = [pytest.mark.netns]

PORT, SERVER_PORT = 6379, 7000


@pytest.fixture
def lab() -> Iterator[Lab]:
    with netns_lab("sysctl38-") as lab:
        yield lab


# One client served, its child holding the one local port toward the upstream, then one
# whose child's connect fails: each client from a port of its own outside the range, not
# from the one the proxy needs.
HELD_THEN_REFUSED = """
import socket, sys
def client(source):
    sock = socket.socket()
    sock.bind((sys.argv[2], source))
    sock.connect((sys.argv[2], int(sys.argv[1])))
    sock.settimeout(10)
    return sock
held = client(50001)
held.sendall(b"PING\\r\\n")
assert held.recv(7) == b"+PONG\\r\\n"
try:
    assert client(50002).recv(1) == b"", "the second client was served"
except ConnectionResetError:
    pass  # its PING unread: the close resets
"""


@pytest.mark.parametrize(("reuse", "timestamps", "remote", "advice"), [
    # tcp_tw_reuse reuses TIME_WAIT ports already: only more ports help.
    (1, 1, False, "net.ipv4.tcp_tw_reuse=1 here reuses a TIME_WAIT port after 1 s "
                  "already, so live connections (or ones closed since) hold them: widen "),
    (2, 1, False, "net.ipv4.tcp_tw_reuse=2 here reuses a TIME_WAIT port after 1 s "
                  "already, so live connections (or ones closed since) hold them: widen "),
    # 2 reuses toward loopback only: 1 would help toward a remote upstream.
    (2, 1, True, "set net.ipv4.tcp_tw_reuse=1 (a TIME_WAIT port reused after 1 s) (2 here "
                 "reuses them toward loopback only), widen "),
    (0, 1, False, "set net.ipv4.tcp_tw_reuse=1 (a TIME_WAIT port reused after 1 s), widen "),
    # Without timestamps no tcp_tw_reuse reuses anything.
    (1, 0, False, "net.ipv4.tcp_timestamps=0 here, without which no tcp_tw_reuse reuses a "
                  "TIME_WAIT port: set tcp_timestamps=1 and tcp_tw_reuse=1, widen "),
])
def test_out_of_local_ports_advises_what_would_free_one_here(
    lab: Lab, reuse: int, timestamps: int, remote: bool, advice: str
) -> None:
    """A connect out of local ports (EADDRNOTAVAIL) said "set net.ipv4.tcp_tw_reuse=1"
    whatever the host: where it was 1 already, or 2 (the default) toward a loopback
    upstream, which reuses TIME_WAIT ports too (measured live: one port, clients a second
    apart, every one served at 1 and 2 toward 127.0.0.1, one at 0), and where
    tcp_timestamps=0 makes any tcp_tw_reuse reuse nothing (one served at 1). The line
    reads this namespace's sysctls now: the range in force and its size, and tcp_tw_reuse
    advised only where it would free a port."""
    box = lab.namespace("box")
    upstream = "127.0.0.1"
    if remote:
        # The upstream on another host, as a container's: reached over a veth.
        far = lab.namespace("far")
        lab.cable(box, "198.18.38.1", far, "198.18.38.2")
        upstream = "198.18.38.2"
        lab.spawn(far, ["redis-server", "--port", str(SERVER_PORT), "--bind", upstream,
                        "--save", "", "--appendonly", "no", "--protected-mode", "no",
                        "--dir", str(lab.workdir)],
                  label="redis-far")
        assert wait_for(lambda: f"{upstream}:{SERVER_PORT}" in far.tcp_listeners())
    else:
        lab.redis(box, SERVER_PORT, {})
    proc = started(lab, box, f"127.0.0.1:{PORT}={upstream}:{SERVER_PORT}")
    # Once the peers are up: redis-cli's pings would take the one port for 60 s.
    box.run(["sysctl", "-qw", f"net.ipv4.tcp_tw_reuse={reuse}",
             f"net.ipv4.tcp_timestamps={timestamps}",
             "net.ipv4.ip_local_port_range=40000 40000"])
    box.run(["python3", "-c", HELD_THEN_REFUSED, str(PORT), "127.0.0.1"])
    assert wait_for(lambda: len(connect_failed(proc)) == 1), proc.describe()
    [line] = connect_failed(proc)
    assert ' error="Cannot assign requested address" failures=1 detail="out of local ports ' \
        "toward the upstream: each connection holds one (net.ipv4.ip_local_port_range: " \
        "40000-40000 here, 1 port), live or for 60 s after a close the proxy began " \
        "(TIME_WAIT); " in line, line
    assert advice + "net.ipv4.ip_local_port_range or spread over more upstream addresses" \
        in line, line


def listen_backlog(ns: Namespace, port: int) -> int:
    """The accept queue's size of the socket listening on `port` (`ss -ltn`'s Send-Q)."""
    [line] = ns.run(["ss", "-ltnH", f"sport = :{port}"]).splitlines()
    return int(line.split()[2])


# One client served and held (--max-children 1), then clients that wait in the accept
# queue, their PINGs sent; a burst beyond the queue, whose SYNs the kernel drops. Told
# on stdin when to go on: after a reload, the held client leaves and every waiting one
# must be answered.
QUEUED_THROUGH_A_RELOAD = """
import socket, sys
port = int(sys.argv[1])
def client():
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"PING\\r\\n")
    return sock
held = client()
assert held.recv(7) == b"+PONG\\r\\n"
waiting = [client() for _ in range(3)]
burst = []
for _ in range(20):
    sock = socket.socket()
    sock.setblocking(False)
    try:
        sock.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    burst.append(sock)
print("queued", flush=True)
sys.stdin.readline()  # the reload is done
held.close()
for sock in waiting:  # in turn: each one's slot frees the next one's
    assert sock.recv(7) == b"+PONG\\r\\n"
    sock.close()
print("served", flush=True)
"""


def test_a_reload_takes_up_a_somaxconn_raised_since_the_listener_listened(lab: Lab) -> None:
    """The kernel caps a listener's backlog at net.core.somaxconn when listen() is called,
    never after: a somaxconn raised on a running container (4 -> 4096 here) left the
    kept socket's accept queue at 4 across every reload, until a restart, while the
    listen-drops line went on saying "raise that" of a somaxconn raised already. A reload
    now listens again on a kept socket whose queue is below forkproxy's 4096 and
    somaxconn's value now (a listening socket's listen() sets its size only; a somaxconn
    lowered since shrinks nothing), the clients waiting in it still served; and
    the line says somaxconn was raised since, and to reload."""
    box = lab.namespace("box")
    lab.redis(box, SERVER_PORT, {})
    box.run(["sysctl", "-qw", "net.core.somaxconn=4"])
    proc = started(lab, box, "--max-children", "1", f"127.0.0.1:{PORT}=127.0.0.1:{SERVER_PORT}")
    assert listen_backlog(box, PORT) == 4
    # A somaxconn lowered since shrinks nothing at a reload: the queue may hold clients.
    box.run(["sysctl", "-qw", "net.core.somaxconn=2"])
    proc.popen.send_signal(signal.SIGHUP)
    assert wait_for(lambda: proc.stderr().count(" reloaded ") == 1), proc.describe()
    assert listen_backlog(box, PORT) == 4
    with subprocess.Popen(box.exec_argv(["python3", "-c", QUEUED_THROUGH_A_RELOAD, str(PORT)]),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as clients:
        try:
            assert clients.stdout is not None and clients.stdin is not None
            assert clients.stdout.readline() == "queued\n"
            box.run(["sysctl", "-qw", "net.core.somaxconn=4096"])
            proc.popen.send_signal(signal.SIGALRM)  # the drops checked now
            assert wait_for(lambda: " listen-drops " in proc.stderr()), proc.describe()
            [line] = [x for x in proc.stderr().splitlines() if " listen-drops " in x]
            assert " backlog=4 " in line, line
            assert ("a backlog below 4096 is net.core.somaxconn's: net.core.somaxconn is "
                    "4096 now, raised since this listener listened: reload (SIGHUP) to take "
                    "it up" in line), line
            assert listen_backlog(box, PORT) == 4  # raised: not taken up by itself
            proc.popen.send_signal(signal.SIGHUP)
            assert wait_for(lambda: proc.stderr().count(" reloaded ") == 2), proc.describe()
            assert listen_backlog(box, PORT) == 4096
            clients.stdin.write("go\n")
            clients.stdin.flush()
            assert clients.stdout.readline() == "served\n", proc.describe()
        finally:
            clients.kill()
