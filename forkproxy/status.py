"""The client end of the control socket: `forkproxy status`, `check` and `reload`.

Runs in the short-lived CLI process, which is where psutil reads each live child's memory
and CPU, and the kernel tells its sockets' state (sockdiag.py): the supervisor only hands
out the table of pids (see accounting.py). Imported
without typer by console.py's lean path too (`check`, `status` run inside a container,
charged to its memory limit): psutil is imported only where it is used, which `check`
never is (~3 MiB less).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, NoReturn

from .accounting import ended_text
from .config import (
    RAISE_OPEN_FILES,
    ConfigError,
    limiting_fits,
    limits_named,
    limits_text,
    no_room_text,
    printable,
    quoted,
    split_host_port,
)
from .control import (
    HANDING_OVER,
    REPORT_TIMEOUT,
    UnixSocketRefused,
    answers,
    check_owned,
    default_dir,
    dir_error,
    foreign_proc,
    own_outer_uid,
    unix_socket,
)


class StatusError(Exception):
    """No supervisor to talk to, or it answered nonsense; the message says which."""


class SocketsRefused(StatusError):
    """This process may not open a Unix socket (control.UnixSocketRefused): no directory
    can be looked in, this one or another."""


class NotForkproxy(StatusError):
    """Something answered, but not as a forkproxy supervisor does: another program's
    socket, or a version of forkproxy that speaks otherwise."""


def find_socket(path: str | None) -> str:
    """The explicit path, or the only live socket in this user's default directory.

    With XDG_RUNTIME_DIR set and no forkproxy directory in it, /tmp/forkproxy-UID: where
    serve puts its socket when started without the variable, as systemd starts a system
    service, while an ssh login of the same user has it set (root's `status` then said
    "no running forkproxy" beside a healthy one). Only then: a directory serve made
    under XDG_RUNTIME_DIR is where this user's proxies are. In a user namespace with
    none there either, /tmp/forkproxy-UID by the uid inside, where an older forkproxy
    put it."""
    if path is not None:
        return path
    uid = own_outer_uid()
    try:
        directory = default_dir(os.environ, uid)
    except OSError as exc:
        raise StatusError(f"no default status socket directory: {exc.strerror}") from None
    live = _live_sockets(directory)
    fallback = directory if uid is None else default_dir({}, uid)
    if live is None and fallback != directory:
        try:
            live = _live_sockets(fallback)
        except SocketsRefused:
            raise
        except StatusError:
            live = None  # unreadable, or another user's: not where this user's proxies are
        if live is not None:
            directory = fallback
    if not live and uid is not None and uid != os.getuid():
        # A supervisor of an older forkproxy, from before an upgrade in place in this user
        # namespace, named its directory by the uid inside (control.default_dir): `status`
        # and `serve --take-over` found none. Looked in only when the new place has none
        # that answers, and only if it is ours (_live_sockets checks the owner).
        inside = default_dir({}, os.getuid())
        try:
            found = _live_sockets(inside)
        except SocketsRefused:
            raise
        except StatusError:
            found = None  # another user's: not where this user's proxies are
        if found:
            directory, live = inside, found
    if not live:
        raise StatusError(f"no running forkproxy found in {directory!r} (use --status-socket)")
    if len(live) > 1:
        # A supervisor that handed over (serve --take-over) drains beside the one that took
        # its listeners, its socket still there for `status` to watch the drain: the one
        # serving is the one meant. Asked only when several answer. Once more if that is
        # not one: a take-over's old supervisor that stopped or exited between the two
        # looks (it answered the first, not the second) counted as serving. None serving:
        # the one handing over serves until the `go` of the one taking over, whose socket
        # is not made yet (two take-overs in a row, its own one draining beside it).
        for _ in range(2):
            states = {path: _winding_down(path) for path in live}
            serving = ([path for path in live if not states[path]]
                       or [path for path in live if states[path] == HANDING_OVER])
            if len(serving) == 1:
                return serving[0]
            live = _live_sockets(directory) or []
            if len(live) == 1:
                return live[0]
        raise StatusError(f"several forkproxy supervisors in {directory!r}: "
                          f"{', '.join(map(repr, live))}; choose one with --status-socket")
    return live[0]


def _winding_down(path: str) -> str | None:
    """Does the supervisor on `path` say it is stopping, or handing its listeners over to
    one that takes over (which serves them from its `go` on, a moment later)? "stopping",
    HANDING_OVER, or None: also when it cannot say (no answer within a moment, or not a
    forkproxy): such a one is not ruled out. Before `handing_over` (an older supervisor
    sends none), the old one answered as serving until the `go`, beside the new one:
    "several forkproxy supervisors"."""
    try:
        reply = request(path, "check", timeout=2.0, deadline=2.0)
    except StatusError:
        return None
    if reply.get("stopping") is True:
        return "stopping"
    return HANDING_OVER if reply.get("handing_over") is True else None


# Looks at a directory one `status` makes at most, while sockets appear in it as it asks.
LOOKS = 3


def _live_sockets(directory: str) -> list[str] | None:
    """The sockets in `directory` that answer, by name; None without the directory.

    Looked at again when a socket appeared there while those listed were asked: in a
    take-over, the old supervisor, listed alone, can hand over and exit before it is
    asked, and the one that took over, whose socket came after the listing, went
    unasked: "no running forkproxy found" (once in ~1,000 `check`s across take-overs)."""
    names = _socket_names(directory)
    if names is None:
        return None
    live: list[str] = []
    for _ in range(LOOKS):
        listed = names
        paths = [os.path.join(directory, name) for name in sorted(names)]
        try:
            live = [path for path in paths if answers(path)]
        except UnixSocketRefused as exc:
            # None could be asked: "no running forkproxy found" beside a live one.
            raise SocketsRefused(f"cannot look for a running forkproxy in {directory!r}: "
                                 f"{exc.strerror}") from None
        now = _socket_names(directory)
        if now is None or now <= listed:
            break  # none came (or the directory went: those that answered are all)
        names = now
    return live


def _socket_names(directory: str) -> set[str] | None:
    """The names of the sockets `status` asks in `directory`; None without it."""
    try:
        # As serve does (control.prepare_dir): a socket in another user's directory may
        # be theirs, answering `check` as healthy for a supervisor that is not there.
        check_owned(directory)
        return {name for name in os.listdir(directory) if name.endswith(".sock")}
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StatusError(f"cannot look for a running forkproxy in {directory!r}: "
                          f"{dir_error(exc)}") from None


# The most a reply may be: a status of a million live connections is ~250 MiB.
MAX_REPLY = 512 << 20
# Seconds one request may take in all, from connect to the reply's end. The timeout of
# each step (connect, each recv) does not bound a peer that trickles a byte every few
# seconds, which held `check` (a HEALTHCHECK) for ever. A supervisor's reporter sends the
# whole reply within control.REPORT_TIMEOUT or gives up; the 5 s more are this client's
# own step timeout, for the supervisor to take the request up and build the reply.
REQUEST_DEADLINE = REPORT_TIMEOUT + 5.0


def request(path: str, command: str, timeout: float = 5.0,
            deadline: float = REQUEST_DEADLINE,
            connected: Callable[[], socket.socket] | None = None) -> dict[str, Any]:
    """Send one command, return the supervisor's reply, with `pid_here`: the supervisor's
    pid as this process sees it (SO_PEERCRED; 0 when it is in no PID namespace of ours),
    which differs from the reply's `pid` when it runs in another (a container's).
    `timeout` bounds each step, `deadline` (seconds) the whole request. `connected`: makes
    a connection to the supervisor, used rather than one to `path`, which then names it
    in errors only (the metrics process's, handed over: SO_PEERCRED names whoever made
    it, and `pid_here` is the caller's to set)."""
    ends = time.monotonic() + deadline
    try:
        # socket() in the try too: out of descriptors (EMFILE) is no answer either.
        with (unix_socket() if connected is None else connected()) as sock:
            sock.settimeout(timeout)
            if connected is None:
                _connect(sock, path, time.monotonic() + min(timeout, deadline))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            chunks = []
            size = 0
            while True:
                left = ends - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(min(timeout, left))
                    chunk = sock.recv(65536)
                except TimeoutError:
                    if left > timeout:  # this recv's own timeout: nothing came for `timeout` s
                        # SO_PEERCRED names the listener's process before any accept().
                        starved = (None if connected is not None
                                   else _out_of_descriptors(struct.unpack("3i", creds)[0]))
                        if starved is not None:
                            raise StatusError(f"no answer on {path!r}: {starved}") from None
                        raise
                    raise StatusError(f"no complete answer on {path!r} within {deadline:g} s "
                                      f"({size} bytes came)") from None
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_REPLY:  # something that never stops sending
                    raise _not_forkproxy(path, f"more than {MAX_REPLY >> 20} MiB")
    except UnixSocketRefused as exc:
        raise StatusError(f"cannot ask {path!r}: {exc.strerror}") from None
    except OSError as exc:
        raise StatusError(f"no answer on {path!r}: {exc.strerror or exc}") from None
    if not chunks:
        raise StatusError(f"no answer on {path!r}: closed without a reply")
    try:
        reply = _read_reply(command, b"".join(chunks))
    except _Cut:
        # A supervisor (or its reporter) that died or was killed while it answered, not
        # another program: telling the user "not a forkproxy" would send them the wrong way.
        raise StatusError(f"no complete answer on {path!r}: the reply was cut short "
                          f"(closed after {size} bytes, before its end)") from None
    except _Misfit as exc:
        raise _not_forkproxy(path, str(exc)) from None
    reply["pid_here"] = struct.unpack("3i", creds)[0]
    return reply


def _not_forkproxy(path: str, reason: str) -> NotForkproxy:
    return NotForkproxy(f"{quoted(path)} did not answer as a forkproxy status socket does "
                        f"({reason})")


# -- what a supervisor's replies look like ----------------------------------------------
#
# Checked once, here, so that the code that prints a reply can take its shape as given:
# whatever answers on the socket (another program's, another version's) gets one line
# saying so, not a traceback from deep in render(). Keys a reply lacks are an error where
# the supervisor always sends them; the others, when present, must have the right type.
# Keys this version does not know are let through.


class _Misfit(Exception):
    """What makes a reply one no supervisor gives, in a few words."""


class _Cut(Exception):
    """The start of a reply, its end missing: see _read_reply."""


_Shape = Callable[[object, str], None]  # raises _Misfit naming `where` if the value misfits

PID_MAX = 1 << 22  # the kernel's ceiling for pid_max (PID_MAX_LIMIT)


def _kind(what: str, test: Callable[[object], bool]) -> _Shape:
    def fit(value: object, where: str) -> None:
        if not test(value):
            raise _Misfit(f"{where} is not {what}")
    return fit


# Beyond any count, byte total or time a supervisor sends (a 64-bit counter's range):
# 10**400 or 1e400 (inf) made the table's float() and the ages' arithmetic raise.
_MOST = 1 << 64


def _number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and -_MOST <= value <= _MOST)  # NaN is neither: refused too


def _line(value: object) -> bool:
    return isinstance(value, str) and value.splitlines() in ([value], [])


# Every string a supervisor sends is one line (names, addresses, states, errors), and each
# is printed on a line of its own or inside one: a line break would forge more lines.
# Other characters a terminal acts on (ESC, BEL, C1 controls) are let through, and shown
# escaped (shown()).
_TEXT = _kind("a line of text", _line)
_BOOL = _kind("true or false", lambda value: isinstance(value, bool))
_NUMBER = _kind("a number", _number)
_COUNT = _kind("a count", lambda value: _number(value) and isinstance(value, int) and value >= 0)
# A duration by the supervisor's monotonic clock (`uptime`, the metrics state's `age`).
# Optional: older supervisors send none, and the wall clock is the fallback (_age).
_AGE = _kind("a duration", lambda value: _number(value) and isinstance(value, int | float)
             and value >= 0)
_PID = _kind("a process id", lambda value: _number(value) and isinstance(value, int)
             and 0 < value <= PID_MAX)


def _nullable(shape: _Shape) -> _Shape:
    def fit(value: object, where: str) -> None:
        if value is not None:
            shape(value, where)
    return fit


def _list_of(shape: _Shape) -> _Shape:
    def fit(value: object, where: str) -> None:
        if not isinstance(value, list):
            raise _Misfit(f"{where} is not a list")
        for index, item in enumerate(value):
            shape(item, f"{where}[{index}]")
    return fit


def _map_of(shape: _Shape) -> _Shape:
    def fit(value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise _Misfit(f"{where} is not an object")
        for key, item in value.items():
            if not _line(key):
                raise _Misfit(f"{where} has a key that is not a line of text")
            shape(item, f"{where}[{quoted(key)}]")
    return fit


def _object(required: dict[str, _Shape], optional: dict[str, _Shape] | None = None) -> _Shape:
    def fit(value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise _Misfit(f"{where or 'the reply'} is not an object")
        for keys, needed in ((required, True), (optional or {}, False)):
            for key, shape in keys.items():
                name = f"{where}.{key}" if where else key
                if key in value:
                    shape(value[key], name)
                elif needed:
                    raise _Misfit(f"{name} is missing")
    return fit


_LISTENER = _object({"link": _TEXT, "listen": _TEXT, "upstream": _TEXT},
                    {"port": _COUNT, "resolved": _list_of(_TEXT),
                     "queued": _nullable(_COUNT), "backlog": _nullable(_COUNT),
                     "drops": _nullable(_COUNT), "listening": _BOOL})
_METRICS = _nullable(_object({}, {"url": _TEXT, "state": _TEXT, "pid": _nullable(_PID),
                                  "since": _nullable(_NUMBER), "age": _nullable(_AGE),
                                  "restarts": _COUNT,
                                  "last_exit": _nullable(_TEXT),
                                  "deaths_in_a_row": _COUNT,
                                  "retry_in": _nullable(_NUMBER)}))
_LINK = _object({}, {
    **dict.fromkeys(("since", "connections", "upstream_failures", "denied", "bytes_up",
                     "bytes_down", "empty", "cpu_seconds", "duration_count", "duration_sum",
                     "resolve_failures", "address_changes", "active", "waiting",
                     "fork_failures"), _NUMBER),
    "outcomes": _map_of(_NUMBER), "duration_buckets": _list_of(_NUMBER),
    "upstream_failures_by_reason": _map_of(_NUMBER),
})
_CHILD = _object({"pid": _PID, "link": _TEXT, "client": _TEXT, "age": _NUMBER,
                  "bytes_up": _NUMBER, "bytes_down": _NUMBER},
                 {"upstream": _TEXT, "started": _NUMBER})
_LISTENERS = _list_of(_LISTENER)
# Optional in both replies: an older supervisor sends none.
_LAST_RELOAD = _nullable(_object({"at": _NUMBER, "ok": _BOOL},
                                 {"age": _nullable(_AGE), "error": _nullable(_TEXT)}))
_STATUS = _object(
    {"pid": _PID, "version": _TEXT, "started": _NUMBER, "stopping": _BOOL,
     "listeners": _LISTENERS, "links": _map_of(_LINK), "children": _list_of(_CHILD)},
    {"ok": _BOOL, "uptime": _AGE, "grace_left": _nullable(_AGE), "max_children": _COUNT,
     "max_children_given": _BOOL,
     "memory_limit": _nullable(_COUNT), "memory_fit": _nullable(_COUNT),
     "pids_limit": _nullable(_COUNT), "pids_fit": _nullable(_COUNT),
     "nproc_limit": _nullable(_COUNT), "nproc_fit": _nullable(_COUNT), "metrics": _METRICS,
     "duration_buckets": _list_of(_NUMBER), "orphans_reaped": _COUNT,
     "last_reload": _LAST_RELOAD, "config_loaded": _NUMBER, "reloads": _map_of(_COUNT),
     "start_time": _NUMBER},
)
_CHECK = _object({"ok": _BOOL, "stopping": _BOOL, "listeners": _LISTENERS},
                 {"metrics": _METRICS, "last_reload": _LAST_RELOAD,
                  "not_listening": _list_of(_TEXT), "handing_over": _BOOL})
_OK = _object({"ok": _BOOL})
# `stopping`, `handing_over`: as `check`'s; optional, an older supervisor sends none.
_RELOAD_STATE = {"stopping": _BOOL, "handing_over": _BOOL}
_RELOADED = _object({"listeners": _LISTENERS}, {"error": _nullable(_TEXT), **_RELOAD_STATE})
_NOT_RELOADED = _object({"error": _TEXT}, {"listeners": _LISTENERS, **_RELOAD_STATE})


def shown(reply: Any) -> Any:
    """`reply` (a JSON value) for text output: each string in it, keys too, as
    config.printable shows it, the others as they are. Whatever answers on the socket
    (a container's, mounted on the host) could otherwise write ESC sequences, BEL and C1
    controls to the user's terminal, and a lone surrogate (valid JSON) ended `status` in
    a UnicodeEncodeError. Not for --json, whose json.dumps escapes them all itself."""
    if isinstance(reply, str):
        return printable(reply)
    if isinstance(reply, list):
        return [shown(item) for item in reply]
    if isinstance(reply, dict):
        return {printable(key): shown(value) for key, value in reply.items()}
    return reply


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # json.loads takes NaN and Infinity otherwise


def _read_reply(command: str, data: bytes) -> dict[str, Any]:
    """The reply to `command` in `data`, checked to have the shape a supervisor gives it
    (_Misfit otherwise): for `check`, `ok` true only with listeners bound and not stopping,
    as the supervisor answers, so that no socket passes a health check by saying `ok`; for
    `reload`, not while stopping or handing over."""
    try:
        reply = json.loads(data, parse_constant=_no_constant)
    except RecursionError:  # "[[[[..." nests past the stack
        raise _Misfit("nested too deep") from None
    except ValueError:  # also UnicodeDecodeError
        # A supervisor's reply is a JSON object and a newline (control.encode_reply): one
        # that begins as such and ends before its newline was most likely cut short (a
        # supervisor killed while it answered), and "not a forkproxy" would send the user
        # the wrong way. (A cut object never parses: its closing brace is what is missing.)
        if data.startswith(b"{") and not data.endswith(b"\n"):
            raise _Cut from None
        raise _Misfit("not JSON") from None
    if not isinstance(reply, dict):
        raise _Misfit("not a JSON object")
    if command == "status":
        _STATUS(reply, "")
    elif command == "check":
        _CHECK(reply, "")
        if reply["ok"] != (not reply["stopping"] and bool(reply["listeners"])
                           and not reply.get("not_listening")):
            raise _Misfit("ok contradicts stopping and listeners")
    elif command == "reload":
        _OK(reply, "")
        (_RELOADED if reply["ok"] else _NOT_RELOADED)(reply, "")
        if reply["ok"] and (reply.get("stopping") or reply.get("handing_over")):
            # A supervisor stopping or handing over reads no configuration (_reload).
            raise _Misfit("ok contradicts stopping or handing_over")
    return reply


def _out_of_descriptors(pid: int) -> str | None:
    """Why the supervisor `pid` (SO_PEERCRED's, as this process sees it) never took a
    request up, when /proc shows it out of file descriptors: every number below its open
    files limit in use, where its control socket's accept() fails (EMFILE, its
    `control-accept-failed`) and the request waits in the backlog, which `check` said as
    `timed out`, a hung supervisor's words. None when it is not, or cannot be read: pid
    0 (another PID namespace), another user's process, a /proc not ours. Read only
    after the timeout, never on an answered request."""
    if pid <= 0 or proc_not_ours() is not None:
        return None
    try:
        held = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
        with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
            # `Max open files  1024  4096  files`: the soft limit, the one accept() meets
            soft = next(line.split()[3] for line in limits if line.startswith("Max open files"))
        limit = int(soft)  # "unlimited": ValueError, never out of descriptors
    except (OSError, ValueError, StopIteration, IndexError):
        return None
    # The kernel gives the lowest free number: EMFILE once it is not below the limit (a
    # limit lowered live leaves higher numbers open: the count alone may be under it).
    if min(set(range(len(held) + 1)) - held) < limit:
        return None
    return (f"its supervisor (pid {pid}) is out of file descriptors ({len(held)} open of "
            f"a limit of {limit}), so it cannot take the request up (its log says "
            f"control-accept-failed); raise its open files limit ({RAISE_OPEN_FILES}) or "
            "find what holds them")


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    """connect(), waiting until `deadline` while the supervisor's backlog is full.

    A socket with a timeout is non-blocking, and a Unix socket's connect() then fails at
    once with EAGAIN when the listener's backlog is full: a supervisor busy for a moment
    while others ask too, which is no reason for `check` to report it unhealthy. Full
    until `deadline`, it is StatusError saying so: EAGAIN's own words ("Resource
    temporarily unavailable") named nothing to act on.
    """
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                # Requests that timed out stay queued until accepted: 17 checks of a
                # stopped supervisor fill it for every later one.
                raise StatusError(
                    f"no answer on {path!r}: its control socket's backlog is full, and the "
                    "supervisor takes no request up: stopped or paused (SIGSTOP, docker "
                    "pause), wedged, or out of file descriptors (its log then says "
                    "control-accept-failed)") from None
            time.sleep(0.02)


# What proc_not_ours() found, once per process: [] until asked.
_proc_not_ours: list[str | None] = []


def proc_not_ours() -> str | None:
    """Why no process here is read by its pid in /proc (control.foreign_proc), None when
    they can be. Asked once: the metrics process asks at every scrape."""
    if not _proc_not_ours:
        _proc_not_ours.append(foreign_proc())
    return _proc_not_ours[0]


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
    if not here or proc_not_ours():
        # The supervisor is not visible from here, or /proc/N is not our process N:
        # nothing to read it by.
        return mapping
    import psutil

    with contextlib.suppress(psutil.Error, OSError):
        for process in psutil.Process(here).children():
            try:
                # Binary: the kernel writes the Name: line as the process named itself,
                # bytes that need not be UTF-8 (prctl PR_SET_NAME), and a PID 1 adopts
                # orphans of any name, so a text read could end `status` in a traceback.
                with open(f"/proc/{process.pid}/status", "rb") as handle:
                    nspid = next(line for line in handle if line.startswith(b"NSpid:"))
            except (OSError, StopIteration):  # exited meanwhile; no NSpid before Linux 4.1
                continue
            mapping[int(nspid.split()[-1])] = process.pid
    return mapping


def enrich(status: dict[str, Any]) -> dict[str, Any]:
    """Add psutil's readings (RSS, USS, CPU seconds) to each live connection, and its
    pid as this process sees it (`pid_here`, None if not visible from here). The
    readings stay None (unknown) where /proc is another PID namespace's (proc_not_ours):
    they would be other processes'."""
    pids_here = _pids_here(status)
    children = status.get("children", [])
    for child in children:
        child.update(pid_here=pids_here.get(child["pid"]), rss=None, uss=None, cpu=None)
    if proc_not_ours():
        return status
    import psutil

    for child in children:
        here = child["pid_here"]
        if here is None:
            continue
        # OSError too: psutil lets some through (ENOMEM, EIO reading /proc under memory
        # pressure); one child's readings must not cost the whole table.
        with contextlib.suppress(psutil.Error, OSError):
            process = psutil.Process(here)
            with process.oneshot():
                memory = process.memory_full_info()
                times = process.cpu_times()
            # No `uss` where psutil's import found no /proc/<its pid>/smaps (a kernel
            # built without it): unknown, not an AttributeError's traceback.
            child.update(rss=memory.rss, uss=getattr(memory, "uss", None),
                         cpu=times.user + times.system)
    return status


def read_sockets(status: dict[str, Any], replied_at: float | None = None) -> dict[str, Any]:
    """Add what the kernel says of each live connection's two TCP sockets: `idle`,
    seconds since data last moved on either, `queued_to_client`, `queued_to_upstream`,
    the bytes its socket toward that side holds unsent or unacknowledged (`ss`'s Send-Q):
    a client that reads nothing leaves them queued toward it, and `unanswered`, seconds
    since data last went to the upstream when none came back since (an upstream stopped,
    hung or overloaded; a client waiting on purpose, redis's BLPOP, too). None where the
    kernel cannot tell from here: the supervisor in another network namespace, a child
    gone or not readable, an upstream not connected yet. After enrich(), whose `pid_here`
    it reads. `replied_at`: when the reply came (time.monotonic()), to which these times
    are brought back, as the reply's `age`s are of it.

    `status` and the metrics process ask, never the supervisor: one netlink dump of the
    namespace's connected TCP sockets per family, and each child's /proc/PID/fd."""
    from .sockdiag import read_tcp_sockets, socket_inodes

    children = status.get("children", [])
    for child in children:
        child.update(idle=None, queued_to_client=None, queued_to_upstream=None,
                     unanswered=None)
    here = status.get("pid_here")
    if (not children or not here or proc_not_ours()
            or not _same_network_namespace(here)):
        # /proc/N not our process N (proc_not_ours): its descriptors would be another's.
        # Socket inodes are unique across namespaces, so another's are never misread:
        # they are simply not in this namespace's dump, which is not worth making.
        return status
    held: list[tuple[dict[str, Any], list[int]]] = []
    for child in children:
        if child.get("pid_here") is None:
            continue
        with contextlib.suppress(OSError):  # gone, or another user's
            # From descriptor 3: a relay child's 0-2 are its supervisor's standard
            # descriptors, always open (console.fill_closed_std_fds), never its
            # connection's sockets; a quarter less of this loop's time at 2,000.
            held.append((child, socket_inodes(child["pid_here"], first=3)))
    try:
        sockets = read_tcp_sockets({inode for _, inodes in held for inode in inodes})
    except OSError as exc:
        # No NETLINK_SOCK_DIAG here: a sandbox (systemd's RestrictAddressFamilies= without
        # AF_NETLINK). Said, so that a 0 is not served, nor `-` shown, without a reason.
        status["sockets_unread"] = f"NETLINK_SOCK_DIAG: {exc.strerror or exc}"
        return status
    # The kernel's times are of now, the reply's of when it came, before enrich() read
    # every child (~0.3 ms each): at 4,000 connections a connection was shown IDLE 6.1 s
    # with an AGE of 4.7 s. So they are moved back to the reply's moment, as one reading;
    # 0 for data that moved since (it was moving then).
    late = 0.0 if replied_at is None else max(0.0, time.monotonic() - replied_at)
    for child, inodes in held:
        found = [sockets[inode] for inode in inodes if inode in sockets]
        client = _socket_address(child["client"])
        toward_client = [item for item in found if item.remote == client]
        if len(toward_client) != 1:
            # Not this connection's child (its pid reused since the reply), or a client
            # socket closed already: nothing here is known to be the connection's.
            continue
        others = [item for item in found if item is not toward_client[0]]
        # The relay holds two TCP sockets; more (never seen) would leave the upstream's
        # unknown rather than guessed.
        upstream = others[0] if len(others) == 1 else None
        moved = [item.idle_ms for item in (toward_client[0], upstream)
                 if item is not None and item.idle_ms is not None]
        child.update(
            idle=max(0.0, min(moved) / 1000 - late) if moved else None,
            queued_to_client=toward_client[0].send_queue,
            queued_to_upstream=None if upstream is None else upstream.send_queue,
            unanswered=(None if upstream is None or upstream.unanswered_ms is None
                        else max(0.0, upstream.unanswered_ms / 1000 - late)),
        )
    return status


def _socket_address(text: str) -> tuple[bytes, int] | None:
    """A connection's `client` as the supervisor writes it (`10.0.0.1:5000`,
    `[fe80::1%2]:5000`), as sockdiag.TcpSocket.remote has it; None if not an address."""
    from .sockdiag import packed_address

    try:
        host, port = split_host_port(text, "client")
        return packed_address(host.partition("%")[0]), int(port)
    except (ConfigError, ValueError):
        return None


# Seconds `status` gives the metrics endpoint to answer. A request waits up to a second
# for a free slot there (metrics.SCRAPE_WAIT) and is closed if none comes: 2 s is enough
# for a busy endpoint to answer and short enough for a command run by hand.
PROBE_DEADLINE = 2.0
# Answered by the metrics process itself, 404 (it serves /metrics only), without asking
# the supervisor or rendering the page: /metrics would read every child with psutil.
PROBE_REQUEST = b"HEAD / HTTP/1.0\r\n\r\n"


def probe_metrics(status: dict[str, Any]) -> dict[str, Any]:
    """The supervisor says `up` while the metrics process lives, which does not mean it
    answers (stopped with SIGSTOP, every request slot held by slow clients): ask it.
    Adds to the reply's `metrics` `answers` (true, false, or null when not asked: not
    up, or not reachable from here) and `no_answer` (why not, or why not asked)."""
    metrics = status.get("metrics")
    if not isinstance(metrics, dict):
        return status
    metrics.update(answers=None, no_answer=None)
    if metrics.get("state") != "up":
        return status
    here = status.get("pid_here")
    if proc_not_ours():
        # Its network namespace is read in /proc/PID/ns/net: some other process's here.
        metrics["no_answer"] = "not asked: cannot tell its network namespace (/proc is not ours)"
        return status
    if not here or not _same_network_namespace(here):
        # Run from the host for a supervisor in a container: its address means another
        # network's there, and may reach some other program here.
        metrics["no_answer"] = "not asked: in another network namespace, or cannot tell"
        return status
    address = _url_address(str(metrics.get("url", "")))
    if address is None:
        metrics["no_answer"] = f"not asked: no address in {quoted(str(metrics.get('url')))}"
        return status
    error = _ask_http(*address, PROBE_DEADLINE)
    metrics["answers"] = error is None
    if error is not None:
        pid = metrics.get("pid")
        if pid and here == status.get("pid") and _is_stopped(pid):
            error += f"; process {pid} is stopped"
        metrics["no_answer"] = error
    return status


def _same_network_namespace(pid: int) -> bool:
    """Is process `pid` in this process's network namespace? False when it cannot be told
    (another user's process, without root)."""
    try:
        theirs, ours = os.stat(f"/proc/{pid}/ns/net"), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _is_stopped(pid: int) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error, OSError):
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED,
                                                psutil.STATUS_TRACING_STOP)
    return False


def _url_address(url: str) -> tuple[str, int] | None:
    """`url`'s host and port to connect to, or None. The unspecified address (what
    --metrics binds for all interfaces) is asked on loopback."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").replace("%25", "%")  # an IPv6 zone, as a URL writes it
    try:
        port = parts.port
    except ValueError:  # out of range or not a number
        return None
    if not host or port is None:
        return None
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port


def _ask_http(host: str, port: int, deadline: float) -> str | None:
    """None if an HTTP server answers at host:port within `deadline` seconds, else why
    not, in a few words. Connecting proves nothing: the kernel completes handshakes for
    a listener whose process is stopped."""
    ends = time.monotonic() + deadline
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(deadline)
            sock.connect(address)
            sock.sendall(PROBE_REQUEST)
            reply = b""
            while b"\n" not in reply and len(reply) < 64:
                sock.settimeout(max(0.001, ends - time.monotonic()))
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
    except TimeoutError:
        return f"no reply within {deadline:g} s"
    except OSError as exc:  # socket.gaierror too
        return str(exc.strerror or exc).lower()
    if not reply:
        return "closed without a reply"
    if not reply.startswith(b"HTTP/"):
        return "answered, but not HTTP"
    return None


def _size(value: int | None) -> str:
    """1536 -> '1.5K', as ls -h and docker ps print sizes. The unit is chosen on the
    value as shown: 1048575 (1023.999K) is `1.0M`, not `1024.0K`."""
    if value is None:
        return "-"
    if value < 1024:
        return f"{value}B"
    scaled = float(value)
    for unit in ("K", "M", "G", "T"):
        scaled /= 1024
        if round(scaled, 1) < 1024 or unit == "T":
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


def _age(reply: dict[str, Any], age: str, since: str) -> float | None:
    """Seconds since `reply[since]` (None without it): `reply[age]`, the supervisor's
    reading of its monotonic clock; from a supervisor that sends none (older ones), the
    wall clock's time since, not below 0 (a clock stepped back since made it negative)."""
    if reply.get(age) is not None:
        return float(reply[age])
    if reply.get(since) is None:
        return None
    return max(0.0, time.time() - float(reply[since]))


def describe_metrics(metrics: dict[str, Any] | None) -> str | None:
    """The metrics endpoint's state in words (None without --metrics), as
    `http://127.0.0.1:9090/metrics restarting for 3s (killed by SIGKILL), 1 restart`."""
    if not metrics:
        return None
    state = metrics.get("state", "?")
    # `up` is the supervisor's word for a live process; said here only of one that
    # answered status's request (probe_metrics), or as the supervisor said it where none
    # was made (`check`, which does not ask).
    asked = "answers" in metrics
    shown = "running" if state == "up" and asked and metrics["answers"] is not True else state
    text = f"{metrics.get('url', '?')} {shown}"
    age = _age(metrics, "age", "since")
    if age is not None and state != "starting":
        text += f" for {age:.0f}s"
    if shown == "running":
        reason = metrics.get("no_answer") or "not asked"
        text += (f", not answering ({reason})" if metrics["answers"] is False
                 else f" ({reason})")
    if state != "up" and metrics.get("last_exit"):
        text += f" ({metrics['last_exit']})"
    restarts = int(metrics.get("restarts", 0))
    text += f", {restarts} restart{'' if restarts == 1 else 's'}"
    retry_in = metrics.get("retry_in")
    deaths = int(metrics.get("deaths_in_a_row") or 0)
    if state == "restarting" and retry_in is not None and deaths > 1:
        # Backing off: the next start is later than the first 5 s.
        text += f", {deaths} deaths in a row, next start in {retry_in:.0f}s"
    return text


def describe_reload(reply: dict[str, Any], failed_only: bool = False) -> str | None:
    """The last reload in words, as `last reload 12s ago: ok` or `last reload failed 12s
    ago (the previous configuration stays): ERROR`; None before any reload, from a
    supervisor that does not say, or (`failed_only`) when it applied."""
    last = reply.get("last_reload")
    if not last or (failed_only and last["ok"]):
        return None
    ago = f"{_age(last, 'age', 'at') or 0.0:.0f}s ago"
    if last["ok"]:
        return f"last reload {ago}: ok"
    return (f"last reload failed {ago} (the previous configuration stays): "
            f"{last.get('error') or '?'}")


def _shut(listeners: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The listeners that do not listen: shut down from outside (`listener-shut`). None
    from a supervisor older than `listening`, which does not say."""
    return [item for item in listeners if item.get("listening") is False]


def describe_not_listening(listeners: list[dict[str, Any]]) -> str | None:
    """`not listening (shut down from outside): ADDR (LINK), ...`, None when every listener
    listens (or the supervisor does not say)."""
    shut = _shut(listeners)
    if not shut:
        return None
    return ("not listening (shut down from outside): "
            + ", ".join(f"{item['listen']} ({item['link']})" for item in shut))


def _max_children(status: dict[str, Any]) -> str:
    """`, max-children 36 (fits the memory limit of 64 MiB)`: the limit in force, and
    where it came from when a memory, pids or nproc limit was found (several: `fits the
    memory limit of 64 MiB and the pids limit of 73`), as the start line says."""
    value = status.get("max_children")
    if value is None:
        return ""
    text = f", max-children {value}"
    memory, pids, nproc = (status.get(f"{name}_limit") for name in ("memory", "pids", "nproc"))
    limits = {"memory": (memory, status.get("memory_fit")), "pids": (pids, status.get("pids_fit")),
              "nproc": (nproc, status.get("nproc_fit"))}
    known = {name: fit for name, (limit, fit) in limits.items()
             if limit is not None and fit is not None}
    bounding = limiting_fits(known.get("memory"), known.get("pids"), known.get("nproc"))
    if status.get("max_children_given", True):
        # Each limit that says anything about the value given: the memory limit always (as
        # before), a pids or nproc limit when it bounds derived values or is below the value.
        shown = [name for name, fit in known.items() if name in bounding or fit < value]
        if any(not known[name] for name in shown):  # served as told: no promise either way
            shown = [name for name in shown if not known[name]]
            return f"{text} ({no_room_text(shown, memory, pids, nproc)})"
        parts = [f"about {known[name]} fit {limits_text([name], memory, pids, nproc)}"
                 for name in shown]
        return f"{text} ({', '.join(parts)})" if parts else text
    named = limits_named(bounding)
    if not named:
        return text
    if not known[named[0]]:  # clamped up to 1: no promise
        return f"{text} ({no_room_text(named, memory, pids, nproc)})"
    return f"{text} (fits {limits_text(named, memory, pids, nproc)})"


def _grace_left(status: dict[str, Any]) -> str:
    """` (grace ends in 7s)`, ` (grace over)`, or '' from a supervisor that does not say."""
    left = status.get("grace_left")
    if left is None:
        return ""
    return f" (grace ends in {max(1, round(left))}s)" if left > 0 else " (grace over)"


def _queued(listeners: list[dict[str, Any]]) -> dict[str, str]:
    """Link name -> its QUEUED cell: the clients in its listener's accept queue, `N full`
    once the queue holds more than its size (the kernel then drops or resets the SYNs of
    new clients). No cell (`-`) where the supervisor could not say."""
    cells = {}
    for item in listeners:
        queued, backlog = item.get("queued"), item.get("backlog")
        if queued is not None:
            full = backlog is not None and queued > backlog
            cells[item["link"]] = f"{queued} full" if full else str(queued)
    return cells


def render(status: dict[str, Any]) -> str:
    """The status as two tables, like `ss` or `docker ps`, after a line for the supervisor
    and, with --metrics, one for the metrics endpoint."""
    links = status.get("links", {})
    lines = [
        f"forkproxy {status.get('version', '?')} pid {status.get('pid')}, "
        f"up {_age(status, 'uptime', 'started') or 0.0:.0f}s"
        + (f", stopping{_grace_left(status)}" if status.get("stopping") else "")
        + _max_children(status)
    ]
    metrics = describe_metrics(status.get("metrics"))
    if metrics is not None:
        lines.append(f"metrics {metrics}")
    reload = describe_reload(status)
    if reload is not None:
        lines.append(reload)
    shut = describe_not_listening(status.get("listeners", []))
    if shut is not None:
        lines.append(shut)
    rows = []
    places = [(item["link"], f"{item['listen']}"
               + (" (not listening)" if item.get("listening") is False else "")
               + f" -> {_upstream(item)}")
              for item in status.get("listeners", [])]
    # A link without a listener still has a row while the supervisor reports it: at a
    # stop (listeners closed, connections finishing, clients WAITING for a child) and
    # after a reload removed it, until its last connection ends.
    places += [(name, "(not listening)")
               for name in sorted(links.keys() - {name for name, _ in places})]
    queued = _queued(status.get("listeners", []))
    # No cell (`-`) where the supervisor could not say, or is older than the field.
    drops = {item["link"]: str(item["drops"]) for item in status.get("listeners", [])
             if item.get("drops") is not None}
    for name, where in places:
        stats = links.get(name, {})
        rows.append([
            name, where,
            str(stats.get("active", 0)), str(stats.get("waiting", 0)), queued.get(name, "-"),
            drops.get(name, "-"),
            str(stats.get("connections", 0)), str(stats.get("empty", 0)),
            str(stats.get("upstream_failures", 0)), str(stats.get("denied", 0)),
            _size(stats.get("bytes_up", 0)), _size(stats.get("bytes_down", 0)),
            ended_text(stats.get("outcomes", {})),
        ])
    lines += ["", *_table(["LINK", "LISTEN -> UPSTREAM", "ACTIVE", "WAITING", "QUEUED", "DROPS",
                           "TOTAL", "EMPTY", "FAILED", "DENIED", "BYTES UP", "BYTES DOWN",
                           "ENDED"], rows)]
    # UPSTREAM: the target the connection was made to, which a reload that rewired its
    # link since has not changed (the link's row shows the new one).
    rows = [
        [str(c["pid"]), c["link"], c["client"], c.get("upstream", "-"), f"{c['age']:.1f}s",
         "-" if c.get("idle") is None else f"{c['idle']:.1f}s",
         _size(c["bytes_up"]), _size(c["bytes_down"]),
         _size(c.get("queued_to_client")), _size(c.get("queued_to_upstream")),
         "-" if c.get("unanswered") is None else f"{c['unanswered']:.1f}s",
         _size(c.get("rss")), _size(c.get("uss")),
         "-" if c.get("cpu") is None else f"{c['cpu']:.2f}s"]
        for c in status.get("children", [])
    ]
    lines += ["", *_table(["PID", "LINK", "CLIENT", "UPSTREAM", "AGE", "IDLE", "UP", "DOWN",
                           "QUEUED TO CLIENT", "QUEUED TO UPSTREAM", "UNANSWERED", "RSS",
                           "USS", "CPU"], rows)]
    return "\n".join(lines)


# What the client commands do once their arguments are read, here rather than in cli.py:
# console.py's lean path runs them without typer for a plain `check` or `status`, and
# both must say the same lines with the same exit status. `output` and `say` write a line
# on stdout and stderr; a --status-socket given has passed control.check_client_path.
Say = Callable[[str], None]


def ask(path: str | None, command: str, say: Say) -> dict[str, Any] | None:
    """The supervisor's reply to `command` (at `path`, else the one find_socket finds), or
    None once `say` was told the one line why not: nothing answers, or something that is
    not a forkproxy does (the command then exits 1)."""
    try:
        return _ask_across_take_over(path, command)
    except StatusError as exc:
        kind = "error: " if isinstance(exc, NotForkproxy) else ""
        say(f"forkproxy: {kind}{exc}")
        return None


def _ask_across_take_over(path: str | None, command: str) -> dict[str, Any]:
    """request(), asked once more of the supervisor that took over (serve --take-over)
    when the one asked was the one handing over and it reset, went away or said it is
    stopping: a `check` at that moment failed a healthy proxy. Only when another one
    serves now: at --status-socket, another socket renamed into place since (the file's
    inode changed); in the default directory, another socket find_socket finds. A proxy
    stopping, with nobody taking over, is said stopping as before. A `reload` refused as
    handing over, with no other one yet, waits for the hand-over to end (_after_hand_over)."""
    found = find_socket(path)
    for _ in range(ASKS):
        before = _inode(found)
        try:
            reply = request(found, command)
        except NotForkproxy:
            raise
        except StatusError as exc:
            failure: StatusError | None = exc
            refusal = None
        else:
            refusal = _winding_down_refusal(command, reply)
            if refusal is None:
                return reply
            failure = None
        successor = _successor(path, found, before)
        if successor is None and refusal == HANDING_OVER:
            successor = _after_hand_over(path, found, before)
        if successor is None:
            break
        # Asked in turn as the first was: it may be handing over itself (a take-over
        # in a row), or be the one taking over that failed (its old one serves on).
        found = successor
    if failure is not None:
        raise failure
    return reply


# Supervisors one request is asked of at most, each the successor of the one before.
ASKS = 3


def _successor(path: str | None, found: str, before: tuple[int, int] | None) -> str | None:
    """The socket of another supervisor serving in place of the one on `found` (which was
    the file `before`), None when there is none (yet)."""
    if path is not None:
        now = _inode(path)
        return path if now is not None and now != before else None
    successor = None
    with contextlib.suppress(StatusError):
        successor = find_socket(None)
    return None if successor == found else successor  # named by pid: the same one


# Seconds between two looks while a supervisor hands over (_after_hand_over).
HAND_OVER_LOOK_EVERY = 0.05


def _after_hand_over(path: str | None, found: str,
                     before: tuple[int, int] | None) -> str | None:
    """Where to ask again once the supervisor on `found`, which refused a `reload` as
    handing over, is done: the socket of the one that took over, or `found` itself when
    the take-over was given up (it serves on, and reloads again). None if neither within
    REQUEST_DEADLINE, the time the supervisor gives the one taking over (its
    HAND_OVER_DEADLINE, as long) before it gives up. Asked before the one taking over
    had made its socket (it binds the sockets handed first), or just before it was given
    up, the refusal was the answer: exit 1, "handing over to a new supervisor", beside
    one that served a moment later and would have reloaded."""
    ends = time.monotonic() + REQUEST_DEADLINE
    while time.monotonic() < ends:
        time.sleep(HAND_OVER_LOOK_EVERY)
        successor = _successor(path, found, before)
        if successor is not None:
            return successor
        try:
            state = request(found, "check", timeout=2.0, deadline=2.0)
        except StatusError:
            continue  # gone, or busy: the one that took over is found at the next look
        if state.get("stopping") is not True and state.get("handing_over") is not True:
            return found  # the take-over was given up: it serves on
    return None


def _winding_down_refusal(command: str, reply: dict[str, Any]) -> str | None:
    """"stopping" when `reply` says its supervisor is stopping, HANDING_OVER when (a
    `reload` refused) it is handing its listeners over, else None (as _winding_down
    says them): one taking over may answer instead. A `check` during a hand-over is
    answered by the old one, which serves until the `go`. A reload's answer from a
    supervisor older than its `stopping` field (a take-over may be from one) says it in
    its error alone."""
    if reply.get("stopping") is True:
        return "stopping"
    if command != "reload" or reply.get("ok") is not False:
        return None
    if "stopping" in reply:
        return HANDING_OVER if reply.get("handing_over") is True else None
    error = reply.get("error")
    return error if error in ("stopping", HANDING_OVER) else None


def _inode(path: str) -> tuple[int, int] | None:
    """Which file `path` is now, None when there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def run_check(path: str | None, output: Say, say: Say) -> int:
    """`forkproxy check`: exit status 0 when the supervisor answers and every listener is
    bound, else 1, with one line each way."""
    reply = ask(path, "check", say)
    if reply is None:
        return 1
    if not reply.get("ok"):
        lost = shown(reply.get("not_listening"))
        say("forkproxy: unhealthy: " + (
            "stopping" if reply.get("stopping")
            else "not listening (shut down from outside, and it cannot listen again): "
                 + ", ".join(lost) if lost
            else "no listener bound"))
        return 1
    # Metrics down, or a failed last reload, are said, not failed on: see
    # Supervisor.handle_control_request.
    metrics = shown(reply.get("metrics"))
    down = metrics and metrics.get("state") != "up"
    note = f"; metrics {describe_metrics(metrics)}" if down else ""
    reload = describe_reload(shown(reply), failed_only=True)
    note += f"; {reload}" if reload else ""
    output(f"ok: {len(reply.get('listeners', []))} listener(s){note}")
    return 0


def run_status(path: str | None, as_json: bool, output: Say, say: Say) -> int:
    """`forkproxy status [--json]`: the table (or its JSON) and exit status 0, else 1."""
    reply = ask(path, "status", say)
    replied_at = time.monotonic()
    if reply is None:
        return 1
    not_ours = proc_not_ours()
    if not_ours:
        say(f"forkproxy: warning: {not_ours}: the connections' memory, CPU and socket "
            "figures are not read (a PID namespace without a /proc of its own?)")
    reply = probe_metrics(read_sockets(enrich(reply), replied_at))
    if reply.get("sockets_unread"):
        # The connections' columns only: the links' QUEUED is the listener's accept
        # queue, which the supervisor reads itself and which is shown still.
        say(f"forkproxy: warning: the kernel's view of the connections' sockets cannot be "
            f"read here ({reply['sockets_unread']}): their IDLE, QUEUED TO CLIENT, QUEUED "
            "TO UPSTREAM and UNANSWERED are not known; allow AF_NETLINK (systemd's "
            "RestrictAddressFamilies=)")
    output(json.dumps(reply, indent=2) if as_json else render(shown(reply)))
    return 0
