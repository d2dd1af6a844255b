"""forkproxy run under `mptcpize run` (mptcpize package): its listeners' and upstreams'
sockets are IPPROTO_MPTCP, a client's connection two TCP subflows. In the proxy's own
network namespace (MPTCP on by default there), the second path a subflow endpoint on
127.0.0.2, as `ip mptcp endpoint add ADDR subflow` gives a host with two interfaces.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from forkproxy.sockdiag import IPPROTO_MPTCP

from conftest import FORKPROXY, Proxy, in_network, in_own_network, need, poll

StartProxy = Callable[..., Proxy]
UPSTREAM_PORT = 7000  # the namespace is the proxy's own: nothing else listens there


def status_json(path: Path, env: dict[str, str]) -> dict[str, Any]:
    """`forkproxy status --json`, run in the calling thread's network namespace."""
    done = subprocess.run([FORKPROXY, "status", "--json", "--status-socket", str(path)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done
    reply = json.loads(done.stdout)
    assert isinstance(reply, dict)
    return reply


@contextlib.contextmanager
def flooding_upstream() -> Iterator[None]:
    """An upstream on UPSTREAM_PORT of the calling thread's network namespace that sends
    to each client as fast as it takes it, until the connection breaks."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", UPSTREAM_PORT))
    listener.listen()

    def serve() -> None:
        chunk = b"x" * (1 << 16)
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                while True:
                    conn.sendall(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(15)


def test_status_reads_an_mptcp_connection_not_one_of_its_subflows(
    start_proxy: StartProxy, tmp_path: Path, env: dict[str, str],
) -> None:
    """Each subflow of an MPTCP socket carries the socket's inode, so `status` took one
    subflow's TCP reading for the connection's: a client that reads nothing was shown
    1 B queued toward it where the proxy held ~100 KiB for it (the data waits in the
    MPTCP socket, not in a subflow), or `-` when the subflow read last was the second
    path's. Now the MPTCP socket's own reading: what it holds unacknowledged, as `ss
    -M` shows it (write_seq - snd_una), and its idle time."""
    mptcpize, ip = need("mptcpize"), need("ip")
    sock_path = tmp_path / "status.sock"
    proxy = start_proxy("--status-socket", str(sock_path),
                        f"127.0.0.1:0=127.0.0.1:{UPSTREAM_PORT}", env=env,
                        prefix=(*in_own_network(), mptcpize, "run"))
    with in_network(proxy.network):
        subprocess.run([ip, "mptcp", "limits", "set", "subflow", "2"], check=True, timeout=30)
        subprocess.run([ip, "mptcp", "endpoint", "add", "127.0.0.2", "dev", "lo", "subflow"],
                       check=True, timeout=30)
        with flooding_upstream(), socket.socket(
                socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP) as client:
            client.connect(("127.0.0.1", proxy.port))
            ports = f"( sport = :{proxy.port} and dport = :{client.getsockname()[1]} )"

            def proxy_side() -> str:
                """`ss -M`'s line of the proxy's MPTCP socket toward the client."""
                return subprocess.run([need("ss"), "-MniH", "state", "established", ports],
                                      capture_output=True, text=True, timeout=30,
                                      check=True).stdout

            # The client reads nothing: the proxy's socket toward it fills, and stays so.
            seen = poll(proxy_side, lambda out: "subflows:1 " in out
                        and bool(re.search(r"write_seq:[0-9a-f]+ snd_una", out)))
            assert "subflows:1 " in seen, seen  # a second path, as the docstring has
            time.sleep(1.0)
            [child] = status_json(sock_path, env)["children"]
            out = proxy_side()
            write_seq, snd_una = (int(re.search(rf"{name}:([0-9a-f]+)", out)[1], 16)  # type: ignore[index]
                                  for name in ("write_seq", "snd_una"))
            assert write_seq - snd_una > 64 * 1024, out  # the socket holds it, not a subflow
            assert child["queued_to_client"] == write_seq - snd_una, (child, out)
            assert child["idle"] is not None and child["idle"] >= 0.5, child


def test_status_reads_an_mptcp_connection_fallen_back_to_tcp_whole(
    start_proxy: StartProxy, tmp_path: Path, env: dict[str, str],
) -> None:
    """The proxy's MPTCP socket toward a plain TCP upstream falls back to TCP: the MPTCP
    socket then counts what it handed its one subflow as acknowledged, so its own
    reading alone showed 96 KiB queued toward an upstream that reads nothing where the
    subflow held 130 KiB more. Queued is now both, and UNANSWERED the subflow's."""
    mptcpize = need("mptcpize")
    sock_path = tmp_path / "status.sock"
    proxy = start_proxy("--status-socket", str(sock_path),
                        f"127.0.0.1:0=127.0.0.1:{UPSTREAM_PORT}", env=env,
                        prefix=(*in_own_network(), mptcpize, "run"))
    # The upstream plain TCP, accepting (the kernel does) and never reading.
    with in_network(proxy.network), socket.socket() as upstream:
        upstream.bind(("127.0.0.1", UPSTREAM_PORT))
        upstream.listen()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP) as client:
            client.connect(("127.0.0.1", proxy.port))
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    client.send(b"u" * (1 << 16))
            time.sleep(1.0)  # every queue full: nothing moves any more
            [child] = status_json(sock_path, env)["children"]
            out = subprocess.run(
                [need("ss"), "-tnH", "state", "established", f"( dport = :{UPSTREAM_PORT} )"],
                capture_output=True, text=True, timeout=30, check=True).stdout
            subflow_queue = int(out.split()[1])  # Send-Q (no Netid column with -t)
            assert subflow_queue > 0, out
            assert child["queued_to_upstream"] >= subflow_queue, (child, out)
            assert child["unanswered"] is not None and child["unanswered"] >= 0.5, child


def test_user_timeout_under_mptcpize_says_mptcp_is_why(
    tmp_path: Path, env: dict[str, str],
) -> None:
    """Linux takes no TCP_USER_TIMEOUT on an MPTCP socket: `mptcpize run forkproxy serve
    --user-timeout 30` exits 2 with one line, which said only `Protocol not available`
    (an operator looking for what is missing); it now names MPTCP and the two ways out."""
    done = subprocess.run(
        [*in_own_network(), need("mptcpize"), "run", FORKPROXY, "serve", "--user-timeout",
         "30", "--status-socket", str(tmp_path / "status.sock"), "127.0.0.1:0=127.0.0.1:7000"],
        capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 2, done
    [line] = done.stderr.splitlines()
    assert line.startswith("forkproxy: error: --user-timeout 30: cannot set it on "), line
    assert line.endswith(": Protocol not available (an MPTCP socket, `mptcpize run`: Linux does "
                         "not take this option on MPTCP sockets; run without it, or without "
                         "mptcpize)"), line
