"""Hosts configured unlike the test machine, made of network namespaces whose per-namespace
sysctls differ (a host hunt, sysvar35): what forkproxy says there must fit that host."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import FORKPROXY, netns_lab, wait_for
from netns import Lab, Namespace, Process, redis_cli

pytestmark = [pytest.mark.netns]

PORT, SERVER_PORT = 6379, 7000


@pytest.fixture
def lab() -> Iterator[Lab]:
    with netns_lab("hostvar35-") as lab:
        yield lab


def started(lab: Lab, ns: Namespace, *args: str, env: tuple[str, ...] = ()) -> Process:
    """`forkproxy serve ARGS` in `ns`, once its listening line is out."""
    sock = lab.workdir / f"{lab.started + 1:02d}.sock"
    proc = lab.spawn(ns, ["env", *env, FORKPROXY, "serve", "--status-socket", str(sock),
                          *args], label="forkproxy")
    proc.wait_stdout(lambda lines: len(lines) >= 1, 30)
    return proc


def connect_failed(proc: Process) -> list[str]:
    return [line for line in proc.stderr().splitlines() if " connect-failed " in line]


@pytest.mark.parametrize("via", ["spec", "link-variable"])
def test_an_ipv6_upstream_where_ipv6_is_disabled_is_not_called_out_of_ports(
    lab: Lab, via: str
) -> None:
    """Where IPv6 is disabled (net.ipv6.conf.*.disable_ipv6=1, as in many containers and
    pods), a connect to an IPv6 upstream (`[::1]`, a link variable's IPv6 literal) fails
    EADDRNOTAVAIL: no address to send from. The line said "out of local ports ... widen
    net.ipv4.ip_local_port_range", sending the operator to a sysctl that cannot help;
    it says IPv6 is disabled now. The same host out of ports still says ports."""
    ns = lab.namespace("v6off")
    for key in ("all", "default", "lo"):
        ns.run(["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"])
    lab.redis(ns, SERVER_PORT, {"who": "v6off"})
    if via == "spec":
        proc = started(lab, ns, f"{PORT}=[::1]:{SERVER_PORT}")
    else:
        proc = started(lab, ns, "--from-env",
                       env=(f"DB_PORT_{PORT}_TCP=tcp://[::1]:{SERVER_PORT}",))
    assert redis_cli(ns, PORT, "GET", "who", check=False) != "v6off"
    assert wait_for(lambda: len(connect_failed(proc)) == 1), proc.describe()
    [line] = connect_failed(proc)
    assert ' error="Cannot assign requested address" failures=1 detail="no address of ' \
        "this host's can send to the upstream: IPv6 is disabled here " in line, line
    assert "out of local ports" not in line, line
    # The probe that told the two apart loaded nothing into the supervisor, whose every
    # mapping each fork copies: a str given to getaddrinfo imports the idna codec and
    # unicodedata with it (test_a_serving_supervisor_maps_no_extension_it_does_not_need).
    assert "unicodedata." not in Path(f"/proc/{proc.pid}/maps").read_text()
    # An IPv4 upstream out of local ports, on the same host: still the ports' advice.
    ns.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40000"])
    other = started(lab, ns, f"{PORT + 1}=127.0.0.1:{SERVER_PORT}")
    ns.run(["python3", "-c", TWO_CLIENTS, str(PORT + 1)])
    assert wait_for(lambda: len(connect_failed(other)) == 1), other.describe()
    assert 'detail="out of local ports toward the upstream: ' in connect_failed(other)[0]


def test_an_ipv6_upstream_where_ipv6_is_disabled_counts_as_unreachable(lab: Lab) -> None:
    """The metric agrees with the line: such a failure counted under
    forkproxy_upstream_connect_failures_total{reason="no-local-port"} (this host out of
    ports), where an alert on ports fired for a configuration error and the README's
    alert on `refused|timeout|unreachable` missed it. It counts `unreachable` now (no
    address to send from is no way there); the same host out of ports still counts
    `no-local-port`."""
    ns = lab.namespace("v6off")
    for key in ("all", "default", "lo"):
        ns.run(["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"])
    lab.redis(ns, SERVER_PORT, {"who": "v6off"})
    sock = lab.workdir / "metrics.sock"
    proc = lab.spawn(ns, [FORKPROXY, "serve", "--status-socket", str(sock), "--metrics",
                          "127.0.0.1:0", f"{PORT}=[::1]:{SERVER_PORT}",
                          f"{PORT + 1}=127.0.0.1:{SERVER_PORT}"], label="forkproxy")
    lines = proc.wait_stdout(lambda lines: any("metrics http" in line for line in lines), 30)
    [url] = [line.split()[-1] for line in lines if line.startswith("metrics http")]
    assert redis_cli(ns, PORT, "GET", "who", check=False) != "v6off"
    assert wait_for(lambda: len(connect_failed(proc)) == 1), proc.describe()
    # The other link out of local ports: one client held, the next one's connect fails.
    ns.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40000"])
    ns.run(["python3", "-c", TWO_CLIENTS, str(PORT + 1)])
    assert wait_for(lambda: len(connect_failed(proc)) == 2), proc.describe()
    scraped = ns.run(["python3", "-c", SCRAPE, url])
    failures = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
                for line in scraped.splitlines()
                if line.startswith("forkproxy_upstream_connect_failures_total{")}
    failures = {sample: count for sample, count in failures.items() if count}
    assert failures == {
        f'forkproxy_upstream_connect_failures_total{{link="{PORT}=[::1]:{SERVER_PORT}",'
        'reason="unreachable"}': 1,
        f'forkproxy_upstream_connect_failures_total{{link="{PORT + 1}=127.0.0.1:{SERVER_PORT}",'
        'reason="no-local-port"}': 1,
    }, scraped


SCRAPE = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"


def unreachable(proc: Process) -> list[str]:
    return [line for line in proc.stderr().splitlines() if " link-unreachable " in line]


def test_a_link_no_address_can_send_to_is_said_at_start_at_a_reload_and_by_links(
    lab: Lab,
) -> None:
    """A link whose target is an IPv6 literal, on a host where IPv6 is disabled: every
    client's connect fails, and nothing said so before the first one (a probe that
    never comes). Said now, a `link-unreachable` line per link, at start and at a reload
    that brings one in (not again while it stands), and by `links`. Not refused: once
    IPv6 is on, the link serves, without a reload."""
    ns = lab.namespace("v6off")
    for key in ("all", "default", "lo"):
        ns.run(["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"])
    lab.redis(ns, SERVER_PORT, {"who": "v6off"})
    v6, v4 = f"{PORT}=[::1]:{SERVER_PORT + 1}", f"{PORT + 1}=127.0.0.1:{SERVER_PORT}"
    why = ("no address of this host's can send to the upstream: IPv6 is disabled here "
           "(net.ipv6.conf.lo.disable_ipv6=1, as in many containers); each connect fails "
           "until one can (`connect-failed`, reason unreachable): give 127.0.0.1")
    said = f"{v6} (0.0.0.0:{PORT} -> [::1]:{SERVER_PORT + 1}): {why}"
    done = subprocess.run(ns.exec_argv([FORKPROXY, "links", v6, v4]),
                          capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stderr) == (0, f"forkproxy: warning: {said}\n"), done
    env_file = lab.workdir / "links.env"
    env_file.write_text(f"DB_PORT_{PORT + 2}_TCP=tcp://127.0.0.1:{SERVER_PORT}\n")
    sock = lab.workdir / "unreachable.sock"
    proc = lab.spawn(ns, [FORKPROXY, "serve", "--status-socket", str(sock), "--env-file",
                          str(env_file), v6, v4], label="forkproxy")
    proc.wait_stdout(lambda lines: len(lines) >= 3, 30)
    assert [line.partition(" detail=")[2] for line in unreachable(proc)] == [
        f'"{said}"'], proc.describe()
    assert redis_cli(ns, PORT + 1, "GET", "who") == "v6off"
    # A reload that brings in a second such link, to another IPv6 address: said, the
    # first not again; the reload done (twice: the second says nothing new).
    env_file.write_text(f"DB_PORT_{PORT + 2}_TCP=tcp://[2001:db8::5]:{SERVER_PORT}\n")
    for _ in range(2):
        result = subprocess.run([FORKPROXY, "reload", "--status-socket", str(sock)],
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result
    assert wait_for(lambda: proc.stderr().count(" reloaded ") == 2), proc.describe()
    lines = unreachable(proc)
    assert len(lines) == 2, proc.describe()
    assert lines[1].endswith(
        f"(0.0.0.0:{PORT + 2} -> [2001:db8::5]:{SERVER_PORT}): no address of this host's "
        "can send to the upstream: IPv6 is disabled here (net.ipv6.conf.all.disable_ipv6=1,"
        " as in many containers); each connect fails until one can (`connect-failed`, "
        "reason unreachable): give the upstream's IPv4 address or a name that has one\""
    ), lines
    # IPv6 turned on: the link serves, with no reload.
    for key in ("all", "default", "lo"):
        ns.run(["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=0"])
    assert wait_for(lambda: "inet6 ::1" in ns.ip("addr", "show", "lo")), ns.ip("addr")
    lab.spawn(ns, ["redis-server", "--port", str(SERVER_PORT + 1), "--bind", "::1", "--save",
                   "", "--appendonly", "no", "--dir", str(lab.workdir)], label="redis-v6")
    assert wait_for(lambda: redis_cli(ns, PORT, "PING", check=False) == "PONG"), \
        proc.describe()


def test_a_names_link_local_address_without_its_interface_is_not_called_a_blackhole(
    lab: Lab,
) -> None:
    """A name whose only address is a link-local IPv6 one (`fe80::1` in a hosts file or
    an AAAA record) gives it no interface: connect() fails EINVAL, no packet sent, as at
    a blackhole route. The `connect-failed` line's detail blamed a blackhole route on
    this host, which `ip route` would not show; it names the missing interface now."""
    ns = lab.namespace("linklocal")
    hosts = lab.workdir / "hosts"
    hosts.write_text("127.0.0.1 localhost\nfe80::1 ll.test\n")
    sock = lab.workdir / f"{lab.started + 1:02d}.sock"
    proc = lab.spawn(ns, ["unshare", "--mount", "sh", "-c",
                          'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
                          FORKPROXY, "serve", "--status-socket", str(sock),
                          f"{PORT}=ll.test:{SERVER_PORT}"], label="forkproxy")
    proc.wait_stdout(lambda lines: len(lines) >= 1, 30)
    assert redis_cli(ns, PORT, "PING", check=False) != "PONG"
    assert wait_for(lambda: len(connect_failed(proc)) == 1), proc.describe()
    [line] = connect_failed(proc)
    assert f' address=[fe80::1]:{SERVER_PORT} error="Invalid argument" failures=1 ' \
        in line, line
    assert "blackhole" not in line, line
    assert ' detail="a link-local IPv6 address without its interface' in line, line

# One client served (its child holds the one local port), then one refused: each from a
# port of its own, not the ephemeral one the proxy needs.
TWO_CLIENTS = """
import socket, sys
def client(source):
    sock = socket.socket()
    sock.bind(("127.0.0.1", source))
    sock.connect(("127.0.0.1", int(sys.argv[1])))
    sock.settimeout(10)
    return sock
held = client(50001)
held.sendall(b"PING\\r\\n")
assert held.recv(7) == b"+PONG\\r\\n"
try:
    assert client(50002).recv(1) == b"", "the second client was served"
except ConnectionResetError:
    pass  # refused, as a close would say
"""


# Handshakes from addresses that never answer a SYN-ACK (hosts of the client's subnet
# that are not there: IP_TRANSPARENT lets the client's host send from them), each left in
# the box's SYN queue, as a SYN flood's; then one real client's connect.
SYN_FLOOD = """
import contextlib, socket, sys
box, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for i in range(count):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
    sock.bind((f"198.18.36.{100 + i}", 0))
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        sock.connect((box, port))
    held.append(sock)
"""


def test_a_full_syn_queue_without_syncookies_names_its_size_and_what_to_raise(
    lab: Lab,
) -> None:
    """With net.ipv4.tcp_syncookies=0 a SYN flood fills the listener's SYN queue, whose
    size is the listen backlog, capped by net.core.somaxconn: at somaxconn 4 here, 20
    half-open handshakes dropped every real client's SYN, and at 4096 none. The line
    said "--max-children and somaxconn are not the cause", sending the operator away
    from the one setting that would have helped (besides syncookies); it names the
    queue's size and both settings now."""
    box, client = lab.namespace("box"), lab.namespace("client")
    lab.cable(client, "198.18.36.2", box, "198.18.36.1")
    box.run(["sysctl", "-qw", "net.ipv4.tcp_syncookies=0", "net.core.somaxconn=4"])
    lab.redis(box, SERVER_PORT, {"who": "box"})
    proc = started(lab, box, f"{PORT}=127.0.0.1:{SERVER_PORT}")
    client.run(["python3", "-c", SYN_FLOOD, "198.18.36.1", str(PORT), "20"])
    # A real client: its SYN is dropped while the queue is full.
    assert redis_cli(client, PORT, "PING", host="198.18.36.1", check=False) in (
        "PONG", "")
    proc.popen.send_signal(signal.SIGALRM)
    assert wait_for(lambda: " listen-drops " in proc.stderr()), proc.describe()
    [line] = [x for x in proc.stderr().splitlines() if " listen-drops " in x]
    assert "no accept queue full" in line, line
    assert "backlog=4 " in line, line
    assert ("with net.ipv4.tcp_syncookies=0, a full SYN queue (a SYN flood, a burst over "
            "a slow network), which holds no more handshakes under way than the "
            "listener's backlog (4 here, net.core.somaxconn at most), nor, from clients "
            "it has not seen before, more than 3/4 of net.ipv4.tcp_max_syn_backlog (") \
        in line, line
    assert "): set tcp_syncookies=1 (the kernel's default), or raise somaxconn" in line, line



def test_a_syn_queue_full_at_tcp_max_syn_backlog_names_it_not_somaxconn(lab: Lab) -> None:
    """Without syncookies the kernel also keeps the last quarter of
    net.ipv4.tcp_max_syn_backlog for clients it has seen before: at 16 here, 20 half-open
    handshakes dropped the rest with the listener's backlog (4096) far from full. The
    line named the backlog alone and said to raise somaxconn, which was at the proxy's
    own 4096 already and could not help; it names tcp_max_syn_backlog and its value now,
    and asks for somaxconn only where the backlog is below the proxy's."""
    box, client = lab.namespace("box"), lab.namespace("client")
    lab.cable(client, "198.18.36.2", box, "198.18.36.1")
    box.run(["sysctl", "-qw", "net.ipv4.tcp_syncookies=0", "net.core.somaxconn=4096",
             "net.ipv4.tcp_max_syn_backlog=16"])
    lab.redis(box, SERVER_PORT, {"who": "box"})
    proc = started(lab, box, f"{PORT}=127.0.0.1:{SERVER_PORT}")
    client.run(["python3", "-c", SYN_FLOOD, "198.18.36.1", str(PORT), "20"])
    proc.popen.send_signal(signal.SIGALRM)
    assert wait_for(lambda: " listen-drops " in proc.stderr()), proc.describe()
    [line] = [x for x in proc.stderr().splitlines() if " listen-drops " in x]
    assert "backlog=4096 " in line, line
    assert ("which holds no more handshakes under way than the listener's backlog (4096 "
            "here, net.core.somaxconn at most), nor, from clients it has not seen before, "
            "more than 3/4 of net.ipv4.tcp_max_syn_backlog (16 here): set "
            "tcp_syncookies=1 (the kernel's default), or raise tcp_max_syn_backlog\"") \
        in line, line

# `python -c LANDLOCK_BINDS PROGRAM ARGS...`: PROGRAM with every TCP bind refused
# (EACCES, by the kernel's Landlock LSM, ABI 4: Linux 6.7), as SELinux's name_bind or an
# AppArmor profile refuses one: a policy of this host's, whatever the port.
LANDLOCK_BINDS = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
BIND_TCP, CREATE_RULESET, RESTRICT_SELF = 1, 444, 446
def check(result):
    if result < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result
handled = ctypes.create_string_buffer(struct.pack("QQ", 0, BIND_TCP))
ruleset = check(libc.syscall(CREATE_RULESET, handled, 16, 0))
check(libc.prctl(38, 1, 0, 0, 0))  # PR_SET_NO_NEW_PRIVS, which restrict_self needs
check(libc.syscall(RESTRICT_SELF, ruleset, 0))
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.parametrize(
    ("prefix", "spec", "said"),
    [
        # Root without CAP_NET_BIND_SERVICE, below this namespace's start (80): the
        # sysctl's value here, not "1024 by default".
        (("setpriv", "--bounding-set=-net_bind_service"), "79=127.0.0.1:1",
         "cannot listen on 0.0.0.0:79: permission denied (ports below "
         "net.ipv4.ip_unprivileged_port_start, 80 here, need CAP_NET_BIND_SERVICE) "
         "(for 79=127.0.0.1:1)"),
        # A policy refusing a high port: it said "ports below ... need
        # CAP_NET_BIND_SERVICE" for port 8080, which no capability or sysctl fixes.
        ((sys.executable, "-c", LANDLOCK_BINDS), "8080=127.0.0.1:1",
         "cannot listen on 0.0.0.0:8080: permission denied, not for the port (8080 is at "
         "or above net.ipv4.ip_unprivileged_port_start, 80 here): a security module's "
         "policy refuses the bind (SELinux, AppArmor, Landlock), or a cgroup BPF hook "
         "(for 8080=127.0.0.1:1)"),
    ],
)
def test_a_refused_bind_says_this_hosts_unprivileged_port_start_or_a_policy(
    lab: Lab, prefix: tuple[str, ...], spec: str, said: str
) -> None:
    """A host whose net.ipv4.ip_unprivileged_port_start is neither 1024 nor Docker's 0
    (80 here): a refused bind names the value in force, and one at or above it is
    not blamed on the port."""
    ns = lab.namespace("ports")
    ns.run(["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=80"])
    done = subprocess.run(ns.exec_argv([*prefix, FORKPROXY, "serve", spec]),
                          capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout) == (2, ""), done
    assert done.stderr == f"forkproxy: error: {said}\n", done


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ((f"[::1]:{PORT}=127.0.0.1:1",),
         f"cannot listen on [::1]:{PORT}: no such address on this host (IPv6 is disabled "
         f"here: net.ipv6.conf.lo.disable_ipv6=1) (for [::1]:{PORT}=127.0.0.1:1)"),
        (("--metrics", "[::1]:0", f"{PORT}=127.0.0.1:1"),
         "--metrics '[::1]:0': cannot listen on [::1]:0: no such address on this host "
         "(IPv6 is disabled here: net.ipv6.conf.lo.disable_ipv6=1)"),
        (("--bind", "2001:db8::5", f"{PORT}=127.0.0.1:1"),
         f"cannot listen on [2001:db8::5]:{PORT}: no such address on this host (IPv6 is "
         f"disabled here: net.ipv6.conf.all.disable_ipv6=1) (for {PORT}=127.0.0.1:1)"),
    ],
)
def test_an_ipv6_listener_where_ipv6_is_disabled_says_so(
    lab: Lab, args: tuple[str, ...], said: str
) -> None:
    """`[::1]:P`, `--bind ::1` or `--metrics '[::1]:0'` (a template written for a host
    with IPv6) on one where it is disabled: "no such address on this host" alone left
    the operator to find why ::1 is missing; the sysctl that took it is named."""
    ns = lab.namespace("v6off")
    for key in ("all", "default", "lo"):
        ns.run(["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"])
    done = subprocess.run(ns.exec_argv([FORKPROXY, "serve", *args]),
                          capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout) == (2, ""), done
    assert done.stderr == f"forkproxy: error: {said}\n", done


@pytest.mark.parametrize("was_up", [False, True])
def test_a_loopback_upstream_with_lo_down_names_lo(lab: Lab, was_up: bool) -> None:
    """A namespace whose loopback is down (`ip netns add`, `unshare -n` leave it so; or
    brought down): the proxy binds and `check` says ok, while each connect to a
    127.0.0.1 upstream fails, `Network is unreachable` (lo never up) or `Connection
    timed out` (it was up: its local routes stay, its packets are dropped), neither
    naming lo. The line's detail does now. The client comes over a cable."""
    box, client = lab.namespace("box"), lab.namespace("client")
    lab.cable(client, "198.18.36.2", box, "198.18.36.1")
    if was_up:
        lab.redis(box, SERVER_PORT, {"who": "box"})
    box.ip("link", "set", "lo", "down")
    if not was_up:  # its local routes gone too, as in a namespace lo was never up in
        box.ip("route", "flush", "table", "local", "dev", "lo")
    proc = started(lab, box, "--connect-timeout", "0.5", f"{PORT}=127.0.0.1:{SERVER_PORT}")
    assert redis_cli(client, PORT, "PING", host="198.18.36.1", check=False) != "PONG"
    assert wait_for(lambda: len(connect_failed(proc)) == 1), proc.describe()
    [line] = connect_failed(proc)
    error = "Connection timed out" if was_up else "Network is unreachable"
    assert (f'error="{error}" failures=1 detail="the loopback interface is down in this '
            "network namespace: `ip link set lo up` (a namespace made with `ip netns add` "
            'or `unshare -n` starts with it down)"') in line, line


@pytest.mark.parametrize("drops", ["lo-down", "firewall"])
def test_serve_starts_at_once_where_loopback_drops_packets(lab: Lab, drops: str) -> None:
    """The warm-up before `listening` connects over 127.0.0.1 with a blocking connect:
    where loopback drops packets (lo set down after it was up, whose local routes stay;
    a default-deny OUTPUT firewall with no `-o lo` rule, as hardened hosts have) it
    waited out the SYN retries: no `listening` line, no status socket answering, and
    SIGTERM held, for ~130 s. It gives up the warm-up after 1 s now (children then warm
    their own) and serves."""
    ns = lab.namespace("box")
    if drops == "lo-down":
        ns.ip("link", "set", "lo", "down")
    else:
        ns.run(["iptables", "-P", "OUTPUT", "DROP"])
    started_at = time.monotonic()
    proc = started(lab, ns, f"{PORT}=127.0.0.1:{SERVER_PORT}")
    assert time.monotonic() - started_at < 8, proc.describe()
    assert proc.alive(), proc.describe()
