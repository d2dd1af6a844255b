"""Smoke run of scripts/bench: the harness works end to end.

Tiny workloads (~1 s each), one round, every workload and candidate, real peers. It checks
that each number is there and positive, never how fast anything is.

The other scripts are tested here too, run for real with cheap arguments: bad arguments,
an interrupt, a symlink, image-test's tag (with a podman that builds nothing) and
ensure-venv's interpreter.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import need, processes_under, wait_for

REPO = Path(__file__).resolve().parent.parent
PEERS = ("redis-server", "redis-cli", "redis-benchmark", "socat", "haproxy", "iperf3")
CANDIDATES = ("direct", "socat", "haproxy", "floor", "forkproxy")
METRICS = ("bulk", "rr", "conn", "p50", "p99", "mem")


def _missing_peers() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in PEERS if shutil.which(p, path=path) is None]


@pytest.mark.timeout(300)
def test_bench_smoke_run(tmp_path: Path) -> None:
    missing = _missing_peers()
    # scripts/bench installs missing peers itself, but only as root.
    if missing and os.geteuid() != 0:  # a missing peer fails, never skips
        pytest.fail(f"peers missing and not root: {', '.join(missing)} (run ./scripts/test)")
    venv = Path(sys.prefix)
    assert (venv / "bin" / "forkproxy").exists(), f"no forkproxy in the test venv {venv}"

    argv = [str(REPO / "scripts" / "bench"), "--venv", str(venv), "--smoke", "--out", str(tmp_path)]
    with subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the harness stops the servers it started
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"scripts/bench --smoke took over 240 s\nstderr:\n{err[-5000:]}")
    assert proc.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}"
    assert out.startswith("| metric | unit | direct | socat | haproxy | floor | forkproxy |")
    # What each proxy spends, with its ratios beside (steadier than the rates between runs).
    side_head = "| | unit | socat | haproxy | floor | forkproxy | haproxy / socat | floor / socat"
    assert side_head + " | forkproxy / socat | forkproxy / haproxy | forkproxy / floor |" in out
    (cpu_conn,) = [ln for ln in out.splitlines() if ln.startswith("| proxy CPU per connection")]
    cells = [c.strip() for c in cpu_conn.strip("|").split("|")]
    assert len(cells) == 2 + 4 + 5, cpu_conn
    assert all(c == "n/a" or c.endswith("x") for c in cells[6:]), cpu_conn

    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert data["errors"] == []
    assert data["candidates"] == list(CANDIDATES)
    for metric in METRICS:
        got = data["results"][metric]["candidates"]
        want = [c for c in CANDIDATES if not (metric == "mem" and c == "direct")]
        assert sorted(got) == sorted(want), metric
        for cand in want:
            assert len(got[cand]["samples"]) == 1, (metric, cand)
            assert got[cand]["median"] > 0, (metric, cand, got[cand])
        for name, value in data["results"][metric]["ratios"].items():
            assert value is not None and value > 0, (metric, name)
    assert {t["metric"] for t in data["targets"]} == {"bulk", "rr", "conn", "mem"}
    assert all(t["got"] is not None for t in data["targets"])
    for key in ("nproc", "cpu", "kernel", "python", "date"):
        assert data["machine"][key], key


def test_bench_help_prints_the_options_and_installs_nothing(tmp_path: Path) -> None:
    """docs/benchmarks.md, "Rerun": `scripts/bench --help` lists the options. It used to
    install the peers, make a venv and pip-install forkproxy and matplotlib first."""
    venv = tmp_path / "bench-venv"
    result = subprocess.run(
        [str(REPO / "scripts" / "bench"), "--help"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "FORKPROXY_BENCH_VENV": str(venv)},
    )
    assert result.returncode == 0, result
    assert result.stdout.startswith("usage: scripts/bench"), result.stdout[:500]
    for option in ("--rounds", "--only", "--candidates", "--forkproxy-args", "--venv"):
        assert option in result.stdout, option
    assert not venv.exists(), "--help made the bench venv"


@pytest.mark.parametrize(("script", "argument", "says"), [
    ("bench", "--bogus", "scripts/bench: error: unrecognized arguments: --bogus"),
    # argparse took it for --smoke, the wrapper did not: a chart venv for a smoke run.
    ("bench", "--smok", "scripts/bench: error: unrecognized arguments: --smok"),
    ("ensure-venv", "--bogus", "ensure-venv: unknown option --bogus (try --help)"),
    ("ensure-peers", "--bogus", "ensure-peers: unknown option --bogus (try --help)"),
    ("demo", "--bogus", "demo: takes no arguments: --bogus (try --help)"),
    ("image-test", "--bogus", "image-test: takes no arguments: --bogus (try --help)"),
    ("slowread_mem.py", "--conns=0",
     "slowread_mem.py: error: argument --conns: not counts of 1 or more, comma-separated: '0'"),
    ("slowread_mem.py", "--proxies=nginx",
     "slowread_mem.py: error: argument --proxies: not forkproxy, socat or haproxy: 'nginx'"),
    ("latency_pathologies.py", "nope",
     "latency_pathologies.py: unknown case 'nope'"
     " (one of wwr, tiny, after, first, bulk, two, upl)"),
    ("instr_per_conn.py", "--conns=0",
     "instr_per_conn.py: error: argument --conns: '0' is not a whole number above 0"),
    ("instr_per_conn.py", "--venv=/nonexistent",
     "instr_per_conn.py: --venv /nonexistent: no bin/forkproxy there"),
    # Checked before the root check and the runs: a typo ran nothing and said nothing.
    ("wire_audit.py", "--only=nope", "wire_audit.py: no scenario matches --only 'nope'"),
])
def test_a_script_given_a_bad_argument_says_so_at_once_and_does_nothing(
    tmp_path: Path, script: str, argument: str, says: str,
) -> None:
    """Each failed with exit 2 only after installing its venv and peers (bench: ~1 min),
    or took the argument for something else: ensure-peers "installing --help", image-test
    ran its whole build, demo started its servers, ensure-venv printed pip's traceback."""
    venv = tmp_path / "bench-venv"
    result = subprocess.run(
        [str(REPO / "scripts" / script), argument],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "FORKPROXY_BENCH_VENV": str(venv)},
    )
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines()[-1] == says, result.stderr
    assert result.stdout == "", result.stdout
    assert not venv.exists()


@pytest.mark.parametrize(("script", "first_line"), [
    ("test", "The test command: installs what the tests need"),
    ("test-floors", "Check the dependency floors pyproject.toml declares"),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_the_test_scripts_help_installs_and_runs_nothing(
    tmp_path: Path, script: str, first_line: str, flag: str,
) -> None:
    """`--help` went to pytest after everything was installed and checked: scripts/test ran
    ensure-peers, ensure-venv, ruff and mypy first; scripts/test-floors began building its
    venv of old dependency floors (minutes; apt-get as root) before pytest saw it. A copy
    whose installers would fail shows that none of them runs."""
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / script, copy / "scripts" / script)
    for installer in ("ensure-peers", "ensure-venv"):
        (copy / "scripts" / installer).write_text("#!/bin/sh\necho ran >&2\nexit 9\n")
        (copy / "scripts" / installer).chmod(0o755)
    result = subprocess.run([str(copy / "scripts" / script), flag], capture_output=True,
                            text=True, timeout=30, check=False, cwd=tmp_path)
    assert result.returncode == 0, result
    assert result.stdout.startswith(first_line), result.stdout
    assert "pytest's own options: .venv/bin/pytest --help" in result.stdout.splitlines()[-1]
    assert result.stderr == "", result.stderr
    assert sorted(p.name for p in copy.iterdir()) == ["scripts"]  # no venv made


@pytest.mark.timeout(120)
def test_slowread_mem_measures_what_each_proxy_holds_for_clients_that_never_read() -> None:
    """scripts/slowread_mem.py (docs/benchmarks.md, "A client that never reads"), run for
    real with two connections: a row per proxy, each holding bytes for its clients."""
    for peer in ("unshare", "ss", "socat", "haproxy"):
        need(peer)
    forkproxy = Path(sys.prefix) / "bin" / "forkproxy"
    result = subprocess.run(
        [str(REPO / "scripts" / "slowread_mem.py"), "--conns", "2", "--settle", "5",
         "--forkproxy", str(forkproxy)],
        capture_output=True, text=True, timeout=100, check=False,
    )
    assert result.returncode == 0, result
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert sorted(rows) == ["forkproxy", "haproxy", "socat"], result.stdout
    for name, row in rows.items():
        assert row[1] == "2", row
        # cl_w (the client-facing send queues, MiB each) and the total: the upstream's
        # bytes back up toward a client that never reads, in every proxy.
        assert float(row[4]) > 0.1 and float(row[-1]) > 0.1, (name, result.stdout)
    assert result.stderr == "", result.stderr  # every connection seen on both sides


@pytest.mark.parametrize(("arguments", "says"), [
    (["--pace", "abc"], "two-hosts-demo: --pace wants a number of seconds (e.g. 2, 0.5 or 0),"
                        " not 'abc'"),
    (["--step", "--pace", "-1"], "two-hosts-demo: --pace wants a number of seconds"
                                 " (e.g. 2, 0.5 or 0), not '-1'"),
    (["--pace", ""], "two-hosts-demo: --pace wants a number of seconds (e.g. 2, 0.5 or 0),"
                     " not ''"),
    (["--pace"], "two-hosts-demo: --pace needs seconds (try --help)"),
])
def test_two_hosts_demo_refuses_a_bad_pace_before_starting_anything(
    arguments: list[str], says: str,
) -> None:
    """`--pace abc` was taken as it was and failed at the first pause (`sleep abc`), with
    exit 1, after the namespaces, redis servers and ambassadors were started; `--pace`
    with no value was bash's "line 26: 2: --pace needs seconds", exit 1."""
    result = subprocess.run(
        [str(REPO / "scripts" / "two-hosts-demo"), *arguments],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [says], result.stderr
    assert result.stdout == "", result.stdout


def _process_tree(root: int) -> list[int]:
    """`root` and every process under it, as /proc shows them now."""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += [child for child, _state in processes_under(pid)]
    return tree


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), or None once it is gone or a
    zombie: the same PID with another start time is another process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else fields[19].decode()


def _running_tree(root: int) -> dict[int, str]:
    """pid -> start time of `root` and every live process under it."""
    found = {pid: _start_time(pid) for pid in _process_tree(root)}
    return {pid: start for pid, start in found.items() if start is not None}


def _command(pid: int) -> str:
    try:
        return f"{pid} " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"{pid} (gone)"


def test_bench_interrupted_stops_what_it_started_and_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    """Ctrl-C printed a KeyboardInterrupt traceback and exited by SIGINT; while it waited
    for a proxy's `listening` line, the proxy (in a session of its own, which the
    terminal's SIGINT never reaches) was left running. Here the "forkproxy" never says
    `listening`, and the whole process group gets SIGINT, as from a terminal."""
    missing = _missing_peers()
    if missing and os.geteuid() != 0:  # a missing peer fails, never skips
        pytest.fail(f"peers missing and not root: {', '.join(missing)} (run ./scripts/test)")
    started = tmp_path / "started"
    silent = tmp_path / "silent-forkproxy"
    silent.write_text(f'#!/bin/sh\necho $$ >{started}.tmp && mv {started}.tmp {started}\n'
                      "exec sleep 300\n")
    silent.chmod(0o755)
    argv = [str(REPO / "scripts" / "bench"), "--venv", sys.prefix, "--smoke",
            "--only", "rr", "--candidates", "forkproxy", "--forkproxy", str(silent),
            "--out", str(tmp_path / "out")]
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    ) as proc:
        tree: dict[int, str] = {}
        try:
            assert wait_for(started.exists, timeout=60), "the silent forkproxy never started"
            tree = _running_tree(proc.pid)
            silent_pid = int(started.read_text())
            assert silent_pid in tree, tree
            assert len(tree) >= 3, tree  # bench_run.py, redis-server, the silent forkproxy
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            for pid, start_time in tree.items():  # never leave them to the next test
                if _start_time(pid) == start_time:
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "scripts/bench: interrupted", err
    assert "Traceback" not in err, err
    assert out == "", out
    left = [_command(pid) for pid, start_time in tree.items() if _start_time(pid) == start_time]
    assert left == [], f"still running after the interrupt: {left}"


def test_demo_interrupted_while_starting_stops_there(tmp_path: Path) -> None:
    """A SIGINT to scripts/demo (`kill -INT`, or a Ctrl-C landing between two commands)
    ran its clean-up and then went on where it was: with redis stopped and its work
    directory gone, it said "demo: redis-server did not start" and exited 1."""
    for program in ("redis-server", "redis-cli"):
        if shutil.which(program) is None and os.geteuid() != 0:  # fails, never skips
            pytest.fail(f"{program} missing and not root (run ./scripts/test)")
    with subprocess.Popen(
        [str(REPO / "scripts" / "demo")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    ) as proc:
        tree: dict[int, str] = {}
        try:
            assert proc.stdout is not None
            seen = ""
            for line in proc.stdout:
                seen += line
                if line.startswith("== big-server: redis-server on "):
                    break
            else:
                pytest.fail(f"the demo stopped before starting redis-server:\n{seen}")
            tree = _running_tree(proc.pid)
            os.kill(proc.pid, signal.SIGINT)  # the shell alone: its trap does the rest
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            for pid, start_time in tree.items():
                if _start_time(pid) == start_time:
                    os.kill(pid, signal.SIGKILL)
    out = seen + out
    assert proc.returncode == 130, out
    assert "did not start" not in out, out
    assert out.rstrip().endswith("== stopping"), out
    left = [_command(pid) for pid, start_time in tree.items() if _start_time(pid) == start_time]
    assert left == [], f"still running after the interrupt: {left}"


# scripts/image-test's podman, for the tests of its tag: records each call, has the base
# image, and fails every build at once, so that nothing is built or tested for real.
FAKE_PODMAN = """#!/bin/sh
printf '%s\\n' "$*" >>"$FAKE_PODMAN_LOG"
case "$1" in
  image) [ "$2" = exists ] && exit 0 ;;
  images | rmi) exit 0 ;;
  build) echo "fake podman: builds nothing" >&2 ;;
esac
exit 1
"""
FAKE_HADOLINT = """#!/bin/sh
[ "$1" = --version ] && echo "Haskell Dockerfile Linter 2.15.1"
exit 0
"""


def _image_test_without_podman(
    tmp_path: Path, name: str, tag: str | None = None,
) -> tuple[subprocess.Popen[str], Path]:
    """scripts/image-test with FAKE_PODMAN, a hadolint that finds nothing and a cache of its
    own: it runs up to its build, which fails, and cleans up. -> (the run, podman's log)"""
    if os.geteuid() != 0:  # image-test needs root; fails, never skips
        pytest.fail("scripts/image-test runs as root (run ./scripts/test as root)")
    fake_bin = tmp_path / "bin"
    if not fake_bin.exists():
        fake_bin.mkdir()
        (fake_bin / "podman").write_text(FAKE_PODMAN)
        (fake_bin / "podman").chmod(0o755)
        hadolint = tmp_path / "cache" / "hadolint-venv" / "bin" / "hadolint"
        hadolint.parent.mkdir(parents=True)
        hadolint.write_text(FAKE_HADOLINT)
        hadolint.chmod(0o755)
    podman_log = tmp_path / f"{name}.podman"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}",
           "FORKPROXY_IMAGE_CACHE": str(tmp_path / "cache"), "FAKE_PODMAN_LOG": str(podman_log)}
    env.pop("FORKPROXY_IMAGE", None)
    if tag is not None:
        env["FORKPROXY_IMAGE"] = tag
    run = subprocess.Popen(
        [str(REPO / "scripts" / "image-test")], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    return run, podman_log


def _built_tag(podman_log: Path) -> str:
    calls = podman_log.read_text().splitlines()
    builds = [call.split() for call in calls if call.startswith("build ")]
    assert len(builds) == 1, calls
    return builds[0][builds[0].index("-t") + 1]


def test_image_test_runs_at_once_build_and_remove_each_its_own_image(tmp_path: Path) -> None:
    """Two image-test runs shared the tag localhost/forkproxy:image-test: the second's
    build moved it and removed the image the first had mounted and was testing."""
    runs = [_image_test_without_podman(tmp_path, name) for name in ("first", "second")]
    for run, podman_log in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 1, err  # the fake build failed
        assert "FAIL: podman build failed" in err, err
        assert out == "image: 1 passed, 1 failed\n", out  # hadolint's, the build
        tag = _built_tag(podman_log)
        assert tag == f"localhost/forkproxy:image-test-{run.pid}", tag
        calls = podman_log.read_text().splitlines()
        assert calls[-1] == f"rmi {tag}", calls  # removed at the end
        assert not [call for call in calls if call.startswith("rmi") and call != f"rmi {tag}"]


def test_image_test_keeps_a_tag_given_and_runs_given_it_take_turns(tmp_path: Path) -> None:
    """FORKPROXY_IMAGE names an image the user wants: built, kept; a second run given the
    same tag waits for the first instead of replacing its image under it."""
    tag = "localhost/forkproxy:given"
    lock_path = tmp_path / "cache" / "image.localhost_forkproxy_given.lock"
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "w") as held:  # another run, testing that image now
        fcntl.flock(held, fcntl.LOCK_EX)
        run, podman_log = _image_test_without_podman(tmp_path, "given", tag)
        assert run.stderr is not None
        seen = line = ""
        for line in run.stderr:
            seen += line
            if "waiting" in line:
                break
        assert line.endswith(f"another run is testing {tag}: waiting for it\n"), seen
        assert not [call for call in podman_log.read_text().splitlines()
                    if call.startswith("build")], "built while another run held the tag"
    out, err = run.communicate(timeout=120)  # its turn now
    assert run.returncode == 1, seen + err
    assert out == "image: 1 passed, 1 failed\n", out
    assert _built_tag(podman_log) == tag
    assert f"rmi {tag}" not in podman_log.read_text().splitlines()


@pytest.mark.parametrize(("script", "arguments", "environment", "status", "says"), [
    # pytest's collection of one file: ruff, mypy and the peers' check run first.
    ("test", ["--co", "-q", "tests/test_config.py"], {}, 0, "== pytest"),
    # an interpreter with no Python.h: the first thing it says, after ensure-peers
    ("test-floors", [], {"PYTHON": "/bin/false"}, 1,
     "test-floors: /bin/false has no Python.h (install its headers, e.g. python3-dev)"),
    ("bench", ["--help"], {}, 0, "usage: scripts/bench"),
    # fixed before (readlink -f), kept so: the repository's venv, not one beside the link
    ("ensure-venv", ["test"], {}, 0, ""),
])
def test_a_script_run_through_a_symlink_finds_its_repository(
    tmp_path: Path, script: str, arguments: list[str], environment: dict[str, str],
    status: int, says: str,
) -> None:
    """`ln -s .../scripts/test /usr/local/bin/fp-test; fp-test`: scripts/test and
    test-floors went to the symlink's directory's parent (`cd $(dirname $0)/..`) and
    failed with "scripts/ensure-peers: No such file or directory"; bench looked for
    bench_run.py there."""
    link = tmp_path / "bin" / f"fp-{script}"
    link.parent.mkdir()
    link.symlink_to(REPO / "scripts" / script)
    result = subprocess.run(
        [str(link), *arguments], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, check=False, env={**os.environ, **environment},
    )
    assert result.returncode == status, result
    output = result.stdout + result.stderr
    if says:
        assert any(line.startswith(says) for line in output.splitlines()), result
    else:
        assert output == "", result  # the repository's venv: nothing to do
    assert not (tmp_path / ".venv").exists()


# A project for scripts/ensure-venv to install with no index (PIP_NO_INDEX): its build
# backend is in the tree and needs nothing, and it makes one empty wheel.
PROBE_PYPROJECT = """\
[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]

[project]
name = "fpvenvprobe"
version = "0"
"""
PROBE_BACKEND = '''\
import base64
import hashlib
import zipfile

DIST = "fpvenvprobe-0.dist-info"
FILES = {
    f"{DIST}/METADATA": "Metadata-Version: 2.1\\nName: fpvenvprobe\\nVersion: 0\\n",
    f"{DIST}/WHEEL": "Wheel-Version: 1.0\\nGenerator: probe\\nRoot-Is-Purelib: true\\n"
    "Tag: py3-none-any\\n",
}


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = "fpvenvprobe-0-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(f"{wheel_directory}/{name}", "w") as wheel:
        for path, text in FILES.items():
            data = text.encode()
            wheel.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{path},sha256={digest.decode()},{len(data)}")
        wheel.writestr(f"{DIST}/RECORD", "\\n".join([*record, f"{DIST}/RECORD,,"]) + "\\n")
    return name


build_editable = build_wheel
'''


def _real_interpreter(python: str) -> str | None:
    """The file `python` runs, when it is a Python >= 3.11 with venv and ensurepip."""
    try:
        done = subprocess.run(
            [python, "-c", "import ensurepip, os, sys, venv\n"
             "assert sys.version_info >= (3, 11)\nprint(os.path.realpath(sys.executable))"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _two_interpreters() -> tuple[str, str]:
    """This test run's interpreter and another one on this machine (its file)."""
    ours = _real_interpreter(sys.executable)
    assert ours is not None
    candidates = [shutil.which(f"python3.{minor}") for minor in range(11, 20)]
    candidates += sorted(str(p) for p in Path("/usr/bin").glob("python3.[0-9]*"))
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.*/bin/python3"))
    for candidate in candidates:
        other = _real_interpreter(candidate) if candidate else None
        if other is not None and other != ours:
            return ours, other
    pytest.fail(f"no Python >= 3.11 with venv beside {ours} on this machine")


def _version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import sys; print(sys.version)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_ensure_venv_makes_the_venv_again_for_the_python_asked(tmp_path: Path) -> None:
    """`PYTHON=python3.12 scripts/ensure-venv` on a venv made with 3.11 kept it without a
    word: everything after ran 3.11."""
    first, second = _two_interpreters()
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "ensure-venv", repo / "scripts" / "ensure-venv")
    (repo / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (repo / "backend.py").write_text(PROBE_BACKEND)
    venv_python = repo / ".venv" / "bin" / "python"

    def ensure_venv(python: str | None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PIP_NO_INDEX": "1"}
        env.pop("PYTHON", None)
        if python is not None:
            env["PYTHON"] = python
        return subprocess.run([str(repo / "scripts" / "ensure-venv")], env=env,
                              capture_output=True, text=True, timeout=240, check=False)

    made = ensure_venv(first)
    assert made.returncode == 0, made
    first_version = _version(venv_python)
    assert first_version == _version(Path(first))

    again = ensure_venv(second)
    assert again.returncode == 0, again
    assert again.stderr.splitlines() == [
        f"ensure-venv: .venv runs {first}: making it again with {second}"], again.stderr
    assert _version(venv_python) == _version(Path(second)) != first_version
    assert subprocess.run([str(venv_python), "-m", "pip", "show", "-q", "fpvenvprobe"],
                          capture_output=True, check=False).returncode == 0, "not installed again"

    # The same interpreter again, or none named: kept as it is, nothing said.
    for python in (second, None):
        kept = ensure_venv(python)
        assert (kept.returncode, kept.stdout, kept.stderr) == (0, "", ""), kept
        assert _version(venv_python) == _version(Path(second))

    bad = ensure_venv("python3-that-is-not-here")
    assert bad.returncode == 2, bad
    assert bad.stderr.splitlines() == ["ensure-venv: PYTHON=python3-that-is-not-here does not"
                                       " run (want a Python 3 interpreter)"], bad.stderr
    assert _version(venv_python) == _version(Path(second))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("proxy", ["forkproxy", "socat", "haproxy"])
def test_scale_conns_measures_each_proxy_with_connections_held(proxy: str) -> None:
    """scripts/scale_conns.py (docs/benchmarks.md, "Many live connections"), run for real
    with a few connections: a row per count, then the reap and the churn. What it asserts
    of the proxies is what holds at any count: no descriptor per child in forkproxy's
    supervisor (nor in socat's), every child of the clients that closed reaped and none
    left a zombie, `status` listing exactly the live ones, and no connection failed."""
    if proxy != "forkproxy":
        need(proxy)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "scale_conns.py"), "--proxy", proxy,
         "--levels", "0,30", "--rest", "0.5", "--probes", "5", "--reap", "20",
         "--churn", "1"],
        capture_output=True, text=True, timeout=100, check=False,
    )
    assert result.returncode == 0, result
    assert result.stderr == "", result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row.get("n") for row in rows[:2]] == [0, 30], rows
    if proxy != "haproxy":  # its one process holds both sockets of each connection
        assert rows[0]["fds"] == rows[1]["fds"], rows
    for row in rows[:2]:
        assert row["rss_kib"] > 0 and len(row["ttfb_ms"]) == 2, row
        if proxy == "forkproxy":
            assert all(row[key][1] > 0 for key in ("status", "status_json", "check", "metrics"))
    churn = rows[-1]
    assert churn["connections"] > 0 and churn["errors"] == 0, churn
    if proxy == "haproxy":  # no child to reap: no reap row
        assert len(rows) == 3, rows
        return
    reap = rows[2]
    assert reap["closed"] == reap["reaped"] == 20 and reap["zombies"] == 0, reap
    if proxy == "forkproxy":
        assert reap["status_children"] == reap["expected"] == 10, reap


def test_scale_conns_refuses_a_bad_level_before_starting_anything() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "scale_conns.py"), "--levels", "40,10"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines()[-1] == (
        "scale_conns.py: error: argument --levels: wants counts that rise from 0 up, "
        "not '40,10'"), result.stderr
    assert result.stdout == "", result.stdout


@pytest.mark.parametrize(("option", "value", "wanted"), [
    ("--rest", "0", "wants seconds above 0"),
    ("--probes", "0", "wants a count of 1 or more"),
    ("--reap", "-5", "wants a count of 0 or more"),
    ("--churn", "-1", "wants seconds of 0 or more"),
])
def test_scale_conns_refuses_a_bad_option_before_starting_anything(
    option: str, value: str, wanted: str
) -> None:
    """`--rest 0` divided by zero and `--probes 0` took the median of nothing, each a
    traceback once thousands of connections were open; `--reap -5` closed all but 5 of
    them. Refused at once now, naming the option, as `--levels` is."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "scale_conns.py"), "--levels", "0",
         option, value],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines()[-1] == (
        f"scale_conns.py: error: argument {option}: {wanted}, not {value!r}"), result.stderr
    assert result.stdout == "", result.stdout


def _instr_per_conn() -> types.ModuleType:
    """scripts/instr_per_conn.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        "instr_per_conn", REPO / "scripts" / "instr_per_conn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _traced(work: Path, pid: int, parent: int, parts: dict[int | None, int]) -> None:
    """Write what valgrind leaves of one process: its log, and a callgrind file per dump
    (`None`: the last one, at exit, which has no number)."""
    work.mkdir(exist_ok=True)
    (work / f"vg.{pid}").write_text(f"=={pid}== Command: python _serve.py\n"
                                    f"=={pid}== Parent PID: {parent}\n")
    for number, instructions in parts.items():
        name = f"cg.{pid}" if number is None else f"cg.{pid}.{number}"
        (work / name).write_text(f"events: Ir\nsummary: {instructions}\n")


def test_instr_per_conn_finds_the_supervisor_and_the_last_child_after_pids_wrap(
    tmp_path: Path,
) -> None:
    """It took the smallest pid for the supervisor's and the largest for the persistent
    child's: once the machine's pids wrapped around (pid_max 32768 here, other work
    forking meanwhile) the smallest was a child's, and the run failed with
    `statistics.StatisticsError: no median for empty data` after its ~80 s. Now each is
    found by its parent, and the children ordered as they were forked."""
    script = _instr_per_conn()
    load, idle = tmp_path / "load", tmp_path / "idle"
    supervisor, conns, pings = 32700, 4, 11
    _traced(load, supervisor, 99, {1: 9_000_000, **{n: 62_000 + n for n in range(2, 6)},
                                   None: 5_000})
    for pid in (32766, 32767, 300, 301):  # one PING each; the pids wrapped between them
        _traced(load, pid, supervisor, {1: 700, None: 79_000})
    _traced(load, 302, supervisor, {1: 700, None: 79_000 + 18_900 * (pings - 1)})
    _traced(idle, 32000, 99, {None: 9_000_000})
    numbers = script.summary(script.dumps(load), script.parents(load), script.dumps(idle),
                             script.parents(idle), conns, pings, 32768)
    assert numbers["children"] == 5, numbers
    assert numbers["sup_instr_per_conn"] == 62_003.5, numbers
    assert numbers["child_instr_per_conn"] == 79_000, numbers
    assert numbers["rr_instr_per_request"] == 18_900, numbers


def test_instr_per_conn_says_when_a_run_left_too_little_to_measure(tmp_path: Path) -> None:
    """A supervisor that dumped no part between its start and its stop (no connection got
    through) is said in one line, not `no median for empty data`."""
    script = _instr_per_conn()
    load, idle = tmp_path / "load", tmp_path / "idle"
    _traced(load, 500, 99, {1: 9_000_000, None: 5_000})
    _traced(idle, 400, 99, {None: 9_000_000})
    with pytest.raises(SystemExit) as exit_:
        script.summary(script.dumps(load), script.parents(load), script.dumps(idle),
                       script.parents(idle), 4, 11, 32768)
    assert str(exit_.value) == (
        "instr_per_conn.py: the supervisor (pid 500) dumped 2 parts and 0 children were "
        "traced, for 4 connections and a persistent one: too few to measure (see the vg.* "
        "logs: --keep DIR)")
