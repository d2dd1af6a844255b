"""The memory and pids limits of the process's cgroup, read from a tree of real files laid
out as /proc/self and /sys/fs/cgroup are (v1, v2, inside and outside containers), and the
--max-children that fits them. The real cgroup at a real limit: tests/test_limits.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forkproxy import cgroup, control, metrics
from forkproxy.cli import (
    count_user_tasks,
    nproc_exempt,
    read_memory_limit,
    read_nproc_limit,
    read_pids_limit,
    with_limits,
)
from forkproxy.config import (
    CHILD_MEMORY,
    COMMANDS_MEMORY,
    DEFAULT_MAX_CHILDREN,
    METRICS_MEMORY,
    METRICS_PIDS,
    OWN_PIDS,
    SUPERVISOR_MEMORY,
    MiB,
    Options,
    Sources,
    derived_max_children,
    mebibytes,
)
from forkproxy.log import Logger, level_for
from forkproxy.status import _max_children as status_max_children
from forkproxy.supervisor import Supervisor

V1_NONE = "9223372036854771712"  # what cgroup v1 says for no limit (4 KiB pages)
# This machine's kind: cgroup v1 controllers, and a cgroup2 mount without the memory one.
HYBRID_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - " \
            "cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"


class Tree:
    """A root directory with proc/self/{cgroup,mountinfo} and cgroup files under it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "proc/self").mkdir(parents=True)

    def proc(self, cgroup_text: str, mountinfo: str) -> None:
        (self.root / "proc/self/cgroup").write_text(cgroup_text)
        (self.root / "proc/self/mountinfo").write_text(mountinfo)

    def file(self, path: str, text: str) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def limit(self) -> int | None:
        return read_memory_limit(proc=str(self.root / "proc/self"), root=str(self.root))

    def pids(self) -> int | None:
        return read_pids_limit(proc=str(self.root / "proc/self"), root=str(self.root))


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


# -- cgroup v2 ------------------------------------------------------------------------------


def test_v2_in_a_container_with_a_cgroup_namespace_reads_the_mount_root(tree: Tree) -> None:
    """docker run -m 64m on a v2 host: `0::/`, the container's cgroup is the mount."""
    tree.proc("0::/\n", V2_MOUNTS)
    tree.file("/sys/fs/cgroup/memory.max", "67108864\n")
    assert tree.limit() == 64 * MiB


def test_v2_nested_limits_take_the_smallest_up_to_the_mount_root(tree: Tree) -> None:
    """A pod's limit above a container's larger (or no) limit is the one in force; the
    host's root cgroup has no memory.max at all."""
    tree.proc("0::/kubepods.slice/pod1/ctr\n", V2_MOUNTS)
    base = "/sys/fs/cgroup/kubepods.slice"
    tree.file(f"{base}/pod1/ctr/memory.max", "max\n")
    tree.file(f"{base}/pod1/memory.max", "134217728\n")
    tree.file(f"{base}/memory.max", "max\n")
    assert tree.limit() == 128 * MiB
    tree.file(f"{base}/pod1/ctr/memory.max", "100663296\n")  # 96 MiB, below the pod's
    assert tree.limit() == 96 * MiB
    tree.file(f"{base}/memory.max", "33554432\n")  # an ancestor lower still
    assert tree.limit() == 32 * MiB


def test_v2_max_everywhere_is_no_limit(tree: Tree) -> None:
    tree.proc("0::/system.slice/app.service\n", V2_MOUNTS)
    tree.file("/sys/fs/cgroup/system.slice/app.service/memory.max", "max\n")
    tree.file("/sys/fs/cgroup/system.slice/memory.max", "max\n")
    assert tree.limit() is None


def test_v2_mount_root_below_the_hierarchy_root(tree: Tree) -> None:
    """Without a cgroup namespace, a runtime may mount the container's own cgroup at
    /sys/fs/cgroup while /proc/self/cgroup names it by its full path."""
    tree.proc("0::/docker/abc\n", "29 23 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    tree.file("/sys/fs/cgroup/memory.max", "67108864\n")
    assert tree.limit() == 64 * MiB


def test_v2_a_cgroup_outside_the_namespace_root_is_not_guessed_at(tree: Tree) -> None:
    """Moved out of its cgroup namespace's root, a process sees `0::/../other`: no file
    under the mount is its cgroup's."""
    tree.proc("0::/../other\n", V2_MOUNTS)
    tree.file("/sys/fs/cgroup/memory.max", "67108864\n")
    tree.file("/sys/fs/cgroup/other/memory.max", "67108864\n")
    assert tree.limit() is None


# -- cgroup v1 ------------------------------------------------------------------------------


def test_v1_hierarchical_limit_takes_the_ancestors_into_account(tree: Tree) -> None:
    """This machine's layout: the memory controller on v1, a cgroup2 mount without it
    (no memory.max there, and its `0::/` line is not the memory controller's)."""
    tree.proc("9:name=systemd:/\n4:memory:/jobs/a\n1:cpu:/\n0::/\n", HYBRID_MOUNTS)
    base = "/sys/fs/cgroup/memory"
    tree.file(f"{base}/jobs/a/memory.limit_in_bytes", V1_NONE)
    tree.file(f"{base}/jobs/a/memory.stat",
              f"cache 0\nrss 4096\nhierarchical_memory_limit 67108864\n"
              f"hierarchical_memsw_limit {V1_NONE}\n")
    tree.file(f"{base}/memory.limit_in_bytes", V1_NONE)
    assert tree.limit() == 64 * MiB


def test_v1_limit_in_bytes_of_each_ancestor_without_memory_stat(tree: Tree) -> None:
    tree.proc("4:memory:/jobs/a\n", HYBRID_MOUNTS)
    base = "/sys/fs/cgroup/memory"
    tree.file(f"{base}/jobs/a/memory.limit_in_bytes", V1_NONE)
    tree.file(f"{base}/jobs/memory.limit_in_bytes", "268435456\n")
    tree.file(f"{base}/memory.limit_in_bytes", V1_NONE)
    assert tree.limit() == 256 * MiB


def test_v1_near_two_to_the_63_is_no_limit(tree: Tree) -> None:
    tree.proc("4:memory:/jobs/a\n", HYBRID_MOUNTS)
    base = "/sys/fs/cgroup/memory"
    tree.file(f"{base}/jobs/a/memory.stat", f"hierarchical_memory_limit {V1_NONE}\n")
    tree.file(f"{base}/jobs/a/memory.limit_in_bytes", V1_NONE)
    tree.file(f"{base}/memory.limit_in_bytes", "9223372036854710272")  # 64 KiB pages' none
    assert tree.limit() is None


def test_v1_in_a_container_the_mount_root_is_the_containers_cgroup(tree: Tree) -> None:
    """docker run -m 64m on a v1 host: /proc/self/cgroup names /docker/ID, and the
    mount's root field is /docker/ID: its files are at the mount point itself."""
    tree.proc("12:memory:/docker/0123abcd\n11:pids:/docker/0123abcd\n",
              "700 690 0:40 /docker/0123abcd /sys/fs/cgroup/memory ro,nosuid - "
              "cgroup cgroup rw,memory\n")
    tree.file("/sys/fs/cgroup/memory/memory.stat", "hierarchical_memory_limit 67108864\n")
    tree.file("/sys/fs/cgroup/memory/memory.limit_in_bytes", "67108864\n")
    assert tree.limit() == 64 * MiB


def test_v1_a_mount_of_another_cgroup_is_not_this_process_s(tree: Tree) -> None:
    tree.proc("4:memory:/docker/mine\n",
              "700 690 0:40 /docker/other /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    tree.file("/sys/fs/cgroup/memory/memory.limit_in_bytes", "67108864\n")
    assert tree.limit() is None


def test_v1_swap_limits_are_not_looked_at(tree: Tree) -> None:
    tree.proc("4:memory:/\n", HYBRID_MOUNTS)
    tree.file("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes", "33554432\n")
    tree.file("/sys/fs/cgroup/memory/memory.limit_in_bytes", "67108864\n")
    assert tree.limit() == 64 * MiB


def test_a_mount_point_with_a_space_is_unescaped(tree: Tree) -> None:
    tree.proc("0::/\n", "29 23 0:26 / /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n")
    tree.file("/sys/fs/my cgroup/memory.max", "67108864\n")
    assert tree.limit() == 64 * MiB


# -- the pids limit -------------------------------------------------------------------------


def test_pids_v2_in_a_container_reads_the_mount_root(tree: Tree) -> None:
    """docker run --pids-limit 100 on a v2 host, with a cgroup namespace: `0::/`."""
    tree.proc("0::/\n", V2_MOUNTS)
    tree.file("/sys/fs/cgroup/pids.max", "100\n")
    tree.file("/sys/fs/cgroup/memory.max", "max\n")
    assert tree.pids() == 100
    assert tree.limit() is None  # the pids limit is not a memory limit


def test_pids_v2_nested_limits_take_the_smallest_and_max_is_none(tree: Tree) -> None:
    tree.proc("0::/kubepods.slice/pod1/ctr\n", V2_MOUNTS)
    base = "/sys/fs/cgroup/kubepods.slice"
    tree.file(f"{base}/pod1/ctr/pids.max", "max\n")
    tree.file(f"{base}/pod1/pids.max", "max\n")
    assert tree.pids() is None
    tree.file(f"{base}/pids.max", "4096\n")  # an ancestor's
    assert tree.pids() == 4096
    tree.file(f"{base}/pod1/ctr/pids.max", "64\n")
    assert tree.pids() == 64


def test_pids_v2_mount_root_below_the_hierarchy_root(tree: Tree) -> None:
    tree.proc("0::/docker/abc\n",
              "29 23 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    tree.file("/sys/fs/cgroup/pids.max", "100\n")
    assert tree.pids() == 100


def test_pids_v1_each_ancestor_s_own_limit_applies(tree: Tree) -> None:
    """This machine's layout: the pids controller on its own v1 hierarchy, a cgroup2 mount
    without it (its root, `0::/`, has no pids.max). v1 has no hierarchical summary: each
    level's pids.max is read."""
    tree.proc("9:name=systemd:/\n8:pids:/jobs/a\n4:memory:/\n0::/\n", HYBRID_MOUNTS)
    base = "/sys/fs/cgroup/pids"
    tree.file(f"{base}/jobs/a/pids.max", "max\n")
    tree.file(f"{base}/jobs/pids.max", "50\n")
    tree.file("/sys/fs/cgroup/memory/jobs/a/pids.max", "7\n")  # not the pids hierarchy
    assert tree.pids() == 50
    tree.file(f"{base}/jobs/a/pids.max", "20\n")
    assert tree.pids() == 20


def test_pids_v1_in_a_container_the_mount_root_is_the_containers_cgroup(tree: Tree) -> None:
    tree.proc("12:memory:/docker/0123abcd\n11:pids:/docker/0123abcd\n",
              "700 690 0:40 /docker/0123abcd /sys/fs/cgroup/memory ro,nosuid - "
              "cgroup cgroup rw,memory\n"
              "701 690 0:41 /docker/0123abcd /sys/fs/cgroup/pids ro,nosuid - "
              "cgroup cgroup rw,pids\n")
    tree.file("/sys/fs/cgroup/pids/pids.max", "100\n")
    tree.file("/sys/fs/cgroup/memory/memory.limit_in_bytes", "67108864\n")
    assert (tree.pids(), tree.limit()) == (100, 64 * MiB)


def test_pids_v1_a_mount_of_another_cgroup_is_not_this_process_s(tree: Tree) -> None:
    tree.proc("11:pids:/docker/mine\n",
              "701 690 0:41 /docker/other /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n")
    tree.file("/sys/fs/cgroup/pids/pids.max", "100\n")
    assert tree.pids() is None


@pytest.mark.parametrize("text", ["", "max\n", "lots\n", "-1\n", "1e3\n", "\xff\n", "1" * 30,
                                  "\u00b2\n", "\u0661\u0660\u0660\n"])
def test_a_pids_file_that_is_not_a_limit_is_skipped(tree: Tree, text: str) -> None:
    tree.proc("0::/a\n", V2_MOUNTS)
    tree.file("/sys/fs/cgroup/a/pids.max", text)
    assert tree.pids() is None
    tree.file("/sys/fs/cgroup/pids.max", "100\n")
    assert tree.pids() == 100


def test_pids_limit_files_from_fabricated_proc_text() -> None:
    """The pure half, with no files at all: which files may hold the limit, v1 and v2."""
    assert cgroup.pids_limit_files("0::/a/b\n", V2_MOUNTS) == [
        "/sys/fs/cgroup/a/b/pids.max", "/sys/fs/cgroup/a/pids.max", "/sys/fs/cgroup/pids.max"]
    assert cgroup.pids_limit_files("8:pids:/x\n4:memory:/y\n0::/\n", HYBRID_MOUNTS) == [
        "/sys/fs/cgroup/pids/x/pids.max", "/sys/fs/cgroup/pids/pids.max",
        "/sys/fs/cgroup/unified/pids.max"]
    assert cgroup.pids_limit_files("4:memory:/y\n", HYBRID_MOUNTS) == []  # no pids line
    assert [cgroup.parse_pids_limit(text) for text in ("100\n", "max\n", " 7 ", "x")] == [
        100, None, 7, None]


# -- nothing to read --------------------------------------------------------------------------


def test_missing_proc_files_are_no_limit(tree: Tree) -> None:
    tree.file("/sys/fs/cgroup/memory.max", "67108864\n")
    assert tree.limit() is None  # neither file
    (tree.root / "proc/self/cgroup").write_text("0::/\n")
    assert tree.limit() is None  # no mountinfo


@pytest.mark.parametrize("text", ["", "lots\n", "-1\n", "6.4e7\n", "\xff\n", "1" * 30])
def test_a_file_that_is_not_a_limit_is_skipped(tree: Tree, text: str) -> None:
    tree.proc("0::/a\n", V2_MOUNTS)
    tree.file("/sys/fs/cgroup/a/memory.max", text)
    assert tree.limit() is None
    tree.file("/sys/fs/cgroup/memory.max", "67108864\n")  # an ancestor that says one
    assert tree.limit() == 64 * MiB


def test_an_unreadable_file_is_skipped(tree: Tree) -> None:
    """A directory where memory.max should be (EISDIR; as root, modes do not stop reads)."""
    tree.proc("0::/a\n", V2_MOUNTS)
    (tree.root / "sys/fs/cgroup/a/memory.max").mkdir(parents=True)
    assert tree.limit() is None
    (tree.root / "sys/fs/cgroup/memory.max").write_bytes(b"\xff\xfe")
    assert tree.limit() is None


def test_garbage_in_the_proc_files_is_no_limit(tree: Tree) -> None:
    tree.proc("not a cgroup line\n0:x\n", "short line\n1 2 3 4 5 6\n\n")
    tree.file("/sys/fs/cgroup/memory.max", "67108864\n")
    assert tree.limit() is None


def test_the_last_mount_on_a_mount_point_is_the_one_seen() -> None:
    mounts = ("31 23 0:28 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
              "50 31 0:60 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    assert cgroup.memory_limit_files("0::/\n", mounts) == []


# -- the number that fits -----------------------------------------------------------------


def test_the_children_that_fit_64_mib() -> None:
    """The allowances measured (config.py): 36 connections at 64 MiB, 20 with --metrics.
    It was 52 with no room for the commands run in the container: one HEALTHCHECK then
    made the OOM killer take 13 connections, one `docker exec ... status` 14 more."""
    assert derived_max_children(64 * MiB, None, metrics=False) == 36
    assert derived_max_children(64 * MiB, None, metrics=True) == 20
    assert derived_max_children(64 * MiB, None, metrics=False) == \
        (64 * MiB - SUPERVISOR_MEMORY - COMMANDS_MEMORY) // CHILD_MEMORY
    assert derived_max_children(64 * MiB, None, metrics=True) == \
        (64 * MiB - SUPERVISOR_MEMORY - COMMANDS_MEMORY - METRICS_MEMORY) // CHILD_MEMORY


@pytest.mark.parametrize(("limit", "metrics", "expected"), [
    (0, False, 1), (1 * MiB, False, 1), (20 * MiB, True, 1),  # too small: one, not none
    (SUPERVISOR_MEMORY + COMMANDS_MEMORY + CHILD_MEMORY, False, 1),
    (SUPERVISOR_MEMORY + COMMANDS_MEMORY + 2 * CHILD_MEMORY - 1, False, 1),
    (SUPERVISOR_MEMORY + COMMANDS_MEMORY + 2 * CHILD_MEMORY, False, 2),
    (256 * MiB, False, 228), (2 << 30, False, DEFAULT_MAX_CHILDREN),
    (1 << 61, True, DEFAULT_MAX_CHILDREN),
])
def test_the_max_children_a_memory_limit_alone_derives_is_clamped(
    limit: int, metrics: bool, expected: int
) -> None:
    assert derived_max_children(limit, None, metrics) == expected


def test_an_explicit_max_children_is_kept_and_the_default_derived() -> None:
    given = Options(max_children=500, metrics="127.0.0.1:0")
    assert with_limits(given, 64 * MiB) == Options(
        max_children=500, metrics="127.0.0.1:0", memory_limit=64 * MiB)
    derived = with_limits(Options(max_children_given=False), 64 * MiB)
    assert (derived.max_children, derived.memory_limit) == (36, 64 * MiB)
    unlimited = with_limits(Options(max_children_given=False), None)
    assert unlimited.max_children == DEFAULT_MAX_CHILDREN


def test_the_headroom_counts_forkproxy_s_own_processes_and_threads() -> None:
    """OWN_PIDS and METRICS_PIDS count what the code runs at its most: the supervisor, two
    resolvers, a status reporter per control client, two commands run in the container;
    the metrics process, its deadline thread and MAX_SCRAPES scrape threads."""
    assert OWN_PIDS == 1 + 2 + control.MAX_CLIENTS + 2
    assert METRICS_PIDS == 1 + 1 + metrics.MAX_SCRAPES


@pytest.mark.parametrize(("memory", "pids", "metrics_on", "expected"), [
    (None, 100, False, 100 - OWN_PIDS),
    (None, 100, True, 100 - OWN_PIDS - METRICS_PIDS),
    (None, OWN_PIDS, False, 1),  # no room: one, not none
    (None, 1 << 22, False, DEFAULT_MAX_CHILDREN),  # systemd's TasksMax: the default stays
    (64 * MiB, 100, False, 36),  # the memory limit holds fewer
    (64 * MiB, 40, False, 40 - OWN_PIDS),  # the pids limit holds fewer
    (None, None, False, DEFAULT_MAX_CHILDREN),
])
def test_the_derived_max_children_is_what_both_limits_hold(
    memory: int | None, pids: int | None, metrics_on: bool, expected: int
) -> None:
    """docker run --pids-limit 100 with no memory limit kept 1024: past ~100 processes
    every fork failed. The pids limit bounds the derived value too."""
    options = Options(max_children_given=False, metrics="127.0.0.1:0" if metrics_on else None)
    derived = with_limits(options, memory, pids)
    assert (derived.max_children, derived.memory_limit, derived.pids_limit) == (
        expected, memory, pids)
    given = with_limits(Options(max_children=500), memory, pids)
    assert given.max_children == 500  # the operator's own is kept


@pytest.mark.parametrize(("size", "text"), [(64 * MiB, "64 MiB"), (100_000_000, "95.4 MiB"),
                                            (3 << 30, "3072 MiB")])
def test_mebibytes(size: int, text: str) -> None:
    assert mebibytes(size) == text


def start_lines(tmp_path: Path, options: Options) -> list[str]:
    """The max-children lines a supervisor with these options writes at start."""
    log_path = tmp_path / "log"
    with open(log_path, "w+b") as log_file:
        sup = Supervisor(Sources(("127.0.0.1:0=127.0.0.1:1",), options=options), {},
                         Logger(level_for(options.verbosity), options.log_format,
                                fd=log_file.fileno()))
        sup._log_max_children()
    return [line for line in log_path.read_text().splitlines() if "max-children" in line]


def test_a_limit_below_forkproxy_s_own_memory_is_a_warning(tmp_path: Path) -> None:
    """Clamped up to 1 connection, the derived value is no promise: said as a warning."""
    options = with_limits(Options(metrics="127.0.0.1:0", max_children_given=False),
                                20 * MiB)
    assert options.max_children == 1
    [line] = start_lines(tmp_path, options)
    assert " warning max-children value=1 memory_limit=20971520 detail=\"the memory limit of " \
           "20 MiB leaves no room for connections beside forkproxy's own ~44 MiB; " \
           "--max-children overrides\"" in line, line


def test_a_given_max_children_where_nothing_fits_is_warned(tmp_path: Path) -> None:
    """--max-children 1 under a limit with no room: the check compared it with the
    derived value, clamped up to 1, so it said nothing."""
    options = with_limits(Options(max_children=1, metrics="127.0.0.1:0"), 5 * MiB)
    [line] = start_lines(tmp_path, options)
    assert " warning max-children value=1 fits=0 memory_limit=5242880 detail=\"about 0 " \
           "fit the memory limit of 5 MiB; beyond that the OOM killer ends connections\"" \
           in line, line


@pytest.mark.parametrize("given", [False, True])
def test_status_says_when_nothing_fits_the_memory_limit(given: bool) -> None:
    """`status` said `max-children 1 (fits the memory limit of 5 MiB)` where the log had
    warned that nothing fits: memory_fit was the clamped value (found by a code review)."""
    options = with_limits(Options(metrics="127.0.0.1:0", max_children_given=given,
                                        max_children=1), 5 * MiB)
    sup = Supervisor(Sources(("127.0.0.1:0=127.0.0.1:1",), options=options), {}, Logger())
    assert sup.memory_fit() == 0
    reply = {"max_children": 1, "memory_limit": 5 * MiB, "memory_fit": sup.memory_fit(),
             "max_children_given": given}
    assert status_max_children(reply) == (
        ", max-children 1 (the memory limit of 5 MiB leaves no room for connections)")
    fits = with_limits(Options(max_children_given=False), 64 * MiB)
    assert Supervisor(Sources(("127.0.0.1:0=127.0.0.1:1",), options=fits), {},
                      Logger()).memory_fit() == fits.max_children == 36


def test_no_limit_is_a_debug_line_only(tmp_path: Path) -> None:
    options = with_limits(Options(max_children_given=False), None)
    assert start_lines(tmp_path, options) == []
    [line] = start_lines(tmp_path, Options(max_children_given=False, verbosity=1))
    assert " debug max-children value=1024 detail=\"no memory or pids limit found\"" in line, line


def test_the_start_line_says_which_limit_the_value_came_from(tmp_path: Path) -> None:
    only_pids = with_limits(Options(max_children_given=False), None, 100)
    [line] = start_lines(tmp_path, only_pids)
    assert line.endswith(f" info max-children value={100 - OWN_PIDS} pids_limit=100 "
                         "detail=\"fits the pids limit of 100; --max-children overrides\""), line
    memory_first = with_limits(Options(max_children_given=False), 64 * MiB, 100)
    [line] = start_lines(tmp_path, memory_first)
    assert line.endswith(" info max-children value=36 memory_limit=67108864 detail=\"fits "
                         "the memory limit of 64 MiB; --max-children overrides\""), line
    both = with_limits(Options(max_children_given=False), 64 * MiB, 36 + OWN_PIDS)
    [line] = start_lines(tmp_path, both)
    assert line.endswith(f" info max-children value=36 memory_limit=67108864 "
                         f"pids_limit={36 + OWN_PIDS} detail=\"fits the memory limit of 64 MiB "
                         f"and the pids limit of {36 + OWN_PIDS}; --max-children overrides\""), \
        line
    no_room = with_limits(Options(max_children_given=False), None, 10)
    [line] = start_lines(tmp_path, no_room)
    assert line.endswith(" warning max-children value=1 pids_limit=10 detail=\"the pids "
                         "limit of 10 leaves no room for connections beside forkproxy's own "
                         f"{OWN_PIDS} processes and threads; --max-children overrides\""), line
    assert start_lines(tmp_path, with_limits(Options(max_children_given=False), None,
                                             1 << 22)) == []  # far above: a debug line
    # Exactly DEFAULT_MAX_CHILDREN fit: the default stays, said at debug only.
    exactly = with_limits(Options(max_children_given=False), None, DEFAULT_MAX_CHILDREN + OWN_PIDS)
    assert exactly.max_children == DEFAULT_MAX_CHILDREN
    assert start_lines(tmp_path, exactly) == []
    [line] = start_lines(tmp_path, with_limits(
        Options(max_children_given=False, verbosity=1), None, DEFAULT_MAX_CHILDREN + OWN_PIDS))
    assert f" debug max-children value={DEFAULT_MAX_CHILDREN} " in line, line


def test_a_given_max_children_above_the_pids_limit_is_warned_not_refused(
    tmp_path: Path
) -> None:
    """pids.max can be raised while forkproxy runs (docker update --pids-limit): served as
    told, one warning at start."""
    fit = 100 - OWN_PIDS - METRICS_PIDS
    options = with_limits(Options(max_children=300, metrics="127.0.0.1:0"), None, 100)
    assert options.max_children == 300
    [line] = start_lines(tmp_path, options)
    assert line.endswith(f" warning max-children value=300 fits={fit} pids_limit=100 "
                         f"detail=\"about {fit} fit the pids limit of 100; beyond that forks "
                         "fail and clients wait for one that works (fork-failed)\""), line
    # Exactly what fits, counted as the warning counts it (the metrics process's own
    # threads too): no line; one more is warned.
    at_fit = Options(max_children=fit, metrics="127.0.0.1:0")
    assert start_lines(tmp_path, with_limits(at_fit, None, 100)) == []
    one_more = Options(max_children=fit + 1, metrics="127.0.0.1:0")
    [line] = start_lines(tmp_path, with_limits(one_more, None, 100))
    assert f" warning max-children value={fit + 1} fits={fit} pids_limit=100 " in line, line
    # Above both: a line for each.
    both = start_lines(tmp_path, with_limits(Options(max_children=300), 64 * MiB, 100))
    assert [" memory_limit=67108864 " in both[0], " pids_limit=100 " in both[1]] == [True, True]


@pytest.mark.parametrize(("reply", "header"), [
    ({"max_children": 79, "max_children_given": False, "pids_limit": 100, "pids_fit": 79},
     ", max-children 79 (fits the pids limit of 100)"),
    ({"max_children": 52, "max_children_given": False, "memory_limit": 64 * MiB,
      "memory_fit": 52, "pids_limit": 100, "pids_fit": 79},
     ", max-children 52 (fits the memory limit of 64 MiB)"),
    ({"max_children": 52, "max_children_given": False, "memory_limit": 64 * MiB,
      "memory_fit": 52, "pids_limit": 73, "pids_fit": 52},
     ", max-children 52 (fits the memory limit of 64 MiB and the pids limit of 73)"),
    ({"max_children": 1, "max_children_given": False, "pids_limit": 10, "pids_fit": 0},
     ", max-children 1 (the pids limit of 10 leaves no room for connections)"),
    ({"max_children": 300, "max_children_given": True, "pids_limit": 100, "pids_fit": 79},
     ", max-children 300 (about 79 fit the pids limit of 100)"),
    ({"max_children": 300, "max_children_given": True, "memory_limit": 64 * MiB,
      "memory_fit": 52, "pids_limit": 100, "pids_fit": 79},
     ", max-children 300 (about 52 fit the memory limit of 64 MiB, about 79 fit the pids "
     "limit of 100)"),
    ({"max_children": 1024, "max_children_given": False, "pids_limit": 5000,
      "pids_fit": 5000 - OWN_PIDS}, ", max-children 1024"),  # far above: nothing to say
])
def test_status_says_which_limit_the_value_came_from(reply: dict[str, object],
                                                     header: str) -> None:
    assert status_max_children(reply) == header


@pytest.mark.parametrize(("memory", "pids", "nproc", "metrics_on", "expected"), [
    (None, None, (30, 0), False, 30 - OWN_PIDS),
    (None, None, (30, 4), False, 30 - 4 - OWN_PIDS),  # the user's other tasks counted
    (None, None, (100, 0), True, 100 - OWN_PIDS - METRICS_PIDS),
    (None, None, (OWN_PIDS, 0), False, 1),  # no room: one, not none
    (None, None, (63_000, 200), False, DEFAULT_MAX_CHILDREN),  # a distribution's default
    (64 * MiB, None, (100, 0), False, 36),  # the memory limit holds fewer
    (None, 40, (100, 0), False, 40 - OWN_PIDS),  # the pids limit holds fewer
    (None, 100, (40, 0), False, 40 - OWN_PIDS),  # the nproc limit holds fewer
    (None, None, (None, 0), False, DEFAULT_MAX_CHILDREN),  # none, or root: exempt
])
def test_the_derived_max_children_is_what_the_nproc_limit_holds_too(
    memory: int | None, pids: int | None, nproc: tuple[int | None, int], metrics_on: bool,
    expected: int
) -> None:
    """`ulimit -u 30` for a user: the default stayed 1024, and past the limit every fork
    failed. RLIMIT_NPROC counts the user's processes and threads as pids.max counts the
    cgroup's (the user's others too), and bounds the derived value the same way."""
    options = Options(max_children_given=False, metrics="127.0.0.1:0" if metrics_on else None)
    derived = with_limits(options, memory, pids, nproc)
    assert (derived.max_children, derived.nproc_limit, derived.nproc_others) == (
        expected, *nproc)
    assert with_limits(Options(max_children=500), memory, pids, nproc).max_children == 500


def test_the_start_line_says_when_the_nproc_limit_bounds_the_value(tmp_path: Path) -> None:
    only_nproc = with_limits(Options(max_children_given=False), None, None, (50, 3))
    [line] = start_lines(tmp_path, only_nproc)
    assert line.endswith(f" info max-children value={50 - 3 - OWN_PIDS} nproc_limit=50 "
                         "detail=\"fits the nproc limit of 50; --max-children overrides\""), line
    both = with_limits(Options(max_children_given=False), None, 40, (40, 0))
    [line] = start_lines(tmp_path, both)
    assert line.endswith(f" info max-children value={40 - OWN_PIDS} pids_limit=40 "
                         "nproc_limit=40 detail=\"fits the pids limit of 40 and the nproc limit "
                         "of 40; --max-children overrides\""), line
    no_room = with_limits(Options(max_children_given=False), None, None, (OWN_PIDS + 1, 2))
    [line] = start_lines(tmp_path, no_room)
    assert line.endswith(f" warning max-children value=1 nproc_limit={OWN_PIDS + 1} "
                         f"detail=\"the nproc limit of {OWN_PIDS + 1} leaves no room for "
                         f"connections beside forkproxy's own {OWN_PIDS} processes and threads "
                         "and the user's 2 others; --max-children overrides\""), line
    given = with_limits(Options(max_children=300), None, None, (100, 0))
    [line] = start_lines(tmp_path, given)
    assert line.endswith(f" warning max-children value=300 fits={100 - OWN_PIDS} "
                         f"nproc_limit=100 detail=\"about {100 - OWN_PIDS} fit the nproc limit "
                         "of 100; beyond that forks fail and clients wait for one that works "
                         "(fork-failed)\""), line
    # A distribution's default, far above: a debug line only.
    far = with_limits(Options(max_children_given=False, verbosity=1), None, None, (63_000, 0))
    [line] = start_lines(tmp_path, far)
    assert line.endswith(" debug max-children value=1024 detail=\"no memory limit found, and "
                         "the nproc limit of 63000 holds more\""), line


@pytest.mark.parametrize(("reply", "header"), [
    ({"max_children": 9, "max_children_given": False, "nproc_limit": 30, "nproc_fit": 9},
     ", max-children 9 (fits the nproc limit of 30)"),
    ({"max_children": 1, "max_children_given": False, "nproc_limit": 30, "nproc_fit": 0},
     ", max-children 1 (the nproc limit of 30 leaves no room for connections)"),
    ({"max_children": 50, "max_children_given": True, "nproc_limit": 30, "nproc_fit": 9},
     ", max-children 50 (about 9 fit the nproc limit of 30)"),
    ({"max_children": 1024, "max_children_given": False, "nproc_limit": 63000,
      "nproc_fit": 62979}, ", max-children 1024"),
    # A value given above the default: a limit that holds fewer is said, one that holds
    # as many (or more) is no news.
    ({"max_children": 2000, "max_children_given": True, "nproc_limit": 5000,
      "nproc_fit": 1999}, ", max-children 2000 (about 1999 fit the nproc limit of 5000)"),
    ({"max_children": 2000, "max_children_given": True, "nproc_limit": 5000,
      "nproc_fit": 2000}, ", max-children 2000"),
])
def test_status_says_when_the_nproc_limit_bounds_the_value(reply: dict[str, object],
                                                           header: str) -> None:
    assert status_max_children(reply) == header


INITIAL_MAP = "         0          0 4294967295\n"


@pytest.mark.parametrize(("outer_uid", "uid_map", "cap_eff", "exempt"), [
    (0, INITIAL_MAP, "0000000000000000", True),  # root (a container's without a userns too)
    (999, INITIAL_MAP, "0000000000000000", False),  # a user
    (999, INITIAL_MAP, "0000000001000000", True),  # with CAP_SYS_RESOURCE
    (999, INITIAL_MAP, "0000000000200000", True),  # with CAP_SYS_ADMIN
    (999, INITIAL_MAP, "0000000000000004", False),  # CAP_DAC_READ_SEARCH exempts from nothing
    (999, "0 999 1\n", "000001ffffffffff", False),  # `unshare -r`: every cap, in its userns
    (None, "", "000001ffffffffff", False),  # `unshare -U`, no map
    (0, "0 0 1\n", "000001ffffffffff", True),  # root mapped to root
    (999, None, None, False),  # no /proc
])
def test_who_the_nproc_limit_holds(outer_uid: int | None, uid_map: str | None,
                                   cap_eff: str | None, exempt: bool) -> None:
    """As the kernel's copy_process: root by its real uid outside (INIT_USER), or
    CAP_SYS_ADMIN or CAP_SYS_RESOURCE in the initial user namespace."""
    status = None if cap_eff is None else f"Name:\tx\nCapInh:\t0\nCapEff:\t{cap_eff}\n"
    assert nproc_exempt(outer_uid, uid_map, status) is exempt


def test_the_user_s_other_tasks_are_counted_with_their_threads(tmp_path: Path) -> None:
    """What RLIMIT_NPROC counts besides forkproxy: the user's processes (by real uid) and
    their threads, this process left out; another user's, or one that is not a process
    directory, not."""
    uid = os.getuid()
    for pid, real, threads in ((10, uid, 1), (11, uid, 4), (12, uid + 1, 7), (13, uid, 2)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "status").write_text(
            f"Name:\tx\nUid:\t{real}\t{uid}\t{uid}\t{uid}\nThreads:\t{threads}\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "14").mkdir()  # ended while read: no status
    os.chown(tmp_path / "13", uid + 1, uid + 1)  # another user's: not read
    (tmp_path / "13" / "status").chmod(0)
    assert count_user_tasks(uid, str(tmp_path), own_pid=11) == 1
    assert count_user_tasks(uid, str(tmp_path)) == 1 + 4
    assert count_user_tasks(uid, str(tmp_path / "none")) == 0


def test_a_process_left_out_is_left_out_with_its_children(tmp_path: Path) -> None:
    """`serve --take-over`: the supervisor taken over from and its connections' children
    (by PPid) are not the user's other tasks; its grandparent's other children are."""
    uid = os.getuid()
    for pid, parent, threads in ((20, 1, 2), (21, 20, 1), (22, 20, 3), (23, 1, 5)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "status").write_text(
            f"Name:\tx\nPPid:\t{parent}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
            f"Gid:\t0\t0\t0\t0\nThreads:\t{threads}\nSigQ:\t0/1\n")
    assert count_user_tasks(uid, str(tmp_path)) == 2 + 1 + 3 + 5
    assert count_user_tasks(uid, str(tmp_path), leave_out=20) == 5


def test_root_is_not_held_to_the_nproc_limit() -> None:
    """The tests run as root: a limit that does not apply is no limit at all."""
    assert os.getuid() == 0
    assert read_nproc_limit() == (None, 0)
