"""The two-ambassador chain under real network faults.

    consumer -> ambassador B ---veth 198.18.7.0/24---> ambassador A -> sink
    (client-host namespace)                            (server-host namespace)

The consumer and the sink run in this test process: their sockets are made inside the
namespaces (setns(2) on this thread, then back), so the test sees, byte for byte and
error by error, what each end of the chain sees. The sink hashes what it receives and
generates what it sends, so a byte lost, added or reordered anywhere in the chain shows.
Faults are real: a token bucket (`tc ... tbf`) slows the cable, iptables drops packets
at random, the cable is pulled.

Needs root, iproute2 (`ip`, `tc`) and iptables: fails without them (never a skip).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_two_hosts import _unavailable, forkproxy_command

import netns
from conftest import in_network, processes_under
from netns import Cable, Lab, Namespace, Process

pytestmark = [pytest.mark.netns]

CLIENT_ADDR = "198.18.7.1"
SERVER_ADDR = "198.18.7.2"
def pattern(size: int, seed: int = 0) -> bytes:
    """`size` bytes that are not all alike (a reorder or a duplicate changes the hash)."""
    block = b"".join(hashlib.sha256(b"%d:%d" % (seed, i)).digest() for i in range(2048))
    return (block * (size // len(block) + 1))[:size]


@dataclass
class Sink:
    """A server behind the far ambassador. The first line of a connection says what to do:

    `up N`: read to the end; reply `<count> <sha256>` once the sender has finished (EOF);
    `down N`: send `pattern(N)`, then close;
    `rst N`: send `pattern(N)`, then close with an RST.
    How each upload ended is recorded in `uploads`: ("eof", count) or ("reset", -1).
    """

    sock: socket.socket
    uploads: list[tuple[str, int]] = field(default_factory=list)
    acceptor: threading.Thread = field(init=False)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def close(self) -> None:
        """Stop accepting, for good. shutdown() wakes the accept() blocked in the acceptor;
        a close() alone left it blocked on the socket closed, its descriptor's number free:
        a signal that restarts system calls (glibc's for a seteuid) then restarted that
        accept() on the number, which by then was another test's listener, and the Sink
        took that test's connections (CI: an echo test's message read, never answered).
        Closed only once the acceptor has returned: shut down, the socket fails any
        accept() at once, where a close() before the join left that window open."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.acceptor.join(30)
        assert not self.acceptor.is_alive(), "the sink's acceptor did not stop"
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(300)
            head, verb = b"", b""
            try:
                while b"\n" not in head:
                    data = conn.recv(256)
                    if not data:
                        return
                    head += data
                command, rest = head.split(b"\n", 1)
                verb, size = command.split()
                if verb == b"up":
                    digest, count = hashlib.sha256(rest), len(rest)
                    while data := conn.recv(1 << 20):
                        digest.update(data)
                        count += len(data)
                    self.uploads.append(("eof", count))
                    conn.sendall(b"%d %s\n" % (count, digest.hexdigest().encode()))
                elif verb in (b"down", b"rst"):
                    conn.sendall(pattern(int(size)))
                    if verb == b"rst":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01" + bytes(7))
            except ConnectionResetError:
                if verb == b"up":
                    self.uploads.append(("reset", -1))
            except OSError:
                pass


@dataclass
class Chain:
    lab: Lab
    forkproxy: list[str]
    client: Namespace
    server: Namespace
    cable: Cable
    sink: Sink

    def ambassadors(self, *options: str) -> tuple[Process, Process]:
        """A (server side, to the sink) and B (client side, to A); both with `options`."""
        far = self.spawn(self.server, f"0.0.0.0:0=127.0.0.1:{self.sink.port}", "far", options)
        far_port = port_of(far)
        near = self.spawn(self.client, f"127.0.0.1:0={SERVER_ADDR}:{far_port}", "near", options)
        return far, near

    def spawn(self, ns: Namespace, spec: str, label: str, options: tuple[str, ...]) -> Process:
        sock = self.lab.workdir / f"{label}-{self.lab.started + 1}.sock"
        argv = [*self.forkproxy, "serve", spec, "--status-socket", str(sock), *options]
        proc = self.lab.spawn(ns, argv, label=label)
        proc.status_socket = sock
        proc.wait_stdout(lambda lines: any(ln.startswith("listening ") for ln in lines), 20.0)
        return proc

    def connect(self, near: Process) -> socket.socket:
        with in_network(self.client.path):
            sock = socket.socket()
        sock.settimeout(120)
        sock.connect(("127.0.0.1", port_of(near)))
        return sock

    def slow_cable(self, rate: str) -> None:
        """A token bucket on both ends of the cable: `rate` each way, queueing delay."""
        for ns, dev in ((self.client, self.cable.near_dev), (self.server, self.cable.far_dev)):
            ns.run(["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", "16kb", "latency", "400ms"])

    def heal(self) -> None:
        for ns, dev in ((self.client, self.cable.near_dev), (self.server, self.cable.far_dev)):
            ns.run(["tc", "qdisc", "del", "dev", dev, "root"], check=False)
            ns.run(["iptables", "-F"], check=False)
        self.cable.restore()


def port_of(proc: Process) -> int:
    line = netns.listening_lines(proc)[0]
    return int(line.split(" -> ")[0].rsplit(":", 1)[1])


CHAIN_TOOLS = ("ip", "tc", "iptables")


@pytest.mark.netns
def test_scripts_ensure_peers_installs_the_tools_this_file_needs(tmp_path: Path) -> None:
    """`./scripts/test` installs the peers the tests need; iptables was not among them, so
    on a machine without it (a fresh Debian) this file failed. With /usr/sbin hidden (an
    empty directory mounted over it, in a mount namespace of the test's own) and as
    nobody, so that nothing is installed, ensure-peers must name iptables as missing."""
    if os.geteuid() != 0:
        _unavailable("a mount namespace needs root")
    script = Path(__file__).resolve().parent.parent / "scripts" / "ensure-peers"
    empty = tmp_path / "empty"
    empty.mkdir()
    # The script on stdin, opened as root: nobody may not be able to reach a clone under
    # a directory only root can enter (/root), and the test is about apt, not about that.
    hidden = (f"mount --bind {empty} /usr/sbin && exec setpriv --reuid=65534 --regid=65534 "
              f"--clear-groups env PATH=/usr/bin:/bin:/usr/sbin:/sbin bash -s < {script}")
    result = subprocess.run(["unshare", "--mount", "sh", "-c", hidden],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result
    # "ensure-peers: missing haproxy iptables; run as root or install them with apt-get"
    [line] = [line for line in result.stderr.splitlines() if " missing " in line]
    packages = line.split(" missing ", 1)[1].split(";", 1)[0].split()
    assert "iptables" in packages, line


    assert "iptables" in packages, line


_STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> {log}
case "$(basename "$0") $*" in
  "apt-get install "*) touch {installed} ;;
  "apt-cache "*) exit 1 ;;
  "systemctl is-active --quiet ssh") exit 0 ;;  # the host's, running before
  "systemctl is-active --quiet redis-server") [ -e {installed} ] || exit 3 ;;
  "systemctl is-active "*) exit 3 ;;
esac
exit 0
"""


def test_scripts_ensure_peers_stops_only_the_services_its_install_started(
    tmp_path: Path,
) -> None:
    """Where a policy-rc.d of the host's own lets the install start services, ensure-peers
    stops what the install started: redis-server, inactive before and active after. The
    host's sshd, active before, is left running. apt-get, apt-cache and systemctl are stubs
    on PATH that log their arguments; /usr/sbin is hidden (an empty directory mounted over
    it, in a mount namespace of the test's own), so that the policy-rc.d the script writes
    where none exists lands there, never on the host."""
    if os.geteuid() != 0:
        _unavailable("ensure-peers installs only as root, and a mount namespace needs root")
    script = Path(__file__).resolve().parent.parent / "scripts" / "ensure-peers"
    stubs, empty, log = tmp_path / "bin", tmp_path / "empty", tmp_path / "log"
    stubs.mkdir()
    empty.mkdir()
    for name in ("apt-get", "apt-cache", "systemctl"):
        stub = stubs / name
        stub.write_text(_STUB.format(log=log, installed=tmp_path / "installed"))
        stub.chmod(0o755)
    locks = tmp_path / "locks"  # the script's lock file there, not in the host's /run/lock
    locks.mkdir()
    hidden = (f"mount --bind {empty} /usr/sbin && mkdir -p /run/lock && "
              f"mount --bind {locks} /run/lock && exec {script} no-such-tool")
    result = subprocess.run(["unshare", "--mount", "sh", "-c", hidden],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={"PATH": f"{stubs}:/usr/bin:/bin"})
    assert result.returncode == 0, result
    calls = log.read_text().splitlines()
    assert any(call.startswith("apt-get install ") and call.endswith(" no-such-tool")
               for call in calls), calls
    assert [call for call in calls if call.startswith("systemctl stop ")] == [
        "systemctl stop redis-server"], calls
    assert list(empty.iterdir()) == []  # its policy-rc.d removed after the install


# apt-get's install lasts until the test lets it end, then puts the program in place; it
# says so if it got ensure-peers' lock descriptor (which a daemon it starts would keep).
_SLOW_STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> {log}
case "$(basename "$0") $*" in
  "apt-get install "*)
    [ -e /proc/$$/fd/9 ] && echo "lock descriptor inherited" >> {log}
    while [ ! -e {gate} ]; do sleep 0.05; done
    printf '#!/bin/sh\\n' > {stubs}/no-such-tool && chmod 755 {stubs}/no-such-tool ;;
  "apt-cache "*) exit 1 ;;
  "systemctl "*) exit 3 ;;
esac
exit 0
"""


def waiting_for_a_lock(pid: int) -> bool:
    """Process `pid` or a child of it waits for a file lock (a `->` line in /proc/locks)."""
    pids = {str(pid)} | {str(child) for child, _ in processes_under(pid)}
    return any(line.split()[5] in pids for line in Path("/proc/locks").read_text().splitlines()
               if line.split()[1] == "->")


def test_scripts_ensure_peers_run_twice_at_once_installs_once(tmp_path: Path) -> None:
    """Two test runs starting together (two checkouts on one machine) both ran apt-get:
    with the real apt the second failed at once on dpkg's lock (exit 100, "Could not get
    lock /var/lib/dpkg/lock-frontend"), or installed after the first had removed its
    policy-rc.d. The second waits for the first now, then finds nothing missing. apt-get
    is a stub whose install lasts until the test lets it end; /usr/sbin (policy-rc.d) and
    /run/lock (the scripts' lock) are the test's own, in a mount namespace both runs share."""
    if os.geteuid() != 0:
        _unavailable("ensure-peers installs only as root, and a mount namespace needs root")
    script = Path(__file__).resolve().parent.parent / "scripts" / "ensure-peers"
    stubs, empty, locks = tmp_path / "bin", tmp_path / "empty", tmp_path / "locks"
    log, gate = tmp_path / "log", tmp_path / "gate"
    for folder in (stubs, empty, locks):
        folder.mkdir()
    for name in ("apt-get", "apt-cache", "systemctl"):
        stub = stubs / name
        stub.write_text(_SLOW_STUB.format(log=log, gate=gate, stubs=stubs))
        stub.chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin"}
    hidden = (f"mount --bind {empty} /usr/sbin && mkdir -p /run/lock && "
              f"mount --bind {locks} /run/lock && exec {script} no-such-tool")
    first = subprocess.Popen(["unshare", "--mount", "sh", "-c", hidden], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: log.exists() and "apt-get install" in log.read_text(), 30,
                 "the first run's apt-get install")
        # In the first's mount namespace: `first` is the script itself by now (exec).
        second = subprocess.Popen(["nsenter", f"--mount=/proc/{first.pid}/ns/mnt",
                                   str(script), "no-such-tool"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = second
        wait_for(lambda: (started.poll() is not None or waiting_for_a_lock(started.pid)
                          or log.read_text().count("apt-get install") > 1), 30,
                 "the second run waiting, ending, or installing")
    finally:
        gate.touch()
        outs = [proc.communicate(timeout=60)[0] for proc in (first, second)
                if proc is not None]
    assert first.returncode == 0, outs
    assert second.returncode == 0, outs
    installs = [call for call in log.read_text().splitlines() if call.startswith("apt-get ")]
    assert len(installs) == 1 and installs[0].startswith("apt-get install "), installs
    assert "lock descriptor inherited" not in log.read_text()
    assert list(empty.iterdir()) == []  # the first's policy-rc.d removed after its install


@pytest.fixture(scope="module")
def chain_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    if os.geteuid() != 0:
        _unavailable("network namespaces need root")
    missing = netns.missing_tools(CHAIN_TOOLS)
    if missing:
        _unavailable(f"missing tools: {', '.join(missing)}")
    with Lab(tmp_path_factory.mktemp("chain")) as lab:
        client = lab.namespace("chain-client")
        server = lab.namespace("chain-server")
        cable = lab.cable(client, CLIENT_ADDR, server, SERVER_ADDR)
        with in_network(server.path):
            listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        sink = Sink(listener)
        sink.start()
        try:
            yield Chain(lab, forkproxy_command(), client, server, cable, sink)
        finally:
            sink.close()


@pytest.fixture
def chain(chain_lab: Chain) -> Iterator[Chain]:
    """The module's lab; the ambassadors a test starts are stopped, and the cable healed,
    after it."""
    started = len(chain_lab.lab.processes)
    chain_lab.sink.uploads.clear()
    try:
        yield chain_lab
    finally:
        for proc in reversed(chain_lab.lab.processes[started:]):
            chain_lab.lab.stop(proc, timeout=5.0)
        chain_lab.heal()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def read_to_end(sock: socket.socket) -> tuple[str, int, str]:
    """("eof" | "reset", bytes read, sha256 of them)."""
    digest, count = hashlib.sha256(), 0
    try:
        while data := sock.recv(1 << 20):
            digest.update(data)
            count += len(data)
    except ConnectionResetError:
        return "reset", count, digest.hexdigest()
    return "eof", count, digest.hexdigest()


def close_lines(proc: Process) -> list[str]:
    return [ln for ln in proc.stderr().splitlines() if " close " in ln]


def test_a_stop_that_cuts_transfers_resets_both_ends_never_a_clean_eof(chain: Chain) -> None:
    """The far ambassador is stopped while transfers cross a slow cable; its grace runs
    out. The connections it kills lose bytes both ways: the consumer must see its download
    end with a reset (not an EOF that makes the half it got look whole), and the sink must
    see the upload end with a reset (not an EOF after which it takes the truncated upload
    for a complete one). The near ambassador says upstream-reset, not closed."""
    size = 64 << 20  # far more than the slowed cable carries in the test's time
    far, near = chain.ambassadors("--grace", "1")
    chain.slow_cable("4mbit")
    downloads = [chain.connect(near) for _ in range(3)]
    uploads = [chain.connect(near) for _ in range(3)]
    results: dict[int, tuple[str, int, str]] = {}

    def download(i: int, sock: socket.socket) -> None:
        sock.sendall(b"down %d\n" % size)
        results[i] = read_to_end(sock)

    def upload(i: int, sock: socket.socket) -> None:
        try:
            sock.sendall(b"up %d\n" % size + pattern(size, i))
            sock.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            # The reset came while sending: send() took the error (EPIPE once a FIN
            # came first), so a read would only find the end of the stream.
            results[i] = ("reset", 0, "")
            return
        results[i] = read_to_end(sock)

    threads = [threading.Thread(target=download, args=(i, s)) for i, s in enumerate(downloads)]
    threads += [threading.Thread(target=upload, args=(10 + i, s)) for i, s in enumerate(uploads)]
    for thread in threads:
        thread.start()
    try:
        # Every transfer is under way through both ambassadors before the stop.
        wait_for(lambda: len(close_lines(far)) == 0 and far.stderr().count(" open ") == 6,
                 30.0, "six connections through the far ambassador")
        time.sleep(1.0)
        far.popen.terminate()
        assert far.popen.wait(30) == 0, far.describe()
        for thread in threads:
            thread.join(120)
        assert not any(t.is_alive() for t in threads), results
    finally:
        for sock in downloads + uploads:
            sock.close()
    killed = [ln for ln in far.stderr().splitlines() if "outcome=killed" in ln]
    assert len(killed) == 6, far.describe()
    for i in range(3):
        outcome, count, _ = results[i]
        assert count < size and outcome == "reset", (results, near.describe())
    for i in range(10, 13):
        outcome, count, _ = results[i]
        assert (outcome, count) == ("reset", 0), (results, near.describe())
    # The sink never took a cut upload for a whole one.
    wait_for(lambda: len(chain.sink.uploads) == 3, 30.0, "the sink's three uploads")
    assert chain.sink.uploads == [("reset", -1)] * 3, chain.sink.uploads
    # A child resets its client, then writes its close line.
    wait_for(lambda: len(close_lines(near)) == 6, 30.0, "the near ambassador's close lines")
    outcomes = [re.search(r"outcome=(\S+)", ln)[1] for ln in close_lines(near)]  # type: ignore[index]
    assert outcomes == ["upstream-reset"] * 6, (outcomes, near.describe())


def test_lossy_slow_cable_loses_adds_and_reorders_nothing_and_resets_cross(
    chain: Chain,
) -> None:
    """3% of packets dropped at random each way and a slowed cable: 24 concurrent
    connections through both ambassadors, uploads that half-close and wait for the sink's
    hash of what it got, downloads hashed at the consumer, with several relay modes.
    Then a sink that answers and resets: the consumer gets the answer, then a reset."""
    far, near = chain.ambassadors()
    chain.slow_cable("40mbit")
    for ns in (chain.client, chain.server):
        ns.run(["iptables", "-A", "INPUT", "-m", "statistic", "--mode", "random",
                "--probability", "0.03", "-j", "DROP"])
    sizes = [1, 1000, 70_000, 3 << 20]
    failures: list[str] = []

    def upload(i: int) -> None:
        data = pattern(sizes[i % len(sizes)], i)
        with chain.connect(near) as sock:
            sock.sendall(b"up %d\n" % len(data) + data)
            sock.shutdown(socket.SHUT_WR)  # and wait for the rest of the reply
            reply = read_to_end(sock)
        want = b"%d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode())
        if reply != ("eof", len(want), hashlib.sha256(want).hexdigest()):
            failures.append(f"upload {i} of {len(data)}: {reply}")

    def download(i: int) -> None:
        size = sizes[i % len(sizes)]
        with chain.connect(near) as sock:
            sock.sendall(b"down %d\n" % size)
            got = read_to_end(sock)
        if got != ("eof", size, hashlib.sha256(pattern(size)).hexdigest()):
            failures.append(f"download {i} of {size}: {got}")

    def run(transfer: Callable[[int], None], i: int) -> None:
        try:
            transfer(i)
        except OSError as exc:
            failures.append(f"{transfer.__name__} {i}: {exc!r}")

    threads = [threading.Thread(target=run, args=(f, i)) for i in range(12)
               for f in (upload, download)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    assert not any(t.is_alive() for t in threads), "transfers still running after 240 s"
    assert not failures, (failures, near.describe(), far.describe())
    # A child closes its client, then writes its close line.
    wait_for(lambda: len(close_lines(near)) == 24, 30.0, "the near ambassador's close lines")
    # Every one ended cleanly, and says who ended first: an upload's client half-closed
    # (`closed`), a download's sink closed after its last byte (`upstream-closed`), at
    # the near ambassador as at the far one, which passed the sink's FIN on.
    wait_for(lambda: len(close_lines(far)) == 24, 30.0, "the far ambassador's close lines")
    for proc in (near, far):
        outcomes = sorted(re.search(r"outcome=(\S+)", ln)[1]  # type: ignore[index]
                          for ln in close_lines(proc))
        assert outcomes == ["closed"] * 12 + ["upstream-closed"] * 12, proc.describe()

    # An RST crosses both ambassadors as an RST, after what came before it (a prefix: the
    # far ambassador's reset discards what it has not delivered yet). On a healed cable:
    # TCP never retransmits an RST, so one lost (dropped at random, or by a full token
    # bucket) would leave the near side waiting, which is what --idle-timeout is for.
    chain.heal()
    for size in (0, 1000, 1 << 20):
        with chain.connect(near) as sock:
            sock.sendall(b"rst %d\n" % size)
            outcome, count, digest = read_to_end(sock)
        assert outcome == "reset", (size, outcome, count, near.describe())
        assert digest == hashlib.sha256(pattern(size)[:count]).hexdigest(), (size, count)
    wait_for(lambda: len(close_lines(near)) == 27, 30.0, "the near ambassador's close lines")
    resets = [ln for ln in close_lines(near) if "outcome=upstream-reset" in ln]
    assert len(resets) == 3, near.describe()
