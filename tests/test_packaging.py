"""forkproxy as a user gets it, not as the repository runs it: the wheel built from this
tree (only the files the sdist and the image's build context carry), installed with pip
into a venv of its own, used from a directory outside any checkout; and the image's
labels. The suite's own venv is an editable install of the checkout, which would hide a
module left out of the wheel or code that opens a file only a checkout has.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tomllib
import urllib.request
import zipfile
from email.message import Message
from pathlib import Path

import pytest

import forkproxy

from conftest import Redis, need, read_lines

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "forkproxy"
# What a build needs and gets, as the Dockerfile's build context (.dockerignore) has it.
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")
DIST_INFO = f"forkproxy-{forkproxy.__version__}.dist-info"


def pip(python: Path, *args: str, timeout: float = 240) -> None:
    """`python -m pip ARGS`; its output in the failure, the index's location noise aside."""
    done = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from a copy of the build files (a build in the checkout would
    leave build/ and *.egg-info in it, and pick up what lies there untracked)."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / "forkproxy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
    out = tmp_path_factory.mktemp("wheel")
    pip(Path(sys.executable), "wheel", "--no-deps", "--wheel-dir", str(out), str(source))
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and its dependencies, no extra: its bin/ directory."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True,
                   timeout=120)
    pip(venv / "bin" / "python", "install", str(wheel))
    return venv / "bin"


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist `python -m build --sdist` makes from a fresh clone: the tracked files
    (a build in the checkout would pick up what lies there untracked), built by
    pyproject's build backend in a venv with its build requirements alone."""
    source = tmp_path_factory.mktemp("checkout")
    tracked = subprocess.run([need("git"), "-C", str(REPO), "ls-files", "-z"],
                             capture_output=True, check=True, timeout=60).stdout
    for name in filter(None, os.fsdecode(tracked).split("\0")):
        if (REPO / name).is_file():  # a file deleted and not yet committed: not there
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    system = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    venv = tmp_path_factory.mktemp("builder")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    pip(python, "install", *system["requires"])
    out = tmp_path_factory.mktemp("sdist")
    module, _, attribute = system["build-backend"].partition(":")
    assert not attribute, system["build-backend"]
    built = subprocess.run(
        [str(python), "-c", f"import sys, {module} as backend; "
                            "print(backend.build_sdist(sys.argv[1]))", str(out)],
        cwd=source, capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stdout + built.stderr
    return out / built.stdout.splitlines()[-1]


def test_sdist_holds_what_its_documents_link_to(sdist: Path) -> None:
    """README links docs/ and examples/ and names CHANGELOG.md: an sdist without them
    showed README (an index, a mirror, the unpacked source) with links to nothing."""
    with tarfile.open(sdist) as archive:
        top = f"forkproxy-{forkproxy.__version__}/"
        names = {member.name.removeprefix(top) for member in archive.getmembers()
                 if member.isfile()}
        documents = {name: archive.extractfile(top + name).read().decode()  # type: ignore[union-attr]
                     for name in names if name.endswith(".md")}
    assert {"README.md", "CHANGELOG.md", "docs/benchmarks.md", "docs/wire.md",
            "examples/docker-compose.yml", "LICENSE"} <= names, sorted(names)
    # Each relative link of each document shipped leads to a file shipped.
    links = {(name, os.path.normpath(os.path.join(os.path.dirname(name), target)))
             for name, text in documents.items()
             for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
             if not re.match(r"[a-z][a-z0-9+.-]*:", target)}
    assert links, "no relative link found: the pattern above no longer matches"
    assert {(name, target) for name, target in links if target not in names} == set()
    # Still no test: they run from a checkout (MANIFEST.in says why).
    assert not any(name.startswith("tests/") for name in names), sorted(names)


def metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(f"{DIST_INFO}/METADATA").decode()
    return email.parser.HeaderParser().parsestr(text)


def test_wheel_holds_every_module_and_nothing_else(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    package = {f"forkproxy/{path.name}" for path in PACKAGE.iterdir()
               if path.suffix == ".py" or path.name == "py.typed"}
    # Every module the checkout has (the supervisor execs _serve.py and the metrics
    # process _metrics_main.py by path: a missing one fails only at `serve`), py.typed
    # for the annotations, the license, and no test, cache or doc.
    assert {name for name in names if not name.startswith(DIST_INFO)} == package
    assert f"{DIST_INFO}/licenses/LICENSE" in names
    with zipfile.ZipFile(wheel) as archive:
        points = archive.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert "forkproxy = forkproxy.console:main" in points.splitlines()


def test_wheel_metadata(wheel: Path) -> None:
    found = metadata(wheel)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert found["Version"] == forkproxy.__version__
    assert found["Requires-Python"] == project["requires-python"]
    assert found["License-Expression"] == "MIT"
    # Linux only (splice, sock_diag, /proc): said where pip and an index show it.
    classifiers = found.get_all("Classifier") or []
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Typing :: Typed" in classifiers
    # The README is the long description, whole.
    assert found["Description-Content-Type"] == "text/markdown"
    description = found.get_payload()
    assert isinstance(description, str) and description.startswith("# forkproxy\n")
    requires = found.get_all("Requires-Dist") or []
    assert sorted(r for r in requires if "extra ==" not in r) == sorted(
        r.replace(" ", "") for r in project["dependencies"])
    assert sorted(found.get_all("Provides-Extra") or []) == ["bench", "test"]


def test_dockerfile_labels_name_this_version() -> None:
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"',
                             (REPO / "Dockerfile").read_text()))
    assert labels["org.opencontainers.image.version"] == forkproxy.__version__
    assert labels["org.opencontainers.image.licenses"] == "MIT"


@pytest.fixture
def elsewhere(tmp_path: Path) -> dict[str, str]:
    """An environment with no trace of the checkout or the suite's venv."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(sys.executable).parent)
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    return env


def test_installed_wheel_serves_outside_a_checkout(
        installed: Path, elsewhere: dict[str, str], redis: Redis, tmp_path: Path) -> None:
    command = str(installed / "forkproxy")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=tmp_path, env=elsewhere, capture_output=True,
                              text=True, timeout=60)

    assert run(command, "--version").stdout == f"forkproxy {forkproxy.__version__}\n"
    module = run(str(installed / "python"), "-m", "forkproxy", "--version")
    assert module.stdout == f"forkproxy {forkproxy.__version__}\n", module.stderr

    sock = tmp_path / "s.sock"
    with subprocess.Popen(
        [command, "serve", f"127.0.0.1:0=127.0.0.1:{redis.port}", "--status-socket",
         str(sock), "--metrics", "127.0.0.1:0"],
        cwd=tmp_path, env=elsewhere, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            lines = read_lines(proc, 2, timeout=30)
            assert lines[0].startswith("listening 127.0.0.1:"), lines
            port = int(lines[0].split()[1].rsplit(":", 1)[1])
            assert lines[1].startswith("metrics http://127.0.0.1:"), lines
            # The supervisor execs _serve.py by path: the wheel's, not the checkout's.
            with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
            script = Path(os.fsdecode(next(a for a in argv if a.endswith(b"_serve.py"))))
            assert script.is_relative_to(installed.parent), argv
            assert redis.cli("PING", port=port) == "PONG"
            env = dict(elsewhere, FORKPROXY_STATUS_SOCKET=str(sock))
            check = subprocess.run([command, "check"], cwd=tmp_path, env=env,
                                   capture_output=True, text=True, timeout=60)
            assert check.returncode == 0, check.stdout + check.stderr
            status = subprocess.run([command, "status", "--json"], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=60)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["version"] == forkproxy.__version__
            with urllib.request.urlopen(lines[1].split()[1], timeout=30) as response:
                scraped = response.read().decode()
            assert re.search(r"^forkproxy_connections_total\{[^}]*\} 1(\.0)?$", scraped,
                             re.MULTILINE), scraped[:2000]
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
