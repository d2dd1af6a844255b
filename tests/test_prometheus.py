"""A real Prometheus server scraping forkproxy's `--metrics` on loopback.

promtool checks the exposition format (test_observability.py); this checks what a user
gets from it: the target is up, rate()/increase() of the counters follow real connections,
histogram_quantile() works over the duration buckets, and a reload resets no counter.
Timeouts are generous: Prometheus scrapes every second, on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    FORKPROXY,
    LOOPBACK,
    Proxy,
    ServerFactory,
    echo,
    free_port,
    metrics_pid,
    need,
    wait_for,
)

DEADLINE = 90.0
README = Path(__file__).resolve().parent.parent / "README.md"


class Prometheus:
    """A Prometheus server with its storage in a tmp dir, on a free loopback port."""

    def __init__(self, tmp_path: Path, target: str) -> None:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: forkproxy\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        self.port = free_port()
        self.log = tmp_path / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [need("prometheus"), f"--config.file={config}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )

    def get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
        return body

    def ready(self) -> bool:
        try:
            return self.get("/-/ready").startswith(b"Prometheus")
        except OSError:
            return False

    def query(self, expr: str) -> float | None:
        """An instant query's single value; None while it has no result."""
        reply = json.loads(self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert reply["status"] == "success", reply
        result = reply["data"]["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def reply(self, expr: str) -> dict[str, Any]:
        """An instant query's whole reply, a parse error's included (HTTP 400)."""
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = self.get(path)
        except urllib.error.HTTPError as error:
            body = error.read()
        reply: dict[str, Any] = json.loads(body)
        return reply

    def wait_value(self, expr: str, done: Callable[[float], bool]) -> float | None:
        """Query until the value satisfies `done` (Prometheus lags a scrape or two)."""
        found: list[float | None] = [None]

        def check() -> bool:
            found[0] = self.query(expr)
            return found[0] is not None and done(found[0])

        wait_for(check, DEADLINE)
        return found[0]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    servers: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        server = Prometheus(tmp_path, target)
        servers.append(server)
        if not wait_for(server.ready, DEADLINE):
            pytest.fail(f"prometheus did not start: {server.log.read_text()[-2000:]}")
        return server

    yield start
    for server in servers:
        server.stop()


def connections(port: int, count: int, hold: float) -> None:
    """`count` connections through the proxy, each open for about `hold` seconds."""
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            time.sleep(hold)


def test_prometheus_scrapes_rates_quantiles_and_no_reset_across_a_reload(
    start_proxy: Callable[..., Proxy],
    tcp_server: ServerFactory,
    prometheus_factory: Callable[[str], Prometheus],
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    upstream, other = tcp_server(echo), tcp_server(echo)
    # Link variables name the port the proxy listens on: free ones, never 6379 (a redis
    # or another run may hold it) nor 1.
    link_port, other_port = free_port(), free_port()
    while other_port == link_port:
        other_port = free_port()
    link = f"CACHE_PORT_{link_port}_TCP"
    env_file = tmp_path / "links.env"
    env_file.write_text(f"{link}=tcp://127.0.0.1:{upstream.port}\n")
    sock_path = tmp_path / "status.sock"
    proxy = start_proxy("--env-file", str(env_file), *LOOPBACK, "--status-socket", str(sock_path),
                        "--metrics", "127.0.0.1:0", expect=2, env=env)
    target = proxy.lines[-1].removeprefix("metrics http://").removesuffix("/metrics")
    prom = prometheus_factory(target)
    selector = f'{{job="forkproxy",link="{link}"}}'
    total = f"forkproxy_connections_total{selector}"

    assert prom.wait_value('up{job="forkproxy"}', lambda v: v == 1) == 1
    assert prom.wait_value('forkproxy_up{job="forkproxy"}', lambda v: v == 1) == 1
    assert prom.wait_value(total, lambda v: v == 0) == 0  # exported before the first client

    connections(proxy.port, 10, hold=0.4)
    assert prom.wait_value(total, lambda v: v == 10) == 10
    # increase() extrapolates, but from a first sample of 0 only upwards.
    assert (prom.wait_value(f"increase({total}[5m])", lambda v: v >= 10) or 0) >= 10
    assert (prom.wait_value(f"rate({total}[5m])", lambda v: v > 0) or 0) > 0
    bytes_up = f'forkproxy_bytes_total{{job="forkproxy",link="{link}",direction="upstream"}}'
    assert prom.wait_value(bytes_up, lambda v: v == 40) == 40
    # Every connection lasted 0.4 s or a little more: the median lies above the 0.25 s
    # bucket, and no clock on a loaded machine stretches it to 5 s.
    buckets = f"rate(forkproxy_connection_duration_seconds_bucket{selector}[5m])"
    median = prom.wait_value(f"histogram_quantile(0.5, sum by (le) ({buckets}))",
                             lambda v: v == v)  # not NaN
    assert median is not None and 0.25 < median < 5.0, median

    # A reload that adds a link keeps this one and its totals: no counter reset.
    env_file.write_text(f"{link}=tcp://127.0.0.1:{upstream.port}\n"
                        f"OTHER_PORT_{other_port}_TCP=tcp://127.0.0.1:{other.port}\n")
    result = subprocess.run([FORKPROXY, "reload", "--status-socket", str(sock_path)],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result
    assert prom.wait_value('forkproxy_listeners{job="forkproxy"}', lambda v: v == 2) == 2
    connections(proxy.port, 5, hold=0)
    assert prom.wait_value(total, lambda v: v == 15) == 15
    assert prom.query(f"resets({total}[10m])") == 0
    assert prom.query(f"max(resets(forkproxy_bytes_total{selector}[10m]))") == 0
    assert prom.wait_value('up{job="forkproxy"}', lambda v: v == 1) == 1

    # A reload that removes a link with no connection: its series leave the next scrape,
    # and Prometheus marks them stale at once, not 5 minutes (its lookback) later.
    gone = f'forkproxy_connections_total{{job="forkproxy",link="OTHER_PORT_{other_port}_TCP"}}'
    assert prom.wait_value(gone, lambda v: v == 0) == 0
    env_file.write_text(f"{link}=tcp://127.0.0.1:{upstream.port}\n")
    result = subprocess.run([FORKPROXY, "reload", "--status-socket", str(sock_path)],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result
    assert wait_for(lambda: prom.query(gone) is None, DEADLINE), prom.query(gone)
    assert prom.query(f"count_over_time({gone}[10m])") is not None  # it was there
    assert prom.query(total) == 15  # the link that stays keeps its series


def readme_promql() -> list[str]:
    """The PromQL expressions README gives, as a reader copies them from the rendered page.

    In a table row GitHub renders `\\|` as `|` even inside a code span (the raw file's
    escape, so the row is not cut there). Taken: a span that starts `up ==`, or names a
    forkproxy_ family with PromQL around it; not a bare family name, nor a fragment
    (`rate(...) > 0`, `sum without (reason)`), which names no family.
    """
    found: list[str] = []
    for line in README.read_text().splitlines():
        if line.startswith("|"):
            line = line.replace("\\|", "|")
        for span in re.findall(r"`([^`]+)`", line):
            if span.startswith("up ==") or (re.search(r"\bforkproxy_\w+", span)
                                            and re.search(r"[({/<>]|==| or ", span)):
                found.append(span)
    return found


def selectors(expr: str) -> list[str]:
    """Each forkproxy_ selector of `expr`, one per alternative of a `=~"a|b"` matcher: each
    must select a series, a misspelt name or label value selecting nothing, for ever."""
    out: list[str] = []
    for name, matchers in re.findall(r"\b(forkproxy_\w+)(\{[^}]*\})?", expr):
        regex = re.fullmatch(r'\{(\w+)=~"([^"]*)"\}', matchers)
        if regex:
            out += [f'{name}{{{regex[1]}="{value}"}}' for value in regex[2].split("|")]
        else:
            out.append(name + matchers)
    return out


def test_every_promql_expression_in_the_readme_runs_and_selects_real_series(
    start_proxy: Callable[..., Proxy],
    tcp_server: ServerFactory,
    prometheus_factory: Callable[[str], Prometheus],
) -> None:
    """README's alerts are copied into rule files as they are: one that does not parse
    fails a rule load, and one naming a family, label or value forkproxy does not serve
    never fires. Every family named is checked against a real scrape in Prometheus."""
    exprs = readme_promql()
    # The scan must find what it is for: the alerts README gives verbatim.
    assert "up == 0 or forkproxy_up == 0" in exprs, exprs
    assert "forkproxy_config_last_reload_successful == 0" in exprs, exprs
    assert any(e.startswith("sum without (link) (forkproxy_connections_active)")
               for e in exprs), exprs
    upstream = tcp_server(echo)
    proxy = start_proxy(*LOOPBACK, f"127.0.0.1:0=127.0.0.1:{upstream.port}",
                        "--metrics", "127.0.0.1:0", expect=2)
    target = proxy.lines[-1].removeprefix("metrics http://").removesuffix("/metrics")
    prom = prometheus_factory(target)
    assert prom.wait_value('forkproxy_up{job="forkproxy"}', lambda v: v == 1) == 1

    problems = []
    for expr in exprs:
        reply = prom.reply(expr)
        if reply["status"] != "success":
            problems.append(f"{expr!r}: {reply.get('error')}")
            continue
        for selector in selectors(expr):
            if prom.reply(f"count({selector})")["data"]["result"] == []:
                problems.append(f"{expr!r}: {selector} selects no series forkproxy serves")
    assert not problems, "\n".join(problems)


def test_prometheus_sees_one_reset_across_a_take_over_and_never_the_old_supervisor_again(
    start_proxy: Callable[..., Proxy],
    tcp_server: ServerFactory,
    prometheus_factory: Callable[[str], Prometheus],
    tmp_path: Path,
) -> None:
    """A take-over hands the metrics socket over: the new supervisor's counters start from
    0 (README), which Prometheus takes as one reset. Were the old metrics process still
    answering on the shared socket during its drain, scrapes would alternate between the
    two supervisors, each switch a false reset and a spike in rate()."""
    upstream = tcp_server(echo)
    args = (*LOOPBACK, f"127.0.0.1:0=127.0.0.1:{upstream.port}",
            "--status-socket", str(tmp_path / "status.sock"), "--metrics", "127.0.0.1:0")
    old = start_proxy(*args, expect=2)
    target = old.lines[-1].removeprefix("metrics http://").removesuffix("/metrics")
    prom = prometheus_factory(target)
    total = 'forkproxy_connections_total{job="forkproxy"}'
    start = 'forkproxy_start_time_seconds{job="forkproxy"}'
    assert prom.wait_value(total, lambda v: v == 0) == 0  # increase() counts from this 0
    connections(old.port, 5, hold=0)
    assert prom.wait_value(total, lambda v: v == 5) == 5
    old_start = prom.query(start)

    # A connection the old supervisor still serves keeps it draining, its metrics
    # process's copy of the socket with it, while the new one serves and is scraped.
    with socket.create_connection(("127.0.0.1", old.port), timeout=30) as held:
        held.sendall(b"ping")
        assert held.recv(4) == b"ping"
        new = start_proxy("--take-over", *args, expect=2)
        assert new.lines == old.lines  # the same ports, the metrics one included
        connections(new.port, 3, hold=0)
        assert prom.wait_value(total, lambda v: v == 3) == 3
        # Scrapes go on during the drain: were any answered by the old process, its
        # start time would come back among the new one's samples.
        time.sleep(5)
        assert old.proc.poll() is None, "the old supervisor did not drain its connection"
    assert prom.wait_value(start, lambda v: v != old_start) != old_start
    assert prom.query(f"changes({start}[5m])") == 1
    assert prom.query(f"resets({total}[5m])") == 1
    assert (prom.query(f"increase({total}[5m])") or 0) >= 8


def test_a_metrics_process_restart_is_a_gap_in_prometheus_not_a_reset(
    start_proxy: Callable[..., Proxy],
    tcp_server: ServerFactory,
    prometheus_factory: Callable[[str], Prometheus],
) -> None:
    """The totals live in the supervisor, not in the metrics process: one killed (the OOM
    killer's choice) and restarted 5 s later leaves scrapes failing meanwhile, `up == 0`
    as README says to alert on, and then the same counters, with no reset."""
    upstream = tcp_server(echo)
    proxy = start_proxy(*LOOPBACK, f"127.0.0.1:0=127.0.0.1:{upstream.port}",
                        "--metrics", "127.0.0.1:0", expect=2)
    target = proxy.lines[-1].removeprefix("metrics http://").removesuffix("/metrics")
    prom = prometheus_factory(target)
    total = 'forkproxy_connections_total{job="forkproxy"}'
    restarts = 'forkproxy_metrics_restarts_total{job="forkproxy"}'
    assert prom.wait_value(total, lambda v: v == 0) == 0
    connections(proxy.port, 4, hold=0)
    assert prom.wait_value(total, lambda v: v == 4) == 4
    pid = metrics_pid(proxy.pid)
    assert pid, proxy.log()
    os.kill(pid, signal.SIGKILL)
    connections(proxy.port, 3, hold=0)  # counted meanwhile, by the supervisor
    assert prom.wait_value(restarts, lambda v: v == 1) == 1
    assert prom.wait_value(total, lambda v: v == 7) == 7
    assert prom.query('min_over_time(up{job="forkproxy"}[5m])') == 0
    assert prom.query(f"resets({total}[5m])") == 0
    assert prom.query('changes(forkproxy_start_time_seconds{job="forkproxy"}[5m])') == 0
    assert (prom.query(f"increase({total}[5m])") or 0) >= 7
