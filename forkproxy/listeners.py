"""Listening sockets: bind with the options socat's `fork,reuseaddr` users expect, close,
and reconcile an old set with a new one so a reload keeps the sockets it can."""

from __future__ import annotations

import collections
import errno
import itertools
import os
import select
import socket
import sys

# The C socket type (see relay.py): routes_here runs in a relay child too.
from _socket import socket as RawSocket
from collections.abc import Callable, Iterable, Mapping

from .config import ConfigError, Endpoint, Link, join_host_port

# SO_MEMINFO, which Python's socket module does not name: 55 in asm-generic, which x86 and
# ARM use (a few architectures, sparc and parisc, number it otherwise). It gives the
# socket's sk_meminfo, u32s; the one at SK_MEMINFO_DROPS (8) is sk_drops, which for a
# listener tcp_listendrop() counts up at each handshake packet it drops (a SYN, or the
# client's last ACK, with the accept queue full; a SYN with the SYN queue full and no
# syncookies), and which the kernel's receive path also counts up at each packet of a
# handshake already under way that it discards (a client's SYN sent again after a
# SYN-ACK was lost, a duplicated ACK): on a lossy network it grows with no queue full.
# The kernel's own total of tcp_listendrop()'s alone is TcpExtListenDrops, for every
# listener of the network namespace (kernel_listen_counts).
SO_MEMINFO = 55
_MEMINFO_SIZE = 9 * 4
_MEMINFO_DROPS = slice(8 * 4, 9 * 4)
_U32 = 1 << 32

TCP_LISTEN = 10  # linux/tcp_states.h

# socat's default backlog of 5 makes a burst of clients wait for SYN retransmits
# (1-3 s); the kernel caps this at net.core.somaxconn anyway.
BACKLOG = 4096


class Listener:
    """A bound, listening socket and the link it serves (the link may change on reload)."""

    def __init__(self, link: Link, sock: socket.socket, port: int) -> None:
        self.link = link
        self.sock = sock
        self.port = port  # the port really bound (differs from link.port when 0 was asked)
        # A plain int: socket.family runs enum code, which a fresh child would pay for in
        # copied pages.
        self.family = int(sock.family)
        # Set by the supervisor: relay.serve's arguments after the slot and turn (_prepare_relay).
        self.relay_args: tuple[object, ...] = ()
        # Its connections, counted from 0: each child's turn (relay.in_turn), so the
        # first connection goes to the first address getaddrinfo gave. Kept here, not in
        # the accept handler, which is built anew after each reload.
        self.turns = itertools.count()
        # Its poll handler (Supervisor._accept_handler), built when accepting first
        # resumes after a start or a reload, kept while it pauses and resumes.
        self.accept_clients: Callable[..., None] | None = None
        # `waiting(0)`: is another client already in the backlog? A poll of this socket
        # alone, so the accept loop can ask without an accept() that fails: the
        # BlockingIOError that raises allocates an exception, a traceback and a frame
        # object, and every page the supervisor writes between two forks is copied
        # (docs/benchmarks.md).
        backlog = select.poll()
        backlog.register(sock.fileno(), select.POLLIN)
        self.waiting: Callable[[int], list[tuple[int, int]]] = backlog.poll
        # Handshake packets dropped (drops()): the count at the last read, and the kernel's
        # u32 it was read from, which wraps (a SYN flood at 100,000 a second does in 12 h).
        # From 0: the socket was bound by us, and nothing was dropped before it listened.
        self.drops_read = 0
        self.drops_raw = 0
        # The count at the supervisor's last check (Supervisor.check_drops).
        self.drops_checked = 0

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def queue(self) -> tuple[int, int] | None:
        """(clients the kernel holds in the accept queue, its size), or None where it
        cannot say. Clients queued there are not forkproxy's yet: at --max-children, or
        while the supervisor is busy or stopped, they wait unseen by `waiting`.

        TCP_INFO of a listening socket: Linux fills tcpi_unacked with the queue's length
        and tcpi_sacked with its size (the listen() backlog, capped at somaxconn). The
        queue holds one more than its size when it is full."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        except OSError:
            return None
        if len(info) < 32:
            return None
        return (int.from_bytes(info[24:28], sys.byteorder),
                int.from_bytes(info[28:32], sys.byteorder))

    def listening(self) -> bool | None:
        """Does the socket listen now (TCP_INFO's tcpi_state is TCP_LISTEN)? None where
        the kernel cannot say. One shut down from outside (another holder's shutdown(),
        an operator's `ss -K`) is TCP_CLOSE: the port refuses everyone, from that moment,
        before the supervisor's next accept() finds it (Supervisor._listener_shut), and
        while it does not accept (at --max-children, backing off) too."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
        except OSError:
            return None
        return info[0] == TCP_LISTEN if info else None

    def drops(self) -> int | None:
        """Handshake packets the kernel dropped at this listener since it was bound (kept
        across the reloads that keep the socket), None where it cannot say (an old kernel
        without SO_MEMINFO, or one that gives fewer fields). Clients that met a full
        accept queue: each dropped SYN is retried by the client's kernel (after 1 s, 3 s,
        7 s...), and each retry dropped counts again, so this counts packets, not clients;
        a client whose every retry is dropped times out (after ~2 minutes on Linux). One
        getsockopt.

        Read by the supervisor only (it keeps the running count across the u32's wraps):
        a reporter child's reading would be lost with it."""
        try:
            info = self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO_SIZE)
        except OSError:
            return None
        if len(info) < _MEMINFO_SIZE:
            return None
        raw = int.from_bytes(info[_MEMINFO_DROPS], sys.byteorder)
        self.drops_read += (raw - self.drops_raw) % _U32
        self.drops_raw = raw
        return self.drops_read

    def describe(self) -> str:
        return self.link.describe(self.port)

    def take_up_backlog(self) -> None:
        """listen(BACKLOG) again where the accept queue is smaller (net.core.somaxconn
        was below it when the socket listened), so that a somaxconn raised since counts
        at a reload: the kernel caps the backlog at listen() only, and a kept socket
        kept its old size until a restart. On a socket listening already listen() sets
        the queue's size and nothing else: no client waiting in it is dropped. Not on
        one that stopped listening (shut from outside): listen_again says why. Nor
        where somaxconn is not above the queue's size now: a somaxconn lowered since
        would shrink a queue that may hold clients."""
        queue = self.queue()
        if queue is None or queue[1] >= BACKLOG or not self.listening():
            return
        somaxconn = sysctl("net/core/somaxconn")
        if somaxconn is None or somaxconn <= queue[1]:
            return
        try:
            self.sock.listen(BACKLOG)
        except OSError:
            pass  # not on a listening socket; if it did, the size stays as it was

    def listen_again(self) -> None:
        """Listen again at this listener's address and port, after its socket stopped
        listening under us: another process holding a copy of it shut it down
        (shutdown(SHUT_RD) on its copy), or an operator's `ss -K` destroyed it, which
        accept() tells by EINVAL. ConfigError saying why when it cannot (another socket
        listens on the port meanwhile: address already in use).

        On a fresh socket, put in place of the old one on the same descriptor (dup2), so
        that whatever holds the number (the accept handler, the poll, `waiting`) goes on
        unchanged. The old socket will not do: listen() takes it up again after a
        shutdown, but after `ss -K` every connection accepted from it is born shut down
        (the kernel's abort left SHUTDOWN_MASK on the listener, which its children
        copy), and the other holder of a copy would get our listener back too. Its
        handshake drops count from 0 again (drops: the running total goes on)."""
        listen_again_in_place(self.sock, self.link.bind, self.port, blocking=False)
        self.drops_raw = 0


def listen_again_in_place(sock: socket.socket, host: str, port: int, *,
                          backlog: int = BACKLOG, blocking: bool = True) -> None:
    """A fresh listening socket at host:port put in place of `sock` on its descriptor
    (dup2): Listener.listen_again says why a fresh one, and why the same number. For a
    link's listener and for the metrics port alike. ConfigError when it cannot listen."""
    fresh = listen_tcp(host, port, backlog)
    try:
        fresh.setblocking(blocking)
        os.dup2(fresh.fileno(), sock.fileno(), inheritable=False)
    finally:
        fresh.close()


def kernel_listen_counts() -> tuple[int, int] | None:
    """(TcpExtListenDrops, TcpExtListenOverflows): the handshakes every listener of this
    network namespace dropped, and those of them it dropped for a full accept queue; None
    where they cannot be read. Unlike a listener's own count (Listener.drops), no packet
    of a lossy network is in either.

    The rest of ListenDrops (tcp_conn_request, tcp_v4_syn_recv_sock) is no accept queue's:
    a SYN whose SYN-ACK has no route back (a missing return route, a spoofed source), a
    full SYN queue without syncookies (net.ipv4.tcp_syncookies=0), no memory."""
    try:
        with open("/proc/self/net/netstat", "rb") as stats:
            lines = stats.read().splitlines()
    except OSError:
        return None
    # Pairs of lines: "TcpExt: Name Name ...", then "TcpExt: value value ...".
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith(b"TcpExt:") and values.startswith(b"TcpExt:"):
            found = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            drops, overflows = found.get(b"ListenDrops"), found.get(b"ListenOverflows")
            if drops is None or overflows is None or not (drops + overflows).isdigit():
                return None
            return int(drops), int(overflows)
    return None


class HeldBacklog:
    """Accepted clients waiting for a child: those the supervisor took off the backlog of
    a listener about to close (a stop, or a reload that removes it) while --max-children
    children were running (accepted, so closing the listener does not reset them), and
    one whose fork failed (a pids limit). Served as slots free up or forks succeed again;
    closed when a stop's grace period ends.

    Stands in for the Listener in the supervisor's accept loop: `sock._accept()` hands the
    clients out in order, `waiting(0)` tells whether any are left.

    Its link, and where its children connect, are the listener's at the time each client
    is served: a reload that points a kept port elsewhere sends the clients held on it
    there, as it does the clients still in the port's backlog. (A port the reload
    removed keeps the link it had.)
    """

    def __init__(self, listener: Listener, clients: list[tuple[int, tuple[str, int]]],
                 gone: Callable[[Link], None]) -> None:
        self.listener = listener
        self.gone = gone  # told of each client that reset while held: no child comes for it
        self.port, self.family, self.turns = listener.port, listener.family, listener.turns
        self.clients = collections.deque(clients)
        self.sock = self

    @property
    def link(self) -> Link:
        return self.listener.link

    @property
    def relay_args(self) -> tuple[object, ...]:
        return self.listener.relay_args

    def _accept(self) -> tuple[int, tuple[str, int]]:
        """The next held client that is still there. One that reset while it was held
        (POLLERR, POLLHUP: an RST) is closed and skipped: a child would connect upstream
        for nobody, and count it. (Linux's accept() hands out a client that reset in the
        backlog, BSD's fails ECONNABORTED; a held one is skipped either way.) One that only
        half-closed (a FIN: POLLIN, POLLRDHUP) is served; it may wait for an answer."""
        while self.clients:
            fd, address = self.clients.popleft()
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not any(events & (select.POLLERR | select.POLLHUP)
                       for _, events in poller.poll(0)):
                return fd, address
            os.close(fd)
            self.gone(self.link)
        raise BlockingIOError(errno.EAGAIN, "no held client left")

    def waiting(self, timeout: int) -> list[tuple[int, int]]:
        return [(-1, select.POLLIN)] if self.clients else []

    def close(self) -> None:
        """The grace period is over: the clients still held are closed, unserved."""
        while self.clients:
            os.close(self.clients.popleft()[0])


# What accept(2) returns when the process, not the client, is short: out of descriptors
# or kernel memory. The listener stays readable, so whoever accepts pauses ACCEPT_BACKOFF
# seconds before it tries again, rather than spin (the supervisor, the metrics process).
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF = 0.1
# The exit status of a metrics process whose listening socket was shut down from outside
# (accept() failing EINVAL): the supervisor listens on the port again, then starts another.
METRICS_SOCKET_SHUT = 3

# What accept(2) returns for one client and not the listener: it reset while it waited
# (ECONNABORTED), a firewall refused it (EPERM), or a network error pending on it (Linux
# hands those on, for TCP: EPROTO, ENETDOWN, ...). The next client may be fine.
CLIENT_ERRORS = frozenset({
    errno.ECONNABORTED, errno.EPERM, errno.EPROTO, errno.ENOPROTOOPT, errno.EOPNOTSUPP,
    errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENONET,
})


def accept_backlog(listener: Listener) -> tuple[list[tuple[int, tuple[str, int]]], OSError | None]:
    """Accept every client waiting in the listener's backlog, without serving it: (the
    clients, and the error that ended it early, None when the backlog is empty).

    A client's own error (CLIENT_ERRORS) skips it. Any other ends the drain: out of
    descriptors or buffers (EMFILE, ENFILE, ENOBUFS, ENOMEM), accept would fail for
    every client left, and a stop cannot back off and try again as the accept loop
    does, since its listeners close now (to refuse newcomers): the rest are reset.
    """
    clients: list[tuple[int, tuple[str, int]]] = []
    while True:
        try:
            clients.append(listener.sock._accept())  # type: ignore[attr-defined]
        except BlockingIOError:
            return clients, None
        except InterruptedError:
            continue  # a signal came: that client is still there
        except OSError as exc:
            if exc.errno not in CLIENT_ERRORS:
                return clients, exc


class AddressInUse(ConfigError):
    """listen_tcp's EADDRINUSE: another socket listens on the port at an address that
    overlaps ours (bind_all tells one a supervisor taken over holds)."""


def listen_tcp(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket with SO_REUSEADDR, or ConfigError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise  # Supervisor.run says so (a reload: reload-failed)
        raise ConfigError(f"cannot listen on {join_host_port(host, port)}: "
                          f"{socket_refused(family, exc)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            # `[::]:P` means every address, IPv4 too, whatever the host's bindv6only says.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address: tuple[object, ...] = (host, port)
        if "%" in host:
            # A zone (fe80::1%eth0): bind((host, port)) would parse it, then set the scope
            # id from the tuple's missing fourth item, 0, and the kernel refuses a
            # link-local address without one (EINVAL). config._ZONE admits only names
            # and indexes.
            scope = zone_scope(host, f"cannot listen on {join_host_port(host, port)}")
            address = (host.partition("%")[0], port, 0, scope)
        sock.bind(address)
        sock.listen(backlog)
    except ConfigError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        reason = {
            # Another program's socket: its listener (an old proxy still draining, in a
            # handover on one host), or a connection from that port, TIME-WAIT's too (one
            # that closed without SO_REUSEADDR blocks a bind for 60 s), which `ss -l`
            # would not show: say how to find either.
            errno.EADDRINUSE: f"address already in use (another program's socket holds "
                              f"it: `ss -tanp 'sport = :{port}'` names it, a listener or a "
                              "connection from that port; a TIME-WAIT ends within 60 s)",
            errno.EACCES: bind_refused(port),
            errno.EADDRNOTAVAIL: "no such address on this host" + (
                ipv6_off(host) if family == socket.AF_INET6 else ""),
        }.get(exc.errno or 0, exc.strerror or str(exc))
        kind = AddressInUse if exc.errno == errno.EADDRINUSE else ConfigError
        raise kind(f"cannot listen on {join_host_port(host, port)}: {reason}") from None
    return sock


def ipv6_off(host: str) -> str:
    """`(IPv6 is disabled here: ...)` where the sysctl that took `host`'s IPv6 address
    away is set in this network namespace (a container's or pod's usual setting), else
    "": the address missing alone leaves the operator to find why."""
    sysctl = ipv6_disabled_by(host)
    return f" (IPv6 is disabled here: {sysctl})" if sysctl else ""


def ipv6_disabled_by(host: str) -> str:
    """The sysctl set in this network namespace that takes `host`'s IPv6 addresses away
    (`net.ipv6.conf.all.disable_ipv6=1`; lo's too for ::1), else ""."""
    loopback = host.partition("%")[0] == "::1"
    for conf in ("lo", "all") if loopback else ("all",):
        if sysctl(f"net/ipv6/conf/{conf}/disable_ipv6") == 1:
            return f"net.ipv6.conf.{conf}.disable_ipv6=1"
    return ""


def sysctl(name: str) -> int | None:
    """This network namespace's integer sysctl `name` (`net/ipv4/...`), for a line's
    words, or None where /proc/sys does not say (hidden, not mounted)."""
    try:
        with open(f"/proc/sys/{name}", "rb") as file:
            return int(file.read())
    except (OSError, ValueError):
        return None


def port_range() -> tuple[int, int] | None:
    """This network namespace's net.ipv4.ip_local_port_range (first, last), the ports a
    connect() takes its own from, or None where /proc/sys does not say."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", "rb") as file:
            first, last = (int(word) for word in file.read().split())
    except (OSError, ValueError):
        return None
    return first, last


def bind_refused(port: int) -> str:
    """Why bind() to `port` was refused (EACCES), for an operator: a port below this
    network namespace's net.ipv4.ip_unprivileged_port_start without the capability, or,
    at or above it, a policy of this host's, which the port's advice would not help."""
    start = sysctl("net/ipv4/ip_unprivileged_port_start")
    # None: no /proc/sys, the port's word, as before.
    if start is None or 0 < port < start:
        # Not "need root": root without the capability (--cap-drop=ALL) is refused
        # too, and a lowered sysctl (Docker 20.10+ sets 0) lets anyone bind.
        here = "1024 by default" if start is None else f"{start} here"
        return (f"permission denied (ports below net.ipv4.ip_unprivileged_port_start, "
                f"{here}, need CAP_NET_BIND_SERVICE)")
    return (f"permission denied, not for the port ({port} is at or above "
            f"net.ipv4.ip_unprivileged_port_start, {start} here): a security module's "
            f"policy refuses the bind (SELinux, AppArmor, Landlock), or a cgroup BPF hook")


def socket_refused(family: int, exc: OSError) -> str:
    """Why socket() refused a TCP socket of `family`, for an operator: a sandbox or an
    interposer, not the port (bind's EACCES is the port's)."""
    text = exc.strerror or str(exc)
    if exc.errno == errno.EAFNOSUPPORT:
        if family == socket.AF_INET6:
            # ipv6.disable=1, or a seccomp filter such as systemd's
            # RestrictAddressFamilies=AF_UNIX AF_INET.
            return f"no IPv6 on this host ({text})"
        # Every Linux with TCP has IPv4: a filter refuses it to this process.
        return (f"IPv4 sockets are refused to this process ({text}: a seccomp filter, such "
                f"as systemd's RestrictAddressFamilies= without AF_INET)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        # A seccomp filter (a container runtime's profile) or an LSM's policy (SELinux,
        # AppArmor, a BPF LSM program); never the port, which bind() is refused for.
        return (f"cannot open a socket: {text} (refused by a seccomp filter or a security "
                f"module's policy: SELinux, AppArmor)")
    if exc.errno in (errno.ENOPROTOOPT, errno.EPROTONOSUPPORT):
        # socket(AF_INET, SOCK_STREAM, 0) cannot fail so by itself: an interposer asked for
        # another protocol. `mptcpize run` asks for IPPROTO_MPTCP, which the kernel
        # refuses so in a network namespace with net.mptcp.enabled=0 (or without MPTCP).
        return (f"cannot open a socket: {text} (under `mptcpize run`: MPTCP is off in this "
                f"network namespace, net.mptcp.enabled=0, or not in this kernel)")
    return f"cannot open a socket: {text}"  # ENOBUFS, ENOMEM...


def zone_scope(host: str, what: str) -> int:
    """The index of the interface the IPv6 zone of `host` (fe80::1%eth0) names, by name
    or by index; ConfigError "`what`: no interface ..." when there is none."""
    zone = host.partition("%")[2]
    try:
        name = socket.if_indextoname(int(zone)) if zone.isdigit() else zone
        return socket.if_nametoindex(name)
    except (OSError, OverflowError):  # OverflowError: an index past an int
        raise ConfigError(f"{what}: no interface {zone!r} on this host") from None


def check_zones(links: Iterable[Link]) -> None:
    """ConfigError for an IPv6 zone that names no interface here: a listener's (bind()
    would refuse it; checked here too, so that `links`, which binds nothing, says so as
    `serve` does), or a target's (getaddrinfo cannot parse it: every connect would fail)."""
    for link in links:
        try:
            if "%" in link.bind:
                zone_scope(link.bind, f"cannot listen on {join_host_port(link.bind, link.port)}")
            if "%" in link.target.host and not link.target.is_name:
                zone_scope(link.target.host, f"cannot connect to {link.target}")
        except ConfigError as exc:
            raise ConfigError(f"{exc} (for {link.name})") from None


def own_addresses(targets: Mapping[str, Endpoint]) -> frozenset[str]:
    """Which of `targets` (config.own_address_candidates: address, with its zone, -> a
    target of it) are addresses of this host, as its routing says (routes_here). A probe
    that fails (no route, no IPv6 sockets, a zone gone) says "not known to be this
    host's", never a reason to refuse: run time judges it again."""
    own = set()
    for address, target in targets.items():
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr: tuple[str, int] | tuple[str, int, int, int] = (address, target.port)
        if family == socket.AF_INET6:
            try:
                scope = zone_scope(target.host, str(target)) if "%" in target.host else 0
            except ConfigError:
                continue
            sockaddr = (address.partition("%")[0], target.port, 0, scope)
        if routes_here(family, sockaddr):
            own.add(address)
    return frozenset(own)


def unsendable(targets: Mapping[str, Endpoint]) -> dict[str, str]:
    """Which of `targets` (config.literal_targets: an IPv6 address, with its zone, -> a
    target of it) no address of this host's can send to (no_source_address: one UDP
    socket's connect each, no packet sent), each with why, for config.unreachable_links:
    IPv6 disabled here (the sysctl named, as ipv6_off finds it), or no interface holding
    an IPv6 address that routes there. A probe that cannot say leaves it out."""
    found = {}
    for address, target in targets.items():
        if no_source_address(target.host, target.port):
            sysctl = ipv6_disabled_by(target.host)
            found[address] = (f"IPv6 is disabled here ({sysctl}, as in many containers)"
                              if sysctl else "no interface holds an IPv6 address that "
                              "routes there (`ip -6 addr`, `ip -6 route`)")
    return found


def routes_here(family: int, sockaddr: tuple[object, ...]) -> bool:
    """Is `sockaddr`'s address one of this host's own, as its routing says: a UDP socket
    connected to it (no packet is sent) is given that very address as its own only when
    the route to it is a `local` one. Not a bind(), which any address passes under
    net.ipv4.ip_nonlocal_bind=1 (keepalived's hosts, for a VIP they may take over): a
    remote server's address would be called this host's. False when the probe fails (no
    route, no sockets of the family). Also the relay child's (relay.connect_upstream),
    after a refusal only: the C socket, whose Python wrapper a fresh child would copy
    pages to run."""
    try:
        probe = RawSocket(family, socket.SOCK_DGRAM)
    except OSError:
        return False
    try:
        probe.connect(sockaddr)
        source = str(probe.getsockname()[0]).partition("%")[0]
        address = str(sockaddr[0]).partition("%")[0]
        return socket.inet_pton(family, source) == socket.inet_pton(family, address)
    except OSError:
        return False
    finally:
        probe.close()


def loopback_down() -> bool:
    """Is this network namespace's loopback interface down: `ip netns add` and `unshare
    -n` make one so, and a connect to 127.0.0.1 then fails (no route, or a timeout once
    it was up: its local routes stay, its packets are dropped) with nothing naming lo.
    From the kernel (SIOCGIFFLAGS), not /sys, which may be another namespace's. False
    when it cannot say. For a connect-failed line only."""
    import fcntl  # the supervisor's already: no new module loaded

    try:
        probe = RawSocket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return False
    try:
        # struct ifreq: the name in 16 bytes, then ifr_flags (a short) in a 24-byte union.
        answer = fcntl.ioctl(probe.fileno(), SIOCGIFFLAGS, b"lo".ljust(40, b"\0"))
        flags = int.from_bytes(answer[16:18], sys.byteorder)
    except OSError:
        return False
    finally:
        probe.close()
    return not flags & IFF_UP


SIOCGIFFLAGS, IFF_UP = 0x8913, 0x1


def no_source_address(host: str, port: int) -> bool:
    """Does this host lack an address to send to `host` (an IP literal, perhaps with a
    zone) from: a UDP socket connected to it (no packet is sent) fails EADDRNOTAVAIL, as a
    TCP connect does, where IPv6 is disabled (`net.ipv6.conf.*.disable_ipv6=1`, `::1` gone
    from lo) or no interface holds an address of the family. A TCP connect out of local
    ports fails so too, but a UDP socket takes its port from another table: the probe tells
    the two apart. False when the probe cannot say. Asked off a connection's path: at the
    reap of a connect that failed so, and at start and reload for IPv6 literals
    (unsendable)."""
    try:
        # As bytes: given a str, getaddrinfo imports the idna codec (and unicodedata) into
        # the supervisor, whose every mapping each fork copies (relay.lookup's reason).
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host.encode("ascii", "replace"), port, type=socket.SOCK_DGRAM,
            flags=socket.AI_NUMERICHOST)[0]
        probe = RawSocket(family, socket.SOCK_DGRAM)
    except (OSError, socket.gaierror):
        return False
    try:
        probe.connect(sockaddr)
    except OSError as exc:
        return exc.errno == errno.EADDRNOTAVAIL
    finally:
        probe.close()
    return False


def bind(link: Link) -> Listener:
    """Bind and listen, or raise ConfigError naming the link and what went wrong."""
    try:
        sock = listen_tcp(link.bind, link.port)
    except ConfigError as exc:
        raise type(exc)(f"{exc} (for {link.name})") from None
    sock.setblocking(False)
    return Listener(link, sock, sock.getsockname()[1])


# A listening socket's bound address, to match a socket handed over (serve --take-over)
# with a link: (family, the address packed, port, IPv6 scope id).
BoundAddress = tuple[int, bytes, int, int]


def address_key(host: str, port: int) -> BoundAddress:
    """The BoundAddress a socket bound to `host` (an address, perhaps with a zone) and
    `port` has; ConfigError for a zone that names no interface here."""
    address, _, zone = host.partition("%")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    scope = zone_scope(host, f"cannot listen on {join_host_port(host, port)}") if zone else 0
    return int(family), socket.inet_pton(family, address), port, scope


def bound_address(sock: socket.socket) -> BoundAddress | None:
    """Where `sock` listens, None for anything but a listening TCP socket."""
    try:
        if (sock.type != socket.SOCK_STREAM
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            return None
        name = sock.getsockname()
        if sock.family == socket.AF_INET6:
            return (int(sock.family), socket.inet_pton(socket.AF_INET6, name[0].partition("%")[0]),
                    name[1], name[3])
        if sock.family == socket.AF_INET:
            return int(sock.family), socket.inet_pton(socket.AF_INET, name[0]), name[1], 0
    except OSError:
        pass
    return None


def bind_all(links: Iterable[Link],
             handed: dict[BoundAddress, socket.socket] | None = None,
             handed_by: str = "",
             kernel_ports: dict[str, BoundAddress] | None = None) -> list[Listener]:
    """Every link or none: on the first failure the ones already bound are closed.

    `handed`: listening sockets another supervisor handed over (serve --take-over), by
    their bound address: a link with a port of its own and that address takes its socket
    rather than binding one, listening again with our backlog. Those stay the caller's to
    close on failure (closed, never shut down: the supervisor that handed them still serves
    on them until it is told to stop). `handed_by` names that supervisor, for the error
    of a link that moves a handed port to another address (moved_port). `kernel_ports`:
    where that supervisor's links of port 0 listen, by link name: the same link here (port
    0, the same address) takes that socket, and so keeps the port the kernel chose there,
    as a reload keeps it, rather than closing it on the clients that learned it."""
    handed = handed or {}
    links = list(links)
    bound: list[Listener] = []
    try:
        # A port named here is that link's, even where the kernel chose it there.
        named = {address_key(link.bind, link.port) for link in links if link.port}
        for link in links:
            if link.port:
                port, sock = link.port, handed.get(address_key(link.bind, link.port))
            else:
                chosen = (kernel_ports or {}).get(link.name)
                port, sock = (chosen[2], handed.get(chosen)) if chosen is not None and (
                    chosen not in named and address_key(link.bind, chosen[2]) == chosen
                ) else (0, None)
            if sock is None:
                try:
                    bound.append(bind(link))
                except AddressInUse as exc:
                    held = [address for address in handed
                            if address[2] == link.port and _overlap(address, link.bind)]
                    if not held:
                        raise  # another program's, as the message says
                    raise ConfigError(moved_port(link, held[0], handed_by)) from exc
                continue
            try:
                sock.listen(BACKLOG)
                sock.setblocking(False)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {link.describe()} again: "
                                  f"{exc.strerror or exc}") from None
            adopted = Listener(link, sock, port)
            adopted.drops()  # counted from now: what the kernel counted before is not ours
            adopted.drops_read = 0
            bound.append(adopted)
    except BaseException:
        # ConfigError, or OSError from socket() (EMFILE, ENFILE): a socket left bound
        # here would listen with nobody accepting, its clients hanging in its backlog.
        close_all(listener for listener in bound if listener.sock not in handed.values())
        raise
    return bound


def moved_port(link: Link, held: BoundAddress, handed_by: str) -> str:
    """The error of a take-over whose configuration listens on a port of the supervisor
    taken over at another address that overlaps its (0.0.0.0:P there, 127.0.0.1:P here):
    the handed socket holds the port, and only closing it frees it, which a take-over
    never does (no client refused). What holds it, and the two ways on."""
    there = join_host_port(_host_of(held), held[2])
    return (f"cannot listen on {join_host_port(link.bind, link.port)} (for {link.name}): "
            f"{handed_by} listens on {there}, and serves on; a take-over cannot move a port "
            f"to another address, which closes it for a moment (clients refused): keep "
            f"{there} in this configuration, or stop that supervisor first and start this "
            f"one without --take-over")


def _host_of(address: BoundAddress) -> str:
    return socket.inet_ntop(address[0], address[1])


def _overlap(held: BoundAddress, host: str) -> bool:
    """Whether a socket listening at `held` keeps one at `host` (same port) from
    listening: the same address, or either of them every address of its family (`::`,
    as forkproxy binds it, every IPv4 one too)."""
    there, here = _host_of(held), host.partition("%")[0]
    if "::" in (there, here):
        return True
    if (":" in there) != (":" in here):
        return False
    return there in ("0.0.0.0", here) or here == "0.0.0.0"


def close_all(listeners: Iterable[Listener]) -> None:
    """Stop listening on each (stop_listening)."""
    for listener in listeners:
        stop_listening(listener.sock)


def stop_listening(sock: socket.socket) -> None:
    """Stop listening, for every process that holds a copy, then close ours.

    close() alone ends only our reference: a child forked a moment ago keeps the port
    listening until it first runs and drops what it inherited, which on a loaded machine
    can be a while, and a client that got in meanwhile is reset rather than refused.
    shutdown() acts on the socket itself, not on our descriptor (Linux).
    """
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not listening (ENOTCONN): close() is all there is to do
    sock.close()


def reconcile(
    old: list[Listener], links: Iterable[Link], prepare: Callable[[list[Listener]], None]
) -> tuple[list[Listener], list[Listener], list[Listener]]:
    """Work out a reload: returns (kept+new listeners, newly bound, to close).

    A listener whose address is unchanged keeps its socket (clients in its backlog are
    not dropped) and takes the new link, whatever its target, and a net.core.somaxconn
    raised since it listened (take_up_backlog). New addresses are bound,
    then given to `prepare`, all-or-nothing: on failure nothing has changed (the new
    sockets are closed, no kept listener has its new link yet) and the error is raised.
    """
    by_key = {listener.link.key: listener for listener in old}
    wanted = list(links)
    fresh = bind_all(link for link in wanted if link.key not in by_key)
    try:
        prepare(fresh)
    except BaseException:
        close_all(fresh)
        raise
    fresh_iter = iter(fresh)
    result: list[Listener] = []
    kept: set[int] = set()
    for link in wanted:
        known = by_key.get(link.key)
        if known is None:
            result.append(next(fresh_iter))
        else:
            known.link = link
            known.take_up_backlog()
            kept.add(id(known))
            result.append(known)
    retired = [listener for listener in old if id(listener) not in kept]
    return result, fresh, retired
