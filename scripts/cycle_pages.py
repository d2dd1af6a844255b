"""What one client arriving alone costs in memory: the pages a new idle child holds privately.

Usage (root: page frame numbers in /proc/PID/pagemap are hidden from others):
  python scripts/cycle_pages.py REDIS_PORT -- PROXY_COMMAND...
  e.g. python scripts/cycle_pages.py 6379 -- .venv/bin/forkproxy
       python scripts/cycle_pages.py 6379 -- .venv/bin/python -I -S scripts/floor_sketch.py

Starts `PROXY_COMMAND serve -q 127.0.0.1:0=127.0.0.1:REDIS_PORT`, opens 5 idle connections,
then reads the supervisor's page frames, opens one more connection, waits until it is
idle, and compares frames (writable mappings only). A page the child holds privately is
either one it wrote (its frame is new) or one the supervisor wrote after the fork (the
child kept the old frame). Unlike the bench's mem workload (300 connections opened back
to back, so several per accept burst), this is a client that arrives alone, as pooled
clients usually do. Each line: pages, then pages per mapping. Linux only.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import time
from collections import Counter

Frames = dict[int, tuple[int, bool, str]]  # page address -> (frame, exclusive, mapping)


def frames(pid: int) -> Frames:
    out: Frames = {}
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split()
            if "w" not in parts[1] or parts[-1] == "[vsyscall]":
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
            pagemap.seek((lo >> 12) * 8)
            data = pagemap.read(((hi - lo) >> 12) * 8)
            for i in range(len(data) // 8):
                (entry,) = struct.unpack_from("Q", data, i * 8)
                if entry >> 63 & 1:  # present
                    out[lo + (i << 12)] = (entry & ((1 << 55) - 1), bool(entry >> 56 & 1), name)
    return out


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return {int(child) for child in handle.read().split()}


def report(label: str, pages: list[str]) -> None:
    by_mapping = ", ".join(f"{name} {count}" for name, count in Counter(pages).most_common())
    print(f"{label}: {len(pages)} pages ({by_mapping})")


def main() -> None:
    redis_port, command = sys.argv[1], sys.argv[3:]
    proxy = subprocess.Popen([*command, "serve", "-q", f"127.0.0.1:0=127.0.0.1:{redis_port}"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout is not None
        match = re.search(r"127\.0\.0\.1:(\d+) ->", proxy.stdout.readline())
        if match is None:
            sys.exit("cycle_pages: no `listening` line from the proxy")
        address = ("127.0.0.1", int(match.group(1)))
        warm = [socket.create_connection(address) for _ in range(5)]
        time.sleep(0.5)
        before_children, before = children(proxy.pid), frames(proxy.pid)
        client = socket.create_connection(address)
        time.sleep(0.5)
        (child,) = children(proxy.pid) - before_children
        after, held = frames(proxy.pid), frames(child)
        unknown = (0, False, "")
        wrote = [v[2] for a, v in held.items()
                 if v[0] not in (after.get(a, unknown)[0], before.get(a, unknown)[0])]
        kept = [v[2] for a, v in held.items()
                if v[1] and v[0] == before.get(a, unknown)[0] and v[0] != after.get(a, unknown)[0]]
        report("child holds privately", wrote + kept)
        report("  written by the child", wrote)
        report("  old copies of pages the supervisor wrote after the fork", kept)
        for sock in [*warm, client]:
            sock.close()
    finally:
        proxy.terminate()
        proxy.wait()


if __name__ == "__main__":
    main()
