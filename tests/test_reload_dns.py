"""Names are resolved by the supervisor: at start, on reload (SIGHUP), every
--resolve-every seconds, and at once when a connect to the addresses it has fails.

A network namespace gets its own /etc/hosts (`ip netns exec` bind-mounts
/etc/netns/NAME/hosts over it), so the test can move a name from one redis to another
without touching the machine's resolver.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import control, frozen, in_network, need, netns_lab, processes_under, wait_for
from netns import Lab, Namespace, Process, redis_cli

pytestmark = [pytest.mark.netns]
FORKPROXY = str(Path(sys.executable).parent / "forkproxy")
REDIS_PORT = 16390
LISTEN_PORT = 7000
TYPE_A = 1  # a DNS query's type for IPv4 addresses
LINK = f'"{LISTEN_PORT}=upstream.test:{REDIS_PORT}"'  # the spec, quoted in a log line
DB = f"DB_PORT_{LISTEN_PORT}_TCP"  # the env file's link


@pytest.fixture
def lab() -> Iterator[Lab]:
    with netns_lab("fpdns-") as lab:
        yield lab


@pytest.fixture
def ns(lab: Lab) -> Iterator[Namespace]:
    """A namespace where upstream.test names 127.0.0.2 and two redis servers answer, on
    127.0.0.2 ("first") and 127.0.0.3 ("second")."""
    namespace = lab.namespace("dns")
    try:
        set_hosts(namespace, "127.0.0.2")
        # A name not in the hosts file is asked of a DNS server on the namespace's own
        # loopback, where none listens (the query is refused at once) unless start_dns
        # starts one: never the machine's.
        (Path("/etc/netns") / namespace.name / "resolv.conf").write_text(
            "nameserver 127.0.0.53\n")
        start_redis(lab, namespace, "127.0.0.2", "first")
        start_redis(lab, namespace, "127.0.0.3", "second")
        yield namespace
    finally:
        shutil.rmtree(Path("/etc/netns") / namespace.name, ignore_errors=True)


def set_hosts(ns: Namespace, address: str | None, moved: str | None = None) -> None:
    """Rewrite the namespace's hosts file in place (the bind mount follows the inode);
    None: without upstream.test. `moved`: moved.test's address, if it has one."""
    path = Path("/etc/netns") / ns.name / "hosts"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        handle.write("127.0.0.1 localhost\n")
        if address is not None:
            handle.write(f"{address} upstream.test\n")
        if moved is not None:
            handle.write(f"{moved} moved.test\n")


def start_redis(lab: Lab, ns: Namespace, address: str, name: str) -> None:
    lab.spawn(ns, ["redis-server", "--port", str(REDIS_PORT), "--bind", address, "--save", "",
                   "--appendonly", "no"], label=f"redis-{name}")
    deadline = time.monotonic() + 10
    while redis_cli(ns, REDIS_PORT, "PING", host=address, check=False) != "PONG":
        assert time.monotonic() < deadline, f"redis on {address} did not start"
        time.sleep(0.05)
    redis_cli(ns, REDIS_PORT, "SET", "who", name, host=address)


def who(ns: Namespace) -> str:
    return redis_cli(ns, LISTEN_PORT, "GET", "who", check=False)


def start_proxy(lab: Lab, ns: Namespace, *options: str, resolved: bool = True) -> Process:
    """The proxy, listening and (with `resolved`) told by its resolver child where the
    name points: a test that moves the name right away moves it from there."""
    proxy = lab.spawn(ns, [FORKPROXY, "serve", f"{LISTEN_PORT}=upstream.test:{REDIS_PORT}",
                           "--status-socket", str(lab.workdir / "fp.sock"), *options],
                      label="proxy")
    proxy.wait_stdout(lambda lines: any(x.startswith("listening ") for x in lines), 15)
    if resolved:
        wait_for_log(proxy, " resolved ")
    return proxy


def wait_until(done: Callable[[], bool], proxy: Process, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, proxy.describe()
        time.sleep(0.1)


def wait_for_who(ns: Namespace, name: str, proxy: Process) -> None:
    wait_until(lambda: who(ns) == name, proxy)


def wait_for_log(proxy: Process, text: str, timeout: float = 15) -> None:
    wait_until(lambda: text in proxy.stderr(), proxy, timeout)


def link_stats(lab: Lab) -> dict[str, int]:
    """The one link's totals, from `forkproxy status --json`."""
    status = subprocess.run([FORKPROXY, "status", "--json", "--status-socket",
                             str(lab.workdir / "fp.sock")], capture_output=True, text=True,
                            timeout=30)
    assert status.returncode == 0, status.stderr
    [stats] = json.loads(status.stdout)["links"].values()
    return stats  # type: ignore[no-any-return]


def test_names_are_resolved_again_every_few_seconds(lab: Lab, ns: Namespace) -> None:
    """The name moves while the old server still answers: only the timer can notice."""
    proxy = start_proxy(lab, ns, "--resolve-every", "1")
    assert who(ns) == "first"

    set_hosts(ns, None)  # the name is gone for a while: the addresses in use stay
    wait_until(lambda: link_stats(lab)["resolve_failures"] >= 3, proxy)
    assert who(ns) == "first"
    assert proxy.stderr().count("resolve-failed") == 1, proxy.stderr()  # once per outage
    assert "keeping the addresses in use" in proxy.stderr()

    set_hosts(ns, "127.0.0.3")  # and comes back elsewhere: no SIGHUP, no restart
    wait_for_who(ns, "second", proxy)
    lines = [x for x in proxy.stderr().splitlines() if " resolved " in x]
    assert [line.split(" host=")[1] for line in lines] == [
        f"upstream.test addresses=127.0.0.2:{REDIS_PORT}",  # at start
        f"upstream.test addresses=127.0.0.3:{REDIS_PORT}",  # the timer, after the outage
    ], lines
    assert proxy.alive()
    # Counted for status and metrics (forkproxy_resolve_failures, _address_changes).
    stats = link_stats(lab)
    assert stats["resolve_failures"] >= 3 and stats["address_changes"] == 1, stats


def test_sigusr1_names_the_addresses_a_name_resolves_to_now(lab: Lab, ns: Namespace) -> None:
    """What an operator sends SIGUSR1 for after a DNS change: the link's line in the status
    table gives the addresses new connections go to, before and after the move."""
    proxy = start_proxy(lab, ns, "--resolve-every", "1")

    def status_links() -> list[str]:
        return [x for x in proxy.stderr().splitlines() if " status-link " in x]

    proxy.popen.send_signal(signal.SIGUSR1)
    wait_until(lambda: len(status_links()) == 1, proxy)
    assert f"addresses=127.0.0.2:{REDIS_PORT} " in status_links()[0], status_links()

    set_hosts(ns, "127.0.0.3")
    wait_for_log(proxy, f"resolved link={LINK} host=upstream.test addresses=127.0.0.3:")
    proxy.popen.send_signal(signal.SIGUSR1)
    wait_until(lambda: len(status_links()) == 2, proxy)
    assert f"addresses=127.0.0.3:{REDIS_PORT} " in status_links()[1], status_links()


def test_a_failed_connect_looks_the_name_up_again(lab: Lab, ns: Namespace) -> None:
    """The old server is gone (a container recreated elsewhere), and the timer is off.
    While the name resolves nowhere, clients fail and the supervisor looks again after
    each failure; once it points at the new server, the very next client's child finds it
    by a lookup of its own (as socat would) and tells the supervisor at once, while its
    connection is still open, so the clients after it go straight to the new address."""
    proxy = start_proxy(lab, ns, "--resolve-every", "off")
    assert who(ns) == "first"

    set_hosts(ns, "127.0.0.3")
    assert who(ns) == "first"  # the timer is off: nothing has noticed yet
    set_hosts(ns, None)
    redis_cli(ns, REDIS_PORT, "SHUTDOWN", "NOSAVE", host="127.0.0.2", check=False)
    assert who(ns) != "first"  # refused, and the child's own lookup finds nothing
    wait_for_log(proxy, "resolve-failed")  # the supervisor looked again
    assert " connect-failed " in proxy.stderr()

    set_hosts(ns, "127.0.0.3")
    # The first client after the move holds its connection (BLPOP on an empty list waits
    # 30 s): the supervisor must learn of the move before that connection ends.
    held = lab.spawn(ns, ["redis-cli", "-p", str(LISTEN_PORT), "BLPOP", "nothing", "30"],
                     label="held")
    wait_for_log(proxy, "addresses=127.0.0.3:", timeout=20)
    assert held.alive(), held.describe()  # connected (to "second": "first" is gone)
    for _ in range(3):
        assert who(ns) == "second"
    assert "reload" not in proxy.stderr()



def test_a_dns_server_that_does_not_answer_holds_up_neither_start_nor_the_loop(
    lab: Lab, ns: Namespace
) -> None:
    """At start a name is looked up by a resolver child, as on reload and on the timer.
    The supervisor used to look it up itself before it printed `listening` and ran its
    loop: with a DNS server that does not answer, for the resolver's whole timeout (30 s
    here, per name), no `status`, no stop, no client served. Until the server answers,
    a client's child looks the name up itself, as after a reload adds a link."""
    set_hosts(ns, None)  # upstream.test only in DNS
    gate = lab.workdir / "dns-answers"
    dns = start_dns(lab, ns, gate)

    proxy = start_proxy(lab, ns, resolved=False)  # within 15 s: the server has not answered
    wait_until(lambda: f"query upstream.test {TYPE_A}" in dns.stdout(), proxy)
    check = subprocess.run([FORKPROXY, "check", "--status-socket", str(lab.workdir / "fp.sock")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check  # the loop runs while the lookup waits
    early = lab.spawn(ns, ["redis-cli", "-p", str(LISTEN_PORT), "GET", "who"], label="early")
    wait_until(lambda: dns.stdout().count(f"query upstream.test {TYPE_A}") >= 2, proxy)

    gate.touch()  # the server answers
    wait_for_log(proxy, " resolved ")
    [line] = [x for x in proxy.stderr().splitlines() if " resolved " in x]
    assert f"host=upstream.test addresses=127.0.0.2:{REDIS_PORT}" in line, line
    assert early.popen.wait(15) == 0 and early.stdout().strip() == "first", early.describe()
    assert who(ns) == "first"
    stats = link_stats(lab)  # the first addresses a name gets are not a change
    assert (stats["address_changes"], stats["resolve_failures"]) == (0, 0), stats
    assert " resolve-failed " not in proxy.stderr()


def resolver_pids(proxy: Process) -> list[int]:
    """The supervisor's live children that run its own command line: its resolvers, when
    it has no metrics process and no client (a connection's child runs it too)."""
    found = []
    for pid, state in processes_under(proxy.pid):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if state != "Z" and cmdline == Path(f"/proc/{proxy.pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def held_resolver(lab: Lab, ns: Namespace) -> tuple[Process, Process, int]:
    """(the DNS server, the proxy, its resolver child's pid), the resolver held in its
    lookup of upstream.test (the server answers nothing; --resolve-every an hour)."""
    set_hosts(ns, None)  # upstream.test only in DNS
    dns = start_dns(lab, ns, gate=lab.workdir / "never")  # holds every query
    proxy = start_proxy(lab, ns, "--resolve-every", "3600", resolved=False)
    wait_until(lambda: f"query upstream.test {TYPE_A}" in dns.stdout(), proxy)
    wait_until(lambda: len(resolver_pids(proxy)) == 1, proxy)
    [resolver] = resolver_pids(proxy)
    return dns, proxy, resolver


def test_a_resolver_child_that_dies_is_a_warning_and_the_addresses_stay(
    lab: Lab, ns: Namespace
) -> None:
    """The resolver child killed (the OOM killer, an operator's kill) before it wrote its
    results: the supervisor read EOF and an empty answer. That is a warning, `the resolver
    died`, saying the addresses in use are kept; no traceback, the supervisor serves on,
    and the next lookup starts as usual. The child is held in its lookup here (the DNS
    server answers nothing) so that it can be found and killed while it runs: the only
    non-zombie child of the supervisor without a metrics process or a client, a fork
    that runs the supervisor's command line."""
    # No timer to start the next lookup (an hour away): only the death of the one that
    # runs may start the one a reload asked for meanwhile.
    dns, proxy, resolver = held_resolver(lab, ns)
    # A reload while it runs asks for another lookup (answered once applied: causal).
    reload = subprocess.run([FORKPROXY, "reload", "--status-socket", str(lab.workdir / "fp.sock")],
                            capture_output=True, text=True, timeout=30)
    assert reload.returncode == 0, reload
    os.kill(resolver, signal.SIGKILL)
    wait_for_log(proxy, " resolve-failed ")
    [line] = [x for x in proxy.stderr().splitlines() if " resolve-failed " in x]
    assert line.endswith(' warning resolve-failed error="the resolver died" '
                         'detail="keeping the addresses in use"'), line
    assert "Traceback" not in proxy.stderr()
    # The reload asked again while it ran: another resolver starts, and asks the server.
    wait_until(lambda: dns.stdout().count(f"query upstream.test {TYPE_A}") >= 2, proxy)
    check = subprocess.run([FORKPROXY, "check", "--status-socket", str(lab.workdir / "fp.sock")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check
    assert proxy.alive()


@contextlib.contextmanager
def sockets_fail(pid: int, error: str) -> Iterator[None]:
    """Every socket() of process `pid` and of the children it forks from now on fails
    with `error`, injected by strace attached to it, for the block."""
    tracer = subprocess.Popen([need("strace"), "-f", "-qq", "-o", "/dev/null", "-p", str(pid),
                               "-e", "trace=socket", "-e", f"inject=socket:error={error}"],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        status = Path(f"/proc/{pid}/status")
        assert wait_for(lambda: f"TracerPid:\t{tracer.pid}\n" in status.read_text()), \
            tracer.stderr
        yield
    finally:
        tracer.terminate()  # strace detaches, and the process goes on untraced
        tracer.wait(30)
        if tracer.stderr is not None:
            tracer.stderr.close()


def test_a_lookup_that_fails_with_eai_system_is_a_failed_lookup(lab: Lab, ns: Namespace) -> None:
    """getaddrinfo fails with EAI_SYSTEM when a system call in it does: here the DNS
    query's socket() at the descriptor limit (EMFILE, injected by strace). CPython raises
    that as a plain OSError from errno, not socket.gaierror, which was all the resolver
    child caught: it died, the log said only "the resolver died", the failure not
    counted. A client's child's own lookup ended its connect with that OSError, as if a
    connect had failed so; its errno is not EMFILE (glibc puts the caller's back), and
    the line named some unrelated error. Both say getaddrinfo's "System error" now."""
    set_hosts(ns, None)  # upstream.test only in DNS (where nothing listens: refused)
    proxy = start_proxy(lab, ns, "-v", "--resolve-every", "1", resolved=False)
    wait_for_log(proxy, " resolve-failed ")  # an ordinary failure first: the query sent
    with sockets_fail(proxy.pid, "EMFILE"):
        wait_for_log(proxy, 'host=upstream.test error="System error"')
        assert "the resolver died" not in proxy.stderr()
        failures = link_stats(lab)["resolve_failures"]
        wait_until(lambda: link_stats(lab)["resolve_failures"] > failures, proxy)  # counted
        who(ns)  # a client: its child looks the name up itself, and fails so
        wait_for_log(proxy, " connect-failed ")
    [line] = [x for x in proxy.stderr().splitlines() if " connect-failed " in x]
    assert 'error="cannot resolve upstream.test: System error (after ' in line, line
    assert "the resolver died" not in proxy.stderr()
    assert "Traceback" not in proxy.stderr()
    assert proxy.alive()


def client_in(ns: Namespace) -> socket.socket:
    """A client of the proxy's port, from inside `ns`."""
    with in_network(ns.path):
        client = socket.socket()
    client.settimeout(15)
    client.connect(("127.0.0.1", LISTEN_PORT))
    return client


def child_pids(lab: Lab) -> list[int]:
    """The live connections' children, from `forkproxy status`."""
    return [child["pid"] for child in control(lab.workdir / "fp.sock", "status")["children"]]


def waiting_in_own_lookup(pid: int) -> bool:
    """Whether child `pid` waits in its own lookup: a second thread (the lookup's) and the
    main one asleep in a poll (`wchan`), as during a connect."""
    try:
        threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return threads >= 2 and "poll" in wchan


@pytest.mark.parametrize("first", ["unresolved", "refused"])
def test_a_childs_own_lookup_that_gets_no_answer_is_given_up_after_the_connect_timeout(
    lab: Lab, ns: Namespace, first: str
) -> None:
    """A connection's child looks the name up itself when the supervisor has no address
    for it yet ("unresolved": the name did not resolve at start) or when a connect to the
    addresses it has failed ("refused": the server is gone, the name with it). That
    lookup had no bound but glibc's (30 s here, with each --connect-retries attempt
    again; for ever for a DNS server that takes a query over TCP and never answers), and
    the client waited all that time, where --connect-timeout promised it a bound. Now
    each attempt waits for it up to --connect-timeout, as for a connect, and the
    connect-failed line says that the lookup timed out (after the connect's own error,
    when there was one), where it said only "Connection refused"."""
    options = ["--connect-timeout", "1", "--connect-retries", "1", "--resolve-every", "off"]
    if first == "unresolved":
        set_hosts(ns, None)  # upstream.test only in DNS, which answers nothing
        start_dns(lab, ns, gate=lab.workdir / "never")
        proxy = start_proxy(lab, ns, *options, resolved=False)
    else:
        start_dns(lab, ns, gate=lab.workdir / "never")
        proxy = start_proxy(lab, ns, *options)  # from the hosts file
        assert who(ns) == "first"
        set_hosts(ns, None)  # gone from the hosts file, and DNS answers nothing
        redis_cli(ns, REDIS_PORT, "SHUTDOWN", "NOSAVE", host="127.0.0.2", check=False)
    with client_in(ns) as client:
        # A hang, not a speed: the lookup alone holds for 30 s a time, and the child gives
        # up after its two attempts of 1 s each (and a backoff of 0.2 s).
        try:
            assert client.recv(1) == b""  # EOF: the child closed it
        except TimeoutError:
            pytest.fail(f"the client still waits\n{proxy.describe()}")
    wait_for_log(proxy, " connect-failed ")
    [line] = [x for x in proxy.stderr().splitlines() if " connect-failed " in x]
    then = "Connection refused, then " if first == "refused" else ""
    assert f'error="{then}cannot resolve upstream.test: lookup timed out after ' in line, line


def test_a_client_that_resets_during_its_childs_own_lookup_frees_the_child_and_its_slot(
    lab: Lab, ns: Namespace
) -> None:
    """As during a connect or a backoff (test_probes): a client that gives up while its
    child waits for the DNS server ends that child at once, counted as `client-reset`, no
    line, and its --max-children slot serves the next client. The child waited out the
    lookup (30 s here) before it noticed, the slot held all that time."""
    set_hosts(ns, None)  # upstream.test only in DNS, which answers nothing
    dns = start_dns(lab, ns, gate=lab.workdir / "never")
    # --grace 1: the last client's child is still in its lookup (its client closed with
    # a FIN, which it waits out) when the lab stops the proxy; the default 8 s outlasted
    # the lab's 5 s stop, a kill after 5 s of every run's teardown.
    proxy = start_proxy(lab, ns, "--max-children", "1", "--connect-timeout", "600",
                        "--resolve-every", "off", "--grace", "1", resolved=False)
    leaving = client_in(ns)
    wait_until(lambda: len(child_pids(lab)) == 1, proxy)
    [pid] = child_pids(lab)
    # Its query asked (the resolver's was the first), and the child waiting in its
    # lookup: the lookup's thread started, the main one in its poll, which watches the
    # client (a fixed 1.5 s could end, under load, before it got there).
    wait_until(lambda: dns.stdout().count(f"query upstream.test {TYPE_A}") >= 2, proxy)
    wait_until(lambda: waiting_in_own_lookup(pid), proxy)
    assert child_pids(lab) == [pid]  # still looking up for it
    leaving.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    leaving.close()
    wait_until(lambda: not child_pids(lab), proxy)  # well before the lookup's 30 s
    stats: dict[str, object] = dict(link_stats(lab))
    assert stats["outcomes"] == {"client-reset": 1}, stats
    assert stats["upstream_failures"] == 0, stats
    # Its only slot (--max-children 1) is free: the next client gets a child at once.
    with client_in(ns):
        wait_until(lambda: len(child_pids(lab)) == 1 and child_pids(lab) != [pid], proxy)
    assert " connect-failed " not in proxy.stderr() and " close " not in proxy.stderr()


def test_a_stop_does_not_wait_for_ever_on_a_frozen_resolver(lab: Lab, ns: Namespace) -> None:
    """As for the metrics process (test_limits): a stop kills the resolver child and
    waited for it in waitpid(), and a frozen one dies only once thawed. Held in its lookup
    (the DNS server answers nothing), then frozen: the stop ends, and says which it left."""
    _, proxy, resolver = held_resolver(lab, ns)
    with frozen(resolver):
        proxy.popen.send_signal(signal.SIGTERM)
        assert proxy.popen.wait(30) == 0, proxy.describe()
    [line] = [x for x in proxy.stderr().splitlines() if " not-reaped " in x]
    assert f"child_pid={resolver} " in line, line


def test_round_robin_dns_reordering_the_same_addresses_is_no_change(
    lab: Lab, ns: Namespace
) -> None:
    """A name with several addresses whose DNS server rotates them at each answer (as
    Docker's embedded DNS does for a scaled service): every lookup gave the same set in
    another order, and was logged as `resolved` and counted as an address change."""
    set_hosts(ns, None)
    gate = lab.workdir / "dns-answers"
    gate.touch()  # answering from the start
    dns = start_dns(lab, ns, gate, addresses="127.0.0.2,127.0.0.3")
    proxy = start_proxy(lab, ns, "--resolve-every", "1")
    wait_until(lambda: dns.stdout().count(f"query upstream.test {TYPE_A}") >= 5, proxy)
    assert who(ns) in ("first", "second")
    resolved = [x for x in proxy.stderr().splitlines() if " resolved " in x]
    assert len(resolved) == 1, resolved  # the start's
    assert link_stats(lab)["address_changes"] == 0

def start_dns(lab: Lab, ns: Namespace, gate: Path, addresses: str = "127.0.0.2",
              name: str = "upstream.test", hang: Path | None = None) -> Process:
    """The namespace's DNS server (tests/dns_stub.py, on 127.0.0.53), where `name` is
    `addresses` (several, comma-separated: rotated at each answer): it holds every
    query, unanswered, until `gate` exists. A lookup waits for it up to the resolver's
    timeout: 30 s, the most glibc takes. While `hang` exists, a lookup of `name` hangs
    for good (an answer truncated over UDP, and none over TCP)."""
    resolv = Path("/etc/netns") / ns.name / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\noptions timeout:30 attempts:1\n")
    dns = lab.spawn(ns, [sys.executable, str(Path(__file__).with_name("dns_stub.py")),
                         "127.0.0.53", name, addresses, str(gate),
                         *([] if hang is None else [str(hang)])], label="dns")
    dns.wait_stdout(lambda lines: "ready" in lines, 10)
    return dns


def spawn_env_file_proxy(lab: Lab, ns: Namespace, host: str) -> Process:
    """The proxy reading DB's link to `host` from an env file (lab.workdir/links.env),
    the timer off: only a reload (or a failed connect) looks the name up again."""
    env_file = lab.workdir / "links.env"
    env_file.write_text(f"{DB}=tcp://{host}:{REDIS_PORT}\n")
    proxy = lab.spawn(ns, [FORKPROXY, "serve", "--env-file", str(env_file), "--resolve-every",
                           "off", "--status-socket", str(lab.workdir / "fp.sock")],
                      label="proxy")
    proxy.wait_stdout(lambda lines: any(x.startswith("listening ") for x in lines), 15)
    return proxy


def start_env_file_proxy(lab: Lab, ns: Namespace) -> Process:
    """spawn_env_file_proxy to upstream.test, answered by "first" to begin with."""
    proxy = spawn_env_file_proxy(lab, ns, "upstream.test")
    wait_for_log(proxy, " resolved ")
    assert who(ns) == "first"
    return proxy


def test_reload_re_resolves_names_and_only_reload_does(lab: Lab, ns: Namespace) -> None:
    proxy = start_env_file_proxy(lab, ns)

    set_hosts(ns, "127.0.0.3")  # the name moves; nobody has told the proxy yet
    for _ in range(5):
        assert who(ns) == "first"  # the supervisor's resolution holds, not each child's

    proxy.popen.send_signal(signal.SIGHUP)
    wait_for_who(ns, "second", proxy)
    assert proxy.alive()
    assert "reload-failed" not in proxy.stderr()


def test_a_reload_that_points_a_port_at_another_name_never_uses_the_old_ones_addresses(
    lab: Lab, ns: Namespace
) -> None:
    """The port stays, its target changes to a name not (yet) resolvable: the reload
    kept the old target's addresses for the port, so clients went on reaching the old
    service, logged as the new one, for as long as the new name did not resolve. A
    name's addresses are kept only while the name is the same."""
    proxy = start_env_file_proxy(lab, ns)
    env_file = lab.workdir / "links.env"
    env_file.write_text(f"DB_PORT_{LISTEN_PORT}_TCP=tcp://moved.test:{REDIS_PORT}\n")
    proxy.popen.send_signal(signal.SIGHUP)
    # The reload's (the first is the start's).
    wait_until(lambda: proxy.stderr().count(" listening ") == 2, proxy)
    wait_for_log(proxy, "resolve-failed")  # moved.test resolves nowhere yet
    assert who(ns) != "first"  # not the old target
    wait_for_log(proxy, f"connect-failed link=DB_PORT_{LISTEN_PORT}_TCP")
    assert "moved.test" in proxy.stderr().split(" connect-failed ")[1].splitlines()[0]

    set_hosts(ns, "127.0.0.2", moved="127.0.0.3")  # now it does
    wait_for_who(ns, "second", proxy)
    wait_for_log(proxy, "host=moved.test addresses=127.0.0.3:")
    assert proxy.alive()
    # moved.test's first addresses, after its failed first lookup, are not a change of
    # addresses; nor is upstream.test's first, at start.
    stats = link_stats(lab)
    assert stats["address_changes"] == 0 and stats["resolve_failures"] >= 1, stats


def test_a_reload_that_points_a_failing_link_at_another_failing_name_warns_again(
    lab: Lab, ns: Namespace
) -> None:
    """A mistyped name fixed by a reload with another typo: the outage was remembered per
    link, so the new name's failure was logged at debug only, out of sight."""
    proxy = spawn_env_file_proxy(lab, ns, "nosuch-one.test")
    wait_for_log(proxy, f"warning resolve-failed link={DB} host=nosuch-one.test")
    (lab.workdir / "links.env").write_text(f"{DB}=tcp://nosuch-two.test:{REDIS_PORT}\n")
    proxy.popen.send_signal(signal.SIGHUP)
    wait_for_log(proxy, f"warning resolve-failed link={DB} host=nosuch-two.test")
    assert proxy.alive()

def test_a_reload_while_the_name_is_gone_keeps_the_addresses(lab: Lab, ns: Namespace) -> None:
    """As between reloads: a DNS outage at the moment of a reload used to leave the link
    with no address at all, and every client failed while the upstream was up."""
    proxy = start_env_file_proxy(lab, ns)
    set_hosts(ns, None)
    proxy.popen.send_signal(signal.SIGHUP)
    wait_for_log(proxy, "resolve-failed")  # the reload looked, and found nothing
    for _ in range(5):
        assert who(ns) == "first"
    assert "connect-failed" not in proxy.stderr()


def test_a_take_over_while_the_name_is_gone_keeps_the_addresses(
    lab: Lab, ns: Namespace
) -> None:
    """As a reload does: `serve --take-over` during a DNS outage started with no address
    for the name, and once the old supervisor stopped accepting, every client failed
    (`cannot resolve`) while the upstream was up, where the old one served and a reload
    would have kept its addresses. The taker now starts from the addresses the old one
    had for each link whose target is the same."""
    old = start_proxy(lab, ns)
    assert who(ns) == "first"
    set_hosts(ns, None)
    taker = lab.spawn(ns, [FORKPROXY, "serve", "--take-over", f"{LISTEN_PORT}=upstream.test:"
                           f"{REDIS_PORT}", "--status-socket", str(lab.workdir / "fp.sock")],
                      label="taker")
    taker.wait_stdout(lambda lines: any(x.startswith("listening ") for x in lines), 15)
    wait_until(lambda: not old.alive(), taker, 30)  # drained: the taker alone accepts
    for _ in range(5):
        assert who(ns) == "first", taker.describe()
    assert "connect-failed" not in taker.stderr(), taker.describe()


def test_a_reload_waiting_on_dns_keeps_every_listener_serving(lab: Lab, ns: Namespace) -> None:
    """A reload looked names up in the supervisor: while the DNS server took its time,
    nothing was accepted on any listener. It leaves the lookup to a resolver child now."""
    start_dns(lab, ns, gate=lab.workdir / "never")  # takes every query, never answers
    env_file = lab.workdir / "links.env"
    env_file.write_text(f"DB_PORT_{LISTEN_PORT}_TCP=tcp://upstream.test:{REDIS_PORT}\n"
                        f"IP_PORT_{LISTEN_PORT + 1}_TCP=tcp://127.0.0.3:{REDIS_PORT}\n")
    proxy = lab.spawn(ns, [FORKPROXY, "serve", "--env-file", str(env_file), "--resolve-every",
                           "off", "--status-socket", str(lab.workdir / "fp.sock")],
                      label="proxy")
    proxy.wait_stdout(lambda lines: sum(x.startswith("listening ") for x in lines) == 2, 15)
    wait_for_log(proxy, " resolved ")  # at start, from the hosts file
    set_hosts(ns, None)  # from now on a lookup of upstream.test asks the silent server
    proxy.popen.send_signal(signal.SIGHUP)
    # The reload is done (its line comes last).
    wait_until(lambda: " reloaded " in proxy.stderr(), proxy)
    # The lookup is still waiting; both listeners serve, the name with its old address.
    assert redis_cli(ns, LISTEN_PORT + 1, "GET", "who") == "second"
    assert who(ns) == "first"
    assert proxy.alive()


def test_a_link_configured_again_warns_of_its_failed_lookup_again(
    lab: Lab, ns: Namespace
) -> None:
    """A link a reload removed while its name did not resolve, configured again by a later
    reload with the name still failing: that failure is a warning again. (The outage was
    remembered past the link, and the new one logged at debug, out of sight.)"""
    proxy = start_env_file_proxy(lab, ns)
    env_file = lab.workdir / "links.env"
    db = f"DB_PORT_{LISTEN_PORT}_TCP=tcp://upstream.test:{REDIS_PORT}\n"
    other = f"CACHE_PORT_{LISTEN_PORT + 1}_TCP=tcp://127.0.0.2:{REDIS_PORT}\n"

    def warnings() -> int:
        return proxy.stderr().count(" warning resolve-failed ")

    set_hosts(ns, None)
    env_file.write_text(db + other)
    proxy.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: warnings() == 1, proxy)
    env_file.write_text(other)  # the link goes, its name still failing
    proxy.popen.send_signal(signal.SIGHUP)
    wait_for_log(proxy, f"unlisten detail=\"0.0.0.0:{LISTEN_PORT} ")
    env_file.write_text(db + other)  # and comes back
    proxy.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: warnings() == 2, proxy)
    assert proxy.alive()


def test_connections_take_turns_at_a_names_addresses(lab: Lab, ns: Namespace) -> None:
    """A name with several addresses (a scaled service behind round-robin DNS): each new
    connection starts at the next one, so the load spreads over them as it does behind
    socat, whose every child looks the name up and takes the DNS server's first answer.
    Before, every connection went to the first address until the next lookup."""
    set_hosts(ns, None)
    gate = lab.workdir / "dns-answers"
    gate.touch()
    start_dns(lab, ns, gate, addresses="127.0.0.2,127.0.0.3")
    start_proxy(lab, ns, "--resolve-every", "off")
    socat_port = LISTEN_PORT + 1
    socat = lab.spawn(ns, ["socat", f"TCP4-LISTEN:{socat_port},bind=127.0.0.1,fork,reuseaddr",
                           f"TCP4:upstream.test:{REDIS_PORT}"], label="socat")
    wait_until(lambda: redis_cli(ns, socat_port, "PING", check=False) == "PONG", socat)
    for port in (LISTEN_PORT, socat_port):
        answers = [redis_cli(ns, port, "GET", "who", check=False) for _ in range(10)]
        # One after the other: strictly in turn.
        assert answers in (["first", "second"] * 5, ["second", "first"] * 5), (port, answers)


@pytest.mark.parametrize("order", [("127.0.0.2", "127.0.0.3"), ("127.0.0.3", "127.0.0.2")])
def test_the_first_connection_goes_to_the_first_address(
    lab: Lab, ns: Namespace, order: tuple[str, str]
) -> None:
    """A fresh proxy's first connection to a name with several addresses goes where a
    plain client would go: to the first address getaddrinfo gives (a primary listed
    first). It went to the second: the turns were counted from 1 (found by a bug hunt)."""
    hosts = Path("/etc/netns") / ns.name / "hosts"
    with hosts.open("w") as handle:
        handle.write("127.0.0.1 localhost\n")
        handle.writelines(f"{address} upstream.test\n" for address in order)
    lookup = ("import socket; print(socket.getaddrinfo('upstream.test', 6379, socket.AF_INET,"
              " socket.SOCK_STREAM)[0][4][0])")
    first = ns.run([sys.executable, "-I", "-c", lookup]).strip()
    assert first in order, first
    start_proxy(lab, ns, "--resolve-every", "off")
    assert who(ns) == {"127.0.0.2": "first", "127.0.0.3": "second"}[first]


def name_with_a_dead_first_address(ns: Namespace) -> Path:
    """upstream.test in `ns`'s hosts file: 127.0.0.4 (nothing listens), then 127.0.0.2,
    in a stable order (every other connection's turn starts at the dead one)."""
    hosts = Path("/etc/netns") / ns.name / "hosts"
    with hosts.open("w") as handle:
        handle.write("127.0.0.1 localhost\n127.0.0.4 upstream.test\n127.0.0.2 upstream.test\n")
    return hosts


def fallback_lines(proxy: Process) -> list[str]:
    """The proxy's connect-fallback lines."""
    return [x for x in proxy.stderr().splitlines() if " connect-fallback " in x]


def test_a_connection_that_gets_through_only_after_an_address_failed_says_so_folded(
    lab: Lab, ns: Namespace
) -> None:
    """A name whose first address is dead (here: nothing listens on 127.0.0.4) still
    serves every client through the next one, but each whose turn starts there waits
    for that address first: up to --connect-timeout for one that drops packets. Nothing
    said so (found by a bug hunt: a steady 1 s delay on every connection, with clean
    `close` lines). A `connect-fallback` warning names both addresses now, the failed
    one's error in a field of its own. It was a line per such connection (every other
    one here): folded per link now, the first at once, even while that connection lives
    on; none for the next within 10 s; the next after them with their exact count."""
    from forkproxy.log import ERROR_LOG_EVERY

    # Both addresses from the hosts file, in a stable order: every other connection's
    # turn starts at the dead one (relay.in_turn).
    hosts = name_with_a_dead_first_address(ns)
    proxy = start_proxy(lab, ns, "--resolve-every", "off")

    def lines() -> list[str]:
        return fallback_lines(proxy)

    # Two connections that stay open (BLPOP waits 60 s): one of them fell back.
    held = [lab.spawn(ns, ["redis-cli", "-p", str(LISTEN_PORT), "BLPOP", "nothing", "60"],
                      label=f"held{i}") for i in range(2)]
    wait_until(lambda: len(lines()) == 1, proxy)
    first_seen = time.monotonic()
    assert all(h.alive() for h in held), [h.describe() for h in held]  # before any close
    [line] = lines()
    assert " warning connect-fallback " in line, line
    assert f" upstream=upstream.test:{REDIS_PORT} " in line, line
    assert f" connected=127.0.0.2:{REDIS_PORT} " in line, line
    assert line.endswith(f' failed=127.0.0.4:{REDIS_PORT} failed_error="Connection refused"'
                         " failures=1"), line
    wait_until(lambda: proxy.stderr().count(" open ") == 2, proxy)  # both turns taken
    assert [who(ns) for _ in range(6)] == ["first"] * 6  # 3 of them fell back
    assert time.monotonic() - first_seen < ERROR_LOG_EVERY  # (else the test proves nothing)
    wait_until(lambda: proxy.stderr().count(" close ") == 6, proxy)  # all counted by now
    # No line ends a burst: none until a fallback after the window, however late.
    time.sleep(max(0.0, first_seen + ERROR_LOG_EVERY + 0.5 - time.monotonic()))
    assert len(lines()) == 1, proxy.describe()
    # The held connection that fell back was counted while it lived (its SIGALRM): its
    # end, now that a line is due, is no second fallback and writes no line.
    for h in held:
        h.popen.kill()
        h.popen.wait(10)
    try:
        wait_until(lambda: link_stats(lab)["active"] == 0, proxy)  # both reaped
    except AssertionError as error:
        # Seen once in CI (session 28): neither held connection's child ended within 15 s
        # of its client's kill, with no line. Where each waits, and the sockets, say why.
        states = {}
        for pid, state in processes_under(proxy.pid):
            with contextlib.suppress(OSError):
                states[pid] = (state, Path(f"/proc/{pid}/wchan").read_text())
        pytest.fail(f"{error}\nprocesses (pid: state, wchan): {states}\nsockets:\n"
                    f"{ns.run(['ss', '-tnpia'], check=False)}\nhosts file: "
                    f"{hosts.read_text()!r}")
    assert len(lines()) == 1, proxy.describe()
    assert [who(ns) for _ in range(2)] == ["first"] * 2  # 1 fell back
    wait_until(lambda: len(lines()) == 2, proxy)
    assert lines()[1].endswith(f' failed=127.0.0.4:{REDIS_PORT} failed_error="Connection '
                               'refused" failures=4'), proxy.describe()  # 3 folded + this one


def test_fallbacks_a_window_folded_are_said_when_the_exit_ends_it(
    lab: Lab, ns: Namespace
) -> None:
    """The fallbacks a connect-fallback window folded were said only by a fallback after
    its 10 s: a stop (or a reload pointing the link elsewhere) ended the window with its
    count unsaid, and the log showed fewer fallbacks than happened, for good (found by
    reconciling the log with what the clients saw). Said now, in one last line naming
    the last of them, before `exited`."""
    name_with_a_dead_first_address(ns)
    proxy = start_proxy(lab, ns, "--resolve-every", "off")

    def lines() -> list[str]:
        return fallback_lines(proxy)

    assert [who(ns) for _ in range(6)] == ["first"] * 6  # 3 fell back: a line, 2 folded
    wait_until(lambda: proxy.stderr().count(" close ") == 6, proxy)  # all reaped
    assert len(lines()) == 1, proxy.describe()
    proxy.popen.send_signal(signal.SIGTERM)
    assert proxy.popen.wait(15) == 0, proxy.describe()
    assert len(lines()) == 2, proxy.describe()
    assert lines()[1].endswith(f' failed=127.0.0.4:{REDIS_PORT} failed_error="Connection '
                               'refused" failures=2'), proxy.describe()
    assert f" connected=127.0.0.2:{REDIS_PORT} " in lines()[1], lines()[1]
    assert " exited " in proxy.stderr().splitlines()[-1], proxy.describe()


def test_a_fallback_past_a_blackhole_route_names_the_route(lab: Lab, ns: Namespace) -> None:
    """An address of a name that a blackhole route on this host covers (a network plugin's
    for an address no container holds now) fails connect() at once with EINVAL: the
    `connect-fallback` line said only `Invalid argument`, which sends operators after a
    bug. It names the route now, as `connect-failed` does (found by a network churn
    hunt)."""
    ns.run(["ip", "route", "add", "blackhole", "198.18.7.0/24"])
    hosts = Path("/etc/netns") / ns.name / "hosts"
    with hosts.open("w") as handle:
        handle.write("127.0.0.1 localhost\n198.18.7.2 upstream.test\n127.0.0.2 upstream.test\n")
    proxy = start_proxy(lab, ns, "--resolve-every", "off")

    def lines() -> list[str]:
        return fallback_lines(proxy)

    assert [who(ns) for _ in range(2)] == ["first"] * 2  # 1 fell back: its line at once
    wait_until(lambda: len(lines()) == 1, proxy)
    [line] = lines()
    assert f' failed=198.18.7.2:{REDIS_PORT} failed_error="Invalid argument" ' in line, line
    assert ' detail="no route: a blackhole route on this host covers' in line, line


def test_a_reload_that_closes_a_port_never_blocks_the_loop_on_the_next_lookup(
    lab: Lab, ns: Namespace
) -> None:
    """A reload removed port B while a client waited in B's backlog, then started a
    lookup: the resolver's pipe took B's old descriptor number, and B's event, still in
    that turn of the loop, ran the resolver's reader, whose blocking read waited for the
    whole lookup (found by a code review). Nothing was accepted on any port meanwhile.
    Here the lookup never ends (the DNS server holds every query), and port C, kept,
    must still answer at once."""
    set_hosts(ns, None)
    gate = lab.workdir / "dns-answers"
    gate.touch()
    start_dns(lab, ns, gate)
    ports = {"A": LISTEN_PORT, "B": LISTEN_PORT + 1, "C": LISTEN_PORT + 2}
    env_file = lab.workdir / "links.env"
    links = {"A": "upstream.test", "B": "127.0.0.2", "C": "127.0.0.3"}

    def write(names: str) -> None:
        env_file.write_text("".join(f"{n}_PORT_{ports[n]}_TCP=tcp://{links[n]}:{REDIS_PORT}\n"
                                    for n in names))

    write("ABC")
    proxy = lab.spawn(ns, [FORKPROXY, "serve", "--env-file", str(env_file), "--bind",
                           "127.0.0.1", "--resolve-every", "off", "--status-socket",
                           str(lab.workdir / "fp.sock")], label="proxy")
    proxy.wait_stdout(lambda lines: sum(x.startswith("listening ") for x in lines) == 3, 15)
    wait_for_log(proxy, " resolved ")  # the first lookup is over: the next gets a pipe
    gate.unlink()  # from now on every lookup hangs
    proxy.popen.send_signal(signal.SIGSTOP)
    try:
        waiting = subprocess.Popen(  # in B's backlog: B's event comes with the SIGHUP's
            ns.exec_argv(["redis-cli", "-p", str(ports["B"]), "GET", "who"]),
            stdout=subprocess.PIPE, text=True)
        # In the backlog (the listener's Recv-Q) before the SIGHUP, not merely started.
        wait_until(lambda: ns.run(["ss", "-Hltn", f"sport = :{ports['B']}"]).split()[1:2]
                   == ["1"], proxy)
        write("AC")
        proxy.popen.send_signal(signal.SIGHUP)
    finally:
        proxy.popen.send_signal(signal.SIGCONT)
    # A hang, not a speed: the lookup holds for 30 s, redis-cli's wait (netns.redis_cli)
    # is 10 s, and an answer takes milliseconds.
    assert redis_cli(ns, ports["C"], "GET", "who", check=False) == "second", proxy.describe()
    out, _ = waiting.communicate(timeout=30)
    assert out.strip() == "first"  # B's client, served by B's wiring before B closed


def test_a_lookup_that_hangs_is_killed_at_its_deadline_and_holds_up_no_other_name(
    lab: Lab, ns: Namespace
) -> None:
    """A DNS server that sets TC over UDP and never answers over TCP: glibc's getaddrinfo
    waits for ever (found by a DNS hunt). The resolver child, looking the names up one
    after the other and writing them all at the end, hung with it: no name was resolved
    again, not on the timer, not on reload (which said ok), and nothing was logged. Now
    the supervisor kills it once a name has taken RESOLVE_TIMEOUT, logs that name's
    `resolve-failed` (its addresses kept), and looks it up last from then on: the other
    name's move is applied by the next resolver, which a reload asked for during the
    hang (the timer is off: only the reload can)."""
    from forkproxy.supervisor import RESOLVE_TIMEOUT

    gate, hang = lab.workdir / "dns-answers", lab.workdir / "hang"
    gate.touch()
    dns = start_dns(lab, ns, gate, name="hung.test", hang=hang)  # upstream.test: hosts file
    sock = str(lab.workdir / "fp.sock")
    hung_port, moved_port = LISTEN_PORT, LISTEN_PORT + 1
    proxy = lab.spawn(ns, [FORKPROXY, "serve", f"{hung_port}=hung.test:{REDIS_PORT}",
                           f"{moved_port}=upstream.test:{REDIS_PORT}", "--resolve-every", "off",
                           "--status-socket", sock], label="proxy")
    proxy.wait_stdout(lambda lines: sum(x.startswith("listening ") for x in lines) == 2, 15)
    wait_until(lambda: proxy.stderr().count(" resolved ") == 2, proxy)

    def control(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FORKPROXY, command, "--status-socket", sock],
                              capture_output=True, text=True, timeout=30)

    hang.touch()
    assert control("reload").returncode == 0  # a resolver, held in hung.test's lookup:
    wait_until(lambda: "tcp" in dns.stdout().splitlines(), proxy)  # configured first
    set_hosts(ns, "127.0.0.3")  # upstream.test moves; its lookup comes after the hang
    reload = control("reload")  # answers, and asks for another resolver
    assert reload.returncode == 0, reload
    status = control("status")
    assert status.returncode == 0, status
    assert redis_cli(ns, moved_port, "GET", "who") == "first"  # not applied yet

    # A bound, not a speed: the kill comes RESOLVE_TIMEOUT after the lookup began.
    wait_for_log(proxy, " resolve-failed ", timeout=RESOLVE_TIMEOUT + 30)
    [line] = [x for x in proxy.stderr().splitlines() if " resolve-failed " in x]
    assert " warning resolve-failed " in line, line
    assert (f' host=hung.test error="timed out after {RESOLVE_TIMEOUT:g}s (the resolver was'
            ' killed)" detail="keeping the addresses in use"') in line, line
    # The reload's resolver looks upstream.test up first, hung.test (hanging again) last.
    wait_until(lambda: redis_cli(ns, moved_port, "GET", "who", check=False) == "second",
               proxy, timeout=30)
    [moved] = [x for x in proxy.stderr().splitlines()
               if " resolved " in x and " host=upstream.test " in x][1:]
    assert moved.endswith(f" addresses=127.0.0.3:{REDIS_PORT}"), moved
    assert redis_cli(ns, hung_port, "GET", "who") == "first"  # its addresses kept
    assert control("check").returncode == 0
    assert "the resolver died" not in proxy.stderr()
    assert "Traceback" not in proxy.stderr()
    assert proxy.alive()
