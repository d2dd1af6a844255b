"""--keepalive and --user-timeout for real: peers that vanish without a FIN or an RST,
across veth cables.

    client (ka-client) ---198.18.20.0/24--- proxy (ka-proxy) ---198.18.21.0/24--- upstream (ka-up)

The proxy runs in its namespace; the client and the upstream are sockets of this test
process made inside theirs (setns on this thread, as in test_chain_faults.py), so the test
sees what each end sees. A peer "vanishes" as a powered-off host or a partition does:
iptables in its namespace drops every packet, so nothing ever answers and nothing is sent.

Needs root, `ip` and iptables: fails without them (never a skip).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_chain_faults import pattern, port_of, read_to_end
from test_limits import copy_fd, distinct_free_ports, hold_the_listener, write_env_file
from test_two_hosts import _unavailable, forkproxy_command

import netns
from conftest import (
    LOOPBACK,
    Proxy,
    ServerFactory,
    control,
    echo,
    in_network,
    need,
    processes_under,
    wait_for,
)
from netns import Lab, Namespace, Process

pytestmark = [pytest.mark.netns]
StartProxy = Callable[..., Proxy]

CLIENT_ADDR, PROXY_CLIENT_SIDE = "198.18.20.1", "198.18.20.2"
PROXY_UPSTREAM_SIDE, UPSTREAM_ADDR = "198.18.21.1", "198.18.21.2"
SIZE = 256 * 1024  # each way, before the peer vanishes
# --keepalive 1 gives a silent peer up after 1 + 3 x 1 s; a bound against hangs on a
# loaded machine, not a speed assertion.
DETECTED_WITHIN = 60.0
# Longer than --keepalive 1 needs (about 4 s): what a connection must outlive to show
# that nothing cut it.
OUTLIVE = 8.0


@dataclass
class KeepaliveLab:
    lab: Lab
    client: Namespace
    proxy: Namespace
    upstream: Namespace
    listener: socket.socket  # the upstream server, in ka-up

    def start_proxy(self, *options: str) -> Process:
        sock = self.lab.workdir / f"proxy-{self.lab.started + 1}.sock"
        port = self.listener.getsockname()[1]
        argv = [*forkproxy_command(), "serve", f"0.0.0.0:0={UPSTREAM_ADDR}:{port}",
                "--status-socket", str(sock), *options]
        proc = self.lab.spawn(self.proxy, argv, label="proxy")
        proc.status_socket = sock
        proc.wait_stdout(lambda lines: any(ln.startswith("listening ") for ln in lines), 20.0)
        return proc

    def connect(
        self, proxy: Process, *, from_client_host: bool = False, rcvbuf: int = 0
    ) -> tuple[socket.socket, socket.socket]:
        """A relayed connection: (the client's socket, the upstream's accepted one).
        The client is on the proxy's own host unless `from_client_host`."""
        with in_network((self.client if from_client_host else self.proxy).path):
            client = socket.socket()
        if rcvbuf:  # before connect(): the window scale is agreed on in the handshake
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.settimeout(30)
        address = PROXY_CLIENT_SIDE if from_client_host else "127.0.0.1"
        client.connect((address, port_of(proxy)))
        self.listener.settimeout(30)
        upstream, _ = self.listener.accept()
        upstream.settimeout(30)
        return client, upstream

    def vanish(self, ns: Namespace) -> None:
        """The host goes silent: every packet in or out dropped, nothing answered."""
        for chain in ("INPUT", "OUTPUT"):
            ns.run(["iptables", "-A", chain, "-j", "DROP"])

    def heal(self) -> None:
        for ns in (self.client, self.proxy, self.upstream):
            ns.run(["iptables", "-F"], check=False)


@pytest.fixture(scope="module")
def keepalive_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeepaliveLab]:
    if os.geteuid() != 0:
        _unavailable("network namespaces need root")
    missing = netns.missing_tools(("ip", "iptables"))
    if missing:
        _unavailable(f"missing tools: {', '.join(missing)}")
    with Lab(tmp_path_factory.mktemp("keepalive")) as lab:
        client = lab.namespace("ka-client")
        proxy = lab.namespace("ka-proxy")
        upstream = lab.namespace("ka-up")
        lab.cable(client, CLIENT_ADDR, proxy, PROXY_CLIENT_SIDE)
        lab.cable(proxy, PROXY_UPSTREAM_SIDE, upstream, UPSTREAM_ADDR)
        with in_network(upstream.path):
            listener = socket.create_server((UPSTREAM_ADDR, 0), backlog=16)
        try:
            yield KeepaliveLab(lab, client, proxy, upstream, listener)
        finally:
            listener.close()


@pytest.fixture
def ka(keepalive_lab: KeepaliveLab) -> Iterator[KeepaliveLab]:
    """The module's lab; the proxies a test starts are stopped, and iptables flushed, after."""
    started = len(keepalive_lab.lab.processes)
    try:
        yield keepalive_lab
    finally:
        for proc in reversed(keepalive_lab.lab.processes[started:]):
            keepalive_lab.lab.stop(proc, timeout=5.0)
        keepalive_lab.heal()


def recv_exactly(sock: socket.socket, size: int) -> str:
    """Read `size` bytes; their sha256."""
    digest, left = hashlib.sha256(), size
    while left:
        data = sock.recv(min(left, 1 << 20))
        assert data, f"EOF with {left} of {size} bytes still to come"
        digest.update(data)
        left -= len(data)
    return digest.hexdigest()


def exchange(client: socket.socket, upstream: socket.socket, size: int, seed: int) -> None:
    """`size` bytes each way at once, each end's hash checked: the relay so far is intact."""
    up_data, down_data = pattern(size, seed), pattern(size, seed + 1)
    sender = threading.Thread(target=client.sendall, args=(up_data,), daemon=True)
    sender.start()
    upstream_sender = threading.Thread(target=upstream.sendall, args=(down_data,), daemon=True)
    upstream_sender.start()
    assert recv_exactly(upstream, size) == hashlib.sha256(up_data).hexdigest()
    assert recv_exactly(client, size) == hashlib.sha256(down_data).hexdigest()
    sender.join(30)
    upstream_sender.join(30)


def close_lines(proc: Process) -> list[str]:
    return [line for line in proc.stderr().splitlines() if " close " in line]


def unacknowledged(sock: socket.socket) -> int:
    """Bytes `sock` sent that its peer has not acknowledged yet (SIOCOUTQ, TIOCOUTQ's number)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0])


def wait_close_line(proc: Process, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not close_lines(proc):
        assert time.monotonic() < deadline, f"no close line within {timeout} s:\n{proc.describe()}"
        time.sleep(0.05)
    [line] = close_lines(proc)
    return line


def field(line: str, name: str) -> str:
    match = re.search(rf" {name}=(\"[^\"]*\"|\S+)", line)
    assert match, (name, line)
    return match.group(1).strip('"')


@pytest.mark.parametrize(
    ("reject", "error"),
    [
        # Powered off, or a partition: every probe unanswered.
        ((), "Connection timed out"),
        # A router answering for the vanished host changes nothing: the kernel ignores
        # ICMP errors about keepalive probes (their sequence number is out of the window).
        (("-p", "tcp", "-j", "REJECT", "--reject-with", "icmp-host-unreachable"),
         "Connection timed out"),
    ],
    ids=["silent", "host-unreachable"],
)
def test_keepalive_ends_a_connection_whose_upstream_vanished(
    ka: KeepaliveLab, reject: tuple[str, ...], error: str
) -> None:
    """Without a FIN or an RST and with nothing queued, only probes can tell that the
    upstream is gone: the child ends the connection (client reset, as for an upstream
    reset), logs upstream-timeout, and every byte relayed before arrived intact."""
    proxy = ka.start_proxy("--keepalive", "1")
    client, upstream = ka.connect(proxy)
    with client, upstream:
        exchange(client, upstream, SIZE, seed=1)
        # The proxy's ACK of the upstream's last bytes may still be delayed (pingpong mode:
        # 40 to 200 ms) when the rule goes in. Rejected, that ACK's ICMP is in the window (a
        # pure ACK carries snd_nxt), and the kernel keeps it as the soft error the keepalive
        # timeout reports: "No route to host" (2 of 6 in a probe whose upstream sent one
        # more byte just before the rule). The rule waits until that ACK has arrived.
        assert wait_for(lambda: unacknowledged(upstream) == 0), unacknowledged(upstream)
        if reject:
            ka.upstream.run(["iptables", "-A", "INPUT", *reject])
        else:
            ka.vanish(ka.upstream)
        line = wait_close_line(proxy, DETECTED_WITHIN)
        assert field(line, "outcome") == "upstream-timeout", line
        assert field(line, "error") == error, line
        assert (field(line, "bytes_up"), field(line, "bytes_down")) == (str(SIZE), str(SIZE))
        # The client is told the stream was cut, not that it ended: an RST, never a FIN.
        assert read_to_end(client)[:2] == ("reset", 0)


@pytest.mark.parametrize(
    ("reject_with", "error"),
    [("icmp-port-unreachable", "Connection refused"),
     ("icmp-proto-unreachable", "Protocol not available")],
    ids=["port-unreachable", "proto-unreachable"],
)
def test_keepalive_ends_a_connection_behind_a_firewall_that_started_rejecting_as_a_timeout(
    ka: KeepaliveLab, reject_with: str, error: str
) -> None:
    """A stateful firewall in front of the upstream forgets the connection (a reboot, a
    flush) and its default REJECT answers what the proxy sends next: the proxy's ACK of
    the upstream's last bytes draws an ICMP port (or protocol) unreachable, which the
    kernel keeps as the socket's soft error, and --keepalive's unanswered probes end it
    with that error, ECONNREFUSED (ENOPROTOOPT), in place of ETIMEDOUT. Nothing reset:
    upstream-timeout with the ICMP error, not the upstream-reset it was counted as."""
    proxy = ka.start_proxy("--keepalive", "1")
    client, upstream = ka.connect(proxy)
    with client, upstream:
        exchange(client, upstream, SIZE, seed=21)
        assert wait_for(lambda: unacknowledged(upstream) == 0), unacknowledged(upstream)
        ka.upstream.run(["iptables", "-A", "INPUT", "-p", "tcp", "-j", "REJECT",
                         "--reject-with", reject_with])
        upstream.sendall(b"z")  # out before the upstream goes mute; its ACK is rejected
        assert client.recv(1) == b"z"
        # Mute as well: a retransmission of that byte reaching the proxy is answered
        # with another rejected ACK (the error stays), and the probes' answers never come.
        ka.upstream.run(["iptables", "-A", "OUTPUT", "-p", "tcp", "-j", "DROP"])
        line = wait_close_line(proxy, DETECTED_WITHIN)
        assert field(line, "outcome") == "upstream-timeout", line
        assert field(line, "error") == error, line
        assert read_to_end(client)[:2] == ("reset", 0)


def test_without_keepalive_a_vanished_upstream_leaves_the_connection_open(
    ka: KeepaliveLab,
) -> None:
    """The control for the test above (passes with or without --keepalive in the product):
    the same silence, no option, and the connection outlives what --keepalive 1 needs to
    end it; once the path is back it relays again, as TCP promises."""
    proxy = ka.start_proxy()
    client, upstream = ka.connect(proxy)
    with client, upstream:
        exchange(client, upstream, SIZE, seed=3)
        ka.vanish(ka.upstream)
        client.settimeout(OUTLIVE)
        with pytest.raises(TimeoutError):
            client.recv(1)  # neither EOF nor a reset: still open
        assert close_lines(proxy) == []
        ka.heal()
        client.settimeout(30)
        exchange(client, upstream, SIZE, seed=5)
        assert close_lines(proxy) == []


def test_keepalive_leaves_a_healthy_idle_connection_alone(ka: KeepaliveLab) -> None:
    """Idle for several keepalive periods, a healthy connection is probed, answers, and
    stays: it relays intact afterwards and no close line appears."""
    proxy = ka.start_proxy("--keepalive", "1")
    client, upstream = ka.connect(proxy, from_client_host=True)
    with client, upstream:
        exchange(client, upstream, SIZE, seed=7)
        client.settimeout(OUTLIVE)
        with pytest.raises(TimeoutError):
            client.recv(1)
        assert close_lines(proxy) == []
        client.settimeout(30)
        exchange(client, upstream, SIZE, seed=9)
        client.shutdown(socket.SHUT_WR)
        assert upstream.recv(1) == b""
        upstream.close()
        assert read_to_end(client)[:2] == ("eof", 0)
    line = wait_close_line(proxy, 30)
    assert field(line, "outcome") == "closed", line
    assert (field(line, "bytes_up"), field(line, "bytes_down")) == (str(2 * SIZE), str(2 * SIZE))


def test_keepalive_leaves_a_client_that_reads_nothing_for_a_while_alone(
    ka: KeepaliveLab,
) -> None:
    """A live client that stops reading (its window shut, the proxy's data waiting) is
    not a dead one. TCP_USER_TIMEOUT would cut it after its timeout; keepalive must not:
    after a pause longer than --keepalive 1 needs, every byte arrives, in order."""
    proxy = ka.start_proxy("--keepalive", "1")
    # A small receive buffer: the data shuts the client's window at once.
    client, upstream = ka.connect(proxy, from_client_host=True, rcvbuf=4096)
    size = 2 * 1024 * 1024
    data = pattern(size, seed=11)
    with client, upstream:
        sender = threading.Thread(target=upstream.sendall, args=(data,), daemon=True)
        sender.start()
        # The pause under test: the client reads nothing, and the connection must stay.
        deadline = time.monotonic() + OUTLIVE
        while time.monotonic() < deadline:
            assert close_lines(proxy) == [], proxy.stderr()
            time.sleep(0.1)
        assert recv_exactly(client, size) == hashlib.sha256(data).hexdigest()
        sender.join(30)
        # The client ends first, and its FIN is through before the upstream closes: the
        # outcome says whose came first (`closed`: the client's), never a race.
        client.shutdown(socket.SHUT_WR)
        assert upstream.recv(1) == b""
    line = wait_close_line(proxy, 30)
    assert field(line, "outcome") == "closed", line


def test_keepalive_ends_a_connection_whose_client_vanished(ka: KeepaliveLab) -> None:
    """The client side is probed too: a client host that goes silent ends its connection
    (client-timeout), and the upstream is reset rather than shown a clean end."""
    proxy = ka.start_proxy("--keepalive", "1")
    client, upstream = ka.connect(proxy, from_client_host=True)
    with client, upstream:
        exchange(client, upstream, SIZE, seed=13)
        ka.vanish(ka.client)
        line = wait_close_line(proxy, DETECTED_WITHIN)
        assert field(line, "outcome") == "client-timeout", line
        assert field(line, "error") == "Connection timed out", line
        assert (field(line, "bytes_up"), field(line, "bytes_down")) == (str(SIZE), str(SIZE))
        assert read_to_end(upstream)[:2] == ("reset", 0)


def test_a_client_that_vanishes_while_its_child_connects_is_a_client_timeout(
    ka: KeepaliveLab,
) -> None:
    """A client host that goes silent while its child still waits on an upstream that
    does not answer: the child ends when the client's keepalive probes go unanswered,
    counted `client-timeout` as for a client that vanishes mid-relay (it was counted
    `client-reset`: nothing reset). No attempt had failed yet: no connect-failed."""
    ka.vanish(ka.upstream)  # the SYNs go unanswered: the first connect is still running
    proxy = ka.start_proxy("--keepalive", "1", "--connect-timeout", "120",
                           "--connect-retries", "100")
    assert proxy.status_socket is not None
    sock = proxy.status_socket
    with in_network(ka.client.path):
        client = socket.socket()
    with client:
        client.settimeout(30)
        client.connect((PROXY_CLIENT_SIDE, port_of(proxy)))
        assert wait_for(lambda: len(control(sock, "status")["children"]) == 1)
        ka.vanish(ka.client)
        assert wait_for(lambda: not control(sock, "status")["children"], DETECTED_WITHIN), (
            proxy.describe())
    [stats] = control(sock, "status")["links"].values()
    assert stats["outcomes"] == {"client-timeout": 1}, stats
    assert stats["upstream_failures"] == 0, stats
    assert "connect-failed" not in proxy.stderr(), proxy.stderr()


@pytest.mark.parametrize(
    ("reject", "error"),
    [
        ((), "Connection timed out"),
        # With data in flight, ICMP errors do count: the kernel reports the last one.
        (("-p", "tcp", "-j", "REJECT", "--reject-with", "icmp-host-unreachable"),
         "No route to host"),
        # A firewall's default REJECT: ECONNREFUSED and ENOPROTOOPT here are that ICMP's
        # soft error at the timeout, not a reset (they were counted upstream-reset).
        (("-p", "tcp", "-j", "REJECT", "--reject-with", "icmp-port-unreachable"),
         "Connection refused"),
        (("-p", "tcp", "-j", "REJECT", "--reject-with", "icmp-proto-unreachable"),
         "Protocol not available"),
    ],
    ids=["silent", "host-unreachable", "port-unreachable", "proto-unreachable"],
)
def test_an_upstream_that_vanished_with_data_in_flight_is_a_timeout_not_a_reset(
    ka: KeepaliveLab, reject: tuple[str, ...], error: str
) -> None:
    """With bytes unacknowledged, keepalive never probes: the kernel's retransmissions
    find the dead peer, after tcp_retries2 (about 15 minutes by default; 3 here, a few
    seconds, in the proxy's namespace only). With or without --keepalive, that end is
    upstream-timeout, not the upstream-reset it used to be logged as: nothing reset."""
    proxy = ka.start_proxy()
    client, upstream = ka.connect(proxy)
    retries = ka.proxy.run(["sysctl", "-n", "net.ipv4.tcp_retries2"]).strip()
    ka.proxy.run(["sysctl", "-qw", "net.ipv4.tcp_retries2=3"])
    try:
        with client, upstream:
            exchange(client, upstream, SIZE, seed=15)
            if reject:
                ka.upstream.run(["iptables", "-A", "INPUT", *reject])
                # Gone means mute too: any segment from the upstream that still reached
                # the proxy (a retransmission whose ACK the rule rejected, a window
                # update) would clear the ICMP error the kernel keeps, and the end would
                # read "Connection timed out" (it did, once in CI). Its ICMP still goes.
                ka.upstream.run(["iptables", "-A", "OUTPUT", "-p", "tcp", "-j", "DROP"])
            else:
                ka.vanish(ka.upstream)
            client.sendall(b"x" * 65536)  # in flight to the vanished upstream
            line = wait_close_line(proxy, DETECTED_WITHIN)
            assert field(line, "outcome") == "upstream-timeout", line
            assert field(line, "error") == error, line
            assert read_to_end(client)[:2] == ("reset", 0)
    finally:
        ka.proxy.run(["sysctl", "-qw", f"net.ipv4.tcp_retries2={retries}"])


def with_a_listener_a_reload_adds(
    start_proxy: StartProxy, port: int, tmp_path: Path, *options: str
) -> tuple[Proxy, int, int]:
    """A proxy with `options` and one link from an env file, then a SIGHUP that binds a
    second: the proxy, the port bound at start and the port the reload added."""
    upstream = f"tcp://127.0.0.1:{port}"
    first, added = distinct_free_ports(2)
    env_file = tmp_path / "links.env"
    write_env_file(env_file, {f"A_PORT_{first}_TCP": upstream})
    proxy = start_proxy(*options, "--env-file", str(env_file), *LOOPBACK)
    write_env_file(env_file, {f"A_PORT_{first}_TCP": upstream, f"B_PORT_{added}_TCP": upstream})
    proxy.signal(signal.SIGHUP)
    assert wait_for(lambda: f":{added}" in proxy.log()), proxy.log()
    return proxy, first, added


def test_every_listener_hands_keepalive_to_what_it_accepts_those_a_reload_adds_too(
    start_proxy: StartProxy, tcp_server: ServerFactory, tmp_path: Path
) -> None:
    """The client's side gets --keepalive from its listener (Linux copies a listening
    socket's options to each connection it accepts), set once by the supervisor rather
    than by each child: so a listener bound by a reload must have it too. Read from the
    kernel with `ss`: the proxy's end of each connection runs a keepalive timer."""
    server = tcp_server(echo)
    _, first, added = with_a_listener_a_reload_adds(
        start_proxy, server.port, tmp_path, "--keepalive", "600")

    def timers(selector: str) -> list[str]:
        out = subprocess.run([need("ss"), "-tnoH", "state", "established", selector],
                             capture_output=True, text=True, check=True).stdout
        return out.splitlines()

    for port in (first, added):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(b"x")
            assert client.recv(1) == b"x"
            own = timers(f"( sport = :{port} )")  # the proxy's end: accepted by the listener
            assert len(own) == 1 and "timer:(keepalive," in own[0], own
            ups = timers(f"( dport = :{server.port} )")  # the child's upstream socket
            assert len(ups) == 1 and "timer:(keepalive," in ups[0], ups


# -- --user-timeout -------------------------------------------------------------------

USER_TIMEOUT = "2"  # seconds: OUTLIVE is four times that
IN_FLIGHT = 65536  # bytes sent toward the vanished peer: unacknowledged, so never probed


def assert_still_open(sock: socket.socket, since: float) -> None:
    """Neither EOF nor a reset on `sock` until OUTLIVE seconds after `since` (at once if
    that is past already)."""
    sock.settimeout(max(OUTLIVE - (time.monotonic() - since), 0.1))
    with pytest.raises(TimeoutError):
        sock.recv(1)


@pytest.mark.parametrize("gone", ["upstream", "client"])
def test_user_timeout_ends_a_connection_whose_peer_vanished_with_bytes_in_flight(
    ka: KeepaliveLab, gone: str
) -> None:
    """Keepalive never probes while bytes are unacknowledged: only retransmissions find a
    peer gone mid-transfer, after about 15 minutes (tcp_retries2). --user-timeout bounds
    that: a vanished upstream ends as upstream-timeout, the client reset; a vanished client
    (its socket has the option from its listener) as client-timeout, the upstream reset.
    A proxy without it, its peer gone at the same moment, still holds its connection well
    past the user timeout: the option ended the first, not the kernel's default."""
    from_client_host = gone == "client"
    cut = ka.start_proxy("--user-timeout", USER_TIMEOUT)
    kept = ka.start_proxy("--grace", "0")  # its connection cannot finish: stop at once
    client, upstream = ka.connect(cut, from_client_host=from_client_host)
    kept_client, kept_upstream = ka.connect(kept, from_client_host=from_client_host)
    # The side that keeps sending into the vanished peer, and what it has moved before.
    sender, kept_sender, fill, moved = (
        (upstream, kept_upstream, b"d", "bytes_up") if from_client_host
        else (client, kept_client, b"u", "bytes_down"))
    with client, upstream, kept_client, kept_upstream:
        seed = 25 if from_client_host else 21
        exchange(client, upstream, SIZE, seed=seed)
        exchange(kept_client, kept_upstream, SIZE, seed=seed + 2)
        ka.vanish(ka.client if from_client_host else ka.upstream)
        vanished = time.monotonic()
        sender.sendall(fill * IN_FLIGHT)
        kept_sender.sendall(fill * IN_FLIGHT)
        line = wait_close_line(cut, DETECTED_WITHIN)
        assert field(line, "outcome") == f"{gone}-timeout", line
        assert field(line, "error") == "Connection timed out", line
        assert field(line, moved) == str(SIZE), line
        assert read_to_end(sender)[:2] == ("reset", 0)
        assert_still_open(kept_sender, vanished)
        assert close_lines(kept) == []


def test_user_timeout_also_cuts_a_live_client_that_reads_nothing_that_long(
    ka: KeepaliveLab,
) -> None:
    """What --user-timeout costs, and why it is off by default: a live client that stops
    reading (its window shut, the proxy's data waiting) is cut as if it were dead, where
    --keepalive leaves it alone (the keepalive test above, same pause)."""
    proxy = ka.start_proxy("--user-timeout", "1")
    client, upstream = ka.connect(proxy, from_client_host=True, rcvbuf=4096)
    with client, upstream:
        # Filled from this thread, never from a sender still in send() when the proxy's
        # reset comes: Linux reports a reset once, so such a send would take it and the
        # read below would see a plain EOF. (On a slow machine the reset can come while
        # this still fills: then that send is where it is seen.)
        reset_while_filling = fill_until_blocked(upstream, pattern(2 * 1024 * 1024, seed=29))
        line = wait_close_line(proxy, DETECTED_WITHIN)  # the client reads nothing meanwhile
        assert field(line, "outcome") == "client-timeout", line
        assert field(line, "error") == "Connection timed out", line
        if not reset_while_filling:
            assert read_to_end(upstream)[:2] == ("reset", 0)


def fill_until_blocked(sock: socket.socket, data: bytes, settle: float = 0.3) -> bool:
    """Send `data` without blocking until it is all sent or `sock` has stayed unwritable
    for `settle` seconds (the buffers between it and a reader that reads nothing are
    full); whether a send met a reset meanwhile. Left blocking again."""
    sock.setblocking(False)
    sent = 0
    try:
        while sent < len(data):
            if not select.select([], [sock], [], settle)[1]:
                break
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(data[sent:sent + 65536])
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)
    assert sent >= 65536, sent  # more than the reader's window: the proxy holds the rest
    return False


def test_with_keepalive_the_user_timeout_is_when_an_idle_dead_peer_is_given_up(
    ka: KeepaliveLab,
) -> None:
    """Linux: with both set, an idle connection's silent peer is given up at the first
    keepalive probe time at which it has been silent for the user timeout, not after
    KEEPALIVE_PROBES probes: past them here (--keepalive 1 alone gives up after about
    4 s, the control test above; --user-timeout 10 keeps probing until 10 s of silence)."""
    proxy = ka.start_proxy("--keepalive", "1", "--user-timeout", "10")
    client, upstream = ka.connect(proxy)
    with client, upstream:
        exchange(client, upstream, SIZE, seed=31)
        ka.vanish(ka.upstream)
        vanished = time.monotonic()
        assert_still_open(client, vanished)  # 8 s: twice what keepalive alone takes
        assert close_lines(proxy) == []
        line = wait_close_line(proxy, DETECTED_WITHIN)
        assert field(line, "outcome") == "upstream-timeout", line
        assert field(line, "error") == "Connection timed out", line
        assert read_to_end(client)[:2] == ("reset", 0)


def user_timeouts(supervisor: int, inodes: list[int]) -> list[int]:
    """TCP_USER_TIMEOUT (ms) of the sockets with these inodes, held by `supervisor`'s
    children: read from the kernel through a copy of each descriptor (pidfd_getfd)."""
    found: dict[int, int] = {}
    for pid, _ in processes_under(supervisor):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed while we looked
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                inode = int(target[8:-1]) if target.startswith("socket:[") else 0
                if inode in inodes:
                    with socket.socket(fileno=copy_fd(pid, int(fd))) as sock:
                        found[inode] = sock.getsockopt(socket.IPPROTO_TCP,
                                                       socket.TCP_USER_TIMEOUT)
    assert set(found) == set(inodes), (inodes, found)
    return [found[inode] for inode in inodes]


def established(local: int = 0, remote: int = 0) -> list[int]:
    """Inodes of established TCP sockets with that local or remote port (/proc/net/tcp)."""
    inodes = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name, encoding="ascii") as handle:
            next(handle)
            for fields in (line.split() for line in handle):
                ports = (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16))
                if fields[3] == "01" and (ports[0] == local or ports[1] == remote):
                    inodes.append(int(fields[9]))
    return inodes


def test_user_timeout_is_on_both_sockets_of_a_connection_and_every_listener(
    start_proxy: StartProxy, tcp_server: ServerFactory, tmp_path: Path
) -> None:
    """`ss` shows no user timeout, so it is read where the kernel keeps it: on copies of
    the descriptors. The supervisor sets it on each listener (at start and on those a
    reload binds), the accepted socket inherits it, the child sets the upstream's; in
    milliseconds. A proxy without the option leaves all three at 0, the kernel's off."""
    server = tcp_server(echo)
    proxy, first, added = with_a_listener_a_reload_adds(
        start_proxy, server.port, tmp_path, "--user-timeout", "2.5")
    off = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}")

    for owner, port, expected in ((proxy, first, 2500), (proxy, added, 2500), (off, off.port, 0)):
        with socket.socket(fileno=hold_the_listener(owner.pid, port)) as listener:
            assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == expected
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(b"x")
            assert client.recv(1) == b"x"
            # One each; the previous connection's child may still be closing its own.
            assert wait_for(lambda: len(established(remote=server.port)) == 1)
            accepted, to_upstream = established(local=port), established(remote=server.port)
            assert len(accepted) == 1 and len(to_upstream) == 1, (accepted, to_upstream)
            assert user_timeouts(owner.pid, accepted + to_upstream) == [expected, expected]
