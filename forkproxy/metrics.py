"""The metrics process: Prometheus exposition of the supervisor's accounting, with psutil.

`forkproxy serve --metrics HOST:PORT` binds the port in the supervisor (so a bad or busy
address is a start-up error like any other) and starts this process once with the socket
inherited. On each scrape it asks the supervisor for the table of links and live
children, as a client of its control socket (over a connection handed to the supervisor,
so that the socket's file need not be there: SupervisorCollector), reads the children's
memory and CPU with psutil, and renders it all with prometheus_client; scrapes that come
together share readings (FreshReadings). prometheus_client and psutil import threading
and keep state, so they live here, not in the process that forks once per connection.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import http.client
import io
import os
import selectors
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, NoReturn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import ErrorStream, StartResponse, WSGIApplication, WSGIEnvironment

import psutil
from prometheus_client import make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from forkproxy.accounting import FAILURE_REASONS
from forkproxy.config import peer_text
from forkproxy.installed import ADVICE, FILES_CHANGED
from forkproxy.listeners import ACCEPT_BACKOFF, METRICS_SOCKET_SHUT, RESOURCE_ERRORS
from forkproxy.log import DEBUG, ERROR, INFO, WARNING, Logger, crash_fields, fold, format_in
from forkproxy.process_name import METRICS, name_process
from forkproxy.relay import OUTCOMES
from forkproxy.status import StatusError, enrich, proc_not_ours, read_sockets, request

# How a connection can end: the relay's exit statuses, and `killed` (by a signal), which
# the supervisor sees instead of a status (accounting.Accounting.finished).
OUTCOME_NAMES = (*OUTCOMES.values(), "killed")


class SupervisorCollector(Collector):
    def __init__(self, status_socket: str, handoff: socket.socket | None = None,
                 supervisor_pid: int = 0) -> None:
        """`handoff`: the socket the supervisor takes our connections over (see
        _handed_connection), None to connect to `status_socket`; `supervisor_pid`, as
        this process sees it, for a handed connection (whose SO_PEERCRED names us)."""
        self.status_socket = status_socket
        self.handoff = handoff
        self.supervisor_pid = supervisor_pid
        # The highest CPU total served, per link: (its totals' `since`, that total).
        self.cpu_seen: dict[str, tuple[float, float]] = {}
        self.readings = FreshReadings(self._read)

    def _handed_connection(self) -> socket.socket:
        """A connection to the supervisor that no socket file stands for: one end of a
        fresh socketpair, the other end sent over `handoff` to the supervisor, which
        serves it as a client of its control socket. Through the file, scrapes failed
        from its removal (systemd-tmpfiles aging /tmp, an rm) until the supervisor's
        next look at it, up to a minute later."""
        assert self.handoff is not None
        ours, theirs = socket.socketpair()
        with theirs:
            try:
                socket.send_fds(self.handoff, [b"."], [theirs.fileno()])
            except OSError:
                ours.close()
                raise
        return ours

    def collect(self) -> Iterator[Metric]:
        """A scrape's metrics: from a reading begun after the scrape came, shared with
        the scrapes that came while the one before it was read (FreshReadings)."""
        yield from self.readings.get()

    def _read(self) -> list[Metric]:
        """One reading: the supervisor's reply, its children read, rendered. Readings
        never overlap (FreshReadings), so cpu_seen has one writer at a time."""
        return list(self._render())

    def _render(self) -> Iterator[Metric]:
        try:
            if self.handoff is None:
                status = request(self.status_socket, "status")
            else:
                status = request(self.status_socket, "status",
                                 connected=self._handed_connection)
                status["pid_here"] = self.supervisor_pid  # our parent: our PID namespace
            replied_at = time.monotonic()
        except StatusError:
            up = GaugeMetricFamily("forkproxy_up", "1 when the supervisor answered this scrape")
            up.add_metric([], 0)
            yield up
            return
        yield from render(status, self.cpu_seen, replied_at)

    def describe(self) -> Iterator[Metric]:
        """The families collect() yields, without asking the supervisor: the registry
        learns their names, which `/metrics?name[]=...` filters on (an empty body without)."""
        return render({})


class _Reading:
    """One reading's outcome, for the callers that share it."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = False
        self.outcome: list[Metric] | BaseException = []


class FreshReadings:
    """Readings taken one at a time, each shared by every caller waiting for it.

    A caller is answered from a reading begun after it called, never from one already
    under way: its numbers are at least as fresh as those of a reading of its own. The
    callers that come while a reading is taken wait for it to end, and then share the
    next one, which the first of them to wake takes. Four scrapes at once at 3,000
    connections each took a reading of their own, 3.4 s each, interleaved in one
    interpreter; now they take two readings between them, at most, one after the other.
    Nothing is kept once its callers have it: a reading is megabytes at 1,000 links.
    """

    def __init__(self, read: Callable[[], list[Metric]]) -> None:
        self._read = read
        self._changed = threading.Condition()
        self._under_way: _Reading | None = None
        self._next: _Reading | None = None  # the callers waiting for the next reading

    def get(self) -> list[Metric]:
        """The metrics of a reading begun after this call; what it raised, raised."""
        with self._changed:
            mine = self._next = self._next or _Reading()
            while not mine.done:
                if self._under_way is None:  # the one before has ended (or there was none)
                    self._under_way, self._next = mine, None
                    break
                self._changed.wait()
        if not mine.done:  # taken here, for this caller and those waiting with it
            outcome: list[Metric] | BaseException
            try:
                outcome = self._read()
            except BaseException as exc:  # each waiting scrape fails as this one does
                outcome = exc
            with self._changed:
                mine.outcome, mine.done, self._under_way = outcome, True, None
                self._changed.notify_all()
        if isinstance(mine.outcome, BaseException):
            raise mine.outcome
        return mine.outcome


def _children_by_link(status: dict[str, Any],
                      replied_at: float | None = None) -> dict[str, dict[str, float]]:
    """Sum psutil's readings of the live children (as `forkproxy status` shows them) per
    link, with the longest any of them has waited for its upstream's answer (`unanswered`,
    from the kernel's view of their sockets: read_sockets, of the reply's moment
    `replied_at`, as `status` shows it)."""
    sums: dict[str, dict[str, float]] = {}
    for child in read_sockets(enrich(status), replied_at).get("children", []):
        entry = sums.setdefault(child["link"], {"rss": 0, "uss": 0, "cpu": 0})
        # The summed keys alone: `unanswered`, once in the entry, is a maximum, not a sum.
        for key in ("rss", "uss", "cpu"):
            entry[key] += child[key] or 0  # None: the child exited while being read
        entry["unanswered"] = max(entry.get("unanswered", 0), child["unanswered"] or 0)
    return sums


def render(status: dict[str, Any],
           cpu_seen: dict[str, tuple[float, float]] | None = None,
           replied_at: float | None = None) -> Iterator[Metric]:
    """The metrics of one status reply. `cpu_seen`: the CPU totals served before, per link,
    kept up to date here so that the counter never goes down (Prometheus reads that as a
    restart, and rate() jumps). It could by a hair: a child that exits between the status
    reply and psutil's reading leaves the live sum before its CPU reaches the exited total.
    Links missing from the reply are dropped from it, and a link whose totals began anew
    (`since`: removed and configured again between two scrapes) starts from its own.
    """
    cpu_seen = {} if cpu_seen is None else cpu_seen
    links: dict[str, dict[str, Any]] = status.get("links", {})
    for name in cpu_seen.keys() - links.keys():
        # Gone (a reload removed it): were it configured again, its totals start at 0, and
        # the floor of its old series would hold its CPU counter up.
        del cpu_seen[name]
    live = _children_by_link(status, replied_at)
    # /proc not this PID namespace's: the children's memory and sockets, and the
    # supervisor's memory, are not read (status.proc_not_ours), and a 0 would say none
    # is used. No sample: unknown. Their CPU counter counts the exited children only.
    per_process = proc_not_ours() is None
    # The kernel's socket table unreadable (a sandbox refusing AF_NETLINK): how long
    # upstreams left requests unanswered is unknown, where a 0 says none waits.
    sockets_read = per_process and not status.get("sockets_unread")
    bounds = status.get("duration_buckets", [])
    up = GaugeMetricFamily("forkproxy_up", "1 when the supervisor answered this scrape")
    up.add_metric([], 1)
    listeners = GaugeMetricFamily("forkproxy_listeners", "Listening sockets bound")
    listeners.add_metric([], len(status.get("listeners", [])))
    active = GaugeMetricFamily("forkproxy_connections_active", "Connections open now",
                               labels=["link"])
    waiting = GaugeMetricFamily("forkproxy_connections_waiting",
                                "Clients accepted and waiting for a child (a failed fork, "
                                "or held at a stop)",
                                labels=["link"])
    queued = GaugeMetricFamily("forkproxy_backlog_queued",
                               "Clients in the listening socket's accept queue, not accepted "
                               "yet (at --max-children, or while the supervisor is busy)",
                               labels=["link"])
    backlog = GaugeMetricFamily("forkproxy_backlog_size",
                                "The size of the listening socket's accept queue: past it, new "
                                "clients' connections are dropped or reset", labels=["link"])
    # The kernel's TcpExtListenDrops, for this listener alone: what the queue's snapshots
    # above miss between two scrapes.
    drops = CounterMetricFamily("forkproxy_listen_drops",
                                "Handshake packets the kernel dropped at the listening socket "
                                "since it was bound: its accept queue full (a client's retried "
                                "SYN counts again), no route back for the SYN-ACK, or a full "
                                "SYN queue without syncookies", labels=["link"])
    # Per listener, as the listeners' other series: `check` fails on a port that cannot
    # listen again; this shows one shut down from outside from the moment it is, too.
    listener_up = GaugeMetricFamily("forkproxy_listener_up",
                                    "1 when the link's listening socket listens; 0 when it "
                                    "was shut down from outside (listener-shut) and does not "
                                    "listen again yet", labels=["link"])
    for item in status.get("listeners", []):
        if item.get("listening") is not None:
            listener_up.add_metric([item["link"]], 1 if item["listening"] else 0)
        if item.get("drops") is not None:
            drops.add_metric([item["link"]], item["drops"])
        if item.get("queued") is not None:
            queued.add_metric([item["link"]], item["queued"])
        if item.get("backlog") is not None:
            backlog.add_metric([item["link"]], item["backlog"])
    total = CounterMetricFamily("forkproxy_connections", "Connections accepted and forked",
                                labels=["link"])
    ended = CounterMetricFamily("forkproxy_connections_ended",
                                "Connections ended, by how (closed: the client's FIN came "
                                "first; upstream-closed: the upstream's did; killed: by a "
                                "signal, most often the OOM killer at a memory limit)",
                                labels=["link", "outcome"])
    empty = CounterMetricFamily("forkproxy_connections_empty",
                                "Connections that ended having carried no byte either way "
                                "(health checks, scanners)", labels=["link"])
    denied = CounterMetricFamily("forkproxy_connections_denied",
                                 "Connections closed by --allow", labels=["link"])
    failures = CounterMetricFamily("forkproxy_upstream_connect_failures",
                                   "Connections no upstream address took, by why (the last "
                                   "error: refused, timeout, unreachable, unresolved, "
                                   "no-local-port: this host out of ports toward it, blocked: "
                                   "a policy on this host refused the connect, loop: the "
                                   "target leads back into this proxy's own listeners, "
                                   "other)",
                                   labels=["link", "reason"])
    moved = CounterMetricFamily("forkproxy_bytes", "Bytes relayed",
                                labels=["link", "direction"])
    durations = HistogramMetricFamily("forkproxy_connection_duration_seconds",
                                      "Connection lifetimes, ended connections (every outcome)",
                                      labels=["link"])
    rss = GaugeMetricFamily("forkproxy_children_resident_memory_bytes",
                            "Resident memory of the live children, summed (psutil RSS): pages "
                            "they share count once per child, so it overstates their use: "
                            "see forkproxy_children_unique_memory_bytes", labels=["link"])
    uss = GaugeMetricFamily("forkproxy_children_unique_memory_bytes",
                            "Memory only the live children hold (psutil USS)", labels=["link"])
    unanswered = GaugeMetricFamily(
        "forkproxy_upstream_unanswered_seconds",
        "The longest a live connection has waited for its upstream to answer: seconds since "
        "data last went to the upstream, with none back since (0: none waits). Grows while "
        "an upstream is stopped, hung or overloaded, and while a client waits on purpose "
        "(redis BLPOP, a long poll). No sample while the kernel's view of the sockets "
        "cannot be read (a sandbox refusing AF_NETLINK)", labels=["link"])
    cpu = CounterMetricFamily("forkproxy_children_cpu_seconds",
                              "CPU time of the children, exited and live", labels=["link"])
    resolve_failures = CounterMetricFamily("forkproxy_resolve_failures",
                                           "Lookups of the target's name that failed",
                                           labels=["link"])
    address_changes = CounterMetricFamily("forkproxy_address_changes",
                                          "Lookups of the target's name that gave new addresses",
                                          labels=["link"])
    for name, stats in sorted(links.items()):
        now = live.get(name, {})
        active.add_metric([name], stats["active"])
        waiting.add_metric([name], stats.get("waiting", 0))
        total.add_metric([name], stats["connections"])
        outcomes = stats.get("outcomes", {})
        for outcome in OUTCOME_NAMES:  # each at 0 from the start: an alert needs the series
            ended.add_metric([name, outcome], outcomes.get(outcome, 0))
        empty.add_metric([name], stats.get("empty", 0))
        denied.add_metric([name], stats["denied"])
        by_reason = stats.get("upstream_failures_by_reason", {})
        for reason in FAILURE_REASONS:  # each from 0, as the outcomes above
            failures.add_metric([name, reason], by_reason.get(reason, 0))
        moved.add_metric([name, "upstream"], stats["bytes_up"])  # live bytes included
        moved.add_metric([name, "downstream"], stats["bytes_down"])
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, stats["duration_buckets"], strict=True):
            cumulative += count
            buckets.append((repr(float(bound)), cumulative))
        buckets.append(("+Inf", stats["duration_count"]))
        durations.add_metric([name], buckets, stats["duration_sum"])
        if per_process:
            rss.add_metric([name], now.get("rss", 0))
            uss.add_metric([name], now.get("uss", 0))
        if sockets_read:
            unanswered.add_metric([name], now.get("unanswered", 0))
        since = stats.get("since", 0.0)
        floor_since, floor = cpu_seen.get(name, (since, 0.0))
        cpu_now = stats["cpu_seconds"] + now.get("cpu", 0)
        cpu_seen[name] = (since, max(cpu_now, floor) if floor_since == since else cpu_now)
        cpu.add_metric([name], cpu_seen[name][1])
        resolve_failures.add_metric([name], stats.get("resolve_failures", 0))
        address_changes.add_metric([name], stats.get("address_changes", 0))
    supervisor_rss = GaugeMetricFamily("forkproxy_supervisor_resident_memory_bytes",
                                       "Resident memory of the supervisor (psutil RSS)")
    if per_process:
        with contextlib.suppress(psutil.Error, OSError, KeyError):
            supervisor_rss.add_metric([], psutil.Process(status["pid"]).memory_info().rss)
    # For "how close to the limit": sum(forkproxy_connections_active) / forkproxy_max_children.
    max_children = GaugeMetricFamily("forkproxy_max_children",
                                     "Most connections at once: --max-children, or what fits "
                                     "the memory, pids and nproc limits")
    if "max_children" in status:
        max_children.add_metric([], status["max_children"])
    memory_limit = GaugeMetricFamily("forkproxy_memory_limit_bytes",
                                     "The memory limit of forkproxy's cgroup, found at start "
                                     "(no sample: none)")
    if status.get("memory_limit") is not None:
        memory_limit.add_metric([], status["memory_limit"])
    # The pids limit bounds the derived --max-children too (and a fork past it fails).
    pids_limit = GaugeMetricFamily("forkproxy_pids_limit",
                                   "The pids limit (pids.max, processes and threads) of "
                                   "forkproxy's cgroup, found at start (no sample: none)")
    if status.get("pids_limit") is not None:
        pids_limit.add_metric([], status["pids_limit"])
    nproc_limit = GaugeMetricFamily("forkproxy_nproc_limit",
                                    "The nproc limit (RLIMIT_NPROC, ulimit -u: the user's "
                                    "processes and threads) found at start, where it applies "
                                    "(no sample: none, or root)")
    if status.get("nproc_limit") is not None:
        nproc_limit.add_metric([], status["nproc_limit"])
    orphans = CounterMetricFamily("forkproxy_orphans_reaped",
                                  "Processes reaped that were not forkproxy's own (as PID 1)")
    orphans.add_metric([], status.get("orphans_reaped", 0))
    # This process's own deaths, seen once it is back: a restart loop shows as a rate.
    restarts = CounterMetricFamily("forkproxy_metrics_restarts",
                                   "Times the metrics process died and was started again")
    restarts.add_metric([], (status.get("metrics") or {}).get("restarts", 0))
    yield from (up, listeners, listener_up, active, waiting, queued, backlog, drops, total,
                ended, empty, denied, failures, moved, durations, rss, uss, unanswered, cpu,
                resolve_failures, address_changes, supervisor_rss, max_children, memory_limit,
                pids_limit, nproc_limit, orphans, restarts)
    yield _start_time(status)
    yield _fork_failures(links)
    yield from _reload_metrics(status)


def _fork_failures(links: dict[str, dict[str, Any]]) -> Metric:
    """Failed forks for clients, per link, each link's from 0 (an alert needs the
    series): at a pids limit the log said `fork-failed ... failures=99` while the metrics
    showed only forkproxy_connections_waiting, the clients held meanwhile."""
    failed = CounterMetricFamily("forkproxy_fork_failures",
                                 "Forks of a child for a client that failed (at a pids "
                                 "limit, out of memory): the client waits for the next "
                                 "(forkproxy_connections_waiting)", labels=["link"])
    for name, stats in sorted(links.items()):
        failed.add_metric([name], stats.get("fork_failures", 0))
    return failed


def _start_time(status: dict[str, Any]) -> Metric:
    """When the supervisor started, as its wall clock read then: the same at every scrape
    until a restart, which counters that reset on idle links would not show. No sample
    from a supervisor that does not say (an older one)."""
    started = GaugeMetricFamily("forkproxy_start_time_seconds",
                                "When the supervisor started, in seconds since the epoch")
    if "start_time" in status:
        started.add_metric([], status["start_time"])
    return started


def _reload_metrics(status: dict[str, Any]) -> Iterator[Metric]:
    """Whether the running configuration is the file's, named and valued as Prometheus's
    own prometheus_config_last_reload_*: successful is 1 before any reload (the start's
    configuration applied), the timestamp is the start's until a reload applies. No
    sample from a supervisor that does not say (an older one)."""
    successful = GaugeMetricFamily("forkproxy_config_last_reload_successful",
                                   "1 when the last reload (SIGHUP or `reload`) applied, or "
                                   "none was made; 0 when it failed and the previous "
                                   "configuration stays")
    loaded = GaugeMetricFamily("forkproxy_config_last_reload_success_timestamp_seconds",
                               "When the running configuration was read: the last reload "
                               "that applied, or the start")
    reloads = CounterMetricFamily("forkproxy_config_reloads", "Reloads, by result",
                                  labels=["result"])
    if "config_loaded" in status:
        last = status.get("last_reload")
        successful.add_metric([], 0 if last and not last["ok"] else 1)
        loaded.add_metric([], status["config_loaded"])
        counts = status.get("reloads", {})
        for result in ("success", "failure"):  # both from the start: an alert needs the series
            reloads.add_metric([result], counts.get(result, 0))
    yield from (successful, loaded, reloads)


METRICS_PATH = "/metrics"
NOT_FOUND = b"not found: the metrics are at /metrics\n"
BAD_TARGET = b"bad request: the request's target is not a URL\n"
NO_THREAD = (b"unavailable: no thread could start for this scrape "
             b"(the pids limit of forkproxy's cgroup reached?)\n")


def _only_metrics(app: WSGIApplication) -> WSGIApplication:
    """/metrics, the URL serve prints, and no other path: prometheus_client serves the
    page for any path, so a mistyped scrape path or a prober's URL looked right, and a
    scanner walking paths got the page at each. Others are 404, with a line saying
    where the metrics are."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if "://" in path:
            # The absolute form of the target (RFC 9112, 3.2.2: a server must accept it),
            # as an HTTP proxy between the scraper and this port may send it: wsgiref
            # leaves scheme and host in PATH_INFO.
            try:
                path = urllib.parse.urlsplit(path).path
            except ValueError:  # `http://[::1/metrics`: Invalid IPv6 URL
                # The client's mistake: 400 (RFC 9112, 3.2), not the 500 and the
                # metrics-request-failed line each such request got.
                return _plain("400 Bad Request", BAD_TARGET, start_response)
        if path == METRICS_PATH:
            return app(environ, start_response)
        return _plain("404 Not Found", NOT_FOUND, start_response)

    return serve


def _plain(status: str, body: bytes, start_response: StartResponse) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
    return [body]


def _unread_accept_ignored(app: WSGIApplication) -> WSGIApplication:
    """An Accept header prometheus_client cannot read is dropped: the page is served in
    the plain text format, as with no Accept at all. From 0.23 on (its UTF-8 content
    negotiation) it compares the `version=` of an openmetrics or text/plain Accept as
    numbers, and `version=abc` raised a TypeError: a 500, and a metrics-request-failed
    line per request, for anyone who sent one. Not a 400: an HTTP server may disregard
    an Accept it cannot honour (RFC 9110, 12.5.1), the library already answers an Accept
    it does not know (application/json, version=0.0.1) in that format, and every
    scraper reads it; a scrape that gets the page beats one that fails. The check is
    the library's own choice, made again here: nothing else is caught, and an Accept it
    reads is served as it chooses."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            choose_encoder(environ.get("HTTP_ACCEPT") or "")
        except Exception:  # whatever the version in use raises on the client's text
            environ = {name: value for name, value in environ.items()
                       if name != "HTTP_ACCEPT"}
        return app(environ, start_response)

    return serve


def _answer_head(app: WSGIApplication) -> WSGIApplication:
    """HEAD as GET without the body, as every HTTP server must (RFC 9110, 9.1):
    prometheus_client answers it 405, and uptime monitors that check with HEAD reported
    the metrics endpoint down. The headers are GET's, Content-Length included (RFC 9110,
    8.6): the body is rendered and counted, then dropped. Returned bare, with no
    Content-Length, wsgiref's server would send `Content-Length: 0`."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "HEAD":
            return app(environ, start_response)
        started: list[tuple[str, list[tuple[str, str]], Any]] = []
        body: list[bytes] = []

        def hold(status: str, headers: list[tuple[str, str]],
                 exc_info: Any = None) -> Callable[[bytes], object]:
            started[:] = [(status, headers, exc_info)]
            return body.append  # WSGI's write(): part of the body too

        result = app({**environ, "REQUEST_METHOD": "GET"}, hold)
        try:
            body.extend(result)  # a WSGI app may call start_response as late as this
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()  # WSGI: a result with close() is closed by whoever drops it
        status, headers, exc_info = started[0]
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers = [*headers, ("Content-Length", str(sum(map(len, body))))]
        start_response(status, headers, exc_info)
        return []

    return serve


PR_SET_PDEATHSIG = 1  # linux/prctl.h
def _die_with_parent() -> bool:
    """Have the kernel send SIGTERM the moment the supervisor dies (SIGKILL, the OOM
    killer), rather than notice it at the next turn of the loop: until then this process
    holds the metrics port, and a forkproxy restarted at once could not bind it. Whether
    the kernel took it."""
    with contextlib.suppress(OSError, AttributeError):
        result: int = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        return result == 0
    return False


# Scrapes served at once; a client beyond them waits, then is closed. Each one's thread counts
# against the container's pids limit, which the supervisor needs for a fork per connection:
# unbounded, idle connections to the metrics port could stop the proxy. Below the control
# socket's 16 clients (control.MAX_CLIENTS), so that scrapes alone never fill it.
MAX_SCRAPES = 8
SCRAPE_WAIT = 1.0  # seconds a new client may wait for a slot
# Seconds the accepting thread waits for the request of a scrape no thread can serve, to
# answer it 503 (_unavailable): short, as it holds up the next ones meanwhile.
UNAVAILABLE_WAIT = 0.2
# Seconds a client has to send its whole request (Prometheus sends it at once), then to
# take the whole reply (a large table to a slow reader). Past them it is cut.
REQUEST_DEADLINE = 5.0
REPLY_DEADLINE = 30.0
# Bytes a client's request line and headers may take in all (a scrape's are a few hundred,
# a bearer token's a few KiB more): HAProxy's whole buffer (tune.bufsize). http.server's own
# bounds are 100 lines of 64 KiB each: eight clients held ~50 MiB of the metrics process's
# memory for REQUEST_DEADLINE, in a container budgeted 16 MiB for it (README, "Memory limits").
MAX_REQUEST_HEAD = 16 * 1024
# Connections whose request has not all come yet, held by the accepting thread (no thread
# each): past this many, the oldest is closed. A scrape slot went to each connection as
# it was accepted, and 40 that sent nothing (reopened as they were cut) failed every
# scrape: a slot is a thread, and only requests that have come get one now.
MAX_PENDING = 256
# Connections accepted per wake of the accepting thread: the requests that came meanwhile
# are read in between, so that a burst of new connections cannot push a scrape whose
# request is on its way out as the oldest.
ACCEPT_BATCH = 16
# Handed over (serve --take-over): the seconds the scrapes under way have to finish
# before this process exits all the same. Within the supervisor's METRICS_HANDOVER_WAIT,
# for which it serves their status requests.
HANDOVER_FINISH = 10.0


class _Deadlines:
    """One thread that cuts the connections past their deadline. A socket timeout bounds
    each recv, not a request trickled in a byte at a time (slowloris): eight such clients
    held every scrape slot for as long as they trickled, and every scrape failed."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.due: dict[socket.socket, float] = {}
        threading.Thread(target=self._cut_late, daemon=True).start()

    def set(self, sock: socket.socket, seconds: float) -> None:
        with self.lock:
            self.due[sock] = time.monotonic() + seconds
            self.lock.notify()  # it may be due before what the thread waits for

    def clear(self, sock: socket.socket) -> None:
        with self.lock:
            if self.due.pop(sock, None) is not None:
                self.lock.notify()  # to wait for the next one, not this one's time

    def _cut_late(self) -> None:
        # Sleeps until the next deadline, or until a scrape sets one: a metrics process
        # nobody scrapes wakes once an hour (it woke 4 times a second, in every pod).
        with self.lock:
            while True:
                now = time.monotonic()
                # Under the lock: a handler clears its socket before the server closes
                # it, so no shutdown can reach a descriptor number a newer connection took.
                for sock in [sock for sock, due in self.due.items() if due <= now]:
                    del self.due[sock]
                    # Its thread, blocked in recv or send, wakes to an end, freeing the slot.
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                self.lock.wait(min(self.due.values(), default=now + 3600) - now)


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per scrape, as prometheus_client's own server does: one client that
    connects and sends nothing must not block the others. At most MAX_SCRAPES threads,
    each for at most REQUEST_DEADLINE + REPLY_DEADLINE."""

    daemon_threads = True
    scrapes = threading.BoundedSemaphore(MAX_SCRAPES)  # one server per process
    deadlines: _Deadlines
    log: Logger
    # metrics-request-failed's [failures since its last line, when that was written]:
    # folded (log.fold), as the supervisor folds its repeated failures. Anyone who reaches
    # the port can send requests as fast as it likes; were there a request that fails
    # every time (a bug), a line each would flood the log.
    folds: dict[str, list[float]]
    folds_lock = threading.Lock()  # a thread per scrape; one server per process
    # What the accepting thread read of each request it hands a thread (_Pending): taken
    # by the request's handler (_QuietHandler.setup), or dropped with its connection.
    heads: dict[socket.socket, bytes]

    def request_failed(self, client: Any, error: BaseException) -> None:
        """The `metrics-request-failed` line for a failure that is news (_is_news): the
        first at once, then at most one per ERROR_LOG_EVERY, with `failures`."""
        if not _is_news(error):
            return
        with self.folds_lock:
            failures = fold(self.folds, "metrics-request-failed")
        if failures:
            fields = crash_fields(error)
            self.log.warning("metrics-request-failed", client=peer_text(client),
                             error=fields.pop("error"), failures=failures, **fields)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that reset, timed out or was cut is no news (_is_news). socketserver
        printed a traceback for each one to the proxy's stderr (200 clients that reset:
        3,417 lines, past -q and --log-format json; with stderr a pipe nobody read, the
        threads blocked on it). Anything else is a folded warning (request_failed)."""
        error = sys.exc_info()[1]
        if error is not None:
            self.request_failed(client_address, error)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in RESOURCE_ERRORS:
                # socketserver drops the error and asks again at once: 100% CPU until a
                # descriptor came back, without this pause.
                time.sleep(ACCEPT_BACKOFF)
            elif exc.errno == errno.EINVAL:
                # Not listening any more: shut down from outside (another process holding
                # the socket, `ss -K`). Poll says it is ready for good and socketserver
                # drops the error: a spin (95% of a core), every scrape refused, no line.
                # Not an OSError, so that it ends the loop (main).
                raise _SocketShut from None
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        # A burst of scrapes waits its turn (each takes milliseconds); clients that hold
        # every slot without finishing (slowloris) get the newcomer closed instead.
        if not self.scrapes.acquire(timeout=SCRAPE_WAIT):
            self.heads.pop(request, None)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException as exc:
            self.scrapes.release()
            head = self.heads.pop(request, b"")
            if isinstance(exc, RuntimeError):  # "can't start new thread": a pids limit
                _unavailable(request, NO_THREAD, head)
            raise  # handle_error's line, then shutdown_request closes it

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.scrapes.release()


def _unavailable(request: socket.socket, body: bytes, request_head: bytes = b"") -> None:
    """A 503 saying why, from the accepting thread, for a scrape no thread can serve:
    closed with no reply, Prometheus said only that the scrape failed. The request is
    read first, as far as it came within UNAVAILABLE_WAIT (a scraper sends it at once):
    a close with it unread sends an RST, which can cut the reply, and HEAD gets no body.
    The reply fits any socket's buffer."""
    with contextlib.suppress(OSError):
        request.settimeout(UNAVAILABLE_WAIT)
        request_head = request_head or request.recv(4096)  # read whole already, or not
        for _ in range(15):  # at most 64 KiB: a client that keeps sending gets the reply
            if not request.recv(4096, socket.MSG_DONTWAIT):
                break
    head = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    with contextlib.suppress(OSError):
        request.sendall(head if request_head.startswith(b"HEAD ") else head + body)


class _HeadBudget(io.BufferedIOBase):
    """A request's rfile that gives its request line and headers MAX_REQUEST_HEAD bytes in
    all: past them, readline() raises LineTooLong, which http.server answers 431."""

    def __init__(self, rfile: io.BufferedIOBase, head: bytes = b"") -> None:
        """`head`: what the accepting thread read of the request already (_Pending)."""
        super().__init__()
        self.rfile = rfile
        self.head = io.BytesIO(head)
        self.left = MAX_REQUEST_HEAD
        # HTTP/0.9 has no headers, but http.server reads them all the same: a line past
        # the head waited for REQUEST_DEADLINE, and "GET /\n" held a scrape's thread.
        self.lines_left = not _simple_request(head)

    def readline(self, size: int | None = -1) -> bytes:
        if self.left <= 0:
            raise http.client.LineTooLong(f"request head past {MAX_REQUEST_HEAD} bytes")
        wanted = self.left if size is None or size < 0 else min(size, self.left)
        line = self.head.readline(wanted)
        if self.lines_left and not line.endswith(b"\n") and len(line) < wanted:
            line += self.rfile.readline(wanted - len(line))  # the head ran out mid-line
        self.left -= len(line)
        return line

    def read(self, size: int | None = -1) -> bytes:
        # A body (wsgi.input), which nothing here reads: what came with the head first.
        data = self.head.read(size)
        if size is None or size < 0 or len(data) < size:
            data += self.rfile.read(None if size is None or size < 0 else size - len(data))
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.rfile.close()
        super().close()


def _head_complete(head: bytes) -> bool:
    """Has a request's head all come: its headers' blank line, or a request line without
    a version (HTTP/0.9, which has no headers), or MAX_REQUEST_HEAD bytes (answered 431)?"""
    if b"\r\n\r\n" in head or b"\n\n" in head or len(head) >= MAX_REQUEST_HEAD:
        return True
    return _simple_request(head)


def _simple_request(head: bytes) -> bool:
    """Is a head's request line all there and without a version (HTTP/0.9, or a line
    http.server refuses without reading on)?"""
    line, newline, _ = head.partition(b"\n")
    return bool(newline) and len(line.split()) < 3


class _Pending:
    """The connections accepted whose request has not all come: read by the accepting
    thread as it comes, each handed to a scrape's thread once whole (_Server.heads), or
    closed at REQUEST_DEADLINE, or as the oldest past MAX_PENDING. A thread each, idle
    clients held every slot (MAX_SCRAPES) and every scrape failed."""

    def __init__(self, server: _Server, ready: selectors.BaseSelector) -> None:
        self.server, self.ready = server, ready
        # Each connection: its client's address, what came of its head, when it is cut.
        self.waiting: dict[socket.socket, tuple[Any, bytes, float]] = {}

    def accept(self) -> None:
        """Take what waits on the listening socket (_Server.get_request's errors)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, client = self.server.get_request()
            except BlockingIOError:
                return  # none left, or the other process's (a take-over) took it
            except OSError:
                return  # out of descriptors (get_request paused), or the client gone
            sock.setblocking(False)
            if len(self.waiting) >= MAX_PENDING:
                self.drop(next(iter(self.waiting)))  # dicts keep insertion order
            self.waiting[sock] = (client, b"", time.monotonic() + REQUEST_DEADLINE)
            self.ready.register(sock, selectors.EVENT_READ)

    def read(self, sock: socket.socket) -> None:
        """Read what came on `sock`; hand it to a thread once its head is whole."""
        client, head, due = self.waiting[sock]
        try:
            data = sock.recv(MAX_REQUEST_HEAD - len(head))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(sock)
            return
        if not data and not head:
            self.drop(sock)  # connected and left: nothing to answer
            return
        head += data
        if data and not _head_complete(head):
            self.waiting[sock] = (client, head, due)
            return
        # Whole, or the client's writing ended (a request without its blank line is
        # answered as before, by http.server: a 400, or the page).
        del self.waiting[sock]
        self.ready.unregister(sock)
        sock.setblocking(True)  # the handler sets its own timeout (_QuietHandler.timeout)
        self.server.heads[sock] = head
        try:
            self.server.process_request(sock, client)
        except Exception:
            self.server.handle_error(sock, client)
            self.server.heads.pop(sock, None)
            self.server.shutdown_request(sock)

    def cut_late(self) -> float | None:
        """Close the connections past REQUEST_DEADLINE; seconds until the next is due."""
        now = time.monotonic()
        for sock in [sock for sock, (_, _, due) in self.waiting.items() if due <= now]:
            self.drop(sock)
        return min((due for _, _, due in self.waiting.values()), default=None)

    def drop(self, sock: socket.socket) -> None:
        del self.waiting[sock]
        self.ready.unregister(sock)
        self.server.shutdown_request(sock)

    def finish(self, ends: float) -> None:
        """Handed over (the port is the taker's): the requests under way that come by
        `ends` (monotonic) are handed to threads, as those that had come were; the rest
        closed."""
        while self.waiting and time.monotonic() < ends:
            due = min(self.cut_late() or ends, ends)
            for key, _ in self.ready.select(max(0.0, due - time.monotonic())):
                if key.fileobj in self.waiting:
                    self.read(key.fileobj)
        self.close()

    def close(self) -> None:
        for sock in list(self.waiting):
            self.drop(sock)


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_DEADLINE  # per recv and send; _Deadlines bounds the whole
    server: _Server

    def setup(self) -> None:
        self.server.deadlines.set(self.request, REQUEST_DEADLINE)
        super().setup()
        self.rfile = _HeadBudget(self.rfile, self.server.heads.pop(self.request, b""))

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers too
        self.server.deadlines.set(self.request, REPLY_DEADLINE)
        return parsed

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.deadlines.clear(self.request)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""

    def get_stderr(self) -> ErrorStream:
        return _ErrorLine(self.server, self.client_address)


class _ErrorLine:
    """What wsgiref's handler takes for stderr. It prints there a traceback of whatever
    failed while it answered: a reply cut by the client's send timeout (a slow reader),
    an error in the app. That went to the proxy's stderr past -q and --log-format json.
    Now a client gone or cut is no news, and anything else is the folded warning
    `metrics-request-failed`, as _Server.handle_error writes it (_Server.request_failed)."""

    def __init__(self, server: _Server, client: Any) -> None:
        self.server, self.client = server, client

    def write(self, text: str) -> None:
        """The traceback's text: the line comes from flush()."""

    def writelines(self, lines: list[str]) -> None:
        """As write()."""

    def flush(self) -> None:
        # Called by wsgiref's log_exception after the traceback, inside its `except:`:
        # the exception it is handling is sys.exc_info()'s.
        error = sys.exc_info()[1]
        if error is not None:
            self.server.request_failed(self.client, error)


def _is_news(error: BaseException) -> bool:
    """Whether a failure while answering a scrape is worth a line: not a client that reset,
    went away or was cut (by its socket timeout, or _Deadlines' shutdown: EPIPE)."""
    return not isinstance(error, (ConnectionError, TimeoutError))


class _BadArguments(Exception):
    pass


class _SocketShut(Exception):
    """The listening socket was shut down from outside (_Server.get_request)."""


class _Arguments(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _BadArguments(message)  # for main's line, not argparse's usage and exit 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _Arguments(prog="forkproxy-metrics")
    parser.add_argument("--fd", type=int, required=True, help="the bound listening socket")
    parser.add_argument("--status-socket", required=True)
    parser.add_argument("--handoff-fd", type=int,
                        help="a socket the supervisor takes each scrape's connection over")
    parser.add_argument("--supervisor-pid", type=int, required=True,
                        help="exit when this process is no longer the parent")
    parser.add_argument("--log-format", default="text")
    # The supervisor's level (-q, -qq, -v), as a number: its `metrics-request-failed`
    # warning is dropped under -qq as the supervisor's own warnings are.
    parser.add_argument("--log-level", type=int, default=WARNING,
                        choices=(DEBUG, INFO, WARNING, ERROR))
    try:
        args = parser.parse_args(argv)
    except _BadArguments as exc:
        # The supervisor's command line is not this file's: another version of forkproxy,
        # installed since that supervisor started (one that checks its files does not get
        # here; an older one does, and restarts this at its pace, this line each time).
        Logger(ERROR, format_in(argv)).error(
            "metrics-failed", error=f"{ADVICE} (the metrics process's arguments: {exc})",
            detail="restart forkproxy")
        return FILES_CHANGED
    name_process(METRICS)  # before any thread starts: they take its name
    # SIGTERM keeps its default action: a `kill` by hand (or PDEATHSIG) ends this process
    # by the signal, which the supervisor's metrics-died line says. An exit(0) from a
    # handler read `exit status 0`, as if it had quit of itself; a stop reaps it unlogged.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)  # a terminal's Ctrl-\ is the supervisor's
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    dies_with_parent = _die_with_parent()
    registry = CollectorRegistry(auto_describe=False)
    handoff = None if args.handoff_fd is None else socket.socket(fileno=args.handoff_fd)
    registry.register(SupervisorCollector(args.status_socket, handoff, args.supervisor_pid))
    sock = socket.socket(fileno=args.fd)
    try:
        server = _Server(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.server_name, server.server_port = "forkproxy", sock.getsockname()[1]
        server.setup_environ()
        server.set_app(_answer_head(_only_metrics(_unread_accept_ignored(make_wsgi_app(registry)))))
        server.log = Logger(args.log_level, args.log_format)
        server.folds = {}
        server.heads = {}
        try:
            server.deadlines = _Deadlines()
        except RuntimeError as exc:  # "can't start new thread": at a pids limit
            # One line, not a traceback: the supervisor logs the exit and tries again later.
            server.log.error("metrics-failed", error=str(exc), detail="cannot start")
            return 1
        # The supervisor is gone: so is this process, which would otherwise hold the port. Its
        # pid comes from the command line, not from getppid() here: a supervisor killed while
        # this process was still importing (before _die_with_parent) would leave it serving
        # forever. Once the kernel is to signal its death, one look covers that window and the
        # loop waits for requests only: idle, this process never wakes. Without it (no
        # prctl), the loop looks every second.
        server.timeout = None if dies_with_parent else 1.0
        # The port is shared with a taker's metrics process from the take-over on: a client
        # both were woken for is accepted by one, and the other's accept must not wait for the
        # next (past the hand-over). socketserver takes an accept that finds nobody.
        sock.setblocking(False)
        with selectors.PollSelector() as ready:  # no descriptor of its own (an epoll one)
            ready.register(sock, selectors.EVENT_READ)
            pending = _Pending(server, ready)
            if handoff is not None:
                # The supervisor writes on it when it has handed the port over (serve
                # --take-over; EOF: it is gone). Its SIGTERM then cut each scrape under way:
                # closed with no reply, or after a status line, or mid-body.
                ready.register(handoff, selectors.EVENT_READ)
            while os.getppid() == args.supervisor_pid:
                due = pending.cut_late()
                wait = None if due is None else max(0.0, due - time.monotonic())
                if server.timeout is not None:
                    wait = server.timeout if wait is None else min(wait, server.timeout)
                woken = {key.fileobj for key, _ in ready.select(wait)}
                if handoff is not None and handoff in woken:
                    ready.unregister(sock)
                    ready.unregister(handoff)
                    # One HANDOVER_FINISH for both: the requests still coming, then the
                    # scrapes, all within the supervisor's METRICS_HANDOVER_WAIT.
                    ends = time.monotonic() + HANDOVER_FINISH
                    pending.finish(ends)
                    return _finish_scrapes(server, ends)
                for client in woken:
                    if client in pending.waiting:
                        pending.read(client)
                if sock in woken:
                    try:
                        pending.accept()
                    except _SocketShut:
                        pending.close()
                        server.log.error(
                            "metrics-failed", error="its listening socket was shut down from "
                            "outside (another process holding it, `ss -K`)",
                            detail="exiting: the supervisor listens on the port again and "
                            "starts another")
                        return METRICS_SOCKET_SHUT
        return 0
    finally:
        # Closed here, not left to the interpreter's exit: under -X dev each one left
        # open was a ResourceWarning in the log at every take-over.
        if handoff is not None:
            handoff.close()
        sock.close()


def _finish_scrapes(server: _Server, ends: float) -> int:
    """Handed over: accept no more (the port is the new metrics process's, which accepts
    what comes next), finish the scrapes under way by `ends` (monotonic), and exit."""
    server.socket.close()  # our copy only: the new supervisor's listens on
    for _ in range(MAX_SCRAPES):  # each slot back: its scrape answered and closed
        if not server.scrapes.acquire(timeout=max(0.0, ends - time.monotonic())):
            break
    return 0

