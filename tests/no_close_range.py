"""Run a program where close_range(2) fails with ENOSYS, as on Linux before 5.9 (and as a
seccomp profile that does not know it refuses it), and where a close() of a descriptor
number of 2**19 or more kills the process (SIGSYS):

    python3 tests/no_close_range.py PROGRAM [ARG...]

Without close_range, CPython's os.closerange() calls close() on every number of its
range, so that mark is where such a loop over the numbers up to 2**20 is caught, with no
clock: no descriptor is that high here, for the open-files limit is set to
OPEN_FILES_LIMIT (soft and hard) first. Standard library only (ctypes); Linux on x86_64
or aarch64, as tests/refuse_sockets.py.
"""

from __future__ import annotations

import errno
import os
import platform
import resource
import sys

from seccomp_filter import (
    ALLOW,
    ARCH,
    ARG0,
    ERRNO,
    JUMP_IF_AT_LEAST,
    JUMP_IF_EQUAL,
    KILL_PROCESS,
    LOAD,
    NR,
    RETURN,
    install,
    op,
)

# (AUDIT_ARCH_*, close's number, close_range's number) per machine
ARCHES = {"x86_64": (0xC000003E, 3, 436), "aarch64": (0xC00000B7, 57, 436)}
CLOSE_MARK = 1 << 19
OPEN_FILES_LIMIT = 4096


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() in ARCHES


def no_close_range() -> None:
    """From now on, in this process and what it runs, close_range() fails with ENOSYS and
    close(n) for n >= CLOSE_MARK kills the process; every other call goes through."""
    arch, close_nr, close_range_nr = ARCHES[platform.machine()]
    install(b"".join([
        op(LOAD, ARCH), op(JUMP_IF_EQUAL, arch, 1, 0), op(RETURN, ALLOW),
        op(LOAD, NR), op(JUMP_IF_EQUAL, close_range_nr, 0, 1),
        op(RETURN, ERRNO | errno.ENOSYS),
        op(JUMP_IF_EQUAL, close_nr, 0, 3),
        op(LOAD, ARG0), op(JUMP_IF_AT_LEAST, CLOSE_MARK, 0, 1),
        op(RETURN, KILL_PROCESS),
        op(RETURN, ALLOW),
    ]))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT))
    no_close_range()
    os.execvp(sys.argv[1], sys.argv[1:])
