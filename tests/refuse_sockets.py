"""Run a program where socket(FAMILY, ...) fails with ERRNO, as a sandbox refuses it:
systemd's `RestrictAddressFamilies=` (EAFNOSUPPORT; a seccomp filter, the same kind), a
container runtime's seccomp profile or a security module (EACCES, EPERM), `mptcpize run`
where MPTCP is off (ENOPROTOOPT):

    python3 tests/refuse_sockets.py FAMILY ERRNO PROGRAM [ARG...]

FAMILY and ERRNO by name: `AF_INET EACCES`. Standard library only (ctypes); Linux on
x86_64 or aarch64.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct
import sys

# (AUDIT_ARCH_*, the socket syscall's number) per machine
ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
LOAD, JUMP_IF_EQUAL, RETURN = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
# offsets in struct seccomp_data
NR, ARCH, ARG0 = 0, 4, 16


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() in ARCHES


def _op(code: int, k: int, yes: int = 0, no: int = 0) -> bytes:
    return struct.pack("HBBI", code, yes, no, k)


def refuse_sockets(family: int, error: int) -> None:
    """From now on, in this process and what it runs, socket(family, ...) fails with
    `error`; every other call goes through."""
    arch, socket_nr = ARCHES[platform.machine()]
    program = b"".join([
        _op(LOAD, ARCH), _op(JUMP_IF_EQUAL, arch, 1, 0), _op(RETURN, ALLOW),
        _op(LOAD, NR), _op(JUMP_IF_EQUAL, socket_nr, 0, 3),
        _op(LOAD, ARG0), _op(JUMP_IF_EQUAL, family, 0, 1),
        _op(RETURN, ERRNO | error),
        _op(RETURN, ALLOW),
    ])
    filters = ctypes.create_string_buffer(program)
    fprog = ctypes.create_string_buffer(
        struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(filters))
    )
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(
        PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0
    ):
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")


if __name__ == "__main__":
    refuse_sockets(int(getattr(socket, sys.argv[1])), getattr(errno, sys.argv[2]))
    os.execvp(sys.argv[3], sys.argv[3:])
