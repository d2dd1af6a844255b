"""forkproxy's own files as the supervisor found them at start, to tell a metrics process
apart from the code it would run: the one process started by exec, so the one that runs
whatever is installed now (a pip upgrade or downgrade under a running supervisor) rather
than the code the supervisor runs. No import beyond os: the supervisor forks once per
connection, and an extension module (zlib, _hashlib) is one more mapping in each fork.
"""

from __future__ import annotations

import os
import sys

PACKAGE = os.path.dirname(os.path.abspath(__file__))

# The metrics process's exit status (or its fork's, before the exec) when forkproxy's
# files are not those the supervisor started with: restarting it cannot help, so the
# supervisor does not (EX_CONFIG, sysexits.h; no other exit of the metrics process uses it).
FILES_CHANGED = 78

ADVICE = "forkproxy's files changed under the running supervisor"


def snapshot() -> dict[str, int]:
    """Each module of the package and the hash() of its bytes: a change, not an attack, is
    what is looked for, and hash() is the same in this process's forks, where snapshots
    are compared (not across processes: PYTHONHASHSEED). The bytes, not the mtime: a
    reinstall of the same version rewrites the files unchanged. OSError when the package
    cannot be listed."""
    found = {}
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            try:
                with open(os.path.join(PACKAGE, name), "rb") as handle:
                    found[name] = hash(handle.read())
            except FileNotFoundError:
                continue  # removed since the listing: as if not listed
    return found


def changes(before: dict[str, int]) -> str | None:
    """What differs between `before` (a snapshot at start) and the files now, in words
    (`metrics.py, status.py changed; cgroup.py gone`), None if nothing does."""
    try:
        now = snapshot()
    except OSError as exc:
        return f"{PACKAGE!r}: {exc.strerror}"
    changed = [name for name in before if name in now and now[name] != before[name]]
    parts = [f"{', '.join(names)} {what}" for names, what in (
        (changed, "changed"), ([n for n in before if n not in now], "gone"),
        ([n for n in now if n not in before], "new")) if names]
    return "; ".join(parts) or None


def interpreter_options() -> list[str]:
    """The -X and -W options this interpreter was started with, as arguments for the
    `python -I` forkproxy execs (the supervisor, the metrics process): -I ignores every
    PYTHON* variable, so without them `python -X dev -m forkproxy serve` ran its
    processes without the development checks it asked for. [] when none were given."""
    options = [f"-X{name}" if value is True else f"-X{name}={value}"
               for name, value in sys._xoptions.items()]
    return options + [f"-W{option}" for option in sys.warnoptions]
