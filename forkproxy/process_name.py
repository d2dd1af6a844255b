"""What each forkproxy process is called (its comm: what ps -e, top and pgrep show and
match; 15 bytes at most), and the one way each sets it. `python`, from the interpreter
exec'd, said nothing. No import beyond os: the supervisor, which forks once per
connection, names itself with it.
"""

from __future__ import annotations

import os

SUPERVISOR = b"forkproxy"  # a connection's child keeps it: renaming each costs every start
RESOLVER = b"forkproxy-dns"
REPORTER = b"forkproxy-stat"  # answers `status` and writes SIGUSR1's table
METRICS = b"forkproxy-metr"


def name_process(name: bytes) -> None:
    """Name this process. Through /proc, not prctl(PR_SET_NAME): that takes ctypes, and
    ctypes imported into the supervisor makes every fork of it dearer. Threads started
    after take the name of the one that starts them: name a process before its threads."""
    try:
        fd = os.open("/proc/self/comm", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, name)
        finally:
            os.close(fd)
    except OSError:
        pass  # no /proc mounted (or read-only): a name is worth no failure
