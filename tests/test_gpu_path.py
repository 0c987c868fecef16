"""The GPU path, checked on CPU where it can be: a fused AdamW skips a non-finite step on the device
(weights, moments and step count untouched, no host read), the loop then reads the loss only on the
steps it writes a row for, and the gpu presets. Pinned batches and CUDA RNG need a GPU."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_run_config, write_config
from lmprune import checkpoint as ckpt
from lmprune import step as step_module
from lmprune import train as train_module
from lmprune.cli import main
from lmprune.config import ModelConfig, TrainConfig
from lmprune.models import llama_config
from lmprune.optim import build_optimizer, is_fused
from stepping import run_steps, step_runner

REAL_LM_LOSS = step_module.lm_loss


def small_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 9), generator=generator) for _ in range(count)]


def poison_step(monkeypatch, bad: set[int]) -> None:
    """The loss (and so every gradient) is NaN on these 0-based calls of lm_loss (one per step here)."""
    calls, real = {"n": 0}, REAL_LM_LOSS

    def lm_loss(logits, targets):
        n, calls["n"] = calls["n"], calls["n"] + 1
        return real(logits, targets) * (float("nan") if n in bad else 1.0)

    monkeypatch.setattr(step_module, "lm_loss", lm_loss)


def fused_runner(model, hook=None):
    tcfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    return step_runner(model, hook, batches(6), optimizer=build_optimizer(model, tcfg, fused=True))


def test_build_optimizer_is_fused_only_on_cuda_parameters_unless_asked():
    model = small_llama()
    assert not is_fused(build_optimizer(model, TrainConfig()))  # CPU runs keep the foreach kernel
    assert is_fused(build_optimizer(model, TrainConfig(), fused=True))


def test_a_fused_step_skips_on_the_device_and_leaves_weights_moments_and_step_count(monkeypatch):
    poison_step(monkeypatch, bad={2, 3})
    model = small_llama()
    trainer, state = fused_runner(model)
    outs = run_steps(trainer, state, 2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    outs += run_steps(trainer, state, 2)  # both bad
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for param, saved in trainer.optimizer.state.items():
        assert all(torch.equal(moments[id(param)][k], v) for k, v in saved.items())  # `step` is 2 again
    assert torch.is_tensor(outs[2].skip_flag) and state.skip_streak is not None  # nothing read yet
    assert [o.skipped for o in outs] == [False, False, True, True] and state.sync_skips() == 2
    outs += run_steps(trainer, state, 1)
    assert not outs[-1].skipped and state.sync_skips() == 0
    assert all(float(s["step"]) == 3 for s in trainer.optimizer.state.values())
    assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)


class GradientReader:
    """A method whose statistics read gradients at the steps in `reading` (and only writes them otherwise)."""

    def __init__(self, reading: set[int]):
        self.reading, self.seen = reading, []

    def reads_gradients(self, step: int) -> bool:
        return step in self.reading

    def after_backward(self, model, step: int) -> None:
        self.seen.append(step)

    def after_optimizer_step(self, model, optimizer, step: int):
        return step_module.NO_EVENTS


def test_the_device_skip_matches_the_host_check_bit_for_bit(monkeypatch):
    poison_step(monkeypatch, bad={1, 4})
    device_model, host_model = small_llama(), small_llama()
    run_steps(*fused_runner(device_model), 3)
    monkeypatch.setattr(step_module, "skips_on_device", lambda trainer, step: False)
    poison_step(monkeypatch, bad={1, 4})
    run_steps(*fused_runner(host_model), 3)
    for (name, a), b in zip(device_model.state_dict().items(), host_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_method_reading_gradients_gets_the_host_check_and_never_a_bad_step(monkeypatch):
    poison_step(monkeypatch, bad={1, 2})
    hook = GradientReader(reading={2, 3})
    trainer, state = fused_runner(small_llama(), hook)
    assert step_module.skips_on_device(trainer, 0) and not step_module.skips_on_device(trainer, 2)
    outs = run_steps(trainer, state, 4)
    # step 1: bad, but the method only writes gradients then (called anyway); step 2: bad and read: not called
    assert hook.seen == [0, 1, 3] and [o.skipped for o in outs] == [False, True, True, False]
    assert state.skipped_in_a_row == 0
    assert not step_module.skips_on_device(fused_runner(small_llama(), object())[0], 0)  # says nothing: host


def test_on_cuda_the_loop_reads_only_logged_steps_and_stops_on_skips_at_the_next_read(tmp_path, prepared_dir,
                                                                                       capsys, monkeypatch):
    monkeypatch.setattr(train_module, "reads_every_step", lambda device: False)  # what CUDA does
    monkeypatch.setattr(train_module, "build_optimizer", functools.partial(build_optimizer, fused=True))
    read_at, real_log_step = [], train_module.log_step

    def log_step(run, *args):
        read_at.append(run.state.step)
        return real_log_step(run, *args)

    monkeypatch.setattr(train_module, "log_step", log_step)
    poison_step(monkeypatch, bad={5, 6, 7, 8, 9, 10, 11})  # steps 6.. (1-based) are not finite
    raw = tiny_run_config(prepared_dir, steps=12, log_every=4, save_every=4, eval_every=0, sample_tokens=0,
                          max_skipped_steps=2)
    out = tmp_path / "out"
    code = main(["train", str(write_config(tmp_path / "run.yaml", raw)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and "not finite for 3 steps in a row (last: step 8)" in err, err
    assert read_at == [1, 4, 8]  # the first step (warm-up timing), then logged steps only
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8] and rows[1]["skipped"] and rows[0]["tok_per_s"] > 0
    newest = ckpt.latest_checkpoint(out / "checkpoints")
    assert newest.name == "step-000004"
    assert all(torch.isfinite(t).all() for t in load_file(newest / "model.safetensors").values())
    assert ckpt.load_checkpoint_meta(newest)["trainer_state"]["skipped_in_a_row"] == 0


@pytest.mark.parametrize("preset, layers, width, heads, kv_heads, params", [
    ("gpu-125m", 12, 768, 12, 4, 81_808_128), ("gpu-350m", 24, 1024, 16, 4, 274_252_800)])
def test_gpu_presets_are_llama_shapes_with_gqa_and_sdpa(preset, layers, width, heads, kv_heads, params):
    config = llama_config(ModelConfig(preset=preset), vocab_size=8192, seq_len=1024, eos_token_id=0)
    assert (config.num_hidden_layers, config.hidden_size) == (layers, width)
    assert (config.num_attention_heads, config.num_key_value_heads) == (heads, kv_heads)
    with torch.device("meta"):  # shapes only: nothing allocated
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.config._attn_implementation == "sdpa"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_training_batches_are_pinned_for_non_blocking_copies():
    import numpy as np

    from lmprune.loader import TokenLoader

    x, y = TokenLoader(np.arange(4096, dtype=np.uint16), 4, 16, seed=0, pin_memory=True).next_batch()
    assert x.is_pinned() and y.is_pinned()


@needs_cuda
def test_the_cuda_rng_state_is_checkpointed_and_restored():
    tensors, meta = ckpt.capture_rng()
    expected = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")
    ckpt.restore_rng(tensors, meta)
    assert "rng.cuda" in tensors and torch.equal(torch.rand(4, device="cuda"), expected)
