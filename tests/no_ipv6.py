"""Run a program where socket(AF_INET6, ...) fails with EAFNOSUPPORT, as it does under
systemd's `RestrictAddressFamilies=AF_UNIX AF_INET` (a seccomp filter, the same kind) or
on a kernel booted with `ipv6.disable=1`:

    python3 tests/no_ipv6.py PROGRAM [ARG...]

Standard library only (ctypes); Linux on x86_64 or aarch64.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

# (AUDIT_ARCH_*, the socket syscall's number) per machine
ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
AF_INET6, EAFNOSUPPORT = 10, 97
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
LOAD, JUMP_IF_EQUAL, RETURN = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
# offsets in struct seccomp_data
NR, ARCH, ARG0 = 0, 4, 16


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() in ARCHES


def _op(code: int, k: int, yes: int = 0, no: int = 0) -> bytes:
    return struct.pack("HBBI", code, yes, no, k)


def forbid_ipv6_sockets() -> None:
    arch, socket_nr = ARCHES[platform.machine()]
    program = b"".join([
        _op(LOAD, ARCH), _op(JUMP_IF_EQUAL, arch, 1, 0), _op(RETURN, ALLOW),
        _op(LOAD, NR), _op(JUMP_IF_EQUAL, socket_nr, 0, 3),
        _op(LOAD, ARG0), _op(JUMP_IF_EQUAL, AF_INET6, 0, 1),
        _op(RETURN, ERRNO | EAFNOSUPPORT),
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
    forbid_ipv6_sockets()
    os.execvp(sys.argv[1], sys.argv[1:])
