"""Crash tests: lmprune.atomic.crash_point (LMPRUNE_CRASH_AT) and scripts/crash_grid.py end to end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "LMPRUNE_CRASH_AT"}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

TWO_WRITES = """
import sys
from lmprune.atomic import write_text
write_text(sys.argv[1], "old")
print("first write done", flush=True)
write_text(sys.argv[1], "new")
print("second write done", flush=True)
"""


def run_two_writes(path: Path, crash_at: str | None) -> subprocess.CompletedProcess:
    env = dict(ENV, **({"LMPRUNE_CRASH_AT": crash_at} if crash_at else {}))
    return subprocess.run([sys.executable, "-c", TWO_WRITES, str(path)], capture_output=True, text=True,
                          env=env, timeout=60)


def test_crash_point_kills_on_the_nth_call_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    result = run_two_writes(target, "atomic_file.before_replace:2")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "first write done" in result.stdout and "second write done" not in result.stdout
    assert "SIGKILL at atomic_file.before_replace #2" in result.stderr
    assert target.read_text() == "old"  # the kill came before os.replace: the old version is intact
    left = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and re.fullmatch(r"\.f\.txt\.tmp-\d+", left[0])  # the new one, never published
    assert (tmp_path / left[0]).read_text() == "new"


@pytest.mark.parametrize("crash_at", [None, "atomic_file.before_replace:3", "atomic_dir.filled:1", "nonsense"])
def test_crash_point_does_nothing_otherwise(tmp_path, crash_at):
    target = tmp_path / "f.txt"
    result = run_two_writes(target, crash_at)
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    assert ("ignored" in result.stderr) == (crash_at == "nonsense")


@pytest.mark.timeout(330)
@pytest.mark.parametrize("scenario", ["idea", "mgpp", "compare"])
def test_crash_grid_survives_three_kills(tmp_path, scenario):
    """What CI runs of `scripts/crash_grid.py --kills 3 --seed 0`, one scenario per test (each < 1 min)."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "crash_grid.py"), "--kills", "3", "--seed", "0",
                             "--only", scenario, "--jobs", "1", "--work", str(tmp_path / "grid")],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(rf"^{scenario}: survived 3/3 kills, final weights identical, metrics complete",
                     result.stdout, re.M), result.stdout[-4000:]
    assert "summary: 1/1 scenarios passed" in result.stdout
