"""Bad input through the real CLI: exit 2, one line naming the input, nothing left behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import signal
import site
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import typer

from forkproxy import __version__
from forkproxy.cli import PID_MAX_DEFAULT, app, check_pid_max, pid_max_unchecked
from forkproxy.config import ConfigError, Options, Sources, sources_to_json
from forkproxy.status import StatusError

import refuse_calls
from conftest import (
    FORKPROXY,
    Proxy,
    ServerFactory,
    as_user,
    blocked_writing,
    closed_by_peer,
    control,
    echo,
    free_port,
    full_pipe,
    kill_group,
    listening_ports,
    need,
    polled,
    polling_for_room,
    read_lines,
    wait_for,
)

REFUSE_CALLS = Path(__file__).with_name("refuse_calls.py")
PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def run(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, FORKPROXY, *args], capture_output=True, text=True, timeout=timeout,
        env={"PATH": os.environ["PATH"], **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("forkproxy: error: ")
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # no `listening` line: nothing was started


def assert_not_listening(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize("command", ["serve", "links"])
@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        (["6379"], {}, ["SPEC '6379'", "expected [BIND_ADDR:]LISTEN_PORT=HOST:PORT"]),
        (["70000=127.0.0.1:1"], {}, ["SPEC '70000=127.0.0.1:1'", "out of range"]),
        (["1=127.0.0.1:0"], {}, ["SPEC '1=127.0.0.1:0'", "out of range"]),
        (["1=$(touch /tmp/forkproxy-pwned):1"], {}, ["$(touch /tmp/forkproxy-pwned)"]),
        (["[::1=127.0.0.1:1"], {}, ["unclosed '['"]),
        (["7200=tcp://198.18.1.2:16379"], {},
         ["SPEC '7200=tcp://198.18.1.2:16379'", "drop 'tcp://'", "as in 7200=198.18.1.2:16379"]),
        (["TCP4-LISTEN:6379,fork,reuseaddr", "TCP4:198.18.1.2:16379"], {},
         ["SPEC 'TCP4-LISTEN:6379,fork,reuseaddr'", "socat syntax", "use '=' between the "
          "listen port and the target", ": 6379=HOST:PORT"]),
        (["6379:198.18.1.2:16379"], {},
         ["SPEC '6379:198.18.1.2:16379'", "use '=' between the listen port and the target",
          "as in 6379=198.18.1.2:16379"]),
        (["--from-env"], {}, ["no links found: no SPEC given, and no <ALIAS>_PORT_<N>_TCP "
                              "variable in the environment"]),
        # Only re-exports: ignored by design, which the line said nothing of.
        (["--from-env"], {"REDIS_ENV_REDIS_PORT_6379_TCP": "tcp://198.18.1.2:16379"},
         ["in the environment; ignored 1 variable, REDIS_ENV_REDIS_PORT_6379_TCP: an "
          "<ALIAS>_ENV_... variable is a linked container's own environment re-exported by "
          "Docker, not a link"]),
        ([], {}, ["no links found: give a SPEC, --from-env or --env-file"]),
        (["--from-env"], {"R_PORT_1_TCP": "tcp://;reboot:1"}, ["variable R_PORT_1_TCP"]),
        # Linux refuses to connect to them: every connection failed, each logged.
        (["1=[ff02::1]:80"], {}, ["SPEC '1=[ff02::1]:80': 'ff02::1' is a multicast address: "
                                  "TCP cannot connect to it"]),
        (["--from-env"], {"R_PORT_1_TCP": "tcp://255.255.255.255:1"},
         ["variable R_PORT_1_TCP: '255.255.255.255' is the broadcast address"]),
        (["--from-env"], {"A_PORT_7_TCP": "tcp://127.0.0.1:1", "B_PORT_7_TCP": "tcp://127.0.0.2:1"},
         ["A_PORT_7_TCP", "B_PORT_7_TCP"]),
        (["--env-file", "/nonexistent/links.env"], {}, ["/nonexistent/links.env"]),
    ],
)
def test_bad_input_exits_2_with_one_line(
    command: str, args: list[str], env: dict[str, str], needles: list[str]
) -> None:
    assert_one_line_error(run(command, *args, env=env), *needles)
    assert not Path("/tmp/forkproxy-pwned").exists()


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (["--max-children", "0"], "--max-children 0"),
        (["--max-children", "99999999999999999999"], "--max-children '99999999999999999999': too"),
        (["--relay", "magic"], "--relay 'magic'"),
        (["--connect-timeout", "0"], "--connect-timeout 0"),
        (["--allow", "300.0.0.0/8"], "--allow '300.0.0.0/8'"),
        # A list written with commas: the token as typed, and how to write it.
        (["--allow", "10.0.0.0/8,192.168.0.0/16"], "--allow '10.0.0.0/8,192.168.0.0/16': not "
         "an IPv4 or IPv6 CIDR: networks are separated by spaces in FORKPROXY_ALLOW, and "
         "--allow is repeated on the command line, not joined with commas"),
        (["--metrics", "nowhere"], "--metrics 'nowhere'"),
        # poll() takes a C int of milliseconds: longer would crash a relay or the supervisor.
        (["--grace", "1e10"], "--grace '1e10': at most 2,000,000 seconds"),
        (["--idle-timeout", "2000001"], "--idle-timeout '2000001': at most 2,000,000 seconds"),
        (["--halfclose-timeout", "9e9"], "--halfclose-timeout '9e9'"),
        (["--connect-timeout", "3e6"], "--connect-timeout '3e6'"),
        (["--resolve-every", "0"], "--resolve-every 0"),
        (["--keepalive", "1.5"], "--keepalive '1.5': a whole number of seconds from 1 to 32767"),
        (["--keepalive", "0"], "--keepalive '0': a whole number of seconds from 1 to 32767"),
        (["--keepalive", "forever"], "--keepalive 'forever': not a number of seconds"),
        (["--user-timeout", "0"], "--user-timeout 0: at least 0.001 seconds, or 'off'"),
        (["--resolve-every", "soon"], "--resolve-every 'soon': not a number of seconds"),
        (["--resolve-every", "0.2"], "--resolve-every 0.2: at least 1 second, or 'off'"),
        (["--bind", "localhost"], "--bind 'localhost': bind address 'localhost' is not an IP"),
        (["--bind", "[::1"], "--bind '[::1': bind address '[::1' is not an IP address"),
        # Brackets hold IPv6 only, as in a SPEC's BIND_ADDR (`[127.0.0.1]:1=...`).
        (["--bind", "[127.0.0.1]"],
         "--bind '[127.0.0.1]': '127.0.0.1' in brackets is not an IPv6 address"),
    ],
)
def test_bad_options_exit_2(option: list[str], needle: str) -> None:
    assert_one_line_error(run("serve", *option, "127.0.0.1:0=127.0.0.1:1"), needle)


def test_max_children_above_the_kernels_pid_max_is_refused() -> None:
    """More children than pid_max lets processes exist was served silently: a limit no
    stop could reach, most likely a digit too many. It is bad input now, named by where
    it came from (the flag or its variable), with the kernel's value."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    over = str(pid_max + 1)
    if pid_max >= 1 << 22:
        # pid_max at PID_MAX_LIMIT (systemd sets it so): its ceiling is --max-children's
        # own, which the parser refuses first; that line is the one to expect then.
        needle = "at most 4194304, the kernel's limit on processes"
    else:
        needle = (f"more than this kernel's pid_max, {pid_max} (/proc/sys/kernel/pid_max): "
                  "that many processes cannot exist at once")
    result = run("serve", "--max-children", over, "127.0.0.1:0=127.0.0.1:1")
    assert_one_line_error(result, f"--max-children {over}: {needle}")
    result = run("serve", "127.0.0.1:0=127.0.0.1:1", env={"FORKPROXY_MAX_CHILDREN": over})
    assert_one_line_error(result, f"FORKPROXY_MAX_CHILDREN (--max-children) {over}: {needle}")
    # pid_max itself passes: the start goes on to the next check, an empty socket path,
    # which the supervisor refuses after the exec (so nothing is left running).
    result = run("serve", "--max-children", str(pid_max), "--status-socket", "",
                 "127.0.0.1:0=127.0.0.1:1")
    assert_one_line_error(result, "--status-socket '': an empty path")


@pytest.mark.parametrize("pid_max", [None, 1000, 32768, 1 << 22])
def test_check_pid_max_refuses_only_a_given_value_above_it(pid_max: int | None) -> None:
    """check_pid_max itself, at pid_max values this machine may not have (the CLI test
    above reaches it only where pid_max is below --max-children's own ceiling)."""
    for value in (1, 999, 1000, 1001, 32768, 32769, 1 << 22):
        given = Options(max_children=value)
        if pid_max is not None and value > pid_max:
            with pytest.raises(ConfigError, match=(
                    rf"^--max-children {value}: more than this kernel's pid_max, {pid_max} ")):
                check_pid_max(given, pid_max)
        else:
            check_pid_max(given, pid_max)  # at or below, or no pid_max read: no error
        # A derived value is never refused: the operator did not choose it.
        check_pid_max(Options(max_children=value, max_children_given=False), pid_max)


@pytest.mark.parametrize(("value", "warned"), [(str(PID_MAX_DEFAULT + 1), True),
                                                ("1000", False)])
def test_max_children_unchecked_under_a_proc_of_pids_only_is_said_at_start(
    short_dir: Path, value: str, warned: bool,
) -> None:
    """systemd's ProcSubset=pid (proc mounted with subset=pid) hides /proc/sys: a
    --max-children given was not checked against pid_max, without a word. One warning
    at start says so now, and why; a value no kernel's default pid_max is below is
    not warned of (only `-v` would show it: nothing to do about it)."""
    script = ('mount -t proc -o subset=pid,hidepid=invisible proc /proc && '
              'test ! -e /proc/sys/kernel/pid_max && test -d /proc/self && exec "$@"')
    result = subprocess.run(
        [need("unshare"), "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c", script,
         "sh", "timeout", "-s", "TERM", "2", FORKPROXY, "serve", "127.0.0.1:0=127.0.0.1:9",
         "--max-children", value, "--status-socket", str(short_dir / "s.sock")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.startswith("listening "), result  # served, as before
    lines = [line for line in result.stderr.splitlines() if " pid-max-unknown " in line]
    if not warned:
        assert lines == [], result.stderr
        return
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith(
        f" warning pid-max-unknown value={value} detail=\"--max-children {value} was not "
        "checked against the kernel's pid_max: /proc/sys/kernel/pid_max: /proc/sys is "
        "hidden (a /proc of processes only: proc mounted with subset=pid, systemd's "
        "ProcSubset=pid); more than pid_max is served, and the forks past it fail "
        "(fork-failed): give at most what `sysctl kernel.pid_max` says on the host\""), lines
    events = [line.split()[3] for line in result.stderr.splitlines()]
    assert events.index("pid-max-unknown") < events.index("listening"), events


def test_pid_max_unchecked_only_for_a_given_value_that_could_be_above_it() -> None:
    """pid_max_unchecked itself: nothing when pid_max was read, or the value derived, or
    no more than PID_MAX_DEFAULT; else the reason, in the words given."""
    over = PID_MAX_DEFAULT + 1
    assert pid_max_unchecked(Options(max_children=over), "") is None
    assert pid_max_unchecked(Options(max_children=over, max_children_given=False),
                             "hidden") is None
    assert pid_max_unchecked(Options(max_children=PID_MAX_DEFAULT), "hidden") is None
    said = pid_max_unchecked(Options(max_children=over), "hidden")
    assert said is not None and said.startswith(
        f"--max-children {over} was not checked against the kernel's pid_max: hidden; "), said


def test_port_in_use_is_named_and_nothing_is_half_started() -> None:
    first = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = run("serve", f"127.0.0.1:{first}=127.0.0.1:1", f"127.0.0.1:{busy}=127.0.0.1:1")
    # How to find who holds it (two proxies on one host in a handover: the old one drains).
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{busy}", "address already in use",
                          f"(another program's socket holds it: `ss -tanp 'sport = :{busy}'` "
                          "names it, a listener or a connection from that port; a TIME-WAIT "
                          "ends within 60 s)")
    assert_not_listening(first)  # the first listener was closed again, not left behind


def test_a_port_held_by_a_connection_in_time_wait_is_not_blamed_on_a_listener() -> None:
    """A connection from the port, closed first on that side without SO_REUSEADDR, holds
    it in TIME-WAIT for 60 s, and the kernel refuses our bind (SO_REUSEADDR needs both
    sides'). The line said "another program listens there", and named `ss -ltnp`, which
    lists listeners only: nothing. It names what shows the TIME-WAIT."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket() as client:
        client.bind(("127.0.0.1", 0))
        held = client.getsockname()[1]
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        client.close()  # this side first: its port goes to TIME-WAIT
        accepted.close()
        states = subprocess.run(["ss", "-Htan", f"sport = :{held}"], capture_output=True,
                                text=True, check=True).stdout
        assert "TIME-WAIT" in states, states  # the setting, as the user meets it
        assert not subprocess.run(["ss", "-Hltn", f"sport = :{held}"], capture_output=True,
                                  text=True, check=True).stdout  # no listener to name
        result = run("serve", f"127.0.0.1:{held}=127.0.0.1:1")
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{held}", "address already in use",
                          f"`ss -tanp 'sport = :{held}'` names it", "a TIME-WAIT")


def test_listeners_that_overlap_are_named_not_blamed_on_another_program() -> None:
    """An IPv4-mapped bind address, and --metrics on a listener's port, ended in "cannot
    listen on ...: address already in use", as if another program held the port."""
    port = free_port()
    result = run("serve", f"127.0.0.1:{port}=127.0.0.1:1", f"[::ffff:127.0.0.1]:{port}=127.0.0.1:1")
    assert_one_line_error(result, f"port {port} is bound twice", "overlap")
    spec = f"127.0.0.1:{port}=127.0.0.1:1"
    result = run("serve", "--metrics", f"127.0.0.1:{port}", spec)
    assert_one_line_error(result, f"--metrics '127.0.0.1:{port}': port {port} is bound twice: "
                                  f"the metrics endpoint on 127.0.0.1 and {spec} on 127.0.0.1 "
                                  "overlap")
    result = run("serve", spec, env={"FORKPROXY_METRICS": f"127.0.0.1:{port}"})
    assert_one_line_error(result, f"FORKPROXY_METRICS (--metrics) '127.0.0.1:{port}': port {port}")
    assert_not_listening(port)


@pytest.mark.parametrize("how", [["--log-format", "json"], ["--log-format=json", "-qq"], []])
def test_with_log_format_json_a_start_error_is_one_json_record(how: list[str]) -> None:
    """A log pipeline that parses every line reads why serve did not start: both the
    errors found before the supervisor runs and those it finds (a port in use). An
    option given twice too, found before the format is parsed: it was plain text; and a
    SPEC typed as an option with a typographic dash, a JSON record before its hint moved
    to the parsing of the command line, and plain text there."""
    env = {} if how else {"FORKPROXY_LOG_FORMAT": "json"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        results = {
            "SPEC '6379=10.0.0.5:http': port 'http' is not a number":
                run("serve", *how, "6379=10.0.0.5:http", env=env),
            f"cannot listen on 127.0.0.1:{busy}: address already in use":
                run("serve", *how, f"127.0.0.1:{busy}=127.0.0.1:1", env=env),
            "--env-file given twice: forkproxy reads one env file":
                run("serve", *how, "--env-file", "a.env", "--env-file=b.env", "0=a.test:1",
                    env=env),
            "--bind given twice: links listen on one default address":
                run("serve", "--bind", "127.0.0.1", *how, "--bind", "::1", "0=a.test:1",
                    env=env),
            "--metrics given twice: forkproxy serves metrics on one address":
                run("serve", "--metrics=127.0.0.1:0", "--metrics", "[::1]:0", *how,
                    "0=a.test:1", env=env),
            "SPEC '\u2014from-env': '\u2014' (U+2014) is no hyphen: an option is written "
            "with two ASCII hyphens, as in --from-env":
                run("serve", *how, "\u2014from-env", env=env),
            "SPEC '\u2014json': '\u2014' (U+2014) is no hyphen, and --json is an option of "
            "status, not of forkproxy serve":
                run("serve", "\u2014json", *how, "0=a.test:1", env=env),
        }
    for needle, result in results.items():
        assert result.returncode == 2, result
        assert result.stdout == ""
        [line] = result.stderr.splitlines()
        record = json.loads(line)
        assert (record["level"], record["event"]) == ("error", "start-failed"), record
        assert needle in record["error"], record
        assert isinstance(record["pid"], int) and record["ts"].endswith("Z"), record


@pytest.mark.parametrize("args", [["links", "6379=198.18.0.5:6379"], ["--version"], ["--help"]])
def test_output_that_cannot_be_written_is_one_line_not_a_traceback(args: list[str]) -> None:
    """stdout on /dev/full (a full disk): a traceback (found by a code review)."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([FORKPROXY, *args], stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=30, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 1, result
    assert result.stderr == "forkproxy: error: cannot write: No space left on device\n", result


def test_a_failure_other_than_the_outputs_is_not_said_as_cannot_write() -> None:
    """Any OSError reaching cli.main was said as `cannot write: ...`, sending the operator
    to stdout and the disk. A file size limit (`ulimit -f`) below serve's configuration
    cut its write to the memfd short (the supervisor then died of half a JSON document,
    in a traceback), and the next write fails with EFBIG: said as a failed call, where."""
    result = run("serve", "127.0.0.1:0=127.0.0.1:1", prefix=(need("prlimit"), "--fsize=1"))
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert re.fullmatch(r"forkproxy: error: a system call failed in serve \(cli\.py:[1-9]\d*\): "
                        r"File too large \(EFBIG\)\n", result.stderr), result.stderr


def test_a_failed_call_is_placed_at_forkproxys_own_line_not_in_the_standard_library(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """console.unexpected names where forkproxy's own code made the call that failed,
    the innermost of its frames: a call failing inside a standard module (os.fdopen's
    io.open, here) was to be named by forkproxy's line, not by os.py's, which says
    nothing of what forkproxy was doing. A real failed call from a function compiled as
    a forkproxy module's."""
    from forkproxy import console

    namespace: dict[str, Any] = {"__name__": "forkproxy.site", "os": os}
    exec(compile("def reopen():\n    return os.fdopen(999999)\n", "site.py", "exec"),
         namespace)
    with pytest.raises(OSError) as failed:
        namespace["reopen"]()
    capfd.readouterr()
    assert console.unexpected(failed.value) == 1
    assert capfd.readouterr().err == (
        "forkproxy: error: a system call failed in reopen (site.py:2): Bad file descriptor "
        "(EBADF)\n")


def test_a_reader_gone_after_the_first_line_is_no_error() -> None:
    """`forkproxy links ... | head -1` exited 1 with nothing on stderr (click's answer to
    EPIPE): a `set -o pipefail` script failed for its reader's choice. The output (5000
    lines, more than a pipe holds) is cut where the reader left; the status is links'."""
    specs = [f"{port}=redis:5" for port in range(10001, 15001)]
    with subprocess.Popen([FORKPROXY, "links", *specs], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env={"PATH": os.environ["PATH"]}) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()
            proc.stdout.close()  # as head -1 does: the rest is still to be written
            assert line == "listen 0.0.0.0:10001 -> redis:5 (10001=redis:5)\n"
            assert proc.wait(30) == 0
            assert proc.stderr.read() == ""
        finally:
            kill_group(proc)


def test_bind_is_the_default_address_of_specs_too(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory
) -> None:
    """`serve 7200=HOST:PORT --bind ADDR` listened on 0.0.0.0:7200 without a word: whoever
    meant to keep the listener off the other interfaces was exposed on all of them. A SPEC
    without a BIND_ADDR now listens on --bind's (FORKPROXY_BIND's); one with its own keeps it."""
    server = tcp_server(echo)
    own = f"127.0.0.1:0=127.0.0.1:{server.port}"
    listed = run("links", "7200=198.18.1.2:16379", "0.0.0.0:7201=198.18.1.2:16379",
                 env={"FORKPROXY_BIND": "127.0.0.2"})
    assert listed.returncode == 0, listed
    assert listed.stdout == ("listen 127.0.0.2:7200 -> 198.18.1.2:16379 (7200=198.18.1.2:16379)\n"
                             "listen 0.0.0.0:7201 -> 198.18.1.2:16379 "
                             "(0.0.0.0:7201=198.18.1.2:16379)\n")
    proxy = start_proxy(f"0=127.0.0.1:{server.port}", own, "--bind", "127.0.0.2", expect=2)
    assert proxy.lines[0].startswith("listening 127.0.0.2:"), proxy.lines
    assert proxy.lines[1].startswith("listening 127.0.0.1:"), proxy.lines
    with socket.create_connection(("127.0.0.2", proxy.ports[0]), timeout=5) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
    # Not on every interface: the supervisor's own listeners, not a connect to 127.0.0.1 at
    # that port, which now and then met another program's listener there (a port the
    # kernel chose for 127.0.0.2 is free to be chosen for 127.0.0.1 too).
    listening = {conn.laddr for conn in psutil.Process(proxy.pid).net_connections("tcp")
                 if conn.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.2", proxy.ports[0]), ("127.0.0.1", proxy.ports[1])}, (
        listening)


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["check"], ["reload"],
                                     ["reload", "--pid-file"], ["links", "6379=redis:5"],
                                     ["--version"]])
def test_no_reader_for_a_commands_output_is_no_error(
    start_proxy: Callable[..., Proxy], short_dir: Path, command: list[str],
) -> None:
    """Every command that prints, as `serve` with its `listening` lines: its stdout's
    reader gone before it wrote (`| true`) is said nowhere and changes no status (click
    exited 1). The proxy is up, so each of them has its output to write."""
    sock, pid_file = short_dir / "s.sock", short_dir / "pid"
    start_proxy("--status-socket", str(sock), "--pid-file", str(pid_file),
                "127.0.0.1:0=127.0.0.1:1")
    if command[-1] == "--pid-file":
        command = [*command, str(pid_file)]
    elif command[0] in ("status", "check", "reload"):
        command = [*command, "--status-socket", str(sock)]
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run([FORKPROXY, *command],
                                stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60,
                                env={"PATH": os.environ["PATH"]})
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr) == (0, ""), result


@pytest.mark.parametrize(("args", "status", "stdout"), [
    (("links", "--from-env", "1=127.0.0.1:2"), 0,
     "listen 0.0.0.0:1 -> 127.0.0.1:2 (1=127.0.0.1:2)\n"),
    (("serve", "--bogus"), 2, ""),  # click's usage error
    ((), 2, ""),  # no command: the help, on stderr
    (("serve", "bad"), 2, ""),  # forkproxy's own error line (log.write_start_error)
])
def test_no_reader_for_stderr_is_no_error(args: tuple[str, ...], status: int,
                                          stdout: str) -> None:
    """As for stdout (above): `links` with a warning to write (a UDP link variable) to a
    stderr whose reader was gone exited 1 with no word, before writing its `listen`
    lines; a usage error exited 1 too. Each ends now as it would have, with its own
    status and its output."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run([FORKPROXY, *args], stdout=subprocess.PIPE, stderr=writer,
                                text=True, timeout=30,
                                env={"PATH": os.environ["PATH"],
                                     "A_PORT_1_UDP": "udp://127.0.0.1:3"})
    finally:
        os.close(writer)
    assert (result.returncode, result.stdout) == (status, stdout), result


COMMANDS = list(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_no_reader_for_the_help_is_no_error(command: list[str]) -> None:
    """`forkproxy --help | true` exited 1, saying nothing (click's answer to EPIPE, in its
    own main), where every command's output to a reader gone is no error (above). Every
    command: one added without cls=_Command would exit 1 again."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run([FORKPROXY, *command, "--help"],
                                stdout=writer, stderr=subprocess.PIPE, text=True, timeout=30,
                                env={"PATH": os.environ["PATH"]})
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr) == (0, ""), result


def test_low_port_without_privilege() -> None:
    # Root without CAP_NET_BIND_SERVICE is refused low ports just as any user is.
    unprivileged: tuple[str, ...] = ()
    if os.geteuid() == 0:
        unprivileged = (need("setpriv"), "--bounding-set=-net_bind_service")
    result = run("serve", "127.0.0.1:81=127.0.0.1:1", prefix=unprivileged)
    # What to change, whoever runs it: the capability or the sysctl (podman does not
    # lower it as Docker 20.10+ does); "need root" misled root without the capability.
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip()
    assert_one_line_error(result, "127.0.0.1:81", "permission denied (ports below "
                          f"net.ipv4.ip_unprivileged_port_start, {start} here, need "
                          "CAP_NET_BIND_SERVICE)")


def test_a_status_socket_path_that_is_not_a_socket_is_refused_and_kept(tmp_path: Path) -> None:
    """connect() to a regular file is refused like one to a dead socket: the file used to
    be taken for a crashed supervisor's socket and deleted."""
    precious = tmp_path / "precious.conf"
    precious.write_text("keep me\n")
    result = run("serve", "--status-socket", str(precious), "127.0.0.1:0=127.0.0.1:1")
    assert_one_line_error(result, f"--status-socket '{precious}'", "not a socket")
    assert precious.read_text() == "keep me\n"


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        # A short staging name used to bind and be renamed to it: nobody could connect.
        ("/tmp/" + "s" * 103 + ".sock", "longer than the 107 bytes"),
        ("", "--status-socket '': an empty path"),  # would autobind an unnamed socket
    ],
)
def test_a_status_socket_path_no_client_could_reach_is_refused(path: str, needle: str) -> None:
    assert_one_line_error(run("serve", "--status-socket", path, "127.0.0.1:0=127.0.0.1:1"), needle)


def test_an_unusable_default_socket_directory_is_named(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.write_text("")  # a file where $XDG_RUNTIME_DIR should be a directory
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    assert_one_line_error(run("serve", "127.0.0.1:0=127.0.0.1:1", env=env),
                          f"status socket directory '{runtime}/forkproxy': Not a directory")
    for command in ("status", "check", "reload"):
        result = run(command, env=env)
        assert result.returncode == 1, result
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result
        assert f"'{runtime}/forkproxy': Not a directory" in result.stderr


ELSEWHERE = "(set XDG_RUNTIME_DIR, or give --status-socket, elsewhere)"


def test_a_missing_or_foreign_xdg_runtime_dir_says_where_to_go_instead(tmp_path: Path) -> None:
    """XDG_RUNTIME_DIR missing (no login session: /run/user/UID is not there) or another
    user's (`su` keeps root's /run/user/0): serve's exit-2 line said only `No such file or
    directory` or `Permission denied`, where one not owned says where to go instead.
    Both say it now. Another user's: 0700, and root without CAP_DAC_OVERRIDE."""
    missing = tmp_path / "run-user-999"
    foreign = tmp_path / "run-user-0"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    unprivileged = (need("setpriv"), "--bounding-set=-dac_override,-dac_read_search")
    for runtime, why in ((missing, "No such file or directory"), (foreign, "Permission denied")):
        result = run("serve", "127.0.0.1:0=127.0.0.1:1", env={"XDG_RUNTIME_DIR": str(runtime)},
                     prefix=unprivileged)
        assert_one_line_error(result)
        assert result.stderr == (f"forkproxy: error: status socket directory "
                                 f"'{runtime}/forkproxy': {why} {ELSEWHERE}\n"), result
    # `status` there, which cannot look in it, says so too (a missing one is no error:
    # it looks in /tmp/forkproxy-UID then).
    result = run("status", env={"XDG_RUNTIME_DIR": str(foreign)}, prefix=unprivileged)
    assert result.returncode == 1, result
    assert result.stderr == (f"forkproxy: cannot look for a running forkproxy in "
                             f"'{foreign}/forkproxy': Permission denied {ELSEWHERE}\n"), result


def test_the_default_directory_in_a_user_namespace_is_named_by_the_real_uid() -> None:
    """Inside a user namespace (`unshare -r`, rootless podman, rootlesskit) with no
    XDG_RUNTIME_DIR, the default directory was named by the uid inside: a user's `unshare
    -Ur` (uid 0 there) made /tmp/forkproxy-0, owned by that user, and root's next plain
    `serve` exited 2. Named by the uid outside now: here root, mapped to an unused uid
    inside, uses root's /tmp/forkproxy-0 (owned by it, so it passes the owner check)
    and makes no directory named for that other uid."""
    inside = 1_700_000_000 + os.getpid()  # no one's
    squatted = Path(f"/tmp/forkproxy-{inside}")
    os.makedirs("/tmp/forkproxy-0", mode=0o700, exist_ok=True)  # root's, as serve makes it
    proc = subprocess.Popen(
        [need("unshare"), "--user", f"--map-user={inside}", f"--map-group={inside}",
         FORKPROXY, "serve", "127.0.0.1:0=127.0.0.1:1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={"PATH": os.environ["PATH"]})
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if " status-socket " in line or " start-failed " in line:
                break
        assert re.search(r" status-socket path=/tmp/forkproxy-0/[0-9]+\.sock$", lines[-1]), lines
        assert not squatted.exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
        if squatted.exists():
            shutil.rmtree(squatted)  # made without the fix: not left behind


def test_an_older_supervisors_socket_named_by_the_uid_inside_is_found(tmp_path: Path) -> None:
    """An upgrade in place inside a user namespace: the older supervisor's socket is in
    /tmp/forkproxy-<uid inside> (its naming), while the new `status`, `check`, `reload`
    and `serve --take-over` looked only in /tmp/forkproxy-<uid outside>: "no running
    forkproxy found". Looked in too now, when the new place has none that answers.
    Root maps to an unused uid in a namespace nested in one with its own mounts, where
    root's /tmp/forkproxy-0 is an empty tmpfs (other tests' supervisors not in it)."""
    inside = 1_700_000_000 + os.getpid()
    legacy = Path(f"/tmp/forkproxy-{inside}")
    os.makedirs("/tmp/forkproxy-0", mode=0o700, exist_ok=True)
    legacy.mkdir(mode=0o700)  # root's: seen as the uid inside's in the namespace
    script = tmp_path / "inner.sh"
    script.write_text(f"""
{FORKPROXY} serve --status-socket {legacy}/old.sock 127.0.0.1:0=127.0.0.1:1 \
    >/dev/null 2>{tmp_path}/old.log &
for _ in $(seq 300); do [ -S {legacy}/old.sock ] && break; sleep 0.1; done
{FORKPROXY} status; echo "status=$?"
{FORKPROXY} check; echo "check=$?"
kill $!; wait
""")
    unshare = need("unshare")
    try:
        result = subprocess.run(
            [unshare, "--user", "--map-root-user", "--mount", "sh", "-c",
             "mount -t tmpfs -o mode=0700 forkproxy-test /tmp/forkproxy-0 && exec "
             f"{unshare} --user --map-user={inside} --map-group={inside} sh {script}"],
            capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})
        assert "status=0" in result.stdout and "check=0" in result.stdout, result
        assert "no running forkproxy" not in result.stderr, result
    finally:
        shutil.rmtree(legacy)


def test_a_user_namespace_that_maps_no_uid_has_no_default_directory() -> None:
    """`unshare -U` with no map: the uid is 65534 there, and so was the default directory,
    /tmp/forkproxy-65534, the real nobody's: made first, it was this user's, and nobody's
    own forkproxy exited 2; made by nobody, it read as owned by this user (every unmapped
    owner reads 65534), who then put a socket in it. Refused now, with where to go."""
    nobody = Path("/tmp/forkproxy-65534")
    existed = nobody.exists()
    try:
        unmapped = (need("unshare"), "--user")
        result = run("serve", "127.0.0.1:0=127.0.0.1:1", prefix=unmapped, timeout=30)
        assert_one_line_error(result)
        assert result.stderr == ("forkproxy: error: status socket directory: a user namespace "
                                 "that maps no uid (unshare -U without -r) has no "
                                 f"/tmp/forkproxy-UID of its own {ELSEWHERE}\n"), result
        assert nobody.exists() == existed
        result = run("status", prefix=unmapped)
        assert result.returncode == 1, result
        assert result.stderr == ("forkproxy: no default status socket directory: a user "
                                 "namespace that maps no uid (unshare -U without -r) has no "
                                 f"/tmp/forkproxy-UID of its own {ELSEWHERE}\n"), result
    finally:
        if not existed and nobody.exists():
            shutil.rmtree(nobody)  # made without the fix: not left behind


@pytest.mark.parametrize(("uid", "uid_map", "outer"), [
    (1000, "         0          0 4294967295\n", 1000),  # no user namespace
    (0, "0 999 1\n", 999),  # `unshare -r`
    (1, "0 999 1\n", None),  # just past the one uid mapped: unmapped
    (3, "0 1000 1\n1 100000 65536\n", 100002),  # rootless podman's subordinate range
    (65537, "0 1000 1\n1 100000 65536\n", None),  # just past that range
    (5, None, 5),  # no /proc: as it is
])
def test_a_uid_inside_a_user_namespace_is_named_as_the_namespace_outside_sees_it(
    uid: int, uid_map: str | None, outer: int | None,
) -> None:
    """control.outer_uid, which names the default directory and judges who the nproc
    limit holds: each `INSIDE OUTSIDE COUNT` line maps COUNT uids from INSIDE, the last
    INSIDE + COUNT - 1; a uid past it is no uid of the line's."""
    from forkproxy.control import outer_uid

    assert outer_uid(uid, uid_map) == outer


def test_a_relative_xdg_runtime_dir_is_ignored_by_serve_and_the_clients(
    tmp_path: Path, start_proxy: Callable[..., Proxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The XDG base directory spec: a relative path in XDG_RUNTIME_DIR is invalid and must
    be ignored. serve failed ("status socket directory 'rel/forkproxy': No such file or
    directory"), and a client run elsewhere would have looked somewhere else."""
    env = {**os.environ, "XDG_RUNTIME_DIR": "rel"}
    env = {name: value for name, value in env.items() if not name.startswith("FORKPROXY_")}
    (tmp_path / "rel").mkdir()
    monkeypatch.chdir(tmp_path)  # where a relative XDG_RUNTIME_DIR would lead serve
    proxy = start_proxy("127.0.0.1:0=127.0.0.1:1", env=env)
    sock = f"/tmp/forkproxy-{os.getuid()}/{proxy.pid}.sock"
    assert Path(sock).is_socket()  # the default used without XDG_RUNTIME_DIR
    assert list((tmp_path / "rel").iterdir()) == []
    result = subprocess.run([FORKPROXY, "status", "--json"], capture_output=True, text=True,
                            timeout=30, env=env)
    if result.returncode == 0:
        assert json.loads(result.stdout)["pid"] == proxy.pid
    else:  # another supervisor of this user's runs in the shared default directory
        assert "several forkproxy supervisors" in result.stderr and repr(sock) in result.stderr


def test_a_status_socket_another_program_listens_on_is_refused_and_kept(
    tmp_path: Path,
) -> None:
    """Said to be "another forkproxy" whatever listened there; nothing tells which."""
    path = tmp_path / "taken.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        result = run("serve", "--status-socket", str(path), "127.0.0.1:0=127.0.0.1:1")
        assert_one_line_error(result, f"--status-socket '{path}': something listens there "
                                      "(another forkproxy?)")
        assert path.is_socket()


def test_an_env_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "links.env"
    os.mkfifo(fifo)
    for command in ("serve", "links"):
        result = run(command, "--env-file", str(fifo), timeout=10)
        assert_one_line_error(result, f"env file '{fifo}': not a regular file")


def test_an_env_file_over_1_mib_is_refused_and_one_of_1_mib_is_read(tmp_path: Path) -> None:
    """A file of link variables is a few KiB; a huge one was read whole (see
    test_limits' reload of one)."""
    env_file = tmp_path / "links.env"
    link = b"A_PORT_7000_TCP=tcp://127.0.0.1:1\n"
    comment = b"#" * 1023 + b"\n"
    env_file.write_bytes(link + comment * 1023 + b"#" * (1024 - len(link) - 1) + b"\n")
    assert env_file.stat().st_size == 1 << 20
    result = run("links", "--env-file", str(env_file), "--bind", "127.0.0.1")
    assert result.returncode == 0, result
    assert result.stdout == "listen 127.0.0.1:7000 -> 127.0.0.1:1 (A_PORT_7000_TCP)\n"
    with env_file.open("ab") as handle:
        handle.write(b"\n")
    for command in ("links", "serve"):
        result = run(command, "--env-file", str(env_file))
        assert_one_line_error(result, f"env file '{env_file}': larger than 1 MiB")


@pytest.mark.parametrize("same", ["path", "hard link", "symlink"])
def test_a_pid_file_that_is_the_env_file_is_refused_and_left_as_it_was(
    tmp_path: Path, same: str
) -> None:
    """`--env-file links.env --pid-file links.env` wrote the PID over the links (every
    reload then found none) and removed the file at exit."""
    runtime, env_file = tmp_path / "runtime", tmp_path / "links.env"
    runtime.mkdir(mode=0o700)
    port = free_port()
    content = f"A_PORT_{port}_TCP=tcp://127.0.0.1:1\n"
    env_file.write_text(content)
    pid_file = tmp_path / "proxy.pid"
    if same == "path":
        pid_file = env_file
    elif same == "hard link":
        pid_file.hardlink_to(env_file)
    else:
        pid_file.symlink_to(env_file)
    result = run("serve", "--env-file", str(env_file), "--pid-file", str(pid_file),
                 "--bind", "127.0.0.1", env={"XDG_RUNTIME_DIR": str(runtime)}, timeout=10)
    # A symbolic link is refused as such (below), whatever it points to.
    assert_one_line_error(result, f"--pid-file '{pid_file}': " + (
        "a symbolic link" if same == "symlink" else f"it is the --env-file '{env_file}'"))
    assert env_file.read_text() == content
    assert_not_listening(port)
    assert list(runtime.rglob("*.sock")) == []


def test_a_status_socket_that_cannot_be_removed_at_exit_does_not_fail_the_stop(
    tmp_path: Path,
) -> None:
    """unlink() of the status socket failing at exit (EACCES: its directory made
    read-only meanwhile) ended a clean stop in a traceback and exit 1, and the clean-up
    stopped there: the pid file stayed. The errno is injected with strace, on that path
    (strace exits with its command's status)."""
    sock_path, pid_file = tmp_path / "s.sock", tmp_path / "proxy.pid"
    with subprocess.Popen(
        [need("strace"), "-qq", "-o", "/dev/null", "-P", str(sock_path),
         "-e", "inject=unlink,unlinkat:error=EACCES", FORKPROXY, "serve",
         "--status-socket", str(sock_path), "--pid-file", str(pid_file),
         "127.0.0.1:0=127.0.0.1:1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": os.environ["PATH"]}, start_new_session=True,
    ) as tracer:
        try:
            assert tracer.stdout is not None and tracer.stderr is not None
            assert tracer.stdout.readline().startswith("listening ")
            [serve] = psutil.Process(tracer.pid).children()
            serve.send_signal(signal.SIGTERM)
            assert tracer.wait(30) == 0, tracer.stderr.read()
        finally:
            kill_group(tracer)
        log = tracer.stderr.read()
    assert "Traceback" not in log, log
    assert not pid_file.exists()  # the rest of the clean-up ran


def test_a_warm_up_that_fails_does_not_stop_the_start(
    tmp_path: Path, tcp_server: ServerFactory
) -> None:
    """The warm-up before `listening` (relay.preload) is best effort, but only its
    socketpair() was guarded: a send failing there (ENOBUFS) ended the start in a
    traceback, exit 1. The proxy starts all the same now, and serves. The errno is
    injected with strace on the first send the process makes, the warm-up's."""
    server = tcp_server(echo)
    with subprocess.Popen(
        [need("strace"), "-qq", "-o", "/dev/null", "-e", "inject=sendto:error=ENOBUFS:when=1",
         FORKPROXY, "serve", f"127.0.0.1:0=127.0.0.1:{server.port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": str(tmp_path)},
        start_new_session=True,
    ) as tracer:
        try:
            assert tracer.stdout is not None and tracer.stderr is not None
            line = tracer.stdout.readline()
            assert line.startswith("listening "), (line, tracer.stderr.read())
            port = int(line.split()[1].rpartition(":")[2])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.settimeout(10)
                client.sendall(b"served")
                assert client.recv(6) == b"served"
            [serve] = psutil.Process(tracer.pid).children()
            serve.send_signal(signal.SIGTERM)
            assert tracer.wait(30) == 0
        finally:
            kill_group(tracer)
        assert "Traceback" not in tracer.stderr.read()


def test_a_pid_file_is_writable_by_its_owner_only_whatever_the_umask(
    tmp_path: Path, start_proxy: Callable[..., Proxy]
) -> None:
    """Created 0o666 less the umask: under `umask 000` anyone could write it, and so name
    any process of ours for `reload --pid-file` to signal. 0o644 less the umask now."""
    pid_file = tmp_path / "proxy.pid"
    proxy = start_proxy("--pid-file", str(pid_file), "127.0.0.1:0=127.0.0.1:1",
                        prefix=(need("sh"), "-c", 'umask 000 && exec "$@"', "sh"))
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text() == f"{proxy.pid}\n")
    assert stat.S_IMODE(pid_file.stat().st_mode) == 0o644


def as_nobody(*command: str) -> None:
    """Run `command` as user nobody (65534), as a local user without privileges would."""
    subprocess.run([need("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups",
                    *command], check=True, timeout=30)


@pytest.mark.parametrize("planted", ["symlink", "hard link", "file"])
def test_a_pid_file_another_user_planted_is_not_written(tmp_path: Path, planted: str) -> None:
    """Root, told to write its PID in a directory another user can write to: a symbolic
    link planted there had root empty and write whatever file it named (here a root-only
    secret); a hard link did the same; a file that user made stayed theirs, writable by
    them, so they could name any process to `reload --pid-file`. Each is refused now,
    before any write, and left as it was."""
    # pytest's tmp_path is root's alone (0700): nobody could not reach a directory in it.
    shared = Path(tempfile.mkdtemp(prefix="forkproxy-test-shared-"))
    shared.chmod(0o1777)  # as /tmp: sticky, world-writable
    try:
        _refused_in(shared, tmp_path, planted)
    finally:
        shutil.rmtree(shared)


def _refused_in(shared: Path, tmp_path: Path, planted: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    pid_file = shared / "proxy.pid"
    if planted == "symlink":
        as_nobody("ln", "-s", str(secret), str(pid_file))
        expected = "a symbolic link"
    elif planted == "hard link":
        os.link(secret, pid_file)  # what protected_hardlinks=0 lets any user make
        expected = "it has other names (hard links)"
    else:
        as_nobody("sh", "-c", f"umask 0; echo 1 > '{pid_file}'")
        expected = f"owned by uid 65534, not by this user ({os.geteuid()})"
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    port = free_port()
    result = run("serve", "--pid-file", str(pid_file), f"127.0.0.1:{port}=127.0.0.1:1",
                 env={"XDG_RUNTIME_DIR": str(runtime)}, timeout=10)
    assert_one_line_error(result, f"--pid-file '{pid_file}': {expected}")
    assert secret.read_text() == "root's\n"
    assert os.path.lexists(pid_file)
    assert_not_listening(port)


def test_a_pid_file_replaced_while_serving_is_left_alone_at_the_stop(
    tmp_path: Path, start_proxy: Callable[..., Proxy]
) -> None:
    """At the stop, the pid file was opened by its path, following a link: a FIFO put in
    its place would hang the stop, and a link with our PID as content (any file naming
    it) was removed. Only the file written at the start is removed now."""
    pid_file = tmp_path / "proxy.pid"
    proxy = start_proxy("--pid-file", str(pid_file), "127.0.0.1:0=127.0.0.1:1")
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text() == f"{proxy.pid}\n")
    pid_file.unlink()
    os.mkfifo(pid_file)
    assert proxy.stop() == 0  # not hung on the FIFO
    assert stat.S_ISFIFO(os.lstat(pid_file).st_mode)
    pid_file.unlink()
    proxy = start_proxy("--pid-file", str(pid_file), "127.0.0.1:0=127.0.0.1:1")
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text() == f"{proxy.pid}\n")
    other = tmp_path / "other"
    other.write_text(f"{proxy.pid}\n")  # names us, but is not the file we wrote
    os.replace(other, pid_file)
    assert proxy.stop() == 0
    assert pid_file.read_text() == f"{proxy.pid}\n"


def test_a_pid_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """The supervisor waited in open() for a reader of the FIFO: its port bound, its
    status socket made, nothing served, and SIGTERM blocked (only SIGKILL ended it, which
    left the socket behind)."""
    fifo, runtime = tmp_path / "proxy.pid", tmp_path / "runtime"
    os.mkfifo(fifo)
    runtime.mkdir(mode=0o700)
    port = free_port()
    result = run("serve", "--pid-file", str(fifo), f"127.0.0.1:{port}=127.0.0.1:1",
                 env={"XDG_RUNTIME_DIR": str(runtime)}, timeout=10)
    assert_one_line_error(result, f"--pid-file '{fifo}': not a regular file")
    assert_not_listening(port)
    assert list((runtime / "forkproxy").iterdir()) == []  # its control socket went with it


def test_a_pid_file_that_is_dev_null_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """`--pid-file /dev/null` (a PID thrown away, as a script might think it can): a
    device, not a file a PID can be kept in and `reload --pid-file` read back. Opened,
    it passed every check of the open itself, so only the file-type check after it stops
    it: exit 2, one line naming the path, nothing left listening, the device untouched.
    The /dev/null here is a null device of the test's own, bind-mounted over the path in
    a mount namespace: with the check gone, the start would fchmod the machine's /dev/null
    to 0644 (its mode is 0666) and write a PID to it."""
    device = tmp_path / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    device.chmod(0o666)  # whatever the umask took off
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    port = free_port()
    result = run("serve", "--pid-file", "/dev/null", f"127.0.0.1:{port}=127.0.0.1:1",
                 env={"XDG_RUNTIME_DIR": str(runtime)}, timeout=30,
                 prefix=(need("unshare"), "--mount", "--propagation", "private", "sh", "-c",
                         'mount --bind "$0" /dev/null && exec "$@"', str(device)))
    assert_one_line_error(result, "--pid-file '/dev/null': not a regular file")
    assert_not_listening(port)
    assert list((runtime / "forkproxy").iterdir()) == []  # its control socket went with it
    assert stat.S_IMODE(device.stat().st_mode) == 0o666  # not written, not chmod'ed
    assert device.stat().st_size == 0


@pytest.mark.parametrize("given", ["flag", "variable"])
@pytest.mark.parametrize("content", [
    b"precious\n",  # `--pid-file notes.txt`, the file a typo named
    b"root:x:0:0:root:/root:/bin/bash\n",  # /etc/passwd, as root
    b"123\nnotes\n", b"12 34\n", b"-1\n", b"0x1f\n", "\u0661\u0662\n".encode(),  # not a PID
    b"1" * 33,  # digits, but more than a pid file holds
], ids=["text", "passwd", "pid-and-more", "two-numbers", "negative", "hex", "arabic-digits",
        "33-digits"])
def test_an_existing_file_that_is_not_a_pid_file_is_refused_and_left_as_it_was(
    tmp_path: Path, content: bytes, given: str
) -> None:
    """Any file of this user's at --pid-file was emptied, given the PID, and removed at
    the stop: `--pid-file notes.txt` (typed for --env-file) lost the notes, and as root
    `--pid-file /etc/passwd` lost the system's users. Only an empty file or one holding
    a PID is taken over now (the next test); anything else is refused at the start."""
    pid_file, runtime = tmp_path / "notes.txt", tmp_path / "runtime"
    pid_file.write_bytes(content)
    pid_file.chmod(0o664)  # a mode a pid file is not given: not changed either
    before = pid_file.stat()
    runtime.mkdir(mode=0o700)
    port = free_port()
    args, env = ["--pid-file", str(pid_file)], {"XDG_RUNTIME_DIR": str(runtime)}
    if given == "variable":
        args, env = [], {**env, "FORKPROXY_PID_FILE": str(pid_file)}
    result = run("serve", *args, f"127.0.0.1:{port}=127.0.0.1:1", env=env, timeout=10)
    named = "--pid-file" if given == "flag" else "FORKPROXY_PID_FILE (--pid-file)"
    assert_one_line_error(result, f"{named} '{pid_file}': it holds something other than a "
                                  "process id")
    assert_not_listening(port)
    assert list((runtime / "forkproxy").iterdir()) == []  # its control socket went with it
    assert pid_file.read_bytes() == content
    after = pid_file.stat()
    assert (after.st_mode, after.st_mtime_ns, after.st_ino) == \
        (before.st_mode, before.st_mtime_ns, before.st_ino)


@pytest.mark.parametrize("content", [
    b"", b"\n", b"4194304\n",  # empty, blank, stale (beyond the kernel's pid_max)
    b"  4194304 \r\n", b"4194304" + b" " * 24 + b"\n",  # whitespace around it, 32 bytes
    # What a crash or a power loss can leave of a file just written: its size in zeros.
    b"\x00" * 8, b"4194304\n\x00\x00",
], ids=["empty", "blank", "stale", "whitespace", "32-bytes", "zeros", "stale-and-zeros"])
def test_an_empty_or_stale_pid_file_is_taken_over_and_removed_at_the_stop(
    tmp_path: Path, start_proxy: Callable[..., Proxy], content: bytes
) -> None:
    """What is refused above must not be what a pid file left by a previous run holds:
    that one is written over with our PID, and removed at the stop."""
    pid_file = tmp_path / "proxy.pid"
    pid_file.write_bytes(content)
    proxy = start_proxy("--pid-file", str(pid_file), "127.0.0.1:0=127.0.0.1:1")
    assert wait_for(lambda: pid_file.read_bytes() == f"{proxy.pid}\n".encode())
    assert proxy.stop() == 0
    assert not pid_file.exists()


@pytest.mark.parametrize(("syscall", "error", "left"), [
    ("pread64", "EIO", True),  # before anything is written: a stale PID is kept
    ("ftruncate", "EIO", True),  # not emptied: the same
    ("pwrite64", "ENOSPC", False),  # emptied and not written: removed, not left empty
])
def test_a_stale_pid_file_that_fails_to_be_read_or_written_is_kept_or_removed_never_emptied(
    tmp_path: Path, syscall: str, error: str, left: bool
) -> None:
    """After a failure the pid file is removed only once it holds no one's PID: a stale
    PID not yet read, or not yet truncated, is left as it was; once truncated, the empty
    file goes. The errno is injected with strace on that file's syscalls alone (-P)."""
    pid_file = tmp_path / "proxy.pid"
    pid_file.write_bytes(b"4194304\n")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    result = run("serve", "--pid-file", str(pid_file), "127.0.0.1:0=127.0.0.1:1",
                 env={"XDG_RUNTIME_DIR": str(runtime)},
                 prefix=(need("strace"), "-f", "-qq", "-o", "/dev/null", "-P", str(pid_file),
                         "-e", f"inject={syscall}:error={error}"))
    assert_one_line_error(result, f"--pid-file '{pid_file}': "
                                  f"{os.strerror(getattr(errno, error))}")
    if left:
        assert pid_file.read_bytes() == b"4194304\n"
    else:
        assert not pid_file.exists()
    assert list((runtime / "forkproxy").iterdir()) == []


def test_a_start_that_fails_after_binding_metrics_has_freed_the_port_before_its_error_line(
    tmp_path: Path,
) -> None:
    """The metrics port is bound at start before the pid file is written. A pid file
    refused (here a FIFO) must close it with the listeners: the error line that follows
    goes to a log reader that may take its time (stderr a pipe nobody drains, as under a
    stalled log driver), and a port held until then refuses the replacement started
    meanwhile. Seen while the supervisor waits for room for that line (it gives it
    START_ERROR_SETTLE, sleeping): the port can be bound by another program already, and
    again after exit 2."""
    fifo = tmp_path / "proxy.pid"
    os.mkfifo(fifo)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    port = free_port()
    read_end, write_end = full_pipe()
    try:
        proc = subprocess.Popen(
            [FORKPROXY, "serve", "--metrics", f"127.0.0.1:{port}", "--pid-file", str(fifo),
             "127.0.0.1:0=127.0.0.1:1"],
            stdout=subprocess.DEVNULL, stderr=write_end, text=True, start_new_session=True,
            env={"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": str(runtime)})
        os.close(write_end)
        try:
            assert wait_for(lambda: waiting_for_room(proc.pid)), "never wrote its error line"
            with socket.socket() as replacement:  # no SO_REUSEADDR: a listener there refuses
                replacement.bind(("127.0.0.1", port))
                replacement.listen()
            data = b""
            while chunk := os.read(read_end, 65536):
                data += chunk
            assert proc.wait(30) == 2
        finally:
            if proc.poll() is None:
                kill_group(proc)
    finally:
        os.close(read_end)
    # What waited was the error line itself (all that followed the pipe's filler): the
    # port was freed by the refusal, not bound later than the check above.
    assert data.lstrip(b"x") == f"forkproxy: error: --pid-file '{fifo}': not a regular file\n" \
        .encode(), data.lstrip(b"x")
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("where", ["command line", "supervisor"])
def test_a_start_error_on_a_full_log_nobody_reads_still_exits_2(
    log_format: str, where: str,
) -> None:
    """The start error's line was a blocking write: stderr a full pipe nobody reads (a
    stalled log driver), `serve` waited in write() for ever instead of exiting 2, both
    for bad input found before the supervisor runs and for an error the supervisor finds
    (a port in use). The line now gets a moment to go out, and is dropped after it."""
    read_end, write_end = full_pipe()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        spec = ("6379=10.0.0.5:http" if where == "command line"
                else f"127.0.0.1:{taken.getsockname()[1]}=127.0.0.1:1")
        try:
            proc = subprocess.Popen(
                [FORKPROXY, "serve", "--log-format", log_format, spec],
                stdout=subprocess.DEVNULL, stderr=write_end, start_new_session=True,
                text=True, env={"PATH": os.environ["PATH"]})
            os.close(write_end)
            try:
                assert proc.wait(60) == 2
            finally:
                if proc.poll() is None:
                    stuck = blocked_writing(proc.pid)
                    kill_group(proc)
                    pytest.fail(f"no exit; blocked writing its line: {stuck}")
        finally:
            os.close(read_end)


def waiting_for_room(pid: int) -> bool:
    """The process sleeps between two tries to write what the log holds (Logger.settle)."""
    try:
        return "nanosleep" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False  # gone


@pytest.mark.parametrize("mode", [0o200, 0o400, 0o000])
def test_a_pid_file_of_ours_we_may_not_read_or_write_is_refused_and_says_why(
    tmp_path: Path, mode: int
) -> None:
    """An empty file of ours at the path, write-only (0200) or read-only (0400): "Permission
    denied", as for a directory we may not write to, and the user owns the file. Refused
    still (it cannot be checked, and no one could read the PID from it), and said why.
    Root runs it without CAP_DAC_OVERRIDE, as any user would."""
    pid_file = tmp_path / "proxy.pid"
    pid_file.touch()
    pid_file.chmod(mode)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        prefix = (need("setpriv"), "--bounding-set=-dac_override,-dac_read_search")
    result = run("serve", "--pid-file", str(pid_file), "127.0.0.1:0=127.0.0.1:1",
                 env={"XDG_RUNTIME_DIR": str(runtime)}, prefix=prefix)
    assert_one_line_error(result, f"--pid-file '{pid_file}': Permission denied: a pid file "
                                  "already there must be readable and writable by this user")
    assert stat.S_IMODE(pid_file.stat().st_mode) == mode and pid_file.read_bytes() == b""


def test_a_pid_file_of_another_user_that_we_may_not_open_is_refused_as_not_ours(
    tmp_path: Path,
) -> None:
    """Another user's file that we may not open (here 0644 and no CAP_DAC_OVERRIDE; with
    fs.protected_regular, any such file in /tmp, as root too): the reason is whose it is,
    as for one we may open. It said "must be readable and writable by this user", which
    pointed at the mode, where no mode of ours would make it ours."""
    if os.geteuid() != 0:  # a missing prerequisite fails, as everywhere here
        pytest.fail("giving a file to another user needs root (run ./scripts/test as root)")
    pid_file = tmp_path / "proxy.pid"
    pid_file.touch()
    os.chown(pid_file, 65534, 65534)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    prefix = (need("setpriv"), "--bounding-set=-dac_override,-dac_read_search")
    result = run("serve", "--pid-file", str(pid_file), "127.0.0.1:0=127.0.0.1:1",
                 env={"XDG_RUNTIME_DIR": str(runtime)}, prefix=prefix)
    assert_one_line_error(result, f"--pid-file '{pid_file}': owned by uid 65534, not by this "
                                  "user (0)")
    assert pid_file.stat().st_uid == 65534 and pid_file.read_bytes() == b""


def test_a_pid_file_that_cannot_be_written_is_not_left_behind_empty(tmp_path: Path) -> None:
    """On a full file system the pid file was created, the write failed, and the empty
    file stayed: the clean-up removes only a file that names our PID. A tmpfs of 4 KiB,
    filled, in a mount namespace of the test's own."""
    script = ('mount -t tmpfs -o size=4k forkproxy-test "$0" && head -c 65536 /dev/zero '
              '> "$0/fill" 2>/dev/null; "$@"; status=$?; ls -A "$0" >&2; exit $status')
    result = subprocess.run(
        [need("unshare"), "--mount", "--propagation", "private", "sh", "-c", script,
         str(tmp_path), FORKPROXY, "serve", "--pid-file", f"{tmp_path}/proxy.pid",
         "--status-socket", f"{tmp_path}/s.sock", "127.0.0.1:0=127.0.0.1:1"],
        capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 2, result
    error, listing = result.stderr.splitlines()[0], result.stderr.splitlines()[1:]
    assert error == (f"forkproxy: error: --pid-file '{tmp_path}/proxy.pid': "
                     "No space left on device"), result.stderr
    assert listing == ["fill"], result.stderr  # no proxy.pid, no s.sock


def test_too_few_descriptors_to_start_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    # 0-2, the listener and the control socket take five: the ended pipe's pair cannot
    # be had. (7 ran out too while the start-up lookup imported the idna codec, which
    # opened its files; with 7 it runs out of the one it keeps to spare for accept(),
    # see the next test: it starts with 8.)
    result = run("serve", "127.0.0.1:0=localhost:1", env={"XDG_RUNTIME_DIR": str(runtime)},
                 prefix=(need("prlimit"), "--nofile=6:6"))
    assert result.returncode == 2, result
    assert result.stderr.splitlines()[-1] == ("forkproxy: error: out of file descriptors while "
                                              "starting: Too many open files (raise the limit, "
                                              "ulimit -n)"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list((runtime / "forkproxy").iterdir()) == []  # its control socket went with it


@pytest.mark.parametrize("where", ["default directory", "--status-socket", "--pid-file"])
def test_out_of_descriptors_at_the_status_socket_says_so_like_elsewhere(
    tmp_path: Path, where: str
) -> None:
    """20 links under hard limits from too few up to enough: each start refused said
    "out of file descriptors ... ulimit -n", but the one that ran out at the control socket
    (24 here) blamed the socket's directory, or the --status-socket path, for "Too many
    open files". Every refusal says the same line now, whichever descriptor was the last:
    the --pid-file's open too, which said "--pid-file PATH: Too many open files"."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    specs = [f"127.0.0.{n + 1}:0=127.0.0.1:9" for n in range(20)]
    socket_flag = {"default directory": [],
                   "--status-socket": ["--status-socket", str(tmp_path / "s.sock")],
                   "--pid-file": ["--pid-file", str(tmp_path / "p.pid")]}[where]
    refused = []
    for limit in range(16, 64):
        with subprocess.Popen(
            [need("prlimit"), f"--nofile={limit}:{limit}", FORKPROXY, "serve", "-q",
             *socket_flag, *specs],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": str(runtime)},
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            try:
                if proc.stdout.readline():  # `listening`: enough descriptors
                    break
                assert proc.wait(30) == 2, (limit, proc.stderr.read())
                lines = proc.stderr.read().splitlines()
                assert lines[-1:] == ["forkproxy: error: out of file descriptors while "
                                      "starting: Too many open files (raise the limit, "
                                      "ulimit -n)"], (limit, lines)
                refused.append(limit)
            finally:
                proc.terminate()
                proc.wait(30)
    else:
        pytest.fail("did not start with 63 descriptors")
    assert refused, "started with 16 descriptors: none refused"
    # No socket left behind by the starts refused (the last one, stopped, removed its own).
    assert [*runtime.glob("forkproxy/*"), *tmp_path.glob("*.sock"),
            *tmp_path.glob("*.pid")] == []


def test_a_low_soft_descriptor_limit_is_raised_to_the_hard_one(
    tmp_path: Path, tcp_server: ServerFactory
) -> None:
    """Docker 29 with containerd 2 starts containers at a soft 1024 under a hard 524288
    (moby/moby#51485): the supervisor, which holds every listener, could not start with
    a link per exposed port past ~1,015 ("out of file descriptors while starting"). Here
    at a soft 32, 60 listeners: it raises the soft limit to the hard one, and serves."""
    server = tcp_server(echo)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    specs = [f"127.0.{n // 250}.{n % 250 + 1}:0=127.0.0.1:{server.port}" for n in range(60)]
    with subprocess.Popen(
        [need("prlimit"), "--nofile=32:4096", FORKPROXY, "serve", "-q", *specs],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": str(runtime)},
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            lines = [proc.stdout.readline() for _ in specs]
            assert all(line.startswith("listening ") for line in lines), (
                lines, proc.poll() is None or proc.stderr.read())
            limits = Path(f"/proc/{proc.pid}/limits").read_text()
            assert re.search(r"Max open files +4096 +4096 ", limits), limits
            host, _, port = lines[-1].split()[1].rpartition(":")
            with socket.create_connection((host, int(port)), timeout=10) as client:
                client.settimeout(10)
                client.sendall(b"served")
                assert client.recv(6) == b"served"
        finally:
            proc.terminate()
            proc.wait(30)


def test_with_the_fewest_descriptors_it_starts_with_it_serves_a_client(
    tmp_path: Path, tcp_server: ServerFactory
) -> None:
    """Under a descriptor limit `serve` either refuses to start (the line above) or
    serves: at exactly the limit its own descriptors need (`ulimit -n 7` here), it said
    `listening`, and every accept() then failed (EMFILE), clients waiting in the backlog
    for ever. It needs one descriptor to spare now, for accept()."""
    server = tcp_server(echo)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    for limit in range(6, 16):
        with subprocess.Popen(
            [need("prlimit"), f"--nofile={limit}:{limit}", FORKPROXY, "serve", "-q",
             f"127.0.0.1:0=127.0.0.1:{server.port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": str(runtime)},
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            try:
                line = proc.stdout.readline()  # its `listening` line, or "" at its exit
                if not line:
                    assert proc.wait(30) == 2, (limit, proc.stderr.read())
                    continue
                port = int(line.split()[1].rpartition(":")[2])
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    client.settimeout(10)
                    client.sendall(b"served")
                    try:
                        answer = client.recv(6)
                    except TimeoutError:
                        answer = b""
                assert answer == b"served", f"listening at --nofile={limit}, serving no one"
                break
            finally:
                proc.terminate()
                proc.wait(30)
    else:
        pytest.fail("serve started at no limit up to 15")


def serving(sock_path: Path) -> bool:
    """The loop answers `check`: the `listening` lines were written, or given up, before
    it ran."""
    try:
        return bool(control(sock_path, "check")["ok"])
    except StatusError:
        return False


def serve_and_stop(tmp_path: Path, stdout: int) -> str:
    """Start `serve` with `stdout`, wait until its loop answers (its `listening` lines
    written or given up), stop it (exit 0), and return what it wrote on stderr."""
    sock_path = tmp_path / "s.sock"
    with open(tmp_path / "err", "w+") as err:
        proc = subprocess.Popen([FORKPROXY, "serve", "--status-socket", str(sock_path),
                                 "127.0.0.1:0=127.0.0.1:1"],
                                stdout=stdout, stderr=err, start_new_session=True, text=True)
        try:
            # Waited for, not slept: a fixed 3 s once assumed the start and the write were
            # over by then.
            assert wait_for(lambda: proc.poll() is not None or serving(sock_path), 60)
            assert proc.poll() is None, err.read()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            kill_group(proc)
        err.seek(0)
        return err.read()


def test_nobody_reading_stdout_is_no_error_at_exit(tmp_path: Path) -> None:
    """`serve ... | head -1` and the like: the `listening` lines cannot be written; the
    proxy serves all the same and stops without "Exception ignored ... BrokenPipeError"."""
    reader, writer = os.pipe()
    os.close(reader)  # the pipe's reader is gone before the first line
    try:
        text = serve_and_stop(tmp_path, writer)
    finally:
        os.close(writer)
    assert "Exception ignored" not in text and "BrokenPipe" not in text, text
    # Nobody reading is the operator's choice, not a failure to report.
    assert "stdout-failed" not in text, text


def test_a_full_non_blocking_stdout_delays_the_listening_lines_not_drops_them(
    tmp_path: Path,
) -> None:
    """A reader that set O_NONBLOCK on the pipe (shared by both ends' file) and had not
    read yet: the write failed with EAGAIN and the lines were dropped for good, silently,
    while the proxy served. A script waiting for `listening` waited for ever. The proxy
    waits for room now, as a blocking write would."""
    reader, writer = full_pipe()
    os.set_blocking(writer, False)
    os.set_blocking(reader, False)
    sock_path = tmp_path / "s.sock"
    with open(tmp_path / "err", "w+") as err:
        proc = subprocess.Popen([FORKPROXY, "serve", "--status-socket", str(sock_path),
                                 "127.0.0.1:0=127.0.0.1:1"],
                                stdout=writer, stderr=err, start_new_session=True,
                                text=True)
        os.close(writer)
        got = bytearray()

        def drain() -> bool:
            """Read what is there; False, so that it can lead an `or`."""
            while True:
                try:
                    chunk = os.read(reader, 65536)
                except BlockingIOError:
                    return False
                if not chunk:
                    return False
                got.extend(chunk)

        try:
            # Let it meet the full pipe first: it waits in poll() for room on stdout (before,
            # it dropped the lines and went on). Reading earlier would make room first.
            assert wait_for(lambda: polling_for_room(proc.pid, 1) or proc.poll() is not None,
                            60), "it never waited for room on stdout"
            # Its loop runs only once the lines are out (or given up): read until then,
            # then once more for what came in between.
            assert wait_for(lambda: drain() or proc.poll() is not None or serving(sock_path),
                            60)
            drain()
            assert proc.poll() is None, err.read()
        finally:
            kill_group(proc)
            os.close(reader)
        err.seek(0)
        log = err.read()
    assert bytes(got).lstrip(b"x").startswith(b"listening 127.0.0.1:"), (got[-200:], log)
    assert "stdout-failed" not in log, log


def run_into_a_slow_non_blocking_pipe(command: list[str],
                                      env: dict[str, str]) -> tuple[int, bytes, str]:
    """`forkproxy COMMAND` with stdout a pipe set O_NONBLOCK (as node, some CI runners or
    `| pv -L` set it) that is read only once the command met it full, then slowly: (exit
    status, all of stdout, stderr)."""
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([FORKPROXY, *command], stdout=writer, stderr=err, env=env,
                                start_new_session=True, text=True)
        os.close(writer)
        got = bytearray()
        try:
            # Its output is more than the pipe holds: it either waits for room (polls) or,
            # as before, loses the rest and exits.
            assert wait_for(lambda: polling_for_room(proc.pid, 1) or proc.poll() is not None,
                            60), "it neither waited for room nor ended"
            while chunk := os.read(reader, 4096):
                got.extend(chunk)
                time.sleep(0.005)  # a slow reader: the pipe fills again and again
            status = proc.wait(60)
        finally:
            kill_group(proc)
            os.close(reader)
        err.seek(0)
        return status, bytes(got), err.read()


def test_links_into_a_full_non_blocking_pipe_writes_every_line() -> None:
    """`links` stopped at the 64 KiB a pipe holds, 900 lines of 3000, exit 0 and no word:
    the rest met EAGAIN, which Python's buffered stdout lost. It waits for room now."""
    specs = [f"{port}=redis:5" for port in range(10001, 13001)]
    status, out, err = run_into_a_slow_non_blocking_pipe(
        ["links", *specs], {"PATH": os.environ["PATH"]})
    lines = out.decode().splitlines()
    assert (status, err) == (0, ""), (status, err)
    assert len(lines) == len(specs), (len(lines), lines[-1:])
    assert lines[-1] == "listen 0.0.0.0:13000 -> redis:5 (13000=redis:5)"


@pytest.mark.parametrize("lean", [True, False])
def test_status_json_into_a_full_non_blocking_pipe_is_whole_json(
    start_proxy: Callable[..., Proxy], short_dir: Path, lean: bool,
) -> None:
    """`status --json` of 100 links (~100 KiB) was cut at 64 KiB into invalid JSON, exit 0,
    no word, on a non-blocking pipe its reader had not emptied yet. Both ways it runs:
    lean (console.lean, the socket in FORKPROXY_STATUS_SOCKET) and through the CLI."""
    sock = short_dir / "s.sock"
    specs = [f"127.0.0.1:0=127.0.0.1:{port}" for port in range(1, 101)]
    start_proxy("--status-socket", str(sock), *specs, expect=len(specs))
    env = {"PATH": os.environ["PATH"]}
    command = ["status", "--json"]
    if lean:
        env["FORKPROXY_STATUS_SOCKET"] = str(sock)
    else:
        command += ["--status-socket", str(sock)]
    status, out, err = run_into_a_slow_non_blocking_pipe(command, env)
    assert (status, err) == (0, ""), (status, err)
    assert len(out) > 65536, len(out)  # more than the pipe holds: else this tests nothing
    assert len(json.loads(out)["listeners"]) == len(specs)


@pytest.mark.parametrize("blocking", [True, False])
def test_a_stop_while_stdout_is_full_still_stops(tmp_path: Path, blocking: bool) -> None:
    """Waiting for room on a full stdout, as above, must not make the proxy deaf: a TERM
    ends the wait (one warning says the lines were not written) and the stop goes on.
    On a blocking pipe, the usual stdout, the write itself waited: after the TERM's
    handler ran it went on waiting (PEP 475), and only the reader could end the stop."""
    reader, writer = full_pipe()
    os.set_blocking(writer, blocking)
    with open(tmp_path / "err", "w+") as err:
        proc = subprocess.Popen([FORKPROXY, "serve", "127.0.0.1:0=127.0.0.1:1"],
                                stdout=writer, stderr=err, start_new_session=True,
                                text=True)
        os.close(writer)
        try:
            assert wait_for(lambda: polling_for_room(proc.pid, 1) or proc.poll() is not None,
                            60), "it never waited for room on stdout"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            kill_group(proc)
            os.close(reader)
        err.seek(0)
        lines = [line for line in err.read().splitlines() if "stdout-failed" in line]
    assert len(lines) == 1 and "told to stop" in lines[0], lines


def test_stdout_that_fails_is_said_on_stderr_and_the_proxy_serves(tmp_path: Path) -> None:
    """stdout on a full disk (/dev/full: ENOSPC): the `listening` lines were dropped with
    no word, so whoever waited for them had no clue why. A reader gone (EPIPE, above) is
    still no news."""
    with open("/dev/full", "w") as full:
        text = serve_and_stop(tmp_path, full.fileno())
    lines = [line for line in text.splitlines() if "stdout-failed" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert "listening" in lines[0]  # what is missing


def test_a_path_in_an_error_is_quoted_and_stays_on_one_line(tmp_path: Path) -> None:
    forged = f"{tmp_path}/missing/a\nlistening 127.0.0.1:1 -> 127.0.0.1:2"
    for option in ("--pid-file", "--env-file", "--status-socket"):
        # A runtime directory of its own: in the shared default one, a stale socket left
        # by another run was tidied, and `removed-stale-sockets` was a second line.
        result = run("serve", option, forged, "127.0.0.1:0=127.0.0.1:1",
                     env={"XDG_RUNTIME_DIR": str(tmp_path)})
        assert_one_line_error(result, "\\nlistening")  # the newline is shown as \n
    # An env file that exists at such a path, its content wrong: the errors that name it.
    (tmp_path / "a\nb").mkdir()
    env_file = tmp_path / "a\nb" / "links.env"
    for content, needle in (("bad name=x\n", "line 1: bad variable name"),
                            ("A_PORT_0_TCP=tcp://127.0.0.1:1\n", "A_PORT_0_TCP ("),
                            ("# nothing\n", "no links found")):
        env_file.write_text(content)
        assert_one_line_error(run("links", "--env-file", str(env_file)), needle, "a\\nb")


@pytest.mark.parametrize("quote", ['"', "'"])
def test_a_quoted_value_in_the_env_file_says_to_remove_the_quotes(
    tmp_path: Path, quote: str
) -> None:
    """`REDIS_PORT_6379_TCP="tcp://..."` (as written for Compose's env_file, which removes
    the quotes) said only `expected tcp://HOST:PORT, got '"tcp://..."'`: why the value,
    visibly right, was wrong was left to guess. Values stay literal, as `docker run
    --env-file` takes them (the same file may feed it); the line says so."""
    env_file = tmp_path / "links.env"
    env_file.write_text(f"REDIS_PORT_6379_TCP={quote}tcp://198.18.1.2:16379{quote}\n")
    result = run("links", "--env-file", str(env_file))
    assert_one_line_error(result, f"variable REDIS_PORT_6379_TCP ('{env_file}'): expected "
                          "tcp://HOST:PORT, got ", "tcp://198.18.1.2:16379",
                          ": values are taken literally, as `docker run --env-file` does: "
                          "remove the quotes")


def test_the_env_files_errors_name_its_variable_when_it_came_from_one(tmp_path: Path) -> None:
    """`env file 'PATH'` named the file but not FORKPROXY_ENV_FILE, unlike every other
    variable's error: whoever set it in a compose file typed no --env-file. The variable
    and its flag now stand where those words did; a typed --env-file is named as before."""
    env_file = tmp_path / "links.env"
    given = f"'{env_file}'"
    for content, command, env, expected in (
        ("bad name=x\n", "links", {},
         f"FORKPROXY_ENV_FILE (--env-file) {given}, line 1: bad variable name 'bad name'"),
        ("# nothing\n", "serve", {},
         f"no links found: no SPEC given, and no <ALIAS>_PORT_<N>_TCP variable in "
         f"FORKPROXY_ENV_FILE (--env-file) {given}"),
        ("# nothing\n", "links", {"FORKPROXY_FROM_ENV": "1"},
         f"no links found: no SPEC given, and no <ALIAS>_PORT_<N>_TCP variable in the "
         f"environment or FORKPROXY_ENV_FILE (--env-file) {given}; since Docker Engine 29, "
         "`docker run --link` sets no link variables (unless its daemon runs with "
         "DOCKER_KEEP_DEPRECATED_LEGACY_LINKS_ENV_VARS=1): set them with -e, as in -e "
         "REDIS_PORT_6379_TCP=tcp://redis:6379"),
    ):
        env_file.write_text(content)
        from_variable = run(command, env={"FORKPROXY_ENV_FILE": str(env_file), **env})
        assert_one_line_error(from_variable)
        assert from_variable.stderr == f"forkproxy: error: {expected}\n"
        typed = run(command, "--env-file", str(env_file), env=env)
        assert_one_line_error(typed)
        plain = expected.replace("FORKPROXY_ENV_FILE (--env-file) ", "env file ")
        assert typed.stderr == f"forkproxy: error: {plain}\n"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["serve", "--max-children", "lots", "1=127.0.0.1:1"], "--max-children 'lots'"),
        (["serve", "--grace", "soon", "1=127.0.0.1:1"], "--grace 'soon'"),
        (["serve", "--bogus", "1=127.0.0.1:1"], "--bogus"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], needle: str) -> None:
    result = run(*args)
    assert_one_line_error(result, needle)


@pytest.mark.parametrize(("rest", "extra"), [(["junk"], "junk"),
                                             (["serve", "1=127.0.0.1:1"], "serve"),
                                             (["--", "junk"], "junk")])
def test_version_takes_nothing_after_it(rest: list[str], extra: str) -> None:
    """`forkproxy --version junk` printed the version and exited 0: --version's eager
    callback exited before anything after it was looked at, so a command line with a
    mistake in it passed. `--version` alone prints the version as before; with `--help`,
    in either order, the help."""
    assert_one_line_error(run("--version", *rest),
                          f"--version takes no command or argument: got {extra!r}")
    alone = run("--version")
    assert (alone.returncode, alone.stdout, alone.stderr) == (0, f"forkproxy {__version__}\n", "")
    helped = run("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: forkproxy "), helped
    for args in (["--version", "--help"], ["--help", "--version"]):
        result = run(*args)
        assert (result.returncode, result.stdout, result.stderr) == (0, helped.stdout, ""), result


@pytest.mark.parametrize("command", ["serve", "links", "status", "check", "reload"])
def test_version_after_a_command_says_where_it_goes(command: str) -> None:
    """`forkproxy serve --version` got click's nearest option of the command as a hint,
    "(Possible options: --verbose)" (--json for status): not what was meant. The line
    says where --version goes now; still a usage error, exit 2."""
    assert_one_line_error(run(command, "--version"),
                          "No such option: --version (it goes before the command: "
                          "forkproxy --version)")
    assert "Possible options" not in run(command, "--version").stderr
    # Other unknown options keep click's suggestion.
    assert_one_line_error(run("serve", "--verbos"), "(Possible options: --verbose)")


@pytest.mark.parametrize(("args", "said"), [
    # Unlike every option: no suggestion (it was "Possible options: --verbose", of an
    # option alike only in the two dashes all share).
    (["serve", "--bogus"], "No such option: --bogus"),
    (["serve", "--x"], "No such option: --x"),
    (["status", "--bogus"], "No such option: --bogus"),
    # A typo keeps click's suggestion.
    (["serve", "--max-child", "1"], "No such option: --max-child (Possible options: "
     "--max-children)"),
    (["serve", "--allowed", "10.0.0.0/8"], "No such option: --allowed (Possible options: "
     "--allow)"),
    (["status", "--jsn"], "No such option: --jsn (Possible options: --json)"),
    # Alike without the dashes only just (difflib's ratio 0.6-0.7): still suggested.
    (["status", "--socket", "/run/fp.sock"], "No such option: --socket (Possible options: "
     "--status-socket)"),
    # An option cut short keeps it too: too short to be alike without the dashes, it is
    # the start of the one meant (click suggested these, and the filter dropped them).
    (["serve", "--tak"], "No such option: --tak (Possible options: --take-over)"),
    (["serve", "--gr", "5"], "No such option: --gr (Possible options: --grace)"),
    # A whole word of some options: those, not one alike only by its letters (`--retries`
    # was told `--metrics` too).
    (["serve", "--retries", "3"], "No such option: --retries (Possible options: "
     "--connect-retries)"),
    (["serve", "--timeout", "3"], "No such option: --timeout (Possible options: "
     "--connect-timeout, --idle-timeout, --user-timeout)"),
])
def test_an_unknown_option_is_suggested_only_a_close_one(args: list[str], said: str) -> None:
    """click's difflib compares the options dashes and all; `--bogus` was told
    `--verbose`. The line suggests only an option alike without the dashes."""
    result = run(*args)
    assert_one_line_error(result, said)
    assert result.stderr == f"forkproxy: error: {said}\n", result


@pytest.mark.parametrize(("args", "owners"), [
    (["links", "--grace", "5", "6379=127.0.0.1:1"], "serve"),
    (["links", "--metrics", "127.0.0.1:0", "6379=127.0.0.1:1"], "serve"),
    # Given twice to a command that takes it not once: whose it is, not "given twice".
    (["links", "--metrics", "127.0.0.1:0", "--metrics", "127.0.0.1:1", "6379=127.0.0.1:1"],
     "serve"),
    (["check", "--json"], "status"),
    (["status", "--from-env"], "links and serve"),
    # Of more than two, a list: not "check and reload and serve and status".
    (["links", "--status-socket", "/x", "6379=127.0.0.1:1"], "check, reload, serve and status"),
])
def test_another_commands_option_says_whose_it_is(args: list[str], owners: str) -> None:
    """`forkproxy links --grace 5 ...` (a serve command line with the command changed, as
    `links` is serve's dry run) got "No such option: --grace", which read as a typo, and
    for --metrics a "Possible options" of links'. The line says whose option it is."""
    result = run(*args)
    assert_one_line_error(result, f"No such option: {args[1]} (an option of {owners}, "
                                  f"not of {args[0]})")
    assert "Possible options" not in result.stderr


# What each FORKPROXY_... variable's bad value gets: the line begins with the variable, the
# flag in brackets (the user may have set the variable in a compose file and typed no flag).
# {tmp} and {busy} are filled in by the test. The env file's errors name the file (`env file
# 'PATH'`, as with the flag; the variable and its flag take those words' place).
BAD_VARIABLES = [
    # A flag's variable: what it takes, in forkproxy's words whatever typer's version says
    # (click's "is not a valid boolean", pydantic's "unable to interpret input").
    ("serve", "FORKPROXY_FROM_ENV", "maybe", "FORKPROXY_FROM_ENV (--from-env) 'maybe': not "
     "true or false (1/0, yes/no, on/off, t/f, y/n and their capitals too)\n"),
    ("links", "FORKPROXY_FROM_ENV", "maybe", "FORKPROXY_FROM_ENV (--from-env) 'maybe': not "
     "true or false (1/0, yes/no, on/off, t/f, y/n and their capitals too)\n"),
    ("serve", "FORKPROXY_ENV_FILE", "{tmp}/no.env",
     "cannot read FORKPROXY_ENV_FILE (--env-file) '{tmp}/no.env': No such file or directory"),
    ("links", "FORKPROXY_ENV_FILE", "{tmp}/no.env",
     "cannot read FORKPROXY_ENV_FILE (--env-file) '{tmp}/no.env': No such file or directory"),
    ("serve", "FORKPROXY_ENV_FILE", "/dev/null",
     "FORKPROXY_ENV_FILE (--env-file) '/dev/null': not a regular file"),
    ("serve", "FORKPROXY_RELAY", "magic",
     "FORKPROXY_RELAY (--relay) 'magic': expected one of auto, splice, copy"),
    ("serve", "FORKPROXY_CONNECT_TIMEOUT", "0",
     "FORKPROXY_CONNECT_TIMEOUT (--connect-timeout) 0: at least 0.001 seconds"),
    ("serve", "FORKPROXY_CONNECT_RETRIES", "-1",
     "FORKPROXY_CONNECT_RETRIES (--connect-retries) -1: must be 0 or more"),
    ("serve", "FORKPROXY_GRACE", "soon",
     "FORKPROXY_GRACE (--grace) 'soon': not a number of seconds"),
    ("serve", "FORKPROXY_IDLE_TIMEOUT", "0",
     "FORKPROXY_IDLE_TIMEOUT (--idle-timeout) 0: at least 0.001 seconds, or 'off'"),
    ("serve", "FORKPROXY_HALFCLOSE_TIMEOUT", "9e9",
     "FORKPROXY_HALFCLOSE_TIMEOUT (--halfclose-timeout) '9e9': at most 2,000,000 seconds"),
    ("serve", "FORKPROXY_KEEPALIVE", "0.5",
     "FORKPROXY_KEEPALIVE (--keepalive) '0.5': a whole number of seconds from 1 to 32767, "
     "or 'off'"),
    ("serve", "FORKPROXY_KEEPALIVE", "40000",
     "FORKPROXY_KEEPALIVE (--keepalive) '40000': a whole number of seconds from 1 to 32767, "
     "or 'off'"),
    ("serve", "FORKPROXY_USER_TIMEOUT", "9e9",
     "FORKPROXY_USER_TIMEOUT (--user-timeout) '9e9': at most 2,000,000 seconds"),
    ("serve", "FORKPROXY_RESOLVE_EVERY", "0.2",
     "FORKPROXY_RESOLVE_EVERY (--resolve-every) 0.2: at least 1 second, or 'off'"),
    ("serve", "FORKPROXY_MAX_CHILDREN", "lots",
     "FORKPROXY_MAX_CHILDREN (--max-children) 'lots': not a whole number"),
    ("serve", "FORKPROXY_MAX_CHILDREN", "0",
     "FORKPROXY_MAX_CHILDREN (--max-children) 0: must be at least 1"),
    # Repeatable: the variable holds the networks separated by spaces (serve --help says so).
    ("serve", "FORKPROXY_ALLOW", "10.0.0.0/8 x",
     "FORKPROXY_ALLOW (--allow) 'x': not an IPv4 or IPv6 CIDR"),
    # With commas: the value as written (click split it at the space: '10.0.0.0/8,' was
    # quoted, a fragment), and how to write it.
    ("serve", "FORKPROXY_ALLOW", "10.0.0.0/8, 192.168.0.0/16",
     "FORKPROXY_ALLOW (--allow) '10.0.0.0/8, 192.168.0.0/16': not an IPv4 or IPv6 CIDR: "
     "networks are separated by spaces in FORKPROXY_ALLOW, and --allow is repeated on the "
     "command line, not joined with commas"),
    # Empty or blank: click takes it for unset, which is every client; refused instead, so
    # that a template that emptied the variable does not open the filter.
    ("serve", "FORKPROXY_ALLOW", "",
     "FORKPROXY_ALLOW (--allow) '': empty: name a network (without --allow and "
     "FORKPROXY_ALLOW every client is allowed)"),
    ("serve", "FORKPROXY_ALLOW", " \t",
     "FORKPROXY_ALLOW (--allow) ' \\t': empty: name a network"),
    # --alias: blank refused as FORKPROXY_ALLOW is (unset takes every link variable).
    ("serve", "FORKPROXY_ALIAS", "",
     "FORKPROXY_ALIAS (--alias) '': empty: name an alias (without --alias and FORKPROXY_ALIAS "
     "every link variable is taken)"),
    ("links", "FORKPROXY_ALIAS", "redis:db",
     "FORKPROXY_ALIAS (--alias) 'redis:db': give the alias alone"),
    ("serve", "FORKPROXY_ALIAS", "redis",
     "FORKPROXY_ALIAS (--alias) selects among link variables: give --from-env or --env-file "
     "too"),
    # Empty or blank: refused as FORKPROXY_ALLOW is, not taken for unset (0.0.0.0): a
    # template that emptied it (`${BIND_ADDR}` unset) put the listeners on every interface.
    ("serve", "FORKPROXY_BIND", "",
     "FORKPROXY_BIND (--bind) '': empty: name an address (without --bind and FORKPROXY_BIND, "
     "listeners bind 0.0.0.0, every IPv4 interface)"),
    ("links", "FORKPROXY_BIND", "",
     "FORKPROXY_BIND (--bind) '': empty: name an address"),
    ("links", "FORKPROXY_BIND", " ",
     "FORKPROXY_BIND (--bind) ' ': empty: name an address"),
    ("serve", "FORKPROXY_BIND", "nowhere",
     "FORKPROXY_BIND (--bind) 'nowhere': bind address 'nowhere' is not an IP address"),
    ("links", "FORKPROXY_BIND", "fe80::1",
     "FORKPROXY_BIND (--bind) 'fe80::1': 'fe80::1' is link-local: it needs a zone"),
    # A zone of no interface: named as the variable's (it named the link listening there,
    # and nothing at all where no link did, as here: the SPEC has its own address).
    ("links", "FORKPROXY_BIND", "fe80::1%nosuchif0",
     "FORKPROXY_BIND (--bind) 'fe80::1%nosuchif0': no interface 'nosuchif0' on this host"),
    ("links", "FORKPROXY_BIND", "[127.0.0.1]",
     "FORKPROXY_BIND (--bind) '[127.0.0.1]': '127.0.0.1' in brackets is not an IPv6 address"),
    ("serve", "FORKPROXY_METRICS", "nowhere",
     "FORKPROXY_METRICS (--metrics) 'nowhere': expected HOST:PORT, got 'nowhere'"),
    # The next three are found by the supervisor, after the exec.
    ("serve", "FORKPROXY_METRICS", "127.0.0.1:{busy}",
     "FORKPROXY_METRICS (--metrics) '127.0.0.1:{busy}': cannot listen on 127.0.0.1:{busy}: "
     "address already in use"),
    ("serve", "FORKPROXY_STATUS_SOCKET", "{tmp}/precious",
     "FORKPROXY_STATUS_SOCKET (--status-socket) '{tmp}/precious': exists and is not a socket"),
    ("serve", "FORKPROXY_PID_FILE", "{tmp}/no/proxy.pid",
     "FORKPROXY_PID_FILE (--pid-file) '{tmp}/no/proxy.pid': No such file or directory"),
    ("serve", "FORKPROXY_LOG_FORMAT", "xml",
     "FORKPROXY_LOG_FORMAT (--log-format) 'xml': expected text or json"),
]


@pytest.mark.parametrize(("command", "variable", "value", "expected"), BAD_VARIABLES)
def test_a_bad_value_from_a_variable_is_named_by_the_variable(
    tmp_path: Path, command: str, variable: str, value: str, expected: str
) -> None:
    """The line named the flag (`--allow 'x': ...`) for a value that came from the variable,
    sending whoever set FORKPROXY_ALLOW in a compose file looking for a flag never typed.
    A runtime directory of the test's own: in the shared default one (/tmp/forkproxy-UID) a
    stale socket left by any other run was tidied, and its `removed-stale-sockets` line
    was a second line on stderr."""
    (tmp_path / "precious").write_text("keep me\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fill = {"tmp": str(tmp_path), "busy": str(taken.getsockname()[1])}
        result = run(command, "127.0.0.1:0=127.0.0.1:1", timeout=15,
                     env={"XDG_RUNTIME_DIR": str(tmp_path), variable: value.format(**fill)})
    assert_one_line_error(result)
    assert result.stderr.startswith("forkproxy: error: " + expected.format(**fill)), result.stderr
    assert (tmp_path / "precious").read_text() == "keep me\n"


def test_every_variable_has_a_bad_value_tested() -> None:
    """A new option with a variable needs its line in BAD_VARIABLES."""
    from typer.main import get_command

    from forkproxy.cli import app

    commands = get_command(app).commands  # type: ignore[attr-defined]
    variables = {param.envvar for command in commands.values() for param in command.params
                 if param.envvar}
    assert variables == {variable for _, variable, _, _ in BAD_VARIABLES}


LITERAL = ": values are taken literally, as `docker run --env-file` does: remove the quotes"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FORKPROXY_BIND", '"0.0.0.0"',
         "FORKPROXY_BIND (--bind) '\"0.0.0.0\"': bind address '\"0.0.0.0\"' is not an IP "
         "address"),
        # Split at the space by click: the fragment is quoted, the whole value judged.
        ("FORKPROXY_ALLOW", "'10.0.0.0/8 192.168.0.0/16'",
         "FORKPROXY_ALLOW (--allow) \"'10.0.0.0/8\": not an IPv4 or IPv6 CIDR"),
        ("FORKPROXY_MAX_CHILDREN", '"10"',
         "FORKPROXY_MAX_CHILDREN (--max-children) '\"10\"': not a whole number"),
        # click's own error (a usage error), in forkproxy's words.
        ("FORKPROXY_FROM_ENV", '"1"', "FORKPROXY_FROM_ENV (--from-env) '\"1\"': "),
        # Found by the supervisor, after the exec.
        ("FORKPROXY_PID_FILE", '"{tmp}/proxy.pid"',
         "FORKPROXY_PID_FILE (--pid-file) '\"{tmp}/proxy.pid\"': No such file or directory"),
        ("FORKPROXY_ENV_FILE", '"{tmp}/links.env"',
         "cannot read FORKPROXY_ENV_FILE (--env-file) '\"{tmp}/links.env\"': No such file or "
         "directory"),
    ],
)
def test_a_quoted_variable_is_told_values_are_literal(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    """`FORKPROXY_BIND="0.0.0.0"` in a `docker run --env-file` file, or a Compose
    `environment:` list, reaches forkproxy with its quotes: the error named the value
    but not why it was wrong, where a link variable's says to remove them."""
    (tmp_path / "links.env").write_text("A_PORT_7000_TCP=tcp://198.18.0.1:7000\n")
    result = run("serve", "127.0.0.1:0=127.0.0.1:1", timeout=15,
                 env={"XDG_RUNTIME_DIR": str(tmp_path),
                      variable: value.format(tmp=tmp_path)})
    assert_one_line_error(result)
    line = result.stderr.removesuffix("\n")
    assert line.startswith("forkproxy: error: " + expected.format(tmp=tmp_path)), line
    assert line.endswith(LITERAL), line


@pytest.mark.parametrize(
    ("variable", "args", "expected"),
    [
        ("FORKPROXY_GRACE", ["--grace", "later"], "--grace 'later': not a number of seconds"),
        ("FORKPROXY_ALLOW", ["--allow", "y"], "--allow 'y': not an IPv4 or IPv6 CIDR"),
    ],
)
def test_a_flag_typed_over_a_bad_variable_is_named_as_typed(
    variable: str, args: list[str], expected: str
) -> None:
    """The command line wins over the variable, and its error names only the flag."""
    result = run("serve", *args, "127.0.0.1:0=127.0.0.1:1", env={variable: "bad"})
    assert_one_line_error(result)
    assert result.stderr == f"forkproxy: error: {expected}\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["status", "\u2014json"], "'\u2014json': '\u2014' (U+2014) is no hyphen: an option is "
         "written with two ASCII hyphens, as in --json"),
        (["check", "\u2013status-socket=/x"], "'\u2013status-socket=/x': '\u2013' (U+2013) is "
         "no hyphen: an option is written with two ASCII hyphens, as in --status-socket"),
        # After an option's value, still found; the value itself is not judged.
        (["reload", "--status-socket", "/x", "\u2212\u2212pid-file", "/p"],
         "'\u2212\u2212pid-file': '\u2212\u2212' (U+2212) is no hyphen: an option is written "
         "with two ASCII hyphens, as in --pid-file"),
        (["\u2014version"], "'\u2014version': '\u2014' (U+2014) is no hyphen: an option is "
         "written with two ASCII hyphens, as in --version"),
        # serve and links say it of the SPEC, as before; a short option gets one hyphen.
        (["serve", "\u2013v", "1=198.18.0.1:1"], "SPEC '\u2013v': '\u2013' (U+2013) is no "
         "hyphen: a short option is written with one ASCII hyphen, as in -v"),
        # In a heading's upper case: said in lower case, as options are.
        (["status", "\u2014JSON"], "'\u2014JSON': '\u2014' (U+2014) is no hyphen: an option is "
         "written with two ASCII hyphens, as in --json"),
        # An ASCII hyphen, then a word processor's en dash: click read it as options
        # ("No such option: -\u2013"), serve's SPECs too; named by the en dash.
        (["serve", "-\u2013from-env"], "'-\u2013from-env': '\u2013' (U+2013) is no hyphen: an "
         "option is written with two ASCII hyphens, as in --from-env"),
        (["status", "-\u2013json"], "'-\u2013json': '\u2013' (U+2013) is no hyphen: an option "
         "is written with two ASCII hyphens, as in --json"),
    ],
)
def test_an_option_with_typographic_dashes_is_named_by_every_command(
    args: list[str], expected: str
) -> None:
    """`status \u2014json` (pasted from a page that set `--` as a dash) got click's "Got
    unexpected extra argument", and `\u2014version` "No such command": the hint that serve
    and links gave, in one place for every command. Nothing is asked of a supervisor."""
    result = run(*args, env={"XDG_RUNTIME_DIR": "/nonexistent"})
    assert_one_line_error(result)
    assert result.stderr == f"forkproxy: error: {expected}\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # Was "as in -j": status has no -j; the one long option it starts is meant.
        (["status", "\u2014j"], "'\u2014j': '\u2014' (U+2014) is no hyphen, and forkproxy "
         "status has no option -j: did you mean --json?"),
        (["status", "\u2014jsno"], "and forkproxy status has no option --jsno: did you mean "
         "--json?"),
        (["serve", "\u2014verbos", "1=198.18.0.1:1"], "SPEC '\u2014verbos': '\u2014' (U+2014) "
         "is no hyphen, and forkproxy serve has no option --verbos: did you mean --verbose?"),
        # Another command's option: said whose, as click's "No such option" is.
        (["check", "-\u2013json"], "'-\u2013json': '\u2013' (U+2013) is no hyphen, and --json "
         "is an option of status, not of forkproxy check"),
        (["links", "\u2014verbose"], "SPEC '\u2014verbose': '\u2014' (U+2014) is no hyphen, and "
         "--verbose is an option of serve, not of forkproxy links"),
        (["serve", "\u2014json", "1=198.18.0.1:1"], "and --json is an option of status, not of "
         "forkproxy serve"),
        (["reload", "\u2014x"], "and forkproxy reload has no option -x: its options are in "
         "`forkproxy reload --help`"),
        # The start of several (--connect-retries, --connect-timeout): neither is guessed.
        (["serve", "\u2014connect", "1=198.18.0.1:1"], "and forkproxy serve has no option "
         "--connect: its options are in `forkproxy serve --help`"),
        # The top level has --version and --help alone: -v is serve's, -V nobody's.
        (["\u2014V"], "'\u2014V': '\u2014' (U+2014) is no hyphen, and forkproxy has no option "
         "-V: did you mean --version?"),
        # A command's option before any command: whose it is.
        (["\u2014from-env"], "'\u2014from-env': '\u2014' (U+2014) is no hyphen, and "
         "--from-env is an option of links and serve, not of forkproxy"),
        # Of more than two: a list, not "check and reload and serve and status".
        (["\u2014status-socket=/x"], "and --status-socket is an option of check, reload, "
         "serve and status, not of forkproxy"),
    ],
)
def test_a_typographic_dash_suggests_only_an_option_of_the_command(
    args: list[str], expected: str
) -> None:
    """`status \u2014j` was told "as in -j", an option status has not (nor any command):
    what the hint suggests is one of the command's options, or says whose it is."""
    result = run(*args, env={"XDG_RUNTIME_DIR": "/nonexistent"})
    assert_one_line_error(result)
    assert result.stderr.startswith("forkproxy: error: ")
    assert expected in result.stderr


# Each empty on the command line, where its variable empty counts as unset. --resolve-every
# '' was `off`, where FORKPROXY_RESOLVE_EVERY='' is the default 30; the paths said "No
# such file or directory", as if one had been named.
EMPTY_FLAGS = [
    (["--resolve-every", ""], "--resolve-every '': empty: give a number of seconds, or 'off'"),
    (["--idle-timeout="], "--idle-timeout '': empty: give a number of seconds, or 'off'"),
    (["--keepalive", ""], "--keepalive '': empty: give a number of seconds, or 'off'"),
    (["--grace", ""], "--grace '': empty: give a number of seconds"),
    (["--pid-file", ""], "--pid-file '': an empty path"),
    (["--env-file", ""], "--env-file '': an empty path"),
]


@pytest.mark.parametrize(("args", "expected"), EMPTY_FLAGS)
def test_a_flag_given_empty_is_refused(args: list[str], expected: str) -> None:
    result = run("serve", *args, "127.0.0.1:0=127.0.0.1:1")
    assert_one_line_error(result)
    assert result.stderr == f"forkproxy: error: {expected}\n"


@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("flag", ["--pid-file", "--status-socket"])
def test_a_blank_path_is_refused(flag: str, variable: bool, tmp_path: Path) -> None:
    """A path of blanks alone (`--pid-file "$RUN "` with RUN left empty, a stray space in
    a Compose value) was taken: serve wrote a file named ' ' in its working directory,
    where neither `reload --pid-file` nor `status` looks. Refused as the empty one is."""
    name = "FORKPROXY_" + flag.removeprefix("--").upper().replace("-", "_")
    args = [] if variable else [flag, " "]
    result = run("serve", *args, "127.0.0.1:0=127.0.0.1:1", timeout=10,
                 env={name: " "} if variable else None, prefix=("env", f"--chdir={tmp_path}"))
    assert_one_line_error(result)
    named = f"{name} ({flag})" if variable else flag
    assert result.stderr == f"forkproxy: error: {named} ' ': a blank path\n"
    assert list(tmp_path.iterdir()) == []


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`FORKPROXY_X=` (a Compose file's `FOO=`) is the option's default, for every option
    variable, as if unset; but for FORKPROXY_ALLOW, _BIND and _ALIAS, refused (their
    default opens what they restrict: BAD_VARIABLES). Read through the real CLI up to
    the exec, which is replaced by keeping what it was handed."""
    from typer.main import get_command

    from forkproxy import cli

    handed: list[Sources] = []

    def keep(*, sources: Sources, **_: object) -> None:
        handed.append(sources)
        raise typer.Exit(0)

    monkeypatch.setattr(cli, "serve", keep)
    for name in [name for name in os.environ if name.upper().startswith("FORKPROXY_")]:
        monkeypatch.delenv(name)
    serve = get_command(app).commands["serve"]  # type: ignore[attr-defined]
    variables = sorted(param.envvar for param in serve.params if param.envvar)
    refused = {"FORKPROXY_ALLOW", "FORKPROXY_BIND", "FORKPROXY_ALIAS"}
    assert refused < set(variables)
    args = ["serve", "127.0.0.1:0=127.0.0.1:1"]
    app(args, standalone_mode=False)
    [unset] = handed
    for variable in sorted(set(variables) - refused):
        monkeypatch.setenv(variable, "")
        handed.clear()
        app(args, standalone_mode=False)
        monkeypatch.delenv(variable)
        assert handed == [unset], variable


@pytest.mark.parametrize("command", ["serve", "links"])
@pytest.mark.parametrize("second", [["--env-file", "{b}"], ["--env-file={b}"]])
def test_env_file_given_twice_is_refused_not_half_read(
    tmp_path: Path, command: str, second: list[str]
) -> None:
    """`--env-file a.env --env-file b.env`, as `docker run` takes it (reading both): click
    kept the last, and the proxy served b's links alone, a's ports unserved without a word."""
    (tmp_path / "a.env").write_text("A_PORT_7201_TCP=tcp://a.test:1\n")
    # b's link is bad: read (the last one kept), it is an error of its own, so that without
    # the refusal nothing starts either (and nothing listens: --bind 127.0.0.1 besides).
    (tmp_path / "b.env").write_text("B_PORT_7202_TCP=tcp://b.test:http\n")
    result = run(command, "--bind", "127.0.0.1", "--env-file", str(tmp_path / "a.env"),
                 *[arg.format(b=tmp_path / "b.env") for arg in second],
                 env={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert_one_line_error(result, "--env-file given twice: forkproxy reads one env file")
    # Once on the command line over its variable is no repetition: the flag wins.
    result = run("links", "--env-file", str(tmp_path / "a.env"),
                 env={"FORKPROXY_ENV_FILE": str(tmp_path / "b.env")})
    assert result.stdout == "listen 0.0.0.0:7201 -> a.test:1 (A_PORT_7201_TCP)\n", result


@pytest.mark.parametrize(("twice", "needle"), [
    (["--bind", "127.0.0.1", "--bind", "::1"],
     "--bind given twice: links listen on one default address"),
    (["--bind=127.0.0.1", "--bind", "::1"],
     "--bind given twice: links listen on one default address"),
    (["--metrics", "127.0.0.1:0", "--metrics=[::1]:0"],
     "--metrics given twice: forkproxy serves metrics on one address"),
])
def test_bind_or_metrics_given_twice_is_refused_not_the_last_taken(
    tmp_path: Path, twice: list[str], needle: str
) -> None:
    """`--bind 127.0.0.1 --bind ::1` reads as "both": click kept the last, so only ::1 was
    bound, without a word; `--metrics` twice served one scrape port of the two. Refused,
    as --env-file given twice is; once on the command line over its variable is none."""
    for command in ("serve", "links"):
        if command == "links" and twice[0].startswith("--metrics"):
            continue  # links takes no --metrics
        result = run(command, *twice, "0=a.test:1", env={"XDG_RUNTIME_DIR": str(tmp_path)})
        assert_one_line_error(result, needle)
    result = run("links", "--bind", "127.0.0.1", "0=a.test:1", env={"FORKPROXY_BIND": "::1"})
    assert result.stdout == "listen 127.0.0.1:0 -> a.test:1 (0=a.test:1)\n", result


@pytest.mark.parametrize(("allow", "drop"), [
    ("[fe80::%lo]/64", "drop the '%lo'"),  # socat's spelling: not "'%lo]'"
    ("fe80::%a\nb/64", "drop the '%a\\nb'"),  # one line, as the value is quoted
])
def test_an_allow_zone_is_named_as_written_on_one_line(allow: str, drop: str) -> None:
    """The zone an --allow network must drop is what follows its `%`, up to the prefix
    or socat's closing bracket, quoted as the value is: the bracket was named as part of
    it, and a newline in it split the error in two lines."""
    result = run("serve", "--allow", allow, "--bind", "::1", "0=a.test:1")
    assert_one_line_error(result, "a network takes no IPv6 zone", drop)


def test_bind_on_the_command_line_wins_over_an_empty_variable() -> None:
    """An empty FORKPROXY_BIND is refused (BAD_VARIABLES), but a --bind typed over it is
    what counts: `links` lists the flag's address."""
    result = run("links", "--bind", "127.0.0.1", "0=a.test:1", env={"FORKPROXY_BIND": ""})
    assert result.returncode == 0, result
    assert result.stdout == "listen 127.0.0.1:0 -> a.test:1 (0=a.test:1)\n"


def test_allow_on_the_command_line_wins_over_an_empty_variable(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory
) -> None:
    """An empty FORKPROXY_ALLOW is refused (BAD_VARIABLES), but a flag typed over it is
    what counts, as for every option: the proxy starts and filters by the flag."""
    server = tcp_server(echo)
    proxy = start_proxy("--allow", "127.0.0.2/32", f"127.0.0.1:0=127.0.0.1:{server.port}",
                        env={**os.environ, "FORKPROXY_ALLOW": ""})
    assert proxy.lines[0].startswith("listening 127.0.0.1:"), proxy.lines
    with socket.create_connection(("127.0.0.1", proxy.ports[0]), timeout=10) as sock:
        sock.sendall(b"ping")
        # Not in 127.0.0.2/32: closed at accept, never relayed. A reset if "ping" arrived
        # before the close, else an end.
        assert closed_by_peer(sock, 10)


# What a container beside a chained ambassador (linked, or a Kubernetes Service, named
# `forkproxy` or `forkproxy-...`) has in its environment, an option's variable, and the
# project's scripts' own: none of them is an unknown variable.
NOT_UNKNOWN = {
    "FORKPROXY_PORT": "tcp://198.18.0.5:6379",
    "FORKPROXY_PORT_6379_TCP": "tcp://198.18.0.5:6379",
    "FORKPROXY_PORT_6379_TCP_ADDR": "198.18.0.5",
    "FORKPROXY_NAME": "/app/forkproxy",
    "FORKPROXY_ENV_REDIS_PORT_6379_TCP": "tcp://198.18.0.6:6379",
    "FORKPROXY_SERVICE_HOST": "198.18.0.5",
    "FORKPROXY_SERVICE_PORT": "6379",
    "FORKPROXY_SERVICE_PORT_REDIS": "6379",
    "FORKPROXY_CACHE_PORT": "tcp://198.18.0.7:6379",
    "FORKPROXY_CACHE_SERVICE_HOST": "198.18.0.7",
    "FORKPROXY_GRACE": "8",
    "FORKPROXY_BENCH_VENV": "/nonexistent",
}


def test_an_unknown_forkproxy_variable_is_a_warning_and_the_proxy_serves(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory
) -> None:
    """FORKPROXY_ALLOWED (for FORKPROXY_ALLOW) served every client, FORKPROXY_TAKE_OVER
    took nothing over, without a word: click ignores a variable no option reads. Each is
    now an `unknown-variable` warning in the supervisor's log (JSON with --log-format
    json), before the `listening` lines, naming the option meant; its value is never
    shown (a secret, perhaps). A warning only: the proxy serves."""
    server = tcp_server(echo)
    secret = "s3cret-10.0.0.0/8"
    proxy = start_proxy("--log-format", "json", f"127.0.0.1:0=127.0.0.1:{server.port}",
                        env={**os.environ, **NOT_UNKNOWN, "FORKPROXY_ALLOWED": secret,
                             "FORKPROXY_TAKE_OVER": secret})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
    assert wait_for(lambda: '"event": "listening"' in proxy.log()), proxy.log()
    records = [json.loads(line) for line in proxy.log().splitlines()]
    events = [record["event"] for record in records]
    unknown = [record for record in records if record["event"] == "unknown-variable"]
    assert [(record["level"], record["variable"]) for record in unknown] == [
        ("warning", "FORKPROXY_ALLOWED"), ("warning", "FORKPROXY_TAKE_OVER")], records
    assert unknown[0]["detail"] == ("no option reads it: ignored; did you mean "
                                    "FORKPROXY_ALLOW (--allow)?"), unknown
    assert unknown[1]["detail"] == ("no option reads it: ignored; --take-over has no "
                                    "variable, on purpose: give the flag"), unknown
    assert events.index("unknown-variable") < events.index("listening"), events
    assert secret not in proxy.log()


def test_a_portless_link_is_no_unknown_variable_but_a_typo_shaped_like_one_is(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory
) -> None:
    """A container linked as `forkproxy-db` (Docker's legacy links) that exposes no port
    gives FORKPROXY_DB_NAME and FORKPROXY_DB_ENV_... alone: each was an `unknown-variable`
    warning, though no option's. Taken by their names for a link's now, unless the name
    is a likely typo of an option variable (FORKPROXY_ENV_FIEL, which FORKPROXY's own
    _ENV_ let through before, and FORKPROXY_BIND_NAME): those are still warned of."""
    server = tcp_server(echo)
    secret = "s3cret-pw"
    proxy = start_proxy("--log-format", "json", f"127.0.0.1:0=127.0.0.1:{server.port}",
                        env={**os.environ, "FORKPROXY_DB_NAME": "/app/forkproxy-db",
                             "FORKPROXY_DB_ENV_PASSWORD": secret,
                             "FORKPROXY_DB_ENV_PATH": "/usr/bin",
                             "FORKPROXY_CACHE.1_NAME": "/app/forkproxy-cache.1",
                             "FORKPROXY_ENV_FIEL": secret, "FORKPROXY_BIND_NAME": secret})
    assert wait_for(lambda: '"event": "listening"' in proxy.log()), proxy.log()
    unknown = [(record["variable"], record["detail"])
               for record in map(json.loads, proxy.log().splitlines())
               if record["event"] == "unknown-variable"]
    assert unknown == [
        ("FORKPROXY_BIND_NAME",
         "no option reads it: ignored; did you mean FORKPROXY_BIND (--bind)?"),
        ("FORKPROXY_ENV_FIEL",
         "no option reads it: ignored; did you mean FORKPROXY_ENV_FILE (--env-file)?"),
    ], proxy.log()
    assert secret not in proxy.log()


def test_an_unknown_variables_name_is_shown_short_and_quoted(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory
) -> None:
    """The name is the environment's, any length, any character but `=`: in a text log
    line it is cut to 80 characters and an ESC in it escaped, as other lines show
    hostile names; a name in the wrong case is told the right one."""
    server = tcp_server(echo)
    hostile = "FORKPROXY_\x1b[2J" + "X" * 200
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}",
                        env={**os.environ, hostile: "1", "forkproxy_bind": "127.0.0.1",
                             "FORKPROXY_BIND_ADDR": "127.0.0.1"})
    assert wait_for(lambda: " listening " in proxy.log()), proxy.log()
    lines = [line for line in proxy.log().splitlines() if " unknown-variable " in line]
    assert len(lines) == 3, proxy.log()
    assert "\x1b" not in proxy.log()
    assert " warning unknown-variable variable=\"FORKPROXY_\\u001b[2J" + "X" * 63 + '..." ' in (
        lines[0]), lines
    assert lines[1].endswith(" variable=FORKPROXY_BIND_ADDR detail=\"no option reads it: "
                             "ignored; did you mean FORKPROXY_BIND (--bind)?\""), lines
    assert lines[2].endswith(" variable=forkproxy_bind detail=\"no option reads it: ignored; "
                             "did you mean FORKPROXY_BIND (--bind)? (names are upper "
                             "case)\""), lines


# 3,300 unknown names were 3,300 warnings before `listening`; 25 show the bound as well.
MANY_UNKNOWN = {f"FORKPROXY_JUNK_{index:02d}": "s3cret" for index in range(25)}
UNLOGGED = ("more FORKPROXY_ variables that no option reads, ignored (at most 10 have a "
            "line of their own)")


def test_many_unknown_variables_are_ten_warnings_and_a_count_of_the_rest(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory
) -> None:
    """The first 10 unknown variables (in name order) keep their `unknown-variable` line,
    word for word; the rest are one `unknown-variable-unlogged` record with their count,
    before `listening`: an environment of 3,300 wrote 3,300 lines first."""
    server = tcp_server(echo)
    proxy = start_proxy("--log-format", "json", f"127.0.0.1:0=127.0.0.1:{server.port}",
                        env={**os.environ, **MANY_UNKNOWN, "FORKPROXY_ALLOWED": "x"})
    assert wait_for(lambda: '"event": "listening"' in proxy.log()), proxy.log()
    records = [json.loads(line) for line in proxy.log().splitlines()]
    events = [record["event"] for record in records]
    unknown = [record for record in records if record["event"] == "unknown-variable"]
    assert [record["variable"] for record in unknown] == [
        "FORKPROXY_ALLOWED", *sorted(MANY_UNKNOWN)[:9]], records
    assert unknown[0]["detail"] == ("no option reads it: ignored; did you mean "
                                    "FORKPROXY_ALLOW (--allow)?"), unknown
    [unlogged] = [record for record in records
                  if record["event"] == "unknown-variable-unlogged"]
    assert (unlogged["level"], unlogged["count"], unlogged["detail"]) == (
        "warning", 16, UNLOGGED), unlogged
    assert events.index("unknown-variable-unlogged") == events.index("unknown-variable") + 10
    assert events.index("unknown-variable-unlogged") < events.index("listening"), events
    assert "s3cret" not in proxy.log()


def test_links_says_the_unknown_variables_serve_warns_of() -> None:
    """`forkproxy links`, the dry run, said nothing of FORKPROXY_ALLOWED, which serve warns
    of: now the same warnings, in the same words and bound, on stderr, before the table's
    own; the listen lines and the exit status as before."""
    one = run("links", "127.0.0.1:7000=10.0.0.5:7000",
              env={"FORKPROXY_ALLOWED": "s3cret", "FORKPROXY_BIND_ADDR": "s3cret"})
    assert one.returncode == 0, one
    assert one.stdout == "listen 127.0.0.1:7000 -> 10.0.0.5:7000 (127.0.0.1:7000=10.0.0.5:7000)\n"
    assert one.stderr == (
        "forkproxy: warning: FORKPROXY_ALLOWED: no option reads it: ignored; did you mean "
        "FORKPROXY_ALLOW (--allow)?\n"
        "forkproxy: warning: FORKPROXY_BIND_ADDR: no option reads it: ignored; did you mean "
        "FORKPROXY_BIND (--bind)?\n"), one
    many = run("links", "127.0.0.1:7000=10.0.0.5:7000", env=MANY_UNKNOWN)
    assert many.returncode == 0, many
    lines = many.stderr.splitlines()
    assert lines[:10] == [
        f"forkproxy: warning: {name}: no option reads it: ignored; each option's variable "
        "is in README's table of serve's options" for name in sorted(MANY_UNKNOWN)[:10]], lines
    assert lines[10:] == [f"forkproxy: warning: {UNLOGGED}: 15"], lines
    assert "s3cret" not in many.stderr
    # Bad input is still one line, not the warnings too (serve says none when it fails).
    bad = run("links", "7000=10.0.0.5:bad", env=MANY_UNKNOWN)
    assert_one_line_error(bad)


def test_links_never_writes_a_variable_names_escape_raw(tmp_path: Path) -> None:
    """A FORKPROXY_ name with an ESC in it (the environment's, or an env file's that another
    party writes) went raw to the operator's terminal in `links`'s warning: a title set,
    the screen recoloured. Quoted now, as serve's log line quotes it."""
    escape = "\x1b]0;pwned\x07\x1b[31m"
    env_file = tmp_path / "links.env"
    env_file.write_text(f"FORKPROXY_{escape}X=1\n")
    result = run("links", "127.0.0.1:7000=10.0.0.5:7000", "--env-file", str(env_file),
                 env={f"FORKPROXY_{escape}Y": "1"})
    assert result.returncode == 0, result
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith('forkproxy: warning: "FORKPROXY_\\u001b]0;pwned\\u0007'
                               '\\u001b[31mY": no option reads it'), lines
    assert lines[1].startswith('forkproxy: warning: "FORKPROXY_\\u001b]0;pwned\\u0007'
                               '\\u001b[31mX": no option reads it, and env file'), lines


def test_an_option_variable_in_the_env_file_is_a_warning_at_start_and_at_reload(
    start_proxy: Callable[..., Proxy], tcp_server: ServerFactory, tmp_path: Path
) -> None:
    """The env file gives links only; FORKPROXY_ALLOW=10.0.0.0/8 written in it beside them
    (as for `docker run --env-file`) was ignored without a word: a client from 127.0.0.1
    was served. Each option variable the file holds is now an `env-file-option` warning
    naming it and where it must go, never its value: at start, before `listening`, and at
    a reload for one the edited file adds (one standing is not repeated)."""
    server = tcp_server(echo)
    port = free_port()
    link = f"A_PORT_{port}_TCP=tcp://127.0.0.1:{server.port}"
    secret = "10.0.0.0/8-s3cret"
    env_file = tmp_path / "links.env"
    env_file.write_text(f"{link}\nFORKPROXY_ALLOW={secret}\nOTHER=1\n")
    proxy = start_proxy("--log-format", "json", "--env-file", str(env_file),
                        "--bind", "127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"ping")  # the file's FORKPROXY_ALLOW set nothing: still served
        assert sock.recv(4) == b"ping"

    def warnings() -> list[dict[str, Any]]:
        records = [json.loads(line) for line in proxy.log().splitlines()]
        return [record for record in records if record["event"] == "env-file-option"]

    assert wait_for(lambda: '"event": "listening"' in proxy.log()), proxy.log()
    assert len(warnings()) == 1, proxy.log()
    [first] = warnings()
    assert (first["level"], first["variable"]) == ("warning", "FORKPROXY_ALLOW"), first
    assert first["detail"] == (
        f"an option variable in env file {str(env_file)!r}, which sets links only: ignored; "
        "set FORKPROXY_ALLOW in forkproxy's environment, or give --allow"), first
    events = [json.loads(line)["event"] for line in proxy.log().splitlines()]
    assert events.index("env-file-option") < events.index("listening"), events

    env_file.write_text(f"{link}\nFORKPROXY_ALLOW={secret}\nFORKPROXY_IDLE_TIMEOUT=77\n"
                        f"FORKPROXY_IDLE_TIMEOT={secret}\n")  # a typo: said too
    proxy.signal(signal.SIGHUP)
    assert wait_for(lambda: '"event": "reloaded"' in proxy.log()), proxy.log()
    assert [record["variable"] for record in warnings()] == [
        "FORKPROXY_ALLOW", "FORKPROXY_IDLE_TIMEOT", "FORKPROXY_IDLE_TIMEOUT"], proxy.log()
    assert warnings()[2]["detail"].endswith(
        "set FORKPROXY_IDLE_TIMEOUT in forkproxy's environment, or give --idle-timeout")
    assert warnings()[1]["detail"] == (
        f"no option reads it, and env file {str(env_file)!r} sets links only: ignored; "
        "did you mean FORKPROXY_IDLE_TIMEOUT (--idle-timeout)?")
    assert secret not in proxy.log()


def test_take_over_in_the_env_file_is_told_it_has_no_variable_by_the_supervisor(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """The supervisor's own `env-file-option` line (at start, and at every reload, from
    the configuration handed to it) says what `links` says of FORKPROXY_TAKE_OVER."""
    env_file = tmp_path / "links.env"
    env_file.write_text(f"A_PORT_{free_port()}_TCP=tcp://198.18.0.1:7000\n"
                        "FORKPROXY_TAKE_OVER=1\n")
    proxy = start_proxy("--log-format", "json", "--env-file", str(env_file),
                        "--bind", "127.0.0.1")
    [record] = [record for line in proxy.log().splitlines()
                if (record := json.loads(line))["event"] == "env-file-option"]
    assert (record["variable"], record["detail"]) == (
        "FORKPROXY_TAKE_OVER", f"no option reads it, and env file {str(env_file)!r} sets "
        "links only: ignored; --take-over has no variable, on purpose: give the flag"), record


FILE_UNLOGGED = ("more FORKPROXY_ variables in the env file, which sets links only, ignored "
                 "(at most 10 have a line of their own)")


def many_file_options(count: int) -> list[str]:
    """`count` option-variable names an env file may hold: FORKPROXY_ALLOW in as many
    spellings of its case (each is one), in name order."""
    spellings = ("_".join(("".join(char.upper() if bit == "1" else char
                                   for char, bit in zip(word, bits, strict=True)))
                          for word, bits in (("forkproxy", f"{index:014b}"[:9]),
                                             ("allow", f"{index:014b}"[9:])))
                 for index in range(count))
    return sorted(spellings)


def test_many_option_variables_in_the_env_file_are_ten_warnings_and_a_count(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """An env file of 5,000 option variables wrote 5,000 `env-file-option` lines before
    `listening` (and `links` 5,000 to stderr), where unknown variables in the environment
    are bounded: the first 10 (in name order) keep their line, the rest are one
    `env-file-option-unlogged` record with their count; a reload adding more does the
    same for the new ones."""
    names = many_file_options(5_000)
    env_file = tmp_path / "links.env"
    link = f"A_PORT_{free_port()}_TCP=tcp://198.18.0.1:7000"
    env_file.write_text(link + "\n" + "".join(f"{name}=s3cret\n" for name in names[:4_000]))
    listed = run("links", "--env-file", str(env_file))
    assert listed.returncode == 0, listed
    lines = listed.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines[:10]] == names[:10], lines[:12]
    assert lines[10:] == [f"forkproxy: warning: {FILE_UNLOGGED}: 3990"], lines[10:12]
    proxy = start_proxy("--log-format", "json", "--env-file", str(env_file),
                        "--bind", "127.0.0.1")
    assert wait_for(lambda: '"event": "listening"' in proxy.log()), proxy.log()[-2000:]

    def records() -> list[dict[str, Any]]:
        return [json.loads(line) for line in proxy.log().splitlines()]

    events = [record["event"] for record in records()]
    said = [record["variable"] for record in records() if record["event"] == "env-file-option"]
    assert said == names[:10], said[:12]
    [unlogged] = [record for record in records()
                  if record["event"] == "env-file-option-unlogged"]
    assert (unlogged["level"], unlogged["count"], unlogged["detail"]) == (
        "warning", 3990, FILE_UNLOGGED), unlogged
    assert events.index("env-file-option-unlogged") == events.index("env-file-option") + 10
    assert events.index("env-file-option-unlogged") < events.index("listening"), events
    # A reload adding 1,000: only the new ones are said, bounded alike.
    env_file.write_text(link + "\n" + "".join(f"{name}=s3cret\n" for name in names))
    proxy.signal(signal.SIGHUP)
    assert wait_for(lambda: '"event": "reloaded"' in proxy.log()), proxy.log()[-2000:]
    said = [record["variable"] for record in records() if record["event"] == "env-file-option"]
    assert said == names[:10] + names[4_000:4_010], said[8:22]
    counts = [record["count"] for record in records()
              if record["event"] == "env-file-option-unlogged"]
    assert counts == [3990, 990], counts
    assert "s3cret" not in proxy.log()


@pytest.mark.parametrize(("line", "warning"), [
    # A known option's variable: it sets nothing there.
    ("FORKPROXY_ALLOW=10.0.0.0/8", "FORKPROXY_ALLOW: an option variable in env file {file}, "
     "which sets links only: ignored; set FORKPROXY_ALLOW in forkproxy's environment, or "
     "give --allow"),
    # A typo (FORKPROXY_MAX_CHILDRN) was silent, where in the environment it is an
    # `unknown-variable` warning (config.options_in_env_file).
    ("FORKPROXY_MAX_CHILDRN=10", "FORKPROXY_MAX_CHILDRN: no option reads it, and env file "
     "{file} sets links only: ignored; did you mean FORKPROXY_MAX_CHILDREN (--max-children)?"),
    # An option of serve's with no variable at all, in the environment either: said so, as
    # the environment's `unknown-variable` says it; it was sent to README's table, where
    # it is not.
    ("FORKPROXY_TAKE_OVER=/run/fp.sock", "FORKPROXY_TAKE_OVER: no option reads it, and env "
     "file {file} sets links only: ignored; --take-over has no variable, on purpose: give "
     "the flag"),
    ("FORKPROXY_QUIET=1", "FORKPROXY_QUIET: no option reads it, and env file {file} sets "
     "links only: ignored; --quiet has no variable, on purpose: give the flag"),
])
def test_links_says_the_forkproxy_names_of_the_env_file(
    tmp_path: Path, line: str, warning: str,
) -> None:
    """`forkproxy links`, the dry run, says what serve's log says of them (an
    `env-file-option` warning, at start and at a reload)."""
    env_file = tmp_path / "links.env"
    env_file.write_text(f"A_PORT_7000_TCP=tcp://10.0.0.5:7000\n{line}\n")
    result = run("links", "--env-file", str(env_file))
    assert result.returncode == 0, result
    assert result.stdout == "listen 0.0.0.0:7000 -> 10.0.0.5:7000 (A_PORT_7000_TCP)\n"
    expected = warning.format(file=repr(str(env_file)))
    assert result.stderr == f"forkproxy: warning: {expected}\n", result


def test_help_shows_every_default_and_names_what_options_take() -> None:
    """The defaults are written into the help strings in brackets, which rich markup
    used to swallow as tags: `serve --help` showed "Control socket path ." and no default."""
    result = run("serve", "--help")
    assert result.returncode == 0, result
    text = " ".join(result.stdout.split())  # click wraps at 80 columns
    for needle in ("[default: 5]", "[default: 8]", "[default: 30]",
                   "[default: as many as fit the container's memory and pids limits and the "
                   "user's nproc limit, at most 1024]",
                   "[default: auto]", "[default: off]", "[default: everyone]",
                   "[default: $XDG_RUNTIME_DIR/forkproxy/PID.sock, else /tmp/forkproxy-UID/",
                   "--env-file PATH", "--status-socket PATH", "--pid-file PATH"):
        assert needle in text, needle
    assert "<str>" not in text and "<bool>" not in text
    assert text.count("[default: 0]") == 1  # --connect-retries'; -v and -q: none to show
    # What the variable of a repeatable option takes (click splits it at whitespace).
    assert "FORKPROXY_ALLOW takes several, separated by spaces" in text


@pytest.mark.parametrize("command", ["status", "check", "reload"])
def test_the_clients_help_says_which_socket_they_use_by_default(command: str) -> None:
    """The clients' help showed serve's default, `$XDG_RUNTIME_DIR/forkproxy/PID.sock`:
    whose PID? They use the only live socket in that directory (status.find_socket)."""
    result = run(command, "--help")
    assert result.returncode == 0, result
    text = " ".join(result.stdout.split())  # click wraps at 80 columns
    assert "PID.sock" not in text, text
    assert ("[default: the only live socket in $XDG_RUNTIME_DIR/forkproxy/, else in "
            "/tmp/forkproxy-UID/, where serve puts its own; of several, the one not stopping "
            "or handing its listeners over, and several such is an error]") in text


@pytest.mark.parametrize("command", [[], ["serve"], ["links"], ["status"], ["check"],
                                     ["reload"]])
def test_help_names_what_each_argument_takes_and_no_python_type(command: list[str]) -> None:
    """typer wrote the Python type after an argument's name, `SPEC <list[str]>`: an
    operator reads the metavar, `SPEC...` (several may be given), as click writes it.
    No command's help may show a type typer derived from an annotation (`<int>`,
    `<float>`, `list[str]`, `NoneType`)."""
    result = run(*command, "--help")
    assert result.returncode == 0, result
    assert result.stdout.startswith("Usage: forkproxy"), result.stdout
    # Lower case inside <>: the upper-case <ALIAS> and <N> of --from-env's help are words.
    leaks = re.findall(r"<[a-z][^>]*>|\blist\[|\bNoneType\b|\b(?:int|float|str|bool)\b",
                       result.stdout)
    assert leaks == [], result.stdout
    if command in (["serve"], ["links"]):
        assert "[OPTIONS] [SPEC]..." in result.stdout  # the usage line
        rows = re.findall(r"^  (SPEC\S*)\s+\[BIND_ADDR:\]LISTEN_PORT=HOST:PORT",
                          result.stdout, re.MULTILINE)
        assert rows == ["SPEC..."], result.stdout


# -- reload --pid-file ----------------------------------------------------------------------


def new_pid_namespace() -> tuple[str, ...]:
    """A prefix: run as PID 1 of a new PID namespace (needs root), as in the image."""
    return (need("unshare"), "--pid", "--fork", "--kill-child", "--mount-proc")


def test_as_pid_1_zombies_from_before_the_start_are_reaped_at_once(tmp_path: Path) -> None:
    """Children of the shell that exec'd forkproxy as PID 1, exited before it had a
    SIGCHLD handler: no signal comes for them, and they stayed zombies until the first
    connection's child exited."""
    # Three children that exit at once, never waited for, then exec (a shell would reap
    # them on its own while it waits for anything else).
    script = ("import os, sys, time\n"
              "for _ in range(3):\n"
              "    if os.fork() == 0:\n"
              "        os._exit(0)\n"
              "time.sleep(0.3)\n"
              "os.execv(sys.argv[1], sys.argv[1:])\n")
    with (tmp_path / "log").open("w") as err:
        proxy = subprocess.Popen(
            [*new_pid_namespace(), sys.executable, "-c", script, FORKPROXY, "serve", "-v",
             "--status-socket", str(tmp_path / "s.sock"), "127.0.0.1:0=127.0.0.1:1"],
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
            env={"PATH": os.environ["PATH"]})
    try:
        assert len(read_lines(proxy, 1, 15)) == 1, (tmp_path / "log").read_text()
        [supervisor] = Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()

        def state(pid: str) -> str:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):  # ESRCH while it goes
                return "reaped"  # between the listing and this read: what is waited for

        def zombies() -> list[str]:
            children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
            return [pid for pid in children.split() if state(pid) == "Z"]

        assert wait_for(lambda: not zombies(), 10), zombies()
        assert wait_for(lambda: (tmp_path / "log").read_text().count("reaped-orphan") == 3, 10)
    finally:
        kill_group(proxy)
        assert proxy.stdout is not None
        proxy.stdout.close()


def contained() -> tuple[str, ...]:
    """A prefix for a command that might signal 0 or -1 by mistake: kill(-1) then reaches
    its new PID namespace only, and kill(0) its new session's process group (a process
    group spans namespaces: without setsid it would be the test run's)."""
    return (need("setsid"), "--fork", "--wait", *new_pid_namespace())


def assert_cannot_reload(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("forkproxy: cannot reload: "), lines[0]
    assert needle in lines[0], lines[0]
    for leak in ("Errno", "invalid literal", "codec", "Traceback"):
        assert leak not in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "{path} holds '', not a process id"),
        (b"\0\0\0\n", "{path} holds '', not a process id"),  # what a power loss leaves
        (b"2\n", "pid 2 (from {path}) is not running"),  # PID 1 is alone in its namespace
        (b"99999999999999999999\n", "pid 99999999999999999999 (from {path}) is not running"),
        (b"1\n", "pid 1 (from {path}) is not a forkproxy supervisor"),  # reload itself
        (None, "cannot read {path}: No such file or directory"),
    ],
)
def test_reload_pid_file_signals_nothing_but_a_process_id(
    tmp_path: Path, content: bytes | None, needle: str
) -> None:
    """`reload --pid-file` sent SIGHUP to whatever int() made of the file: 0 hung up its own
    process group, -1 every process on the system; junk gave Python's exception text.
    These are states (no supervisor, or not yet): exit 1."""
    pid_file = tmp_path / "proxy.pid"
    if content is not None:
        pid_file.write_bytes(content)
    result = run("reload", "--pid-file", str(pid_file), prefix=contained())
    assert_cannot_reload(result, needle.format(path=repr(str(pid_file))))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"0\n", "{path}: holds 0, not a process id"),  # kill(0): reload's own process group
        (b"-1\n", "{path}: holds '-1', not a process id"),  # kill(-1): every process
        (b"abc\n", "{path}: holds 'abc', not a process id"),
        (b"+1\n", "{path}: holds '+1', not a process id"),
        (b"1_0\n", "{path}: holds '1_0', not a process id"),
        ("\u0661\n".encode(), r"{path}: holds '\xd9\xa1', not a process id"),  # int() takes it
        (b"\xff\n", r"{path}: holds '\xff', not a process id"),
        ("directory", "{path}: not a regular file"),
        ("fifo", "{path}: not a regular file"),
    ],
)
def test_reload_pid_file_that_is_no_pid_file_is_bad_input(
    tmp_path: Path, content: bytes | str, needle: str
) -> None:
    """A path that no supervisor wrote as its pid file (a directory, a FIFO, text that is
    no PID: `--pid-file` given the env file) is bad input: exit 2 and one line naming
    the flag, as `reload --status-socket` given a path that is not a socket. It exited 1,
    as for a supervisor that is not running."""
    pid_file = tmp_path / "proxy.pid"
    if content == "directory":
        pid_file.mkdir()
    elif content == "fifo":
        os.mkfifo(pid_file)
    else:
        assert isinstance(content, bytes)
        pid_file.write_bytes(content)
    result = run("reload", "--pid-file", str(pid_file), prefix=contained())
    assert_one_line_error(result, "--pid-file " + needle.format(path=repr(str(pid_file))))


def test_reload_pid_file_signals_a_supervisor_even_as_pid_1_and_nothing_else(
    tmp_path: Path,
) -> None:
    """A stale pid file whose PID now belongs to another process must not hang that up;
    forkproxy as PID 1 (as in its image) is still reloaded through its pid file."""
    pid_file, log = tmp_path / "proxy.pid", tmp_path / "proxy.log"
    with subprocess.Popen([need("sleep"), "60"], start_new_session=True) as other:
        try:
            pid_file.write_text(f"{other.pid}\n")
            result = run("reload", "--pid-file", str(pid_file))
            assert_cannot_reload(
                result,
                f"pid {other.pid} (from {str(pid_file)!r}) is not a forkproxy supervisor")
            assert other.poll() is None  # not hung up
        finally:
            other.kill()

    sock_dir = Path(tempfile.mkdtemp(prefix="fpc-", dir="/tmp"))  # sun_path is short
    with log.open("w") as err:
        proxy = subprocess.Popen(
            [*new_pid_namespace(), FORKPROXY, "serve", "--pid-file", str(pid_file),
             "--status-socket", str(sock_dir / "s.sock"), "127.0.0.1:0=127.0.0.1:1"],
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
            env={"PATH": os.environ["PATH"]},
        )
    try:
        assert len(read_lines(proxy, 1, 15)) == 1, log.read_text()
        assert pid_file.read_text() == "1\n"
        [supervisor] = Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()
        assert f"NSpid:\t{supervisor}\t1\n" in Path(f"/proc/{supervisor}/status").read_text()
        into_its_namespace = (need("nsenter"), f"--target={supervisor}", "--pid", "--mount")
        result = run("reload", "--pid-file", str(pid_file), prefix=into_its_namespace)
        assert result.returncode == 0, result
        assert result.stdout == "sent SIGHUP to 1 (the outcome is in its log)\n"
        # The supervisor logs each reload that applied (`reloaded`).
        assert wait_for(lambda: " reloaded " in log.read_text()), log.read_text()
    finally:
        kill_group(proxy)
        assert proxy.stdout is not None
        proxy.stdout.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_reload_pid_file_waits_on_no_fifo_and_signals_no_connection_child(
    tmp_path: Path, start_proxy: Callable[..., Proxy], tcp_server: ServerFactory
) -> None:
    """A FIFO as --pid-file hung `reload` until Ctrl-C; a connection's child (it runs the
    supervisor's command line) was sent SIGHUP, "sent" was printed, and nothing reloaded,
    since children ignore SIGHUP."""
    fifo = tmp_path / "fifo.pid"
    os.mkfifo(fifo)
    result = run("reload", "--pid-file", str(fifo), timeout=10)
    assert_one_line_error(result, f"--pid-file {str(fifo)!r}: not a regular file")

    server = tcp_server(echo)
    proxy = start_proxy(f"127.0.0.1:0=127.0.0.1:{server.port}")
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        [child] = Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()
        pid_file = tmp_path / "child.pid"
        pid_file.write_text(f"{child}\n")
        result = run("reload", "--pid-file", str(pid_file))
        assert_cannot_reload(result, f"pid {child} (from {str(pid_file)!r}) is a child of "
                                     f"forkproxy supervisor {proxy.pid}, not a supervisor")
        sock.sendall(b"y")
        assert sock.recv(1) == b"y"  # the connection lives on
    assert "reload" not in proxy.log()


# reload's check takes any ".../_serve.py --config-fd N" in a command line for forkproxy.
# It prints a line once it runs: when Popen returns, its /proc/PID/cmdline may still be empty.
# SIGHUP's default action put back first: an ignored signal stays ignored across fork and
# exec, so under `nohup` (or any SIGHUP-ignoring parent) it would outlive the reload's signal.
FAKE_SUPERVISOR = [sys.executable, "-c",
                   "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
                   "print(flush=True); time.sleep(60)",
                   "/fake/_serve.py", "--config-fd", "3"]

@contextlib.contextmanager
def fake_supervisor(pid_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process that passes reload's check (FAKE_SUPERVISOR), running, its pid in
    `pid_file`; killed at the end."""
    with subprocess.Popen(FAKE_SUPERVISOR, stdout=subprocess.PIPE,
                          start_new_session=True) as fake:
        try:
            assert fake.stdout is not None
            fake.stdout.readline()  # it runs: its command line is in place
            pid_file.write_text(f"{fake.pid}\n")
            yield fake
        finally:
            fake.kill()


# Run as PID 1 of its own PID namespace: a fake supervisor passes reload's check, then exits
# and its PID is handed to another process (ns_last_pid makes the kernel pick that number),
# before the signal is sent. What the driver prints is checked by the test.
PID_REUSE_DRIVER = f"FAKE_SUPERVISOR = {FAKE_SUPERVISOR!r}\n" + """
import subprocess, sys
from forkproxy import cli

pid_file, sleep = sys.argv[1:]
fake = subprocess.Popen(FAKE_SUPERVISOR, stdout=subprocess.PIPE)
fake.stdout.readline()
with open(pid_file, "w") as handle:
    handle.write(f"{fake.pid}\\n")
check, taken_over = cli._runs_serve, []

def check_then_lose_the_pid(pid):
    if taken_over:  # the check of its parent that follows: left as it is
        return check(pid)
    assert check(pid)
    fake.kill()
    fake.wait()
    with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
        handle.write(str(pid - 1))
    taken_over.append(subprocess.Popen([sleep, "60"]))
    assert taken_over[0].pid == pid, (taken_over[0].pid, pid)
    return True

cli._runs_serve = check_then_lose_the_pid
try:
    print("sent to", cli._signal_supervisor(pid_file))
except cli.ReloadError as exc:
    print(exc)
# SIGKILL it now: a SIGHUP sent before would be what killed it (a fatal signal ends a
# process as it is sent; and pending ones are taken lowest number first, 1 before 9).
taken_over[0].kill()
print("the new owner was killed by signal", -taken_over[0].wait())
"""


def test_reload_pid_file_never_signals_the_process_that_took_the_pid_over(
    tmp_path: Path,
) -> None:
    """reload checked /proc/PID/cmdline, then kill(PID): a supervisor that exited in between,
    its PID reused, had the new owner of the PID hung up. A pidfd taken before the check
    refers to the process checked only; that one is gone, so nothing is signalled."""
    pid_file = tmp_path / "proxy.pid"
    result = subprocess.run(
        [*contained(), sys.executable, "-c", PID_REUSE_DRIVER, str(pid_file), need("sleep")],
        capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]},
    )
    assert result.returncode == 0, result
    pid = pid_file.read_text().strip()
    assert result.stdout == (f"pid {pid} (from {str(pid_file)!r}) is not running\n"
                             "the new owner was killed by signal 9\n"), result


def test_reload_pid_file_signals_by_pid_where_there_are_no_pidfds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Linux 5.3, or under a seccomp filter older than pidfd_open, reload still works:
    it checks the PID, then signals it (the race the pidfd closes stays open there)."""
    import errno

    from forkproxy import cli

    def no_pidfds(pid: int) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    pid_file = tmp_path / "proxy.pid"
    with fake_supervisor(pid_file) as fake:
        assert cli._signal_supervisor(str(pid_file)) == fake.pid
        assert fake.wait(10) == -signal.SIGHUP


def test_reload_pid_file_says_so_when_it_cannot_read_the_process_it_checks() -> None:
    """reload reads /proc/PID/cmdline to check that PID is forkproxy's before it signals.
    A read refused (a process the caller may not inspect) was reported as `cannot signal
    pid N`: the signal was never tried. Real, not patched: a /proc mounted hidepid=1 in a
    mount namespace of the test's own, and reload run as nobody against a root process,
    whose /proc/PID files nobody may then read (EPERM; EACCES elsewhere takes the same
    path). The pid file in a directory nobody can enter: pytest's tmp_path is root's only."""
    home = Path(tempfile.mkdtemp(prefix="fpc-", dir="/tmp"))
    home.chmod(0o755)
    pid_file = home / "proxy.pid"
    try:
        with fake_supervisor(pid_file) as fake:
            pid_file.chmod(0o644)
            as_nobody = (f"mount -t proc -o hidepid=1 proc /proc && exec "
                         f"{' '.join(as_user(65534))} {FORKPROXY} reload --pid-file {pid_file}")
            result = subprocess.run(
                [need("unshare"), "--mount", "--propagation", "private", "sh", "-c", as_nobody],
                capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]},
            )
            assert fake.poll() is None, "the process checked was signalled"
    finally:
        shutil.rmtree(home)
    assert_cannot_reload(result, f"cannot check that pid {fake.pid} (from '{pid_file}') is "
                         f"a forkproxy supervisor: cannot read /proc/{fake.pid}/cmdline: "
                         "Operation not permitted")


def test_reload_pid_file_says_so_when_the_signal_itself_is_not_permitted(
    start_proxy: Callable[..., Proxy],
) -> None:
    """A user who may read the pid file and the supervisor's /proc files, but not signal
    it (nobody, against a root supervisor): every check passes and the signal fails with
    EPERM. That is the line, `cannot signal pid N ...: Operation not permitted`, exit 1,
    no traceback, and the supervisor is not reloaded. The pid file in a directory nobody
    can enter: pytest's tmp_path is root's only."""
    home = Path(tempfile.mkdtemp(prefix="fpc-", dir="/tmp"))
    try:
        home.chmod(0o755)
        pid_file = home / "proxy.pid"
        # umask 022, whatever the caller's: the pid file is 0644 less the umask, and under
        # `umask 077` nobody could not read it ("cannot read ...: Permission denied").
        proxy = start_proxy("--pid-file", str(pid_file), "127.0.0.1:0=127.0.0.1:1",
                            prefix=(need("sh"), "-c", 'umask 022 && exec "$@"', "sh"))
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text() == f"{proxy.pid}\n")
        result = run("reload", "--pid-file", str(pid_file),
                     prefix=as_user(65534))
        assert_cannot_reload(result, f"cannot signal pid {proxy.pid} (from '{pid_file}'): "
                             "Operation not permitted")
        assert proxy.proc.poll() is None
        # A reload that applied says so (` reloaded `): none did. Root's reload, which
        # may signal it, shows that this is where it would have.
        assert " reloaded " not in proxy.log(), proxy.log()
        result = run("reload", "--pid-file", str(pid_file))
        assert result.stdout == f"sent SIGHUP to {proxy.pid} (the outcome is in its log)\n", result
        assert wait_for(lambda: proxy.log().count(" reloaded ") == 1), proxy.log()
        assert proxy.stop() == 0
    finally:
        shutil.rmtree(home)


def test_reload_reports_the_outcome_unless_pid_file_is_on_the_command_line(
    tmp_path: Path,
) -> None:
    """FORKPROXY_PID_FILE, serve's variable and so often set where reload runs too, turned
    `forkproxy reload` into a bare SIGHUP that exits 0 when the reload fails. Only
    --pid-file on the command line chooses the signal, and then over the socket's variable."""
    runtime_dir = Path(tempfile.mkdtemp(prefix="fpc-", dir="/tmp"))  # sun_path is short
    env_file, pid_file, log = tmp_path / "links.env", tmp_path / "proxy.pid", tmp_path / "log"
    env_file.write_text("")
    env = {"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": str(runtime_dir),
           "FORKPROXY_PID_FILE": str(pid_file)}
    with log.open("w") as err:
        proxy = subprocess.Popen(
            [FORKPROXY, "serve", "--env-file", str(env_file), "127.0.0.1:0=127.0.0.1:1"],
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True, env=env,
        )
    try:
        assert len(read_lines(proxy, 1, 15)) == 1, log.read_text()
        assert pid_file.read_text() == f"{proxy.pid}\n"
        env_file.unlink()  # the next reload fails
        result = run("reload", env=env)
        assert result.returncode == 1, result
        assert result.stderr.startswith("forkproxy: reload failed, previous configuration kept: "
                                        f"cannot read env file {str(env_file)!r}"), result.stderr
        # Explicit --pid-file: the signal, even with the socket's variable set.
        [sock] = (runtime_dir / "forkproxy").glob("*.sock")
        result = run("reload", "--pid-file", str(pid_file),
                     env={**env, "FORKPROXY_STATUS_SOCKET": str(sock)})
        assert result.returncode == 0, result
        assert result.stdout == f"sent SIGHUP to {proxy.pid} (the outcome is in its log)\n"
        assert wait_for(lambda: log.read_text().count("reload-failed") == 2), log.read_text()
    finally:
        kill_group(proxy)
        assert proxy.stdout is not None
        proxy.stdout.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)



def test_reload_refuses_both_pid_file_and_status_socket_on_the_command_line(
    tmp_path: Path,
) -> None:
    """Usage shows `[--status-socket PATH | --pid-file PATH]`, but with both --status-socket
    was ignored without a word. Only when both are typed: FORKPROXY_STATUS_SOCKET, serve's
    variable, gives way to --pid-file (see the test above)."""
    pid_file = tmp_path / "proxy.pid"
    pid_file.write_text("4194304\n")  # beyond the kernel's pid_max: no process to signal
    for args in (["--pid-file", str(pid_file), "--status-socket", str(tmp_path / "s.sock")],
                 ["--status-socket", str(tmp_path / "s.sock"), "--pid-file", str(pid_file)]):
        assert_one_line_error(run("reload", *args), "--pid-file and --status-socket")


@pytest.mark.parametrize(("args", "status", "error"), [
    (("serve", "bad"), 2, "forkproxy: error: SPEC 'bad': expected"),
    (("links", "1=127.0.0.1:2"), 0, None),
    (("--version",), 0, None),
    (("check", "--status-socket", "/nonexistent/s.sock"), 1, "forkproxy: "),
])
def test_every_command_runs_with_stdout_closed(
    args: tuple[str, ...], status: int, error: str | None
) -> None:
    """`forkproxy serve bad >&-` wrote its error line, then a traceback (sys.stdout is None
    when fd 1 is closed at start; cli.main flushed it), and exited 1, not 2; so did
    `links`, `--version`, `status` and `check`. Their output goes to /dev/null now.
    PYTHONWARNDEFAULTENCODING: the /dev/null file was opened with no encoding named, an
    EncodingWarning on stderr under -X warn_default_encoding (and an error under -W error)."""
    result = subprocess.run([need("sh"), "-c", 'exec "$@" >&-', "sh", FORKPROXY, *args],
                            capture_output=True, text=True, timeout=30,
                            env={"PATH": os.environ["PATH"], "PYTHONWARNDEFAULTENCODING": "1"})
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr, result.stderr
    if error is None:
        assert result.stderr == "", result.stderr
    else:
        [line] = result.stderr.splitlines()
        assert line.startswith(error), line


@pytest.mark.parametrize(("redirects", "closed"),
                         [(">&-", {1}), ("2>&-", {2}), ("<&- >&- 2>&-", {0, 1, 2})])
def test_serve_runs_with_standard_fds_closed(
    tmp_path: Path, tcp_server: ServerFactory,
    redirects: str, closed: set[int],
) -> None:
    """`serve ... >&-` died with a traceback (sys.stdout is None), `2>&-` silently; and a
    closed fd 1 or 2 was taken by the config memfd, then by a listener in the supervisor,
    where the `listening` lines and the log went. Now it serves, with /dev/null there."""
    upstream = tcp_server(echo)
    # Port 0, the kernel's choice: a port free_port() found free could be another
    # process's by the time the proxy binds it, and the client below talk to that one.
    spec = f"127.0.0.1:0=127.0.0.1:{upstream.port}"
    log = tmp_path / "proxy.log"
    with log.open("w") as err:
        proxy = subprocess.Popen(
            [need("sh"), "-c", f'exec "$@" {redirects}', "sh", FORKPROXY, "serve", spec],
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
            env={"PATH": os.environ["PATH"]},
        )
    try:
        if 1 in closed:  # no `listening` line to read the port from: the kernel's tables
            # One, once it waits in its loop's poll: the supervisor's relay warm-up
            # (relay.preload) listens on two loopback ports of its own for a moment after
            # the link's is bound, closed before it serves (a CI run read three); and
            # before the warm-up binds them the link's is alone (another CI run found one
            # port, then three).
            assert wait_for(lambda: proxy.poll() is not None or (
                polled(proxy.pid) is not None and len(listening_ports(proxy.pid)) == 1))
            assert proxy.poll() is None, log.read_text()
            [port] = listening_ports(proxy.pid)
        else:
            lines = read_lines(proxy, 1, 15)
            match = re.fullmatch(r"listening 127\.0\.0\.1:(\d+) -> (.*)", lines[0] if lines else "")
            assert match, (lines, log.read_text())
            port = int(match[1])
            assert match[2] == f"127.0.0.1:{upstream.port} ({spec})", lines
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := client.recv(4096):
                received += chunk
        assert received == b"ping"  # the upstream's bytes and nothing else
        for fd in closed:  # not a socket or the memfd that stdout or the log could reach
            assert os.readlink(f"/proc/{proxy.pid}/fd/{fd}") == "/dev/null"
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(15) == 0, log.read_text()  # not 120: stdout's flush failed at exit
        assert "Exception ignored" not in log.read_text()
    finally:
        kill_group(proxy)
        assert proxy.stdout is not None
        proxy.stdout.close()


def test_no_command_prints_the_help_and_exits_2() -> None:
    """`forkproxy` alone printed the help run on from `forkproxy: error: Usage: ...`."""
    result = run()
    assert result.returncode == 2, result  # like every usage error: a script notices
    assert result.stdout == ""
    assert result.stderr == run("--help").stdout
    assert "forkproxy: error" not in result.stderr


def _readme_options_table() -> dict[str, list[str]]:
    """README's "Options of `serve`" table: its first cell's flag -> its cells."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Options of `serve`", 1)[1].split("\n### ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("| `-"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            for flag in re.findall(r"`(-[-a-z]+)", cells[0]):  # `-v` / `-q`: two flags
                rows[flag] = cells
    return rows


def test_readme_options_table_has_every_serve_option_its_variable_and_default() -> None:
    """A user reads the table, not the code: every flag of `serve`, with its variable and
    the default `--help` shows, and no row for a flag that does not exist."""
    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    rows = _readme_options_table()
    flags = set()
    for param in command.params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        flag = next(opt for opt in param.opts if opt.startswith("--"))
        short = [opt for opt in param.opts if not opt.startswith("--")]
        flags.add(flag)
        row = rows.get(flag) or next((rows[s] for s in short if s in rows), None)
        assert row is not None, f"{flag} is not in README's options table"
        if param.envvar:
            assert f"(`{param.envvar}`" in row[0], (flag, row[0])
        shown = re.search(r"\[default: ([^]]+)\]", param.help or "")
        if shown and row[1] != "see below":  # the status socket's, a paragraph of its own
            assert row[1].strip("`") == shown.group(1), (flag, row[1], shown.group(1))
    short_flags = {opt for p in command.params for opt in p.opts if not opt.startswith("--")}
    assert set(rows) <= flags | short_flags, set(rows) - flags - short_flags


@pytest.mark.parametrize("command", ["status", "check", "reload"])
@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        (["--status-socket", ""], {}, ["--status-socket '': an empty path"]),
        (["--status-socket", "/tmp/" + "x" * 120], {},
         ["--status-socket '/tmp/xxx", "longer than the 107 bytes"]),
        ([], {"FORKPROXY_STATUS_SOCKET": "/tmp/" + "x" * 120},
         ["FORKPROXY_STATUS_SOCKET (--status-socket) '/tmp/xxx", "longer than the 107 bytes"]),
    ],
)
def test_a_status_socket_path_no_socket_can_have_is_bad_input_for_the_clients(
    command: str, args: list[str], env: dict[str, str], needles: list[str]
) -> None:
    """As for `serve`: one line naming it and exit 2, not "no answer on : Invalid argument"
    and the exit 1 of a supervisor that does not answer."""
    assert_one_line_error(run(command, *args, env=env), *needles)


def test_an_empty_pid_file_path_is_bad_input_for_reload() -> None:
    """`reload --pid-file ''` said "cannot reload: cannot read ''" and exited 1, the status
    of a supervisor not found, where `--status-socket ''` is bad input (exit 2)."""
    assert_one_line_error(run("reload", "--pid-file", ""), "--pid-file '': an empty path")
    # And one of blanks alone, which serve refuses as it refuses an empty one: it said
    # "cannot reload: cannot read ' '" and exited 1.
    assert_one_line_error(run("reload", "--pid-file", " "), "--pid-file ' ': a blank path")


@pytest.mark.parametrize("command", ["status", "check", "reload"])
def test_a_status_socket_path_that_is_not_a_socket_is_bad_input_for_the_clients(
    tmp_path: Path, command: str
) -> None:
    """connect() to a file is refused as to a dead socket: the clients said "no answer on
    '/etc/passwd': Connection refused" and exit 1, a supervisor down, for a path serve
    refuses as bad input. A symlink to a socket is followed, as connect() follows it."""
    precious = tmp_path / "precious.conf"
    precious.write_text("keep me\n")
    for path in (str(precious), str(tmp_path), "/dev/null"):
        assert_one_line_error(run(command, "--status-socket", path),
                              f"--status-socket '{path}': exists and is not a socket")
    assert_one_line_error(run(command, env={"FORKPROXY_STATUS_SOCKET": str(precious)}),
                          f"FORKPROXY_STATUS_SOCKET (--status-socket) '{precious}': exists and "
                          "is not a socket")
    assert precious.read_text() == "keep me\n"
    short = Path(tempfile.mkdtemp(prefix="fpc-", dir="/tmp"))  # sun_path is short
    try:
        # A path through a file: serve says "Not a directory", exit 2; so do the clients
        # (they said "no answer", exit 1). In a short directory: a path longer than 80
        # characters is shown cut, where its tail ("precious.conf/x.sock") may be lost.
        (short / "precious.conf").write_text("keep me\n")
        through = f"{short}/precious.conf/x.sock"
        assert_one_line_error(run(command, "--status-socket", through),
                              f"--status-socket '{through}': Not a directory")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.bind(str(short / "other.sock"))
            other.listen()
            (short / "link.sock").symlink_to(short / "other.sock")
            other.settimeout(10)
            with subprocess.Popen([FORKPROXY, command, "--status-socket", str(short / "link.sock")],
                                  stderr=subprocess.PIPE, text=True,
                                  env={"PATH": os.environ["PATH"]}) as client:
                conn = other.accept()[0]  # reached through the link
                with conn:
                    assert conn.recv(4096).endswith(b"\n")  # the request, left unanswered
                assert client.wait(30) == 1
                assert client.stderr is not None
                assert "closed without a reply" in client.stderr.read()
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["check"], ["reload"]])
@pytest.mark.parametrize("value", ['"{tmp}/fp.sock"', "'{tmp}/fp.sock'"])
def test_a_quoted_status_socket_variable_is_told_to_lose_the_quotes_by_the_clients(
    tmp_path: Path, command: list[str], value: str
) -> None:
    """FORKPROXY_STATUS_SOCKET in quotes (a `docker run --env-file` file, Compose's list
    form of `environment:`) is serve's bad input with "remove the quotes"; status, check
    and reload said "no answer on ...: No such file or directory", exit 1, a supervisor
    down. They say what serve says now (the lean `status`, `check` too)."""
    path = value.format(tmp=tmp_path)
    assert_one_line_error(
        run(*command, env={"FORKPROXY_STATUS_SOCKET": path}),
        f"FORKPROXY_STATUS_SOCKET (--status-socket) {path!r}: No such file or directory{LITERAL}")


def test_a_status_socket_whose_name_has_a_quote_is_still_asked(
    start_proxy: Callable[..., Proxy], short_dir: Path
) -> None:
    """A socket that is there under a name with a quote is no mistake: asked, not refused."""
    sock = f'{short_dir}/fp.sock"'
    start_proxy("--status-socket", sock, "127.0.0.1:0=127.0.0.1:9")
    for command in (["check"], ["status"], ["reload"]):
        result = run(*command, env={"FORKPROXY_STATUS_SOCKET": sock})
        assert (result.returncode, result.stderr) == (0, ""), result


@pytest.mark.parametrize("where", ["end", "start", "alone"])
@pytest.mark.parametrize("command", [["status"], ["check"], ["reload"]])
def test_a_status_socket_whose_name_ends_with_a_quote_is_down_when_missing(
    short_dir: Path, command: list[str], where: str
) -> None:
    """serve takes `FORKPROXY_STATUS_SOCKET=/run/fp.sock"` as a path: with no supervisor
    there (stopped: its socket removed), `check` in a HEALTHCHECK exited 2 with "remove
    the quotes" (bad input, and a status Docker reserves), not 1, a supervisor down. So
    for a quote at its start alone, or a name that is one quote: no pair of quotes."""
    sock = {"end": f'{short_dir}/fp.sock"', "start": f'"{short_dir}/fp.sock', "alone": '"'}[where]
    result = run(*command, env={"FORKPROXY_STATUS_SOCKET": sock})
    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr.startswith(f"forkproxy: no answer on {sock!r}: "), result


_SERVE_WITHOUT_INTERPRETER = """
import os, sys
os.unlink(sys.executable)  # gone before serve execs it: a venv rebuilt, an upgrade
sys.argv = ["forkproxy", "serve", *sys.argv[1:], "127.0.0.1:0=127.0.0.1:9"]
from forkproxy.console import main
main()
"""


def assert_one_start_error(result: subprocess.CompletedProcess[str], message: str,
                           log_format: str) -> None:
    """stderr is the one line of an error that kept `serve` from starting: in text, or
    with --log-format json a `start-failed` record like every other line of the log."""
    if log_format == "text":
        assert result.stderr.splitlines() == [f"forkproxy: error: {message}"], result
    else:
        [line] = result.stderr.splitlines()
        record = json.loads(line)
        assert {k: record[k] for k in ("level", "event", "error")} == {
            "level": "error", "event": "start-failed", "error": message}, record


SERVE_SCRIPT = Path(__file__).resolve().parent.parent / "forkproxy" / "_serve.py"


def config_in_memfd(payload: dict[str, object]) -> int:
    """A memfd holding `payload` as JSON, at its start: the descriptor `serve` hands
    _serve.py its configuration by (the caller closes it)."""
    config_fd = os.memfd_create("test-config", 0)
    os.write(config_fd, json.dumps(payload).encode())
    os.lseek(config_fd, 0, os.SEEK_SET)
    return config_fd


def handed_to_supervisor(payload: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """_serve.py as `serve` execs it, handed `payload` as its configuration."""
    config_fd = config_in_memfd(payload)
    try:
        return subprocess.run(
            [sys.executable, "-I", "-S", str(SERVE_SCRIPT), "--config-fd", str(config_fd)],
            pass_fds=(config_fd,), capture_output=True, text=True, timeout=60, check=False)
    finally:
        os.close(config_fd)


@pytest.mark.parametrize("change", ["older version", "missing key", "unknown option"])
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_supervisor_handed_another_versions_configuration_says_so_in_one_line(
    change: str, log_format: str
) -> None:
    """`serve` started while pip replaced forkproxy: the CLI, already loaded, ran the old
    code and handed its configuration to the new _serve.py, which died with a traceback
    (KeyError: 'aliases', exit 1), in text even with --log-format json. The supervisor now
    checks the version the CLI wrote and the configuration's shape: one line saying the
    files changed, exit 126 (as when the supervisor cannot be executed), nothing bound."""
    sources = Sources(("127.0.0.1:0=127.0.0.1:9",), options=Options(log_format=log_format))
    payload: dict[str, Any] = {**sources_to_json(sources), "variables": {},
                               "version": __version__}
    if change == "older version":
        payload["version"] = "0.0.1"
    elif change == "missing key":
        del payload["aliases"]
    else:
        payload["options"] = {**payload["options"], "no_such_option": 1}
    result = handed_to_supervisor(payload)
    message = (f"forkproxy's files changed while `serve` started (an upgrade under way?), "
               f"to version {__version__}: start it again")
    assert result.returncode == 126, result
    assert result.stdout == "", result  # no `listening` line: nothing was bound
    assert_one_start_error(result, message, log_format)


# _serve.py run as `serve` execs it, with an atexit hook that does what Python's
# finalization does right after the hooks (the handlers' default actions back: SIG_DFL),
# then sends the signal a second `kill` would, in that window: deterministically what a
# second SIGTERM or SIGINT 0-3 ms after the first did, now and then, to a stopping serve.
SECOND_SIGNAL_AS_IT_EXITS = """
import atexit, os, runpy, signal, sys

number = int(sys.argv[3])

def second_signal():
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)

atexit.register(second_signal)
sys.argv = [sys.argv[1], "--config-fd", sys.argv[2]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_as_the_supervisor_exits_leaves_its_exit_status_0(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """A clean stop exits 0. A second SIGTERM or SIGINT that came as the stopped
    supervisor was exiting (4 of 24 stops with the second `kill` 0-3 ms after the first)
    found the default action Python gives back at finalization, and the exit status was
    143 or 130. The supervisor blocks the signals it handles before it returns: the
    second one is discarded with the process."""
    sources = Sources(("127.0.0.1:0=127.0.0.1:9",),
                      options=Options(status_socket=str(tmp_path / "s.sock")))
    payload: dict[str, Any] = {**sources_to_json(sources), "variables": {},
                               "version": __version__}
    config_fd = config_in_memfd(payload)
    try:
        with subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", SECOND_SIGNAL_AS_IT_EXITS, str(SERVE_SCRIPT),
             str(config_fd), str(int(signum))],
            pass_fds=(config_fd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            try:
                assert proc.stdout.readline().startswith("listening "), proc.stderr.read()
                proc.send_signal(signum)
                assert proc.wait(30) == 0, proc.stderr.read()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
    finally:
        os.close(config_fd)


def test_stops_with_a_second_signal_at_once_exit_0() -> None:
    """The real thing, as a script stops serve: SIGTERM, SIGTERM (or SIGINT, SIGINT) at
    once, ten times; each exits 0 (before, about one stop in six exited 143 or 130)."""
    for attempt in range(10):
        first, second = ((signal.SIGTERM, signal.SIGTERM) if attempt % 2
                         else (signal.SIGINT, signal.SIGINT))
        with subprocess.Popen(
            [FORKPROXY, "serve", "-qq", "127.0.0.1:0=127.0.0.1:9"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            try:
                assert proc.stdout.readline().startswith("listening "), proc.stderr.read()
                proc.send_signal(first)
                proc.send_signal(second)
                assert proc.wait(30) == 0, (attempt, first, proc.stderr.read())
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)


def test_serve_whose_supervisor_script_is_gone_says_so_in_one_line(tmp_path: Path) -> None:
    """_serve.py removed between the CLI's start and its exec (an upgrade under way): the
    interpreter said "can't open file" with exit status 2, bad input's. Now one line
    naming the file, and 126."""
    package = tmp_path / "forkproxy"
    shutil.copytree(Path(__file__).resolve().parent.parent / "forkproxy", package)
    (package / "_serve.py").unlink()
    path = os.pathsep.join([str(tmp_path), *site.getsitepackages()])
    result = subprocess.run(
        [sys.executable, "-m", "forkproxy", "serve", "127.0.0.1:0=127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": path},
    )
    assert result.returncode == 126, result
    assert result.stderr.splitlines() == [
        f"forkproxy: error: cannot start the supervisor: '{package / '_serve.py'}': "
        "No such file or directory"], result
    assert result.stdout == ""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_serve_that_cannot_exec_the_supervisor_says_so_in_one_line(
    tmp_path: Path, log_format: str
) -> None:
    """The interpreter serve re-executes is gone: one line naming it, status 126 (what a
    shell returns for a command it cannot execute), no traceback, nothing listening.
    With --log-format json that line is a JSON record like every other line of the log
    (a collector that parses each line would otherwise drop the one that says why)."""
    interpreter = tmp_path / "python"
    interpreter.symlink_to(sys.executable)  # removing the link leaves the real one alone
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(repo), *site.getsitepackages()])
    result = subprocess.run(
        [str(interpreter), "-c", _SERVE_WITHOUT_INTERPRETER, "--log-format", log_format],
        capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": path},
    )
    assert result.returncode == 126, result
    message = f"cannot start the supervisor: '{interpreter}': No such file or directory"
    assert_one_start_error(result, message, log_format)
    assert result.stdout == ""


@pytest.mark.parametrize(("error", "strerror"), [("EPERM", "Operation not permitted"),
                                               ("ENOSYS", "Function not implemented")])
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_serve_refused_memfd_create_by_a_sandbox_says_so_in_one_line(
    tmp_path: Path, error: str, strerror: str, log_format: str
) -> None:
    """A seccomp filter that refuses memfd_create (systemd's SystemCallFilter=~memfd_create,
    an allow-list written without it; a runtime's profile that does not know the call),
    through which serve hands its supervisor the configuration: it said
    "cannot write: Operation not permitted" with exit status 1, blaming an output. It
    says what failed and what to allow, in one line, and 126 as for an exec that fails;
    nothing is left listening."""
    if not refuse_calls.supported():
        pytest.fail("tests/refuse_calls.py knows the seccomp ABI of x86_64 and aarch64 only")
    sock = tmp_path / "s.sock"
    result = subprocess.run(
        [sys.executable, str(REFUSE_CALLS), "memfd_create", error, FORKPROXY, "serve",
         "127.0.0.1:0=127.0.0.1:9", "--status-socket", str(sock), "--log-format",
         log_format],
        capture_output=True, text=True, timeout=60, start_new_session=True)
    assert (result.returncode, result.stdout) == (126, ""), result
    assert_one_start_error(result, (
        f"cannot start the supervisor: memfd_create, which hands it the configuration, "
        f"failed: {strerror} (a seccomp filter refusing it? allow memfd_create)"),
        log_format)
    assert not sock.exists()


_WITHOUT_MODULE = """
import sys
sys.modules[sys.argv[1]] = None  # not importable: a `pip install --no-deps forkproxy`
sys.argv = ["forkproxy", *sys.argv[2:]]
from forkproxy.console import main
main()
"""


def without_module(module: str, *args: str,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`forkproxy ARGS` (the console entry, as the script runs it) where `module` cannot
    be imported."""
    return subprocess.run([sys.executable, "-c", _WITHOUT_MODULE, module, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def assert_missing(result: subprocess.CompletedProcess[str], module: str) -> None:
    """One line, exit 126, and a command that installs the dependencies pyproject.toml
    names with this interpreter's pip (pip brings their own: a missing `rich` comes back
    with `typer`). It said `pip install forkproxy`, which pip cannot find: forkproxy is
    installed from a checkout, not from PyPI."""
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    assert result.returncode == 126, result
    assert result.stderr.splitlines() == [
        f"forkproxy: error: cannot import {module}: forkproxy's dependencies are not all "
        f"installed for {sys.executable} (a `pip install --no-deps`?); install them: "
        f"{shlex.join([sys.executable, '-m', 'pip', 'install', *dependencies])}"], result


@pytest.mark.parametrize("args", [["--version"], ["serve", "127.0.0.1:0=127.0.0.1:9"],
                                  ["links", "6379=127.0.0.1:6379"]])
def test_a_command_without_typer_says_so_in_one_line(args: list[str]) -> None:
    """`pip install --no-deps forkproxy`: every command that needs the CLI ended in a
    ModuleNotFoundError traceback, exit 1. One line naming the module and what to do,
    and the status of a command that could not run."""
    assert_missing(without_module("typer", *args), "typer")


def test_status_without_psutil_says_so_in_one_line(
    start_proxy: Callable[..., Proxy], short_dir: Path,
) -> None:
    """typer installed but not psutil: the proxy serves, and `status` (the lean one and
    the CLI's) ended in a traceback from status.enrich's `import psutil`."""
    sock = short_dir / "s.sock"
    start_proxy("--status-socket", str(sock), "127.0.0.1:0=127.0.0.1:9", expect=1)
    env = {**os.environ, "FORKPROXY_STATUS_SOCKET": str(sock)}
    assert_missing(without_module("psutil", "status", env=env), "psutil")
    assert_missing(without_module("psutil", "status", "--json", f"--status-socket={sock}"),
                   "psutil")
    # `check` reads nothing with psutil: it still answers.
    assert without_module("psutil", "check", env=env).returncode == 0


def test_a_module_of_forkproxy_missing_is_still_a_traceback() -> None:
    """Only a dependency's absence is the install's fault; forkproxy's own module (or the
    standard library's) missing is a bug, whose traceback says where."""
    result = without_module("forkproxy.cli", "--version")
    assert result.returncode == 1 and "Traceback" in result.stderr, result
    # The standard library's (a broken Python): not blamed on forkproxy's dependencies.
    result = without_module("ipaddress", "links", "6379=127.0.0.1:6379")
    assert result.returncode == 1 and "Traceback" in result.stderr, result
    assert "cannot import" not in result.stderr, result


def test_a_dependency_with_a_module_gone_says_to_reinstall_it(tmp_path: Path) -> None:
    """typer installed, one of its modules gone (a slimmed image, a copy cut short):
    `from .core import ...` is a ModuleNotFoundError as for a dependency not installed,
    and the line said to `pip install` the dependencies, which finds typer "already
    satisfied" and changes nothing. A module of a package that imported is reinstalled,
    as one that does not load."""
    broken = tmp_path / "site"
    shutil.copytree(Path(typer.__file__).parent, broken / "typer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (broken / "typer" / "core.py").unlink()
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    result = subprocess.run([sys.executable, "-c", _WITHOUT_MODULE, "no-such-module",
                             "--version"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(broken)})
    reinstall = [sys.executable, "-m", "pip", "install", "--force-reinstall", *dependencies]
    assert result.returncode == 126, result
    assert result.stderr.splitlines() == [
        f"forkproxy: error: cannot import typer: No module named 'typer.core': installed for "
        f"{sys.executable} but it does not load; reinstall forkproxy's dependencies: "
        f"{shlex.join(reinstall)}"], result


# An editable install's finder (setuptools' __editable__ one) serves forkproxy from its
# checkout, which is on no sys.path entry; `python -m forkproxy` run from a directory above
# the checkout puts that directory first on sys.path.
_EDITABLE_FROM_ABOVE = """
import importlib.util, sys
package, above = sys.argv[1], sys.argv[2]

class Editable:
    def find_spec(self, name, path=None, target=None):
        if name != "forkproxy":
            return None
        return importlib.util.spec_from_file_location(
            name, package + "/__init__.py", submodule_search_locations=[package])

sys.meta_path.insert(0, Editable())
sys.path.insert(0, above)
sys.argv = ["forkproxy", *sys.argv[3:]]
from forkproxy.console import main
main()
"""


def test_a_module_of_forkproxy_that_does_not_load_is_a_traceback_wherever_it_lies(
    tmp_path: Path,
) -> None:
    """forkproxy's own files of two versions (one module without a name another imports
    from it), in an editable checkout run from the directory above it: the module was
    named by its path below the longest sys.path entry holding it, that directory, so
    the line blamed a dependency called after the checkout's directory (`cannot import
    checkout: ... reinstall forkproxy's dependencies`, exit 126). forkproxy's own
    ImportError is a bug, whose traceback says where, wherever its files lie."""
    package = tmp_path / "checkout" / "forkproxy"
    shutil.copytree(Path(__file__).parent.parent / "forkproxy", package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (package / "accounting.py").write_text('"""Another version\'s, without ended_text."""\n')
    result = subprocess.run(
        [sys.executable, "-c", _EDITABLE_FROM_ABOVE, str(package), str(tmp_path), "check"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "cannot import name 'ended_text' from 'forkproxy.accounting'" in result.stderr, result
    assert result.returncode == 1 and "Traceback" in result.stderr, result
    assert "reinstall" not in result.stderr, result


def test_status_with_a_broken_psutil_says_so_in_one_line(
    start_proxy: Callable[..., Proxy], short_dir: Path, tmp_path: Path,
) -> None:
    """psutil installed but its compiled part not loadable (built for another Python,
    libc or machine: a venv copied into another image; a file cut short): the dynamic
    loader's ImportError, not a ModuleNotFoundError, ended `status` in a traceback, exit
    1. One line naming the module and why, and a command that reinstalls (a plain `pip
    install` says "already satisfied" and changes nothing), exit 126 as for one missing."""
    sock = short_dir / "s.sock"
    start_proxy("--status-socket", str(sock), "127.0.0.1:0=127.0.0.1:9", expect=1)
    broken = tmp_path / "site"
    shutil.copytree(Path(psutil.__file__).parent, broken / "psutil")
    for extension in (broken / "psutil").glob("_psutil_linux*.so"):
        extension.write_bytes(b"not an ELF file\n" * 64)  # what dlopen() refuses
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    env = {**os.environ, "PYTHONPATH": str(broken), "FORKPROXY_STATUS_SOCKET": str(sock)}
    for args in (["status"], ["status", "--json", f"--status-socket={sock}"]):
        result = subprocess.run([sys.executable, "-c", _WITHOUT_MODULE, "no-such-module",
                                 *args], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 126, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "forkproxy: error: cannot import psutil: "), result
        assert "invalid ELF header" in lines[0], result
        reinstall = [sys.executable, "-m", "pip", "install", "--force-reinstall", *dependencies]
        assert lines[0].endswith(f"installed for {sys.executable} but it does not load; reinstall "
                                 f"forkproxy's dependencies: {shlex.join(reinstall)}"), result


@pytest.fixture(scope="session")
def latin1_locale(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a host whose locale is ISO-8859-1: en_US.ISO-8859-1 compiled
    with localedef into a LOCPATH of the test's own, nothing under /usr or /etc."""
    where = tmp_path_factory.mktemp("locale")
    subprocess.run([need("localedef"), "-i", "en_US", "-f", "ISO-8859-1",
                    str(where / "en_US.ISO-8859-1")], check=True, capture_output=True)
    return {"LOCPATH": str(where), "LC_ALL": "en_US.ISO-8859-1"}


@pytest.mark.parametrize("option", ["--pid-file", "--status-socket", "--env-file"])
def test_a_start_error_names_a_path_in_the_locales_encoding(
        option: str, latin1_locale: dict[str, str], tmp_path: Path) -> None:
    """Under a Latin-1 locale, a path typed with `ü` (byte 0xfc) is named with that byte,
    as `links` and every other line a command says are written: the start error was
    UTF-8 (`nÃ¼` on that terminal), a path the operator could not copy back."""
    missing = os.fsencode(tmp_path) + b"/n\xfc/f"
    env = {"PATH": os.environ["PATH"], **latin1_locale}
    result = subprocess.run(
        [os.fsencode(FORKPROXY), b"serve", b"--bind", b"127.0.0.1", b"0=198.18.0.5:1",
         option.encode(), missing], capture_output=True, env=env, timeout=30)
    assert result.returncode == 2, result
    [line] = result.stderr.splitlines()
    assert line.startswith(b"forkproxy: error: "), line
    assert missing in line, line
    assert b"\xc3\xbc" not in line, line


def test_the_text_log_names_a_path_in_the_locales_encoding(
        latin1_locale: dict[str, str], tmp_path: Path) -> None:
    """Under a Latin-1 locale, serve's `status-socket` line names the path typed with `ü`
    (byte 0xfc) with that byte, so that it can be given back to `status --status-socket`:
    the log was UTF-8 (`Ã¼`). JSON records escape it, whatever the locale."""
    folder = os.fsencode(tmp_path) + b"/n\xfc"
    os.mkdir(folder)
    path = folder + b"/s.sock"
    env = {"PATH": os.environ["PATH"], **latin1_locale}
    for fmt, named in (("text", b"path=" + path + b"\n"), ("json", b'/n\\u00fc/s.sock"}\n')):
        proxy = subprocess.Popen(
            [os.fsencode(FORKPROXY), b"serve", b"--bind", b"127.0.0.1", b"0=198.18.0.5:1",
             b"--log-format", fmt.encode(), b"--status-socket", path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            assert proxy.stdout is not None and proxy.stdout.readline().startswith(b"listening")
            status = subprocess.run([os.fsencode(FORKPROXY), b"check", b"--status-socket", path],
                                    capture_output=True, env=env, timeout=30)
            assert status.returncode == 0, status
        finally:
            proxy.terminate()
            _, log = proxy.communicate(timeout=30)
        assert proxy.returncode == 0, log
        [line] = [line for line in log.splitlines(keepends=True) if b"status-socket" in line]
        assert line.endswith(named), line
        if fmt == "json":
            assert json.loads(line)["path"] == path.decode("latin-1"), line
