"""Pure parsing: SPECs, Docker link variables and env files into immutable values.

Nothing here touches the network, the file system or the process: callers hand in
strings (argv, a copy of the environment, the text of an env file) and get back a
`LinkTable` or a `ConfigError` whose message names the offending input.

This module is imported by the lean supervisor, so it must not import anything that
pulls in `threading` (see supervisor.py), nor `dataclasses` (see `Value`).
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

from .control import MAX_CLIENTS

TYPE_CHECKING = False  # not typing's: importing typing costs the supervisor ~0.9 MB of heap
if TYPE_CHECKING:
    from typing import Self

MAX_NAME = 253  # longest DNS name
MAX_CHILDREN = 1 << 22  # PID_MAX_LIMIT: no more processes can ever exist at once
DEFAULT_MAX_CHILDREN = 1024  # --max-children with no memory, pids or nproc limit to fit
# Where an operator raises a process's open files limit (RLIMIT_NOFILE), for the lines that
# name it: the supervisor's accept-failed detail and status/check against a supervisor out
# of descriptors.
RAISE_OPEN_FILES = "ulimit -n, LimitNOFILE=, docker run --ulimit nofile="
MiB = 1 << 20
# What a memory limit must hold besides the connections, and what each connection takes,
# for the --max-children derived from the limit (derived_max_children). Measured by hand in a
# v1 memory cgroup (memory.usage_in_bytes, which counts kernel memory too; redis behind):
# the supervisor alone 9.4 MiB (rss 7.8, page cache 1.3, kernel 0.2); its metrics process
# 12-13 MiB more after scrapes (USS 15 MiB at 100 connections); each idle connection
# 0.57-0.59 MiB (rss 0.45, kernel 0.13: page tables, stack), each one moving data at full
# speed (4 MiB redis GETs, splice) 0.72-0.78 MiB. Socket buffers were not in those (v1
# charges them apart); cgroup v2 charges them to the limit: ~0.19 MiB per connection at
# full speed (ss -m). So 1 MiB per connection, and the supervisor's room includes a
# status reporter and a resolver child: at 64 MiB, 36 connections moving data at full
# speed, with a `check` and a `status` (COMMANDS_MEMORY) run beside them, peaked at 48 MiB
# (v1; ~7 MiB more of socket buffers on v2).
SUPERVISOR_MEMORY = 12 * MiB
METRICS_MEMORY = 16 * MiB
CHILD_MEMORY = 1 * MiB
# The commands run inside the container while it serves, charged to the same limit: the
# image's HEALTHCHECK `forkproxy check` (every 30 s) and one operator's `docker exec ...
# forkproxy status` at the same time (as OWN_PIDS counts them). Both run without typer
# (console.py's lean path). Measured as above, each command alone in a fresh v1 memory
# cgroup (memory.max_usage_in_bytes, its package's files dropped from the page cache
# first), installed from the wheel, Python 3.11 and 3.13 alike: `check` 6.1-6.3 MiB,
# `status` 8.1-8.3 MiB at 52 connections (~1.5 MiB more at 500, where the limit leaves
# more room than this); in the image at 64 MiB with 36 connections, 6.3 and 8.3 MiB
# (podman healthcheck run, podman exec; memory.max_usage_in_bytes less the usage before).
# Through typer (any other argument: `reload`, `--status-socket`) each costs 18-20 MiB
# with typer 0.28, 25-28 MiB with cold files, and peaks at ~32 MiB with typer 0.29, which
# imports pydantic when a command runs. Without this room, one HEALTHCHECK at 64 MiB
# (52 idle connections) made the OOM killer take 13 of them.
COMMANDS_MEMORY = 16 * MiB
# What a pids limit (pids.max, docker run --pids-limit) must hold besides the connections,
# one each, for the --max-children derived from it (children_within_pids): pids.max counts every
# process and every thread in the cgroup, and past it a fork fails (`fork-failed`, the
# client held and retried) where a lower --max-children keeps clients in the backlog. At
# their most, at once: the supervisor; 2 resolver children (the next starts as soon as the
# last one's output is read, or it is killed at its deadline, before it is reaped; a third
# waits for a reap: supervisor.start_resolver); MAX_CLIENTS status reporters (one per
# control client answering `status`, the SIGUSR1 table writer among them:
# supervisor.MAX_REPORTERS); and 2 commands run inside the container (the image's
# HEALTHCHECK `forkproxy check`, an operator's `docker exec ... forkproxy status`).
OWN_PIDS = 1 + 2 + MAX_CLIENTS + 2
# With --metrics: its process, its deadline thread and one thread per scrape served at
# once (metrics.MAX_SCRAPES, 8; tests/test_memory_limit.py checks that this counts them).
METRICS_PIDS = 1 + 1 + 8
MAX_SECONDS = 2_000_000  # any duration: poll() waits at most 2**31 - 1 ms (~24.8 days)
ANY_IPV4 = "0.0.0.0"  # where a listener binds when nothing names an address (socat's TCP4-LISTEN)
# Extra connect attempts: the backoff alone is then 2N - 5 s (N >= 4; relay.connect_upstream),
# 1995 s here, ~33 min; more only keeps a client hanging and a --max-children slot taken.
MAX_CONNECT_RETRIES = 1000
MIN_RESOLVE_EVERY = 1.0  # seconds: the supervisor looks names up at most once a second
MIN_SECONDS = 0.001  # any other duration: poll() counts whole milliseconds
MAX_KEEPALIVE = 32767  # seconds: the kernel's limit for TCP_KEEPIDLE and TCP_KEEPINTVL
KEEPALIVE_PROBES = 3  # unanswered probes (TCP_KEEPCNT) before the kernel gives a peer up
RELAY_MODES = ("auto", "splice", "copy")
LOG_FORMATS = ("text", "json")


class Value:
    """An immutable record: equality, hash and repr by its fields, as a frozen dataclass.

    Not `dataclasses`: importing it brings `inspect`, `ast`, `dis` and `tokenize` into the
    supervisor, 1.9 MB of heap and five mappings more, whose page tables every fork copies
    and every child's exit tears down: ~5% of a new connection's CPU (docs/benchmarks.md).
    A subclass sets its fields in `__init__` with `_set`.
    """

    __slots__ = ()

    def _set(self, **fields: object) -> None:
        self.__dict__.update(fields)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(tuple(vars(self).values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: object) -> Self:
        """A copy with some fields changed (dataclasses.replace)."""
        return type(self)(**{**vars(self), **changes})


class ConfigError(Exception):
    """Bad input. The message is one line that names the input; the CLI exits 2 with it."""


class Endpoint(Value):
    """An upstream address: an IP literal or a host name, and a port."""

    host: str
    port: int

    def __init__(self, host: str, port: int) -> None:
        self._set(host=host, port=port)

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)

    def same_as(self, other: Endpoint) -> bool:
        """The same upstream: a name's letters compare without case, as DNS compares
        them (RFC 4343), so `redis` and `REDIS` in two variables are one target, not a
        clash. A trailing dot still differs: `redis.` skips the search domains."""
        if not self.is_name:  # an IP literal, parsed to one spelling; a zone's case counts
            return self == other
        return self.port == other.port and self.host.lower() == other.host.lower()

    @property
    def is_name(self) -> bool:
        """A host name to resolve, not an IP literal."""
        try:
            ipaddress.ip_address(self.host.split("%", 1)[0])
        except ValueError:
            return True
        return False


class Link(Value):
    """One listener and where it forwards: `bind:port -> target`, named by its sources."""

    # `name` is joined once, into a slot: a property joined `names` again at every read,
    # one per reap in the supervisor (Accounting.finished), ~700 instructions. Outside
    # __dict__, so equality, hash, repr and replace() see the four fields alone.
    __slots__ = ("__dict__", "name")

    bind: str
    port: int
    target: Endpoint
    names: tuple[str, ...]
    name: str

    def __init__(self, bind: str, port: int, target: Endpoint, names: tuple[str, ...]) -> None:
        self._set(bind=bind, port=port, target=target, names=names)
        object.__setattr__(self, "name", ",".join(names))

    def __reduce__(self) -> tuple[type[Link], tuple[str, int, Endpoint, tuple[str, ...]]]:
        """Copied (and pickled) by its fields, as before the slot: __init__ sets `name`."""
        return type(self), (self.bind, self.port, self.target, self.names)

    @property
    def key(self) -> tuple[str, int, tuple[str, ...]]:
        """What identifies the listening socket: links with the same key share it.

        Port 0 asks the kernel for a fresh port, so such a link is only ever itself.
        """
        return (self.bind, self.port, () if self.port else self.names)

    def describe(self, port: int | None = None) -> str:
        listen = join_host_port(self.bind, self.port if port is None else port)
        return f"{listen} -> {self.target} ({self.name})"


class LinkTable(Value):
    """The links, what was skipped (`warnings`), the variables that the env file and the
    environment both set to different values (`overrides`: the file's wins), and the
    option variables the env file holds, which it cannot set (`file_options`: (name as a
    log line shows it, what its warning says)), the loops through an address of this
    host's that may be ones (`loops`: own_address_loop's texts, one line each), and the
    links whose literal target no address of this host's can send to (`unreachable`:
    unreachable_links's texts, one line each)."""

    links: tuple[Link, ...]
    warnings: tuple[str, ...]
    overrides: tuple[str, ...]
    file_options: tuple[tuple[str, str], ...]
    loops: tuple[str, ...]
    unreachable: tuple[str, ...]

    def __init__(self, links: tuple[Link, ...], warnings: tuple[str, ...] = (),
                 overrides: tuple[str, ...] = (),
                 file_options: tuple[tuple[str, str], ...] = (),
                 loops: tuple[str, ...] = (), unreachable: tuple[str, ...] = ()) -> None:
        self._set(links=links, warnings=warnings, overrides=overrides,
                  file_options=file_options, loops=loops, unreachable=unreachable)


class Options(Value):
    """Everything `serve` takes besides the links. Validated by `check_options`."""

    relay: str
    connect_timeout: float
    connect_retries: int
    grace: float
    idle_timeout: float | None
    halfclose_timeout: float | None
    # TCP keepalive on both sockets of each connection: the first probe after this many
    # seconds of silence (whole seconds, the kernel's unit), then every max(1, SECONDS // 3)
    # seconds, KEEPALIVE_PROBES of them unanswered and the peer is given up (relay.serve).
    keepalive: int | None
    # TCP_USER_TIMEOUT on both sockets of each connection, in seconds (the kernel counts
    # milliseconds): how long sent bytes may stay unacknowledged, or a shut window stay
    # shut, before the kernel gives that peer up (relay.set_user_timeout).
    user_timeout: float | None
    resolve_every: float | None  # seconds between two resolutions of the targets' names
    max_children: int
    allow: tuple[str, ...]
    verbosity: int
    log_format: str
    status_socket: str | None
    metrics: str | None
    pid_file: str | None
    # The memory and pids limits of the process's cgroup, found at start (None: none, or
    # not looked for), and whether the operator chose max_children (flag or variable) or
    # it was derived from those limits (or is the default, with no limit).
    memory_limit: int | None
    max_children_given: bool
    pids_limit: int | None
    # The soft RLIMIT_NPROC (ulimit -u) when the kernel holds this user to it (None: no
    # limit, or root: exempt), and the user's processes and threads besides forkproxy
    # found at start: it counts all of them, in every session (children_within_nproc).
    nproc_limit: int | None
    nproc_others: int
    # Where the limits are read again when a fork fails (a pids.max written, `docker update
    # --pids-limit`, `prlimit --nproc` on the supervisor change them while it runs): the
    # pids.max files of the cgroup and its ancestors found at start, and whether the
    # kernel exempts this process from RLIMIT_NPROC (root: no limit to read again).
    pids_limit_files: tuple[str, ...]
    nproc_exempt: bool
    # Why a --max-children given could not be checked against the kernel's pid_max
    # (/proc/sys hidden: systemd's ProcSubset=pid), found by the CLI, said by the
    # supervisor at start (`pid-max-unknown`); None: checked, or nothing to check.
    pid_max_unread: str | None
    # --take-over: the control socket of the supervisor whose listeners this one takes
    # (found by the CLI, as `status` finds one), None for a plain start.
    take_over: str | None
    # FORKPROXY_ variables set at start that no option reads (a typo, FORKPROXY_ALLOWED,
    # serves every client): (name as shown, what the warning says), found by the CLI,
    # logged by the supervisor as its other start warnings (`unknown-variable`).
    unknown_variables: tuple[tuple[str, str], ...]
    # (variable, flag) of every option that a FORKPROXY_ variable sets, given by the CLI
    # (click knows them): an env file holding one is said (LinkTable.file_options), since
    # only the environment sets options and the file's line was ignored without a word.
    option_variables: tuple[tuple[str, str], ...]
    # serve's options that have no variable, on purpose (--take-over, --verbose): the env
    # file's FORKPROXY_TAKE_OVER is told so, as the environment's is (unknown_variables).
    flags_without_variable: tuple[str, ...]

    def __init__(
        self,
        relay: str = "auto",
        connect_timeout: float = 5.0,
        connect_retries: int = 0,
        grace: float = 8.0,
        idle_timeout: float | None = None,
        halfclose_timeout: float | None = None,
        keepalive: int | None = None,
        user_timeout: float | None = None,
        resolve_every: float | None = 30.0,
        max_children: int = DEFAULT_MAX_CHILDREN,
        allow: tuple[str, ...] = (),
        verbosity: int = 0,
        log_format: str = "text",
        status_socket: str | None = None,
        metrics: str | None = None,
        pid_file: str | None = None,
        memory_limit: int | None = None,
        max_children_given: bool = True,
        pids_limit: int | None = None,
        take_over: str | None = None,
        nproc_limit: int | None = None,
        nproc_others: int = 0,
        unknown_variables: tuple[tuple[str, str], ...] = (),
        option_variables: tuple[tuple[str, str], ...] = (),
        pids_limit_files: tuple[str, ...] = (),
        nproc_exempt: bool = False,
        pid_max_unread: str | None = None,
        flags_without_variable: tuple[str, ...] = (),
    ) -> None:
        # Interned: then "auto" is the very object that is the constant relay.Flow compares
        # it with, so a child reading both writes one reference count, not two on two
        # pages (docs/benchmarks.md, "Page faults per connection").
        self._set(
            relay=sys.intern(relay) if isinstance(relay, str) else relay,
            connect_timeout=connect_timeout, connect_retries=connect_retries,
            grace=grace, idle_timeout=idle_timeout, halfclose_timeout=halfclose_timeout,
            keepalive=keepalive, user_timeout=user_timeout, resolve_every=resolve_every,
            max_children=max_children, allow=allow, verbosity=verbosity, log_format=log_format,
            status_socket=status_socket, metrics=metrics, pid_file=pid_file,
            memory_limit=memory_limit, max_children_given=max_children_given,
            pids_limit=pids_limit, take_over=take_over, nproc_limit=nproc_limit,
            nproc_others=nproc_others, unknown_variables=unknown_variables,
            option_variables=option_variables, pids_limit_files=pids_limit_files,
            nproc_exempt=nproc_exempt, pid_max_unread=pid_max_unread,
            flags_without_variable=flags_without_variable,
        )


class Sources(Value):
    """Where the links come from; kept so that a reload can read them again."""

    specs: tuple[str, ...]
    from_env: bool
    env_file: str | None
    options: Options
    bind: str  # where listeners bind when nothing names an address (link variables, SPECs)
    # --alias: the aliases whose link variables are taken, as variable names spell them
    # (parse_aliases); none: every link variable.
    aliases: tuple[str, ...]

    def __init__(
        self,
        specs: tuple[str, ...] = (),
        from_env: bool = False,
        env_file: str | None = None,
        options: Options | None = None,
        bind: str = ANY_IPV4,
        aliases: tuple[str, ...] = (),
    ) -> None:
        self._set(specs=specs, from_env=from_env, env_file=env_file,
                  options=Options() if options is None else options, bind=bind,
                  aliases=aliases)


def own_memory(metrics: bool) -> int:
    """What a memory limit must hold besides the connections: the supervisor's room, the
    commands run beside it (COMMANDS_MEMORY), and the metrics process's with --metrics."""
    return SUPERVISOR_MEMORY + COMMANDS_MEMORY + (METRICS_MEMORY if metrics else 0)


def room_for_children(memory_limit: int, metrics: bool) -> int:
    """How many connections fit a memory limit beside the supervisor (and its metrics
    process), unbounded: 0 or less when there is no room for one."""
    return (memory_limit - own_memory(metrics)) // CHILD_MEMORY


def children_that_fit(memory_limit: int, metrics: bool) -> int:
    """Connections that fit a memory limit: room_for_children, 0 or more. Not capped at
    DEFAULT_MAX_CHILDREN (as children_within_pids is not): a --max-children given is
    compared with it, and `--max-children 2000` under 4 GiB was told "about 1024 fit"
    where ~4084 do. The derived value is capped apart (derived_max_children)."""
    return max(0, room_for_children(memory_limit, metrics))


def own_pids(metrics: bool) -> int:
    """What a pids limit must hold besides the connections: OWN_PIDS, and METRICS_PIDS
    with --metrics."""
    return OWN_PIDS + (METRICS_PIDS if metrics else 0)


def children_within_pids(pids_limit: int, metrics: bool) -> int:
    """How many connections a pids limit holds beside forkproxy's own processes and
    threads, 0 or more; not capped at DEFAULT_MAX_CHILDREN: a --max-children given is
    compared with it."""
    return max(0, pids_limit - own_pids(metrics))


def children_within_nproc(nproc_limit: int, others: int, metrics: bool) -> int:
    """How many connections RLIMIT_NPROC holds, 0 or more, not capped (as
    children_within_pids): the kernel counts every process and thread of the user (by
    real uid), in every session, so besides forkproxy's own (own_pids) the `others` the
    user ran at start. Past it a fork fails with EAGAIN, as at a pids limit, and the
    metrics process cannot start a thread to answer a scrape."""
    return max(0, nproc_limit - others - own_pids(metrics))


def limiting_fits(memory_fit: int | None, pids_fit: int | None,
                  nproc_fit: int | None = None) -> dict[str, int]:
    """The limits that bound a derived --max-children, "memory", "pids" and "nproc", each
    with how many connections it holds (as Supervisor.memory_fit, .pids_fit and
    .nproc_fit say, uncapped). A memory limit always does (one that holds more than the
    default then says it was looked at, and the default, 1024, is what fits it); a pids
    or nproc limit only below DEFAULT_MAX_CHILDREN: systemd gives every service a pids
    limit (TasksMax, thousands), most distributions every user an nproc one (~60,000),
    and a limit that changes nothing is no news."""
    fits = {} if memory_fit is None else {"memory": memory_fit}
    for name, fit in (("pids", pids_fit), ("nproc", nproc_fit)):
        if fit is not None and fit < DEFAULT_MAX_CHILDREN:
            fits[name] = fit
    return fits


def derived_max_children(memory_limit: int | None, pids_limit: int | None,
                         metrics: bool, nproc_limit: int | None = None,
                         nproc_others: int = 0) -> int:
    """The --max-children when the operator gave none: as many connections as the
    memory, the pids and the nproc limit all hold, 1 to DEFAULT_MAX_CHILDREN."""
    fits = limiting_fits(
        None if memory_limit is None else children_that_fit(memory_limit, metrics),
        None if pids_limit is None else children_within_pids(pids_limit, metrics),
        None if nproc_limit is None else children_within_nproc(nproc_limit, nproc_others,
                                                               metrics))
    return max(1, min([DEFAULT_MAX_CHILDREN, *fits.values()]))


def limits_named(fits: Mapping[str, int]) -> list[str]:
    """Which of `limiting_fits` a derived --max-children came from: the one holding the
    fewest connections, or each that holds as few."""
    least = min(fits.values(), default=None)
    return [name for name, fit in fits.items() if fit == least]


def limits_text(named: Sequence[str], memory_limit: int | None, pids_limit: int | None,
                nproc_limit: int | None = None) -> str:
    """The limits `named` ("memory", "pids", "nproc") in words, for the start line and
    `status` alike: `the memory limit of 64 MiB and the pids limit of 73`, `the nproc
    limit of 30` (ulimit -u, as prlimit, limits.conf and systemd's LimitNPROC name it)."""
    words = {"memory": f"the memory limit of {mebibytes(memory_limit or 0)}",
             "pids": f"the pids limit of {pids_limit}",
             "nproc": f"the nproc limit of {nproc_limit}"}
    return " and ".join(words[name] for name in named)


def no_room_text(named: Sequence[str], memory_limit: int | None,
                 pids_limit: int | None, nproc_limit: int | None = None) -> str:
    """`the memory limit of 20 MiB leaves no room for connections` (`leave`, for two)."""
    verb = "leave" if len(named) > 1 else "leaves"
    return (f"{limits_text(named, memory_limit, pids_limit, nproc_limit)} {verb} no room "
            "for connections")


def mebibytes(size: int) -> str:
    """A memory limit for a log line: `64 MiB`, `95.4 MiB`."""
    return f"{size / MiB:.1f} MiB" if size % MiB else f"{size // MiB} MiB"


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_text(address: tuple[object, ...]) -> str:
    """A socket address tuple as `host:port` (`[host]:port` for IPv6, `[host%3]:port`
    for one with a scope: a link-local peer, which the interface's index tells apart)."""
    host = str(address[0])
    if len(address) > 3 and address[3]:
        # The index, not the interface's name: exact, and no system call to find it.
        host = f"{host}%{address[3]}"
    return join_host_port(host, address[1])  # type: ignore[arg-type]


def name_variable(message: str, variables: Mapping[str, str],
                  environ: Mapping[str, str] | None = None) -> str:
    """An error naming the variable its value came from, not only the flag:
    `--allow 'x': ...` -> `FORKPROXY_ALLOW (--allow) 'x': ...`.

    `variables` maps each flag whose value came from the environment to its variable.
    Every error about an option's value begins with the flag and a space; whoever set the
    variable in a compose file never typed that flag. The env file's errors name it as
    `env file 'PATH'` instead: those name FORKPROXY_ENV_FILE when the path came from it
    (`cannot read FORKPROXY_ENV_FILE (--env-file) 'PATH': ...`). With `environ`, a
    variable's value in quotes is told to lose them (quotes_kept)."""
    flag, space, rest = message.partition(" ")
    variable = variables.get(flag)
    if variable:
        return f"{variable} ({flag}){space}{rest}{quotes_kept(variable, environ)}"
    variable = variables.get("--env-file")
    if variable:  # the env file's errors name it as `env file 'PATH'`: so does the variable
        named = _ENV_FILE_ERROR.sub(lambda m: f"{m[1] or ''}{variable} (--env-file) ",
                                    message, count=1)
        return named + (quotes_kept(variable, environ) if named != message else "")
    return message


# What a value in quotes is told: a link variable's (parse_link_value) and an option
# variable's (quotes_kept) alike. `docker run --env-file` and Compose's list form of
# `environment:` (`- FORKPROXY_BIND="0.0.0.0"`) keep quotes; Compose's env_file and a
# shell remove them, so one file or line read two ways.
_LITERAL = "values are taken literally, as `docker run --env-file` does: remove the quotes"
_QUOTES = ("'", '"')


def quotes_kept(variable: str, environ: Mapping[str, str] | None) -> str:
    """`: values are taken literally ...: remove the quotes` when `variable`'s value in
    `environ` begins or ends with a quote (the error at hand is about that value), else
    ''. The quotes were kept by whatever set the variable, and forkproxy takes them as
    part of the value, as Docker does: an address, a path or a number in quotes is none."""
    value = (environ or {}).get(variable, "")
    return f": {_LITERAL}" if value[:1] in _QUOTES or value[-1:] in _QUOTES else ""


# Where an error about the env file names it (`env file 'PATH': not a regular file`,
# `cannot read env file 'PATH': ...`, `env file 'PATH', line 3: ...`, `no links found:
# ... in env file 'PATH'`): fixed words before the path, never a user's value.
_ENV_FILE_ERROR = re.compile(
    r"^(cannot read |no links found: [^'\"]* in (?:the environment or )?)?env file (?=['\"])")


def shorten(text: str) -> str:
    """Cut a user's text to 80 characters for a line that names it."""
    return text if len(text) <= 80 else text[:77] + "..."


def quoted(text: str) -> str:
    """Quote user input for an error line, keeping it on one line and short."""
    return repr(shorten(text))


def printable(text: str) -> str:
    """`text` as it is when a terminal shows each of its characters as itself, else
    quoted with JSON's escapes: ESC, BEL and the other C0 and C1 controls, DEL, tab, bidi
    overrides (U+202E), U+2028, a lone surrogate (which no encoder writes) ... Text from
    outside (a log value, a reply on the control socket) written raw could clear,
    recolour or retitle the screen, or show as something else.

    Here, not in log.py, which uses it: `status` (console.py's lean path) imports this
    module anyway, and log.py's Logger would cost it ~40 KB more."""
    return text if text.isprintable() else json.dumps(text)


def parse_port(text: str, what: str, *, allow_zero: bool = False) -> int:
    """A decimal port number; leading zeros are ignored (`0080` is 80), as in counts."""
    if not text.isascii() or not text.isdigit():
        raise ConfigError(f"{what}: port {quoted(text)} is not a number")
    # Judge the value, not the length of the text: past five significant digits the
    # number is above 65535 whatever zeros lead it (and int() of a long string is slow).
    significant = text.lstrip("0") or "0"
    low = 0 if allow_zero else 1
    if len(significant) > 5 or not low <= int(significant) <= 65535:
        raise ConfigError(f"{what}: port {quoted(text)} is out of range ({low}-65535)")
    return int(significant)


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
# A part of an address to libc's inet_aton: decimal, octal (leading 0) or hex (0x).
_NUMBER_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]+")
# An IPv6 zone is an interface name or index (IFNAMSIZ is 16 with the NUL). ipaddress
# accepts any text after '%', spaces, '$(...)' and newlines included.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")


def _check_zone(text: str, what: str) -> None:
    _, sep, zone = text.partition("%")
    if sep and not _ZONE.match(zone):
        raise ConfigError(f"{what}: {quoted(text)} has a bad IPv6 zone (an interface name)")
    link_local = ipaddress.IPv6Address(text).is_link_local
    if sep and not link_local:
        # Linux ignores a scope id on any other address, in bind() and connect() alike
        # (even one of no interface): `[::1%lo]` would listen on, or connect to, ::1 on
        # whatever interface, and a target's named zone (%lo) getaddrinfo does not even
        # parse there, failing every connection. Said now, for binds and targets alike.
        raise ConfigError(f"{what}: {quoted(text)} is not link-local (fe80::/10), the only "
                          f"addresses a zone applies to: drop the '%{zone}'")
    if not sep and link_local:
        # Linux refuses to bind or connect to one without its interface (EINVAL): say so
        # now rather than "Invalid argument" at start, or at every connection.
        raise ConfigError(f"{what}: {quoted(text)} is link-local: it needs a zone, "
                          f"as in [{text}%eth0]")


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _check_unicast(address: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str,
                   what: str, why: str = "TCP cannot connect to it") -> None:
    """ConfigError for a target (or listening address: parse_bind, with its own `why`)
    no TCP connection can reach: a multicast address, or the broadcast address (also as
    ::ffff:a.b.c.d). Linux refuses to connect to one ("Network
    is unreachable") without a packet sent: each connection failed, each logged. The
    unspecified addresses (0.0.0.0, ::) are not refused: Linux connects them to this
    host, as it does 127.0.0.1 (::1)."""
    ip = getattr(address, "ipv4_mapped", None) or address
    if ip.is_multicast:
        kind = "a multicast address"
    elif ip == _BROADCAST:
        kind = "the broadcast address"
    else:
        return
    raise ConfigError(f"{what}: {quoted(text)} is {kind}: {why}")


def address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as forkproxy writes it: str(), but an IPv4-mapped IPv6 address always as
    ::ffff:a.b.c.d. Python 3.13 writes it so, as the kernel does in the addresses it
    reports (clients, resolved targets); 3.11 and 3.12 wrote ::ffff:7f00:1, so the image
    (3.13) and a 3.11 install said a listener two ways, and 3.11 said one two ways."""
    mapped = getattr(address, "ipv4_mapped", None)
    return str(address) if mapped is None else f"::ffff:{mapped}"


def parse_host(text: str, what: str) -> str:
    """An IP literal (IPv6 already without brackets) or a DNS name."""
    if not text:
        raise ConfigError(f"{what}: the host is empty")
    if ":" in text:
        try:
            address = ipaddress.IPv6Address(text)
        except ValueError:
            raise ConfigError(f"{what}: {quoted(text)} is not an IPv6 address") from None
        _check_unicast(address, text, what)  # first: ff02::1%eth0 is multicast, zone or not
        _check_zone(text, what)
        return address_text(address)
    try:
        address4 = ipaddress.IPv4Address(text)
    except ValueError:
        pass
    else:
        _check_unicast(address4, text, what)
        return str(address4)
    name = text[:-1] if text.endswith(".") else text
    if len(name) > MAX_NAME:  # the name's: a trailing dot (fully qualified) is not part of it
        raise ConfigError(f"{what}: host name is longer than {MAX_NAME} characters")
    if not all(_LABEL.match(label) for label in name.split(".")):
        raise ConfigError(f"{what}: {quoted(text)} is not a valid host name or address"
                          f"{_ascii_form(name)}")
    labels = name.split(".")
    if all(_NUMBER_LABEL.fullmatch(label) for label in labels):
        # getaddrinfo would take '0x7f.1', '127.1' or '017.0.0.1' for an address
        # (127.0.0.1, 15.0.0.1) without looking anything up: only a dotted quad is one here.
        raise ConfigError(f"{what}: {quoted(text)} is not a valid IPv4 address "
                          f"({_not_a_quad(text, labels)})")
    if labels[-1].isdigit():
        # RFC 1123 2.1: the last label of a host name is never all digits.
        raise ConfigError(f"{what}: {quoted(text)} is not a valid host name "
                          "(its last label is all digits)")
    return text


def _not_a_quad(text: str, labels: list[str]) -> str:
    """Why `text`, all numbers, is no address here: what was typed that is not a.b.c.d."""
    if len(labels) == 4 and all(label.isdigit() for label in labels):
        if text.endswith("."):
            return "an address takes no trailing dot"
        for label in labels:
            if len(label) > 1 and label.startswith("0"):
                return f"no leading zeros: getaddrinfo would read {label} as octal"
    return "four decimal numbers from 0 to 255, a.b.c.d"


def _ascii_form(name: str) -> str:
    """For an internationalized name: ` (write it in its ASCII form, 'xn--...')`."""
    if name.isascii():
        return ""
    try:
        ascii_name = name.encode("idna").decode("ascii")  # IDNA 2003, as glibc's AI_IDN
    except UnicodeError:
        return ""
    if not all(_LABEL.match(label) for label in ascii_name.split(".")):
        return ""  # not a name in either form: a space, say
    return f" (write it in its ASCII form, {quoted(ascii_name)})"


def split_host_port(text: str, what: str) -> tuple[str, str]:
    """`host:port` or `[v6]:port` -> (host, port text); brackets are required for IPv6."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{what}: unclosed '[' in {quoted(text)}")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise ConfigError(f"{what}: expected ':PORT' after ']' in {quoted(text)}")
        if not host:
            raise ConfigError(f"{what}: empty IPv6 address in {quoted(text)}")
        if ":" not in host:
            raise ConfigError(f"{what}: {quoted(host)} in brackets is not an IPv6 address")
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{what}: expected HOST:PORT, got {quoted(text)}")
    if ":" in host:
        raise ConfigError(f"{what}: IPv6 addresses must be in brackets, as in [fd00::5]:6379")
    return host, port


def parse_bind(text: str, what: str) -> str:
    """A listening address. A multicast or the broadcast one is refused as for a target:
    Linux binds a TCP listener to 224.0.0.1 or 255.255.255.255 and it starts, but no SYN
    to such an address is ever taken: a proxy that looked up and was never reached."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(
            f"{what}: bind address {quoted(text)} is not an IP address"
        ) from None
    _check_unicast(address, text, what, "no TCP client can connect to a listener there")
    if ":" in text:
        _check_zone(text, what)
    return address_text(address)


def parse_spec(spec: str, bind: str = ANY_IPV4) -> Link:
    """`[BIND_ADDR:]LISTEN_PORT=HOST:PORT` (IPv6 in brackets) -> Link; with no BIND_ADDR,
    it listens on `bind` (--bind): a user who restricts the listeners with it means all of
    them, and a SPEC listening on every interface regardless exposed what they meant to hide.

    A SPEC that does not parse but reads as another tool's syntax (a link value's scheme,
    socat's addresses, docker's `-p`) gets an error that says how to write it instead: the
    generic one ("IPv6 addresses must be in brackets" for `7200=tcp://...`) misled."""
    try:
        return _parse_spec(spec, bind)
    except ConfigError:
        hint = _spec_hint(spec)
        if hint is None:
            raise
        raise ConfigError(f"SPEC {quoted(spec)}: {hint}") from None


def _parse_spec(spec: str, bind: str) -> Link:
    what = f"SPEC {quoted(spec)}"
    left, sep, right = spec.partition("=")
    if not sep:
        raise ConfigError(f"{what}: expected [BIND_ADDR:]LISTEN_PORT=HOST:PORT")
    if not left:
        raise ConfigError(f"{what}: the listen port is missing before '='")
    if not right:
        raise ConfigError(f"{what}: the upstream HOST:PORT is missing after '='")
    if ":" not in left:
        port_text = left
    else:
        bind_text, port_text = split_host_port(left, what)
        bind = parse_bind(bind_text, what)
    listen_port = parse_port(port_text, what, allow_zero=True)
    host_text, target_port = split_host_port(right, what)
    target = Endpoint(parse_host(host_text, what), parse_port(target_port, what))
    return Link(bind, listen_port, target, (spec,))


# A URL scheme (RFC 3986: a letter, then letters, digits, +, ., -), tried only where a run
# of those characters begins: without the lookbehind a search tried every position of a
# long run again to its end, quadratic (31 s for a SPEC of 131,000 letters, argv's most).
_SCHEME = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://")
# socat's listening address (TCP-LISTEN, TCP4-L, ...: socat takes the abbreviation), its
# IP version and its options, and its connecting one (TCP:HOST:PORT, TCP4:..., TCP6:...).
_SOCAT_LISTEN = re.compile(r"(?i)TCP([46]?)-L(?:ISTEN)?:([^,\s]*)((?:,[^\s]*)?)")
_SOCAT_CONNECT = re.compile(r"(?i)(?:^|\s)TCP[46]?:([^,\s]+)")
_USE_EQUALS = "use '=' between the listen port and the target"
_SOCAT = f"socat syntax: write one SPEC, [BIND_ADDR:]LISTEN_PORT=HOST:PORT ({_USE_EQUALS})"


def _spec_hint(spec: str) -> str | None:
    """What a SPEC that failed to parse most likely meant, as one line, or None."""

    def parses(candidate: str) -> bool:
        try:
            _parse_spec(candidate, ANY_IPV4)
        except ConfigError:
            return False
        return True

    scheme = _SCHEME.search(spec)
    if scheme is not None:  # a link variable's value pasted: `7200=tcp://HOST:PORT`
        name = scheme[0]
        without = _SCHEME.sub("", spec)
        tcp_only = " (forkproxy proxies TCP only)" if name.lower() in ("udp://", "sctp://") else ""
        example = f", as in {without}" if parses(without) else ""
        return (f"a SPEC takes no scheme: drop {name!r}{tcp_only}; "
                f"expected [BIND_ADDR:]LISTEN_PORT=HOST:PORT{example}")
    dash = typographic_option(spec)
    if dash is not None:
        return dash
    several = _several_specs(spec, parses)
    if several is not None:  # `"$SPECS"` quoted, or a list joined by commas
        shown = " ".join(several[:3]) + (" ..." if len(several) > 3 else "")
        return (f"{len(several)} SPECs in one argument: give each as an argument of its "
                f"own, as in `serve {shown}`")
    listen = _SOCAT_LISTEN.match(spec)
    connect = _SOCAT_CONNECT.search(spec)
    if listen is not None:  # socat's `TCP4-LISTEN:6379,fork,bind=ADDR [TCP4:HOST:PORT]`
        options = dict(option.partition("=")[::2] for option in listen[3].split(",")[1:])
        address = options.get("bind", "")
        if address.startswith("[") and address.endswith("]"):  # socat's `bind=[::1]`
            address = address[1:-1]
        elif not address and listen[1] == "6":
            # TCP6-LISTEN listens on IPv6's any address; a SPEC without one, on --bind's,
            # 0.0.0.0 (IPv4 only) unless told.
            address = "::"
        example = (f"{join_host_port(address, 0)[:-1] if address else ''}{listen[2]}="
                   f"{connect[1] if connect is not None else 'HOST:PORT'}")
        if not parses(example.replace("HOST:PORT", "h:1")):
            example = "LISTEN_PORT=HOST:PORT"
        return f"{_SOCAT}: {example}"
    if connect is not None and "=" not in spec:  # socat's connecting address alone
        target = connect[1] if parses(f"1={connect[1]}") else "HOST:PORT"
        return f"{_SOCAT}: LISTEN_PORT={target}"
    if "=" not in spec and ":" in spec:  # docker's `-p 6379:HOST:PORT`, say
        parts = spec.split(":")
        # Two bracketed IPv6 addresses and their ports are at most 20 parts; more is no
        # SPEC, and trying every cut of it would be quadratic in its length.
        for cut in range(1, len(parts) if len(parts) <= 20 else 1):
            candidate = f"{':'.join(parts[:cut])}={':'.join(parts[cut:])}"
            if parses(candidate):
                return (f"expected [BIND_ADDR:]LISTEN_PORT=HOST:PORT: {_USE_EQUALS}, "
                        f"as in {candidate}")
        return f"expected [BIND_ADDR:]LISTEN_PORT=HOST:PORT: {_USE_EQUALS}"
    return None


_SPEC_SEPARATORS = re.compile(r"[\s,;]+")
# An option whose hyphens a word processor or a web page made typographic: one or two of
# U+2010 to U+2015 (hyphen, non-breaking hyphen, figure dash, en dash, em dash, horizontal
# bar) or U+2212 (minus), then an option's name.
# An ASCII hyphen may come first (then an en dash: one typed, the other a word
# processor's), and the option's name in any case (a page's heading style): said in
# lower case.
_TYPOGRAPHIC_OPTION = re.compile(
    r"(-?[\u2010-\u2015\u2212]{1,2}-?)([A-Za-z][A-Za-z-]*)(?:=.*)?\Z", re.DOTALL)


def typographic_option(arg: str, options: Collection[str] | None = None,
                       command: str = "forkproxy",
                       owners: Callable[[str], Sequence[str]] | None = None) -> str | None:
    """What is wrong with `arg` when it is an option whose hyphens are typographic
    (an em dash before `from-env`, an en dash before `v`: pasted from a page that set
    `--` as a dash), or None. The one place for every command: serve and links read such
    an argument as a SPEC (_spec_hint), the others had click's "extra argument" or "no
    such command". `options`: the option names `command` has, when known; the option
    said to be meant is one of them (`status —j` was told "as in -j", which status
    has not); `owners`: the other commands that have an option, named where `command`
    has not (`check —json`)."""
    dash = _TYPOGRAPHIC_OPTION.match(arg)
    if dash is None:
        return None
    # Named by the first character that is no ASCII hyphen.
    typographic = dash[1].lstrip("-")
    said = f"{typographic!r} (U+{ord(typographic[0]):04X}) is no hyphen"
    name = dash[2] if len(dash[2]) == 1 else dash[2].lower()  # -V is not -v; --JSON is
    written = f"-{name}" if len(name) == 1 else f"--{name}"
    if options is not None and written not in options:
        others = owners(written) if owners is not None else ()
        if others:
            return (f"{said}, and {written} is an option of {and_list(others)}, "
                    f"not of {command}")
        meant = _option_meant(name, options, command)
        return f"{said}, and {command} has no option {written}: {meant}"
    if len(name) == 1:  # a short option (-v, -q): one hyphen
        return f"{said}: a short option is written with one ASCII hyphen, as in -{name}"
    return f"{said}: an option is written with two ASCII hyphens, as in --{name}"


def _option_meant(name: str, options: Collection[str], command: str) -> str:
    """The option of `options` that `name` (typed after typographic dashes, without
    them) most likely meant, or where the command's options are listed."""
    longs = sorted(option for option in options if option.startswith("--"))
    # `—j`, `—stat`: the start of one long option's name (a page's dash for `--`).
    near = [option for option in longs if option[2:].startswith(name.lower())]
    if len(near) != 1:
        nearest = _nearest(f"--{name.lower()}", longs)
        near = [nearest] if nearest is not None else []
    if near:
        return f"did you mean {near[0]}?"
    return f"its options are in `{command} --help`"


def _several_specs(spec: str, parses: Callable[[str], bool]) -> list[str] | None:
    """The SPECs `spec` holds when it is two or more, each of which parses, separated by
    whitespace, commas or semicolons; else None. Without this, `6379=a:6379 6380=b:6380`
    (a quoted "$SPECS", a compose `command` string) was told that IPv6 addresses must be
    in brackets: the rest of the line read as the target's host."""
    parts = [part for part in _SPEC_SEPARATORS.split(spec) if part]
    # The first 64 judged: past them a hint costs more than it tells (~40 us a part: 1 s
    # for the 21,000 SPECs that argv's longest argument holds).
    if len(parts) < 2 or not all(parses(part) for part in parts[:64]):
        return None
    return parts


# <ALIAS>_PORT_<N>_<PROTO>; ALIAS may itself contain _PORT_ (greedy match takes the last).
# Docker upper-cases the alias and turns '-' into '_' but leaves '.': `--link db:app.db`
# exports APP.DB_PORT_5432_TCP. (The original ambassador never saw such a name, nor one
# that starts with a digit: its shell, busybox sh, drops from the environment the names
# that are not shell identifiers before `env | sed` runs. forkproxy takes them.)
_PORT_AND_PROTO = r"_PORT_(?P<port>[0-9]+)_(?P<proto>TCP|UDP|SCTP)\Z"
_LINK_VAR = re.compile(r"(?P<alias>[A-Za-z0-9_.]+)" + _PORT_AND_PROTO)
# A name shaped like one whose alias holds other characters: `redis-cache_PORT_6379_TCP`,
# written by hand (Docker writes the alias with '-' as '_'). Skipped, with a warning.
_NEAR_LINK_VAR = re.compile(r"(?P<alias>.+)" + _PORT_AND_PROTO, re.DOTALL)
_SERVICE_PORT = "_SERVICE_PORT_"  # Kubernetes' <SVC>_SERVICE_PORT_<PORT NAME>


def parse_link_value(name: str, value: str, proto: str, from_file: bool = False) -> Endpoint:
    what = f"variable {name}"
    scheme = proto.lower() + "://"
    if not value.startswith(scheme):
        # `KEY="tcp://..."`: Compose's env_file removes the quotes, `docker run --env-file`
        # does not, and neither does forkproxy (the same file may feed both): say why.
        quotes = ("" if value[:1] not in _QUOTES else
                  f": {_LITERAL}" if from_file else ": remove the quotes")
        raise ConfigError(f"{what}: expected {scheme}HOST:PORT, got {quoted(value)}{quotes}")
    host_text, port_text = split_host_port(value[len(scheme) :], what)
    if not host_text and not from_file:
        # Docker's links.go writes the linked container's IPv4 address: empty for a
        # container that has none (an IPv6-only network).
        raise ConfigError(f"{what}: the host is empty, as Docker writes it for a linked "
                          "container without an IPv4 address: set the variable yourself "
                          f"(-e {name}=tcp://NAME:PORT)")
    return Endpoint(parse_host(host_text, what), parse_port(port_text, what))


# A --alias value: the ALIAS of `docker run --link NAME:ALIAS` (Docker's own rule is
# wider, but a variable name holds only these: see _LINK_VAR).
_ALIAS = re.compile(r"[A-Za-z0-9_.-]+\Z")


def parse_aliases(texts: Iterable[str]) -> tuple[str, ...]:
    """--alias's values -> the aliases they select, spelled as variable names spell them
    (upper case, '-' as '_', as Docker and Kubernetes write them), in order, once each.
    A value may name several, separated by commas (FORKPROXY_ALIAS: spaces too)."""
    aliases: list[str] = []
    for text in texts:
        if not text.strip():
            # FORKPROXY_ALIAS emptied by a template: unset it means every link variable,
            # which is not what a selection left empty by mistake should open.
            raise ConfigError(f"--alias {quoted(text)}: empty: name an alias (without --alias "
                              "and FORKPROXY_ALIAS every link variable is taken)")
        # Empty parts dropped: FORKPROXY_ALIAS="redis, db" reaches here as 'redis,' and
        # 'db' (click splits a variable at whitespace).
        for part in [part for part in text.split(",") if part] or [text]:
            if ":" in part:
                raise ConfigError(f"--alias {quoted(text)}: give the alias alone: for "
                                  "`docker run --link NAME:ALIAS`, the ALIAS")
            if not _ALIAS.match(part):
                raise ConfigError(f"--alias {quoted(text)}: not a link alias (letters, "
                                  "digits, '_', '-', '.'; several separated by commas)")
            alias = _alias_key(part)
            if alias not in aliases:
                aliases.append(alias)
    return tuple(aliases)


def _alias_key(alias: str) -> str:
    """An alias as Docker writes it in its variables' names: upper case, '-' as '_'."""
    return alias.upper().replace("-", "_")


def links_from_env(
    environ: Mapping[str, str], origin: str = "", bind: str = ANY_IPV4,
    aliases: Sequence[str] = (),
) -> tuple[list[Link], list[str]]:
    """Docker link variables -> links (by alias, then port) and warnings; each listens on
    `bind` (all IPv4 interfaces unless --bind says otherwise, as the ambassador's socat did).

    `<ALIAS>_ENV_<...>` variables are a linked container's own environment re-exported
    by Docker (an ambassador linked to an ambassador sees them): they are not links,
    unless `aliases` (--alias) names theirs. With `aliases`, only their variables are read:
    the others (every Kubernetes service's, say) are not even parsed.
    """
    links: list[Link] = []
    # Not proxied, by alias and protocol: a container that exposes a UDP port range
    # (EXPOSE 10000-10999/udp) has a variable per port, and gets one line, not 1,000.
    skipped: dict[tuple[str, str], list[str]] = {}
    warnings = []
    for name in sorted(environ, key=_alias_then_port):
        match = _LINK_VAR.match(name)
        if match is None:
            near = _NEAR_LINK_VAR.match(name)
            if near is not None and (not aliases or _alias_key(near["alias"]) in aliases):
                label = f"{quoted(name)} ({origin!r})" if origin else quoted(name)
                warnings.append(f"variable {label}: not a link variable: an alias is letters, "
                                "digits, '_' and '.' (Docker writes '-' as '_'); skipped")
            continue
        value = environ[name]
        if (_SERVICE_PORT in match["alias"] + "_PORT_" and value.isascii()
                and value.isdigit()):
            # Kubernetes' <SVC>_SERVICE_PORT_<PORT NAME>=<port> for a port named `8080-tcp`
            # (what `oc new-app` names them), or `port-5432-tcp`, `x-port-5432-tcp` (the
            # alias then ends in, or holds, _SERVICE_PORT_): a port number, never a link.
            continue
        if aliases:
            if match["alias"].upper() not in aliases:
                continue
        elif _is_reexport(name):
            continue
        # Shortened, as values are (quoted()): a name is any length the environment holds.
        shown = shorten(name)
        label = f"{shown} ({origin!r})" if origin else shown  # quoted: a path may hold a newline
        if match["proto"] != "TCP":  # Docker writes _UDP and _SCTP variables too
            skipped.setdefault((match["alias"], match["proto"]), []).append(label)
            continue
        port = parse_port(match["port"], f"variable {label}")
        target = parse_link_value(label, value, match["proto"], bool(origin))
        links.append(Link(bind, port, target, (name,)))
    for (alias, proto), labels in skipped.items():
        more = (f" and {len(labels) - 1} more {shorten(alias)}_PORT_<N>_{proto}"
                if len(labels) > 1 else "")
        warnings.append(f"{labels[0]}{more}: {proto} links are not proxied; skipped")
    return links, warnings


def _alias_then_port(name: str) -> tuple[str, int, str, str]:
    """The order link variables are read in: by alias, then by port as a number
    (`X_PORT_443_TCP` before `X_PORT_10000_TCP`, which text order puts first). Compared as
    digits, not int(): a port of 5,000 digits is an error to report, not a ValueError."""
    match = _LINK_VAR.match(name)
    if match is None:
        return "", 0, "", name  # not a link variable: never read
    digits = match["port"].lstrip("0")
    return match["alias"], len(digits), digits, name


def _is_reexport(name: str) -> bool:
    """An `<ALIAS>_ENV_..._PORT_<N>_TCP` (any protocol): a linked container's own variable
    that Docker re-exports, not a link (see links_from_env)."""
    match = _LINK_VAR.match(name)
    return match is not None and "_ENV_" in match["alias"] + "_"


def parse_env_file(text: str, path: str) -> dict[str, str]:
    """Docker `--env-file` syntax: KEY=VALUE lines, '#' comments, values taken literally."""
    result: dict[str, str] = {}
    # Docker's rules: lines end at '\n' only (a trailing '\r' is dropped); str.splitlines
    # would also split at '\r', '\v', '\f', U+2028 ... inside a value. A UTF-8 BOM is dropped.
    text = text.removeprefix("\ufeff")
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r").lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        # Docker refuses only an empty name or one with a space or a tab in it: a file it
        # takes (`2FA_SECRET=...` beside the links) is taken here too; a name that is no
        # link variable is never used, so never reaches anything. Checked before the '=',
        # as Docker does: a line of prose or a half-deleted one is refused, not skipped.
        if not key or " " in key or "\t" in key:
            raise ConfigError(f"env file {path!r}, line {number}: bad variable name "
                              f"{quoted(key)}")
        if sep:
            result[key] = value
        # else `KEY` alone: "copy from the host" to Docker, not a link definition
    return result


def merge_links(links: Iterable[Link]) -> tuple[Link, ...]:
    """One link per listening socket: same target merges, a different target is an error,
    and so are two sockets on one port whose addresses overlap (bind would fail)."""
    by_key: dict[tuple[str, int, tuple[str, ...]], Link] = {}
    # Each key's names so far, in order, as a dict (an ordered set): rebuilding a tuple
    # per alias was quadratic, 6 s for the 33,000 aliases of one port a 1 MiB file holds.
    names: dict[tuple[str, int, tuple[str, ...]], dict[str, None]] = {}
    for link in links:
        known = by_key.get(link.key)
        if known is None:
            by_key[link.key] = link
            names[link.key] = dict.fromkeys(link.names)
        elif known.target.same_as(link.target):
            # A name given twice (the same SPEC typed twice, port 0 or not) is one link,
            # named once: a name is a link's identity (status, metrics, reload). The
            # target is spelled as it was first.
            names[link.key].update(dict.fromkeys(link.names))
        else:
            raise ConfigError(
                f"port {link.port} is linked twice to different targets: "
                f"{shorten(','.join(names[link.key]))} -> {known.target} and "
                f"{shorten(link.name)} -> {link.target}"
            )
    merged = tuple(Link(link.bind, link.port, link.target, _in_name_order(names[key]))
                   for key, link in by_key.items())
    clash = _first_overlap(merged)
    if clash is not None:
        link, other = clash
        # bind() would say "address already in use", as if another program held it.
        raise ConfigError(
            f"port {link.port} is bound twice: {shorten(link.name)} on {link.bind} and "
            f"{shorten(other.name)} on {other.bind} overlap"
        )
    return merged


def _in_name_order(names: Iterable[str]) -> tuple[str, ...]:
    """A link's names: SPECs first, as given, then its variables in the order they are
    read (by alias, then port), wherever each came from. The environment's are read
    before the file's, so without this a variable the file starts to set to the value the
    environment gives it renamed the link (`C_PORT_6379_TCP,B_PORT_6379_TCP` became
    `B_PORT_6379_TCP,C_PORT_6379_TCP`) at a reload that rewired nothing: its totals
    started again from 0, and Prometheus saw a new series."""
    keyed = [(_alias_then_port(name), name) for name in names]
    specs = [name for key, name in keyed if not key[0]]  # no alias: not a variable
    variables = sorted((key, name) for key, name in keyed if key[0])
    return (*specs, *(name for _, name in variables))


def _first_overlap(links: Sequence[Link]) -> tuple[Link, Link] | None:
    """The first two links (in the order of a loop over each link and then those after
    it) on one non-zero port whose addresses overlap, or None.

    In time linear in the links, not quadratic: an env file under its 1 MiB limit holds
    ~20,000 links, and a reload checks them in the supervisor, which accepts no client
    meanwhile (comparing every pair took 7 s for 20,000).
    """
    by_port: dict[int, list[int]] = {}
    for index, link in enumerate(links):
        if link.port:
            by_port.setdefault(link.port, []).append(index)
    first: tuple[int, int] | None = None
    for indexes in by_port.values():
        if len(indexes) > 1:
            pair = _first_overlap_on_port(links, indexes)
            if pair is not None and (first is None or pair < first):
                first = pair
    return None if first is None else (links[first[0]], links[first[1]])


def _first_overlap_on_port(links: Sequence[Link], indexes: list[int]) -> tuple[int, int] | None:
    """The first pair of `indexes` (ascending, links on one port) whose addresses overlap.

    An address overlaps itself, `::` (everything) and, if IPv4, 0.0.0.0 (see _overlap):
    so the last index of each address, and of any IPv4 address or `::`, tell whether a
    link has an overlapping one after it; only for the first that has is the other found,
    by one scan.
    """
    bound = [_as_bound(links[index].bind) for index in indexes]
    last: dict[str, int] = {}
    last_ipv4_or_any = -1  # the last IPv4 address or `::`: what 0.0.0.0 overlaps
    for position, address in enumerate(bound):
        last[address] = position
        if ":" not in address or address == "::":
            last_ipv4_or_any = position
    for position, address in enumerate(bound):
        if address == "::":
            latest = len(bound) - 1
        elif address == ANY_IPV4:
            latest = last_ipv4_or_any
        else:
            latest = max(last[address], last.get("::", -1),
                         last.get(ANY_IPV4, -1) if ":" not in address else -1)
        if latest > position:
            for other in range(position + 1, latest + 1):
                if _overlap(bound[position], bound[other]):
                    return indexes[position], indexes[other]
    return None


def check_metrics_port(metrics: str | None, links: Iterable[Link]) -> None:
    """ConfigError when --metrics would listen where a link does: bind() would say
    "address already in use", as if another program held the port."""
    if metrics is None:
        return
    host, port = parse_metrics_address(metrics)
    for link in links:
        if port and link.port == port and _overlap(host, link.bind):
            raise ConfigError(f"--metrics {quoted(metrics)}: port {port} is bound twice: the "
                              f"metrics endpoint on {host} and {link.name} on {link.bind} "
                              "overlap")


def check_allow_families(allow: Sequence[str], links: Iterable[Link]) -> None:
    """ConfigError when --allow holds no network a link's clients can be in. A client is
    checked against the networks of its own family (supervisor.is_allowed): those of an
    IPv4 listener are IPv4, those of an IPv6 one IPv6, but for `::`, which takes both,
    and an IPv4-mapped address (::ffff:a.b.c.d), whose IPv4 clients an IPv6 network that
    holds ::ffff:0:0/96 takes too. `--allow ::/0` on the default bind (0.0.0.0) started,
    and denied every client, where on `--bind ::` it lets them all in; socat refuses such
    a range= at start."""
    if not allow:
        return
    networks = [parse_cidr(cidr) for cidr in allow]
    has_ipv4 = any(network.version == 4 for network in networks)
    has_ipv6 = any(network.version == 6 for network in networks)
    holds_mapped = any(network.version == 6 and _MAPPED_PREFIX & network.mask == network.address
                       for network in networks)
    for link in links:
        bind = link.bind.split("%", 1)[0]
        if bind == "::":
            continue
        address = ipaddress.ip_address(bind)
        if address.version == 4:
            family, served = "IPv4", has_ipv4
        elif getattr(address, "ipv4_mapped", None) is not None:
            family, served = "IPv4", has_ipv4 or holds_mapped
        else:
            family, served = "IPv6", has_ipv6
        if not served:
            every = "0.0.0.0/0" if family == "IPv4" else "::/0"
            raise ConfigError(
                f"--allow {quoted(' '.join(allow))}: no {family} network, and "
                f"{shorten(link.name)} listens on {join_host_port(link.bind, link.port)}, "
                f"whose clients are {family}: each would be denied; add an {family} "
                f"network ({every} for any), or listen on ::, which takes both")


# ::ffff:0:0/96, where an IPv6 socket sees IPv4 clients: as an integer, for Network's mask.
_MAPPED_PREFIX = 0xFFFF << 32


def _overlap(one: str, other: str) -> bool:
    """Would listeners on these two addresses clash on one port?"""
    one, other = _as_bound(one), _as_bound(other)
    return one == other or _covers(one, other) or _covers(other, one)


def _as_bound(address: str) -> str:
    """An IPv4-mapped address (::ffff:a.b.c.d) as the IPv4 address it binds: Linux binds
    an IPv6 socket given one on IPv4, where it clashes with a.b.c.d and 0.0.0.0."""
    mapped = getattr(ipaddress.ip_address(address), "ipv4_mapped", None)
    return address if mapped is None else str(mapped)


def _covers(wide: str, narrow: str) -> bool:
    """Does a listener on `wide` take every address `narrow` could bind? `::` listens on
    IPv4 too (listeners.listen_tcp clears IPV6_V6ONLY for it)."""
    return wide == "::" or (wide == ANY_IPV4 and ":" not in narrow)


# What a loop that _check_no_loop finds does, in its line: refused (loopback, the very
# address bound), and warned of (an address of this host's other interfaces: the host
# may hand its connections on first, and run time refuses a true loop a hop later).
_LOOP_REFUSED = "every client would take a child that connects back, until none is left"
_RING_REFUSED = "every client would take a child per link, round and round, until none is left"
_MAY_LOOP = ("each client would come back into the proxy, refused then (connect-failed, "
             "reason loop), unless this host gives the address's connections to another "
             "first (an IPVS service address, a DNAT rule)")


def _check_no_loop(links: Sequence[Link]) -> None:
    """Refuse a link whose target is its own listener: `6379=localhost:6379`, typed in a
    container where localhost is the container itself. Each client's child would connect
    back to the proxy, whose next child would do the same, until --max-children was used
    up and every link of the proxy stopped serving, with no line said. Links that reach
    one another's listeners in a ring (`6379=127.0.0.1:6380 6380=127.0.0.1:6379`) do the
    same, a child per link of the ring and round again; and a reload that undoes the ring
    does not free them: each child is left half-closed, waiting for an upstream that is
    the next one's client. Judged without I/O, as _reaches says; the first loop (_loops)
    refused."""
    for text in _loops(links):
        raise ConfigError(text)


def _loops(links: Sequence[Link], own: Collection[str] = (),
           warning: bool = False) -> Iterator[str]:
    """What _check_no_loop refuses, a line for each loop: each link that connects to its
    own listener, then each ring (_rings), found as they are wanted. `own`: the
    IP-literal targets the caller found to be this host's (own_address_loop), whose
    lines say what follows as a `warning`'s."""
    following = _following(links, own)
    for index, link in enumerate(links):
        if index in following[index]:
            yield (f"{shorten(link.name)} connects to its own listener "
                   f"({join_host_port(link.bind, link.port)} -> {link.target}): "
                   f"{_MAY_LOOP if warning else _LOOP_REFUSED}; "
                   f"{_this_host([link.target.host], own)}")
    for ring in _rings(links, following):
        hops = ", ".join(f"{shorten(link.name)} ({join_host_port(link.bind, link.port)} -> "
                         f"{link.target})" for link in ring)
        yield (f"links connect to one another's listeners in a ring: {hops}: "
               f"{_MAY_LOOP if warning else _RING_REFUSED}; "
               f"{_this_host([link.target.host for link in ring], own)}")


def own_address_candidates(links: Sequence[Link]) -> dict[str, Endpoint]:
    """The IP-literal targets worth asking the kernel whether they are this host's own
    (read_links asks: this module does no I/O), keyed by the address as _reaches
    compares it (_own_key: with its zone), one target per address (the answer does not
    depend on the port, but does on the interface: fe80::1 may be this host's on eth0
    and a neighbour's on eth1, so each zone is asked): those neither loopback nor
    unspecified (judged without asking) on the port of a listener that would take them
    if they were, a wildcard bind of their family or `::` (the very address a listener
    binds is judged without asking too). So `6379=10.0.0.5:6379`
    asks about one address, and a target on no listener's port about none."""
    families: dict[int, set[int]] = {}  # port -> the IP versions a wildcard on it takes
    for link in links:
        bind = _as_bound(link.bind.split("%", 1)[0])
        if link.port and bind in ("::", ANY_IPV4):
            families.setdefault(link.port, set()).update((4, 6) if bind == "::" else (4,))
    found: dict[str, Endpoint] = {}
    if not families:
        return found
    for link in links:
        takes = families.get(link.target.port)
        literal = _literal(link.target.host) if takes else None
        if takes is None or literal is None:
            continue
        parsed = literal[1]
        if parsed.version in takes and not (parsed.is_loopback or parsed.is_unspecified):
            found.setdefault(_own_key(link.target.host, literal), link.target)
    return found


def own_address_loop(links: Sequence[Link], own: Collection[str]) -> tuple[str, ...]:
    """The loop and ring checks of build_links again, now with the targets among
    own_address_candidates that the caller found to be this host's (`own`): each loop
    they would refuse, as a warning's text (one line each: it said only the first, and
    the next was found only once that one was mended). A container's own address on the
    port of a wildcard listener (`0.0.0.0:6379=172.17.0.5:6379`) brings each client back
    into the proxy as localhost does, unless something on this host takes the address's
    connections first: kube-proxy's IPVS puts every service address on an interface of
    the node (a hostNetwork ambassador's target is then "this host's", and reached), as
    may a DNAT rule. So said, not refused: a false refusal would stop a proxy that works,
    and a true loop is refused at its second hop anyway (relay._loops_back)."""
    return tuple(_loops(links, own, warning=True)) if own else ()


def literal_targets(links: Sequence[Link]) -> dict[str, Endpoint]:
    """The IPv6-literal targets, keyed as _own_key spells them (with their zone), one
    target per address: those read_links asks the kernel whether this host can send to
    at all (listeners.unsendable; this module does no I/O). IPv6 only, where a host
    without it is common (containers): an IPv4 target's probe, ~10 us, would be paid by
    every start and reload for a host with no IPv4 address, which is not seen. Names are
    not looked up at start: their addresses are the relay child's and the resolver's."""
    found: dict[str, Endpoint] = {}
    for link in links:
        literal = _ipv6_literal(link.target)
        if literal is not None:
            found.setdefault(_own_key(link.target.host, literal), link.target)
    return found


def _ipv6_literal(
        target: Endpoint) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """`target`'s IPv6 literal as _literal gives it; None for a name, an IPv4 address, or
    an IPv4-mapped one (IPv4's: a host without IPv6 connects to it). The usual IPv4
    target is told by a character, not parsed."""
    if ":" not in target.host:  # (a name's host has none either)
        return None
    literal = _literal(target.host)
    return literal if literal is not None and literal[1].version == 6 else None


def unreachable_links(links: Sequence[Link], unsendable: Mapping[str, str]) -> tuple[str, ...]:
    """A warning's text for each link whose IPv6-literal target is one of `unsendable`
    (those of literal_targets that no address of this host's can send to, each with why,
    as the caller found: IPv6 disabled here), one line per link: each of its connects
    would fail (`connect-failed`, reason `unreachable`), which nothing said before the
    first client. Not refused: the sysctl may be turned on later, and the link then
    serves without a reload; a reload must not fail for it either."""
    said = []
    for link in links:
        literal = _ipv6_literal(link.target) if unsendable else None
        why = None if literal is None else unsendable.get(_own_key(link.target.host, literal))
        if literal is None or why is None:
            continue
        advice = ("give 127.0.0.1" if literal[1].is_loopback
                  else "give the upstream's IPv4 address or a name that has one")
        said.append(f"{shorten(link.name)} ({join_host_port(link.bind, link.port)} -> "
                    f"{link.target}): no address of this host's can send to the upstream: "
                    f"{why}; each connect fails until one can (`connect-failed`, reason "
                    f"unreachable): {advice}")
    return tuple(said)


def _this_host(hosts: Sequence[str], own: Collection[str] = ()) -> str:
    """Why the target `hosts` of a loop or ring reach this proxy, named as they were
    given (it said "localhost is this host" for `127.0.0.1`, `0.0.0.0` too), and what to
    do: `127.0.0.1 is this host (in a container, the container itself): name the
    server's host`. Each is one _reaches took for this host's: localhost, a loopback or
    unspecified address, one of `own`, or the very address a listener binds."""
    return f"{this_host_reason(hosts, own=own)}: name the server's host"


def this_host_reason(hosts: Sequence[str], shown: Mapping[str, str] | None = None,
                     own: Collection[str] = ()) -> str:
    """_this_host's reason alone: `127.0.0.1 is this host (in a container, the container
    itself)`. Judged by each of `hosts` (a name: localhost), each named as `shown` names
    it (`vm (127.0.0.1)`: a name a relay child found to be this host's), else as given;
    one of `own` (as _own_key spells it) is "an address of this host".
    Also the supervisor's words for a child's loop (accounting.failure_text)."""
    loopback: list[str] = []
    unspecified: list[str] = []
    of_host: list[str] = []
    bound: list[str] = []
    for host in dict.fromkeys(hosts):
        named = (shown or {}).get(host, host)
        literal = _literal(host)
        if literal is None:  # a name: only localhost reaches a listener (_reaches)
            loopback.append(named)
            continue
        address = literal[1]
        (unspecified if address.is_unspecified else loopback if address.is_loopback
         else of_host if _own_key(host, literal) in own else bound).append(named)
    said = []
    if loopback:
        said.append(f"{and_list(loopback)} {'is' if len(loopback) == 1 else 'are'} this host")
    if unspecified:
        said.append(f"{and_list(unspecified)} {'connects' if len(unspecified) == 1 else 'connect'}"
                    " to this host")
    if of_host:
        said.append(f"{and_list(of_host)} "
                    f"{'is an address' if len(of_host) == 1 else 'are addresses'} of this host")
    if loopback or unspecified or of_host:
        said[-1] += " (in a container, the container itself)"
    if bound:
        said.append(f"{and_list(bound)} {'is an address' if len(bound) == 1 else 'are addresses'}"
                    " this proxy listens on")
    return ", ".join(said)


def and_list(words: Sequence[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _own_key(host: str,
             literal: tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str:
    """How `own` (own_address_candidates, own_address_loop) spells the literal target
    `host` (_literal's `literal` of it): as _literal does, with its IPv6 zone, since a
    link-local address is another on each interface (`fe80::1%eth0`, `fe80::1%eth1`)."""
    address, parsed = literal
    zone = host.partition("%")[2]
    return f"{address}%{zone}" if zone and parsed.version == 6 else address


def _literal(host: str) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """A target's IP literal as a listener would bind it (no zone; an IPv4-mapped address
    as its IPv4 one, as _as_bound has it), spelt and parsed; None for a name."""
    literal = host.split("%", 1)[0]
    try:
        parsed = ipaddress.ip_address(literal)
    except ValueError:
        return None
    mapped = getattr(parsed, "ipv4_mapped", None)
    return (literal, parsed) if mapped is None else (str(mapped), mapped)


def _reaches(target: Endpoint, link: Link, bound: Mapping[str, str],
             own: Collection[str] = ()) -> bool:
    """Would a connect to `target` reach `link`'s listener? A loopback target (an
    address, `localhost`: either of its two addresses that the listener takes, since the
    other one connects back after a refusal; 0.0.0.0 and ::, which connect to this host)
    or one of `own`, the addresses the caller found to be this host's, that the listener
    takes, or the very address it binds. Any other non-loopback target under a wildcard
    bind may or may not be this host's, and a name is not looked up: not judged.
    `bound` has each bind address as _as_bound gives it (parsed once, not per link)."""
    if not link.port or target.port != link.port:
        return False
    host = target.host
    if host.lower() in ("localhost", "localhost."):
        addresses: tuple[tuple[str, bool], ...] = (("127.0.0.1", True), ("::1", True))
    else:
        literal = _literal(host)
        if literal is None:
            return False  # a name
        address, parsed = literal
        # connect() to an unspecified address reaches this host's loopback (Linux).
        unspecified = {ANY_IPV4: "127.0.0.1", "::": "::1"}.get(address)
        addresses = (((unspecified, True),) if unspecified else
                     ((address, parsed.is_loopback or _own_key(host, literal) in own),))
    bind = bound[link.bind]
    return any(address == bind or (this_host and _overlap(link.bind, address))
               for address, this_host in addresses)


def _following(links: Sequence[Link], own: Collection[str] = ()) -> list[list[int]]:
    """For each link, the links whose listeners its target reaches (itself among them
    when it connects back): only listeners on its target's port are judged, so a target
    is parsed about once, as before for the port (`6379=redis:6379`) that a link so
    often shares with its target."""
    by_port: dict[int, list[int]] = {}
    bound: dict[str, str] = {}
    for index, link in enumerate(links):
        if link.port:
            by_port.setdefault(link.port, []).append(index)
        if link.bind not in bound:
            bound[link.bind] = _as_bound(link.bind.split("%", 1)[0])
    return [[other for other in by_port.get(link.target.port, ())
             if _reaches(link.target, links[other], bound, own)] for link in links]


def _rings(links: Sequence[Link], following: list[list[int]]) -> Iterator[list[Link]]:
    """Rings of links, each link's target reaching the next one's listener, the last's
    the first's: one for each step of a depth-first walk back to a link on its path (a
    link that reaches its own listener is _loops's, not a ring). Every ring holds such a
    step, and each step's ring is said; of two rings through one step (a `localhost`
    target reaching two listeners), one. Yielded as found: _check_no_loop wants the
    first alone.

    Linear in the links: a target reaches at most two listeners (`localhost`'s two
    addresses; listeners that overlap were refused), so each link has at most two next
    ones, and a walk from each link stops at a link an earlier walk went through.
    """
    done = [False] * len(links)
    for start in range(len(links)):
        if done[start] or not following[start]:
            continue
        # Depth first, the path so far on a stack of (link, its next ones left to try).
        on_path = {start: 0}
        stack = [(start, iter(following[start]))]
        while stack:
            index, nexts = stack[-1]
            step = next(nexts, None)
            if step is None:
                stack.pop()
                del on_path[index]
                done[index] = True
            elif step in on_path:
                if step != index:
                    yield [links[at] for at, _ in stack[on_path[step]:]]
            elif not done[step]:
                on_path[step] = len(stack)
                stack.append((step, iter(following[step])))


def build_links(
    specs: Sequence[str],
    environ: Mapping[str, str] | None = None,
    env_file: tuple[str, str] | None = None,
    bind: str = ANY_IPV4,
    aliases: Sequence[str] = (),
    option_variables: Sequence[tuple[str, str]] = (),
    flags_without_variable: tuple[str, ...] = (),
) -> LinkTable:
    """All link sources together. `environ`: the environment when --from-env;
    `env_file`: (path, text) of an --env-file; `bind`: where link variables, and SPECs
    without a BIND_ADDR, listen; `aliases` (--alias): the only aliases whose link
    variables are taken, each of which must have one; `option_variables`: (variable,
    flag) of the options, the env file's of which are said (`file_options`), as are
    those of `flags_without_variable`, serve's options that have none (--take-over).

    A variable both set is the env file's: the file is what a reload reads again, so it
    is how a link the environment gave (a `--link`, fixed for the container's life) is
    rewired live. Where the values differ, the table says so (`overrides`).
    """
    if aliases and environ is None and env_file is None:
        raise ConfigError("--alias selects among link variables: give --from-env or "
                          "--env-file too")
    links = [parse_spec(spec, bind) for spec in specs]
    warnings: list[str] = []
    overrides: list[str] = []
    path, text = env_file or ("", "")
    from_file = parse_env_file(text, path) if env_file is not None else {}
    sources = []
    if environ is not None:
        sources.append("the environment")
    if env_file is not None:
        sources.append(f"env file {path!r}")
    # In a Kubernetes pod every service of the namespace sets <SVC>_PORT_<N>_TCP, as Docker
    # links do: two services on one port are then an error, which should say what to do.
    pod = environ is not None and "KUBERNETES_SERVICE_HOST" in environ
    hint = _POD_HINT if pod and not aliases else ""
    try:
        if environ is not None:
            for name in sorted(set(environ) & set(from_file)):
                match = _LINK_VAR.match(name)
                if (match and environ[name] != from_file[name]
                        and (not aliases or match["alias"].upper() in aliases)):
                    overrides.append(
                        f"{name} is set in the environment and in env file {path!r}: the "
                        f"file's {quoted(from_file[name])} is used, not {quoted(environ[name])}"
                    )
            environ = {name: value for name, value in environ.items() if name not in from_file}
            found, warned = links_from_env(environ, bind=bind, aliases=aliases)
            links += found
            warnings += warned
        if env_file is not None:
            found, warned = links_from_env(from_file, origin=path, bind=bind, aliases=aliases)
            links += found
            warnings += warned
        _check_selected(aliases, links, " or ".join(sources), warnings)
        if len(links) > len(specs) and not aliases:
            # Two links of Compose's scaled service (DB_1_, DB_2_), two Docker links
            # on one port: the variables clash, and --alias chooses among them.
            hint = hint or _ALIAS_HINT
        merged = merge_links(links)
    except ConfigError as exc:
        if hint:
            raise ConfigError(f"{exc} ({hint})") from None
        raise
    # Not under the hints: --alias chooses among clashing variables, while a link that
    # connects back to the proxy is mended by naming the server's host, as it says.
    _check_no_loop(merged)
    if not merged:
        if not sources:
            raise ConfigError("no links found: give a SPEC, --from-env or --env-file")
        # A SPEC given always makes a link: none was. Re-exports are ignored by design
        # (links_from_env), which a user who has only those cannot guess: name them;
        # and so are UDP and SCTP variables (each a warning, not said when nothing starts).
        ignored = _reexports([*(environ or ()), *from_file])
        skipped = _skipped(warnings)
        docker = (_DOCKER_HINT if environ is not None and not pod and not ignored
                  and not skipped else "")
        raise ConfigError(f"no links found: no SPEC given, and no <ALIAS>_PORT_<N>_TCP "
                          f"variable in {' or '.join(sources)}{ignored}{skipped}{docker}")
    return LinkTable(merged, tuple(warnings), tuple(overrides),
                     options_in_env_file(from_file, path, option_variables,
                                         flags_without_variable))


VARIABLE_PREFIX = "FORKPROXY_"
# FORKPROXY_ names that are no option's and still no mistake: the project's scripts' own
# (scripts/bench*, scripts/image-test, scripts/two-hosts-demo, the Dockerfile's build),
# and the one serve sets for the metrics process (_metrics_main.IMPORT_PATH_VARIABLE,
# spelt out: this module is the supervisor's, which never imports that one).
PROJECT_VARIABLES = re.compile(
    r"FORKPROXY_(?:BENCH_.*|IMAGE.*|BASE_IMAGE|DEBIAN_MIRROR|REBUILD_BASE|CMD)\Z"
    r"|FORKPROXY_IMPORT_PATH\Z", re.DOTALL)
# A container linked as `forkproxy` (or `forkproxy-...`: a chained ambassador) or a
# Kubernetes Service of that name gives every container beside it variables of this shape
# (Docker's links.go, Kubernetes' service environment variables); `serve --from-env` reads
# the first kind as links. Matched in upper case, as link variables are any case.
LINKED_VARIABLE = re.compile(
    r"(?P<alias>FORKPROXY(?:_[A-Z0-9_.]*)?)_(?:PORT_[0-9]+_(?:TCP|UDP|SCTP)"
    r"(?:_ADDR|_PORT|_PROTO|_START|_END)?|SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?)\Z")


def unknown_variables(environ: Mapping[str, str], option_variables: Mapping[str, str],
                      flags_without_variable: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """The FORKPROXY_ variables of `environ` (in any case) that no option reads, in name
    order: (the name as a log line shows it, what its warning says). Click ignores them
    without a word, so a typo (FORKPROXY_ALLOWED for FORKPROXY_ALLOW) served every client.
    `option_variables`: each option's variable -> its flag; `flags_without_variable`:
    serve's options that have none on purpose (--take-over). Values are never looked
    at: they may be secrets."""
    return tuple((shorten(name), "no option reads it: ignored" + _meant(
        name.upper(), option_variables, flags_without_variable, spell=index < SPELLED_AT_MOST))
        for index, name in enumerate(_unknown_names(environ, option_variables)))


# The unknown variables that get a warning of their own, the first in name order; the rest
# are counted in one more line: 3,300 in an environment were 3,300 lines before
# `listening`, in which the proxy's own start was lost. UNLOGGED_UNKNOWN is what that line
# says: `serve`'s `unknown-variable-unlogged` (with `count`), `links`'s after the count.
UNKNOWN_LINES_AT_MOST = 10
UNLOGGED_UNKNOWN = (f"more FORKPROXY_ variables that no option reads, ignored (at most "
                    f"{UNKNOWN_LINES_AT_MOST} have a line of their own)")


# What `env-file-option-unlogged` (with `count`) says, and `links` after the count: the env
# file's FORKPROXY_ names past the first UNKNOWN_LINES_AT_MOST, bounded as the
# environment's are (a file of 5,000 wrote 5,000 lines before `listening`).
UNLOGGED_FILE_OPTIONS = (f"more FORKPROXY_ variables in the env file, which sets links only, "
                         f"ignored (at most {UNKNOWN_LINES_AT_MOST} have a line of their own)")


def unknown_lines(found: Sequence[tuple[str, str]]) -> tuple[Sequence[tuple[str, str]], int]:
    """Of unknown_variables' `found`: those said a line each, and how many more are
    counted in UNLOGGED_UNKNOWN's one line (serve's log and `links` alike)."""
    return found[:UNKNOWN_LINES_AT_MOST], max(0, len(found) - UNKNOWN_LINES_AT_MOST)


def _unknown_names(names: Iterable[str], option_variables: Mapping[str, str]) -> list[str]:
    """The FORKPROXY_ names of `names` (in any case) that no option reads, in name order.
    Not unknown: the options' own, the project's (PROJECT_VARIABLES), and the link and
    service variables of an alias FORKPROXY... (LINKED_VARIABLE, and its <ALIAS>_PORT,
    _NAME and _ENV_... beside them): the environment's and the env file's alike."""
    found = sorted(name for name in names if name.upper().startswith(VARIABLE_PREFIX))
    # The aliases a port variable shows linked: their _PORT, _NAME and _ENV_ are theirs.
    aliases = {match["alias"] for name in found
               if (match := LINKED_VARIABLE.match(name.upper()))}
    uppers = {name.upper() for name in found}
    unknown = []
    spelled = 0  # unknown-looking names looked at: the first SPELLED_AT_MOST may be spelled
    portless: dict[str, bool] = {}  # a name -> _portless_link_variable's answer

    def is_portless(upper: str) -> bool:
        nonlocal spelled
        if upper not in portless:
            spell = spelled < SPELLED_AT_MOST
            spelled += spell
            portless[upper] = _portless_link_variable(upper, option_variables, spell=spell)
        return portless[upper]

    for name in found:
        upper = name.upper()
        alias, _, rest = upper.rpartition("_")
        if (name in option_variables or PROJECT_VARIABLES.match(name)
                or LINKED_VARIABLE.match(upper)
                or (alias in aliases and rest in ("PORT", "NAME"))
                or any(upper.startswith(f"{known}_ENV_") for known in aliases)):
            continue
        # The environment of a container linked as forkproxy-ALIAS with no port, whose
        # FORKPROXY_ALIAS_NAME (Docker gives every link one) is a portless link's: one
        # look for them all. Each spent the spelling budget, and a typo past a container's
        # 16 variables (FORKPROXY_ENV_FIEL after FORKPROXY_DB_ENV_...) went unwarned.
        owner = upper.partition("_ENV_")[0]
        if (owner != VARIABLE_PREFIX[:-1] and f"{owner}_NAME" in uppers
                and is_portless(f"{owner}_NAME")):
            continue
        if is_portless(upper):
            continue
        unknown.append(name)
    return unknown


# The unknown names, in name order, whose spelling is compared with every option's
# (_nearest, ~0.25 ms a name): a typo or two is what it is for. Past them, a file of
# unknown names (an env file holds up to 1 MiB: ~40,000) took the supervisor ~10 s at each
# reload, accepting nobody; each is still warned of, with the other hints.
SPELLED_AT_MOST = 16


def _portless_link_variable(upper: str, option_variables: Mapping[str, str], *,
                            spell: bool = True) -> bool:
    """Whether `upper` is FORKPROXY[_ALIAS]_NAME or FORKPROXY[_ALIAS]_ENV_..., which a
    container linked as `forkproxy[-alias]` that exposes no port gives (Docker's legacy
    links: no port variable shows the alias linked), and no likely typo of an option
    variable: one the warning would name as meant (FORKPROXY_ENV_FIEL for
    FORKPROXY_ENV_FILE, FORKPROXY_BIND_NAME) is still unknown. By the name alone: values
    may be secrets."""
    body = upper.removeprefix(VARIABLE_PREFIX)
    alias, env, _ = f"_{body}".partition("_ENV_")  # the first: an alias has no _ENV_
    if not env:
        if not f"_{body}".endswith("_NAME"):
            return False
        alias = f"_{body}"[:-len("_NAME")]
    # Docker's alias in a variable: upper case, `-` made `_` ([A-Z0-9_.]). (`alias` is cut
    # from `_BODY`, so it starts with `_` whenever it is not empty.)
    if alias and (not alias.replace("_", "").replace(".", "").isalnum()
                  or not alias.isascii()):
        return False
    return _near_option(body, option_variables, spell=spell) is None


def _meant(upper: str, option_variables: Mapping[str, str],
           flags_without_variable: tuple[str, ...], *, spell: bool = True) -> str:
    """`; did you mean FORKPROXY_ALLOW (--allow)?` for the option variable `upper` (an
    unknown name, upper-cased) is nearest to, if one is near; or what an option without
    a variable is given as; or where the variables are listed. Without `spell`, a name
    spelt near one is not looked for (SPELLED_AT_MOST)."""
    typed = upper.removeprefix(VARIABLE_PREFIX)
    for flag in flags_without_variable:
        if typed == flag.removeprefix("--").upper().replace("-", "_"):
            return f"; {flag} has no variable, on purpose: give the flag"
    variable = _near_option(typed, option_variables, spell=spell)
    if variable is not None:
        case = " (names are upper case)" if variable == upper else ""
        return f"; did you mean {variable} ({option_variables[variable]})?{case}"
    return "; each option's variable is in README's table of serve's options"


def _near_option(typed: str, option_variables: Mapping[str, str], *,
                 spell: bool = True) -> str | None:
    """The option variable that `typed` (a name without FORKPROXY_, upper-cased) likely
    misspells, or None. Without `spell`, by a word more or less only (SPELLED_AT_MOST)."""
    by_suffix = {variable.removeprefix(VARIABLE_PREFIX): variable
                 for variable in option_variables}
    # An option's name with a word more or less (FORKPROXY_BIND_ADDR, FORKPROXY_RETRIES)
    # when only one has it, else the nearest spelling (FORKPROXY_MAXCHILDREN).
    near = [suffix for suffix in by_suffix if typed.startswith(suffix)
            or suffix.startswith(typed) or suffix.endswith(f"_{typed}")]
    if len(near) != 1:
        near = [nearest] if spell and (nearest := _nearest(typed, sorted(by_suffix))) else []
    return by_suffix[near[0]] if near else None


def _nearest(typed: str, candidates: Sequence[str], cutoff: float = 0.75) -> str | None:
    """The candidate most like `typed`, the first of equals, if alike at least `cutoff`:
    twice their longest common subsequence over their lengths. Close to difflib's ratio,
    not the same (difflib counts matching blocks, which a subsequence may outnumber: on
    fuzzed names this suggests a little more often); difflib is not imported because this
    module is the supervisor's, and every fork copies its heap."""
    best, best_ratio = None, cutoff
    for candidate in candidates:
        total = len(typed) + len(candidate)
        # Lengths this far apart cannot reach the cutoff: a name of any length costs
        # nothing (an env file's may be 1 MiB, read by the supervisor at a reload).
        if not total or 2 * min(len(typed), len(candidate)) < cutoff * total:
            continue
        ratio = 2 * _common(typed, candidate) / total
        if ratio > best_ratio or (best is None and ratio >= best_ratio):
            best, best_ratio = candidate, ratio
    return best


def _common(one: str, other: str) -> int:
    """The length of the longest common subsequence of two short strings."""
    row = [0] * (len(other) + 1)
    for char in one:
        diagonal = 0
        for index, theirs in enumerate(other, start=1):
            diagonal, row[index] = row[index], (diagonal + 1 if char == theirs
                                                else max(row[index], row[index - 1]))
    return row[-1]


def options_in_env_file(from_file: Mapping[str, str], path: str,
                        option_variables: Sequence[tuple[str, str]],
                        flags_without_variable: tuple[str, ...] = (),
                        ) -> tuple[tuple[str, str], ...]:
    """The option variables (FORKPROXY_ALLOW...) the env file sets, in name order: (the
    name as a log line shows it, what its warning says). The file gives links only: an
    option is set by the environment or the flag, read once at start, so the file's line
    is ignored, and was without a word: `FORKPROXY_ALLOW=10.0.0.0/8` beside the links (a
    file written for `docker run --env-file`, which sets it too) left every client
    served. Matched in any case, as click reads only the upper-case name. Values are
    never looked at: they may be secrets."""
    flags = dict(option_variables)
    found = {}
    for name in sorted(from_file):
        variable = name.upper()
        flag = flags.get(variable)
        if flag is None:
            continue
        case = "" if name == variable else " (in upper case)"
        found[name] = (
            f"an option variable in env file {path!r}, which sets links only: ignored; "
            f"set {variable}{case} in forkproxy's environment, or give {flag}")
    if flags:  # none known (a caller that gives none): none can be judged unknown
        # A typo (FORKPROXY_MAX_CHILDRN=10) was silent, where the same name in the
        # environment is an `unknown-variable` warning: told here in the same words.
        unknown = _unknown_names((name for name in from_file if name not in found), flags)
        for index, name in enumerate(unknown):
            # FORKPROXY_TAKE_OVER: "no variable, on purpose", as in the environment, not
            # the README's table, where it is not.
            meant = _meant(name.upper(), flags, flags_without_variable,
                           spell=index < SPELLED_AT_MOST)
            found[name] = (f"no option reads it, and env file {path!r} sets links only: "
                           f"ignored{meant}")
    return tuple((shorten(name), found[name]) for name in sorted(found))


_POD_HINT = ("in a Kubernetes pod every service sets such variables: choose the links "
             "with --alias ALIAS")
_ALIAS_HINT = "to take only some aliases' variables: --alias ALIAS"
# moby/moby#50719: Docker Engine 29 stopped setting them (the seed's `docker run --link`).
_DOCKER_HINT = ("; since Docker Engine 29, `docker run --link` sets no link variables "
                "(unless its daemon runs with DOCKER_KEEP_DEPRECATED_LEGACY_LINKS_ENV_VARS=1): "
                "set them with -e, as in -e REDIS_PORT_6379_TCP=tcp://redis:6379")


def _skipped(warnings: Sequence[str]) -> str:
    """`; FIRST WARNING[ (and N more)]`, or '': what an error says was skipped."""
    if not warnings:
        return ""
    return f"; {warnings[0]}" + (f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else "")


def _check_selected(aliases: Sequence[str], links: Sequence[Link], sources: str,
                    warnings: Sequence[str]) -> None:
    """ConfigError for the first alias --alias names that none of the link variables has
    (with what was skipped: the selected aliases' UDP variables, or a name misspelt)."""
    found = set()
    for link in links:
        for name in link.names:
            match = _LINK_VAR.match(name)
            if match is not None:
                found.add(match["alias"].upper())
    for alias in aliases:
        if alias not in found:
            raise ConfigError(f"--alias selects {alias}, but no {alias}_PORT_<N>_TCP variable "
                              f"is in {sources}{_skipped(warnings)}")


def _reexports(names: Iterable[str]) -> str:
    """`; ignored N re-exported variable(s), NAME[, NAME][ and K more]: why`, or ''."""
    found = sorted({name for name in names if _is_reexport(name) and name.endswith("_TCP")})
    if not found:
        return ""
    shown = ", ".join(shorten(name) for name in found[:2])
    more = f" and {len(found) - 2} more" if len(found) > 2 else ""
    plural = "s" if len(found) > 1 else ""
    return (f"; ignored {len(found)} variable{plural}, {shown}{more}: an <ALIAS>_ENV_... "
            "variable is a linked container's own environment re-exported by Docker, not a "
            "link (if it is one, name its alias with --alias)")


class Network(Value):
    """An allow-list entry as integers, so the supervisor checks a peer without ipaddress."""

    version: int
    address: int
    mask: int
    text: str

    def __init__(self, version: int, address: int, mask: int, text: str) -> None:
        self._set(version=version, address=address, mask=mask, text=text)


# A comma is in no network's syntax: a list written as another tool takes it.
_ALLOW_LIST_HINT = ("networks are separated by spaces in FORKPROXY_ALLOW, and --allow is "
                    "repeated on the command line, not joined with commas")
# Nor is a space: `--allow "$NETS"`, a list as FORKPROXY_ALLOW takes it (click splits the
# variable; a flag's value is one network).
_ALLOW_SPACES_HINT = ("give each its own --allow (FORKPROXY_ALLOW takes them separated by "
                      "spaces)")
# What a second --bind or --metrics is told (cli.ONE_ONLY), and a list in one value.
ONE_BIND = ("links listen on one default address: to listen on more, give SPECs with "
            "their own (127.0.0.1:6379=HOST:PORT [::1]:6379=HOST:PORT), or --bind :: for "
            "every IPv6 and IPv4 address")
ONE_METRICS = ("forkproxy serves metrics on one address (--metrics 0.0.0.0:PORT for every "
               "IPv4 address, [::]:PORT for every IPv6 and IPv4 one)")
# Spaces or commas between addresses: in no address's syntax (IPv6 is in brackets).
_ADDRESS_LIST = re.compile(r"[\s,]+")


def _several(text: str, flag: str, what: str, hint: str) -> ConfigError | None:
    """`--metrics 'A B': 2 addresses in one --metrics: HINT` when `text` is a list, as a
    `"$ADDRS"` or another tool's comma list gives one; else None, and the error at hand
    stands (IPv6 brackets were blamed for `h:p h:p`: the rest read as the host)."""
    parts = [part for part in _ADDRESS_LIST.split(text) if part]
    if len(parts) < 2:
        return None
    return ConfigError(f"{what}: {len(parts)} addresses in one {flag}: {hint}")


_SOCAT_IPV6_RANGE = re.compile(r"\[([0-9A-Fa-f:.]*)\](/[0-9]+)?\Z")
_SOCAT_IPV4_RANGE = re.compile(r"([0-9.]+):([0-9.]+)\Z")


def _cidr_of_socat_range(text: str) -> str:
    """socat's range= spellings, which --allow stands in for, as ipaddress takes them:
    an IPv6 address in brackets (`[::1]/128`, `[fd00::]`) and an IPv4 mask after a colon
    (`10.0.0.0:255.0.0.0`). Anything else as it is."""
    if match := _SOCAT_IPV6_RANGE.match(text):
        return match[1] + (match[2] or "")
    if match := _SOCAT_IPV4_RANGE.match(text):
        return f"{match[1]}/{match[2]}"
    return text


def parse_cidr(text: str) -> Network:
    """One --allow network. `text` may be a whole FORKPROXY_ALLOW value that holds a comma
    or is blank (cli._allow): it is refused, and its error quotes what the user wrote."""
    if not text.strip():
        raise ConfigError(f"--allow {quoted(text)}: empty: name a network (without --allow "
                          "and FORKPROXY_ALLOW every client is allowed)")
    if "%" in text:
        # ipaddress takes `fe80::%eth0/64` and drops the zone: the filter then let in that
        # network's clients on every interface, and a zone naming no interface started.
        # A client is checked by its address alone (is_allowed), so a zone is refused, as
        # HAProxy's `src` refuses it, rather than read as a narrowing it is not.
        # The zone ends at the prefix, or at socat's bracket (`[fe80::%eth0]/64`), and is
        # quoted: a newline in it made the error two lines.
        zone = re.split(r"[/\]]", text.partition("%")[2], maxsplit=1)[0]
        raise ConfigError(f"--allow {quoted(text)}: a network takes no IPv6 zone (clients "
                          "are allowed by address, whatever the interface): drop the "
                          f"{quoted('%' + zone)}")
    try:
        net = ipaddress.ip_network(_cidr_of_socat_range(text), strict=False)
    except ValueError:
        if "," in text:
            hint = f": {_ALLOW_LIST_HINT}"
        elif len(text.split()) > 1:
            hint = f": {len(text.split())} networks in one --allow: {_ALLOW_SPACES_HINT}"
        else:
            hint = ""
        raise ConfigError(f"--allow {quoted(text)}: not an IPv4 or IPv6 CIDR{hint}") from None
    mapped = getattr(net.network_address, "ipv4_mapped", None)
    if mapped is not None and net.prefixlen >= 96:
        # ::ffff:a.b.c.d/N, as the log shows an IPv4 client of a `[::]` listener: the
        # supervisor checks such a client as the IPv4 address it is (is_allowed).
        net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return Network(net.version, int(net.network_address), int(net.netmask), str(net))


def parse_link_bind(text: str) -> str:
    """--bind: an IP address, IPv6 with or without brackets (`::`, `[::]`). Brackets hold
    IPv6 only, as in a SPEC (split_host_port): `[127.0.0.1]` was taken here and refused
    there, so one address read right or wrong depending on where it was typed."""
    what = f"--bind {quoted(text)}"
    if not text.strip():
        # FORKPROXY_BIND emptied by a template (`${BIND_ADDR}` unset) is handed here, as
        # FORKPROXY_ALLOW is: taken for unset, it put every listener on every interface.
        raise ConfigError(f"{what}: empty: name an address (without --bind and "
                          "FORKPROXY_BIND, listeners bind 0.0.0.0, every IPv4 interface)")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text and ":" not in text:
            raise ConfigError(f"{what}: {quoted(text)} in brackets is not an IPv6 address")
    try:
        return parse_bind(text, what)
    except ConfigError as exc:
        raise _several(text, "--bind", what, ONE_BIND) or exc from None


def parse_metrics_address(text: str) -> tuple[str, int]:
    what = f"--metrics {quoted(text)}"
    try:
        host, port = split_host_port(text, what)
        return (parse_bind(host, what) if host else ANY_IPV4,
                parse_port(port, what, allow_zero=True))
    except ConfigError as exc:
        raise _several(text, "--metrics", what, ONE_METRICS) or exc from None


def check_pid_file_path(path: str | None) -> None:
    """ConfigError for a --pid-file path nobody means, `serve`'s and `reload`'s alike.
    Empty, as `--status-socket ''` (control.check_path): it was "No such file or
    directory" from the supervisor, after the exec (an empty FORKPROXY_PID_FILE counts as
    unset and never reaches here). Blank: written in the working directory as a file
    named ' ', where no `reload --pid-file` looks."""
    if path == "":
        raise ConfigError("--pid-file '': an empty path")
    if path is not None and path.isspace():
        raise ConfigError(f"--pid-file {quoted(path)}: a blank path")


def check_options(options: Options) -> Options:
    """Raise ConfigError for values no proxy could run with."""
    if options.relay not in RELAY_MODES:
        raise ConfigError(f"--relay {quoted(options.relay)}: expected one of auto, splice, copy")
    if options.log_format not in LOG_FORMATS:
        raise ConfigError(f"--log-format {quoted(options.log_format)}: expected text or json")
    if options.max_children < 1:
        raise ConfigError(f"--max-children {options.max_children}: must be at least 1")
    if options.max_children > MAX_CHILDREN:
        raise ConfigError(f"--max-children {options.max_children}: at most {MAX_CHILDREN}, "
                          "the kernel's limit on processes")
    for what, limit in (("memory", options.memory_limit), ("pids", options.pids_limit),
                        ("nproc", options.nproc_limit)):
        if limit is not None and not (type(limit) is int and limit >= 0):
            raise ConfigError(f"bad {what} limit {limit!r}")  # only from a bad handover
    if not (type(options.nproc_others) is int and options.nproc_others >= 0):
        raise ConfigError(f"bad nproc count {options.nproc_others!r}")  # the same
    check_pid_file_path(options.pid_file)
    if options.take_over is not None and not isinstance(options.take_over, str):
        raise ConfigError(f"bad --take-over socket {options.take_over!r}")  # the same
    if options.connect_retries < 0:
        raise ConfigError(f"--connect-retries {options.connect_retries}: must be 0 or more")
    if options.connect_retries > MAX_CONNECT_RETRIES:
        raise ConfigError(f"--connect-retries {options.connect_retries}: at most "
                          f"{MAX_CONNECT_RETRIES} (about half an hour of backoff)")
    for flag, value, can_be_off in (
        ("--connect-timeout", options.connect_timeout, False),
        ("--grace", options.grace, False),
        ("--idle-timeout", options.idle_timeout, True),
        ("--halfclose-timeout", options.halfclose_timeout, True),
        # At most MAX_SECONDS: 2e9 ms, within the kernel's int of milliseconds (2**31 - 1).
        ("--user-timeout", options.user_timeout, True),
        ("--resolve-every", options.resolve_every, True),
    ):
        if value is None:
            continue
        if not value == value or value in (float("inf"), float("-inf")):  # NaN, inf
            raise ConfigError(f"{flag} {value}: not a finite number of seconds")
        if value > MAX_SECONDS:
            raise _too_long(flag, f"{value:g}", can_be_off=can_be_off)
        if _below_least(flag, value):
            raise _too_short_error(flag, f"{value:g}", can_be_off=can_be_off)
    keepalive = options.keepalive
    if keepalive is not None and not (
        type(keepalive) is int and 1 <= keepalive <= MAX_KEEPALIVE  # not a bool, not a float
    ):
        raise ConfigError(f"--keepalive {keepalive!r}: {_KEEPALIVE_RANGE}")
    for cidr in options.allow:
        parse_cidr(cidr)
    if options.metrics is not None:
        parse_metrics_address(options.metrics)
    return options


def sources_to_json(sources: Sources) -> dict[str, object]:
    """Plain data for handing the configuration to the exec'd supervisor."""
    return {
        "specs": list(sources.specs),
        "from_env": sources.from_env,
        "env_file": sources.env_file,
        "options": {**vars(sources.options), "allow": list(sources.options.allow)},
        "bind": sources.bind,
        "aliases": list(sources.aliases),
    }


def sources_from_json(data: Mapping[str, object]) -> Sources:
    """The inverse of sources_to_json (typing stays out of the supervisor: it costs
    ~0.9 MB of heap, and every fork copies the page tables of all of it)."""
    raw = data["options"]
    specs, env_file, bind, aliases = data["specs"], data["env_file"], data["bind"], data["aliases"]
    if not (
        isinstance(raw, dict)
        and isinstance(specs, list)
        and (env_file is None or isinstance(env_file, str))
        and isinstance(bind, str)
        and isinstance(aliases, list)
    ):
        raise ConfigError("bad configuration handed to the supervisor")
    options = dict(raw)
    options["allow"] = tuple(options.get("allow", ()))
    options["unknown_variables"] = tuple(
        (str(name), str(detail)) for name, detail in options.get("unknown_variables", ()))
    options["option_variables"] = tuple(
        (str(name), str(flag)) for name, flag in options.get("option_variables", ()))
    options["pids_limit_files"] = tuple(str(path) for path in options.get("pids_limit_files", ()))
    options["flags_without_variable"] = tuple(
        str(flag) for flag in options.get("flags_without_variable", ()))
    return Sources(
        specs=tuple(str(spec) for spec in specs),
        from_env=bool(data["from_env"]),
        env_file=env_file,
        options=check_options(Options(**options)),
        bind=parse_link_bind(bind),
        aliases=parse_aliases(str(alias) for alias in aliases),
    )


# ASCII digits, at most one point, an optional exponent: float() alone would also take
# '٣', '1_0', ' 5 ', '+5', 'inf' and 'nan', which ports and counts refuse.
_SECONDS = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


_OFF = ("off", "none")  # what turns off a duration that can be off (--keepalive too)


def _empty_duration(flag: str, *, can_be_off: bool) -> ConfigError:
    """`--resolve-every ''`: refused, where an empty FORKPROXY_RESOLVE_EVERY counts as
    unset (click's rule, and `FOO=` in a Compose file: the default applies). They differ
    on purpose: no variable reaches here empty, while on the command line '' is a shell
    variable left empty (`--resolve-every "$EVERY"`); read as `off`, it stopped
    re-resolution, where the variable's '' kept the default 30 s."""
    off = ", or 'off'" if can_be_off else ""
    return ConfigError(f"{flag} '': empty: give a number of seconds{off}")


def parse_seconds(text: str | None, flag: str, *, can_be_off: bool = True) -> float | None:
    """A command-line duration: a plain decimal number of seconds (`0.5`, `10`, `1e3`).

    None when unset, or `off`, for the timeouts that can be off. Errors show the text
    as typed: `-0` or `1e-400` are not `0.0` to whoever wrote them."""
    if text is None or (can_be_off and text.lower() in _OFF):
        return None
    if not text:
        raise _empty_duration(flag, can_be_off=can_be_off)
    if not _SECONDS.fullmatch(text):
        raise ConfigError(f"{flag} {quoted(text)}: not a number of seconds")
    value = float(text)
    if text.startswith("-"):  # -0 included: a duration has no sign
        raise _too_short_error(flag, quoted(text), can_be_off=can_be_off)
    if value > MAX_SECONDS:
        raise _too_long(flag, quoted(text), can_be_off=can_be_off)
    if _below_least(flag, value, text):
        # Bare, as a count's range error is: by now the text is known to be a number.
        raise _too_short_error(flag, shorten(text), can_be_off=can_be_off)
    return value


def _least_seconds(flag: str) -> float:
    return MIN_RESOLVE_EVERY if flag == "--resolve-every" else MIN_SECONDS


def _below_least(flag: str, value: float, text: str | None = None) -> bool:
    # Under 1 ms a timeout cuts every connection (idle, half-close) or fails every
    # connect, and lookups run at most once a second anyway. A zero grace is a plain
    # "stop now": a zero as typed (`0`, `0.0`, `0e5`), not a tiny number that float()
    # rounds to 0.0 (`1e-400`), which is below the least like `1e-9`.
    typed_zero = text is None or not text.lower().partition("e")[0].strip("0.")
    return value < _least_seconds(flag) and not (
        value == 0 and typed_zero and flag == "--grace")


def _too_short_error(flag: str, shown: str, *, can_be_off: bool) -> ConfigError:
    least = _least_seconds(flag)
    zero = "0 or " if flag == "--grace" else ""
    unit = "second" if least == 1 else "seconds"
    off = ", or 'off'" if can_be_off else ""
    return ConfigError(f"{flag} {shown}: {zero}at least {least:g} {unit}{off}")


def _too_long(flag: str, shown: str, *, can_be_off: bool) -> ConfigError:
    # poll() takes its timeout as a C int of milliseconds: past ~24.8 days the relay or
    # the supervisor would die of an OverflowError mid-connection.
    off = "; 'off' means none" if can_be_off else ""
    return ConfigError(f"{flag} {shown}: at most {MAX_SECONDS:,} seconds (23 days){off}")


_KEEPALIVE_RANGE = f"a whole number of seconds from 1 to {MAX_KEEPALIVE}, or 'off'"


def parse_keepalive(text: str | None) -> int | None:
    """--keepalive: whole seconds, the unit of the kernel's TCP_KEEPIDLE and TCP_KEEPINTVL,
    from 1 to 32767 (its limit); None when unset or `off`. A fraction is refused rather
    than rounded: the proxy would probe at another time than the one asked for."""
    if text is None or text.lower() in _OFF:
        return None
    if not text:
        raise _empty_duration("--keepalive", can_be_off=True)  # as a duration's, above
    if not _SECONDS.fullmatch(text):
        raise ConfigError(f"--keepalive {quoted(text)}: not a number of seconds")
    value = float(text)
    if text.startswith("-") or not value.is_integer() or not 1 <= value <= MAX_KEEPALIVE:
        # -0 included: a duration has no sign. inf (1e999) is no integer either.
        raise ConfigError(f"--keepalive {quoted(text)}: {_KEEPALIVE_RANGE}")
    return int(value)


def parse_count(text: str, flag: str) -> int:
    digits = text[1:] if text.startswith("-") else text
    if not text.isascii() or not digits.isdigit():
        raise ConfigError(f"{flag} {quoted(text)}: not a whole number")
    # Past nine digits a count is beyond every limit checked later (and int() of a very
    # long string is slow by design); leading zeros are still fine.
    significant = digits.lstrip("0") or "0"
    if text.startswith("-") and significant == "0":
        # As durations do: whoever typed the sign meant something int() would drop.
        raise ConfigError(f"{flag} {quoted(text)}: a count has no sign")
    if len(significant) > 9:
        raise ConfigError(f"{flag} {quoted(text)}: too large")
    # Not int(text): past 4,300 characters (leading zeros too) int() refuses the string.
    return -int(significant) if text.startswith("-") else int(significant)
