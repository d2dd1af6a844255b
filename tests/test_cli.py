"""Bad input through the real CLI: exit 2, one line naming the input, nothing left behind."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import FORKPROXY, free_port, need


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
        (["--from-env"], {}, ["no links found", "the environment"]),
        ([], {}, ["no links found"]),
        (["--from-env"], {"R_PORT_1_TCP": "tcp://;reboot:1"}, ["variable R_PORT_1_TCP"]),
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
        (["--metrics", "nowhere"], "--metrics 'nowhere'"),
        # poll() takes a C int of milliseconds: longer would crash a relay or the supervisor.
        (["--grace", "1e10"], "--grace '1e10': at most 2,000,000 seconds"),
        (["--idle-timeout", "2000001"], "--idle-timeout '2000001': at most 2,000,000 seconds"),
        (["--halfclose-timeout", "9e9"], "--halfclose-timeout '9e9'"),
        (["--connect-timeout", "3e6"], "--connect-timeout '3e6'"),
        (["--resolve-every", "0"], "--resolve-every 0"),
        (["--resolve-every", "soon"], "--resolve-every 'soon': not a number of seconds"),
        (["--resolve-every", "0.2"], "--resolve-every 0.2: at least 1 second, or 'off'"),
    ],
)
def test_bad_options_exit_2(option: list[str], needle: str) -> None:
    assert_one_line_error(run("serve", *option, "0=127.0.0.1:1"), needle)


def test_port_in_use_is_named_and_nothing_is_half_started() -> None:
    first = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = run("serve", f"127.0.0.1:{first}=127.0.0.1:1", f"127.0.0.1:{busy}=127.0.0.1:1")
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{busy}", "address already in use")
    assert_not_listening(first)  # the first listener was closed again, not left behind


def test_low_port_without_privilege() -> None:
    # Root without CAP_NET_BIND_SERVICE is refused low ports just as any user is.
    unprivileged: tuple[str, ...] = ()
    if os.geteuid() == 0:
        unprivileged = (need("setpriv"), "--bounding-set=-net_bind_service")
    result = run("serve", "127.0.0.1:81=127.0.0.1:1", prefix=unprivileged)
    assert_one_line_error(result, "127.0.0.1:81", "permission denied")


def test_a_status_socket_path_that_is_not_a_socket_is_refused_and_kept(tmp_path: Path) -> None:
    """connect() to a regular file is refused like one to a dead socket: the file used to
    be taken for a crashed supervisor's socket and deleted."""
    precious = tmp_path / "precious.conf"
    precious.write_text("keep me\n")
    result = run("serve", "--status-socket", str(precious), "0=127.0.0.1:1")
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
    assert_one_line_error(run("serve", "--status-socket", path, "0=127.0.0.1:1"), needle)


def test_an_unusable_default_socket_directory_is_named(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.write_text("")  # a file where $XDG_RUNTIME_DIR should be a directory
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    assert_one_line_error(run("serve", "0=127.0.0.1:1", env=env),
                          f"status socket directory '{runtime}/forkproxy': Not a directory")
    for command in ("status", "check", "reload"):
        result = run(command, env=env)
        assert result.returncode == 1, result
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result
        assert f"{runtime}/forkproxy: Not a directory" in result.stderr


def test_an_env_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "links.env"
    os.mkfifo(fifo)
    for command in ("serve", "links"):
        result = run(command, "--env-file", str(fifo), timeout=10)
        assert_one_line_error(result, f"env file '{fifo}': not a regular file")


def test_a_path_in_an_error_is_quoted_and_stays_on_one_line(tmp_path: Path) -> None:
    forged = f"{tmp_path}/missing/a\nlistening 127.0.0.1:1 -> 127.0.0.1:2"
    for option in ("--pid-file", "--env-file", "--status-socket"):
        result = run("serve", option, forged, "0=127.0.0.1:1")
        assert_one_line_error(result, "\\nlistening")  # the newline is shown as \n


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


def test_help_shows_every_default_and_names_what_options_take() -> None:
    """The defaults are written into the help strings in brackets, which rich markup
    used to swallow as tags: `serve --help` showed "Control socket path ." and no default."""
    result = run("serve", "--help")
    assert result.returncode == 0, result
    text = " ".join(result.stdout.split())  # click wraps at 80 columns
    for needle in ("[default: 5]", "[default: 8]", "[default: 30]", "[default: 1024]",
                   "[default: auto]", "[default: off]", "[default: everyone]",
                   "[default: $XDG_RUNTIME_DIR/forkproxy/PID.sock, else /tmp/forkproxy-UID/",
                   "--env-file PATH", "--status-socket PATH", "--pid-file PATH"):
        assert needle in text, needle
    assert "<str>" not in text and "<bool>" not in text
