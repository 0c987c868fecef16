"""Runs that survive: non-finite steps, signals, one run per output dir, leftovers, full disks."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_config, write_config
from lmprune import checkpoint as ckpt
from lmprune import step as step_module
from lmprune.cli import main
from lmprune.errors import NonFiniteError

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lmprune:") and "warning" not in line]


def poison_loss(monkeypatch, bad_calls: set[int] | None = None, from_call: int | None = None) -> None:
    """Make lm_loss NaN on the given (0-based) calls: one call per micro-batch, i.e. per step here."""
    calls = {"n": 0}
    real = step_module.lm_loss

    def lm_loss(logits, targets):
        n, calls["n"] = calls["n"], calls["n"] + 1
        loss = real(logits, targets)
        if (bad_calls and n in bad_calls) or (from_call is not None and n >= from_call):
            return loss * float("nan")
        return loss

    monkeypatch.setattr(step_module, "lm_loss", lm_loss)


# ----------------------------------------------------------------------------- non-finite values

def test_non_finite_steps_are_skipped_and_leave_weights_and_moments_untouched(tmp_path, prepared_dir, capsys,
                                                                              monkeypatch):
    poison_loss(monkeypatch, bad_calls={3, 4})  # steps 4 and 5 (1-based)
    raw = tiny_run_config(prepared_dir, steps=8, save_every=1, keep_last=8, eval_every=0, sample_tokens=0)
    out = tmp_path / "out"
    assert main(["train", str(write_config(tmp_path / "run.yaml", raw)), "--out", str(out), "--quiet"]) == 0
    by_step = {r["step"]: r for r in rows(out)}
    assert by_step[4]["skipped"] and by_step[5]["skipped"] and by_step[4]["loss"] is None
    assert by_step[4]["grad_norm"] is None and "skipped" not in by_step[6]
    before, after = out / "checkpoints" / "step-000003", out / "checkpoints" / "step-000005"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(before / name), load_file(after / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name  # two skipped steps changed nothing
    assert ckpt.load_checkpoint_meta(after)["trainer_state"]["skipped_in_a_row"] == 2
    assert json.loads((out / "summary.json").read_text())["val_loss"] < 10


def test_too_many_non_finite_steps_stop_with_exit_3_and_a_finite_checkpoint(tmp_path, prepared_dir, capsys,
                                                                             monkeypatch):
    poison_loss(monkeypatch, from_call=6)
    raw = tiny_run_config(prepared_dir, steps=30, save_every=2, eval_every=0, sample_tokens=0, max_skipped_steps=3)
    out = tmp_path / "out"
    code = main(["train", str(write_config(tmp_path / "run.yaml", raw)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3, err
    lines = error_lines(err)
    assert len(lines) == 1 and "not finite for 3 steps in a row (last: step 9)" in lines[0], err
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    newest = ckpt.latest_checkpoint(out / "checkpoints")
    weights = load_file(newest / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_checkpoint_never_holds_a_non_finite_tensor(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    optimizer = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="up_proj.weight is not finite"):
        ckpt.save_checkpoint(tmp_path / "ckpt", 1, model, optimizer, {"step": 1}, {}, None, keep_last=2)
    assert not (tmp_path / "ckpt").exists()  # checked before anything is written


def test_eval_of_a_model_with_non_finite_outputs_exits_3(tmp_path, prepared_dir, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    code = main(["eval", str(tmp_path / "nan"), "--data", str(prepared_dir), "--max-tokens", "256",
                 "--seq-len", "32"])
    err = capsys.readouterr().err
    assert code == 3 and len(error_lines(err)) == 1 and "not finite" in err, err


# ----------------------------------------------------------------------------- signals

def start_run(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmprune", "train", str(cfg), "--out", str(out), "--quiet",
                             *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(out: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    path = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach {count} rows (rc {proc.poll()})")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_is_bit_exact(tmp_path, prepared_dir, sig, code):
    raw = tiny_run_config(prepared_dir, steps=300, log_every=1, eval_every=0, sample_tokens=0, save_every=0)
    cfg = write_config(tmp_path / "run.yaml", raw)
    proc = start_run(cfg, tmp_path / "stopped")
    wait_for_rows(tmp_path / "stopped", 5, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = error_lines(err)
    assert len(lines) == 1 and f"stopped by {sig.name}" in lines[0] and "--resume" in lines[0], err
    stopped_at = int(lines[0].split("after step ")[1].split(";")[0])
    assert 5 <= stopped_at < 300
    assert ckpt.latest_checkpoint(tmp_path / "stopped" / "checkpoints").name == f"step-{stopped_at:06d}"

    resumed = start_run(cfg, tmp_path / "stopped", "--resume")
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()
    straight = start_run(cfg, tmp_path / "straight")
    assert straight.wait(timeout=240) == 0, straight.stderr.read()
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in rows(tmp_path / "stopped")] == list(range(1, 301))


def test_sigterm_under_two_process_ddp_checkpoints_on_every_rank(tmp_path, prepared_dir):
    raw = tiny_run_config(prepared_dir, steps=200, batch_size=2, log_every=1, eval_every=0, sample_tokens=0)
    cfg = write_config(tmp_path / "run.yaml", raw)

    def torchrun(out: Path, port: int, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "lmprune", "train", str(cfg), "--out", str(out), "--quiet", *extra]
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    proc = torchrun(tmp_path / "stopped", 29531)
    wait_for_rows(tmp_path / "stopped", 5, proc, timeout=180)
    os.killpg(proc.pid, signal.SIGTERM)  # like a scheduler: the launcher and both workers get it
    _, err = proc.communicate(timeout=120)
    assert "stopped by SIGTERM after step" in err, err[-3000:]
    newest = ckpt.latest_checkpoint(tmp_path / "stopped" / "checkpoints")
    assert newest is not None and ckpt.checkpoint_problem(newest) is None
    assert ckpt.load_checkpoint_meta(newest)["trainer_state"]["world_size"] == 2

    resumed = torchrun(tmp_path / "stopped", 29532, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    straight = torchrun(tmp_path / "straight", 29533)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-3000:]
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())["rank_fingerprints"]
    b = json.loads((tmp_path / "stopped" / "summary.json").read_text())["rank_fingerprints"]
    assert a == b and a[0] == a[1]


# ----------------------------------------------------------------------------- one run per output dir

def test_a_second_run_on_the_same_out_is_refused_and_a_dead_holder_is_taken_over(tmp_path, prepared_dir):
    raw = tiny_run_config(prepared_dir, steps=1500, log_every=1, eval_every=0, sample_tokens=0, save_every=20)
    cfg = write_config(tmp_path / "run.yaml", raw)
    out = tmp_path / "out"
    first = start_run(cfg, out)
    wait_for_rows(out, 3, first)
    second = subprocess.run([sys.executable, "-m", "lmprune", "train", str(cfg), "--out", str(out), "--resume",
                             "--quiet"], env=ENV, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and f"in use by another lmprune run (pid {first.pid})" in lines[0], second.stderr
    wait_for_rows(out, 25, first)
    first.send_signal(signal.SIGKILL)
    first.wait()

    # a killed run leaves its lock file (with its pid) and maybe temp dirs: both are taken care of
    leftover = out / "checkpoints" / f".step-000099.tmp-{first.pid}"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    third = subprocess.run([sys.executable, "-m", "lmprune", "train", str(cfg), "--out", str(out), "--resume",
                            "--quiet"], env=ENV, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert f"taking over the lock left by pid {first.pid}" in third.stderr
    assert "removed 1 temp dir(s) left by killed runs" in third.stderr
    assert not leftover.exists()


def test_a_run_that_fails_in_setup_leaves_no_trace_in_out(tmp_path, prepared_dir, capsys):
    raw = tiny_run_config(prepared_dir, seq_len=60_000, batch_size=1)  # too little data: fails after the lock
    out = tmp_path / "new" / "out"
    assert main(["train", str(write_config(tmp_path / "run.yaml", raw)), "--out", str(out), "--quiet"]) == 2
    assert not (tmp_path / "new").exists()
    raw = tiny_run_config(prepared_dir, steps=4, eval_every=0, sample_tokens=0)  # the corrected command then runs
    assert main(["train", str(write_config(tmp_path / "run.yaml", raw)), "--out", str(out), "--quiet"]) == 0


def test_resume_drops_a_torn_last_metrics_line(tmp_path, prepared_dir, capsys):
    raw = tiny_run_config(prepared_dir, steps=8, save_every=4, eval_every=0, sample_tokens=0)
    cfg = write_config(tmp_path / "run.yaml", raw)
    out = tmp_path / "out"
    assert main(["train", str(cfg), "--out", str(out), "--quiet", "--steps", "8"]) == 0
    # as if a run killed mid-write had left half a row after its last checkpoint (step 8)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "tokens": 11')
    with pytest.warns(UserWarning, match=r"dropped 1 torn line\(s\)"):
        assert main(["train", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 0
    assert [r["step"] for r in rows(out)] == list(range(1, 9))


# ----------------------------------------------------------------------------- full disks

def test_disk_full_while_checkpointing_is_one_line_and_the_previous_checkpoint_survives(
        tmp_path, prepared_dir, capsys, monkeypatch):
    raw = tiny_run_config(prepared_dir, steps=8, save_every=4, eval_every=0, sample_tokens=0)
    cfg = write_config(tmp_path / "run.yaml", raw)
    out = tmp_path / "out"
    real_save_file, calls = ckpt.save_file, {"n": 0}

    def full_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # the second checkpoint's first file
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    code = main(["train", str(cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1, err
    assert "no space left on device while writing" in err and "step-000008" in err and "MiB free" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"]  # intact, no temp left
    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    assert main(["train", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 0
    assert (out / "final" / "model.safetensors").is_file()
