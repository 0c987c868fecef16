"""`lmprune compare`: all pipelines side by side, summary.json contract, resume of an interrupted compare."""

from __future__ import annotations

import json
import shutil

from transformers import AutoModelForCausalLM

from conftest import write_config
from lmprune.cli import main
from test_pipelines import pipeline_config

KEYS = {"val_ppl", "params", "ffn_width", "train_tokens", "train_flops", "train_tok_per_s", "infer_tok_per_s"}


def compare_config(prepared_dir) -> dict:
    raw = pipeline_config(prepared_dir, "idea")
    raw["train"].update(steps=16, eval_every=8, save_every=4, log_every=2)
    raw["compare"] = {"runs": {"scratch": {"pipeline.name": "scratch"}, "idea": {"pipeline.name": "idea"},
                               "naive": {"pipeline.name": "naive"}, "oneshot": {"pipeline.name": "oneshot"}},
                      "scratch_equal_compute": True, "infer_batch_size": 2, "infer_seq_len": 32}
    return raw


def test_compare_writes_report_plots_summary_and_target_models(tmp_path, prepared_dir, capsys):
    cfg = write_config(tmp_path / "compare.yaml", compare_config(prepared_dir))
    out = tmp_path / "cmp"
    assert main(["compare", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert "report:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())["pipelines"]
    assert set(summary) == {"scratch", "idea", "naive", "oneshot", "scratch_equal_flops"}
    for name, row in summary.items():
        assert KEYS <= row.keys(), name
        model = AutoModelForCausalLM.from_pretrained(out / name / "final")
        assert model.config.intermediate_size == 64 == row["ffn_width"]
    tokens = {name: row["train_tokens"] for name, row in summary.items()}
    assert tokens["scratch"] == tokens["idea"] == tokens["naive"] == tokens["oneshot"]
    # the enlarged phase costs FLOPs: equal compute buys the small model more tokens
    assert summary["idea"]["train_flops"] > summary["scratch"]["train_flops"]
    assert tokens["scratch_equal_flops"] > tokens["scratch"]
    assert abs(summary["scratch_equal_flops"]["train_flops"] / summary["idea"]["train_flops"] - 1) < 0.1
    report = (out / "report.md").read_text()
    assert "| idea |" in report and "val_loss.png" in report
    assert (out / "val_loss.png").stat().st_size > 1000 and (out / "width.png").stat().st_size > 1000


def test_interrupted_compare_resumes_where_it_stopped(tmp_path, prepared_dir):
    raw = compare_config(prepared_dir)
    raw["compare"]["scratch_equal_compute"] = False
    raw["compare"]["runs"] = {"scratch": {"pipeline.name": "scratch"}, "idea": {"pipeline.name": "idea"}}
    cfg = write_config(tmp_path / "compare.yaml", raw)
    out = tmp_path / "cmp"
    assert main(["compare", str(cfg), "--out", str(out), "--quiet"]) == 0
    first = json.loads((out / "summary.json").read_text())["pipelines"]
    scratch_mtime = (out / "scratch" / "final" / "model.safetensors").stat().st_mtime_ns
    # interrupt idea after step 12 (mid-recovery): drop later checkpoints and the outputs
    shutil.rmtree(out / "idea" / "checkpoints" / "step-000016")
    shutil.rmtree(out / "idea" / "final")
    (out / "idea" / "summary.json").unlink()
    assert main(["compare", str(cfg), "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "summary.json").read_text())["pipelines"]
    assert (out / "scratch" / "final" / "model.safetensors").stat().st_mtime_ns == scratch_mtime  # not retrained
    assert again["idea"]["val_ppl"] == first["idea"]["val_ppl"]
    assert again["idea"]["train_flops"] == first["idea"]["train_flops"]


def test_compare_validates_every_run_before_training(tmp_path, prepared_dir, capsys):
    raw = compare_config(prepared_dir)
    raw["compare"]["runs"]["broken"] = {"pipeline.prune_start": 2.0}
    cfg = write_config(tmp_path / "compare.yaml", raw)
    assert main(["compare", str(cfg), "--out", str(tmp_path / "cmp"), "--quiet"]) == 2
    assert "run broken" in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "scratch").exists()
