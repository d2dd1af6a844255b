"""Runs only in a forked child: connect upstream, move bytes both ways, report how it ended.

One thread, one `poll` loop, non-blocking sockets. Each direction is a `Flow` with at
most one chunk in flight: while a chunk waits for the destination to drain, its source
is not read (backpressure, bounded memory). Bytes move with `os.splice` through a pipe
(zero-copy) or with `recv_into`/`send`; `auto` starts with the copy, which is cheaper
for small messages, and switches a direction to splice once a read fills the buffer.

EOF on one side becomes `shutdown(SHUT_WR)` on the other while the other direction keeps
flowing, with no time limit unless --halfclose-timeout is set. A reset on either side
resets the other and ends both; so does a side that stopped answering (the kernel's
ETIMEDOUT: --keepalive's probes, or retransmissions, unanswered; --user-timeout bounds
the latter).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import sys
import time

# The C function under signal.signal, which converts to and from enums in Python: run by
# a child as it dies (_reset_and_die), that code copied ~40 pages of the supervisor's.
from _signal import signal as _set_signal  # type: ignore[import-not-found]

# The C socket type: socket.socket wraps it in Python (__init__, close, ...), and running
# that Python code in a freshly forked child copies the pages it touches. The relay needs
# only the C methods.
from _socket import socket as RawSocket

from .accounting import (
    FIELDS,
    NO_ADDRESS,
    SYSTEM_ERROR,
    failure_text,
    note_failure,
    note_fallback,
    note_loop,
    own_lookup_failed,
)
from .config import (
    KEEPALIVE_PROBES,
    Endpoint,
    Link,
    Options,
    children_within_nproc,
    peer_text,
)
from .listeners import no_source_address, routes_here
from .log import INFO, SLOT, SLOT_INT, SLOT_SECONDS, WARNING, Logger

TYPE_CHECKING = False  # not typing's: see supervisor.py
if TYPE_CHECKING:
    from types import FrameType

__all__ = [
    "CHILD_DISPOSITIONS", "Address", "Ended", "RawSocket", "connect_upstream", "lookup",
    "lookup_error", "preload", "prepared_lines", "pump", "reset_connections", "serve",
]

# How a relay ended: the child's exit status, decoded by the supervisor. CLOSED and
# UPSTREAM_CLOSED both end cleanly (both FINs relayed), told apart by whose FIN reached
# the proxy first: the client's, or the upstream's (a server that closes idle clients,
# restarts or dies with nothing unread, or closes after answering a QUIT).
CLOSED = 0
FAILED = 1
CLIENT_RESET = 10
UPSTREAM_RESET = 11
CONNECT_FAILED = 12
IDLE_TIMEOUT = 13
HALFCLOSE_TIMEOUT = 14
CLIENT_TIMEOUT = 15
UPSTREAM_TIMEOUT = 16
UPSTREAM_CLOSED = 17
OUTCOMES = {
    CLOSED: "closed",
    UPSTREAM_CLOSED: "upstream-closed",
    FAILED: "failed",
    CLIENT_RESET: "client-reset",
    UPSTREAM_RESET: "upstream-reset",
    CONNECT_FAILED: "connect-failed",
    IDLE_TIMEOUT: "idle-timeout",
    HALFCLOSE_TIMEOUT: "halfclose-timeout",
    CLIENT_TIMEOUT: "client-timeout",
    UPSTREAM_TIMEOUT: "upstream-timeout",
}

COPY_CHUNK = 64 * 1024  # --relay copy
# After one side reset: how long a receiver that takes nothing while it is sending to us
# (a client blocked in its upload, reading only after it) is waited for. See _stuck.
WRITER_PATIENCE = 5.0
# --idle-timeout and --halfclose-timeout: how many times per timeout the pump looks at
# the kernel's send queues while a write waits (see pump): a receiver that takes nothing
# is cut at most 1/8 of the timeout after it is due; a wakeup each time, only then.
LOOKS_PER_TIMEOUT = 8
AUTO_CHUNK = 16 * 1024  # --relay auto: a read that fills it means bulk, so splice from then on
SPLICE_CHUNK = 1024 * 1024
PIPE_SIZE = 1024 * 1024
# The most one splice reads until its flow has delivered SPLICE_RAMP bytes. The kernel
# grows a receive buffer to about twice what its reader takes per round trip, and reads of
# up to 1 MiB as a client's socket filled took the upstream's to tcp_rmem's max (6 MiB),
# which an upstream then fills for a client that reads nothing: ~0.5 MiB with 256 KiB
# (docs/benchmarks.md, "A client that never reads"). A flow that delivered 4 MiB has a
# reader, and bulk goes on in 1 MiB steps: 256 KiB throughout cost ~10% more CPU per GB.
FIRST_SPLICE_CHUNK = 256 * 1024
SPLICE_RAMP = 4 * 1024 * 1024
# The unsent bytes a socket the relay writes to takes before it refuses more
# (TCP_NOTSENT_LOWAT). A client's socket inherits it from its listener, set once there.
# Without it the kernel queues up to tcp_wmem's max (4 MiB) for a client that never reads,
# and the relay reads that much from the upstream as fast as it comes, which grows the
# upstream socket's receive buffer toward tcp_rmem's max (6 MiB), then filled as well:
# ~10 MiB a stuck client (docs/benchmarks.md, "A client that never reads"). The same for
# an upstream that stops reading an upload, so serve() sets it on the upstream's socket,
# which nothing can inherit it from: one setsockopt per connection (~0.5 us; 4-8 MiB
# less per such connection). Flow.read lifts it there once the upload has delivered
# SPLICE_RAMP, as it ends the small reads: with it, a bulk upload's writes were of ~64
# KiB, which cost ~50% more of the proxy's CPU per GB. Bytes in flight are not counted: a
# far peer's window is no smaller for it.
NOTSENT_LOWAT = 128 * 1024
TCP_NOTSENT_LOWAT = int(getattr(socket, "TCP_NOTSENT_LOWAT", 25))
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
HAS_SPLICE = hasattr(os, "splice")

# Plain ints, not socket's IntEnum members: a child touching an enum member (or running
# enum code, as socket.family does) copies the page it lives on.
SOCK_STREAM = int(socket.SOCK_STREAM)
SOL_SOCKET, SO_ERROR, SO_LINGER = int(socket.SOL_SOCKET), socket.SO_ERROR, socket.SO_LINGER
IPPROTO_TCP, TCP_NODELAY = int(socket.IPPROTO_TCP), socket.TCP_NODELAY
SO_KEEPALIVE, TCP_KEEPIDLE = int(socket.SO_KEEPALIVE), int(socket.TCP_KEEPIDLE)
TCP_KEEPINTVL, TCP_KEEPCNT = int(socket.TCP_KEEPINTVL), int(socket.TCP_KEEPCNT)
TCP_USER_TIMEOUT = int(socket.TCP_USER_TIMEOUT)
TCP_INFO, TCP_CLOSE = int(socket.TCP_INFO), 7  # TCP_CLOSE: linux/tcp_states.h
# linux/asm-generic/ioctls.h (termios's: a module more to import). TIOCOUTQ (SIOCOUTQ):
# the bytes sent and not yet acknowledged, or not yet sent; FIONREAD (SIOCINQ): the bytes
# waiting to be read.
TIOCOUTQ, FIONREAD = 0x5411, 0x541B
SO_ACCEPTCONN = int(socket.SO_ACCEPTCONN)
SHUT_WR = int(socket.SHUT_WR)
MSG_PEEK, MSG_DONTWAIT = int(socket.MSG_PEEK), int(socket.MSG_DONTWAIT)
POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
POLLERR, POLLHUP = select.POLLERR, select.POLLHUP
SIGALRM, SIGTERM = int(signal.SIGALRM), int(signal.SIGTERM)

# A side's error that means it stopped answering rather than reset: its keepalive probes
# (--keepalive) or its retransmissions went unanswered (for --user-timeout, if set, or a
# window stayed shut that long). With ICMP errors coming back meanwhile (a router: "host
# unreachable"; a firewall's REJECT: "port unreachable", "protocol unreachable") the
# kernel reports the last of those instead of ETIMEDOUT; on an established connection
# they only ever surface at that timeout (a soft error, tcp_v4_err). ECONNREFUSED and
# ENOPROTOOPT included: a peer's RST on an established socket is ECONNRESET or EPIPE,
# never those, so there they can only be a REJECT's ICMP (a refused connect is another
# path: _connect_failed, `connect-failed reason=refused`).
_PEER_TIMEOUT_ERRORS = frozenset((errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                                  errno.ECONNREFUSED, errno.ENOPROTOOPT))
_TIMEOUT_OF = {CLIENT_RESET: CLIENT_TIMEOUT, UPSTREAM_RESET: UPSTREAM_TIMEOUT}

Address = tuple[int, tuple[object, ...]]  # (family, sockaddr) as getaddrinfo gives them

# connect() errors that mean the upstream was reached and then reset the connection. With a
# timeout, CPython connects non-blocking, polls, then reads SO_ERROR, so an RST that comes
# after the handshake but before that read fails connect(). Linux (tcp_reset) reports such
# an RST as ECONNRESET, or as EPIPE when the upstream's FIN came before it. The rest are
# real connect failures, where nothing took the connection: ECONNREFUSED (an RST answering
# our SYN), ETIMEDOUT (no answer), EHOSTUNREACH or ENETUNREACH (an ICMP error instead).
_RESET_AFTER_CONNECT = (errno.ECONNRESET, errno.EPIPE)
# connect() errors where this host found no way to the address (no route to it, no
# address of its own to send from: an IPv6 address where IPv6 is not routed or is
# disabled), nothing sent as a rule. getaddrinfo sorts such an address last, so it was
# the last error of every name with A and AAAA records: the IPv4 address's refusal (the
# service down) was said as "Network is unreachable". One of these does not replace
# another address's earlier error that is not one of them (the same address's is older),
# EADDRNOTAVAIL only when it is no source address (not local ports run out).
_NO_WAY_FROM_HERE = (errno.ENETUNREACH, errno.EADDRNOTAVAIL)


_NO_BUFFER = memoryview(bytearray())  # until a flow's first read allocates its own

# Set by preload() in the supervisor, used by serve() in its children: one buffer per
# direction, made before any fork, so a child copies only the pages its reads fill
# instead of allocating (and zeroing) whole buffers of its own.
_child_buffers: tuple[memoryview, memoryview] | None = None

# Whether a child's own lookup may run in a thread (OwnLookup): not under a pids limit
# (nor under an nproc limit too tight for two a connection: lookup_threads_fit).
# A thread is a task pids.max counts, and the --max-children derived from that limit
# counts one per connection: with every child of a link whose DNS hangs holding two,
# forks failed at half the connections and healthy links starved (the review's
# measurement: pids.max 60, 30 children). Set by preload(), in the supervisor.
_lookup_in_thread = True

# What a relay child writes to the supervisor's "ended" pipe as its last act: its pid, in
# 4 bytes (one write, atomic: less than PIPE_BUF), so that the supervisor reaps it by its
# pid rather than by a scan of all its children (Supervisor.handle_chld says why). The
# pipe's write end is set once by the supervisor, before any child is forked; -1: none.
# Packed as int.to_bytes(ENDED_PID_SIZE, ENDED_PID_ORDER), read back by the supervisor as
# memoryview.cast("I"): native order and size. Not a struct.Struct: importing struct maps
# _struct's 5 regions into the supervisor, which every fork copies and every exit tears
# down (docs/benchmarks.md, "What this session found (conn)").
ENDED_PID_SIZE = 4
ENDED_PID_ORDER = sys.byteorder
_ended_fd = -1


def set_ended_pipe(fd: int) -> None:
    """The supervisor's: its children (relay children only) tell it their end on `fd`."""
    global _ended_fd
    _ended_fd = fd


class Ended(Exception):
    """The relay is over: (outcome, the OSError), and, when a side reset while the other
    direction may hold its bytes, the Flow toward that side (its write failed, or poll
    reported the error): pump() then delivers what the other direction still holds."""


class ResetAtConnect(Ended):
    """The upstream took the connection and reset it before connect() returned:
    (UPSTREAM_RESET, the OSError, the socket). The socket is still open: what the
    upstream sent before its RST may wait in its receive queue (serve() delivers it)."""


class ClientLeft(Ended):
    """The client reset or vanished (poll: POLLERR or POLLHUP on its socket) while its
    child was still connecting upstream: (CLIENT_RESET, the OSError: ETIMEDOUT and the
    like for one whose keepalive probes went unanswered, and the error of the last attempt
    that failed before, or None). Nobody is left to connect for."""


class Flow:
    """One direction of a connection: bytes from `src` to `dst`."""

    __slots__ = (
        "chunk",
        "counters",
        "dst",
        "dst_reset",
        "end",
        "eof",
        "eof_at",
        "index",
        "marked",
        "pending",
        "pipe_r",
        "pipe_w",
        "splice",
        "src",
        "src_reset",
        "start",
        "upgrade",
        "view",
    )

    def __init__(
        self,
        src: RawSocket,
        dst: RawSocket,
        counters: memoryview,
        index: int,
        mode: str,
        src_reset: int,
        dst_reset: int,
        buffer: memoryview | None = None,
    ) -> None:
        # The outcome when src (dst) fails: which side reset. Plain small ints rather than
        # a tuple per direction: a fresh child writes the reference count of every object
        # it reads, and each tuple was a page of the supervisor's copied per child
        # (docs/benchmarks.md, "Page faults per connection"); CPython's small ints live
        # in the interpreter's own data, on pages every child writes anyway.
        self.src, self.dst = src, dst
        self.counters, self.index = counters, index
        self.src_reset, self.dst_reset = src_reset, dst_reset
        self.eof = False
        self.marked = False  # dst has our NOTSENT_LOWAT (pump), lifted at SPLICE_RAMP (read)
        # When src's EOF was read (monotonic): which side ended first, for pump()'s
        # outcome. A clock read per direction at its end, none per message.
        self.eof_at = 0.0
        self.pending = 0  # bytes read from src and not yet written to dst
        self.start = self.end = 0
        self.pipe_r = self.pipe_w = -1
        self.splice = False
        # Without a buffer from the caller, one is allocated on the first read: many
        # connections never carry a byte one way.
        self.view = buffer if buffer is not None else _NO_BUFFER
        # The default mode tested alone: each string constant compared here is an object
        # read (and so written) by every child, a page each (see above).
        if mode == "auto":
            self.upgrade, self.chunk = HAS_SPLICE, AUTO_CHUNK
        else:
            self.upgrade = False
            self.chunk = COPY_CHUNK if mode == "copy" else AUTO_CHUNK
            if mode == "splice":
                self._open_pipe()

    def _open_pipe(self) -> None:
        """Zero-copy from the next read on, if a pipe can be had."""
        self.upgrade = False
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of descriptors (EMFILE, ENFILE): copying needs none, so copy on
        try:
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the user's pipe limits: the pipe as made (64 KiB; 8 KiB once the
            # user's pipes pass pipe-user-pages-soft) still works, in smaller steps
        self.splice = True

    def close(self) -> None:
        """Close the splice pipe, if any (the sockets are the caller's)."""
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1

    def read(self) -> None:
        """Read one chunk from src and push as much as dst takes now."""
        try:
            if self.splice:
                if self.counters[self.index] >= SPLICE_RAMP:
                    size = SPLICE_CHUNK
                    if self.marked:
                        # A flow that delivered SPLICE_RAMP has a reader: bulk goes on
                        # without the low-water mark's small writes (+50% of the proxy's
                        # CPU per GB). 0: the namespace's net.ipv4.tcp_notsent_lowat.
                        self.marked = False
                        try:
                            self.dst.setsockopt(IPPROTO_TCP, TCP_NOTSENT_LOWAT, 0)
                        except OSError:
                            pass
                else:
                    size = FIRST_SPLICE_CHUNK
                n = os.splice(self.src.fileno(), self.pipe_w, size, flags=_SPLICE_FLAGS)
            else:
                if not self.view:
                    self.view = memoryview(bytearray(self.chunk))
                n = self.src.recv_into(self.view, self.chunk)
        except (BlockingIOError, InterruptedError):
            # Readable (we were polled) and nothing moved: with splice, a TCP urgent mark,
            # where splice stops while poll reports POLLIN for ever. recv() steps over it
            # (dropping the urgent byte, as socat and copy mode do): copy from here on.
            self.splice = False
            return
        except OSError as exc:
            if exc.errno == errno.ENOMEM and self.splice:
                # No page for the pipe (a memory cgroup at its limit). Nothing was read and
                # the pipe is empty (a read comes only once all is written): copying, with
                # the buffer we have or one chunk, can go on where a reset would cut.
                self.splice = False
                return
            raise Ended(self.src_reset, exc) from None
        if n == 0:
            if self.splice:
                # EOF, or that urgent mark once the peer has shut down as well: splice
                # returns 0 there. recv() tells them apart (and steps over the mark).
                self.splice = False
                self.read()
                return
            self.eof = True
            self.eof_at = time.monotonic()
            try:
                self.dst.shutdown(SHUT_WR)
            except OSError:
                pass  # dst already gone: its own read or write reports how
            return
        self.pending = n
        self.start, self.end = 0, n
        if self.upgrade and n == self.chunk:
            self.write()
            if not self.pending:
                self._open_pipe()  # bulk traffic: zero-copy from the next read on
            return
        self.write()

    def write(self) -> None:
        """Push pending bytes to dst until it would block."""
        try:
            while self.pending:
                if self.splice:
                    k = os.splice(self.pipe_r, self.dst.fileno(), self.pending, flags=_SPLICE_FLAGS)
                else:
                    k = self.dst.send(self.view[self.start : self.end])
                    self.start += k
                self.pending -= k
                self.counters[self.index] += k
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.ENOMEM and self.splice and self._unpipe():
                self.write()  # copying on, splice now off: no deeper than this
                return
            raise Ended(self.dst_reset, exc, self) from None  # the flow: see pump()

    def _unpipe(self) -> bool:
        """After a splice out of the pipe refused for want of memory (a memory cgroup at its
        limit: no page for the socket's buffer), copy on where a reset would cut: the
        bytes still in the pipe move to the buffer, in order, and go from there as a
        copy read's would. False when the pipe does not give them all (cannot be: it
        holds `pending`): the reset then goes on. Here, not in write()'s loop, so that
        the relay's usual path does no more work for it.

        The buffer holds all `pending` at once (up to SPLICE_CHUNK): the pipe's pages
        are freed as they are read, so the child holds no more than it did. One of at
        least `chunk` bytes, as copy reads need."""
        self.splice = False
        view = self.view
        if len(view) < self.pending:
            view = memoryview(bytearray(max(self.pending, self.chunk)))
        got = 0
        try:
            while got < self.pending:
                n = os.readv(self.pipe_r, [view[got : self.pending]])
                if not n:
                    return False
                got += n
        except OSError:
            return False
        self.view, self.start, self.end = view, 0, self.pending
        return True


def lookup(host: str, port: int) -> list[Address]:
    """Addresses to try for host:port, in getaddrinfo's order, each once. A failure is an
    OSError, not always a socket.gaierror: see lookup_error.

    The supervisor's lookups (at start, on reload, in its resolver child), and a child's
    own when every address it was given failed.
    """
    addresses: list[Address] = []
    # As bytes: given a str, getaddrinfo imports the idna codec (with unicodedata and
    # stringprep, ~0.6 MB and five mappings more in the supervisor, page tables every
    # fork copies). config.parse_host admits only ASCII names with labels of 1-63
    # characters, which idna leaves as they are.
    ascii_host = host.encode("ascii")
    for family, _, _, _, sockaddr in socket.getaddrinfo(ascii_host, port, type=socket.SOCK_STREAM):
        address = (int(family), tuple(sockaddr))
        if address not in addresses:
            addresses.append(address)
    return addresses


def lookup_error(exc: OSError) -> str:
    """What a failed lookup says: getaddrinfo's text for its error (gai_strerror). Its
    failures are socket.gaierror but for EAI_SYSTEM, a system call in the lookup failed
    (the DNS query's socket() at the descriptor limit), which CPython raises as a plain
    OSError from errno. That errno is not the cause: glibc's DNS lookup puts the caller's
    errno back after EMFILE, and its text named some other error (EAGAIN left over from
    a non-blocking call, or "[Errno 0] Error"). So "System error", as gai_strerror says."""
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    return SYSTEM_ERROR


def in_turn(addresses: list[Address], turn: int) -> list[Address]:
    """The order a connection tries `addresses` in when it is the `turn`-th of its
    listener: the addresses of the first one's family take turns at being first (a name
    with several, a scaled service behind round-robin DNS, gets its connections spread
    over them, as socat's own lookup in every child spreads them), each followed by the
    rest of its family in order, then the other family's addresses as they were.

    The families keep getaddrinfo's order (RFC 6724 preference): putting an IPv6 address
    first for every other connection would make half of them wait out one that is
    unreachable.
    """
    family = addresses[0][0]
    first = [address for address in addresses if address[0] == family]
    start = turn % len(first)
    return first[start:] + first[:start] + [address for address in addresses
                                            if address[0] != family]


# How long each of the child's connect() calls runs as CPython's own (its timeout is a
# poll in C) before the client is watched as well (_await_connect). A live upstream
# answers well within it, so the usual connection makes no system call and no object
# more for the watch; the kernel resends an unanswered SYN after 1 s, so a connect still
# pending then has lost its SYN, or its upstream is gone. A client that resets meanwhile
# is noticed at most this late.
WATCH_CONNECT_AFTER = 1.0


def _watch(client: RawSocket | None) -> select.poll:
    """A poll object watching the client for a reset or a hang-up only: registered with no
    event, poll reports POLLERR and POLLHUP alone. Not POLLIN: bytes the client sends
    (a request, kept for the upstream) or its FIN (a half-close) are no reason to stop,
    and, poll being level-triggered, would wake it for ever."""
    watch = select.poll()
    if client is not None:
        watch.register(client.fileno(), 0)
    return watch


def _await_connect(sock: RawSocket, watch: select.poll, seconds: float,
                   client: RawSocket | None) -> None:
    """Wait up to `seconds` for the connect in progress on the non-blocking `sock` to end,
    the client watched meanwhile (`watch`, _watch's). Raises as connect() would (OSError,
    TimeoutError when it does not end), or ClientLeft."""
    fd = sock.fileno()
    watch.register(fd, POLLOUT)
    try:
        ready = watch.poll(int(seconds * 1000) + 1)
    finally:
        watch.unregister(fd)
    if not ready:
        raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
    # The upstream's answer first: had the client reset just as the upstream took the
    # connection, the relay reports that reset (client-reset) and passes it on, as for a
    # reset right after any connect.
    if not any(ready_fd == fd for ready_fd, _ in ready):
        assert client is not None  # only the client is watched besides
        raise ClientLeft(CLIENT_RESET, _socket_error(client))
    code = sock.getsockopt(SOL_SOCKET, SO_ERROR)  # as CPython's connect() reads it
    if code:
        raise OSError(code, os.strerror(code))


class OwnLookup:
    """A child's own lookup of its target's name (connect_upstream), bounded as a connect
    is: each attempt waits for it up to --connect-timeout, with the client watched.

    getaddrinfo itself has no deadline: glibc waits out each nameserver's timeout (5 s,
    twice, for each by default), and for ever for an answer over TCP (a truncated UDP
    answer, then a server that takes the connection and says nothing). Nor can it be cut
    short from Python: a signal's handler runs only once it returns, and glibc retries
    its reads on EINTR. So it runs in a thread of its own, and the child waits for it in
    a poll that watches the client as well (_watch): a lookup that never ends leaves its
    thread blocked, and the child goes on without it (the child's os._exit ends it).
    Rather than a process of its own (the supervisor's resolver's way): a thread is
    cheaper than a fork of the child, and _thread, built into the interpreter and already
    imported by it, adds no module; `threading` would add a dozen, and the supervisor must
    not import it (see supervisor.py). Made only on this path: a connection that needs no
    lookup of its own runs none of this.

    One lookup at a time: an attempt whose lookup timed out leaves it running, and the
    next attempt (--connect-retries) waits for that one again rather than starting
    another, so a hung DNS server holds one thread, and one query, per child. Under a
    pids limit, or a tight nproc one, no thread is started (lookup_threads_fit), and a
    thread that cannot start or an eventfd that cannot be had (out of descriptors)
    leaves the plain blocking lookup, unbounded, as before."""

    __slots__ = ("client", "done", "result", "started", "target", "watch")

    def __init__(self, target: Endpoint, client: RawSocket | None) -> None:
        self.target, self.client = target, client
        self.watch = _watch(client)
        self.done = -1  # the running lookup's eventfd (readable once it ended); -1: none
        self.result: list[tuple[list[Address] | OSError, float]] = []
        self.started = 0.0

    def wait(self, timeout: float, error: OSError | None) -> list[Address] | OSError:
        """The name's addresses, or the OSError connect_upstream ends with if it gives up
        here: `error` (the attempt's failed connects', if any) with what the lookup did,
        for the connect-failed line (accounting.own_lookup_failed). Raises ClientLeft,
        carrying `error`, when the client leaves meanwhile."""
        if self.done < 0 and not self._start():
            return self._outcome(*_timed_lookup(self.target), error)
        watch, done = self.watch, self.done
        watch.register(done, POLLIN)
        try:
            ready = watch.poll(int(timeout * 1000) + 1)
        finally:
            watch.unregister(done)
        for fd, _ in ready:
            if fd != done:
                # Nobody left to look up for: ends as during a connect or a backoff.
                assert self.client is not None  # only the client is watched besides
                raise ClientLeft(CLIENT_RESET, _socket_error(self.client), error)
        if not ready:
            # Still running: left to the thread, and its eventfd open (the thread writes
            # to it when it ends: closed now, its number might be a socket's by then).
            return self._outcome(None, time.monotonic() - self.started, error)
        os.close(done)
        self.done = -1
        return self._outcome(*self.result.pop(), error)

    def _start(self) -> bool:
        """Start the lookup in a thread; False when it cannot be or must not be (under a
        pids limit or a tight nproc one: _lookup_in_thread; see the class)."""
        import _thread  # built in, and imported already: see the class

        if not _lookup_in_thread:
            return False
        try:
            done = os.eventfd(0, os.EFD_CLOEXEC)
        except OSError:
            return False
        # Every signal blocked in the thread (it inherits the mask): one it took would
        # run its handler only once the main thread ran bytecode again, after its poll.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            _thread.start_new_thread(_look_up, (self.target, done, self.result))
        except RuntimeError:  # "can't start new thread": EAGAIN, a pids limit
            os.close(done)
            return False
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.done, self.started = done, time.monotonic()
        return True

    def _outcome(self, found: list[Address] | OSError | None, seconds: float,
                 error: OSError | None) -> list[Address] | OSError:
        """What wait() returns for what the lookup gave (None: nothing yet, timed out)."""
        if isinstance(found, list):
            return found
        if found is None:
            gai = 0
        elif isinstance(found, socket.gaierror):
            gai = found.errno or socket.EAI_SYSTEM
        else:
            gai = socket.EAI_SYSTEM  # a plain OSError: EAI_SYSTEM's (lookup_error)
        code = own_lookup_failed(0 if error is None else error.errno or 0, gai, seconds)
        return OSError(code, failure_text(code, self.target.host))


def _timed_lookup(target: Endpoint) -> tuple[list[Address] | OSError, float]:
    """`target`'s addresses, or the OSError its lookup raised, and the seconds it took."""
    started = time.monotonic()
    try:
        found: list[Address] | OSError = lookup(target.host, target.port)
    except OSError as exc:
        found = exc
    return found, time.monotonic() - started


def _look_up(target: Endpoint, done: int,
             result: list[tuple[list[Address] | OSError, float]]) -> None:
    """OwnLookup's thread: _timed_lookup's outcome put in `result`, then its eventfd
    `done` made readable."""
    result.append(_timed_lookup(target))
    os.eventfd_write(done, 1)


# The proxy's own listeners, by the port each listens on: the address each binds (as
# bound_host spells it) and its link's addresses, the supervisor's (one list shared with
# its children's arguments, kept up to date in place: Supervisor._map_own_listeners).
OwnListeners = dict[int, list[tuple[str, list[Address]]]]

# The FAILURE word's code of an address refused because it connects back into the proxy
# (_loops_back): an errno no TCP connect() fails with, so never mistaken for one
# (accounting.failure_text gives its own words).
LOOP_ERRNO = errno.ELOOP


class LoopRefused(OSError):
    """A connect to `sockaddr` refused as a loop (LOOP_ERRNO): the supervisor's line names
    that address (accounting.note_loop). Made on that path only."""

    def __init__(self, sockaddr: tuple[object, ...]) -> None:
        super().__init__(LOOP_ERRNO, "connects back to this proxy")
        self.sockaddr = sockaddr


def bound_host(host: str) -> str:
    """An address as a listener binds it: no zone (`%eth0`), and an IPv4-mapped IPv6 one
    (`::ffff:10.0.0.5`, as a dual-stack socket names an IPv4 peer) as its IPv4 address.
    String work only: it runs in children."""
    host = host.partition("%")[0]
    if host[:7].lower() == "::ffff:" and "." in host:
        return host[7:]
    return host


# Addresses that are this host's whatever its interfaces: IPv6 loopback, and the two
# unspecified ones (a connect() to them reaches loopback). _this_host and the inline
# prefilter in connect_upstream both test against it, so they cannot drift apart.
_LOOPBACK6_OR_ANY = ("::1", "0.0.0.0", "::")


def _this_host(host: str, local_host: str) -> bool:
    """Is `host` (bound_host's) surely this host's own address? Loopback, unspecified (a
    connect() to it reaches loopback), or the address the client reached us at (the
    accepted socket's own: this host's for sure). Not the client's address: a client may
    well sit on the upstream's host (a host's redis reached through an ambassador, Docker's
    gateway address for both), and its connections were refused as loops."""
    return host == local_host or host.startswith("127.") or host in _LOOPBACK6_OR_ANY


def _takers(host: str, port: int, own: OwnListeners, local_host: str) -> list[int]:
    """Which of our listeners (by id of their entry in `own`) a connect to host:port from
    here reaches: its port, an address of this host (_this_host), and a bind that takes
    that address (`::` takes IPv4 too: listeners.listen_tcp clears IPV6_V6ONLY)."""
    entries = own.get(port)
    if not entries or not _this_host(host, local_host):
        return []
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # reaches loopback
    return [id(entry) for entry in entries
            if entry[0] == host or entry[0] == "::"
            or (entry[0] == "0.0.0.0" and ":" not in host)]


def _loops_back(sockaddr: tuple[object, ...], own: OwnListeners, local_host: str) -> bool:
    """Would a connect to `sockaddr` come back around to it? It lands on one of our
    listeners (_takers), and from there the links' addresses lead, listener after
    listener, back to one already passed: a link whose target's name resolves to this
    host (`vm`, `redis` in a Compose service named so), on its own port or around a ring.
    Each hop would take a child, until --max-children was used up. A chain that ends
    outside the proxy (`7000=vm:7001` beside `7001=redis:6379`) is no loop.

    Judged with no system call: an address is this host's when it is loopback, or the
    one the client reached us at (`local_host`). So a loop through an address of another
    interface (a container's own, which its service name resolves to) is let through at
    its first hop, and refused at the second, which the first hop's child reached at that
    very address. connect_upstream calls this only for an address that string tests
    find may be this host's (loopback, or `local_host`), or, once another
    address of the target was refused so, that the kernel says is (routes_here): then
    with that address as `local_host`."""
    host, port = bound_host(str(sockaddr[0])), int(sockaddr[1])  # type: ignore[call-overload]
    local_host = bound_host(local_host)
    takers = _takers(host, port, own, local_host)
    if not takers:
        return False
    entries = {id(entry): entry for entries in own.values() for entry in entries}
    # A depth-first walk that meets a listener still on its path: a ring (a listener
    # reached twice by two paths that then end outside is none).
    on_path: set[int] = set()
    done: set[int] = set()

    def rings(taker: int) -> bool:
        if taker in on_path:
            return True
        if taker in done:
            return False
        on_path.add(taker)
        for _, next_sockaddr in entries[taker][1]:
            next_port = int(next_sockaddr[1])  # type: ignore[call-overload]
            if any(rings(after) for after in _takers(bound_host(str(next_sockaddr[0])),
                                                      next_port, own, local_host)):
                return True
        on_path.discard(taker)
        done.add(taker)
        return False

    return any(rings(taker) for taker in takers)


def connect_upstream(
    addresses: list[Address], target: Endpoint, timeout: float, retries: int,
    client: RawSocket | None = None, own_listeners: OwnListeners | None = None,
    local_host: str = "",
) -> tuple[RawSocket, bool, tuple[tuple[object, ...], tuple[object, ...], OSError] | None]:
    """Connect to the first address that answers, retrying with a short backoff; return
    the socket, whether its address came from a lookup of the child's own, and None, or
    (when addresses failed before one answered) the one that answered and the last that
    failed, with its error. "The last" passes over another address this host has no way
    to (_no_way_from_here) when an earlier one failed otherwise, here and in the error
    raised.

    While it backs off, and while a connect runs past its first WATCH_CONNECT_AFTER, it
    watches `client`: ClientLeft when the client resets. A client that only sent its FIN
    is still connected for: it may have half-closed to wait for the answer to what it
    sent, or for a server that speaks first (a banner: SMTP, MySQL, SSH), as socat and
    HAProxy (without abortonclose) connect for it too; from here, a client that closed
    for good looks the same until something is sent to it. Without `client` (tests),
    nothing is watched.

    Names are resolved by the supervisor. A child looks a name up itself only when the
    supervisor has no addresses (a DNS hiccup at start-up is not fatal) or when every one
    of them failed: the name may point elsewhere now (a container recreated with a new
    address), and then this client still gets through, as with socat, and the caller
    tells the supervisor to look again. That lookup is bounded as a connect is: each
    attempt waits for it up to `timeout`, the client watched meanwhile (OwnLookup), so a
    DNS server that does not answer holds a client no longer than a dead address would;
    when it fails or times out, the error raised says so after the connect's (its code
    carries both: accounting.own_lookup_failed).

    Raises OSError when no address took the connection, and ResetAtConnect when one took
    it and reset it before connect() returned: that upstream answered, so there is nothing
    to retry.

    `own_listeners`: the proxy's own listeners, given when the target's port is one of
    theirs, and `local_host`, the address the client reached us at. An address that would
    connect back into them around a loop is not connected to: it fails as a connect does,
    with LOOP_ERRNO (_loops_back).
    """
    error: OSError | None = None
    failed: tuple[tuple[object, ...], OSError] | None = None  # the last connect() that failed
    # Made when a connect() first runs long, or before the first backoff (never on the
    # usual path: a Python object and its pages in a fresh child).
    watch: select.poll | None = None
    own_lookup: OwnLookup | None = None  # made at the first lookup of our own
    # An address of the target was refused as a loop: the name resolves to this host, and
    # its other addresses may be this host's too, which string tests cannot tell (an IPv4
    # and an IPv6 one, neither loopback): each hop refused the address it was reached at
    # and connected to the other, until --max-children was used up. They are asked of
    # the kernel (listeners.routes_here: its routing, not a bind, which any address
    # passes under ip_nonlocal_bind) and judged as this host's.
    looped = False
    # A counted while, not range(), and a comparison, not min() below: each builtin call
    # cost every child ~700 instructions on the usual path, a first attempt that connects.
    attempt = -1
    while attempt < retries:
        attempt += 1
        if attempt:
            if watch is None:
                watch = _watch(client)
            # The backoff, as a poll on the client rather than a sleep: up to 2 s a time,
            # half an hour in all at --connect-retries 1000, and a client that reset
            # meanwhile must not hold its child and a --max-children slot all that time.
            if watch.poll(int(min(0.1 * 2**attempt, 2.0) * 1000)):
                assert client is not None
                raise ClientLeft(CLIENT_RESET, _socket_error(client), _tried(error, failed))
        for own in (False, True):  # the supervisor's addresses, then a lookup of our own
            if not own:
                candidates = addresses
            elif addresses and not target.is_name:
                break  # an address target: there is nothing else to try
            else:
                if own_lookup is None:
                    own_lookup = OwnLookup(target, client)
                found = own_lookup.wait(timeout, _tried(error, failed))
                if isinstance(found, OSError):
                    error = found  # the connect's error (if any) and the lookup's
                    break
                candidates = [address for address in found if address not in addresses]
            for family, sockaddr in candidates:
                # Inline, and no more than string tests on the usual path (an upstream
                # elsewhere): a call is a code object more for every child to copy.
                host: str = sockaddr[0]  # type: ignore[assignment]
                if (own_listeners is not None
                        and (local_host.endswith(host) or host.startswith("127.")
                             or host in _LOOPBACK6_OR_ANY
                             or (looped and routes_here(family, sockaddr)))
                        and _loops_back(sockaddr, own_listeners,
                                        host if looped else local_host)):
                    # Before the connect: once connected, the next hop's child would be
                    # forked, and would connect on in its turn.
                    error = LoopRefused(sockaddr)
                    failed = (sockaddr, error)
                    looped = True
                    continue
                try:
                    sock = RawSocket(family, SOCK_STREAM)
                except OSError as exc:
                    # EAFNOSUPPORT: no IPv6 sockets here (ipv6.disable=1, systemd's
                    # RestrictAddressFamilies): the name's other addresses may do. A
                    # refused connect's error says more than this one.
                    error = error or exc
                    continue
                try:
                    # The C socket's own timeout (poll in C) for the connect's first
                    # WATCH_CONNECT_AFTER: fewer Python objects in a fresh child than a
                    # poll object of our own, so fewer pages copied. Past it, the connect
                    # goes on in the kernel, and the client is watched too.
                    sock.settimeout(
                        timeout if timeout < WATCH_CONNECT_AFTER else WATCH_CONNECT_AFTER)
                    try:
                        sock.connect(sockaddr)
                    except TimeoutError:
                        if timeout <= WATCH_CONNECT_AFTER:
                            raise
                        if watch is None:
                            watch = _watch(client)
                        _await_connect(sock, watch, timeout - WATCH_CONNECT_AFTER, client)
                except ClientLeft as left:
                    sock.close()
                    raise ClientLeft(*left.args[:2], _tried(error, failed)) from None
                except TimeoutError:
                    error = OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
                except OSError as exc:
                    if exc.errno in _RESET_AFTER_CONNECT:
                        raise ResetAtConnect(UPSTREAM_RESET, exc, sock) from None
                    if (exc.errno in _NO_WAY_FROM_HERE and failed is not None
                            and failed[0] != sockaddr and _no_way_from_here(exc, sockaddr)
                            and not _no_way_from_here(failed[1], failed[0])):
                        # The earlier address's error says more. Not this address's own
                        # error of an earlier round: its way gone since (an interface
                        # down, a network disconnected) is its state now.
                        sock.close()
                        continue
                    error = exc
                else:
                    sock.setblocking(False)
                    return sock, own, failed and (sockaddr, *failed)
                failed = (sockaddr, error)
                sock.close()
    raise _tried(error, failed) or OSError(NO_ADDRESS, "no address")


def _no_way_from_here(error: OSError, sockaddr: tuple[object, ...]) -> bool:
    """Did this host find no way to the address (_NO_WAY_FROM_HERE)? An EADDRNOTAVAIL is
    one only when no address of this host's can send there: out of local ports toward it
    fails so too, this host's trouble, which no-local-port counts so that no "upstream
    down" alert fires for it (a probe tells the two apart). A failed connect's path only."""
    if error.errno == errno.ENETUNREACH:
        return True
    return error.errno == errno.EADDRNOTAVAIL and no_source_address(
        str(sockaddr[0]), sockaddr[1])  # type: ignore[arg-type]


def _tried(error: OSError | None,
           failed: tuple[tuple[object, ...], OSError] | None) -> OSError | None:
    """`error`, with the address the last failed connect tried (`failed`'s) as its
    `tried`, which the `connect-failed` line names (accounting.note_failure). On a
    failed connect's path only."""
    if error is not None and failed is not None:
        error.tried = failed[0]  # type: ignore[attr-defined]
    return error


def pump(
    client: RawSocket,
    upstream: RawSocket,
    options: Options,
    counters: memoryview,
    base: int,
    buffers: tuple[memoryview, memoryview] | None = None,
) -> int:
    """Relay until both directions are done; return the outcome.

    `buffers` (one per direction, at least COPY_CHUNK bytes) must not be in use by
    another pump; without them each direction allocates its own on its first read.

    One function, on purpose: a fresh child writes to the code object of every function
    it calls (its reference count), so each helper this loop called cost every child a
    page or two (docs/benchmarks.md). The flows' state is read in place for the same
    reason (`f.eof and not f.pending` is a flow that is done).
    """
    poller = select.poll()
    poll = poller.poll
    cfd, ufd = client.fileno(), upstream.fileno()
    poller.register(cfd, POLLIN)
    poller.register(ufd, POLLIN)
    # Wait for the first event before building the relay's state: an idle connection (most
    # of a pooled client's connections are) then never runs, so never copies, the pages
    # of that code and those objects; ~45 KiB less per idle connection (docs/benchmarks.md).
    # poll is level-triggered: the loop below sees the same events again.
    idle_ms = -1 if options.idle_timeout is None else int(options.idle_timeout * 1000) + 1
    if not poll(idle_ms):
        return IDLE_TIMEOUT
    mode = options.relay if HAS_SPLICE else "copy"
    up_buf, down_buf = buffers if buffers is not None else (None, None)
    up = Flow(client, upstream, counters, base, mode, CLIENT_RESET, UPSTREAM_RESET, up_buf)
    up.marked = True  # serve() set NOTSENT_LOWAT on the upstream's socket
    down = Flow(upstream, client, counters, base + 1, mode, UPSTREAM_RESET, CLIENT_RESET,
                down_buf)
    cmask = umask = POLLIN
    idle = options.idle_timeout
    halfclose = options.halfclose_timeout
    last_active = time.monotonic()
    half_since = 0.0
    moved = 0
    sent_queue = -1  # the kernel's send queues once a write stopped short; -1: not noted
    # When the send queues were last looked at: set as sent_queue is noted, read only
    # once it is (nothing here for a connection without these options: its path).
    looked_at: float
    try:
        while not (up.eof and not up.pending and down.eof and not down.pending):
            if cmask == POLLIN and umask == POLLIN:
                # Both directions open, nothing pending: an interactive connection between
                # two messages, most of its life. Each readable socket is one read and,
                # usually, one complete write, with no bookkeeping in between (no
                # half-close deadline can run while both directions are open, and an idle
                # one is the poll's own timeout). Any event but plain POLLIN goes to the
                # general path below: poll is level-triggered, so it reports it again.
                steady = True
                while steady and not (up.pending or down.pending or up.eof or down.eof):
                    ready = poll(idle_ms)
                    if not ready:
                        return IDLE_TIMEOUT
                    for fd, events in ready:
                        if events != POLLIN:
                            steady = False
                            break
                        if fd == cfd:
                            up.read()
                        else:
                            down.read()
                if up.eof and not up.pending and down.eof and not down.pending:
                    break
            want_c = (POLLIN if not (up.eof or up.pending) else 0) | (
                POLLOUT if down.pending else 0
            )
            want_u = (POLLIN if not (down.eof or down.pending) else 0) | (
                POLLOUT if up.pending else 0
            )
            # A mask of -1 means unregistered: after a hang-up with nothing left to do on
            # that socket, polling it again would only report the hang-up forever.
            if want_c != cmask and not (cmask < 0 and not want_c):
                if cmask < 0:
                    poller.register(cfd, want_c)
                else:
                    poller.modify(cfd, want_c)
                cmask = want_c
            if want_u != umask and not (umask < 0 and not want_u):
                if umask < 0:
                    poller.register(ufd, want_u)
                else:
                    poller.modify(ufd, want_u)
                umask = want_u
            timeout_ms = -1
            if idle is not None or halfclose is not None:
                now = time.monotonic()
                total = counters[base] + counters[base + 1]
                if total != moved:
                    moved, last_active, sent_queue = total, now, -1
                if sent_queue < 0 and (up.pending or down.pending):
                    # A write stopped short: the kernel goes on sending what it took, as
                    # fast as the receiver reads. Its send queues, noted now and looked at
                    # again at the deadline, tell a slow reader (they shrank) from one
                    # that takes nothing; poll says writable only once a third of the
                    # buffer (megabytes) is free, long after bytes last moved on the wire
                    # (a client's socket: once half of NOTSENT_LOWAT is left unsent).
                    sent_queue, looked_at = _send_queues(client, upstream), now
                deadlines = []
                if idle is not None:
                    deadlines.append((last_active + idle, IDLE_TIMEOUT, idle))
                if halfclose is not None and (
                    (up.eof and not up.pending) or (down.eof and not down.pending)
                ):
                    # Silence since the first EOF, not time since it: bytes moving either
                    # way start the count again, as socat's -t and HAProxy's
                    # client-fin/server-fin do, so a reply still flowing is never cut.
                    half_since = half_since or now
                    deadlines.append((max(half_since, last_active) + halfclose,
                                      HALFCLOSE_TIMEOUT, halfclose))
                if deadlines:
                    deadline, outcome, timeout = min(deadlines)
                    # While a write waits, the send queues are looked at every eighth of
                    # the timeout due first, so a receiver that takes nothing is cut at
                    # most that late. Of that timeout, not the shorter of the two: a
                    # --halfclose-timeout 1 beside --idle-timeout 3600 woke every stalled
                    # connection that had not half-closed 8 times a second, for nothing.
                    look = timeout / LOOKS_PER_TIMEOUT
                    if sent_queue > 0 and (deadline <= now or now >= looked_at + look):
                        # Looked at every `look`, not only at the deadline: a queue that
                        # shrank says bytes moved at some time since the last look, and
                        # the count starts again from now, so the look before must be
                        # recent. Looked at first at the deadline, the acknowledgements
                        # of what was in flight at the note (a delayed ACK, an RTT
                        # later) made a receiver that took nothing since wait twice the
                        # timeout.
                        still = _send_queues(client, upstream)
                        looked_at = now
                        if 0 <= still < sent_queue:
                            # A receiver took bytes since: the connection moves, so the
                            # count starts again (socat's -T and -t do not cut it either).
                            sent_queue, last_active = still, now
                            continue
                    if deadline <= now:
                        # The cut: a direction that loses bytes here (read and not yet
                        # written, or still unread from its source) ends toward its
                        # receiver with an RST, as the kernel ends a socket closed with
                        # unread data; a FIN would present the truncated stream as
                        # complete. A direction that loses nothing gets the usual FIN.
                        losing = [flow.dst for flow in (up, down)
                                  if flow.pending or (not flow.eof and _unread(flow.src))]
                        for receiver in losing:  # all judged first: a reset closes a source
                            reset(receiver)
                        return outcome
                    if sent_queue > 0 and looked_at + look < deadline:
                        deadline = looked_at + look
                    timeout_ms = int((deadline - now) * 1000) + 1
            # The client and upstream branches mirror each other, written out rather than
            # shared through a helper: this runs once per message, where a call costs.
            for fd, events in poll(timeout_ms):
                if fd == cfd:
                    if events & POLLOUT or (events & (POLLERR | POLLHUP) and down.pending):
                        down.write()
                    if events & (POLLIN | POLLERR | POLLHUP) and not (up.eof or up.pending):
                        up.read()
                    elif events & POLLERR and not down.pending:
                        # With `down`: what the client sent before its reset (read and
                        # held while the upstream was slow, or still queued) goes to the
                        # upstream first, as after a failed write to the client.
                        raise Ended(CLIENT_RESET, _socket_error(client), down)
                    elif events & POLLHUP and not cmask:
                        poller.unregister(cfd)
                        cmask = -1
                else:
                    if events & POLLOUT or (events & (POLLERR | POLLHUP) and up.pending):
                        up.write()
                    if events & (POLLIN | POLLERR | POLLHUP) and not (down.eof or down.pending):
                        down.read()
                    elif events & POLLERR and not up.pending:
                        raise Ended(UPSTREAM_RESET, _socket_error(upstream), up)  # as above
                    elif events & POLLHUP and not umask:
                        poller.unregister(ufd)
                        umask = -1
        # Whose FIN the proxy read first. The client's is the usual end; the upstream's
        # is a server ending its clients (its idle timeout, a restart, its death), which
        # an operator must be able to tell from that. Two FINs in one wakeup count as
        # the client's first, `closed`: nothing tells which was sent first, and poll
        # lists the client's socket first (registered first; modify keeps its place), so
        # its EOF is read, and stamped, first, and a tie of the clock goes to it too (<=).
        return CLOSED if up.eof_at <= down.eof_at else UPSTREAM_CLOSED
    except Ended as ended:
        if len(ended.args) > 2:
            # A write failed, or poll reported an error: that side reset (the third
            # argument is the flow toward it). What it sent just before (an early answer,
            # then the RST its kernel sends for an upload it left unread; a download the
            # proxy held for a slow client) may still wait here, read or unread: deliver
            # it first, as a direct connection would, then the reset goes on as usual
            # (serve()).
            _deliver_rest(down if ended.args[2] is up else up, idle)
        raise
    finally:
        if up.pipe_r >= 0:  # a splice pipe: only then is there anything to close
            up.close()
        if down.pipe_r >= 0:
            down.close()


def _deliver_rest(flow: Flow, patience: float | None) -> None:
    """`flow.src` reset: deliver to `flow.dst` what it had sent before, the bytes already
    read (pending, in the buffer or the splice pipe) and then its receive queue (after an
    RST the kernel still hands those out, then EOF). With the patience a live connection
    gets: a receiver that takes nothing is waited for without limit, or for `patience`
    (--idle-timeout), unless it is sending to us meanwhile (_stuck). A fixed 5 s lost
    megabytes the proxy had taken for a reader that paused longer, where socat's kernel
    still delivers them after its close."""
    dst = flow.dst
    try:
        while flow.pending:
            size = min(flow.pending, COPY_CHUNK)
            if flow.splice:
                data = os.read(flow.pipe_r, size)
                if not data:
                    break  # cannot be (the pipe holds `pending` bytes), but never spin
            else:
                data = bytes(flow.view[flow.start : flow.start + size])
                flow.start += size
            _send_patiently(dst, data, patience, flow.counters, flow.index)
            flow.pending -= len(data)
        if not flow.eof:
            _deliver_queued(flow.src, dst, flow.counters, flow.index, patience)
    except OSError:
        pass  # nothing more queued (EAGAIN), or the receiver is gone or stuck


def _deliver_queued(src: RawSocket, dst: RawSocket, counters: memoryview, index: int,
                    patience: float | None) -> None:
    """`src` reset: send `dst` what is left in its receive queue (after an RST the kernel
    still hands that out, then EOF), counted at counters[index]. Raises OSError when
    nothing more is queued (EAGAIN), or `dst` is gone or stuck (_send_patiently)."""
    while True:
        data = src.recv(COPY_CHUNK, MSG_DONTWAIT)
        if not data:
            return
        _send_patiently(dst, data, patience, counters, index)


# When what goes to the receiver last moved: _send_patiently sets it, and _drain, which
# comes after it on the same socket, counts from it, so that --idle-timeout bounds the two
# together, not each (one child, one connection: a module global is that connection's).
_moved_at = 0.0


def _send_patiently(dst: RawSocket, data: bytes, patience: float | None,
                    counters: memoryview, index: int) -> None:
    """Send all of `data` to `dst`, however slowly it takes it, counting what is written
    at counters[index] as it goes (a failure after part of it counts that part);
    TimeoutError once it is stuck (_stuck), any other OSError as send() raises it.
    Progress is its send queue shrinking (TIOCOUTQ), not only room to write: poll says
    writable only once a third of the buffer is free, and a reader taking 64 KiB a
    second would look stuck."""
    global _moved_at
    view = memoryview(data)
    writable = select.poll()
    writable.register(dst.fileno(), POLLOUT)
    left = -1
    _moved_at = time.monotonic()
    while view:
        if writable.poll(500):
            try:
                sent = dst.send(view, MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
                time.sleep(0.05)  # said writable, yet no room (TCP memory pressure): no spin
            if sent:
                view = view[sent:]
                counters[index] += sent
                _moved_at = time.monotonic()
                continue
        queued = _queued(dst, TIOCOUTQ)
        if queued != left:
            left, _moved_at = queued, time.monotonic()
        elif _stuck(dst, patience):
            raise TimeoutError(errno.ETIMEDOUT, "stuck")


def _stuck(sock: RawSocket, patience: float | None) -> bool:
    """Whether a receiver that took nothing since _moved_at is given up on: after
    `patience` (--idle-timeout), or after WRITER_PATIENCE while it sends to us (bytes wait
    in our receive queue). That one reads only once its own send is done, which cannot
    be, as nothing reads its side any more: a deadlock (a client blocked in its upload
    after the upstream reset, whose send direct would fail at once with ECONNRESET).
    A reader that paused sends nothing, and is waited for."""
    still = time.monotonic() - _moved_at
    if patience is not None and still >= patience:
        return True
    if still < WRITER_PATIENCE:
        return False
    try:
        return _queued(sock, FIONREAD) > 0
    except OSError:
        return True


def _send_queues(client: RawSocket, upstream: RawSocket) -> int:
    """Bytes the kernel holds to send, toward the client and the upstream together, or -1
    when a socket cannot say (gone): without a write of the relay's they only shrink, as
    the peers acknowledge what they read."""
    try:
        return _queued(client, TIOCOUTQ) + _queued(upstream, TIOCOUTQ)
    except OSError:
        return -1


def _queued(sock: RawSocket, request: int) -> int:
    """`sock`'s queue that `request` (TIOCOUTQ, FIONREAD) asks the kernel for, in bytes."""
    queue = bytearray(4)
    fcntl.ioctl(sock.fileno(), request, queue)
    return int.from_bytes(queue, sys.byteorder)  # the C int the kernel wrote


# How often _drain looks at the send queue, for as long as a peer's delayed ACK may take
# (Linux's and Windows' delay at most 200 ms) since the queue last moved; then less and
# less often. A warm interactive peer delays its ACK ~40 ms: looking at 5, 15, 35 and 75
# ms, the reset went on ~76 ms after the last bytes, where a direct one takes 0.1 ms.
ACK_LOOK, ACK_WAIT = 0.002, 0.25


def _pass_reset_on(sock: RawSocket, patience: float | None) -> None:
    """The other side reset: reset `sock` too, once its peer has acknowledged what was
    written to it (its send queue, SIOCOUTQ, is empty), or after `patience` seconds
    without progress (none: for as long as its peer lives). The reset (close with
    SO_LINGER 0) throws that queue away: a slow reader lost what the proxy had written
    for it (megabytes: the socket buffer), where a direct connection's reader gets every
    byte the other side sent before its reset, then the reset."""
    _drain(sock, patience)
    reset(sock)


def _drain(sock: RawSocket, patience: float | None) -> None:
    """Wait until `sock`'s send queue is empty, its connection is closed (a reset from
    its peer, or the kernel's retransmissions or --user-timeout running out: the queue
    never shrinks after that), or its peer is stuck (_stuck: counted from the last
    progress of what _deliver_rest sent it, if that came just before)."""
    global _moved_at
    left = -1
    if not _moved_at:  # nothing was sent by _deliver_rest on this connection: start now
        _moved_at = time.monotonic()
    pause = ACK_LOOK
    try:
        while True:
            try:
                queued = _queued(sock, TIOCOUTQ)
            except OSError:
                return  # closed or broken already: nothing to wait for
            # TCP_INFO's first byte is the state. Not poll()'s POLLHUP: both ends' FINs
            # raise it too, with the queue still on its way.
            if not queued or sock.getsockopt(IPPROTO_TCP, TCP_INFO, 1)[0] == TCP_CLOSE:
                return
            if queued != left:
                if left >= 0:  # moved; the first look only notes the queue, the clock
                    _moved_at, pause = time.monotonic(), ACK_LOOK  # runs on from above
                left = queued
            elif _stuck(sock, patience):
                return
            elif time.monotonic() - _moved_at >= ACK_WAIT:
                pause = min(pause * 2, 0.5)  # a reader that paused: look less often
            time.sleep(pause)
    finally:
        _moved_at = 0.0  # this connection's: nothing stale for whatever runs next here


def _socket_error(sock: RawSocket) -> OSError:
    code = sock.getsockopt(SOL_SOCKET, SO_ERROR) or errno.ECONNRESET
    return OSError(code, os.strerror(code))


def lookup_threads_fit(options: Options) -> bool:
    """May a child's own lookup run in a thread, a second task per connection? Not under
    a pids limit: the --max-children derived from it counts one task a connection. Under
    an nproc limit (ulimit -u) only where it holds two a connection: most distributions
    give every user one (~60,000), which bounds nothing, and any finite one turned the
    bounded lookup off for most users who are not root."""
    if options.pids_limit is not None:
        return False
    return options.nproc_limit is None or children_within_nproc(
        options.nproc_limit, options.nproc_others,
        options.metrics is not None) >= 2 * options.max_children


def preload(options: Options, log: Logger, rounds: int = 24) -> None:
    """Prepare, in the supervisor before it forks, what every child would otherwise make.

    The buffers serve() hands to pump(). And warm code: CPython (3.11+) counts calls in
    each code object and rewrites its bytecode in place as it specializes, so a child
    running code for the first time writes to, and so copies, the pages of every code
    object it runs. Running the child's code here, `rounds` times, leaves the children
    code that is already specialized (docs/benchmarks.md): pump() over socketpairs with
    the real options, then serve() whole (connect, log lines, relay, close) over loopback.
    `log` is the children's logger: the warm-up logs with its level and format to
    /dev/null. Best effort: without sockets (no file descriptors left, no loopback in
    this network namespace) children warm their own. Also decides, from the options,
    whether a child's own lookup may use a thread (_lookup_in_thread).
    """
    global _child_buffers, _lookup_in_thread
    _child_buffers = (memoryview(bytearray(COPY_CHUNK)), memoryview(bytearray(COPY_CHUNK)))
    _lookup_in_thread = lookup_threads_fit(options)
    # A whole slot of its own (not the children's): a warm-up connect that fails writes
    # its FAILURE word there, as a child's would.
    counters = memoryview(bytearray(8 * FIELDS)).cast("Q")
    try:
        _preload_pump(options, counters, rounds)
        _preload_serve(options, log, counters, rounds)
    except OSError:
        # Out of descriptors or buffers (ENOBUFS from a send), no loopback here: what is
        # left stays cold, and the proxy starts all the same.
        pass


def _preload_pump(options: Options, counters: memoryview, rounds: int) -> None:
    """pump() over socketpairs, with the real options.

    Every other round, the upstream's end as a real connection's usually comes: its
    FIN after the proxy's (the upstream socket polls POLLIN|POLLHUP), which takes the
    relay's general path; all sent at once, both ends come in one wakeup, on the steady
    path only, and each child then specialized the general path's instructions itself
    (~20 of them: ~2,000 instructions and a page of pump's code written per child).
    """
    for round_ in range(rounds):
        client, client_peer = socket.socketpair()
        upstream, upstream_peer = socket.socketpair()
        with client, client_peer, upstream, upstream_peer:
            if round_ % 2:
                upstream.shutdown(socket.SHUT_WR)  # as pump() does at the client's EOF
            else:
                client_peer.sendall(b"PING\r\n")
            client_peer.shutdown(socket.SHUT_WR)
            upstream_peer.sendall(b"+PONG\r\n")
            upstream_peer.shutdown(socket.SHUT_WR)
            client.setblocking(False)
            upstream.setblocking(False)
            # The C sockets, as in a child (socket.socket's methods are other code).
            raw_client = RawSocket(fileno=client.detach())
            raw_upstream = RawSocket(fileno=upstream.detach())
            try:
                pump(raw_client, raw_upstream, options, counters, 0, _child_buffers)
            except Ended:
                pass  # not expected with socketpairs; the code ran all the same
            finally:
                raw_client.close()
                raw_upstream.close()


# How long the warm-up's client waits for loopback to take its connect: once, not per
# round (a connect that times out ends the warm-up; preload catches it).
PRELOAD_CONNECT_TIMEOUT = 1.0


def _preload_serve(options: Options, log: Logger, counters: memoryview, rounds: int) -> None:
    """serve() as a child runs it, against a loopback 'upstream' that never accepts.

    The connection waits in that listener's backlog, which is enough for connect() and
    for the relay to write; the 1 ms idle timeout then ends each relay, since the
    upstream can never answer. (Only the warm-up's options carry that timeout.) Each
    round's connection is taken off the backlog once the relay is done with it: left
    there, they filled a backlog that net.core.somaxconn (22 or less) had cut below
    `rounds`, and the next connect waited out --connect-timeout at every start.
    """
    warm_options = options.replace(idle_timeout=0.001, connect_retries=0)
    with (
        socket.create_server(("127.0.0.1", 0), backlog=1) as upstream_listener,
        socket.create_server(("127.0.0.1", 0), backlog=1) as client_listener,
        open(os.devnull, "wb") as devnull,
    ):
        warm_log = Logger(log.level, log.fmt, devnull.fileno())
        upstream_listener.setblocking(False)
        target = upstream_listener.getsockname()
        link = Link("127.0.0.1", 0, Endpoint(target[0], target[1]), ("preload",))
        # Half the rounds as a child of a link whose target's port is one of the proxy's
        # listeners (not this upstream's address: nothing is refused), so that the loop
        # check (connect_upstream, _loops_back) is warm too.
        warm_own: OwnListeners = {target[1]: [("127.0.0.2", [])]}
        prepared_for = ((*prepared_lines(warm_log, link), None, None),
                        (*prepared_lines(warm_log, link), None, warm_own))
        # The one address twice: a name with several runs in_turn() too.
        addresses: list[Address] = [(int(socket.AF_INET), target)] * 2
        for round_ in range(rounds):
            # Not create_connection: its getaddrinfo would import the idna codec (lookup()).
            with socket.socket() as client_peer:
                # Bounded: where loopback drops packets (lo set down after it was up, a
                # default-deny firewall without an `-o lo` rule) a blocking connect waited
                # out the SYN retries, ~130 s with no `listening` line and no status.
                client_peer.settimeout(PRELOAD_CONNECT_TIMEOUT)
                client_peer.connect(client_listener.getsockname())
                fd, address = client_listener._accept()  # type: ignore[attr-defined]
                client_peer.sendall(b"PING\r\n")
                client_peer.shutdown(socket.SHUT_WR)
                client = RawSocket(int(socket.AF_INET), SOCK_STREAM, 0, fd)
                serve(client, address, 0, 0, link, addresses, warm_options, counters,
                      warm_log, prepared_for[round_ % 2], 0)
            try:
                upstream_listener.accept()[0].close()
            except BlockingIOError:
                pass  # a connect that failed left none


def prepared_lines(log: Logger, link: Link) -> tuple[str | None, str | None]:
    """The link's "open" and "close" lines, prepared once (Logger.prepare) for serve().
    The supervisor makes them once per listener; children only fill them in."""
    target = str(link.target)
    return (
        log.prepare(INFO, "open", link=link.name, client=SLOT, upstream=target),
        log.prepare(INFO, "close", link=link.name, client=SLOT, upstream=target,
                    bytes_up=SLOT_INT, bytes_down=SLOT_INT, duration=SLOT_SECONDS,
                    outcome=SLOT),
    )


def _unread(sock: RawSocket) -> bool:
    """Whether bytes wait in the socket's receive queue (a peek: nothing is taken)."""
    try:
        return bool(sock.recv(1, MSG_PEEK | MSG_DONTWAIT))
    except OSError:  # none waiting (EAGAIN), or the socket is broken: nothing to lose
        return False


# struct linger {l_onoff 1, l_linger 0}: close() then sends an RST, not a FIN.
_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"


def reset(sock: RawSocket) -> None:
    """Close with an RST rather than a FIN, so the peer sees the reset we saw."""
    try:
        sock.setsockopt(SOL_SOCKET, SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already closed by the peer: close() below is all that is left
    sock.close()


_SIG_DFL = int(signal.SIG_DFL)  # an int, for _set_signal


# Where a TERM may find a relay child, told by the code of the frame it interrupted
# (_reset_and_die): pump()'s own, or a step of one of its flows. Built once, in the
# supervisor; a child reads them only as it dies.
_PUMP_CODE = pump.__code__
_FLOW_CODES = frozenset(member.__code__ for member in vars(Flow).values()
                        if hasattr(member, "__code__"))

# The most a stop's cut hands the client (_deliver_received): an upstream queue refilled
# as fast as it is read must not hold the death.
CUT_DELIVERY_LIMIT = 4 * 1024 * 1024


def _reset_and_die(signum: int, frame: FrameType | None) -> None:
    """A relay child's SIGTERM: a stop whose grace is over. End the connection with an
    RST each way, then die by the signal (the supervisor logs the `killed` close line).

    Dying with SIGTERM's default action, the kernel would close a socket with nothing
    unread with a FIN: the consumer would take a download cut short for a whole one, and
    the server an upload. Only this signal runs this code; the relay's path is unchanged.

    What the upstream had already sent to this child goes to the client first
    (_deliver_received): a reset throws it away, and it may be what the upstream will
    never send again (a BLPOP's element, popped off redis's list as it was sent). That
    needs pump()'s state, so it is done when the TERM finds the child in pump() itself
    (the interrupted frame's code: the relay runs no code for it). In the middle of a
    flow's step, bytes may have moved while the flow's count of them (pending, start)
    has not followed yet, and delivering by that count could repeat or skip bytes: it is
    done as that step returns to pump() (_at_flow_return), where the counts are right.
    (Not by sending the signal again: the handler would run again at once, inside this
    one, still in the step.) Elsewhere (connecting, delivering after a reset, logging),
    the resets alone, as ever.

    No connection left: serve() has closed both sockets, so the relay is over and the
    child is writing its own close line or about to exit with its outcome. Dying here,
    it had that connection logged twice, the second time `killed` (and counted so, with
    no end in its slot: its duration ran on to the reap). So it returns, and the child
    ends as it would have (a close line stuck in a full pipe: the stop's SIGKILL follows).
    Known from the scan the reset does anyway (in pump(), from its two sockets), rather
    than from a flag serve() sets: a store per connection in the module's dict would
    copy that page in every child.
    """
    code = None if frame is None else frame.f_code
    if code in _FLOW_CODES:
        # Called back at every function's return from here on, only in this dying child;
        # a flow's step is short and never blocks, so the death is not held.
        sys.setprofile(_at_flow_return)
        return
    if code is _PUMP_CODE:
        assert frame is not None
        if not _deliver_and_reset(frame):
            return
    elif not reset_connections():
        return
    _die(signum)


def _at_flow_return(frame: FrameType, event: str, arg: object) -> None:
    """sys.setprofile's hook, set by _reset_and_die when the TERM came in a flow's step:
    as that step returns to pump(), the flows' counts are right, and the cut goes on."""
    if event != "return" or frame.f_code not in _FLOW_CODES:
        return
    caller = frame.f_back
    if caller is None or caller.f_code is not _PUMP_CODE:
        return  # a step inside a step (read() writes): the outer one returns later
    sys.setprofile(None)
    if _deliver_and_reset(caller):
        _die(SIGTERM)


def _deliver_and_reset(pump_frame: FrameType) -> bool:
    """The cut of the connection pump() (`pump_frame`) relays: what the upstream had sent
    to the client (_deliver_received), then an RST each way, the upstream first.
    False when pump() had closed both already (a timeout's cut): nothing to do."""
    held = pump_frame.f_locals
    client, upstream = held["client"], held["upstream"]
    if client.fileno() < 0 and upstream.fileno() < 0:
        return False
    _deliver_received(held.get("down"), client, upstream, held["counters"], held["base"] + 1)
    # Closed here, straight after, rather than by the exit (which tears the address space
    # down first, ~0.3 ms), and with no scan of the descriptors: what the upstream sends
    # until its RST goes out is lost (a BLPOP parked at redis pops an element for each
    # push until redis has read the reset).
    reset(upstream)
    reset(client)
    return True


def _die(signum: int) -> None:
    """A relay child's end by `signum`, its connection cut: the supervisor reaps it."""
    # Said on the ended pipe, as the child's exit says it, so that the supervisor reaps
    # it by its pid (handle_chld) rather than by a scan of all the children. (A stop TERMs
    # thousands within a second or two, 64 at a time; their dying, ~0.3-0.4 ms of CPU
    # each, costs far more than scans would.) Full, or none: reaped by a scan instead.
    try:
        os.write(_ended_fd, os.getpid().to_bytes(ENDED_PID_SIZE, ENDED_PID_ORDER))
    except OSError:
        pass
    _set_signal(signum, _SIG_DFL)
    os.kill(os.getpid(), signum)


def _deliver_received(down: Flow | None, client: RawSocket, upstream: RawSocket,
                      counters: memoryview, index: int) -> None:
    """A stop's TERM in pump(): hand the client, in order, what the upstream had already
    sent to this child: first what the downward flow holds (its splice pipe, counted by
    the pipe itself, FIONREAD; or its buffer), then the upstream socket's receive queue.
    Counted at counters[index] (bytes_down). HAProxy's hard-stop-after delivers these;
    a reset without this threw them away (a BLPOP consumer lost the popped element at
    every such cut).

    Non-blocking moves only, and at most CUT_DELIVERY_LIMIT: a client that does not read
    gets what its socket takes now, and the death waits for nothing. It stops at the
    first byte that cannot go, since nothing after it may go before it. Nothing goes
    toward the upstream: the upload stays cut with an RST (README, "Signals"), as a
    server must never take a cut upload for a whole one."""
    cfd = client.fileno()
    try:
        if down is not None:
            if down.pipe_r >= 0:
                queue = bytearray(4)
                fcntl.ioctl(down.pipe_r, FIONREAD, queue)
                left = int.from_bytes(queue, sys.byteorder)
                while left:
                    moved = os.splice(down.pipe_r, cfd, left, flags=_SPLICE_FLAGS)
                    if not moved:
                        return
                    counters[index] += moved
                    left -= moved
            if not down.splice and down.pending:
                sent = client.send(down.view[down.start : down.end], MSG_DONTWAIT)
                counters[index] += sent
                if sent < down.pending:
                    return
            elif down.pending and down.pipe_r < 0:
                return  # pump()'s end closed the pipe that held them: nothing may follow
            if down.eof:
                return  # the queue ended with the upstream's FIN, read already
        budget = CUT_DELIVERY_LIMIT
        while budget > 0:
            data = upstream.recv(min(COPY_CHUNK, budget), MSG_DONTWAIT)
            if not data:
                return
            sent = client.send(data, MSG_DONTWAIT)
            counters[index] += sent
            if sent < len(data):
                return
            budget -= sent
    except OSError:
        pass  # nothing more now (EAGAIN either way), or a side gone: the reset goes on


def reset_connections() -> bool:
    """Make every connected stream socket of this process (stdio aside) close with an RST
    when it closes: a relay child ended before its relay did (_reset_and_die; the
    supervisor's accept loop, when serve() raised). A FIN would pass a stream cut short
    off as whole. The descriptors are found in /proc rather than kept somewhere by every
    child. A listening socket is left alone: one still shared with the supervisor (a
    child ended before it closed what it inherited) would pass SO_LINGER 0 on to every
    connection it accepts after. Whether there was any such socket: a relay child has
    none left once serve() has closed its two."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    found = False
    # Every descriptor tried costs a dying child pages (an OSError is built, its message
    # formatted): the ended pipe, always there and never a socket, is not tried.
    ended = _ended_fd
    for fd in fds:
        if fd < 3 or fd == ended:
            continue  # stdio: the log, never the connection
        try:
            # Positional: -1 has the kernel tell family, type and protocol from the
            # descriptor, and a keyword call would build a dict for each one tried.
            sock = RawSocket(-1, -1, -1, fd)
        except OSError:
            continue  # not a socket (a splice pipe), or already closed
        try:
            if sock.type == SOCK_STREAM and not sock.getsockopt(SOL_SOCKET, SO_ACCEPTCONN):
                found = True
                sock.setsockopt(SOL_SOCKET, SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        finally:
            sock.detach()
    return found


# The one disposition a relay child sets as it starts (see the supervisor's accept loop):
# SIGTERM ends the connection with resets (_reset_and_die). The supervisor's other
# handled signals (SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGALRM, SIGCHLD: signals.HANDLED) keep the
# handler the child inherits, which only notes them in a list the child never reads:
# deaf to them as an ignored signal would leave it (its wakeup fd is gone), for no system
# call, where setting each to SIG_IGN or SIG_DFL was one rt_sigaction per connection.
CHILD_DISPOSITIONS = (SIGTERM, _reset_and_die)


def set_keepalive(sock: RawSocket | socket.socket, seconds: int) -> None:
    """TCP keepalive on `sock`: the first probe after `seconds` of silence, then every
    seconds // KEEPALIVE_PROBES (at least 1), KEEPALIVE_PROBES unanswered and the peer is
    given up. Either side can vanish (a host powered off, a partition) with nothing queued,
    and then nothing but probes ever notices. On a listening socket, every connection it
    accepts inherits it (Linux copies the options at accept), so the supervisor sets it
    once per listener instead of each child once per connection.

    Probes only while nothing is unacknowledged: with bytes in flight to a vanished peer,
    only retransmissions find it (about 15 minutes), unless --user-timeout bounds them
    (set_user_timeout). Not set here: it would also cut a live peer that reads nothing for
    that long (its window shut), which a keepalive alone never does (README, "Dead peers").
    With both, the user timeout also replaces KEEPALIVE_PROBES as the give-up point."""
    sock.setsockopt(SOL_SOCKET, SO_KEEPALIVE, 1)
    sock.setsockopt(IPPROTO_TCP, TCP_KEEPIDLE, seconds)
    sock.setsockopt(IPPROTO_TCP, TCP_KEEPINTVL, seconds // KEEPALIVE_PROBES or 1)
    sock.setsockopt(IPPROTO_TCP, TCP_KEEPCNT, KEEPALIVE_PROBES)


def set_notsent_lowat(sock: RawSocket | socket.socket) -> None:
    """NOTSENT_LOWAT on a listener, for the client sockets it accepts (Linux copies it at
    accept). A kernel without the option (before 3.12) keeps the queue as it was."""
    try:
        sock.setsockopt(IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    except OSError:
        pass


def set_user_timeout(sock: RawSocket | socket.socket, seconds: float) -> None:
    """TCP_USER_TIMEOUT on `sock`: the kernel gives the peer up (ETIMEDOUT) once bytes sent
    to it stay unacknowledged, or its shut window stays shut, for `seconds` (in whole
    milliseconds, at least 1: 0 would turn it off). It bounds what keepalive
    cannot: a peer that vanished with data in flight. Inherited at accept, as keepalive."""
    sock.setsockopt(IPPROTO_TCP, TCP_USER_TIMEOUT, round(seconds * 1000) or 1)


# serve()'s rare ends and detours, one call each there, so that serve()'s own code is what
# every connection runs: Python 3.11 specializes (rewrites) a function's bytecode as it
# runs, and a child writes to, and so copies, the pages of the code it runs; code out
# here is not touched until its path is taken (docs/benchmarks.md, "Page faults per
# connection").


def _connect_failed(client: RawSocket, error: OSError, counters: memoryview, base: int) -> int:
    """serve()'s end when no address took the connection: CONNECT_FAILED.

    No line here: the supervisor writes `connect-failed`, folded per link, when it reaps
    this child (right away), from the error's code left in the slot. Every client of a
    dead upstream fails so, and a line each flooded the log."""
    if isinstance(error, LoopRefused):  # its address too, for the line to name
        note_loop(counters, base, error, error.sockaddr)
    else:
        note_failure(counters, base, error, getattr(error, "tried", None))
    client.close()
    return CONNECT_FAILED


def _client_left(client: RawSocket, left: ClientLeft, counters: memoryview, base: int) -> int:
    """serve()'s end when the client left while its child was connecting (ClientLeft).

    The client reset while its child backed off between retries, or waited on an
    upstream slow to answer: the child ends now and frees its --max-children slot (a
    health check or an app that reconnects on its own would otherwise fill them all
    against a dead upstream, with children nobody waits for). Counted as the client's
    reset (`client-reset`, as a probe's reset after the connect is), not as an upstream
    failure: the upstream may only have been slow, and the client's leaving says nothing
    of it. No line: the upstream never took the connection, so there is no open line to
    close, and a line per impatient client would flood the log in the very outage that
    the folded connect-failed keeps it short in."""
    failed = left.args[2]
    if failed is not None:
        # But an attempt had failed already: the upstream did say something, and it is
        # counted as when the last retry fails (connect-failed, upstream_failures, from
        # the code left in the slot). Were it not, a dead upstream whose every client
        # gives up before the last retry (health checks) would go unseen.
        return _connect_failed(client, failed, counters, base)
    client.close()
    # A client that vanished (its keepalive probes unanswered) went silent rather than
    # reset: `client-timeout`, as pump() counts the same error.
    if left.args[1].errno in _PEER_TIMEOUT_ERRORS:
        return CLIENT_TIMEOUT
    return CLIENT_RESET


def _fell_back(counters: memoryview, base: int,
               fallback: tuple[tuple[object, ...], tuple[object, ...], OSError],
               fallback_due: list[float] | None, supervisor: int, log: Logger) -> None:
    """Connected, but only after an address failed (a dead first address of a name, a
    retry): each such connection waited for it, and nothing else would say so.

    The supervisor writes the `connect-fallback` line, folded per link, from the slot (a
    line each flooded the log: half the connections to a name with one dead address); it
    counts this one at the reap, or when told: the connection may live for hours, and
    the first fallback is logged at once. Told only when the link's line is due
    (`fallback_due`, the last of serve()'s `lines`), with SIGALRM, its one "look again"
    (the --resolve-every timer's): it counts the live children's fallbacks and looks the
    targets' names up again, at most once per RESOLVE_AGAIN_AFTER. For a name, one of its
    addresses is dead, worth a look; after a --connect-retries retry to an IP address
    there is nothing to resolve for this link (a lookup of other links' names, if any,
    starts all the same, as at a tick of the timer), but without the signal its line
    would wait for the reap."""
    note_fallback(counters, base, *fallback)
    if (fallback_due is not None and supervisor and log.level <= WARNING
            and time.monotonic() >= fallback_due[0] and os.getppid() == supervisor):
        os.kill(supervisor, SIGALRM)


def serve(
    client: RawSocket,
    client_address: tuple[object, ...],
    base: int,
    turn: int,
    link: Link,
    addresses: list[Address],
    options: Options,
    counters: memoryview,
    log: Logger,
    lines: tuple[str | None, str | None, list[float] | None, OwnListeners | None],
    supervisor: int,
) -> int:
    """The whole life of one connection in its child; returns the exit status.

    `base` is the child's slot in `counters`; `turn` counts the listener's connections
    (in_turn); the arguments after it are the same for every connection of a listener,
    and the supervisor hands them over as one tuple.
    `lines` are the link's prepared "open" and "close" lines (prepared_lines()); None:
    log that one the usual way. Then the link's `fallback_due`: a list holding when its
    next `connect-fallback` line is due (monotonic; the supervisor sets it as it writes
    one), a fallback before then only noted in the slot; None: never tell. It rides in
    `lines` rather than as an argument of its own: every argument is a reference count
    each child writes, and so a page it copies, while an item of `lines` is touched only
    by the fallback path that reads it (docs/benchmarks.md, "Page faults per
    connection"). Last, the proxy's own listeners (OwnListeners) when the target's port
    is one of theirs, else None: connect_upstream refuses an address that loops back.
    `supervisor` is the supervisor's pid (0: none to tell).
    """
    started = time.monotonic()
    client.setblocking(False)
    if len(addresses) > 1:
        addresses = in_turn(addresses, turn)
    own_listeners = lines[3]
    try:
        upstream, looked_up, fallback = connect_upstream(
            addresses, link.target, options.connect_timeout, options.connect_retries, client,
            # The address the client reached us at, for the loop check only (a system
            # call: only for a link whose target's port is one of our listeners').
            own_listeners, "" if own_listeners is None else client.getsockname()[0],
        )
    except ClientLeft as left:
        return _client_left(client, left, counters, base)
    except OSError as exc:
        return _connect_failed(client, exc, counters, base)
    except ResetAtConnect as ended:
        # The upstream took the connection and reset it before connect() returned: the same
        # end as an RST just after the connect, which pump() reports as upstream-reset, and
        # told the same way (what it sent first delivered, open and close lines, the client
        # reset). Not a connect failure: no retry, no connect-failed count, no re-resolving.
        cause, upstream = ended.args[1], ended.args[2]
        try:
            # What it sent first (a server at its connection limit: an error line, then
            # the reset) is still in the socket's receive queue, which the kernel keeps
            # through the reset: as pump() does after an RST mid-stream (_deliver_rest),
            # it goes to the client before the reset does.
            _deliver_queued(upstream, client, counters, base + 1, options.idle_timeout)
        except OSError:
            pass
        upstream.close()
        if cause.errno == errno.EPIPE:
            # Its FIN came before its RST: relayed in that order, as pump() relays them.
            try:
                client.shutdown(SHUT_WR)
            except OSError:
                pass  # the client is gone already
        _pass_reset_on(client, options.idle_timeout)
        if log.level <= INFO:
            client_text, upstream_text = peer_text(client_address), str(link.target)
            log.info("open", link=link.name, client=client_text, upstream=upstream_text)
            log.info("close", link=link.name, client=client_text, upstream=upstream_text,
                     bytes_up=0, bytes_down=counters[base + 1],
                     duration=time.monotonic() - started, outcome=OUTCOMES[UPSTREAM_RESET],
                     error=cause.strerror or str(cause))
        return UPSTREAM_RESET
    if fallback is not None:
        _fell_back(counters, base, fallback, lines[2], supervisor, log)
    if looked_up and supervisor and os.getppid() == supervisor:
        # The name points elsewhere now: SIGALRM, the supervisor's "resolve now" (the
        # --resolve-every timer's signal), so that the clients after this one go straight
        # to the new address. Only to our own supervisor: were it gone, the parent would
        # be an init, which SIGALRM might kill.
        os.kill(supervisor, SIGALRM)
    # Nagle off, where the socket takes it: an MPTCP one refuses it before Linux 5.17
    # (EOPNOTSUPP, `mptcpize run`), and a latency hint is no reason to cut the connection.
    try:
        client.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
    except OSError:
        pass
    try:
        upstream.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
    except OSError:
        pass
    try:
        # What the client's socket has from its listener (NOTSENT_LOWAT): an upstream that
        # stops reading an upload then holds ~0.2 MiB of it here, not tcp_wmem's max.
        upstream.setsockopt(IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    except OSError:
        pass  # a kernel without it (before 3.12): the queue as it was
    keepalive = options.keepalive
    if keepalive is not None:
        # The upstream side here; the client's socket has it already, inherited from its
        # listener (set_keepalive() at bind, by the supervisor). Off, a connection pays
        # for the test above and nothing else (docs/benchmarks.md).
        set_keepalive(upstream, keepalive)
    user_timeout = options.user_timeout
    if user_timeout is not None:
        # Likewise: the client's socket inherited it from its listener. Set after the
        # connect, which --connect-timeout bounds, not this.
        set_user_timeout(upstream, user_timeout)
    info = log.level <= INFO  # inline, not a Logger method: a call is a code object to copy
    if info:
        # Formatted here, and only for a log line: not in the supervisor (accounting.ChildRecord).
        # config.peer_text written out: its two calls cost ~23 KiB per idle connection.
        host, port = client_address[0], client_address[1]
        if ":" not in host:  # type: ignore[operator]
            client_addr = f"{host}:{port}"
        elif client_address[3]:  # a link-local client: its interface's index (peer_text)
            client_addr = f"[{host}%{client_address[3]}]:{port}"
        else:
            client_addr = f"[{host}]:{port}"
        if lines[0] is None:
            log.info("open", link=link.name, client=client_addr, upstream=str(link.target))
        else:
            log.emit_prepared(lines[0], client_addr)
    error = ""
    try:
        outcome = pump(client, upstream, options, counters, base, _child_buffers)
    except Ended as ended:
        outcome, cause = ended.args[:2]  # a third, from a failed write, is pump()'s
        error = cause.strerror or str(cause)
        if cause.errno in _PEER_TIMEOUT_ERRORS:
            # Not a reset: that side went silent. The other side still gets an RST, as for
            # a reset: what the silent one sent last may never have arrived.
            outcome = _TIMEOUT_OF.get(outcome, outcome)
        _pass_reset_on(upstream if outcome in (CLIENT_RESET, CLIENT_TIMEOUT) else client,
                       options.idle_timeout)
    client.close()
    upstream.close()
    if info:
        duration = time.monotonic() - started
        if lines[1] is not None and not error:  # the usual case: no error field
            log.emit_prepared(lines[1], client_addr, counters[base], counters[base + 1],
                              duration, OUTCOMES[outcome])
        else:
            fields: dict[str, object] = {
                "link": link.name,
                "client": client_addr,
                "upstream": str(link.target),
                "bytes_up": counters[base],
                "bytes_down": counters[base + 1],
                "duration": duration,
                "outcome": OUTCOMES[outcome],
            }
            if error:
                fields["error"] = error
            log.info("close", **fields)
    return outcome
