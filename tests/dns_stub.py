"""A DNS server for tests, run inside a network namespace:
`dns_stub.py ADDR NAME IPV4 GATE [HANG]`.

It answers UDP queries on ADDR:53: NAME's A records are IPV4 (one address, or several
separated by commas, rotated by one at each answer, as round-robin DNS does), its other
types have no record, any other name does not exist. While the file GATE does not exist it answers
nothing and holds the queries, as a DNS server that has stopped answering would (a
client waits out its resolver's timeout); once GATE appears it answers them all, and
every query after. Each query is printed as `query NAME TYPE` when it arrives.

While the file HANG exists, NAME's queries are answered at once, truncated (TC: the
answer does not fit in UDP), and the client's query over TCP is never answered: the
server accepts the connection (printed as `tcp`) and holds it. glibc's getaddrinfo has no
timeout on TCP: its lookup of NAME hangs for as long as the connection stays open.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys

TYPE_A = 1
NOERROR, NXDOMAIN = 0, 3


def question(query: bytes) -> tuple[str, int, int]:
    """The query's name, type, and the offset just past its question."""
    labels, offset = [], 12
    while query[offset]:
        length = query[offset]
        labels.append(query[offset + 1:offset + 1 + length].decode("ascii"))
        offset += 1 + length
    qtype = struct.unpack_from("!H", query, offset + 1)[0]
    return ".".join(labels).lower(), qtype, offset + 5


def truncated(query: bytes) -> bytes:
    """A response with TC set and no records: ask again over TCP."""
    (ident,) = struct.unpack_from("!H", query)
    end = question(query)[2]
    return struct.pack("!HHHHHH", ident, 0x8380, 1, 0, 0, 0) + query[12:end]


def answer(query: bytes, name: str, ipv4: list[str]) -> bytes:
    asked, qtype, end = question(query)
    (ident,) = struct.unpack_from("!H", query)
    known = asked == name
    records = ipv4 if known and qtype == TYPE_A else []
    # A response (QR), recursion desired and available (RD, RA), and the rcode.
    flags = 0x8180 | (NOERROR if known else NXDOMAIN)
    header = struct.pack("!HHHHHH", ident, flags, 1, len(records), 0, 0)
    reply = header + query[12:end]
    for address in records:
        # The name as a pointer to the question's (offset 12), class IN, TTL 0, 4 bytes.
        reply += struct.pack("!HHHIH", 0xC00C, TYPE_A, 1, 0, 4) + socket.inet_aton(address)
    return reply


def main() -> None:
    address, name, addresses, gate = sys.argv[1:5]
    hang = sys.argv[5] if len(sys.argv) > 5 else None
    ipv4 = addresses.split(",")
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((address, 53))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, 53))
    tcp.listen(16)
    print("ready", flush=True)
    held: list[tuple[bytes, tuple[str, int]]] = []
    connections = []  # accepted over TCP, never answered
    while True:
        ready = select.select([server, tcp], [], [], 0.05)[0]
        if tcp in ready:
            connections.append(tcp.accept()[0])
            print("tcp", flush=True)
        if server in ready:
            query, client = server.recvfrom(512)
            asked, qtype, _ = question(query)
            print(f"query {asked} {qtype}", flush=True)
            if hang is not None and asked == name.lower() and os.path.exists(hang):
                server.sendto(truncated(query), client)
            else:
                held.append((query, client))
        if held and os.path.exists(gate):
            for query, client in held:
                reply = answer(query, name.lower(), ipv4)
                server.sendto(reply, client)
                if reply[7]:  # records given: the next answer starts with the next one
                    ipv4 = ipv4[1:] + ipv4[:1]
            held.clear()


if __name__ == "__main__":
    main()
