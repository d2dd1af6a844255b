"""IPv6 as a user meets it: on a host without IPv6 sockets, and in a network namespace of
the test's own for link-local addresses with zones (`fe80::1%v0`), which only exist on a
real interface.

The namespace has a veth pair, v0 and v1, both ends inside it; v0 holds fe80::1 and
2001:2::1 (the IPv6 benchmarking range), and a redis answers on the namespace's loopback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkproxy import relay
from forkproxy.config import Endpoint

import netns
import no_ipv6
from conftest import in_network, netns_lab
from netns import Lab, Namespace, Process

NO_IPV6 = str(Path(__file__).with_name("no_ipv6.py"))
FORKPROXY = str(Path(sys.executable).parent / "forkproxy")
REDIS_PORT = 16391


@pytest.fixture
def no_ipv6_filter() -> str:
    """tests/no_ipv6.py, whose seccomp filter refuses IPv6 sockets; on a machine it does
    not know, the test fails (never a skip)."""
    if not no_ipv6.supported():
        pytest.fail("tests/no_ipv6.py knows the seccomp ABI of x86_64 and aarch64 only")
    return NO_IPV6


@pytest.fixture
def lab() -> Iterator[Lab]:
    with netns_lab("fpv6-") as lab:
        yield lab


@pytest.fixture
def ns(lab: Lab) -> Namespace:
    namespace = lab.namespace("v6")
    namespace.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    namespace.ip("link", "set", "v0", "up")
    namespace.ip("link", "set", "v1", "up")
    namespace.ip("addr", "add", "fe80::1/64", "dev", "v0", "nodad")
    namespace.ip("addr", "add", "2001:2::1/64", "dev", "v0", "nodad")
    lab.redis(namespace, REDIS_PORT, {"who": "redis"})
    return namespace


def ping(ns: Namespace, host: str, port: int) -> str:
    """PING over a plain socket from inside the namespace (redis-cli takes no zone)."""
    code = (
        "import socket\n"
        f"with socket.create_connection(({host!r}, {port}), timeout=5) as s:\n"
        "    s.sendall(b'PING\\r\\n')\n"
        "    print(s.recv(100).decode().strip())\n"
    )
    return ns.run([sys.executable, "-c", code], timeout=20, check=False).strip()


@pytest.mark.netns
def test_listens_on_a_link_local_address_with_a_zone(lab: Lab, ns: Namespace) -> None:
    """`[fe80::1%v0]:P` used to fail with "Invalid argument": bind() was given the
    address without its scope id, which a link-local address needs."""
    sock = lab.workdir / "status.sock"
    proc = lab.spawn(ns, [FORKPROXY, "serve", f"[fe80::1%v0]:0=127.0.0.1:{REDIS_PORT}",
                          "--metrics", "[fe80::1%v0]:0", "--status-socket", str(sock)],
                     label="forkproxy")
    lines = proc.wait_stdout(lambda lines: len(lines) >= 2, 15)
    assert lines[0].startswith("listening [fe80::1%v0]:"), lines
    port = int(lines[0].split(" -> ")[0].rsplit(":", 1)[1])
    assert ping(ns, "fe80::1%v0", port) == "+PONG"
    # The client is link-local too: its zone (the interface's index) is in its log lines,
    # or the same address on two interfaces could not be told apart.
    index = ns.run(["cat", "/sys/class/net/v0/ifindex"]).strip()
    deadline = time.monotonic() + 15
    while " close " not in proc.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)  # the child writes it once the client has gone
    for event in ("open", "close"):
        assert any(f" {event} " in line and f" client=[fe80::1%{index}]:" in line
                   for line in proc.stderr().splitlines()), proc.describe()
    # The zone stays in the URL (it used to be dropped: http://[fe80::1]:P reaches nothing).
    assert lines[1].startswith("metrics http://[fe80::1%25v0]:"), lines
    metrics_port = int(lines[1].rsplit(":", 1)[1].split("/")[0])
    code = ("import socket\n"
            f"socket.create_connection(('fe80::1%v0', {metrics_port}), timeout=5).close()\n"
            "print('connected')\n")
    assert ns.run([sys.executable, "-c", code], timeout=20).strip() == "connected"


def serve_resolved(lab: Lab, namespace: Namespace, argv: list[str],
                   addresses: str) -> tuple[Process, int]:
    """A forkproxy started in `namespace` with one link to a name, once its start's lookup
    (by a resolver child) has logged `addresses`: the process and its listener's port."""
    proc = lab.spawn(namespace, argv, label="forkproxy")
    [line] = proc.wait_stdout(lambda lines: len(lines) >= 1, 15)
    port = int(line.split(" -> ")[0].rsplit(":", 1)[1])
    deadline = time.monotonic() + 15
    while f'addresses="{addresses}"' not in proc.stderr():
        assert time.monotonic() < deadline, proc.describe()
        time.sleep(0.05)
    return proc, port


@pytest.mark.netns
@pytest.mark.parametrize("zone", ["nosuch0", "99999"])
def test_a_zone_naming_no_interface_is_one_line_and_exit_2(
    lab: Lab, ns: Namespace, zone: str
) -> None:
    result = subprocess.run(
        ns.exec_argv([FORKPROXY, "serve", f"[fe80::1%{zone}]:0=127.0.0.1:{REDIS_PORT}",
                      "--status-socket", str(lab.workdir / "status.sock")]),
        capture_output=True, text=True, timeout=20, check=False,
    )
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr == (f"forkproxy: error: cannot listen on [fe80::1%{zone}]:0: no "
                             f"interface {zone!r} on this host (for [fe80::1%{zone}]:0="
                             f"127.0.0.1:{REDIS_PORT})\n")


@pytest.mark.netns
def test_a_target_with_a_zone_is_reached_through_its_interface(lab: Lab, ns: Namespace) -> None:
    """`0=[fe80::1%v0]:P`: an ambassador in front of another on a link-local address."""
    sock = lab.workdir / "status.sock"
    inner = lab.spawn(ns, [FORKPROXY, "serve", f"[fe80::1%v0]:0=127.0.0.1:{REDIS_PORT}",
                           "--status-socket", str(sock)], label="forkproxy-inner")
    [line] = inner.wait_stdout(lambda lines: len(lines) >= 1, 15)
    inner_port = int(line.split(" -> ")[0].rsplit(":", 1)[1])
    outer = lab.spawn(ns, [FORKPROXY, "serve", f"127.0.0.1:0=[fe80::1%v0]:{inner_port}",
                           "--status-socket", str(lab.workdir / "outer.sock")],
                      label="forkproxy-outer")
    [line] = outer.wait_stdout(lambda lines: len(lines) >= 1, 15)
    port = int(line.split(" -> ")[0].rsplit(":", 1)[1])
    assert ping(ns, "127.0.0.1", port) == "+PONG", outer.describe()


@pytest.mark.parametrize("command", ["serve", "links"])
@pytest.mark.parametrize("zone", ["nosuch0", "99999"])
@pytest.mark.parametrize(
    ("spec", "refused"),
    [
        ("127.0.0.1:0=[fe80::1%{zone}]:6379", "cannot connect to [fe80::1%{zone}]:6379"),
        ("[fe80::1%{zone}]:7000=127.0.0.1:1", "cannot listen on [fe80::1%{zone}]:7000"),
    ],
    ids=["target", "listen"],
)
def test_a_target_or_listen_zone_naming_no_interface_is_one_line_from_serve_and_links(
    tmp_path: Path, command: str, zone: str, spec: str, refused: str
) -> None:
    """A target's used to start, log `resolve-failed` for an address, and fail every
    connection with "cannot resolve fe80::1%nosuch0". A listener's was refused by
    `serve` at bind, and printed as fine by `links`, the dry run."""
    spec, refused = spec.format(zone=zone), refused.format(zone=zone)
    result = subprocess.run(
        [FORKPROXY, command, spec, *(["--status-socket", str(tmp_path / "s.sock")]
                                     if command == "serve" else [])],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"forkproxy: error: {refused}: no interface {zone!r} on this host "
               f"(for {spec})\n")


@pytest.mark.parametrize("command", ["serve", "links"])
@pytest.mark.parametrize(
    ("specs", "refused"),
    [
        (["1=[::1%lo]:6379"], "SPEC '1=[::1%lo]:6379': '::1%lo'"),
        (["0=[2001:db8::1%1]:6379"], "SPEC '0=[2001:db8::1%1]:6379': '2001:db8::1%1'"),
        (["[::1%lo]:7000=127.0.0.1:1", "[::1]:7000=127.0.0.1:2"],
         "SPEC '[::1%lo]:7000=127.0.0.1:1': '::1%lo'"),
    ],
    ids=["named-target", "index-target", "listener"],
)
def test_a_zone_on_an_address_that_is_not_link_local_is_one_line_and_exit_2(
    tmp_path: Path, command: str, specs: list[str], refused: str
) -> None:
    """`1=[::1%lo]:6379` started, and every client got EOF: getaddrinfo takes a zone name
    only on a link-local address (`resolve-failed ... "Name or service not known"`). And
    Linux ignores a scope id on any other address, so `[::1%lo]:7000` was `links`' fine
    beside `[::1]:7000`, where `serve` then failed with "address already in use"."""
    zone = refused.rsplit("%", 1)[1].rstrip("'")
    result = subprocess.run(
        [FORKPROXY, command, *specs, *(["--status-socket", str(tmp_path / "s.sock")]
                                       if command == "serve" else [])],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"forkproxy: error: {refused} is not link-local (fe80::/10), the only "
               f"addresses a zone applies to: drop the '%{zone}'\n")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["[::1]:0=127.0.0.1:1"],
         "forkproxy: error: cannot listen on [::1]:0: no IPv6 on this host (Address family "
         "not supported by protocol) (for [::1]:0=127.0.0.1:1)\n"),
        (["127.0.0.1:0=127.0.0.1:1", "--metrics", "[::]:0"],
         "forkproxy: error: --metrics '[::]:0': cannot listen on [::]:0: no IPv6 on this host "
         "(Address family not supported by protocol)\n"),
    ],
)
def test_an_ipv6_listener_where_ipv6_sockets_are_refused_is_one_line_and_exit_2(
    tmp_path: Path, no_ipv6_filter: str, args: list[str], expected: str
) -> None:
    """As under systemd's RestrictAddressFamilies=AF_UNIX AF_INET, or ipv6.disable=1: it was
    a traceback and exit 1."""
    result = subprocess.run(
        [sys.executable, no_ipv6_filter, FORKPROXY, "serve", *args,
         "--status-socket", str(tmp_path / "status.sock")],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (2, "", expected)


@pytest.mark.netns
def test_without_ipv6_sockets_an_ipv6_address_does_not_end_the_connect(
    lab: Lab, ns: Namespace, no_ipv6_filter: str
) -> None:
    """A name with A and AAAA records, on a host without IPv6 sockets (systemd's
    RestrictAddressFamilies=AF_UNIX AF_INET): its IPv4 address is refused (the container
    moved), and the AAAA one cannot even get a socket. The child goes on to its own lookup
    and finds the new address; it used to give up at the socket() that failed."""
    hosts = Path("/etc/netns") / ns.name / "hosts"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    try:
        hosts.write_text("127.0.0.1 localhost\n127.0.0.2 both.test\n2001:2::1 both.test\n")
        lab.spawn(ns, ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.3",
                       "--save", "", "--appendonly", "no"], label="redis-moved")
        deadline = time.monotonic() + 10
        while netns.redis_cli(ns, REDIS_PORT, "PING", host="127.0.0.3", check=False) != "PONG":
            assert time.monotonic() < deadline, "redis on 127.0.0.3 did not start"
            time.sleep(0.05)
        sock = lab.workdir / "status.sock"
        proc, port = serve_resolved(
            lab, ns, [sys.executable, no_ipv6_filter, FORKPROXY, "serve",
                      f"0=both.test:{REDIS_PORT}", "--resolve-every", "off",
                      "--status-socket", str(sock)],
            f"127.0.0.2:{REDIS_PORT} [2001:2::1]:{REDIS_PORT}")
        # The name moves; the supervisor still has 127.0.0.2 and 2001:2::1.
        with hosts.open("w") as handle:  # in place: the bind mount follows the inode
            handle.write("127.0.0.1 localhost\n127.0.0.3 both.test\n2001:2::1 both.test\n")
        assert ping(ns, "127.0.0.1", port) == "+PONG", proc.describe()
        assert "connect-failed" not in proc.stderr(), proc.describe()
    finally:
        shutil.rmtree(hosts.parent, ignore_errors=True)


@pytest.mark.netns
@pytest.mark.parametrize(
    ("no_ipv6", "v6_error"),
    [
        (False, "Network is unreachable"),  # IPv6 on, but no route to the AAAA address
        (True, "Cannot assign requested address"),  # IPv6 disabled, as in many containers
    ],
)
def test_a_name_whose_every_address_fails_says_the_refusal_not_the_unusable_address(
    lab: Lab, no_ipv6: bool, v6_error: str,
) -> None:
    """A name with A and AAAA records on a host that cannot send IPv6 there: its IPv4
    address refused (the service down), its IPv6 one failing on this host, before any
    packet, and tried last (getaddrinfo sorts an unusable address last). The line said
    the IPv6 address's error, `Network is unreachable` (or `Cannot assign requested
    address`, out of local ports), and counted the upstream `unreachable`, sending the
    operator to the network; it says the refusal now. Retried: still the refusal."""
    here = lab.namespace("dual")  # loopback alone: no route to 2001:2::/48
    if no_ipv6:
        here.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                  "net.ipv6.conf.lo.disable_ipv6=1"])
    hosts = Path("/etc/netns") / here.name / "hosts"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    try:
        hosts.write_text("127.0.0.1 localhost\n127.0.0.2 both.test\n2001:2::5 both.test\n")
        # The IPv6 address fails as the test says, before forkproxy meets it.
        probe = here.run([sys.executable, "-c", (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('2001:2::5', {REDIS_PORT}), timeout=5)\n"
            "except OSError as exc:\n"
            "    print(exc.strerror)\n")])
        assert probe.strip() == v6_error, probe
        sock = lab.workdir / "status.sock"
        proc, port = serve_resolved(
            lab, here, [FORKPROXY, "serve", f"0=both.test:{REDIS_PORT}",
                        "--connect-retries", "1", "--status-socket", str(sock)],
            f"127.0.0.2:{REDIS_PORT} [2001:2::5]:{REDIS_PORT}")
        assert ping(here, "127.0.0.1", port) == "", proc.describe()  # closed: no upstream
        deadline = time.monotonic() + 15
        while "connect-failed" not in proc.stderr():
            assert time.monotonic() < deadline, proc.describe()
            time.sleep(0.05)
        [failed] = [line for line in proc.stderr().splitlines() if "connect-failed" in line]
        assert (f'address=127.0.0.2:{REDIS_PORT} error="Connection refused" failures=1'
                in failed), failed
        assert "detail=" not in failed, failed
        status = json.loads(here.run([FORKPROXY, "status", "--json",
                                      "--status-socket", str(sock)]))
        [link] = status["links"].values()
        counted = {reason: n for reason, n in link["upstream_failures_by_reason"].items() if n}
        assert counted == {"refused": 1}, link
    finally:
        shutil.rmtree(hosts.parent, ignore_errors=True)



def _attempt_fails(namespace: Namespace) -> int:
    """The namespace's count of connects that ended in SYN_SENT (Tcp AttemptFails): a
    refusal (an RST answering the SYN) adds one; a connect with no route sends nothing."""
    with in_network(namespace.path):
        rows = [line.split() for line in
                Path("/proc/thread-self/net/snmp").read_text().splitlines()
                if line.startswith("Tcp:")]
    names, values = rows
    return int(values[names.index("AttemptFails")])


@pytest.mark.netns
def test_an_address_refused_then_left_without_a_route_says_the_route(lab: Lab) -> None:
    """One address, retried: refused (the service down), then the host's way to it gone
    (its interface's address removed: a network disconnected, a VPN down). Every attempt
    after the first said `Network is unreachable`, and the error raised said the first
    one's refusal: an error with no way from here passed over the same address's earlier
    one, as it does (rightly) another address's, so the operator was sent to a service
    whose network was gone. The last attempt's state is what is said."""
    here = lab.namespace("gone")
    here.ip("link", "add", "g0", "type", "veth", "peer", "name", "g1")
    here.ip("link", "set", "g0", "up")
    here.ip("addr", "add", "198.18.7.1/24", "dev", "g0")
    port = random.randrange(20000, 60000)  # nothing listens in a new namespace
    target = ("198.18.7.1", port)
    before = _attempt_fails(here)
    removed: list[float] = []

    def remove_after_the_refusal() -> None:
        deadline = time.monotonic() + 10
        while _attempt_fails(here) == before and time.monotonic() < deadline:
            time.sleep(0.005)
        here.ip("addr", "del", "198.18.7.1/24", "dev", "g0")
        removed.append(time.monotonic())

    remover = threading.Thread(target=remove_after_the_refusal)
    remover.start()
    try:
        with in_network(here.path), pytest.raises(OSError) as raised:
            # Backoffs of 0.2 and 0.4 s: the removal comes in them, after the refusal.
            relay.connect_upstream([(socket.AF_INET, target)], Endpoint(*target), 1.0,
                                   retries=2)
        ended = time.monotonic()
    finally:
        remover.join()
    assert _attempt_fails(here) == before + 1  # the first attempt was refused, no other
    assert removed and removed[0] < ended  # the way was gone before the last attempt
    assert raised.value.errno == errno.ENETUNREACH, raised.value
    assert raised.value.tried == target  # type: ignore[attr-defined]



@pytest.mark.netns
@pytest.mark.parametrize("no_ipv6", [False, True])
def test_local_ports_run_out_toward_a_later_address_are_said_not_an_earlier_refusal(
    lab: Lab, no_ipv6: bool,
) -> None:
    """Two addresses, the first refused (one replica down), the second out of local ports
    (every port of ip_local_port_range holds a connection to it: the TIME_WAIT of a high
    connection rate, which all goes there). Its EADDRNOTAVAIL was passed over as no
    source address (IPv6 disabled) is, so the error said the refusal and counted it
    `refused`, where no-local-port (this host's trouble, with tcp_tw_reuse's advice) is
    counted apart so that no "upstream down" alert fires for it. Told apart by a probe
    now; an IPv6 address with IPv6 disabled after them is still passed over."""
    here = lab.namespace("ports")
    here.ip("link", "add", "p0", "type", "veth", "peer", "name", "p1")
    here.ip("link", "set", "p0", "up")
    here.ip("addr", "add", "198.18.8.1/24", "dev", "p0")
    here.ip("addr", "add", "198.18.8.2/32", "dev", "p0")
    here.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=50000 50001"])
    if no_ipv6:
        here.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                  "net.ipv6.conf.lo.disable_ipv6=1"])
    port = random.randrange(20000, 40000)  # below the ephemeral range set above
    refused, busy = ("198.18.8.1", port), ("198.18.8.2", port)
    addresses: list[relay.Address] = [(socket.AF_INET, refused), (socket.AF_INET, busy)]
    if no_ipv6:
        addresses.append((socket.AF_INET6, ("2001:2::5", port, 0, 0)))
    with in_network(here.path), socket.create_server(busy) as server, \
            contextlib.ExitStack() as held:
        for _ in range(2):  # both local ports toward `busy`
            held.enter_context(socket.create_connection(busy, timeout=5))
        with pytest.raises(OSError) as third:
            socket.create_connection(busy, timeout=5).close()
        assert third.value.errno == errno.EADDRNOTAVAIL  # out of ports, as the test says
        with pytest.raises(OSError) as raised:
            relay.connect_upstream(addresses, Endpoint(*refused), 1.0, retries=0)
        if no_ipv6:  # the refusal, then only the IPv6 address: passed over, as it was
            with pytest.raises(OSError) as alone:
                relay.connect_upstream([addresses[0], addresses[2]], Endpoint(*refused),
                                       1.0, retries=0)
            assert alone.value.errno == errno.ECONNREFUSED, alone.value
            assert alone.value.tried == refused  # type: ignore[attr-defined]
        server.close()
    assert raised.value.errno == errno.EADDRNOTAVAIL, raised.value
    assert raised.value.tried == busy  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "0=[fe80::5]:6379"], {},
         "SPEC '0=[fe80::5]:6379': 'fe80::5' is link-local: it needs a zone, as in "
         "[fe80::5%eth0]"),
        (["serve", "[fe80::1]:0=198.18.0.5:6379"], {},
         "SPEC '[fe80::1]:0=198.18.0.5:6379': 'fe80::1' is link-local: it needs a zone, "
         "as in [fe80::1%eth0]"),
        (["serve", "--from-env"], {"REDIS_PORT_6379_TCP": "tcp://[fe80::5]:6379"},
         "variable REDIS_PORT_6379_TCP: 'fe80::5' is link-local: it needs a zone, as in "
         "[fe80::5%eth0]"),
        (["links", "0=[FE80::5]:6379"], {},
         "SPEC '0=[FE80::5]:6379': 'FE80::5' is link-local: it needs a zone, as in "
         "[FE80::5%eth0]"),
    ],
)
def test_a_link_local_address_without_a_zone_is_refused_at_start(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    """Linux never binds or connects to one (EINVAL): it used to start, and then fail
    every connection with "Invalid argument" (a listener: fail with that, unexplained)."""
    result = subprocess.run(
        [FORKPROXY, *args, *(["--status-socket", str(tmp_path / "s.sock")]
                             if args[0] == "serve" else [])],
        capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"forkproxy: error: {expected}\n")


@pytest.mark.netns
@pytest.mark.parametrize(
    ("allow", "allowed", "denied", "denied_as"),
    [
        ("::1/128", "::1", "127.0.0.1", "client=[::ffff:127.0.0.1]:"),
        ("127.0.0.0/8", "127.0.0.1", "::1", "client=[::1]:"),
        # As the log shows an IPv4 client of [::]: it used to deny that very client.
        ("::ffff:127.0.0.1/128", "127.0.0.1", "::1", "client=[::1]:"),
        # An IPv6 network that holds ::ffff:0:0/96: it denied every IPv4 client.
        ("::ffff:0:0/95", "127.0.0.1", "::1", "client=[::1]:"),
    ],
)
def test_allow_ipv6_and_ipv4_clients_of_a_dual_stack_listener(
    lab: Lab, ns: Namespace, allow: str, allowed: str, denied: str, denied_as: str,
) -> None:
    """`[::]` takes IPv4 and IPv6 clients on every interface: inside the namespace."""
    proc = lab.spawn(ns, [FORKPROXY, "serve", "--allow", allow,
                          f"[::]:0=127.0.0.1:{REDIS_PORT}",
                          "--status-socket", str(lab.workdir / "status.sock")],
                     label="forkproxy")
    [line] = proc.wait_stdout(lambda lines: len(lines) >= 1, 15)
    port = int(line.split(" -> ")[0].rsplit(":", 1)[1])
    assert ping(ns, allowed, port) == "+PONG"
    assert ping(ns, denied, port) != "+PONG"  # closed before any upstream connection
    deadline = time.monotonic() + 10
    while " denied " not in proc.stderr():
        assert time.monotonic() < deadline, proc.describe()
        time.sleep(0.05)
    [denial] = [x for x in proc.stderr().splitlines() if " denied " in x]
    assert denied_as in denial, denial
