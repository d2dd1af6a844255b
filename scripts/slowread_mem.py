#!/usr/bin/env python3
"""What a proxy holds per connection whose client never reads (the "never reads" case).

An upstream writes as fast as it can (socat from /dev/zero, one process per connection);
N clients connect through the proxy and never read. Once the queues stop growing, per
connection: the proxy's socket memory from `ss -tmi` skmem (r: receive queue, w: send
queue, f: forward allocation; its client-facing and upstream-facing sockets apart), the
bytes held between them (read from the upstream, not yet queued to the client: the
splice pipe or the user-space buffer), and the proxy's PSS growth.

Columns, MiB per connection: up_r, the proxy's upstream-facing receive queues; up_rb,
the largest receive buffer the kernel gave one (autotuned up to tcp_rmem's max); cl_w,
its client-facing send queues (up to tcp_wmem's max, cl_tb); between; up_other and
cl_other, the rest of the two sockets' skmem (forward allocations); pss; total.

Runs in a network namespace of its own (re-executes itself under `unshare -n`), with
Linux's default TCP buffer limits there unless --rmem/--wmem say otherwise (tcp_rmem
max 6 MiB, tcp_wmem max 4 MiB), so the host's settings neither matter nor change.
Needs root, socat, haproxy, iperf3 (--bulk). Usage:

    scripts/slowread_mem.py [--proxies forkproxy,socat,haproxy] [--conns 1,50]
        [--forkproxy PATH] [--rmem "4096 131072 6291456"] [--wmem "4096 16384 4194304"]
        [--sysctl NAME=VALUE]... [--bulk SECONDS] [--upload] [--read-first MIB]
    scripts/slowread_mem.py --try-bounds [--sysctl net.ipv4.tcp_shrink_window=1]

--upload turns it around (an upstream that never reads a client's upload: a server
that stopped draining a request): clients send from /dev/zero as fast as they can, the
upstream accepts and never reads; the columns are then the proxy's client-facing
receive queues (cl_r) and largest receive buffer (cl_rb), its upstream-facing send
queues (up_w) and largest send buffer (up_tb), between, cl_other (the client sockets'
w and f), up_other (the upstream sockets' r and f), pss, total. --read-first MIB has the
reader (the clients; with --upload, the upstream) take that many MiB of each connection
as fast as it can first, then stop: what the buffers grown meanwhile hold.

--bulk adds iperf3 through each proxy both ways at the namespace's settings (what a
lower tcp_rmem/tcp_wmem costs throughput on loopback). --try-bounds shows what a bound
set on a socket once its reader stopped does (docs/benchmarks.md, "A client that never
reads").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

UPSTREAM, PROXY = 7001, 7002  # fixed: the namespace is ours alone
REPO = Path(__file__).resolve().parent.parent
# Not a FORKPROXY_ name: forkproxy serve, started with this environment, warns of
# FORKPROXY_ variables no option reads (config.PROJECT_VARIABLES lists the scripts' own).
NETNS_MARK = "SLOWREAD_MEM_NETNS"


def in_own_netns(args: argparse.Namespace) -> None:
    """Re-run this script in a fresh network namespace, loopback up, default buffers."""
    if os.environ.get(NETNS_MARK):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        settings = [("net.ipv4.tcp_rmem", args.rmem), ("net.ipv4.tcp_wmem", args.wmem)]
        for name, value in settings + [s.partition("=")[::2] for s in args.sysctl]:
            try:  # this namespace's own settings: the host's stay as they are
                Path("/proc/sys", *name.split(".")).write_text(value)
            except OSError as exc:  # no such setting (bad input), or not root
                print(f"slowread_mem.py: cannot set {name}={value}: {exc.strerror}",
                      file=sys.stderr)
                sys.exit(2)
        return
    env = dict(os.environ, **{NETNS_MARK: "1"})
    try:
        code = subprocess.run(["unshare", "-n", sys.executable, *sys.argv], env=env).returncode
    except OSError as exc:
        raise SystemExit(f"slowread_mem.py: cannot run unshare: {exc.strerror}") from None
    sys.exit(code)


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def start_proxy(name: str, forkproxy: str, workdir: Path) -> subprocess.Popen[bytes]:
    if name == "forkproxy":
        argv = [forkproxy, "serve", "-q", f"127.0.0.1:{PROXY}=127.0.0.1:{UPSTREAM}"]
    elif name == "socat":
        argv = ["socat", f"TCP4-LISTEN:{PROXY},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                f"TCP4:127.0.0.1:{UPSTREAM}"]
    else:  # haproxy, configured as scripts/bench_run.py does
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(
            "global\n    maxconn 4096\n    nbthread 2\ndefaults\n    mode tcp\n"
            "    option splice-auto\n    timeout connect 5s\n    timeout client 10m\n"
            "    timeout server 10m\nfrontend fe\n"
            f"    bind 127.0.0.1:{PROXY}\n    default_backend be\nbackend be\n"
            f"    server target 127.0.0.1:{UPSTREAM}\n")
        argv = ["haproxy", "-db", "-f", str(cfg)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_port(PROXY)
    return proc


def tree(root: int) -> list[int]:
    """root and its descendants (from /proc/*/stat's ppid)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pss_kib(root: int) -> int:
    total = 0
    for pid in tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        total += int(m.group(1)) if m else 0
    return total


SKMEM = re.compile(r"skmem:\(r(\d+),rb(\d+),t(\d+),tb(\d+),f(\d+),w(\d+)")


def sockets() -> list[dict[str, int]]:
    """Established TCP sockets in this namespace: ports, queues, skmem, tcp_info bytes."""
    text = subprocess.run(["ss", "-tmiHn", "state", "established"], capture_output=True,
                          text=True, check=True).stdout
    records: list[str] = []
    for line in text.splitlines():  # a socket's line, then its indented details
        if line[:1].isspace() and records:
            records[-1] += " " + line
        else:
            records.append(line)
    out: list[dict[str, int]] = []
    for rec in records:
        fields = rec.split()
        if len(fields) < 4 or ":" not in fields[2]:
            continue
        sock = {"recvq": int(fields[0]), "sendq": int(fields[1]),
                "lport": int(fields[2].rsplit(":", 1)[1]),
                "pport": int(fields[3].rsplit(":", 1)[1])}
        if (m := SKMEM.search(rec)):
            f = int(m[5])  # forward allocation: a signed int, shown unsigned when < 0
            sock.update(r=int(m[1]), rb=int(m[2]), t=int(m[3]), tb=int(m[4]),
                        f=f - 2**32 if f >= 2**31 else f, w=int(m[6]))
        for key in ("bytes_acked", "bytes_received"):
            if (m2 := re.search(rf"\b{key}:(\d+)", rec)):
                sock[key] = int(m2[1])
        out.append(sock)
    return out


def held(socks: list[dict[str, int]], upload: bool = False) -> dict[str, int]:
    """Sum the proxy's sockets on the side it reads from (src: the upstream-facing ones,
    peer port UPSTREAM; with `upload`, the client-facing ones, local port PROXY) and on
    the side it writes to (dst); `between` is what it read from src and has not queued
    to dst (its pipe or buffer): bytes received minus still queued, minus bytes written
    to dst (acknowledged plus still queued)."""
    cl = [s for s in socks if s["lport"] == PROXY]
    up = [s for s in socks if s["pport"] == UPSTREAM]
    src, dst = (cl, up) if upload else (up, cl)
    got = sum(s.get("bytes_received", 0) - s["recvq"] for s in src)
    gave = sum(s.get("bytes_acked", 1) - 1 + s["sendq"] for s in dst)
    return {
        "n_client": len(cl), "n_up": len(up),
        "src_r": sum(s.get("r", 0) for s in src),
        "src_rb": max((s.get("rb", 0) for s in src), default=0),
        "src_other": sum(s.get("w", 0) + s.get("f", 0) for s in src),
        "dst_w": sum(s.get("w", 0) for s in dst),
        "dst_tb": max((s.get("tb", 0) for s in dst), default=0),
        "dst_other": sum(s.get("r", 0) + s.get("f", 0) for s in dst),
        "between": max(0, got - gave),
    }


# Each mode's names for held()'s src_ and dst_ columns.
DOWNLOAD_COLS = {"src_r": "up_r", "src_rb": "up_rb", "dst_w": "cl_w", "dst_tb": "cl_tb",
                 "src_other": "up_other", "dst_other": "cl_other"}
UPLOAD_COLS = {"src_r": "cl_r", "src_rb": "cl_rb", "dst_w": "up_w", "dst_tb": "up_tb",
               "src_other": "cl_other", "dst_other": "up_other"}

# The upload mode's upstream: accepts, reads the first argv[2] bytes of each connection
# as fast as it comes (none: never reads), then holds it unread.
SINK = """
import socket, sys, threading
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=1024)
first, held = int(sys.argv[2]), []
def take(conn):
    buf, got = bytearray(1 << 20), 0
    while got < first:
        n = conn.recv_into(buf, min(len(buf), first - got))
        if not n:
            return
        got += n
while True:
    conn, _ = srv.accept()
    held.append(conn)
    if first:
        threading.Thread(target=take, args=(conn,), daemon=True).start()
"""


def read_first(sock: socket.socket, size: int) -> None:
    """Take `size` bytes from `sock` as fast as they come (a download's client)."""
    buf, got = bytearray(1 << 20), 0
    while got < size:
        n = sock.recv_into(buf, min(len(buf), size - got))
        if not n:
            return
        got += n


def total(h: dict[str, int]) -> int:
    return h["src_r"] + h["src_other"] + h["dst_w"] + h["dst_other"] + h["between"]


def measure(name: str, conns: int, forkproxy: str, settle: float, upload: bool = False,
            first: int = 0) -> dict[str, float]:
    """What the proxy holds per connection, once the queues stopped growing, with `conns`
    connections whose reader (the client; with `upload`, the upstream) takes `first`
    bytes of each, then nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        if upload:
            upstream = subprocess.Popen(
                [sys.executable, "-c", SINK, str(UPSTREAM), str(first)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        else:
            upstream = subprocess.Popen(
                ["socat", "-u", "-b", "262144", "OPEN:/dev/zero",
                 f"TCP4-LISTEN:{UPSTREAM},bind=127.0.0.1,fork,reuseaddr,backlog=1024"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(UPSTREAM)
        time.sleep(0.3)  # the probe's connection ended
        proxy = start_proxy(name, forkproxy, Path(tmp))
        senders: list[subprocess.Popen[bytes]] = []
        clients: list[socket.socket] = []
        try:
            time.sleep(1.0)  # started and settled (HAProxy frees some start-up memory)
            pss_before = pss_kib(proxy.pid)
            readers = []
            for _ in range(conns):
                if upload:  # one sender each, as fast as it can
                    senders.append(subprocess.Popen(
                        ["socat", "-u", "-b", "262144", "OPEN:/dev/zero",
                         f"TCP4:127.0.0.1:{PROXY}"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, start_new_session=True))
                    continue
                c = socket.create_connection(("127.0.0.1", PROXY))
                clients.append(c)  # never read, or only its first bytes
                if first:
                    readers.append(threading.Thread(target=read_first, args=(c, first),
                                                    daemon=True))
                    readers[-1].start()
            for reader in readers:
                reader.join()
            # Until the queues stop growing: three looks 0.5 s apart within 0.5%.
            last, steady, start = -1, 0, time.monotonic()
            while steady < 3 and time.monotonic() - start < settle:
                time.sleep(0.5)
                now = total(held(sockets(), upload))
                steady = steady + 1 if last > 0 and abs(now - last) <= last * 0.005 else 0
                last = now
            h = held(sockets(), upload)
            pss = pss_kib(proxy.pid) - pss_before
        finally:
            for c in clients:
                c.close()
            for p in (*senders, proxy, upstream):
                os.killpg(p.pid, 15)
                p.wait()
            time.sleep(0.5)
    mib = 1024 * 1024
    per = {k: v / conns / mib for k, v in h.items() if k not in ("n_client", "n_up")}
    per["pss"] = pss / conns / 1024
    per["total"] = total(h) / conns / mib + per["pss"]
    per["src_rb"], per["dst_tb"] = h["src_rb"] / mib, h["dst_tb"] / mib  # largest, not a mean
    if h["n_client"] != conns or h["n_up"] != conns:
        print(f"# {name}: {h['n_client']} client-side, {h['n_up']} upstream-side sockets "
              f"for {conns} connections", file=sys.stderr)
    return per


def bulk(name: str, forkproxy: str, seconds: int) -> tuple[float, float]:
    """iperf3 through the proxy at this namespace's settings: Gbit/s up, then down (-R)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(["iperf3", "-s", "-p", str(UPSTREAM)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(UPSTREAM)
        proxy = start_proxy(name, forkproxy, Path(tmp))
        try:
            rates = []
            for extra in ([], ["-R"]):
                time.sleep(0.5)
                out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(PROXY), "-t",
                                      str(seconds), "-J", *extra], capture_output=True,
                                     text=True, check=True).stdout
                rates.append(json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9)
        finally:
            for p in (proxy, server):
                os.killpg(p.pid, 15)
                p.wait()
            time.sleep(0.5)
    return rates[0], rates[1]


def try_bound(bound: str) -> str:
    """What a bound set on a socket the moment its reader stops does: a reader takes an
    upstream's bytes as fast as it can for 1 s (the kernel grows its receive buffer),
    stops, sets `bound` (none; clamp: TCP_WINDOW_CLAMP 64 KiB; rcvbuf: SO_RCVBUF 64 KiB),
    waits 2 s, then reads again (the clamp lifted) for 3 s."""
    upstream = subprocess.Popen(
        ["socat", "-u", "-b", "262144", "OPEN:/dev/zero",
         f"TCP4-LISTEN:{UPSTREAM},bind=127.0.0.1,fork,reuseaddr"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(UPSTREAM)
        time.sleep(0.3)  # the probe's connection ended
        sock = socket.create_connection(("127.0.0.1", UPSTREAM))
        sock.settimeout(0.5)
        buf = bytearray(1 << 20)
        end = time.monotonic() + 1
        while time.monotonic() < end:
            sock.recv_into(buf)

        def queue() -> tuple[float, float]:
            mine = [s for s in sockets() if s["pport"] == UPSTREAM]
            return mine[0].get("r", 0) / 2**20, mine[0].get("rb", 0) / 2**20

        at_stop = queue()
        if bound == "clamp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, 65536)
        elif bound == "rcvbuf":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        time.sleep(2)
        held = queue()
        if bound == "clamp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, 1 << 30)
        rates = []
        for _ in range(6):
            got, end = 0, time.monotonic() + 0.5
            while time.monotonic() < end:
                try:
                    got += sock.recv_into(buf)
                except TimeoutError:
                    pass
            rates.append(f"{got / 0.5 / 1e9:.1f}")
        sock.close()
    finally:
        os.killpg(upstream.pid, 15)
        upstream.wait()
        time.sleep(0.3)
    return (f"{bound:7} queue at the stop {at_stop[0]:.2f} MiB, 2 s later {held[0]:.2f} "
            f"(buffer {held[1]:.2f}); reading again, GB/s per 0.5 s: {' '.join(rates)}")


def _names(text: str) -> list[str]:
    names = text.split(",")
    if not set(names) <= {"forkproxy", "socat", "haproxy"}:
        raise argparse.ArgumentTypeError(f"not forkproxy, socat or haproxy: {text!r}")
    return names


def _counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"not counts of 1 or more, comma-separated: {text!r}")
    return counts


def _triple(text: str) -> str:
    if not re.fullmatch(r"\s*\d+\s+\d+\s+\d+\s*", text):
        raise argparse.ArgumentTypeError(f"not three numbers (min default max): {text!r}")
    return text


def _program(text: str) -> str:
    if not os.access(text, os.X_OK) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"not a program: {text!r}")
    return os.path.abspath(text)


def _mib(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}")
    return int(text) * 1024 * 1024


def _setting(text: str) -> str:
    if not re.fullmatch(r"net\.[\w.]+=\S.*", text):
        raise argparse.ArgumentTypeError(f"not NAME=VALUE of a net.* setting: {text!r}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proxies", type=_names, default="forkproxy,socat,haproxy")
    parser.add_argument("--conns", type=_counts, default="1,50")
    parser.add_argument("--forkproxy", type=_program, default=None,
                        help="the forkproxy to measure [default: this tree's .venv's, "
                        "else the one on PATH]")
    parser.add_argument("--rmem", type=_triple, default="4096 131072 6291456")  # Linux's
    parser.add_argument("--wmem", type=_triple, default="4096 16384 4194304")  # defaults
    parser.add_argument("--sysctl", type=_setting, action="append", default=[],
                        metavar="NAME=VALUE",
                        help="another setting of the namespace (repeatable)")
    parser.add_argument("--bulk", type=int, default=0, metavar="SECONDS",
                        help="also iperf3 through each proxy, both ways, this long")
    parser.add_argument("--try-bounds", action="store_true",
                        help="only show what TCP_WINDOW_CLAMP or SO_RCVBUF set once a reader "
                        "stopped does to its queue, and to its reads after")
    parser.add_argument("--upload", action="store_true",
                        help="clients upload as fast as they can to an upstream that never "
                        "reads (default: the upstream sends to clients that never read)")
    parser.add_argument("--read-first", type=_mib, default=0, metavar="MIB",
                        help="the reader takes this many MiB of each connection first, "
                        "then stops [default: 0, it never reads]")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds to wait at most for the queues to stop growing")
    args = parser.parse_args()
    if args.forkproxy is None and "forkproxy" in args.proxies and not args.try_bounds:
        tree = REPO / ".venv/bin/forkproxy"
        args.forkproxy = str(tree) if tree.exists() else shutil.which("forkproxy")
        if args.forkproxy is None:
            parser.error("no forkproxy in this tree's .venv nor on PATH: give --forkproxy")
    in_own_netns(args)
    if args.try_bounds:
        for bound in ("none", "clamp", "rcvbuf"):
            print(try_bound(bound), flush=True)
        return
    names = UPLOAD_COLS if args.upload else DOWNLOAD_COLS
    reader = "the upstream" if args.upload else "the clients"
    print(f"{'upload' if args.upload else 'download'}; {reader} read "
          f"{args.read_first // 2**20 or 'no'} MiB first; tcp_rmem {args.rmem}; tcp_wmem "
          f"{args.wmem}; MiB per connection ({names['src_rb']}, {names['dst_tb']}: the "
          "largest buffer size)")
    cols = ("src_r", "src_rb", "dst_w", "dst_tb", "between", "src_other", "dst_other",
            "pss", "total")
    print(f"{'proxy':10} {'conns':>5} " + " ".join(f"{names.get(c, c):>8}" for c in cols))
    for conns in args.conns:
        for name in args.proxies:
            per = measure(name, conns, args.forkproxy, args.settle, args.upload,
                          args.read_first)
            print(f"{name:10} {conns:5d} " + " ".join(f"{per[c]:8.2f}" for c in cols),
                  flush=True)
    if args.bulk:
        for name in args.proxies:
            up, down = bulk(name, args.forkproxy, args.bulk)
            print(f"{name:10} bulk Gbit/s: up {up:.2f}, down {down:.2f}", flush=True)


if __name__ == "__main__":
    main()
