"""`lmprune compare` with an init run: MGPP vs GMP vs IMP from the same starting model."""

from __future__ import annotations

import json

from conftest import tiny_run_config, write_config
from lmprune.cli import main


def test_sparse_compare_from_one_starting_model(tmp_path, prepared_dir):
    raw = tiny_run_config(prepared_dir, steps=12, warmup=0, lr=5e-4, lr_end=5e-5, eval_every=0, sample_tokens=0)
    raw["train"]["export_sparse"] = True
    raw["compare"] = {
        "init": {"train.steps": 16, "train.lr": 3e-3, "train.warmup": 2, "train.export_sparse": False},
        "runs": {
            "mgpp_80": {"mgpp": {"warmup_steps": 1, "s_i": 0.5, "s_f": 0.8, "cubic_steps": 8, "dt": 2}},
            "gmp_80": {"gmp": {"s_i": 0.0, "s_f": 0.8, "t0": 1, "n": 4, "dt": 2, "scope": "global"}},
            "imp_80": {"imp": {"levels": [0.4, 0.6, 0.8], "steps_per_round": 4}},
        },
        "scratch_equal_compute": False, "infer_batch_size": 2, "infer_seq_len": 32}
    out = tmp_path / "cmp"
    assert main(["compare", str(write_config(tmp_path / "c.yaml", raw)), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())["pipelines"]
    assert set(summary) == {"init", "mgpp_80", "gmp_80", "imp_80"}
    for name in ("mgpp_80", "gmp_80", "imp_80"):
        assert abs(summary[name]["sparsity"] - 0.8) < 1e-3, name
        assert summary[name]["final_sparse_bytes"] < summary[name]["final_bytes"]
        run_config = json.loads((out / name / "run_config.json").read_text())
        assert run_config["model"]["path"] == str(out / "init" / "final")
    assert summary["init"]["sparsity"] < 0.01
    report = (out / "report.md").read_text()
    assert "Unstructured sparsity" in report and "no speed-up" in report and "mgpp" in report
    assert (out / "ppl_vs_sparsity.png").stat().st_size > 1000
