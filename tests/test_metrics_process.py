"""The metrics process's life under the supervisor: how its deaths are logged and shown,
how often it is started again, and what happens when forkproxy's files change under a
running supervisor (a pip upgrade or downgrade on the host)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from conftest import Proxy, metrics_pid

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
