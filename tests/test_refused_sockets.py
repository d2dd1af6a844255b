"""Listening sockets a sandbox refuses: socket() fails at start or at a reload with an
errno of the process's sandbox (a seccomp filter: systemd's RestrictAddressFamilies=, a
container runtime's profile; a security module; `mptcpize run` where MPTCP is off), not
of the port. tests/refuse_sockets.py installs such a filter and runs forkproxy under it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import refuse_nodelay
import refuse_sockets
from conftest import FORKPROXY, Proxy, Redis, ServerFactory, echo, recv_all, wait_for

REFUSE = str(Path(__file__).with_name("refuse_sockets.py"))
REFUSE_NODELAY = str(Path(__file__).with_name("refuse_nodelay.py"))
POLICY = "refused by a seccomp filter or a security module's policy: SELinux, AppArmor"


@pytest.fixture
def refuse() -> Callable[[str, str], tuple[str, ...]]:
    """The command prefix that runs a program with socket(FAMILY) refused with ERRNO; on
    a machine refuse_sockets.py does not know, the test fails (never a skip)."""
    if not refuse_sockets.supported():
        pytest.fail("tests/refuse_sockets.py knows the seccomp ABI of x86_64 and aarch64 only")
    return lambda family, error: (sys.executable, REFUSE, family, error)


@pytest.mark.parametrize(
    ("family", "error", "args", "expected"),
    [
        ("AF_INET", "EACCES", ["127.0.0.1:0=127.0.0.1:1"],
         f"cannot listen on 127.0.0.1:0: cannot open a socket: Permission denied ({POLICY}) "
         "(for 127.0.0.1:0=127.0.0.1:1)"),
        ("AF_INET", "EPERM", ["127.0.0.1:0=127.0.0.1:1"],
         f"cannot listen on 127.0.0.1:0: cannot open a socket: Operation not permitted "
         f"({POLICY}) (for 127.0.0.1:0=127.0.0.1:1)"),
        # What `mptcpize run` gets in a network namespace with net.mptcp.enabled=0.
        ("AF_INET", "ENOPROTOOPT", ["127.0.0.1:0=127.0.0.1:1"],
         "cannot listen on 127.0.0.1:0: cannot open a socket: Protocol not available (under "
         "`mptcpize run`: MPTCP is off in this network namespace, net.mptcp.enabled=0, or "
         "not in this kernel) (for 127.0.0.1:0=127.0.0.1:1)"),
        # systemd's RestrictAddressFamilies=AF_UNIX AF_INET6: it said "no IPv6 on this host".
        ("AF_INET", "EAFNOSUPPORT", ["127.0.0.1:0=127.0.0.1:1"],
         "cannot listen on 127.0.0.1:0: IPv4 sockets are refused to this process (Address "
         "family not supported by protocol: a seccomp filter, such as systemd's "
         "RestrictAddressFamilies= without AF_INET) (for 127.0.0.1:0=127.0.0.1:1)"),
        # The listener binds; the metrics port cannot: the listener is closed again.
        ("AF_INET6", "EACCES", ["127.0.0.1:0=127.0.0.1:1", "--metrics", "[::1]:0"],
         f"--metrics '[::1]:0': cannot listen on [::1]:0: cannot open a socket: Permission "
         f"denied ({POLICY})"),
    ],
)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_listener_socket_refused_by_a_sandbox_is_one_line_and_exit_2(
    tmp_path: Path, refuse: Callable[[str, str], tuple[str, ...]], family: str, error: str,
    args: list[str], expected: str, log_format: str,
) -> None:
    """It was a 25-line traceback and exit 1 (EAFNOSUPPORT alone was handled), and with
    --log-format json no start-failed record. Nothing is left half-started: no socket
    file, no process of its session."""
    sock = tmp_path / "status.sock"
    proc = subprocess.Popen(
        [*refuse(family, error), FORKPROXY, "serve", *args, "--log-format", log_format,
         "--status-socket", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    stdout, stderr = proc.communicate(timeout=30)
    assert (proc.returncode, stdout) == (2, ""), stderr
    if log_format == "text":
        assert stderr == f"forkproxy: error: {expected}\n"
    else:
        [line] = stderr.splitlines()
        record = json.loads(line)
        assert (record["level"], record["event"], record["error"]) == (
            "error", "start-failed", expected)
    assert not sock.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no child left behind (a resolver, the metrics process)


@pytest.mark.parametrize(("error", "expected"), [
    ("EACCES", f"cannot listen on [::1]:6379: cannot open a socket: Permission denied "
               f"({POLICY}) (for A_PORT_6379_TCP)"),
    # The whole system's limit: it advised `ulimit -n`, which raises this process's alone.
    ("ENFILE", "out of file descriptors for new listening sockets: Too many open files in "
               "system (the host's file table is full, not this process's limit: raise the "
               "host's fs.file-max, or end what holds so many files)"),
])
def test_a_reload_whose_new_listener_is_refused_by_a_sandbox_says_so_as_a_start_does(
    tmp_path: Path, short_dir: Path, refuse: Callable[[str, str], tuple[str, ...]],
    start_proxy: Callable[..., Proxy], error: str, expected: str,
) -> None:
    """A reload that adds an IPv6 listener where IPv6 sockets are refused (EACCES) or the
    system is out of files (ENFILE): the reload fails, naming the port and why in the
    words a start uses (it said "cannot open a listening socket: Permission denied", no
    port), or the limit to raise; the running listener serves on."""
    env_file = tmp_path / "links.env"
    env_file.write_text("# no link yet\n")
    sock_path = short_dir / "s.sock"
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        target = upstream.getsockname()[1]
        proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{target}", "--env-file", str(env_file),
                            "--bind", "::1", "--status-socket", str(sock_path),
                            prefix=refuse("AF_INET6", error))
        env_file.write_text(f"A_PORT_6379_TCP=tcp://127.0.0.1:{target}\n")
        result = subprocess.run([FORKPROXY, "reload", "--status-socket", str(sock_path)],
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 1, result
        assert expected in result.stderr, result.stderr
        assert "ulimit -n" not in result.stderr, result.stderr
        assert wait_for(lambda: "reload-failed" in proxy.log()), proxy.log()
        [failed] = [line for line in proxy.log().splitlines() if "reload-failed" in line]
        assert expected in failed, failed
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10):
            conn, _ = upstream.accept()
            conn.close()
        assert proxy.proc.poll() is None


def _unix_refused(error: str) -> str:
    """What forkproxy says of socket(AF_UNIX) refused with `error`."""
    why = {"EAFNOSUPPORT": "Address family not supported by protocol: a seccomp filter, such "
                           "as systemd's RestrictAddressFamilies= without AF_UNIX",
           "EACCES": "Permission denied: a seccomp filter or a security module's policy: "
                     "SELinux, AppArmor",
           "EPERM": "Operation not permitted: a seccomp filter or a security module's "
                    "policy: SELinux, AppArmor"}[error]
    return f"Unix sockets are refused to this process ({why}); allow AF_UNIX"


@pytest.mark.parametrize("error", ["EAFNOSUPPORT", "EACCES", "EPERM"])
@pytest.mark.parametrize("where", ["default", "given"])
def test_a_status_socket_refused_by_a_sandbox_is_not_blamed_on_its_directory(
    tmp_path: Path, short_dir: Path, refuse: Callable[[str, str], tuple[str, ...]],
    error: str, where: str,
) -> None:
    """systemd's RestrictAddressFamilies= without AF_UNIX (or a seccomp profile, a
    security module) refuses the status socket's socket(): serve said "status socket
    directory '/run/user/0/forkproxy': Address family not supported by protocol (set
    XDG_RUNTIME_DIR, or give --status-socket, elsewhere)", sending the operator to a
    directory that was fine, or blamed the --status-socket path. It says the system
    refused a Unix socket, and to allow AF_UNIX: one line, exit 2, nothing left behind."""
    sock = short_dir / "s.sock"
    given = ["--status-socket", str(sock)] if where == "given" else []
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    proc = subprocess.run(
        [*refuse("AF_UNIX", error), FORKPROXY, "serve", "127.0.0.1:0=127.0.0.1:1", *given],
        capture_output=True, text=True, timeout=30, env=env, start_new_session=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2, "", f"forkproxy: error: cannot open the status socket: {_unix_refused(error)}\n"
    ), proc
    assert [*short_dir.iterdir(), *tmp_path.rglob("*.sock")] == []


@pytest.mark.parametrize("command", ["status", "check", "reload"])
def test_a_client_refused_a_unix_socket_says_so_not_that_nothing_runs(
    short_dir: Path, refuse: Callable[[str, str], tuple[str, ...]],
    start_proxy: Callable[..., Proxy], command: str,
) -> None:
    """`status`, `check`, `reload` (a HEALTHCHECK in a sandboxed unit) refused
    socket(AF_UNIX) said "no running forkproxy found in DIR" beside a live supervisor,
    or "no answer on PATH", one that had died; `serve --take-over` said "nothing to take
    over". Each says the system refused a Unix socket, and to allow AF_UNIX."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(short_dir)}  # short: paths shown whole
    proxy = start_proxy("127.0.0.1:0=127.0.0.1:1", env=env)
    [path] = (short_dir / "forkproxy").glob("*.sock")
    refused = _unix_refused("EAFNOSUPPORT")
    for args, expected in [
            ([command], f"forkproxy: cannot look for a running forkproxy in "
                        f"'{short_dir}/forkproxy': {refused}"),
            ([command, "--status-socket", str(path)],
             f"forkproxy: cannot ask '{path}': {refused}")]:
        result = subprocess.run([*refuse("AF_UNIX", "EAFNOSUPPORT"), FORKPROXY, *args],
                                capture_output=True, text=True, timeout=30, env=env)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", f"{expected}\n"), (
            args, result)
    result = subprocess.run(
        [*refuse("AF_UNIX", "EAFNOSUPPORT"), FORKPROXY, "serve", "--take-over",
         "--status-socket", str(path), "127.0.0.1:0=127.0.0.1:1"],
        capture_output=True, text=True, timeout=30, env=env, start_new_session=True)
    assert (result.returncode, result.stderr) == (2, (
        f"forkproxy: error: --take-over: cannot ask the supervisor on '{path}': {refused}\n")
    ), result
    # Without --status-socket, found as `status` finds one: the same refusal, not
    # "nothing to take over" (which says no supervisor runs).
    result = subprocess.run(
        [*refuse("AF_UNIX", "EAFNOSUPPORT"), FORKPROXY, "serve", "--take-over",
         "127.0.0.1:0=127.0.0.1:1"],
        capture_output=True, text=True, timeout=30, env=env, start_new_session=True)
    assert (result.returncode, result.stderr) == (2, (
        f"forkproxy: error: --take-over: cannot look for a running forkproxy in "
        f"'{short_dir}/forkproxy': {refused}\n")), result
    assert proxy.proc.poll() is None
    check = subprocess.run([FORKPROXY, "check", "--status-socket", str(path)],
                           capture_output=True, text=True, timeout=30, env=env)
    assert check.returncode == 0, check  # it served on, untouched


def test_a_sandbox_refusing_netlink_leaves_unanswered_unknown_not_zero(
    short_dir: Path, refuse: Callable[[str, str], tuple[str, ...]],
    start_proxy: Callable[..., Proxy], redis: Redis,
) -> None:
    """systemd's RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6, the usual line of a
    hardened unit, refuses the NETLINK_SOCK_DIAG socket the kernel's view of the
    connections is read through. With redis stopped under a waiting request,
    forkproxy_upstream_unanswered_seconds read 0 ("none waits": an alert on it never
    fired) and `status` showed `-` without a word. The sample is left out (unknown), and
    `status` says on stderr why those figures are missing, in one line."""
    sock = short_dir / "s.sock"
    link = f"127.0.0.1:0=127.0.0.1:{redis.port}"
    sandbox = refuse("AF_NETLINK", "EAFNOSUPPORT")
    proxy = start_proxy(link, "--status-socket", str(sock), "--metrics", "127.0.0.1:0",
                        expect=2, prefix=sandbox)
    url = proxy.lines[-1].removeprefix("metrics ")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as client:
        client.sendall(b"PING\r\n")
        assert client.recv(7) == b"+PONG\r\n"
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            client.sendall(b"PING\r\n")
            # Unanswered: the request is in the stopped redis's receive queue (a fixed
            # 1.5 s could end, under load, before the proxy had passed it on).
            assert wait_for(lambda: queued_at(redis.port) == [6], 30), queued_at(redis.port)
            with urllib.request.urlopen(url, timeout=30) as response:
                text = response.read().decode()
            found = {(sample.name, sample.labels.get("link")): sample.value
                     for family in text_string_to_metric_families(text)
                     for sample in family.samples}
            assert ("forkproxy_connections_active", link) in found, text  # a real scrape
            assert ("forkproxy_upstream_unanswered_seconds", link) not in found, text
            # The sandbox's own `status` (ExecReload=, a HEALTHCHECK): it says why.
            result = subprocess.run([*sandbox, FORKPROXY, "status", "--status-socket",
                                     str(sock)], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result
            assert result.stderr == (
                "forkproxy: warning: the kernel's view of the connections' sockets cannot "
                "be read here (NETLINK_SOCK_DIAG: Address family not supported by "
                "protocol): their IDLE, QUEUED TO CLIENT, QUEUED TO UPSTREAM and "
                "UNANSWERED are not known; allow AF_NETLINK (systemd's "
                "RestrictAddressFamilies=)\n"), result
            lines = result.stdout.splitlines()
            header = next(i for i, line in enumerate(lines) if line.startswith("PID "))
            [row] = [line.split() for line in lines[header + 1:] if line.strip()]
            # The links' QUEUED is the listener's accept queue, which the supervisor reads
            # itself, not through sock_diag: a number still, which the warning must not
            # call unknown. LINK LISTEN -> UPSTREAM ACTIVE WAITING QUEUED DROPS ...
            links_header = next(i for i, line in enumerate(lines) if line.startswith("LINK "))
            [link_row] = [line.split() for line in lines[links_header + 1:header]
                          if line.strip()]
            assert link_row[6] == "0", link_row
            # PID LINK CLIENT UPSTREAM AGE IDLE UP DOWN QUEUED QUEUED UNANSWERED RSS USS CPU
            assert (row[5], row[8], row[9], row[10]) == ("-", "-", "-", "-"), row
            as_json = subprocess.run([*sandbox, FORKPROXY, "status", "--json",
                                      "--status-socket", str(sock)],
                                     capture_output=True, text=True, timeout=60)
            reply = json.loads(as_json.stdout)
            assert reply["sockets_unread"] == (
                "NETLINK_SOCK_DIAG: Address family not supported by protocol"), reply
            assert [child["unanswered"] for child in reply["children"]] == [None], reply
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        assert client.recv(7) == b"+PONG\r\n"


def queued_at(port: int) -> list[int]:
    """The receive queues (bytes unread) of the established TCP sockets on local `port`,
    as the kernel shows them to `ss` (run here, outside any sandbox)."""
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("metrics", [True, False])
def test_a_sandbox_refusing_netlink_is_said_once_at_start(
    short_dir: Path, refuse: Callable[[str, str], tuple[str, ...]],
    start_proxy: Callable[..., Proxy], metrics: bool,
) -> None:
    """Under a sandbox refusing AF_NETLINK, serve said nothing at start: the metrics
    process left its UNANSWERED sample out, and `status` said why, only once a connection
    was live to be read. One warning at start names what will be missing and why, before
    `listening`; none without the sandbox."""
    sandbox = refuse("AF_NETLINK", "EAFNOSUPPORT")
    extra = ("--metrics", "127.0.0.1:0") if metrics else ()
    for prefix in (sandbox, ()):
        sock = short_dir / f"s{len(prefix)}.sock"
        proxy = start_proxy("127.0.0.1:0=127.0.0.1:9", "--status-socket", str(sock), *extra,
                            expect=2 if metrics else 1, prefix=prefix)
        assert proxy.stop() == 0
        log = proxy.log().splitlines()
        lines = [line for line in log if " sockets-unread " in line]
        if not prefix:
            assert lines == [], log
            continue
        metric = ("the metric forkproxy_upstream_unanswered_seconds has no sample, "
                  if metrics else "")
        assert len(lines) == 1, log
        assert lines[0].endswith(
            " warning sockets-unread error=\"Address family not supported by protocol\" "
            "detail=\"the kernel's view of the connections' sockets (NETLINK_SOCK_DIAG) is "
            "refused to this process: a seccomp filter (systemd's RestrictAddressFamilies= "
            "without AF_NETLINK, a container's profile) or a security module; "
            f"{metric}`status` run in the same sandbox shows IDLE, QUEUED TO CLIENT, QUEUED "
            "TO UPSTREAM and UNANSWERED as unknown (`-`); allow AF_NETLINK to have them\""), lines
        events = [line.split()[3] for line in log]
        assert events.index("sockets-unread") < events.index("listening"), events


def test_a_socket_refusing_tcp_nodelay_is_relayed_not_cut(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory,
) -> None:
    """A kernel that refuses TCP_NODELAY on a connection's socket (an MPTCP one before
    Linux 5.17, EOPNOTSUPP: `mptcpize run` on Ubuntu 22.04's 5.15) had every connection
    cut with an RST and a relay-crashed line, the child's setsockopt() unguarded. Nagle
    is a latency hint: the bytes go through without it."""
    if not refuse_nodelay.supported():
        pytest.fail("tests/refuse_nodelay.py knows the seccomp ABI of x86_64 and aarch64 only")
    upstream = tcp_server(echo)
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{upstream.port}",
                        prefix=(sys.executable, REFUSE_NODELAY, "EOPNOTSUPP"))
    payload = os.urandom(256 * 1024)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client)[0] == len(payload)
    assert wait_for(lambda: " close " in proxy.log()), proxy.log()
    assert "relay-crashed" not in proxy.log(), proxy.log()
    assert proxy.proc.poll() is None
