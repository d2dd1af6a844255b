"""Smoke run of scripts/bench: the harness works end to end.

Tiny workloads (~1 s each), one round, every workload and candidate, real peers. It checks
that each number is there and positive, never how fast anything is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
