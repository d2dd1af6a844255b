"""Pure: where this process's memory and pids limits are, from the text of
/proc/self/cgroup and /proc/self/mountinfo, and what a limit file says.

No I/O here (cli.read_memory_limit and cli.read_pids_limit read the files, once, at
start). Imported only by the CLI, before it execs the supervisor: never by the process
that forks.

cgroup v2: the `0::PATH` line names the process's cgroup in the cgroup2 hierarchy; each
of it and its ancestors up to the mount's root may have a `memory.max` ("max": none),
and the effective limit is the smallest. cgroup v1: the line whose controllers include
`memory`; that cgroup's `memory.stat` says `hierarchical_memory_limit`, which already
takes the ancestors into account, and each `memory.limit_in_bytes` up to the mount's
root says its own. Both kinds are looked at (a host with both mounted binds the memory
controller to one of them; the other has no such files), and the smallest value wins.

The pids limit is found the same way: `pids.max` ("max": none) in the cgroup and each
ancestor up to the mount's root, in the cgroup2 hierarchy and in the v1 hierarchy with the
`pids` controller (v1 has no hierarchical summary file: each level's own limit applies).
"""

from __future__ import annotations

import re

# cgroup v1 says "no limit" with the largest page count times the page size, just under
# 2**63 (9223372036854771712 with 4 KiB pages): no real limit comes anywhere near 2**62.
V1_NO_LIMIT = 1 << 62
V2_FILE = "memory.max"
V1_STAT = "memory.stat"
V1_FILE = "memory.limit_in_bytes"
PIDS_FILE = "pids.max"  # the same name in v1 and v2
_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes space, tab, newline, \ as \ooo


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """The mounts of /proc/self/mountinfo as (root, mount point, fs type, super options);
    lines that do not parse are left out."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        # id parent major:minor root point options [optional fields...] - type source super
        try:
            dash = fields.index("-", 6)
            fstype, options = fields[dash + 1], fields[dash + 3]
        except (ValueError, IndexError):
            continue
        mounts.append((_unescape(fields[3]), _unescape(fields[4]), fstype,
                       tuple(options.split(","))))
    return mounts


def parse_proc_cgroup(text: str, controller: str = "memory") -> tuple[str | None, str | None]:
    """(the cgroup v2 path, the path in the v1 hierarchy with `controller`) from
    /proc/self/cgroup's `ID:CONTROLLERS:PATH` lines; None for either that is not there."""
    v2 = v1 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        ident, controllers, path = parts
        if ident == "0" and controllers == "":
            v2 = path
        elif controller in controllers.split(","):
            v1 = path
    return v2, v1


def _under(path: str, root: str) -> str | None:
    """`path` relative to the mount's `root` ("" for the root itself), or None when the
    mount does not show it (inside a container, a v1 mount's root is the container's own
    cgroup; a path outside a cgroup namespace's root reads `/../...`)."""
    if root == "/":
        relative = path.strip("/")
    elif path == root or path.startswith(root + "/"):
        relative = path[len(root):].strip("/")
    else:
        return None
    return None if ".." in relative.split("/") else relative


def _chain(point: str, relative: str) -> list[str]:
    """The cgroup's directory under the mount point, then each ancestor up to the point."""
    dirs = [point]
    for part in (relative.split("/") if relative else []):
        dirs.append(f"{dirs[-1].rstrip('/')}/{part}")
    return dirs[::-1]


def _limit_dirs(cgroup_text: str, mountinfo_text: str,
                controller: str) -> list[tuple[bool, list[str]]]:
    """For each visible mount that shows this process's cgroup, whether it is v1 (the
    hierarchy with `controller`) or v2, and the cgroup's directory then each ancestor's
    up to the mount point."""
    v2, v1 = parse_proc_cgroup(cgroup_text, controller)
    # The last mount on a mount point hides those before it (mountinfo is in mount order).
    visible: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    for root, point, fstype, options in parse_mountinfo(mountinfo_text):
        visible[point] = (root, fstype, options)
    found = []
    for point, (root, fstype, options) in visible.items():
        if fstype == "cgroup2" and v2 is not None:
            relative = _under(v2, root)
            if relative is not None:
                found.append((False, [d.rstrip("/") for d in _chain(point, relative)]))
        elif fstype == "cgroup" and v1 is not None and controller in options:
            relative = _under(v1, root)
            if relative is not None:
                found.append((True, [d.rstrip("/") for d in _chain(point, relative)]))
    return found


def memory_limit_files(cgroup_text: str, mountinfo_text: str) -> list[str]:
    """Absolute paths of the files that may hold this process's memory limit, from the
    text of /proc/self/cgroup and /proc/self/mountinfo. Any of them may be missing (no
    memory controller there, the root cgroup's own): the reader skips those."""
    files = []
    for v1, chain in _limit_dirs(cgroup_text, mountinfo_text, "memory"):
        if v1:
            files.append(f"{chain[0]}/{V1_STAT}")
            files += [f"{d}/{V1_FILE}" for d in chain]
        else:
            files += [f"{d}/{V2_FILE}" for d in chain]
    return files


def pids_limit_files(cgroup_text: str, mountinfo_text: str) -> list[str]:
    """Absolute paths of the files that may hold this process's pids limit (`pids.max` of
    its cgroup and each ancestor, v1 and v2), found as memory_limit_files finds those of
    the memory limit; any may be missing (the root cgroup has none)."""
    return [f"{d}/{PIDS_FILE}"
            for _, chain in _limit_dirs(cgroup_text, mountinfo_text, "pids") for d in chain]


def parse_pids_limit(text: str) -> int | None:
    """The number of processes and threads a `pids.max` allows, or None: "max" (none), or
    text that is not what such a file holds."""
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        return None
    return int(text)


def parse_limit(path: str, text: str) -> int | None:
    """The limit in bytes a file of `memory_limit_files` holds, or None: none set ("max",
    v1's near 2**63), or text that is not what such a file holds."""
    if path.endswith("/" + V1_STAT):
        for line in text.splitlines():
            name, _, field = line.partition(" ")
            if name == "hierarchical_memory_limit":
                text = field
                break
        else:
            return None
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        return None  # "max", or not a limit file's text
    limit = int(text)
    return None if limit >= V1_NO_LIMIT else limit
