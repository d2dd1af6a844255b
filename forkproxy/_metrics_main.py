"""The metrics process's start: `python -I .../forkproxy/_metrics_main.py ARGS`, as
Supervisor.start_metrics execs it, runs forkproxy.metrics.main.

A script of its own, so that forkproxy.metrics stays a plain module: its third-party
imports (psutil or prometheus_client uninstalled under a running proxy) fail inside the
try below, and end in one line of the supervisor's log format, not in a traceback on
its stderr (past --log-format json). This file and forkproxy.log import nothing
third-party.
"""

from __future__ import annotations

import os
import sys


def run(argv: list[str]) -> int:
    """The metrics process's exit status."""
    # -I keeps the current directory and PYTHONPATH out (a psutil.py lying there would
    # run as the proxy's user); the package's parent goes first, site-packages stays for
    # the rest.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from forkproxy.log import ERROR, Logger, crash_fields, format_in

    try:
        from forkproxy.metrics import main

        return main(argv)
    except Exception as exc:
        Logger(ERROR, format_in(argv)).error("metrics-failed", **crash_fields(exc))
        return 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
