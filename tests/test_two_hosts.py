"""The seed's two-host example, for real: hosts are network namespaces joined by veth cables.

    client-server                    cables                big-server, big-server-2
    consumer -> ambassador :6379 ---198.18.1.0/24---> ambassador :6379 -> redis 127.0.0.1:16379
                                 ---198.18.2.0/24---> ambassador :6379 -> redis 127.0.0.1:16379

The server ambassadors see only the variables `docker run --link redis:redis` would give
them; the client ambassador sees only `REDIS_PORT_6379_TCP=tcp://<server>:6379`, as the
seed's remote host sets it with `-e`. The consumer is one long-lived process that
reconnects in a loop (tests/netns.py consumer) and is never restarted; the two redis
servers hold different data (fp:host), so every reply says which one answered.

Needs root, `ip`/`ss` (iproute2), `redis-server` and `redis-cli`: fails without them
(never a skip).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import netns
from netns import Cable, Lab, Namespace, Process

pytestmark = [pytest.mark.netns]

NETNS_PY = Path(__file__).with_name("netns.py")

CLIENT_TO_BIG = "198.18.1.1"
BIG_ADDR = "198.18.1.2"
CLIENT_TO_BIG2 = "198.18.2.1"
BIG2_ADDR = "198.18.2.2"
REDIS_PORT = 16379  # the redis "container" port, on each server's loopback
AMB_PORT = 6379

CONNECT_TIMEOUT = 2.0
# "Ends within the connect timeout plus a little": a bound against hangs on a loaded CI
# machine, not a speed assertion.
MARGIN = 3.0
CUT_SECONDS = 2 * CONNECT_TIMEOUT + 1.5
AMB_OPTIONS = ("--connect-timeout", f"{CONNECT_TIMEOUT:g}", "--grace", "2")

# The seed's whole ambassador: one socat per `*_PORT_<n>_TCP=` line of `env`.
SEED_SED = (
    r"s/.*_PORT_\([0-9]*\)_TCP=tcp:\/\/\(.*\):\(.*\)/"
    r"socat TCP4-LISTEN:\1,fork,reuseaddr TCP4:\2:\3 \&/"
)


def _unavailable(reason: str) -> None:
    """A missing prerequisite fails, as every missing peer does here (never a skip):
    ./scripts/test, run as root, installs what these tests need."""
    pytest.fail(f"{reason} (run ./scripts/test as root)", pytrace=False)


def forkproxy_command() -> list[str]:
    """`$FORKPROXY` if set, else the console script next to this interpreter (the venv)."""
    if os.environ.get("FORKPROXY"):
        return shlex.split(os.environ["FORKPROXY"])
    beside = Path(sys.executable).parent / "forkproxy"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("forkproxy")
    return [found] if found else [sys.executable, "-m", "forkproxy"]


def server_link_env() -> dict[str, str]:
    """What `docker run --link redis:redis --name redis_ambassador` gives the ambassador."""
    return netns.docker_link_env(
        "redis", AMB_PORT, "127.0.0.1", REDIS_PORT, name="/redis_ambassador/redis", child_env={}
    )


@dataclass
class Hosts:
    lab: Lab
    forkproxy: list[str]
    client: Namespace
    big: Namespace
    big2: Namespace
    cable_big: Cable
    cable_big2: Cable
    servers: list[Process]  # big-server's and big-server-2's ambassadors

    def client_ambassador(self, env: dict[str, str]) -> tuple[Process, list[str]]:
        return self.lab.ambassador(
            self.client, env, forkproxy=self.forkproxy, options=AMB_OPTIONS, label="ambassador"
        )

    def consumer(self, log: Path) -> Process:
        argv = [sys.executable, str(NETNS_PY), "consumer", "--log", str(log), "--interval", "0.2"]
        return self.lab.spawn(self.client, argv, label="consumer")

    def check(self, amb: Process) -> subprocess.CompletedProcess[str]:
        """`forkproxy check` against that ambassador's control socket."""
        argv = [*self.forkproxy, "check", "--status-socket", str(amb.status_socket)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=15.0, check=False)

    def server_value(self, ns: Namespace, key: str) -> str:
        """Read `key` straight from the real redis on that host (bypassing every proxy)."""
        return netns.redis_cli(ns, REDIS_PORT, "GET", key)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    if os.geteuid() != 0:
        _unavailable("network namespaces need root")
    missing = netns.missing_tools(("ip", "ss", "redis-server", "redis-cli", "sed"))
    if missing:
        _unavailable(f"missing tools: {', '.join(missing)}")
    forkproxy = forkproxy_command()
    with Lab(tmp_path_factory.mktemp("two-hosts")) as lab:
        client = lab.namespace("client-server")
        big = lab.namespace("big-server")
        big2 = lab.namespace("big-server-2")
        cable_big = lab.cable(client, CLIENT_TO_BIG, big, BIG_ADDR)
        cable_big2 = lab.cable(client, CLIENT_TO_BIG2, big2, BIG2_ADDR)
        lab.redis(big, REDIS_PORT, {"fp:host": "big-server"})
        lab.redis(big2, REDIS_PORT, {"fp:host": "big-server-2"})
        servers = []
        for ns in (big, big2):
            amb, lines = lab.ambassador(
                ns, server_link_env(), forkproxy=forkproxy, options=AMB_OPTIONS
            )
            assert len(lines) == 1, lines
            assert f"-> 127.0.0.1:{REDIS_PORT}" in lines[0], lines
            servers.append(amb)
        yield Hosts(lab, forkproxy, client, big, big2, cable_big, cable_big2, servers)


@pytest.fixture
def hosts(two_hosts: Hosts) -> Iterator[Hosts]:
    """The module's hosts; what a test starts on them is stopped, and cables mended, after it."""
    for amb in two_hosts.servers:
        assert amb.alive(), amb.describe()
    started = len(two_hosts.lab.processes)
    try:
        yield two_hosts
    finally:
        for proc in reversed(two_hosts.lab.processes[started:]):
            two_hosts.lab.stop(proc, timeout=5.0)
        two_hosts.cable_big.restore()
        two_hosts.cable_big2.restore()


Attempts = list[dict[str, Any]]


def wait_attempts(
    log: Path, ready: Callable[[Attempts], bool], timeout: float, what: str, *procs: Process
) -> Attempts:
    deadline = time.monotonic() + timeout
    while True:
        attempts = netns.read_attempts(log)
        if ready(attempts):
            return attempts
        if time.monotonic() > deadline:
            details = "\n".join(p.describe() for p in procs)
            pytest.fail(f"{what}: not within {timeout} s; last attempts {attempts[-6:]}\n{details}")
        time.sleep(0.05)


def show(attempts: Attempts) -> str:
    return "\n".join(netns.describe_attempt(a) for a in attempts)


def redis_cli_linked(ns: Namespace, *command: str) -> str:
    """The seed's `docker run --link redis_ambassador:redis relateiq/redis-cli`: redis-cli
    run with only the link variables, connecting where they point."""
    env = netns.docker_link_env("redis", AMB_PORT, "127.0.0.1", name="/redis-cli/redis")
    script = 'exec redis-cli -h "$REDIS_PORT_6379_TCP_ADDR" -p "$REDIS_PORT_6379_TCP_PORT" "$@"'
    argv = ["env", "-i", f"PATH={netns.PLAIN_PATH}", *(f"{k}={v}" for k, v in env.items())]
    return ns.run([*argv, "sh", "-c", script, "redis-cli", *command], timeout=15.0).strip()


def test_consumer_never_restarted_through_rewire_and_cut(hosts: Hosts, tmp_path: Path) -> None:
    h = hosts
    # Nothing shortcuts the ambassadors: nothing listens on the client yet, and the real
    # redis listens on big-server's loopback only.
    assert netns.probe_connect(h.client, "127.0.0.1", AMB_PORT, 2.0) == "refused"
    assert netns.probe_connect(h.client, BIG_ADDR, REDIS_PORT, 2.0) == "refused"

    # -- 1. consumer -> client ambassador -> network -> server ambassador -> redis -------
    amb, lines = h.client_ambassador({"REDIS_PORT_6379_TCP": f"tcp://{BIG_ADDR}:{AMB_PORT}"})
    assert len(lines) == 1 and f"-> {BIG_ADDR}:{AMB_PORT}" in lines[0], lines
    log = tmp_path / "consumer.jsonl"
    consumer = h.consumer(log)
    attempts = wait_attempts(log, lambda a: len(a) >= 4, 15.0, "first attempts", consumer, amb)
    for a in attempts:
        replies = (a["outcome"], a.get("ping"), a.get("set"), a.get("value"))
        assert replies == ("ok", "PONG", "OK", "big-server"), show(attempts)
    # The consumer's SETs landed in big-server's redis, and not in big-server-2's.
    assert int(h.server_value(h.big, "fp:consumer:seq")) >= attempts[-1]["seq"]
    assert h.server_value(h.big2, "fp:consumer:seq") == ""

    # The real redis-cli, used as the seed uses it, through the same two ambassadors.
    assert redis_cli_linked(h.client, "PING") == "PONG"
    assert redis_cli_linked(h.client, "SET", "fp:seed", "hello from client-server") == "OK"
    assert redis_cli_linked(h.client, "GET", "fp:seed") == "hello from client-server"
    assert h.server_value(h.big, "fp:seed") == "hello from client-server"

    # -- 2. rewire: restart only the client's ambassador, pointed at big-server-2 -------
    assert h.lab.stop(amb, timeout=10.0) == 0, amb.describe()
    amb, lines = h.client_ambassador({"REDIS_PORT_6379_TCP": f"tcp://{BIG2_ADDR}:{AMB_PORT}"})
    assert len(lines) == 1 and f"-> {BIG2_ADDR}:{AMB_PORT}" in lines[0], lines
    ready = time.monotonic()
    attempts = wait_attempts(
        log,
        lambda a: sum(x["start"] > ready for x in a) >= 3,
        15.0,
        "attempts after the rewire",
        consumer,
        amb,
    )
    assert consumer.alive(), consumer.describe()
    after = [a for a in attempts if a["start"] > ready]
    # Its very next connection reaches big-server-2, and so does every one after it.
    for a in after:
        assert (a["outcome"], a.get("value")) == ("ok", "big-server-2"), show(attempts[-10:])
    assert int(h.server_value(h.big2, "fp:consumer:seq")) >= after[-1]["seq"]
    assert int(h.server_value(h.big, "fp:consumer:seq")) < after[0]["seq"]
    assert redis_cli_linked(h.client, "GET", "fp:host") == "big-server-2"

    # -- 3. cut the cable at big-server-2's end, for longer than the connect timeout ----
    # A request already in flight on an established connection when the cable goes is
    # not what this is about: TCP retransmits it and it completes once the cable is back,
    # and meanwhile the consumer makes no new request. The cut is timed into the
    # consumer's pause between attempts, and made again should it still catch one.
    windows: list[tuple[float, float]] = []
    for _ in range(3):
        cut, mended = cut_for_a_while(h, log, amb)
        windows.append((cut, mended))
        attempts = wait_attempts(
            log,
            recovered_after(mended),
            CONNECT_TIMEOUT + MARGIN + 10.0,
            "recovery after the cable is back",
            consumer,
            amb,
        )
        during = [a for a in attempts if a["start"] >= cut and a["end"] <= mended]
        if during:
            break
        assert any(a["start"] < cut < a["end"] for a in attempts), show(attempts[-20:])
    else:
        pytest.fail(f"every cut caught a request in flight:\n{show(attempts[-30:])}")
    # Every request made during the cut ended with a closed connection, not a hang.
    for a in during:
        assert a["outcome"] in ("closed", "reset"), show(during)
    # No attempt, ever, hung: each ended within the connect timeout plus a little (one
    # in flight at a cut: within that much once the cable was back).
    for a in attempts:
        assert a["outcome"] not in ("timeout", "error"), show([a])
        bound = a["start"]
        for cut_at, mended_at in windows:
            if a["start"] < cut_at < a["end"]:
                bound = max(bound, mended_at)
        assert a["end"] - bound <= CONNECT_TIMEOUT + MARGIN, show([a])
    # The ambassador survived (same process, still answering), and the consumer
    # recovered by itself.
    assert amb.alive(), amb.describe()
    assert h.check(amb).returncode == 0, amb.describe()
    first_ok = next(a for a in attempts if a["start"] > mended and a["outcome"] == "ok")
    for a in attempts[attempts.index(first_ok) :]:
        assert (a["outcome"], a.get("value")) == ("ok", "big-server-2"), show(attempts[-10:])
    assert consumer.alive(), consumer.describe()


def recovered_after(mended: float) -> Callable[[Attempts], bool]:
    return lambda a: sum(x["start"] > mended and x["outcome"] == "ok" for x in a) >= 3


def cut_for_a_while(h: Hosts, log: Path, amb: Process) -> tuple[float, float]:
    """Cut big-server-2's cable just after the consumer reported an attempt (it then
    pauses before the next one), keep it cut CUT_SECONDS, mend it: (cut, mended) times."""
    size = log.stat().st_size
    deadline = time.monotonic() + 10.0
    while log.stat().st_size == size:
        if time.monotonic() > deadline:
            pytest.fail("the consumer stopped reporting")
        time.sleep(0.002)
    h.cable_big2.cut()
    cut = time.monotonic()
    try:
        # The client still has its route and a permanent neighbour entry: the SYN goes
        # out and nothing answers (no RST, no ICMP), so only a timeout can end it.
        assert netns.probe_connect(h.client, BIG2_ADDR, AMB_PORT, 1.0) == "timeout"
        time.sleep(max(0.0, cut + CUT_SECONDS - time.monotonic()))
        assert amb.alive(), amb.describe()
        answer = h.check(amb)
        assert answer.returncode == 0, f"{answer}\n{amb.describe()}"
    finally:
        mended = time.monotonic()
        h.cable_big2.restore()
    return cut, mended


def test_chained_ambassador_opens_exactly_one_listener(hosts: Hosts) -> None:
    """client-server's ambassador linked to big-server's ambassador, as Docker would link
    them: it also sees that ambassador's own variables re-exported as REDIS_ENV_*."""
    h = hosts
    env = netns.docker_link_env(
        "redis", AMB_PORT, BIG_ADDR, name="/redis_ambassador/redis", child_env=server_link_env()
    )
    assert env["REDIS_ENV_REDIS_PORT_6379_TCP"] == f"tcp://127.0.0.1:{REDIS_PORT}"
    # The seed's sed turns this environment into two socats fighting over port 6379.
    env_argv = ["env", "-i", f"PATH={netns.PLAIN_PATH}", *(f"{k}={v}" for k, v in env.items())]
    seed = subprocess.run(
        [*env_argv, "sh", "-c", f"env | grep _TCP= | sed '{SEED_SED}'"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(seed) == 2 and all("TCP4-LISTEN:6379," in cmd for cmd in seed), seed

    amb, lines = h.client_ambassador(env)
    assert len(lines) == 1, lines
    assert f":{AMB_PORT} -> {BIG_ADDR}:{AMB_PORT}" in lines[0], lines
    assert h.client.tcp_listeners() == [f"0.0.0.0:{AMB_PORT}"], amb.describe()
    assert redis_cli_linked(h.client, "GET", "fp:host") == "big-server"
    assert amb.alive(), amb.describe()


def test_demo_script_tells_the_story_and_cleans_up(two_hosts: Hosts) -> None:
    """scripts/two-hosts-demo, run quickly: same story, and nothing left behind."""
    demo = Path(__file__).resolve().parent.parent / "scripts" / "two-hosts-demo"
    env = {**os.environ, "FORKPROXY": shlex.join(two_hosts.forkproxy)}
    proc = subprocess.Popen(
        [str(demo), "--pace", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=90.0)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # its trap cleans up
        out, _ = proc.communicate(timeout=15.0)
        pytest.fail(f"demo did not finish within 90 s:\n{out}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        netns.sweep_stale_namespaces()
    assert proc.returncode == 0, out
    consumer = [line for line in out.splitlines() if "consumer |" in line]
    assert any("GET -> 'big-server'" in line for line in consumer), out
    assert any("GET -> 'big-server-2'" in line for line in consumer), out
    assert any("closed by the ambassador" in ln or "reset" in ln for ln in consumer), out
    assert not any("NO ANSWER" in line for line in consumer), out
    assert f"listening sockets on client-server: 0.0.0.0:{AMB_PORT}\n" in out, out
    leftovers = netns.run(["ip", "netns", "list"])
    assert f"{netns.NAME_BASE}-{proc.pid}-" not in leftovers, leftovers


# A run of this module killed outright (SIGKILL: a CI job's timeout, the OOM killer), with
# a namespace and its /etc/netns/NAME/hosts made; it prints the name, then waits.
KILLED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import netns
lab = netns.Lab(Path(sys.argv[2])).__enter__()
ns = lab.namespace("killed")
(netns.ETC_NETNS / ns.name).mkdir(parents=True)
(netns.ETC_NETNS / ns.name / "hosts").write_text("127.0.0.1 localhost\\n")
print(ns.name, flush=True)
sys.stdin.read()
"""


def test_a_killed_runs_namespace_and_its_etc_netns_files_are_swept(tmp_path: Path) -> None:
    """A run killed outright left its namespaces, which the next Lab sweeps, and their
    /etc/netns/NAME directories (the hosts and resolv.conf of test_reload_dns.py,
    test_ipv6.py, test_serve.py), which stayed in /etc for good: swept with them now."""
    if os.geteuid() != 0:
        _unavailable("network namespaces need root")
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(Path(__file__).parent),
                            str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    try:
        assert run.stdout is not None
        name = run.stdout.readline().strip()
        assert name.startswith(f"{netns.NAME_BASE}-{run.pid}-"), name
    finally:
        run.kill()
        run.wait(30)
        if run.stdin is not None:
            run.stdin.close()
        if run.stdout is not None:
            run.stdout.close()
    assert (netns.ETC_NETNS / name / "hosts").exists()  # what the kill left
    try:
        assert name in netns.sweep_stale_namespaces()
        assert name not in netns.run(["ip", "netns", "list"])
        assert not (netns.ETC_NETNS / name).exists()
    finally:  # without the fix: not left behind by this test
        shutil.rmtree(netns.ETC_NETNS / name, ignore_errors=True)
