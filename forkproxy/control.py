"""The supervisor's end of the control socket: one JSON request line in, one JSON reply out.

Served from the supervisor's own poll loop with non-blocking sockets (no thread in the
forking process). The client end is `status.py`.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import time
from collections.abc import Callable

MAX_CLIENTS = 16
MAX_REQUEST = 4096
MAX_PATH = 107  # sockaddr_un.sun_path is 108 bytes with the NUL
# Seconds a reporter (the child the supervisor forks to answer `status`) has to send its
# whole reply to a client that reads slowly, or not at all; then it gives up. Here, not
# in supervisor.py, so that the client end (status.REQUEST_DEADLINE) is sized from it.
REPORT_TIMEOUT = 10.0


class Later:
    """The type of LATER."""


# What a handler returns for a request it answers later, with ControlServer.answer: the
# supervisor answers every `reload` waiting with one reload (Supervisor.reload).
LATER = Later()

# A reply, LATER, or None when the handler handed the client's socket to another process
# that answers on it (the supervisor answers `status` from a forked child: see
# Supervisor.answer_in_child).
Handler = Callable[[dict[str, object], socket.socket], "dict[str, object] | Later | None"]


def encode_reply(reply: dict[str, object]) -> bytes:
    """The reply line a client reads."""
    return json.dumps(reply).encode() + b"\n"


# Where a default status socket directory's owner is told to go instead, when it cannot
# be used: said by serve and the clients alike.
ELSEWHERE = "(set XDG_RUNTIME_DIR, or give --status-socket, elsewhere)"
UID_MAP = "/proc/self/uid_map"


def outer_uid(uid: int, uid_map: str | None) -> int | None:
    """`uid` (as this process's user namespace sees it) as the namespace that made ours
    sees it, from the text of /proc/self/uid_map (`INSIDE OUTSIDE COUNT` lines): the same
    number outside any user namespace (`0 0 4294967295`); the real user's inside `unshare
    -r`, rootless podman, rootlesskit (0 there, 999 on the host, whose /tmp it shares);
    None where no line maps it (`unshare -U` with no map, where every unmapped owner reads
    as 65534). No map to read (no /proc): `uid` as it is."""
    if uid_map is None:
        return uid
    for line in uid_map.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(field.isdigit() for field in fields):
            inside, outside, count = (int(field) for field in fields)
            if inside <= uid < inside + count:
                return outside + uid - inside
    return None


def own_outer_uid() -> int | None:
    """This process's real uid as outer_uid says it, read from UID_MAP."""
    try:
        with open(UID_MAP, "rb") as handle:
            uid_map: str | None = handle.read(4096).decode("ascii", "replace")
    except OSError:
        uid_map = None
    return outer_uid(os.getuid(), uid_map)


def default_dir(environ: dict[str, str] | os._Environ[str], uid: int | None) -> str:
    """Per user, so two users' proxies never meet.

    $XDG_RUNTIME_DIR/forkproxy, or /tmp/forkproxy-UID without it. A relative
    XDG_RUNTIME_DIR counts as unset, as the XDG base directory spec says: relative to
    each process's working directory, serve and its clients would look in different places.

    UID: `uid`, the user's as the namespace outside ours sees it (own_outer_uid). Named
    by the uid inside a user namespace, `unshare -r` (uid 0 inside) made /tmp/forkproxy-0
    owned by its real user, and root's next plain `serve` on the host exited 2. None (a
    user namespace that maps no uid): PermissionError, as /tmp/forkproxy-65534 would be
    the real nobody's, and whose a directory there is cannot be told."""
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return os.path.join(runtime, "forkproxy")
    if uid is None:
        raise PermissionError(errno.EPERM, "a user namespace that maps no uid (unshare -U "
                              f"without -r) has no /tmp/forkproxy-UID of its own {ELSEWHERE}")
    return f"/tmp/forkproxy-{uid}"


def prepare_dir(path: str) -> None:
    """Create the socket directory 0700, refusing one that someone else owns."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        check_owned(path)


def check_owned(path: str) -> None:
    """PermissionError unless `path` is a directory (not a link to one) of this user's:
    in another user's, they could put a socket of their own where we look for ours.
    Its message does not name `path`: the callers' lines do, quoted (it came from
    XDG_RUNTIME_DIR, and a newline or an ESC in it went out raw here)."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        # Anyone can make /tmp/forkproxy-UID first: say where to go instead.
        raise PermissionError(errno.EPERM, f"not a directory owned by this user {ELSEWHERE}")


def dir_error(exc: OSError) -> str:
    """Why a default socket directory cannot be used, and where to go instead: a
    missing XDG_RUNTIME_DIR (no login session) or another user's (`su` keeps root's)
    said only `Permission denied`."""
    reason = exc.strerror or str(exc)
    return reason if reason.endswith(ELSEWHERE) else f"{reason} {ELSEWHERE}"


class UnixSocketRefused(OSError):
    """socket(AF_UNIX) refused by this process's sandbox; its strerror says so, and what
    to do. No path's or directory's fault: those errors blamed them."""


def unix_socket() -> socket.socket:
    """A Unix stream socket. UnixSocketRefused where the sandbox refuses the family: a
    seccomp filter (systemd's RestrictAddressFamilies= without AF_UNIX: EAFNOSUPPORT; a
    container runtime's profile: EPERM, EACCES) or a security module's policy (EACCES).
    Every Linux has Unix sockets, so those are never the kernel's. Other errors (EMFILE,
    ENOBUFS) as they are."""
    try:
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:
            why = "a seccomp filter, such as systemd's RestrictAddressFamilies= without AF_UNIX"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            why = "a seccomp filter or a security module's policy: SELinux, AppArmor"
        else:
            raise
        raise UnixSocketRefused(exc.errno, f"Unix sockets are refused to this process "
                                f"({exc.strerror}: {why}); allow AF_UNIX") from None


class _Client:
    __slots__ = ("inbox", "outbox", "sock", "waiting")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = b""
        self.outbox = b""
        self.waiting = False  # its request was taken, its answer comes later (LATER)


def check_path(path: str) -> None:
    """OSError for a path no Unix socket can have: empty, or past sun_path's bytes; or
    one of blanks alone, which a socket can have and nobody means (`"$DIR "` left empty)."""
    if not path:
        raise OSError(errno.EINVAL, "an empty path")  # bind('') would autobind unnamed
    if path.isspace():  # bound in the working directory, a file named ' ' nobody looks for
        raise OSError(errno.EINVAL, "a blank path")
    if len(os.fsencode(path)) > MAX_PATH:
        raise OSError(errno.ENAMETOOLONG, f"longer than the {MAX_PATH} bytes a Unix "
                      "socket path can have")


class ControlServer:
    """A Unix stream socket; `handle` maps a request dict to a reply dict."""

    def __init__(self, path: str, handle: Handler, replace: bool = False,
                 sweep: bool = True) -> None:
        """`replace`: a live socket at `path` is replaced, not refused (serve --take-over:
        the socket of the supervisor taken over, whose close() then leaves ours alone).
        `sweep`: False where the caller swept the directory itself (sweep_staging), once
        for several tries: what a try that failed swept was never counted."""
        self.path = path
        self.handle = handle
        # Checked first: the short staging name below would bind and the link would
        # succeed, leaving a socket no client can connect() to by its name.
        check_path(path)
        # What a supervisor killed before it gave its socket its name left beside it.
        self.swept_staging = sweep_staging(os.path.dirname(path) or ".") if sweep else []
        self.sock, self.identity = _listen(path, replace)
        self.clients: dict[int, _Client] = {}
        # While a handler runs: what its client sent after the request line, read with
        # it. A handler that takes the connection over (hand-over) reads on from there:
        # a taker that wrote "hand-over" and "go" at once was never heard saying `go`.
        self.after_line = b""

    def lost(self) -> bool:
        """Is our socket file gone from its name (an operator's rm, systemd-tmpfiles'
        aging of /tmp), or another file there now? Nobody can connect to us then."""
        try:
            found = os.lstat(self.path)
        except OSError:
            return True
        return (found.st_dev, found.st_ino) != self.identity

    def touch_if_older(self, seconds: float) -> None:
        """Give our socket file the time of now if its access and modification times are
        both older than `seconds`: systemd-tmpfiles removes what is older than its age by
        all of them (10 days for /tmp upstream), and its test for a live socket
        (/proc/net/unix) names the staging name we bound, not the file, so a socket
        nobody connected to for that long went (connect() touches the access time once a
        day at most under relatime, never under noatime). Call it after lost() said no."""
        try:
            found = os.lstat(self.path)
            if max(found.st_atime, found.st_mtime) < time.time() - seconds:
                os.utime(self.path, follow_symlinks=False)
        except OSError:
            pass  # gone meanwhile, or not ours to touch: lost() finds the first next time

    def rebind(self, replace: bool = False) -> None:
        """Listen on a new socket under our path, with the rules of the first: a stale
        socket there is removed, a live one or a file that is not a socket is an OSError
        (EADDRINUSE, ENOTSOCK), and the old socket is kept then. The clients connected to the
        old one are served to their end; the caller polls the new fileno(). `replace`: a
        live socket there is replaced too (_listen)."""
        sock, self.identity = _listen(self.path, replace)
        self.sock.close()  # a client that connected to it just now is not answered
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[list[int], list[int]]:
        """Accept waiting clients: (fds to poll, fds dropped to make room).

        Always accepting, and dropping the oldest client when full (once its request,
        if one waits, is answered), keeps clients that connect and say nothing from
        locking `check` out (and the listener, readable but never accepted, from spinning
        the level-triggered loop).
        """
        fresh: list[int] = []
        dropped: list[int] = []
        for _ in range(MAX_CLIENTS):
            if len(self.clients) >= MAX_CLIENTS and all(
                    client.waiting for client in self.clients.values()):
                # None may be dropped: each asked, and its answer is on its way (the
                # next turn of the loop). The newcomers wait in the backlog until then.
                break
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # EMFILE and friends. The socket stays readable: with nothing accepted, tell
                # the caller, who must stop polling it for a while rather than spin.
                if not fresh:
                    raise
                break
            dropped += self.adopt(sock)
            fresh.append(sock.fileno())
        # An fd number can be dropped and reused by a fresh client within one call.
        return (
            [fd for fd in fresh if fd in self.clients],
            [fd for fd in dropped if fd not in self.clients],
        )

    def adopt(self, sock: socket.socket) -> list[int]:
        """Serve `sock` as a client: one accepted here, or one connected elsewhere and
        handed to us (the metrics process's, over a socketpair: see
        Supervisor.handle_metrics_handoff). The fd dropped to make room, if any."""
        dropped: list[int] = []
        if len(self.clients) >= MAX_CLIENTS:
            # dicts keep insertion order; never one waiting for its answer (a `reload`:
            # see accept, which stops first when all are). A handed-over client finding
            # all waiting is served beyond the limit: they are answered at the next turn.
            for oldest in [fd for fd, client in self.clients.items() if not client.waiting]:
                # Its request may be waiting, not yet read in this round of poll(): answer
                # it first. Only a client that asked nothing (or reads nothing) is dropped.
                if not self.service(oldest):
                    dropped.append(oldest)  # answered (or gone): room made
                    break
                if self.clients[oldest].waiting:
                    # It asked just now for what is answered later (a `reload`, at the
                    # loop's next turn): dropped, it read no answer to a reload that went
                    # through. Kept; the next oldest goes instead.
                    continue
                self._drop(oldest)
                dropped.append(oldest)
                break
        sock.setblocking(False)
        self.clients[sock.fileno()] = _Client(sock)
        return dropped

    def service(self, fd: int) -> bool:
        """Read or write for one client; False when it is finished (caller unregisters)."""
        client = self.clients[fd]
        if client.waiting:
            return True  # its request is taken: nothing more is read until it is answered
        try:
            if not client.outbox:
                data = client.sock.recv(MAX_REQUEST)
                if not data and not client.inbox:
                    return self._drop(fd)
                client.inbox += data
                if data and b"\n" not in client.inbox:
                    return len(client.inbox) < MAX_REQUEST or self._drop(fd)
                # A line, or what came before the end of the client's writing: a request
                # sent without a newline, then a shutdown (`printf ... | socat - UNIX:...`),
                # is answered too, not dropped without a word.
                line, _, self.after_line = client.inbox.partition(b"\n")
                try:
                    outbox = self._reply(line, client.sock)
                finally:
                    self.after_line = b""
                if outbox is None:
                    return self._drop(fd)  # answered by another process: close our copy
                if isinstance(outbox, Later):
                    client.waiting = True
                    return True
                client.outbox = outbox
            sent = client.sock.send(client.outbox)
            client.outbox = client.outbox[sent:]
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return self._drop(fd)
        return bool(client.outbox) or self._drop(fd)

    def wants_write(self, fd: int) -> bool:
        return bool(self.clients[fd].outbox)

    def answer(self, socks: list[socket.socket], reply: dict[str, object]) -> list[int]:
        """Give the clients whose handler said LATER, by their sockets, one reply (encoded
        once: a reload's lists every listener); returns the fds now with a reply to
        send (service() sends it). A client gone meanwhile is skipped, even where its fd
        number went to a newer client."""
        encoded = encode_reply(reply)
        ready: list[int] = []
        for sock in socks:
            client = self.clients.get(sock.fileno())  # -1 once closed
            if client is None or client.sock is not sock or not client.waiting:
                continue
            client.waiting = False
            client.outbox = encoded
            ready.append(sock.fileno())
        return ready

    def _reply(self, line: bytes, sock: socket.socket) -> bytes | Later | None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            reply = self.handle(request, sock)
        except (ValueError, RecursionError) as exc:  # "[[[[..." nests past the stack
            reply = {"ok": False, "error": f"bad request: {exc}"}
        if reply is None or isinstance(reply, Later):
            return reply
        return encode_reply(reply)

    def _drop(self, fd: int) -> bool:
        self.clients.pop(fd).sock.close()
        return False

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        self.sock.close()
        try:
            found = os.lstat(self.path)
            if (found.st_dev, found.st_ino) == self.identity:
                os.unlink(self.path)
        except OSError:
            pass  # gone already, or not ours to remove now (EACCES): the stop goes on


def _listen(path: str, replace: bool = False) -> tuple[socket.socket, tuple[int, int]]:
    """A non-blocking socket listening under `path`, and the (st_dev, st_ino) of its file.

    Bound under a staging name and given its real name once it listens, so a socket file
    under its real name always answers: sweep_stale() in another supervisor starting at
    the same moment can then tell a dead one from one not listening yet. `replace`: a
    socket there, live or not, is replaced in one rename(), so that the name always
    answers (a file that is not a socket is still refused)."""
    if not replace or probe(path) != LIVE:
        _remove_if_stale(path)
    staging = _staging_name(path)
    if replace and staging == path:
        os.unlink(path)  # no room for a staging name: a moment with no socket there
    sock = unix_socket()
    old_umask = os.umask(0o077)
    try:
        sock.bind(staging)
        sock.listen(MAX_CLIENTS)
        if staging != path and replace:
            os.rename(staging, path)
        elif staging != path:
            _publish(staging, path)
        # What close() may remove: the file we made, not one that took its place.
        found = os.lstat(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock, (found.st_dev, found.st_ino)


def _staging_name(path: str) -> str:
    """A name beside `path` that no other process picks: a random one. (The pid was not:
    supervisors in PID namespaces that share a directory, each PID 1, took the same
    name at the same moment, and one unlinked or failed on the other's socket.)
    `path` itself when no such name fits in sun_path."""
    prefix = os.path.join(os.path.dirname(path), ".")
    room = MAX_PATH - len(os.fsencode(prefix)) - len(".tmp")
    if room < 8:
        return path  # bound under its own name: bind() never replaces a file either
    return f"{prefix}{os.urandom(8).hex()[:room]}.tmp"


def _is_staging_name(name: str) -> bool:
    """Is `name` one _staging_name makes: a dot, 8 to 16 hex digits, `.tmp`?"""
    digits = name[1:-len(".tmp")]
    return (name.startswith(".") and name.endswith(".tmp") and 8 <= len(digits) <= 16
            and all(digit in "0123456789abcdef" for digit in digits))


# Seconds a staging file must be old before sweep_staging may take it for a leftover. A
# live supervisor's is renamed within microseconds of its bind(); the one moment it
# refuses connections, between bind() and listen(), is two system calls long.
STAGING_LEFT_AFTER = 60.0


def sweep_staging(directory: str) -> list[str]:
    """Remove the staging files (_staging_name) in `directory` that a supervisor killed
    between its bind() and its rename (SIGKILL, the OOM killer) left behind, one more each
    time, for ever; return their paths. Only what is proved dead goes: a socket file of
    our user's, named as a staging file, older than STAGING_LEFT_AFTER, whose connect() is
    refused (nobody listens), and bound by no socket of our network namespace
    (/proc/net/unix: one bound that does not listen yet is a live supervisor's, stopped
    between those two calls). Anything else, and any error, is left alone."""
    try:
        names = [name for name in os.listdir(directory) if _is_staging_name(name)]
    except OSError:
        return []
    bound: set[bytes] | None = None  # /proc/net/unix, read at most once, when needed

    def dead(path: str) -> bool:
        nonlocal bound
        found = os.lstat(path)
        if (not stat.S_ISSOCK(found.st_mode) or found.st_uid != os.geteuid()
                or time.time() - found.st_mtime < STAGING_LEFT_AFTER
                or probe(path) != STALE):
            return False
        bound = _bound_names() if bound is None else bound
        return os.fsencode(os.path.basename(path)) not in bound

    return _remove_each([os.path.join(directory, name) for name in names], dead)


def _remove_each(paths: list[str], dead: Callable[[str], bool]) -> list[str]:
    """Remove each of `paths` that `dead` says is (an OSError from either: left alone);
    those removed."""
    removed: list[str] = []
    for path in paths:
        try:
            if not dead(path):
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def _bound_names() -> set[bytes]:
    """The last component of the path of every Unix socket bound in our network namespace,
    as bound (/proc/net/unix's last column). OSError where it cannot be read: nothing can
    be proved dead then. Through /proc/self/net, where /proc/net points: a /proc of the
    processes only (systemd's ProcSubset=pid) has no /proc/net."""
    with open("/proc/self/net/unix", "rb") as table:
        next(table, None)  # the heading
        return {fields[7].rstrip(b"\n").rpartition(b"/")[2] for line in table
                if len(fields := line.split(maxsplit=7)) == 8}


def _in_use() -> OSError:
    return OSError(errno.EADDRINUSE, "something listens there (another forkproxy?)")


def _publish(staging: str, path: str) -> None:
    """Give the socket bound at `staging` the name `path`, unless a file took that name
    meanwhile: link() never replaces one, while rename() did, silently, taking the
    name from a supervisor started at the same moment (both then ran, and the first to
    stop removed the other's socket). A filesystem without hard links gets rename()."""
    try:
        os.link(staging, path)
    except FileExistsError:
        raise _in_use() from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        os.rename(staging, path)
    finally:
        try:
            os.unlink(staging)
        except FileNotFoundError:
            pass  # renamed


ABSENT, STALE, LIVE = "absent", "stale", "live"


def check_client_path(path: str) -> None:
    """OSError for a --status-socket no supervisor can ever answer on, as serve would
    refuse it: one no socket can have (check_path), one through a file (ENOTDIR), or one
    that exists and is not a socket. Followed through symlinks, as connect() follows them;
    a path that is missing or unreachable is left to connect() (nothing answers, yet)."""
    check_path(path)
    try:
        mode = os.stat(path).st_mode
    except NotADirectoryError:
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
    except OSError:
        return
    if not stat.S_ISSOCK(mode):
        raise _not_a_socket()


def _not_a_socket() -> OSError:
    # connect() to a regular file is refused too: never let one pass for a dead socket
    return OSError(errno.ENOTSOCK, "exists and is not a socket")


def probe(path: str) -> str:
    """What is at `path`: ABSENT, STALE (a socket file whose connect() is refused: nobody
    listens, whatever PID namespace made it; a pid alone says nothing when containers share
    /tmp) or LIVE (a listener, perhaps with a full backlog). Anything else raises OSError:
    a file that is not a socket (ENOTSOCK), or a connect that fails otherwise (EACCES...)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ABSENT
    if not stat.S_ISSOCK(mode):
        raise _not_a_socket()
    with unix_socket() as prober:
        prober.setblocking(False)  # a live one with a full backlog: EAGAIN, not a wait
        try:
            prober.connect(path)
        except ConnectionRefusedError:
            return STALE
        except BlockingIOError:
            pass
    return LIVE


def answers(path: str) -> bool:
    """Does a supervisor listen on this socket file? (A crash leaves files nobody does.)
    UnixSocketRefused when this process cannot tell: none would have answered."""
    try:
        return probe(path) == LIVE
    except UnixSocketRefused:
        raise
    except OSError:
        return False


def sweep_stale(directory: str, own: str) -> list[str]:
    """Remove the control sockets in `directory` that nobody listens on any more; return
    their paths. `own`, the caller's socket, is not probed: a connection to it would
    wait in the caller's backlog, a descriptor it then spends on accepting itself.

    A supervisor removes its own socket when it exits, but not when it is killed (SIGKILL,
    the OOM killer, a container stopped hard), and those files would pile up. Only STALE
    sockets go; other files and errors are left alone.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return _remove_each([os.path.join(directory, name) for name in names
                         if name.endswith(".sock")],
                        lambda path: path != own and probe(path) == STALE)


def _remove_if_stale(path: str) -> None:
    """A socket file nobody answers on is left from a crash; a live one, or anything that
    is not a socket (a mistyped path must not cost the user a file), is an error."""
    state = probe(path)
    if state == LIVE:
        # Only that something listens: telling forkproxy's apart would mean talking to it.
        raise _in_use()
    if state == STALE:
        os.unlink(path)


# -- serve --take-over --------------------------------------------------------------------
# The supervisor that hands its listening sockets over (send_sockets) and the new one that
# takes them (ask_for_sockets), over the control socket: a `hand-over` request, a reply
# line naming each socket, then the sockets themselves (SCM_RIGHTS), then `go` from the
# new one when it is ready to serve, and a last reply line when the old one has stopped
# accepting. The taking end is here, not in status.py: it runs in the supervisor.

HAND_OVER = "hand-over"
# A reload's error while the supervisor hands its sockets over (status asks the one
# taking over instead).
HANDING_OVER = "handing over to a new supervisor"
# Descriptors per message: the kernel takes at most SCM_MAX_FD (253) in one.
FDS_PER_MESSAGE = 250
# Seconds between two looks at `stop_asked` while the taker waits for the supervisor
# taken over (_readable). The supervisor's stop signals stay blocked while it starts
# (console.STARTUP_BLOCKED), pending, and Python has neither ppoll() nor signalfd to
# wait for them and a socket at once: a look this often, at start only, lets a Ctrl-C
# cancel a wait for a frozen supervisor at once rather than after its whole timeout.
STOP_CHECK_EVERY = 0.05


def _never_asked() -> None:
    """The `stop_asked` of a wait nothing cancels."""


def _readable(conn: socket.socket, stop_asked: Callable[[], None]) -> None:
    """Wait until `conn` has something to read (or its end: EOF, an error): TimeoutError
    after its timeout, as a recv() on it would; `stop_asked` is called first and every
    STOP_CHECK_EVERY meanwhile, and whatever it raises ends the wait, nothing read."""
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    timeout = conn.gettimeout()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        stop_asked()
        left = STOP_CHECK_EVERY if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")  # a recv()'s words (socket.timeout)
        if poller.poll(max(1, int(min(left, STOP_CHECK_EVERY) * 1000))):
            return


# struct ucred: pid, uid, gid (SO_PEERCRED), three native ints. Read by a memoryview
# cast, not struct: importing struct maps _struct into the supervisor, and every fork
# copies each of its mappings (docs/benchmarks.md, "What this session found (conn)").
_UCRED_SIZE = 12


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of `sock`; OSError if unread."""
    pid, uid, gid = memoryview(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               _UCRED_SIZE)).cast("i")
    return pid, uid, gid


def taker_refused(sock: socket.socket, claimed_pid: object) -> str | None:
    """Why the peer on `sock`, asking for our listening sockets (`hand-over`), may not
    have them; None when it may. Whoever can connect to the control socket may ask
    `status`, `check` and `reload`, but the listeners let a process answer our clients
    and `go` stops us: only a process of our own, as the kernel names it (SO_PEERCRED,
    read at its connect(), not the pid it claims), gets them. It must be visible in our
    PID namespace, and be the pid it says it is (which `handing-over` logs); run as our
    user or root; and be in our network namespace, as a supervisor taking over from
    us is (a listener taken into another namespace would serve our clients from there).
    All read in /proc, ours only where it is our PID namespace's (foreign_proc): no
    taker is judged by another process. HAProxy has the same rule: `expose-fd
    listeners` only on a socket given it."""
    try:
        pid, uid, _ = _peer_credentials(sock)
    except OSError as exc:
        return f"its credentials cannot be read ({exc.strerror or exc})"
    if pid == 0:
        return "it runs in a PID namespace this supervisor cannot see"
    not_ours = foreign_proc()
    if not_ours is not None:
        # /proc/<pid> is then whichever process has that pid in /proc's namespace, not the
        # peer (`unshare --pid` without --mount-proc), or there is no /proc: its NSpid, its
        # start and its network namespace cannot be read. The last is the rule that
        # matters (a Unix socket file is reachable from another network namespace: it
        # keeps a man in the middle from serving our clients from there), and judging
        # another process by it let a stranger through or refused ours by chance.
        return (f"cannot check its network namespace: {not_ours}; mount a /proc for "
                "the namespace")
    if type(claimed_pid) is not int or claimed_pid != pid:
        # A taker in a PID namespace below ours (`unshare --pid` on the host) sends its
        # own pid there, the last of its NSpid chain (ours first). Accepted when that
        # is what it sent: the kernel named the process (pid, as we see it, which
        # `handing-over` logs), the claim only has to agree with it, as ours does, and
        # the user and network rules below hold as for any taker. A namespace below
        # ours is one we see into: the taker is as much a process of our own as one
        # beside us (a namespace we do not see into gives pid 0, above).
        # One gone meanwhile is left to the network rule, which says it exited.
        chain = _pid_chain(pid)
        if chain is not None and len(chain) < 2:
            return f"its connection is process {pid}'s, which is not the pid it sent"
        if chain is not None and claimed_pid != chain[-1]:
            return (f"its connection is process {pid}'s (pid {chain[-1]} in its own PID "
                    f"namespace, one below this supervisor's), and it sent another pid")
    if uid not in (0, os.getuid()):
        return f"it runs as {_user_named(uid)}, neither this supervisor's user nor root"
    try:
        # Ours first, on its own: its failure (no /proc at all) is no peer's exit.
        ours = os.stat("/proc/self/ns/net")
    except OSError as exc:
        return f"its network namespace cannot be read ({exc.strerror or exc})"
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
    except FileNotFoundError:
        # Not a stranger: a `serve --take-over` stopped (Ctrl-C) or timed out while we
        # were stalled, and gone since. Its words here, not a namespace's.
        return "it exited before its request was read (a take-over cancelled, or timed out)"
    except OSError as exc:
        return f"its network namespace cannot be read ({exc.strerror or exc})"
    if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
        return "it runs in another network namespace"
    return None


def _user_named(uid: int) -> str:
    """How the error names a peer's `uid`, as SO_PEERCRED gave it: the kernel gives a
    user not mapped into our user namespace as the overflow uid (65534), which names
    nobody then. Said so where the overflow uid is not one of ours (no process here can
    have it), with a doubt where it is one but our namespace is not the initial one."""
    try:
        with open("/proc/sys/kernel/overflowuid", "rb") as overflow_file:
            if int(overflow_file.read()) != uid:
                return f"uid {uid}"
        with open("/proc/self/uid_map", "rb") as map_file:
            ranges = [(first, count) for first, _, count
                      in (map(int, line.split()) for line in map_file)]
    except (OSError, ValueError):
        return f"uid {uid}"
    if not any(first <= uid < first + count for first, count in ranges):
        return f"a user not mapped into this supervisor's user namespace (seen as uid {uid})"
    if ranges != [(0, 0xFFFFFFFF)]:  # not the initial namespace, where all are mapped
        return f"uid {uid} (or a user not mapped into this supervisor's user namespace)"
    return f"uid {uid}"


def _pid_chain(pid: int) -> tuple[int, ...] | None:
    """Process `pid`'s pids, from ours (/proc's namespace) to its own namespace's (its
    NSpid line; one for a process in our namespace); () when that cannot be read (a
    kernel before 4.1), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status_file:
            for line in status_file:
                if line.startswith(b"NSpid:"):
                    return tuple(int(field) for field in line.split()[1:])
    except (FileNotFoundError, ProcessLookupError):
        return None
    except (OSError, ValueError):
        pass
    return ()


def send_sockets(sock: socket.socket, reply: dict[str, object],
                 handed: list[socket.socket]) -> None:
    """Send the reply line, then the sockets `handed` in its order; blocking, but for no
    more than REPORT_TIMEOUT a step (a taker that reads nothing). OSError on failure."""
    sock.settimeout(REPORT_TIMEOUT)
    sock.sendall(encode_reply(reply))
    fds = [item.fileno() for item in handed]
    for start in range(0, len(fds), FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"\0"], fds[start:start + FDS_PER_MESSAGE])


# Where /proc/self points: what foreign_proc() compares with our pid (tests point it
# elsewhere).
PROC_SELF = "/proc/self"


def foreign_proc() -> str | None:
    """Why /proc cannot be read for processes by their pids here, None when it can.

    A PID namespace entered without a /proc of its own (`unshare --pid --fork` without
    --mount-proc, bwrap without --proc) keeps the /proc of the namespace it came from:
    /proc/self is still this process (by its pid there), but /proc/N is whichever process
    has pid N there, not our process N. psutil, reading /proc/N, then showed some host
    process's memory as a child's (`status`, the metrics), host pid 1's as the
    supervisor's, and `status` ended in a traceback when psutil's import found no
    /proc/<its pid>/smaps there. So /proc/self is compared with our pid, once, by
    whoever would read /proc/N (status.py, the supervisor's start-up warning)."""
    path, pid = PROC_SELF, os.getpid()
    try:
        shown = os.readlink(path)
    except OSError as exc:  # no /proc; or another namespace's, where we are no process
        return f"{path} cannot be read ({exc.strerror or exc})"
    if shown == str(pid):
        return None
    return (f"/proc is another PID namespace's: {path} is {shown!r}, not this process's "
            f"pid {pid}")


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of `sock` (SO_PEERCRED), None when the
    credentials cannot be read."""
    try:
        _, uid, _ = _peer_credentials(sock)
    except OSError:
        return None
    return int(uid)


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of `sock` as this process sees it (the
    kernel's word, SO_PEERCRED, read at its connect()): 0 when it is in no PID namespace
    of ours, or the credentials cannot be read."""
    try:
        pid, _, _ = _peer_credentials(sock)
    except OSError:
        return 0
    return int(pid)


# The inode of the initial PID namespace's /proc/PID/ns/pid (the kernel's
# PROC_PID_INIT_INO, fixed since Linux 3.8).
INITIAL_PID_NAMESPACE = 0xEFFFFFFC


def _pid_namespace() -> int | None:
    """The inode of this process's PID namespace, None where it cannot be read."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def in_child_pid_namespace() -> bool:
    """Whether this process runs in a PID namespace other than the initial one (a
    container's), known by its inode; False where that cannot be read."""
    namespace = _pid_namespace()
    return namespace is not None and namespace != INITIAL_PID_NAMESPACE


def parent_is_namespace_init() -> bool:
    """Whether this process's parent is PID 1 of a PID namespace other than the initial
    one: a container's init (tini, `docker run --init`, dumb-init, a `sh` entrypoint that
    waits), which exits with its one child. The initial namespace's PID 1 (systemd, the
    parent of a service) never does. Told by our PID namespace's inode, not by NSpid,
    which lists pids from /proc's namespace down: one pid in a container with its own
    /proc. Where the namespace cannot be read, True: not known to be the initial one."""
    return os.getppid() == 1 and _pid_namespace() != INITIAL_PID_NAMESPACE


def process_start(pid: int | None = None) -> int | None:
    """When process `pid` (this one when None) started, in clock ticks since boot
    (/proc/PID/stat's starttime: the exec of a `serve` keeps it), None where it cannot be
    read. A take-over compares two: of two supervisors started one after the other, the
    later's configuration wins. The kernel gives the ticks of the READER's boot clock,
    which a time namespace offsets (unshare --time, a CRIU restore): only two starts read
    by one process are on one clock, so the supervisor asked reads the taker's itself."""
    try:
        with open("/proc/self/stat" if pid is None else f"/proc/{pid}/stat",
                  "rb") as stat_file:
            fields = stat_file.read().rpartition(b")")[2].split()
        return int(fields[19])  # the 22nd field; the 3rd is the first after the name
    except (OSError, IndexError, ValueError):
        return None


class AnsweredInPart(TimeoutError):
    """ask_for_sockets' TimeoutError once part of the answer came: the peer answers, too
    slowly (or not as a forkproxy does, whose answer is one write)."""


def ask_for_sockets(path: str, timeout: float, pid: int,
                    stop_asked: Callable[[], None] = _never_asked,
                    ) -> tuple[socket.socket, dict[str, object], list[socket.socket]]:
    """Ask the supervisor on `path` to hand its sockets over: (the connection to it, for
    `go`; its reply; the sockets, in the order its `sockets` names them, [] when it said
    no). OSError when nothing answers (TimeoutError in time, AnsweredInPart when some of
    the answer came); ValueError for an answer that is not a forkproxy's; what
    `stop_asked` raises, called while it waits for the answer (_readable)."""
    conn = unix_socket()
    fds: list[int] = []
    try:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(json.dumps({"command": HAND_OVER, "pid": pid,
                                 "started": process_start()}).encode() + b"\n")
        data = b""
        reply: dict[str, object] | None = None
        wanted = 0
        # The whole answer within `timeout`, not each read: a peer that sends a blank
        # now and then and never a line (not a forkproxy) held the start for ever.
        deadline = time.monotonic() + timeout
        while reply is None or len(fds) < wanted:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError("timed out")
                conn.settimeout(left)
                _readable(conn, stop_asked)
            except TimeoutError:
                if data or fds:
                    raise AnsweredInPart("timed out, the answer begun") from None
                raise
            chunk, got, flags, _ = socket.recv_fds(conn, 65536, FDS_PER_MESSAGE,
                                                   socket.MSG_CMSG_CLOEXEC)
            fds += got
            if flags & socket.MSG_CTRUNC:
                raise OSError(errno.EMFILE, "sockets lost on the way (out of descriptors?)")
            if not chunk:
                raise ValueError("closed before its reply's end")
            data += chunk
            if reply is None and b"\n" in data:
                found = _loads(data.split(b"\n", 1)[0])
                if not isinstance(found, dict):
                    raise ValueError("a reply that is not a JSON object")
                reply = found
                # A yes names the sockets it hands, none included: one without the list
                # (something else on the path, not a forkproxy) is no hand-over, not a
                # yes for no socket (_take_over takes the list as given).
                named = reply.get("sockets") if reply.get("ok") else []
                if not isinstance(named, list):
                    raise ValueError("`sockets` is missing or not a list")
                wanted = len(named)
            elif reply is None and len(data) > MAX_REQUEST * 1024:
                raise ValueError("a reply line without its end")
        if len(fds) != wanted:
            raise ValueError(f"{len(fds)} sockets for the {wanted} it named")
        handed: list[socket.socket] = []
        try:
            for fd in fds:
                handed.append(socket.socket(fileno=fd))  # OSError (ENOTSOCK): another file
        except OSError:
            for item in handed:
                item.detach()  # closed below, with the rest
            raise
        return conn, reply, handed
    except BaseException:
        conn.close()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise


def say_go(conn: socket.socket,
           stop_asked: Callable[[], None] = _never_asked) -> dict[str, object]:
    """Tell the supervisor that handed its sockets over to stop accepting on them (the
    taker is ready to serve): its last reply, once it has (OSError, ValueError if none;
    TimeoutError after the connection's timeout with no word). Its reply is read even
    when the `go` could not be sent: one that gave up waiting for it (HAND_OVER_DEADLINE)
    said no, then may have closed. What `stop_asked` raises ends the wait with the reply
    unread: the connection closed then, that supervisor, finding its answer unread
    (ECONNRESET) or us gone (EPIPE), serves on."""
    unsent: OSError | None = None
    try:
        conn.sendall(b"go\n")
    except OSError as exc:
        unsent = exc
    data = b""
    while b"\n" not in data:
        try:
            _readable(conn, stop_asked)
            chunk = conn.recv(MAX_REQUEST)
        except OSError:
            if unsent is not None:
                raise unsent from None
            raise
        if not chunk:
            if unsent is not None:
                raise unsent
            raise ValueError("closed without a reply")
        data += chunk
    reply = _loads(data.split(b"\n", 1)[0])
    if not isinstance(reply, dict):
        raise ValueError("a reply that is not a JSON object")
    return reply


def _loads(line: bytes) -> object:
    """A reply line to a take-over's request, parsed: ValueError for one that is not JSON,
    and for one nested past Python's stack (`[[[[...`), a RecursionError otherwise, whose
    traceback ended the start with exit 1 (status says "nested too deep" likewise)."""
    try:
        return json.loads(line)
    except RecursionError:
        raise ValueError("nested too deep") from None
