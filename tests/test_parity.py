"""forkproxy against socat: the same TCP scenarios through both, the same observations.

Each scenario runs once through `socat TCP4-LISTEN:P,bind=127.0.0.1,fork,reuseaddr
TCP4:127.0.0.1:T` and once through forkproxy per relay mode, with real sockets on both
ends, and records what the client and the upstream saw: the bytes each received (length
and SHA-256, or whether they were a prefix of what was sent when a reset makes the count
vary), how each one's read ended (`eof`, `reset`, `open` after a generous wait), whether
a send failed, and what the proxy left behind. forkproxy must observe what socat observes,
except where it is deliberately better; each such difference is asserted both ways (socat
still does what the table says, forkproxy does better) and listed here and in README
("What forkproxy adds to the socat recipe", "At least as correct as socat"):

| why | scenario | observed | socat | forkproxy |
|---|---|---|---|---|
| a | client half-closes, upstream answers 4 MiB 2 s later | client's bytes | none, EOF | all, EOF |
| a | the same | upstream's send | fails | succeeds |
| a | upstream half-closes, client sends 4 MiB 2 s later | upstream's bytes | none, EOF | all, EOF |
| a | the same | client's send | fails | succeeds |
| b | upstream resets, bytes in flight to the client | client's read end | EOF | reset |
| b | client resets, bytes in flight to the upstream | upstream's read end | EOF | reset |
| b | client sends 64 KiB, resets before upstream accepts | upstream's read end | EOF | reset |
| c | upstream refuses after the client sent 5 bytes | client's read end | EOF | reset |
| d | upstream never accepts (queue full, SYNs dropped) | client's read end, 20 s | open | EOF |

a. socat ends a connection once 0.5 s (`-t`) pass with nothing moving after its first EOF:
   a slower answer is lost, and the receiver takes the empty stream for a complete one
   (`--halfclose-timeout` is off).
b. socat reads the RST as an end and passes on a FIN: a truncated stream looks complete.
c. Those bytes were never delivered, and an RST is the kernel's way to close unread data
   (README); socat shuts the socket down (a FIN) before it exits. A client that sent
   nothing gets EOF from both.
d. Deliberate: `--connect-timeout`, 5 s by default ("No hang when the far host is gone");
   socat waits out the kernel's SYN retries (~2 min).

Everything else is the same through both: 8 MiB echoed both ways at once; a client that
sends and closes at once, or while the proxy's connect still waits; a 16 MiB banner and a
close before the client says anything; 64 MiB to an upstream that reads nothing yet (the
client blocks, nothing is lost); 10,000 tiny writes each way; 200 clients that connect and
close (each an EOF upstream, no child or descriptor left); an urgent byte (MSG_OOB),
dropped by both, the stream around it intact.

Scenarios stay deterministic on a loaded machine: no assertion on time, every wait
generous; the 2 s pauses are part of the scenarios (a server that thinks before it
answers), not timing assertions, and exceed socat's 0.5 s by far. Not compared here,
because socat is not deterministic there: an upstream that answers and closes at once
while the client still uploads (its kernel resets the connection for the unread upload).
Direct, the client reads the answer; through socat it was lost 5 times in 5, and through
forkproxy too until `0660db1` (the write toward the reset upstream failed before the
answer behind it was read). forkproxy now delivers it in every relay mode, as a direct
connection does: tests/test_serve.py, `test_an_answer_sent_just_before_a_reset_...`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from conftest import Proxy, free_port, kill_group, need, reset_close, wait_for

WAIT = 30.0  # the longest any read waits for its next byte or end: "open" after that
THINK = 2.0  # a peer that pauses before it goes on (socat's -t is 0.5 s)
MiB = 1 << 20

Observations = dict[str, object]
T = TypeVar("T")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The data of the scenarios whose observations the table of differences names.
REQUEST, ANSWER = random.Random(2).randbytes(MiB), random.Random(3).randbytes(4 * MiB)
BANNER, UPLOAD = random.Random(4).randbytes(MiB), random.Random(5).randbytes(4 * MiB)
NOTHING = (0, sha(b""), "eof")  # (length, SHA-256, end): an empty stream, then EOF


@dataclass
class Proxied:
    """A proxy started by a scenario: where clients connect, and its main process."""

    port: int
    pid: int


Start = Callable[[int], Proxied]  # start a proxy forwarding to 127.0.0.1:PORT


@dataclass(frozen=True)
class Read:
    """What a side received: length, SHA-256, and how its read ended."""

    size: int
    sha: str
    end: str
    data: bytes = b""  # kept only when asked (to check a prefix)


def drain(sock: socket.socket, wait: float = WAIT, keep: bool = False) -> Read:
    """Read until EOF, an error, or `wait` seconds without a byte (`open`)."""
    digest = hashlib.sha256()
    kept = bytearray()
    size = 0
    sock.settimeout(wait)
    end = "eof"
    while True:
        try:
            data = sock.recv(MiB)
        except TimeoutError:
            end = "open"
            break
        except OSError as exc:
            end = "reset" if exc.errno == errno.ECONNRESET else errno.errorcode[exc.errno or 0]
            break
        if not data:
            break
        digest.update(data)
        size += len(data)
        if keep:
            kept += data
    return Read(size, digest.hexdigest(), end, bytes(kept))


def send_outcome(sock: socket.socket, data: bytes) -> str:
    """`ok`; `failed` (EPIPE or ECONNRESET, whichever the kernel had at hand); `blocked`."""
    sock.settimeout(WAIT)
    try:
        sock.sendall(data)
    except TimeoutError:
        return "blocked"
    except OSError:
        return "failed"
    return "ok"


def received(read: Read) -> tuple[int, str, str]:
    return (read.size, read.sha, read.end)


def fill(sock: socket.socket, pattern: bytes, settle: float = 1.0) -> int:
    """Send until the path is full: no room for `settle` seconds. Returns bytes sent."""
    sock.setblocking(False)
    sent = 0
    view = memoryview(pattern)
    try:
        while sent < len(pattern):
            try:
                sent += sock.send(view[sent : sent + 256 * 1024])
            except BlockingIOError:
                if not select.select([], [sock], [], settle)[1]:
                    return sent
    finally:
        sock.settimeout(WAIT)
    raise AssertionError(f"{len(pattern)} bytes went in and the path never filled")


def in_thread(target: Callable[[], T]) -> Callable[[], T]:
    """Run `target` in a thread; the returned function joins it and gives its result."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(target())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> T:
        thread.join(WAIT * 3)
        assert not thread.is_alive(), "a scenario thread never finished"
        if errors:
            raise errors[0]
        return result[0]

    return join


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(word) for word in f.read().split()}


@contextlib.contextmanager
def upstream_listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as listener:
        listener.settimeout(WAIT)
        yield listener


def connect(proxied: Proxied) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxied.port), timeout=WAIT)


# The scenarios. Each takes a way to start the proxy toward a port and returns what the
# two ends observed; the random data is seeded, so both proxies see the same bytes.


def echo_both_ways_at_once(start: Start) -> Observations:
    """8 MiB each way at once: the upstream echoes while the client still sends."""
    data = random.Random(1).randbytes(8 * MiB)
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        with connect(proxied) as client:
            upstream, _ = listener.accept()

            def echo() -> Read:
                with upstream:
                    digest, size = hashlib.sha256(), 0
                    while chunk := upstream.recv(MiB):
                        digest.update(chunk)
                        size += len(chunk)
                        upstream.sendall(chunk)
                    upstream.shutdown(socket.SHUT_WR)
                    return Read(size, digest.hexdigest(), "eof")

            echoed = in_thread(echo)

            def send() -> None:
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)

            sender = in_thread(send)
            got = drain(client)
            sender()
            seen = echoed()
    return {"upstream received": received(seen), "client received": received(got),
            "sent": (len(data), sha(data))}


def client_half_closes_then_upstream_answers_late(start: Start) -> Observations:
    """The client sends a request and SHUT_WR; the upstream reads it to EOF, thinks, then
    answers 4 MiB and closes: does the answer reach the client?"""
    request, answer = REQUEST, ANSWER
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        with connect(proxied) as client:
            upstream, _ = listener.accept()
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            with upstream:
                seen = drain(upstream)
                time.sleep(THINK)  # the scenario: a server that takes a while to answer
                reader = in_thread(lambda: drain(client))
                sent = send_outcome(upstream, answer)
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)
                got = reader()
    return {"upstream received": received(seen), "request": (len(request), sha(request)),
            "upstream's send": sent, "client received": received(got),
            "answer": (len(answer), sha(answer))}


def upstream_half_closes_then_client_sends_late(start: Start) -> Observations:
    """The upstream sends a banner and SHUT_WR; the client reads it to EOF, thinks, then
    sends 4 MiB and closes: does it reach the upstream?"""
    banner, upload = BANNER, UPLOAD
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        with connect(proxied) as client:
            upstream, _ = listener.accept()
            with upstream:
                upstream.sendall(banner)
                upstream.shutdown(socket.SHUT_WR)
                got = drain(client)
                time.sleep(THINK)
                reader = in_thread(lambda: drain(upstream))
                sent = send_outcome(client, upload)
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                seen = reader()
    return {"client received": received(got), "banner": (len(banner), sha(banner)),
            "client's send": sent, "upstream received": received(seen),
            "upload": (len(upload), sha(upload))}


def client_sends_and_closes_at_once(start: Start) -> Observations:
    """The client sends 256 KiB and closes before the upstream has even accepted."""
    data = random.Random(6).randbytes(256 * 1024)
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", proxied.port), timeout=WAIT)
        client.sendall(data)
        client.close()
        upstream, _ = listener.accept()
        with upstream:
            seen = drain(upstream)
    return {"upstream received": received(seen), "sent": (len(data), sha(data))}


@dataclass
class FullListener:
    """A listener whose accept queue is full: the kernel drops new SYNs, so a connect to
    it waits in SYN_SENT (retransmitting) until `accept()` makes room."""

    sock: socket.socket
    fillers: list[socket.socket]

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def accept(self) -> socket.socket:
        """Take the fillers out of the queue, then the first other connection."""
        filler_ports = {filler.getsockname()[1] for filler in self.fillers}
        while True:
            conn, peer = self.sock.accept()
            if peer[1] not in filler_ports:
                return conn
            conn.close()


@contextlib.contextmanager
def full_listener() -> Iterator[FullListener]:
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        listener.settimeout(WAIT)
        fillers: list[socket.socket] = []
        try:
            while True:
                filler = socket.socket()
                filler.settimeout(0.5)  # a connect the queue takes completes at once
                try:
                    filler.connect(listener.getsockname())
                except TimeoutError:
                    filler.close()  # its SYN was dropped: the queue is full
                    break
                fillers.append(filler)
                assert len(fillers) < 100, "the accept queue never filled"
            yield FullListener(listener, fillers)
        finally:
            for filler in fillers:
                filler.close()


def syn_sent_to(port: int) -> bool:
    """Whether a connection to 127.0.0.1:port waits in SYN_SENT (its SYN dropped)."""
    with open("/proc/net/tcp") as table:
        next(table)
        return any(fields[2] == f"0100007F:{port:04X}" and fields[3] == "02"
                   for fields in (line.split() for line in table))


def client_closes_while_the_proxy_still_connects(start: Start) -> Observations:
    """The client sends 256 KiB and closes while the proxy's connect still waits (the
    upstream's accept queue is full); then the upstream makes room and reads."""
    data = random.Random(15).randbytes(256 * 1024)
    with full_listener() as listener:
        proxied = start(listener.port)
        client = socket.create_connection(("127.0.0.1", proxied.port), timeout=WAIT)
        client.sendall(data)
        client.close()
        waited = wait_for(lambda: syn_sent_to(listener.port), timeout=WAIT)
        upstream = listener.accept()  # the proxy's SYN gets in when it is sent again
        with upstream:
            seen = drain(upstream)
    return {"proxy's connect waited": waited, "upstream received": received(seen),
            "sent": (len(data), sha(data))}


def upstream_never_accepts(start: Start) -> Observations:
    """The upstream's accept queue stays full: what the client sees within 20 s."""
    with full_listener() as listener:
        proxied = start(listener.port)
        with connect(proxied) as client:
            got = drain(client, wait=20)
    return {"client received": received(got)}


def client_sends_and_resets_at_once(start: Start) -> Observations:
    """The client sends 64 KiB and resets (SO_LINGER 0) before the upstream has accepted."""
    data = random.Random(14).randbytes(64 * 1024)
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", proxied.port), timeout=WAIT)
        client.sendall(data)
        reset_close(client)
        upstream, _ = listener.accept()
        with upstream:
            seen = drain(upstream, keep=True)
    return {"upstream's bytes are a prefix": data.startswith(seen.data),
            "upstream's read ended": seen.end}


def upstream_banner_and_close(start: Start) -> Observations:
    """The upstream sends a 16 MiB banner and closes, before the client sends anything
    (more than the buffers on the way hold: the close comes while the proxy still has
    bytes to pass on)."""
    banner = random.Random(7).randbytes(16 * MiB)
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        with connect(proxied) as client:
            upstream, _ = listener.accept()

            def send_and_close() -> str:
                with upstream:
                    return send_outcome(upstream, banner)

            sender = in_thread(send_and_close)
            got = drain(client)
            sent = sender()
    return {"upstream's send": sent, "client received": received(got),
            "banner": (len(banner), sha(banner))}


def upstream_resets_with_bytes_in_flight(start: Start) -> Observations:
    """The client reads nothing while the upstream fills the path, then the upstream
    resets (SO_LINGER 0); the client then reads what it can."""
    data = random.Random(8).randbytes(64 * MiB)
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        with connect(proxied) as client:
            upstream, _ = listener.accept()
            sent = fill(upstream, data)
            reset_close(upstream)
            time.sleep(THINK)  # let the proxy see the reset before the client reads
            got = drain(client, keep=True)
    return {"client's bytes are a prefix": data.startswith(got.data),
            "client got less than sent": got.size < sent, "client's read ended": got.end}


def client_resets_with_bytes_in_flight(start: Start) -> Observations:
    """The mirror image: the upstream reads nothing while the client fills the path, the
    client resets, then the upstream reads."""
    data = random.Random(9).randbytes(64 * MiB)
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        client = connect(proxied)
        upstream, _ = listener.accept()
        with upstream:
            sent = fill(client, data)
            reset_close(client)
            time.sleep(THINK)
            seen = drain(upstream, keep=True)
    return {"upstream's bytes are a prefix": data.startswith(seen.data),
            "upstream got less than sent": seen.size < sent, "upstream's read ended": seen.end}


def upstream_refuses(start: Start) -> Observations:
    """Nothing listens on the upstream's port: what a client that sent nothing sees (a
    port bound and never listening: a sure refusal), and one that had sent 5 bytes (the
    refusal delayed until they are surely in: the proxy's connect waits on a full
    queue, then the listener closes and the next SYN is refused)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        proxied = start(closed.getsockname()[1])
        with connect(proxied) as client:
            silent = drain(client)
    with full_listener() as listener:
        port = listener.port
        proxied = start(port)
        with connect(proxied) as client:
            client.sendall(b"hello")
            waited = wait_for(lambda: syn_sent_to(port), timeout=WAIT)
            listener.sock.close()
            talked = drain(client)
    return {"client that sent nothing": received(silent), "proxy's connect waited": waited,
            "client that sent 5 bytes": talked.end}


def upstream_never_reads(start: Start) -> Observations:
    """The client writes 64 MiB to an upstream that reads nothing: the client must block
    (the proxy buffers a bounded amount); then the upstream reads every byte."""
    data = random.Random(10).randbytes(64 * MiB)
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        with connect(proxied) as client:
            upstream, _ = listener.accept()
            with upstream:
                before_blocking = fill(client, data)
                reader = in_thread(lambda: drain(upstream))
                rest = send_outcome(client, data[before_blocking:])
                client.shutdown(socket.SHUT_WR)
                seen = reader()
    return {"client blocked before the end": before_blocking < len(data),
            "client's send": rest, "upstream received": received(seen),
            "sent": (len(data), sha(data))}


def tiny_writes_both_ways(start: Start) -> Observations:
    """10,000 writes of 1..100 bytes each way at once, TCP_NODELAY on both ends."""
    rng = random.Random(11)
    up = [rng.randbytes(rng.randint(1, 100)) for _ in range(10_000)]
    down = [rng.randbytes(rng.randint(1, 100)) for _ in range(10_000)]

    def write(sock: socket.socket, pieces: list[bytes]) -> None:
        for piece in pieces:
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)

    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        with connect(proxied) as client:
            upstream, _ = listener.accept()
            with upstream:
                for sock in (client, upstream):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                writers = [in_thread(lambda: write(client, up)),
                           in_thread(lambda: write(upstream, down))]
                reader = in_thread(lambda: drain(upstream))
                got = drain(client)
                seen = reader()
                for writer in writers:
                    writer()
    return {"upstream received": received(seen), "client received": received(got),
            "sent up": (sum(map(len, up)), sha(b"".join(up))),
            "sent down": (sum(map(len, down)), sha(b"".join(down)))}


def connect_and_close_200_times(start: Start) -> Observations:
    """200 clients that connect and close without a byte: the upstream sees each connect
    and its EOF, and the proxy is left with what it had (children, descriptors)."""
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        before_children = children(proxied.pid)
        before_fds = len(os.listdir(f"/proc/{proxied.pid}/fd"))
        ends: dict[tuple[int, str], int] = {}
        for _ in range(200):
            connect(proxied).close()
            upstream, _ = listener.accept()
            with upstream:
                end = drain(upstream)
            ends[(end.size, end.end)] = ends.get((end.size, end.end), 0) + 1
        settled = wait_for(lambda: children(proxied.pid) == before_children, timeout=WAIT)
        fds = len(os.listdir(f"/proc/{proxied.pid}/fd"))
    return {"upstream's ends": ends, "children as before": settled,
            "descriptors as before": fds == before_fds}


def urgent_byte(start: Start) -> Observations:
    """A byte sent MSG_OOB in the middle of the client's stream, and the same from the
    upstream: what arrives (read without SO_OOBINLINE)."""
    first, after = random.Random(12).randbytes(100_000), random.Random(13).randbytes(1000)
    result: Observations = {}
    with upstream_listener() as listener:
        proxied = start(listener.getsockname()[1])
        for direction in ("up", "down"):
            with connect(proxied) as client:
                upstream, _ = listener.accept()
                with upstream:
                    src, dst = (client, upstream) if direction == "up" else (upstream, client)
                    src.sendall(first)
                    src.send(b"!", socket.MSG_OOB)
                    src.sendall(after)
                    src.shutdown(socket.SHUT_WR)
                    got = drain(dst)
            result[f"{direction}: received"] = received(got)
    result["without the urgent byte"] = (len(first + after), sha(first + after))
    return result


SCENARIOS: dict[str, Callable[[Start], Observations]] = {
    f.__name__: f
    for f in (
        echo_both_ways_at_once,
        client_half_closes_then_upstream_answers_late,
        upstream_half_closes_then_client_sends_late,
        client_sends_and_closes_at_once,
        client_sends_and_resets_at_once,
        client_closes_while_the_proxy_still_connects,
        upstream_never_accepts,
        upstream_banner_and_close,
        upstream_resets_with_bytes_in_flight,
        client_resets_with_bytes_in_flight,
        upstream_refuses,
        upstream_never_reads,
        tiny_writes_both_ways,
        connect_and_close_200_times,
        urgent_byte,
    )
}

# Where forkproxy is deliberately better (the docstring's table): per scenario, each
# observation's value (socat's, forkproxy's).
BETTER: dict[str, dict[str, tuple[object, object]]] = {
    "client_half_closes_then_upstream_answers_late": {
        "client received": (NOTHING, (len(ANSWER), sha(ANSWER), "eof")),
        "upstream's send": ("failed", "ok"),
    },
    "upstream_half_closes_then_client_sends_late": {
        "upstream received": (NOTHING, (len(UPLOAD), sha(UPLOAD), "eof")),
        "client's send": ("failed", "ok"),
    },
    "upstream_resets_with_bytes_in_flight": {"client's read ended": ("eof", "reset")},
    "client_resets_with_bytes_in_flight": {"upstream's read ended": ("eof", "reset")},
    "client_sends_and_resets_at_once": {"upstream's read ended": ("eof", "reset")},
    "upstream_refuses": {"client that sent 5 bytes": ("eof", "reset")},
    "upstream_never_accepts": {"client received": ((0, sha(b""), "open"), NOTHING)},
}


@pytest.fixture(scope="module")
def socat_observations(tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[Callable[[str], Observations]]:
    """Each scenario's observations through socat, made once for every relay mode."""
    socat = need("socat")
    seen: dict[str, Observations] = {}
    procs: list[subprocess.Popen[str]] = []
    logs = tmp_path_factory.mktemp("socat")

    def start(target: int) -> Proxied:
        for attempt in range(5):
            port = free_port()
            log = logs / f"{len(procs)}-{attempt}.log"
            with log.open("w") as err:
                proc = subprocess.Popen(
                    [socat, "-d", "-d", f"TCP4-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
                     f"TCP4:127.0.0.1:{target}"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    text=True, start_new_session=True,
                )
            procs.append(proc)

            def up_or_gone(log: Path = log, proc: subprocess.Popen[str] = proc) -> bool:
                return "listening on" in log.read_text() or proc.poll() is not None

            if wait_for(up_or_gone) and proc.poll() is None:
                return Proxied(port, proc.pid)
            kill_group(proc)
        pytest.fail(f"socat did not start: {log.read_text()}")

    def observe(name: str) -> Observations:
        if name not in seen:
            try:
                seen[name] = SCENARIOS[name](start)
            finally:
                while procs:
                    proc = procs.pop()
                    proc.terminate()
                    kill_group(proc)
        return seen[name]

    yield observe


RELAYS = ["splice", "copy", "auto"]


@pytest.mark.parametrize("relay", RELAYS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_forkproxy_observes_what_socat_observes(
    name: str, relay: str, socat_observations: Callable[[str], Observations],
    start_proxy: Callable[..., Proxy],
) -> None:
    def start(target: int) -> Proxied:
        proxy = start_proxy("-q", "--relay", relay, f"127.0.0.1:0=127.0.0.1:{target}")
        return Proxied(proxy.port, proxy.pid)

    expected = dict(socat_observations(name))
    better = BETTER.get(name, {})
    for key, (socat_value, _) in better.items():
        assert expected[key] == socat_value, f"socat no longer does what the table says: {key}"
        expected[key] = better[key][1]
    got = SCENARIOS[name](start)
    print(f"socat: {socat_observations(name)}\nforkproxy: {got}")
    assert got == expected
