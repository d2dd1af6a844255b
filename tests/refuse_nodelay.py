"""Run a program where setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, ...) fails with ERRNO, as
a kernel refuses it on an MPTCP socket before Linux 5.17 (EOPNOTSUPP: `mptcpize run`,
a connection that did not fall back to TCP; Ubuntu 22.04's 5.15):

    python3 tests/refuse_nodelay.py ERRNO PROGRAM [ARG...]

ERRNO by name. Standard library only (ctypes); Linux on x86_64 or aarch64, as
tests/refuse_sockets.py.
"""

from __future__ import annotations

import errno
import os
import platform
import socket
import sys

from seccomp_filter import ALLOW, ARCH, ERRNO, JUMP_IF_EQUAL, LOAD, NR, RETURN, install, op

# (AUDIT_ARCH_*, the setsockopt syscall's number) per machine
ARCHES = {"x86_64": (0xC000003E, 54), "aarch64": (0xC00000B7, 208)}
# struct seccomp_data: the second and third arguments' low halves (little-endian)
ARG1, ARG2 = 24, 32


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() in ARCHES


def refuse_nodelay(error: int) -> None:
    """From now on, in this process and what it runs, setsockopt(IPPROTO_TCP,
    TCP_NODELAY) fails with `error`; every other call goes through."""
    arch, setsockopt_nr = ARCHES[platform.machine()]
    install(b"".join([
        op(LOAD, ARCH), op(JUMP_IF_EQUAL, arch, 1, 0), op(RETURN, ALLOW),
        op(LOAD, NR), op(JUMP_IF_EQUAL, setsockopt_nr, 0, 5),
        op(LOAD, ARG1), op(JUMP_IF_EQUAL, socket.IPPROTO_TCP, 0, 3),
        op(LOAD, ARG2), op(JUMP_IF_EQUAL, socket.TCP_NODELAY, 0, 1),
        op(RETURN, ERRNO | error),
        op(RETURN, ALLOW),
    ]))


if __name__ == "__main__":
    refuse_nodelay(getattr(errno, sys.argv[1]))
    os.execvp(sys.argv[2], sys.argv[2:])
