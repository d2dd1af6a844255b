"""The floor of forkproxy's design: the least a Python fork-per-connection proxy can do.

Not part of forkproxy: `scripts/bench` runs it beside forkproxy (candidate `floor`) so that
every run shows how close forkproxy is to what its design allows on this interpreter
(docs/benchmarks.md). It accepts, forks one child per connection, relays with poll +
recv_into/send, half-closes, and reaps. Nothing else: no accounting, no status, no
limits, no logging, no timeouts, no reload, no graceful stop, no name resolution.
The habits that make a forking CPython cheap are kept, as forkproxy keeps them:
`gc.freeze()` before forking, `gc.disable()` in the child, a buffer allocated before any
fork, the bare fd from `_accept`, the C socket type and `_signal` in the child (their
Python wrappers run code that copies pages), only os/socket/select/signal/gc imported,
the relay loop run before any fork so children inherit it specialized (warm_up), the
child's other code inline in the loop the supervisor runs, naming no module attribute
(on 3.12+ a first run of `module.name` writes to the module's dict), and no accept() that fails
after a lone client (a poll of the listener alone asks whether another is waiting).

Usage (the way the bench starts forkproxy): python -I -S floor_sketch.py serve -q
127.0.0.1:0=127.0.0.1:PORT. It prints `listening 127.0.0.1:P -> 127.0.0.1:PORT`.
"""

import gc
import os
import select
import signal
import socket
import sys
from _signal import set_wakeup_fd  # type: ignore[import-not-found]
from _signal import signal as set_handler
from _socket import socket as RawSocket

TCP_NODELAY, IPPROTO_TCP = int(socket.TCP_NODELAY), int(socket.IPPROTO_TCP)
SHUT_WR, POLLIN = int(socket.SHUT_WR), select.POLLIN
SIGCHLD, SIG_DFL = int(signal.SIGCHLD), int(signal.SIG_DFL)

BUFFER = bytearray(65536)  # made before any fork: a child copies only the pages it fills


def relay(client: RawSocket, upstream: RawSocket) -> int:
    """Relay both ways until both are done; return the exit status."""
    fd = client.fileno()
    poller = select.poll()
    poller.register(fd, POLLIN)
    poller.register(upstream.fileno(), POLLIN)
    view = memoryview(BUFFER)
    open_directions = 2
    while open_directions:
        for ready, _ in poller.poll():
            src, dst = (client, upstream) if ready == fd else (upstream, client)
            try:
                n = src.recv_into(BUFFER)
                if n:
                    dst.sendall(view[:n])  # blocking: the simplest backpressure
                    continue
            except ConnectionError:
                return 2
            poller.unregister(ready)
            try:
                dst.shutdown(SHUT_WR)
            except OSError:
                pass
            open_directions -= 1
    return 0


def warm_up(rounds: int = 24) -> None:
    """Run relay() before any fork so that children inherit its code specialized: a code
    object that runs for the first time in a child is written to, so copied (forkproxy's
    relay.preload does the same)."""
    for _ in range(rounds):
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        b.sendall(b"PING")
        b.shutdown(socket.SHUT_WR)
        c.sendall(b"PONG")
        c.shutdown(socket.SHUT_WR)
        relay(RawSocket(fileno=a.detach()), RawSocket(fileno=d.detach()))
        for s in (b, c):
            s.close()


def main() -> None:
    listen, target_text = sys.argv[-1].split("=")
    listen_host, listen_port = listen.rsplit(":", 1)
    target_host, target_port = target_text.rsplit(":", 1)
    target = (target_host, int(target_port))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((listen_host, int(listen_port)))
    listener.listen(1024)
    listener.setblocking(False)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))  # no teardown to do
    port = listener.getsockname()[1]
    print(f"listening {listen_host}:{port} -> {target_text}", flush=True)
    poller = select.poll()
    listen_fd, wake_fd = listener.fileno(), wake_r.fileno()
    poller.register(listen_fd, select.POLLIN)
    poller.register(wake_fd, select.POLLIN)
    accept, fork, close, waitpid = listener._accept, os.fork, os.close, os.waitpid  # type: ignore[attr-defined]
    # The child's branch names no module attribute: its first run in a child would take
    # the generic path on 3.12+, writing to the module's __dict__ (forkproxy does the same).
    gc_disable, exit_child = gc.disable, os._exit
    backlog = select.poll()
    backlog.register(listen_fd, select.POLLIN)
    waiting = backlog.poll
    warm_up()
    gc.freeze()
    while True:
        for ready, _ in poller.poll():
            if ready == listen_fd:
                first = True
                for _ in range(64):
                    try:
                        fd, _address = accept()
                    except BlockingIOError:
                        break
                    if fork() == 0:
                        status = 1
                        try:
                            gc_disable()
                            set_wakeup_fd(-1)
                            set_handler(SIGCHLD, SIG_DFL)
                            for inherited in (listen_fd, wake_fd, wake_w.fileno()):
                                close(inherited)
                            client = RawSocket(fileno=fd)
                            upstream = RawSocket()
                            try:
                                upstream.connect(target)
                            except OSError:
                                exit_child(1)
                            client.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
                            upstream.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
                            status = relay(client, upstream)
                        finally:
                            exit_child(status)
                    close(fd)
                    if first and not waiting(0):
                        break  # the only client of this wakeup: no accept() that fails
                    first = False
            else:
                try:
                    wake_r.recv(4096)
                except BlockingIOError:
                    pass
                while True:
                    try:
                        pid, _status = waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break


if __name__ == "__main__":
    main()
