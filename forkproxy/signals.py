"""Signals delivered into the supervisor's poll loop, the asyncio way.

Handlers only note the signal; `signal.set_wakeup_fd` writes each signal's number to a
non-blocking socketpair that the loop polls, so every piece of work happens in the loop,
between system calls, never inside a handler. The bytes only wake the loop: the
socketpair holds a few hundred, and a signal whose byte finds it full (a SIGCHLD per
connection that ends while the supervisor is blocked writing a log line) is dropped by
CPython. The handlers' note is what the loop acts on.
"""

from __future__ import annotations

# The C module under `signal`: signal.signal() converts to and from enums in Python on
# every call, and in a freshly forked child that code touches (and so copies) ~90 pages.
import _signal  # type: ignore[import-not-found]  # no stubs for the C module
import os
import signal
import socket
from types import FrameType

# SIGALRM is the supervisor's own timer (--resolve-every, a resolver's deadline, the control
# socket's check, a hand-over's deadline). Children need no disposition for it: a forked
# child does not inherit interval timers.
# SIGQUIT (Ctrl-\) is handled too: without a handler the supervisor died at once, without a
# word, and every child with it, their connections ending in FINs as if complete. Children
# keep the handler they inherit, which only notes it: deaf to it at no cost per connection,
# they are TERMed (reset) by the stop it starts.
HANDLED = (
    signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGUSR1, signal.SIGALRM,
)

# Signals forkproxy gives no meaning, whose default action ends a process: a stray `kill
# -USR2` (or `pkill -USR2 forkproxy`) ended the supervisor without a line, and each child
# it reached with a FIN to both sides, its client taking a cut stream for a complete one.
# Ignored, as PID 1 ignores them already (the kernel drops a signal PID 1 has no handler
# for), from the supervisor's start: its children inherit that at no cost per fork, and
# the metrics process through its exec. Not SIGXCPU: whoever set a CPU limit asked for its
# default action. (SIGXFSZ needs nothing here: Python ignores it at start, as SIGPIPE.)
IGNORED = (
    signal.SIGUSR2, signal.SIGIO, signal.SIGPROF, signal.SIGVTALRM, signal.SIGPWR,
    signal.SIGSTKFLT, *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)


_caught: list[int] = []  # signals whose handler ran since the last drain, in order


def _note(signum: int, frame: FrameType | None) -> None:
    """The work happens in the loop; see the module docstring."""
    _caught.append(signum)


def noted(*signums: int) -> bool:
    """Whether one of these came since the loop last drained the signals (they stay
    noted, for the loop)."""
    return any(signum in _caught for signum in signums)


def _take() -> list[int]:
    """The signals noted so far, and a fresh list for the next ones. A function of its
    own: entering it runs the handlers of the signals already delivered (CPython runs
    them at the next instruction), so each of those whose byte was read is noted here."""
    global _caught
    caught, _caught = _caught, []
    return caught


class SignalPipe:
    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        # What drain() reads into, kept: recv(4096) allocated 4 KiB and shrank it at each
        # wakeup, once per connection in the supervisor (docs/benchmarks.md).
        self._fd = self.reader.fileno()
        self._buffers = [memoryview(bytearray(4096))]
        signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        _take()  # a supervisor started before in this process (tests) noted its own
        for signum in HANDLED:
            signal.signal(signum, _note)
        for signum in IGNORED:
            signal.signal(signum, signal.SIG_IGN)
        # `forkproxy serve` blocked them until now (console.py): what came meanwhile is
        # delivered here, to the handlers, and waits in the pipe for the loop.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)

    def fileno(self) -> int:
        return self.reader.fileno()

    def wake(self) -> None:
        """Have the loop call its handler for this pipe at its next turn, as a signal
        does, with no signal (drain() reads bytes only to empty the pipe)."""
        try:
            self.writer.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # full: it wakes the loop all the same

    def drain(self) -> list[int]:
        """Signal numbers received since the last call, in order, duplicates folded
        (not SIGINT's: a second Ctrl-C stops at once)."""
        while True:  # first empty the socketpair: a byte read is a signal noted by now
            try:
                # A stream socketpair: a short read took all there was, so no second
                # read only to fail with EAGAIN (a system call and an OSError built
                # from strerror: ~11% of the supervisor's instructions per connection,
                # one SIGCHLD each). A byte written after it wakes the poll again.
                if os.readv(self._fd, self._buffers) < 4096:
                    break
            except (BlockingIOError, InterruptedError):
                break
        seen: list[int] = []
        for signum in _take():
            if signum not in seen or signum == signal.SIGINT:
                seen.append(signum)
        return seen


def reset_in_child() -> None:
    """A child process: no wakeup fd, default TERM, and deaf to what is meant for the supervisor.

    SIGTERM is unblocked too: forked during a stop, or the metrics process at any time,
    the child has it blocked (Supervisor.handle_stop, start_metrics), and must not stay
    deaf to a `kill` (nor the metrics process to the stop's TERM, through its exec).
    SIGINT (a terminal's Ctrl-C reaches the whole process group) and SIGHUP (reload)
    are the supervisor's business; live connections are never touched by them. (The
    relay children set SIGTERM alone, to reset the connection first, and keep the
    supervisor's handler for the others, which only notes them, for one system call
    rather than five: relay.CHILD_DISPOSITIONS, and the accept loop in
    Supervisor._accept_handler.)
    """
    _signal.set_wakeup_fd(-1)
    for signum, action in CHILD_DISPOSITIONS:
        _signal.signal(signum, action)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, (int(signal.SIGTERM),))  # after its SIG_DFL


CHILD_DISPOSITIONS = [
    (int(signal.SIGINT), int(signal.SIG_IGN)),
    (int(signal.SIGHUP), int(signal.SIG_IGN)),
    (int(signal.SIGUSR1), int(signal.SIG_IGN)),
    (int(signal.SIGTERM), int(signal.SIG_DFL)),
    (int(signal.SIGCHLD), int(signal.SIG_DFL)),
]
