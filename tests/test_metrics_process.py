"""The metrics process's life under the supervisor: how its deaths are logged and shown,
how often it is started again, and what happens when forkproxy's files change under a
running supervisor (a pip upgrade or downgrade on the host)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from conftest import FORKPROXY, Proxy, metrics_pid

StartProxy = Callable[..., Proxy]
T = TypeVar("T")


def poll(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 30) -> T:
    """Call `probe` until `done(value)` or the deadline; returns the last value (asserted later)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


def ask(path: str | Path) -> dict[str, Any]:
    """`status` on the control socket, spoken by hand (cheap enough to poll with)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(str(path))
        sock.sendall(b'{"command": "status"}\n')
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def serving_metrics_pid(proxy: Proxy) -> int:
    """The metrics process's pid, once it has answered a scrape: past its imports and its
    set-up (signal dispositions included), in its loop."""
    url = proxy.lines[-1].split(" ", 1)[1]
    with urllib.request.urlopen(url, timeout=15) as response:
        assert b"forkproxy_up 1.0" in response.read()
    pid = poll(lambda: metrics_pid(proxy.pid), bool)
    assert pid, f"no metrics process\n{proxy.log()}"
    return pid


def test_a_metrics_process_killed_with_sigterm_is_logged_as_killed(
    start_proxy: StartProxy,
) -> None:
    """`kill PID` (SIGTERM) of the metrics process was logged `metrics-died status="exit
    status 0"`: its handler exited 0, as if it had quit of itself. It dies by the signal now."""
    proxy = start_proxy("--metrics", "127.0.0.1:0", "127.0.0.1:0=127.0.0.1:1", expect=2)
    os.kill(serving_metrics_pid(proxy), signal.SIGTERM)
    log = poll(proxy.log, lambda text: "metrics-died" in text)
    [line] = [x for x in log.splitlines() if "metrics-died" in x]
    assert 'status="killed by SIGTERM"' in line, line
    assert proxy.stop() == 0


def test_a_metrics_process_that_keeps_dying_is_restarted_less_and_less_often(
    start_proxy: StartProxy, short_dir: Path,
) -> None:
    """A metrics process that died again soon after each restart was restarted every 5 s
    for ever, and `status` said `restarting for 3s` an hour into the loop: each death
    reset the time. The delay doubles now for each quick death in a row, and status counts
    from the first death of the run, with the deaths and the next start."""
    sock = short_dir / "s.sock"
    proxy = start_proxy("--metrics", "127.0.0.1:0", f"--status-socket={sock}",
                        "127.0.0.1:0=127.0.0.1:1", expect=2)
    first = serving_metrics_pid(proxy)
    os.kill(first, signal.SIGKILL)
    died = time.time()
    # Back 5 s later: killed again as soon as it is there, a death in a row.
    second = poll(lambda: metrics_pid(proxy.pid), lambda pid: pid not in (0, first))
    assert second not in (0, first), proxy.log()
    os.kill(second, signal.SIGKILL)
    log = poll(proxy.log, lambda text: text.count("metrics-died") == 2)
    details = [x.split("detail=", 1)[1] for x in log.splitlines() if "metrics-died" in x]
    assert details == ['"restarting in 5s"', '"restarting in 10s"'], log
    state = ask(sock)["metrics"]
    assert state["state"] == "restarting" and state["deaths_in_a_row"] == 2, state
    assert state["since"] <= died + 1 and 5 < state["retry_in"] <= 10, (state, died)
    status = subprocess.run([FORKPROXY, "status", f"--status-socket={sock}"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    [line] = [x for x in status.splitlines() if x.startswith("metrics ")]
    found = re.search(r"restarting for (\d+)s \(killed by SIGKILL \(perhaps out of memory\)\), "
                      r"2 restarts, 2 deaths in a row, next start in (\d+)s$", line)
    assert found, line
    # From the first death (5 s and more before), not the last (a moment ago).
    assert int(found[1]) >= 4 and 0 <= int(found[2]) <= 10, line
    assert proxy.stop() == 0
