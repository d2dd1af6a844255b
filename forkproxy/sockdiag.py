"""The kernel's view of TCP sockets, as `ss -tin` reads it: NETLINK_SOCK_DIAG (inet_diag).

Used by `forkproxy status`, in its own short-lived process, and by the metrics process at
each scrape: never by the supervisor or a relay child. One dump per address family of the
connected TCP sockets of this process's network namespace, with each socket's tcp_info;
unprivileged, as `ss` is. Only the sockets asked for (by inode, as /proc/PID/fd names
them) are decoded.

Layouts (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h, linux/tcp.h), all in the
host's byte order but the ports and addresses (network order):
  nlmsghdr          len u32, type u16, flags u16, seq u32, pid u32              16 bytes
  inet_diag_req_v2  family u8, protocol u8, ext u8, pad u8, states u32, sockid  56 bytes
  inet_diag_sockid  sport be16, dport be16, src 16B, dst 16B, if u32, cookie 8B 48 bytes
  inet_diag_msg     family u8, state u8, timer u8, retrans u8, sockid,
                    expires u32, rqueue u32, wqueue u32, uid u32, inode u32     72 bytes
  rtattr            len u16, type u16, payload padded to 4 bytes
  tcp_info          tcpi_retransmits u8 at 2, tcpi_backoff u8 at 4, tcpi_rto u32 at 8, ...
                    tcpi_last_data_sent u32 at 44,
                    tcpi_last_data_recv u32 at 52, tcpi_last_ack_recv u32 at 56,
                    tcpi_rtt u32 at 68, ...
                    tcpi_data_segs_in u32 at 152, tcpi_data_segs_out u32 at 156 (4.6+), ...
                    tcpi_total_rto_recoveries u16 at 242, tcpi_total_rto_time u32 at 244 (6.7+)
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4  # linux/netlink.h; the socket module has no name for it
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_INFO = 2  # the rtattr carrying struct tcp_info

# Sockets that are connected, or were and still hold their data: what a relay's two
# sockets can be in while it lives. Not SYN_SENT (an upstream not connected yet: nothing
# queued, nothing moved), nor LISTEN (a relay holds none), nor SYN_RECV and TIME_WAIT (no
# process holds those), which keeps a busy host's many TIME_WAIT sockets out of the dump.
TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2 = 1, 4, 5
TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING = 8, 9, 11
CONNECTED_STATES = sum(1 << state for state in (
    TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING))

_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_REQUEST = struct.Struct("=BBBBI48x")  # inet_diag_req_v2, its sockid all zero: any socket
_PORT = struct.Struct(">H")  # a port, in network order
_ATTRIBUTE = struct.Struct("=HH")  # rtattr
_U32 = struct.Struct("=I")
_MSG_SIZE = 72  # inet_diag_msg
_INODE_AT = 68  # inet_diag_msg's idiag_inode
_RQUEUE_AT, _WQUEUE_AT = 56, 60  # inet_diag_msg's idiag_rqueue, idiag_wqueue
_RETRANSMITS_AT = 2  # in struct tcp_info: u8, RTO retransmissions of the unacknowledged data
_BACKOFF_AT = 4  # u8: how many times the timeout was doubled since the peer last answered
_RTO_AT = 8  # u32, microseconds: the retransmission timeout, doubled at each retransmission
_LAST_DATA_SENT_AT = 44
_LAST_DATA_RECV_AT = 52
_LAST_ACK_RECV_AT = 56
_RTT_AT = 68  # u32, microseconds: the smoothed round-trip time
_UNACKED_AT = 24  # u32: segments sent and not acknowledged (the kernel's packets_out)
_TOTAL_RETRANS_AT = 100  # u32: every retransmission of the connection's life
# Linux's TCP_RTO_MIN: what a tail loss probe adds to two round trips when one segment is
# out (tcp_schedule_loss_probe), to let the peer's delayed ACK come first.
_LOSS_PROBE_ALLOWANCE_MS = 200
_TCP_RTO_MAX_MS = 120_000  # the cap where tcp_rto_max_ms is not (before Linux 6.15)
_TIMER_SLACK_MS = 10  # a few jiffies a timer may fire late besides its batching
# The longest a peer delays an ACK: Linux's delayed-ACK timer tops out at HZ/2 (500 ms;
# 200 ms, tcp_delack_max, once the exchange is interactive), others' at 200 ms. Well
# short of the shortest keepalive idle time (1 s), whose probes' ACKs must not read as
# the ACK of a request.
_LONGEST_DELAYED_ACK_MS = 500
_TCP_INFO_NEEDED = _LAST_ACK_RECV_AT + 4
_DATA_SEGS_IN_AT, _DATA_SEGS_OUT_AT = 152, 156
# u16: the RTO recoveries (episodes of retransmission timeouts) the socket has had,
# counting one in progress; u32, milliseconds: their total time, each from its first
# timeout to its end, one in progress up to now.
_TOTAL_RTO_RECOVERIES_AT, _TOTAL_RTO_TIME_AT = 242, 244
_U16 = struct.Struct("=H")
_U64 = struct.Struct("=Q")
# MPTCP (linux/mptcp.h, linux/inet_diag.h): its protocol number, the request attribute
# that carries it, and where struct mptcp_info (its INET_DIAG_INFO) keeps the sequence of
# the next byte written, of the first not yet acknowledged (u64, 5.9+), and the
# milliseconds since data last went out and came in (u32, 6.11+).
IPPROTO_MPTCP = 262
INET_DIAG_REQ_PROTOCOL = 3
INET_DIAG_ULP_INFO = 19  # a TCP socket's upper layer protocol, by name (tcp_diag, 5.3+)
_MPTCP_WRITE_SEQ_AT, _MPTCP_SND_UNA_AT = 16, 24
_MPTCP_FLAGS_AT, _MPTCP_INFO_FLAG_FALLBACK = 8, 1  # u32 mptcpi_flags
_MPTCP_LAST_DATA_SENT_AT, _MPTCP_LAST_DATA_RECV_AT = 84, 88
# A dump's messages come in datagrams the kernel sizes after the reader's buffer, up to
# 32 KiB each; a larger buffer is never filled, a smaller one would truncate them.
_RECV_SIZE = 1 << 16
# The kernel answers at once; a bound all the same, so that `status` cannot hang here.
_KERNEL_TIMEOUT = 10.0


class TcpSocket(NamedTuple):
    """One socket as the kernel reports it. (Not a dataclass: `status` runs in a
    container's memory limit, and dataclasses imports inspect and more.)"""

    state: int
    # Its peer's address and port: the address packed, 4 bytes for IPv4 (an IPv4 peer of
    # an IPv6 socket, ::ffff:a.b.c.d, too), 16 for IPv6 (packed_address() makes them).
    remote: tuple[bytes, int]
    # Bytes written to it and not yet acknowledged by its peer, sent or not: `ss`'s
    # Send-Q. Grows while the peer reads nothing (its window shut) or does not answer.
    send_queue: int
    # Milliseconds since data last moved on it, either way (the smaller of tcp_info's
    # last_data_sent and last_data_recv; while it retransmits, the peer's last ACK in
    # place of the last send); None when the kernel gave no tcp_info.
    idle_ms: int | None
    # Milliseconds since data was last sent to its peer, when no data came back from the
    # peer since: how long the peer has left what it was sent unanswered. 0 when it
    # answered, or nothing was sent. None when the kernel gave no tcp_info. The kernel
    # stamps both times in ticks (CONFIG_HZ: 4 ms at 250): a send in the same tick as the
    # peer's last data (a request right after the previous answer) counts when the peer
    # acknowledged it after that data (_acknowledged_since_its_last_data), or never sent
    # data at all (a first request, however soon after the connect); else it cannot be
    # told from one before it and is 0.
    unanswered_ms: int | None


_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4 as an IPv6 socket sees it


def packed_address(host: str) -> bytes:
    """`host` (an IP address, without brackets or zone) as TcpSocket.remote packs it.
    ValueError if it is not an address."""
    try:
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        raise ValueError(f"not an IP address: {host!r}") from None
    return packed[12:] if packed.startswith(_MAPPED) else packed


def read_tcp_sockets(inodes: set[int]) -> dict[int, TcpSocket]:
    """The connected TCP sockets among `inodes` (socket inodes, as /proc/PID/fd shows
    them: `socket:[N]`) that this process's network namespace holds, by inode. Sockets
    of another namespace, gone meanwhile, or not connected are absent. OSError when
    the kernel cannot be asked at all (no NETLINK_SOCK_DIAG: a sandbox)."""
    found: dict[int, TcpSocket] = {}
    if not inodes:
        return found
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(_KERNEL_TIMEOUT)
        buffer = bytearray(_RECV_SIZE)
        subflows: set[int] = set()
        for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            _dump(sock, family, sequence, inodes, buffer, found, subflows=subflows)
        if subflows:
            # An MPTCP socket (`mptcpize run`) holds TCP subflows that carry its inode:
            # the TCP dump read one of them (1 B queued where the connection held
            # 100 KiB; with two, the second path's peer, and `-`). Its own reading
            # replaces it. Asked only when a subflow was seen (its ULP is "mptcp"): an
            # MPTCP dump where no mptcp_diag is loaded makes the kernel run modprobe,
            # at every status and scrape on a kernel without MPTCP.
            for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), start=3):
                _dump(sock, family, sequence, subflows, buffer, found, IPPROTO_MPTCP)
    return found


def _dump(sock: socket.socket, family: int, sequence: int, inodes: set[int],
          buffer: bytearray, found: dict[int, TcpSocket],
          protocol: int = socket.IPPROTO_TCP, subflows: set[int] | None = None) -> None:
    """Ask for one family's connected TCP (or MPTCP) sockets and decode those in `inodes`
    into `found`, adding to `subflows` those that are an MPTCP socket's subflow. A family
    or protocol the kernel refuses (no IPv6 or MPTCP diag) adds nothing."""
    if protocol == IPPROTO_MPTCP:
        # 262 does not fit the request's u8: the kernel (5.9+) reads it from an attribute.
        request = _REQUEST.pack(family, 0, 1 << (INET_DIAG_INFO - 1), 0, CONNECTED_STATES)
        request += _ATTRIBUTE.pack(8, INET_DIAG_REQ_PROTOCOL) + _U32.pack(protocol)
        decode: Callable[[bytearray, int, int, TcpSocket | None], TcpSocket] = _decode_mptcp
    else:
        request = _REQUEST.pack(family, protocol, 1 << (INET_DIAG_INFO - 1), 0,
                                CONNECTED_STATES)
        decode = _decode
    sock.send(_HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                           NLM_F_REQUEST | NLM_F_DUMP, sequence, 0) + request)
    view = memoryview(buffer)
    while True:
        size = sock.recv_into(view)
        if not size:
            return  # never sent by a kernel that answers: no loop on it
        offset = 0
        while offset + _HEADER.size <= size:
            length, kind, _, seq, _ = _HEADER.unpack_from(buffer, offset)
            if length < _HEADER.size or offset + length > size:
                return  # malformed: what was decoded stands
            if seq == sequence:
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    return
                body = offset + _HEADER.size
                if length - _HEADER.size >= _MSG_SIZE:
                    inode = _U32.unpack_from(buffer, body + _INODE_AT)[0]
                    if inode in inodes:
                        found[inode] = decode(buffer, body, offset + length,
                                              found.get(inode))
                        if subflows is not None and _mptcp_subflow(buffer, body,
                                                                   offset + length):
                            subflows.add(inode)
            offset += (length + 3) & ~3  # NLMSG_ALIGN


def _mptcp_subflow(buffer: bytearray, body: int, end: int) -> bool:
    """Is the TCP socket of the inet_diag_msg at `body` an MPTCP subflow: does its
    INET_DIAG_ULP_INFO (sent with INET_DIAG_INFO) name the "mptcp" ULP?"""
    at = body + _MSG_SIZE
    while at + _ATTRIBUTE.size <= end:
        length, kind = _ATTRIBUTE.unpack_from(buffer, at)
        if length < _ATTRIBUTE.size:
            break
        if kind == INET_DIAG_ULP_INFO:
            # Its first nested attribute is INET_DIAG_ULP_INFO_NAME, a C string.
            name = at + 2 * _ATTRIBUTE.size
            return bytes(buffer[name:min(name + 6, end)]) == b"mptcp\0"
        at += (length + 3) & ~3  # RTA_ALIGN
    return False


def _remote(buffer: bytearray, body: int) -> tuple[bytes, int]:
    """The peer's address and port in the inet_diag_msg at `body`, as TcpSocket.remote."""
    port = _PORT.unpack_from(buffer, body + 6)[0]  # idiag_dport
    if buffer[body] == socket.AF_INET:
        return bytes(buffer[body + 24:body + 28]), port
    remote = bytes(buffer[body + 24:body + 40])
    return (remote[12:] if remote.startswith(_MAPPED) else remote), port


def _decode_mptcp(buffer: bytearray, body: int, end: int,
                  subflow: TcpSocket | None) -> TcpSocket:
    """The MPTCP socket's inet_diag_msg at `body`, its struct mptcp_info up to `end`:
    what its writer queued and the peer has not acknowledged at the connection's level
    (write_seq - snd_una, whichever subflow carries it), and where the kernel keeps its
    times (6.11+) its idle time and how long data sent has gone unanswered (the plain
    rule: sent after the peer's last data; the TCP reading's refinements are of one
    path's retransmissions, which another subflow may cover). Fallen back to TCP (a
    peer without MPTCP), the one subflow is the connection: its TCP reading (`subflow`),
    with what the MPTCP socket has not handed it yet."""
    send_queue = idle_ms = unanswered_ms = None
    at = body + _MSG_SIZE
    while at + _ATTRIBUTE.size <= end:
        length, kind = _ATTRIBUTE.unpack_from(buffer, at)
        if length < _ATTRIBUTE.size:
            break
        info, size = at + _ATTRIBUTE.size, length - _ATTRIBUTE.size
        if kind == INET_DIAG_INFO and size >= _MPTCP_SND_UNA_AT + 8:
            write_seq, snd_una = _U64.unpack_from(buffer, info + _MPTCP_WRITE_SEQ_AT)[0], \
                _U64.unpack_from(buffer, info + _MPTCP_SND_UNA_AT)[0]
            send_queue = (write_seq - snd_una) % (1 << 64)
            if subflow is not None and _U32.unpack_from(buffer, info + _MPTCP_FLAGS_AT)[0] \
                    & _MPTCP_INFO_FLAG_FALLBACK:
                # Fallen back, snd_una is what went to the subflow (acknowledged or not).
                return subflow._replace(send_queue=subflow.send_queue + send_queue)
            if size >= _MPTCP_LAST_DATA_RECV_AT + 4:
                sent = _U32.unpack_from(buffer, info + _MPTCP_LAST_DATA_SENT_AT)[0]
                received = _U32.unpack_from(buffer, info + _MPTCP_LAST_DATA_RECV_AT)[0]
                idle_ms = min(sent, received)
                # An answer waiting to be read (a client that stopped reading holds the
                # relay back) is not the peer's to give, as for TCP.
                unanswered_ms = 0 if _U32.unpack_from(buffer, body + _RQUEUE_AT)[0] or (
                    sent >= received) else sent
            break
        at += (length + 3) & ~3  # RTA_ALIGN
    if send_queue is None:  # no mptcp_info: the socket's own count, as TCP's Send-Q
        send_queue = _U32.unpack_from(buffer, body + _WQUEUE_AT)[0]
    return TcpSocket(buffer[body + 1], _remote(buffer, body), send_queue, idle_ms,
                     unanswered_ms)


def _decode(buffer: bytearray, body: int, end: int,
            _subflow: TcpSocket | None = None) -> TcpSocket:
    """The inet_diag_msg at `body`, its attributes up to `end`."""
    state = buffer[body + 1]
    remote, port = _remote(buffer, body)
    send_queue = _U32.unpack_from(buffer, body + _WQUEUE_AT)[0]
    idle_ms = unanswered_ms = None
    at = body + _MSG_SIZE
    while at + _ATTRIBUTE.size <= end:
        length, kind = _ATTRIBUTE.unpack_from(buffer, at)
        if length < _ATTRIBUTE.size:
            break
        if kind == INET_DIAG_INFO and length - _ATTRIBUTE.size >= _TCP_INFO_NEEDED:
            info = at + _ATTRIBUTE.size
            sent = _U32.unpack_from(buffer, info + _LAST_DATA_SENT_AT)[0]
            received = _U32.unpack_from(buffer, info + _LAST_DATA_RECV_AT)[0]
            # last_data_recv counts from the connect before any data came: a first request
            # sent in the connect's tick would otherwise look answered.
            never_answered = length - _ATTRIBUTE.size >= _DATA_SEGS_OUT_AT + 4 and (
                _U32.unpack_from(buffer, info + _DATA_SEGS_IN_AT)[0] == 0
                and _U32.unpack_from(buffer, info + _DATA_SEGS_OUT_AT)[0] > 0)
            unanswered_ms = sent if sent < received or never_answered else 0
            if (sent == received and state == TCP_ESTABLISHED
                    and _acknowledged_since_its_last_data(buffer, info, length)):
                unanswered_ms = sent
            if buffer[info + _RETRANSMITS_AT]:
                # Retransmitting, the peer silent (a host gone, a black hole): every
                # retransmission counts as data sent in last_data_sent, which would make
                # the connection look busy and answered. Nothing moved since the peer's
                # last ACK (IDLE counts from there), and what was sent since has gone
                # unanswered since it was first sent (the last ACK may be an idle hour
                # older, so not from there).
                silent = _U32.unpack_from(buffer, info + _LAST_ACK_RECV_AT)[0]
                rto_ms = _U32.unpack_from(buffer, info + _RTO_AT)[0] // 1000
                if length - _ATTRIBUTE.size >= _TOTAL_RTO_TIME_AT + 4 and _U16.unpack_from(
                        buffer, info + _TOTAL_RTO_RECOVERIES_AT)[0]:
                    # The kernel's own clock (6.7+): the time since this episode's first
                    # timeout, plus the wait before it, the timeout it started from (the
                    # one now, halved as many times as it was doubled since). Earlier
                    # recoveries of the connection are in the sum too, each counted
                    # from its timeout to the ACK that ended it: on a path that
                    # recovered, a round trip each (no way to tell them apart).
                    # Bounded by as many timeouts as came, each at most the one now:
                    # an earlier recovery that lasted (an outage the path came back
                    # from) overcounts by no more than the cap's ramp.
                    backoff = buffer[info + _BACKOFF_AT]
                    episode_ms = _U32.unpack_from(buffer, info + _TOTAL_RTO_TIME_AT)[0]
                    timeouts = buffer[info + _RETRANSMITS_AT]
                    first_rto_ms = rto_ms >> backoff
                    probe_ms = _loss_probe_ms(buffer, info, timeouts, first_rto_ms)
                    waited_ms = min(episode_ms + first_rto_ms + probe_ms,
                                    timeouts * rto_ms + sent)
                    # An ICMP unreachable for the data undoes a doubling (Linux's
                    # tcp_ld_RTO_revert: a host gone behind a router), and the timeouts
                    # come at the first one's pace, backoff short of them: no bound.
                    if backoff == timeouts and rto_ms < _rto_max_ms():
                        # Below the cap, the timeouts doubled from the first: this
                        # episode is their sum (the one now less the first) and the time
                        # since the last, which leaves out the earlier recoveries the
                        # kernel's clock adds in (1-3 s high after a recovered outage).
                        # Long timers fire up to 1/8 late (the timer wheel's batching):
                        # a bound, not a reading.
                        waited_ms = min(waited_ms, probe_ms + (rto_ms - first_rto_ms) * 9 // 8
                                        + sent + _TIMER_SLACK_MS)
                else:
                    # The retransmissions came at the timeout, doubled each time, so the
                    # first send was at most the timeout now before the last one. Not
                    # past the RTO's cap (tcp_rto_max_ms, 120 s): from there the timeout
                    # stays, and this cycles between one and two caps.
                    waited_ms = sent + rto_ms
                unanswered_ms = max(unanswered_ms, min(silent, waited_ms))
                sent = max(sent, silent)
            if _U32.unpack_from(buffer, body + _RQUEUE_AT)[0]:
                # The peer answered, and its answer waits for the proxy to read it (a
                # client that stopped reading holds the relay's side back): not the peer's
                # to answer, whatever went to it since.
                unanswered_ms = 0
            idle_ms = min(sent, received)
            break
        at += (length + 3) & ~3  # RTA_ALIGN
    return TcpSocket(state, (remote, port), send_queue, idle_ms, unanswered_ms)


def _rto_max_ms() -> int:
    """The retransmission timeout's cap in this network namespace: tcp_rto_max_ms
    (Linux 6.15+), else TCP_RTO_MAX. Read only for a socket that is retransmitting."""
    try:
        with open("/proc/sys/net/ipv4/tcp_rto_max_ms", "rb") as value:
            return int(value.read(32))
    except (OSError, ValueError):
        return _TCP_RTO_MAX_MS


def _loss_probe_ms(buffer: bytearray, info: int, timeouts: int, first_rto_ms: int) -> int:
    """How long before the first timeout its timer was armed again by a tail loss probe
    (Linux's default, tcp_early_retrans): the probe goes first, two round trips (and
    TCP_RTO_MIN with one segment out) after the send, and the timeout counts from the
    probe, so the episode's clock starts that much later (UNANSWERED read ~0.2 s low into
    a black hole on loopback). Told by a retransmission more than this episode's
    timeouts; one of an earlier loss the connection recovered from reads the same, and
    then UNANSWERED reads at most that first timeout high. 0 without one."""
    if _U32.unpack_from(buffer, info + _TOTAL_RETRANS_AT)[0] <= timeouts:
        return 0
    two_rtts_ms: int = _U32.unpack_from(buffer, info + _RTT_AT)[0] // 500
    one_out = _U32.unpack_from(buffer, info + _UNACKED_AT)[0] == 1
    # Never later than the timeout it stands in for (the kernel's min with the RTO).
    return min(first_rto_ms, two_rtts_ms + (_LOSS_PROBE_ALLOWANCE_MS if one_out else 0))


def _acknowledged_since_its_last_data(buffer: bytearray, info: int, length: int) -> bool:
    """Whether the peer, after its last data, acknowledged data sent to it in the same
    tick as that data came: a request sent right after the previous answer (any client
    that turns an answer around within a tick), left unanswered. The ticks cannot order
    the two; the peer's ACK can. A data segment moves both last_data_recv and
    last_ack_recv, a pure ACK only the latter: a newer ACK is the peer's receipt of
    something sent after its last data went out (a hung upstream's kernel still
    acknowledges the request, after its delayed-ACK time). Not counted when it can be
    something else:
    - a FIN's ACK, or an ACK with the peer's FIN (no data): only ESTABLISHED (the
      caller), neither side closed;
    - the ACK of one of our keepalive probes (--keepalive): those start only after the
      keepalive idle time (1 s at the least) of nothing received, so the ACK must come
      within a round trip and the longest delayed ACK (Linux: HZ/2) of the last data.
      On a connection left unanswered, the first probe's ACK ends it (back to 0).
      The peer's own probes: a Linux peer's is out of the window and dropped before its
      ACK is looked at; another stack's one-byte probe comes after its idle time (2 h
      by default), past the same bound.
    A window update (the peer read what it was sent after its last data) is a request
    pending all the same.
    A peer that acknowledges at once (quick ACKs), in the tick its answer came, cannot
    be told from one that answered: 0, as before."""
    if length - _ATTRIBUTE.size < _RTT_AT + 4:
        return False
    if length - _ATTRIBUTE.size >= _DATA_SEGS_OUT_AT + 4 and not _U32.unpack_from(
            buffer, info + _DATA_SEGS_OUT_AT)[0]:
        return False  # nothing ever sent: the stamps are the connect's
    received: int = _U32.unpack_from(buffer, info + _LAST_DATA_RECV_AT)[0]
    acknowledged: int = _U32.unpack_from(buffer, info + _LAST_ACK_RECV_AT)[0]
    rtt_ms: int = _U32.unpack_from(buffer, info + _RTT_AT)[0] // 1000
    return 0 < received - acknowledged <= rtt_ms + _LONGEST_DELAYED_ACK_MS


def socket_inodes(pid: int, first: int = 0) -> list[int]:
    """The inodes of the sockets process `pid` holds on descriptors `first` and up (its
    /proc/PID/fd links that read `socket:[N]`). OSError when they cannot be listed (gone,
    or another user's without root); a descriptor closed while listed is left out."""
    directory = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        inodes = []
        for name in os.listdir(directory):
            if int(name) < first:
                continue
            try:
                target = os.readlink(name, dir_fd=directory)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.append(int(target[8:-1]))
        return inodes
    finally:
        os.close(directory)
