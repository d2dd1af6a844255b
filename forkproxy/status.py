"""The client end of the control socket: `forkproxy status`, `check` and `reload`.

Runs in the short-lived CLI process, which is where psutil reads each live child's memory
and CPU: the supervisor only hands out the table of pids (see accounting.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from typing import Any

import psutil

from .config import mebibytes
from .control import answers, default_dir


class StatusError(Exception):
    """No supervisor to talk to, or it answered nonsense; the message says which."""


def find_socket(path: str | None) -> str:
    """The explicit path, or the only live socket in this user's default directory."""
    if path is not None:
        return path
    directory = default_dir(os.environ, os.getuid())
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith(".sock"))
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise StatusError(f"cannot look for a running forkproxy in {directory}: "
                          f"{exc.strerror}") from None
    paths = [os.path.join(directory, name) for name in names]
    live = [path for path in paths if answers(path)]
    if not live:
        raise StatusError(f"no running forkproxy found in {directory} (use --status-socket)")
    if len(live) > 1:
        raise StatusError(f"several forkproxy supervisors in {directory}: {', '.join(live)}; "
                          "choose one with --status-socket")
    return live[0]


def request(path: str, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command, return the supervisor's reply, with `pid_here`: the supervisor's
    pid as this process sees it (SO_PEERCRED; 0 when it is in no PID namespace of ours),
    which differs from the reply's `pid` when it runs in another (a container's)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            _connect(sock, path, time.monotonic() + timeout)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            raise StatusError(f"no answer on {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise StatusError(f"unreadable answer on {path}") from None
    if not isinstance(reply, dict):
        raise StatusError(f"unreadable answer on {path}")
    reply["pid_here"] = struct.unpack("3i", creds)[0]
    return reply


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    """connect(), waiting until `deadline` while the supervisor's backlog is full.

    A socket with a timeout is non-blocking, and a Unix socket's connect() then fails at
    once with EAGAIN when the listener's backlog is full: a supervisor busy for a moment
    while others ask too, which is no reason for `check` to report it unhealthy.
    """
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _pids_here(status: dict[str, Any]) -> dict[int, int]:
    """The children's pids as the supervisor sees them -> as this process sees them.

    The same numbers when both are in one PID namespace. From another (the supervisor
    in a container, `status` on the host), each child of the supervisor's is matched by
    the last field of its NSpid line, its pid in the innermost namespace; psutil given
    the container's numbers would read unrelated processes of this namespace.
    """
    pids = [child["pid"] for child in status.get("children", [])]
    here = status.get("pid_here", status.get("pid"))
    if here == status.get("pid"):
        return {pid: pid for pid in pids}
    mapping: dict[int, int] = {}
    if not here:
        return mapping  # the supervisor is not visible from here: nothing to read
    with contextlib.suppress(psutil.Error):
        for process in psutil.Process(here).children():
            try:
                with open(f"/proc/{process.pid}/status") as handle:
                    nspid = next(line for line in handle if line.startswith("NSpid:"))
            except (OSError, StopIteration):  # exited meanwhile; no NSpid before Linux 4.1
                continue
            mapping[int(nspid.split()[-1])] = process.pid
    return mapping


def enrich(status: dict[str, Any]) -> dict[str, Any]:
    """Add psutil's readings (RSS, USS, CPU seconds) to each live connection, and its
    pid as this process sees it (`pid_here`, None if not visible from here)."""
    pids_here = _pids_here(status)
    for child in status.get("children", []):
        here = pids_here.get(child["pid"])
        child.update(pid_here=here, rss=None, uss=None, cpu=None)
        if here is None:
            continue
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(here)
            with process.oneshot():
                memory = process.memory_full_info()
                times = process.cpu_times()
            child.update(rss=memory.rss, uss=memory.uss, cpu=times.user + times.system)
    return status


def _size(value: int | None) -> str:
    """1536 -> '1.5K', as ls -h and docker ps print sizes."""
    if value is None:
        return "-"
    if value < 1024:
        return f"{value}B"
    scaled = float(value)
    for unit in ("K", "M", "G", "T"):
        scaled /= 1024
        if scaled < 1024 or unit == "T":
            break
    return f"{scaled:.1f}{unit}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [headers, *rows]]


def _upstream(listener: dict[str, Any]) -> str:
    """The target, and for a name the addresses new connections go to now."""
    resolved = listener.get("resolved") or []
    if resolved == [listener["upstream"]]:
        return str(listener["upstream"])  # an address: nothing to add
    return f"{listener['upstream']} ({', '.join(resolved) or 'not resolved'})"


def _ended(outcomes: dict[str, int]) -> str:
    """How a link's connections ended, most frequent first: `closed 1204, client-reset 3`."""
    ranked = sorted(outcomes.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{outcome} {count}" for outcome, count in ranked if count) or "-"


def describe_metrics(metrics: dict[str, Any] | None) -> str | None:
    """The metrics endpoint's state in words (None without --metrics), as
    `http://127.0.0.1:9090/metrics restarting for 3s (killed by SIGKILL), 1 restart`."""
    if not metrics:
        return None
    state = metrics.get("state", "?")
    text = f"{metrics.get('url', '?')} {state}"
    since = metrics.get("since")
    if since is not None and state != "starting":
        text += f" for {max(0.0, time.time() - since):.0f}s"
    if state != "up" and metrics.get("last_exit"):
        text += f" ({metrics['last_exit']})"
    restarts = int(metrics.get("restarts", 0))
    return f"{text}, {restarts} restart{'' if restarts == 1 else 's'}"


def _max_children(status: dict[str, Any]) -> str:
    """`, max-children 52 (fits the memory limit of 64 MiB)`: the limit in force, and
    where it came from when a memory limit was found."""
    value, limit, fit = (status.get(key) for key in ("max_children", "memory_limit",
                                                     "memory_fit"))
    if value is None:
        return ""
    text = f", max-children {value}"
    if limit is None or fit is None:
        return text
    if not status.get("max_children_given", True):
        return f"{text} (fits the memory limit of {mebibytes(limit)})"
    return f"{text} (about {fit} fit the memory limit of {mebibytes(limit)})"


def render(status: dict[str, Any]) -> str:
    """The status as two tables, like `ss` or `docker ps`, after a line for the supervisor
    and, with --metrics, one for the metrics endpoint."""
    links = status.get("links", {})
    lines = [
        f"forkproxy {status.get('version', '?')} pid {status.get('pid')}, "
        f"up {time.time() - status.get('started', time.time()):.0f}s"
        + (", stopping" if status.get("stopping") else "")
        + _max_children(status)
    ]
    metrics = describe_metrics(status.get("metrics"))
    if metrics is not None:
        lines.append(f"metrics {metrics}")
    rows = []
    places = [(item["link"], f"{item['listen']} -> {_upstream(item)}")
              for item in status.get("listeners", [])]
    # A link without a listener still has a row while the supervisor reports it: at a
    # stop (listeners closed, connections finishing, clients WAITING for a child) and
    # after a reload removed it, until its last connection ends.
    places += [(name, "(not listening)")
               for name in sorted(links.keys() - {name for name, _ in places})]
    for name, where in places:
        stats = links.get(name, {})
        rows.append([
            name, where,
            str(stats.get("active", 0)), str(stats.get("waiting", 0)),
            str(stats.get("connections", 0)), str(stats.get("empty", 0)),
            str(stats.get("upstream_failures", 0)), str(stats.get("denied", 0)),
            _size(stats.get("bytes_up", 0)), _size(stats.get("bytes_down", 0)),
            _ended(stats.get("outcomes", {})),
        ])
    lines += ["", *_table(["LINK", "LISTEN -> UPSTREAM", "ACTIVE", "WAITING", "TOTAL", "EMPTY",
                           "FAILED", "DENIED", "BYTES UP", "BYTES DOWN", "ENDED"], rows)]
    rows = [
        [str(c["pid"]), c["link"], c["client"], f"{c['age']:.1f}s", _size(c["bytes_up"]),
         _size(c["bytes_down"]), _size(c.get("rss")), _size(c.get("uss")),
         "-" if c.get("cpu") is None else f"{c['cpu']:.2f}s"]
        for c in status.get("children", [])
    ]
    lines += ["", *_table(["PID", "LINK", "CLIENT", "AGE", "UP", "DOWN", "RSS", "USS", "CPU"],
                          rows)]
    return "\n".join(lines)
