"""The seam: `train_step` alone reproduces `lmprune train` bit for bit, for a method of each family,
and the loop asks a method for metrics only on the steps it logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_config, write_config
from lmprune.cli import main
from lmprune.config import config_from_dict
from lmprune.pruning import METHODS, Method
from lmprune.pruning.hooks import StepEvents
from lmprune.pruning.sparse.gmp import GMPConfig, GMPPruner, check_gmp_plan
from lmprune.step import train_step
from lmprune.train import finish, fit, setup_run


def method_config(name: str, prepared: Path, dense: Path) -> dict:
    if name == "idea":  # enlarged model, iterative pruning, compaction mid-run
        raw = tiny_run_config(prepared, steps=16, warmup=2, eval_every=0, sample_tokens=0)
        raw["pipeline"] = {"name": "idea", "enlarge": 2.0, "prune_start": 0.25, "prune_span": 0.25, "prune_every": 2}
        return raw
    raw = tiny_run_config(prepared, steps=12, warmup=0, lr=5e-4, lr_end=5e-5, eval_every=0, sample_tokens=0)
    raw["model"] = {"path": str(dense), "preset": None}
    if name == "mgpp":
        raw["mgpp"] = {"warmup_steps": 2, "s_i": 0.5, "s_f": 0.8, "cubic_steps": 6, "dt": 2}
    else:
        raw["imp"] = {"levels": [0.3, 0.6], "steps_per_round": 6}
    return raw


@pytest.mark.parametrize("name", ["idea", "mgpp", "imp"])
def test_train_step_alone_equals_lmprune_train(tmp_path, prepared_dir, dense_dir, name):
    raw = method_config(name, prepared_dir, dense_dir)
    out = tmp_path / "cli"
    assert main(["train", str(write_config(tmp_path / "run.yaml", raw)), "--out", str(out), "--quiet"]) == 0
    via_cli = load_file(str(out / "final" / "model.safetensors"))

    run = setup_run(config_from_dict(raw), tmp_path / "steps")
    events = []
    while run.state.step < run.cfg.train.steps:
        events.append(train_step(run.trainer, run.state).events)
    via_steps = run.trainer.model.state_dict()
    assert set(via_cli) <= set(via_steps)
    for key, value in via_cli.items():
        assert torch.equal(value, via_steps[key]), key
    assert any(e.mask_updated for e in events)
    if name == "idea":
        assert [i for i, e in enumerate(events) if e.compact] == [8]  # t_w 4 + t_p 4
        assert run.trainer.model.config.intermediate_size == 128


class CountingGMP(GMPPruner):
    """GMP that counts the loop's metrics() calls."""

    calls: list[int] = []

    def after_optimizer_step(self, model, optimizer, step) -> StepEvents:
        self._step = step + 1
        return super().after_optimizer_step(model, optimizer, step)

    def metrics(self):
        CountingGMP.calls.append(getattr(self, "_step", 0))
        return super().metrics()


def test_metrics_are_asked_for_on_logged_steps_only(tmp_path, prepared_dir, dense_dir, monkeypatch):
    counting = Method(GMPConfig, lambda cfg, ctx: CountingGMP(cfg), lambda cfg, steps, width: check_gmp_plan(cfg, steps),
                      "unstructured", "GMP that counts metrics() calls")
    monkeypatch.setitem(METHODS, "gmp", counting)
    CountingGMP.calls = []
    raw = tiny_run_config(prepared_dir, steps=12, warmup=0, lr=5e-4, lr_end=5e-5, eval_every=0, sample_tokens=0,
                          log_every=4)
    raw["model"] = {"path": str(dense_dir), "preset": None}
    raw["gmp"] = {"s_f": 0.5, "t0": 1, "n": 2, "dt": 5}  # mask updates after steps 1, 6, 11 -> rows 2, 7, 12
    run = setup_run(config_from_dict(raw), tmp_path / "out")
    finish(run, fit(run, quiet=True))
    logged = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 7, 8, 12]  # every 4th step, each mask update, the last step
    assert CountingGMP.calls == logged  # one metrics() call per written row, none on other steps
