"""Trustworthy comparisons (issue 14): shared trunks are exact, seeds give a spread, the controls
(scratch LR restart, naive with a fresh optimizer, warmup-stable-decay) and the retention probe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_config
from lmprune.cli import main
from lmprune.compare import aggregate_seeds
from lmprune.config import config_from_dict
from lmprune.errors import UserError
from lmprune.pipelines import validate_run
from lmprune.schedules import warmup_stable_decay
from lmprune.train import train, train_until
from lmprune.trunks import branch, trunk_groups
from test_pipelines import lr_rises, pipeline_config, rows


def cfg_of(raw: dict):
    return config_from_dict(raw)


def test_trunk_groups_join_runs_identical_before_prune_start(prepared_dir):
    def pipe(name, **extra):
        return cfg_of(pipeline_config(prepared_dir, name, **extra))

    configs = {"scratch": pipe("scratch"), "scratch_restarted": pipe("scratch", oneshot_schedule="restarted"),
               "idea": pipe("idea"), "naive": pipe("naive"), "oneshot": pipe("oneshot"),
               "oneshot_restarted": pipe("oneshot", oneshot_schedule="restarted"),
               "idea_every3": pipe("idea", prune_every=3)}  # its importance EMA starts elsewhere
    groups = trunk_groups(configs)
    assert groups == {"scratch": (12, ["scratch", "scratch_restarted"]),
                      "idea": (12, ["idea", "oneshot", "oneshot_restarted"])}


@pytest.mark.parametrize("trunk_name, member", [("idea", dict(name="oneshot", oneshot_schedule="restarted")),
                                                ("scratch", dict(name="scratch", oneshot_schedule="restarted"))])
def test_a_branched_run_is_the_run_trained_whole(tmp_path, prepared_dir, trunk_name, member):
    whole_cfg = cfg_of(pipeline_config(prepared_dir, **member))
    whole = train(whole_cfg, tmp_path / "whole", quiet=True)
    trunk_cfg = cfg_of(pipeline_config(prepared_dir, trunk_name))
    train_until(trunk_cfg, tmp_path / "trunk", 12, quiet=True)
    assert branch(tmp_path / "trunk", 12, whole_cfg, tmp_path / "branched")
    branched = train(whole_cfg, tmp_path / "branched", resume=True, quiet=True)
    assert branched.val_loss == whole.val_loss
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "branched")]
    assert summaries[0]["rank_fingerprints"] == summaries[1]["rank_fingerprints"]  # bit-identical weights
    assert [r["step"] for r in rows(tmp_path / "branched")] == [r["step"] for r in rows(tmp_path / "whole")]


def test_compare_with_seeds_reports_mean_std_and_shared_trunks(tmp_path, prepared_dir, capsys):
    raw = pipeline_config(prepared_dir, "idea")
    raw["train"].update(steps=16, eval_every=8, log_every=4, retention_windows=4)
    raw["compare"] = {"runs": {"scratch": {"pipeline.name": "scratch"},
                               "scratch_restarted": {"pipeline.name": "scratch", "pipeline.oneshot_schedule": "restarted"},
                               "idea": {"pipeline.name": "idea"}, "oneshot": {"pipeline.name": "oneshot"}},
                      "seeds": [0, 1], "scratch_equal_compute": True, "infer_batch_size": 2, "infer_seq_len": 32}
    out = tmp_path / "cmp"
    # one process per seed can share the out dir: --seed 1 trains seed 1 only and reports seed 0 unfinished
    config = str(write_config(tmp_path / "c.yaml", raw))
    assert main(["compare", config, "--out", str(out), "--quiet", "--seed", "1"]) == 0
    partial = json.loads((out / "summary.json").read_text())
    assert "idea (seed 0)" in partial["unfinished"] and not (out / "idea" / "seed-0").exists()
    assert partial["pipelines"]["idea"]["seeds"] == [1]
    assert main(["compare", config, "--out", str(out), "--quiet", "--seed", "7"]) == 2
    assert "--seed 7 is not one of compare.seeds" in capsys.readouterr().err
    assert main(["compare", config, "--out", str(out), "--quiet"]) == 0  # seed 0 trains, seed 1 is done
    summary = json.loads((out / "summary.json").read_text())
    assert "unfinished" not in summary
    idea = summary["pipelines"]["idea"]
    assert set(idea["val_ppl_seeds"]) == {"0", "1"} and idea["val_ppl_std"] > 0
    assert idea["val_ppl_mean"] == pytest.approx(sum(idea["val_ppl_seeds"].values()) / 2)
    assert "retention_ppl_std" in idea
    assert summary["shared_trunks"] == {"trunks/scratch": ["scratch", "scratch_restarted"],
                                        "trunks/idea": ["idea", "oneshot"]}
    assert (out / "trunks" / "idea" / "seed-1" / "checkpoints" / "step-000008").is_dir()
    assert not (out / "trunks" / "idea" / "seed-1" / "final").exists()  # a trunk is never finished
    report = (out / "report.md").read_text()
    assert "±" in report and "share one trunk" in report and "retention.png" in report
    assert "At equal training tokens" in report
    assert (out / "retention.png").stat().st_size > 1000
    # --report-only trains nothing and reports what has finished
    (out / "oneshot" / "seed-1" / "summary.json").unlink()
    assert main(["compare", str(write_config(tmp_path / "c.yaml", raw)), "--out", str(out), "--quiet",
                 "--report-only"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["unfinished"] == ["oneshot (seed 1)"]
    assert again["pipelines"]["oneshot"]["seeds"] == [0]
    assert "Not finished (left out): oneshot (seed 1)" in (out / "report.md").read_text()


def test_one_process_per_seed_reports_the_runs_another_process_finished_meanwhile(tmp_path, prepared_dir,
                                                                                   monkeypatch):
    """--seed 1 reads seed 0's runs after training its own, not before: a seed-0 process that finishes
    while seed 1 trains is in seed 1's summary (it was left out as unfinished when read first)."""
    import lmprune.compare as compare_module

    raw = pipeline_config(prepared_dir, "scratch")
    raw["train"].update(steps=8, eval_every=8, log_every=4)
    raw["compare"] = {"runs": {"scratch": {"pipeline.name": "scratch"}}, "seeds": [0, 1],
                      "scratch_equal_compute": False, "infer_batch_size": 2, "infer_seq_len": 32}
    out, config = tmp_path / "cmp", str(write_config(tmp_path / "c.yaml", raw))
    real_run_one = compare_module.run_one

    def run_one_and_the_other_seed(name, cfg, run_dir, quiet, seed=None):
        if seed == 1:  # "the other process" finishes seed 0 while seed 1 trains
            other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 0})})
            real_run_one(name, other, out / name / "seed-0", quiet, 0)
        return real_run_one(name, cfg, run_dir, quiet, seed)

    monkeypatch.setattr(compare_module, "run_one", run_one_and_the_other_seed)
    assert main(["compare", config, "--out", str(out), "--quiet", "--seed", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unfinished"] == []
    assert set(summary["pipelines"]["scratch"]["val_ppl_seeds"]) == {"0", "1"}


def test_within_noise_needs_a_difference_of_two_std():
    from lmprune.report import compare_pair

    def row(*ppl):
        return aggregate_seeds({seed: {"val_ppl": p, "seed": seed} for seed, p in enumerate(ppl)})

    close = {"idea": row(10.0, 10.2), "scratch": row(10.1, 10.3)}
    assert "within noise" in compare_pair("idea", "<", "scratch", close)
    far = {"idea": row(10.0, 10.2), "scratch": row(12.0, 12.2)}
    assert "holds (|difference| 2.000" in compare_pair("idea", "<", "scratch", far)
    single = {"idea": row(10.0), "scratch": row(10.1)}
    assert single["idea"]["val_ppl_std"] is None
    assert compare_pair("idea", "<", "scratch", single).endswith(": holds")


def test_scratch_restart_control_and_wsd_schedule(tmp_path, prepared_dir):
    out = tmp_path / "restart"
    assert main(["train", str(write_config(tmp_path / "r.yaml", pipeline_config(
        prepared_dir, "scratch", oneshot_schedule="restarted"))), "--out", str(out), "--quiet"]) == 0
    assert lr_rises([r["lr"] for r in rows(out)], after=2) in ([12], [13])  # the restart at t_w, no pruning
    assert json.loads((out / "summary.json").read_text())["ffn_width"] == 64

    assert [warmup_stable_decay(s, 1.0, 0.1, 2, 10, 4) for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1])
    raw = pipeline_config(prepared_dir, "idea")
    raw["train"].update(schedule="wsd", wsd_decay=0.25)  # decay from step 18; pruning ends at 18
    plan = validate_run(cfg_of(raw))
    trace = [plan.lr_at(s, 1.0, 0.1, 2) for s in range(24)]
    assert trace[2:18] == [1.0] * 16 and trace[-1] == pytest.approx(0.1)
    raw["train"]["wsd_decay"] = 0.3
    with pytest.raises(UserError, match="prune inside the stable phase"):
        validate_run(cfg_of(raw))


def test_naive_fresh_optimizer_empties_the_moments_at_the_prune(tmp_path, prepared_dir):
    from safetensors.torch import load_file

    moments = {}
    for fresh in (False, True):
        raw = pipeline_config(prepared_dir, "naive", naive_fresh_optimizer=fresh)
        raw["train"].update(steps=14, save_every=13)
        out = tmp_path / f"naive-{fresh}"
        assert main(["train", str(write_config(tmp_path / f"n{fresh}.yaml", raw)), "--out", str(out), "--quiet"]) == 0
        tensors = load_file(out / "checkpoints" / "step-000013" / "optimizer.safetensors")
        moments[fresh] = {float(v) for k, v in tensors.items() if k.endswith(".step")}
    assert moments[False] == {13.0} and moments[True] == {5.0}  # t_w = 7: fresh moments from step index 8 on
    with pytest.raises(UserError, match="naive_fresh_optimizer is for pipeline naive"):
        validate_run(cfg_of(pipeline_config(prepared_dir, "idea", naive_fresh_optimizer=True)))


def test_retention_probe_is_logged_and_needs_windows_seen_once(tmp_path, prepared_dir):
    raw = pipeline_config(prepared_dir, "idea")
    raw["train"].update(retention_windows=6)
    out = tmp_path / "ret"
    assert main(["train", str(write_config(tmp_path / "ret.yaml", raw)), "--out", str(out), "--quiet"]) == 0
    evals = [r for r in rows(out) if "val_ppl" in r]
    assert evals and all("retention_ppl" in r for r in evals)
    assert "retention_ppl" in json.loads((out / "summary.json").read_text())
    raw["train"].update(steps=100000, eval_every=0)
    assert main(["train", str(write_config(tmp_path / "long.yaml", raw)), "--out", str(tmp_path / "long"),
                 "--quiet"]) == 2
    raw = pipeline_config(prepared_dir, "idea")
    del raw["pipeline"]
    raw["train"]["retention_windows"] = 4
    with pytest.raises(UserError, match="needs a pipeline"):
        validate_run(cfg_of(raw))
