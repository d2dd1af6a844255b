"""The `forkproxy` command's entry point, small enough to run before anything is imported.

`forkproxy serve` blocks the signals the supervisor handles first thing, and the
supervisor unblocks them once its handlers are in place (signals.SignalPipe): in between,
~0.2 s of imports, validation and exec, a signal waits pending instead of killing a
starting proxy (SIGHUP's default action) or being dropped (PID 1 ignores every signal it
has no handler for: a `docker stop` right after `docker run` waited for the SIGKILL).
A blocked mask and pending signals survive exec.
"""

import signal
import sys

STARTUP_BLOCKED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_BLOCKED)
    from forkproxy.cli import main as cli_main

    cli_main()
