"""Run a program where socket(FAMILY, ...) fails with ERRNO, as a sandbox refuses it:
systemd's `RestrictAddressFamilies=` (EAFNOSUPPORT; a seccomp filter, the same kind), a
container runtime's seccomp profile or a security module (EACCES, EPERM), `mptcpize run`
where MPTCP is off (ENOPROTOOPT):

    python3 tests/refuse_sockets.py FAMILY ERRNO PROGRAM [ARG...]

FAMILY and ERRNO by name: `AF_INET EACCES`. Standard library only (ctypes); Linux on
x86_64 or aarch64.
"""

from __future__ import annotations

import errno
import os
import platform
import socket
import sys

from seccomp_filter import ALLOW, ARCH, ARG0, ERRNO, JUMP_IF_EQUAL, LOAD, NR, RETURN, install, op

# (AUDIT_ARCH_*, the socket syscall's number) per machine
ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() in ARCHES


def refuse_sockets(family: int, error: int) -> None:
    """From now on, in this process and what it runs, socket(family, ...) fails with
    `error`; every other call goes through."""
    arch, socket_nr = ARCHES[platform.machine()]
    install(b"".join([
        op(LOAD, ARCH), op(JUMP_IF_EQUAL, arch, 1, 0), op(RETURN, ALLOW),
        op(LOAD, NR), op(JUMP_IF_EQUAL, socket_nr, 0, 3),
        op(LOAD, ARG0), op(JUMP_IF_EQUAL, family, 0, 1),
        op(RETURN, ERRNO | error),
        op(RETURN, ALLOW),
    ]))


if __name__ == "__main__":
    refuse_sockets(int(getattr(socket, sys.argv[1])), getattr(errno, sys.argv[2]))
    os.execvp(sys.argv[3], sys.argv[3:])
