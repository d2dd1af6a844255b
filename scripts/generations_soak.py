#!/usr/bin/env python3
"""A long chain of generations: hundreds of `serve --take-over`s and reloads in a row.

One forkproxy (--metrics, --env-file, 3 core links and 3 that come and go, a SPEC link
that only a take-over can add or drop) in front of real peers (redis-server, two socat
echo servers), under steady traffic the whole run: long-lived hashing clients that span
many generations, short connections, redis-benchmark at a low rate, a scraper every
0.5 s (curl), `forkproxy status` and `check` every second. Then GENERATIONS steps, each
a take-over (same or changed links, changed options) or 1-5 reloads (env-file edits by
rename, then SIGHUP, `forkproxy reload`, or `reload --pid-file`), alternating.

Tracked per generation (one JSON line each in DIR/generations.jsonl, a table at the end):
the serving supervisor's and the metrics process's descriptors, RSS/PSS and threads;
the processes under every supervisor started (supervisors still draining, children,
metrics processes, others), zombies; socket files, pid files, DIR/tmp and
$XDG_RUNTIME_DIR entries; listening sockets per port (`ss -ltn`); a take-over's time.
Checked: exactly one listening socket per configured port and none for a dropped one;
no client refused on a core port; every long connection's bytes exact, or cut at an
old generation's grace end that its log says (`grace-over`); counters monotonic within
a supervisor (by `forkproxy_start_time_seconds`), one reset per take-over; status's
reload count agreeing with the log's `reloaded` lines; nothing left at the end.

Kills only what it started. Not run by CI. Loopback ports BASE..BASE+9 (below the
ephemeral range). Needs redis-server, redis-benchmark, socat, curl, ss.

    .venv/bin/python scripts/generations_soak.py --generations 300
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

FORKPROXY = str(Path(sys.executable).with_name("forkproxy"))
OPTIONS: dict[str, list[str]] = {
    "--grace": ["2", "5", "15", "40"],
    "--relay": ["auto", "copy", "splice"],
    "--connect-timeout": ["2", "5"],
    "--max-children": ["64", "256"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def now() -> float:
    return time.time()


@dataclass
class Generation:
    """One supervisor started by the soak."""

    index: int
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    ports: set[int]
    started: float
    ready: float | None = None

    def log(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""


@dataclass
class Findings:
    """What broke, by kind, with the first few examples of each."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, detail: str) -> None:
        with self.lock:
            self.counts[kind] += 1
            seen = self.examples.setdefault(kind, [])
            if len(seen) < 5:
                seen.append(f"{time.strftime('%H:%M:%S')} {detail}")


class Soak:
    """The proxy, its peers, the traffic and the generations."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir: Path = args.dir
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "run").mkdir(parents=True, mode=0o700)
        (self.dir / "tmp").mkdir()
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(self.dir / "run"),
                        TMPDIR=str(self.dir / "tmp"))
        for name in list(self.env):
            if name.startswith("FORKPROXY_"):
                del self.env[name]
        self.env_file = self.dir / "links.env"
        self.pid_file = self.dir / "fp.pid"
        base: int = args.base
        self.metrics_port = base
        self.redis_port, self.echo1, self.echo2 = free_port(), free_port(), free_port()
        # Core links (always configured: no client may be refused there), by port.
        self.core = {base + 1: ("R", "redis"), base + 2: ("E", "echo1"), base + 3: ("F", "echo1")}
        self.optional = {base + 4: ("X", "echo2"), base + 5: ("Y", "echo1"),
                         base + 6: ("Z", "redis")}
        self.spec_port = base + 7
        self.targets = {"redis": self.redis_port, "echo1": self.echo1, "echo2": self.echo2}
        self.links: dict[int, tuple[str, str]] = dict(self.core)
        self.spec_on = False
        self.helpers: list[subprocess.Popen[bytes]] = []
        self.gens: list[Generation] = []
        self.current: Generation | None = None
        self.generation = 0
        self.stop_traffic = threading.Event()
        self.found = Findings()
        self.stats: Counter[str] = Counter()
        self.stats_lock = threading.Lock()
        self.cuts: list[tuple[float, int, str]] = []  # (time, port, how)
        self.scrapes: list[tuple[float, float, dict[str, float]]] = []
        self.rng = random.Random(args.seed)
        self.rows: list[dict[str, Any]] = []
        self.zombies: set[int] = set()
        self.unsocketed: set[int] = set()
        # The ports configured before and after the step under way: none may refuse.
        self.protected: frozenset[int] = frozenset(self.core)
        self.changing = threading.Event()  # a port set is changing: optional ports unchecked

    # --- peers -------------------------------------------------------------------------
    def start_peers(self) -> None:
        self.blocker = socket.create_server(("127.0.0.1", self.args.base + 9))
        self.helpers.append(subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in (self.echo1, self.echo2):
            self.helpers.append(subprocess.Popen(
                ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=512",
                 "PIPE"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in (self.redis_port, self.echo1, self.echo2):
            deadline = now() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 1).close()
                    break
                except OSError:
                    if now() > deadline:
                        raise
                    time.sleep(0.05)

    # --- configuration -----------------------------------------------------------------
    def write_env(self) -> None:
        lines = ["# generations soak\n"]
        for port, (alias, target) in sorted(self.links.items()):
            lines.append(f"{alias}_PORT_{port}_TCP=tcp://127.0.0.1:{self.targets[target]}\n")
        tmp = self.env_file.with_suffix(".new")
        tmp.write_text("".join(lines))
        os.replace(tmp, self.env_file)

    def mutate_links(self) -> str:
        """Add, drop or retarget a link (never drop a core one): what changed."""
        choice = self.rng.choice(["toggle", "toggle", "retarget", "same"])
        if choice == "toggle":
            port = self.rng.choice(sorted(self.optional))
            if port in self.links:
                del self.links[port]
                return f"drop {port}"
            self.links[port] = self.optional[port]
            return f"add {port}"
        if choice == "retarget":
            port = self.rng.choice([p for p in self.links if self.links[p][1] != "redis"])
            alias, target = self.links[port]
            self.links[port] = (alias, "echo2" if target == "echo1" else "echo1")
            return f"retarget {port}"
        return "same"

    def ports(self) -> set[int]:
        return set(self.links) | ({self.spec_port} if self.spec_on else set())

    def serve_args(self, take_over: bool) -> list[str]:
        args = [FORKPROXY, "serve", "--bind", "127.0.0.1", "--env-file", str(self.env_file),
                "--metrics", f"127.0.0.1:{self.metrics_port}", "--pid-file", str(self.pid_file)]
        for option, values in OPTIONS.items():
            args += [option, self.rng.choice(values)]
        if take_over:
            args.append("--take-over")
        if self.spec_on:
            args.append(f"{self.spec_port}=127.0.0.1:{self.echo2}")
        return args

    def spawn(self, take_over: bool, doomed: bool = False) -> Generation:
        index = len(self.gens)
        out, err = self.dir / f"gen{index:04d}.out", self.dir / f"gen{index:04d}.err"
        with out.open("wb") as o, err.open("wb") as e:
            extra = [f"{self.args.base + 9}=127.0.0.1:{self.echo1}"] if doomed else []
            proc = subprocess.Popen(self.serve_args(take_over) + extra, stdout=o, stderr=e,
                                    env=self.env, stdin=subprocess.DEVNULL)
        gen = Generation(index, proc, out, err, self.ports() | ({self.args.base + 9} if doomed
                                                                 else set()), now())
        self.gens.append(gen)
        expected = len(gen.ports) + 1  # the listening lines and the metrics line
        deadline = now() + 60
        while now() < deadline:
            if out.read_bytes().count(b"\n") >= expected:
                gen.ready = now()
                return gen
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        if not doomed:
            self.found.add("start", f"gen {index} not ready: rc={proc.poll()} "
                                    f"{gen.log()[-600:]!r}")
        return gen

    # --- steps -------------------------------------------------------------------------
    def take_over(self) -> dict[str, Any]:
        before = self.ports()
        what = self.mutate_links()
        if self.rng.random() < 0.3:
            self.spec_on = not self.spec_on
            what += f" spec {'on' if self.spec_on else 'off'}"
        self.protected = frozenset(before & self.ports())
        self.changing.set()
        self.write_env()
        old = self.current
        # Now and then one that cannot start (a port held by another socket): the old
        # one must serve on, its socket file and pid file made again, the chain go on.
        doomed = self.rng.random() < self.args.doomed
        gen = self.spawn(take_over=True, doomed=doomed)
        row: dict[str, Any] = {"step": "take-over", "what": what + (" doomed" if doomed else "")}
        if doomed and gen.ready is not None:
            self.found.add("doomed-served", f"gen {gen.index}")
        if gen.ready is None:
            if doomed:
                if gen.proc.wait(60) != 2:
                    self.found.add("doomed-exit", f"gen {gen.index} rc={gen.proc.returncode}")
                gen.proc.returncode = 0  # not a finding for reap()
                gen.ready = None
            # A failed take-over: the old one serves on; roll the model back to it.
            row["failed"] = True
            if old is not None:
                self.spec_on = self.spec_port in old.ports
                self.links = {p: self.core.get(p) or self.optional[p]
                              for p in old.ports if p != self.spec_port}
                self.write_env()
            self.changing.clear()
            self.protected = frozenset(self.ports())
            return row
        row["takeover_s"] = round(gen.ready - gen.started, 3)
        self.current = gen
        if old is not None:
            # The old one's `stopping signal=take-over` line: the hand-over is complete.
            deadline = now() + 30
            while "stopping signal=take-over" not in old.log() and old.proc.poll() is None:
                if now() > deadline:
                    self.found.add("old-not-stopping", f"gen {old.index}")
                    break
                time.sleep(0.01)
            row["handover_s"] = round(now() - gen.started, 3)
        self.changing.clear()
        self.protected = frozenset(self.ports())
        return row

    def reloads(self) -> dict[str, Any]:
        gen = self.current
        assert gen is not None
        done = []
        for _ in range(self.rng.randint(1, 5)):
            kept = self.ports()
            what = self.mutate_links()
            self.protected = frozenset(kept & self.ports())
            self.changing.set()
            self.write_env()
            before = self.reload_lines(gen)
            how = self.rng.choice(["hup", "control", "pid-file"])
            if how == "hup":
                os.kill(gen.proc.pid, signal.SIGHUP)
            else:
                where = ["--pid-file", str(self.pid_file)] if how == "pid-file" else []
                result = subprocess.run([FORKPROXY, "reload", *where], env=self.env,
                                        capture_output=True, text=True, timeout=60)
                if result.returncode != 0:
                    self.found.add("reload-exit", f"{how} rc={result.returncode} "
                                                  f"{result.stderr.strip()[-300:]}")
            deadline = now() + 30
            while self.reload_lines(gen) == before:
                if now() > deadline:
                    self.found.add("reload-no-line", f"gen {gen.index} {how}")
                    break
                time.sleep(0.01)
            if "reload-failed" in gen.log():
                self.found.add("reload-failed", f"gen {gen.index}")
            gen.ports = self.ports()
            self.changing.clear()
            self.protected = frozenset(self.ports())
            done.append(f"{how}:{what}")
        return {"step": "reloads", "what": " ".join(done)}

    @staticmethod
    def reload_lines(gen: Generation) -> int:
        log = gen.log()
        return log.count(" reloaded ") + log.count(" reload-failed ")

    # --- traffic -----------------------------------------------------------------------
    def bump(self, key: str, n: int = 1) -> None:
        with self.stats_lock:
            self.stats[key] += n

    def long_client(self, seed: int) -> None:
        """Echo traffic on one connection for many generations, every byte checked."""
        rng = random.Random(seed)
        while not self.stop_traffic.is_set():
            port = rng.choice([p for p, (_, t) in self.core.items() if t != "redis"])
            span = rng.randint(3, 60)
            until = self.generation + span
            try:
                sock = socket.create_connection(("127.0.0.1", port), 10)
            except OSError as e:
                self.found.add("refused-core", f"long {port} {e}")
                time.sleep(0.2)
                continue
            sock.settimeout(30)
            sent, got = bytearray(), 0
            how = "done"
            try:
                while self.generation < until and not self.stop_traffic.is_set():
                    chunk = rng.randbytes(rng.randint(1, 4096))
                    sock.sendall(chunk)
                    sent += chunk
                    while got < len(sent):
                        data = sock.recv(65536)
                        if not data:
                            raise EOFError
                        if data != sent[got:got + len(data)]:
                            self.found.add("long-bytes-wrong", f"port {port} at {got}")
                            raise EOFError
                        got += len(data)
                    time.sleep(rng.uniform(0.02, 0.2))
                sock.shutdown(socket.SHUT_WR)
                while data := sock.recv(65536):
                    got += len(data)
                if got != len(sent):
                    how = "short"
            except (EOFError, ConnectionResetError, BrokenPipeError) as e:
                how = type(e).__name__
            except OSError as e:
                how = f"oserror {e}"
            finally:
                sock.close()
            self.bump(f"long-{how}")
            if how == "done":
                # Generations (take-overs and reload rounds) this connection lived through.
                with self.stats_lock:
                    spanned = self.generation - (until - span)
                    self.stats["long-done-max-span"] = max(self.stats["long-done-max-span"],
                                                           spanned)
            self.bump("long-bytes", len(sent))
            if how != "done":
                self.cuts.append((now(), port, how))

    def short_client(self) -> None:
        payload = b"x" * 300
        while not self.stop_traffic.is_set():
            changing = self.changing.is_set()
            for port, (_, target) in [*self.links.items(), (self.spec_port, ("S", "echo2"))]:
                core = port in self.core
                kept = port in self.protected
                try:
                    with socket.create_connection(("127.0.0.1", port), 10) as sock:
                        sock.settimeout(30)
                        if target == "redis":
                            sock.sendall(b"PING\r\n")
                            ok = sock.recv(100) == b"+PONG\r\n"
                        else:
                            sock.sendall(payload)
                            sock.shutdown(socket.SHUT_WR)
                            data = b""
                            while chunk := sock.recv(65536):
                                data += chunk
                            ok = data == payload
                    self.bump("short-ok" if ok else "short-wrong")
                    if not ok and core:
                        self.found.add("short-wrong-core", f"port {port}")
                except OSError as e:
                    if core:
                        self.found.add("refused-core", f"short {port} {e}")
                    elif kept and port in self.protected:
                        self.found.add("refused-kept", f"short {port} {e}")
                    elif not changing and not self.changing.is_set() and port in self.ports():
                        self.found.add("refused-configured", f"short {port} {e}")
                    self.bump("short-refused-core" if core else "short-refused-other")
            time.sleep(0.05)

    def benchmark(self) -> None:
        port = next(p for p, (_, t) in self.core.items() if t == "redis")
        while not self.stop_traffic.is_set():
            result = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port),
                                     "-n", "200", "-c", "2", "-t", "ping,set,get", "-q"],
                                    capture_output=True, text=True, timeout=120)
            self.bump("bench-runs")
            if result.returncode != 0 or "rror" in result.stdout + result.stderr:
                self.found.add("bench", f"rc={result.returncode} {result.stderr[-200:]}")
            self.stop_traffic.wait(2)

    def scraper(self) -> None:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        pattern = re.compile(r"^(forkproxy_(?:connections_total|bytes_total|"
                             r"config_reloads_total|start_time_seconds)\S*) (\S+)$", re.M)
        while not self.stop_traffic.is_set():
            result = subprocess.run(["curl", "-sS", "--max-time", "15", url],
                                    capture_output=True, text=True)
            self.bump("scrapes")
            if result.returncode != 0:
                self.found.add("scrape", result.stderr.strip()[-200:])
            else:
                values = {k: float(v) for k, v in pattern.findall(result.stdout)}
                start = values.pop("forkproxy_start_time_seconds", 0.0)
                self.scrapes.append((now(), start, values))
                with self.stats_lock:
                    self.stats["scrape-lines-max"] = max(self.stats["scrape-lines-max"],
                                                         result.stdout.count("\n"))
            self.stop_traffic.wait(0.5)

    def poller(self) -> None:
        while not self.stop_traffic.is_set():
            for command in ("status", "check"):
                result = subprocess.run([FORKPROXY, command, *(["--json"] if command == "status"
                                                               else [])],
                                        env=self.env, capture_output=True, text=True,
                                        timeout=60)
                self.bump(f"{command}-runs")
                if result.returncode != 0:
                    self.found.add(command, f"rc={result.returncode} "
                                            f"{result.stderr.strip()[-300:]}")
            self.stop_traffic.wait(1)

    # --- measures ----------------------------------------------------------------------
    def measure(self, row: dict[str, Any]) -> None:
        gen = self.current
        assert gen is not None
        pid = gen.proc.pid
        row["gen"] = self.generation
        row["pid"] = pid
        row["sup_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        try:
            named = self.pid_file.read_text().strip()
        except OSError as e:
            named = str(e)
        if named != str(pid):
            self.found.add("pid-file", f"gen {self.generation}: {named!r}, serving {pid}")
        row["sup_threads"] = psutil.Process(pid).num_threads()
        row["sup_rss_kb"], row["sup_pss_kb"] = rss_pss(pid)
        status = subprocess.run([FORKPROXY, "status", "--json"], env=self.env,
                                capture_output=True, text=True, timeout=60)
        info: dict[str, Any] = json.loads(status.stdout) if status.returncode == 0 else {}
        if info.get("pid") != pid:
            self.found.add("status-pid", f"gen {self.generation}: {info.get('pid')} != {pid}")
        mpid = (info.get("metrics") or {}).get("pid")
        if mpid:
            try:
                row["met_fds"] = len(os.listdir(f"/proc/{mpid}/fd"))
                row["met_rss_kb"], row["met_pss_kb"] = rss_pss(mpid)
            except OSError:
                self.found.add("metrics-gone", f"gen {self.generation} pid {mpid}")
        listed = {entry["port"] for entry in info.get("listeners", [])}
        if info and listed != self.ports():
            self.found.add("status-listeners", f"gen {self.generation}: {sorted(listed)} "
                                               f"!= {sorted(self.ports())}")
        reloaded = gen.log().count(" reloaded ")
        if info and info["reloads"]["success"] != reloaded:
            self.found.add("status-reloads", f"gen {self.generation}: status "
                                             f"{info['reloads']['success']} log {reloaded}")
        # The processes: every supervisor started, and what is under it.
        kinds: Counter[str] = Counter()
        zombies: set[int] = set()
        unsocketed: set[int] = set()
        for g in self.gens:
            if g.proc.poll() is not None:
                continue  # reaped: its pid may be another process's by now
            try:
                sup = psutil.Process(g.proc.pid)
                if sup.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                continue
            kinds["supervisors"] += 1
            if not (self.dir / "run" / "forkproxy" / f"{g.proc.pid}.sock").exists():
                unsocketed.add(g.proc.pid)
            try:
                children = sup.children(recursive=True)
            except psutil.NoSuchProcess:
                children = []  # it exited meanwhile (the end of its drain)
            for child in children:
                try:
                    if child.status() == psutil.STATUS_ZOMBIE:
                        kinds["zombies"] += 1
                        zombies.add(child.pid)
                    elif child.pid == mpid or "metrics" in " ".join(child.cmdline()[-2:]):
                        kinds["metrics"] += 1
                    else:
                        kinds["children"] += 1
                except psutil.NoSuchProcess:
                    pass
        row.update(kinds)
        # A child between its exit and its reap is a zombie for an instant; one still
        # there a generation later (0.2 s and more) was not reaped.
        for zombie in zombies & self.zombies:
            self.found.add("zombie-kept", f"gen {self.generation} pid {zombie}")
        self.zombies = zombies
        # A supervisor removes its socket file as it exits: one that lives on without it
        # a generation later cannot be asked for its status.
        for pid in unsocketed & self.unsocketed:
            self.found.add("socket-file-gone", f"gen {self.generation} pid {pid}")
        self.unsocketed = unsocketed
        row["unsocketed"] = len(unsocketed)
        row["draining"] = kinds["supervisors"] - 1
        run = self.dir / "run"
        row["sock_files"] = sum(1 for _ in (run / "forkproxy").glob("*")) \
            if (run / "forkproxy").exists() else 0
        row["run_entries"] = sum(1 for _ in run.rglob("*"))
        row["tmp_entries"] = sum(1 for _ in (self.dir / "tmp").rglob("*"))
        row["pid_files"] = sum(1 for _ in self.dir.glob("*.pid*"))
        listening = listening_ports(self.args.base, self.args.base + 8)
        row["listen_socks"] = sum(listening.values())
        for port in range(self.args.base + 1, self.args.base + 9):
            want = 1 if port in self.ports() else 0
            if listening.get(port, 0) != want:
                # A dropped port closes once its backlog is taken: look again once.
                time.sleep(0.5)
                again = listening_ports(self.args.base, self.args.base + 8).get(port, 0)
                if again != want:
                    self.found.add("listen-count", f"gen {self.generation} port {port}: "
                                                   f"{again} sockets, want {want}")
        if listening.get(self.metrics_port, 0) != 1:
            self.found.add("listen-count", f"gen {self.generation} metrics: "
                                           f"{listening.get(self.metrics_port, 0)}")

    # --- the run -----------------------------------------------------------------------
    def run(self) -> int:
        self.start_peers()
        self.write_env()
        self.current = self.spawn(take_over=False)
        if self.current.ready is None:
            print(self.current.log(), file=sys.stderr)
            return 1
        threads = [threading.Thread(target=self.long_client, args=(i,), daemon=True)
                   for i in range(self.args.long)]
        threads += [threading.Thread(target=self.short_client, daemon=True),
                    threading.Thread(target=self.benchmark, daemon=True),
                    threading.Thread(target=self.scraper, daemon=True),
                    threading.Thread(target=self.poller, daemon=True)]
        for t in threads:
            t.start()
        rows_file = (self.dir / "generations.jsonl").open("w")
        try:
            for generation in range(1, self.args.generations + 1):
                self.generation = generation
                started = now()
                take = self.generation % 2 if self.args.mode == "alternate" else 0
                row = self.take_over() if take else self.reloads()
                row["step_s"] = round(now() - started, 3)
                self.reap()
                time.sleep(0.2)
                self.measure(row)
                row["cuts"] = len(self.cuts)
                row.update(self.stats)
                self.rows.append(row)
                rows_file.write(json.dumps(row) + "\n")
                rows_file.flush()
                if self.generation % 20 == 0:
                    print(f"gen {self.generation}: {summary(row)} "
                          f"findings={dict(self.found.counts)}", flush=True)
        finally:
            self.stop_traffic.set()
            for t in threads:
                t.join(120)
            rows_file.close()
            self.finish()
        self.check_scrapes()
        self.check_cuts()
        self.report()
        return 1 if self.found.counts else 0

    def reap(self) -> None:
        for g in self.gens:
            if g is not self.current and g.proc.poll() is not None and g.proc.returncode != 0:
                self.found.add("exit-status", f"gen {g.index} rc={g.proc.returncode}")
                g.proc.returncode = 0  # counted once

    def finish(self) -> None:
        """Stop the last supervisor, wait for every one, check nothing is left."""
        if self.current is not None and self.current.proc.poll() is None:
            self.current.proc.send_signal(signal.SIGTERM)
        for g in self.gens:
            try:
                g.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.found.add("left-running", f"gen {g.index} pid {g.proc.pid}")
                g.proc.kill()
                g.proc.wait()
        self.reap()
        for g in self.gens:
            # Each connection's one `close` line (its child's, or the supervisor's for
            # one killed) against the `exited total=` of the supervisor that forked it.
            log = g.log()
            total = re.search(r" exited total=(\d+)", log)
            closes = log.count(" close ")
            if g.ready is not None and (total is None or int(total[1]) != closes):
                self.found.add("log-total", f"gen {g.index}: exited "
                                            f"{total[1] if total else None}, {closes} closes")
        run = self.dir / "run" / "forkproxy"
        left = [p.name for p in run.glob("*")] if run.exists() else []
        if left:
            self.found.add("left-files", f"{left}")
        if self.pid_file.exists():
            self.found.add("left-files", "pid file")
        leftover = listening_ports(self.args.base, self.args.base + 8)
        if leftover:
            self.found.add("left-listening", f"{leftover}")
        for h in self.helpers:
            h.terminate()
            h.wait(30)

    def check_scrapes(self) -> None:
        """Counters monotonic within a supervisor; a reset only at a new start time."""
        last: dict[float, dict[str, float]] = {}
        starts: list[float] = []
        for _, start, values in self.scrapes:
            if start not in last:
                if starts and start < starts[-1]:
                    self.found.add("scrape-older", f"start {start} after {starts[-1]}")
                starts.append(start)
                last[start] = {}
            seen = last[start]
            for key, value in values.items():
                if value < seen.get(key, 0.0):
                    # A link a reload dropped leaves the metrics once its last connection
                    # closes, and one added again counts from 0 (a new series, as the
                    # README says): only the core links' and the global counters hold.
                    optional = any(f"_PORT_{port}_TCP" in key for port in self.optional)
                    if optional:
                        self.stats["optional-link-recounted"] += 1
                    else:
                        self.found.add("counter-back", f"{key} {seen[key]} -> {value}")
                seen[key] = value
        take_overs = sum(1 for g in self.gens[1:] if g.ready is not None)
        self.stats["scrape-starts"] = len(starts)
        self.stats["take-overs"] = take_overs
        if len(starts) > take_overs + 1:
            self.found.add("counter-resets", f"{len(starts)} starts, {take_overs} take-overs")

    def check_cuts(self) -> None:
        """Every long connection cut must be an old generation's grace end in its log."""
        graces = []
        for g in self.gens:
            for line in g.log().splitlines():
                if " grace-over " in line:
                    graces.append(calendar.timegm(time.strptime(line[:19], "%Y-%m-%dT%H:%M:%S"))
                                  + float("0" + line[19:23]))
        for at, port, how in self.cuts:
            if not any(-2 <= at - g <= 3 for g in graces):
                self.found.add("cut-unexplained", f"{time.strftime('%H:%M:%S', time.gmtime(at))}"
                                                  f" port {port} {how}")

    def report(self) -> None:
        print("\nper 25 generations:")
        keys = ["gen", "sup_fds", "met_fds", "sup_rss_kb", "sup_pss_kb", "met_pss_kb",
                "sup_threads", "supervisors", "children", "metrics", "zombies", "sock_files",
                "run_entries", "tmp_entries", "pid_files", "listen_socks", "takeover_s"]
        print(" ".join(f"{k:>11}" for k in keys))
        last_take = None
        for row in self.rows:
            last_take = row.get("takeover_s", last_take)
            if row["gen"] % 25 == 0 or row is self.rows[0] or row is self.rows[-1]:
                shown = dict(row, takeover_s=last_take)
                print(" ".join(f"{shown.get(k, 0)!s:>11}" for k in keys))
        times = sorted(r["takeover_s"] for r in self.rows if "takeover_s" in r)
        if times:
            print(f"take-over s: median {times[len(times) // 2]} p90 "
                  f"{times[int(len(times) * 0.9)]} max {times[-1]} (n={len(times)})")
        print(f"stats: {dict(self.stats)}")
        print(f"findings: {dict(self.found.counts)}")
        for kind, examples in self.found.examples.items():
            for example in examples:
                print(f"  {kind}: {example}")


def rss_pss(pid: int) -> tuple[int, int]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0])
    return values.get("Rss", 0), values.get("Pss", 0)


def listening_ports(low: int, high: int) -> dict[int, int]:
    out = subprocess.run(["ss", "-Hltn", f"sport >= :{low} and sport <= :{high}"],
                         capture_output=True, text=True, check=True).stdout
    counts: Counter[int] = Counter()
    for line in out.splitlines():
        counts[int(line.split()[3].rpartition(":")[2])] += 1
    return dict(counts)


def summary(row: dict[str, Any]) -> str:
    keys = ("sup_fds", "met_fds", "sup_pss_kb", "supervisors", "children", "zombies",
            "sock_files", "listen_socks")
    return " ".join(f"{k}={row.get(k)}" for k in keys)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--generations", type=int, default=300)
    parser.add_argument("--long", type=int, default=6, help="long-lived clients")
    parser.add_argument("--base", type=int, default=25300, help="first of 10 loopback ports")
    parser.add_argument("--mode", choices=["alternate", "reloads"], default="alternate",
                        help="reloads: one supervisor, every generation a round of reloads")
    parser.add_argument("--doomed", type=float, default=0.05,
                        help="share of take-overs made to fail (a port held)")
    parser.add_argument("--seed", type=int, default=38)
    parser.add_argument("--dir", type=Path, default=Path(f"/tmp/generations-soak-{os.getpid()}"))
    soak = Soak(parser.parse_args())
    try:
        return soak.run()
    finally:
        for g in soak.gens:
            if g.proc.poll() is None:
                g.proc.kill()
        for h in soak.helpers:
            if h.poll() is None:
                h.kill()


if __name__ == "__main__":
    sys.exit(main())
