"""MGPP, GMP and iterative magnitude pruning inside `lmprune train`, fine-tuning a pretrained HF dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_config, write_config
from lmprune.cli import main
from lmprune.models import load_hf_model
from lmprune.pruning.sparse.masks import DEFAULT_PATTERNS, prunable_parameters


def finetune_config(prepared_dir: Path, dense_dir: Path, steps: int = 16, **method) -> dict:
    raw = tiny_run_config(prepared_dir, steps=steps, warmup=0, lr=5e-4, lr_end=5e-5, eval_every=0, sample_tokens=0)
    raw["model"] = {"path": str(dense_dir), "preset": None}
    raw.update(method)
    return raw


def run(tmp_path: Path, raw: dict, *extra: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    assert main(["train", str(write_config(tmp_path / "run.yaml", raw)), "--out", str(out), "--quiet", *extra]) == 0
    return out


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def prunable_sparsity(model) -> float:
    params = prunable_parameters(model, DEFAULT_PATTERNS)
    return sum(int((p == 0).sum()) for p in params.values()) / sum(p.numel() for p in params.values())


def test_mgpp_reaches_the_final_sparsity_and_exports_dense_and_compact(tmp_path, prepared_dir, dense_dir):
    mgpp = {"warmup_steps": 2, "s_i": 0.5, "s_f": 0.9, "cubic_steps": 10, "dt": 2}
    raw = finetune_config(prepared_dir, dense_dir, mgpp=mgpp)
    raw["train"]["export_sparse"] = True
    out = run(tmp_path, raw)
    metrics = rows(out)
    assert [r["step"] for r in metrics if r.get("mask_update")] == [3, 5, 7, 9, 11, 13]
    assert metrics[-1]["mask_frozen"] and metrics[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    dense = load_hf_model(out / "final")
    assert prunable_sparsity(dense) == pytest.approx(0.9, abs=1e-4)
    compact = load_hf_model(out / "final-sparse")
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), compact.state_dict().values()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_sparse_bytes"] < summary["final_bytes"]
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_gmp_masked_weights_stay_zero(tmp_path, prepared_dir, dense_dir):
    out = run(tmp_path, finetune_config(prepared_dir, dense_dir, gmp={"s_i": 0.2, "s_f": 0.6, "t0": 2, "n": 4,
                                                                      "dt": 2, "scope": "global"}))
    metrics = rows(out)
    assert [round(r["sparsity"], 4) for r in metrics if r.get("mask_update")][-1] == pytest.approx(0.6, abs=1e-4)
    assert all(r["sparsity"] >= 0.6 - 1e-4 for r in metrics if r["step"] > 11)
    assert prunable_sparsity(load_hf_model(out / "final")) == pytest.approx(0.6, abs=1e-4)


def test_iterative_magnitude_rounds_give_a_ppl_vs_sparsity_curve(tmp_path, prepared_dir, dense_dir):
    imp = {"levels": [0.2, 0.4, 0.6], "steps_per_round": 4}
    out = run(tmp_path, finetune_config(prepared_dir, dense_dir, steps=12, imp=imp))
    curve = [r for r in rows(out) if "val_ppl" in r]
    assert [r["step"] for r in curve] == [0, 4, 8, 12]
    assert [round(r["sparsity"], 4) for r in curve] == [0.0, 0.2, 0.4, 0.6]
    assert (out / "ppl_vs_sparsity.png").stat().st_size > 1000
    assert "val_ppl" in (out / "sparsity.md").read_text()


def test_exact_resume_in_the_middle_of_mgpp(tmp_path, prepared_dir, dense_dir):
    raw = finetune_config(prepared_dir, dense_dir, mgpp={"warmup_steps": 2, "s_i": 0.5, "s_f": 0.8,
                                                         "cubic_steps": 10, "dt": 2})
    raw["train"]["keep_last"] = 20
    straight = run(tmp_path / "a", raw)
    cut = run(tmp_path / "b", raw, "--save-every", "2")
    for later in (8, 10, 12, 14, 16):  # back to step 6: mid-cubic, masks may still regrow
        shutil.rmtree(cut / "checkpoints" / f"step-{later:06d}")
    shutil.rmtree(cut / "final")
    run(tmp_path / "b", raw, "--save-every", "2", "--resume")
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method, fragment", [
    ({"mgpp": {"s_i": 0.95, "s_f": 0.9}}, "s_i"),
    ({"mgpp": {"s0": 0.1, "s1": 0.05}}, "s0 < s1"),
    ({"mgpp": {"lam": 1.5}}, "mgpp.lam must be in (0, 1)"),
    ({"mgpp": {"s_f": 1.0}}, "[0, 1)"),
    ({"gmp": {"s_f": -0.1}}, "[0, 1)"),
    ({"gmp": {"nm": "4:4"}}, "N < M"),
    ({"mgpp": {"warmup_steps": 10, "cubic_steps": 10}}, "must end before train.steps"),
    ({"imp": {"levels": [0.2, 0.4], "steps_per_round": 5}}, "rounds x steps_per_round"),
    ({"gmp": {"patterns": ["no_such_weight"], "t0": 0, "n": 2, "dt": 2}}, "no_such_weight"),
])
def test_bad_sparse_settings(tmp_path, prepared_dir, dense_dir, capsys, method, fragment):
    raw = finetune_config(prepared_dir, dense_dir, **method)
    code = main(["train", str(write_config(tmp_path / "bad.yaml", raw)), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_random_baseline_method_runs_in_lmprune_train(tmp_path, prepared_dir, dense_dir):
    """The README's example method: one module + one line in METHODS, nothing else."""
    raw = finetune_config(prepared_dir, dense_dir, steps=12, random={"s_f": 0.5, "t0": 1, "n": 3, "dt": 3})
    out = run(tmp_path, raw)
    metrics = rows(out)
    assert [r["step"] for r in metrics if r.get("mask_update")] == [2, 5, 8, 11]
    assert metrics[-1]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert prunable_sparsity(load_hf_model(out / "final")) == pytest.approx(0.5, abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-4)
