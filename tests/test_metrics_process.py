"""The metrics process's life under the supervisor: how its deaths are logged and shown,
how often it is started again, and what happens when forkproxy's files change under a
running supervisor (a pip upgrade or downgrade on the host)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

import forkproxy

from conftest import FORKPROXY, Proxy, control, metrics_pid, poll

StartProxy = Callable[..., Proxy]


def serving_metrics_pid(proxy: Proxy) -> int:
    """The metrics process's pid, once it has answered a scrape: past its imports and its
    set-up (signal dispositions included), in its loop."""
    url = proxy.lines[-1].split(" ", 1)[1]
    with urllib.request.urlopen(url, timeout=15) as response:
        assert b"forkproxy_up 1.0" in response.read()
    pid = poll(lambda: metrics_pid(proxy.pid), bool)
    assert pid, f"no metrics process\n{proxy.log()}"
    return pid


def test_a_metrics_process_killed_with_sigterm_is_logged_as_killed(
    start_proxy: StartProxy,
) -> None:
    """`kill PID` (SIGTERM) of the metrics process was logged `metrics-died status="exit
    status 0"`: its handler exited 0, as if it had quit of itself. It dies by the signal now."""
    proxy = start_proxy("--metrics", "127.0.0.1:0", "127.0.0.1:0=127.0.0.1:1", expect=2)
    os.kill(serving_metrics_pid(proxy), signal.SIGTERM)
    log = poll(proxy.log, lambda text: "metrics-died" in text)
    [line] = [x for x in log.splitlines() if "metrics-died" in x]
    assert 'status="killed by SIGTERM"' in line, line
    assert proxy.stop() == 0


def context_switches(pid: int) -> int:
    """Every time any thread of `pid` has slept or been switched out, so far."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        # A scrape's thread may end between the listing and its read (its reply read by
        # the client before the thread has exited): gone, it counts for nothing.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError), \
                open(f"/proc/{pid}/task/{task}/status", encoding="ascii") as status:
            total += sum(int(line.split()[1]) for line in status
                         if line.startswith(("voluntary_ctxt_switches:",
                                             "nonvoluntary_ctxt_switches:")))
    return total


def test_a_metrics_process_nobody_scrapes_never_wakes(start_proxy: StartProxy) -> None:
    """A sidecar in every pod, scraped every 15 s or never: between scrapes its metrics
    process slept in a loop (a deadline thread every 0.25 s, a parent check every second),
    5 wakeups a second for ever. Now it waits for a scrape, or for a deadline of one."""
    proxy = start_proxy("--metrics", "127.0.0.1:0", "127.0.0.1:0=127.0.0.1:1", expect=2)
    pid = serving_metrics_pid(proxy)  # a scrape done: its deadlines set and cleared
    assert poll(lambda: len(os.listdir(f"/proc/{pid}/task")), lambda n: n == 2), \
        "the scrape's thread did not end"  # the loop and the deadline thread only
    time.sleep(0.5)
    before = context_switches(pid)
    time.sleep(3)
    assert context_switches(pid) - before == 0
    # Still serving: a scrape wakes it.
    serving_metrics_pid(proxy)
    assert context_switches(pid) > before
    assert proxy.stop() == 0


def test_a_metrics_process_that_keeps_dying_is_restarted_less_and_less_often(
    start_proxy: StartProxy, short_dir: Path,
) -> None:
    """A metrics process that died again soon after each restart was restarted every 5 s
    for ever, and `status` said `restarting for 3s` an hour into the loop: each death
    reset the time. The delay doubles now for each quick death in a row, and status counts
    from the first death of the run, with the deaths and the next start."""
    sock = short_dir / "s.sock"
    proxy = start_proxy("--metrics", "127.0.0.1:0", f"--status-socket={sock}",
                        "127.0.0.1:0=127.0.0.1:1", expect=2)
    first = serving_metrics_pid(proxy)
    os.kill(first, signal.SIGKILL)
    died = time.time()
    # Back 5 s later: killed again as soon as it is there, a death in a row.
    second = poll(lambda: metrics_pid(proxy.pid), lambda pid: pid not in (0, first))
    assert second not in (0, first), proxy.log()
    os.kill(second, signal.SIGKILL)
    log = poll(proxy.log, lambda text: text.count("metrics-died") == 2)
    details = [x.split("detail=", 1)[1] for x in log.splitlines() if "metrics-died" in x]
    assert details == ['"restarting in 5s"', '"restarting in 10s"'], log
    state = control(sock, "status")["metrics"]
    assert state["state"] == "restarting" and state["deaths_in_a_row"] == 2, state
    assert state["since"] <= died + 1 and 5 < state["retry_in"] <= 10, (state, died)
    status = subprocess.run([FORKPROXY, "status", f"--status-socket={sock}"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    [line] = [x for x in status.splitlines() if x.startswith("metrics ")]
    found = re.search(r"restarting for (\d+)s \(killed by SIGKILL \(perhaps out of memory\)\), "
                      r"2 restarts, 2 deaths in a row, next start in (\d+)s$", line)
    assert found, line
    # From the first death (5 s and more before), not the last (a moment ago).
    assert int(found[1]) >= 4 and 0 <= int(found[2]) <= 10, line
    assert proxy.stop() == 0


def copied_package(into: Path) -> Path:
    """forkproxy's package copied into `into` (its parent for PYTHONPATH): files to change
    under a supervisor running from them, as a pip upgrade changes the installed ones."""
    package = into / "forkproxy"
    shutil.copytree(Path(forkproxy.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return package


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_metrics_process_whose_files_changed_is_not_restarted_and_says_why(
    start_proxy: StartProxy, short_dir: Path, tmp_path: Path,
) -> None:
    """The metrics process is the one process started by exec: after a pip upgrade under
    a running supervisor, its restart ran the new metrics.py, whose options were not the
    old supervisor's: argparse's usage text and `exit status 2` every 5 s for ever, the
    scrapes hanging, nothing in the log or in status pointing at the upgrade. Now the
    supervisor's fork sees the files changed, says so in one line, and it is not
    restarted: status says why, and the port is closed (scrapers refused)."""
    package = copied_package(tmp_path / "site")
    sock = short_dir / "s.sock"
    env = {**os.environ, "PYTHONPATH": str(package.parent), "XDG_RUNTIME_DIR": str(short_dir)}
    proxy = start_proxy("--metrics", "127.0.0.1:0", f"--status-socket={sock}",
                        "127.0.0.1:0=127.0.0.1:1", expect=2, env=env)
    port = int(proxy.lines[-1].rsplit(":", 1)[1].split("/")[0])
    pid = serving_metrics_pid(proxy)
    assert str(package / "_metrics_main.py") in psutil.Process(pid).cmdline()  # the copy runs
    # The next version renamed an option: the old supervisor's command line is not its own.
    metrics_py = package / "metrics.py"
    text = metrics_py.read_text()
    assert text.count('"--supervisor-pid"') == 1 and "args.supervisor_pid" in text
    metrics_py.write_text(text.replace('"--supervisor-pid"', '"--parent-pid"')
                          .replace("args.supervisor_pid", "args.parent_pid"))
    os.kill(pid, signal.SIGKILL)
    # Restarted 5 s later, by the first death's delay: failed, once, or a loop began.
    poll(proxy.log, lambda text: "metrics-failed" in text or text.count("metrics-died") > 1)
    state = poll(lambda: control(sock, "status")["metrics"],
                 lambda state: state["state"] != "restarting")
    log = proxy.log()
    failed = [x for x in log.splitlines() if "metrics-failed" in x]
    assert len(failed) == 1 and "usage:" not in log and log.count("metrics-died") == 1, log
    assert ("error=\"forkproxy's files changed under the running supervisor "
            "(metrics.py changed)\"") in failed[0], failed
    assert 'detail="not restarted: restart forkproxy"' in failed[0], failed
    assert state["state"] == "down" and state["pid"] is None and state["retry_in"] is None
    assert state["last_exit"] == ("exit status 78: forkproxy's files changed under the "
                                  "running supervisor, restart forkproxy"), state
    assert refused(port), "the metrics port still takes scrapes nobody will answer"
    assert metrics_pid(proxy.pid) == 0
    status = subprocess.run([FORKPROXY, "status", f"--status-socket={sock}"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert "down for" in status and "running supervisor, restart forkproxy), 1 restart" in status
    assert proxy.stop() == 0


def run_metrics_py(python: str, *args: str, short_dir: Path) -> subprocess.CompletedProcess[str]:
    """The metrics process as the supervisor starts it (`python -I .../_metrics_main.py`),
    on a listening socket of its own, with --log-format=json and `args` after the
    supervisor's options."""
    metrics_py = Path(forkproxy.__file__).with_name("_metrics_main.py")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        os.set_inheritable(listener.fileno(), True)
        argv = [python, "-I", str(metrics_py), "--fd", str(listener.fileno()),
                f"--status-socket={short_dir / 'none.sock'}", "--supervisor-pid",
                str(os.getpid()), "--log-format=json", "--log-level=20", *args]
        return subprocess.run(argv, pass_fds=[listener.fileno()], capture_output=True,
                              text=True, timeout=60)


def test_a_metrics_process_given_another_versions_options_says_so_in_one_line(
    short_dir: Path,
) -> None:
    """A supervisor of another version (started before an upgrade, and not checking its
    files) gives the metrics process options it does not know: argparse wrote its usage
    text, past --log-format json, and exited 2. One line of the log's format now, and the
    exit status that says the files changed."""
    out = run_metrics_py(sys.executable, "--scrape-timeout=5", short_dir=short_dir)
    assert out.returncode == 78 and out.stdout == "", out
    [line] = out.stderr.splitlines()
    record = json.loads(line)
    assert (record["level"], record["event"]) == ("error", "metrics-failed"), record
    assert record["error"] == ("forkproxy's files changed under the running supervisor (the "
                               "metrics process's arguments: unrecognized arguments: "
                               "--scrape-timeout=5)"), record
    assert record["detail"] == "restart forkproxy", record


def test_a_metrics_process_missing_a_module_says_so_in_one_line(
    short_dir: Path, tmp_path: Path,
) -> None:
    """psutil or prometheus_client uninstalled (or an interpreter without them): the
    metrics process died of a ModuleNotFoundError traceback on stderr, past --log-format
    json. A Python without them here: a venv of its own, with no package installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")],
                   check=True, timeout=120)
    out = run_metrics_py(str(tmp_path / "venv" / "bin" / "python"), short_dir=short_dir)
    assert out.returncode == 1 and out.stdout == "", out
    [line] = out.stderr.splitlines()
    record = json.loads(line)
    assert (record["level"], record["event"]) == ("error", "metrics-failed"), record
    assert record["error"] == "ModuleNotFoundError: No module named 'psutil'", record


def test_a_metrics_process_whose_package_moved_away_says_so_in_the_log_format(
    start_proxy: StartProxy, short_dir: Path, tmp_path: Path,
) -> None:
    """forkproxy's package directory moved away under a running supervisor (an
    uninstall, a virtualenv renamed): the metrics process's restart wrote `python: can't
    open file '.../forkproxy/metrics.py'` to stderr, past --log-format json. Every line
    is JSON now, and one says what happened."""
    package = copied_package(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(package.parent), "XDG_RUNTIME_DIR": str(short_dir)}
    proxy = start_proxy("--log-format", "json", "--metrics", "127.0.0.1:0",
                        "127.0.0.1:0=127.0.0.1:1", expect=2, env=env)
    pid = serving_metrics_pid(proxy)
    package.rename(tmp_path / "moved")
    os.kill(pid, signal.SIGKILL)
    poll(proxy.log, lambda text: "metrics-failed" in text or text.count("metrics-died") > 1)
    records = [json.loads(line) for line in proxy.log().splitlines()]
    failed = [r for r in records if r["event"] == "metrics-failed"]
    assert len(failed) == 1, records
    assert failed[0]["error"] == ("forkproxy's files changed under the running supervisor "
                                  f"({str(package)!r}: No such file or directory)"), failed
    assert proxy.stop() == 0
    assert all(json.loads(line) for line in proxy.log().splitlines())


def test_a_metrics_process_imports_the_dependencies_from_where_serve_did(
    start_proxy: StartProxy, short_dir: Path, tmp_path: Path,
) -> None:
    """forkproxy's dependencies importable only through PYTHONPATH (or the user site, after
    `pip install --user`): `serve`, `status` and `check` worked, but the metrics process,
    started with `python -I`, which drops both, failed on `No module named 'psutil'` and
    was restarted every 60 s for ever. A venv of its own with no package installed, every
    package on PYTHONPATH: a scrape is answered. PYTHONPATH's empty component (the current
    directory, which holds a psutil.py) is still not imported from."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")],
                   check=True, timeout=120)
    python = str(tmp_path / "venv" / "bin" / "python")
    bare = subprocess.run([python, "-c", "import psutil"], capture_output=True, timeout=60)
    assert bare.returncode == 1  # the venv itself has none of them
    site_packages = Path(psutil.__file__).parent.parent  # the test venv's, psutil's too
    package_parent = Path(forkproxy.__file__).parent.parent  # the editable install's
    marker = tmp_path / "imported"
    (short_dir / "psutil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {**os.environ, "XDG_RUNTIME_DIR": str(short_dir),
           "PYTHONPATH": f":{site_packages}:{package_parent}"}
    cwd = os.getcwd()
    os.chdir(short_dir)  # where the proxy starts: `:` in PYTHONPATH names it
    try:
        proxy = start_proxy("--metrics", "127.0.0.1:0", "127.0.0.1:0=127.0.0.1:1",
                            expect=2, env=env, prefix=(python,))
    finally:
        os.chdir(cwd)
    url = proxy.lines[-1].split(" ", 1)[1]
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            assert response.status == 200 and b"forkproxy_up 1.0" in response.read()
    except OSError as exc:
        raise AssertionError(f"{exc}\n{proxy.log()}") from None
    pid = poll(lambda: metrics_pid(proxy.pid), bool)
    assert psutil.Process(pid).cmdline()[0] == python  # the venv's, without the packages
    assert not marker.exists()
    assert "metrics-failed" not in proxy.log()
    assert proxy.stop() == 0


def test_a_metrics_process_missing_a_module_says_which_interpreter_looked_where(
    short_dir: Path, tmp_path: Path,
) -> None:
    """`No module named 'psutil'` alone read as a missing install, where `pip list` (or
    `status`, with the user site) showed it there: the line says that the metrics
    process's interpreter did not find it, and where it looked."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")],
                   check=True, timeout=120)
    python = str(tmp_path / "venv" / "bin" / "python")
    out = run_metrics_py(python, short_dir=short_dir)
    [line] = out.stderr.splitlines()
    record = json.loads(line)
    assert record["error"] == "ModuleNotFoundError: No module named 'psutil'", record
    assert record["detail"].startswith(
        f"not importable by the metrics process's interpreter, {python} -I, from "), record
    assert str(tmp_path / "venv" / "lib") in record["detail"], record


def argv_of(pid: int) -> list[str]:
    """Process `pid`'s command line, one string an argument."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def interpreter_options(argv: list[str]) -> list[str]:
    """The options before -I in a command line forkproxy execs (`python [...] -I ...`)."""
    return argv[1:argv.index("-I")]


def test_serve_under_python_dev_mode_runs_its_processes_in_it(
    start_proxy: StartProxy, env: dict[str, str],
) -> None:
    """`forkproxy serve` execs `python -I`, which ignores every PYTHON* variable: under
    PYTHONDEVMODE=1 (or `python -X dev -m forkproxy serve`) only the few milliseconds
    before the exec ran in development mode, and the supervisor and the metrics process,
    where a ResourceWarning or a faulthandler dump would show, ran without it. Without
    such variables nothing is added: production's command line is as it was."""
    checks = ("PYTHONDEVMODE", "PYTHONWARNINGS", "PYTHONTRACEMALLOC", "PYTHONFAULTHANDLER",
              "PYTHONWARNDEFAULTENCODING")  # a run of the tests under them: not here
    plain = start_proxy("--metrics", "127.0.0.1:0", "127.0.0.1:0=127.0.0.1:1", expect=2,
                        env={k: v for k, v in env.items() if k not in checks})
    assert interpreter_options(argv_of(plain.pid)) == []
    assert interpreter_options(argv_of(serving_metrics_pid(plain))) == []
    assert plain.stop() == 0
    dev = start_proxy("--metrics", "127.0.0.1:0", "127.0.0.1:0=127.0.0.1:1", expect=2,
                      env={**env, "PYTHONDEVMODE": "1", "PYTHONTRACEMALLOC": "5",
                           "PYTHONWARNINGS": "error::ResourceWarning"}, timeout=60)
    for pid in (dev.pid, serving_metrics_pid(dev)):
        options = interpreter_options(argv_of(pid))
        assert {"-Xdev", "-Xtracemalloc=5", "-Werror::ResourceWarning"} <= set(options), \
            options
    assert dev.stop() == 0


def test_a_metrics_process_handed_over_closes_its_sockets_before_it_exits(
    start_proxy: StartProxy, env: dict[str, str], short_dir: Path,
) -> None:
    """At a take-over the old metrics process returned from its loop with its handoff
    socket still open, and under -X dev the interpreter's exit said so in the old
    supervisor's log at every take-over (`ResourceWarning: unclosed <socket.socket ...>`),
    a line that hides a real leak among expected ones. Its sockets are closed now."""
    dev = {**env, "PYTHONDEVMODE": "1"}
    path = str(short_dir / "fp.sock")
    args = ("--status-socket", path, "--metrics", "127.0.0.1:0", "127.0.0.1:0=127.0.0.1:1")
    old = start_proxy(*args, expect=2, env=dev, timeout=60)
    old_metrics = serving_metrics_pid(old)  # in its loop, its handoff socket open
    metrics_port = old.lines[-1].rsplit(":", 1)[1].split("/")[0]
    new = start_proxy("--take-over", "--status-socket", path, "--metrics",
                      f"127.0.0.1:{metrics_port}", f"127.0.0.1:{old.port}=127.0.0.1:1",
                      expect=2, env=dev, timeout=60)
    assert old.proc.wait(30) == 0
    # Its last words are written as it exits: once it is gone (or a zombie), all are in.
    assert not poll(lambda: psutil.pid_exists(old_metrics)
                and psutil.Process(old_metrics).status() != psutil.STATUS_ZOMBIE,
                lambda alive: not alive), "the old metrics process did not exit"
    log = old.log()
    assert "stopping signal=take-over" in log, log
    assert "ResourceWarning" not in log and "unclosed" not in log, log
    assert new.stop() == 0


def test_a_request_half_sent_at_a_take_over_is_answered_by_the_old_metrics_process(
    start_proxy: StartProxy, env: dict[str, str], short_dir: Path,
) -> None:
    """A connection whose request had not all come when the port was handed over is the
    old metrics process's alone (the taker's never accepted it): its reading goes on
    there (_Pending.finish) and the request is answered once whole, not closed unread."""
    path = str(short_dir / "fp.sock")
    old = start_proxy("--status-socket", path, "--metrics", "127.0.0.1:0",
                      "127.0.0.1:0=127.0.0.1:1", expect=2, env=env)
    serving_metrics_pid(old)  # in its loop
    metrics_port = old.lines[-1].rsplit(":", 1)[1].split("/")[0]
    with socket.create_connection(("127.0.0.1", int(metrics_port)), timeout=20) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # its blank line still to come
        new = start_proxy("--take-over", "--status-socket", path, "--metrics",
                          f"127.0.0.1:{metrics_port}", f"127.0.0.1:{old.port}=127.0.0.1:1",
                          expect=2, env=env)
        assert poll(lambda: "stopping signal=take-over" in old.log(), bool), old.log()
        time.sleep(0.5)  # the old metrics process is finishing: the request ends now
        sock.sendall(b"\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 200 "), reply[:200]
    assert b"forkproxy_up" in reply, reply[:200]
    assert old.proc.wait(30) == 0
    assert new.stop() == 0
