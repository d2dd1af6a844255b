"""The lean supervisor process: `forkproxy serve` execs `python -I -S .../_serve.py --config-fd N`.

Run as a script path (not `-m`) with `-I -S` so that neither site-packages' `.pth` files
nor anything else imports modules (threading, random, ...) that make each fork dearer;
the configuration arrives as JSON through an inherited file descriptor. Same PID as the
`forkproxy serve` the user started, so it works as PID 1 and under process managers.
"""

import json
import os
import signal
import sys

if __name__ == "__main__":
    # The package's parent first: -I leaves out the current directory and this file's
    # own (which must not shadow stdlib names anyway), and -S leaves site-packages out.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from forkproxy import __version__
from forkproxy.config import ConfigError, name_variable, sources_from_json
from forkproxy.log import Logger, level_for, write_start_error
from forkproxy.process_name import SUPERVISOR, name_process
from forkproxy.signals import HANDLED
from forkproxy.supervisor import Supervisor

# As cli.EXEC_FAILED (not imported: cli.py is typer's, which the supervisor never loads):
# what a shell returns for a command it found but could not execute.
EXEC_FAILED = 126


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "--config-fd":
        sys.stderr.write("forkproxy: error: _serve.py is started by `forkproxy serve`\n")
        return 2
    # `forkproxy`, not the interpreter's `python`, for ps -e, top and `pgrep forkproxy`.
    # The command line stays: argv[0] is where Python finds sys.executable and its venv.
    name_process(SUPERVISOR)
    with os.fdopen(int(argv[2]), "rb") as handle:
        data = json.loads(handle.read())
    try:
        if data["version"] != __version__:
            raise ValueError(data["version"])
        sources = sources_from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError):
        # The `forkproxy serve` that read the command line ran other code than this file:
        # forkproxy was upgraded or downgraded between its start and its exec (pip
        # replacing the package under it). Mixing the two would misread the options.
        given = data.get("options") if isinstance(data, dict) else None
        json_log = isinstance(given, dict) and given.get("log_format") == "json"
        write_start_error(f"forkproxy's files changed while `serve` started (an upgrade "
                          f"under way?), to version {__version__}: start it again",
                          "json" if json_log else "text")
        return EXEC_FAILED
    variables = data.get("variables", {})  # flag -> variable, for the values that came from one
    options = sources.options
    log = Logger(level_for(options.verbosity), options.log_format)
    try:
        return Supervisor(sources, os.environ, log).run()
    except ConfigError as exc:
        write_start_error(name_variable(str(exc), variables, os.environ), options.log_format)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        return 130


def hold_signals_to_exit() -> None:
    """Block the signals the supervisor handles, for the rest of the process's life.

    Past main(), as Python finalizes (after atexit), it gives every signal it has a
    handler for its default action back: a second SIGTERM or SIGINT in those few
    milliseconds (`docker stop` and a `kill` of its own, two Ctrl-C) ended a clean
    stop by the signal, 143 or 130, where it exits 0. Blocked, such a signal stays
    pending, and a pending signal is discarded at exit."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


if __name__ == "__main__":
    try:
        status = main(sys.argv)
    finally:
        hold_signals_to_exit()
    sys.exit(status)
