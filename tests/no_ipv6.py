"""Run a program where socket(AF_INET6, ...) fails with EAFNOSUPPORT, as it does under
systemd's `RestrictAddressFamilies=AF_UNIX AF_INET` (a seccomp filter, the same kind) or
on a kernel booted with `ipv6.disable=1`:

    python3 tests/no_ipv6.py PROGRAM [ARG...]

Standard library only (ctypes); Linux on x86_64 or aarch64 (refuse_sockets.py).
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from refuse_sockets import refuse_sockets, supported

__all__ = ["forbid_ipv6_sockets", "supported"]


def forbid_ipv6_sockets() -> None:
    refuse_sockets(socket.AF_INET6, errno.EAFNOSUPPORT)


if __name__ == "__main__":
    forbid_ipv6_sockets()
    os.execvp(sys.argv[1], sys.argv[1:])
