"""The metrics process's start: `python -I .../forkproxy/_metrics_main.py ARGS`, as
Supervisor.start_metrics execs it, runs forkproxy.metrics.main.

A script of its own, so that forkproxy.metrics stays a plain module: its third-party
imports (psutil or prometheus_client uninstalled under a running proxy) fail inside the
try below, and end in one line of the supervisor's log format, not in a traceback on
its stderr (past --log-format json). This file and forkproxy.log import nothing
third-party.

Its import path is the one `forkproxy serve` had (import_path_to_hand): -I drops the
user site and PYTHONPATH, and forkproxy's dependencies installed only there (`pip
install --user`, a --target directory on PYTHONPATH) were importable by every command
but not here: the process failed, restarted every 60 s for ever.
"""

from __future__ import annotations

import os
import sys

# Set by `forkproxy serve` (cli.serve) just before it execs the supervisor, always (an
# inherited value is replaced, or removed when there is nothing to hand): the supervisor
# passes its environment on to this process's exec.
IMPORT_PATH_VARIABLE = "FORKPROXY_IMPORT_PATH"


def import_path_to_hand(path: list[str], cwd: str, script_slot: bool) -> list[str]:
    """The directories of `path` (the sys.path of `forkproxy serve`) that the metrics
    process is to import from, in their order.

    Why the path `serve` imported forkproxy with, rather than dropping -I: -I is there so
    that the directory `serve` was started from never supplies a psutil.py (b68e849: it
    ran as the proxy's user), and so that PYTHON* variables do not change the
    interpreter the supervisor's exec starts. What the user's own interpreter imports
    from (PYTHONPATH, the user site, their .pth files) is no stray input: `serve` itself
    ran from it, and `status` reads psutil from it. So this hands over those absolute
    directories, and still never the current directory: not path[0] when it is the
    script's or -m's slot (`script_slot`: the current directory under `python -m`), nor
    a relative entry, nor `cwd` wherever it stands (an empty PYTHONPATH component,
    `PYTHONPATH=:/x`, is the current directory too)."""
    handed: list[str] = []
    for index, entry in enumerate(path):
        if index == 0 and script_slot:
            continue
        if not os.path.isabs(entry) or os.path.normpath(entry) == os.path.normpath(cwd):
            continue
        if entry not in handed:
            handed.append(entry)
    return handed


def use_handed_path(package_parent: str) -> None:
    """sys.path: the package's parent first, then `serve`'s directories in its order
    (which holds this interpreter's site-packages too), then any of this process's own
    that `serve` had not."""
    value = os.environ.get(IMPORT_PATH_VARIABLE, "")
    handed = [entry for entry in value.split(os.pathsep) if os.path.isabs(entry)]
    ordered = [package_parent, *handed, *sys.path]
    sys.path[:] = [entry for index, entry in enumerate(ordered)
                   if entry not in ordered[:index]]


def run(argv: list[str]) -> int:
    """The metrics process's exit status."""
    # -I keeps the current directory and PYTHONPATH out (a psutil.py lying there would
    # run as the proxy's user); the package's parent goes first, then what `serve`
    # imported from (see import_path_to_hand), site-packages stays for the rest.
    use_handed_path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from forkproxy.log import ERROR, Logger, crash_fields, format_in

    try:
        from forkproxy.metrics import main

        return main(argv)
    except Exception as exc:
        fields = crash_fields(exc)
        if isinstance(exc, ModuleNotFoundError):
            # "No module named 'psutil'" alone read as a missing install, where `pip
            # list` showed it installed: say which interpreter looked, and where.
            fields["detail"] = (f"not importable by the metrics process's interpreter, "
                                f"{sys.executable} -I, from {os.pathsep.join(sys.path)}")
        Logger(ERROR, format_in(argv)).error("metrics-failed", **fields)
        return 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
