"""IDEA Prune FFN pruner: schedule, importance, masks under AdamW, compaction, exact resume (tiny Llama, CPU)."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from transformers import LlamaConfig, LlamaForCausalLM

from lmprune.errors import UserError
from lmprune.schedules import cubic_ramp
from lmprune.step import train_step
from stepping import step_runner
from lmprune.pruning.ffn.compaction import compact_ffn
from lmprune.pruning.ffn.importance import SensitivityEMA, neuron_scores
from lmprune.pruning.ffn.pruner import (
    FFNPruneConfig,
    FFNPruner,
    prune_lowest_global,
    prune_lowest_per_layer,
    resolve_target_width,
    validate_window,
)

VOCAB, WIDTH, HIDDEN = 64, 64, 32


def tiny_model(seed: int = 0, layers: int = 2, config: LlamaConfig | None = None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = config or LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=WIDTH,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    return LlamaForCausalLM(config)


def make_optimizer(model: torch.nn.Module, lr: float = 1e-2) -> torch.optim.AdamW:
    """Like lmprune.optim.build_optimizer: group 0 = matrices (decayed), group 1 = 1-D (not)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def make_batches(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 16), generator=generator) for _ in range(count)]


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens).logits  # [B, T, V]
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def train(model, optimizer, pruner, steps, batches, on_step=None):
    """`steps` (a contiguous range) of the trainer's own train_step; on_step(step, optimizer, events)."""
    trainer, state = step_runner(model, pruner, [b for b in batches], optimizer=optimizer, first_step=steps[0])
    losses = []
    for step in steps:
        assert state.step == step
        out = train_step(trainer, state)
        losses.append(out.loss.item())
        if on_step is not None:
            on_step(step, trainer.optimizer, out.events)
    return losses, trainer.optimizer


def config(**overrides) -> FFNPruneConfig:
    values = dict(start_step=2, span_steps=6, prune_every=2, ratio=0.5, compact=False)
    values.update(overrides)
    return FFNPruneConfig(**values)


def pruned_rows(model, keep_mask):
    """(gate rows, up rows, down columns) of the pruned neurons of every layer."""
    out = []
    for layer, keep in zip(model.model.layers, keep_mask):
        mlp = layer.mlp
        out.append((mlp.gate_proj.weight[~keep], mlp.up_proj.weight[~keep], mlp.down_proj.weight[:, ~keep]))
    return out


# ---- schedule and configuration ------------------------------------------------------------

def test_cubic_ramp_known_values_and_boundaries():
    assert cubic_ramp(0, 10, 20, 0.0, 0.5) == 0.0
    assert cubic_ramp(9, 10, 20, 0.0, 0.5) == 0.0
    assert cubic_ramp(10, 10, 20, 0.0, 0.5) == 0.0
    assert cubic_ramp(15, 10, 20, 0.0, 0.5) == pytest.approx(0.5 - 0.5 * 0.75 ** 3)  # 0.2890625
    assert cubic_ramp(20, 10, 20, 0.0, 0.5) == pytest.approx(0.4375)
    assert cubic_ramp(29, 10, 20, 0.0, 0.5) == pytest.approx(0.5 - 0.5 / 20 ** 3)
    assert cubic_ramp(30, 10, 20, 0.0, 0.5) == 0.5
    assert cubic_ramp(10_000, 10, 20, 0.0, 0.5) == 0.5
    assert cubic_ramp(9, 10, 0, 0.0, 0.3) == 0.0 and cubic_ramp(10, 10, 0, 0.0, 0.3) == 0.3  # one shot


@pytest.mark.parametrize("overrides, fragment", [
    ({"ratio": 0.0}, "ratio"), ({"ratio": 1.0}, "ratio"), ({"ratio": -0.2}, "ratio"), ({"ratio": 1.5}, "ratio"),
    ({"target_width": 32}, "exactly one"), ({"ratio": None}, "exactly one"),
    ({"f1": "median"}, "f1"), ({"f2": "min"}, "f2"), ({"importance": "taylor"}, "importance"),
    ({"ema": 1.0}, "ema"), ({"uncertainty_ema": -0.1}, "uncertainty_ema"), ({"prune_every": 0}, "prune_every"),
    ({"track_from": 5}, "track_from"), ({"unknown_key": 1}, "unknown_key"),
    ({"uncertainty": True, "importance": "magnitude"}, "uncertainty"), ({"uncertainty": True, "ema": 0.0}, "ema > 0"),
    ({"state_dtype": "fp16"}, "state_dtype"), ({"state_dtype": "bf16", "ema": 0.95}, "ema <= 0.9"),
    ({"state_dtype": "bf16", "uncertainty": True, "uncertainty_ema": 0.95}, "uncertainty_ema <= 0.9"),
])
def test_config_rejects_bad_values(overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        config(**overrides)


def test_target_width_resolution_and_errors():
    assert resolve_target_width(config(ratio=0.5), 64) == 32
    assert resolve_target_width(config(ratio=0.3), 64) == 48  # keeps 44.8 -> nearest multiple of 8
    assert resolve_target_width(config(ratio=None, target_width=40), 64) == 40
    with pytest.raises(UserError, match="intermediate_size=64"):
        resolve_target_width(config(ratio=None, target_width=64), 64)
    with pytest.raises(UserError, match="multiple of round_to=8"):
        resolve_target_width(config(ratio=None, target_width=36), 64)
    with pytest.raises(UserError, match="rounds to 0"):
        resolve_target_width(config(ratio=0.95), 64)
    with pytest.raises(UserError, match="min_width_fraction"):
        resolve_target_width(config(ranking="global", min_width_fraction=0.6), 64)


def test_bad_target_surfaces_at_the_first_step_when_no_state_follows_apply():
    # apply() cannot tell a misconfigured target from a resumed model already at the target width
    # whose state arrives next, so the error waits for the first step (the trainer validates earlier).
    model, pruner = tiny_model(), FFNPruner(config(ratio=None, target_width=64))
    pruner.apply(model)
    lm_loss(model, make_batches(1)[0]).backward()
    with pytest.raises(UserError, match="target_width 64"):
        pruner.after_backward(model, 0)


def test_window_must_end_inside_the_run():
    validate_window(config(start_step=90, span_steps=9), total_steps=100)
    with pytest.raises(UserError, match="steps 0..99"):
        validate_window(config(start_step=90, span_steps=10), total_steps=100)


# ---- importance ------------------------------------------------------------------------------

def random_steps(layers: int, steps: int, seed: int = 0):
    """Per step: weights and grads [(gate [W, H], up [W, H], down [H, W])] per layer, float64."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(WIDTH, HIDDEN), (WIDTH, HIDDEN), (HIDDEN, WIDTH)]

    def draw():
        return [tuple(torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes) for _ in range(layers)]
    return [(draw(), draw()) for _ in range(steps)]


@pytest.mark.parametrize("f1", ["mean", "sum"])
def test_ema_on_reduced_vectors_equals_reduced_per_weight_ema(f1):
    lam, steps = 0.6, random_steps(layers=2, steps=5)
    kwargs = dict(num_layers=2, width=WIDTH, hidden=HIDDEN, f1=f1, f2="max", ema=lam, dtype=torch.float64)
    per_neuron, per_weight = SensitivityEMA(**kwargs), SensitivityEMA(**kwargs, per_weight=True)
    assert not per_neuron.per_weight
    reference = [[torch.zeros_like(m) for m in layer] for layer in steps[0][0]]  # Ibar starts at 0
    for weights, grads in steps:
        per_neuron.update(weights, grads)
        per_weight.update(weights, grads)
        for layer in range(2):
            for m in range(3):
                sensitivity = (weights[layer][m] * grads[layer][m]).abs()
                reference[layer][m] = lam * reference[layer][m] + (1 - lam) * sensitivity
    expected = torch.stack([neuron_scores(*layer, f1, "max", torch.float64) for layer in reference])
    torch.testing.assert_close(per_neuron.scores(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(per_weight.scores(), expected, rtol=1e-12, atol=0)


def test_first_ema_update_starts_from_zero():
    (weights, grads), = random_steps(layers=1, steps=1)
    tracker = SensitivityEMA(1, WIDTH, HIDDEN, "mean", "max", ema=0.5, dtype=torch.float64)
    tracker.update(weights, grads)
    first = neuron_scores(*[(w * g).abs() for w, g in zip(weights[0], grads[0])], "mean", "max", torch.float64)
    torch.testing.assert_close(tracker.scores()[0], 0.5 * first)


def test_uncertainty_term_matches_platon_formula():
    lam, b2, steps = 0.5, 0.85, random_steps(layers=1, steps=4, seed=3)
    tracker = SensitivityEMA(1, WIDTH, HIDDEN, "l2", "mean", ema=lam, uncertainty=True, uncertainty_ema=b2,
                             dtype=torch.float64)
    ibar = [torch.zeros_like(m) for m in steps[0][0][0]]
    ubar = [torch.zeros_like(m) for m in ibar]
    for weights, grads in steps:
        tracker.update(weights, grads)
        for m in range(3):
            sensitivity = (weights[0][m] * grads[0][m]).abs()
            ibar[m] = lam * ibar[m] + (1 - lam) * sensitivity
            ubar[m] = b2 * ubar[m] + (1 - b2) * (sensitivity - ibar[m]).abs()
    expected = neuron_scores(*[i * u for i, u in zip(ibar, ubar)], "l2", "mean", torch.float64)
    torch.testing.assert_close(tracker.scores()[0], expected, rtol=1e-12, atol=0)


def test_mean_max_scoring_prunes_the_neuron_weak_in_every_matrix():
    # Per-weight sensitivities of 3 neurons (hidden 4). Neuron 0 is strong in gate only (mean 2),
    # neuron 1 moderate everywhere (1), neuron 2 has one large gate weight (mean 1.75).
    gate = torch.tensor([[2.0, 2, 2, 2], [1, 1, 1, 1], [0, 0, 0, 7]])
    up = torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    down = torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]])  # [hidden, inter]
    torch.testing.assert_close(neuron_scores(gate, up, down, "mean", "max"), torch.tensor([2.0, 1.0, 1.75]))
    assert int(neuron_scores(gate, up, down, "mean", "mean").argmin()) == 2  # another choice, another victim
    tracker = SensitivityEMA(1, 3, 4, "mean", "max", ema=0.5)
    tracker.update([(torch.ones(3, 4), torch.ones(3, 4), torch.ones(4, 3))], [(gate, up, down)])  # I = |1 * g|
    keep = prune_lowest_per_layer(tracker.scores(), torch.ones(1, 3, dtype=torch.bool), num_pruned=1)
    assert keep.tolist() == [[True, False, True]]


def test_importance_state_bytes_per_neuron_and_per_weight():
    per_neuron = FFNPruner(config())
    per_neuron.apply(tiny_model())
    assert per_neuron.importance_state_bytes() == 2 * 3 * WIDTH * 4
    per_weight = FFNPruner(config(f1="l2", uncertainty=True))
    per_weight.apply(tiny_model())
    assert per_weight.importance_state_bytes() == 2 * 2 * 3 * WIDTH * HIDDEN * 4  # Ibar and Ubar, fp32
    assert FFNPruner(config(importance="magnitude")).importance_state_bytes() == 0
    bf16 = FFNPruner(config(state_dtype="bf16"))
    bf16.apply(tiny_model())
    assert bf16.importance_state_bytes() == 2 * 3 * WIDTH * 2


@pytest.mark.parametrize("per_weight, uncertainty", [(False, False), (True, False), (True, True)])
def test_bf16_state_tracks_the_fp32_ema_within_its_bound(per_weight, uncertainty):
    # Many steps at lam = 0.9 (the bf16 limit), so the stored EMA has every chance to drift or stall.
    lam, steps = 0.9, random_steps(layers=2, steps=60, seed=5)
    kwargs = dict(num_layers=2, width=WIDTH, hidden=HIDDEN, f1="mean", f2="max", ema=lam,
                  uncertainty=uncertainty, uncertainty_ema=0.5, per_weight=per_weight)
    exact = SensitivityEMA(**kwargs, dtype=torch.float32)
    narrow = SensitivityEMA(**kwargs, dtype=torch.bfloat16)
    for weights, grads in steps:
        weights32 = [tuple(m.float() for m in layer) for layer in weights]
        grads32 = [tuple(m.float() for m in layer) for layer in grads]
        exact.update(weights32, grads32)
        narrow.update(weights32, grads32)
    assert all(t.dtype == torch.bfloat16 for t in narrow._buffers().values())
    assert narrow.nbytes() * 2 == exact.nbytes()
    bound = 2.0 ** -9 / (1 - lam) * (2 if uncertainty else 1)  # Ibar * Ubar: two stored EMAs' errors
    relative = (narrow.scores() - exact.scores()).abs() / exact.scores()
    assert float(relative.max()) <= bound
    assert float(relative.mean()) > 0  # it is really stored in bf16


def test_bf16_state_round_trips_and_refuses_an_fp32_checkpoint():
    (weights, grads), = random_steps(layers=1, steps=1)
    weights = [tuple(m.float() for m in layer) for layer in weights]
    grads = [tuple(m.float() for m in layer) for layer in grads]
    narrow = SensitivityEMA(1, WIDTH, HIDDEN, "mean", "max", ema=0.5, dtype=torch.bfloat16)
    narrow.update(weights, grads)
    restored = SensitivityEMA(1, WIDTH, HIDDEN, "mean", "max", ema=0.5, dtype=torch.bfloat16)
    restored.load_state_dict(roundtrip(narrow.state_dict()))
    assert torch.equal(restored.scores(), narrow.scores())
    wide = SensitivityEMA(1, WIDTH, HIDDEN, "mean", "max", ema=0.5, dtype=torch.float32)
    wide.update(weights, grads)
    with pytest.raises(UserError, match="state_dtype"):
        restored.load_state_dict(wide.state_dict())


# ---- masks -------------------------------------------------------------------------------------

def test_pruned_neurons_stay_zero_through_adamw_steps_and_survivors_keep_state():
    model, cfg = tiny_model(), config(start_step=2, span_steps=6, prune_every=2)
    pruner, optimizer = FFNPruner(cfg), make_optimizer(model)
    pruner.apply(model)
    batches, checked_updates = make_batches(16), []

    def check(step, opt, events):
        keep = pruner.keep_mask
        for gate, up, down in pruned_rows(model, keep):
            assert gate.abs().sum() == 0 and up.abs().sum() == 0 and down.abs().sum() == 0
        for layer, mask in zip(model.model.layers, keep):
            state = opt.state[layer.mlp.down_proj.weight]
            assert state["exp_avg"][:, ~mask].abs().sum() == 0 and state["exp_avg_sq"][:, ~mask].abs().sum() == 0
            assert state["exp_avg_sq"][:, mask].min() > 0  # survivors keep their moments
        if events.mask_updated:
            checked_updates.append(step)

    # Zero weights in all three matrices already give a pruned neuron zero gradients; perturb them
    # (as a bias or a regulariser could) to check that after_backward masks them anyway.
    original_after_backward = pruner.after_backward

    def after_backward(model_, step):
        for layer in model.model.layers:
            for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                linear.weight.grad.add_(1e-3)
        original_after_backward(model_, step)
        for layer, keep in zip(model.model.layers, pruner.keep_mask):
            assert layer.mlp.gate_proj.weight.grad[~keep].abs().sum() == 0
            assert layer.mlp.down_proj.weight.grad[:, ~keep].abs().sum() == 0
    pruner.after_backward = after_backward
    train(model, optimizer, pruner, range(16), batches, on_step=check)
    assert checked_updates == [4, 6, 8]  # r(2) = 0: the first update prunes nothing
    assert (~pruner.keep_mask).sum(1).tolist() == [32, 32]


def test_per_layer_ranking_follows_the_schedule_and_ends_at_target_width():
    model, cfg = tiny_model(layers=3), config(start_step=3, span_steps=12, prune_every=3, ratio=0.3)
    pruner = FFNPruner(cfg)
    pruner.apply(model)
    target = resolve_target_width(cfg, WIDTH)  # 48
    previous = pruner.keep_mask.clone()

    def check(step, _, __):
        nonlocal previous
        keep = pruner.keep_mask
        assert not (keep & ~previous).any()  # monotone: nothing comes back
        previous = keep.clone()
        fraction = cubic_ramp(step, 3, 12, 0.0, (WIDTH - target) / WIDTH)
        expected = WIDTH - target if step >= 15 else round(fraction * WIDTH)  # e.g. step 12: 15.75 -> 16
        if step >= 3 and (step - 3) % 3 == 0:
            assert (~keep).sum(1).tolist() == [expected] * 3
    train(model, make_optimizer(model), pruner, range(17), make_batches(17), on_step=check)
    assert pruner.keep_mask.sum(1).tolist() == [target] * 3 and pruner.finished


def test_global_ranking_keeps_the_per_layer_minimum():
    scores = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    scores[0] -= 10.0  # layer 0 is the least important everywhere
    keep = prune_lowest_global(scores, torch.ones(3, 10, dtype=torch.bool), num_pruned=12, min_keep=3)
    assert keep.sum(1).tolist()[0] == 3 and int(keep.sum()) == 30 - 12
    again = prune_lowest_global(scores, keep, num_pruned=15, min_keep=3)
    assert not (again & ~keep).any() and again.sum(1).min() >= 3


def test_global_ranking_gives_uneven_widths_that_cannot_be_compacted():
    model = tiny_model(layers=3)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(model.model.layers[0].mlp, name).weight.mul_(1e-3)
    cfg = config(start_step=0, span_steps=0, importance="magnitude", ranking="global", min_width_fraction=0.25,
                 compact=True)
    pruner = FFNPruner(cfg, make_optimizer=functools.partial(make_optimizer, lr=1e-5))
    pruner.apply(model)
    with pytest.raises(UserError, match="different widths"):
        train(model, make_optimizer(model, lr=1e-5), pruner, range(1), make_batches(1))
    kept = pruner.keep_mask.sum(1).tolist()
    assert kept[0] == 16 and min(kept) >= 16 and sum(kept) == 3 * 32  # min_keep = 0.25 * 64


# ---- compaction ---------------------------------------------------------------------------------

def test_compacted_model_and_optimizer_match_the_masked_run():
    cfg = dict(start_step=2, span_steps=4, prune_every=2, ratio=0.5)
    masked, compacted = tiny_model(), tiny_model()
    masked_pruner = FFNPruner(config(**cfg, compact=False))
    compact_pruner = FFNPruner(config(**cfg, compact=True), make_optimizer=make_optimizer)
    masked_pruner.apply(masked)
    compact_pruner.apply(compacted)
    batches = make_batches(12)
    _, masked_opt = train(masked, make_optimizer(masked), masked_pruner, range(7), batches)
    old_opt = make_optimizer(compacted)
    _, new_opt = train(compacted, old_opt, compact_pruner, range(7), batches)

    assert new_opt is not old_opt and compact_pruner.compacted
    assert compacted.config.intermediate_size == 32 and compacted.model.layers[1].mlp.down_proj.weight.shape == (32, 32)
    assert masked_pruner.metrics()["params"] == compact_pruner.metrics()["params"] == sum(
        p.numel() for p in compacted.parameters())
    assert [g["lr"] for g in new_opt.param_groups] == [g["lr"] for g in masked_opt.param_groups]
    keep = masked_pruner.keep_mask
    assert torch.equal(keep, compact_pruner.keep_mask)
    down_state = new_opt.state[compacted.model.layers[0].mlp.down_proj.weight]
    masked_state = masked_opt.state[masked.model.layers[0].mlp.down_proj.weight]
    assert torch.equal(down_state["exp_avg_sq"], masked_state["exp_avg_sq"][:, keep[0]])
    assert torch.equal(down_state["step"], masked_state["step"])

    with torch.no_grad():
        diff = (masked(input_ids=batches[11]).logits - compacted(input_ids=batches[11]).logits).abs().max()
    assert diff <= 1e-5
    masked_losses, _ = train(masked, masked_opt, masked_pruner, range(7, 12), batches)
    compact_losses, _ = train(compacted, new_opt, compact_pruner, range(7, 12), batches)
    torch.testing.assert_close(torch.tensor(compact_losses), torch.tensor(masked_losses), rtol=1e-4, atol=0)
    for (name, weight_m), (_, weight_c) in zip(masked.named_parameters(), compacted.named_parameters(), strict=True):
        if ".mlp." in name:  # model.layers.{i}.mlp.{gate,up,down}_proj.weight: keep the kept neurons
            mask = keep[int(name.split(".")[2])]
            weight_m = weight_m[:, mask] if "down_proj" in name else weight_m[mask]
        torch.testing.assert_close(weight_c, weight_m, rtol=1e-4, atol=1e-6, msg=name)


def test_compact_ffn_standalone_one_shot():
    model, generator = tiny_model(), torch.Generator().manual_seed(0)
    masks = [torch.randperm(WIDTH, generator=generator) < 24 for _ in range(2)]
    tokens = make_batches(1)[0]
    with torch.no_grad():
        for layer, keep in zip(model.model.layers, masks):
            layer.mlp.gate_proj.weight[~keep] = 0
            layer.mlp.down_proj.weight[:, ~keep] = 0
        before = model(input_ids=tokens).logits
        assert compact_ffn(model, masks) is None
        after = model(input_ids=tokens).logits
    assert model.config.intermediate_size == 24 and model.model.layers[0].mlp.up_proj.weight.shape == (24, HIDDEN)
    assert (before - after).abs().max() <= 1e-5
    with pytest.raises(UserError, match="different widths"):
        compact_ffn(tiny_model(), [torch.ones(WIDTH, dtype=torch.bool), torch.arange(WIDTH) < 8])


# ---- resume --------------------------------------------------------------------------------------

def roundtrip(state: dict) -> dict:
    """Through the checkpoint's stores: tensors via safetensors, the rest via JSON."""
    tensors = {k: v.contiguous() for k, v in state.items() if torch.is_tensor(v)}
    other = json.loads(json.dumps({k: v for k, v in state.items() if not torch.is_tensor(v)}))
    return {**load_tensors(save_tensors(tensors)), **other}


@pytest.mark.parametrize("overrides, stop, order", [
    ({}, 5, "apply_first"),
    ({"f1": "l2", "uncertainty": True}, 5, "load_first"),
    ({"importance": "random"}, 5, "apply_first"),
    ({"state_dtype": "bf16"}, 5, "load_first"),
    ({"compact": True}, 11, "apply_first"),  # model rebuilt from the compacted HF config
    ({"compact": True}, 11, "load_first"),   # dense model, compacted by apply()
])
def test_resume_in_the_middle_is_bit_exact(overrides, stop, order):
    cfg, total, batches = config(start_step=2, span_steps=6, prune_every=2, **overrides), 14, make_batches(14)
    make = make_optimizer if cfg.compact else None
    straight, straight_pruner = tiny_model(), FFNPruner(cfg, make)
    straight_pruner.apply(straight)
    train(straight, make_optimizer(straight), straight_pruner, range(total), batches)

    first, first_pruner = tiny_model(), FFNPruner(cfg, make)
    first_pruner.apply(first)
    _, first_opt = train(first, make_optimizer(first), first_pruner, range(stop), batches)
    model_state = {k: v.clone() for k, v in first.state_dict().items()}
    optimizer_state = copy.deepcopy(first_opt.state_dict())
    pruner_state = roundtrip(first_pruner.state_dict())

    resumed_pruner = FFNPruner(cfg, make)
    if order == "apply_first":
        resumed = tiny_model(seed=7, config=copy.deepcopy(first.config))
        resumed_pruner.apply(resumed)
        resumed.load_state_dict(model_state)
        optimizer = make_optimizer(resumed)
        optimizer.load_state_dict(optimizer_state)
        resumed_pruner.load_state_dict(pruner_state)
    else:
        resumed = tiny_model(seed=7)
        resumed_pruner.load_state_dict(pruner_state)
        resumed_pruner.apply(resumed)
        resumed.load_state_dict(model_state)
        optimizer = make_optimizer(resumed)
        optimizer.load_state_dict(optimizer_state)
    train(resumed, optimizer, resumed_pruner, range(stop, total), batches)

    assert torch.equal(resumed_pruner.keep_mask, straight_pruner.keep_mask)
    assert resumed_pruner.compacted == straight_pruner.compacted == cfg.compact
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
