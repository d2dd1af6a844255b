#!/usr/bin/env python3
"""Systematic interleaving of `serve --take-over` (a hunt, not a test).

Past hunts delayed syscalls at random (scripts/delay_races.py). This one enumerates
the hand-over's control-path syscalls on each side and, for each step k, stops that
process exactly there (strace `inject=SYSCALL:signal=SIGSTOP:when=N`: the syscall
completes, then the process stops), makes the other side and clients act, resumes,
and checks invariants. Steps (one supervisor of two links, kept and dropped, taken
over by one of the kept link and a new one):

  taker: connect (to the control socket), sendto (request), recvmsg (the sockets),
         listen/bind (kept link, new link, control socket), rename (its socket over
         the old one's), sendto #2 (`go`), recvfrom (the yes), shutdown (`unlisten`)
  old (attached once serving, counts from then): accept4, recvfrom (request),
         sendto (reply), sendmsg (the sockets), accept4 #3 / recvfrom #2 (the taker's
         probe of the path), recvfrom #3 (`go`), sendto #2 (yes), recvfrom #4 (EOF)

Actions while stopped: none, reload (`forkproxy reload`), hup-old, taker2 (a second
`serve --take-over`), term-other / kill-other, term-stopped / kill-stopped, wait16
(past HAND_OVER_DEADLINE and TAKE_OVER_TIMEOUT). A client on each link (hashed
payload) connects during the stop. Checked after: one supervisor left, socket file
and pid file name it, each link served or refused as its configuration says, and
the warning/error lines (the old one's `listener-shut` after the yes is a known bug,
left out unless --all-lines). One JSON line per case on stdout; `BAD` cases on
stderr. Kills only the processes it started. Needs strace, and loopback ports
21000-22999 (outside the ephemeral range, which the relay's connects use).

    scripts/interleave_steps.py --side new --actions none term-stopped
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

FORKPROXY = str(Path(sys.executable).with_name("forkproxy"))
TAKER_STEPS = ["connect:1", "sendto:1", "recvmsg:1", "listen:1", "bind:1", "listen:2",
               "connect:2", "bind:2", "listen:3", "rename:1", "sendto:2", "recvfrom:1",
               "shutdown:1"]
OLD_STEPS = ["accept4:1", "recvfrom:1", "sendto:1", "sendmsg:1", "accept4:3", "recvfrom:2",
             "recvfrom:3", "sendto:2", "recvfrom:4"]
ACTIONS = ["none", "reload", "hup-old", "taker2", "term-other", "kill-other", "term-stopped",
           "kill-stopped", "wait16"]
KNOWN = "error listener-shut "  # the old one's, after the yes: being fixed
# The lines an action makes true (a take-over cancelled, killed, timed out, a reload
# skipped while handing over): any other line, or these after another action, is one
# to look at.
EXPECTED = {"none": (), "taker2": (), "reload": ("warning reload-skipped ",),
            "hup-old": ("warning reload-skipped ",)}
EXPECTED_OTHERWISE = ("warning take-over-", "error take-over-")


def echo_server() -> int:
    """An echo server in threads of this process: its port."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(server.getsockname()[1])


def echoed(port: int, payload: bytes, timeout: float = 40) -> str:
    """"ok" when `payload` came back whole, else what went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while data := sock.recv(65536):
                got += data
    except OSError as exc:
        return type(exc).__name__
    same = hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    return "ok" if same else f"{len(got)} of {len(payload)} bytes"


def status_pid(path: str) -> object:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(b'{"command": "status"}\n')
            data = b""
            while b"\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
        return json.loads(data.split(b"\n")[0]).get("pid")
    except (OSError, ValueError) as exc:
        return repr(exc)


def alive(pid: int | None) -> bool:
    """Running, not a zombie."""
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def signal_pid(pid: int | None, signum: int) -> None:
    if pid is not None and alive(pid):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


class Case:
    """One run: `side` stopped at its `when`-th `syscall`, then `action`."""

    def __init__(self, index: int, side: str, step: str, action: str, upstream: int,
                 metrics: bool, top: Path) -> None:
        self.side, self.action, self.upstream = side, action, upstream
        self.syscall, when = step.split(":")
        self.when = int(when)
        self.dir = top / f"case{index}"
        self.dir.mkdir(parents=True, exist_ok=True)
        base = 21000 + 5 * (index % 400)
        self.keep, self.drop, self.new, self.metrics_port = base, base + 1, base + 2, base + 3
        self.sock, self.pid_file = str(self.dir / "fp.sock"), str(self.dir / "fp.pid")
        self.common = ["--status-socket", self.sock, "--pid-file", self.pid_file, "--grace", "5"]
        if metrics:
            self.common += ["--metrics", f"127.0.0.1:{self.metrics_port}"]
        self.procs: list[subprocess.Popen[str]] = []
        self.pids: list[int] = []  # ours, to end at the end

    def spawn(self, args: list[str], log: str) -> subprocess.Popen[str]:
        with (self.dir / log).open("w") as err:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True,
                                    start_new_session=True)
        self.procs.append(proc)
        self.pids.append(proc.pid)
        return proc

    def stopped(self) -> bool:
        trace = self.dir / f"{self.side}.tr"
        return trace.exists() and "--- stopped by SIGSTOP ---" in trace.read_text()

    def run(self) -> dict[str, Any]:
        link = f"=127.0.0.1:{self.upstream}"
        old = self.spawn([FORKPROXY, "serve", *self.common, f"127.0.0.1:{self.keep}{link}",
                          f"127.0.0.1:{self.drop}{link}"], "old.log")
        assert old.stdout is not None
        old.stdout.readline()  # its `listening` lines: serving
        old.stdout.readline()
        taker_args = [FORKPROXY, "serve", "--take-over", *self.common,
                      f"127.0.0.1:{self.keep}{link}", f"127.0.0.1:{self.new}{link}"]
        strace = [shutil.which("strace") or "strace", "-qq",
                  "-o", str(self.dir / f"{self.side}.tr"), "-e", f"trace={self.syscall}",
                  "-e", f"inject={self.syscall}:signal=SIGSTOP:when={self.when}"]
        new_pid: int | None = None
        tracer: subprocess.Popen[str] | None = None
        if self.side == "old":
            self.spawn([*strace, "-p", str(old.pid)], "strace.log")
            time.sleep(1)  # attached
            new_pid = self.spawn(taker_args, "new.log").pid
            stopped_pid: int | None = old.pid
        else:
            tracer = self.spawn([*strace, *taker_args], "new.log")
            stopped_pid = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.stopped():
            time.sleep(0.05)
        if tracer is not None:
            children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(tracer.pid)],
                                      capture_output=True, text=True).stdout.split()
            new_pid = stopped_pid = int(children[0]) if children else None
            if new_pid is not None:
                self.pids.append(new_pid)
        result: dict[str, Any] = {"case": f"{self.side}:{self.syscall}#{self.when}:{self.action}",
                                  "stopped": self.stopped()}
        other = new_pid if self.side == "old" else old.pid
        clients: dict[str, str] = {}
        threads = [threading.Thread(target=lambda name=name, port=port: clients.__setitem__(
            name, echoed(port, os.urandom(5000)))) for name, port in
            (("keep", self.keep), ("drop", self.drop), ("new", self.new))]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        extra: subprocess.Popen[str] | None = None
        if self.action == "taker2":
            extra = self.spawn(taker_args, "taker2.log")
            time.sleep(2)
        elif self.action == "reload":
            extra = self.spawn([FORKPROXY, "reload", "--status-socket", self.sock], "reload.log")
            time.sleep(1.5)
        elif self.action == "hup-old":
            signal_pid(old.pid, signal.SIGHUP)
        elif self.action in ("term-other", "kill-other"):
            signal_pid(other, signal.SIGTERM if self.action == "term-other" else signal.SIGKILL)
            time.sleep(1)
        elif self.action in ("term-stopped", "kill-stopped"):
            signal_pid(stopped_pid, signal.SIGTERM if self.action == "term-stopped"
                       else signal.SIGKILL)
        elif self.action == "wait16":
            time.sleep(16.5)
        signal_pid(stopped_pid, signal.SIGCONT)
        for thread in threads:
            thread.join(60)
        supervisors = {"old": old.pid, "new": new_pid}
        if extra is not None and self.action == "taker2":
            supervisors["taker2"] = extra.pid
        deadline = time.monotonic() + 40
        while (time.monotonic() < deadline
               and sum(alive(pid) for pid in supervisors.values()) > 1):
            time.sleep(0.2)
        time.sleep(0.5)
        names = {pid: name for name, pid in supervisors.items()}
        try:
            pid_file: object = names.get(int(Path(self.pid_file).read_text()))
        except (OSError, ValueError) as exc:
            pid_file = repr(exc)
        status = status_pid(self.sock)
        result.update(
            live=[name for name, pid in supervisors.items() if alive(pid)], clients=clients,
            socket_file=names.get(status, status) if isinstance(status, int) else status,
            pid_file=pid_file,
            after={"keep": echoed(self.keep, os.urandom(3000), 10),
                   "drop": echoed(self.drop, b"x", 10), "new": echoed(self.new, b"y", 10)},
            lines={log.stem: [line.split("] ", 1)[1][:200] for line
                              in log.read_text().splitlines()
                              if " warning " in line or " error " in line]
                   for log in self.dir.glob("*.log")})
        return result

    def end(self) -> None:
        """Only what this case started."""
        for pid in self.pids:
            signal_pid(pid, signal.SIGCONT)
            signal_pid(pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.pids:
            signal_pid(pid, signal.SIGKILL)


def violations(result: dict[str, Any], all_lines: bool) -> list[str]:
    """What broke an invariant. A dropped link's client reset is not one: it connected
    before the taker's `unlisten`, which resets its backlog (as documented)."""
    bad = []
    live = result["live"]
    if not result["stopped"]:
        bad.append("never stopped there")
    if len(live) != 1:
        bad.append(f"serving: {live}")
    else:
        serving, after = live[0], result["after"]
        for what in ("socket_file", "pid_file"):
            if result[what] != serving:
                bad.append(f"{what} names {result[what]}, not {serving}")
        if after["keep"] != "ok":
            bad.append(f"kept link after: {after['keep']}")
        if (after["drop"] == "ok") != (serving == "old"):
            bad.append(f"dropped link after: {after['drop']}")
        if (after["new"] == "ok") != (serving != "old"):
            bad.append(f"new link after: {after['new']}")
    if result["clients"].get("keep") != "ok":
        bad.append(f"kept link's client: {result['clients'].get('keep')}")
    action = result["case"].rsplit(":", 1)[1]
    expected = EXPECTED.get(action, EXPECTED_OTHERWISE)
    for log, lines in result["lines"].items():
        said = [line for line in lines if not line.startswith(expected)
                and (all_lines or not line.startswith(KNOWN))]
        if said:
            bad.append(f"{log}: {said}")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=["new", "old", "both"], default="both")
    parser.add_argument("--actions", nargs="+", choices=ACTIONS, default=["none"])
    parser.add_argument("--steps", nargs="+", help="SYSCALL:N, instead of the side's list")
    parser.add_argument("--metrics", action="store_true", help="with --metrics on both")
    parser.add_argument("--dir", type=Path, default=Path(f"/tmp/interleave-steps-{os.getpid()}"),
                        help="a directory of each case's logs and traces")
    parser.add_argument("--all-lines", action="store_true",
                        help="count the known listener-shut line too")
    args = parser.parse_args()
    upstream = echo_server()
    index = 0
    for action in args.actions:
        for side in ("new", "old") if args.side == "both" else (args.side,):
            for step in args.steps or (TAKER_STEPS if side == "new" else OLD_STEPS):
                case = Case(index, side, step, action, upstream, args.metrics, args.dir)
                index += 1
                try:
                    result = case.run()
                finally:
                    case.end()
                print(json.dumps(result), flush=True)
                bad = violations(result, args.all_lines)
                if bad:
                    print(f"BAD {result['case']}: {'; '.join(bad)}", file=sys.stderr,
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
