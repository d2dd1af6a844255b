"""Health checkers and scanners pointed at the ambassador's port, with real components.

What a load balancer or an orchestrator does to a listening port all day, and what
forkproxy makes of it (README, "Health checks and scanners on a proxied port"):

- a connect-and-close probe (Kubernetes/Docker `tcpSocket`, `nc -z`): FIN, nothing sent;
- the same closed with an RST (SO_LINGER 0), as some checkers close;
- HAProxy's plain `check` (and `option tcp-check` without rules): SYN, SYN-ACK, RST, the
  handshake never completed (haproxy turns TCP_QUICKACK off, so its ACK never leaves);
- a SYN scan (hping3 -S, nmap -sS): the same half-open exchange;
- HAProxy's `option redis-check`, which speaks to redis through the proxy, then resets.

Each probe that completes the handshake gets a child and an upstream connection, as with
socat (compared here); it is logged at info, counted by its outcome, and as `empty` when
it moved no byte either way. Half-open ones never reach accept(): nothing at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_chain_faults import pattern, port_of, read_to_end
from test_two_hosts import forkproxy_command

from forkproxy.accounting import FAILURE_REASONS

from conftest import (
    FORKPROXY,
    Proxy,
    Redis,
    ServerFactory,
    TcpServer,
    control,
    free_port,
    in_network,
    need,
    netns_lab,
    processes_under,
    wait_for,
)
from netns import Namespace, Process

StartProxy = Callable[..., Proxy]
LINGER_RESET = struct.pack("ii", 1, 0)


# -- probes ----------------------------------------------------------------------------


def fin_probe(port: int) -> None:
    """A `tcpSocket` probe: connect, close at once (FIN), nothing sent."""
    socket.create_connection(("127.0.0.1", port), timeout=10).close()


def rst_probe(port: int) -> None:
    """A checker that closes with an RST (SO_LINGER 0) right after the handshake."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


PROBES = {"fin": fin_probe, "rst": rst_probe}


def ping(port: int, timeout: float = 30) -> bytes:
    """A real client: one redis PING through the proxy."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


# -- peers -----------------------------------------------------------------------------


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, read from /proc (a connect to find
    out would be one more probe)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(line.split()[1] == wanted and line.split()[3] == "0A"
                   for line in table.readlines()[1:])


@contextlib.contextmanager
def socat(target: int) -> Iterator[int]:
    """The seed's recipe in front of 127.0.0.1:target; yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        [need("socat"), f"TCP4-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
         f"TCP4:127.0.0.1:{target}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: listening(port)), "socat did not listen"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def small_redis(maxclients: int) -> Iterator[Redis]:
    """A redis-server of our own with a low `maxclients`."""
    port = free_port()
    proc = subprocess.Popen(
        [need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--maxclients", str(maxclients)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: listening(port)), "redis-server did not listen"
        yield Redis(port, proc)
    finally:
        proc.terminate()
        proc.wait(10)


class Counted:
    """An echo upstream that notes each connection it accepts, as a server that logs
    every connection would: the burden probes put on an upstream, counted exactly (redis
    does not count a connection reset before it has set it up)."""

    def __init__(self, tcp_server: ServerFactory) -> None:
        self.accepted: list[int] = []  # the accepted sockets' descriptors
        self.server: TcpServer = tcp_server(self.handle)

    def handle(self, conn: socket.socket) -> None:
        self.accepted.append(conn.fileno())  # not getpeername(): ENOTCONN once reset
        with contextlib.suppress(OSError):  # a reset: the connection is over all the same
            while data := conn.recv(65536):
                conn.sendall(data)

    @property
    def port(self) -> int:
        return int(self.server.port)


ASKED: dict[int, int] = {}  # redis port -> INFO connections made to it by this module


def redis_info(redis: Redis) -> dict[str, str]:
    """INFO's fields. The INFO connection itself counts in total_connections_received
    and connected_clients."""
    ASKED[redis.port] = ASKED.get(redis.port, 0) + 1
    return dict(line.split(":", 1) for line in redis.cli("info").splitlines()
                if ":" in line and not line.startswith("#"))


def received(redis: Redis) -> int:
    """Connections redis accepted so far, less the ones we made to ask it (to compare
    two readings)."""
    total = int(redis_info(redis)["total_connections_received"])
    return total - ASKED[redis.port]


class HAProxy:
    """haproxy in the foreground with one backend server (our port) and a stats socket."""

    def __init__(self, workdir: Path, port: int, check: str) -> None:
        self.stats = workdir / "haproxy.sock"
        config = workdir / "haproxy.cfg"
        config.write_text(
            "global\n"
            f"    stats socket {self.stats} mode 600 level admin\n"
            "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 5s\n"
            "    timeout server 5s\n"
            f"listen front\n    bind 127.0.0.1:{free_port()}\n"
            + "".join(f"    {line}\n" for line in check.splitlines() if line)
            + f"    server fp 127.0.0.1:{port} check inter 100ms fall 1 rise 1\n"
        )
        self.proc = subprocess.Popen([need("haproxy"), "-db", "-f", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def server(self) -> dict[str, str]:
        """The `fp` server's row of `show stat` ({} while the socket is not up)."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(str(self.stats))
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return {}
        header, *rows = data.decode().splitlines()
        names = header.lstrip("# ").split(",")
        for row in rows:
            fields = dict(zip(names, row.split(","), strict=False))
            if fields.get("svname") == "fp":
                return fields
        return {}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def haproxy(short_dir: Path) -> Iterator[Callable[[int, str], HAProxy]]:
    started: list[HAProxy] = []

    def start(port: int, check: str = "") -> HAProxy:
        started.append(HAProxy(short_dir, port, check))
        return started[-1]

    yield start
    for one in started:
        one.close()


def checks_passed(haproxy: HAProxy, status: str) -> None:
    """Wait until haproxy's checks of `fp` have passed several times: `check_status`
    is `status` and the server UP, with no failure; then a few more intervals."""
    # `show stat` prefixes the last check's status with "* " while the next one runs.
    def last_check(row: dict[str, str]) -> str:
        return row.get("check_status", "").removeprefix("* ")

    assert wait_for(lambda: last_check(haproxy.server()) == status, 30), haproxy.server()
    time.sleep(1)  # ~10 more checks at `inter 100ms`
    row = haproxy.server()
    assert (row["status"], last_check(row), row["chkfail"]) == ("UP", status, "0"), row


# -- forkproxy -------------------------------------------------------------------------


def serve(start_proxy: StartProxy, target: int, sock: Path, *extra: str) -> tuple[Proxy, str]:
    """forkproxy in front of 127.0.0.1:target, JSON logs, metrics; (proxy, metrics URL)."""
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{target}", "--log-format", "json",
                        "--status-socket", str(sock), "--metrics", "127.0.0.1:0", *extra,
                        expect=2)
    url = proxy.lines[1].split(" ", 1)[1]
    assert url.startswith("http://127.0.0.1:"), proxy.lines
    return proxy, url


def records(proxy: Proxy) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]


def link_stats(sock: Path) -> dict[str, Any]:
    [stats] = control(sock, "status")["links"].values()
    return stats  # type: ignore[no-any-return]


def settled(sock: Path, connections: int) -> dict[str, Any]:
    """The link's totals once `connections` have ended."""
    def done() -> bool:
        stats = link_stats(sock)
        return bool(stats["connections"] >= connections and stats["active"] == 0)

    wait_for(done, 60)
    stats = link_stats(sock)
    assert (stats["connections"], stats["active"]) == (connections, 0), stats
    return stats


def scrape(url: str) -> dict[tuple[str, str], float]:
    """{(sample name, outcome or reason label or ""): value} for the one link."""
    with urllib.request.urlopen(url, timeout=15) as response:
        text = response.read().decode()
    return {(sample.name, sample.labels.get("outcome", sample.labels.get("reason", ""))):
            sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


# -- the probes, one kind at a time ----------------------------------------------------


@pytest.mark.parametrize("kind", ["fin", "rst"])
def test_a_connect_and_close_probe_is_an_empty_connection_logged_at_info(
    start_proxy: StartProxy, tcp_server: ServerFactory, short_dir: Path, kind: str,
) -> None:
    """Each probe: a child, one upstream connection (as through socat), an open and a
    close line at info with 0 bytes each way, outcome `closed` (FIN) or `client-reset`
    (RST: what the client did; not a failure, no warning), counted as `empty`."""
    count = 5
    sock = short_dir / "status.sock"
    upstream = Counted(tcp_server)
    proxy, url = serve(start_proxy, upstream.port, sock)
    for _ in range(count):
        PROBES[kind](proxy.port)
    stats = settled(sock, count)
    outcome = {"fin": "closed", "rst": "client-reset"}[kind]
    assert stats["outcomes"] == {outcome: count}, stats
    assert (stats["empty"], stats["upstream_failures"]) == (count, 0), stats
    assert (stats["bytes_up"], stats["bytes_down"]) == (0, 0), stats
    through_forkproxy = len(upstream.accepted)

    found = records(proxy)
    assert {r["level"] for r in found} == {"info"}, [r for r in found if r["level"] != "info"]
    opens = [r for r in found if r["event"] == "open"]
    closes = [r for r in found if r["event"] == "close"]
    assert (len(opens), len(closes)) == (count, count), found
    for close in closes:
        assert (close["bytes_up"], close["bytes_down"], close["outcome"]) == (0, 0, outcome)
        if kind == "rst":
            assert close["error"] == "Connection reset by peer", close

    metrics = scrape(url)
    assert metrics[("forkproxy_connections_empty_total", "")] == count, metrics
    assert metrics[("forkproxy_connections_ended_total", outcome)] == count
    for reason in FAILURE_REASONS:
        assert metrics[("forkproxy_upstream_connect_failures_total", reason)] == 0
    # The status table's EMPTY column, and the same in SIGUSR1's line.
    table = subprocess.run([FORKPROXY, "status", "--status-socket", str(sock)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    header, row = next((line, lines[i + 1]) for lines in [table.splitlines()]
                       for i, line in enumerate(lines) if line.startswith("LINK "))
    columns = dict(zip(re.split(r"\s{2,}", header), re.split(r"\s{2,}", row), strict=True))
    assert (columns["TOTAL"], columns["EMPTY"], columns["FAILED"]) == ("5", "5", "0"), table
    proxy.signal(signal.SIGUSR1)
    assert wait_for(lambda: any(r["event"] == "status-link" for r in records(proxy)))
    [line] = [r for r in records(proxy) if r["event"] == "status-link"]
    assert (line["total"], line["empty"]) == (count, count), line

    # The upstream's burden: one connection per probe, exactly what socat costs it.
    with socat(upstream.port) as port:
        for _ in range(count):
            PROBES[kind](port)
        wait_for(lambda: len(upstream.accepted) >= 2 * count)
        time.sleep(0.5)  # one more would show by now
    through_socat = len(upstream.accepted) - through_forkproxy
    assert through_forkproxy == through_socat == count


@pytest.mark.parametrize("check", ["", "option tcp-check"], ids=["check", "tcp-check"])
def test_haproxy_connect_check_never_reaches_accept(
    start_proxy: StartProxy, redis: Redis, short_dir: Path,
    haproxy: Callable[[int, str], HAProxy], check: str,
) -> None:
    """HAProxy's layer-4 check resets the connection before its handshake's last ACK
    leaves: the port answered (L4OK), and forkproxy has nothing to accept, so nothing to
    fork, log or count, and the upstream sees nothing either."""
    sock = short_dir / "status.sock"
    proxy, url = serve(start_proxy, redis.port, sock)
    before = received(redis)
    checks_passed(haproxy(proxy.port, check), "L4OK")
    assert link_stats(sock)["connections"] == 0
    assert [r for r in records(proxy) if r["event"] in ("open", "close")] == []
    assert received(redis) == before
    assert scrape(url)[("forkproxy_connections_total", "")] == 0


def test_a_syn_scan_never_reaches_accept(
    start_proxy: StartProxy, redis: Redis, short_dir: Path,
) -> None:
    """A half-open scan (hping3 -S; nmap -sS is the same): SYN, the port's SYN-ACK, the
    scanner's RST. Nothing for forkproxy to accept."""
    sock = short_dir / "status.sock"
    proxy, _ = serve(start_proxy, redis.port, sock)
    before = received(redis)
    scan = subprocess.run(
        [need("hping3"), "-S", "-p", str(proxy.port), "-c", "20", "-i", "u10000", "127.0.0.1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    answers = scan.stdout.count("flags=SA")
    assert answers >= 15, scan.stdout + scan.stderr  # the port did answer: a real scan
    time.sleep(0.5)  # what a completed handshake would have left would show by now
    assert link_stats(sock)["connections"] == 0
    assert [r for r in records(proxy) if r["event"] in ("open", "close")] == []
    assert received(redis) == before


def test_haproxy_redis_check_through_the_proxy_is_real_traffic_reset_by_the_client(
    start_proxy: StartProxy, redis: Redis, short_dir: Path,
    haproxy: Callable[[int, str], HAProxy],
) -> None:
    """`option redis-check` sends PING, reads +PONG and closes with an RST: each check
    is a connection that moved bytes (not `empty`), ends `client-reset` at info, and
    is no upstream failure; the check passes (L7OK) through the proxy."""
    sock = short_dir / "status.sock"
    proxy, _ = serve(start_proxy, redis.port, sock)
    checks_passed(haproxy(proxy.port, "option redis-check"), "L7OK")
    # Read while haproxy runs: a check it cut short by stopping would be no check.
    stats = link_stats(sock)
    ended = sum(stats["outcomes"].values())
    assert ended >= 5, stats
    assert stats["outcomes"] == {"client-reset": ended}, stats
    assert (stats["empty"], stats["upstream_failures"]) == (0, 0), stats
    found = records(proxy)
    assert {r["level"] for r in found} == {"info"}, [r for r in found if r["level"] != "info"]
    for close in (r for r in found if r["event"] == "close"):
        # haproxy's PING as RESP (*1 $4 PING) and redis's +PONG, then its reset.
        assert (close["bytes_up"], close["bytes_down"]) == (14, 7), close
        assert close["error"] == "Connection reset by peer", close


# -- many probes -----------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


def probe_storm(port: int, count: int, threads: int = 4, kinds: tuple[str, ...] = ("rst", "fin"),
                ) -> None:
    """`count` probes, of `kinds` in turn, from `threads` threads at once."""
    def run(share: int) -> None:
        for i in range(share):
            PROBES[kinds[i % len(kinds)]](port)

    workers = [threading.Thread(target=run, args=(count // threads,)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)


def test_thousands_of_probes_leave_nothing_behind(
    start_proxy: StartProxy, redis: Redis, short_dir: Path,
) -> None:
    """2000 probes: every child reaped (no zombie), the supervisor's descriptors as they
    were, its memory about as it was, every upstream connection closed, and each probe
    counted once, as empty."""
    sock = short_dir / "status.sock"
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{redis.port}", "-q",
                        "--status-socket", str(sock))
    probe_storm(proxy.port, 200)  # the supervisor's steady state: its first forks grow it
    settled(sock, 200)
    fds, rss = len(os.listdir(f"/proc/{proxy.pid}/fd")), rss_kib(proxy.pid)

    probe_storm(proxy.port, 2000)
    stats = settled(sock, 2200)
    assert (stats["empty"], stats["upstream_failures"]) == (2200, 0), stats
    assert sum(stats["outcomes"].values()) == 2200, stats
    assert wait_for(lambda: processes_under(proxy.pid) == []), processes_under(proxy.pid)
    assert len(os.listdir(f"/proc/{proxy.pid}/fd")) == fds
    grown = rss_kib(proxy.pid) - rss
    assert grown < 4096, f"the supervisor grew by {grown} KiB over 2000 probes"
    # No upstream connection left open: only the one asking.
    assert wait_for(lambda: redis_info(redis)["connected_clients"] == "1")
    assert proxy.log() == "", proxy.log()  # -q: no line for any of them


def test_a_probe_storm_does_not_starve_real_clients(
    start_proxy: StartProxy, redis: Redis, short_dir: Path,
) -> None:
    """Probes take a child only for a moment: under --max-children 4 and a storm of
    them from 6 threads, every real client is served, and told apart from the probes."""
    sock = short_dir / "status.sock"
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{redis.port}", "-q", "--max-children", "4",
                        "--status-socket", str(sock))
    storm = threading.Thread(target=probe_storm, args=(proxy.port, 1200, 6))
    storm.start()
    answers = [ping(proxy.port) for _ in range(50)]
    storm.join(300)
    assert answers == [b"+PONG\r\n"] * 50
    stats = settled(sock, 1250)
    assert stats["empty"] == 1200, stats
    assert (stats["bytes_up"], stats["bytes_down"]) == (50 * 6, 50 * 7), stats


def test_a_storm_of_tcpsocket_probes_stays_within_the_upstreams_maxclients(
    start_proxy: StartProxy, short_dir: Path,
) -> None:
    """A child whose client closed with a FIN half-closes the upstream and waits for its
    close, so --max-children 4 bounds what redis counts: with maxclients 5 it turns no
    connection away (1200 of the same probes pointed at it directly from 6 threads were
    almost all refused, "max number of clients reached": README, "Health checks and
    scanners on a proxied port")."""
    sock = short_dir / "status.sock"
    with small_redis(maxclients=5) as redis:
        proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{redis.port}", "-q", "--max-children", "4",
                            "--status-socket", str(sock))
        probe_storm(proxy.port, 1200, threads=6, kinds=("fin",))
        stats = settled(sock, 1200)
        assert (stats["empty"], stats["outcomes"]) == (1200, {"closed": 1200}), stats
        assert redis_info(redis)["rejected_connections"] == "0"


def test_clients_gone_before_their_child_runs_still_cost_a_fork_and_a_connect(
    start_proxy: StartProxy, tcp_server: ServerFactory, short_dir: Path,
) -> None:
    """Probes that closed while they waited in the backlog (--max-children reached): each
    still gets its child, which connects upstream, finds the client gone and ends at
    once (as socat's children do: the relay does not look before it connects, see
    README); the real client queued behind them is served."""
    sock = short_dir / "status.sock"
    upstream = Counted(tcp_server)
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{upstream.port}", "--max-children", "1",
                        "--status-socket", str(sock))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as held:
        held.sendall(b"held")
        assert held.recv(64) == b"held"
        for kind in ("fin", "rst") * 5:
            PROBES[kind](proxy.port)
        real = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        real.sendall(b"real")
        assert link_stats(sock)["connections"] == 1  # all of them still in the backlog
    with real:
        assert real.recv(64) == b"real"
    stats = settled(sock, 12)
    assert stats["outcomes"] == {"closed": 7, "client-reset": 5}, stats
    assert stats["empty"] == 10, stats
    assert len(upstream.accepted) == 12  # the held client, the ten probes, the real one


def test_probes_while_the_upstream_is_down_are_connect_failures_not_empty(
    start_proxy: StartProxy, short_dir: Path,
) -> None:
    """With nothing listening upstream, each probe is what any client is then: one
    `connect-failed`, counted as an upstream failure (not as `empty`); the warning is
    folded per link: one line at the first, none for the 3 after it within 10 s."""
    sock = short_dir / "status.sock"
    proxy, url = serve(start_proxy, free_port(), sock)
    for kind in ("fin", "rst") * 2:
        PROBES[kind](proxy.port)
    stats = settled(sock, 4)
    assert stats["outcomes"] == {"connect-failed": 4}, stats
    assert (stats["upstream_failures"], stats["empty"]) == (4, 0), stats
    failed = [r for r in records(proxy) if r["event"] == "connect-failed"]
    assert [(r["level"], r["failures"]) for r in failed] == [("warning", 1)], failed
    assert scrape(url)[("forkproxy_connections_empty_total", "")] == 0


# -- clients that leave while their child is still connecting ---------------------------

UNROUTED = "198.18.5.5"  # no route to it in the lab: each connect() fails at once
SILENT = "198.18.6.9"  # at the far end of a cable pulled out there: SYNs vanish


@contextlib.contextmanager
def patient_proxy(target: str, *options: str) -> Iterator[tuple[Namespace, Process, Path]]:
    """forkproxy in a namespace of its own (where the clients are made too), in front of
    `target`:80, with --max-children 1: (namespace, proxy, status socket)."""
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root (run ./scripts/test as root)")
    with netns_lab("fpcw-") as lab:
        ns = lab.namespace("cw")
        lab.cable(ns, "198.18.6.1", lab.namespace("cw-far"), SILENT).cut()
        sock = lab.workdir / "status.sock"
        argv = [*forkproxy_command(), "serve", f"127.0.0.1:0={target}:80", "--max-children",
                "1", "--status-socket", str(sock), *options]
        proc = lab.spawn(ns, argv, label="proxy")
        proc.wait_stdout(lambda lines: any(ln.startswith("listening ") for ln in lines), 20.0)
        yield ns, proc, sock


def client_in(ns: Namespace, proc: Process) -> socket.socket:
    with in_network(ns.path):
        sock = socket.socket()
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port_of(proc)))
    return sock


def child_pids(sock: Path) -> list[int]:
    return [child["pid"] for child in control(sock, "status")["children"]]


@pytest.mark.netns
@pytest.mark.parametrize(
    ("target", "options", "failed"),
    [
        # ~33 min of backoff between attempts, each failing at once
        (UNROUTED, ["--connect-retries", "1000"], "Network is unreachable"),
        (SILENT, ["--connect-timeout", "600"], None),  # one connect, past its first second
        # the retries', each timed out
        (SILENT, ["--connect-timeout", "0.5", "--connect-retries", "1000"],
         "Connection timed out"),
    ],
    ids=["backoff", "first-connect", "retry-connect"],
)
def test_a_client_that_resets_while_its_child_connects_frees_the_child_and_its_slot(
    target: str, options: list[str], failed: str | None,
) -> None:
    """A health check or an app that gives up and reconnects on its own, against a dead
    upstream and a proxy told to wait long for it: its reset ends its child (without the
    watch, it kept its --max-children slot for the whole backoff, or the whole connect
    timeout). Before any attempt failed, counted as the client's reset, not as an
    upstream failure, and no line. After one failed, a connect failure: the folded
    connect-failed line and upstream_failures (there were none when every client of a
    dead upstream gave up before the last retry)."""
    with patient_proxy(target, *options) as (ns, proc, sock):
        leaving = client_in(ns, proc)
        assert wait_for(lambda: len(child_pids(sock)) == 1)
        [pid] = child_pids(sock)
        time.sleep(2.5)  # attempts and backoffs go by (the first connect past its first 1 s)
        assert child_pids(sock) == [pid]  # still connecting for it
        leaving.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        leaving.close()
        assert wait_for(lambda: not child_pids(sock), 15), proc.describe()
        stats = link_stats(sock)
        if failed is None:
            assert stats["outcomes"] == {"client-reset": 1}, stats
            assert stats["upstream_failures"] == 0, stats
        else:
            assert stats["outcomes"] == {"connect-failed": 1}, stats
            assert stats["upstream_failures"] == 1, stats
        # Its only slot (--max-children 1) is free: the next client gets a child at once.
        with client_in(ns, proc):
            assert wait_for(lambda: len(child_pids(sock)) == 1 and child_pids(sock) != [pid])
        log = proc.stderr()
        assert " close " not in log, log
        lines = [line for line in log.splitlines() if "connect-failed" in line]
        if failed is None:
            assert lines == [], log
        else:
            [line] = lines
            assert f'error="{failed}"' in line and "failures=1" in line, line


@pytest.mark.netns
@pytest.mark.parametrize("sent", [0, 48 * 1024], ids=["nothing-sent", "request-sent"])
def test_a_client_that_half_closes_while_its_child_retries_is_served_when_the_upstream_is_back(
    sent: int,
) -> None:
    """A FIN is no reason to give up: the client may have half-closed to wait for the
    answer to its request, or for a server that speaks first (socat and HAProxy connect
    for it too). Once the upstream's address exists and listens, the next retry reaches
    it: the request arrives whole, then EOF, and the answer arrives whole at the client."""
    request, answer = pattern(sent, seed=1), pattern(1024 * 1024, seed=2)
    with patient_proxy(UNROUTED, "--connect-retries", "1000") as (ns, proc, sock):
        client = client_in(ns, proc)
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        assert wait_for(lambda: len(child_pids(sock)) == 1)
        [pid] = child_pids(sock)
        time.sleep(2.5)  # attempts and backoffs go by, with the client's FIN there
        assert child_pids(sock) == [pid]
        ns.ip("addr", "add", f"{UNROUTED}/32", "dev", "lo")
        with in_network(ns.path):
            listener = socket.create_server((UNROUTED, 80))
        with listener, client:
            listener.settimeout(30)
            upstream, _ = listener.accept()
            with upstream:
                upstream.settimeout(30)
                assert read_to_end(upstream) == ("eof", sent, hashlib.sha256(request).hexdigest())

                def reply() -> None:
                    upstream.sendall(answer)
                    upstream.shutdown(socket.SHUT_WR)

                sender = threading.Thread(target=reply)
                sender.start()
                got = read_to_end(client)
                sender.join(30)
                assert got == ("eof", len(answer), hashlib.sha256(answer).hexdigest())
        assert wait_for(lambda: not child_pids(sock), 15)
        stats = link_stats(sock)
        assert stats["outcomes"] == {"closed": 1}, stats
        assert (stats["bytes_up"], stats["bytes_down"]) == (sent, len(answer)), stats
