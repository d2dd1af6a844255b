"""Command line: argv and environment -> configuration -> the lean supervisor.

Each command forwards to a plain function (serve, load, status.run_status, ...); the one
domain error, ConfigError, becomes exit status 2 and one line on stderr here (fail), and
in _serve.main for what the supervisor finds at start (a port taken, a pid file).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, NoReturn

import typer

from . import __version__, cgroup, control, installed
from ._metrics_main import IMPORT_PATH_VARIABLE, import_path_to_hand
from .config import (
    ANY_IPV4,
    DEFAULT_MAX_CHILDREN,
    ONE_BIND,
    ONE_METRICS,
    UNLOGGED_FILE_OPTIONS,
    UNLOGGED_UNKNOWN,
    ConfigError,
    LinkTable,
    Options,
    Sources,
    and_list,
    check_options,
    check_pid_file_path,
    derived_max_children,
    name_variable,
    parse_aliases,
    parse_count,
    parse_keepalive,
    parse_link_bind,
    parse_seconds,
    printable,
    quoted,
    quotes_kept,
    sources_to_json,
    typographic_option,
    unknown_lines,
    unknown_variables,
)
from .console import OutputError, cannot_write, flush, unexpected, write_line
from .listeners import zone_scope
from .log import write_start_error
from .supervisor import read_links

EXEC_FAILED = 126  # exit status when serve cannot exec the supervisor (README, "Exit status")


def _show_help(ctx: Any, _param: Any, value: bool) -> None:
    """click's --help, written by output(): its reader gone (`forkproxy --help | true`) is
    no error, as for every command's output. click's own callback lets the BrokenPipeError
    through to its main(), which exits 1 with no word, before forkproxy's main() sees it."""
    if value and not ctx.resilient_parsing:
        output(ctx.get_help())
        ctx.exit()


def _help_by_output(option: Any) -> Any:
    """`option`, click's --help (or None: none), with _show_help as its callback. The
    option is click's, built (and cached, in click 8.2 on) by get_help_option."""
    if option is not None:
        option.callback = _show_help
    return option


def _commands_with(group: Any, option: str | None, besides: str | None = None) -> list[str]:
    """The names of `group`'s commands (but `besides`) that take `option`, sorted."""
    return sorted(name for name, command in getattr(group, "commands", {}).items()
                  if option and name != besides
                  and any(option in param.opts for param in command.params))


def _option_names(command: Any, ctx: Any) -> set[str]:
    """Every name of `command`'s options, --help's included."""
    return {name for param in command.get_params(ctx)
            if param.param_type_name == "option" for name in param.opts}


class _Group(typer.core.TyperGroup):
    """The top level: `forkproxy [--version] COMMAND`; its --help as _show_help writes it."""

    def get_help_option(self, ctx: Any) -> Any:
        return _help_by_output(super().get_help_option(ctx))

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        # Here, before the command is looked up: `--version serve` would otherwise run
        # root() for serve, and `--version junk` be "No such command" with no word of
        # --version. ctx.params holds the root's options by now.
        if ctx.params.get("version"):
            ctx.fail(f"--version takes no command or argument: got {quoted(args[0])}")
        # An option of a command, typed before any (`forkproxy —from-env`): said whose.
        dash = typographic_option(
            args[0], _option_names(self, ctx),
            owners=lambda option: _commands_with(self, option)) if args else None
        if dash is not None:  # `forkproxy —version`: "No such command"
            ctx.fail(f"{quoted(args[0])}: {dash}")
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    help="A forking TCP proxy for the Docker ambassador pattern (socat fork, grown up).",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Options whose repetition would drop what was given before without a word (click keeps
# the last value of an option given twice), where a second one reads as "and this one
# too": what the error says instead. Other options keep click's last-one-wins, which
# wrappers that append an override to a default command line rely on.
ONE_ONLY = {
    # `docker run` takes it so (reading both): b's links alone were served.
    "--env-file": "forkproxy reads one env file (docker run reads every --env-file "
                  "given): put the link variables in one file",
    # Listeners on 127.0.0.1 and ::1 looked asked for; only ::1 was bound.
    "--bind": ONE_BIND,
    # Two scrape ports looked asked for; only the last listened.
    "--metrics": ONE_METRICS,
}


# ctx.meta's key for what serve says of its command line as a configuration error, a
# `start-failed` record under --log-format json (_Command.parse_args): an option given
# twice, a SPEC typed as an option with typographic dashes.
START_ERROR = "forkproxy.start_error"


# difflib.get_close_matches' cutoff, which click uses: the same bar, without the dashes.
CLOSE_OPTION = 0.6


def _close_options(option: str, possibilities: Sequence[str]) -> list[str]:
    """Those of click's suggestions for `option` still alike without the leading dashes.
    click's difflib compares `--bogus` with `--verbose` dashes and all, and the two
    dashes every long option shares made it "Possible options: --verbose"; without them
    a typo (`--verbos`, `--max-child`) keeps its suggestion and an unrelated word gets
    none. So does an option cut short (`--tak`, `--gr`): too short to be alike without
    the dashes, it is the start of the one meant. Only a subset: the dashes only ever
    raise the likeness. A word typed that is a whole word of some options (`--retries`,
    `--timeout`) suggests those alone: `--metrics` is alike to `retries` by its letters,
    not by what it does."""
    from difflib import SequenceMatcher  # click's parser imports it for the same error

    typed = option.lstrip("-")
    worded = [name for name in possibilities if typed in name.lstrip("-").split("-")]
    if worded:
        return worded
    return [name for name in possibilities
            if (typed and name.lstrip("-").startswith(typed))
            or SequenceMatcher(None, typed, name.lstrip("-")).ratio() >= CLOSE_OPTION]


class _Command(typer.core.TyperCommand):
    """A command whose --help names each argument by its metavar, as click writes it
    (`SPEC...`: `...` when several may be given). typer (0.2x) writes the Python type of
    the annotation after it, `SPEC <list[str]>`, whatever the metavar: words from the
    code, not the command line's. Options show their metavar already.
    The usage line is written here too: typer below 0.16 wrote it `SPEC`, not `[SPEC]...`.
    Every command is one (those without arguments get click's help unchanged), for --help
    as _show_help writes it."""

    def get_help_option(self, ctx: Any) -> Any:
        return _help_by_output(super().get_help_option(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        logs = any(param.name == "log_format" for param in self.params)
        twice = self._given_twice(args)
        if twice is not None:
            message = f"{twice} given twice: {ONE_ONLY[twice]}"
            if not logs:
                ctx.fail(message)
            # serve's is a configuration error like any other: with --log-format json its
            # line is a `start-failed` record (fail()), not plain text in a JSON log. The
            # format is not parsed yet: serve_command raises it before judging any value
            # (a usage error, plain text as documented, still comes first).
            ctx.meta[START_ERROR] = message
        dash = self._typographic_option(ctx, args)
        if dash is not None:
            # serve's SPEC (`serve —from-env`) was a bad SPEC, a `start-failed` record
            # under --log-format json, before the hint moved here: it still is.
            if not (logs and dash.startswith("SPEC ")):
                ctx.fail(dash)
            ctx.meta.setdefault(START_ERROR, dash)
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            # `forkproxy serve --version`: click suggested the nearest option of the
            # command ("Possible options: --verbose", or --json), which is not what was
            # meant. --version is the top level's: say where it goes. Recognised by what
            # click's NoSuchOption carries, as main() does usage errors.
            if (getattr(exc, "option_name", None) == "--version"
                    and hasattr(exc, "possibilities") and hasattr(exc, "message")):
                exc.possibilities = None
                exc.message = ("No such option: --version (it goes before the command: "
                               "forkproxy --version)")
            elif hasattr(exc, "possibilities") and hasattr(exc, "message"):
                # `forkproxy links --grace 5 ...`, a serve command line with the command
                # changed: "No such option" (and a "Possible options" of links') read as a
                # typo. Say whose option it is.
                option = getattr(exc, "option_name", None)
                owners = self._owners(ctx, option)
                if owners:
                    exc.possibilities = None
                    exc.message = (f"No such option: {option} (an option of "
                                   f"{and_list(owners)}, not of {ctx.info_name})")
                elif option and exc.possibilities:
                    exc.possibilities = _close_options(option, exc.possibilities)
            raise

    @staticmethod
    def _owners(ctx: Any, option: str | None) -> list[str]:
        """The other commands that take `option`, by name."""
        group = getattr(ctx.parent, "command", None) if ctx.parent else None
        return _commands_with(group, option, besides=ctx.info_name)

    def _takes_value(self) -> set[str]:
        """The option names that take the next argument as their value."""
        return {opt for param in self.params
                if param.param_type_name == "option"
                and not getattr(param, "is_flag", False)
                and not getattr(param, "count", False)
                for opt in param.opts}

    def _typographic_option(self, ctx: Any, args: list[str]) -> str | None:
        """`'—json': '—' (U+2014) is no hyphen: ...` for the first argument that is an
        option typed with typographic dashes, where click said "Got unexpected extra
        argument" (`status —json`); read as _given_twice reads. The option it suggests
        is one of this command's."""
        # A command with arguments (serve's and links' SPECs) says it of an argument that
        # click reads as one, as config._spec_hint does, but not of one starting with an
        # ASCII hyphen (then an en dash, U+2013): click takes that for options. Said here,
        # not by config, which does not know whose SPEC it reads (`links —verbose`).
        spec = any(param.param_type_name == "argument" for param in self.params)
        takes_value = self._takes_value()
        i = 0
        while i < len(args) and args[i] != "--":
            dash = typographic_option(args[i], _option_names(self, ctx),
                                      f"forkproxy {ctx.info_name}",
                                      lambda option: self._owners(ctx, option))
            if dash is not None:
                what = "SPEC " if spec and not args[i].startswith("-") else ""
                return f"{what}{quoted(args[i])}: {dash}"
            i += 2 if args[i] in takes_value else 1
        return None

    def _given_twice(self, args: list[str]) -> str | None:
        """The option of ONE_ONLY that `args` give more than once, or None. Read as click
        reads them: an option that takes a value takes the next argument, whatever it
        is; nothing after `--` is an option."""
        takes_value = self._takes_value()
        seen: set[str] = set()
        i = 0
        while i < len(args) and args[i] != "--":
            name = args[i].partition("=")[0] if args[i].startswith("--") else args[i]
            if name in ONE_ONLY and name in takes_value:
                if name in seen:
                    return name
                seen.add(name)
            # A value of its own: `--env-file --env-file` names a file once.
            i += 2 if args[i] in takes_value else 1
        return None

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                if param.nargs != 1:
                    name = f"{name}..." if param.required else f"[{name}]..."
                pieces.append(name)
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                arguments.append((name + ("..." if param.nargs != 1 else ""), record[1]))
            elif param.param_type_name == "option":
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


SpecsArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="SPEC",
        help="[BIND_ADDR:]LISTEN_PORT=HOST:PORT, IPv6 in brackets; BIND_ADDR defaults "
        "to --bind's; LISTEN_PORT 0 picks a free port.",
        show_default=False,
    ),
]
FromEnvOpt = Annotated[
    bool,
    typer.Option(
        "--from-env",
        help="One listener per Docker link variable <ALIAS>_PORT_<N>_TCP=tcp://HOST:PORT.",
        envvar="FORKPROXY_FROM_ENV",
    ),
]
EnvFileOpt = Annotated[
    str | None,
    typer.Option(
        "--env-file",
        metavar="PATH",
        help="Read link variables from a Docker-style env file (serve re-reads it on SIGHUP).",
        envvar="FORKPROXY_ENV_FILE",
    ),
]
AliasOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--alias",
        metavar="ALIAS",
        help="Take only this alias's link variables <ALIAS>_PORT_<N>_TCP (repeatable, or "
        "several separated by commas; FORKPROXY_ALIAS takes them separated by spaces too). "
        "[default: every link variable]",
        envvar="FORKPROXY_ALIAS",
        show_default=False,
    ),
]
BindOpt = Annotated[
    str,
    typer.Option(
        "--bind",
        metavar="ADDR",
        help="The address listeners bind when nothing else names one: those of link "
        "variables (--from-env, --env-file) and of SPECs without a BIND_ADDR. "
        "[default: 0.0.0.0]",
        envvar="FORKPROXY_BIND",
        show_default=False,
    ),
]
StatusSocketOpt = Annotated[
    str | None,
    typer.Option(
        "--status-socket",
        metavar="PATH",
        help="Control socket path [default: $XDG_RUNTIME_DIR/forkproxy/PID.sock, "
        "else /tmp/forkproxy-UID/PID.sock].",
        envvar="FORKPROXY_STATUS_SOCKET",
    ),
]
# The clients' default is no path of their own: PID.sock there read as some PID to
# fill in. They look for the supervisor in serve's default directory (status.find_socket).
ClientSocketOpt = Annotated[
    str | None,
    typer.Option(
        "--status-socket",
        metavar="PATH",
        help="The supervisor's control socket [default: the only live socket in "
        "$XDG_RUNTIME_DIR/forkproxy/, else in /tmp/forkproxy-UID/, where serve puts its "
        "own; of several, the one not stopping or handing its listeners over, and several "
        "such is an error].",
        envvar="FORKPROXY_STATUS_SOCKET",
    ),
]


def output(text: str) -> None:
    """A line (or lines) of a command's output on stdout.

    A reader gone (EPIPE: `forkproxy links ... | head -1`) is no error, as for serve's
    `listening` lines: what is left goes to /dev/null, unsaid, and the command ends as it
    would have, with its own status. click would exit 1 with no word: a failure to a
    `set -o pipefail` script for the reader's choice, and none to say why.
    """
    write_line(sys.stdout, text)  # waits for room on a full non-blocking pipe


def say(text: str) -> None:
    """A line (or lines) on stderr: a warning, or why a command failed. Its reader gone
    is no error either, as for output(): `links`, with warnings to write, exited 1 with
    no word when stderr was a pipe nobody read any more, before its `listen` lines. What
    is left of stderr goes to /dev/null, and the command ends with its own status."""
    write_line(sys.stderr, text)


def fail(message: str, variables: Mapping[str, str] | None = None,
         log_format: str = "text") -> NoReturn:
    """The edge where a configuration error becomes exit 2 and one line; `variables`:
    see `name_variable`. With `--log-format json` the line is a JSON log record, so
    that a pipeline that parses every line of the log can read why it did not start."""
    write_start_error(name_variable(message, variables or {}, os.environ), log_format)
    raise typer.Exit(2)


def _long_flag(param: Any) -> str:
    """`--max-children`: the name forkproxy's error lines give an option."""
    opts: list[str] = param.opts
    return next((opt for opt in opts if opt.startswith("--")), opts[0])


def _from_environment(ctx: Any, param: Any) -> str | None:
    """The variable `param`'s value came from, or None (also when it came from the command
    line, which click prefers when both are set). The source is compared by name: click's
    ParameterSource lives in typer's vendored click or in click, depending on the version."""
    envvar = getattr(param, "envvar", None)
    if not isinstance(envvar, str) or not param.name:
        return None
    source = ctx.get_parameter_source(param.name)
    return envvar if getattr(source, "name", None) == "ENVIRONMENT" else None


def _given_on_command_line(ctx: Any, name: str) -> bool:
    """Did parameter `name` come from the command line (not a variable, not its default)?
    Compared by name, as in _from_environment."""
    return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"


def _variables(ctx: typer.Context) -> dict[str, str]:
    """Flag -> variable, for each option whose value came from its FORKPROXY_... variable."""
    found = {}
    for param in ctx.command.params:
        variable = _from_environment(ctx, param)
        if variable is not None:
            found[_long_flag(param)] = variable
    return found


def _read(path: str) -> str | None:
    """A small file's text, or None when it is missing or unreadable."""
    try:
        with open(path, "rb") as handle:
            return handle.read().decode()
    except (OSError, UnicodeDecodeError):
        return None


def _smallest_limit(proc: str, root: str, files: Callable[[str, str], list[str]],
                    parse: Callable[[str, str], int | None]) -> int | None:
    """The smallest of the limits the files `files` names hold, read under `root`, or None.
    Files that are missing (no such controller in a hierarchy, the root cgroup's) or
    unreadable are skipped."""
    cgroup_text = _read(os.path.join(proc, "cgroup"))
    mountinfo = _read(os.path.join(proc, "mountinfo"))
    if cgroup_text is None or mountinfo is None:
        return None
    limits = []
    for path in files(cgroup_text, mountinfo):
        text = _read(os.path.join(root, path.lstrip("/")))
        value = None if text is None else parse(path, text)
        if value is not None:
            limits.append(value)
    return min(limits, default=None)


def read_memory_limit(proc: str = "/proc/self", root: str = "/") -> int | None:
    """The memory limit of this process's cgroup in bytes, the smallest of its own and its
    ancestors' (see forkproxy/cgroup.py), or None: none set, or nothing could be read.

    `proc` and `root` are where /proc/self and / are (tests lay out a tree of their own).
    Swap limits are not looked at (README, "Memory limits")."""
    return _smallest_limit(proc, root, cgroup.memory_limit_files, cgroup.parse_limit)


def read_pids_limit(proc: str = "/proc/self", root: str = "/") -> int | None:
    """The pids limit of this process's cgroup (`pids.max`, processes and threads), the
    smallest of its own and its ancestors', or None: none set, or nothing could be read.
    `proc` and `root` as for read_memory_limit."""
    return _smallest_limit(proc, root, cgroup.pids_limit_files,
                           lambda _path, text: cgroup.parse_pids_limit(text))


def pids_limit_paths(proc: str = "/proc/self") -> tuple[str, ...]:
    """The `pids.max` files of this process's cgroup and its ancestors (any may be
    missing, or say "max"), where the supervisor reads the limit again when a fork fails:
    `docker update --pids-limit` writes them while it runs. () when none can be found."""
    cgroup_text = _read(os.path.join(proc, "cgroup"))
    mountinfo = _read(os.path.join(proc, "mountinfo"))
    if cgroup_text is None or mountinfo is None:
        return ()
    return tuple(cgroup.pids_limit_files(cgroup_text, mountinfo))


# What exempts a process from RLIMIT_NPROC besides a real uid of 0 (the kernel's
# copy_process: INIT_USER, or capable() of either, which asks the initial user namespace).
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
INITIAL_UID_MAP = ["0", "0", "4294967295"]  # /proc/self/uid_map outside any user namespace


def nproc_exempt(outer_uid: int | None, uid_map: str | None, status: str | None) -> bool:
    """Does the kernel let this process fork past RLIMIT_NPROC? Root, by its real uid as
    the namespace outside sees it (control.outer_uid: root in a container without a user
    namespace is; `unshare -r`'s and rootless podman's root is not), or a process of the
    initial user namespace with CAP_SYS_ADMIN or CAP_SYS_RESOURCE in its effective set
    (`status`: /proc/self/status's text). Unknown (no /proc): not exempt."""
    if outer_uid == 0:
        return True
    if uid_map is None or uid_map.split() != INITIAL_UID_MAP:
        return False  # capabilities in a user namespace are not capable() there
    for line in (status or "").splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return bool(effective & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_RESOURCE))
    return False


def _task_fields(path: str) -> tuple[int, int, int] | None:
    """From a /proc/PID/status file: the real uid, the parent's pid and the thread count;
    None when it cannot be read (the process ended) or lacks one. os.open and os.read,
    the lines scanned up to Threads: Python's open() and a dict of every line took twice
    as long, once for each of the user's processes at every start."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):  # one read in all but a huge Groups line
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    real = parent = None
    for line in b"".join(chunks).split(b"\n"):
        name, _, value = line.partition(b":")
        if name == b"PPid":
            parent = value.strip()
        elif name == b"Uid":
            real = value.split()[:1]
        elif name == b"Threads":
            threads = value.strip()
            if not (real and real[0].isdigit() and threads.isdigit()):
                return None
            return int(real[0]), int(parent) if parent and parent.isdigit() else 0, int(threads)
    return None


def count_user_tasks(uid: int, proc: str = "/proc", own_pid: int | None = None,
                     leave_out: int | None = None) -> int:
    """The processes and threads of the user whose real uid is `uid`, this process's
    (`own_pid`) left out: what RLIMIT_NPROC counts besides forkproxy's own. Only those
    whose /proc/PID the user owns (its effective uid: one stat each, for every other
    user's) have their status read; a set-uid program the user runs is missed, and
    own_pids's room takes it. Those visible here: another PID namespace's are not.
    `leave_out`: a process left out with its children (the supervisor `serve
    --take-over` takes over from, and its connections' children, which exit as they
    drain: counted, they lowered the new one's --max-children for good)."""
    count = 0
    try:
        entries = os.scandir(proc)
    except OSError:
        return 0
    with entries:
        for entry in entries:
            if not entry.name.isdigit() or int(entry.name) in (own_pid, leave_out):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
            except OSError:
                continue  # ended meanwhile
            fields = _task_fields(os.path.join(entry.path, "status"))
            if fields is None:
                continue
            real, parent, threads = fields
            if real == uid and (leave_out is None or parent != leave_out):
                count += threads
    return count


def read_nproc_limit(proc: str = "/proc",
                     taken_from: str | None = None) -> tuple[int | None, int]:
    """The soft RLIMIT_NPROC (ulimit -u) when the kernel holds this process to it, and
    the user's processes and threads besides this one (count_user_tasks); (None, 0) when
    there is no limit or it does not apply (nproc_exempt). The hard limit is not
    raised to: past the soft one, forks fail all the same. `taken_from`: the control
    socket of the supervisor `serve --take-over` takes over from, whose process and
    children are not counted either (asked who listens only when a limit applies)."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft == resource.RLIM_INFINITY or exempt_from_nproc(proc):
        return None, 0
    leave_out = None if taken_from is None else listener_pid(taken_from)
    return soft, count_user_tasks(os.getuid(), proc, os.getpid(), leave_out)


def exempt_from_nproc(proc: str = "/proc") -> bool:
    """nproc_exempt for this process, read from `proc`."""
    uid_map = _read(os.path.join(proc, "self", "uid_map"))
    return nproc_exempt(control.outer_uid(os.getuid(), uid_map), uid_map,
                        _read(os.path.join(proc, "self", "status")))


def listener_pid(path: str) -> int | None:
    """The pid of the process that listens on the Unix socket `path`, as this process
    sees it (SO_PEERCRED of a connection to a listening socket names who listened), or
    None: no connection (nothing there, a full backlog), a process of a PID namespace
    not ours, or /proc is not our PID namespace's (its /proc/PID would be another)."""
    import socket
    import struct

    if control.foreign_proc():
        return None
    try:
        # socket() in the try too: out of descriptors, or Unix sockets refused by a
        # sandbox, is no pid to leave out, not a traceback.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)  # a full backlog: EAGAIN, not a wait
            sock.connect(path)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
    except OSError:
        return None
    pid: int = struct.unpack("3i", creds)[0]
    return pid or None


PID_MAX_FILE = "/proc/sys/kernel/pid_max"


# What a kernel boots with at least (PID_MAX_DEFAULT; more with many CPUs, 4194304 where
# systemd raises it): a --max-children up to it fits any pid_max but one lowered by hand.
PID_MAX_DEFAULT = 32768


def pid_max_or_why(path: str = PID_MAX_FILE) -> tuple[int | None, str]:
    """The kernel's pid_max and "", or None and why it cannot be read: under systemd's
    ProcSubset=pid (proc mounted with subset=pid) /proc/sys is hidden, with no /proc
    nothing is there."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(32).strip()
    except OSError as exc:
        if not os.path.isdir("/proc/self"):
            return None, f"{path}: no /proc is mounted"
        if exc.errno == errno.ENOENT and not os.path.isdir("/proc/sys"):
            return None, (f"{path}: /proc/sys is hidden (a /proc of processes only: proc "
                          "mounted with subset=pid, systemd's ProcSubset=pid)")
        return None, f"{path}: {exc.strerror or exc}"
    if not text.isdigit():
        return None, f"{path}: not a number: {text[:20]!r}"
    return int(text), ""


def pid_max_unchecked(options: Options, why: str) -> str | None:
    """What the supervisor says at start when a --max-children given could not be checked
    against pid_max (`why` it could not be read), or None: checked, derived, or no more
    than any kernel's pid_max but one lowered by hand (PID_MAX_DEFAULT)."""
    if not options.max_children_given or not why or options.max_children <= PID_MAX_DEFAULT:
        return None
    return (f"--max-children {options.max_children} was not checked against the kernel's "
            f"pid_max: {why}; more than pid_max is served, and the forks past it fail "
            "(fork-failed): give at most what `sysctl kernel.pid_max` says on the host")


def check_pid_max(options: Options, pid_max: int | None) -> None:
    """ConfigError for a --max-children given above the kernel's pid_max: more children
    than processes can exist, a limit never reached, so a mistake (a digit too many), and
    reported as bad input rather than served. Here, not in check_options: it needs the
    kernel's value, read at start, and parsing does no I/O. A derived value never exceeds
    it (at most DEFAULT_MAX_CHILDREN)."""
    if options.max_children_given and pid_max is not None and options.max_children > pid_max:
        raise ConfigError(f"--max-children {options.max_children}: more than this kernel's "
                          f"pid_max, {pid_max} ({PID_MAX_FILE}): that many processes cannot "
                          "exist at once")


def with_limits(options: Options, memory_limit: int | None,
                pids_limit: int | None = None,
                nproc: tuple[int | None, int] = (None, 0)) -> Options:
    """`options` with the memory, pids and nproc limits found at start (`nproc`: as
    read_nproc_limit says), and, where the operator chose no --max-children
    (`max_children_given` False), the number of connections they all hold. Fixed at
    start like the other options: a reload does not look again."""
    nproc_limit, nproc_others = nproc
    found = options.replace(memory_limit=memory_limit, pids_limit=pids_limit,
                            nproc_limit=nproc_limit, nproc_others=nproc_others)
    if options.max_children_given:
        return found  # max_children: as given
    return found.replace(max_children=derived_max_children(
        memory_limit, pids_limit, options.metrics is not None, nproc_limit, nproc_others))


def load(sources: Sources) -> LinkTable:
    check_options(sources.options)
    return read_links(sources, os.environ)


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one, as Go programs and HAProxy do.
    The supervisor holds every listener in one process (the ambassador ran a socat per
    link), and a runtime may start it at a soft 1024 under a far higher hard limit
    (Docker 29 with containerd 2: moby/moby#51485; systemd's default for services): a
    container exposing ~1,015 ports could not start. forkproxy waits with poll(), never
    select(), so descriptors above 1024 are safe. Here, before the exec, which keeps it
    (the supervisor imports `resource` all the same, for os.wait4: see supervisor.py)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # an infinite hard limit: kept
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def development_options() -> list[str]:
    """The development checks this process runs with, as options for the supervisor's
    interpreter, which -I would start without them: those asked for by variable
    (PYTHONDEVMODE, PYTHONTRACEMALLOC, PYTHONFAULTHANDLER, PYTHONWARNDEFAULTENCODING;
    PYTHONWARNINGS's filters are in sys.warnoptions) as -X options, and the -X and -W
    options given. The supervisor hands its own on to the metrics process
    (installed.interpreter_options)."""
    import _tracemalloc  # builtin; tracemalloc imports more
    import faulthandler

    options = installed.interpreter_options()
    if sys.flags.dev_mode and "dev" not in sys._xoptions:
        options.append("-Xdev")
    if _tracemalloc.is_tracing() and "tracemalloc" not in sys._xoptions:
        options.append(f"-Xtracemalloc={_tracemalloc.get_traceback_limit()}")
    if faulthandler.is_enabled() and not (sys.flags.dev_mode or "faulthandler" in sys._xoptions):
        options.append("-Xfaulthandler")  # (dev mode enables it)
    if sys.flags.warn_default_encoding and "warn_default_encoding" not in sys._xoptions:
        options.append("-Xwarn_default_encoding")
    return options


def serve(*, sources: Sources, variables: Mapping[str, str] | None = None,
          take_over: bool = False) -> NoReturn:
    """Validate, then exec the lean supervisor in this same process (same PID).

    `variables` (see `name_variable`) goes along: the supervisor reports what it finds
    wrong at start (a pid file it cannot write, say) in the same words. `take_over`: the
    supervisor to take the listeners of is found here, once the input is known good, as
    `status` finds one; the supervisor asks it where it would bind them."""
    load(sources)
    pid_max, pid_max_why = pid_max_or_why()
    check_pid_max(sources.options, pid_max)
    if take_over:
        from .status import SocketsRefused, StatusError, find_socket

        try:
            found = find_socket(sources.options.status_socket)
        except SocketsRefused as exc:  # not "nothing to take over": none could be asked
            raise ConfigError(f"--take-over: {exc}") from None
        except StatusError as exc:
            raise ConfigError(f"--take-over: nothing to take over: {exc}") from None
        sources = sources.replace(options=sources.options.replace(take_over=found))
    # Read here, once, before the exec: the supervisor (the same process, in the same
    # cgroup) then carries none of the code that finds it. The supervisor taken over
    # from, and its connections' children, drain and exit: counted as the user's other
    # tasks, they lowered this one's --max-children for good (fixed at start).
    sources = sources.replace(options=with_limits(
        sources.options, read_memory_limit(), read_pids_limit(),
        read_nproc_limit(taken_from=sources.options.take_over)).replace(
            pids_limit_files=pids_limit_paths(), nproc_exempt=exempt_from_nproc(),
            pid_max_unread=pid_max_unchecked(sources.options, pid_max_why)))
    raise_open_files_limit()
    payload = json.dumps({**sources_to_json(sources), "variables": dict(variables or {}),
                          "version": __version__}).encode()
    try:
        config_fd = os.memfd_create("forkproxy-config", 0)  # not CLOEXEC: the supervisor reads it
    except OSError as exc:
        # A sandbox that refuses the call (systemd's SystemCallFilter=~memfd_create, a
        # runtime's profile that does not know it): main() would blame an output.
        write_start_error(f"cannot start the supervisor: memfd_create, which hands it the "
                          f"configuration, failed: {exc.strerror or exc} (a seccomp filter "
                          "refusing it? allow memfd_create)", sources.options.log_format)
        raise typer.Exit(EXEC_FAILED) from None
    # All of it: a file size limit (`ulimit -f`, LimitFSIZE=) cuts a write short rather
    # than failing it, and the supervisor read half a configuration (a JSON traceback).
    # The next write fails with EFBIG (SIGXFSZ is ignored: Python's default), which main()
    # says as what it is.
    left = memoryview(payload)
    while left:
        left = left[os.write(config_fd, left):]
    os.lseek(config_fd, 0, os.SEEK_SET)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_serve.py")
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None: Python found the fd closed at start
            flush(stream)
    # What this process imports from goes to the metrics process, which the supervisor
    # starts with -I (see _metrics_main.import_path_to_hand).
    try:
        cwd = os.getcwd()
    except OSError:  # removed: nothing is imported from it, nor handed as it
        cwd = ""
    handed = import_path_to_hand(sys.path, cwd,
                                 not (sys.flags.isolated or sys.flags.safe_path))
    if handed:
        os.environ[IMPORT_PATH_VARIABLE] = os.pathsep.join(handed)
    else:
        os.environ.pop(IMPORT_PATH_VARIABLE, None)
    try:
        if not os.path.isfile(script):
            # Removed since this process started (an upgrade under way): the interpreter
            # would say so in its own words, with exit status 2, bad input's.
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), script)
        os.execv(sys.executable, [sys.executable, *development_options(), "-I", "-S",
                                  script, "--config-fd", str(config_fd)])
    except OSError as exc:
        # Not bad input: the environment changed under us (the interpreter removed by an
        # upgrade or a rebuilt venv, a noexec mount). One line, and the status a shell
        # gives a command it found but could not execute.
        what = script if exc.filename == script else sys.executable
        write_start_error(f"cannot start the supervisor: {what!r}: "
                          f"{exc.strerror or exc}", sources.options.log_format)
        raise typer.Exit(EXEC_FAILED) from None


ALLOW_VARIABLE = "FORKPROXY_ALLOW"  # --allow's variable (_option's "ALLOW")
ALIAS_VARIABLE = "FORKPROXY_ALIAS"  # --alias's
BIND_VARIABLE = "FORKPROXY_BIND"  # --bind's


def _blank_variable(flag: str, variable: str, variables: dict[str, str],
                    on_command_line: bool) -> str | None:
    """The value of `variable` when it is set but blank and the flag is not given: click
    takes it for unset, which for a filter (--allow, --alias) means no filter at all, so it
    is handed on to be refused, and `variables` made to name it in the error."""
    value = os.environ.get(variable)
    if on_command_line or value is None or value.strip():
        return None
    variables[flag] = variable
    return value


def _aliases(ctx: typer.Context, given: list[str] | None,
             variables: dict[str, str]) -> tuple[str, ...]:
    """--alias's aliases (parse_aliases), a blank FORKPROXY_ALIAS refused."""
    blank = _blank_variable("--alias", ALIAS_VARIABLE, variables,
                            _given_on_command_line(ctx, "alias"))
    return parse_aliases([blank] if blank is not None else given or ())


def _bind(ctx: typer.Context, given: str, variables: dict[str, str]) -> str:
    """--bind's address (parse_link_bind), a blank FORKPROXY_BIND refused: click takes it
    for unset, and unset is 0.0.0.0, so a template that emptied the variable meant to keep
    the listeners on 127.0.0.1 put them on every interface without a word."""
    blank = _blank_variable("--bind", BIND_VARIABLE, variables,
                            _given_on_command_line(ctx, "bind"))
    text = blank if blank is not None else given
    address = parse_link_bind(text)
    if "%" in address:
        # A zone of no interface here: said of --bind (and of FORKPROXY_BIND, where it came
        # from), not of the first link that listens there ("... (for 6379=...)"), which a
        # user of FORKPROXY_BIND never typed, and also where no link listens there.
        zone_scope(address, f"--bind {quoted(text)}")
    return address


def _allow(allow: list[str] | None, variables: dict[str, str],
           on_command_line: bool) -> tuple[str, ...]:
    """--allow's networks. From FORKPROXY_ALLOW, click splits the value at whitespace:
    `10.0.0.0/8, 192.168.0.0/16` became `10.0.0.0/8,` and `192.168.0.0/16`, and the error
    quoted the fragment. A value with a comma is handed on whole, one entry that
    parse_cidr refuses, quoting the value as the user wrote it, with the hint.

    An empty or blank FORKPROXY_ALLOW is handed on too, to be refused: click takes it for
    unset, and unset means every client, so a template that emptied the variable by
    mistake (`FORKPROXY_ALLOW: ${NETS}`) would open the filter without a word. Other
    empty FORKPROXY_ variables stay unset: for them that is the default, not a door."""
    variable = variables.get("--allow")  # None: not from the variable (see _variables)
    if variable is not None and "," in os.environ.get(variable, ""):
        return (os.environ[variable],)
    blank = _blank_variable("--allow", ALLOW_VARIABLE, variables, on_command_line)
    return (blank,) if blank is not None else tuple(allow or ())


def _option_variables(ctx: typer.Context) -> dict[str, str]:
    """Variable -> flag, for every option of every command that reads one (serve's own
    first: FORKPROXY_STATUS_SOCKET is named after serve's --status-socket)."""
    root = ctx.find_root().command
    commands = [ctx.command, *getattr(root, "commands", {}).values()]
    found: dict[str, str] = {}
    for command in commands:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            for variable in [envvar] if isinstance(envvar, str) else envvar or ():
                found.setdefault(variable, _long_flag(param))
    return found


def _flags_without_variable(ctx: typer.Context) -> tuple[str, ...]:
    """serve's options that no variable sets (--take-over, --verbose, --quiet), whichever
    command asks (`links` reads the env file as serve does)."""
    serve = getattr(ctx.find_root().command, "commands", {}).get("serve", ctx.command)
    return tuple(_long_flag(param) for param in serve.params
                 if param.param_type_name == "option" and not getattr(param, "envvar", None))


def _seconds(text: str, flag: str) -> float:
    """A duration that cannot be off."""
    value = parse_seconds(text, flag, can_be_off=False)
    assert value is not None
    return value


def _option(help: str, env: str, metavar: str) -> Any:
    return typer.Option(help=help, envvar=f"FORKPROXY_{env}", metavar=metavar, show_default=False)


@app.command("serve", cls=_Command)
def serve_command(
    ctx: typer.Context,
    specs: SpecsArg = None,
    from_env: FromEnvOpt = False,
    env_file: EnvFileOpt = None,
    alias: AliasOpt = None,
    bind: BindOpt = ANY_IPV4,
    relay: Annotated[
        str, _option("How bytes move: auto, splice or copy. [default: auto]", "RELAY", "MODE")
    ] = "auto",
    connect_timeout: Annotated[
        str, _option("Seconds to wait for the upstream to accept. [default: 5]",
                     "CONNECT_TIMEOUT", "SECONDS")
    ] = "5",
    connect_retries: Annotated[
        str, _option("Extra connect attempts (at most 1000), with a short backoff. [default: 0]",
                     "CONNECT_RETRIES", "N")
    ] = "0",
    grace: Annotated[
        str, _option("Seconds live connections get to finish after SIGTERM/SIGINT. [default: 8]",
                     "GRACE", "SECONDS")
    ] = "8",
    idle_timeout: Annotated[
        str | None, _option("Close a connection idle both ways this long (socat -T). "
                            "[default: off]", "IDLE_TIMEOUT", "SECONDS")
    ] = None,
    halfclose_timeout: Annotated[
        str | None, _option("After one side finished, end the connection once nothing "
                            "has moved for this long. [default: off]", "HALFCLOSE_TIMEOUT",
                            "SECONDS")
    ] = None,
    keepalive: Annotated[
        str | None, _option("TCP keepalive on both sides: probe after this many silent "
                            "seconds; a peer that stopped answering (gone without a FIN or "
                            "RST) ends its connection in about twice that. [default: off]",
                            "KEEPALIVE", "SECONDS")
    ] = None,
    user_timeout: Annotated[
        str | None, _option("TCP_USER_TIMEOUT on both sides: end a connection whose peer "
                            "leaves sent bytes unacknowledged (or its window shut) this long; "
                            "cuts a live peer that reads nothing that long too. "
                            "[default: off]", "USER_TIMEOUT", "SECONDS")
    ] = None,
    resolve_every: Annotated[
        str, _option("Resolve the targets' host names again this often, or off. [default: 30]",
                     "RESOLVE_EVERY", "SECONDS")
    ] = "30",
    max_children: Annotated[
        str | None, _option("Most connections at once; more wait in the backlog. "
                            "[default: as many as fit the container's memory and pids "
                            "limits and the user's nproc limit, at most 1024]", "MAX_CHILDREN", "N")
    ] = None,
    allow: Annotated[
        list[str] | None, _option("Accept clients only from this CIDR (repeatable; "
                                  "FORKPROXY_ALLOW takes several, separated by spaces; "
                                  "socat range=). [default: everyone]", "ALLOW", "CIDR")
    ] = None,
    status_socket: StatusSocketOpt = None,
    metrics: Annotated[
        str | None, _option("Serve Prometheus metrics on HOST:PORT.", "METRICS", "HOST:PORT")
    ] = None,
    pid_file: Annotated[
        str | None, _option("Write the supervisor's PID here.", "PID_FILE", "PATH")
    ] = None,
    log_format: Annotated[
        str, _option("text or json. [default: text]", "LOG_FORMAT", "FORMAT")
    ] = "text",
    # No variable: a container or a unit restarted with it set would fail to start
    # ("nothing to take over") once nothing runs.
    take_over: Annotated[
        bool, typer.Option("--take-over", show_default=False,
                           help="Take the listening sockets of the running supervisor (its "
                                "--status-socket, or the only one found as `status` finds "
                                "it), which then drains: no client is refused.")
    ] = False,
    # No "[default: 0]": a count of flags has no default worth showing.
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, show_default=False,
                          help="More logging: debug.")
    ] = 0,
    quiet: Annotated[
        int, typer.Option("--quiet", "-q", count=True, show_default=False,
                          help="Warnings and errors only; -qq: errors only.")
    ] = 0,
) -> None:
    """Listen and forward, one forked child per connection."""
    variables = _variables(ctx)
    try:
        if START_ERROR in ctx.meta:
            raise ConfigError(ctx.meta[START_ERROR])
        option_variables = _option_variables(ctx)
        # Numbers arrive as text so that a bad one is reported like any other bad input.
        options = Options(
            relay=relay,
            connect_timeout=_seconds(connect_timeout, "--connect-timeout"),
            connect_retries=parse_count(connect_retries, "--connect-retries"),
            grace=_seconds(grace, "--grace"),
            idle_timeout=parse_seconds(idle_timeout, "--idle-timeout"),
            halfclose_timeout=parse_seconds(halfclose_timeout, "--halfclose-timeout"),
            keepalive=parse_keepalive(keepalive),
            user_timeout=parse_seconds(user_timeout, "--user-timeout"),
            resolve_every=parse_seconds(resolve_every, "--resolve-every"),
            # None: neither the flag nor the variable; serve() derives it from the memory,
            # pids and nproc limits.
            max_children=(DEFAULT_MAX_CHILDREN if max_children is None
                          else parse_count(max_children, "--max-children")),
            max_children_given=max_children is not None,
            allow=_allow(allow, variables, _given_on_command_line(ctx, "allow")),
            verbosity=verbose - quiet,
            log_format=log_format,
            status_socket=status_socket,
            metrics=metrics,
            pid_file=pid_file,
            unknown_variables=unknown_variables(os.environ, option_variables,
                                                _flags_without_variable(ctx)),
            option_variables=tuple(option_variables.items()),
            flags_without_variable=_flags_without_variable(ctx),
        )
        sources = Sources(tuple(specs or ()), from_env, env_file, options,
                          _bind(ctx, bind, variables), _aliases(ctx, alias, variables))
        serve(sources=sources, variables=variables, take_over=take_over)
    except ConfigError as exc:
        fail(str(exc), variables, log_format)


@app.command("links", cls=_Command)
def links_command(
    ctx: typer.Context,
    specs: SpecsArg = None,
    from_env: FromEnvOpt = False,
    env_file: EnvFileOpt = None,
    alias: AliasOpt = None,
    bind: BindOpt = ANY_IPV4,
) -> None:
    """Print the listeners `serve` would open from the same SPECs and link options, and exit."""
    variables = _variables(ctx)
    option_variables = _option_variables(ctx)
    try:
        table = load(Sources(tuple(specs or ()), from_env, env_file,
                             Options(option_variables=tuple(option_variables.items()),
                                     flags_without_variable=_flags_without_variable(ctx)),
                             bind=_bind(ctx, bind, variables),
                             aliases=_aliases(ctx, alias, variables)))
    except ConfigError as exc:
        fail(str(exc), variables)
    # What serve's log says first (`unknown-variable`, then `unknown-variable-unlogged`),
    # in the same words: the dry run was silent of a typo (FORKPROXY_ALLOWED) that serve
    # warns of. Only when serve would start, as serve says them.
    said, more = unknown_lines(
        unknown_variables(os.environ, option_variables, _flags_without_variable(ctx)))
    # A name is the environment's (or the env file's) as it is: printable() keeps an ESC
    # in it from reaching the terminal raw, as serve's log line quotes it.
    for name, detail in said:
        say(f"forkproxy: warning: {printable(name)}: {detail}")
    if more:
        # The count last: "1 more FORKPROXY_ variables" read wrong.
        say(f"forkproxy: warning: {UNLOGGED_UNKNOWN}: {more}")
    for warning in table.warnings + table.overrides + table.loops + table.unreachable:
        say(f"forkproxy: warning: {warning}")
    said, more = unknown_lines(table.file_options)  # bounded as serve's log bounds them
    for name, detail in said:
        say(f"forkproxy: warning: {printable(name)}: {detail}")
    if more:
        say(f"forkproxy: warning: {UNLOGGED_FILE_OPTIONS}: {more}")
    for link in table.links:
        output(f"listen {link.describe()}")


def _in_quotes(value: str) -> bool:
    """Is `value` wrapped in a pair of quotes, as a Compose file or an env file keeps them?
    Not a quote at one end alone: serve takes `/run/fp.sock"` as a path, and its socket
    missing is a supervisor down (exit 1 for `check`), not bad input."""
    return len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"')


def _client_socket(ctx: typer.Context, status_socket: str | None) -> None:
    """Exit 2 for a --status-socket no supervisor could be at: bad input, as for serve, not
    "nothing answers" (exit 1)."""
    from .control import check_client_path

    if status_socket is not None:
        variables = _variables(ctx)
        try:
            check_client_path(status_socket)
            if "--status-socket" in variables and _in_quotes(status_socket):
                # FORKPROXY_STATUS_SOCKET='"/run/x.sock"' (quotes kept by a compose file or
                # an env file): "no answer on ... No such file or directory", exit 1, read
                # as a supervisor down. Bad input, as serve says it, with the hint.
                os.stat(status_socket)
        except OSError as exc:
            fail(f"--status-socket {quoted(status_socket)}: {exc.strerror}", variables)


def _control(ctx: typer.Context, status_socket: str | None, command: str) -> dict[str, Any]:
    """The supervisor's reply to `command`, in the shape it gives (status._read_reply), or
    exit 1 with one line: nothing answers, or something that is not a forkproxy does
    (exit 2 for a path no supervisor could be at)."""
    from .status import ask

    _client_socket(ctx, status_socket)
    reply = ask(status_socket, command, say)
    if reply is None:
        raise typer.Exit(1)
    return reply


# status and check are status.run_status and run_check, which console.py's lean path runs
# too, without typer, for a bare `check`, `status` or `status --json`.
@app.command("status", cls=_Command)
def status_command(
    ctx: typer.Context,
    status_socket: ClientSocketOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show links, live connections and what each child costs (RSS, USS, CPU)."""
    from .status import run_status

    _client_socket(ctx, status_socket)
    code = run_status(status_socket, as_json, output, say)
    if code:
        raise typer.Exit(code)


@app.command("check", cls=_Command)
def check_command(ctx: typer.Context, status_socket: ClientSocketOpt = None) -> None:
    """Exit 0 when the supervisor answers and every listener is bound (a HEALTHCHECK)."""
    from .status import run_check

    _client_socket(ctx, status_socket)
    code = run_check(status_socket, output, say)
    if code:
        raise typer.Exit(code)


class ReloadError(Exception):
    """Why `reload --pid-file` sends no signal, as one line for the user."""


class _NotAPidFile(ReloadError):
    """The path given to `reload --pid-file` is no pid file (a directory, a FIFO, text
    that no supervisor writes): bad input, exit 2, as a --status-socket path that is not
    a socket is. A missing or empty file, or a PID not running, is a state (exit 1)."""


class _Unreadable(Exception):
    """A /proc file of the process to check could not be read: the message says which."""


def _read_proc(pid: int, name: str) -> bytes:
    """/proc/PID/NAME. A process gone is FileNotFoundError (or ProcessLookupError), as
    before; any other failure (EPERM under hidepid, EACCES) is _Unreadable: it was the
    check that failed, not the signal, and the line must say so, not "cannot signal"."""
    path = f"/proc/{pid}/{name}"
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, ProcessLookupError):
        raise
    except OSError as exc:
        raise _Unreadable(f"cannot read {path}: {exc.strerror}") from None


def _runs_serve(pid: int) -> bool:
    """Does `pid` run what serve() execs: python -I -S .../_serve.py --config-fd N? The
    supervisor does, and so do the processes it forks (a connection's child)."""
    argv = _read_proc(pid, "cmdline").split(b"\0")
    return any(os.path.basename(arg) == b"_serve.py" and argv[i + 1:i + 2] == [b"--config-fd"]
               for i, arg in enumerate(argv))


def _parent(pid: int) -> int:
    # pid (comm) state ppid ...: comm may hold spaces and parentheses, so after the last ')'.
    return int(_read_proc(pid, "stat").rsplit(b")", 1)[1].split()[1])


def _open_pidfd(pid: int) -> int | None:
    """A descriptor for process `pid` (ProcessLookupError if there is none), or None where
    there are no pidfds: Linux before 5.3 (ENOSYS), or a seccomp filter older than the
    call (EPERM, which pidfd_open itself never returns)."""
    try:
        return os.pidfd_open(pid)
    except OverflowError:  # beyond pid_t: no process has it
        raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH)) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            return None
        raise


def _signal_supervisor(pid_file: str) -> int:
    """SIGHUP the forkproxy supervisor whose PID is in `pid_file`; its PID, or ReloadError."""
    shown_file = repr(pid_file)  # quoted: a path may hold a newline, and the line is one
    try:
        # O_NONBLOCK: a FIFO would wait for a writer for ever.
        fd = os.open(pid_file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _NotAPidFile(f"{shown_file}: not a regular file")
            # A PID has at most 7 digits. NUL bytes are what a crash or a power loss can
            # leave of a file just written (README): a state, like an empty file.
            text = os.read(fd, 64).strip(b"\0 \t\n\r\v\f")
        finally:
            os.close(fd)
    except OSError as exc:
        raise ReloadError(f"cannot read {shown_file}: {exc.strerror}") from None
    # ASCII digits only, not int(): kill() takes 0 as our own process group and -1 as
    # every process we may signal; int() also takes "+1", "1_0" and non-ASCII digits.
    if not text.isdigit() or int(text) == 0:
        # bytes' repr without its b: quoted, with control and non-ASCII bytes escaped
        shown = text.decode() if text.isdigit() else repr(text)[1:]
        if not text:
            raise ReloadError(f"{shown_file} holds '', not a process id")
        raise _NotAPidFile(f"{shown_file}: holds {shown}, not a process id")
    pid = int(text)
    not_ours = control.foreign_proc()
    if not_ours:
        # /proc/PID would be another namespace's process PID: the check below would pass
        # or fail on some other process, and the SIGHUP go to ours all the same.
        raise ReloadError(f"cannot check that pid {pid} (from {shown_file}) is a forkproxy "
                          f"supervisor: {not_ours}; `forkproxy reload` without --pid-file "
                          "asks its status socket instead")
    # A stale file may name a process that took the PID over; PID 1 is fine if it is ours.
    # The descriptor is taken first: the process checked is then the process signalled,
    # even if it exits and its PID goes to another one in between (the signal then fails).
    try:
        pidfd = _open_pidfd(pid)
        try:
            if not _runs_serve(pid):
                raise ReloadError(f"pid {pid} (from {shown_file}) is not a forkproxy supervisor")
            parent = _parent(pid)
            if parent and _runs_serve(parent):
                # SIGHUP to one of its children would do nothing (they ignore it).
                raise ReloadError(f"pid {pid} (from {shown_file}) is a child of forkproxy "
                                  f"supervisor {parent}, not a supervisor")
            if pidfd is None:
                os.kill(pid, signal.SIGHUP)  # no pidfds here: checked, then a PID signalled
            else:
                signal.pidfd_send_signal(pidfd, signal.SIGHUP)
        finally:
            if pidfd is not None:
                os.close(pidfd)
    except (FileNotFoundError, ProcessLookupError):
        raise ReloadError(f"pid {pid} (from {shown_file}) is not running") from None
    except _Unreadable as exc:
        raise ReloadError(f"cannot check that pid {pid} (from {shown_file}) is a forkproxy "
                          f"supervisor: {exc}") from None
    except OSError as exc:
        raise ReloadError(f"cannot signal pid {pid} (from {shown_file}): "
                          f"{exc.strerror}") from None
    return pid


@app.command("reload", cls=_Command)
def reload_command(
    ctx: typer.Context,
    status_socket: ClientSocketOpt = None,
    # No envvar: FORKPROXY_PID_FILE is serve's, often set where reload runs too, and it
    # would silently trade the reported outcome (exit 1 on failure) for a bare signal.
    pid_file: Annotated[
        str | None,
        typer.Option(help="Send SIGHUP to the PID in this file instead of asking the socket "
                     "(the outcome is then only in the log).",
                     metavar="PATH", show_default=False),
    ] = None,
) -> None:
    """Re-read the env file and re-resolve names, as SIGHUP does; report the outcome."""
    if pid_file is not None and _given_on_command_line(ctx, "status_socket"):
        # Two ways to reach the supervisor, both chosen here: taking one would ignore the
        # other without a word. FORKPROXY_STATUS_SOCKET is serve's too, often set where
        # reload runs: --pid-file goes over it, as any flag goes over a variable.
        fail("--pid-file and --status-socket: give one or the other (--pid-file sends "
             "SIGHUP, --status-socket asks the socket and reports the outcome)")
    try:  # bad input (exit 2), as for serve and `--status-socket ''`, not a failed read
        check_pid_file_path(pid_file)
    except ConfigError as exc:
        fail(str(exc))
    if pid_file is not None:  # asked for on the command line: it wins over the variable
        try:
            pid = _signal_supervisor(pid_file)
        except _NotAPidFile as exc:
            fail(f"--pid-file {exc}")
        except ReloadError as exc:
            say(f"forkproxy: cannot reload: {exc}")
            raise typer.Exit(1) from None
        output(f"sent SIGHUP to {pid} (the outcome is in its log)")
        return
    from .status import shown

    reply = shown(_control(ctx, status_socket, "reload"))
    if not reply.get("ok"):
        say(f"forkproxy: reload failed, previous configuration kept: {reply.get('error')}")
        raise typer.Exit(1)
    for listener in reply.get("listeners", []):
        output(f"listening {listener['listen']} -> {listener['upstream']} ({listener['link']})")


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    # Not an eager callback: that one printed the version and exited 0 before anything
    # after it was looked at (`forkproxy --version junk`). Anything after it is refused in
    # _Group.resolve_command, so root() sees --version only alone (or with --help, whose
    # help comes first, whatever the order).
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.")
    ] = False,
) -> None:
    """forkproxy: socat TCP-LISTEN,fork grown into the engine of the ambassador pattern."""
    if version:
        output(f"forkproxy {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        # No command is a usage error (exit 2, like the others and click's own since 8.2),
        # but the help is what helps here; on stderr, so stdout stays empty as on any error.
        # Not no_args_is_help: its error carries the help as the message, which main()
        # would print as one `forkproxy: error: Usage: ...` line run on into the help.
        say(ctx.get_help())
        raise typer.Exit(2)


def _usage_error(exc: Any) -> str:
    """click's line for a usage error; for a bad value from a variable, one in the words of
    forkproxy's own errors: the variable first, and the value (click's line leads with the
    flag, names the variable or not depending on the version, and shows no value)."""
    param, ctx = getattr(exc, "param", None), getattr(exc, "ctx", None)
    variable = None if param is None or ctx is None else _from_environment(ctx, param)
    if variable is None:
        return str(exc.format_message())
    value = quoted(os.environ.get(variable, ""))
    # A flag's variable: the parser's own words differ by typer version (click's "is not
    # a valid boolean", pydantic's "unable to interpret input") and name no answer.
    message = (BOOLEAN_WANTED if getattr(param, "is_bool_flag", False) else exc.message)
    return (f"{variable} ({_long_flag(param)}) {value}: {message}"
            f"{quotes_kept(variable, os.environ)}")


# What a flag's variable takes (FORKPROXY_FROM_ENV=yes), as both typer's parsers read it.
BOOLEAN_WANTED = "not true or false (1/0, yes/no, on/off, t/f, y/n and their capitals too)"


def main() -> None:
    """The CLI (console.main runs it). Usage errors, like bad input, are one line and exit 2."""
    try:
        code = app(standalone_mode=False)
        flush(sys.stdout)  # here, not at exit: a failure then is Python's, exit 120
    except KeyboardInterrupt:
        sys.exit(130)
    except OutputError as exc:
        # (A reader gone, EPIPE, is no failure: see output().)
        sys.exit(cannot_write(exc))
    except OSError as exc:  # not the output's: said as what it is, not "cannot write"
        sys.exit(unexpected(exc))
    except Exception as exc:
        # A usage error (click's, vendored or not, depending on the typer version):
        # recognised by what it carries rather than by a private import path.
        if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
            raise
        say(f"forkproxy: error: {_usage_error(exc)}")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
