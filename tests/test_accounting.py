"""The children's counter slots: handed out zeroed, lowest first, never more than made;
and how a reaped child's exit status becomes its outcome."""

from __future__ import annotations

import errno
import socket

import pytest

from forkproxy import relay
from forkproxy.accounting import (
    DURATION_BUCKETS,
    ENDED,
    FAILURE,
    FIELDS,
    LOOPED,
    NO_ADDRESS,
    UNRESOLVED,
    Accounting,
    Slots,
    ended_text,
    failure_reason,
    failure_text,
    note_loop,
    noted_address,
    own_lookup_failed,
)
from forkproxy.config import Endpoint, Link


def take(slots: Slots) -> int:
    """A slot handed out as the supervisor's accept loop does it, written out there (see
    Slots): refill the free list when it is empty, pop; IndexError when none is left."""
    if not slots.free:
        slots.refill()
    return slots.free.pop()


def test_slots_are_zeroed_when_released_and_reused_last_in_first_out() -> None:
    slots = Slots(3)
    first, second = take(slots), take(slots)
    assert (first, second) == (0, FIELDS)  # lowest first, FIELDS counters apart
    slots.counters[first] = 123
    slots.counters[first + 1] = 456
    slots.release(first)
    assert (slots.counters[first], slots.counters[first + 1]) == (0, 0)
    assert take(slots) == first
    assert len(slots) == 1


def test_slots_run_out_after_count_and_come_back() -> None:
    count = Slots.REFILL + 3  # more than one refill
    slots = Slots(count)
    taken = [take(slots) for _ in range(count)]
    assert taken == [i * FIELDS for i in range(count)]
    assert len(slots) == 0
    assert not slots.refill()
    with pytest.raises(IndexError):
        take(slots)
    slots.release(taken[5])
    assert take(slots) == taken[5]


LOOP_END = ("on a port it listens on; every client would take a child per hop until none "
            "is left: name the server's host")


@pytest.mark.parametrize(
    ("host", "sockaddr", "said"),
    [
        # A name: said with the address it gave, and why that one is this host's, in the
        # supervisor's words (config._this_host); it said "vm is this host" for them all.
        ("vm", ("127.0.1.1", 6379), "vm (127.0.1.1) is this host (in a container, the "
         "container itself)"),
        ("redis", ("198.18.0.1", 6379), "redis (198.18.0.1) is an address this proxy "
         "listens on"),
        ("any.test", ("0.0.0.0", 6379), "any.test (0.0.0.0) connects to this host (in a "
         "container, the container itself)"),
        ("self.test", ("fd00::1", 6379, 0, 0), "self.test (fd00::1) is an address this "
         "proxy listens on"),
        # A link-local address: its scope by the interface's name, as a target writes it
        # (it said `%1`); by its index where no interface has it (gone since).
        ("ll.test", ("fe80::1", 6379, 0, socket.if_nametoindex("lo")), "ll.test (fe80::1%lo) "
         "is an address this proxy listens on"),
        ("ll.test", ("fe80::1", 6379, 0, 999_999), "ll.test (fe80::1%999999) is an address "
         "this proxy listens on"),
        # An address target: the address once.
        ("198.18.0.1", ("198.18.0.1", 6379), "198.18.0.1 is an address this proxy listens on"),
        ("::1", ("::1", 6379, 0, 0), "::1 is this host (in a container, the container itself)"),
    ],
)
def test_a_loop_refused_is_said_with_its_address(
    host: str, sockaddr: tuple[object, ...], said: str
) -> None:
    """The child leaves the address it refused as a loop in its slot (on that path only),
    and the supervisor's connect-failed line names it and why it is this host's."""
    slots = Slots(1)
    base = take(slots)
    note_loop(slots.counters, base, relay.LoopRefused(sockaddr), sockaddr)
    word = slots.counters[base + FAILURE]
    assert word & LOOPED and failure_reason(word) == "loop"
    looped = noted_address(slots.counters, base, word)
    assert failure_text(word, host, looped) == (
        f"connects back to this proxy: {said}, {LOOP_END}")
    # Without the address (a child's own error text): as before.
    assert failure_text(word, host) == (
        f"connects back to this proxy: {host} is this host, {LOOP_END}")


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (relay.CLOSED, "closed"),
        (relay.UPSTREAM_CLOSED, "upstream-closed"),
        (relay.UPSTREAM_RESET, "upstream-reset"),
        (relay.CLIENT_TIMEOUT, "client-timeout"),
        (relay.UPSTREAM_TIMEOUT, "upstream-timeout"),
        (relay.CONNECT_FAILED, "connect-failed"),
        (99, "failed"),
    ],
)
def test_an_exit_code_is_an_outcome(code: int, outcome: str) -> None:
    accounting = Accounting(4, relay.OUTCOMES)
    link = Link("127.0.0.1", 1, Endpoint("redis", 6379), ("test",))
    base = take(accounting.slots)
    accounting.children[4242] = (link, ("127.0.0.1", 5), base, 0.0)
    assert accounting.finished(4242, code << 8, 0.0) is not None  # a wait status
    assert accounting.stats(link).outcomes == {outcome: 1}
    assert accounting.stats(link).upstream_failures == (outcome == "connect-failed")


def link_named(name: str, port: int) -> Link:
    return Link("127.0.0.1", port, Endpoint("127.0.0.1", 6379), (name,))


def test_a_link_a_reload_removed_goes_with_its_last_connection() -> None:
    """Its totals stay (and count) while its children run, and go with the last one: the
    late reap of a removed link's child used to bring its stale entry back."""
    accounting = Accounting(4, relay.OUTCOMES)
    kept, gone, idle = link_named("kept", 1), link_named("gone", 2), link_named("idle", 3)
    for link in (kept, gone, idle):
        accounting.stats(link)
    accounting.stats(kept).connections = 5
    for pid in (11, 12):
        accounting.children[pid] = (gone, ("127.0.0.1", pid), take(accounting.slots), 0.0)

    accounting.retire({kept.name})
    assert set(accounting.links) == {"kept", "gone"}  # idle had no connection: gone at once
    assert accounting.finished(11, relay.CLOSED << 8, 0.0) is not None
    assert accounting.links["gone"].connections == 1
    snapshot = accounting.snapshot()["links"]
    assert isinstance(snapshot, dict) and snapshot["gone"]["active"] == 1
    accounting.finished(12, relay.CLOSED << 8, 0.0)
    assert set(accounting.links) == {"kept"} and accounting.retiring == {}
    links = accounting.snapshot()["links"]
    assert isinstance(links, dict) and set(links) == {"kept"}
    assert accounting.links["kept"].connections == 5


def test_a_connections_duration_counts_in_the_first_bucket_it_does_not_exceed() -> None:
    """The histogram's buckets are upper bounds (Prometheus' `le`): a duration equal to
    one counts in it; past the last, in none of them but in the count and the sum."""
    accounting = Accounting(8, relay.OUTCOMES)
    link = link_named("db", 1)
    durations = (0.001, 0.005, 0.0051, 1.0, 3600.0, 4000.0)
    for pid, duration in enumerate(durations, start=11):
        base = take(accounting.slots)
        accounting.children[pid] = (link, ("127.0.0.1", pid), base, 0.0)
        accounting.slots.counters[base + ENDED] = round(duration * 1e9)  # its end, in ns
        assert accounting.finished(pid, relay.CLOSED << 8, 0.0) is not None
    stats = accounting.links["db"]
    assert DURATION_BUCKETS[0] == 0.005 and DURATION_BUCKETS[-1] == 3600.0
    assert stats.duration_buckets == [2, 1, 0, 1, 0, 0, 0, 0, 1], stats.duration_buckets
    assert stats.duration_count == len(durations)
    assert stats.duration_sum == pytest.approx(sum(durations))


def test_a_link_configured_again_before_its_last_connection_ends_keeps_its_totals() -> None:
    accounting = Accounting(4, relay.OUTCOMES)
    link = link_named("db", 1)
    accounting.stats(link).connections = 3
    accounting.children[11] = (link, ("127.0.0.1", 11), take(accounting.slots), 0.0)
    accounting.retire(set())  # removed by one reload ...
    accounting.retire({"db"})  # ... and back with the next
    accounting.finished(11, relay.CLOSED << 8, 0.0)
    assert accounting.links["db"].connections == 4


def test_the_connections_total_counts_the_links_a_reload_removed() -> None:
    """`exited`'s total: every connection since start, whether or not its link is still
    configured (a reload drops a removed link's totals, at once or with its last child)."""
    accounting = Accounting(4, relay.OUTCOMES)
    kept, gone, idle = link_named("kept", 1), link_named("gone", 2), link_named("idle", 3)
    accounting.stats(kept).connections = 5
    accounting.stats(idle).connections = 2
    accounting.stats(gone).connections = 3
    accounting.children[11] = (gone, ("127.0.0.1", 11), take(accounting.slots), 0.0)
    assert accounting.connections_total() == 10
    accounting.retire({kept.name})  # idle's totals go now, gone's with its child
    assert "idle" not in accounting.links
    assert accounting.connections_total() == 10
    accounting.finished(11, relay.CLOSED << 8, 0.0)
    assert set(accounting.links) == {"kept"}
    assert accounting.connections_total() == 11


@pytest.mark.parametrize(("word", "reason"), [
    (errno.ECONNREFUSED, "refused"),
    (errno.ETIMEDOUT, "timeout"),
    (errno.EHOSTUNREACH, "unreachable"),
    (errno.ENETUNREACH, "unreachable"),
    (errno.EINVAL, "unreachable"),  # a blackhole route (once `other`)
    (errno.EADDRNOTAVAIL, "no-local-port"),
    (errno.EPERM, "blocked"),  # a cgroup BPF connect hook, seccomp
    (errno.EACCES, "blocked"),  # an LSM: Landlock, SELinux, AppArmor; a prohibit route
    (errno.EAFNOSUPPORT, "other"),
    (relay.LOOP_ERRNO, "loop"),  # an address that connects back into the proxy
    (NO_ADDRESS, "unresolved"),
    (UNRESOLVED | -socket.EAI_NONAME, "unresolved"),
    # The child's own lookup failed, no connect tried: the name gave nothing.
    (own_lookup_failed(0, socket.EAI_NONAME, 0.1), "unresolved"),
    (own_lookup_failed(0, 0, 2.0), "unresolved"),  # it timed out
    # A connect failed, then the lookup did: the connect's error is the reason.
    (own_lookup_failed(errno.ECONNREFUSED, socket.EAI_AGAIN, 0.1), "refused"),
    (own_lookup_failed(errno.EADDRNOTAVAIL, 0, 2.0), "no-local-port"),
])
def test_a_failed_connects_word_is_classified_by_its_connects_error(word: int,
                                                                   reason: str) -> None:
    """forkproxy_upstream_connect_failures_total's `reason`, from the FAILURE word the
    child left (the real network's reasons: test_observability's by_reason test)."""
    assert failure_reason(word) == reason


@pytest.mark.parametrize(("outcomes", "text"), [
    ({"closed": 5, "client-reset": 3, "upstream-reset": 0}, "closed 5, client-reset 3"),
    # Equals by name; an outcome none ended with is not named.
    ({"upstream-reset": 2, "closed": 2, "idle-timeout": 0}, "closed 2, upstream-reset 2"),
    ({"closed": 0}, "-"),
    ({}, "-"),
])
def test_how_a_links_connections_ended_is_most_frequent_first(
    outcomes: dict[str, int], text: str,
) -> None:
    """status's ENDED column and SIGUSR1's `ended` field: the likeliest cause first, and
    no `reset 0` among them."""
    assert ended_text(outcomes) == text
