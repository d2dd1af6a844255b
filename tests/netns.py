"""Hosts made of Linux network namespaces, for the two-host ambassador tests and demo.

A `Lab` owns everything it creates: namespaces (one per "host"), veth pairs ("cables")
between them, and the processes started inside them with `ip netns exec`. Leaving the
`with Lab(...)` block stops the processes (SIGTERM, then SIGKILL of their process group)
and deletes the namespaces, whatever happened inside it.

The module also holds the long-lived consumer used by the tests and by
scripts/two-hosts-demo (`python3 tests/netns.py consumer --help`): it reconnects to the
local ambassador in a loop, like a connection pool would, and reports each attempt.

Standard library only, so the demo can run it with any python3. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

# Every namespace this module creates is called `<NAME_BASE>-<pid of the creator>-<host>`:
# unique per run, and recognisable as stale once that pid is gone.
NAME_BASE = "fpx2h"
_STALE = re.compile(rf"^{NAME_BASE}-(?P<pid>[0-9]+)-")
# What a process started with `env -i` gets; Docker gives containers a PATH too.
PLAIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LabError(RuntimeError):
    """A command that builds the lab failed, or a process did not come up."""


def run(argv: Sequence[str], *, timeout: float = 15.0, check: bool = True) -> str:
    """Run a short command; return its stdout. Failure -> LabError naming the command."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout} s") from exc
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def missing_tools(names: Sequence[str] = ("ip", "redis-server", "redis-cli")) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's too): a run's names carry its pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespace_pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False)
    return [int(word) for word in out.split() if word.isdigit()]


# `ip netns exec NAME` mounts the files in /etc/netns/NAME over /etc's (the tests' hosts
# and resolv.conf); `ip netns del` leaves that directory.
ETC_NETNS = Path("/etc/netns")


def _delete_namespace(name: str) -> None:
    """Kill what still runs inside (only ever our own processes) and delete it, with its
    /etc/netns/NAME: a test removes its own in a `finally`, which a run killed outright
    (SIGKILL) never reached, and the directory stayed in /etc for good."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _namespace_pids(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and _namespace_pids(name):
            time.sleep(0.05)
    run(["ip", "netns", "del", name], check=False)
    shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


def sweep_stale_namespaces() -> list[str]:
    """Delete namespaces left by an earlier run of this module that was killed outright,
    and their /etc/netns directories (those of namespaces already gone too)."""
    removed = []
    names = {line.split()[0] for line in run(["ip", "netns", "list"], check=False).splitlines()
             if line.split()}
    with contextlib.suppress(FileNotFoundError):
        names.update(os.listdir(ETC_NETNS))
    for name in sorted(names):
        match = _STALE.match(name)
        if match and not pid_alive(int(match["pid"])):
            _delete_namespace(name)
            removed.append(name)
    return removed


@dataclass
class Namespace:
    """One host: a network namespace with its loopback up."""

    name: str
    host: str

    @property
    def path(self) -> str:
        """The namespace's file (what setns(2) opens; `conftest.in_network` takes it)."""
        return f"/run/netns/{self.name}"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args])

    def run(self, argv: Sequence[str], *, timeout: float = 15.0, check: bool = True) -> str:
        return run(self.exec_argv(argv), timeout=timeout, check=check)

    def mac(self, dev: str) -> str:
        info = json.loads(self.ip("-j", "link", "show", "dev", dev))
        return str(info[0]["address"])

    def tcp_listeners(self) -> list[str]:
        """Local addresses of the TCP sockets listening in this namespace (`ss -ltnH`)."""
        out = self.run(["ss", "-ltnH"])
        return [line.split()[3] for line in out.splitlines() if line.strip()]


@dataclass
class Cable:
    """A veth pair: `near` end (the client side) and `far` end (the server side).

    Both ends get static, permanent neighbour entries, so neither side ever needs ARP.
    `cut()` takes the far end down: the near side keeps its address, its route (flagged
    linkdown) and its permanent neighbour entry, so a SYN sent to the far address is
    dropped silently, as when a cable is pulled at the other host - no RST, no ICMP.
    """

    near: Namespace
    near_dev: str
    near_addr: str
    far: Namespace
    far_dev: str
    far_addr: str
    prefix_len: int = 24

    def create(self) -> None:
        run(
            f"ip link add {self.near_dev} netns {self.near.name} type veth"
            f" peer name {self.far_dev} netns {self.far.name}".split()
        )
        self.near.ip("addr", "add", f"{self.near_addr}/{self.prefix_len}", "dev", self.near_dev)
        self.far.ip("addr", "add", f"{self.far_addr}/{self.prefix_len}", "dev", self.far_dev)
        self.near.ip("link", "set", self.near_dev, "up")
        self.far.ip("link", "set", self.far_dev, "up")
        self.pin_neighbours()

    def pin_neighbours(self) -> None:
        for ns, dev, peer_addr, peer_mac in (
            (self.near, self.near_dev, self.far_addr, self.far.mac(self.far_dev)),
            (self.far, self.far_dev, self.near_addr, self.near.mac(self.near_dev)),
        ):
            ns.ip("neigh", "replace", peer_addr, "lladdr", peer_mac, "dev", dev, "nud", "permanent")

    def cut(self) -> None:
        """Pull the cable out at the far end."""
        self.far.ip("link", "set", self.far_dev, "down")

    def restore(self) -> None:
        self.far.ip("link", "set", self.far_dev, "up")
        # Taking a link down flushes its neighbour entries, permanent ones included.
        self.pin_neighbours()


@dataclass
class Process:
    """A process started in a namespace, its own session, stdout and stderr in files."""

    label: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    status_socket: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        status = "running" if self.alive() else f"exited {self.popen.returncode}"
        return (
            f"{self.label} (pid {self.pid}, {status}): {' '.join(self.argv)}\n"
            f"--- stdout ---\n{self.stdout()[-3000:]}\n--- stderr ---\n{self.stderr()[-3000:]}"
        )

    def wait_stdout(self, ready: Callable[[list[str]], bool], timeout: float) -> list[str]:
        """Poll stdout until `ready(lines)`; LabError if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.stdout().splitlines()
            if ready(lines):
                return lines
            if not self.alive():
                raise LabError(f"exited before it was ready:\n{self.describe()}")
            if time.monotonic() > deadline:
                raise LabError(f"not ready within {timeout} s:\n{self.describe()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL; then kill what is left of its group."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        # Children (e.g. per-connection relays) share the session we gave the process.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.popen.returncode


@dataclass
class Lab:
    """Namespaces, cables and processes, all removed on exit."""

    workdir: Path
    tag: str = field(default_factory=lambda: f"{NAME_BASE}-{os.getpid()}")
    namespaces: list[Namespace] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    started: int = 0

    def __enter__(self) -> Lab:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sweep_stale_namespaces()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        errors: list[str] = []
        for proc in reversed(self.processes):
            try:
                proc.stop(timeout=5.0)
            except Exception as exc:  # keep tearing down the rest
                errors.append(f"{proc.label}: {exc!r}")
        self.processes.clear()
        for ns in reversed(self.namespaces):
            _delete_namespace(ns.name)
        self.namespaces.clear()
        if errors:
            raise LabError("teardown: " + "; ".join(errors))

    def namespace(self, host: str) -> Namespace:
        ns = Namespace(f"{self.tag}-{host}", host)
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def cable(
        self, near: Namespace, near_addr: str, far: Namespace, far_addr: str, *, dev: str = "eth0"
    ) -> Cable:
        """Connect `near` to `far`: the near end is named after the far host, the far end `dev`."""
        cable = Cable(near, f"to-{far.host}"[:15], near_addr, far, dev, far_addr)
        cable.create()
        return cable

    def spawn(
        self,
        ns: Namespace,
        argv: Sequence[str],
        *,
        label: str,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """Start `argv` in `ns`. With `env`, the process sees exactly that environment."""
        inner = list(argv)
        if env is not None:
            inner = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *inner]
        full = ns.exec_argv(inner)
        self.started += 1
        out_path = self.workdir / f"{self.started:02d}-{label}.out"
        err_path = self.workdir / f"{self.started:02d}-{label}.err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            # `ip netns exec` and `env` both exec, so popen.pid is the program itself.
            popen = subprocess.Popen(
                full, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
        proc = Process(label, full, popen, out_path, err_path)
        self.processes.append(proc)
        return proc

    def stop(self, proc: Process, timeout: float = 10.0) -> int:
        code = proc.stop(timeout)
        self.processes.remove(proc)
        return code

    # -- the peers --------------------------------------------------------------------

    def redis(self, ns: Namespace, port: int, data: Mapping[str, str]) -> Process:
        """A real redis-server on the namespace's loopback, holding `data`."""
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)]
        proc = self.spawn(ns, argv, label=f"redis-{ns.host}")
        deadline = time.monotonic() + 10.0
        while redis_cli(ns, port, "PING", check=False) != "PONG":
            if not proc.alive() or time.monotonic() > deadline:
                raise LabError(f"redis-server did not answer:\n{proc.describe()}")
            time.sleep(0.05)
        for key, value in data.items():
            redis_cli(ns, port, "SET", key, value)
        return proc

    def ambassador(
        self,
        ns: Namespace,
        link_env: Mapping[str, str],
        *,
        forkproxy: Sequence[str],
        options: Sequence[str] = (),
        label: str = "ambassador",
        timeout: float = 15.0,
    ) -> tuple[Process, list[str]]:
        """`forkproxy serve --from-env` seeing only `link_env` (and PATH, HOSTNAME, HOME).

        Its control socket is in the lab's directory (`Process.status_socket`), not in
        the shared default one. Returns the process and its `listening ...` lines once
        the first one is printed (they are printed together, once every listener is bound).
        """
        env = {"PATH": PLAIN_PATH, "HOSTNAME": ns.host, "HOME": "/root", **link_env}
        sock = self.workdir / f"{self.started + 1:02d}.sock"
        argv = [*forkproxy, "serve", "--from-env", "--status-socket", str(sock), *options]
        proc = self.spawn(ns, argv, label=f"{label}-{ns.host}", env=env)
        proc.status_socket = sock
        proc.wait_stdout(lambda lines: any(ln.startswith("listening ") for ln in lines), timeout)
        # Every listener line is in once the log says `status-socket`: the supervisor logs
        # it after its stdout lines are all written. (A fixed 0.2 s could end, under load,
        # before a further line came, and a count of them pass that should not.)
        deadline = time.monotonic() + timeout
        while not STATUS_SOCKET_LOGGED.search(proc.stderr()):
            if not proc.alive() or time.monotonic() > deadline:
                raise LabError(f"no status-socket line in its log:\n{proc.describe()}")
            time.sleep(0.05)
        return proc, listening_lines(proc)


# The supervisor's `status-socket` log line, as text or JSON (not a `--status-socket`).
STATUS_SOCKET_LOGGED = re.compile(r'[ "]status-socket[ "]')


def listening_lines(proc: Process) -> list[str]:
    return [ln for ln in proc.stdout().splitlines() if ln.startswith("listening ")]


def redis_cli(
    ns: Namespace, port: int, *command: str, host: str = "127.0.0.1", check: bool = True
) -> str:
    """The real redis-cli inside `ns`; its reply, stripped."""
    return ns.run(
        ["redis-cli", "-h", host, "-p", str(port), *command], timeout=10.0, check=check
    ).strip()


def docker_link_env(
    alias: str,
    exposed_port: int,
    addr: str,
    port: int | None = None,
    *,
    name: str,
    child_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What `docker run --link CHILD:alias` puts in a container's environment for a child
    exposing one TCP port (moby daemon/links/links.go, Link.ToEnv):

    ALIAS_PORT, ALIAS_PORT_<exposed>_TCP{,_ADDR,_PORT,_PROTO}, ALIAS_NAME=/<container>/<alias>,
    and each variable of the child's own environment (but HOME and PATH) re-exported as
    ALIAS_ENV_<VAR>: the chain case, where the child is itself an ambassador.
    Docker's address and port are the child's; `port` stands in for a port the host
    maps to the exposed one (a redis on a namespace's loopback, say).
    """
    port = exposed_port if port is None else port
    upper = alias.upper().replace("-", "_")
    prefix = f"{upper}_PORT_{exposed_port}_TCP"
    url = f"tcp://{addr}:{port}"
    env = {
        f"{upper}_PORT": url,
        prefix: url,
        f"{prefix}_ADDR": addr,
        f"{prefix}_PORT": str(port),
        f"{prefix}_PROTO": "tcp",
        f"{upper}_NAME": name,
    }
    for key, value in (child_env or {}).items():
        if key not in ("HOME", "PATH"):
            env[f"{upper}_ENV_{key}"] = value
    return env


def probe_connect(ns: Namespace, addr: str, port: int, timeout: float) -> str:
    """From inside `ns`, try a TCP connect: 'connected', 'refused', 'timeout' or 'error: ...'."""
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({addr!r}, {port}), timeout={timeout}).close()\n"
        "    print('connected')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except TimeoutError: print('timeout')\n"
        "except OSError as e: print('error:', e)\n"
    )
    return ns.run([sys.executable, "-c", code], timeout=timeout + 10.0).strip()


# -- the consumer ------------------------------------------------------------------------


class _Closed(Exception):
    """The server side closed the connection."""


class _Resp:
    """Just enough RESP2 for PING, SET and GET."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def call(self, *args: str) -> str | None:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            raw = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
        self.sock.sendall(b"".join(parts))
        line = self._line()
        kind, rest = line[:1], line[1:].decode(errors="replace")
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            return f"ERR {rest}"
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exact(size).decode(errors="replace")
        raise ValueError(f"unexpected reply {line!r}")


def attempt(host: str, port: int, seq: int, key: str, io_timeout: float) -> dict[str, Any]:
    """One connection: PING, SET fp:consumer:seq <seq>, GET <key>; then close."""
    record: dict[str, Any] = {"seq": seq, "start": time.monotonic(), "outcome": "ok"}
    sock: socket.socket | None = None
    try:
        sock = socket.create_connection((host, port), timeout=io_timeout)
        resp = _Resp(sock)
        record["ping"] = resp.call("PING")
        record["set"] = resp.call("SET", "fp:consumer:seq", str(seq))
        record["value"] = resp.call("GET", key)
    except _Closed:
        record["outcome"] = "closed"
    except ConnectionRefusedError:
        record["outcome"] = "refused"
    except ConnectionResetError:
        record["outcome"] = "reset"
    except TimeoutError:
        record["outcome"] = "timeout"
    except (OSError, ValueError) as exc:
        record["outcome"] = "error"
        record["error"] = repr(exc)
    finally:
        if sock is not None:
            sock.close()
    record["end"] = time.monotonic()
    record["elapsed"] = round(record["end"] - record["start"], 4)
    return record


def describe_attempt(rec: Mapping[str, Any]) -> str:
    """One line a person can read."""
    head = f"#{rec['seq']:<4} {rec['elapsed'] * 1000:7.0f} ms  "
    if rec["outcome"] == "ok":
        return f"{head}PING -> {rec['ping']}, SET -> {rec['set']}, GET -> {rec['value']!r}"
    text = {
        "closed": "connection closed by the ambassador",
        "refused": "connection refused (no ambassador listening)",
        "reset": "connection reset by the ambassador",
        "timeout": "NO ANSWER (timed out waiting)",
    }.get(rec["outcome"], f"error {rec.get('error')}")
    return head + text


def consumer_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="netns.py consumer",
        description="Reconnect to a redis (through its ambassador) in a loop, forever; "
        "one report line per attempt. Stops on SIGTERM/SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--key", default="fp:host", help="key to GET on each attempt")
    parser.add_argument("--interval", type=float, default=0.25, help="pause between attempts")
    parser.add_argument(
        "--io-timeout",
        type=float,
        default=20.0,
        help="give up on one attempt after this long (reported as 'timeout': a hang)",
    )
    parser.add_argument("--format", choices=("json", "text"), default="json")
    parser.add_argument("--log", type=Path, help="append reports here instead of stdout")
    parser.add_argument("--prefix", default="", help="text format: put this before each line")
    args = parser.parse_args(argv)

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    out: TextIO = args.log.open("a") if args.log else sys.stdout
    try:
        seq = 0
        while not stopping:
            seq += 1
            rec = attempt(args.host, args.port, seq, args.key, args.io_timeout)
            if args.format == "json":
                out.write(json.dumps(rec) + "\n")
            else:
                out.write(f"{args.prefix}{time.strftime('%H:%M:%S')} {describe_attempt(rec)}\n")
            out.flush()
            time.sleep(args.interval)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def read_attempts(path: Path) -> list[dict[str, Any]]:
    """The consumer's complete JSON report lines so far."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["consumer"]:
        return consumer_main(args[1:])
    if args[:1] == ["sweep"]:
        for name in sweep_stale_namespaces():
            print(f"removed stale namespace {name}")
        return 0
    print("usage: netns.py consumer [--help] | netns.py sweep", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
