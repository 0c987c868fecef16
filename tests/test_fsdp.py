"""train.parallel: fsdp on CPU (gloo, 2 processes started by torchrun): parity with one process, IDEA
compaction under FSDP, sharded (DCP) checkpoints resumed after SIGKILL and at another world size."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_run_config, write_config
from lmprune.errors import UserError

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A port nothing listens on now (other jobs on this machine run torchrun too)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


STEPS = 20


def idea_config(prepared: Path, batch_size: int, parallel: str = "fsdp", **train) -> dict:
    raw = tiny_run_config(prepared, steps=STEPS, batch_size=batch_size, eval_every=5, sample_tokens=0,
                          save_every=10, parallel=parallel, **train)
    raw["prune"] = {"start_step": 4, "span_steps": 8, "ratio": 0.5, "prune_every": 2}  # compacts at step 12
    return raw


def torchrun(nproc: int, cfg: Path, out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "lmprune", "train", str(cfg), "--out", str(out), "--quiet", *extra]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)


def val_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}


def logits(final: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=x).logits


def assert_logits_close(a: Path, b: Path, rel: float) -> None:
    la, lb = logits(a), logits(b)
    assert (la - lb).abs().max() <= rel * lb.abs().max(), float((la - lb).abs().max())


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, prepared_dir) -> tuple[Path, Path]:
    """(config, OUT) of a 2-rank FSDP IDEA run, per-rank batch 2, checkpoints at steps 10 and 20."""
    root = tmp_path_factory.mktemp("fsdp")
    cfg = write_config(root / "fsdp.yaml", idea_config(prepared_dir, batch_size=2))
    result = torchrun(2, cfg, root / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    return cfg, root / "out"


@pytest.mark.timeout(300)
def test_fsdp_idea_with_compaction_matches_one_process(fsdp_run, tmp_path, prepared_dir):
    cfg, out = fsdp_run
    single = write_config(tmp_path / "single.yaml", idea_config(prepared_dir, batch_size=4, parallel="ddp"))
    from lmprune.cli import main
    assert main(["train", str(single), "--out", str(tmp_path / "single"), "--quiet"]) == 0
    fsdp_losses, single_losses = val_losses(out), val_losses(tmp_path / "single")
    assert sorted(fsdp_losses) == [5, 10, 15, 20]  # the same global batch of 4 sequences per step
    for step, loss in single_losses.items():
        assert fsdp_losses[step] == pytest.approx(loss, rel=1e-4)
    assert_logits_close(out / "final", tmp_path / "single" / "final", 1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ffn_width"] == 64 and summary["params"] == json.loads(
        (tmp_path / "single" / "summary.json").read_text())["params"]
    # masks (mid-window, step 10) and importance EMA identical on both ranks
    step10 = out / "checkpoints" / "step-000010"
    digests = [json.loads((step10 / f"rank-{r}.json").read_text())["pruner_sha256"] for r in range(2)]
    assert digests[0] is not None and digests[0] == digests[1]
    manifest = json.loads((step10 / "manifest.json").read_text())
    assert manifest["layout"] == "dcp" and manifest["world_size"] == 2
    assert {"shard-00001-model-00001-of-00001.safetensors",
            "shard-00002-model-00001-of-00001.safetensors"} <= set(manifest["files"])


@pytest.mark.timeout(300)
def test_sigkill_and_resume_under_fsdp_ends_at_the_same_loss(fsdp_run, tmp_path):
    cfg, straight = fsdp_run
    out = tmp_path / "killed"
    proc = torchrun(2, cfg, out, wait=False)
    deadline = time.monotonic() + 90
    while not (out / "checkpoints" / "step-000010" / "manifest.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at step 10"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "final").exists()
    result = torchrun(2, cfg, out, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    a = json.loads((straight / "summary.json").read_text())["val_loss"]
    b = json.loads((out / "summary.json").read_text())["val_loss"]
    assert b == pytest.approx(a, rel=1e-5)
    assert_logits_close(straight / "final", out / "final", 1e-5)


@pytest.mark.timeout(300)
def test_sharded_checkpoint_resumes_2_to_1_and_1_to_2(fsdp_run, tmp_path):
    cfg, straight = fsdp_run
    out = tmp_path / "moved"
    shutil.copytree(straight, out)
    for leftover in ("final", "summary.json", "checkpoints/step-000020", ".lmprune.lock"):
        path = out / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    # 2 -> 1 from step 10 (masked, before compaction); per-rank batch 4 keeps the global batch
    result = torchrun(1, cfg, out, "--resume", "--save-every", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_logits_close(straight / "final", out / "final", 1e-4)
    step15 = out / "checkpoints" / "step-000015"
    assert json.loads((step15 / "manifest.json").read_text())["world_size"] == 1
    # 1 -> 2 from step 15 (compacted, written by one process)
    for leftover in ("final", "summary.json", "checkpoints/step-000020"):
        path = out / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = torchrun(2, cfg, out, "--resume", "--save-every", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_logits_close(straight / "final", out / "final", 1e-4)


def test_bad_input_under_fsdp(fsdp_run, tmp_path):
    cfg, straight = fsdp_run
    # parallel: fsdp without torchrun
    result = subprocess.run([sys.executable, "-m", "lmprune", "train", str(cfg), "--out", str(tmp_path / "x")],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "train.parallel is fsdp" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x" / "run_config.json").exists()
    from lmprune.config import TrainConfig
    from lmprune.sharded_checkpoint import load_sharded_meta, load_sharded_state
    from lmprune.train import resumed_batch
    step10 = straight / "checkpoints" / "step-000010"
    # a global batch (2 ranks x 2) that world size 3 does not divide
    with pytest.raises(UserError, match="global batch of 4 sequences .2 per rank., which world size 3 does not divide"):
        resumed_batch(TrainConfig(batch_size=2), step10, 3)
    assert resumed_batch(TrainConfig(batch_size=2), step10, 1).batch_size == 4
    # a DCP checkpoint of another model config
    from lmprune.models import build_model, llama_config
    from lmprune.config import ModelConfig
    other = build_model(llama_config(ModelConfig(preset="tiny", hidden_size=64, intermediate_size=96, num_layers=2,
                                                 num_heads=4, num_kv_heads=2), 300, 32, None), 0)
    with pytest.raises(UserError, match="mlp.gate_proj.weight has shape"):
        load_sharded_state(step10, other, torch.optim.AdamW(other.parameters()))
    # a sharded checkpoint missing a rank's files
    broken = tmp_path / "broken"
    shutil.copytree(step10, broken)
    (broken / "shard-00002-model-00001-of-00001.safetensors").unlink()
    with pytest.raises(UserError, match="missing shard-00002"):
        load_sharded_meta(broken)


@pytest.mark.timeout(300)
def test_mgpp_threshold_identical_across_ranks_and_one_process(tmp_path, prepared_dir, dense_dir):
    def config(batch_size: int, parallel: str) -> dict:
        raw = tiny_run_config(prepared_dir, steps=16, batch_size=batch_size, warmup=0, lr=5e-4, lr_end=5e-5,
                              eval_every=0, sample_tokens=0, save_every=8, parallel=parallel)
        raw["model"] = {"path": str(dense_dir), "preset": None}
        raw["mgpp"] = {"warmup_steps": 2, "s_i": 0.5, "s_f": 0.9, "cubic_steps": 10, "dt": 2}
        return raw

    result = torchrun(2, write_config(tmp_path / "fsdp.yaml", config(2, "fsdp")), tmp_path / "fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    from lmprune.cli import main
    assert main(["train", str(write_config(tmp_path / "one.yaml", config(4, "ddp"))), "--out",
                 str(tmp_path / "one"), "--quiet"]) == 0
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("fsdp", "one")}
    updates = {name: {r["step"]: r for r in rs if r.get("mask_update")} for name, rs in rows.items()}
    assert sorted(updates["fsdp"]) == sorted(updates["one"]) and len(updates["one"]) >= 5
    for step, row in updates["one"].items():
        assert updates["fsdp"][step]["threshold"] == pytest.approx(row["threshold"], rel=1e-4)
        assert updates["fsdp"][step]["sparsity"] == pytest.approx(row["sparsity"], abs=1e-6)
    step8 = tmp_path / "fsdp" / "checkpoints" / "step-000008"  # masks and threshold mid-schedule
    digests = [json.loads((step8 / f"rank-{r}.json").read_text())["pruner_sha256"] for r in range(2)]
    assert digests[0] is not None and digests[0] == digests[1]
    assert_logits_close(tmp_path / "fsdp" / "final", tmp_path / "one" / "final", 1e-4)


@pytest.mark.timeout(300)
def test_oneshot_prune_under_torchrun_sums_calibration_over_ranks(tmp_path, prepared_dir, dense_dir):
    args = [str(dense_dir), "--calib", str(prepared_dir), "--criterion", "wanda-sp", "--ffn-ratio", "0.5",
            "--heads-ratio", "0.5", "--calib-samples", "8", "--calib-seq-len", "32", "--batch-size", "2",
            "--max-eval-tokens", "512", "--json"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "lmprune", "prune", *args, "--out", str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    from lmprune.cli import main
    assert main(["prune", *args, "--out", str(tmp_path / "one")]) == 0
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("two", "one"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same neurons and heads kept
    report = json.loads((tmp_path / "two" / "prune_report.json").read_text())
    assert report["ffn_width"] < json.loads((dense_dir / "config.json").read_text())["intermediate_size"]
