"""Reload requests that wait together are answered by one reload, whose reading of the
sources began after each of them came: never by a reading from before one was sent."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import socket
import subprocess
import threading
import tty
from collections.abc import Callable
from pathlib import Path

import pytest

from forkproxy import control as control_module

from conftest import (
    FORKPROXY,
    Proxy,
    ServerFactory,
    TcpServer,
    control,
    free_port,
    kill_group,
    polled,
    read_lines,
    wait_for,
)

StartProxy = Callable[..., Proxy]


def awaiting_reply(pid: int) -> bool:
    """Whether process `pid` (a `forkproxy reload`) is blocked in poll() waiting to read,
    which it does only once its request is sent."""
    return any(events & select.POLLIN for _, events in polled(pid) or [])


def says(word: bytes) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        conn.sendall(word)

    return handler


def reached(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.settimeout(10)
        return client.recv(16)


def link_line(port: int, server: TcpServer, variable: str) -> str:
    return f"listening 127.0.0.1:{port} -> 127.0.0.1:{server.port} ({variable})"


def app_link(tcp_server: ServerFactory,
             tmp_path: Path) -> tuple[TcpServer, TcpServer, int, str, Path]:
    """Two upstreams that say who they are, and an env file that links a free port to the
    first: (first, second, the port, its link variable, the env file)."""
    first, second = tcp_server(says(b"first")), tcp_server(says(b"second"))
    port = free_port()
    variable = f"APP_PORT_{port}_TCP"
    env_file = tmp_path / "links.env"
    env_file.write_text(f"{variable}=tcp://127.0.0.1:{first.port}\n")
    return first, second, port, variable, env_file


def test_concurrent_reloads_at_many_links_are_all_answered_by_one_reading(
    start_proxy: StartProxy, tcp_server: ServerFactory, tmp_path: Path, env: dict[str, str],
) -> None:
    """At 4,000 links a reload takes ~0.5 s, and each request got one of its own: 16
    `forkproxy reload` at once were answered 8 s later, past the CLI's timeout, and all
    said "no answer" though all were applied. Sixteen sent to a supervisor stopped (as
    a busy one is) with 1,000 links, and a SIGHUP, are answered by one reload now, which
    read the file as it was written after they were all sent."""
    _, second, port, variable, env_file = app_link(tcp_server, tmp_path)
    socket_path = tmp_path / "s.sock"
    specs = [f"127.0.0.1:0=127.0.0.1:{number}" for number in range(1, 1000)]  # never reached
    proxy = start_proxy("--env-file", str(env_file), "--bind", "127.0.0.1", "--status-socket",
                        str(socket_path), *specs, expect=1000, env=env, timeout=60)
    assert reached(port) == b"first"
    clients: list[subprocess.Popen[str]] = []
    proxy.signal(signal.SIGSTOP)
    try:
        for _ in range(16):
            clients.append(subprocess.Popen(
                [FORKPROXY, "reload", "--status-socket", str(socket_path)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        pids = [client.pid for client in clients]
        assert wait_for(lambda: all(map(awaiting_reply, pids)), 60), [
            pid for pid in pids if not awaiting_reply(pid)]
        env_file.write_text(f"{variable}=tcp://127.0.0.1:{second.port}\n")  # after each asked
        proxy.signal(signal.SIGHUP)
    finally:
        proxy.signal(signal.SIGCONT)
    answers = [client.communicate(timeout=120) for client in clients]
    for client, (stdout, stderr) in zip(clients, answers, strict=True):
        assert (client.returncode, stderr) == (0, ""), (client.returncode, stderr)
        lines = stdout.splitlines()
        assert len(lines) == 1000, stdout[-2000:]
        assert link_line(port, second, variable) in lines, [x for x in lines if variable in x]
    assert control(socket_path, "status")["reloads"] == {"success": 1, "failure": 0}
    assert reached(port) == b"second"
    assert proxy.stop() == 0


def ask(path: Path, command: str) -> socket.socket:
    """A request sent on the control socket; its answer is read by `answer`."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(60)
    client.connect(str(path))
    client.sendall(json.dumps({"command": command}).encode() + b"\n")
    return client


def answer(client: socket.socket) -> dict[str, object]:
    with client:
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def writing(pid: int, tid: int, fd: int) -> bool:
    """Thread `tid` of process `pid` waits in write() to `fd` (asleep in the call)."""
    machine = os.uname().machine
    numbers = {"x86_64": 1, "aarch64": 64}  # write
    if machine not in numbers:
        pytest.fail(f"writing knows the write system call's number on "
                    f"{', '.join(numbers)} only, not on this machine's {machine!r}: add it")
    task = Path(f"/proc/{pid}/task/{tid}")
    try:
        fields = (task / "syscall").read_text().split()
        state = (task / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False  # gone
    return state == "S" and fields[:2] == [str(numbers[machine]), hex(fd)]


def test_a_request_that_comes_while_a_reload_runs_gets_a_reading_of_its_own(
    tcp_server: ServerFactory, tmp_path: Path, env: dict[str, str],
) -> None:
    """A reload answers the requests that came before it read the sources, not one that
    came after (its answer would show a file older than the request). The first request's
    reload is held after its reading (its log, nobody reading it, is full); the file
    is rewritten and two more requests come: those two are answered by one reload of their
    own, which read the new file, and the first by its own, which read the old.

    The log is a pty's master end: a line a full pipe, socket or terminal cannot take
    waits in the supervisor, which goes on (log.Logger.never_wait); a master, which it
    cannot open a description of its own of (log._OPENS_ANOTHER_TERMINAL), it still
    writes to with blocking writes, which is what holds the reload here."""
    first, second, port, variable, env_file = app_link(tcp_server, tmp_path)
    socket_path = tmp_path / "s.sock"
    master, slave = pty.openpty()
    tty.setraw(slave)  # no echo: what the master writes fills the slave's input, then waits
    proc = subprocess.Popen([FORKPROXY, "serve", "--env-file", str(env_file), "--bind",
                             "127.0.0.1", "--status-socket", str(socket_path)],
                            stdout=subprocess.PIPE, stderr=master, text=True, env=env,
                            start_new_session=True)
    log = bytearray()
    threads: list[threading.Thread] = []
    try:
        assert read_lines(proc, 1, 30) == [link_line(port, first, variable)]
        os.set_blocking(slave, False)  # only this process holds the slave
        assert wait_for(lambda: control(socket_path, "check")["ok"] is True)
        # The start's log taken, then the terminal filled: the supervisor's next line
        # waits. Filled by a blocking write of our own (O_NONBLOCK on the master would
        # be the supervisor's too: its lines would fail, not wait), which waits in turn.
        with contextlib.suppress(BlockingIOError):
            while data := os.read(slave, 65536):
                log += data
        filler_id: list[int] = []

        def fill() -> None:
            filler_id.append(threading.get_native_id())
            with contextlib.suppress(OSError):  # the master closed at the end
                os.write(master, b"x" * (1 << 20))

        threads.append(threading.Thread(target=fill, daemon=True))
        threads[-1].start()
        assert wait_for(lambda: bool(filler_id) and writing(os.getpid(), filler_id[0],
                                                            master)), "not filled"
        early = ask(socket_path, "reload")
        assert wait_for(lambda: writing(proc.pid, proc.pid, 2)), "the reload logged nothing"
        env_file.write_text(f"{variable}=tcp://127.0.0.1:{second.port}\n")
        late = [ask(socket_path, "reload"), ask(socket_path, "reload")]
        os.set_blocking(slave, True)

        def take_the_log() -> None:
            with contextlib.suppress(OSError):  # EIO: every master end closed
                while data := os.read(slave, 65536):
                    log.extend(data)

        threads.append(threading.Thread(target=take_the_log, daemon=True))
        threads[-1].start()
        replies = [answer(client) for client in [early, *late]]
        upstreams = [[row["upstream"] for row in reply["listeners"]]  # type: ignore[attr-defined]
                     for reply in replies]
        assert [reply["ok"] for reply in replies] == [True] * 3, replies
        assert upstreams == [[f"127.0.0.1:{first.port}"]] + [[f"127.0.0.1:{second.port}"]] * 2
        assert control(socket_path, "status")["reloads"] == {"success": 2, "failure": 0}
        assert reached(port) == b"second"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        kill_group(proc)
        os.close(master)
        for thread in threads:
            thread.join(30)
        os.close(slave)
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_client_waiting_for_its_answer_is_never_dropped_to_make_room(
    short_dir: Path,
) -> None:
    """The control socket drops its oldest client to make room for a newcomer (one that
    connects and says nothing must not lock `check` out). One whose request was taken
    and whose answer comes with the next reload is not dropped: with every client
    waiting so, a newcomer waits in the backlog until they are answered."""
    taken: list[socket.socket] = []

    def later(request: dict[str, object], client: socket.socket) -> control_module.Later:
        taken.append(client)
        return control_module.LATER

    server = control_module.ControlServer(str(short_dir / "s.sock"), later)
    clients = [ask(short_dir / "s.sock", "reload") for _ in range(control_module.MAX_CLIENTS)]
    try:
        fresh, dropped = server.accept()
        assert (len(fresh), dropped) == (control_module.MAX_CLIENTS, [])
        assert all(server.service(fd) for fd in fresh)  # each request taken, none answered
        assert len(taken) == control_module.MAX_CLIENTS
        newcomer = ask(short_dir / "s.sock", "check")
        clients.append(newcomer)
        assert server.accept() == ([], [])  # left in the backlog, no waiting client dropped
        ready = server.answer(taken, {"ok": True})
        assert sorted(ready) == sorted(fresh)
        for fd in ready:
            assert not server.service(fd)  # sent whole, and closed
        assert [answer(client) for client in clients[:-1]] == [{"ok": True}] * len(ready)
        assert len(server.accept()[0]) == 1  # the newcomer's turn
    finally:
        for client in clients:
            client.close()
        server.close()


def test_a_reload_asked_as_the_control_socket_fills_is_answered(
    start_proxy: StartProxy, tcp_server: ServerFactory, short_dir: Path,
) -> None:
    """A full control socket makes room for a newcomer by answering its oldest client
    and closing it: one that had just sent `reload` had its reload queued (answered at
    the loop's next turn) and was closed all the same, with no answer (`forkproxy
    reload` said "closed without a reply", though the reload went through). It is kept
    now, and answered; a client that asked nothing is closed instead."""
    server = tcp_server(says(b"first"))
    path = str(short_dir / "fp.sock")
    proxy = start_proxy("--status-socket", path, f"127.0.0.1:0=127.0.0.1:{server.port}")
    clients: list[socket.socket] = []
    proxy.signal(signal.SIGSTOP)  # so that all of them wait in the backlog, in this order
    try:
        asking = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        clients.append(asking)
        asking.settimeout(20)
        asking.connect(path)
        asking.sendall(b'{"command": "reload"}\n')
        for _ in range(control_module.MAX_CLIENTS):  # the backlog's room: saying nothing
            idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(idle)
            idle.settimeout(20)
            idle.connect(path)
    finally:
        proxy.signal(signal.SIGCONT)
    try:
        data = b""
        while b"\n" not in data:
            chunk = asking.recv(65536)
            assert chunk, f"closed without a reply: {proxy.log()}"
            data += chunk
        reply = json.loads(data)
        assert reply["ok"] is True, reply
    finally:
        for client in clients:
            client.close()
    assert control(Path(path), "check")["last_reload"] is not None
    assert proxy.stop() == 0
