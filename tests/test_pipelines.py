"""IDEA Prune and its baselines inside `lmprune train`: widths, LR traces, resume, KD, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_run_config, write_config
from lmprune.cli import main
from lmprune.config import config_from_dict
from lmprune.errors import UserError
from lmprune.pipelines import resolve_plan


def pipeline_config(prepared: Path, name: str, **pipeline) -> dict:
    raw = tiny_run_config(prepared, steps=24, warmup=2, eval_every=12, sample_tokens=0)
    raw["model"]["intermediate_size"] = 64  # the TARGET width; idea/naive/oneshot start at 64 x 2 = 128
    raw["pipeline"] = {"name": name, "enlarge": 2.0, "prune_start": 0.5, "prune_span": 0.25, "prune_every": 2,
                       **pipeline}
    return raw


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lr_rises(trace: list[float], after: int) -> list[int]:
    """Steps where a re-warm begins: the LR rises after having fallen (past the first warmup)."""
    up = [i > 0 and trace[i] > trace[i - 1] * (1 + 1e-9) for i in range(len(trace))]
    return [i for i in range(after + 1, len(trace)) if up[i] and not up[i - 1]]


def run(tmp_path: Path, raw: dict, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["train", str(write_config(tmp_path / f"{name}.yaml", raw)), "--out", str(out), "--quiet",
                 *extra]) == 0
    return out


def test_idea_prunes_iteratively_and_exports_the_target_width(tmp_path, prepared_dir):
    out = run(tmp_path, pipeline_config(prepared_dir, "idea"), "idea")
    metrics = rows(out)
    updates = [r for r in metrics if r.get("mask_update")]
    # updates after steps 14, 16, 18 (t_w=12, t_p=6; r(12) = 0 prunes nothing), logged as done = step + 1
    assert [r["step"] for r in updates] == [15, 17, 19]
    widths = [r["ffn_width"] for r in updates]
    assert widths == sorted(widths, reverse=True) and widths[-1] == 64 and widths[0] < 128
    assert metrics[-1]["ffn_width"] == 64 and metrics[-1]["pruned_fraction"] == pytest.approx(0.5)
    assert lr_rises([r["lr"] for r in metrics], after=2) == []  # one schedule: never re-warms

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.intermediate_size == 64
    assert all(layer.mlp.gate_proj.weight.shape == (64, 64) for layer in model.model.layers)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ffn_width"] == 64 and summary["train_flops"] > 0


def test_naive_rewarms_exactly_once_and_oneshot_resumed_never(tmp_path, prepared_dir):
    naive = rows(run(tmp_path, pipeline_config(prepared_dir, "naive"), "naive"))
    lrs = [r["lr"] for r in naive]
    assert lr_rises(lrs, after=2) == [12]  # row 12 = step index 12, the first of the new schedule
    assert lrs[11] == min(lrs[:12]) and lrs[11] < 1.5 * 3e-4  # schedule A has decayed to ~lr_end by t_w
    assert [r["ffn_width"] for r in naive if r.get("mask_update")] == [64]

    oneshot = rows(run(tmp_path, pipeline_config(prepared_dir, "oneshot"), "oneshot"))
    assert lr_rises([r["lr"] for r in oneshot], after=2) == []
    restarted = rows(run(tmp_path, pipeline_config(prepared_dir, "oneshot", oneshot_schedule="restarted"), "re"))
    # the new warmup starts below the interrupted schedule's LR, so the first rise is one step later
    assert lr_rises([r["lr"] for r in restarted], after=2) in ([12], [13])


def test_exact_resume_in_the_middle_of_pruning(tmp_path, prepared_dir):
    raw = pipeline_config(prepared_dir, "idea")
    raw["train"]["keep_last"] = 20
    straight = run(tmp_path, raw, "straight")
    out = run(tmp_path, raw, "cut", "--save-every", "2")
    for later in (16, 18, 20, 22, 24):  # go back to step 14: masks half-way, EMA live, model not compacted
        shutil.rmtree(out / "checkpoints" / f"step-{later:06d}")
    shutil.rmtree(out / "final")
    run(tmp_path, raw, "cut", "--save-every", "2", "--resume")
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["step"], r["loss"]) for r in rows(straight)] == [(r["step"], r["loss"]) for r in rows(out)]


def test_kd_from_the_snapshot_at_prune_start(tmp_path, prepared_dir):
    raw = pipeline_config(prepared_dir, "idea")
    raw["kd"] = {"alpha": 0.5, "temperature": 2.0}
    out = run(tmp_path, raw, "kd")
    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher")
    assert teacher.config.intermediate_size == 128
    kd_rows = [r for r in rows(out) if "kd_loss" in r]
    assert kd_rows and kd_rows[0]["step"] == 13
    # the snapshot is taken at the start of step 12: on that step teacher == student, so KL == 0; then
    # pruning and training move the student away from its frozen past self
    assert kd_rows[0]["kd_loss"] < 1e-6 and max(r["kd_loss"] for r in kd_rows[1:]) > 1e-3
    plain = json.loads((run(tmp_path, pipeline_config(prepared_dir, "idea"), "plain") / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text())["train_flops"] > plain["train_flops"]


def test_plan_widths_and_segments(prepared_dir):
    plan = resolve_plan(config_from_dict(pipeline_config(prepared_dir, "naive")))
    assert (plan.initial_width, plan.target_width) == (128, 64)
    assert plan.lr_segments == ((0, 12), (12, 12)) and plan.prune.span_steps == 0
    scratch = resolve_plan(config_from_dict(pipeline_config(prepared_dir, "scratch")))
    assert scratch.initial_width == 64 and scratch.prune is None
    narrow = resolve_plan(config_from_dict(pipeline_config(prepared_dir, "idea", state_dtype="bf16", ema=0.8)))
    assert (narrow.prune.state_dtype, narrow.prune.ema) == ("bf16", 0.8)


@pytest.mark.parametrize("change, fragment", [
    ({"pipeline": {"prune_start": 1.2}}, "prune_start must be in (0, 1)"),
    ({"pipeline": {"prune_start": 0.8, "prune_span": 0.3}}, "must end inside the run"),
    ({"pipeline": {"name": "sheared"}}, "pipeline.name"),
    ({"pipeline": {"f1": "median"}}, "pipeline.f1"),
    ({"pipeline": {"enlarge": 1.0}}, "enlarge must be > 1"),
    ({"model": {"intermediate_size": 60}}, "not a multiple of pipeline.round_to"),
    ({"pipeline": {"state_dtype": "bf16", "ema": 0.95}}, "needs pipeline.ema <= 0.9"),
])
def test_bad_pipeline_settings(tmp_path, prepared_dir, capsys, change, fragment):
    raw = pipeline_config(prepared_dir, "idea")
    for section, values in change.items():
        raw[section].update(values)
    code = main(["train", str(write_config(tmp_path / "bad.yaml", raw)), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prune, fragment", [
    ({"start_step": 4, "span_steps": 4, "ratio": 1.5}, "ratio"),
    ({"start_step": 4, "span_steps": 4, "target_width": 128}, "target"),
    ({"start_step": 4, "span_steps": 4, "target_width": 60}, "multiple"),
    ({"start_step": 20, "span_steps": 10, "ratio": 0.5}, "window"),
])
def test_bad_explicit_prune_sections(tmp_path, prepared_dir, capsys, prune, fragment):
    raw = tiny_run_config(prepared_dir, steps=24)
    raw["model"]["intermediate_size"] = 128
    raw["prune"] = prune
    code = main(["train", str(write_config(tmp_path / "bad.yaml", raw)), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err.lower(), err


def test_scratch_kd_needs_a_teacher(prepared_dir):
    raw = pipeline_config(prepared_dir, "scratch")
    raw["kd"] = {"alpha": 0.5}
    with pytest.raises(UserError, match="kd.teacher"):
        resolve_plan(config_from_dict(raw))
