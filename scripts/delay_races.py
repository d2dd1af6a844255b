#!/usr/bin/env python3
"""Races made likely by syscall delays: a real forkproxy run under `strace -e inject=...`.

Not run by CI (strace's timing, a shared machine's load). Each scenario starts `forkproxy
serve` from this checkout's venv under `strace -f --seccomp-bpf` with a delay injected
on chosen system calls (of the supervisor, its children, the resolver, the metrics
process: `strace -f` follows them all), against an echo server of its own on loopback,
while clients relay random payloads (hashed at both ends) and racers reload (SIGHUP,
`forkproxy reload`), rewire the env file, ask `status` and `check`, scrape the metrics
and send SIGUSR1/SIGALRM. Then it quiesces (clients stopped) and compares `status
--json` with the log (connections counted once, bytes, outcomes), restarts two clients,
stops the proxy (SIGTERM, or what the scenario says), and checks the exit status, the
time to exit, a traceback or error line, and processes left behind (the script is
their subreaper). The `take-over` scenario hands the sockets to a `serve --take-over`
whose poll() is delayed, and reports the time nobody accepted.

    sudo .venv/bin/python scripts/delay_races.py            # every scenario (~5 min)
    sudo .venv/bin/python scripts/delay_races.py fork poll  # some
    .venv/bin/python scripts/delay_races.py --list

What it found is in the commit that added it (take-over warm-up) and in docs: a
verdict SUSPECT is a lead, to be read in the log it names (strace itself slows every
traced process; under -f it is also the one that releases exited children to their
parent, so a supervisor seems not to reap for as long as strace lags).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORKPROXY = str(Path(sys.executable).parent / "forkproxy")
PR_SET_CHILD_SUBREAPER = 36


def inject(calls: str, *rules: str) -> list[str]:
    """strace's arguments: trace `calls` (seccomp-bpf: only those stop), inject `rules`."""
    return ["--seccomp-bpf", "-e", f"trace={calls}", *(arg for rule in rules
                                                       for arg in ("-e", f"inject={rule}"))]


@dataclass
class Scenario:
    strace: list[str]
    clients: int = 4
    slow: int = 0  # clients that send 100 bytes every 0.1 s for 3 s
    racers: tuple[str, ...] = ("hup", "reload", "status", "scrape", "check")
    args: tuple[str, ...] = ()
    stop: str = "SIGTERM"
    second: str | None = None  # a second signal 0.3 s after the first
    duration: float = 8.0


SCENARIOS: dict[str, Scenario] = {
    "accept": Scenario(inject("accept4", "accept4:delay_exit=10000")),
    "fork": Scenario(inject("clone,clone3", "clone,clone3:delay_exit=20000"), slow=2),
    "wait4": Scenario(inject("wait4,read", "wait4:delay_enter=50000",
                             "read:delay_enter=1000:when=1+7"), slow=2),
    "poll": Scenario(inject("poll", "poll:delay_exit=20000"), slow=2),
    "relay": Scenario(inject("splice,sendto,recvfrom",
                             "splice,sendto,recvfrom:delay_enter=2000"), slow=2),
    "connect": Scenario(inject("connect", "connect:delay_enter=100000")),
    "kill": Scenario(inject("kill,tgkill", "kill,tgkill:delay_enter=300000"), slow=6),
    "int-int": Scenario(inject("kill", "kill:delay_exit=200000"), slow=6, stop="SIGINT",
                        second="SIGINT"),
    "control": Scenario(inject("sendmsg,recvmsg,sendto,recvfrom",
                               "sendmsg,recvmsg,sendto,recvfrom:delay_enter=50000")),
    "max-children": Scenario(inject("wait4,write", "wait4:delay_enter=30000",
                                    "write:delay_exit=3000"),
                             clients=6, slow=2, args=("--max-children", "3")),
    "idle": Scenario(inject("poll", "poll:delay_exit=100000:when=3+5"), slow=4,
                     args=("--idle-timeout", "0.5", "--halfclose-timeout", "0.6")),
    "rewire": Scenario(inject("close,wait4", "close:delay_enter=1000",
                              "wait4:delay_enter=20000"), clients=6, slow=2,
                       racers=("envflip", "hup", "hup", "status", "reload"),
                       args=("--max-children", "3")),
    "usr1": Scenario(inject("clone,kill", "clone:delay_exit=50000:when=2+3",
                            "kill:delay_enter=20000"), slow=2,
                     racers=("usr1", "status", "hup", "scrape", "alrm")),
    "dns": Scenario(inject("read,openat", "read:delay_enter=3000", "openat:delay_enter=20000"),
                    racers=("hup", "alrm", "reload", "status", "scrape", "usr1"),
                    args=("--resolve-every", "1")),
}


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)

    def add(self, what: str, bad: str | None = None) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1
            if bad is not None:
                self.bad.append(f"{what}: {bad}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def echo_server() -> tuple[socket.socket, int]:
    """Echo every byte, then a FIN once the client's came."""
    server = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, int(server.getsockname()[1])


def send_all(sock: socket.socket, data: bytes) -> None:
    """Send, then half-close: a thread of its own, so that the echo is read meanwhile."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def client(port: int, tally: Tally, stop: threading.Event) -> None:
    """Payloads of random sizes, sent and half-closed; the echo must hash the same."""
    rnd = random.Random()
    while not stop.is_set():
        data = rnd.randbytes(rnd.choice([0, 1, 100, 5000, rnd.randrange(300_000)]))
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        except ConnectionRefusedError:
            tally.add("refused")
            time.sleep(0.05)
            continue
        except OSError as exc:
            tally.add(f"connect {exc}")
            continue
        got = hashlib.sha256()
        with sock:
            sender = threading.Thread(target=send_all, args=(sock, data), daemon=True)
            sender.start()
            try:
                while chunk := sock.recv(1 << 16):
                    got.update(chunk)
                sender.join(5)
                if got.digest() == hashlib.sha256(data).digest():
                    tally.add("ok")
                else:
                    tally.add("MISMATCH", f"{len(data)} bytes sent, another stream came back")
            except TimeoutError:
                tally.add("HANG", f"{len(data)} bytes, nothing for 20 s")
            except ConnectionResetError:
                tally.add("reset")
            except OSError as exc:
                tally.add(f"error {exc}")


def slow_client(port: int, tally: Tally, stop: threading.Event) -> None:
    """100 bytes every 0.1 s for 3 s, the echo read as it comes, then half-closed."""
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        except OSError:
            tally.add("slow refused")
            time.sleep(0.1)
            continue
        sent, got = hashlib.sha256(), hashlib.sha256()
        with sock:
            try:
                end = time.monotonic() + 3
                while time.monotonic() < end:
                    data = os.urandom(100)
                    sock.sendall(data)
                    sent.update(data)
                    time.sleep(0.1)
                    # select, not MSG_DONTWAIT: a socket with a timeout waits for readiness
                    while select.select([sock], [], [], 0)[0]:
                        chunk = sock.recv(1 << 16)
                        if not chunk:
                            raise EOFError
                        got.update(chunk)
                sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(1 << 16):
                    got.update(chunk)
                if got.digest() == sent.digest():
                    tally.add("slow ok")
                else:
                    tally.add("MISMATCH", "slow: another stream came back")
            except EOFError:
                tally.add("MISMATCH", "slow: a FIN before its end")
            except ConnectionResetError:
                tally.add("slow reset")
            except TimeoutError:
                tally.add("HANG", "slow: nothing for 30 s")
            except OSError as exc:
                tally.add(f"slow error {exc}")


def cli(args: list[str], env: dict[str, str], tally: Tally) -> None:
    """A forkproxy command: exit 0 or 1 with one line, within its documented 15 s."""
    began = time.monotonic()
    done = subprocess.run([FORKPROXY, *args], capture_output=True, text=True, timeout=60,
                          env=env)
    took = time.monotonic() - began
    if "Traceback" in done.stderr or done.returncode not in (0, 1) or took > 16:
        tally.add(f"{args[0]} BAD", f"exit {done.returncode} in {took:.1f}s: "
                  f"{done.stderr.strip()[-300:]}")
    else:
        tally.add(f"{args[0]} exit {done.returncode}" + (
            f" ({done.stderr.strip()[:100]})" if done.returncode else ""))


def log_records(log: Path) -> list[dict[str, Any]]:
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"event": "not-json", "line": line[:300]})
    return records


def agreement(status: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """status --json's totals against the log's open and close lines, with nothing live.
    (A reload that removes a link drops its totals from status: rewire disagrees so.)"""
    closes = [r for r in records if r["event"] == "close"]
    outcomes: dict[str, int] = {}
    for record in closes:
        outcomes[record["outcome"]] = outcomes.get(record["outcome"], 0) + 1
    links = status["links"].values()
    said: dict[str, int] = {}
    for link in links:
        for outcome, count in link["outcomes"].items():
            said[outcome] = said.get(outcome, 0) + count
    found = {
        "connections": (sum(link["connections"] for link in links),
                        sum(r["event"] == "open" for r in records), len(closes)),
        "bytes": ((sum(link["bytes_up"] for link in links),
                   sum(link["bytes_down"] for link in links)),
                  (sum(r["bytes_up"] for r in closes), sum(r["bytes_down"] for r in closes))),
        "outcomes": (said, outcomes),
        "active": sum(link["active"] for link in links),
    }
    count = found["connections"]
    found["agree"] = (count[0] == count[1] == count[2] and found["bytes"][0] == found["bytes"][1]
                      and said == outcomes and found["active"] == 0)
    return found


def own_children() -> list[str]:
    """Live processes whose parent is this one (orphans come here: we are a subreaper)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found.append(f"{entry} ({stat.split('(', 1)[1].rsplit(')', 1)[0]})")
    return found


def run(name: str, scenario: Scenario, work: Path) -> bool:
    server, echo_port = echo_server()
    link_port, rewired_port = free_port(), free_port()
    env_file, control_path, pid_file, log = (work / "links.env", work / "control.sock",
                                             work / "pid", work / f"{name}.log")
    links = f"A_PORT_{link_port}_TCP=tcp://127.0.0.1:{echo_port}\n"
    env_file.write_text(links)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKPROXY_")}
    env["XDG_RUNTIME_DIR"] = str(work)
    target = "localhost" if name == "dns" else "127.0.0.1"
    with log.open("w") as err:
        proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", "/dev/null", *scenario.strace, FORKPROXY, "serve",
             f"127.0.0.1:0={target}:{echo_port}", "--env-file", str(env_file), "--bind",
             "127.0.0.1", "--metrics", "127.0.0.1:0", "--status-socket", str(control_path),
             "--pid-file", str(pid_file), "--log-format", "json", "--grace", "3",
             *scenario.args],
            stdout=subprocess.PIPE, stderr=err, env=env, text=True, start_new_session=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first:
        print(f"{name}: did not start: {log.read_text()[-1000:]}")
        return False
    port = int(first.split(" -> ")[0].rsplit(":", 1)[1])
    supervisor = int(pid_file.read_text())
    tally, stop = Tally(), threading.Event()
    metrics: list[int] = []

    def race() -> None:
        rnd = random.Random()
        flips = 0
        while not stop.is_set():
            what = rnd.choice(scenario.racers)
            try:
                if what in ("hup", "alrm", "usr1"):
                    os.kill(supervisor, getattr(signal, f"SIG{what.upper()}"))
                    tally.add(what)
                elif what in ("reload", "status", "check"):
                    cli([what, "--status-socket", str(control_path)], env, tally)
                elif what == "envflip":  # a second link on and off, renamed into place
                    flips += 1
                    extra = (f"B_PORT_{rewired_port}_TCP=tcp://127.0.0.1:{echo_port}\n"
                             if flips % 2 else "")
                    (work / "links.tmp").write_text(links + extra)
                    (work / "links.tmp").rename(env_file)
                elif what == "scrape":
                    if not metrics:
                        said = subprocess.run(
                            [FORKPROXY, "status", "--json", "--status-socket", str(control_path)],
                            capture_output=True, text=True, env=env, timeout=60).stdout
                        url = json.loads(said)["metrics"]["url"]
                        metrics.append(int(url.rsplit(":", 1)[1].split("/")[0]))
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics[0]}/metrics",
                                                timeout=15) as reply:
                        body = reply.read().decode()
                    tally.add("scrape" if "\nforkproxy_up 1" in body else "scrape: forkproxy_up 0")
            except Exception as exc:  # said, and the race goes on
                tally.add(f"{what} failed: {exc!r}"[:120])
            time.sleep(rnd.uniform(0.05, 0.4))

    def start(clients: int, slow: int, racers: int) -> list[threading.Thread]:
        threads = ([threading.Thread(target=client, args=(port, tally, stop), daemon=True)
                    for _ in range(clients)]
                   + [threading.Thread(target=slow_client, args=(port, tally, stop), daemon=True)
                      for _ in range(slow)]
                   + [threading.Thread(target=race, daemon=True) for _ in range(racers)])
        for thread in threads:
            thread.start()
        return threads

    threads = start(scenario.clients, scenario.slow, 2)
    time.sleep(scenario.duration)
    stop.set()
    for thread in threads:
        thread.join(60)
    time.sleep(1.5)
    said = subprocess.run([FORKPROXY, "status", "--json", "--status-socket", str(control_path)],
                          capture_output=True, text=True, env=env, timeout=60)
    agreed = agreement(json.loads(said.stdout), log_records(log)) if said.returncode == 0 else {
        "agree": False, "status": said.stderr.strip()}
    stop.clear()
    threads = start(2, scenario.slow, 0)
    time.sleep(1)
    began = time.monotonic()
    os.kill(supervisor, getattr(signal, scenario.stop))
    if scenario.second:
        time.sleep(0.3)
        os.kill(supervisor, getattr(signal, scenario.second))
    try:
        status: int | None = proc.wait(3 + 15)
    except subprocess.TimeoutExpired:
        status = None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    took = time.monotonic() - began
    stop.set()
    for thread in threads:
        thread.join(60)
    server.close()
    records = log_records(log)
    left = own_children()
    problems = [json.dumps(r)[:300] for r in records if r.get("level") == "error" or r["event"] in (
        "relay-crashed", "child-died", "not-reaped", "not-json")]
    if "Traceback" in log.read_text():
        problems.append("a traceback in the log")
    exited = [r["total"] for r in records if r["event"] == "exited"]
    closes = sum(r["event"] in ("close", "child-died") for r in records)
    good = (status == 0 and took < 3 + 3 and not tally.bad and not left and not problems
            and exited == [closes] and bool(agreed["agree"]))
    print(json.dumps({"scenario": name, "verdict": "ok" if good else "SUSPECT", "log": str(log),
                      "exit": status, "stop_to_exit": round(took, 2), "clients": tally.counts,
                      "bad": tally.bad[:10], "status_vs_log": agreed, "exited_total": exited,
                      "closes": closes, "left_behind": left, "problems": problems[:10]},
                     indent=1, default=str))
    return good


def take_over(work: Path) -> bool:
    """A take-over whose new supervisor's poll() is delayed 50 ms: clients run
    throughout; none may be refused; the time nobody accepts is printed."""
    server, echo_port = echo_server()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKPROXY_")}
    env["XDG_RUNTIME_DIR"] = str(work)
    common = [f"127.0.0.1:{port}=127.0.0.1:{echo_port}", "--status-socket",
              str(work / "take-over.sock"), "--grace", "3",
              "--pid-file", str(work / "take-over.pid")]
    old_log, new_log = work / "take-over-old.log", work / "take-over-new.log"
    with old_log.open("w") as err:
        old = subprocess.Popen([FORKPROXY, "serve", *common], stdout=subprocess.PIPE,
                               stderr=err, env=env, text=True)
    assert old.stdout is not None
    old.stdout.readline()
    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=client, args=(port, tally, stop), daemon=True)
               for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    with new_log.open("w") as err:
        new = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", "/dev/null",
             *inject("poll", "poll:delay_exit=50000"), FORKPROXY, "serve", "--take-over",
             *common], stdout=subprocess.PIPE, stderr=err, env=env, text=True)
    assert new.stdout is not None
    new.stdout.readline()
    old_status = old.wait(30)
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join(60)
    # The supervisor, not strace: the pid file is the new one's since the hand-over.
    os.kill(int((work / "take-over.pid").read_text()), signal.SIGTERM)
    try:
        new_status: int | None = new.wait(30)
    except subprocess.TimeoutExpired:
        new_status = None
        new.kill()  # strace; its tracee is left to the subreaper's check
    server.close()

    def when(log: Path, needle: str) -> datetime.datetime:
        line = next(line for line in log.read_text().splitlines() if needle in line)
        return datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ")

    gap = (when(new_log, " listening ") - when(old_log, " stopping signal=take-over"))
    good = (old_status == new_status == 0 and not tally.bad and "refused" not in tally.counts
            and gap.total_seconds() < 1)
    print(json.dumps({"scenario": "take-over", "verdict": "ok" if good else "SUSPECT",
                      "nobody_accepting_s": gap.total_seconds(), "exits": [old_status, new_status],
                      "clients": tally.counts, "bad": tally.bad[:10],
                      "logs": [str(old_log), str(new_log)]}, indent=1))
    return good


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("names", nargs="*", help="scenarios to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the scenarios")
    options = parser.parse_args()
    names = options.names or [*SCENARIOS, "take-over"]
    if options.list:
        print("\n".join([*SCENARIOS, "take-over"]))
        return 0
    unknown = [name for name in names if name not in SCENARIOS and name != "take-over"]
    if unknown:
        parser.error(f"no such scenario: {', '.join(unknown)}")
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = Path(tempfile.mkdtemp(prefix="forkproxy-delays-"))  # under $TMPDIR, else /tmp
    print(f"logs in {work}")
    results = {name: take_over(work) if name == "take-over" else run(name, SCENARIOS[name], work)
               for name in names}
    print("\n".join(f"{name}: {'ok' if good else 'SUSPECT'}" for name, good in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
