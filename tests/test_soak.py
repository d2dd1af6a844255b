"""Long-running behaviour in small: churn that must leave nothing behind and add up.

An ambassador runs for months, so what a connection, a reload or a scrape leaves behind
adds up. These tests make a few thousand connections with every way of ending (closed,
closed by the upstream first, reset by either side, refused upstream, denied,
idle-timeout, waiting at --max-children)
while reloads rewire the links every ~100 ms and status and metrics are read, then check
that the counters match what the clients did, byte for byte, and that the supervisor and
the metrics process are back to the descriptors, processes and (roughly) memory they had.
The memory thresholds are generous (no timing, no exact sizes) yet well below what a
leak of even a few hundred bytes per connection would cost.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import os
import random
import resource
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from forkproxy.supervisor import DENY_LOG_WINDOW

from conftest import (
    FORKPROXY,
    LOOPBACK,
    Proxy,
    Redis,
    ServerFactory,
    control,
    echo,
    fd_count,
    metrics_pid,
    processes_under,
    wait_for,
)

# --idle-timeout: the idle clients' connections end after it. Not less: it ends any
# connection silent that long, and on a loaded machine (a CI run beside other work) a
# test server's thread that answered QUIT 0.5 s late had its connection ended with a
# FIN and no answer, as it should be, and the test failed.
IDLE = 2.0
MAX_CHILDREN = 12
RESET_AFTER = 100  # the resetting upstream reads this many bytes, then sends an RST
QUIT, BYE = b"QUIT", b"BYE"  # ... unless it is asked to quit: it answers, then closes

StartProxy = Callable[..., Proxy]
Key = tuple[str, str]  # (link, outcome)


def listen_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range: a port the kernel can hand to a client
    socket (then in TIME_WAIT for a minute) could not be bound again by a reload that
    brings its link back, which would fail that reload for a reason of the test's."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
        low = int(handle.read().split()[0])
    ports: list[int] = []
    for port in random.sample(range(10000, low), low - 10000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))  # where --bind puts the links
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise AssertionError("no free ports below the ephemeral range")


def memory_kib(pid: int) -> int:
    """Anonymous resident memory (RssAnon): the heap, not the shared libraries."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon line")


def resting_fds(pid: int, seconds: float = 1.0) -> int:
    """The supervisor's descriptors at rest: the fewest seen over `seconds` (a lookup's
    pipe, open for a few milliseconds at any time, only ever adds to the count)."""
    fewest = fd_count(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        fewest = min(fewest, fd_count(pid))
    return fewest


def fd_targets(pid: int) -> dict[int, str]:
    """What each descriptor is (socket:[inode], pipe:[inode], a path): for a failure's message."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return found


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(url, timeout=30).read().decode()
    found = {}
    for line in body.splitlines():
        if line.startswith("#") or not line:
            continue
        series, value = line.rsplit(" ", 1)
        name, _, rest = series.partition("{")
        labels = tuple(sorted(
            (item.split("=", 1)[0], item.split("=", 1)[1].strip('"'))
            for item in rest.rstrip("}").split(",") if item
        ))
        found[(name, labels)] = float(value)
    return found


def read_to_eof(sock: socket.socket) -> tuple[bytes, bool]:
    """All the bytes until the peer closes; and whether it closed with a reset."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), True
    return b"".join(chunks), False


def reset_after_reading(conn: socket.socket) -> None:
    """An upstream that reads RESET_AFTER bytes, then closes with an RST; or, asked with
    QUIT, answers BYE and closes first, with a FIN (`upstream-closed`)."""
    first = b""
    while len(first) < len(QUIT) and (chunk := conn.recv(len(QUIT) - len(first))):
        first += chunk
    if first == QUIT:
        conn.sendall(BYE)
        return
    got = len(first)
    while got and got < RESET_AFTER and (chunk := conn.recv(RESET_AFTER - got)):
        got += len(chunk)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Ledger:
    """What the clients did, per (link, outcome): connections and bytes each way."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[Key] = collections.Counter()
        self.up: collections.Counter[str] = collections.Counter()
        self.down: collections.Counter[str] = collections.Counter()
        self.denied: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []

    def add(self, link: str, outcome: str, up: int, down: int) -> None:
        with self.lock:
            self.counts[(link, outcome)] += 1
            self.up[link] += up
            self.down[link] += down

    def per_link(self, link: str) -> tuple[int, dict[str, int]]:
        outcomes = {o: n for (name, o), n in self.counts.items() if name == link}
        return sum(outcomes.values()), outcomes


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    try:
        sock.settimeout(30)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


@pytest.mark.timeout(240)
def test_churn_of_every_outcome_under_reloads_and_scrapes_adds_up_and_leaks_nothing(
    start_proxy: StartProxy, tcp_server: ServerFactory, short_dir: Path
) -> None:
    first, second = tcp_server(echo), tcp_server(echo)
    resetter = tcp_server(reset_after_reading)
    keys = ("stable", "flip", "named", "dead", "reset", "t1", "t2")
    *listening, dead = listen_ports(len(keys) + 1)  # nothing listens on `dead`: refused
    ports = dict(zip(keys, listening, strict=True))
    name = {key: f"{key.upper()}_PORT_{port}_TCP" for key, port in ports.items()}
    env_file, sock_path = short_dir / "links.env", short_dir / "s.sock"

    def write_links(generation: int) -> None:
        # FLIP changes target, T1/T2 comes and goes and changes port (so name): the
        # listener, accounting and lookup tables churn; the others stay. NAMED's target
        # is a name: every reload looks it up again, in a resolver child.
        toggle = ("t1", "t2")[generation % 2]
        lines = [
            f"{name['stable']}=tcp://127.0.0.1:{first.port}",
            f"{name['flip']}=tcp://127.0.0.1:{(first, second)[generation % 2].port}",
            f"{name['named']}=tcp://localhost:{first.port}",
            f"{name['dead']}=tcp://127.0.0.1:{dead}",
            f"{name['reset']}=tcp://127.0.0.1:{resetter.port}",
        ]
        if generation % 3:
            lines.append(f"{name[toggle]}=tcp://127.0.0.1:{second.port}")
        staging = env_file.with_suffix(".tmp")
        staging.write_text("\n".join(lines) + "\n")
        staging.rename(env_file)

    write_links(0)
    proxy = start_proxy(
        "--env-file", str(env_file), *LOOPBACK, "--status-socket", str(sock_path),
        "--allow", "127.0.0.1/32", "--idle-timeout", str(IDLE),
        "--max-children", str(MAX_CHILDREN), "--metrics", "127.0.0.1:0",
        "--log-format", "json", expect=6,
    )
    url = proxy.lines[-1].split()[1]
    ledger = Ledger()

    def closed_normally(key: str, size: int) -> None:
        payload = os.urandom(size)
        with connect(ports[key]) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data, was_reset = read_to_eof(sock)
        assert data == payload and not was_reset, (key, size, len(data), was_reset)
        ledger.add(name[key], "closed", size, size)

    def client_reset(size: int) -> None:
        payload = os.urandom(size)
        sock = connect(ports["stable"])
        sock.sendall(payload)
        got = b""
        while len(got) < size and (chunk := sock.recv(65536)):
            got += chunk
        assert got == payload
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        ledger.add(name["stable"], "client-reset", size, size)

    def idle() -> None:
        with connect(ports["stable"]) as sock:
            assert read_to_eof(sock) == (b"", False)
        ledger.add(name["stable"], "idle-timeout", 0, 0)

    def refused() -> None:
        with connect(ports["dead"]) as sock:
            assert read_to_eof(sock) == (b"", False)
        ledger.add(name["dead"], "connect-failed", 0, 0)

    def upstream_reset() -> None:
        with connect(ports["reset"]) as sock:
            sock.sendall(b"x" * RESET_AFTER)
            assert read_to_eof(sock) == (b"", True)
        ledger.add(name["reset"], "upstream-reset", RESET_AFTER, 0)

    def upstream_closed() -> None:
        with connect(ports["reset"]) as sock:
            sock.sendall(QUIT)
            assert read_to_eof(sock) == (BYE, False)  # its FIN first; ours after
        ledger.add(name["reset"], "upstream-closed", len(QUIT), len(BYE))

    def denied() -> None:
        with connect(ports["stable"], source="127.0.0.2") as sock:
            assert read_to_eof(sock)[0] == b""
        with ledger.lock:
            ledger.denied[name["stable"]] += 1

    def burst() -> None:
        """More clients at once than --max-children: the rest wait in the backlog."""
        socks = [connect(ports["flip"]) for _ in range(MAX_CHILDREN + 8)]
        try:
            for sock in socks:
                sock.sendall(b"burst")
                sock.shutdown(socket.SHUT_WR)
            for sock in socks:
                assert read_to_eof(sock) == (b"burst", False)
                ledger.add(name["flip"], "closed", 5, 5)
        finally:
            for sock in socks:
                sock.close()

    def toggled() -> None:
        """The link that comes and goes: refused or served, never counted here."""
        for key in ("t1", "t2"):
            with contextlib.suppress(OSError), connect(ports[key]) as sock:
                sock.sendall(b"t")
                sock.shutdown(socket.SHUT_WR)
                read_to_eof(sock)

    # One round of the mix, in a fixed order: ~40 connections.
    def one_round(i: int) -> None:
        for size in (1, 700, 20_000, 70_000):
            closed_normally("stable", size)
            closed_normally("flip", size)
        closed_normally("named", 3000)
        for size in (1, 3000):
            client_reset(size)
        for _ in range(3):
            refused()
            upstream_reset()
            upstream_closed()
            denied()
        toggled()
        if i % 10 == 0:
            idle()
        if i % 15 == 7:
            burst()

    def work(rounds: int, threads: int = 4) -> None:
        def worker(offset: int) -> None:
            try:
                for i in range(offset, rounds, threads):
                    one_round(i)
            except BaseException as exc:
                ledger.errors.append(repr(exc))

        workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(180)

    def settle() -> None:
        assert wait_for(lambda: not control(sock_path, "status")["children"], 30)
        assert wait_for(lambda: [p for p, _ in processes_under(proxy.pid)] == [mpid], 30), \
            processes_under(proxy.pid)

    assert wait_for(lambda: bool(metrics_pid(proxy.pid))), "no metrics process"
    mpid = metrics_pid(proxy.pid)
    work(20)  # warm-up: the heap and every code path at their working size
    scrape(url)
    settle()
    baseline = (resting_fds(proxy.pid), memory_kib(proxy.pid), fd_count(mpid), memory_kib(mpid))

    stop = threading.Event()
    reloads: collections.Counter[str] = collections.Counter()
    scrapes: collections.Counter[str] = collections.Counter()

    def reloader() -> None:
        generation = 0
        while not stop.wait(0.1):
            generation += 1
            write_links(generation)
            try:
                if generation % 10 == 0:  # the user's command, now and then (it is slower)
                    done = subprocess.run([FORKPROXY, "reload", "--status-socket",
                                           str(sock_path)], capture_output=True, timeout=60)
                    reloads[str(done.returncode == 0)] += 1
                elif generation % 5 == 0:
                    proxy.signal(signal.SIGHUP)
                    reloads["hup"] += 1
                else:
                    reloads[str(control(sock_path, "reload")["ok"])] += 1
            except BaseException as exc:
                ledger.errors.append(f"reload: {exc!r}")

    def scraper() -> None:
        i = 0
        while not stop.wait(0.05):
            i += 1
            try:
                control(sock_path, "status")
                scrapes["status"] += 1
                if i % 4 == 0:
                    scrape(url)
                    scrapes["metrics"] += 1
                if i % 40 == 0:  # the user's command, with psutil's readings of the children
                    done = subprocess.run([FORKPROXY, "status", "--json", "--status-socket",
                                           str(sock_path)], capture_output=True, timeout=60)
                    assert done.returncode == 0 and json.loads(done.stdout)["ok"], done
                    scrapes["cli"] += 1
            except BaseException as exc:
                ledger.errors.append(f"scrape: {exc!r}")

    background = [threading.Thread(target=reloader), threading.Thread(target=scraper)]
    for thread in background:
        thread.start()
    try:
        work(200)
    finally:
        stop.set()
        for thread in background:
            thread.join(60)
    # With what the proxy said that is out of the ordinary: the line of the connection
    # that failed (a failed connect, an empty answer) is among them.
    assert not ledger.errors, (ledger.errors[:5], [
        line for line in proxy.log().splitlines()
        if " info " not in line or (" bytes_down=0 " in line and "outcome=upstream" in line)
    ][-20:])
    assert reloads["True"] > 10 and not reloads["False"] and scrapes["metrics"] > 5, (
        reloads, scrapes)
    write_links(0)  # the toggled link away, for the count of links below
    assert control(sock_path, "reload")["ok"]
    settle()

    # The counters are what the clients did: per link, per outcome, byte for byte.
    status = control(sock_path, "status")
    metrics = scrape(url)
    assert sorted(status["links"]) == sorted(name[key] for key in
                                             ("stable", "flip", "named", "dead", "reset"))
    for key in ("stable", "flip", "named", "dead", "reset"):
        link = name[key]
        stats = status["links"][link]
        connections, outcomes = ledger.per_link(link)
        assert (stats["connections"], stats["active"], stats["outcomes"]) == (
            connections, 0, outcomes), (link, stats)
        assert (stats["bytes_up"], stats["bytes_down"]) == (ledger.up[link], ledger.down[link])
        assert stats["denied"] == ledger.denied[link]
        assert stats["upstream_failures"] == outcomes.get("connect-failed", 0)
        labels = (("link", link),)
        assert metrics[("forkproxy_connections_total", labels)] == connections
        assert metrics[("forkproxy_connections_active", labels)] == 0
        assert metrics[("forkproxy_connections_denied_total", labels)] == ledger.denied[link]
        for direction, total in (("upstream", ledger.up[link]),
                                 ("downstream", ledger.down[link])):
            series = ("forkproxy_bytes_total", (("direction", direction), ("link", link)))
            assert metrics[series] == total
    # One open and one close line per connection that reached its upstream; a `denied`
    # line per denied client, or its count in a `denied-unlogged` line, which comes when
    # the link's 10 s window ends.
    def log_events() -> collections.Counter[Key]:
        events: collections.Counter[Key] = collections.Counter()
        for line in proxy.log().splitlines():
            entry = json.loads(line)
            if entry["event"] in ("open", "close", "denied"):
                events[(entry["event"], entry["link"])] += 1
            elif entry["event"] == "denied-unlogged":
                events[("denied", entry["link"])] += entry["count"]
        return events

    stable_denied = ledger.denied[name["stable"]]
    assert wait_for(lambda: log_events()[("denied", name["stable"])] == stable_denied,
                    DENY_LOG_WINDOW + 15), (log_events()[("denied", name["stable"])],
                                            stable_denied)
    events = log_events()
    for key in ("stable", "flip", "named", "reset"):
        link = name[key]
        connections = ledger.per_link(link)[0]
        assert events[("open", link)] == events[("close", link)] == connections, key

    # Nothing left behind: descriptors, processes, memory (the trend after the warm-up).
    # A descriptor in use for a moment (a lookup's pipe: every reload, and the 30 s timer,
    # start one) is not one left behind: wait for it to go; a leaked one never does.
    wait_for(lambda: fd_count(proxy.pid) == baseline[0], 15)
    after = (fd_count(proxy.pid), memory_kib(proxy.pid), fd_count(mpid), memory_kib(mpid))
    assert after[0] == baseline[0], (baseline, after, fd_targets(proxy.pid))
    assert after[2] == baseline[2], (baseline, after)
    assert after[1] - baseline[1] < 512, f"supervisor heap grew {after[1] - baseline[1]} KiB"
    assert after[3] - baseline[3] < 4096, f"metrics heap grew {after[3] - baseline[3]} KiB"
    assert proxy.proc.poll() is None


@pytest.mark.timeout(240)
def test_2000_idle_clients_beyond_max_children_are_all_served_and_nothing_grows(
    start_proxy: StartProxy, redis: Redis, short_dir: Path
) -> None:
    """2000 clients at once, 500 children at most: 500 served, the rest waiting in the
    backlog (none refused), status and metrics still answering at the cap; as clients
    leave the waiting ones are served, and a second wave leaves the supervisor as the
    first did."""
    clients, cap = 2000, 500
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = clients + 500
    if saved[0] != resource.RLIM_INFINITY and saved[0] < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, saved[1]), saved[1]))
    try:
        sock_path = short_dir / "s.sock"
        spec = f"127.0.0.1:0=127.0.0.1:{redis.port}"
        proxy = start_proxy("-q", "--status-socket", str(sock_path), "--max-children",
                            str(cap), "--metrics", "127.0.0.1:0", spec, expect=2)
        url = proxy.lines[-1].split()[1]
        # Counted once the metrics process answers: the supervisor starts it after its
        # `metrics` line, and holds the far end of its socket pair until the fork is done.
        scrape(url)
        fds = fd_count(proxy.pid)
        heaps = [wave(proxy, sock_path, url, spec, clients, cap, n) for n in (1, 2)]
        assert fd_count(proxy.pid) == fds
        # The second wave costs nothing more than the first (which grows the tables to
        # their working size): a leak per connection would show here.
        assert heaps[1] - heaps[0] < 512, f"supervisor heap grew {heaps} KiB"
        assert proxy.proc.poll() is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def wave(proxy: Proxy, sock_path: Path, url: str, spec: str, count: int, cap: int,
         number: int) -> int:
    """`count` clients at once; returns the supervisor's heap (KiB) once they are gone."""
    ping, pong = b"PING\r\n", b"+PONG\r\n"
    socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
             for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(ping)
        served: set[int] = set()
        with selectors.DefaultSelector() as selector:
            for index, sock in enumerate(socks):
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, index)

            def served_at_least(target: int) -> bool:
                """Read the replies that came within 0.2 s; True once `target` are in."""
                for key, _ in selector.select(0.2):
                    sock = socks[key.data]
                    assert sock.recv(len(pong)) == pong  # small: never split on loopback
                    selector.unregister(sock)
                    served.add(key.data)
                return len(served) >= target

            assert wait_for(lambda: served_at_least(cap), 120)
            status = control(sock_path, "status")
            assert len(status["children"]) == cap  # the cap, and all of it
            assert len(served) == cap  # the others wait, unserved, not refused
            active = ("forkproxy_connections_active", (("link", spec),))
            assert scrape(url)[active] == cap
            # Clients leave; those waiting take their places, until every one is served.
            while len(served) < count:
                for index in served:
                    socks[index].close()
                assert wait_for(partial(served_at_least, len(served) + 1), 60), \
                    f"{len(served)} of {count} served"
    finally:
        for sock in socks:
            sock.close()
    assert wait_for(lambda: not control(sock_path, "status")["children"], 60)
    stats = control(sock_path, "status")["links"][spec]
    assert (stats["connections"], stats["active"], stats["outcomes"]) == (
        count * number, 0, {"closed": count * number}), stats
    assert (stats["bytes_up"], stats["bytes_down"]) == (
        len(ping) * count * number, len(pong) * count * number)
    # The last status read forked a reporter child: reaped soon, not necessarily yet.
    assert wait_for(lambda: [state for _, state in processes_under(proxy.pid)
                             if state == "Z"] == []), processes_under(proxy.pid)
    return memory_kib(proxy.pid)


def test_status_reads_with_1500_live_connections_leave_the_supervisors_heap_as_it_was(
    start_proxy: StartProxy, short_dir: Path
) -> None:
    """A status reply holds a record per live connection. Built in the supervisor, it
    left its heap ~2 MB larger for good (fragmented arenas), which every later fork
    copies: the supervisor answers it from a forked child now. Eight clients asking at
    once (more than the children it forks for that) all get the whole answer. SIGUSR1's
    table in the log is written by such a child too."""
    count = 1500
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * count + 500
    if saved[0] != resource.RLIM_INFINITY and saved[0] < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, saved[1]), saved[1]))
    upstream = socket.create_server(("127.0.0.1", 0), backlog=count)
    socks: list[socket.socket] = [upstream]
    try:
        sock_path = short_dir / "s.sock"
        spec = f"127.0.0.1:0=127.0.0.1:{upstream.getsockname()[1]}"
        proxy = start_proxy("-q", "--status-socket", str(sock_path), "--max-children",
                            str(count + 10), spec)
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=30))
            socks.append(upstream.accept()[0])  # each child connected: the pair is live
        # The last children's records are in: every child is connected, so forked, and the
        # supervisor is back waiting in poll() (a fixed 0.5 s sleep stood for this).
        wchan = Path(f"/proc/{proxy.pid}/wchan")
        assert wait_for(lambda: "poll" in wchan.read_text()), wchan.read_text()
        before = memory_kib(proxy.pid)  # before any status read: the first one grew it
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: control(sock_path, "status"), range(8)))
        for reply in replies:
            assert (reply["pid"], len(reply["children"])) == (proxy.pid, count)
        for _ in range(3):
            control(sock_path, "status")
        proxy.signal(signal.SIGUSR1)  # the same table, to the log: -q writes it too
        assert wait_for(lambda: proxy.log().count(" status-connection ") == count, 60)
        grown = memory_kib(proxy.pid) - before
        assert grown < 512, (f"the supervisor's heap grew {grown} KiB after 11 status reads "
                             f"and a SIGUSR1")
        # The children that answered are reaped; none is left or counted as a connection.
        # The last one may still be exiting once its reply is in (its socket closes before
        # it is a zombie: seen alive 1 time in 300), so the count is waited for too.
        assert wait_for(lambda: [state != "Z" for _, state in processes_under(proxy.pid)]
                        == [True] * count), collections.Counter(
                            state for _, state in processes_under(proxy.pid))
        assert control(sock_path, "status")["links"][spec]["active"] == count
    finally:
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
