"""The `forkproxy` command's entry point, small enough to run before anything is imported.

Standard descriptors closed for us are reopened on /dev/null first (fill_closed_std_fds).
`forkproxy serve` blocks the signals the supervisor handles first thing, and the
supervisor unblocks them once its handlers are in place (signals.SignalPipe): in between,
~0.2 s of imports, validation and exec, a signal waits pending instead of killing a
starting proxy (the default action of SIGHUP and SIGALRM) or being dropped (PID 1 ignores
every signal it has no handler for: a `docker stop` right after `docker run` waited for
the SIGKILL).
A blocked mask and pending signals survive exec.

A bare `check`, `status` or `status --json` runs here without the CLI (lean): typer
imports click, pydantic and rich, ~20 MiB charged to a container's memory limit for every
HEALTHCHECK and `docker exec ... forkproxy status`, which the OOM killer took from the
connections. The same functions (status.run_check, run_status) say the same lines with
the same exit status. Any other input, or a FORKPROXY_STATUS_SOCKET the CLI would refuse,
goes to the CLI before anything is asked, so that its errors stay its own and no request
is ever sent twice.
"""

from __future__ import annotations

import os
import signal
import sys

TYPE_CHECKING = False  # not typing's: `serve` imports nothing it does not need
if TYPE_CHECKING:
    from typing import NoReturn, TextIO

STARTUP_BLOCKED = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM
)
LEAN = (["check"], ["status"], ["status", "--json"])  # the whole argv after `forkproxy`
# A dependency missing (`pip install --no-deps`, one uninstalled since): as cli.EXEC_FAILED
# (not imported: cli.py is typer's, which may be the module missing), the status a shell
# gives a command it found but could not run. Not 2: the input is not at fault, and
# scripts read 2 as a usage error.
MISSING_DEPENDENCY = 126


def main() -> None:
    """`forkproxy ARGS`. A module forkproxy needs that is not installed, or does not load,
    ends it in one line that names it and says what to do, not in a traceback."""
    try:
        run()
    except ModuleNotFoundError as exc:
        if "." in (exc.name or ""):
            # A module of a package that is there (its parent imported): a file gone from
            # an installed dependency (a slimmed image, a copy cut short), which a plain
            # `pip install` finds "already satisfied": reinstalled, as one that does not load.
            _not_loading(exc)
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing == "forkproxy" or missing in sys.stdlib_module_names:
            raise  # no dependency's absence: a bug, whose traceback is needed
        say(f"forkproxy: error: cannot import {missing}: forkproxy's dependencies are not "
            f"all installed for {sys.executable} (a `pip install --no-deps`?); install them: "
            f"{install_dependencies()}")
        sys.exit(MISSING_DEPENDENCY)
    except ImportError as exc:
        _not_loading(exc)


def _not_loading(exc: ImportError) -> NoReturn:
    """Installed but not loadable: a compiled part built for another Python, libc or
    machine (a venv copied into another image), or a file cut short. The loader's words
    say which; a plain `pip install` would find it "already satisfied"."""
    broken = _top_module(exc)
    if not broken or broken == "forkproxy" or broken in sys.stdlib_module_names:
        raise exc
    say(f"forkproxy: error: cannot import {broken}: {' '.join(str(exc).split())}: installed "
        f"for {sys.executable} but it does not load; reinstall forkproxy's dependencies: "
        f"{install_dependencies(reinstall=True)}")
    sys.exit(MISSING_DEPENDENCY)


def _top_module(exc: ImportError) -> str:
    """The top-level module a failed import belongs to: by the file the loader refused
    (an extension's ImportError names only its own short name, `_psutil_linux`), the
    outermost package folder holding it, up to a sys.path entry; else by the name it
    gives. Not by the path below a sys.path entry: an editable install's finder serves a
    package from a folder on none, and one above it (`python -m` from there) named the
    checkout's folder, blaming forkproxy's own module on a dependency."""
    if not exc.path:
        return (exc.name or "").partition(".")[0]
    entries = {os.path.normpath(entry) for entry in sys.path if entry}
    folder, top = os.path.split(exc.path)
    while top and folder not in entries and os.path.isfile(os.path.join(folder, "__init__.py")):
        folder, top = os.path.split(folder)
    return top.partition(".")[0]


def install_dependencies(reinstall: bool = False) -> str:
    """The command that installs forkproxy's dependencies for this interpreter: its own
    pip, given the requirements forkproxy was installed with (its metadata's, those of no
    extra), whose own dependencies pip installs too. It said `pip install forkproxy`:
    forkproxy is installed from a checkout, and no package of that name is on PyPI (pip
    finds none), nor is a bare `pip` always this interpreter's."""
    import shlex
    from importlib.metadata import PackageNotFoundError, requires

    try:
        wanted = [requirement for requirement in requires("forkproxy") or ()
                  if "extra ==" not in requirement.partition(";")[2]]
    except PackageNotFoundError:  # run from a checkout's directory, never installed
        wanted = []
    if not wanted:
        return "install forkproxy again" + ("" if reinstall else ", without --no-deps")
    return shlex.join([sys.executable, "-m", "pip", "install",
                       *(["--force-reinstall"] if reinstall else []), *wanted])


def run() -> None:
    fill_closed_std_fds()  # first: before this process opens a file that must not be 0-2
    if sys.argv[1:2] == ["serve"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_BLOCKED)
        # And the ones no process of forkproxy's heeds (signals.IGNORED): ignored from here
        # on, through the exec, rather than from the supervisor's start, ~0.3 s later.
        from forkproxy.signals import IGNORED

        for signum in IGNORED:
            signal.signal(signum, signal.SIG_IGN)
    elif sys.argv[1:] in LEAN:
        code = lean(sys.argv[1:])
        if code is not None:
            sys.exit(code)
    from forkproxy.cli import main as cli_main

    cli_main()


def lean(args: list[str]) -> int | None:
    """Run `args` (one of LEAN) without the CLI: its exit status, or None, having asked
    nothing, when FORKPROXY_STATUS_SOCKET is one the CLI would refuse (or empty, which
    click reads as unset): the CLI then says what it says about it."""
    path = os.environ.get("FORKPROXY_STATUS_SOCKET")
    if path == "":
        return None
    if path is not None:
        if path[:1] in ("'", '"') or path[-1:] in ("'", '"'):
            # In quotes (kept by whoever set it): the CLI says to remove them where no
            # file has that name (cli._client_socket).
            return None
        from forkproxy.control import check_client_path

        try:
            check_client_path(path)
        except Exception:  # whatever it is, the CLI says it (cli._client_socket)
            return None
    from forkproxy import status

    # As cli.main: output that cannot be written is one line and exit 1; ^C is 130.
    try:
        if args == ["check"]:
            code = status.run_check(path, output, say)
        else:
            code = status.run_status(path, args == ["status", "--json"], output, say)
        flush(sys.stdout)
    except KeyboardInterrupt:
        return 130
    except OutputError as exc:
        return cannot_write(exc)
    except OSError as exc:
        return unexpected(exc)
    return code


def output(text: str) -> None:
    """A line (or lines) on stdout, as cli.output writes them (write_line)."""
    write_line(sys.stdout, text)


def say(text: str) -> None:
    """A line (or lines) on stderr, as cli.say writes them."""
    write_line(sys.stderr, text)


def write_line(stream: TextIO, text: str) -> None:
    """`text` and a newline on `stream`, all of it: every command's output and messages
    (here and cli.output, cli.say) go through this one writer.

    A stream whose file is non-blocking (O_NONBLOCK, set on the pipe by its reader: node,
    some CI runners, `| pv -L`) and full refused the rest with EAGAIN, which Python's
    buffered writer lost: `status --json` was cut at 64 KiB, invalid JSON, `links` at 900
    lines of 3000, with exit 0 and no word. Room is waited for in poll() now, as a blocking
    write waits (serve's `listening` lines wait so too: Supervisor._print_ready). A reader
    gone (EPIPE) is no error: see cli.output.
    """
    try:
        _write_all(stream, text + "\n")
    except BrokenPipeError:
        to_devnull(stream)
    except OSError as exc:
        raise OutputError(exc.errno, exc.strerror) from exc


class OutputError(OSError):
    """stdout or stderr refused a write (a full disk, /dev/full): the one OSError that
    cannot_write names as the output's. Any other is said as what it is (unexpected)."""


def flush(stream: TextIO) -> None:
    """`stream.flush()`, whose failure is the output's (OutputError)."""
    try:
        stream.flush()
    except OSError as exc:
        raise OutputError(exc.errno, exc.strerror) from exc


def _write_all(stream: TextIO, text: str) -> None:
    """`text` on `stream`'s file, past the stream's buffer (whose own write loses what a
    non-blocking file refuses), waiting for room whenever the file has none."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # no file under it (a test runner's StringIO): its own write
        stream.write(text)
        stream.flush()
        return
    while True:  # first what the stream holds of earlier writes, kept on EAGAIN
        try:
            stream.flush()
            break
        except BlockingIOError:
            _wait_for_room(fd)
    data = text.encode(stream.encoding or "utf-8", stream.errors or "strict")
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            _wait_for_room(fd)


def _wait_for_room(fd: int) -> None:
    """Until `fd` takes a write (or has no reader any more: the write then says EPIPE).
    No timeout, as a blocking write has none; ^C still ends it (KeyboardInterrupt)."""
    import select  # only here: a full non-blocking stdout is rare, serve's start is lean

    room = select.poll()
    room.register(fd, select.POLLOUT)
    room.poll()


def to_devnull(stream: TextIO) -> None:
    """What `stream` still buffers, and any later line, goes nowhere: Python's flush at
    exit would fail again (a traceback-like "Exception ignored" and status 120), as its
    docs say for EPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def cannot_write(exc: OSError) -> int:
    """Output that could not be written (stdout on /dev/full, a full disk): one line, as
    for any other failure, not a traceback; the exit status, 1."""
    try:
        say(f"forkproxy: error: cannot write: {exc.strerror or exc}")
    except OSError:
        pass  # stderr too: nothing left to tell it with
    to_devnull(sys.stdout)
    return 1


def unexpected(exc: OSError) -> int:
    """An OSError that no code on its way handled (a system call failing where none was
    expected to: a sandbox's refusal, a resource limit): one line saying what failed and
    where, not a traceback, nor "cannot write", which sent operators to stdout and the
    disk. The exit status, 1: the input is not known to be at fault."""
    import errno  # only here: the lean path imports nothing it does not need

    where = exc.__traceback__
    own = None  # the innermost frame of forkproxy's own: the call it made that failed
    while where is not None:
        if where.tb_frame.f_globals.get("__name__", "").startswith("forkproxy"):
            own = where
        if where.tb_next is None:
            break
        where = where.tb_next
    place = own or where
    site = ""
    if place is not None:
        code = place.tb_frame.f_code
        site = f" in {code.co_name} ({os.path.basename(code.co_filename)}:{place.tb_lineno})"
    name = errno.errorcode.get(exc.errno or 0)
    what = f"{exc.strerror or exc}{f' ({name})' if name else ''}"
    if exc.filename is not None:
        what += f": {exc.filename!r}"
    try:
        say(f"forkproxy: error: a system call failed{site}: {what}")
    except OSError:
        pass  # stderr refused it: nothing left to tell it with
    return 1


def fill_closed_std_fds() -> None:
    """Open /dev/null on whichever of fds 0-2 was closed for us (`>&-`), as daemons do.

    Otherwise the next file opened takes that number: serve's config memfd, then in the
    supervisor a listener or a client's socket, and the `listening` lines or the log
    would be written into it.
    """
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            # fd itself is the lowest free number (those below are open by now); made
            # inheritable, unlike os.open's default, so that it outlives serve's exec.
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)
        if getattr(sys, name) is None:
            # Closed when Python started, it made sys.stdout None: a command's output,
            # or its flush, would end in a traceback. Now a file on /dev/null, open for
            # the process's life. Its encoding is the one open() picks unasked, named:
            # unnamed, it was an EncodingWarning under -X warn_default_encoding.
            stream = open(fd, "r" if fd == 0 else "w", encoding="locale",  # noqa: SIM115
                          closefd=False)
            setattr(sys, name, stream)
