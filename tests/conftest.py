"""Shared fixtures: the real CLI in a subprocess, real redis, and small TCP peers of our own.

No peer is ever skipped: `./scripts/test` installs them, and a missing one fails the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import random
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

import netns

BIN = Path(sys.executable).parent
FORKPROXY = str(BIN / "forkproxy")
T = TypeVar("T")
# Link variables listen on 0.0.0.0 by default, every interface of the host: tests that
# serve them outside a network namespace of their own add this, to stay on loopback.
LOOPBACK = ("--bind", "127.0.0.1")

# What the caller's environment would hand every proxy a test starts (most start with a copy
# of os.environ): FORKPROXY_* variables are its options (FORKPROXY_ALIAS=x failed each
# start that gives a SPEC, FORKPROXY_BIND moved listeners), and link variables, which
# Docker (--link) and Kubernetes (a variable per service: KUBERNETES_PORT_443_TCP) put in
# the environment a CI job runs in, are links to --from-env. Removed once, before any test.
_CALLERS_LINK = re.compile(r"[A-Za-z0-9_.]*_PORT_[0-9]+_(TCP|UDP|SCTP)(_ADDR|_PORT|_PROTO)?\Z")
for _name in [name for name in os.environ
              if name.startswith("FORKPROXY_") or _CALLERS_LINK.match(name)]:
    del os.environ[_name]

# Hypothesis keeps its example database and caches in .hypothesis/ under the working
# directory: a run started elsewhere (`pytest /path/to/tests` from $HOME, or from /) left
# one there. The repository's own (git-ignored) is used wherever the run starts from,
# unless the caller chose one (HYPOTHESIS_STORAGE_DIRECTORY).
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(__file__).resolve().parent.parent / ".hypothesis")


@contextlib.contextmanager
def netns_lab(prefix: str) -> Iterator[netns.Lab]:
    """A netns.Lab in a fresh directory under /tmp (short paths for unix sockets), removed
    with it; missing tools (ip, unshare...) fail the test."""
    missing = netns.missing_tools()
    if missing:
        pytest.fail(f"missing {', '.join(missing)} (run ./scripts/test as root)")
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        with netns.Lab(workdir) as lab:
            yield lab
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_network(namespace: str) -> Iterator[None]:
    """Run the block with this thread in the network namespace at path `namespace`
    (`/proc/PID/ns/net`, `/run/netns/NAME`), then back: sockets made there stay there,
    and a URL opened there reaches that namespace's loopback."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(namespace, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)

def need(program: str) -> str:
    """The path of a peer program; its absence fails the test (never a skip)."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed: run ./scripts/test, which installs it")
    return path


def as_user(uid: int) -> tuple[str, ...]:
    """A prefix running a command as `uid` (and gid), no other groups. Checked first that
    this interpreter starts as that user: pyenv's under root's 0700 home does not (its
    libpython is root's alone), and the test then failed on an assertion naming neither."""
    prefix = (need("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups")
    probe = subprocess.run([*prefix, sys.executable, "-c", ""], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        said = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        pytest.fail(f"{sys.executable} does not start as uid {uid} ({said}): this test runs "
                    "it as another user; use a Python every user can run (not one under a "
                    "0700 home, as pyenv's under /root)")
    return prefix


def in_own_network(somaxconn: int = 4096) -> tuple[str, ...]:
    """start_proxy's `prefix`: the proxy in a network namespace of its own (loopback up,
    net.core.somaxconn set there only), gone with it."""
    return (need("unshare"), "--net", "sh", "-c",
            f'ip link set lo up && echo {somaxconn} >/proc/sys/net/core/somaxconn && '
            'exec "$0" "$@"')


@dataclass
class Proxy:
    proc: subprocess.Popen[str]
    lines: list[str]
    stderr: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def network(self) -> str:
        """The supervisor's network namespace's file (what `in_network` takes)."""
        return f"/proc/{self.pid}/ns/net"

    @property
    def ports(self) -> list[int]:
        return [int(line.split(" -> ")[0].rsplit(":", 1)[1]) for line in self.lines
                if line.startswith("listening ")]

    @property
    def port(self) -> int:
        return self.ports[0]

    def log(self) -> str:
        return self.stderr.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # What held the stop, taken before the kill: the supervisor's state (T: left
            # stopped, as by a tracer) and what it waits in, its children's, and its log.
            held = describe_process(self.pid) + "".join(
                f"\n  child {describe_process(pid)}" for pid, _ in processes_under(self.pid))
            kill_group(self.proc)
            raise AssertionError(f"no exit within {timeout} s of {signal.Signals(sig).name}: "
                                 f"{held}\n--- log ---\n{self.log()[-4000:]}") from None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)


def reset_close(sock: socket.socket) -> None:
    """Close `sock` with an RST (SO_LINGER 0), as a peer that gives up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)


def read_lines(proc: subprocess.Popen[str], count: int, timeout: float) -> list[str]:
    """Read `count` lines of stdout (unbuffered, so no line hides in a buffer)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while data.count(b"\n") < count:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data.decode().splitlines()[:count]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path is 108 bytes; tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="fpt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def control(path: Path, command: str) -> dict[str, Any]:
    """Ask the supervisor directly (what `forkproxy status/reload` do, without psutil)."""
    from forkproxy import status

    return status.request(str(path), command, timeout=30)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment for proxies and CLI calls: a private XDG_RUNTIME_DIR, no FORKPROXY_*."""
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FORKPROXY_")}
    clean["XDG_RUNTIME_DIR"] = str(runtime)
    return clean


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Start `forkproxy serve ARGS` in its own session; wait for its `listening` lines.

    Without `env`, the test's proxies get a status socket directory of their own: in the
    shared default one, every supervisor that starts on the machine (another test run's)
    probes every socket, so ours would accept and close a connection at any moment, and
    a test that counts its descriptors or lowers its RLIMIT_NOFILE would see one more.
    """
    started: list[Proxy] = []
    wrapped: set[int] = set()  # pids of proxies started under a `prefix` (unshare, strace)
    runtime = Path(tempfile.mkdtemp(prefix="fpr-", dir="/tmp"))  # short: sun_path

    def start(*args: str, expect: int = 1, env: dict[str, str] | None = None,
              timeout: float = 15, prefix: tuple[str, ...] = ()) -> Proxy:
        if env is None:
            env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
        stderr = tmp_path / f"proxy-{len(started)}.log"
        with stderr.open("w") as err:
            proc = subprocess.Popen(
                [*prefix, FORKPROXY, "serve", *args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                start_new_session=True,
            )
        proxy = Proxy(proc, [], stderr)
        started.append(proxy)
        if prefix:
            wrapped.add(proc.pid)
        proxy.lines = read_lines(proc, expect, timeout)
        if len(proxy.lines) < expect:
            kill_group(proc)
            pytest.fail(f"proxy did not start: {proxy.lines} {stderr.read_text()}")
        return proxy

    yield start
    for proxy in started:
        if proxy.proc.poll() is None:
            if proxy.pid in wrapped:
                # A wrapper that forks (`unshare --fork` ignores SIGTERM while it waits)
                # or traces (strace) kept the TERM from the supervisor under it: the stop
                # waited out the 12 s below for nothing. Its whole group gets it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proxy.pid, signal.SIGTERM)
            else:
                proxy.proc.send_signal(signal.SIGTERM)
            try:
                proxy.proc.wait(12)
            except subprocess.TimeoutExpired:
                pass
        kill_group(proxy.proc)
        if proxy.proc.stdout is not None:
            proxy.proc.stdout.close()
    shutil.rmtree(runtime, ignore_errors=True)


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a process the test starts to bind, below the
    kernel's ephemeral range (as test_soak.listen_ports). One the kernel picked (port 0)
    came from that range, which it hands out again to every bind to port 0 and every
    connect() of any process: now and then one took the port before the proxy bound it,
    which then failed to start, or left the test's client talking to another program
    (test_serve_runs_with_standard_fds_closed timed out so). Below the range only
    another program choosing its port itself can take it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as handle:
        low = int(handle.read().split()[0])
    for _ in range(100):
        with socket.socket() as sock:
            try:
                # (A range set so low as to leave no room: the kernel's choice, as before.)
                sock.bind(("127.0.0.1", random.randrange(10000, low) if low > 11000 else 0))
            except OSError:  # in use
                continue
            return int(sock.getsockname()[1])
    raise AssertionError(f"no free port found below {low}")


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process `pid` listens on, from its sockets' inodes in the kernel's
    tables: for a proxy told port 0 (free_port's port is free only until somebody else
    binds it) with no stdout to print which it got. [] before it listens (or once gone)."""
    held = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    ports = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name, encoding="ascii") as table:
            next(table)
            for fields in map(str.split, table):
                if fields[3] == "0A" and f"socket:[{fields[9]}]" in held:  # 0A: LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class Redis:
    port: int
    proc: subprocess.Popen[bytes]

    def cli(self, *args: str, port: int | None = None) -> str:
        out = subprocess.run(
            [need("redis-cli"), "-p", str(port or self.port), *args],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return out.stdout.strip()


@pytest.fixture
def redis() -> Iterator[Redis]:
    server = need("redis-server")
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--maxclients", "4000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        ours = False  # answering PING, and with our process's pid: not another program
        while time.monotonic() < deadline and proc.poll() is None and not ours:
            ours = _redis_pid(port) == proc.pid
            if not ours:
                time.sleep(0.05)
        if ours:
            yield Redis(port, proc)
            proc.terminate()
            proc.wait(10)
            return
        # Its port taken meanwhile (free_port races with other programs), or too slow:
        # this one goes, the next port is tried.
        proc.kill()
        proc.wait(10)
    pytest.fail("redis-server did not start")


def _redis_pid(port: int) -> int | None:
    """The process_id a redis on 127.0.0.1:port reports (INFO server), None if none."""
    try:
        with socket.create_connection(("127.0.0.1", port), 1) as sock:
            sock.settimeout(2)
            sock.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    found = re.search(rb"process_id:(\d+)", data)
    return int(found[1]) if found else None


Handler = Callable[[socket.socket], object]  # one per connection; what it returns is ignored
ServerFactory = Callable[[Handler], "TcpServer"]  # the tcp_server fixture: a server per handler


@dataclass
class TcpServer:
    """A threaded TCP server on loopback; `handler(conn)` runs per connection."""

    handler: Handler
    sock: socket.socket = field(init=False)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handler(conn)
        except BaseException as exc:
            # Kept for the tests that look (`server.errors`); not raised anywhere: many
            # handlers meet the resets their tests make on purpose.
            self.errors.append(exc)

    def close(self) -> None:
        """Stop accepting, then close: shutdown() wakes the acceptor's accept() (EINVAL,
        and at once for any it makes after), and the socket is closed only once the
        acceptor has returned. Closed first, its descriptor's number was free while the
        acceptor could still enter (or restart, after a signal) accept() on that number,
        by then another test's listener: it took that test's connections (as the Sink in
        test_chain_faults did, in CI)."""
        if self.sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.acceptor.join(30)
            assert not self.acceptor.is_alive(), "the server's acceptor did not stop"
            self.sock.close()
        for thread in self.threads:
            thread.join(30)


@pytest.fixture
def tcp_server() -> Iterator[ServerFactory]:
    servers: list[TcpServer] = []

    def make(handler: Handler) -> TcpServer:
        server = TcpServer(handler)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def recv_all(sock: socket.socket, digest: hashlib._Hash | None = None) -> tuple[int, str]:
    """Read to EOF; returns (byte count, sha256 hex)."""
    digest = digest or hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return total, digest.hexdigest()
        digest.update(data)
        total += len(data)


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll with a deadline (never a bare sleep): True as soon as `condition()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def poll(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 30.0) -> T:
    """Call `probe` until `done(value)` or the deadline; returns the last value, for the
    caller to assert on (its message then shows what was last seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


def full_pipe(pipe: tuple[int, int] | None = None) -> tuple[int, int]:
    """A pipe, (read end, write end), whose buffer is full: the next write to it blocks, as
    a log line does once a slow log reader (a container's log driver) falls behind.
    `pipe`: the one to fill (a new one by default)."""
    read_end, write_end = pipe or os.pipe()
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_end, b"x" * 4096)
    os.set_blocking(write_end, True)
    return read_end, write_end


def full_socket(kind: str) -> tuple[socket.socket, socket.socket]:
    """A connected pair of sockets, (reader, writer), the writer's buffers full: the next
    send blocks, as a log line does when stderr is a socket whose reader stopped
    (systemd's StandardError=journal, a log shipper's). `kind`: "stream" (AF_UNIX),
    "datagram" (AF_UNIX) or "tcp" (loopback, small buffers: it takes part of a send)."""
    if kind == "tcp":
        with socket.create_server(("127.0.0.1", 0)) as server:
            writer = socket.create_connection(server.getsockname()[:2])
            reader = server.accept()[0]
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    else:
        reader, writer = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM if kind == "stream" else socket.SOCK_DGRAM)
    with contextlib.suppress(BlockingIOError):
        while True:
            writer.send(b"x" * 100, socket.MSG_DONTWAIT)  # a datagram each, for "datagram"
    return reader, writer


def pending_signals(pid: int) -> set[int] | None:
    """The signals pending in process `pid` (its thread's and the process's); None once it
    is gone or has exited (a zombie takes no signal)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    if fields.get("State", "").startswith(("Z", "X")):
        return None
    mask = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return {signum for signum in range(1, 65) if mask & (1 << (signum - 1))}


def blocked_writing(pid: int) -> bool:
    """The process waits in write() to a full pipe (wchan pipe_write; anon_pipe_write on 6.x)."""
    try:
        return "pipe_write" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False  # gone


def polled(pid: int) -> list[tuple[int, int]] | None:
    """The (fd, events) process `pid` is blocked in poll() for: its system call
    (/proc/PID/syscall) and the pollfd array it passed (read from its memory); None when
    it is not in poll() (or is gone)."""
    machine = os.uname().machine
    numbers = {"x86_64": 7, "aarch64": 73}  # poll, or ppoll
    if machine not in numbers:
        pytest.fail(f"polled knows the poll system call's number on "
                    f"{', '.join(numbers)} only, not on this machine's {machine!r}: add it")
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
        if fields[0] != str(numbers[machine]):
            return None
        address, count = int(fields[1], 16), int(fields[2], 16)
        with open(f"/proc/{pid}/mem", "rb") as memory:
            memory.seek(address)
            table = memory.read(8 * count)  # struct pollfd: int fd; short events, revents
    except (OSError, ValueError, IndexError):
        return None  # not blocked in a system call, or gone
    return [(fd, events) for fd, events, _ in struct.iter_unpack("ihh", table)]


def polling_for_room(pid: int, fd: int) -> bool:
    """Whether process `pid` is blocked in poll() waiting for room to write on `fd`."""
    return any(polled_fd == fd and events & select.POLLOUT
               for polled_fd, events in polled(pid) or [])


def signals_pending(pid: int) -> int:
    """The signals pending for a process (thread and process-wide), as a bit mask."""
    mask = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("SigPnd:", "ShdPnd:")):
                mask |= int(line.split()[1], 16)
    return mask


def deliver_signal(pid: int, signum: int) -> None:
    """Send a signal and wait until the kernel has delivered it (no longer pending), so
    that the next one is a delivery of its own rather than folded into this one."""
    os.kill(pid, signum)
    assert wait_for(lambda: not signals_pending(pid) & (1 << (signum - 1)), timeout=30)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def describe_process(pid: int) -> str:
    """`PID state S wchan do_sys_poll`: what a process is doing, for a failure message."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return f"{pid} gone"
    return f"{pid} state {state} wchan {wchan or '-'}"


def processes_under(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of each child process of `pid`, zombies (state Z) included."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            # Bytes: any process's name may be any bytes, not UTF-8 (a test's, another run's)
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[1]) == pid:
            found.append((int(name), fields[0].decode()))
    return found


def metrics_pid(supervisor: int) -> int:
    """The pid of `supervisor`'s metrics process (started from its loop soon after the
    `metrics` line), 0 if it has none. Found by its command line, never as "the only
    child": a status read or a scrape forks a short-lived reporter child, which is
    there (a zombie, for a moment, once it has answered) after the reply is in.
    0 too until the child has exec'd _metrics_main.py, which status's `up` (and its pid) do
    not wait for: a caller that just saw `up` waits for a pid here."""
    for pid, _ in processes_under(supervisor):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if b"_metrics_main.py" in cmdline.read():
                return pid
    return 0


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the other end closes (FIN or RST) within `timeout`, False if it stays open."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)


# fresh_cgroup's names: `forkproxy-test-<pid of the test run>-<ns>`, stale once that pid
# is gone.
_STALE_CGROUP = re.compile(r"forkproxy-test-(?P<pid>[0-9]+)-[0-9]+\Z")


def sweep_stale_cgroups(parent: Path) -> list[Path]:
    """Remove the cgroups under `parent` that a run killed outright (SIGKILL: a CI job's
    timeout, the OOM killer) left, its `finally` never reached: kept for good, a frozen
    one with the processes the test had frozen in it. Those processes (the run's own,
    put there by its test) are thawed and killed first."""
    removed = []
    for group in parent.glob("forkproxy-test-*"):
        match = _STALE_CGROUP.fullmatch(group.name)
        if match is None or netns.pid_alive(int(match["pid"])):
            continue
        for state, off in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            with contextlib.suppress(OSError):  # not this hierarchy's file
                (group / state).write_text(off)
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY while its processes exit
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        removed.append(group)
    return removed


@contextlib.contextmanager
def fresh_cgroup(controller: str) -> Iterator[tuple[Path, bool]]:
    """A fresh cgroup of `controller` (its v1 hierarchy, or v2 with the controller on):
    (its path, whether v1); removed once its processes exit. Those a killed run left
    there are removed first (sweep_stale_cgroups)."""
    v1 = Path("/sys/fs/cgroup") / controller
    v2 = Path("/sys/fs/cgroup")
    if v1.is_dir():
        parent = v1
    elif (controller == "freezer"  # no v2 controller: each cgroup but the root can freeze
          or controller in (v2 / "cgroup.subtree_control").read_text().split()):
        parent = v2
    else:
        pytest.fail(f"no {controller} cgroup controller: this test needs one "
                    "(root, cgroup v1 or v2)")
    sweep_stale_cgroups(parent)
    group = parent / f"forkproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        yield group, parent == v1
    finally:
        deadline = time.monotonic() + 15
        while True:
            try:
                group.rmdir()
                break
            except OSError:  # EBUSY while its last processes exit
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@contextlib.contextmanager
def frozen(*pids: int) -> Iterator[None]:
    """Processes `pids` alone in a fresh freezer cgroup, frozen (`docker pause`'s way: they
    run no instruction and die of a signal only once thawed) for the block; children they
    fork meanwhile are frozen with them. Thawed at the end, and moved to the parent
    cgroup, so that this one can go even if they live on."""
    with fresh_cgroup("freezer") as (group, v1):
        for pid in pids:
            (group / "cgroup.procs").write_text(str(pid))
        state, on, off = (("freezer.state", "FROZEN", "THAWED") if v1
                          else ("cgroup.freeze", "1", "0"))
        try:
            (group / state).write_text(on)
            assert wait_for(lambda: on in (group / state).read_text())
            yield
        finally:
            (group / state).write_text(off)  # what is pending (a SIGKILL) is acted on
            for member in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # gone: nothing to put back
                    (group.parent / "cgroup.procs").write_text(member)


FAN_CLASS_CONTENT, FAN_CLOEXEC, FAN_MARK_ADD, FAN_OPEN_PERM, FAN_ALLOW = 0x4, 0x1, 0x1, 0x10000, 0x1
FANOTIFY_EVENT = struct.Struct("IBBHQii")  # struct fanotify_event_metadata
FANOTIFY_RESPONSE = struct.Struct("iI")  # struct fanotify_response


class OpenGate:
    """Every open(2) of one file waits in the kernel until the test lets it through
    (fanotify's FAN_OPEN_PERM, root): a point inside the proxy's own work (a reload reads
    its env file, a start writes its pid file) where the test acts while the proxy's loop
    is held, wherever its timers stand. Stopping the proxy (SIGSTOP, the freezer) could
    not give that: a fork retry due at the resume ran before the SIGHUP sent meanwhile,
    at a stop that landed as its poll timed out, and at one inside the poll that outlasted
    the poll's timeout (CPython retries a poll that a signal interrupted only if its
    timeout is not over)."""

    def __init__(self, path: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                            ctypes.c_int, ctypes.c_char_p]
        self.fd = int(self.libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY))
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init (this test needs root)")
        if self.libc.fanotify_mark(self.fd, FAN_MARK_ADD, FAN_OPEN_PERM, -100,  # AT_FDCWD
                                   os.fsencode(path)) != 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"fanotify_mark {path}")
        self.waiting: list[int] = []  # the event fds of the opens held

    def held_open(self, timeout: float = 30) -> int:
        """Wait for the next open of the file, and hold it: the opener's pid."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        assert ready, f"the file was not opened within {timeout}s"
        event = os.read(self.fd, FANOTIFY_EVENT.size)  # one event per read: no batch to split
        _, _, _, _, _, event_fd, pid = FANOTIFY_EVENT.unpack(event)
        self.waiting.append(event_fd)
        return int(pid)

    def let_through(self) -> None:
        """The opens held go on."""
        for event_fd in self.waiting:
            os.write(self.fd, FANOTIFY_RESPONSE.pack(event_fd, FAN_ALLOW))
            os.close(event_fd)
        self.waiting = []

    def __enter__(self) -> OpenGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.let_through()
        os.close(self.fd)  # opens still to come pass (the kernel allows those of a closed group)
