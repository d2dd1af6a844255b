"""A tiny logger for the supervisor and its children: one `os.write` per line to stderr.

The `logging` module imports `threading` and registers at-fork hooks, which makes every
fork of the supervisor dearer (see docs/benchmarks.md); this writes the same lines
without either. One write per line keeps lines whole when children share stderr.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
import time

from .config import printable

TYPE_CHECKING = False  # not typing's: importing typing costs every process ~0.9 MB of heap
if TYPE_CHECKING:
    from collections.abc import Callable, Hashable
    from typing import TypeVar

    _K = TypeVar("_K", bound=Hashable)

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error"}

# The longest line written, newline included: PIPE_BUF on Linux. A write of at most this
# many bytes to a pipe (stderr under Docker and most process managers) lands whole; a
# longer one can be split by other children's lines written at the same time, and cut
# short by a signal. So longer lines are cut to fit in their longest values, as HAProxy
# cuts its log lines (at 1024 bytes by default). Only a link named by very many aliases,
# or a name with very many addresses, comes near it.
MAX_LINE = 4096
# What a prepared line's slots (client address, counts, seconds) may add to its template.
_SLOTS_ROOM = 256
_CUT = "..."
# The supervisor's lines its stderr (a pipe, a socket, a terminal) could not take, held
# in order until it can, up to this many bytes (16 of the longest lines, hundreds of the
# usual ones); past it, whole lines are dropped and counted (`log-dropped`). Bounded: a
# reader that stopped for good must not grow the supervisor, whose every page a fork
# may copy.
HELD_MAX = 64 * 1024
# Seconds an exit waits for the log (stderr) to take the lines it holds (Logger.settle),
# when it holds any: a reader only slow gets them, one that stopped loses them.
LOG_SETTLE = 0.5
# The same for the one line that says why `serve` did not start (write_start_error):
# longer, as it is the only clue to the exit 2, and still bounded.
START_ERROR_SETTLE = 2.0


class Logger:
    """`log.info("open", link=..., client=...)` -> `... info open link=... client=...`."""

    def __init__(self, level: int = INFO, fmt: str = "text", fd: int = 2) -> None:
        self.level = level
        self.fmt = fmt
        self.fd = fd
        # Text lines in stderr's encoding (the locale's), as every line a command writes:
        # in UTF-8, a Latin-1 host's log named a --status-socket path typed with `ü` as
        # `Ã¼`, which `status --status-socket` could not be given back. JSON is ASCII.
        self.encoding = "utf-8" if fmt == "json" else text_encoding()
        # The supervisor's own way to stderr, never blocking (never_wait), -1 without
        # one: a description of the pipe or terminal of its own, opened non-blocking; or,
        # stderr a socket, a duplicate of it sent to with MSG_DONTWAIT (own_socket).
        # `owner`, the pid that writes through it: the processes it forks inherit this
        # logger and go on writing to `fd`, as they always did.
        self.own_fd = -1
        self.own_socket: socket.socket | None = None
        self.owner = 0
        # What stderr is ("pipe", "socket", "tty"; _kind_of), "" when never_wait left it;
        # whether it is a socket that takes a datagram per send (or a SOCK_SEQPACKET);
        # whether own_fd stays open (never_wait), or is opened for a line and closed
        # after it unless lines are held (never_wait lazily, at start).
        self.own_kind = ""
        self.own_datagrams = False
        self.own_kept = False
        # A pipe this process may not open again (_open_own): a private pipe's two ends,
        # each line written into it and spliced on to own_fd, a duplicate of fd 2.
        self.splice_from = self.splice_to = -1
        # Lines own_fd could not take yet (a full log), in order, and their bytes;
        # lines dropped since the last `log-dropped`; who to tell when lines start to
        # be held (the supervisor's loop, which then waits for room: flush_held).
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.dropped = 0
        self.on_held: Callable[[int], None] | None = None

    def emit(self, level: int, event: str, fields: dict[str, object]) -> None:
        if level < self.level:
            return
        pid = os.getpid()
        self._put(self._line(level, event, fields, pid), pid)

    def emit_requested(self, event: str, fields: dict[str, object]) -> None:
        """An info line someone asked for (SIGUSR1's status table): written whatever the
        verbosity, and still marked info, so that alerts on warnings do not fire on it."""
        pid = os.getpid()
        self._put(self._line(INFO, event, fields, pid), pid)

    def _put(self, data: bytes, pid: int) -> None:
        """The supervisor's line (see never_wait) without waiting, any other's as always."""
        if pid == self.owner:
            self._offer(data)
        else:
            self._write(data)

    def _line(self, level: int, event: str, fields: dict[str, object], pid: int) -> bytes:
        """The line to write, newline included, at most MAX_LINE bytes: the longest text
        value cut (and marked with `...`) by what the line is over, or by half when that
        is more (escapes can make a value longer in the line), until it fits."""
        stamp = _stamp()
        while True:
            data = (self._render(level, event, fields, stamp, pid) + "\n").encode(
                self.encoding, "backslashreplace")
            texts = [(len(v), k, v) for k, v in fields.items() if isinstance(v, str) and v]
            if len(data) <= MAX_LINE or not texts:
                return data
            length, key, value = max(texts)
            keep = max(length - (len(data) - MAX_LINE) - len(_CUT), length // 2)
            cut = value[:keep] + _CUT if keep + len(_CUT) < length else ""
            fields = {**fields, key: cut}

    def prepare(self, level: int, event: str, **fields: object) -> str | None:
        """This event's line (at a level that is logged) rendered now, but for the time,
        the pid and the fields whose values are slots (SLOT, SLOT_INT, SLOT_SECONDS);
        `emit_prepared` fills them in, in the order of the fields. None if a field's
        text holds one of the marks used here (never, for validated link names and
        targets): the caller then logs the usual way.

        For the lines a relay child writes as it starts and ends: rendering a whole line
        there runs, and so copies the pages of, code and objects a prepared line does not
        (~170 KiB per idle connection for `open`, docs/benchmarks.md).
        """
        slots: list[tuple[str, _Slot]] = []
        values: dict[str, object] = {}
        for key, value in fields.items():
            if isinstance(value, _Slot):
                mark = f"<slot{len(slots)}>"
                values[key] = mark
                slots.append((mark, value))
            else:
                values[key] = value
        rendered = self._render(level, event, values, _STAMP_MARK, _PID_MARK)
        marks = [_STAMP_MARK, _PID_MARK] + [mark for mark, _ in slots]
        if any(rendered.count(mark) != 1 for mark in marks):
            return None
        if len(rendered.encode(self.encoding, "backslashreplace")) > MAX_LINE - _SLOTS_ROOM:
            return None  # a line that may need cutting to fit (emit cuts it)
        template = rendered.replace("%", "%%") + "\n"
        for mark, directive in _DIRECTIVES:
            template = template.replace(mark, directive)
        for mark, slot in slots:
            if self.fmt == "json" and slot.number:  # a JSON number, not a string
                template = template.replace(f'"{mark}"', slot.json)
            else:
                template = template.replace(mark, slot.json if self.fmt == "json" else slot.text)
        return template

    def emit_prepared(self, template: str, *values: object) -> None:
        """Write a `prepare`d line with `values` in its slots.

        The stamp and the write are written out here rather than calls to _stamp() and
        _write(): a fresh child writes to the code object of each function it calls, and
        the two calls cost ~15-20 KiB per idle connection (docs/benchmarks.md).
        """
        plain = True
        for value in values:
            if isinstance(value, str) and (not value or value.strip(_PLAIN)):
                plain = False
        if not plain:  # text that is not an address or a word: quote it as emit would
            quote = _json_text if self.fmt == "json" else _text_value
            values = tuple(
                quote(v) if isinstance(v, str) and (not v or v.strip(_PLAIN)) else v
                for v in values
            )
        now = time.time()
        t = time.gmtime(now)
        line = template % (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec,
                           now % 1 * 1000, os.getpid(), *values)
        data = line.encode(self.encoding, "backslashreplace")
        try:
            while data:  # a short write is finished, as in _write
                data = data[os.write(self.fd, data):]
        except OSError:
            pass  # as in _write

    def _render(self, level: int, event: str, fields: dict[str, object],
                stamp: str, pid: object) -> str:
        if self.fmt == "json":
            record: dict[str, object] = {"ts": stamp, "level": _NAMES[level], "pid": pid}
            record["event"] = event
            record.update(fields)
            return json.dumps(record, default=str)
        parts = [stamp, f"forkproxy[{pid}]", _NAMES[level], event]
        parts += [f"{key}={_text_value(value)}" for key, value in fields.items()]
        return " ".join(parts)

    def _write(self, data: bytes) -> None:
        try:
            while data:
                # A short write (a signal during a write to a socket or a file) leaves
                # the rest to write, not to drop: the next line would run on into it.
                data = data[os.write(self.fd, data):]
        except OSError:
            pass  # stderr gone (closed pipe): logging must never take the proxy down

    # -- the supervisor's lines: never waited for -----------------------------------------

    def never_wait(self, on_held: Callable[[int], None], lazily: bool = False) -> None:
        """From now on, write this process's lines without ever waiting for the log, when
        stderr is one that can make a writer wait: a pipe or a FIFO (a log driver's, a
        shipper's, `| tee`), a socket (systemd's StandardError=journal, a shipper's), a
        terminal (its output stopped: Ctrl-S, or a terminal emulator that stopped reading).
        A log that takes no more (a reader that stopped) then holds lines (HELD_MAX), or
        drops them, and never the process: a supervisor blocked in write() accepted,
        reaped and answered nobody, and ignored SIGTERM, until someone read. `on_held(fd)`
        is called when lines start to be held: flush_held when fd has room.

        The processes it forks, which share fd 2's description, are left as they were:
        a pipe or a terminal gets a description of its own, opened non-blocking (and
        O_NOCTTY: on kernels older than Linux's "tty: require read access for controlling
        terminal", 2019, the open by a session leader without a controlling terminal,
        under systemd or setsid, made the terminal its own, and the terminal's hangup a
        SIGHUP to it: a reload); a pipe this process may not open again (another user's:
        a supervisor that is not root under a pipe root made) is written through a
        private pipe, each line spliced on with SPLICE_F_NONBLOCK, which never waits
        whatever the description says. A socket's description cannot be opened again (ENXIO),
        so it is shared: the supervisor sends to a duplicate of fd 2 with MSG_DONTWAIT,
        which makes that send non-blocking and not the description. A datagram socket
        gets a line per datagram, as each write() sends one; a stream socket or a
        terminal that takes part of a line gets the rest next, before any other line of
        the supervisor's (a child's line, written whole with a blocking write, can still
        come between the two parts: a terminal takes part of a line only when its output
        stops, or fills, in the middle of it; a unix stream socket, only with a send
        buffer of a few KiB; TCP, more often).

        `lazily`, at start, before anything is logged and before the supervisor opens
        what it needs: the description is opened for each line and closed after it,
        unless lines are held (then the loop, once it runs, writes them), and a line
        that finds no descriptor to open (EMFILE) is written as before. So a start that
        writes its warnings at once takes no descriptor more than it did, and starts at
        the same descriptor limit. never_wait() again, without it, keeps the description.

        A regular file or another device is written as before (non-blocking means nothing
        to them), and so are a pty's master end and /dev/tty (_OPENS_ANOTHER_TERMINAL).
        So is the rest when the description cannot be opened (no /proc, no reader left),
        or when keeping it would take the one descriptor the supervisor keeps spare for
        accept() (Supervisor.run): the lines held by then are written as before, waiting
        for the log."""
        if not self.owner:
            self.own_kind = _kind_of(self.fd)
            if not self.own_kind:
                return
            self.owner = os.getpid()
        self.on_held = on_held
        if lazily:
            return
        if self.own_fd < 0 and not self._open_own():
            self._give_back()
            return
        try:
            os.close(os.dup(self.own_fd))  # one still spare
        except OSError:
            self._give_back()
            return
        self.own_kept = True

    def _give_back(self) -> None:
        """No description of its own after all (see never_wait): written as before, the
        lines held first."""
        held, dropped = self.held, self.dropped
        self._close_own()
        self.owner, self.on_held, self.own_kind = 0, None, ""
        self.held, self.held_bytes, self.dropped = [], 0, 0
        for data in held:
            self._write(data)
        if dropped:
            self._log_dropped(dropped)

    def _open_own(self) -> bool:
        """own_fd (and own_socket) for own_kind's stderr; False when it cannot be had."""
        try:
            if self.own_kind == "socket":
                dup = os.dup(self.fd)  # close-on-exec: Python's default
                try:
                    # Blocking still (no timeout set: socket.getdefaulttimeout() is None in
                    # the supervisor), so fd 2's description is left as it was.
                    own = socket.socket(fileno=dup)
                except OSError:
                    os.close(dup)
                    raise
                self.own_socket, self.own_fd = own, own.fileno()
                self.own_datagrams = own.type != socket.SOCK_STREAM
            elif self.own_kind == "pipe":
                try:
                    self.own_fd = os.open(f"/proc/self/fd/{self.fd}",
                                          os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    # The kernel lets only the pipe's owner (or root) open it again: a
                    # supervisor that is not root, under a log pipe root made (the image
                    # under a container runtime). splice() with SPLICE_F_NONBLOCK never
                    # waits for a full pipe, whatever its description says: each line
                    # goes through a private pipe (_splice_on).
                    self.splice_from, self.splice_to = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                    try:
                        self.own_fd = os.dup(self.fd)  # close-on-exec: Python's default
                    except OSError:
                        self._close_own()
                        raise
            else:
                self.own_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY
                                      | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            return False
        return True

    def _close_own(self) -> None:
        if self.own_socket is not None:
            self.own_socket.close()
        elif self.own_fd >= 0:
            os.close(self.own_fd)
        for fd in (self.splice_from, self.splice_to):
            if fd >= 0:
                os.close(fd)
        self.splice_from = self.splice_to = -1
        self.own_socket, self.own_fd, self.own_kept = None, -1, False

    def _send(self, data: bytes) -> int:
        """The bytes of `data` own_fd takes now (BlockingIOError: none)."""
        if self.own_socket is not None:
            # MSG_NOSIGNAL: a peer gone is EPIPE here, as for the pipe (SIGPIPE ignored)
            return self.own_socket.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        if self.splice_to >= 0:
            return self._splice_on(data)
        return os.write(self.own_fd, data)

    def _splice_on(self, data: bytes) -> int:
        """_send through the private pipe: `data` (at most MAX_LINE bytes, one page of the
        pipe's: moved whole or not at all) written into it, then spliced on to own_fd's
        pipe without waiting; what did not go is read back, so the private pipe is empty
        again whatever happens."""
        written = os.write(self.splice_to, data)  # empty, 64 KiB: it takes a line whole
        moved = 0
        try:
            moved = os.splice(self.splice_from, self.own_fd, written, flags=_SPLICE_NONBLOCK)
        finally:
            if moved < written:
                os.read(self.splice_from, written - moved)
        if not moved:
            raise BlockingIOError(errno.EAGAIN, "the log's pipe is full")
        return moved

    def _offer(self, data: bytes) -> None:
        """Write a line through own_fd now, or hold it (behind those already held, to keep
        their order), or drop it (past HELD_MAX). A pipe takes a line (at most PIPE_BUF
        bytes, MAX_LINE) whole or not at all, and so does a datagram socket; a stream
        socket or a terminal can take part of it, and the rest is held first in line."""
        if self.own_fd < 0 and not self._open_own():
            self._write(data)  # no descriptor to be had now (never_wait lazily): as before
            return
        self._offer_own(data)
        if not self.own_kept and not self.held:
            self._close_own()

    def _offer_own(self, data: bytes) -> None:
        if not self.held:
            try:
                written = self._send(data)
            except BlockingIOError:
                written = 0
            except OSError:
                return  # no reader left: as in _write
            if written == len(data):
                return
            if written:  # the rest must follow, or the line is cut
                self._hold(data[written:], always=True)
                return
        self._hold(data)

    def _hold(self, data: bytes, always: bool = False) -> None:
        if not always and self.held_bytes + len(data) > HELD_MAX:
            self.dropped += 1
            return
        first = not self.held
        self.held.append(data)
        self.held_bytes += len(data)
        if first and self.on_held is not None:
            self.on_held(self.own_fd)

    def flush_held(self) -> bool:
        """Write the held lines own_fd takes now, in order, up to PIPE_BUF bytes of whole
        lines at a time (one line at a time to a datagram socket); then, all written, a
        `log-dropped` warning with the count of the lines dropped. True when none is left
        held (the caller stops waiting for room), also when the reader is gone (dropped,
        unsaid)."""
        held = self.held
        while held:
            count, size = 1, len(held[0])
            while (not self.own_datagrams and count < len(held)
                   and size + len(held[count]) <= MAX_LINE):
                size += len(held[count])
                count += 1
            chunk = held[0] if count == 1 else b"".join(held[:count])
            try:
                written = self._send(chunk)
            except BlockingIOError:
                return False
            except OSError:  # no reader left: nobody to write to
                held.clear()
                self.held_bytes = self.dropped = 0
                return True
            del held[:count]
            self.held_bytes -= written
            if written < len(chunk):  # a stream or a terminal took part: the rest first
                held.insert(0, chunk[written:])
        if self.dropped:
            lines, self.dropped = self.dropped, 0
            self._log_dropped(lines)
        return not held

    def _log_dropped(self, lines: int) -> None:
        """`log-dropped`, a warning written whatever the level (-qq writes errors only):
        it tells of the log itself, and lines lost without a word leave whoever reads
        it believing it whole (the lines dropped may be errors)."""
        fields: dict[str, object] = {
            "lines": lines, "detail": "lines the supervisor could not write, stderr full "
            f"(its reader stopped): at most {HELD_MAX // 1024} KiB are held"}
        pid = os.getpid()
        self._put(self._line(WARNING, "log-dropped", fields, pid), pid)

    def settle(self, seconds: float) -> None:
        """At exit: wait up to `seconds` for the held lines to be written, then drop what
        is left (a reader that stopped for good: it would hold the exit up for ever), and
        write as before, to fd."""
        if self.own_fd >= 0:
            deadline = time.monotonic() + seconds
            while not self.flush_held() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._close_own()
        self.owner, self.on_held, self.own_kind = 0, None, ""
        self.held.clear()
        self.held_bytes = self.dropped = 0

    def debug(self, event: str, **fields: object) -> None:
        self.emit(DEBUG, event, fields)

    def info(self, event: str, **fields: object) -> None:
        self.emit(INFO, event, fields)

    def warning(self, event: str, **fields: object) -> None:
        self.emit(WARNING, event, fields)

    def error(self, event: str, **fields: object) -> None:
        self.emit(ERROR, event, fields)


_STAMP_FORMAT = "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ"  # year ... second, milliseconds


_SPLICE_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)


def _kind_of(fd: int) -> str:
    """What Logger.never_wait makes of stderr: "pipe" (a FIFO too), "socket", "tty", or
    "" for what it leaves alone (a file, /dev/null: they take a write at once)."""
    try:
        found = os.fstat(fd)
    except OSError:
        return ""
    if stat.S_ISFIFO(found.st_mode):
        return "pipe"
    if stat.S_ISSOCK(found.st_mode):
        return "socket"
    if stat.S_ISCHR(found.st_mode) and os.isatty(fd):
        device = os.major(found.st_rdev), os.minor(found.st_rdev)
        return "" if device in _OPENS_ANOTHER_TERMINAL else "tty"
    return ""


# /dev/tty and /dev/ptmx (5:0, 5:2; a pty's master end is the latter): opened again, the
# one opens whichever terminal controls the opener now, the other makes a new pty whose
# slave nobody holds (every line lost, found with a master as stderr). fd 2's own
# description is the only way to their terminal: written as before.
_OPENS_ANOTHER_TERMINAL = ((5, 0), (5, 2))


def _stamp(now: float | None = None) -> str:
    """`now` (default: the current time) as UTC to the millisecond, 2026-11-28T11:40:52.454Z.

    gmtime and one %-format, not time.strftime: strftime goes through the C library's
    locale and encoding code, and in a freshly forked child that copied ~40 KiB of pages
    for each `open` line (docs/benchmarks.md). "%d" truncates the milliseconds as int() does.
    """
    if now is None:
        now = time.time()
    t = time.gmtime(now)
    # One %-format makes one string; an f-string makes one per field first (~15 KiB more).
    return _STAMP_FORMAT % (
        t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, now % 1 * 1000
    )


class _Slot:
    """A field Logger.prepare leaves open: its directive in text and in JSON."""

    def __init__(self, name: str, text: str, json: str, number: bool) -> None:
        self.name, self.text, self.json, self.number = name, text, json, number

    def __repr__(self) -> str:
        return self.name


# Logger.prepare: fields emit_prepared fills in. Each says what emit would write: text
# as it is, quoted when it is not plain; whole numbers; seconds (3 decimals in text,
# Python's repr in JSON, as json.dumps writes a float).
SLOT = _Slot("SLOT", "%s", "%s", False)
SLOT_INT = _Slot("SLOT_INT", "%d", "%d", True)
SLOT_SECONDS = _Slot("SLOT_SECONDS", "%.3f", "%r", True)
# Marks for Logger.prepare: link names and targets (validated host names, addresses and
# variable names) never contain "<".
_STAMP_MARK, _PID_MARK = "<stamp>", "<pid>"
# The pid is a number in JSON ("pid": 12), so its quoted mark goes first.
_DIRECTIVES = (('"<pid>"', "%d"), (_PID_MARK, "%d"), (_STAMP_MARK, _STAMP_FORMAT))
# What a peer address is made of ("[fe80::1%eth0]:80" included): never quoted, either format.
_PLAIN = "0123456789abcdefABCDEF.:[]%_-ghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ"


def _json_text(value: str) -> str:
    """A string as it appears between the quotes of a JSON string."""
    return json.dumps(value)[1:-1]


def _text_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as in JSON: one spelling for a shipper's rule
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    # Quoted (JSON's escapes) when it would not read back as one value, or (printable)
    # carries a character a terminal or a line-based reader acts on: tab, CR, ESC,
    # U+2028 ... (a path from the environment, written raw, could recolour or rewrite
    # the screen).
    if not text or any(c in text for c in ' "=\\'):
        return json.dumps(text)
    return printable(text)


# A folded event (README, "Log events"): its first failure is a line at once, then at most
# one line per ERROR_LOG_EVERY while failures go on, each with the count since the last.
ERROR_LOG_EVERY = 10.0


def fold(folds: dict[_K, list[float]], key: _K, failures: int = 1) -> int:
    """Count `failures` more of the folded event `key` (`folds` holds each key's [failures
    since its last line, when that line was written]); the count since its last line,
    this one included, when a line is due now (the first, or ERROR_LOG_EVERY after the
    last), else 0: the caller writes the line, with that count as `failures`."""
    now = time.monotonic()
    entry = folds.setdefault(key, [0, -ERROR_LOG_EVERY])
    entry[0] += failures
    if now - entry[1] < ERROR_LOG_EVERY:
        return 0
    count = int(entry[0])
    entry[:] = [0, now]
    return count


def crash_fields(exc: BaseException) -> dict[str, str]:
    """`error` and `detail` for an exception nobody expected (`relay-crashed`,
    `metrics-request-failed`). `error` is what a traceback's last line says,
    `Type: message` (an OSError's message its strerror, as in every other event's
    `error`), not a repr, whose quoting a shipper's rule would have to know apart.
    `detail` is where it was raised, which a bug report needs and a repr never said."""
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"  # as a traceback names it: socket.gaierror
    if isinstance(exc, OSError) and exc.strerror:
        message = exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename!r}"
    else:
        message = str(exc)
    fields = {"error": f"{name}: {message}" if message else name}
    tb = exc.__traceback__
    if tb is not None:
        while tb.tb_next is not None:
            tb = tb.tb_next
        code = tb.tb_frame.f_code
        where = code.co_filename.rsplit("/", 1)[-1]
        fields["detail"] = f"raised at {where}:{tb.tb_lineno} in {code.co_qualname}"
    return fields


def text_encoding() -> str:
    """The encoding of stderr, the locale's (or PYTHONIOENCODING's), UTF-8 without one."""
    return getattr(sys.stderr, "encoding", None) or "utf-8"


def write_start_error(message: str, fmt: str) -> None:
    """The one line of an error that keeps `serve` from starting (exit 2): plain text,
    or with `--log-format json` an `error` record whose event is `start-failed`.

    Written as the supervisor writes its lines (never_wait), given START_ERROR_SETTLE
    to go out, then dropped, as at the supervisor's exit: a blocking write to a log whose
    reader stopped (a full pipe nobody reads) held the exit for ever, and with it
    whatever waits for it (a restart policy, a script).

    The text line is in stderr's encoding (the locale's), as every other line a command
    says: in UTF-8 it named a path or host typed under a Latin-1 locale in mojibake
    (`nÃ¼` for `nü`), which could not be copied back. JSON stays UTF-8, as JSON is."""
    logger = Logger(ERROR, fmt)
    logger.never_wait(lambda fd: None)  # settle, below, waits for the room
    if fmt == "json":
        logger.error("start-failed", error=message)
    else:
        logger._put(f"forkproxy: error: {message}\n".encode(logger.encoding, "backslashreplace"),
                    os.getpid())
    logger.settle(START_ERROR_SETTLE)


def format_in(argv: list[str]) -> str:
    """`--log-format`'s value in `argv`, read by hand: for the metrics process's line
    that says its arguments or its imports failed, before argparse or anything else
    could read it."""
    for i, arg in enumerate(argv):
        if arg.startswith("--log-format="):
            return arg.partition("=")[2]
        if arg == "--log-format" and i + 1 < len(argv):
            return argv[i + 1]
    return "text"


def level_for(verbosity: int) -> int:
    """-q -> warnings only, default -> info (one line per connection open/close), -v -> debug."""
    return {-1: WARNING, 0: INFO}.get(verbosity, DEBUG if verbosity > 0 else ERROR)
