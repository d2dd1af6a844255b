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

import ctypes
import errno
import os
import platform
import resource
import struct
import sys

# (AUDIT_ARCH_*, close's number, close_range's number) per machine
ARCHES = {"x86_64": (0xC000003E, 3, 436), "aarch64": (0xC00000B7, 57, 436)}
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
# BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
LOAD, JUMP_IF_EQUAL, JUMP_IF_AT_LEAST, RETURN = 0x20, 0x15, 0x35, 0x06
ALLOW, ERRNO, KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
# offsets in struct seccomp_data (the first argument's low half: little-endian machines)
NR, ARCH, ARG0 = 0, 4, 16
CLOSE_MARK = 1 << 19
OPEN_FILES_LIMIT = 4096


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() in ARCHES


def _op(code: int, k: int, yes: int = 0, no: int = 0) -> bytes:
    return struct.pack("HBBI", code, yes, no, k)


def no_close_range() -> None:
    """From now on, in this process and what it runs, close_range() fails with ENOSYS and
    close(n) for n >= CLOSE_MARK kills the process; every other call goes through."""
    arch, close_nr, close_range_nr = ARCHES[platform.machine()]
    program = b"".join([
        _op(LOAD, ARCH), _op(JUMP_IF_EQUAL, arch, 1, 0), _op(RETURN, ALLOW),
        _op(LOAD, NR), _op(JUMP_IF_EQUAL, close_range_nr, 0, 1),
        _op(RETURN, ERRNO | errno.ENOSYS),
        _op(JUMP_IF_EQUAL, close_nr, 0, 3),
        _op(LOAD, ARG0), _op(JUMP_IF_AT_LEAST, CLOSE_MARK, 0, 1),
        _op(RETURN, KILL_PROCESS),
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
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT))
    no_close_range()
    os.execvp(sys.argv[1], sys.argv[1:])
