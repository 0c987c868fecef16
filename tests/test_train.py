"""End-to-end training: a short run, export parity, exact resume after SIGKILL, DDP on gloo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_run_config, write_config
from lmprune.checkpoint import load_checkpoint_meta, load_model_weights
from lmprune.cli import main

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmprune", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def test_short_run_writes_metrics_plot_checkpoint_and_final(tmp_path, prepared_dir, capsys):
    cfg = write_config(tmp_path / "run.yaml", tiny_run_config(prepared_dir))
    out = tmp_path / "out"
    assert main(["train", str(cfg), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "val ppl" in printed and "sample:" in printed

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tok_per_s"} <= rows[0].keys()
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    assert rows[-1]["tokens"] == 12 * 4 * 32
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "training.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_ppl"] > 1 and summary["steps"] == 12

    final_ckpt = out / "checkpoints" / "step-000012"
    assert load_checkpoint_meta(final_ckpt)["trainer_state"]["step"] == 12

    # Export parity: final/ loads with plain transformers and matches the checkpointed weights.
    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    trained = AutoModelForCausalLM.from_pretrained(out / "final")  # same architecture, then checkpoint weights
    load_model_weights(final_ckpt, trained)
    ids = torch.tensor([tokenizer("the king hath a crown").input_ids])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, trained(ids).logits)
    assert exported.config.intermediate_size == 128 and exported.config.num_key_value_heads == 2


def test_exact_resume_after_sigkill(tmp_path, prepared_dir):
    raw = tiny_run_config(prepared_dir, steps=40, log_every=1, eval_every=20)
    cfg = write_config(tmp_path / "run.yaml", raw)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli("train", str(cfg), "--out", str(straight), "--save-every", "4", "--quiet").returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "lmprune", "train", str(cfg), "--out", str(killed),
                             "--save-every", "4", "--quiet"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "step-000008" / "manifest.json"
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()

    resumed = run_cli("train", str(cfg), "--out", str(killed), "--save-every", "4", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(killed)


def test_resume_skips_a_corrupted_checkpoint(tmp_path, prepared_dir):
    cfg = write_config(tmp_path / "run.yaml", tiny_run_config(prepared_dir, steps=12, eval_every=0))
    out, reference = tmp_path / "out", tmp_path / "ref"
    assert run_cli("train", str(cfg), "--out", str(reference), "--quiet").returncode == 0
    assert run_cli("train", str(cfg), "--out", str(out), "--save-every", "4", "--quiet").returncode == 0
    shutil.rmtree(out / "final")
    newest = out / "checkpoints" / "step-000012"
    with open(newest / "optimizer.safetensors", "r+b") as f:  # flip bytes, keep the size
        f.seek(200)
        f.write(b"\xff" * 16)
    result = run_cli("train", str(cfg), "--out", str(out), "--save-every", "4", "--resume", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "skipping checkpoint step-000012" in result.stderr and "checksum" in result.stderr
    a = load_file(reference / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(600)
def test_ddp_two_processes_on_gloo(tmp_path, prepared_dir):
    raw = tiny_run_config(prepared_dir, steps=8, batch_size=2, eval_every=0, sample_tokens=0)
    cfg = write_config(tmp_path / "run.yaml", raw)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "lmprune", "train", str(cfg), "--out", str(out), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    fingerprints = summary["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert summary["tokens"] == 8 * 2 * 2 * 32  # two ranks each see their own half of the global batch

    # Same global batch in one process: the same data in the same order, so nearly the same model.
    single_cfg = write_config(tmp_path / "single.yaml", tiny_run_config(prepared_dir, steps=8, batch_size=4,
                                                                        eval_every=0, sample_tokens=0))
    assert run_cli("train", str(single_cfg), "--out", str(tmp_path / "single"), "--quiet").returncode == 0
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert single["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-3)


def test_quiet_train_prepares_its_corpus_without_progress_bars(tmp_path, monkeypatch, capsys):
    from conftest import tiny_run_config, write_config, write_corpus

    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "cache"))
    write_corpus(tmp_path / "texts", n_docs=6, lines_per_doc=20)
    raw = tiny_run_config(tmp_path, steps=2, eval_every=0, sample_tokens=0)
    raw["data"] = {"source": str(tmp_path / "texts"), "vocab_size": 300}
    assert main(["train", str(write_config(tmp_path / "q.yaml", raw)), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "prepare" not in err and "it/s" not in err and "B/s" not in err, err[-500:]
    assert any((tmp_path / "cache" / "prepared").iterdir())  # it did prepare the corpus
