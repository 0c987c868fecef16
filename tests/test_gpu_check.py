"""benchmarks/gpu_check.sh --dry-run: every leg of the GPU check runs on CPU at toy sizes and the JSON
holds a number for each (the numbers of a real GPU come from the same code)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_leg(tmp_path, prepared_dir):
    out = tmp_path / "gpu"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="2")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--prepared",
                           str(prepared_dir), "--timed-steps", "2"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and (out / "gpu_check.log").read_text().count("gpu_check: ") >= 12
    legs = report["legs"]
    for preset in ("gpu-125m", "gpu-350m"):
        for mode in ("eager", "compiled"):
            leg = legs[f"throughput/{preset}/{mode}"]
            assert leg["tok_per_s"] > 0 and 0 < leg["mfu"] < 1 and leg["peak_memory_gib"] > 0, leg
            assert leg["compile"] == (mode == "compiled") and math.isfinite(leg["loss"]) and leg["fused_adamw"]
    assert report["mfu_350m_compiled"] == legs["throughput/gpu-350m/compiled"]["mfu"]
    assert legs["throughput/gpu-125m/eager-host-sync"]["host_sync_per_step"]
    assert report["device_skip_over_host_sync_125m_eager"] > 0
    fsdp = legs["fsdp"]
    assert "error" not in fsdp, fsdp
    assert fsdp.get("compactions") == 1, fsdp  # train.parallel exists: the one-GPU FSDP leg must run
    versus = legs["idea_vs_scratch"]
    assert versus["idea"]["tokens"] == versus["scratch"]["tokens"] > 0
    assert versus["idea"]["params"] == versus["scratch"]["params"]  # IDEA compacted to the target's size
    assert versus["idea_over_scratch_ppl"] > 0
