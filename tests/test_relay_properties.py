"""Property tests of the relay's byte-stream contract, through the real forkproxy, per mode.

Hypothesis writes the script of one connection: what the client and the upstream each
write (1 byte to a few MiB, bursts of tiny writes with or without TCP_NODELAY, writes the
size of the relay's buffers, short pauses), which side shuts its write side first (or
both at once), and how each reads (stalled, then small chunks with pauses: a reader
slower than its writer). The client and the upstream are this test's own sockets; the
connection between them runs through one real `forkproxy serve --relay MODE` per mode.

For every script: each direction delivers exactly the bytes written, in order, and its EOF
only after all of them; the direction still open keeps flowing after the other's EOF; the
close line says whose FIN came first (`closed`: the client's; `upstream-closed`: the
upstream's; either when both shut down at once) with bytes_up and bytes_down equal to
what was written each way, and `forkproxy status` adds the same to the link's totals.

auto mode copies a direction's small messages and switches it to splice once a read fills
its 16 KiB buffer: scripts mix tiny writes with writes of exactly that size and more, so
that switch happens at any point of a stream, with bytes of both kinds in flight, and
about one connection in three meets back-pressure in the proxy (a squeezed receiver: see
scripts()). Not reached from outside: a switch on a read whose write was partial (relay.py
switches only once nothing is pending). The proxy reads again only once its send buffer
has room (POLLOUT), so its first full read always finds room for the whole of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from forkproxy.relay import AUTO_CHUNK, COPY_CHUNK

from conftest import FORKPROXY, control, kill_group, read_lines, wait_for

KiB, MiB = 1 << 10, 1 << 20
WAIT = 30.0  # seconds: the bound of every wait here, generous for a loaded 2-core machine
MAX_STREAM = 6 * MiB  # per direction and script: keeps each example well under a second
CLOSE_LINE = re.compile(r" close .* bytes_up=(\d+) bytes_down=(\d+) .* outcome=(\S+)")

# Under CI every run draws the same scripts (reproducible); elsewhere each run explores new
# ones. No example database: a failure prints its script and a blob to reproduce it. For a
# longer search: RELAY_PROPERTY_EXAMPLES=300 scripts/test tests/test_relay_properties.py
RELAY_SETTINGS = settings(
    max_examples=int(os.environ.get("RELAY_PROPERTY_EXAMPLES", "30")),
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- scripts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One sendall() of `size` fresh bytes."""

    size: int


@dataclass(frozen=True)
class Burst:
    """`count` separate sends of `size` bytes each, back to back (without TCP_NODELAY the
    kernel coalesces them, with it each may go out as its own segment), or `gap_ms` apart:
    then the proxy reads each on its own."""

    count: int
    size: int
    gap_ms: int = 0


@dataclass(frozen=True)
class Pause:
    ms: int


@dataclass(frozen=True)
class NoDelay:
    """TCP_NODELAY on (or off) for this side's socket from here on."""

    on: bool


Action = Write | Burst | Pause | NoDelay


@dataclass(frozen=True)
class Reader:
    """How a side reads: nothing for `stall_ms`, then reads of at most `chunk` bytes with
    `pause_ms` after each for `slow_ms`, then as fast as it can."""

    stall_ms: int = 0
    chunk: int = MiB
    pause_ms: int = 0
    slow_ms: int = 0


@dataclass(frozen=True)
class Net:
    """A side's socket: its SO_RCVBUF (the kernel doubles it) and TCP_MAXSEG, None for the
    kernel's choice. Over loopback's defaults (64 KiB segments, buffers autotuned up to
    32 MiB to receive, 4 MiB to send) a whole stream fits in the sockets' buffers, and the
    proxy would never meet a receiver that takes less than it has: a small window, or
    small segments (the MSS the proxy's socket learns in the handshake; its send buffer
    then grows to ~300 KiB, not 4 MiB), bring back-pressure to the relay itself (partial
    sends, POLLOUT). Both are set before the handshake: a receive buffer shrunk after it,
    below the window scale it announced, has loopback TCP crawl through drops and
    retransmissions (20 s for 1 MiB here)."""

    rcvbuf: int | None = None
    mss: int | None = None

    def apply(self, sock: socket.socket) -> None:
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        if self.mss is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.mss)


# The upstream's socket takes them from its listener: one listener, and one link of the
# proxy, for each.
NARROW_NETS = (Net(mss=536), Net(rcvbuf=4 * KiB, mss=536), Net(rcvbuf=16 * KiB, mss=1200))
NETS = (Net(), Net(rcvbuf=4 * KiB), Net(rcvbuf=64 * KiB), *NARROW_NETS)


@dataclass(frozen=True)
class Side:
    """What one side writes: `before`, then (the side that shuts down second only) waits
    for the other side's EOF to arrive and writes `after`; then shuts its write side."""

    before: tuple[Action, ...]
    after: tuple[Action, ...]
    reader: Reader
    net: Net = Net()


ORDERS = ("client-first", "upstream-first", "together")


@dataclass(frozen=True)
class Script:
    client: Side
    upstream: Side
    order: str  # one of ORDERS: who shuts its write side first
    seed: int  # the bytes written


sizes = st.one_of(
    st.integers(1, 64),  # interactive messages: auto mode copies these
    # A read that fills auto's buffer switches that direction to splice; copy's is larger.
    st.sampled_from([AUTO_CHUNK - 1, AUTO_CHUNK, AUTO_CHUNK + 1, 2 * AUTO_CHUNK,
                     COPY_CHUNK - 1, COPY_CHUNK, COPY_CHUNK + 1]),
    st.integers(65, 256 * KiB),
    st.integers(256 * KiB, 3 * MiB),  # bulk
)
actions: st.SearchStrategy[Action] = st.one_of(
    st.builds(Write, sizes),
    # Bursts of tiny writes (TCP_NODELAY's concern), or of messages short of auto's buffer:
    # read one by one (gap_ms), auto copies them, a slow receiver makes them fill the
    # proxy's send buffer (back-pressure while copying), and they pile up in its receive
    # queue until a read fills the buffer: the switch to splice mid-stream, after a stall.
    st.builds(Burst, st.integers(2, 100),
              st.one_of(st.integers(1, 8), st.integers(1024, AUTO_CHUNK - 1)),
              st.one_of(st.just(0), st.integers(1, 2))),
    st.builds(Pause, st.integers(1, 20)),
    st.builds(NoDelay, st.booleans()),
)
readers = st.one_of(
    st.just(Reader()),
    st.builds(Reader, stall_ms=st.integers(0, 150), chunk=st.integers(1, 4096),
              pause_ms=st.integers(0, 5), slow_ms=st.integers(0, 300)),
)
squeezed_readers = st.builds(Reader, stall_ms=st.integers(50, 300), chunk=st.integers(1, 4096),
                             pause_ms=st.integers(1, 5), slow_ms=st.integers(100, 300))


def stream_size(side_actions: tuple[Action, ...]) -> int:
    return sum(a.size if isinstance(a, Write) else a.count * a.size
               for a in side_actions if isinstance(a, Write | Burst))


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    order = draw(st.sampled_from(ORDERS))
    # A squeezed side reads slowly behind a narrow socket, and the other side writes it
    # more than the sockets' buffers hold: back-pressure in the proxy, every other script
    # or so (left to chance, it was one direction in twenty).
    squeezed = {"client": draw(st.booleans()), "upstream": draw(st.booleans())}

    def side(name: str, other: str, second: bool) -> Side:
        written = draw(st.lists(actions, max_size=10))
        if squeezed[other]:
            written.insert(draw(st.integers(0, len(written))),
                           Write(draw(st.integers(MiB, 3 * MiB))))
        assume(stream_size(tuple(written)) <= MAX_STREAM)
        split = draw(st.integers(0, len(written))) if second else len(written)
        if squeezed[name]:
            reader, net = draw(squeezed_readers), draw(st.sampled_from(NARROW_NETS))
        else:
            reader, net = draw(readers), draw(st.sampled_from(NETS))
        return Side(tuple(written[:split]), tuple(written[split:]), reader, net)

    return Script(side("client", "upstream", order == "upstream-first"),
                  side("upstream", "client", order == "client-first"), order,
                  draw(st.integers(0, 2**32 - 1)))


# -- the rig: one proxy per mode, and upstream listeners of ours --------------------------


@dataclass
class Link:
    spec: str
    port: int  # the proxy's listener
    upstream: socket.socket  # ours, the link's target


@dataclass
class Rig:
    mode: str
    proc: subprocess.Popen[str]
    links: dict[Net, Link]  # by the upstream's socket options
    log: Path
    status: Path


@pytest.fixture(scope="module", params=["auto", "splice", "copy"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """One proxy per mode for all its examples: starting one per example would cost more
    than most examples."""
    mode: str = request.param
    workdir = Path(tempfile.mkdtemp(prefix="fpp-", dir="/tmp"))  # short: sun_path
    upstreams: dict[Net, socket.socket] = {}
    for net in NETS:
        listener = upstreams[net] = socket.socket()
        net.apply(listener)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(WAIT)
    specs = {f"127.0.0.1:0=127.0.0.1:{sock.getsockname()[1]}": net
             for net, sock in upstreams.items()}
    status, log = workdir / "status.sock", workdir / "proxy.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [FORKPROXY, "serve", "--relay", mode, "--status-socket", str(status), *specs],
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
            # No FORKPROXY_* of the caller's: each is an option of serve's.
            env={**{k: v for k, v in os.environ.items() if not k.startswith("FORKPROXY_")},
                 "XDG_RUNTIME_DIR": str(workdir)},
        )
    try:
        lines = read_lines(proc, len(specs), WAIT)
        if len(lines) < len(specs):
            pytest.fail(f"proxy did not start: {lines} {log.read_text()}")
        links: dict[Net, Link] = {}
        for line in lines:  # listening 127.0.0.1:PORT -> 127.0.0.1:TARGET (SPEC)
            spec = line.rsplit("(", 1)[1].rstrip(")")
            net = specs[spec]
            port = int(line.split(" -> ")[0].rsplit(":", 1)[1])
            links[net] = Link(spec, port, upstreams[net])
        yield Rig(mode, proc, links, log, status)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        kill_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        for sock in upstreams.values():
            sock.close()
        shutil.rmtree(workdir, ignore_errors=True)


# -- running a script ---------------------------------------------------------------------


@dataclass
class Peer:
    """One end of the connection (the client or the upstream): a reader and a writer
    thread on its socket."""

    name: str
    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)
    eof: threading.Event = field(default_factory=threading.Event)
    sent: bytearray = field(default_factory=bytearray)

    def read(self, reader: Reader) -> None:
        # The stall and the pauses are the script's (a slow reader), not waits for a
        # condition: each is bounded by the strategy.
        time.sleep(reader.stall_ms / 1000)
        slow_until = time.monotonic() + reader.slow_ms / 1000
        while True:
            slow = time.monotonic() < slow_until
            data = self.sock.recv(reader.chunk if slow else MiB)
            if not data:
                self.eof.set()
                return
            self.received += data
            if slow and reader.pause_ms:
                time.sleep(reader.pause_ms / 1000)

    def write(self, side: Side, rng: random.Random, second: bool,
              together: threading.Barrier | None) -> None:
        self.play(side.before, rng)
        if second:
            # This side shuts down second: the other's EOF comes through first (after every
            # byte it wrote: checked at the end), and this direction goes on flowing.
            if not self.eof.wait(WAIT):
                raise AssertionError(f"the other side's EOF never reached the {self.name}")
            self.play(side.after, rng)
        if together is not None:
            together.wait(WAIT)
        self.sock.shutdown(socket.SHUT_WR)

    def play(self, script: tuple[Action, ...], rng: random.Random) -> None:
        for action in script:
            if isinstance(action, Write):
                data = rng.randbytes(action.size)
                self.sock.sendall(data)
                self.sent += data
            elif isinstance(action, Burst):
                for _ in range(action.count):
                    data = rng.randbytes(action.size)
                    self.sock.sendall(data)
                    self.sent += data
                    if action.gap_ms:
                        time.sleep(action.gap_ms / 1000)  # the script's, as Pause
            elif isinstance(action, Pause):
                time.sleep(action.ms / 1000)  # the script's pause, bounded by the strategy
            else:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(action.on))


def play(script: Script, client: Peer, upstream: Peer) -> None:
    """Both peers' threads, as the script says, until both are done; raises the first
    error any of them met."""
    together = threading.Barrier(2) if script.order == "together" else None
    errors: list[BaseException] = []

    def run(target: Callable[..., None], *args: object) -> threading.Thread:
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as exc:
                errors.append(exc)
                # The others would wait out WAIT for what this thread no longer does:
                # end them now (their calls fail, their errors come after this one).
                if together is not None:
                    together.abort()
                for peer in (client, upstream):
                    with contextlib.suppress(OSError):
                        peer.sock.shutdown(socket.SHUT_RDWR)
                    peer.eof.set()

        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        return thread

    rngs = random.Random(2 * script.seed), random.Random(2 * script.seed + 1)
    threads = [
        run(client.read, script.client.reader),
        run(upstream.read, script.upstream.reader),
        run(client.write, script.client, rngs[0], script.order == "upstream-first", together),
        run(upstream.write, script.upstream, rngs[1], script.order == "client-first",
            together),
    ]
    deadline = time.monotonic() + WAIT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        # Said at once, not only in hypothesis's report: shrinking a hang costs WAIT an
        # example, and pytest's timeout may end the test before that report.
        print(f"hung on {script}", file=sys.stderr)
        raise AssertionError(f"a peer hung: {len(client.sent)} bytes sent up, "
                             f"{len(upstream.received)} received; {len(upstream.sent)} "
                             f"sent down, {len(client.received)} received")
    if errors:
        raise errors[0]


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def assert_same_stream(direction: str, sent: bytearray, received: bytearray) -> None:
    """The whole stream compared; on a mismatch, sizes, hashes and the first byte that
    differs (streams of MiB are useless printed whole)."""
    if received == sent:
        return
    first = next((i for i in range(0, min(len(sent), len(received)), 4096)
                  if sent[i : i + 4096] != received[i : i + 4096]), None)
    if first is None:
        at = min(len(sent), len(received))
    else:
        at = next(i for i in range(first, first + 4096) if sent[i] != received[i])
    raise AssertionError(
        f"{direction}: sent {len(sent)} bytes (sha256 {digest(sent)}), received "
        f"{len(received)} (sha256 {digest(received)}); first difference at byte {at}"
    )


def link_totals(rig: Rig, link: Link) -> dict[str, Any]:
    stats: dict[str, Any] = control(rig.status, "status")["links"][link.spec]
    return stats


def run_script(rig: Rig, script: Script) -> None:
    """One connection through the proxy, played as the script says; asserts the contract."""
    assert rig.proc.poll() is None, f"the proxy exited: {rig.log.read_text()[-2000:]}"
    # The link's totals before this connection, once the one before (failed or not) is
    # over and counted: each example is judged on its own.
    link = rig.links[script.upstream.net]
    assert wait_for(lambda: link_totals(rig, link)["active"] == 0, WAIT), link_totals(rig, link)
    before = link_totals(rig, link)
    log_start = len(rig.log.read_text())
    client_sock = socket.socket()
    script.client.net.apply(client_sock)
    client_sock.settimeout(WAIT)
    client_sock.connect(("127.0.0.1", link.port))
    upstream_sock, _ = link.upstream.accept()  # examples run one at a time: this is ours
    upstream_sock.settimeout(WAIT)
    client, upstream = Peer("client", client_sock), Peer("upstream", upstream_sock)
    try:
        play(script, client, upstream)
    finally:
        client_sock.close()  # also ends a hung peer's threads (their calls fail)
        upstream_sock.close()
    # Each EOF came after every byte: a reader stops at EOF, so what it holds is all that
    # came before it.
    assert_same_stream("client -> upstream", client.sent, upstream.received)
    assert_same_stream("upstream -> client", upstream.sent, client.received)

    def close_line() -> re.Match[str] | None:
        return CLOSE_LINE.search(rig.log.read_text()[log_start:])

    assert wait_for(lambda: close_line() is not None, WAIT), rig.log.read_text()[log_start:]
    found = close_line()
    assert found is not None
    # Whose FIN reached the proxy first: the script's order, but for both at once, where
    # either may win the race.
    outcome = found.group(3)
    expected = {"client-first": ("closed",), "upstream-first": ("upstream-closed",),
                "together": ("closed", "upstream-closed")}[script.order]
    assert found.groups()[:2] == (str(len(client.sent)), str(len(upstream.sent))), (
        found.group(0))
    assert outcome in expected, (script.order, found.group(0))

    def counted() -> bool:
        stats = link_totals(rig, link)
        return bool(stats["connections"] == before["connections"] + 1 and stats["active"] == 0)

    assert wait_for(counted, WAIT), (before, link_totals(rig, link))
    after = link_totals(rig, link)
    assert (after["bytes_up"] - before["bytes_up"], after["bytes_down"] - before["bytes_down"],
            after["outcomes"].get(outcome, 0) - before["outcomes"].get(outcome, 0)) == (
        len(client.sent), len(upstream.sent), 1), (before, after)


# -- the properties -----------------------------------------------------------------------

BULK = Write(3 * MiB)
SLOW = Reader(stall_ms=150, chunk=1000, pause_ms=2, slow_ms=300)
NARROW = Net(rcvbuf=4 * KiB, mss=536)


@RELAY_SETTINGS
@given(script=scripts())
# Always run, whatever hypothesis draws: each order with a bulk transfer on the side still
# open after the other's EOF, into a slow reader; and bursts of tiny writes both ways.
@example(Script(Side((Write(100), BULK), (), SLOW, NARROW),
                Side((Write(AUTO_CHUNK),), (Burst(50, 1), BULK, Write(1)), SLOW, NARROW),
                "client-first", 1))
@example(Script(Side((Write(AUTO_CHUNK), Write(7)), (BULK, Burst(50, 3)), SLOW, NARROW),
                Side((BULK, Write(5)), (), Reader()),
                "upstream-first", 2))
@example(Script(Side((NoDelay(False), Burst(200, 1), Write(AUTO_CHUNK), Burst(200, 2)), (),
                     Reader(chunk=1, slow_ms=50)),
                Side((Burst(200, 1), Write(COPY_CHUNK), Pause(5), Burst(100, 8)), (), SLOW,
                     Net(mss=536)),
                "together", 3))
def test_each_direction_delivers_exactly_what_was_written(rig: Rig, script: Script) -> None:
    run_script(rig, script)
