"""benchmarks/bench_prepare.py at toy sizes (1 and 2 MB): every measurement runs and prints its ratio,
and the shards of --num-proc 1 and 2 are byte-identical (the real numbers come from the same code)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_prepare_prints_every_ratio(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_prepare.py"), "--work", str(tmp_path),
                           "--small-mb", "1", "--large-mb", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for label in ("RSS(2 MB) / RSS(1 MB)", "--num-proc 1 / bare loop", "--num-proc 1 tokens/s, 1 MB",
                  "--num-proc 1 tokens/s, 2 MB"):
        ratio = re.search(re.escape(label) + r"[^:]*: ([0-9.]+)", out)
        assert ratio and float(ratio.group(1)) > 0, (label, out)
    assert "startup of one prepare process" in out
    assert "byte-identical: True" in out
