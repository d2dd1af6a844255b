#!/usr/bin/env python3
"""What many live connections cost the supervisor, the operator's tools and the machine.

Starts an epoll echo server and a proxy in front of it (`forkproxy serve -q --metrics`
from this checkout, `socat ... fork`, or HAProxy), opens idle connections through it up
to each of LEVELS (each one's first byte echoed), and prints one JSON line per level:

- `sup_cpu`: the supervisor's CPU seconds per second at rest (/proc/PID/stat), and
  `kthreads_cpu`: the kernel threads' meanwhile, and the busiest of them (`kthread_top`):
  those that walk a page's mappings (DAMON's kdamond, kswapd, kcompactd) visit N+1 for
  each page the children share with the supervisor;
- `rss_kib`, `pss_kib`, `fds`: the supervisor's memory and descriptors;
- `ttfb_ms`: median and 95th percentile of a new connection's first echoed byte while
  the N live;
- forkproxy only: `status`, `status_json`, `check`, `metrics`: [seconds, bytes] of each,
  and `metrics_4_at_once_s`: the seconds of each of four scrapes started together.

Then `--reap K` (forking proxies): K clients close at once; seconds until half and all
of their children are reaped (the supervisor's /proc/PID/task/PID/children), zombies left, and what
`status --json` counts. Then `--churn S`: 8 threads open, echo and close connections for
S seconds on top of what is left: connections/s, latency, the supervisor's RSS before and
after. Other processes share a machine's CPUs: rates and latencies move with them, and
the memory and descriptor counts do not. Run it with the project's venv Python:

    .venv/bin/python scripts/scale_conns.py --levels 0,1000,2000,4000 --reap 1000 --churn 20
    .venv/bin/python scripts/scale_conns.py --proxy socat --levels 0,4000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
ECHO = """
import selectors, socket
sel = selectors.DefaultSelector()
listener = socket.socket()
listener.bind(("127.0.0.1", 0)); listener.listen(4096); listener.setblocking(False)
print(listener.getsockname()[1], flush=True)
sel.register(listener, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is listener:
            try:
                while True:
                    conn = listener.accept()[0]; conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
            except BlockingIOError:
                pass
            continue
        conn = key.fileobj
        try:
            data = conn.recv(65536)
            if data:
                conn.send(data)
                continue
        except OSError:
            pass
        sel.unregister(conn); conn.close()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def kernel_threads() -> dict[str, int]:
    """CPU ticks of each kernel thread (a child of kthreadd, pid 2), by pid and name."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, _, rest = text.partition(" (")[2].rpartition(")")
        fields = rest.split()
        if fields[1] == "2":
            found[f"{name}[{entry}]"] = int(fields[11]) + int(fields[12])
    return found


def memory(pid: int) -> tuple[int, int]:
    found = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        found[key] = rest.split()[0] if rest.split() else "0"
    return int(found["Rss"]), int(found["Pss"])


def children(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def echoed(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(len(data) - len(got))
        if not chunk:
            raise ConnectionError("closed before the echo")
        got += chunk


def probe(port: int, count: int) -> list[float]:
    """A new connection's first echoed byte, `count` times: [median, 95th] ms."""
    seen = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            echoed(sock, b"p")
        seen.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)
    seen.sort()
    return [round(statistics.median(seen), 2), round(seen[int(len(seen) * 0.95)], 2)]


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True,
                          cwd=REPO)
    return round(time.monotonic() - started, 3), done.stdout


def scrape(url: str) -> list[float]:
    """[seconds, bytes] of one scrape of `url`."""
    began = time.monotonic()
    with urllib.request.urlopen(url, timeout=60) as reply:
        body = reply.read()
    return [round(time.monotonic() - began, 3), len(body)]


def churn(port: int, seconds: float) -> dict[str, object]:
    stop = threading.Event()
    latencies: list[float] = []
    errors = [0]

    def worker() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    echoed(sock, b"c")
            except OSError:
                errors[0] += 1
                continue
            latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    latencies.sort()
    return {"connections": len(latencies), "per_s": round(len(latencies) / seconds),
            "errors": errors[0],
            "ms_median_p99": [round(statistics.median(latencies) * 1000, 2),
                              round(latencies[int(len(latencies) * 0.99)] * 1000, 2)]}


def start_proxy(kind: str, upstream: int, workdir: str,
                started: list[subprocess.Popen[str]]) -> tuple[int, int, dict[str, str], str]:
    """(pid, port, env for forkproxy's commands, metrics URL) of the proxy started."""
    env = dict(os.environ)
    if kind == "forkproxy":
        env["FORKPROXY_STATUS_SOCKET"] = f"{workdir}/status.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "forkproxy", "serve", f"127.0.0.1:0=127.0.0.1:{upstream}",
             "-q", "--max-children", "20000", "--metrics", "127.0.0.1:0"],
            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        started.append(proc)
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1].rsplit(":", 1)[1])
        url = proc.stdout.readline().split()[1]
        return proc.pid, port, env, url
    port = free_port()
    if kind == "socat":
        command = ["socat", f"TCP4-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                   f"TCP4:127.0.0.1:{upstream}"]
    else:
        config = Path(workdir, "haproxy.cfg")
        config.write_text(
            "global\n maxconn 9000\n nbthread 1\ndefaults\n mode tcp\n timeout connect 5s\n"
            " timeout client 1h\n timeout server 1h\n maxconn 9000\n"
            f"frontend f\n bind 127.0.0.1:{port}\n backlog 4096\n default_backend b\n"
            f"backend b\n server s 127.0.0.1:{upstream}\n")
        command = ["haproxy", "-db", "-f", str(config)]
    if shutil.which(command[0]) is None:
        raise SystemExit(f"scale_conns.py: {command[0]} is not installed")
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL, text=True)
    started.append(proc)
    deadline = time.monotonic() + 5
    while True:  # listening when a connection goes through
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return proc.pid, port, env, ""


def measure(args: argparse.Namespace, workdir: str,
            started: list[subprocess.Popen[str]]) -> None:
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    started.append(echo)
    assert echo.stdout is not None
    upstream = int(echo.stdout.readline())
    pid, port, env, url = start_proxy(args.proxy, upstream, workdir, started)
    forkproxy = args.proxy == "forkproxy"
    held: list[socket.socket] = []
    for level in args.levels:
        began = time.monotonic()
        while len(held) < level:  # in batches: the backlog holds 4096
            batch = [socket.create_connection(("127.0.0.1", port), timeout=30)
                     for _ in range(min(200, level - len(held)))]
            for sock in batch:
                echoed(sock, b"o")
            held += batch
        row: dict[str, object] = {"n": level, "open_s": round(time.monotonic() - began, 2)}
        time.sleep(min(2.0, args.rest))  # the last children settle
        own, threads = ticks(pid), kernel_threads()
        time.sleep(args.rest)
        row["sup_cpu"] = round((ticks(pid) - own) / TICK / args.rest, 4)
        used = {name: spent - threads.get(name, 0) for name, spent in kernel_threads().items()}
        row["kthreads_cpu"] = round(sum(used.values()) / TICK / args.rest, 3)
        row["kthread_top"] = max(used, key=lambda name: used[name], default="")
        row["rss_kib"], row["pss_kib"] = memory(pid)
        row["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        row["ttfb_ms"] = probe(port, args.probes)
        if forkproxy:
            for name, command in (("status", ["status"]), ("status_json", ["status", "--json"]),
                                  ("check", ["check"])):
                seconds, out = timed([sys.executable, "-m", "forkproxy", *command], env)
                row[name] = [seconds, len(out)]
            row["metrics"] = scrape(url)
            # Four at once: each answered from one reading begun after it came, shared.
            four: list[list[float]] = [[] for _ in range(4)]
            scrapers = [threading.Thread(target=lambda got=got: got.extend(scrape(url)))
                        for got in four]
            for scraper in scrapers:
                scraper.start()
            for scraper in scrapers:
                scraper.join()
            row["metrics_4_at_once_s"] = sorted(seconds for seconds, _ in four)
        print(json.dumps(row), flush=True)
    if args.reap and args.proxy != "haproxy":  # HAProxy forks no child to reap
        before = len(children(pid))
        began = time.monotonic()
        for sock in held[-args.reap:]:
            sock.close()
        del held[-args.reap:]
        half = None
        while len(children(pid)) > before - args.reap and time.monotonic() - began < 60:
            if half is None and len(children(pid)) <= before - args.reap // 2:
                half = round(time.monotonic() - began, 3)
            time.sleep(0.002)
        took = round(time.monotonic() - began, 3)
        # Reaped: how many of them are gone (all of them, unless a minute was not enough).
        reap: dict[str, object] = {"closed": args.reap,
                                   "reaped": before - len(children(pid)),
                                   "half_s": took if half is None else half, "all_s": took}
        time.sleep(1)
        states = []
        for child in children(pid):
            try:
                states.append(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                pass
        reap["zombies"] = states.count("Z")
        if forkproxy:
            reply_json = json.loads(timed([sys.executable, "-m", "forkproxy", "status",
                                           "--json"], env)[1])
            reap["status_children"] = len(reply_json["children"])
            reap["expected"] = len(held)
        print(json.dumps(reap), flush=True)
    if args.churn:
        rss = memory(pid)[0]
        result = churn(port, args.churn)
        result["rss_kib_before_after"] = [rss, memory(pid)[0]]
        print(json.dumps(result), flush=True)


def levels(text: str) -> list[int]:
    """`--levels 0,1000,4000`: connection counts, rising."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"wants counts such as 0,1000,4000, not {text!r}") from None
    if any(count < 0 for count in counts) or counts != sorted(counts):
        raise argparse.ArgumentTypeError(f"wants counts that rise from 0 up, not {text!r}")
    return counts


def _number(kind: Callable[[str], float], least: float, above: bool,
            wants: str) -> Callable[[str], float]:
    """An option's type: a number of `kind` above (or at least) `least`, else argparse's
    one line naming the option (a bad one failed as a traceback, connections open)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = least - 1
        if value < least or (above and value == least):
            raise argparse.ArgumentTypeError(f"{wants}, not {text!r}")
        return value
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", choices=["forkproxy", "socat", "haproxy"],
                        default="forkproxy")
    parser.add_argument("--levels", default="0,500,1000,2000,4000", type=levels)
    parser.add_argument("--rest", type=_number(float, 0, True, "wants seconds above 0"),
                        default=6.0, help="seconds measured at rest")
    parser.add_argument("--probes", type=_number(int, 1, False, "wants a count of 1 or more"),
                        default=100)
    parser.add_argument("--reap", type=_number(int, 0, False, "wants a count of 0 or more"),
                        default=0, help="clients that close at once")
    parser.add_argument("--churn", type=_number(float, 0, False, "wants seconds of 0 or more"),
                        default=0.0, help="seconds of churn")
    args = parser.parse_args()
    if args.reap > args.levels[-1]:
        parser.error(f"--reap {args.reap}: more than the {args.levels[-1]} connections held")
    need = 2 * max(args.levels) + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard < need:
            raise SystemExit(f"scale_conns.py: {max(args.levels)} connections need {need} "
                             f"descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    started: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="scale-conns-") as workdir:
        try:
            measure(args, workdir, started)
        finally:
            for proc in reversed(started):
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
