"""scripts/gpu_compare.sh --dry-run: per-seed compares on CPU at toy sizes, aggregated to mean ± std."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_compare_dry_run_aggregates_seeds(tmp_path, prepared_dir):
    out = tmp_path / "gc"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="2")
    runs = "compare.runs={scratch: {pipeline.name: scratch}, idea: {pipeline.name: idea}}"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_compare.sh"), "--dry-run", "--seeds", "0,1",
                           "--set", f"data.prepared_dir={prepared_dir}", "--set", runs,
                           "--set", "compare.scratch_equal_compute=false"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_compare.json").read_text())
    assert report["seeds"] == [0, 1] and report["epochs_per_run"] > 0 and report["unique_train_tokens"] > 0
    if report["native_seeds"]:  # lmprune's own compare.seeds (issue 14) did the aggregation
        return
    assert set(report["runs"]) == {"scratch", "idea"}
    for name, entry in report["runs"].items():
        per_seed = [json.loads((out / f"seed-{s}" / "summary.json").read_text())["pipelines"][name]["val_ppl"]
                    for s in (0, 1)]
        assert entry["val_ppl"] == per_seed and entry["val_ppl_mean"] == statistics.fmean(per_seed)
        assert entry["val_ppl_std"] == statistics.stdev(per_seed)
    assert report["runs"]["scratch"]["val_ppl"][0] != report["runs"]["scratch"]["val_ppl"][1]  # seeds differ
    table = (out / "gpu_compare.md").read_text()
    assert "| idea |" in table and "±" in table and (out / "gpu_compare.log").is_file()
