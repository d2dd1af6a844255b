"""What each child is and what it cost: the supervisor's table of children, per-link totals
that outlive them, and the shared-memory slots the children count their bytes in.

Lean on purpose (imported into the forking process). Live memory and CPU readings come
from psutil in the processes that *read* this table (`forkproxy status`, the metrics
process), never here: psutil imports threading, and `Process.wait()` would steal exit
statuses from the reaper. Exited children's CPU time comes from `os.wait4`'s rusage.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import time

from .config import Link, peer_text, this_host_reason

# Per slot: bytes client->upstream, bytes upstream->client, and (at ENDED) when the child
# ended (time.monotonic_ns(); 0 until it has, and for ever if it was killed or crashed).
# Then what a child tells the supervisor of a failed connect, for the lines the supervisor
# writes folded (connect-failed, connect-fallback; the child writes them with note_failure
# and note_fallback, the supervisor reads them with failure_text and fallback_addresses,
# below): at FAILURE, the error's code and flags (0: none); for a fallback, the failed and
# the connected address (128 bits each, two words) and their scopes (SCOPES). Written only
# on those paths, once.
FIELDS = 9
ENDED = 2
FAILURE = 3
FAILED_ADDRESS = 4
CONNECTED_ADDRESS = 6
SCOPES = 8
_ZEROED_SLOT = memoryview(bytes(8 * FIELDS)).cast("Q")


def read_clocks() -> tuple[float, float]:
    """The monotonic clock now, and the wall clock's lead over it now: what turns a
    monotonic time into Unix time as the wall clock reads at this moment.

    Durations are the monotonic clock's (a wall clock stepped by NTP or by hand made
    them negative, or a year long); the times of day a reply gives for them are derived
    from one such reading, all of them, so that they agree with each other (a connection
    never before its supervisor) and with the reply's durations, whatever the wall clock
    did meanwhile."""
    now = time.monotonic()
    return now, time.time() - now


# Connection duration histogram buckets, seconds (Prometheus `le` bounds).
DURATION_BUCKETS = (0.005, 0.05, 0.25, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)

# The FAILURE word: the low 18 bits are an errno, or NO_ADDRESS, or UNRESOLVED with the
# negated getaddrinfo code (failure_text). The flags above them: FELL_BACK marks a
# fallback (its addresses in the slot, IPv6 ones flagged), COUNTED one the supervisor has
# counted while the child lives on.
_CODE = 0x3FFFF
NO_ADDRESS = 0x10000
UNRESOLVED = 0x20000
FELL_BACK = 1 << 20
COUNTED = 1 << 21
_FAILED_V6 = 1 << 22
_CONNECTED_V6 = 1 << 23
_LOW_64 = (1 << 64) - 1
# Above the flags, a child's own lookup of its target's name that failed or was given up
# (relay.connect_upstream), told beside the connect's error: OWN_LOOKUP, then the lookup's
# negated getaddrinfo code (0: timed out, unanswered after --connect-timeout) from
# bit 32, and how long it had run, in milliseconds, from bit 40 (at most ~4.6 hours).
OWN_LOOKUP = 1 << 24
# A connect refused as a loop (relay.LOOP_ERRNO) with the address refused left at
# FAILED_ADDRESS (note_loop; _FAILED_V6 and SCOPES as for a fallback): what the
# `connect-failed` line names as this host's, as the supervisor's own loop lines do.
LOOPED = 1 << 25
# A failed connect with the last address tried left at FAILED_ADDRESS (note_failure's
# `sockaddr`; _FAILED_V6 and SCOPES as for a loop): the `address` the `connect-failed`
# line of a name's target names, which of its addresses said `error` (an old one the
# name no longer gives, one of several).
FAILED_AT = 1 << 26
_LOOKUP_GAI_SHIFT, _LOOKUP_MS_SHIFT = 32, 40
_LOOKUP_BITS = OWN_LOOKUP | (_LOW_64 ^ ((1 << _LOOKUP_GAI_SHIFT) - 1))
_MAX_LOOKUP_MS = (1 << (64 - _LOOKUP_MS_SHIFT)) - 1
AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
SYSTEM_ERROR = "System error"  # gai_strerror(EAI_SYSTEM)
# glibc's gai_strerror for the codes a lookup gives (Python has no call for it): the
# supervisor writes a child's failed lookup from its code alone. Under another libc (musl,
# in an Alpine image) connect-failed says glibc's words all the same, where the
# supervisor's own resolve-failed lines, from the lookup's exception, say that libc's
# ("Name does not resolve" for EAI_NONAME): the codes are the same, and the line says
# which failure it was either way.
_GAI_TEXTS = {
    getattr(socket, name): text
    for name, text in (
        ("EAI_NONAME", "Name or service not known"),
        ("EAI_AGAIN", "Temporary failure in name resolution"),
        ("EAI_FAIL", "Non-recoverable failure in name resolution"),
        ("EAI_NODATA", "No address associated with hostname"),
        ("EAI_ADDRFAMILY", "Address family for hostname not supported"),
        ("EAI_MEMORY", "Memory allocation failure"),
        ("EAI_SYSTEM", SYSTEM_ERROR),
    )
    if hasattr(socket, name)
}


def note_failure(counters: memoryview, base: int, error: OSError,
                 sockaddr: tuple[object, ...] | None = None) -> None:
    """Leave a failed connect's error in the child's slot (its FAILURE word), from which
    the supervisor writes the folded `connect-failed` line at the reap (failure_text),
    and the last address tried (`sockaddr`, None when none was), which noted_address
    reads back."""
    word = (error.errno or errno.EIO) & (_CODE | _LOOKUP_BITS)
    if sockaddr is not None:
        word |= FAILED_AT | _note_address(counters, base, sockaddr)
    counters[base + FAILURE] = word


def note_loop(counters: memoryview, base: int, error: OSError,
              sockaddr: tuple[object, ...]) -> None:
    """note_failure for a connect refused as a loop, with the address refused (`sockaddr`),
    which noted_address reads back. A failed connect's path only."""
    word = LOOPED | ((error.errno or errno.EIO) & _CODE) | _note_address(counters, base, sockaddr)
    counters[base + FAILURE] = word


def _note_address(counters: memoryview, base: int, sockaddr: tuple[object, ...]) -> int:
    """Put `sockaddr`'s address at FAILED_ADDRESS (and its scope at SCOPES); the FAILURE
    word's flag for an IPv6 one, which the caller writes last."""
    host = str(sockaddr[0]).partition("%")[0]
    if len(sockaddr) > 2:
        number = int.from_bytes(socket.inet_pton(AF_INET6, host))
        counters[base + SCOPES] = int(sockaddr[3]) & 0xFFFFFFFF  # type: ignore[call-overload]
        v6 = _FAILED_V6
    else:
        number = int.from_bytes(socket.inet_pton(AF_INET, host))
        v6 = 0
    counters[base + FAILED_ADDRESS] = number >> 64
    counters[base + FAILED_ADDRESS + 1] = number & _LOW_64
    return v6


def noted_address(counters: memoryview, base: int, word: int) -> str:
    """The address a child refused as a loop (note_loop), or tried last before its connect
    failed (note_failure), as text: `127.0.0.1`, `::1`, `fe80::1%eth0` (the scope's
    interface, as a target names it; its index where that interface is gone)."""
    number = counters[base + FAILED_ADDRESS] << 64 | counters[base + FAILED_ADDRESS + 1]
    if not word & _FAILED_V6:
        return socket.inet_ntop(AF_INET, number.to_bytes(4))
    scope = counters[base + SCOPES] & 0xFFFFFFFF
    host = socket.inet_ntop(AF_INET6, number.to_bytes(16))
    if not scope:
        return host
    try:  # a failed connect's line only: one ioctl
        return f"{host}%{socket.if_indextoname(scope)}"
    except OSError:
        return f"{host}%{scope}"


def own_lookup_failed(code: int, gai: int, seconds: float) -> int:
    """The word of a connect whose error has `code` (an errno, or 0: no connect was tried)
    and after which the child's own lookup failed with getaddrinfo's `gai` (0: it timed
    out) after `seconds`: what failure_text tells of both."""
    if not code & _CODE or code & UNRESOLVED:
        code = UNRESOLVED | (-gai & 0xFFFF)  # the lookup alone failed (an earlier one too)
    milliseconds = min(round(seconds * 1000), _MAX_LOOKUP_MS)
    return ((code & _CODE) | OWN_LOOKUP | (-gai & 0xFF) << _LOOKUP_GAI_SHIFT
            | milliseconds << _LOOKUP_MS_SHIFT)


def failure_text(code: int, host: str, looped: str | None = None) -> str:
    """The `error` text of a FAILURE word's code (see _CODE): what the child's OSError
    said, and what its own lookup, if it failed, did (own_lookup_failed). `looped`: the
    address a loop was refused at (noted_address), named with why it is this host's."""
    if code & OWN_LOOKUP:
        gai = -(code >> _LOOKUP_GAI_SHIFT & 0xFF)
        seconds = f"{(code >> _LOOKUP_MS_SHIFT) / 1000:g} s"
        lookup = (f"cannot resolve {host}: " + (
            f"{_GAI_TEXTS.get(gai, f'lookup error {gai}')} (after {seconds})" if gai
            else f"lookup timed out after {seconds}"))
        code &= _CODE
        if code & UNRESOLVED:
            return lookup  # no connect was tried: the supervisor had no address yet
        return f"{failure_text(code, host)}, then {lookup}"
    code &= _CODE
    if code == NO_ADDRESS:
        return "no address"
    if code == errno.ELOOP:  # relay.LOOP_ERRNO: no connect() gives it
        # In the words of the supervisor's loop lines (config._this_host): `vm (127.0.0.1)
        # is this host (in a container, ...)`, `redis (198.18.0.1) is an address this
        # proxy listens on`; the address alone where the target is that address.
        why = (f"{host} is this host" if looped is None else this_host_reason(
            [looped], {looped: looped if _same_address(host, looped) else f"{host} ({looped})"}))
        return (f"connects back to this proxy: {why}, on a port it listens on; every client "
                "would take a child per hop until none is left: name the server's host")
    if code & UNRESOLVED:
        gai = -(code & 0xFFFF)
        return f"cannot resolve {host}: {_GAI_TEXTS.get(gai, f'lookup error {gai}')}"
    return os.strerror(code)


# connect-fallback's failed_error for an address refused as a loop: no hop was made, and
# the connection went on through the next address; failure_text's words ("every client
# would take a child per hop") read as the outage that did not happen.
LOOP_SKIPPED = ("refused as a loop and skipped: it connects back to this proxy (an address "
                "of this host, on a port it listens on); the connection went on to the next "
                "address")


def fallback_error(word: int, host: str) -> str:
    """The `failed_error` of a FELL_BACK word (note_fallback): failure_text's, but for an
    address skipped as a loop (LOOP_SKIPPED), which is no failure."""
    if not word & OWN_LOOKUP and word & _CODE == errno.ELOOP:  # relay.LOOP_ERRNO
        return LOOP_SKIPPED
    return failure_text(word, host)


def _same_address(host: str, address: str) -> bool:
    """Is the target `host` the very `address` (as inet_ntop writes it), not a name?"""
    host = host.partition("%")[0]
    try:
        family = AF_INET6 if ":" in host else AF_INET
        return socket.inet_ntop(family, socket.inet_pton(family, host)) == address.partition(
            "%")[0]
    except OSError:
        return False


def failure_errno(code: int) -> int:
    """The errno of a FAILURE word's failed connect; 0 when no connect failed (a lookup)."""
    code &= _CODE
    return 0 if code & (NO_ADDRESS | UNRESOLVED) else code


# Why no address took a connection, as forkproxy_upstream_connect_failures_total{reason}
# and status's upstream_failures_by_reason tell it: an "upstream down" alert must not fire
# for this host's own trouble (no-local-port: out of ephemeral ports toward the upstream,
# TIME_WAIT; blocked: a policy here refused the connect itself), and a refusal (the
# service is down) is not a timeout (the network, a host gone) nor a name that does not
# resolve. A fixed few, each exported from 0.
FAILURE_REASONS = ("refused", "timeout", "unreachable", "unresolved", "no-local-port",
                   "blocked", "loop", "other")
_REASON_OF_ERRNO = {
    errno.ECONNREFUSED: "refused",
    errno.ETIMEDOUT: "timeout",
    # The kernel's word that there is no way there: an ICMP unreachable, no route, an
    # unanswered ARP, a link down.
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.EHOSTDOWN: "unreachable",
    errno.ENETDOWN: "unreachable",
    errno.ENONET: "unreachable",
    # A blackhole route to the upstream (a network plugin's for addresses no container
    # holds now): connect() fails EINVAL, no packet sent. So does a link-local IPv6
    # address without its interface (a name's: config refuses such a literal), which has
    # no route either.
    errno.EINVAL: "unreachable",
    # Out of local ports toward the upstream; or no address of this host's to send to it
    # from at all (IPv6 disabled, for an IPv6 upstream), which is no way there: the
    # supervisor tells the two apart at the reap (listeners.no_source_address) and counts
    # that one `unreachable`.
    errno.EADDRNOTAVAIL: "no-local-port",
    # connect() itself refused on this host, no packet sent: a cgroup BPF connect hook
    # (EPERM), seccomp, an LSM (Landlock, SELinux, AppArmor: EACCES), a prohibit route to
    # the upstream (EACCES: the routing policy of this host's). Not a firewall
    # rule that drops the SYN: TCP retries that one and it ends as a timeout.
    errno.EPERM: "blocked",
    errno.EACCES: "blocked",
    # Not a connect's error: the child refused an address that connects back into the
    # proxy's own listeners (relay.LOOP_ERRNO), a loop no upstream is behind.
    errno.ELOOP: "loop",
}


def failure_reason(code: int) -> str:
    """The reason (FAILURE_REASONS) of a failed connect's FAILURE word.

    The word holds one error: the last connect's, after every address and retry failed
    (relay.connect_upstream keeps the last, and the `connect-failed` line says that one,
    so the label and the line agree), passing over another address this host has no way
    to (not out of local ports) after an earlier one failed otherwise (a name's AAAA
    without IPv6 here, its A refused: `refused`). The last is the upstream's state at
    the end, when the client was given up on: a service whose host went away mid-retries
    (refused, then timed out) is counted as the host gone. When a connect was tried and
    the child's own lookup of the name then failed too, the connect's error is the
    reason: it is what the addresses in use said, and failed lookups have their own
    counter (forkproxy_resolve_failures_total, the supervisor's). `unresolved` is for a
    failure with no connect tried: the name gave no address."""
    code = failure_errno(code)
    return _REASON_OF_ERRNO.get(code, "other") if code else "unresolved"


def note_fallback(counters: memoryview, base: int, connected: tuple[object, ...],
                  failed: tuple[object, ...], error: OSError) -> None:
    """Leave a fallback in the child's slot for the supervisor, which writes the folded
    `connect-fallback` line (fallback_addresses reads it back). The FAILURE word last:
    the supervisor reads the addresses once it sees that."""
    word = FELL_BACK | ((error.errno or errno.EIO) & _CODE)
    scopes = 0
    for index, (sockaddr, v6) in enumerate(((failed, _FAILED_V6), (connected, _CONNECTED_V6))):
        host = str(sockaddr[0]).partition("%")[0]  # a scope is its index, below
        if len(sockaddr) > 2:
            number = int.from_bytes(socket.inet_pton(AF_INET6, host))
            scopes |= (int(sockaddr[3]) & 0xFFFFFFFF) << (32 * index)  # type: ignore[call-overload]
            word |= v6
        else:
            number = int.from_bytes(socket.inet_pton(AF_INET, host))
        at = base + (FAILED_ADDRESS, CONNECTED_ADDRESS)[index]
        counters[at], counters[at + 1] = number >> 64, number & _LOW_64
    counters[base + SCOPES] = scopes
    counters[base + FAILURE] = word


def fallback_addresses(counters: memoryview, base: int, word: int,
                       port: int) -> tuple[str, str]:
    """The connected and the failed address a child left in its slot (note_fallback), as
    text: every address of a link's target has the target's port."""
    texts = []
    for index, v6 in enumerate((_CONNECTED_V6, _FAILED_V6)):
        at = base + (CONNECTED_ADDRESS, FAILED_ADDRESS)[index]
        number = counters[at] << 64 | counters[at + 1]
        if word & v6:
            host = socket.inet_ntop(AF_INET6, number.to_bytes(16))
            scope = counters[base + SCOPES] >> (32 * (1 - index)) & 0xFFFFFFFF
            texts.append(peer_text((host, port, 0, scope)))
        else:
            texts.append(peer_text((socket.inet_ntop(AF_INET, number.to_bytes(4)), port)))
    return texts[0], texts[1]


class Slots:
    """Anonymous shared memory: each live child owns FIELDS uint64 counters.

    A child adds to its counters as bytes move (no system call per message); the
    supervisor reads them for status at any time and for the totals after the reap.

    Handing out a slot is `free.pop()`, written out in the supervisor's accept loop (with
    `refill()` when the list runs dry): between two forks every page written is copied,
    and a method call there (its frame, the instance's attributes, a counter reset) wrote
    ~7 pages per fork where a pop writes one (docs/benchmarks.md). So a slot is zeroed
    when it is released, not when it is taken, and never-used slots are zero already.
    """

    REFILL = 64  # never-used slots added to the free list at a time

    def __init__(self, count: int) -> None:
        # Anonymous pages are only backed once touched, so a large --max-children costs
        # address space, not memory; the free list grows with use, not with the cap.
        self._mem = mmap.mmap(-1, count * FIELDS * 8)
        self.counters = memoryview(self._mem).cast("Q")
        self.free: list[int] = []  # zeroed slots ready to hand out, the next one last
        self._next = 0  # slots below this have been handed out at least once
        self._end = count * FIELDS

    def refill(self) -> bool:
        """Add up to REFILL never-used slots to `free`; False when none are left."""
        if self._next >= self._end:
            return False
        stop = min(self._end, self._next + self.REFILL * FIELDS)
        self.free.extend(range(stop - FIELDS, self._next - 1, -FIELDS))  # lowest popped first
        self._next = stop
        return True

    def copy(self) -> memoryview:
        """The counters of every slot handed out so far, as they are now, in memory of our
        own: a reporter forked to answer `status` reads these, not the live ones, which
        the supervisor goes on changing (a reaped child's bytes move from its slot, which
        is zeroed, into totals the reporter's copy of the heap never sees)."""
        return memoryview(self._mem[: self._next * 8]).cast("Q")

    def release(self, base: int) -> None:
        self.counters[base:base + FIELDS] = _ZEROED_SLOT
        self.free.append(base)

    def __len__(self) -> int:
        return len(self.free) + (self._end - self._next) // FIELDS


class LinkStats:
    """Totals for one link name; they survive its children, and reloads that keep the name
    (a reload that drops it drops them too, with its last live child: `Accounting.retire`).

    Live children are counted in `snapshot()` only (`connections` and `active` there
    include them): the fork path records the child in `Accounting.children` and nothing
    else (Supervisor._accept_handler). A plain class, not a dataclass (see config.Value);
    `vars()` gives the totals as a dict, in this order.
    """

    def __init__(self) -> None:
        # When these totals began (wall clock): a link a reload removes and another
        # configures again is a new link, its totals from 0, and this tells the two apart.
        self.since = time.time()
        self.connections = 0  # children reaped
        self.upstream_failures = 0
        # The same, by why (failure_reason), every reason there from 0.
        self.upstream_failures_by_reason = dict.fromkeys(FAILURE_REASONS, 0)
        self.denied = 0
        self.bytes_up = 0
        self.bytes_down = 0
        # Ended with no byte moved either way, by anything but a failed connect (that is
        # an upstream_failure), a kill or a crash (`killed`, `failed`: see finished()): a
        # health check's connect-and-close (a tcpSocket probe, `nc -z`), a scanner's
        # connect, and a client that reset while its child still connected (no upstream
        # connection then: relay._client_left). Real traffic all but always moves one.
        self.empty = 0
        self.cpu_seconds = 0.0
        self.outcomes: dict[str, int] = {}
        self.duration_buckets = [0] * len(DURATION_BUCKETS)
        self.duration_count = 0
        self.duration_sum = 0.0
        self.resolve_failures = 0  # lookups of the target's name that failed
        self.address_changes = 0  # lookups that gave new addresses (after the first)
        # Forks for a client that failed (a pids limit, no memory): each held client's
        # every try, as the supervisor's fork-failed lines count them.
        self.fork_failures = 0


# A live child as the supervisor's accept loop records it, keyed by its pid in
# `Accounting.children`: (link, client sockaddr, slot base, start on the monotonic clock).
# A plain tuple, built there without a call: that loop runs between two forks, where each
# page written is a page copied, and kept by the child forked before (docs/benchmarks.md).
ChildRecord = tuple[Link, tuple[object, ...], int, float]


def describe_status(status: int, sent_kill: bool = False) -> str:
    """A wait status in words, as gunicorn logs it. `sent_kill`: the supervisor itself
    sent this process SIGKILL (a stop past its grace), so a death by it is no hint of
    the OOM killer, the usual sender of a SIGKILL nobody asked for."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig != signal.SIGKILL:
            hint = ""
        elif sent_kill:
            hint = " (sent by the stop)"
        else:
            hint = " (perhaps out of memory)"
        return f"killed by {name}{hint}"
    return f"exit status {os.WEXITSTATUS(status)}"


class Accounting:
    def __init__(self, slots: int, outcome_names: dict[int, str]) -> None:
        self.slots = Slots(slots)
        self.children: dict[int, ChildRecord] = {}
        self.links: dict[str, LinkStats] = {}
        # Links a reload removed that still have live children: name -> how many. A count
        # rather than a scan of `children` on every reap (see retire and finished).
        self.retiring: dict[str, int] = {}
        self.outcome_names = outcome_names
        self.orphans_reaped = 0
        # Connections of links whose totals a reload dropped (retire): counted here when
        # dropped, not on each reap, for connections_total.
        self.retired_connections = 0

    def connections_total(self) -> int:
        """Connections reaped since start, on every link, those a reload removed too."""
        return self.retired_connections + sum(stats.connections
                                              for stats in self.links.values())

    def stats(self, link: Link) -> LinkStats:
        stats = self.links.get(link.name)
        if stats is None:
            stats = self.links[link.name] = LinkStats()
        return stats

    def denied(self, link: Link) -> None:
        self.stats(link).denied += 1

    def fork_failed(self, link: Link) -> None:
        self.stats(link).fork_failures += 1

    def retire(self, configured: set[str], held: dict[str, int] | None = None) -> None:
        """After a reload: forget the totals of the links not in `configured` (names), at
        once when they have no live child, else when their last one is reaped. `held`:
        clients per link name accepted and waiting for a fork (a failed one): each is a
        child to come, reaped like the others. A reload only; not the fork path, which
        never sees a link that is not configured."""
        live: dict[str, int] = dict(held or {})
        for link, _, _, _ in self.children.values():
            live[link.name] = live.get(link.name, 0) + 1
        # From scratch: a name configured again before its last child exited stays.
        self.retiring = {}
        for name in list(self.links):
            if name in configured:
                continue
            if name in live:
                self.retiring[name] = live[name]
            else:
                self.retired_connections += self.links.pop(name).connections

    def finished(self, pid: int, status: int, cpu_seconds: float,
                 reason: str | None = None) -> ChildRecord | None:
        """Fold a reaped child into its link's totals; None when it was not ours.
        `reason`: a failed connect's reason as the caller found it on this host, where its
        FAILURE word's error alone misleads (failure_reason's otherwise)."""
        record = self.children.pop(pid, None)
        if record is None:
            self.orphans_reaped += 1
            return None
        link, _, base, started = record
        name = link.name
        # A removed link's totals are still here (retire() keeps them while it has live
        # children), so stats() finds them rather than bringing a stale entry back.
        stats = self.links.get(name) or self.stats(link)  # no call when it is there
        counters = self.slots.counters
        up, down = counters[base], counters[base + 1]
        stats.connections += 1
        stats.bytes_up += up
        stats.bytes_down += down
        stats.cpu_seconds += cpu_seconds
        if os.WIFEXITED(status):
            outcome = self.outcome_names.get(os.WEXITSTATUS(status), "failed")
        else:
            outcome = "killed"
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        if outcome == "connect-failed":
            stats.upstream_failures += 1
            # Classified here, at the reap, from the word the child left: not in the child,
            # whose every write copies a page, nor in the accept loop.
            if reason is None:
                reason = failure_reason(counters[base + FAILURE])
            stats.upstream_failures_by_reason[reason] += 1
        elif not (up or down) and outcome != "killed" and outcome != "failed":
            # A probe. Not a killed or crashed child: its upstream may never have connected.
            stats.empty += 1
        # The child's own end when it wrote one, not the reap's time: a supervisor frozen
        # for 10 s (docker pause) had every connection of that time last 10 s longer.
        ended = counters[base + ENDED]
        duration = (ended / 1e9 if ended else time.monotonic()) - started
        stats.duration_count += 1
        stats.duration_sum += duration
        # Counted along, not enumerate(): no iterator and no tuple per bucket passed.
        index = 0
        for bound in DURATION_BUCKETS:
            if duration <= bound:
                stats.duration_buckets[index] += 1
                break
            index += 1  # noqa: SIM113 (enumerate is what this saves)
        self.slots.release(base)
        if name in self.retiring:  # the reap path's one lookup more
            self._retire_one(name)
        return record

    def held_gone(self, link: Link) -> None:
        """A client held for a child (see retire) reset and was closed unserved: no child
        will come for it, so a removed link whose last one it was goes now."""
        if link.name in self.retiring:
            self._retire_one(link.name)

    def _retire_one(self, name: str) -> None:
        """One of a removed link's connections to come is over: the link goes with its
        last one."""
        left = self.retiring[name]
        if left > 1:
            self.retiring[name] = left - 1
        else:
            del self.retiring[name]
            self.retired_connections += self.links.pop(name).connections

    def snapshot(self, waiting: dict[str, int] | None = None,
                 counters: memoryview | None = None,
                 clocks: tuple[float, float] | None = None) -> dict[str, object]:
        """Plain data for the control socket (JSON). `waiting`: per link name, the clients
        accepted and waiting for a child (a failed fork, a stop at --max-children).
        `counters`: the slots' counters as copied when this heap was (Slots.copy), in a
        forked reporter; the live ones by default. `clocks`: read_clocks() of the rest of
        the reply, so that its times and these are of one reading; read here by default."""
        now, wall = read_clocks() if clocks is None else clocks
        if counters is None:
            counters = self.slots.counters
        waiting = waiting or {}
        links = {name: {**vars(stats), "active": 0, "waiting": waiting.get(name, 0)}
                 for name, stats in self.links.items()}
        children = []
        for pid, (link, client, base, started) in self.children.items():
            # Live connections and their bytes count in the totals too.
            totals = links.setdefault(link.name, {**vars(LinkStats()), "active": 0,
                                                  "waiting": waiting.get(link.name, 0)})
            totals["connections"] += 1
            totals["active"] += 1
            totals["bytes_up"] += counters[base]
            totals["bytes_down"] += counters[base + 1]
            children.append(
                {
                    "pid": pid,
                    "link": link.name,
                    "client": peer_text(client),
                    "upstream": str(link.target),
                    "started": wall + started,
                    "age": now - started,
                    "bytes_up": counters[base],
                    "bytes_down": counters[base + 1],
                }
            )
        return {
            "links": links,
            "children": children,
            "duration_buckets": list(DURATION_BUCKETS),
            "orphans_reaped": self.orphans_reaped,
        }


def ended_text(outcomes: dict[str, int]) -> str:
    """How a link's connections ended, most frequent first: `closed 1204, client-reset 3`
    (status's ENDED column and SIGUSR1's `ended` field); `-` for none yet."""
    ranked = sorted(outcomes.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{outcome} {count}" for outcome, count in ranked if count) or "-"
