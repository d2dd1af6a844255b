"""Names are resolved by the supervisor, once, and again on reload (SIGHUP).

A network namespace gets its own /etc/hosts (`ip netns exec` bind-mounts
/etc/netns/NAME/hosts over it), so the test can move a name from one redis to another
without touching the machine's resolver.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import netns
from netns import Lab, Namespace, redis_cli

pytestmark = [pytest.mark.netns]
FORKPROXY = str(Path(sys.executable).parent / "forkproxy")
REDIS_PORT = 16390
LISTEN_PORT = 7000


@pytest.fixture
def lab() -> Iterator[Lab]:
    missing = netns.missing_tools()
    if missing:
        pytest.fail(f"missing {', '.join(missing)} (run ./scripts/test as root)")
    workdir = Path(tempfile.mkdtemp(prefix="fpdns-", dir="/tmp"))
    with Lab(workdir) as lab:
        yield lab
    shutil.rmtree(workdir, ignore_errors=True)


def set_hosts(ns: Namespace, address: str) -> None:
    """Rewrite the namespace's hosts file in place (the bind mount follows the inode)."""
    path = Path("/etc/netns") / ns.name / "hosts"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        handle.write(f"127.0.0.1 localhost\n{address} upstream.test\n")


def start_redis(lab: Lab, ns: Namespace, address: str, name: str) -> None:
    lab.spawn(ns, ["redis-server", "--port", str(REDIS_PORT), "--bind", address, "--save", "",
                   "--appendonly", "no"], label=f"redis-{name}")
    deadline = time.monotonic() + 10
    while redis_cli(ns, REDIS_PORT, "PING", host=address, check=False) != "PONG":
        assert time.monotonic() < deadline, f"redis on {address} did not start"
        time.sleep(0.05)
    redis_cli(ns, REDIS_PORT, "SET", "who", name, host=address)


def who(ns: Namespace) -> str:
    return redis_cli(ns, LISTEN_PORT, "GET", "who", check=False)


def test_reload_re_resolves_names_and_only_reload_does(lab: Lab) -> None:
    ns = lab.namespace("dns")
    try:
        set_hosts(ns, "127.0.0.2")
        start_redis(lab, ns, "127.0.0.2", "first")
        start_redis(lab, ns, "127.0.0.3", "second")
        env_file = lab.workdir / "links.env"
        env_file.write_text(f"DB_PORT_{LISTEN_PORT}_TCP=tcp://upstream.test:{REDIS_PORT}\n")
        proxy = lab.spawn(ns, [FORKPROXY, "serve", "--env-file", str(env_file),
                               "--status-socket", str(lab.workdir / "fp.sock")], label="proxy")
        proxy.wait_stdout(lambda lines: any(x.startswith("listening ") for x in lines), 15)
        assert who(ns) == "first"

        set_hosts(ns, "127.0.0.3")  # the name moves; nobody has told the proxy yet
        for _ in range(5):
            assert who(ns) == "first"  # the supervisor's resolution holds, not each child's

        proxy.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while who(ns) != "second":
            assert time.monotonic() < deadline, proxy.describe()
            time.sleep(0.1)
        assert proxy.alive()
        assert "reload-failed" not in proxy.stderr()
    finally:
        shutil.rmtree(Path("/etc/netns") / ns.name, ignore_errors=True)
