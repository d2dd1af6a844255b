"""A link whose target is an IP literal of this host's own, a container's address on its
eth0 (`0.0.0.0:6379=198.18.34.1:6379`), on a port a listener takes: said at start and at
a reload (`link-may-loop`), in real network namespaces. Not refused: the host may hand the
address's connections on before they reach the listener (kube-proxy's IPVS puts every
service address on an interface of the node), and a true loop is refused at its second
hop (tests/test_serve.py). The kernel is asked (read_links, listeners.own_addresses) by its
routing, not by a bind, so that a remote server's address is not called this host's under
net.ipv4.ip_nonlocal_bind=1."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest

from conftest import FORKPROXY, control, in_network, netns_lab, wait_for
from netns import Lab, Namespace, Process, redis_cli

pytestmark = [pytest.mark.netns]

OWN = "198.18.34.1"  # the box's own address, on its eth0
REMOTE = "198.18.35.2"  # the server's, one hop away over the cable
PORT, OTHER = 6379, 6380
SERVER_PORT = 7000  # the box's own redis, on its loopback
# What the warning says follows, and why the address is this host's.
MAY = ("each client would come back into the proxy, refused then (connect-failed, reason "
       "loop), unless this host gives the address's connections to another first (an IPVS "
       "service address, a DNAT rule)")
WHY = (f"{OWN} is an address of this host (in a container, the container itself): name "
       "the server's host")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with netns_lab("ownaddr34-") as lab:
        yield lab


@pytest.fixture
def box(lab: Lab) -> Namespace:
    """The proxy's host, OWN on its eth0 (a veth whose peer stays in the box: this
    kernel has no dummy interfaces), a redis on its loopback."""
    ns = lab.namespace("box")
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer")
    ns.ip("addr", "add", f"{OWN}/24", "dev", "eth0")
    for dev in ("eth0", "eth0-peer"):
        ns.ip("link", "set", dev, "up")
    lab.redis(ns, SERVER_PORT, {"who": "box"})
    return ns


def started(lab: Lab, ns: Namespace, *args: str, count: int = 1,
            env: tuple[str, ...] = ()) -> Process:
    """`forkproxy serve ARGS` in `ns` (with `env`: NAME=VALUE), once its `count`
    listening lines are out."""
    sock = lab.workdir / f"{lab.started + 1:02d}.sock"
    proc = lab.spawn(ns, ["env", *env, FORKPROXY, "serve", "--status-socket", str(sock),
                          *args], label="forkproxy")
    proc.status_socket = sock
    proc.wait_stdout(lambda lines: len(lines) >= count, 15)
    return proc


def warnings(proc: Process) -> list[str]:
    """The `link-may-loop` lines of `proc`'s log."""
    return [line for line in proc.stderr().splitlines() if " link-may-loop " in line]


@pytest.mark.parametrize(
    ("args", "link"),
    [
        ([f"0.0.0.0:{PORT}={OWN}:{PORT}"], f"0.0.0.0:{PORT}={OWN}:{PORT}"),
        # `::` takes IPv4 too; an IPv4-mapped target is that IPv4 address.
        ([f"[::]:{PORT}={OWN}:{PORT}"], f"[::]:{PORT}={OWN}:{PORT}"),
        ([f"[::]:{PORT}=[::ffff:{OWN}]:{PORT}"], f"[::]:{PORT}=[::ffff:{OWN}]:{PORT}"),
        # The drill's case: a link variable naming the container's own address.
        (["--from-env"], f"REDIS_PORT_{PORT}_TCP"),
    ],
)
def test_a_target_that_is_an_own_address_is_said_at_start(
    lab: Lab, box: Namespace, args: list[str], link: str
) -> None:
    """Taken without a word (`check` said ok), then each client's child connected back
    to the proxy: refused only a hop later, at run time (connect-failed, reason loop),
    for every client. Said at start now, naming the address; the proxy serves (the
    host may hand the address on first), and `check` is still ok."""
    target = args[0].split("=", 1)[1] if "=" in args[0] else f"{OWN}:{PORT}"
    env = (f"REDIS_PORT_{PORT}_TCP=tcp://{OWN}:{PORT}",) if "--from-env" in args else ()
    proc = started(lab, box, *args, env=env)
    bind = "[::]" if link.startswith("[::]") else "0.0.0.0"
    why = WHY.replace(OWN, target.rsplit(":", 1)[0].strip("[]"), 1)
    said = f"{link} connects to its own listener ({bind}:{PORT} -> {target}): {MAY}; {why}"
    assert wait_for(lambda: len(warnings(proc)) == 1), proc.describe()
    assert warnings(proc)[0].endswith(f' detail="{said}"'), proc.describe()
    assert proc.status_socket is not None
    assert control(proc.status_socket, "check")["ok"] is True


def test_a_ring_through_an_own_address_is_said_and_a_chain_out_is_not(
    lab: Lab, box: Namespace
) -> None:
    """Two links reaching each other's listeners, one of them through the box's own
    address: one client would go round them, a child per link. A chain through
    the own address that ends at a server is no ring: it serves, and nothing is said."""
    proc = started(lab, box, f"{PORT}=127.0.0.1:{OTHER}", f"{OTHER}={OWN}:{PORT}", count=2)
    said = (f"links connect to one another's listeners in a ring: "
            f"{PORT}=127.0.0.1:{OTHER} (0.0.0.0:{PORT} -> 127.0.0.1:{OTHER}), "
            f"{OTHER}={OWN}:{PORT} (0.0.0.0:{OTHER} -> {OWN}:{PORT}): {MAY}; 127.0.0.1 is "
            f"this host, {WHY}")
    assert wait_for(lambda: len(warnings(proc)) == 1), proc.describe()
    assert warnings(proc)[0].endswith(f' detail="{said}"'), proc.describe()
    proc.stop()
    proc = started(lab, box, f"{PORT}={OWN}:{OTHER}", f"{OTHER}=127.0.0.1:{SERVER_PORT}",
                   count=2)
    assert redis_cli(box, PORT, "GET", "who") == "box", proc.describe()
    assert warnings(proc) == [], proc.describe()


def test_a_reload_to_an_own_address_is_said(lab: Lab, box: Namespace) -> None:
    """An env file rewired to the container's own address: `reload` took it without a
    word. Said now, in the log, as at start; the reload is done (the host may hand the
    address on), and the warning is not said again by a reload that keeps it."""
    env_file = lab.workdir / "links.env"
    env_file.write_text(f"REDIS_PORT_{PORT}_TCP=tcp://127.0.0.1:{SERVER_PORT}\n")
    proc = started(lab, box, "--env-file", str(env_file))
    assert redis_cli(box, PORT, "GET", "who") == "box", proc.describe()
    assert warnings(proc) == [], proc.describe()
    env_file.write_text(f"REDIS_PORT_{PORT}_TCP=tcp://{OWN}:{PORT}\n")
    assert proc.status_socket is not None
    for _ in range(2):
        result = subprocess.run(
            [FORKPROXY, "reload", "--status-socket", str(proc.status_socket)],
            capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result
    assert wait_for(lambda: proc.stderr().count(" reloaded ") == 2), proc.describe()
    assert len(warnings(proc)) == 1, proc.describe()
    assert warnings(proc)[0].endswith(
        f'(0.0.0.0:{PORT} -> {OWN}:{PORT}): {MAY}; {WHY}"'), proc.describe()


def remote_redis(lab: Lab, server: Namespace) -> None:
    """A redis-server on REMOTE:PORT in `server`, its key `who` set to "server"."""
    redis = lab.spawn(server, ["redis-server", "--port", str(PORT), "--bind", REMOTE,
                               "--protected-mode", "no", "--save", "", "--appendonly", "no",
                               "--dir", str(lab.workdir)], label="redis-server")
    assert wait_for(lambda: redis_cli(server, PORT, "PING", host=REMOTE, check=False)
                    == "PONG"), redis.describe()
    redis_cli(server, PORT, "SET", "who", "server", host=REMOTE)


@pytest.mark.parametrize("nonlocal_bind", [0, 1])
def test_a_remote_literal_is_not_said_and_an_own_one_is_under_nonlocal_bind(
    lab: Lab, box: Namespace, nonlocal_bind: int
) -> None:
    """The kernel is asked by its routing, not by a bind: with ip_nonlocal_bind=1
    (keepalived's hosts, for a VIP) any address binds, and a bind probe would have
    called `6379=<a remote server>:6379`, the plainest link there is, a loop. A probe
    that fails (no route: ENETUNREACH) says nothing either."""
    server = lab.namespace("server")
    lab.cable(box, "198.18.35.1", server, REMOTE)
    box.run(["sysctl", "-qw", f"net.ipv4.ip_nonlocal_bind={nonlocal_bind}"])
    with in_network(box.path), socket.socket() as sock:
        try:
            sock.bind((REMOTE, 0))  # what a bind probe would have judged by
            binds = True
        except OSError:
            binds = False
    assert binds == bool(nonlocal_bind)
    remote_redis(lab, server)
    # 198.18.36.1: no route to it from the box, whose probe fails: nothing said.
    proc = started(lab, box, f"{PORT}={REMOTE}:{PORT}", f"{OTHER}=198.18.36.1:{OTHER}",
                   count=2)
    assert redis_cli(box, PORT, "GET", "who") == "server", proc.describe()
    assert warnings(proc) == [], proc.describe()
    result = subprocess.run(box.exec_argv([FORKPROXY, "links", f"{OTHER + 1}={OWN}:{OTHER + 1}"]),
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result
    assert result.stderr.endswith(f"; {WHY}\n"), result


def test_links_says_what_serve_would(lab: Lab, box: Namespace) -> None:
    """`forkproxy links` reads the configuration as serve does: the same warning, on
    stderr, and the link on stdout (exit 0: serve would start)."""
    result = subprocess.run(box.exec_argv([FORKPROXY, "links", f"{PORT}={OWN}:{PORT}"]),
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result
    assert result.stdout == (f"listen 0.0.0.0:{PORT} -> {OWN}:{PORT} "
                             f"({PORT}={OWN}:{PORT})\n"), result
    assert result.stderr == (
        f"forkproxy: warning: {PORT}={OWN}:{PORT} connects to its own listener "
        f"(0.0.0.0:{PORT} -> {OWN}:{PORT}): {MAY}; {WHY}\n"), result


def test_a_name_with_a_loop_and_a_remote_server_serves_under_nonlocal_bind(
    lab: Lab, box: Namespace
) -> None:
    """A name with a loopback address (a loop: refused) and a remote server's. Once one
    address was refused as a loop, the child asked the kernel whether the others are this
    host's by a bind(), which ip_nonlocal_bind=1 (keepalived's hosts; set in the box's
    own netns) lets any address pass: the server's address was called this host's too,
    and every client whose turn started at the loop was refused (connect-failed, reason
    loop). Asked by routing now, as read_links asks: each client is served."""
    server = lab.namespace("server")
    lab.cable(box, "198.18.35.1", server, REMOTE)
    box.run(["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"])
    remote_redis(lab, server)
    # The name's two addresses, by a hosts file mounted over /etc/hosts in a mount
    # namespace of the proxy's own (nothing under /etc is written).
    hosts = lab.workdir / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 both.test\n{REMOTE} both.test\n")
    sock = lab.workdir / f"{lab.started + 1:02d}.sock"
    proc = lab.spawn(box, ["unshare", "--mount", "sh", "-c",
                           'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
                           FORKPROXY, "serve", "--status-socket", str(sock),
                           f"{PORT}=both.test:{PORT}"], label="forkproxy")
    proc.status_socket = sock
    proc.wait_stdout(lambda lines: len(lines) >= 1, 15)
    assert wait_for(lambda: f"127.0.0.1:{PORT} {REMOTE}:{PORT}" in proc.stderr()
                    or f"{REMOTE}:{PORT} 127.0.0.1:{PORT}" in proc.stderr()), proc.describe()
    for _ in range(4):  # turns start at each address in turn: two at the loop
        assert redis_cli(box, PORT, "GET", "who", check=False) == "server", proc.describe()
    # The loop was refused and skipped (so the remote address was asked), and no
    # connection failed.
    assert wait_for(lambda: " connect-fallback " in proc.stderr()), proc.describe()
    assert " connect-failed " not in proc.stderr(), proc.describe()


def test_two_loops_through_an_own_address_are_each_said(lab: Lab, box: Namespace) -> None:
    """Two links to their own listeners through the box's own address: serve's log and
    `links` said the first alone, and the second only after the first was mended. A
    `link-may-loop` line, and a warning line of `links`, for each."""
    specs = (f"{PORT}={OWN}:{PORT}", f"{OTHER}={OWN}:{OTHER}")
    lines = [f"{spec} connects to its own listener (0.0.0.0:{port} -> {OWN}:{port}): "
             f"{MAY}; {WHY}" for spec, port in zip(specs, (PORT, OTHER), strict=True)]
    proc = started(lab, box, *specs, count=2)
    assert wait_for(lambda: len(warnings(proc)) == 2), proc.describe()
    for warning, line in zip(warnings(proc), lines, strict=True):
        assert warning.endswith(f' detail="{line}"'), proc.describe()
    result = subprocess.run(box.exec_argv([FORKPROXY, "links", *specs]),
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result
    assert result.stderr == "".join(f"forkproxy: warning: {line}\n" for line in lines), result
