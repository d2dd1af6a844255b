"""Run a program where a system call fails with ERRNO, as a sandbox that leaves it out
refuses it: systemd's `SystemCallFilter=~NAME` or an allow-list without it (EPERM with
`SystemCallErrorNumber=EPERM`), a container runtime's profile that does not know it
(ENOSYS):

    python3 tests/refuse_calls.py NAME ERRNO PROGRAM [ARG...]

NAME one of CALLS; ERRNO by name: `memfd_create EPERM`. Standard library only (ctypes);
Linux on x86_64 or aarch64, as tests/refuse_sockets.py.
"""

from __future__ import annotations

import errno
import os
import platform
import sys

from seccomp_filter import ALLOW, ARCH, ERRNO, JUMP_IF_EQUAL, LOAD, NR, RETURN, install, op

# AUDIT_ARCH_* and the calls' numbers, per machine
ARCHES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
CALLS = {"memfd_create": {"x86_64": 319, "aarch64": 279}}


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() in ARCHES


def refuse_call(name: str, error: int) -> None:
    """From now on, in this process and what it runs, the call `name` fails with `error`;
    every other call goes through."""
    machine = platform.machine()
    install(b"".join([
        op(LOAD, ARCH), op(JUMP_IF_EQUAL, ARCHES[machine], 1, 0), op(RETURN, ALLOW),
        op(LOAD, NR), op(JUMP_IF_EQUAL, CALLS[name][machine], 0, 1),
        op(RETURN, ERRNO | error),
        op(RETURN, ALLOW),
    ]))


if __name__ == "__main__":
    refuse_call(sys.argv[1], getattr(errno, sys.argv[2]))
    os.execvp(sys.argv[3], sys.argv[3:])
