"""Who ended a connection that ended cleanly, with a real redis-server as the upstream.

`closed` is a connection whose client's FIN reached the proxy first (the client was
done: the usual end); `upstream-closed` one whose upstream's did: redis closing an idle
client (`timeout`), redis restarted or killed with nothing unread (its kernel sends the
FINs), a far ambassador passing its upstream's end on. Both used to be `closed`, so an
upstream ending its clients' connections showed nowhere. The rule is whose FIN came
first, not who "meant" to end: redis answers QUIT with +OK and closes, so a QUIT is
`upstream-closed` (the client asked, the server ended).

Each client here waits for the upstream's end (EOF) before it closes, or closes
without waiting for one, so that whose FIN comes first is never a race. Bytes are
counted, and hashed, at the client and matched with the close lines': nothing in the
relaying changed with the outcome.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Proxy, control, free_port, need, wait_for

StartProxy = Callable[..., Proxy]
DEADLINE = 30.0  # generous: a loaded 2-core machine shared with other test runs


class Resp:
    """A redis client over a plain socket: commands out, replies in, every byte counted
    and hashed both ways."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.sent = self.received = 0
        self.sent_hash, self.received_hash = hashlib.sha256(), hashlib.sha256()
        self.buffer = b""

    def send(self, *args: bytes) -> None:
        data = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        self.sock.sendall(data)
        self.sent += len(data)
        self.sent_hash.update(data)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("closed before a whole reply")
        self.received += len(data)
        self.received_hash.update(data)
        self.buffer += data

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> bytes | None:
        line = self._line()
        if line[:1] == b"$":
            size = int(line[1:])
            return None if size < 0 else self._take(size + 2)[:-2]
        assert line[:1] in b"+:", line  # no errors expected here
        return line[1:]

    def call(self, *args: bytes) -> bytes | None:
        self.send(*args)
        return self.reply()

    def wait_for_end(self) -> None:
        """Read until the upstream's end comes through (EOF); nothing else may come."""
        assert not self.buffer
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                return
            raise AssertionError(f"bytes before the end: {data[:80]!r}")

    def close(self) -> None:
        self.sock.close()


class RedisServer:
    """redis-server on a port of our own, which it can be killed and started again on."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [need("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        assert wait_for(self._answers, DEADLINE), "redis-server did not start"

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {self.proc.returncode}")
        try:
            client = Resp(self.port)
        except OSError:
            return False
        try:
            return client.call(b"PING") == b"PONG"
        except (OSError, EOFError):
            return False
        finally:
            client.close()

    def config(self, name: str, value: str) -> None:
        client = Resp(self.port)
        try:
            assert client.call(b"CONFIG", b"SET", name.encode(), value.encode()) == b"OK"
        finally:
            client.close()

    def kill(self, sig: int) -> None:
        """Send `sig`; return once it took effect (stopped, or exited)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGSTOP:
            assert wait_for(lambda: self._state() == "T", DEADLINE), self._state()
        else:
            self.proc.wait(DEADLINE)

    def _state(self) -> str:
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    for _ in range(5):
        server = RedisServer(free_port())
        try:
            server.start()
        except AssertionError:  # its port taken meanwhile: another one
            server.stop()
            continue
        try:
            yield server
        finally:
            server.stop()
        return
    pytest.fail("redis-server did not start")


def stats(sock: Path) -> dict[str, Any]:
    links = control(sock, "status")["links"]
    assert len(links) == 1, links
    found: dict[str, Any] = next(iter(links.values()))
    return found


def outcomes_after(sock: Path, connections: int) -> dict[str, int]:
    """The link's outcomes once `connections` have ended and been reaped."""
    def done() -> bool:
        link = stats(sock)
        return bool(link["connections"] == connections and link["active"] == 0)
    assert wait_for(done, DEADLINE), stats(sock)
    found: dict[str, int] = stats(sock)["outcomes"]
    return found


def close_fields(proxy: Proxy) -> list[dict[str, str]]:
    """Each close line's fields, in order."""
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in proxy.log().splitlines()
            if " close " in line]


def serve(start_proxy: StartProxy, port: int, sock: Path, *extra: str) -> Proxy:
    return start_proxy(f"127.0.0.1:0=127.0.0.1:{port}", "--status-socket", str(sock), *extra,
                       expect=2 if "--metrics" in extra else 1)


def test_a_client_that_closes_is_closed_and_one_that_quits_is_upstream_closed(
    redis_server: RedisServer, start_proxy: StartProxy, tmp_path: Path,
) -> None:
    """redis-cli and a client that closes after its last reply end first: `closed`. A
    client that sends QUIT is answered +OK and then redis closes: its FIN reaches the
    proxy first, and the honest outcome is `upstream-closed`."""
    sock = tmp_path / "s.sock"
    proxy = serve(start_proxy, redis_server.port, sock)
    out = subprocess.run([need("redis-cli"), "-p", str(proxy.port), "PING"],
                         capture_output=True, text=True, timeout=DEADLINE, check=True)
    assert out.stdout.strip() == "PONG"
    client = Resp(proxy.port)
    assert client.call(b"PING") == b"PONG"
    client.close()
    assert outcomes_after(sock, 2) == {"closed": 2}

    quitter = Resp(proxy.port)
    assert quitter.call(b"QUIT") == b"OK"
    quitter.wait_for_end()
    quitter.close()
    assert outcomes_after(sock, 3) == {"closed": 2, "upstream-closed": 1}
    assert [line["outcome"] for line in close_fields(proxy)] == [
        "closed", "closed", "upstream-closed"], proxy.log()


@pytest.mark.parametrize("mode", ["auto", "splice", "copy"])
def test_redis_timeout_closing_an_idle_client_is_upstream_closed_bytes_intact(
    redis_server: RedisServer, start_proxy: StartProxy, tmp_path: Path, mode: str,
) -> None:
    """redis's `timeout` closes a client idle that long: the far end ending connections
    on its clients, which `closed` hid. Before it goes idle the client stores and reads
    back 3 MiB of random bytes: what redis returns hashes the same, and the close line's
    byte counts are what the client sent and received. A client that closes before the
    timeout, on the same proxy, is still `closed`. And the metrics say so too."""
    sock = tmp_path / "s.sock"
    proxy = serve(start_proxy, redis_server.port, sock, "--relay", mode,
                  "--metrics", "127.0.0.1:0")
    value = os.urandom(3 << 20)
    early = Resp(proxy.port)
    assert early.call(b"SET", b"k", value) == b"OK"
    early.close()
    redis_server.config("timeout", "1")
    idle = Resp(proxy.port)
    got = idle.call(b"GET", b"k")
    assert got is not None and hashlib.sha256(got).digest() == hashlib.sha256(value).digest()
    idle.wait_for_end()  # redis closes it after 1 s idle (its cron looks every 100 ms)
    idle.close()
    assert outcomes_after(sock, 2) == {"closed": 1, "upstream-closed": 1}
    first, second = close_fields(proxy)
    assert first["outcome"] == "closed" and second["outcome"] == "upstream-closed", proxy.log()
    assert (int(second["bytes_up"]), int(second["bytes_down"])) == (idle.sent, idle.received)
    assert int(first["bytes_up"]) == early.sent and "error" not in second
    match = re.fullmatch(r"metrics (http://127\.0\.0\.1:\d+/metrics)", proxy.lines[-1])
    assert match, proxy.lines
    with urllib.request.urlopen(match[1], timeout=DEADLINE) as response:
        text = response.read().decode()
    ended = {sample.labels["outcome"]: sample.value
             for family in text_string_to_metric_families(text)
             for sample in family.samples if sample.name == "forkproxy_connections_ended_total"}
    assert (ended["closed"], ended["upstream-closed"]) == (1, 1), ended


def test_redis_killed_or_restarted_under_its_clients(
    redis_server: RedisServer, start_proxy: StartProxy, tmp_path: Path,
) -> None:
    """redis SIGKILLed under an idle client: its kernel closes the socket with a FIN,
    `upstream-closed`. Killed with a request it never read (stopped first): its kernel
    resets, `upstream-reset`, as before. Started again on its port: a new client ends
    first as usual, `closed`; a graceful restart (SIGTERM) under an idle client is
    `upstream-closed` again. Before, the kill and the restart were `closed`, as if the
    clients had finished."""
    sock = tmp_path / "s.sock"
    proxy = serve(start_proxy, redis_server.port, sock)

    idle = Resp(proxy.port)
    assert idle.call(b"PING") == b"PONG"
    unread = Resp(proxy.port)
    assert unread.call(b"PING") == b"PONG"
    redis_server.kill(signal.SIGSTOP)
    unread.send(b"PING")  # waits, unread, in the stopped redis's socket
    assert wait_for(lambda: stats(sock)["bytes_up"] == idle.sent + unread.sent, DEADLINE)
    redis_server.kill(signal.SIGKILL)
    idle.wait_for_end()
    idle.close()
    with pytest.raises(ConnectionResetError):
        unread.reply()
    unread.close()
    assert outcomes_after(sock, 2) == {"upstream-closed": 1, "upstream-reset": 1}

    redis_server.start()
    again = Resp(proxy.port)
    assert again.call(b"PING") == b"PONG"
    again.close()
    restarted = Resp(proxy.port)
    assert restarted.call(b"PING") == b"PONG"
    redis_server.kill(signal.SIGTERM)
    restarted.wait_for_end()
    restarted.close()
    assert outcomes_after(sock, 4) == {"upstream-closed": 2, "upstream-reset": 1, "closed": 1}
    assert [line["outcome"] for line in close_fields(proxy)][-2:] == [
        "closed", "upstream-closed"], proxy.log()


def test_the_near_ambassador_sees_the_far_redis_end_its_clients(
    redis_server: RedisServer, start_proxy: StartProxy, tmp_path: Path,
) -> None:
    """The ambassador chain: consumer -> near -> far -> redis. redis's `timeout` ends an
    idle client's connection; the far ambassador reads redis's FIN first, passes it on,
    and so the near one reads the far one's first: both count `upstream-closed`, so the
    near side's metrics show the far redis ending connections. Before, both: `closed`."""
    far_sock, near_sock = tmp_path / "far.sock", tmp_path / "near.sock"
    far = serve(start_proxy, redis_server.port, far_sock)
    near = serve(start_proxy, far.port, near_sock)
    redis_server.config("timeout", "1")
    idle = Resp(near.port)
    assert idle.call(b"PING") == b"PONG"
    idle.wait_for_end()
    idle.close()
    assert outcomes_after(far_sock, 1) == {"upstream-closed": 1}
    assert outcomes_after(near_sock, 1) == {"upstream-closed": 1}
    [line] = close_fields(near)
    assert (int(line["bytes_up"]), int(line["bytes_down"])) == (idle.sent, idle.received)


def test_a_far_ambassador_that_cannot_reach_redis_is_upstream_closed_at_the_near_one(
    redis_server: RedisServer, start_proxy: StartProxy, tmp_path: Path,
) -> None:
    """The chain with redis down: the far ambassador takes the near one's connection,
    its own connect is refused, and it closes that connection (a FIN: nothing was sent
    yet). The near ambassador read its upstream's FIN first: `upstream-closed`, which
    is no probe's end (a probe's is `closed`), though both moved no byte (`empty`).
    Before, the near side counted `closed`, and the far redis's death showed only in
    the far ambassador's `connect-failed`."""
    far_sock, near_sock = tmp_path / "far.sock", tmp_path / "near.sock"
    far = serve(start_proxy, redis_server.port, far_sock)
    near = serve(start_proxy, far.port, near_sock)
    redis_server.kill(signal.SIGKILL)
    client = Resp(near.port)
    client.wait_for_end()
    client.close()
    assert outcomes_after(far_sock, 1) == {"connect-failed": 1}
    assert outcomes_after(near_sock, 1) == {"upstream-closed": 1}
    assert stats(near_sock)["empty"] == 1
