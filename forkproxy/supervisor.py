"""The supervisor: the only code that forks, waits for and kills the proxy's processes.

One thread, one `poll` loop: listeners, the signal pipe and the control socket are all
file descriptors in it, and every piece of work (accept+fork, reap, drain, reload,
status) happens there, dispatched from `handle_*` methods (gunicorn's arbiter habit).

This process forks once per connection, so it is kept lean: it imports nothing that
pulls in `threading` (logging, psutil, click, prometheus_client all do), because
CPython's at-fork hooks and the pages they touch make every fork dearer. A test holds
that line (tests/test_supervisor.py).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C module: see signals.py
import errno
import fcntl
import gc
import json
import os

# os.wait4 imports it to build its rusage result, at the first reap, which then opens the
# module's file. A first reap at EMFILE (a process that ended while every descriptor was
# in use) raised ImportError out of handle_chld, and the supervisor died with a traceback,
# its children orphaned. Imported here, before any child, with the ~5 mappings every child
# forked after the first reap had anyway; by name too, by a failed fork (_nproc_limit_now).
import resource
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping

from . import __version__, control, installed, listeners, relay, signals
from .accounting import (
    COUNTED,
    ENDED,
    FAILED_AT,
    FAILURE,
    FELL_BACK,
    LOOPED,
    Accounting,
    ChildRecord,
    describe_status,
    ended_text,
    failure_errno,
    failure_text,
    fallback_addresses,
    fallback_error,
    noted_address,
    read_clocks,
)
from .config import (
    MIN_RESOLVE_EVERY,
    RAISE_OPEN_FILES,
    UNLOGGED_FILE_OPTIONS,
    UNLOGGED_UNKNOWN,
    ConfigError,
    Endpoint,
    Link,
    LinkTable,
    Network,
    Sources,
    build_links,
    check_allow_families,
    check_metrics_port,
    children_that_fit,
    children_within_nproc,
    children_within_pids,
    join_host_port,
    limiting_fits,
    limits_named,
    limits_text,
    literal_targets,
    mebibytes,
    no_room_text,
    own_address_candidates,
    own_address_loop,
    own_memory,
    own_pids,
    parse_cidr,
    parse_metrics_address,
    peer_text,
    printable,
    quoted,
    unknown_lines,
    unreachable_links,
)
from .listeners import ACCEPT_BACKOFF, RESOURCE_ERRORS, Listener
from .log import DEBUG, ERROR_LOG_EVERY, LOG_SETTLE, WARNING, Logger, crash_fields, fold
from .process_name import REPORTER, RESOLVER, name_process
from .relay import Address, RawSocket

NETLINK_SOCK_DIAG = 4  # as sockdiag.py's: not imported, the supervisor stays lean
# As sockdiag.py's, not imported (the supervisor stays lean); not socket's, which a
# Python built on headers older than glibc 2.32 lacks.
IPPROTO_MPTCP = 262
TYPE_CHECKING = False  # not typing's: importing typing costs the supervisor heap (config.py)
if TYPE_CHECKING:
    from resource import struct_rusage

ACCEPT_BATCH = 64  # accepts per wakeup, so signals and reaping get their turn in a burst
# Seconds of forking after which a burst's batch ends early, for the same reason: at a
# memory limit each fork waits on the OOM killer (~0.2 s), and 64 of them kept children it
# killed unreaped for up to 10 s (counted live in status, holding --max-children slots,
# their child-died lines late with durations overstated by as much).
ACCEPT_PATIENCE = 0.25
# Seconds from the last TERM to KILL after --grace: 8 + 1 is inside docker stop's 10, but
# thousands of connections TERMed in batches (TERM_BATCH) take longer (README, Signals).
KILL_AFTER = 1.0
# Children TERMed per turn of the loop once the grace is over. Each TERM wakes a child that
# takes the CPU from the supervisor (its reset and exit, ~0.3 ms): TERMed all in one go,
# 10,000 of them kept the loop away for seconds, and `check`, `status`, the reaping and
# the close lines waited for the last one. Between two batches the loop serves them.
TERM_BATCH = 64
# A link writes its first DENY_LOG_BURST `denied` lines in each DENY_LOG_WINDOW seconds and
# one `denied-unlogged` line with the count of the rest: a scanner outside --allow must not
# flood the log, nor block the supervisor in write() once a slow log reader's pipe is full.
DENY_LOG_BURST = 10
DENY_LOG_WINDOW = 10.0
METRICS_RESTART = 5.0  # seconds before a metrics process that died is started again
# ... doubled at each death in a row of a process that lived less than METRICS_STEADY
# seconds, up to METRICS_BACKOFF_MAX: a process that cannot start (its interpreter or a
# module gone, a pids limit) must not log two lines every 5 s for days.
METRICS_STEADY = 60.0
METRICS_BACKOFF_MAX = 60.0
# Children answering `status` at once (as many as the control socket has clients); past
# that, say clients that never read their answers, the loop answers itself.
MAX_REPORTERS = control.MAX_CLIENTS
# Seconds an exit waits, all together, for its reporters to finish: SIGUSR1's table, the
# `status` replies being sent.
REPORTER_EXIT_WAIT = 1.0
METRICS_EXIT_WAIT = 2.0  # seconds the metrics process has to exit at a stop
# Seconds a supervisor that handed over waits, serving their status requests, for its
# metrics process to finish the scrapes under way (metrics.HANDOVER_FINISH, less) and exit.
METRICS_HANDOVER_WAIT = 12.0
METRICS_BACKLOG = 64
# Seconds serve --take-over waits for the supervisor taken over at each step: as a client
# of its control socket waits (status.REQUEST_DEADLINE).
TAKE_OVER_TIMEOUT = control.REPORT_TIMEOUT + 5.0
# Seconds the supervisor handing over waits for `go` once the sockets are sent; then it
# gives up (`take-over-abandoned`), tells the taker no, and is itself again (reloads, a
# new take-over). The taker's work in between is its own start (binding the rest, the
# control socket, the pid file): less than a second. As long as the taker waits for our
# answer to its `go` (TAKE_OVER_TIMEOUT): each side gives the other one step's time.
# One step late is told no, and exits; only one that got our yes (or no word at all, our
# stall) serves: never both, never neither.
HAND_OVER_DEADLINE = TAKE_OVER_TIMEOUT
KILLED_EXIT_WAIT = 1.0  # seconds a stop waits for a helper process it killed (frozen: left)
# Seconds between two scans of all the children for one that exited unannounced (not on
# the ended pipe: see handle_chld) whose SIGCHLD came folded into another child's.
SCAN_EVERY = 1.0
# The ended pipe's size: room for this many bytes of pids (relay.ENDED_PID_SIZE each) not read
# yet. A child that finds it full is reaped by a scan instead, as before it was.
ENDED_PIPE_SIZE = 1 << 20  # Linux's default pipe-max-size: more needs privilege
ENDED_PID_SIZE = relay.ENDED_PID_SIZE
ENDED_READ = 64 * ENDED_PID_SIZE  # bytes read from it at a time: 64 pids
RESOLVE_AGAIN_AFTER = MIN_RESOLVE_EVERY  # seconds: the least time between two lookups' starts
# Seconds a resolver child may spend on one name (from its start, or from the name before
# its result) before the supervisor kills it and logs that name's `resolve-failed`. glibc
# bounds a DNS query over UDP (timeout:5 attempts:2 per server), but not one over TCP (an
# answer too long for UDP, or a server that sets TC): a server that accepts and never
# answers held the resolver for ever, and every name's re-resolution with it (no line).
# Not shorter: a lookup that is slow but ends is legitimate, and in Kubernetes (ndots:5,
# 4-5 search domains tried before the name itself) with a dead first nameserver each try
# waits 5 s for it, 20-25 s a name, twice that with `single-request`. A lookup that takes
# longer than this nearly always ends in a failure anyway (every server silent).
RESOLVE_TIMEOUT = 60.0
# How early a SIGALRM may come for the time it was armed for and still count as that time
# (setitimer rounds to microseconds; the monotonic clock reads the same clock).
TIMER_SLACK = 0.005
# Seconds between two looks at the control socket's file (Supervisor.check_control), on
# the SIGALRM timer: a file removed (an operator's rm, or systemd-tmpfiles aging /tmp: its
# live-socket test reads /proc/net/unix, which names our staging name, not the file) is
# made again before a HEALTHCHECK's retries (3 x 30 s by default) turn the proxy unhealthy.
CONTROL_CHECK_EVERY = 60.0
# The least seconds between two checks of the listeners' dropped handshakes (check_drops)
# that a SIGALRM makes, an operator's "check now" or a child's (a connect fallback, a
# name that changed: on thousands of links, many a second). Each check reads every
# listener, ~2 us each (6.5-9.5 ms of CPU at 4,000). The timer's, every
# CONTROL_CHECK_EVERY, always checks; a link's line comes at most once per ERROR_LOG_EVERY
# anyway (folded).
DROPS_CHECK_AGAIN_AFTER = ERROR_LOG_EVERY
# Seconds after which that look sets the file's times to now (ControlServer.touch_if_older): aged
# by none of them, it is not removed in the first place.
CONTROL_TOUCH_AFTER = 3600.0
OOM_SCORE_ADJ = "/proc/self/oom_score_adj"
# What each connection's child writes there: the OOM killer's first choice, so that a
# memory limit reached costs a connection, not the supervisor and every listener with it.
CHILD_OOM_SCORE_ADJ = 1000
_CONNECT_FAILED_STATUS = relay.CONNECT_FAILED << 8  # a wait status: exited with that code
# A failed connect's slot holding an address (noted_address): a loop's, or the last tried.
_NOTED = LOOPED | FAILED_AT
POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
# A listener's accept queue (length, size), dropped handshakes, and whether it listens, as
# the kernel gave them: Listener.queue(), Listener.drops(), Listener.listening().
ListenerReading = tuple[tuple[int, int] | None, int | None, bool | None]


MAX_ENV_FILE = 1 << 20  # bytes (characters, as read): see read_env_file
# What every line saying forkproxy ran out of descriptors advises: EMFILE is this
# process's limit; ENFILE the kernel's file table, shared by the whole host, which no
# `ulimit -n` raises (out_of_files_advice).
RAISE_NOFILE = "(raise the limit, ulimit -n)"
FILE_TABLE_FULL = ("(the host's file table is full, not this process's limit: raise the "
                   "host's fs.file-max, or end what holds so many files)")


def out_of_files_advice(error: int | None) -> str:
    """What to do about an out-of-descriptors `error`: RAISE_NOFILE, or FILE_TABLE_FULL."""
    return FILE_TABLE_FULL if error == errno.ENFILE else RAISE_NOFILE
# The most a file already at --pid-file may hold to be taken over: a PID (7 digits at
# most) with room for whitespace around it. See Supervisor._write_pid_file.
MAX_PID_FILE = 32  # bytes


def read_links(sources: Sources, environ: Mapping[str, str],
               env_text: str | None = None) -> LinkTable:
    """Read every source the configuration names and parse; the I/O: the env file (unless
    its `env_text` was read already), the interfaces that targets' IPv6 zones name, and
    which IP-literal targets are this host's own (listeners.own_addresses)."""
    env_file = None
    if sources.env_file is not None:
        text = read_env_file(sources.env_file) if env_text is None else env_text
        env_file = (sources.env_file, text)
    table = build_links(sources.specs, environ if sources.from_env else None, env_file,
                        sources.bind, sources.aliases, sources.options.option_variables,
                        sources.options.flags_without_variable)
    check_metrics_port(sources.options.metrics, table.links)  # at start and at each reload
    check_allow_families(sources.options.allow, table.links)
    listeners.check_zones(table.links)
    # A target that is one of this host's own addresses, on a port a wildcard listener
    # takes (a container's own IP), loops as localhost does, unless the host hands it on
    # first (IPVS): asked of the kernel here, for the few literal targets that could
    # (none, or one per address, usually), and warned of (own_address_loop).
    loops = own_address_loop(table.links,
                             listeners.own_addresses(own_address_candidates(table.links)))
    # A literal target no address of this host's can send to (an IPv6 one where IPv6 is
    # disabled, as in many containers): every connect to it fails, which nothing said
    # until a client came. Warned of, never refused: the sysctl may be turned on later.
    unreachable = unreachable_links(table.links,
                                    listeners.unsendable(literal_targets(table.links)))
    return table.replace(loops=loops, unreachable=unreachable) if loops or unreachable else table


def absolute_path(path: str) -> str:
    """`path` made absolute against our working directory, as given where that cannot be
    read (removed): how a take-over tells the supervisor taken over read the same env file."""
    try:
        return os.path.abspath(path)
    except OSError:
        return path


def read_env_file(path: str, *, unlinked_refused: bool = False) -> str:
    """The text of --env-file; ConfigError naming it when it cannot be read, and with
    `unlinked_refused` (a reload) when it is a file no directory holds any more."""
    if not path:
        # As `--pid-file ''`: the flag given empty is bad input, said as such, not as
        # "cannot read env file '': No such file or directory". (An empty
        # FORKPROXY_ENV_FILE counts as unset and never reaches here.)
        raise ConfigError("--env-file '': an empty path")
    try:
        # O_NONBLOCK: a FIFO given by mistake must not hang start or reload (a pipe
        # could not be read again on reload anyway); regular files ignore the flag.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # newline="": no universal newlines, the parser decides where lines end
        with open(fd, encoding="utf-8", newline="") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"env file {path!r}: not a regular file")
            if unlinked_refused and info.st_nlink == 0:
                # A bind mount of the file itself shows the inode it was made with: after
                # an `mv` over it on the host (the advice for writing it whole), every
                # reload read the old text and "succeeded" with the old wiring. Unless the
                # path names another file now: replaced between the open and the fstat
                # (an `mv` at that instant, no mount), read that one.
                if os.stat(path).st_ino != info.st_ino:
                    return read_env_file(path)
                raise ConfigError(f"env file {path!r}: replaced or removed where it was "
                                  "mounted from, and this mount of the file itself still "
                                  "shows the old one: mount its directory instead")
            # Bounded: a file of link variables is a few KiB, and reading a huge one
            # whole could end the supervisor (MemoryError) on a reload that should
            # only have kept the running configuration.
            too_large = ConfigError(f"env file {path!r}: larger than {MAX_ENV_FILE >> 20} "
                                    "MiB, too large for link variables")
            if info.st_size > MAX_ENV_FILE:
                raise too_large
            text = handle.read(MAX_ENV_FILE + 1)  # it may have grown since
            if len(text) > MAX_ENV_FILE:
                raise too_large
            return text
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            # A reload at the limit (every connection's socket held): the file is fine,
            # the limit is what to raise, as every other out-of-descriptors line says.
            reason = f"{reason} {out_of_files_advice(exc.errno)}"
        raise ConfigError(f"cannot read env file {path!r}: {reason}") from None


def resolve_all(targets: list[tuple[str, int]], out_fd: int, delay: float) -> None:
    """The resolver child's work: wait `delay` seconds, then look the targets up one after
    the other, writing each one's result to `out_fd` as soon as it has it: a line of JSON,
    [host, port, addresses or null, error]. A line each, not one list at the end, so that
    the supervisor applies each name's addresses at once (a slow name after it no longer
    holds up another's move), and keeps those a lookup that hangs came after when it kills
    the resolver at RESOLVE_TIMEOUT."""
    time.sleep(delay)
    for host, port in targets:
        try:
            result = [host, port, relay.lookup(host, port), ""]
        except OSError as exc:  # not only socket.gaierror: see relay.lookup_error
            result = [host, port, None, relay.lookup_error(exc)]
        data = memoryview(json.dumps(result).encode() + b"\n")
        while data:
            data = data[os.write(out_fd, data):]


# Above every descriptor of ours: where children and helpers stop closing what they inherit.
FD_CEILING = 1 << 20
# closerange_is_whole(): the numbers tried; the CPU time within which they were one system
# call (microseconds), and from which a close() each (50 ns a number at the very least); in
# between, tried again up to CLOSERANGE_TRIES times.
CLOSERANGE_PROBE = 1 << 16
CLOSERANGE_WHOLE_WITHIN = 0.001
CLOSERANGE_LOOP_FROM = 0.003
CLOSERANGE_TRIES = 3


def ended_pipe() -> tuple[int, int]:
    """The ended pipe (see Supervisor.handle_chld), non-blocking: its read end and its
    write end, one descriptor for both where /proc lets the pipe be opened read-write.
    One: the supervisor and each child hold one more descriptor, not two, and a proxy
    started at `ulimit -n 9` serves as one at 8 did before."""
    read, write = os.pipe2(os.O_CLOEXEC)
    try:
        both = os.open(f"/proc/self/fd/{read}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # no /proc
        os.set_blocking(read, False)
        os.set_blocking(write, False)
    else:
        os.close(read)
        os.close(write)
        read = write = both
    try:
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, ENDED_PIPE_SIZE)
    except OSError:
        pass  # over the user's pipe limits: as made (64 KiB; 8 KiB past
        # pipe-user-pages-soft, which the splice pipes of ~64 connections reach), it will do
    return read, write


def closerange_is_whole() -> bool:
    """Whether os.closerange() closes a range in one system call, close_range(2), rather
    than with a close() for every number in it, as CPython does where close_range is
    missing (Linux before 5.9), refused (a seccomp profile that does not know it) or was
    not there to build Python with (glibc before 2.34). There each child's cleanup up to
    FD_CEILING was ~1M system calls, ~0.3 s of CPU per connection before its connect.

    Timed once, at start, over numbers no descriptor can have (from the open-files limit
    up): the one call takes microseconds of CPU, the loop milliseconds (30-100 ms here).
    CPU time, not the clock's: a busy machine that holds the supervisor off the CPU in
    the middle of the one call does not make it a loop. Should every try still fall
    between the marks, the children list their descriptors (close_inherited), which is
    right either way."""
    first = os.sysconf("SC_OPEN_MAX")
    for _ in range(CLOSERANGE_TRIES):
        began = time.thread_time()
        os.closerange(first, first + CLOSERANGE_PROBE)
        took = time.thread_time() - began
        if took < CLOSERANGE_WHOLE_WITHIN:
            return True
        if took >= CLOSERANGE_LOOP_FROM:
            return False
    return False


def close_inherited(*keep: int, whole: bool = True) -> None:
    """In a forked helper (resolver, reporter, the metrics process before its exec): close
    every descriptor but stdio and those in `keep`, above all the listeners: a helper must
    not keep a closed port open. (The relay child does the same inline: see
    Supervisor._accept_handler, which calls this only where `whole` is False.)

    `whole`: closerange_is_whole(). Where it is not, the descriptors /proc/self/fd lists
    are closed one by one instead of every number up to FD_CEILING."""
    if not whole:
        try:
            listed = [int(name) for name in os.listdir("/proc/self/fd")]
        except OSError:
            pass  # no /proc: every number, then (below)
        else:
            for fd in listed:
                if fd > 2 and fd not in keep:
                    try:
                        os.close(fd)
                    except OSError:
                        pass  # the listing's own descriptor, closed by now
            return
    start = 3
    for fd in sorted(set(keep)):
        if fd >= start:
            os.closerange(start, fd)
            start = fd + 1
    os.closerange(start, FD_CEILING)


def child_oom_score_adj() -> tuple[int, bytes | None]:
    """The supervisor's own oom_score_adj, and what each connection's child raises its own
    to: None when that changes nothing (already at the most, or no /proc to say it in).

    Why: the OOM killer of a memory-limited container takes the process using the most
    memory, and a child's resident size counts the pages it shares with the supervisor,
    so the supervisor is always the largest: killed first, every listener went with it.
    A child inherits the supervisor's value at fork; raising one's own needs no
    privilege, lowering below what a privileged process set (the runtime's) does.
    """
    try:
        with open(OOM_SCORE_ADJ, "rb") as handle:
            own = int(handle.read())
    except (OSError, ValueError):
        return 0, None
    return own, (str(CHILD_OOM_SCORE_ADJ).encode() if own < CHILD_OOM_SCORE_ADJ else None)


def is_allowed(allow: list[Network], host: str) -> bool:
    """Is a peer address inside one of the --allow networks? (integers, no ipaddress)

    An IPv4 client on a dual-stack listener (`::ffff:a.b.c.d`) is inside an IPv4 network
    that holds a.b.c.d, and inside an IPv6 network that holds the mapped address: `::/0`
    lets it in, as socat's range= and HAProxy's src do (prefixes of /96 and longer under
    ::ffff:0:0/96 are IPv4 networks already, config.parse_cidr)."""
    if ":" in host:
        number = int.from_bytes(socket.inet_pton(socket.AF_INET6, host.split("%")[0]))
        if any(n.version == 6 and number & n.mask == n.address for n in allow):
            return True
        if number >> 32 != 0xFFFF:
            return False
        number &= 0xFFFFFFFF
    else:
        number = int.from_bytes(socket.inet_aton(host))
    return any(n.version == 4 and number & n.mask == n.address for n in allow)


class DenialWindow:
    """One link's `denied` lines since its window began: how many were written, and how
    many were not (with the last such client) for the `denied-unlogged` line at its end."""

    __slots__ = ("ends", "last_client", "lines", "unlogged")

    def __init__(self, ends: float) -> None:
        self.ends = ends
        self.lines = 0
        self.unlogged = 0
        self.last_client: tuple[object, ...] = ()


def _may_be_waiting(listener: Listener) -> bool:
    """Whether a client may be in the listener's backlog: yes when poll cannot say (ENOMEM)."""
    try:
        return bool(listener.waiting(0))
    except OSError:
        return True


def _listener_ends(listener: Listener) -> tuple[str, str]:
    """A listener's `listen` (its address alone) and `upstream` (its target): one place,
    so that status's listener table and SIGUSR1's status-link lines name them alike."""
    return join_host_port(listener.link.bind, listener.port), str(listener.link.target)


def _owner(path: str) -> int | None:
    """The uid owning the regular file at `path` (not followed if a link), else None."""
    try:
        found = os.lstat(path)
    except OSError:
        return None
    return found.st_uid if stat.S_ISREG(found.st_mode) else None


def _reaped_within(pid: int, seconds: float) -> bool:
    """Wait up to `seconds` for child `pid` to exit, reaping it: True once it has (or was
    reaped already), False if it still runs."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:
            return True  # reaped already
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


# tcp_tw_reuse=1 first: measured (docs/wire.md, TIME_WAIT) to let every connect through
# toward a remote upstream, where the default 2 reuses TIME_WAIT ports on loopback only.
# Said only where it would help: _out_of_ports reads this namespace's sysctls.
_WIDEN = "widen net.ipv4.ip_local_port_range or spread over more upstream addresses"
_OUT_OF_PORTS = ("out of local ports toward the upstream: each connection holds one, and "
                 "for 60 s after a close the proxy began (TIME_WAIT); set "
                 f"net.ipv4.tcp_tw_reuse=1 (a TIME_WAIT port reused after 1 s), {_WIDEN}")


def _packed_address(host: str | None) -> tuple[bytes, bool]:
    """`host` (an address, perhaps bracketed with a port, as peer_text writes one, or
    with a zone) as inet_pton packs it, b"" for none; and whether it has a zone."""
    text = host or ""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # an IPv4 address with its port
    text, _, zone = text.partition("%")
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(family, text), bool(zone)
        except OSError:
            continue
    return b"", bool(zone)


def _is_loopback(host: str | None) -> bool:
    """Whether `host` (as _packed_address takes it) is a loopback address: 127/8, ::1 or
    ::ffff:127/104, as tcp_tw_reuse=2 tells them."""
    packed = _packed_address(host)[0]
    if packed[:12] == bytes(10) + b"\xff\xff":
        packed = packed[12:]  # an IPv4-mapped address
    return packed[:1] == b"\x7f" if len(packed) == 4 else packed == bytes(15) + b"\x01"


def _out_of_ports(host: str | None) -> str:
    """connect-failed's detail for EADDRNOTAVAIL out of local ports toward `host`, by this
    network namespace's sysctls, read when the line is written: the range in force and
    its size, and tcp_tw_reuse=1 advised only where it would free a port. The fixed advice
    told operators to set tcp_tw_reuse=1 where it was 1 already (or 2, toward a loopback
    upstream: reused already), where the ports were live connections', and where
    tcp_timestamps=0 makes any tcp_tw_reuse reuse nothing (measured: 1 port, 4 clients a
    second apart, 4 served at reuse 1 and 2 toward 127.0.0.1, 1 with timestamps off)."""
    reuse = listeners.sysctl("net/ipv4/tcp_tw_reuse")
    if reuse is None:
        return _OUT_OF_PORTS  # /proc/sys hidden: the advice for every host, as before
    span = listeners.port_range()
    here = "" if span is None else (
        f": {span[0]}-{span[1]} here, {span[1] - span[0] + 1} "
        f"port{'s' if span[1] > span[0] else ''}")
    head = (f"out of local ports toward the upstream: each connection holds one "
            f"(net.ipv4.ip_local_port_range{here}), live or for 60 s after a close the "
            f"proxy began (TIME_WAIT); ")
    if listeners.sysctl("net/ipv4/tcp_timestamps") == 0:
        return head + (f"net.ipv4.tcp_timestamps=0 here, without which no tcp_tw_reuse "
                       f"reuses a TIME_WAIT port: set tcp_timestamps=1 and "
                       f"tcp_tw_reuse=1, {_WIDEN}")
    if reuse == 1 or (reuse == 2 and _is_loopback(host)):
        delay = listeners.sysctl("net/ipv4/tcp_tw_reuse_delay")  # ms, Linux 6.13+
        after = "1 s" if delay is None else f"{delay / 1000:g} s"
        return head + (f"net.ipv4.tcp_tw_reuse={reuse} here reuses a TIME_WAIT port after "
                       f"{after} already, so live connections (or ones closed since) hold "
                       f"them: {_WIDEN}")
    loopback_only = " (2 here reuses them toward loopback only)" if reuse == 2 else ""
    return head + (f"set net.ipv4.tcp_tw_reuse=1 (a TIME_WAIT port reused after 1 s)"
                   f"{loopback_only}, {_WIDEN}")
# The `detail` of a connect-failed line whose EADDRNOTAVAIL was no source address (an
# IPv4 upstream, an IPv6 one), not the local ports' (listeners.no_source_address).
_NO_SOURCE_ADDRESS = (
    "no address of this host's can send to the upstream: no interface holds an IPv4 "
    "address that routes there (`ip -4 addr`; a loopback with no 127.0.0.1)",
    "no address of this host's can send to the upstream: IPv6 is disabled here "
    "(net.ipv6.conf.all.disable_ipv6=1, as in many containers, or ::1 gone from lo) or no "
    "interface holds an IPv6 address that routes there; give the upstream's IPv4 address "
    "(127.0.0.1 for ::1) or a name that has one",
)
# A loopback upstream's connect-failed where lo is down: no route (lo never up) or a
# timeout (it was up: its local routes stay, its packets are dropped).
_LOOPBACK_DOWN_ERRORS = frozenset({errno.ENETUNREACH, errno.ETIMEDOUT, errno.EHOSTUNREACH})
_LOOPBACK_DOWN = ("the loopback interface is down in this network namespace: `ip link set "
                  "lo up` (a namespace made with `ip netns add` or `unshare -n` starts with "
                  "it down)")
# The `detail` of a connect-failed line, by the connect's errno, where its error alone
# misleads. A route (or rule) of type blackhole or prohibit fails connect() on this host
# before any packet leaves, with EINVAL and EACCES (`ip route get` fails alike, naming
# nothing): `Invalid argument` and `Permission denied` sent operators after a bug or
# file permissions. Network plugins install such routes (Calico: a blackhole route for
# each block of pod addresses it hands out, so a pod's address no pod holds now fails so).
_CONNECT_FAILED_DETAIL = {
    errno.EINVAL: "no route: a blackhole route on this host covers the upstream's address "
                  "(`ip route show table all match ADDRESS` lists it; or an `ip rule`), as "
                  "a network plugin's for addresses no container holds any more",
    errno.EACCES: "refused on this host, no packet sent: a prohibit route covers the "
                  "upstream's address (`ip route show table all match ADDRESS` lists it; "
                  "or an `ip rule`), or a security module (Landlock, SELinux, AppArmor) "
                  "refuses the connect",
}


_LINK_LOCAL_NO_ZONE = (
    "a link-local IPv6 address without its interface: connect() cannot tell which link "
    "to send on (no route, no packet sent); the name's record (a hosts file, an AAAA "
    "record) gives fe80:: addresses no zone: give the upstream's address with its zone "
    "(`[fe80::1%eth0]`), or a name with a routable address")


def _error_detail(kind: int, host: str | None) -> str | None:
    """The `detail` of a connect (connect-failed) or an address (connect-fallback) that
    failed with errno `kind` toward `host` (an address as text, perhaps bracketed with a
    port, as peer_text writes one), by _CONNECT_FAILED_DETAIL (out of local ports:
    _out_of_ports); None for an error that says enough. EINVAL: a link-local IPv6
    address with no zone (a name's, which has none) fails so as a blackhole route does."""
    if kind == errno.EADDRNOTAVAIL:
        return _out_of_ports(host)
    if kind != errno.EINVAL:
        return _CONNECT_FAILED_DETAIL.get(kind)
    packed, zoned = _packed_address(host)
    if not zoned and len(packed) == 16 and packed[0] == 0xFE and packed[1] & 0xC0 == 0x80:
        return _LINK_LOCAL_NO_ZONE  # fe80::/10
    return _CONNECT_FAILED_DETAIL[errno.EINVAL]


def _syn_queue(queue: tuple[int, int] | None) -> str:
    """listen-drops' words for a SYN queue full without syncookies: what bounds it, and
    what to raise. The kernel drops a handshake once the queue holds the listener's
    backlog (net.core.somaxconn caps it), and one from a client it has not seen before
    once the queue holds 3/4 of net.ipv4.tcp_max_syn_backlog (tcp_conn_request), which
    may be the smaller: somaxconn is no help once the backlog is listeners.BACKLOG."""
    backlog = None if queue is None else queue[1]
    syn_backlog = listeners.sysctl("net/ipv4/tcp_max_syn_backlog")
    here = "" if backlog is None else f" ({backlog} here, net.core.somaxconn at most)"
    syn_here = "" if syn_backlog is None else f" ({syn_backlog} here)"
    raise_ = [name for name, low in (
        ("somaxconn", backlog is None or backlog < listeners.BACKLOG),
        ("tcp_max_syn_backlog",
         syn_backlog is None or syn_backlog * 3 // 4 < (backlog or listeners.BACKLOG)))
        if low]
    return (f"which holds no more handshakes under way than the listener's backlog{here}, "
            f"nor, from clients it has not seen before, more than 3/4 of "
            f"net.ipv4.tcp_max_syn_backlog{syn_here}: set tcp_syncookies=1 (the kernel's "
            f"default)" + (f", or raise {' or '.join(raise_)}" if raise_ else "")
            + (" (a listener takes a raised somaxconn up at a reload)"
               if "somaxconn" in raise_ else ""))


def _raise_somaxconn(queue: tuple[int, int] | None) -> str:
    """listen-drops' advice for an accept queue below listeners.BACKLOG: the kernel caps
    the backlog at listen() only, so a somaxconn raised since (`docker exec ... sysctl`,
    a pod's sysctl changed) counts at a reload, not before; one raised already was
    advised again, and raising it changed nothing until a restart."""
    somaxconn = listeners.sysctl("net/core/somaxconn")
    if queue is not None and somaxconn is not None and somaxconn > queue[1]:
        return (f"net.core.somaxconn is {somaxconn} now, raised since this listener "
                f"listened: reload (SIGHUP) to take it up")
    return "raise that, then reload (SIGHUP): a listener takes it up at a reload"


class TakeOverCancelled(Exception):
    """serve --take-over asked to stop (the signal's name) before the supervisor taken
    over stopped: the take-over does not happen, and that one serves on. `told`: after
    our `go` was sent, its answer not read yet."""

    told = False


def descriptor_limit(exc: OSError) -> str:
    """The limit an accept() out of descriptors met, for its line's detail: the open files
    limit read when the line is written (a `prlimit --nofile` on the running proxy, not
    the start's), whose number the operator needs to raise it; "" for other errors."""
    if exc.errno == errno.EMFILE:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = "none" if soft == resource.RLIM_INFINITY else str(soft)
        return (f"the process's open files limit of {limit} is reached (RLIMIT_NOFILE: "
                f"{RAISE_OPEN_FILES})")
    if exc.errno == errno.ENFILE:
        return "the host's file table is full (fs.file-max, which no ulimit -n raises)"
    return ""


class Supervisor:
    def __init__(self, sources: Sources, environ: Mapping[str, str], log: Logger) -> None:
        self.sources = sources
        self.options = sources.options
        self.environ = environ
        self.log = log
        self.allow = [parse_cidr(cidr) for cidr in self.options.allow]
        self.accounting = Accounting(self.options.max_children, relay.OUTCOMES)
        self.poller = select.poll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.listeners: list[Listener] = []
        self.addresses: dict[tuple[str, int, tuple[str, ...]], list[Address]] = {}
        # The listeners in force by port, with their links' addresses: what a child whose
        # target's port is one of theirs judges loops by (_map_own_listeners).
        self.own_listeners: relay.OwnListeners = {}
        self.accepting = False
        # The listener whose client took the last free slot under --max-children: when
        # slots free up, the listeners after it are served first (update_accepting).
        self.took_last_slot: Listener | None = None
        self.resume_at: float | None = None  # accept backoff after a resource error
        # The supervisor's own folded events (accept-failed, fork-failed, every
        # _log_repeating event, max-children-reached, listener-shut per link,
        # take-over-refused): [failures since the last line, when it was logged]
        self.pause_logs: dict[str, list[float]] = {}
        # connect-failed, connect-fallback: the same, per (event, link name, its target,
        # kind of failure) (_fold_link). The target too: a reload that points a link
        # elsewhere keeps its name (an ambassador's retarget), and the new upstream's first
        # failure must not fall in the old one's window. reload() drops the pairs no
        # longer configured.
        self.link_folds: dict[tuple[str, str, Endpoint, int], list[float]] = {}
        # A connect-failed window's last failure folded without a line: (link, client,
        # FAILURE word, noted address, unsendable), what the line that says the window's
        # count names when the window is dropped (a reload, the exit) before a failure
        # after it wrote one (_log_folded_failures). On the failed connect's reap only.
        self.link_fold_last: dict[tuple[str, str, Endpoint, int],
                                  tuple[Link, tuple[object, ...], int, str | None, bool]] = {}
        # The same for connect-fallback: the last folded fallback's line, but its count
        # (its addresses are read from the slot, which the reap frees).
        self.fallback_fold_last: dict[tuple[str, str, Endpoint, int], dict[str, object]] = {}
        # (Link name, target) -> [when its next connect-fallback line is due]: handed to
        # its children (in relay.serve's `lines`), which tell the supervisor of a fallback
        # only from then.
        self.fallback_due: dict[tuple[str, Endpoint], list[float]] = {}
        self.denials: dict[str, DenialWindow] = {}  # link name -> its denied lines' window
        self.denials_at: float | None = None  # the first window with lines left unlogged ends
        self.control_at: float | None = None  # the control socket's accept backoff (EMFILE)
        self.stopping = False
        # Clients accepted, waiting for a child: those past --max-children in the backlog
        # of a listener about to close (a stop, a reload that removes it: _take_backlog),
        # and a failed fork's (_fork_failed).
        self.held: list[listeners.HeldBacklog] = []
        self.term_at: float | None = None  # grace period ends: TERM the children
        # Empty, then [True] from the stop's start on, when SIGTERM is blocked in the
        # supervisor for good (handle_stop says why): each child forked since finds it
        # so, as its fork left SIGTERM blocked in it too, and unblocks it
        # (_accept_handler's child branch). A list, read at each fork: whichever accept
        # handler forks, built before the stop or after, reads the mask as it is. Tested
        # for truth, not indexed: in the child's cold code, ~100 instructions fewer.
        self.term_blocked: list[bool] = []
        # Once it has ended: the children still to TERM, a batch per turn of the loop
        # (TERM_BATCH), first forked first; None before.
        self.to_term: list[int] | None = None
        self.kill_at: float | None = None  # TERM ignored: KILL them
        # Children the stop itself sent SIGKILL (past --grace + KILL_AFTER): their death by
        # it is ours, not the OOM killer's, and their close line must not suggest it.
        self.killed: set[int] = set()
        # The ended pipe (read end, write end): each relay child writes its pid to it as
        # its last act (see the accept loop, relay._reset_and_die), and handle_chld reaps
        # those pids one by one. `ended`: pids read from it and not reaped yet (still
        # exiting); `scan_at`: when handle_chld scans all the children next (SCAN_EVERY).
        self.ended_r = self.ended_w = -1
        self.ended: set[int] = set()
        self.ended_buffer = [bytearray(ENDED_READ)]
        self.ended_pids = memoryview(self.ended_buffer[0]).cast("I")  # relay.ENDED_PID_ORDER's
        self.scan_at: float | None = None
        self.control: control.ControlServer | None = None
        self.metrics_sock: socket.socket | None = None
        self.metrics_pid = 0
        self.metrics_at: float | None = None  # when to (re)start the metrics process
        # Our end of the running metrics process's socketpair, over which it hands us a
        # connection per scrape (handle_metrics_handoff); None without one.
        self.metrics_handoff: socket.socket | None = None
        # For status and check: the endpoint's URL, when the process last started or went
        # down (monotonic, None before the first start: replies give its age, and the wall
        # clock's time for it as read then), how often it died and was started again, and
        # how it last ended.
        self.metrics_url = ""
        self.metrics_since: float | None = None
        self.metrics_restarts = 0
        self.metrics_exit = ""
        # Its deaths in a row (each but the first of a process that lived less than
        # METRICS_STEADY), which set the delay before the next start; when the first of
        # them came (monotonic: `restarting for` counts from it, not from the last); and
        # when the process last started (monotonic).
        self.metrics_deaths = 0
        self.metrics_down_since = 0.0
        self.metrics_started = 0.0
        # forkproxy's files as they were at start (installed.snapshot), None when they
        # could not be read: each metrics process is started from them, checked unchanged.
        self.metrics_files: dict[str, int] | None = None
        self.resolving = False  # a resolver child's results are on their way
        self.resolver_pids: list[int] = []  # resolver children not reaped yet
        # The running resolver (while `resolving`): its pid, its pipe, the targets it was
        # given in order, how many it has answered, and when it answered the last (or was
        # due to start), from which its deadline runs (_resolver_deadline).
        self.resolver_pid = 0
        self.resolver_fd = -1
        self.resolver_targets: list[tuple[str, int]] = []
        self.resolver_done = 0
        self.resolver_progress = 0.0
        # Each target's last lookup time in seconds (RESOLVE_TIMEOUT: timed out): the
        # next resolver looks the slowest up last, so that they hold up no other name.
        self.resolve_took: dict[tuple[str, int], float] = {}
        self.resolve_tick_at: float | None = None  # the --resolve-every timer's next tick
        self.control_check_at: float | None = None  # check_control's next, on the same timer
        self.drops_checked_at: float | None = None  # check_drops's last (monotonic)
        # (TcpExtListenDrops, TcpExtListenOverflows) at the last check (check_drops): from
        # before any listener, so that the first check sees the drops of this run's.
        self.kernel_drops_checked = listeners.kernel_listen_counts()
        # listen-drops: [drops since the last line, when it was logged] per listener's
        # address (its link's key: a reload that keeps the socket keeps its window).
        self.drop_folds: dict[tuple[str, int, tuple[str, ...]], list[float]] = {}
        # The listeners (by the same key) whose drops folded since their last line include
        # some counted while an accept queue overflowed: their next line says so.
        self.drops_overflowed: set[tuple[str, int, tuple[str, ...]]] = set()
        self.reporter_pids: list[int] = []  # children answering `status`, not reaped yet
        self.table_writer = 0  # the reporter writing SIGUSR1's table, while it runs
        self.table_pending = False  # a SIGUSR1 came meanwhile: another table when it ends
        self.resolver_output = b""  # the start of a result line not read whole yet
        self.resolver_due = 0.0  # when the last resolver was to look up (monotonic)
        self.resolve_pending = False  # asked again while one ran: start another after it
        self.resolve_failing: set[str] = set()  # links whose last lookup failed (log once)
        # The monotonic clock's: start (`exited`'s uptime, status's `uptime` and `started`),
        # and the first stop signal (handle_stop).
        self.began = time.monotonic()
        self.stop_began: float | None = None
        # The start as the wall clock read it then, kept: forkproxy_start_time_seconds,
        # which a restart changes and nothing else (status's `started` is derived at each
        # reply, the start as the wall clock reads now).
        self.start_time = time.time()
        # The last reload's outcome, for status, check and the metrics (a SIGHUP's was in
        # the log only): (when, monotonic; whether it applied; its error), None before
        # any, and when as the wall clock read then. When the running configuration was
        # read, as the wall clock read then: at start, then at each reload that applied.
        # Kept as read, not derived from the monotonic time at each reply: that moved by
        # a hair at each scrape, and `changes()` of the metric counted a reload a scrape.
        # And how many reloads each way.
        self.last_reload: tuple[float, bool, str] | None = None
        self.last_reload_at = 0.0
        self.config_loaded = self.start_time
        self.reloads = {"success": 0, "failure": 0}
        # The control clients whose `reload` waits for the next one (handle_control_request),
        # and whether any does: a bool for handle_signals to test, which runs at each reap,
        # between forks (the reference counts of True and False are written anyway; a
        # list's would be another page copied after a fork).
        self.reload_waiting: list[socket.socket] = []
        self.reload_asked = False
        self.pid = os.getpid()  # also what a reporter child reports
        # Did we write --pid-file? Only then is it ours to remove at exit (and a path we
        # refused, a FIFO, is never opened again).
        self.pid_file_written: tuple[int, int] | None = None  # its (st_dev, st_ino)
        # (event, variable or "", detail) of the link-table warnings last logged: see
        # _log_table_warnings
        self.table_warnings: set[tuple[str, str, str]] = set()
        # Whether --env-file was blank when last read (or is not given): a reload refuses
        # to find it empty when it was not (reload).
        self.env_file_blank = True
        self.oom_score_adj, self.child_oom_score_adj = child_oom_score_adj()
        self.closerange_whole = closerange_is_whole()
        # serve --take-over, the taking end: the connection to the supervisor taken over,
        # until it confirmed; the sockets it handed (ours to close, never to shut down,
        # until then), and what it said each one was.
        self.taken_from: socket.socket | None = None
        self.handed: list[socket.socket] = []
        self.handed_names: list[dict[str, object]] = []
        self.handed_by = ""  # that supervisor, named for an error (listeners.moved_port)
        # The connection to one that did not answer our `go` (take-over-unconfirmed), held
        # until we exit: it tells a taker there from one gone (_taker_done).
        self.unconfirmed_by: socket.socket | None = None
        # Listeners shut down from outside that could not listen again (_listener_shut):
        # not served, so `check` fails. Empty but for that.
        self.not_listening: set[Listener] = set()
        # The handing end: the connection of the supervisor taking over, until its `go`
        # (handle_taker); and whether we handed our listeners over and are stopping.
        self.taker: socket.socket | None = None
        self.taker_said = b""
        self.taker_deadline: float | None = None  # for its `go`: HAND_OVER_DEADLINE
        # Told yes after its `go`: until it closes (it read the yes) or is gone (it did
        # not: ECONNRESET), we serve on (_taker_closed).
        self.taker_told = False
        # One that was told no at that deadline, until it goes away: then the socket file
        # and pid file it may have replaced are made again (_own_again).
        self.late_taker: socket.socket | None = None
        self.handed_over = False

    # -- start and stop -------------------------------------------------------------

    def start(self) -> list[str]:
        """Bind everything or nothing; returns the `listening ...` lines. ConfigError on failure."""
        env_text = self._read_env_text()
        table = read_links(self.sources, self.environ, env_text)
        self.env_file_blank = not env_text.strip()
        self._log_table_warnings(table)
        handed = self._take_over() if self.options.take_over is not None else {}
        handed_addresses = self._handed_addresses()
        self.listeners = listeners.bind_all(table.links, handed, self.handed_by,
                                            self._handed_kernel_ports())
        try:
            self._listen_options(self.listeners)
            self.metrics_sock = self._bind_metrics()
            if self.metrics_sock is not None:
                self.metrics_url = self._metrics_url(self.metrics_sock)
                # Read now, as close to the imports as it gets: the code this process runs.
                try:
                    self.metrics_files = installed.snapshot()
                except OSError:
                    pass  # unreadable already (not a plain directory?): nothing to compare
            if self.taken_from is not None:
                # A stop asked since the sockets came cancels before our socket file and
                # pid file replace the old supervisor's: else a `check` found neither for
                # a moment (ours made, then removed as we went) until it made them again.
                self._cancel_if_stop_asked()
            self.control = self._open_control()
            self._write_pid_file()
            if self.taken_from is not None:
                self._confirm_take_over()
        except ConfigError:
            self._close_listeners()
            if self.metrics_sock is not None:
                self.metrics_sock.close()
            if self.control is not None:
                self.control.close()
            raise
        self.ended_r, self.ended_w = ended_pipe()
        relay.set_ended_pipe(self.ended_w)
        self.signals = signals.SignalPipe()
        # Children that exited before SIGCHLD had a handler (as PID 1, whatever the shell
        # that exec'd us had started; the default disposition drops their signal) are
        # zombies no signal will come for: reaped at the loop's first turn, as if one had.
        signal.raise_signal(signal.SIGCHLD)
        self._watch(self.signals.fileno(), self.handle_signals)
        self._watch(self.control.fileno(), self.handle_control_accept)
        self.control_check_at = time.monotonic() + CONTROL_CHECK_EVERY
        for listener in self.listeners:
            # A name is looked up by a resolver child (below), as on reload: a DNS server
            # that does not answer must hold up neither `listening` nor the loop. Until it
            # answers, a client's child looks the name up itself, or, after a take-over,
            # uses the addresses the supervisor taken over had for the same target (a
            # reload keeps them so). An address is parsed.
            link = listener.link
            self.addresses[link.key] = (
                handed_addresses.get((link.target.host.lower(), link.target.port), [])
                if link.target.is_name else self._resolve(link))
            self._prepare_relay(listener)
            self.accounting.stats(link)  # exported at 0 before the first client
        self._map_own_listeners(self.listeners)
        self._arm_resolve_timer(restart=True)
        self.start_resolver()
        self.update_accepting()
        lines = [f"listening {listener.describe()}" for listener in self.listeners]
        if self.metrics_sock is not None:
            self.metrics_at = time.monotonic()
            lines.append(f"metrics {self.metrics_url}")
        return lines

    def _metrics_url(self, sock: socket.socket) -> str:
        host, port = sock.getsockname()[:2]
        asked = self.options.metrics or ""
        if "%" in asked:
            # getsockname() drops the zone, without which the URL reaches nothing:
            # keep it, written as a URL writes it (RFC 6874: '%25').
            host = parse_metrics_address(asked)[0].replace("%", "%25")
        return f"http://{join_host_port(host, port)}/metrics"

    def _take_over(self) -> dict[listeners.BoundAddress, socket.socket]:
        """serve --take-over: the listening sockets of the supervisor on that control socket,
        handed over (it serves on until _confirm_take_over), by bound address; ConfigError
        when there is nothing to take over, or it cannot hand over."""
        path = self.options.take_over
        assert path is not None
        what = f"--take-over: the supervisor on {quoted(path)}"
        try:
            control.check_client_path(path)
        except OSError as exc:
            # No supervisor can ever be there, as status, check, reload and a plain serve
            # say it (exit 2): connect() to a file that is not a socket is refused, and
            # "no supervisor answers (Connection refused)" read as one that had died.
            given = "--status-socket" if path == self.options.status_socket else "--take-over"
            raise ConfigError(f"{given} {quoted(path)}: {exc.strerror or exc}") from None
        try:
            # A stop asked while it waits (the supervisor there frozen) cancels at once,
            # not when the wait is over: nothing is handed yet.
            self.taken_from, reply, self.handed = control.ask_for_sockets(
                path, TAKE_OVER_TIMEOUT, os.getpid(), self._cancel_if_stop_asked)
        except control.UnixSocketRefused as exc:
            raise ConfigError(f"--take-over: cannot ask the supervisor on {quoted(path)}: "
                              f"{exc.strerror}") from None
        except TimeoutError as exc:
            # Connected (or queued in its full backlog): something holds the socket and
            # did not answer in time. "No supervisor answers" read as none there, and a
            # plain start beside it then failed on its ports in use.
            slow = ("answered too slowly: its answer was not whole" if isinstance(
                exc, control.AnsweredInPart) else "is there but did not answer")
            raise ConfigError(
                f"{what} {slow} within {TAKE_OVER_TIMEOUT:g}s (stalled or too loaded: "
                "stopped, swapping, short of CPU): nothing taken, it serves on; try again "
                "once its load is lower (the wait is fixed), or stop it and start without "
                "--take-over") from None
        except OSError as exc:
            raise ConfigError(f"--take-over: nothing to take over: no supervisor answers on "
                              f"{quoted(path)} ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise ConfigError(f"--take-over: {quoted(path)} did not answer as a forkproxy "
                              f"supervisor does ({exc})") from None
        if not reply.get("ok"):
            self._close_listeners()
            error = str(reply.get("error"))
            if error == "stopping":
                raise ConfigError(f"{what} is stopping already: its listeners are closed, "
                                  "nothing to take over")
            if error.startswith("unknown command"):
                raise ConfigError(f"{what} does not know how to hand over (a forkproxy older "
                                  "than this one): stop it, then start without --take-over")
            # Escaped (as `status` shows a reply's strings): whatever answers on the path
            # could write a line break (a line of its own, forged) or ESC to the terminal.
            raise ConfigError(f"{what} cannot hand over: {printable(error)}")
        theirs = reply.get("env_file")
        if (self.env_file_blank and self.sources.env_file is not None
                and isinstance(theirs, dict) and theirs.get("blank") is False
                and theirs.get("path") == absolute_path(self.sources.env_file)):
            # The file caught empty as it is written (`cp`, `>`, an editor that moves the
            # old one aside first), as a reload refuses it: beside --from-env or SPECs an
            # empty file is a valid configuration without its links, whose ports we would
            # close (`unlisten`) as the supervisor there stops. Nothing is bound yet, and
            # without our `go` that one serves on. A forkproxy that does not say: as before.
            self._close_listeners()
            self.taken_from.close()
            self.taken_from = None
            raise ConfigError(
                f"--take-over: env file {self.sources.env_file!r} is empty, and was not for "
                f"the supervisor taken over, which serves on (a file being written? write "
                "it again, beside, and mv it over; to take no link from it, leave a comment "
                "line in it)")
        names = reply.get("sockets")
        assert isinstance(names, list)  # as ask_for_sockets found it
        self.handed_names = [name if isinstance(name, dict) else {} for name in names]
        self.log.info("taking-over", from_pid=reply.get("pid"), version=reply.get("version"),
                      sockets=len(self.handed))
        self.handed_by = f"the supervisor taken over (pid {printable(str(reply.get('pid')))})"
        return {address: sock for sock, name in zip(self.handed, self.handed_names, strict=True)
                if "metrics" not in name
                and (address := listeners.bound_address(sock)) is not None}

    def _handed_addresses(self) -> dict[tuple[str, int], list[Address]]:
        """The addresses the supervisor taken over had for each target, by (host in lower
        case, port): where this one's own lookup fails (a DNS outage), every client failed
        once that one stopped accepting, where it served and a reload keeps them. Only
        from a supervisor of our own user or root (SO_PEERCRED): they say where clients
        go. None from a forkproxy that does not send them."""
        found: dict[tuple[str, int], list[Address]] = {}
        if self.taken_from is None or control.peer_uid(self.taken_from) not in (
                0, os.geteuid()):
            return found
        for name in self.handed_names:
            target, addresses = name.get("target"), name.get("addresses")
            if not (isinstance(target, list) and len(target) == 2
                    and isinstance(target[0], str) and isinstance(target[1], int)
                    and isinstance(addresses, list)):
                continue
            found[(target[0].lower(), target[1])] = [
                (item[0], tuple(item[1])) for item in addresses
                if isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                and isinstance(item[1], list) and len(item[1]) in (2, 4)
                and isinstance(item[1][0], str)
                and all(isinstance(part, int) for part in item[1][1:])]
        return found

    def _handed_kernel_ports(self) -> dict[str, listeners.BoundAddress]:
        """Where the supervisor taken over listens for its links of port 0, by link name
        (listeners.bind_all keeps those ports); none from a forkproxy that does not say."""
        return {str(name["link"]): address
                for sock, name in zip(self.handed, self.handed_names, strict=True)
                if name.get("asked") == 0 and isinstance(name.get("link"), str)
                and (address := listeners.bound_address(sock)) is not None}

    def _confirm_take_over(self) -> None:
        """Everything else is bound: tell the supervisor taken over to stop accepting (its
        backlogs are ours now), then close what it handed that we have no use for.
        TakeOverCancelled for a stop asked meanwhile (before its answer is read)."""
        assert self.taken_from is not None
        path = self.options.take_over
        # Our stop signals wait, blocked, until the loop runs (console.STARTUP_BLOCKED):
        # one asked now was heard after the `go`, and stopped us once the old supervisor
        # had stopped: nobody served. Now it stops the take-over instead.
        self._cancel_if_stop_asked()
        try:
            # A stop asked while we wait for the answer cancels at once, the answer left
            # unread: the supervisor there, finding it unread or us gone, serves on.
            reply = control.say_go(self.taken_from, self._cancel_if_stop_asked)
        except TakeOverCancelled as exc:
            exc.told = True
            raise
        except (OSError, ValueError) as exc:
            error = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            # The ones we serve on: a handed socket shut down from outside before (one we
            # bound anew, or do not need) says nothing of the old supervisor's state.
            serving = {id(listener.sock) for listener in self.listeners}
            serving.add(id(self.metrics_sock))
            if not all(listeners.bound_address(sock) for sock in self.handed
                       if id(sock) in serving):
                raise ConfigError(f"--take-over: the supervisor on {quoted(path or '')} did "
                                  f"not confirm the hand-over ({error})") from None
            # A stop asked while we waited: the `go` is sent, but the old supervisor, once
            # it reads it, finds us gone and serves on (_taker_done): we close our copies
            # (never shut them down) and go.
            try:
                self._cancel_if_stop_asked()
            except TakeOverCancelled as cancelled:
                cancelled.told = True
                raise
            # Told, and silent since (stopped, frozen, swapping): giving up now would leave
            # nobody serving once it reads our `go` and stops. The sockets still listen:
            # served by both until it does. The connection stays open until we exit: its
            # answer to our `go` must find us there, or it takes us for gone, and serves on.
            self.log.warning("take-over-unconfirmed", error=error,
                             detail="the supervisor taken over did not say it stopped "
                             "accepting: serving; it stops when it reads the hand-over")
            self.unconfirmed_by, self.taken_from = self.taken_from, None
            reply = {"ok": True}
        if not reply.get("ok"):
            raise ConfigError(f"--take-over: the supervisor on {quoted(path or '')} did not "
                              f"hand over: {printable(str(reply.get('error')))}")
        if self.taken_from is not None:
            self.taken_from.close()
            self.taken_from = None
        used = {id(listener.sock) for listener in self.listeners}
        used.add(id(self.metrics_sock))
        ours = {_listener_ends(listener)[0] for listener in self.listeners}
        for sock, name in zip(self.handed, self.handed_names, strict=True):
            if id(sock) not in used:
                self.log.info("unlisten", detail=f"{name.get('detail') or name.get('metrics')}"
                              f" ({self._unused_why(sock, name, ours)})")
                listeners.stop_listening(sock)
        self.handed, self.handed_names = [], []

    def _unused_why(self, sock: socket.socket, name: dict[str, object], ours: set[str]) -> str:
        """Why a handed socket is not ours to serve on, for its `unlisten` line: a link (or
        the metrics port) this configuration does not have, its clients waiting reset, as
        a reload that removes it would not; or a socket that listened no more, shut down
        from outside (`ss -K`) before or while it was handed, which bind_all could not
        take and which ends nothing: its port may well be ours, on a socket of its own.
        `ours`: our listeners' addresses."""
        if listeners.bound_address(sock) is not None:
            return "handed over; not in this configuration"
        dead = "handed over not listening, shut down from outside"
        if name.get("listen") in ours or (
                "metrics" in name and name.get("metrics") == self.metrics_url):
            return f"{dead}; the port listens on a new socket"
        return f"{dead}; not in this configuration"

    def _cancel_if_stop_asked(self) -> None:
        pending = signal.sigpending() & {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
        if pending:
            raise TakeOverCancelled(signal.Signals(min(pending)).name)

    def _close_listeners(self) -> None:
        """Stop listening; but a socket handed over by a supervisor that has not confirmed
        (a take-over that failed) is only closed: it serves on it."""
        handed = {id(sock) for sock in self.handed}
        listeners.close_all(listener for listener in self.listeners
                            if id(listener.sock) not in handed)
        for sock in self.handed:
            sock.close()
        self.handed = []

    def _bind_metrics(self) -> socket.socket | None:
        if self.options.metrics is None:
            return None
        host, port = parse_metrics_address(self.options.metrics)
        for sock, name in zip(self.handed, self.handed_names, strict=True):
            address = listeners.bound_address(sock) if "metrics" in name else None
            # Port 0 takes the port the kernel chose there, as a link of port 0 does
            # (listeners.bind_all): its scrapers keep finding it.
            if address is not None and address == listeners.address_key(
                    host, port or address[2]):
                try:
                    sock.listen(METRICS_BACKLOG)
                except OSError as exc:
                    raise ConfigError(f"--metrics {quoted(self.options.metrics)}: cannot "
                                      f"listen again: {exc.strerror or exc}") from None
                return sock
        try:
            return listeners.listen_tcp(host, port, backlog=METRICS_BACKLOG)
        except ConfigError as exc:
            raise ConfigError(f"--metrics {quoted(self.options.metrics)}: {exc}") from None

    def _metrics_listen_again(self) -> bool:
        """Listen on the metrics port again, on a fresh socket put in place of the one shut
        down from outside on the same descriptor (as Listener.listen_again does for a
        link's, and why), at the port it had: the kernel's choice for `--metrics HOST:0`
        too. False, with a line, when it cannot (the port taken meanwhile): the metrics
        process is then restarted as after any death, and tries again."""
        assert self.metrics_sock is not None
        host = parse_metrics_address(self.options.metrics or "")[0]
        try:
            port = self.metrics_sock.getsockname()[1]
            listeners.listen_again_in_place(self.metrics_sock, host, port,
                                            backlog=METRICS_BACKLOG)
        except (OSError, ConfigError) as exc:
            error = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
            self.log.error("metrics-failed", error=error, detail="its port was shut down "
                           "from outside and cannot listen again: restarting later")
            return False
        return True

    def _close_metrics_port(self) -> None:
        """No metrics process will serve the port again (a stop, and none running): refuse
        scrapers at once rather than leave them in its backlog until they time out."""
        if self.metrics_sock is not None:
            listeners.stop_listening(self.metrics_sock)
            self.metrics_sock = None

    def start_metrics(self) -> None:
        """Fork and exec the metrics process (forkproxy/_metrics_main.py, which runs
        forkproxy.metrics) with the bound socket."""
        assert self.metrics_sock is not None and self.control is not None
        self.metrics_at = None
        fd = self.metrics_sock.fileno()
        script = os.path.join(os.path.dirname(os.path.abspath(relay.__file__)), "_metrics_main.py")
        # --status-socket=PATH in one word: a relative PATH may start with "-", which the
        # metrics process's argument parser would take for an option.
        argv = [sys.executable, *installed.interpreter_options(), "-I", script, "--fd", str(fd),
                f"--status-socket={self.control.path}", "--supervisor-pid", str(os.getpid()),
                f"--log-format={self.options.log_format}", f"--log-level={self.log.level}"]
        self._close_metrics_handoff()  # a dead process's, if its EOF was not read yet
        try:
            # Scrapes need no socket file then (handle_metrics_handoff). Without it (out
            # of descriptors), the metrics process connects to the control socket's path.
            self.metrics_handoff, theirs = socket.socketpair()
        except OSError:
            theirs = None
        if theirs is not None:
            argv.append(f"--handoff-fd={theirs.fileno()}")
        # SIGTERM blocked across the fork, as for a connection's child forked during a
        # stop (_accept_handler says why): a stop's TERM (_end_metrics) that came before
        # the child set it back to its default action was lost, and the process it
        # exec'd served on. Here at every fork: a rare one, not restarted during a stop,
        # yet forked in time for one. Restored after, not unblocked: a stop blocks
        # SIGTERM for good (handle_stop).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN at a pids limit, ENOMEM
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self._close_metrics_handoff()
            if theirs is not None:
                theirs.close()
            # A death of a process that lived 0 s, backed off like one: a pids limit that
            # lasts must not log this every 5 s for days, nor leave status at `starting`.
            self.metrics_started = time.monotonic()
            self.metrics_exit = f"cannot fork: {exc.strerror}"
            delay = self._metrics_died()
            self.log.error("metrics-failed", error=exc.strerror,
                           detail=f"cannot fork; trying again in {delay:g}s")
            return
        if pid == 0:
            try:
                # SIGTERM's default action back, and unblocked: a TERM sent since the
                # fork ends this process now; none stays blocked through the exec.
                signals.reset_in_child()
                # Ignored through the exec, from its first instruction: SIGALRM is the
                # supervisor's "resolve now", which `pkill -ALRM forkproxy` sends this
                # process too, and its handler here would be the default action there.
                signal.signal(signal.SIGALRM, signal.SIG_IGN)
                # Only the metrics socket goes through the exec: descriptors the
                # launcher leaked to forkproxy (a shell's `50>file`) are not the
                # metrics process's to hold, nor the control socket or the listeners
                # (those are close-on-exec already).
                handoff = () if theirs is None else (theirs.fileno(),)
                close_inherited(fd, self.log.fd, *handoff,  # the log: for metrics-failed below
                                whole=self.closerange_whole)
                for kept in (fd, *handoff):
                    os.set_inheritable(kept, True)
                # The one process forkproxy starts by exec runs the files installed now,
                # not the code this one runs: after a pip upgrade or downgrade, another
                # version of metrics.py (its options, the status it reads) or none at all.
                # Checked here, by the code that knows what it started with, so that
                # any other version is never run: its failure said nothing of why.
                changed = (None if self.metrics_files is None
                           else installed.changes(self.metrics_files))
                if changed is not None:
                    self.log.error("metrics-failed", error=f"{installed.ADVICE} ({changed})",
                                   detail="not restarted: restart forkproxy")
                    os._exit(installed.FILES_CHANGED)
                os.execv(sys.executable, argv)
            except OSError as exc:
                # The interpreter gone (a venv rebuilt under a running proxy): the exit
                # status alone (127, in metrics-died) would not say why.
                self.log.error("metrics-failed", error=exc.strerror,
                               detail=f"cannot execute {sys.executable!r}")
            finally:
                os._exit(127)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.metrics_pid = pid
        self.metrics_since = self.metrics_started = time.monotonic()
        if theirs is not None and self.metrics_handoff is not None:
            theirs.close()
            self.metrics_handoff.setblocking(False)
            self._watch(self.metrics_handoff.fileno(), self.handle_metrics_handoff)

    def handle_metrics_handoff(self, events: int) -> None:
        """Serve a connection the metrics process made for a scrape (one end of a
        socketpair, sent over the handoff socket) as a client of the control socket.
        Scrapes connected to the control socket's file: once it was removed (systemd-
        tmpfiles aging /tmp, an rm), every scrape said `forkproxy_up 0`, with no series
        of the proxy serving on, until check_control made the file again up to
        CONTROL_CHECK_EVERY later."""
        assert self.metrics_handoff is not None and self.control is not None
        try:
            data, fds, _, _ = socket.recv_fds(self.metrics_handoff, 1, 1,
                                              socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data:  # the metrics process is gone
            self._close_metrics_handoff()
        for fd in fds:
            try:
                client = socket.socket(fileno=fd)
            except OSError:  # not a socket: not one of the metrics process's
                os.close(fd)
                continue
            for dropped in self.control.adopt(client):
                self._unwatch(dropped)
            self._watch(fd, self._control_handler(fd))

    def _close_metrics_handoff(self) -> None:
        if self.metrics_handoff is not None:
            self._unwatch(self.metrics_handoff.fileno())
            self.metrics_handoff.close()
            self.metrics_handoff = None

    def _open_control(self) -> control.ControlServer:
        path = self.options.status_socket
        if path is not None:
            try:
                # Taking over from the supervisor on this very path: its socket file is
                # replaced by ours, in one rename, so that the name always answers.
                server = control.ControlServer(path, self.handle_control_request,
                                               replace=path == self.options.take_over)
            except control.UnixSocketRefused as exc:
                raise ConfigError(f"cannot open the status socket: {exc.strerror}") from None
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise  # out of descriptors, not a bad path: run() says so, as elsewhere
                raise ConfigError(f"--status-socket {path!r}: "
                                  f"{exc.strerror or exc}") from None
            if server.swept_staging:
                self.log.info("removed-stale-sockets", count=len(server.swept_staging),
                              directory=os.path.dirname(path) or ".")
            return server
        try:
            directory = control.default_dir(dict(self.environ), control.own_outer_uid())
        except OSError as exc:
            raise ConfigError(f"status socket directory: {control.dir_error(exc)}") from None
        try:
            control.prepare_dir(directory)
            # Swept once here, not by each try below: a try that failed (EADDRINUSE) had
            # swept and removed files that `removed-stale-sockets` never counted.
            swept = control.sweep_staging(directory)
            # Our pid is not unique in a directory that PID namespaces share (two containers
            # with one /tmp, each supervisor PID 1): take the next name while one answers.
            for suffix in ("", *(f"-{n}" for n in range(2, 100))):
                path = os.path.join(directory, f"{os.getpid()}{suffix}.sock")
                try:
                    server = control.ControlServer(path, self.handle_control_request,
                                                   sweep=False)
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or suffix == "-99":
                        raise
        except control.UnixSocketRefused as exc:
            # Not the directory's fault: "status socket directory '/run/...': Address
            # family not supported by protocol (set XDG_RUNTIME_DIR, or give
            # --status-socket, elsewhere)" sent the operator to look at a directory.
            raise ConfigError(f"cannot open the status socket: {exc.strerror}") from None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise  # as above: the limit is what to raise, not the directory to look at
            raise ConfigError(f"status socket directory {directory!r}: "
                              f"{control.dir_error(exc)}") from None
        stale = [*swept, *control.sweep_stale(directory, server.path)]
        if stale:
            self.log.info("removed-stale-sockets", count=len(stale), directory=directory)
        return server

    def _write_pid_file(self) -> None:
        """Our PID in --pid-file: a regular file, none yet, or one that holds nothing but
        a PID (stale or not) or nothing at all. Never waited on (a FIFO given by mistake
        would hold the start up, the ports bound and nothing served), and never left
        behind empty when the write fails (a full disk)."""
        path = self.options.pid_file
        if path is None:
            return
        try:
            # O_NONBLOCK: a FIFO is opened without waiting for a writer, and refused below.
            # O_RDWR: what is there is read before anything is written (below).
            # 0o644: a pid file that anyone could write could name any process to `reload`.
            # O_NOFOLLOW: we may be root, in a directory another user can write to (/tmp,
            # a service's run directory): a link planted at the path would have us empty
            # and write whatever file it names.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise  # out of descriptors, not a bad path: run() says so, as elsewhere
            reason = "not a regular file" if exc.errno == errno.ENXIO else exc.strerror
            owner = _owner(path) if exc.errno == errno.EACCES else None
            if owner is not None and owner != os.geteuid():
                # fs.protected_regular refuses O_CREAT of another user's file in a sticky
                # directory (/tmp), to root too, whatever its mode: the reason is whose it
                # is, as for the same file opened below.
                reason = f"owned by uid {owner}, not by this user ({os.geteuid()})"
            elif owner is not None:
                # A file of ours that we may not read (0200) or not write (0400): refused,
                # not chmodded. Unread, it could hold anything; and a pid file this user
                # cannot read is none for `reload --pid-file`, nor for the stop, which
                # checks that it still names us before removing it.
                reason = (f"{exc.strerror}: a pid file already there must be readable and "
                          "writable by this user (what it holds is checked before it is "
                          "written over)")
            # ELOOP, or EACCES in a sticky directory (O_CREAT there checks the link first)
            if os.path.islink(path):
                reason = "a symbolic link (give the path it points to)"
            raise ConfigError(f"--pid-file {path!r}: {reason}") from None
        removable = False  # after a failure: only once it holds no one's PID
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode):
                raise ConfigError(f"--pid-file {path!r}: not a regular file")  # not OSError
            if self._is_env_file(found):
                # Written over, the links were gone at the next reload, and the file with
                # them at exit. Raised before any write: not OSError, nothing unlinked.
                raise ConfigError(f"--pid-file {path!r}: it is the --env-file "
                                  f"{self.sources.env_file!r}")
            # A file already there that another user owns, or with a second name (a hard
            # link planted beside a file of ours), is not ours to write: refused before
            # any write, as systemd refuses such a PIDFile.
            if found.st_uid != os.geteuid():
                raise ConfigError(f"--pid-file {path!r}: owned by uid {found.st_uid}, not "
                                  f"by this user ({os.geteuid()})")
            if found.st_nlink > 1:
                raise ConfigError(f"--pid-file {path!r}: it has other names (hard links)")
            # A file already there is written over only if it is a pid file: empty, or a
            # PID and whitespace (a stale one, or a supervisor's that this one takes over,
            # as its stop then leaves it). Anything else is a file the flag (or the
            # variable) named by mistake, `--pid-file notes.txt` for `--env-file`, or
            # /etc/passwd as root: emptied and then removed at the stop, it was lost.
            held = os.pread(fd, MAX_PID_FILE + 1, 0)  # at 0: the write below starts there
            # ASCII whitespace, and NULs: a file written just before a crash or a power
            # loss can come back its size in zeros (ext4's delayed allocation), and a
            # restart must take it over. isdigit(): ASCII digits only.
            pid = held.strip(b" \t\n\r\x0b\x0c\x00")
            if len(held) > MAX_PID_FILE or (pid and not pid.isdigit()):
                raise ConfigError(f"--pid-file {path!r}: it holds something other than a "
                                  "process id: not a pid file, left as it was")
            removable = not pid  # empty already: nothing lost
            if found.st_mode & 0o022:
                os.fchmod(fd, stat.S_IMODE(found.st_mode) & ~0o022)  # as above: 0o644 at most
            os.ftruncate(fd, 0)
            removable = True
            text = f"{os.getpid()}\n".encode()
            if os.pwrite(fd, text, 0) != len(text):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            if removable:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise ConfigError(f"--pid-file {path!r}: {exc.strerror}") from None
        finally:
            os.close(fd)
        self.pid_file_written = (found.st_dev, found.st_ino)

    def _is_env_file(self, found: os.stat_result) -> bool:
        """Whether `found` is the --env-file (the same file by any path or link)."""
        if self.sources.env_file is None:
            return False
        try:
            env = os.stat(self.sources.env_file)
        except OSError:
            return False
        return (env.st_dev, env.st_ino) == (found.st_dev, found.st_ino)

    def run(self) -> int:
        """Serve until stopped; 0 after a clean stop."""
        try:
            # Before anything is logged: a start-up warning (link-skipped, say) written to
            # a full pipe blocked the start before `listening`. Held now, and written by
            # the loop; lazily, so that no descriptor is taken unless lines wait.
            self.log.never_wait(self._log_held, lazily=True)
            self._log_unknown_variables()
            # Before "listening", so that ready is at full speed; and before start(): at a
            # take-over, start() tells the old supervisor to stop accepting, and nobody
            # accepted while this warm-up ran (a second or more on a loaded host).
            relay.preload(self.options, self.log)
            lines = self.start()
            # One descriptor to spare, for accept(): at exactly the limit our own need, the
            # proxy said `listening` and every client waited in the backlog for ever.
            os.close(os.dup(2))
            # From here on (and with a descriptor still spare, or not at all) the log is
            # never waited for: lines a full log cannot take are held (_log_held).
            held_on = self.log.own_fd
            self.log.never_wait(self._log_held)
            if self.log.own_fd != held_on:  # given back: no spare for it (-1: a no-op)
                self._unwatch(held_on)
        except TakeOverCancelled as exc:
            # Asked to stop, and stopped: exit 0, as any stop. Our copies of the handed
            # sockets are closed, not shut down, and our socket file and pid file removed
            # before the connection: the old supervisor, at its close, serves on and
            # makes them again (_taker_done, _own_again).
            self.log.warning("take-over-cancelled", signal=str(exc), detail=(
                "stopped after the supervisor taken over was told to stop, before it "
                "answered: it serves on once it finds its answer unread" if exc.told else
                "stopped before the supervisor taken over was told to stop: it serves on"))
            self.cleanup()
            self.log.settle(LOG_SETTLE)
            return 0
        except BaseException as exc:
            self.cleanup()  # nothing half-started: no socket file, no pid file left behind
            # A moment for the start-up lines held (a reader only slow), as at exit.
            self.log.settle(LOG_SETTLE)
            if not isinstance(exc, OSError) or exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            # `ulimit -n 7`, say: one line rather than a traceback from wherever it ran out
            raise ConfigError(f"out of file descriptors while starting: {exc.strerror} "
                              f"{out_of_files_advice(exc.errno)}") from None
        self._log_max_children()  # before "listening": whoever waits for it can read it
        self._log_foreign_proc()
        self._log_pid_max_unread()
        self._log_sockets_unread()
        self._print_ready(lines)
        # In the log too, as after a reload: stdout may go nowhere a log shipper looks,
        # and `ready` is debug. After stdout, so that a script waiting there is not held
        # up by a log that is slow to take lines. The control socket first: its default
        # directory depends on XDG_RUNTIME_DIR, which a login shell has and a systemd
        # service not, so `status` in the one may not look where the other put it.
        if self.control is not None:
            self.log.info("status-socket", path=self.control.path)
        for listener in self.listeners:
            self.log.info("listening", detail=listener.describe(), new=True)
        for line in lines:
            self.log.debug("ready", detail=line)
        self.log.debug("oom-score-adj", supervisor=self.oom_score_adj,
                       children=(CHILD_OOM_SCORE_ADJ if self.child_oom_score_adj
                                 else self.oom_score_adj))
        # Calls the child's branch (_accept_handler) makes and the supervisor otherwise
        # never does: the first call of a C function through the PLT has the dynamic
        # linker look it up (lazy binding), ~650 instructions in every child; once here,
        # the resolved address is inherited at the fork.
        time.monotonic_ns()
        if gc.isenabled():
            gc.disable()
            gc.enable()
        gc.freeze()  # the children never touch these objects' GC headers: fewer pages copied
        try:
            self.loop()
        finally:
            self.cleanup()
        self._log_exited()
        # A moment for what the log still holds, `exited` included: a reader that stopped
        # for good must not hold up a stop, whose time (--grace) is counted.
        self.log.settle(LOG_SETTLE)
        return 0

    def _tell_metrics_handed_over(self) -> None:
        """A byte on the handoff socket: the metrics process accepts no more, finishes
        the scrapes under way (asking us their status: the loop waits for it,
        _metrics_finishing), and exits. A SIGTERM cut them. Without a handoff socket (none
        could be made), or if the byte cannot go, SIGTERM all the same."""
        handoff = self.metrics_handoff
        try:
            if handoff is not None and handoff.send(b"h"):
                return
        except OSError:
            pass
        try:
            os.kill(self.metrics_pid, signal.SIGTERM)
        except OSError:
            pass

    def _metrics_finishing(self) -> bool:
        """Handed over, and our metrics process finishes the scrapes it has: they ask us for
        the status (handle_metrics_handoff), so we wait, up to METRICS_HANDOVER_WAIT. Its
        exit wakes the loop; past the grace, the KILL_AFTER timer does (no child left)."""
        return (self.handed_over and self.metrics_pid != 0
                and time.monotonic() < (self.stop_began or 0.0) + METRICS_HANDOVER_WAIT)

    def _log_exited(self) -> None:
        """The last line: `stopping` said when the drain began, this when it ended (the
        listeners and sockets closed, the pid file removed: all that is left is exit)."""
        now = time.monotonic()
        self.log.info("exited", total=self.accounting.connections_total(),
                      duration=now - (self.stop_began or now), uptime=now - self.began)

    def _print_ready(self, lines: list[str]) -> None:
        """The `listening` lines on stdout, or a warning on stderr saying why they are not.

        A stdout that is full (a pipe whose reader has not read yet) is waited for, as any
        program's write waits, until a TERM or INT comes: that must still stop the proxy
        (the loop acts on it, since the signal stays noted). So room is waited for in
        poll(), never in write(): a write blocked on a full pipe goes on after a signal's
        handler runs (PEP 475), and the stop waited for the reader. Whatever else fails,
        the proxy serves all the same, and stdout becomes /dev/null: lines left in a
        buffer would fail again at exit ("Exception ignored" on stderr). A reader gone
        (EPIPE: `serve ... | head -1`) is no news; anything else is, since a script
        waiting for `listening` would otherwise wait for ever with no clue why.
        """
        data = "".join(line + "\n" for line in lines).encode(
            sys.stdout.encoding or "utf-8", "backslashreplace")
        failure = ""
        try:
            sys.stdout.flush()
            fd = sys.stdout.fileno()
            room = select.poll()
            room.register(fd, POLLOUT)
            while data:
                # A timeout, to see whether a signal that came was a stop (poll goes on
                # after its handler). Then at most PIPE_BUF bytes, which a pipe with room
                # takes whole without blocking, whether or not stdout is non-blocking.
                if not room.poll(100):
                    if signals.noted(signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                        failure = "still full when the proxy was told to stop"
                        break
                    continue
                try:
                    data = data[os.write(fd, data[:select.PIPE_BUF]):]
                except BlockingIOError:
                    continue  # another writer of the pipe took the room first
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                failure = exc.strerror or str(exc)
        except ValueError:
            failure = "closed"  # sys.stdout closed under us: fileno() refuses
        if failure:
            self.log.warning("stdout-failed", error=failure,
                             detail="the `listening` lines are not all written")
        if failure or data:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)

    def memory_fit(self) -> int | None:
        """How many connections fit the memory limit found at start (None: no limit), 0
        when none does: the derived --max-children is clamped up to 1 and capped at the
        default, this is neither: a --max-children given is compared with it."""
        limit = self.options.memory_limit
        return None if limit is None else children_that_fit(limit, self.options.metrics is not None)

    def pids_fit(self) -> int | None:
        """How many connections the pids limit found at start holds beside forkproxy's own
        processes and threads (None: no limit), 0 when none does; neither clamped nor
        capped at the default: a --max-children given is compared with it."""
        limit = self.options.pids_limit
        return None if limit is None else children_within_pids(limit,
                                                               self.options.metrics is not None)

    def nproc_fit(self) -> int | None:
        """How many connections the nproc limit (RLIMIT_NPROC) found at start holds beside
        forkproxy's own processes and threads and the user's others then (None: no
        limit, or one that does not apply), 0 when none does; as pids_fit, neither
        clamped nor capped."""
        limit = self.options.nproc_limit
        return None if limit is None else children_within_nproc(
            limit, self.options.nproc_others, self.options.metrics is not None)

    def _log_unknown_variables(self) -> None:
        """At start, first: each FORKPROXY_ variable no option reads (a typo: the option
        it was meant for is at its default, FORKPROXY_ALLOWED's every client). Found by the
        CLI (config.unknown_variables, which serve_command calls): a warning, never an
        error, as a newer image's variable set for an older forkproxy must not stop the
        proxy. The first UNKNOWN_LINES_AT_MOST each, then one line counting the rest."""
        said, more = unknown_lines(self.options.unknown_variables)
        for name, detail in said:
            self.log.warning("unknown-variable", variable=name, detail=detail)
        if more:
            self.log.warning("unknown-variable-unlogged", count=more, detail=UNLOGGED_UNKNOWN)

    def _log_foreign_proc(self) -> None:
        """At start, once: no /proc, or one that is not our PID namespace's, where
        `status` and the metrics read none of our processes' figures, and a take-over
        is refused (control.foreign_proc, control.taker_refused)."""
        reason = control.foreign_proc()
        if reason is not None:
            self.log.warning("foreign-proc", detail=f"{reason} (no /proc mounted, or a "
                             "PID namespace entered without a /proc of its own: `unshare "
                             "--pid` without --mount-proc, bwrap without --proc): `status` "
                             "and the metrics show no memory, CPU or socket figures of "
                             "forkproxy's processes, and a take-over is refused; mount a "
                             "/proc for this PID namespace to have them")

    def _log_pid_max_unread(self) -> None:
        """At start, once: a --max-children given that could not be checked against the
        kernel's pid_max (cli.pid_max_unchecked says when, and why), where a value
        above it was refused (exit 2) with /proc/sys readable."""
        if self.options.pid_max_unread is not None:
            self.log.warning("pid-max-unknown", value=self.options.max_children,
                             detail=self.options.pid_max_unread)

    def _log_sockets_unread(self) -> None:
        """At start, once: the kernel's view of the connections' sockets (NETLINK_SOCK_DIAG)
        refused to this process's sandbox, and so to the metrics process and a `status` run
        in it, which said so only once a connection was live to be read. One socket,
        opened and closed here: nothing on a connection's path."""
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                          NETLINK_SOCK_DIAG).close()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                return  # short of descriptors or memory this moment: no sandbox's doing
            refused = exc.errno in (errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES)
            metric = ("the metric forkproxy_upstream_unanswered_seconds has no sample, "
                      if self.options.metrics is not None else "")
            self.log.warning(
                "sockets-unread", error=exc.strerror,
                detail="the kernel's view of the connections' sockets (NETLINK_SOCK_DIAG) "
                + ("is refused to this process: a seccomp filter (systemd's "
                   "RestrictAddressFamilies= without AF_NETLINK, a container's profile) or "
                   "a security module; " if refused else "cannot be read here; ")
                + f"{metric}`status` run in the same sandbox shows IDLE, QUEUED TO "
                "CLIENT, QUEUED TO UPSTREAM and UNANSWERED as unknown (`-`); allow "
                "AF_NETLINK to have them")

    def _log_max_children(self) -> None:
        """At start: which limit the derived --max-children came from (memory, pids,
        nproc, or several), or a warning for each limit the operator's own is more than
        (served as told all the same: a limit can be raised while forkproxy runs)."""
        value, metrics = self.options.max_children, self.options.metrics is not None
        memory, pids = self.options.memory_limit, self.options.pids_limit
        nproc = self.options.nproc_limit
        memory_fit, pids_fit, nproc_fit = self.memory_fit(), self.pids_fit(), self.nproc_fit()
        if memory is None and pids is None and nproc is None:
            self.log.debug("max-children", value=value, detail="no memory or pids limit found")
            return
        if self.options.max_children_given:
            if memory is not None and memory_fit is not None and value > memory_fit:
                self.log.warning("max-children", value=value, fits=memory_fit,
                                 memory_limit=memory, detail=f"about {memory_fit} fit "
                                 f"{limits_text(['memory'], memory, pids)}; beyond that the "
                                 "OOM killer ends connections")
            for name, limit, fit in (("pids", pids, pids_fit), ("nproc", nproc, nproc_fit)):
                if limit is not None and fit is not None and value > fit:
                    self.log.warning("max-children", value=value, fits=fit,
                                     **{f"{name}_limit": limit},
                                     detail=f"about {fit} fit "
                                     f"{limits_text([name], memory, pids, nproc)}; beyond "
                                     "that forks fail and clients wait for one that works "
                                     "(fork-failed)")
            return
        fits = limiting_fits(memory_fit, pids_fit, nproc_fit)
        named = limits_named(fits)
        if not named:  # only pids or nproc limits, far above the default (systemd's TasksMax)
            found = [name for name, limit in (("pids", pids), ("nproc", nproc))
                     if limit is not None]
            self.log.debug("max-children", value=value, detail="no memory limit found, and "
                           f"{limits_text(found, memory, pids, nproc)} "
                           f"{'hold' if len(found) > 1 else 'holds'} more")
            return
        fields: dict[str, object] = {"value": value}
        owns = []
        if "memory" in named:
            fields["memory_limit"] = memory
            owns.append(f"~{mebibytes(own_memory(metrics))}")
        if "pids" in named:
            fields["pids_limit"] = pids
        if "nproc" in named:
            fields["nproc_limit"] = nproc
        if "pids" in named or "nproc" in named:
            owns.append(f"{own_pids(metrics)} processes and threads")
        # RLIMIT_NPROC counts the user's processes in every PID namespace; those outside
        # ours (another container of the same uid) were not seen, so not counted.
        unseen = (", as counted in this PID namespace: the user's processes outside it "
                  "(another container of the same uid) count too, unseen"
                  if "nproc" in named and control.in_child_pid_namespace() else "")
        if not fits[named[0]]:
            # Clamped up to 1: even that one may cost its connection, or fail to fork.
            others = self.options.nproc_others if "nproc" in named else 0
            self.log.warning("max-children", **fields,
                             detail=f"{no_room_text(named, memory, pids, nproc)} beside "
                             f"forkproxy's own {' and '.join(owns)}"
                             + (f" and the user's {others} others" if others else "")
                             + f"{unseen}; --max-children overrides")
        else:
            self.log.info("max-children", **fields, detail=f"fits "
                          f"{limits_text(named, memory, pids, nproc)}{unseen}; "
                          + ("give --max-children there" if unseen
                             else "--max-children overrides"))

    def loop(self) -> None:
        poll, handlers, monotonic = self.poller.poll, self.handlers, time.monotonic
        # Stopped when no child runs and no client is held (a failed fork's, waiting for
        # the next one that works, or for the grace period to end).
        while not (self.stopping and not self.accounting.children and not self.held
                   and not self._metrics_finishing()):
            # No timer armed, the usual case, needs no call and no list: every page written
            # between two forks is copied (docs/benchmarks.md). Same timers as _poll_timeout
            # but scan_at: set whenever a connection ends (handle_chld), it is checked
            # here, after the poll, only while no other timer is armed (else by
            # handle_timers).
            timeout: float = -1 if (
                self.resume_at is None and self.control_at is None and self.term_at is None
                and self.kill_at is None and self.metrics_at is None
                and self.denials_at is None
            ) else self._poll_timeout()
            scan_at = self.scan_at if timeout < 0 else None
            if scan_at is not None:  # a scan pending: wait no longer than until it is due
                # Pending nearly always while connections end (set at each reap): so no
                # max() and int(), 3,200 of the supervisor's instructions a connection
                # (docs/benchmarks.md). poll() takes float milliseconds, rounded up.
                timeout = (scan_at - monotonic()) * 1000 + 1
                if timeout < 0:
                    timeout = 0
            try:
                ready = poll(timeout)
            except OSError as exc:
                # ENOMEM (poll(2) could not allocate its table): a moment's shortage at a
                # memory limit must not end every listener and orphan the children. Only
                # that: an error that persists (EINVAL) would leave a loop that can never
                # read its signals, not even the TERM that stops it.
                if exc.errno != errno.ENOMEM:
                    raise
                self._log_repeating("poll-failed", exc, f"trying again in {ACCEPT_BACKOFF}s")
                time.sleep(ACCEPT_BACKOFF)
                continue
            for fd, events in ready:
                handler = handlers.get(fd)
                if handler is not None:
                    handler(events)
            if scan_at is not None:
                # Due whether or not the poll was quiet: other events (clients that stay,
                # clients denied) coming less than SCAN_EVERY apart put it off for ever.
                if monotonic() >= scan_at:
                    self.handle_chld(scan=True)
            elif timeout >= 0:  # a timer was armed: fire those that are due
                self.handle_timers()

    def cleanup(self) -> None:
        self._close_listeners()
        self.listeners = []
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._let_the_reporters_finish()
        for pid in self.resolver_pids + self.reporter_pids:
            self._kill_and_reap(pid)
        if self.metrics_pid:
            self._end_metrics()
        self._close_metrics_handoff()
        if self.metrics_sock is not None:
            self.metrics_sock.close()
        if self.control is not None:
            self.control.close()
        pid_file = self.options.pid_file
        if pid_file is not None and self.pid_file_written:
            try:
                # Only while it still names us: a supervisor started after us with the
                # same --pid-file has taken it over, and reload --pid-file needs it.
                # The file we wrote, not whatever its directory holds by now (a link to
                # another file, a FIFO to hang the stop on: the directory may be shared).
                fd = os.open(pid_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_CLOEXEC)
                try:
                    found = os.fstat(fd)
                    ours = ((found.st_dev, found.st_ino) == self.pid_file_written
                            and os.read(fd, 32).strip() == str(os.getpid()).encode())
                finally:
                    os.close(fd)
                if ours:
                    os.unlink(pid_file)
            except OSError:
                pass  # already gone, or never ours to remove
        for fd in {self.ended_r, self.ended_w}:
            if fd >= 0:
                os.close(fd)
        self.ended_r = self.ended_w = -1
        relay.set_ended_pipe(-1)
        if self.taken_from is not None:
            # A take-over that failed: the supervisor there serves on (handle_taker), and
            # makes its socket file and pid file again, which ours replaced: only now,
            # once we removed them.
            self.taken_from.close()
            self.taken_from = None
        if self.unconfirmed_by is not None:
            self.unconfirmed_by.close()
            self.unconfirmed_by = None
        # The counts no window's end has logged yet. Last: with the log blocked, this
        # write waits, and everything above is done by then.
        self._log_folded_failures()
        self._end_denial_windows()

    def _end_metrics(self) -> None:
        """SIGTERM the metrics process, and SIGKILL it if it has not exited within
        METRICS_EXIT_WAIT: blocked on a stderr nobody reads, it never did, and the stop
        waited for it for ever (docker stop then kills the whole container)."""
        pid = self.metrics_pid
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            return  # already gone and reaped
        if not _reaped_within(pid, METRICS_EXIT_WAIT):
            self._kill_and_reap(pid)

    def _kill_and_reap(self, pid: int) -> None:
        """SIGKILL a helper process of ours (resolver, reporter, metrics) and reap it, but
        wait no more than KILLED_EXIT_WAIT: a frozen process (a freezer cgroup, docker
        pause of that process alone) dies only once thawed, and the stop waited for ever."""
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            return  # already gone and reaped
        if not _reaped_within(pid, KILLED_EXIT_WAIT):
            self.log.warning("not-reaped", child_pid=pid,  # `pid` is the supervisor's own
                             detail="still there after SIGKILL (frozen?): left to init")

    def _let_the_reporters_finish(self) -> None:
        """Wait up to REPORTER_EXIT_WAIT, for all of them together, for the reporters: a
        table asked for (SIGUSR1) or a `status` accepted just before a stop is still
        written, or answered; killed at once, the client read a connection closed without
        a reply. Those left after it are killed (cleanup): a blocked log, a client that
        does not read (REPORT_TIMEOUT would hold the stop for 10 s)."""
        deadline = time.monotonic() + REPORTER_EXIT_WAIT
        for pid in list(self.reporter_pids):
            if _reaped_within(pid, deadline - time.monotonic()):
                self.reporter_pids.remove(pid)  # reaped: its number may be reused
                if pid == self.table_writer:
                    self.table_writer = 0

    def _poll_timeout(self) -> int:
        """Milliseconds to the next timer (the loop checks six inline first, all but scan_at)."""
        soonest = None
        for deadline in (self.resume_at, self.control_at, self.term_at, self.kill_at,
                         self.metrics_at, self.denials_at, self.scan_at):
            if deadline is not None and (soonest is None or deadline < soonest):
                soonest = deadline
        if soonest is None:
            return -1
        return max(0, int((soonest - time.monotonic()) * 1000) + 1)

    def _watch(self, fd: int, handler: Callable[[int], None], events: int = POLLIN) -> None:
        """Poll fd for events; a number already watched (a reused fd) gets the new ones."""
        self.poller.register(fd, events)  # poll.register replaces an existing registration
        self.handlers[fd] = handler

    def _unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def _log_held(self, fd: int) -> None:
        """Lines of ours wait for room in the log, stderr (Logger.never_wait): the loop
        writes them when it has some, and serves on meanwhile."""
        self._watch(fd, self._write_held_log, POLLOUT)

    def _write_held_log(self, events: int) -> None:
        if self.log.flush_held():
            self._unwatch(self.log.own_fd)

    # -- accepting ---------------------------------------------------------------------

    def update_accepting(self) -> None:
        """Listen while not stopping, not backing off, and under --max-children."""
        want = (
            not self.stopping
            and self.resume_at is None
            and len(self.accounting.children) < self.options.max_children
        )
        if want == self.accepting:
            return
        self.accepting = want
        if not want:
            if not self.stopping and self.resume_at is None:
                self._log_max_children_reached()
            for listener in self.listeners:
                self._unwatch(listener.fd)
            return
        # Watched in turn (_in_turn): poll reports ready descriptors in the order they
        # were registered, and the first ready listener's handler takes the free room and
        # stops accepting (all of them) before the next one runs.
        for listener in self._in_turn():
            # Built once, not at every resume: at --max-children accepting pauses and
            # resumes at every connection, and building a handler for each of 4,000
            # links took 66% of the supervisor (8-11 ms per connection).
            if listener.accept_clients is None:
                listener.accept_clients = self._accept_handler(listener)
            self._watch(listener.fd, listener.accept_clients)

    def _in_turn(self) -> list[Listener]:
        """The listeners from the one after the listener whose client took the last slot
        under --max-children: the order in which they are served when slots free up. In
        the order of self.listeners, the first link took every slot that freed while its
        clients waited, and the others none for as long (all links share the one limit).
        So at the limit the slots go to the links with clients waiting in turn; within a
        link, in the order they came (the kernel's). O(links), as a resume is anyway."""
        listening = self.listeners
        if self.took_last_slot is not None:
            try:
                after = listening.index(self.took_last_slot) + 1
            except ValueError:
                return listening  # a listener a reload has closed since
            return listening[after:] + listening[:after]
        return listening

    def _log_max_children_reached(self) -> None:
        """Folded: accepting stops at --max-children, which at a steady overload happens
        at every child's exit, so one line per ERROR_LOG_EVERY with the count. Without it
        a consumer whose clients wait in the backlog (a pool larger than the limit) had
        nothing in the log to say why."""
        times = fold(self.pause_logs, "max-children-reached")
        if times:
            self.log.warning("max-children-reached", value=self.options.max_children,
                             times=times, detail="new clients wait in the kernel backlog "
                             "until a connection ends")

    def _accept_handler(self, listener: Listener | listeners.HeldBacklog) -> Callable[..., None]:
        """The listener's poll handler: `handler(events, batch)` accepts up to `batch`
        clients and forks a child for each.

        The proxy's hot path, and written for it: every page the supervisor writes
        between two forks is copied, for itself and again in the memory of the child
        forked before, which keeps the old copy for its whole life (docs/benchmarks.md).
        So what the loop needs is bound here, once per listener (again after a reload,
        which prepares the listeners anew: _prepare_relay), not looked up on every
        wakeup; the loop calls no helper of ours (a slot is a pop from the free list,
        Slots says why), checks --max-children once per wakeup, and allocates nothing
        but the child's record.
        """
        # _accept gives the bare fd: no socket object, no extra fcntl in the supervisor.
        accept = listener.sock._accept  # type: ignore[union-attr]
        children = self.accounting.children
        free_slots, refill_slots = self.accounting.slots.free, self.accounting.slots.refill
        max_children = self.options.max_children
        allow = self.allow
        waiting = listener.waiting
        link = listener.link
        fork, close, monotonic, monotonic_ns = os.fork, os.close, time.monotonic, time.monotonic_ns
        slot_counters, slot_ended = self.accounting.slots.counters, ENDED
        # And what the child's branch below uses, so that it names no module attribute:
        # the supervisor never runs that branch, and on Python 3.12+ an instruction's first
        # run takes the generic path, which for `module.name` writes to the module's
        # __dict__ (its reference count): a page per module, copied by every child
        # (docs/benchmarks.md, "Which Python"). 3.11 specializes it at once instead.
        set_wakeup_fd, set_signal = _signal.set_wakeup_fd, _signal.signal
        term_signal, term_action = relay.CHILD_DISPOSITIONS
        # SIGTERM is blocked in the supervisor from a stop's start on (handle_stop): a child
        # forked since has it blocked until its handler is set (see the child's branch).
        sigmask, unblock, term_only = _signal.pthread_sigmask, _signal.SIG_UNBLOCK, (term_signal,)
        term_blocked = self.term_blocked
        gc_disable, closerange, exit_child = gc.disable, os.closerange, os._exit
        closerange_whole, close_listed = self.closerange_whole, close_inherited
        # The path as bytes: os.open encodes a str one at every call, in each child.
        oom_value, open_file, write, oom_path, write_only = (
            self.child_oom_score_adj, os.open, os.write, os.fsencode(OOM_SCORE_ADJ), os.O_WRONLY
        )
        serve, failed, family, sock_stream, reset_connections = (
            relay.serve, relay.FAILED, listener.family, relay.SOCK_STREAM,
            relay.reset_connections,
        )
        ended_w, pid_size, pid_order, getpid = (
            self.ended_w, ENDED_PID_SIZE, relay.ENDED_PID_ORDER, os.getpid
        )
        # Whose turn it was, told update_accepting at the limit (a held client's listener).
        taker = listener if isinstance(listener, Listener) else listener.listener

        next_turn = listener.turns.__next__  # a child's turn (relay.in_turn)

        def accept_clients(events: int, batch: int = ACCEPT_BATCH,
                           patience: float = ACCEPT_PATIENCE) -> None:
            room = max_children - len(children)  # at most this many more children
            began = 0.0  # the batch's first fork's time, for its patience
            # Counted, not range(): a builtin call, ~700 instructions a wakeup in 3.11.
            limit, taken = (batch if batch < room else room), 0
            while taken < limit:
                taken += 1
                try:
                    fd, address = accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno in RESOURCE_ERRORS:
                        self._accept_failed(listener, exc)
                        return
                    if exc.errno == errno.EINVAL:
                        self._listener_shut(listener)
                        return
                    continue  # ECONNABORTED, EPERM from a firewall, ...: that client only
                if allow and not is_allowed(allow, address[0]):
                    self._deny(listener, fd, address)
                    continue
                if not free_slots:
                    refill_slots()  # one per slot up to --max-children, so never comes up short
                base = free_slots.pop()
                turn = next_turn()
                forked_at = monotonic()  # before: the child may end before the fork returns here
                try:
                    pid = fork()
                except OSError as exc:
                    self._fork_failed(listener, fd, address, base, exc)
                    return
                if pid == 0:
                    # The child's whole life, written out here rather than in a method:
                    # code the supervisor never runs is cold in every child, and running a
                    # cold code object writes to it (CPython counts calls in it, then
                    # rewrites it), so each child would copy its pages (docs/benchmarks.md).
                    # It never returns.
                    status = failed
                    try:
                        # The other handled signals keep the handler that only notes
                        # them (relay.CHILD_DISPOSITIONS says why).
                        set_wakeup_fd(-1)
                        set_signal(term_signal, term_action)
                        gc_disable()  # a collection would touch (and copy) every heap page
                        if oom_value is not None:
                            # The OOM killer's first choice (child_oom_score_adj says why):
                            # two system calls, open and write; closerange closes it.
                            try:
                                write(open_file(oom_path, write_only), oom_value)
                            except OSError:
                                pass  # out of descriptors: this one child stays as it was
                        # Drop every inherited descriptor but stdio, the client and the
                        # ended pipe, above all the listeners: a child holding one would
                        # keep a closed port open. (The pipe was made first: lower, mostly;
                        # -1 in a supervisor never started, as tests build them.)
                        if closerange_whole:
                            low, high = (ended_w, fd) if 2 < ended_w < fd else (
                                fd, fd if ended_w < fd else ended_w)
                            closerange(3, low)
                            if high > low + 1:  # adjacent, the usual case: nothing between
                                closerange(low + 1, high)  # (close_range(2) refuses it)
                            closerange(high + 1, 1 << 20)  # FD_CEILING
                        else:  # closerange would close() every number up to FD_CEILING
                            close_listed(ended_w, fd, whole=False)
                        # Forked during a stop, this child has SIGTERM blocked (the
                        # supervisor's mask since handle_stop): only now may the stop's
                        # TERM come in. The supervisor TERMs children only during a stop,
                        # and then as soon as fork() returned there (the backlog's drain
                        # right before SIGQUIT's TERM at once). Unblocked, one that came
                        # before the handler above was set was lost: the C-level handler
                        # ran at the child's first instant and CPython's after-fork code
                        # cleared its flag, or, a moment later, the inherited handler only
                        # noted it. The child relayed on until the SIGKILL 1 s later, its
                        # client seeing a FIN, not an RST. Delivered here instead, to
                        # _reset_and_die, and only once the inherited descriptors are
                        # closed: its SO_LINGER 0 must reach this child's client alone,
                        # not a socket it still shared with the supervisor (a held client).
                        # Forked while serving, nothing is blocked and nothing is called:
                        # no system call per connection for what only a stop needs.
                        if term_blocked:
                            sigmask(unblock, term_only)
                        sock = RawSocket(family, sock_stream, 0, fd)
                        args = listener.relay_args
                        status = serve(sock, address, base, turn, *args)  # type: ignore[arg-type]
                        # When it ended, for the duration histogram: the reap may come
                        # much later (a supervisor that is busy, starved or paused).
                        slot_counters[base + slot_ended] = monotonic_ns()
                    except BaseException as exc:
                        # Cut short: each side gets an RST, never a FIN that would pass
                        # what it got so far off as the whole stream.
                        reset_connections()
                        # Named as its open and close lines name the connection, to be
                        # joined with them (a crash may also come before the open line).
                        self.log.error("relay-crashed", link=link.name,
                                       client=peer_text(address), upstream=str(link.target),
                                       **crash_fields(exc))
                    finally:
                        # The last act: tell the supervisor, which then reaps this child
                        # by its pid, not by a scan of all its children (handle_chld).
                        try:
                            write(ended_w, getpid().to_bytes(pid_size, pid_order))
                        except OSError:
                            pass  # full: found by a scan, as a child killed is
                        exit_child(status)
                close(fd)
                children[pid] = (link, address, base, forked_at)  # a ChildRecord
                if taken == 1:
                    began = forked_at
                    try:
                        if not waiting(0):
                            break  # one client this wakeup, the usual case: no accept() that fails
                    except OSError:
                        # ENOMEM: seen only under fault injection (a poll of one socket
                        # allocates nothing); go on, accept() says when there are no more.
                        pass
                elif not began:
                    began = forked_at  # the first fork after denied clients (--allow)
                elif forked_at - began > patience:
                    break  # forks this slow: signals and reaping first (poll says the rest)
                # More are waiting (a burst): accept until accept() says there are no more.
            if len(children) >= max_children:
                # The rest wait in the backlog until a child exits; the next free slot
                # goes first to the listeners after this one.
                self.took_last_slot = taker
                self.update_accepting()

        return accept_clients

    def handle_accept(self, listener: Listener, batch: int = ACCEPT_BATCH) -> None:
        """Accept up to `batch` clients of `listener` now (a stop drains the backlog so),
        however slow the forks: the listener closes next."""
        self._accept_handler(listener)(POLLIN, batch, float("inf"))

    def _deny(self, listener: Listener | listeners.HeldBacklog, fd: int,
              address: tuple[object, ...]) -> None:
        """Close a client --allow refuses: counted always, logged DENY_LOG_BURST times per
        DENY_LOG_WINDOW per link, the rest summed when the window ends."""
        os.close(fd)
        name = listener.link.name
        self.accounting.denied(listener.link)
        now = time.monotonic()
        window = self.denials.get(name)
        if window is None or now >= window.ends:
            if window is not None:
                self._log_unlogged_denials(name, window)  # its timer has not fired yet
            window = self.denials[name] = DenialWindow(now + DENY_LOG_WINDOW)
        if window.lines < DENY_LOG_BURST:
            window.lines += 1
            self.log.warning("denied", link=name, client=peer_text(address))
            return
        if not window.unlogged and (self.denials_at is None or window.ends < self.denials_at):
            self.denials_at = window.ends
        window.unlogged += 1
        window.last_client = address

    def _end_denial_windows(self, now: float | None = None) -> None:
        """Log what the windows that ended (all of them, if `now` is None) left unlogged."""
        for name, window in list(self.denials.items()):
            if now is None or now >= window.ends:
                del self.denials[name]
                self._log_unlogged_denials(name, window)
        pending = [window.ends for window in self.denials.values() if window.unlogged]
        self.denials_at = min(pending) if pending else None

    def _log_unlogged_denials(self, name: str, window: DenialWindow) -> None:
        if window.unlogged:
            self.log.warning(
                "denied-unlogged", link=name, count=window.unlogged,
                last_client=peer_text(window.last_client),
                detail=f"clients denied without a line of their own (at most "
                       f"{DENY_LOG_BURST} per link per {DENY_LOG_WINDOW:g}s); "
                       f"status and metrics count every one",
            )

    def _accept_failed(self, listener: Listener | listeners.HeldBacklog, exc: OSError) -> None:
        self._pause_accepting("accept-failed", listener, exc, descriptor_limit)

    def _listener_shut(self, listener: Listener | listeners.HeldBacklog) -> None:
        """accept() failed EINVAL: the socket is not listening any more, shut down from
        outside (another process holding a copy of it, `ss -K`; its clients waiting were
        reset). Poll reports such a socket ready for good: the loop spun on accept()
        failing (100% CPU, no line) while the port refused everyone. Listen again
        (Listener.listen_again), with a line (folded per link); when that fails too,
        stop watching it, fail `check` (not_listening), and try again when accepting
        resumes or at the next SIGALRM (handle_alarm): folded per link, and the line
        that it listens again is always written after one that it could not."""
        if isinstance(listener, listeners.HeldBacklog):
            return  # its clients are accepted already: never EINVAL
        if self.taker_told:
            # Told yes at a take-over: the sockets are the taker's, which stops listening
            # on those it has no link for (`unlisten`), often before we read its close.
            # Not shut from outside: no line, and never listened on again (the port would
            # be held, a client queued there reset at our stop). Unwatched, and noted
            # as not listening: should we serve on after all (_taker_closed), the next
            # SIGALRM watches it again, and its handler lands here again, listening again.
            self._unwatch(listener.fd)
            self.not_listening.add(listener)
            return
        name = listener.link.name
        listen = _listener_ends(listener)[0]
        try:
            listener.listen_again()
            self._listen_options([listener])  # as at its start, where they took
        except (OSError, ConfigError) as exc:  # OSError: socket() out of descriptors
            self._unwatch(listener.fd)
            self.not_listening.add(listener)
            failures = fold(self.pause_logs, f"listener-lost {name}")
            if failures:
                error = exc.strerror if isinstance(exc, OSError) else str(exc)
                self.log.error("listener-shut", link=name, listen=listen, error=error,
                               failures=failures,
                               detail="the port stopped listening (its socket shut down from "
                               "outside: another process holding it, `ss -K`) and cannot "
                               "listen again: not "
                               "served, `check` fails; trying again when accepting resumes "
                               "and at each SIGALRM (at least every 60 s)")
            return
        self.not_listening.discard(listener)
        failures = fold(self.pause_logs, f"listener-shut {name}")
        if self.pause_logs.pop(f"listener-lost {name}", None) is not None:
            failures = failures or 1
        if failures:
            self.log.error("listener-shut", link=name, listen=listen, failures=failures,
                           detail="the port stopped listening (its socket shut down from "
                           "outside: another process holding it, `ss -K`; its clients "
                           "waiting were reset): listening again")

    def _fork_failed(self, listener: Listener | listeners.HeldBacklog, fd: int,
                     address: tuple[str, int], base: int, exc: OSError) -> None:
        """No child for this client (a pids limit, no memory): hold it, first in line for
        the next fork, which comes when a child exits or the pause ends."""
        client = (fd, address)
        if isinstance(listener, listeners.HeldBacklog):
            listener.clients.appendleft(client)  # it was already held: keep its place
        else:
            self.held.append(listeners.HeldBacklog(listener, [client], self.accounting.held_gone))
        self.accounting.slots.release(base)
        self.accounting.fork_failed(listener.link)
        self._pause_accepting("fork-failed", listener, exc, self._fork_limit)

    def _pids_limit_now(self) -> int | None:
        """The pids limit as pids.max says now, the smallest of the files found at start
        (None: "max" in each, or none readable). os.open and os.read, as at start; out of
        descriptors (the failed fork's client took the last), the limit found at start."""
        found = None
        for path in self.options.pids_limit_files:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    # Not that no limit is set: the line blamed threads-max or pid_max.
                    return self.options.pids_limit
                continue  # the root cgroup's: none; a cgroup removed
            try:
                text = os.read(fd, 32).strip()
            except OSError:
                continue
            finally:
                os.close(fd)
            if text.isdigit() and (found is None or int(text) < found):
                found = int(text)
        return found

    def _nproc_limit_now(self) -> int | None:
        """The soft RLIMIT_NPROC now (`prlimit --nproc --pid` changes it while we run), or
        None: none, or the kernel exempts us (root), as found at start."""
        if self.options.nproc_exempt:
            return None
        soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        return None if soft == resource.RLIM_INFINITY else soft

    def _fork_limit(self, exc: OSError) -> str:
        """The limit a failed fork likely met, in words for `fork-failed`'s detail: the
        kernel says EAGAIN alike for a cgroup's pids.max and the user's RLIMIT_NPROC, and
        ENOMEM for memory. The pids and nproc limits are read again, as they are now:
        `docker update --pids-limit` or `prlimit --nproc` since the start made those
        found then stale (the user's other tasks are those counted at start). Called
        only when a line is due (once per ERROR_LOG_EVERY): a fork that works does none
        of it, nor does each retry."""
        if exc.errno == errno.ENOMEM:
            memory = self.options.memory_limit
            return ("out of memory: likely the memory limit of "
                    f"{mebibytes(memory)} (memory.max; the container's -m)"
                    if memory is not None else "out of memory, and no memory limit was "
                    "found at start: the machine's, or one set since")
        if exc.errno != errno.EAGAIN:
            return ""
        metrics = self.options.metrics is not None
        pids, nproc = self._pids_limit_now(), self._nproc_limit_now()
        # The limit holding the fewest connections is the one met first (pids on a tie:
        # a container's own, the likelier to be low).
        fits = [(fit, name) for name, fit in (
            ("pids", None if pids is None else children_within_pids(pids, metrics)),
            ("nproc", None if nproc is None else children_within_nproc(
                nproc, self.options.nproc_others, metrics))) if fit is not None]
        if not fits:
            return ("no pids or nproc limit found, read again now: likely the kernel's "
                    "threads-max or pid_max")
        name = min(fits, key=lambda fit: fit[0])[1]
        if name == "pids":
            return (f"likely the cgroup's pids limit of {pids}{self._since(pids, 'pids')} "
                    "(pids.max; the container's --pids-limit), which counts its processes "
                    "and threads")
        return (f"likely the user's nproc limit of {nproc}{self._since(nproc, 'nproc')} "
                "(RLIMIT_NPROC; ulimit -u, LimitNPROC=), which counts all the user's "
                "processes and threads")

    def _since(self, now: int | None, name: str) -> str:
        """", N at start" where the `name` limit found at start (status shows it) was not
        the one in force now."""
        then = self.options.pids_limit if name == "pids" else self.options.nproc_limit
        if then == now:
            return ""
        return f", {'none' if then is None else then} at start"

    def _pause_accepting(self, event: str, listener: Listener | listeners.HeldBacklog,
                         exc: OSError, cause: Callable[[OSError], str] | None = None) -> None:
        """Pause accepting for a moment; log `event` once per ERROR_LOG_EVERY while it
        repeats (every ACCEPT_BACKOFF at a pids or descriptor limit), with a count, and
        `cause`'s words, what the failure likely met, first in the detail (asked only
        when a line is due)."""
        self.resume_at = time.monotonic() + ACCEPT_BACKOFF
        self._log_repeating(event, exc, f"pausing accepts for {ACCEPT_BACKOFF}s at a time",
                            cause, link=listener.link.name)
        self.update_accepting()

    def _log_repeating(self, event: str, exc: OSError, detail: str,
                       cause: Callable[[OSError], str] | None = None,
                       **fields: object) -> None:
        """Log `event` once per ERROR_LOG_EVERY while it repeats, with the count of
        failures since its last line: at a resource limit it recurs every backoff.
        `cause`'s words for `exc`, what the failure likely met, go first in the detail
        (asked only when a line is due)."""
        failures = fold(self.pause_logs, event)
        if failures:
            why = cause(exc) if cause is not None else ""
            self.log.error(event, **fields, error=exc.strerror, failures=failures,
                           detail=f"{why}; {detail}" if why else detail)

    def _prepare_relay(self, listener: Listener) -> None:
        """What every child of this listener hands to relay.serve, built once: a fresh
        child walking self.* attribute chains would copy the pages they touch. (Its accept
        handler, which binds the link, is built again when accepting resumes.)"""
        link = listener.link
        listener.accept_clients = None
        listener.relay_args = (
            link,
            self.addresses.get(link.key, []),
            self.options,
            self.accounting.slots.counters,
            self.log,
            # The fallback's due time after the lines, not an argument of its own: a child
            # writes the reference count of each argument (a page copied), and this list
            # only a fallback reads (relay.serve). Then the loop check's map, or None.
            (*relay.prepared_lines(self.log, link),
             self.fallback_due.setdefault((link.name, link.target), [0.0]),
             self._own_for(link)),
            os.getpid(),
        )

    def _own_for(self, link: Link) -> relay.OwnListeners | None:
        """The own listeners a child of `link` judges its addresses against (relay's
        _loops_back): only when the target's port is one of theirs, so that every other
        link's children do no more than read a None."""
        own = self.own_listeners
        return own if link.target.port in own else None

    def _map_own_listeners(self, listening: list[Listener]) -> None:
        """Map the listeners in force, and their links' addresses, for the children's loop
        check (relay.OwnListeners). Filled in place: the children's arguments hold this
        one dict. Pure work, no lookup: the addresses are those already resolved. Again
        whenever listeners or addresses change (start, reload, a resolve), and a listener
        whose children now need the map (or no longer do) is prepared anew."""
        own = self.own_listeners
        own.clear()
        for listener in listening:
            own.setdefault(listener.port, []).append(
                (relay.bound_host(listener.link.bind),
                 self.addresses.get(listener.link.key, [])))
        for listener in listening:
            lines = listener.relay_args[5] if listener.relay_args else None
            if lines is not None and lines[3] is not self._own_for(  # type: ignore[index]
                    listener.link):
                self._prepare_relay(listener)

    # -- signals -----------------------------------------------------------------------

    def handle_signals(self, events: int) -> None:
        for signum in self.signals.drain():
            if signum == signal.SIGCHLD:
                self.handle_chld()
            elif signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self.handle_stop(signum)
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGUSR1:
                self.handle_usr1()
            elif signum == signal.SIGALRM:
                self.handle_alarm()
        if self.reload_asked:  # on the control socket, which woke this pipe
            self.reload()

    def handle_chld(self, scan: bool = False) -> None:
        """Reap every child that has exited, ours or (as PID 1) anybody's orphan.

        By its pid when it can: `wait4(-1)` has the kernel look through every child of
        ours for one that exited, and the last call, which finds none, through all of
        them: at 20,000 idle connections that was three quarters of the supervisor's
        time, new connections came 17 times slower and a stop took seconds. Since Linux
        5.12 `wait4(pid)` goes straight to that child. So a relay child writes its pid to
        the ended pipe as its last act, and those pids are reaped one by one. A child
        that wrote nothing (killed by a signal: the OOM killer, kill -9, the stop's KILL;
        the helpers: resolver, reporter, metrics; an orphan, as PID 1; the pipe full) is
        found by a scan of them all: when the pids reaped nothing (its SIGCHLD brought us
        here), when asked (`scan`), and SCAN_EVERY after a reap that did not scan, here or
        once the loop has been quiet that long (its SIGCHLD may have come folded into
        that of a child that wrote, and none other come).

        A pid read from the pipe may be that of a child reaped already (by a scan), even
        reused since by a new child of ours: harmless, since wait4 only ever tells a
        child's real state (one still running stays pending until it exits).
        """
        resolve_again = False
        ended = self.ended
        # The pids written since (each one write of 4 bytes: whole, or not at all), read
        # into a buffer kept for it and cast, not unpacked: every page the supervisor
        # writes is copied once per fork, and a fresh buffer per read cost pages.
        while True:
            try:
                count = os.readv(self.ended_r, self.ended_buffer)
            except OSError:
                break  # none (EAGAIN); or no pipe (EBADF: a supervisor not started)
            if count == ENDED_PID_SIZE:  # one, the usual case: no memoryview sliced for it
                ended.add(self.ended_pids[0])
            else:
                ended.update(self.ended_pids[:count // ENDED_PID_SIZE])
            if count < ENDED_READ:
                break
        reaped = False
        for pid in [*ended]:  # a copy: _reaped discards from it (no list() call)
            try:
                found, status, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                ended.discard(pid)  # reaped already (by a scan)
                continue
            if found:  # else it has not quite exited yet: its SIGCHLD brings us back
                reaped = True
                resolve_again = self._reaped(found, status, usage) or resolve_again
        if reaped and not scan:
            # Scan anyway once SCAN_EVERY has passed since the first reap not followed by
            # one: done here while connections end, by the loop once it has been quiet.
            now = time.monotonic()
            if self.scan_at is None:
                self.scan_at = now + SCAN_EVERY
            scan = now >= self.scan_at
        if scan or not reaped:
            self.scan_at = None
            while True:
                try:
                    pid, status, usage = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                resolve_again = self._reaped(pid, status, usage) or resolve_again
        if resolve_again:
            self.start_resolver()
        if self.held:
            self.serve_held()
        self.update_accepting()

    def _reaped(self, pid: int, status: int, usage: struct_rusage) -> bool:
        """Child `pid` was reaped (handle_chld): its accounting and lines. Whether the
        links' names are to be looked up again."""
        self.ended.discard(pid)
        if pid in self.resolver_pids:
            self.resolver_pids.remove(pid)
            # A lookup asked for while two were not reaped yet (see start_resolver)
            return self.resolve_pending
        if pid in self.reporter_pids:
            self.reporter_pids.remove(pid)
            if pid == self.table_writer:
                self.table_writer = 0
                if self.table_pending:
                    self.handle_usr1()
            return False
        if pid == self.metrics_pid:
            self.metrics_pid = 0
            self._close_metrics_handoff()
            self.metrics_exit = describe_status(status)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == installed.FILES_CHANGED:
                # It said why (metrics-failed), and another start would run the same
                # files: not restarted, and its port closed, so scrapers are refused
                # rather than left waiting, until forkproxy itself is restarted.
                self.metrics_exit += f": {installed.ADVICE}, restart forkproxy"
                self.metrics_since = time.monotonic()
                self._close_metrics_port()
                return False
            if (not self.stopping and os.WIFEXITED(status)
                    and os.WEXITSTATUS(status) == listeners.METRICS_SOCKET_SHUT
                    and self._metrics_listen_again()):
                # It said why (metrics-failed): the port listens again, and a process
                # started now serves it. Not backed off: it did not fail of itself.
                self._count_metrics_death()
                self.metrics_restarts += 1
                self.metrics_at = time.monotonic()
                self.log.warning("metrics-died", status=describe_status(status),
                                 detail="its port listens again on a new socket: restarting now")
            elif not self.stopping:
                delay = self._metrics_died()
                self.log.warning("metrics-died", status=describe_status(status),
                                 detail=f"restarting in {delay:g}s")
            else:
                self._count_metrics_death()
                self._close_metrics_port()
            return False
        # Its record and slot are read before finished() zeroes them: what it left of a
        # failed connect, for the folded lines (see relay.serve); and, for a child
        # killed by a signal (`live`), which wrote no close line, the line in its place.
        child = self.accounting.children.get(pid)
        live = child if os.WIFSIGNALED(status) else None
        failure = 0 if child is None else self.accounting.slots.counters[child[2] + FAILURE]
        if failure & FELL_BACK and not failure & COUNTED:
            assert child is not None
            self._fallbacks([(child, failure)])
        # The address a loop was refused at, or a failed connect tried last, while the
        # slot holds it (0 for a connection that connected: one test of a word already
        # read).
        noted = (noted_address(self.accounting.slots.counters, child[2], failure)
                 if failure & _NOTED and child is not None else None)
        # to_term is set once the grace period is over and we TERM the children: only
        # then is a signal's death ours. During the grace, as outside a stop, it is the
        # OOM killer's or someone's kill -9.
        grace_over = self.to_term is not None
        if live is not None and grace_over:
            self._log_terminated(pid, status, live)
        moved = self._moved(live) if live is not None and not grace_over else None
        # No address of this host's to send to the upstream from (IPv6 disabled, for an
        # IPv6 one): EADDRNOTAVAIL as out of local ports is, counted `unreachable`, not
        # `no-local-port`, and said so. Probed here, for a failed connect's that error
        # only (`failure` is 0 for one that connected: one test of a word already read).
        unsendable = (bool(failure) and status == _CONNECT_FAILED_STATUS and child is not None
                      and self._unsendable(child[0], failure, noted))
        record = self.accounting.finished(pid, status, usage.ru_utime + usage.ru_stime,
                                          "unreachable" if unsendable else None)
        if record is None:
            self.log.debug("reaped-orphan", child_pid=pid, status=describe_status(status))
        elif status == _CONNECT_FAILED_STATUS:
            self._connect_failed(record, failure, noted, unsendable)
            # Perhaps the name points elsewhere now (a container recreated with a new
            # address): look again, without waiting for the timer. (A child that found
            # it does sends SIGALRM as it connects: see relay.serve.)
            return record[0].target.is_name
        elif moved is not None:
            # It died before writing its close line (the OOM killer, a kill -9): this
            # line is that connection's only record, so it carries what the line would.
            link, client, _, _ = record
            self.log.warning("child-died", child_pid=pid, link=link.name,
                             client=peer_text(client), upstream=str(link.target),
                             status=describe_status(status),
                             bytes_up=moved[0], bytes_down=moved[1], duration=moved[2])
        return False

    def _fold_link(self, event: str, link: Link, failures: int, kind: int = 0) -> int:
        """Count `failures` more of `event` on `link`; the count since its last line
        when a line is due now (the first, or ERROR_LOG_EVERY after the last), else 0.
        Per link and target, not per event name as _log_repeating: an upstream is down or
        not on its own, and one link's steady failures must not hide another's for good,
        nor those of a link's old target (children a reload left) its new one's. And per
        `kind` (an errno): `Connection refused` turning into `Connection timed out` is
        news (the host, not only its service, gone), which the refusals' window hid."""
        return fold(self.link_folds, (event, link.name, link.target, kind), failures)

    @staticmethod
    def _unsendable(link: Link, failure: int, noted: str | None) -> bool:
        """Did a failed connect's EADDRNOTAVAIL mean that no address of this host's can
        send to the upstream (listeners.no_source_address), not that local ports ran out?
        The address it tried: a name's last one (`noted`), an address target's own. One
        UDP socket's connect, no packet sent, for that error only: ~9 us a failure, where
        the failed child's fork and reap alone take ~580 (measured: not worth a cache)."""
        if failure_errno(failure) != errno.EADDRNOTAVAIL:
            return False
        address = noted if link.target.is_name else link.target.host
        return address is not None and listeners.no_source_address(address, link.target.port)

    def _connect_failed(self, record: ChildRecord, failure: int,
                        noted: str | None = None, unsendable: bool = False) -> None:
        """A reaped child's failed connect (relay.serve left its error's code): the folded
        `connect-failed` line. Written here, not by each child: a dead upstream fails every
        client, and a line each flooded the log in the very outage it is read in.
        `noted`: the address a loop was refused at, which the line's error names, or the
        last one a name's connect tried, which it names as `address` (a name's addresses
        change, and one of several may be the dead one; an address target is its own).
        `unsendable`: no address of this host's could send to it (_unsendable)."""
        link = record[0]
        kind = failure_errno(failure)  # 0 for a failed lookup of the child's own
        failures = self._fold_link("connect-failed", link, 1, kind)
        if failures:
            self._log_connect_failed(link, record[1], failure, noted, unsendable, failures)
        else:
            self.link_fold_last[("connect-failed", link.name, link.target, kind)] = (
                link, record[1], failure, noted, unsendable)

    def _log_connect_failed(self, link: Link, client: tuple[object, ...], failure: int,
                            noted: str | None, unsendable: bool, failures: int) -> None:
        """The `connect-failed` line of `failures` failures, the last one of `client`
        (`unsendable`: as its reap found it, so that the line says what the metric
        counted)."""
        # Out of local ports toward the upstream (one address takes at most
        # ip_local_port_range's ~28,000 connections, fewer than --max-children may
        # be), a blackhole or prohibit route: said, as the error alone does not.
        kind = failure_errno(failure)
        looped = noted if failure & LOOPED else None
        address = noted if link.target.is_name else link.target.host
        detail = _error_detail(kind, address)
        if unsendable and address is not None:
            # Not out of ports: no address to send from (IPv6 off on this host), which
            # the ports' advice would have operators widen a range for nothing.
            detail = _NO_SOURCE_ADDRESS[":" in address]
        elif (kind in _LOOPBACK_DOWN_ERRORS and address is not None
              and (address == "::1" or address.startswith(("127.", "::ffff:127.")))
              and listeners.loopback_down()):
            detail = _LOOPBACK_DOWN
        tried = ({"address": peer_text((noted, link.target.port))}
                 if noted is not None and looped is None and link.target.is_name else {})
        self.log.warning("connect-failed", link=link.name, client=peer_text(client),
                         upstream=str(link.target), **tried,
                         error=failure_text(failure, link.target.host, looped),
                         failures=failures, **({"detail": detail} if detail else {}))

    def _log_folded_failures(self, wired: set[tuple[str, Endpoint]] | None = None) -> None:
        """Say what the connect-failed and connect-fallback windows folded since their
        last line, for the windows about to be dropped: those of (link name, target) not
        in `wired` (a reload pointed the link elsewhere or removed it), or all of them (the
        exit). No failure after the window would ever write their count: the log's
        `failures` then summed to less than upstream_failures
        (forkproxy_upstream_connect_failures_total) for good; as `denied-unlogged` says
        the denials a window left unlogged, at a reload and at exit."""
        for key, (failures, _) in self.link_folds.items():
            if not failures or (wired is not None and key[1:3] in wired):
                continue
            if key[0] == "connect-failed":
                last = self.link_fold_last.get(key)
                if last is not None:
                    self._log_connect_failed(*last, int(failures))
            else:
                fields = self.fallback_fold_last.get(key)
                if fields is not None:
                    self.log.warning("connect-fallback", **fields, failures=int(failures))
        self.link_fold_last = {key: last for key, last in self.link_fold_last.items()
                               if wired is not None and key[1:3] in wired}
        self.fallback_fold_last = {key: last for key, last in self.fallback_fold_last.items()
                                   if wired is not None and key[1:3] in wired}

    def count_fallbacks(self) -> None:
        """Count the fallbacks of live children not counted yet (SIGALRM: a child that fell
        back when its link's line was due says so, as the --resolve-every timer ticks), and
        write the lines due. One read of a shared word per child, at most once per link per
        ERROR_LOG_EVERY with fallbacks going on (and per timer tick)."""
        counters = self.accounting.slots.counters
        found = []
        for record in self.accounting.children.values():
            word = counters[record[2] + FAILURE]
            if word & FELL_BACK and not word & COUNTED:
                found.append((record, word))
        if found:
            self._fallbacks(found)

    def _fallbacks(self, found: list[tuple[ChildRecord, int]]) -> None:
        """Count these fallbacks (each child's record and FAILURE word), a live child's
        marked counted in its slot (the child writes it once, before, and never again), and
        write one `connect-fallback` line per link whose line is due, about its last one."""
        counters = self.accounting.slots.counters
        # Per link name and target, as _fold_link folds them: a reload may have left
        # children of a link's old target beside those of its new one.
        last: dict[tuple[str, Endpoint], tuple[ChildRecord, int]] = {}
        counts: dict[tuple[str, Endpoint], int] = {}
        for record, word in found:
            counters[record[2] + FAILURE] = word | COUNTED
            key = (record[0].name, record[0].target)
            counts[key] = counts.get(key, 0) + 1
            last[key] = (record, word)
        for key, (record, word) in last.items():
            link, base = record[0], record[2]
            failures = self._fold_link("connect-fallback", link, counts[key])
            connected, failed = fallback_addresses(counters, base, word, link.target.port)
            fields: dict[str, object] = {
                "link": link.name, "client": peer_text(record[1]),
                "upstream": str(link.target), "connected": connected, "failed": failed,
                "failed_error": fallback_error(word, link.target.host)}
            # An address refused on this host (a blackhole or prohibit route: a network
            # plugin's for an address no container holds now) is named as connect-failed
            # names it: `Invalid argument` alone sends operators the wrong way.
            detail = _error_detail(failure_errno(word), failed)
            if detail is not None:
                fields["detail"] = detail
            if not failures:
                # Read now, while the slot holds them: said if the window is dropped
                # before a fallback after it writes its count (_log_folded_failures).
                self.fallback_fold_last[("connect-fallback", *key, 0)] = fields
                continue
            self.log.warning("connect-fallback", **fields, failures=failures)
            due = self.fallback_due.get(key)
            if due is not None:
                due[0] = time.monotonic() + ERROR_LOG_EVERY

    def _moved(self, record: ChildRecord) -> tuple[int, int, float]:
        """A live child's bytes up and down (its shared counters) and duration so far."""
        counters, base = self.accounting.slots.counters, record[2]
        return counters[base], counters[base + 1], time.monotonic() - record[3]

    def _log_terminated(self, pid: int, status: int, record: ChildRecord) -> None:
        """The close line of a connection the stop ended (grace over, TERM then KILL): its
        child died by the signal before it could write its own."""
        link, client = record[0], record[1]
        moved = self._moved(record)
        self.log.info("close", link=link.name, client=peer_text(client),
                      upstream=str(link.target), bytes_up=moved[0], bytes_down=moved[1],
                      duration=moved[2], outcome="killed",
                      status=describe_status(status, sent_kill=pid in self.killed),
                      child_pid=pid)

    def serve_held(self) -> None:
        """Fork for held clients while there is room under --max-children and forks
        succeed: the held backlogs (each a link's at a stop, or a client whose fork
        failed, held first) take turns, a client each, as the links' backlogs do at the
        limit (update_accepting); within one, in the order they were held. Served one
        backlog after the other, a stop gave every slot that freed to the first link's
        clients, and the other links' were closed unserved when the grace ran out."""
        held, children = self.held, self.accounting.children
        # A handler per client, built as it is served: a handler binds its link, which a
        # reload may change meanwhile (a held client goes where its port points now).
        while held and len(children) < self.options.max_children:
            first = held[0]
            forked = len(children)
            self._accept_handler(first)(POLLIN, 1)
            if not first.clients:
                del held[0]  # served, or gone (reset while held)
            elif len(children) == forked:
                break  # its fork failed: first in line still, for the next that works
            else:
                held.append(held.pop(0))  # the next backlog's turn

    def handle_stop(self, signum: int, handed_over: bool = False) -> None:
        """Stop accepting, and let the connections finish within --grace. `handed_over`:
        our listening sockets (and the metrics one) are the supervisor's that took over
        (handle_taker): the clients in their backlogs are left to it, and our copies are
        closed, not shut down, which would end them for it too."""
        name = signal.Signals(signum).name
        if self.stopping:
            if signum in (signal.SIGINT, signal.SIGQUIT):
                self.log.warning(
                    "stopping-now", signal=name, connections=len(self.accounting.children)
                )
                if self.kill_at is None:  # not TERMed yet: now (else KILL comes anyway)
                    self.term_at = time.monotonic()
                if self.handed_over and self.metrics_pid:
                    # Nor do the scrapes our metrics process finishes (_metrics_finishing):
                    # "at once" waited for them, up to METRICS_HANDOVER_WAIT.
                    try:
                        os.kill(self.metrics_pid, signal.SIGTERM)
                    except OSError:
                        pass
            return
        # SIGTERM blocked for good, first: the children are TERMed (grace over, SIGQUIT's
        # at once) only during a stop, and a child forked since (the backlog's drain just
        # below, held clients served later) must not lose a TERM that comes before its
        # handler is set: blocked across its fork, it unblocks SIGTERM once that is set
        # (_accept_handler says more). So nothing per connection while serving. The
        # supervisor needs SIGTERM no more: a second one does nothing (above), pending
        # it is discarded at exit as _serve.py's would be, and nothing forked from here
        # on needs it: the reporters and resolvers are only ever SIGKILLed and unblock it
        # anyway (signals.reset_in_child), the metrics process is not restarted.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        self.term_blocked.append(True)
        left_to_taker = False
        if self.taker is not None and not handed_over:
            # A stop while handing over: the taker holds our listening sockets already.
            # Shutting them down (a stop's close_all) ended them for it too: it gave up at
            # its `go`, and nobody served. They are its now: it is told yes (its `go`, sent
            # or to come, reads it) and serves; their backlogs and our metrics port are
            # left to it, as after its `go`. One gone already (EPIPE) has them no more.
            told = self.taker_told
            taker = self._drop_taker()
            handed_over = left_to_taker = told or self._tell_taker_yes(taker)
            taker.close()
            if left_to_taker:
                # Nor is the pid file ours to remove at exit: the taker may be writing it
                # now (in place: we would read our PID there and unlink its file).
                self.pid_file_written = None
        for listener in [] if handed_over else self._in_turn():  # held in that order: the
            self._take_backlog(listener, "stopping")  # turns go on (serve_held)
        self.taker_deadline = None
        self._forget_late_taker()
        self.stopping = True
        self.handed_over = handed_over
        self.stop_began = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0)  # no new children: names no longer matter
        self.resolve_tick_at = None
        self.control_check_at = None  # nor, for the little time left, the control socket's
        # Nor a metrics process: a restart still due would stay armed, never fired, and
        # poll every turn of the loop with a zero timeout (100% CPU until the last child).
        self.metrics_at = None
        if handed_over and self.metrics_sock is not None:
            # Its port is the new metrics process's: ours stops serving it now.
            self.metrics_sock.close()
            self.metrics_sock = None
            if self.metrics_pid:
                self._tell_metrics_handed_over()  # reaped as ever (handle_chld)
        if not self.metrics_pid:
            self._close_metrics_port()
        self.update_accepting()
        self.check_drops(closing=self.listeners)
        if handed_over:
            for listener in self.listeners:
                listener.sock.close()
        else:
            listeners.close_all(self.listeners)  # from now on, new clients are refused
        self.listeners = []
        # SIGQUIT (a terminal's Ctrl-\) stops at once, as a second Ctrl-C does: no grace.
        grace = 0.0 if signum == signal.SIGQUIT else self.options.grace
        self.term_at = time.monotonic() + grace
        self.log.info("stopping", signal="take-over" if handed_over and not left_to_taker
                      else name, connections=len(self.accounting.children),
                      waiting=sum(len(held.clients) for held in self.held), grace=grace,
                      **({"detail": "asked while handing over: the listening sockets are "
                          "left to the supervisor taking over, which serves"}
                         if left_to_taker else {}))

    def _take_backlog(self, listener: Listener, why: str) -> None:
        """Accept the clients in the backlog of a listener about to close (a stop, or a
        reload that removes it). They have finished their handshake: closing the
        listener would reset them, so they are served like the ones accepted before: at
        once while under --max-children, and those beyond it are accepted and held (not
        forked: the limit stands) until a child exits (or, stopping, the grace ends)."""
        if listener in self.not_listening or not _may_be_waiting(listener):
            # Nobody in its backlog: no accept() to try, which out of descriptors would
            # fail anyway (Linux wants a free one before it looks at the queue) and be
            # logged as clients reset that were never there. (A listener shut down from
            # outside has no backlog, and poll says it ready for good.)
            return
        if not self.held:
            # Else clients whose fork failed are first in line: the backlog is held behind
            # them, and serve_held (below) forks for all of them in that order.
            self.handle_accept(listener, batch=self.options.max_children)
        clients, error = listeners.accept_backlog(listener)
        held = []
        for fd, address in clients:
            # --allow's check now, not when a child is free: a held client it refuses
            # would take that turn and leave the next one waiting with a slot free, and
            # keep a removed link in status as a child to come.
            if self.allow and not is_allowed(self.allow, address[0]):
                self._deny(listener, fd, address)
            else:
                held.append((fd, address))
        if held:
            self.held.append(listeners.HeldBacklog(listener, held, self.accounting.held_gone))
        if error is not None and _may_be_waiting(listener):
            self.log.error("accept-failed", link=listener.link.name, error=error.strerror,
                           detail=f"{why}: the clients left in the backlog are reset")
        if self.held and len(self.accounting.children) < self.options.max_children:
            self.serve_held()  # a client the accept above denied left a child's room

    def handle_timers(self) -> None:
        now = time.monotonic()
        if self.denials_at is not None and now >= self.denials_at:
            self._end_denial_windows(now)
        if self.metrics_at is not None and now >= self.metrics_at and not self.stopping:
            self.start_metrics()
        if self.resume_at is not None and now >= self.resume_at:
            self.resume_at = None
            if self.held:  # a client whose fork failed goes before the backlog
                self.serve_held()
            self.update_accepting()
        if self.control_at is not None and now >= self.control_at and self.control is not None:
            self.control_at = None
            self._watch(self.control.fileno(), self.handle_control_accept)
        if self.term_at is not None and now >= self.term_at and self.kill_at is None:
            if self.to_term is None:
                self._drop_held()
                if self.accounting.children:
                    self.log.warning("grace-over", connections=len(self.accounting.children),
                                     detail="terminating the connections left")
                self.to_term = list(reversed(self.accounting.children))
                # A batch ahead: the children end one while the loop reaps the other's.
                self._term_batch()
            self._term_batch()
            if not self.to_term:
                # KILL_AFTER from the last TERM, not the first: TERMed in batches, the last
                # children of thousands are TERMed well after the first ones.
                self.kill_at = time.monotonic() + KILL_AFTER
                # Done with: left in the past, it made every poll return at once, 100% CPU
                # until the last child was reaped (for ever for one stuck in the kernel).
                self.term_at = None
            # Else left due: the loop polls without waiting, serves what came meanwhile
            # (control requests, the children that ended), and comes back for the next batch.
        elif self.kill_at is not None and now >= self.kill_at:
            self._signal_children(signal.SIGKILL)
            self.kill_at = now + KILL_AFTER
            # And reap without being told: a child whose SIGCHLD never came (seen when a
            # tracer let go of it after it exited) stayed a zombie, KILLed each second,
            # and the stop never ended.
            self.handle_chld(scan=True)
        if self.scan_at is not None and now >= self.scan_at:
            self.handle_chld(scan=True)  # a child that exited unannounced: see handle_chld

    def _held_per_link(self) -> dict[str, int]:
        """Link name -> clients held, waiting for a child (see handle_stop, _fork_failed)."""
        count: dict[str, int] = {}
        for held in self.held:
            count[held.link.name] = count.get(held.link.name, 0) + len(held.clients)
        return count

    def _drop_held(self) -> None:
        """The grace period is over: close the clients still waiting for a child (at
        --max-children, or after a failed fork), unserved, and say how many per link."""
        dropped = self._held_per_link()
        for held in self.held:
            held.close()
        self.held = []
        for name, count in dropped.items():
            if count:
                self.log.warning("dropped", link=name, clients=count,
                                 detail="still waiting for a child when the grace period "
                                        "ended: closed unserved")

    def _term_batch(self) -> None:
        """TERM the next TERM_BATCH children of to_term (those not reaped meanwhile: a pid
        reaped may be reused already, by a reporter forked since)."""
        assert self.to_term is not None
        batch = self.to_term[-TERM_BATCH:]
        del self.to_term[-TERM_BATCH:]
        children = self.accounting.children
        self._signal_children(signal.SIGTERM, [pid for pid in batch if pid in children])

    def _signal_children(self, signum: int, pids: list[int] | None = None) -> None:
        """Send `signum` to `pids`, by default to every child."""
        for pid in list(self.accounting.children) if pids is None else pids:
            try:
                os.kill(pid, signum)
                if signum == signal.SIGKILL:
                    self.killed.add(pid)
            except ProcessLookupError:
                pass  # exited, not reaped yet: the SIGCHLD is on its way
            except OSError as exc:
                # EPERM (a security module's rule): the stop must go on, and KILL follows
                # a TERM refused (KILL_AFTER), then again, until it is reaped.
                self._log_repeating("signal-failed", exc, f"cannot send "
                                    f"{signal.Signals(signum).name} to a child", child_pid=pid)

    def handle_usr1(self) -> None:
        """The status table in the log; asked for explicitly, so written even with -q.

        Written by a forked reporter, as `status` is answered (answer_in_child says why),
        and above all so that a log reader that has fallen behind blocks the reporter in
        write(), not the loop; here only if no reporter can be forked. One at a time: a
        SIGUSR1 while one writes (a log that stays blocked) gets the next table written
        when it ends, rather than more writers, one more blocked process per signal."""
        if self.table_writer:
            self.table_pending = True
            return
        self.table_pending = False
        counters = self.accounting.slots.copy()  # with the heap the reporter gets (copy())
        # Read here, as for `status` (answer_in_child): the reporter closes the listening
        # sockets it inherits, and the drops' running count is ours to keep.
        kernel = self._read_listeners()
        self.table_writer = self._in_reporter(lambda: self._log_status_table(counters, kernel))
        if not self.table_writer:
            self._log_status_table(kernel=kernel)

    def _log_status_table(self, counters: memoryview | None = None,
                          kernel: list[ListenerReading] | None = None) -> None:
        """One `status-link` line per listener, with what `status` shows of it, and one
        `status-connection` per live connection. `counters`, `kernel`: as status_reply's."""
        snapshot = self.accounting.snapshot(self._held_per_link(), counters)
        links: dict[str, dict[str, object]] = snapshot["links"]  # type: ignore[assignment]
        table = self._listener_table(kernel)
        for listener, row in zip(self.listeners, table, strict=True):
            stats = links.get(listener.link.name, {})
            outcomes: dict[str, int] = stats.get("outcomes", {})  # type: ignore[assignment]
            # The addresses new connections go to now: what an operator sends SIGUSR1 to
            # learn after a DNS change. Written as the `resolved` line writes them; empty
            # while a name has never resolved (each child then looks it up itself).
            addresses = self.addresses.get(listener.link.key, [])
            listen, upstream = _listener_ends(listener)
            self.log.emit_requested("status-link", {
                "link": listener.link.name,  # as status-connection has it: the join key
                # As `status --json` names them: the address alone, then the target (the
                # whole `LISTEN -> TARGET (LINK)` was in `listen`, repeating `link`).
                "listen": listen,
                "upstream": upstream,
                "addresses": " ".join(peer_text(address[1]) for address in addresses),
                "active": stats.get("active", 0),
                "waiting": stats.get("waiting", 0),
                "total": stats.get("connections", 0),
                "empty": stats.get("empty", 0),
                "upstream_failures": stats.get("upstream_failures", 0),
                "denied": stats.get("denied", 0),
                "bytes_up": stats.get("bytes_up", 0), "bytes_down": stats.get("bytes_down", 0),
                # The rest of what `status` shows per link, by its --json names: whether
                # the port listens, its accept queue and the handshakes the kernel
                # dropped there (left out where the kernel cannot say: status's `-`), the
                # forks and lookups that failed, and how connections ended (its ENDED).
                "listening": row["listening"],
                **{key: row[key] for key in ("queued", "backlog", "drops")
                   if row[key] is not None},
                "fork_failures": stats.get("fork_failures", 0),
                "resolve_failures": stats.get("resolve_failures", 0),
                "address_changes": stats.get("address_changes", 0),
                "ended": ended_text(outcomes),
            })
        for child in snapshot["children"]:  # type: ignore[attr-defined]
            fields = dict(child)
            fields["child_pid"] = fields.pop("pid")  # `pid` is the logging process's own
            self.log.emit_requested("status-connection", fields)

    # -- names -------------------------------------------------------------------------

    def _resolve(self, link: Link) -> list[Address]:
        """The link's addresses, looked up here and now; [] if that fails. For a target
        that is an address (start, reload): a name is left to start_resolver's child."""
        self.resolve_failing.discard(link.name)  # asked for now: a failure is always logged
        try:
            return relay.lookup(link.target.host, link.target.port)
        except OSError as exc:  # not only socket.gaierror: see relay.lookup_error
            self._lookup_failed(link, relay.lookup_error(exc))
            return []

    def _lookup_failed(self, link: Link, error: object, detail: str | None = None) -> None:
        """Count a failed lookup of the link's name, and log it once per outage, not once
        a second while it lasts (the count is in status and metrics; apply_resolved logs
        the recovery)."""
        self.accounting.stats(link).resolve_failures += 1
        level = DEBUG if link.name in self.resolve_failing else WARNING
        self.resolve_failing.add(link.name)
        fields: dict[str, object] = {"link": link.name, "host": link.target.host, "error": error}
        if detail is not None:
            fields["detail"] = detail
        self.log.emit(level, "resolve-failed", fields)

    def _named_targets(self) -> list[tuple[str, int]]:
        targets: list[tuple[str, int]] = []
        for listener in self.listeners:
            target = listener.link.target
            if target.is_name and (target.host, target.port) not in targets:
                targets.append((target.host, target.port))
        return targets

    def _arm_resolve_timer(self, restart: bool = False) -> None:
        """SIGALRM at the next of: the --resolve-every timer's tick (while some target is a
        name; `restart`: a period from now, as at start and reload), the running
        resolver's deadline, the control socket's next check (check_control), and a
        hand-over's deadline for the taker's `go` (HAND_OVER_DEADLINE). A signal, not a
        poll timeout: the accept loop runs with no timer armed (see loop()). One shot,
        armed again at each SIGALRM (handle_alarm) and each change of a deadline: one
        interval timer serves all four."""
        now = time.monotonic()
        every = self.options.resolve_every
        if every is None or self.stopping or not self._named_targets():
            # Stopping: no new children, names no longer matter (a resolver that ended
            # during a stop re-armed the tick, and woke the stop every period for nothing).
            self.resolve_tick_at = None
        elif restart or self.resolve_tick_at is None:
            self.resolve_tick_at = now + every
        wakes = [at for at in (self.resolve_tick_at, self._resolver_deadline(),
                               self.control_check_at, self.taker_deadline) if at is not None]
        signal.setitimer(signal.ITIMER_REAL, max(min(wakes) - now, 0.001) if wakes else 0.0)

    def handle_alarm(self) -> None:
        """SIGALRM: the --resolve-every timer's tick, a child's "look again" (relay.serve)
        or an operator's, or the running resolver's deadline. The first two count the
        fallbacks and resolve; the last kills a resolver that is past it (and resolves
        only if asked meanwhile: a name that hangs must not keep one resolver after
        another running with --resolve-every off). A child's signal that comes with the
        deadline's (or the control socket check's, or the hand-over deadline's) is taken
        as the deadline's. Each SIGALRM also checks the control socket's file
        (check_control: one lstat) and, at most once per DROPS_CHECK_AGAIN_AFTER, the
        listeners' dropped handshakes (check_drops)."""
        now = time.monotonic()
        handing = self.taker_deadline is not None and now >= self.taker_deadline - TIMER_SLACK
        if handing:
            self._taker_deadline_due()
        self.check_control()
        checked = (self.control_check_at is not None
                   and now >= self.control_check_at - TIMER_SLACK)
        if checked:
            self.control_check_at = now + CONTROL_CHECK_EVERY
        if (checked or self.drops_checked_at is None
                or now >= self.drops_checked_at + DROPS_CHECK_AGAIN_AFTER):
            self.drops_checked_at = now
            self.check_drops()
        if self.accepting and self.not_listening:
            # A listener that could not listen again (_listener_shut) is not watched:
            # watched again, its handler tries again.
            for listener in self.listeners:
                if listener.fd not in self.handlers:
                    if listener.accept_clients is None:
                        listener.accept_clients = self._accept_handler(listener)
                    self._watch(listener.fd, listener.accept_clients)
        tick = self.resolve_tick_at is not None and now >= self.resolve_tick_at - TIMER_SLACK
        if tick:
            self.resolve_tick_at = None  # the next period from now (_arm_resolve_timer)
        deadline = self._resolver_deadline()
        self._resolver_timed_out(now)
        if tick or (not checked and not handing
                    and (deadline is None or now < deadline - TIMER_SLACK)):
            self.count_fallbacks()
            self.start_resolver()
        self._arm_resolve_timer()

    def start_resolver(self) -> None:
        """Resolve the targets' names again in a child, so that a slow DNS server never
        stalls the loop; each name's result is applied as it comes (_read_resolver).

        One at a time: asked while one runs, another starts when it ends. And at most one
        lookup per RESOLVE_AGAIN_AFTER: the child waits out the rest of that time itself
        (a failing upstream makes every connection ask), so the loop needs no timer.
        At most two not reaped yet (config.OWN_PIDS counts two: the next may start as soon
        as the last one's output ends, before it is reaped; and one killed at its deadline
        may not be reaped yet, frozen): asked for a third, it starts once one is reaped.
        The names whose last lookup was slowest go last (a name that timed out, last of
        all): a name that hangs holds up none of the others, from the second run on.
        """
        targets = self._named_targets()
        if self.stopping or not targets:
            return
        if self.resolving or len(self.resolver_pids) >= 2:
            self.resolve_pending = True
            return
        took = self.resolve_took = {t: s for t, s in self.resolve_took.items() if t in targets}
        # In whole seconds: names that answer at once stay in the order configured.
        targets.sort(key=lambda target: int(took.get(target, 0.0)))
        now = time.monotonic()
        due = max(now, self.resolver_due + RESOLVE_AGAIN_AFTER)
        try:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:  # EMFILE: the next timer or failed connect asks again
            # Folded: at a descriptor limit every failed connect asks, a line each.
            self._log_repeating("resolve-failed", exc, "cannot open a pipe")
            return
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            self._log_repeating("resolve-failed", exc, "cannot fork a resolver")
            return
        if pid == 0:
            status = 1
            try:
                signals.reset_in_child()
                name_process(RESOLVER)
                close_inherited(write_fd, whole=self.closerange_whole)
                resolve_all(targets, write_fd, due - now)
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        # Non-blocking: the read end may take the number of a descriptor closed earlier in
        # this turn of the loop (a listener a reload removed), whose event, still in this
        # turn's list, then reaches the reader before the resolver has written a byte. A
        # blocking read there held the whole loop up for the length of the lookup.
        os.set_blocking(read_fd, False)
        self.resolving = True
        self.resolver_pids.append(pid)
        self.resolver_pid, self.resolver_fd = pid, read_fd
        self.resolver_targets, self.resolver_done = targets, 0
        self.resolver_due = self.resolver_progress = due
        self.resolve_pending = False
        self.resolver_output = b""
        self._watch(read_fd, self._resolver_reader)
        self._arm_resolve_timer()

    def _resolver_deadline(self) -> float | None:
        """When the running resolver is killed if its next answer has not come (None: no
        resolver runs): RESOLVE_TIMEOUT after its start or its last answer."""
        return self.resolver_progress + RESOLVE_TIMEOUT if self.resolving else None

    def _resolver_reader(self, events: int) -> None:
        if self._read_resolver():
            self._resolver_ended()
        else:
            self._arm_resolve_timer()  # its deadline moved with each name answered

    def _read_resolver(self) -> bool:
        """Read what the running resolver has written, applying each whole line (one name's
        result) at once; True at EOF (the resolver is done, or died)."""
        while True:
            try:
                chunk = os.read(self.resolver_fd, 65536)
            except BlockingIOError:
                return False  # all read, or an event of the number's last descriptor (above)
            if not chunk:
                return True
            *lines, self.resolver_output = (self.resolver_output + chunk).split(b"\n")
            for line in lines:
                if self.resolver_done >= len(self.resolver_targets):
                    break  # (never: a line per target)
                now = time.monotonic()
                target = self.resolver_targets[self.resolver_done]
                self.resolve_took[target] = now - self.resolver_progress
                self.resolver_done += 1
                self.resolver_progress = now
                self.apply_resolved([json.loads(line)])

    def _resolver_timed_out(self, now: float) -> None:
        """Kill the running resolver if the name it looks up is past RESOLVE_TIMEOUT (what it
        wrote before is applied first): that name's `resolve-failed` says it timed out, and
        the others after it wait for the next resolver."""
        if not self.resolving:
            return
        if self._read_resolver():  # done, answered just now, or died
            self._resolver_ended()
            return
        deadline = self._resolver_deadline()
        if deadline is None or now < deadline - TIMER_SLACK:
            return
        done = self.resolver_done
        # Not reaped yet, or its EOF would have been read above: the number is still ours.
        if self.resolver_pid in self.resolver_pids:
            try:
                os.kill(self.resolver_pid, signal.SIGKILL)  # reaped by handle_chld, as ever
            except OSError:
                pass  # exited meanwhile: nothing to kill
        self._read_resolver()  # a line written between the read above and the kill
        hung = None
        if self.resolver_done == done and done < len(self.resolver_targets):
            hung = self.resolver_targets[done]
        self._resolver_ended(hung)

    def _resolver_ended(self, timed_out: tuple[str, int] | None = None) -> None:
        """The running resolver's output is over: at EOF, or killed (`timed_out`: the
        target it was looking up). Starts the resolution asked for meanwhile."""
        self._unwatch(self.resolver_fd)
        os.close(self.resolver_fd)
        self.resolver_fd = -1
        self.resolving = False
        if timed_out is not None:
            self.resolve_took[timed_out] = RESOLVE_TIMEOUT  # last, next time
            self.apply_resolved([[*timed_out, None,
                                  f"timed out after {RESOLVE_TIMEOUT:g}s (the resolver "
                                  "was killed)"]])
        elif self.resolver_done < len(self.resolver_targets):
            self.log.warning("resolve-failed", error="the resolver died",
                             detail="keeping the addresses in use")
        self._arm_resolve_timer()
        if self.resolve_pending:
            self.start_resolver()

    def apply_resolved(self, results: list[list[object]]) -> None:
        """New addresses for the links whose names now resolve differently (new connections
        only: live ones keep their upstream). A name that fails keeps its old addresses."""
        found = {(host, port): (addresses, error) for host, port, addresses, error in results}
        remap = False
        for listener in self.listeners:
            link = listener.link
            result = found.get((link.target.host, link.target.port))
            if result is None:
                continue
            raw, error = result
            if raw is None:
                self._lookup_failed(link, error, "keeping the addresses in use"
                                    if self.addresses.get(link.key)
                                    else "each client's child looks the name up itself")
                continue
            addresses: list[Address] = [(int(family), tuple(sockaddr))
                                        for family, sockaddr in raw]  # type: ignore[attr-defined]
            recovered = link.name in self.resolve_failing
            self.resolve_failing.discard(link.name)
            before = self.addresses.get(link.key) or []
            if addresses != before:
                self.addresses[link.key] = addresses
                self._prepare_relay(listener)
                remap = True
            # The same set in another order (round-robin DNS rotates it at every answer)
            # is taken, for new connections to start elsewhere, but is no change.
            changed = set(addresses) != set(before)
            if not changed and not recovered:
                continue
            if changed and before:  # a name's first addresses (start, reload, after a
                # failed first lookup) are not a change either
                self.accounting.stats(link).address_changes += 1
            self.log.info("resolved", link=link.name, host=link.target.host,
                          addresses=" ".join(peer_text(address[1]) for address in addresses))
        if remap:
            self._map_own_listeners(self.listeners)  # the children's loop check: new addresses

    def _log_table_warnings(self, table: LinkTable) -> None:
        """`link-skipped`, `link-overridden`, `env-file-option`, `link-may-loop` and
        `link-unreachable`, at start and then at each reload for those that are new: one
        standing in the environment (a `_UDP` link) was repeated at every reload, a
        warning nobody can act on twice."""
        found = [*(("link-skipped", "", text) for text in table.warnings),
                 *(("link-overridden", "", text) for text in table.overrides),
                 *(("env-file-option", name, text) for name, text in table.file_options),
                 *(("link-may-loop", "", text) for text in table.loops),
                 *(("link-unreachable", "", text) for text in table.unreachable)]
        new = [entry for entry in found if entry not in self.table_warnings]
        # The env file's FORKPROXY_ names bounded as the environment's unknown ones, by
        # the same unknown_lines: a line each for the first, then a count (a file of 5,000
        # was 5,000 lines, at start and at a reload that added them).
        said, more = unknown_lines([(v, t) for e, v, t in new if e == "env-file-option"])
        for event, variable, text in new:
            if event == "env-file-option" and (variable, text) not in said:
                continue
            if variable:
                self.log.warning(event, variable=variable, detail=text)
            else:
                self.log.warning(event, detail=text)
            if more and event == "env-file-option" and (variable, text) == said[-1]:
                self.log.warning("env-file-option-unlogged", count=more,
                                 detail=UNLOGGED_FILE_OPTIONS)
        self.table_warnings = set(found)

    def _listen_options(self, bound: list[Listener]) -> None:
        """Socket options every accepted connection inherits from its listener: set here
        once, not by each child (--keepalive, --user-timeout, and the bound on what a
        client's socket queues unsent: relay.NOTSENT_LOWAT). ConfigError naming the
        listener if the kernel refuses one of the options."""
        keepalive, user_timeout = self.options.keepalive, self.options.user_timeout
        for listener in bound:
            relay.set_notsent_lowat(listener.sock)
            option = ""
            try:
                if keepalive is not None:
                    option = f"--keepalive {keepalive}"
                    relay.set_keepalive(listener.sock, keepalive)
                if user_timeout is not None:
                    option = f"--user-timeout {user_timeout:g}"
                    relay.set_user_timeout(listener.sock, user_timeout)
            except OSError as exc:
                # `--flag VALUE: ...`, as every error about an option's value starts, so
                # that one from FORKPROXY_KEEPALIVE names the variable (name_variable).
                why = ""
                if exc.errno == errno.ENOPROTOOPT and listener.sock.getsockopt(
                        socket.SOL_SOCKET, socket.SO_PROTOCOL) == IPPROTO_MPTCP:
                    # `mptcpize run` (which socket.proto does not see: it changes the
                    # socket() call under Python): Linux takes no TCP_USER_TIMEOUT on an
                    # MPTCP socket (6.18 still), nor keepalive's times before 6.2.
                    why = (" (an MPTCP socket, `mptcpize run`: Linux does not take this "
                           "option on MPTCP sockets; run without it, or without mptcpize)")
                raise ConfigError(f"{option}: cannot set it on {listener.describe()}: "
                                  f"{exc.strerror or exc}{why}") from None

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> tuple[bool, str]:
        """Re-read the sources; on any error keep the running configuration whole. One
        reload answers every `reload` request waiting: each sent before its sources are
        read, so each answer is of a reading that began after its request came (a
        SIGHUP's too: each handle_signals drains every one noted, once)."""
        # At 4,000 links a reload takes ~0.5 s: one per request, 16 clients asking at
        # once were answered after 8 s, past the CLI's 5 s, and each got "no answer".
        self._take_control_requests()
        ok, error = self._reload()
        if self.reload_asked:
            assert self.control is not None  # only its clients wait
            waiting, self.reload_waiting, self.reload_asked = self.reload_waiting, [], False
            reply = self._reload_reply(ok, error)
            for fd in self.control.answer(waiting, reply):
                self.handlers[fd](POLLOUT)  # send what it can now (_control_handler)
        return ok, error

    def _reload_reply(self, ok: bool, error: str) -> dict[str, object]:
        """A `reload`'s answer. `stopping` and `handing_over` as `check` says them: a
        client tells a reload refused by a stop or a take-over (and asks the supervisor
        taking over: status._ask_across_take_over) by them, not by the error's words."""
        return {"ok": ok, "error": error, "stopping": self.stopping,
                "handing_over": self.taker is not None, "listeners": self._listener_table()}

    def _take_control_requests(self) -> None:
        """Take up the requests already sent to the control socket, without waiting for
        the next turn of the loop: those accepted and read, those still in its backlog
        too, so that a reload about to read its sources answers every `reload` among them."""
        if self.control is None:
            return
        if self.control_at is None:  # else paused (EMFILE): handle_timers resumes it
            self.handle_control_accept(POLLIN)
        for fd in list(self.control.clients):
            handler = self.handlers.get(fd)
            if handler is not None:
                handler(POLLIN)  # a client that sent nothing yet: recv says EAGAIN

    def _prepare_new_listeners(self, fresh: list[Listener]) -> None:
        """A reload's new listeners, before anything changes (listeners.reconcile): their
        options, as at start; and one descriptor left to spare after them, as run() keeps
        at start, or OSError (EMFILE) fails the reload. A SIGHUP whose new listener took
        the last one was `reloaded`, and from then on every accept() failed EMFILE: no
        port served, the control socket answering nobody, for good."""
        self._listen_options(fresh)
        if fresh:
            os.close(os.dup(2))

    def _reload(self) -> tuple[bool, str]:
        if self.taker is not None:
            # Our listening sockets are the taking supervisor's too: a port this reload
            # removed would be shut down under it (listeners.stop_listening). It reads
            # the configuration itself, and we stop once it is ready.
            self.log.warning("reload-skipped", detail=control.HANDING_OVER)
            return False, control.HANDING_OVER
        if self.stopping:
            # Said in the log too: a SIGHUP's outcome is only there (reload --pid-file
            # says so), and silence would read as a reload that went through.
            self.log.warning("reload-skipped", detail="stopping: the listeners are closed")
            # Not kept as the last reload: nothing was read, and a SIGHUP during a stop
            # would have the metrics say the running configuration is not the file's.
            return False, "stopping"
        self.check_control()  # whatever the file says: an operator's SIGHUP mends it too
        # Each port's link: reconcile() hands a kept listener its new one.
        before = {listener.link.key: listener.link for listener in self.listeners}
        try:
            env_text = self._read_env_text(unlinked_refused=True)
            if not env_text.strip() and not self.env_file_blank:
                # A file caught empty as it is written (`cp`, `>`, an editor that moves the
                # old one aside first) took every link it gave away, and with --from-env
                # or SPECs beside it, silently: an override of a variable fell back to
                # the environment's target and clients went to the old server.
                raise ConfigError(
                    f"env file {self.sources.env_file!r} is empty, and was not when last "
                    "read (a file being written? write it beside and mv it over; to take "
                    "no link from it, leave a comment line in it)")
            table = read_links(self.sources, self.environ, env_text)
            kept, fresh, retired = listeners.reconcile(self.listeners, table.links,
                                                       self._prepare_new_listeners)
        except (ConfigError, OSError) as exc:
            # OSError: socket() for a new listener ran out of descriptors (EMFILE, ENFILE):
            # a reload that fails must never take the running listeners down with it.
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                error = (f"out of file descriptors for new listening sockets: "
                         f"{exc.strerror} {out_of_files_advice(exc.errno)}")
            else:
                error = (f"cannot open a listening socket: {exc.strerror or exc}"
                         if isinstance(exc, OSError) else str(exc))
            if self.reload_asked and RAISE_NOFILE in error:
                # Out of descriptors (the env file's, a new listener's or the one kept
                # spare for accept()) while each `reload` waiting holds one for its
                # connection, answered and closed only after this: a SIGHUP at the same
                # limit needs one fewer. Said, so that the gap is not a mystery.
                error += (" (each `forkproxy reload` waiting holds one for its connection "
                          "until it is answered: SIGHUP, or `reload --pid-file`, needs one "
                          "fewer)")
            self.log.error("reload-failed", error=error, detail="previous configuration stays")
            self._reloaded(False, error)
            return False, error
        self.env_file_blank = not env_text.strip()
        # Names are looked up again by a resolver child, as the timer does: a slow DNS
        # server must not stall accepting on every listener. Until it answers a name keeps
        # the addresses it had, and a new one (a new port, or a port pointed at another
        # name) has none yet: its children look it up themselves. An address is only
        # parsed, here and now. (Resolvers run one at a time, so a lookup started before
        # the reload never lands after this one's.)
        old = self.addresses
        self.addresses = {}
        for item in kept:
            key, target = item.link.key, item.link.target
            if not target.is_name:
                self.addresses[key] = self._resolve(item.link)
            elif key in before and before[key].target == target:
                self.addresses[key] = old.get(key, [])
            else:
                self.addresses[key] = []
                # Another name: its failure is news (a warning), not the old one's outage.
                self.resolve_failing.discard(item.link.name)
        for item in kept:
            self._prepare_relay(item)
            self.accounting.stats(item.link)
        self._map_own_listeners(kept)
        # Only now, with every kept port's new wiring in place: serving the backlogs may
        # fork for clients held on a kept port too (serve_held), which must get the new.
        for listener in retired:
            self._take_backlog(listener, "unlisten")  # before they close: see handle_stop
        if retired:
            self.check_drops(closing=retired)
        self.accepting = False
        for listener in self.listeners:
            self._unwatch(listener.fd)
        listeners.close_all(retired)
        self.not_listening.difference_update(retired)
        self.listeners = kept
        # A link no longer configured (or renamed: its name is its sources') leaves status
        # and metrics with its last live connection, rather than staying there for good,
        # and its lookup's outage with it: configured again later, its first failed
        # lookup is a warning again, not a debug line of an outage long over.
        configured = {item.link.name for item in kept}
        # Clients whose fork failed: each will be a child of its link.
        self.accounting.retire(configured, self._held_per_link())
        self.resolve_failing &= configured
        # The folded lines' windows of a link removed or pointed elsewhere: they would stay
        # for good, one per target ever configured. (A child of such a target reaped after
        # this starts a window of its own again, kept until the next reload.)
        wired = {(item.link.name, item.link.target) for item in kept}
        self._log_folded_failures(wired)
        self.link_folds = {key: counts for key, counts in self.link_folds.items()
                           if key[1:3] in wired}
        self.fallback_due = {key: due for key, due in self.fallback_due.items() if key in wired}
        listening = {item.link.key for item in kept}  # (a kept socket keeps its drops' window)
        self.drop_folds = {key: counts for key, counts in self.drop_folds.items()
                           if key in listening}
        self.drops_overflowed &= listening
        # Only windows with unlogged denials have a timer to end them: a removed (or
        # renamed) link's window would stay for good, one per name ever denied. Those
        # end now, and so does any window that is over.
        for name in [name for name in self.denials if name not in configured]:
            self._log_unlogged_denials(name, self.denials.pop(name))
        self._end_denial_windows(time.monotonic())
        self._arm_resolve_timer(restart=True)
        self.start_resolver()
        self._log_table_warnings(table)
        # What changed, and a count of the rest: a line per listener in force was 1,000
        # lines at each reload of 1,000 links. The start's lines and each reload's give
        # the listeners in force; `status` lists them.
        for listener in retired:
            self.log.info("unlisten", detail=listener.describe())
        bound = {id(listener) for listener in fresh}
        changed = 0
        for listener in kept:
            if id(listener) in bound:
                self.log.info("listening", detail=listener.describe(), new=True)
            elif before[listener.link.key] != listener.link:  # its target, or its name
                changed += 1
                self.log.info("listening", detail=listener.describe(), new=False)
        self.log.info("reloaded", listeners=len(kept), added=len(fresh), changed=changed,
                      removed=len(retired), unchanged=len(kept) - len(fresh) - changed)
        self.update_accepting()
        self._reloaded(True, "")
        return True, ""

    def _read_env_text(self, unlinked_refused: bool = False) -> str:
        """--env-file's text for read_links ('' without one: blank, as an empty file)."""
        if self.sources.env_file is None:
            return ""
        return read_env_file(self.sources.env_file, unlinked_refused=unlinked_refused)

    def _reloaded(self, ok: bool, error: str) -> None:
        """Keep a reload's outcome for status, check and the metrics."""
        now = time.monotonic()
        self.last_reload = (now, ok, error)
        self.last_reload_at = time.time()
        self.reloads["success" if ok else "failure"] += 1
        if ok:
            self.config_loaded = self.last_reload_at

    def _last_reload(self, clocks: tuple[float, float]) -> dict[str, object] | None:
        """The last reload as replies show it (None before any): `at` (time of day, as
        read then) and `age` (seconds, monotonic), `ok`, and `error` (None when it applied)."""
        if self.last_reload is None:
            return None
        now, _ = clocks
        at, ok, error = self.last_reload
        return {"at": self.last_reload_at, "age": now - at, "ok": ok, "error": error or None}

    # -- control socket ----------------------------------------------------------------

    def check_control(self, replace: bool = False, mended: bool = False) -> None:
        """Listen again on a control socket whose file was removed (an operator's rm,
        systemd-tmpfiles aging /tmp) or replaced: nothing could reach this supervisor,
        and `check` failing, a HEALTHCHECK would have a working proxy restarted. The rules
        of the start hold: a live socket there (another supervisor's now) or a file that
        is not a socket is left alone, said, and tried again at the next check; the
        default directory, made again if gone, must still be ours (prepare_dir).
        `replace`: a live socket there is replaced too (a take-over's, given up: _own_again).
        `mended`: after a take-over given up (_own_again), whose line said the files are
        made again: no `status-socket-recreated`, and the pid file is the caller's."""
        if self.control is None or self.handed_over or self.taker is not None:
            return  # handing or handed over: a socket at our path is the new supervisor's
        if not mended:
            self._check_pid_file()
        if not self.control.lost():
            self.control.touch_if_older(CONTROL_TOUCH_AFTER)
            return
        old = self.control.fileno()
        try:
            if self.options.status_socket is None:
                control.prepare_dir(os.path.dirname(self.control.path))
            self.control.rebind(replace)
        except OSError as exc:
            self._log_repeating("status-socket-lost", exc, "its file was removed or replaced, "
                                "and no socket could be made there again: trying again at "
                                f"each reload and every {CONTROL_CHECK_EVERY:g}s",
                                path=self.control.path)
            return
        self.pause_logs.pop("status-socket-lost", None)  # a later loss is news again
        if self.control_at is None:  # else paused (EMFILE): handle_timers watches the new
            self._unwatch(old)
            self._watch(self.control.fileno(), self.handle_control_accept)
        if not mended:
            # Not after a take-over given up: the taker replaced the file (and removed it
            # as it went), which `take-over-abandoned` said; an operator alerting on this
            # line (an rm, tmpfiles aging /tmp) was paged for every cancelled take-over.
            self.log.warning("status-socket-recreated", path=self.control.path,
                             detail="its file was removed or replaced: listening on a new one")

    def _check_pid_file(self) -> None:
        """Write --pid-file again when its file was removed (an rm, systemd-tmpfiles aging
        /tmp), as check_control makes the control socket's again: `reload --pid-file` said
        "cannot read" for as long as we ran. Its times are set to now once an hour old, so
        that tmpfiles leaves it. A file put at the path since (another supervisor's) is
        left alone, as at our stop."""
        path = self.options.pid_file
        if path is None or self.pid_file_written is None:
            return
        try:
            found = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError:
            return  # cannot look: nothing is known to be wrong
        else:
            if ((found.st_dev, found.st_ino) == self.pid_file_written
                    and time.time() - found.st_mtime > CONTROL_TOUCH_AFTER):
                try:
                    os.utime(path, follow_symlinks=False)
                except OSError:
                    pass
            return
        try:
            self._write_pid_file()
        except ConfigError as exc:
            self.log.warning("pid-file-failed", error=str(exc))
            return
        except OSError as exc:  # out of descriptors (EMFILE)
            self.log.warning("pid-file-failed", error=exc.strerror or str(exc))
            return
        self.log.warning("pid-file-recreated", path=path,
                         detail="its file was removed: written again")

    def check_drops(self, closing: list[Listener] | None = None) -> None:
        """A folded `listen-drops` warning per listener at which the kernel dropped
        handshakes since the last check: its accept queue was full (the supervisor stopped
        accepting at --max-children, or could not keep up with a burst, or was busy or
        frozen), and those clients waited for their SYN's retry, or timed out. Nothing
        else says so: the clients are not forkproxy's yet, and the queue's length, which
        status shows, is a snapshot. One getsockopt per listener (Listener.drops), and the
        queue read only where drops grew.

        Only when the kernel counted a listen drop in this network namespace meanwhile
        (TcpExtListenDrops), or cannot say: a listener's own count also grows with every
        packet of a handshake under way that it discards, and on a lossy network every
        hop of a chain said its queue was full each minute, with none ever full. Said to
        be a full accept queue only when the kernel counted one (TcpExtListenOverflows,
        a part of ListenDrops), or cannot say: a SYN with no route back for its SYN-ACK
        is a listen drop too, and the line had the operator raise --max-children.

        `closing`: listeners about to close (a reload that removes them, a stop), whose
        check this is the last: their drops since the last check, and those folded into
        a window not over, get their line now, or never would. Every listener is read,
        not these alone, so that the next check's TcpExtListenDrops still covers the
        others' drops since the last."""
        kernel, before = listeners.kernel_listen_counts(), self.kernel_drops_checked
        dropped = kernel is None or before is None or kernel[0] != before[0]
        # Which drops they were, by the namespace's count (a listener has none of its own):
        # with an accept queue full meanwhile at any listener, the line says that.
        overflowed = kernel is None or before is None or kernel[1] != before[1]
        self.kernel_drops_checked = kernel
        last = {id(listener) for listener in closing or ()}
        for listener in self.listeners:
            key = listener.link.key
            drops = listener.drops()
            count = 0
            if drops is not None and drops != listener.drops_checked:
                grown, listener.drops_checked = drops - listener.drops_checked, drops
                if dropped:  # else a lossy network's, not the kernel's drops (status counts all)
                    count = fold(self.drop_folds, key, grown)
                    if overflowed:
                        self.drops_overflowed.add(key)
            if id(listener) in last:
                unlogged = self.drop_folds.pop(key, [0])[0]
                count = count or int(unlogged)
            if not count:
                continue
            full = key in self.drops_overflowed
            self.drops_overflowed.discard(key)
            fields: dict[str, object] = {"link": listener.link.name, "drops": count}
            queue = listener.queue()
            if queue is not None:
                fields.update(queued=queue[0], backlog=queue[1])
            fields["detail"] = (
                "the listener's accept queue was full: the kernel dropped clients' "
                "handshakes, which wait for a retry (1 s, 3 s, ...) or time out; at "
                f"--max-children (max-children-reached) raise it; a backlog below "
                f"{listeners.BACKLOG} is net.core.somaxconn's: {_raise_somaxconn(queue)}"
                if full else
                "the kernel dropped clients' handshakes with no accept queue full "
                "(TcpExtListenOverflows did not grow): no route back to those clients for "
                "the SYN-ACK (a missing return route, spoofed SYNs; --max-children and "
                "somaxconn are not the cause then), or, with net.ipv4.tcp_syncookies=0, "
                f"a full SYN queue (a SYN flood, a burst over a slow network), {_syn_queue(queue)}")
            self.log.emit(WARNING, "listen-drops", fields)

    def handle_control_accept(self, events: int) -> None:
        assert self.control is not None
        try:
            fresh, dropped = self.control.accept()
        except OSError as exc:  # EMFILE and friends: wait, as the listeners do
            self._log_repeating("control-accept-failed", exc,
                                f"pausing the control socket for {ACCEPT_BACKOFF}s at a time",
                                descriptor_limit)
            self._unwatch(self.control.fileno())
            self.control_at = time.monotonic() + ACCEPT_BACKOFF
            return
        for fd in dropped:
            self._unwatch(fd)
        for fd in fresh:
            self._watch(fd, self._control_handler(fd))

    def _control_handler(self, fd: int) -> Callable[[int], None]:
        def handle(events: int) -> None:
            assert self.control is not None
            if not self.control.service(fd):
                self._unwatch(fd)
            elif self.control.wants_write(fd):
                self.poller.modify(fd, POLLOUT)

        return handle

    def handle_control_request(self, request: dict[str, object],
                               client: socket.socket) -> dict[str, object] | control.Later | None:
        command = request.get("command")
        if command == "reload":
            if self.stopping:  # nothing to read (and the loop may end before its next turn)
                ok, error = self._reload()
                return self._reload_reply(ok, error)
            # Answered by the next reload, at the loop's next turn (handle_signals), with
            # every other one that came meanwhile: one reading for all (reload).
            if not self.reload_asked:
                self.reload_asked = True
                self.signals.wake()
            self.reload_waiting.append(client)
            return control.LATER
        if command == "check":
            # Metrics down fail no health check: relaying works, a HEALTHCHECK that failed
            # would have an orchestrator restart a working proxy and cut every connection,
            # and the process is restarted anyway. `check` prints the state (README).
            # A failed last reload is said too, not failed on, for the same reason: the
            # previous configuration serves, and a restart would cut every connection to
            # run it (or, were the file still broken, not start at all).
            # A port shut down from outside that cannot listen again (_listener_shut) is
            # one not served: unhealthy, unlike those above, as a port never bound is.
            lost = [f"{_listener_ends(listener)[0]} ({listener.link.name})"
                    for listener in self.listeners if listener in self.not_listening]
            ok = not self.stopping and bool(self.listeners) and not lost
            clocks = read_clocks()
            # handing_over: a take-over under way (status.find_socket rules this one out,
            # as a stopping one: the one taking over serves from its `go` on).
            return {"ok": ok, "stopping": self.stopping, "listeners": self._listener_table(),
                    "handing_over": self.taker is not None,
                    "metrics": self._metrics_state(clocks),
                    "last_reload": self._last_reload(clocks), "not_listening": lost}
        if command == "status":
            return None if self.answer_in_child(client) else self.status_reply()
        if command == control.HAND_OVER:
            return self.hand_over(client, request.get("pid"), request.get("started"))
        return {"ok": False, "error": f"unknown command {command!r}"}

    def hand_over(self, client: socket.socket, taker_pid: object,
                  taker_started: object) -> dict[str, object] | None:
        """serve --take-over asks for our listening sockets: send them (each listener's and
        the metrics one, named by address), and serve on until it says `go` (handle_taker).
        None once sent: the connection is ours from then on, not the control server's.
        Not to a supervisor started before us (its start read from /proc, the one it sent
        only as a fallback: control.process_start): of two take-overs started one after
        the other, the later (us, having taken over first) holds the newer configuration."""
        refused = control.taker_refused(client, taker_pid)
        if refused is not None:
            # Before anything is logged, sent or written: a loop of such requests must
            # cost one line per ERROR_LOG_EVERY, and never our pid file (handle_taker).
            failures = fold(self.pause_logs, "take-over-refused")
            if failures:
                self.log.warning("take-over-refused", error=refused, failures=failures,
                                 detail="a process asked for the listening sockets: "
                                 "not handed, serving on")
            return {"ok": False, "error": f"not to that process: {refused}"}
        if self.stopping:
            return {"ok": False, "error": "stopping"}
        if self.taker is not None:
            return {"ok": False, "error": "another take-over is under way"}
        error: str | None = None
        if self.pid == 1:
            # A container's own setup (`podman exec ... serve --take-over`): we would hand
            # over, drain, exit, and the kernel kills every process of a PID namespace
            # whose init exits, the taker with them: nobody serves. Any taker allowed
            # this far is in our PID namespace or one below it (taker_refused), so it
            # dies too: always refused, said on both sides.
            error = ("it is PID 1 of its PID namespace: its exit at the end of the drain "
                     "would have the kernel kill every process there, the one taking over "
                     "too; restart the container instead")
        elif control.parent_is_namespace_init():
            # The same under an init shim (tini, `docker run --init`, dumb-init, a `sh`
            # entrypoint that waits; README, "Upgrading and handing over"): we are PID 2,
            # and our parent, PID 1, exits when we do. Conservative: an init that would
            # serve on without us (systemd or s6 in a container, or a container init we
            # were reparented to) is refused too; we cannot tell which it is, and a wrong
            # yes leaves nobody serving, a wrong no leaves us serving.
            error = ("its parent is PID 1 of its PID namespace (an init such as tini or "
                     "docker --init, which exits with it): that init's exit at the end of "
                     "the drain would have the kernel kill every process there, the one "
                     "taking over too; restart the container instead")
        if error is not None:
            failures = fold(self.pause_logs, "take-over-refused")
            if failures:
                self.log.warning("take-over-refused", error=error, failures=failures,
                                 detail="not handed, serving on")
            return {"ok": False, "error": error}
        started = control.process_start()
        peer = control.peer_pid(client)  # as we see it (taker_pid may be in a namespace below)
        if isinstance(taker_started, int):
            # A start sent asks for the comparison (every `serve --take-over` sends one; a
            # request without, as before, has none). The taker's start as we read it, on
            # our boot clock: the one it sent was read on its own, which a time namespace
            # may set apart from ours (control.process_start). What it sent only where we
            # cannot read it (gone meanwhile: it is told no anyway).
            # (taker_refused said no where /proc is not ours: /proc/<peer> would be
            # another process, its start not the taker's.)
            read = control.process_start(peer) if control.foreign_proc() is None else None
            if read is not None:
                taker_started = read
        if isinstance(taker_started, int) and started is not None and taker_started < started:
            return {"ok": False, "error": "it started before this supervisor, which took over "
                    "already: the newer configuration stays"}
        handed = [listener.sock for listener in self.listeners]
        # With each link its target and the addresses its name resolves to now: a taker
        # whose own lookups fail (a DNS outage) keeps them, as a reload does.
        names: list[dict[str, object]] = [
            {"listen": _listener_ends(listener)[0], "detail": listener.describe(),
             "link": listener.link.name, "asked": listener.link.port,
             "target": [listener.link.target.host, listener.link.target.port],
             "addresses": [[family, list(sockaddr)] for family, sockaddr
                           in self.addresses.get(listener.link.key, [])]}
            for listener in self.listeners]
        if self.metrics_sock is not None:
            handed.append(self.metrics_sock)
            names.append({"metrics": self.metrics_url})
        reply = {"ok": True, "pid": self.pid, "version": __version__, "sockets": names}
        if self.sources.env_file is not None:
            # Whether our env file was blank when last read: a taker that finds the same
            # file empty where it was not for us caught it mid-write, and refuses (_take_over).
            reply["env_file"] = {"path": absolute_path(self.sources.env_file),
                                 "blank": self.env_file_blank}
        try:
            taker = client.dup()
        except OSError as exc:
            return {"ok": False, "error": f"cannot hand over: {exc.strerror or exc}"}
        try:
            control.send_sockets(taker, reply, handed)
            taker.setblocking(False)
        except OSError as exc:
            taker.close()
            self.log.warning("take-over-failed", error=exc.strerror or str(exc),
                             detail="could not send the listening sockets: serving on")
            return None
        assert self.control is not None  # whose client asked
        self.taker, self.taker_said = taker, self.control.after_line
        self._watch(taker.fileno(), self.handle_taker)
        self.log.info("handing-over", to_pid=peer, sockets=len(handed))
        # Its `go` read with the request (no poll comes for it): taken at once, by the timer.
        now = time.monotonic()
        self.taker_deadline = now if b"\n" in self.taker_said else now + HAND_OVER_DEADLINE
        self._arm_resolve_timer()
        return None

    def handle_taker(self, events: int) -> None:
        """The supervisor taking over says `go` (it listens on our sockets, and its control
        socket and pid file are in place): stop as at SIGTERM, but leave the backlogs to it;
        or it went away without (it could not start): serve on as before."""
        if self.taker_told:
            self._taker_closed()
        elif self._read_taker():
            self._taker_done()

    def _read_taker(self) -> bool:
        """Read what the taker says: True once it said a line, went away, or said too much."""
        assert self.taker is not None
        try:
            data = self.taker.recv(control.MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return b"\n" in self.taker_said
        except OSError:
            data = b""
        self.taker_said += data
        return (not data or b"\n" in self.taker_said
                or len(self.taker_said) >= control.MAX_REQUEST)

    def _taker_deadline_due(self) -> None:
        """HAND_OVER_DEADLINE passed with no `go` (or a `go` read with the request): a taker
        that stalled, or never meant to say it, must not keep us from reloads and from
        the next take-over for ever. What it sent meanwhile is read first: a `go` that
        came while we were stopped ourselves (SIGSTOP, swapping) still counts."""
        self.taker_deadline = None
        if self.taker is not None and self.taker_told:
            # Told yes, and not closed since: one that serves unconfirmed (it holds the
            # connection), or stalled. Stopped as before the yes waited for its close.
            self._drop_taker().close()
            self.handle_stop(signal.SIGTERM, handed_over=True)
        elif self.taker is not None:
            self._taker_done(timed_out=not self._read_taker())

    def _taker_done(self, timed_out: bool = False) -> None:
        assert self.taker is not None
        taker, self.taker = self.taker, None
        self.taker_deadline = None
        self._unwatch(taker.fileno())
        if not timed_out and self.taker_said.split(b"\n", 1)[0] == b"go" and not self.stopping:
            # Told before we stop: one that went away after its `go` (killed before it read
            # this) serves nothing, and stopping left nobody serving, the pid file and
            # socket file naming a dead process. Then we serve on, as without its `go`.
            # Nor do we stop once the yes is sent: it closes the connection once it read
            # it (EOF), or is killed before (ECONNRESET): see _taker_closed.
            if self._tell_taker_yes(taker):
                self.taker, self.taker_told = taker, True
                self._watch(taker.fileno(), self.handle_taker)
                self.taker_deadline = time.monotonic() + HAND_OVER_DEADLINE
                self._arm_resolve_timer()
                return
            taker.close()
            self.log.warning("take-over-abandoned", detail="the supervisor taking over "
                             "went away after it said it was ready, before it read the "
                             "answer: serving on")
            self._own_again()
            return
        if timed_out:
            self.log.warning("take-over-abandoned", detail="the supervisor taking over did "
                             f"not say it was ready within {HAND_OVER_DEADLINE:g}s: serving "
                             "on (it is told no if it does later)")
            # Its answer, waiting for its `go`: a taker resumed late reads a no and exits,
            # never serving beside us (its wait for an answer that never comes means we
            # stalled, and it serves on). Kept open until it goes: see _own_again.
            try:
                taker.send(control.encode_reply({
                    "ok": False, "error": "too late: it did not say `go` within "
                    f"{HAND_OVER_DEADLINE:g}s of the hand-over, and serves on"}))
            except OSError:
                pass  # gone, or not reading: it fails at its `go` either way
            self._forget_late_taker()
            self.late_taker = taker
            self._watch(taker.fileno(), self.handle_late_taker)
            # The socket at our path may be its own now, which answers nobody while it is
            # stalled (a `check` there timed out: unhealthy) and is no use once it is told
            # no: ours again at once, in one rename. What it does after, resumed (its own
            # rename, its exit removing its files), is mended when it goes.
            self._own_again(replace=True)
            return
        self.log.warning("take-over-abandoned", detail="the supervisor taking over went "
                         "away before it was ready: serving on")
        taker.close()
        self._own_again()

    def _taker_closed(self) -> None:
        """The taker told yes closes its connection: having read the yes (EOF), it serves,
        and we stop as handed over; killed before it read it (ECONNRESET: our yes left
        unread), nobody would: we serve on, and make our files again."""
        assert self.taker is not None
        try:
            if self.taker.recv(control.MAX_REQUEST):
                return  # nothing more is asked of it: not heard (the deadline bounds it)
            gone = False
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            gone = True
        self._drop_taker().close()
        if not gone:
            self.handle_stop(signal.SIGTERM, handed_over=True)
            return
        self.log.warning("take-over-abandoned", detail="the supervisor taking over went "
                         "away after it said it was ready, before it read the answer: "
                         "serving on")
        self._own_again()

    def _drop_taker(self) -> socket.socket:
        assert self.taker is not None
        taker, self.taker = self.taker, None
        self._unwatch(taker.fileno())
        self.taker_told = False
        self.taker_deadline = None
        return taker

    def _tell_taker_yes(self, taker: socket.socket) -> bool:
        """The taker's last answer, yes: the listening sockets are its own now. Not waited
        for (the socket is non-blocking; the line fits in its buffer, which it only
        reads): False when it cannot go, the taker gone (EPIPE, ECONNRESET)."""
        try:
            taker.send(control.encode_reply({"ok": True}), socket.MSG_NOSIGNAL)
        except OSError:
            return False
        return True

    def handle_late_taker(self, events: int) -> None:
        """A taker told no at the deadline: what it says is not heard; once it is gone,
        the socket file and pid file it replaced meanwhile (and removed) are made again."""
        assert self.late_taker is not None
        try:
            data = self.late_taker.recv(control.MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return
        self._forget_late_taker()
        if self.taker is None:  # else the files are the next taker's now
            self._own_again()

    def _forget_late_taker(self) -> None:
        if self.late_taker is not None:
            self._unwatch(self.late_taker.fileno())
            self.late_taker.close()
            self.late_taker = None

    def _own_again(self, replace: bool = False) -> None:
        """A take-over that did not happen: the taker may have replaced our socket file and
        pid file, then removed them. `replace`: its socket there too (check_control).
        Without `status-socket-recreated` or `pid-file-recreated`: the caller's
        `take-over-abandoned` says the files are made again, and nobody else touched them."""
        self.check_control(replace, mended=True)
        if self.pid_file_written is not None:
            try:
                self._write_pid_file()
            except ConfigError as exc:
                self.log.warning("pid-file-failed", error=str(exc))
            except OSError as exc:  # out of descriptors (EMFILE): not a start, no run() here
                self.log.warning("pid-file-failed", error=exc.strerror or str(exc))

    def status_reply(self, counters: memoryview | None = None,
                     kernel: list[ListenerReading] | None = None) -> dict[str, object]:
        # `uptime` is the monotonic clock's, as every duration in the reply: the wall
        # clock's (time.time() - started) went negative, or a year long, when NTP or an
        # operator stepped it. `started`, and every time of day in the reply, is derived
        # from one reading of both clocks (accounting.read_clocks): a connection never
        # starts before its supervisor, and a client that computes `now - started` (one of
        # an older version) still gets the uptime.
        clocks = read_clocks()
        now, wall = clocks
        reply: dict[str, object] = {
            "ok": True,
            "pid": self.pid,
            "version": __version__,
            "started": wall + self.began,
            "start_time": self.start_time,
            "uptime": now - self.began,
            "stopping": self.stopping,
            # During a stop: seconds until the connections left are TERMed (0 once they
            # were); null otherwise.
            "grace_left": (None if not self.stopping else
                           0.0 if self.term_at is None else max(0.0, self.term_at - now)),
            "max_children": self.options.max_children,
            "max_children_given": self.options.max_children_given,
            "memory_limit": self.options.memory_limit,
            "memory_fit": self.memory_fit(),
            "pids_limit": self.options.pids_limit,
            "pids_fit": self.pids_fit(),
            "nproc_limit": self.options.nproc_limit,
            "nproc_fit": self.nproc_fit(),
            "listeners": self._listener_table(kernel),
            "metrics": self._metrics_state(clocks),
            # Whether the running configuration is the file's (as Prometheus's own
            # prometheus_config_last_reload_* say): the last reload's outcome, when the
            # configuration running was read, and the reloads each way.
            "last_reload": self._last_reload(clocks),
            "config_loaded": self.config_loaded,
            "reloads": dict(self.reloads),
        }
        reply.update(self.accounting.snapshot(self._held_per_link(), counters, clocks))
        return reply

    def answer_in_child(self, client: socket.socket) -> bool:
        """Answer `status` from a forked child; False if none could take it (then the
        caller answers here).

        Why: the reply holds a record per live connection, built from thousands of small
        objects; built here, it leaves the supervisor's heap fragmented, megabytes larger
        for good (pymalloc keeps an arena while one object in it lives), and every later
        fork copies those page tables and every exit tears them down (~28 us per MB per
        connection, docs/benchmarks.md). Every Prometheus scrape asks for it. A child's
        copy-on-write view of the table is the same snapshot, and its heap dies with it.
        """
        # The live counters would change under the reporter: a child reaped meanwhile
        # had its bytes vanish from the reply, and forkproxy_bytes_total went down.
        counters = self.accounting.slots.copy()
        # Read here: the reporter closes the listening sockets it inherits (and the drops'
        # running count is the supervisor's to keep: Listener.drops).
        kernel = self._read_listeners()

        def answer() -> None:
            client.settimeout(control.REPORT_TIMEOUT)
            client.sendall(control.encode_reply(self.status_reply(counters, kernel)))

        return self._in_reporter(answer, keep=client.fileno()) != 0

    def _in_reporter(self, job: Callable[[], None], keep: int | None = None) -> int:
        """Run `job` in a forked reporter holding stdio and `keep` of our descriptors;
        its pid, or 0 if none could be forked (MAX_REPORTERS run, or out of processes)."""
        if len(self.reporter_pids) >= MAX_REPORTERS:
            return 0
        try:
            pid = os.fork()
        except OSError:
            return 0
        if pid == 0:
            status = 1
            try:
                signals.reset_in_child()
                name_process(REPORTER)
                close_inherited(self.log.fd, *(() if keep is None else (keep,)),
                                whole=self.closerange_whole)
                job()
                status = 0
            finally:
                os._exit(status)
        self.reporter_pids.append(pid)
        return pid

    def _metrics_state(self, clocks: tuple[float, float]) -> dict[str, object] | None:
        """The metrics endpoint (None without --metrics): `up` while its process runs,
        `restarting` from its death (or a failed fork) to the next start, `down` when it
        is not restarted (it died during a stop, or exited FILES_CHANGED, 78, after an
        upgrade under the supervisor), `starting` before the first start. `since` and
        `age`: when it entered that state, and how long ago (monotonic; `clocks` are
        accounting.read_clocks()'s, for the time of day)."""
        if not self.metrics_url:
            return None
        if self.metrics_pid:
            state = "up"
        elif self.metrics_at is not None:
            state = "starting" if self.metrics_since is None else "restarting"
        else:
            state = "down"
        retry_in = None
        now, wall = clocks
        if state == "restarting" and self.metrics_at is not None:
            retry_in = round(max(0.0, self.metrics_at - now), 1)
        deaths = 0 if self.metrics_pid and self._metrics_steady() else self.metrics_deaths
        since = self.metrics_since
        return {"url": self.metrics_url, "state": state, "pid": self.metrics_pid or None,
                "since": None if since is None else wall + since,
                "age": None if since is None else now - since,
                "restarts": self.metrics_restarts,
                "last_exit": self.metrics_exit or None, "deaths_in_a_row": deaths,
                "retry_in": retry_in}

    def _metrics_steady(self) -> bool:
        """Whether the metrics process last started lived (or lives) long enough for its
        death to start a new run of restarts, at the first delay again."""
        return time.monotonic() - self.metrics_started >= METRICS_STEADY

    def _count_metrics_death(self) -> None:
        """Count a death of the metrics process (or a failed fork for one) in its run of
        deaths in a row, which a process that had lived long enough ends first."""
        if self._metrics_steady():
            self.metrics_deaths = 0  # it had lived long enough: a new run begins
        if not self.metrics_deaths:
            self.metrics_down_since = time.monotonic()
        self.metrics_deaths += 1
        self.metrics_since = self.metrics_down_since

    def _metrics_died(self) -> float:
        """Count a death outside a stop and arm the next start: the delay before it."""
        self._count_metrics_death()
        self.metrics_restarts += 1
        delay = self._metrics_delay()
        self.metrics_at = time.monotonic() + delay
        return delay

    def _metrics_delay(self) -> float:
        """Seconds before the metrics process is started again after `metrics_deaths`
        deaths in a row: 5, 10, 20, 40, then 60 for as long as it keeps dying young."""
        exponent = min(self.metrics_deaths - 1, 8)  # 5 * 2**8 is past the cap already
        return min(METRICS_RESTART * float(2 ** exponent), METRICS_BACKOFF_MAX)

    def _read_listeners(self) -> list[ListenerReading]:
        """What the kernel says of each listener: its Listener.queue(), .drops() and
        .listening()."""
        return [(listener.queue(), listener.drops(), listener.listening())
                for listener in self.listeners]

    def _listener_table(self, kernel: list[ListenerReading] | None = None,
                        ) -> list[dict[str, object]]:
        """The listeners as the control socket's replies show them. `kernel`: each one's
        _read_listeners(), read before a reporter closed the sockets; read now by default."""
        table: list[dict[str, object]] = []
        if kernel is None:
            kernel = self._read_listeners()
        for item, (queue, drops, listening) in zip(self.listeners, kernel, strict=True):
            listen, upstream = _listener_ends(item)
            table.append({
                "link": item.link.name,
                "listen": listen,
                "port": item.port,
                "upstream": upstream,
                "resolved": [peer_text(addr[1]) for addr in self.addresses.get(item.link.key, [])],
                # The kernel's accept queue: clients not accepted yet (null: unknown).
                "queued": None if queue is None else queue[0],
                "backlog": None if queue is None else queue[1],
                # Handshakes the kernel dropped there, its queue full, since it was bound
                # (null: unknown).
                "drops": drops,
                # False for a socket shut down from outside: as the kernel says it now (before
                # the loop's next accept() finds it, and while it does not accept), or as
                # the supervisor knows it, having failed to listen again (not_listening).
                "listening": item not in self.not_listening and listening is not False,
            })
        return table
