"""The seccomp plumbing tests/refuse_sockets.py and tests/no_close_range.py share: a
classic BPF instruction, and installing a filter program in this process (and what it
runs). Standard library only (ctypes); Linux."""

from __future__ import annotations

import ctypes
import struct

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
# BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
LOAD, JUMP_IF_EQUAL, JUMP_IF_AT_LEAST, RETURN = 0x20, 0x15, 0x35, 0x06
ALLOW, ERRNO, KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
# offsets in struct seccomp_data (the first argument's low half: little-endian machines)
NR, ARCH, ARG0 = 0, 4, 16


def op(code: int, k: int, yes: int = 0, no: int = 0) -> bytes:
    """One BPF instruction: `code` with constant `k`, jumps `yes` and `no`."""
    return struct.pack("HBBI", code, yes, no, k)


def install(program: bytes) -> None:
    """Filter every later system call of this process and its children through
    `program` (op()s joined); no new privileges from here on."""
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
