"""The `forkproxy` command's entry point, small enough to run before anything is imported.

Standard descriptors closed for us are reopened on /dev/null first (fill_closed_std_fds).
`forkproxy serve` blocks the signals the supervisor handles first thing, and the
supervisor unblocks them once its handlers are in place (signals.SignalPipe): in between,
~0.2 s of imports, validation and exec, a signal waits pending instead of killing a
starting proxy (the default action of SIGHUP and SIGALRM) or being dropped (PID 1 ignores
every signal it has no handler for: a `docker stop` right after `docker run` waited for
the SIGKILL).
A blocked mask and pending signals survive exec.
"""

import os
import signal
import sys

STARTUP_BLOCKED = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM
)


def main() -> None:
    fill_closed_std_fds()  # first: before this process opens a file that must not be 0-2
    if sys.argv[1:2] == ["serve"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_BLOCKED)
    from forkproxy.cli import main as cli_main

    cli_main()


def fill_closed_std_fds() -> None:
    """Open /dev/null on whichever of fds 0-2 was closed for us (`>&-`), as daemons do.

    Otherwise the next file opened takes that number: serve's config memfd, then in the
    supervisor a listener or a client's socket, and the `listening` lines or the log
    would be written into it.
    """
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            # fd itself is the lowest free number (those below are open by now); made
            # inheritable, unlike os.open's default, so that it outlives serve's exec.
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)
        if getattr(sys, name) is None:
            # Closed when Python started, it made sys.stdout None: a command's output,
            # or its flush, would end in a traceback. Now a file on /dev/null, open for
            # the process's life.
            stream = open(fd, "r" if fd == 0 else "w", closefd=False)  # noqa: SIM115
            setattr(sys, name, stream)
