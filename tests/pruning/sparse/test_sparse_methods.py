"""MGPP, GMP and iterative magnitude pruning: prior gradient, exact masks, schedules, resume, configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lmprune.errors import UserError
from lmprune.pruning.sparse.gmp import GMPConfig, GMPPruner, gmp_is_update_step, gmp_sparsity_at
from lmprune.pruning.sparse.imp import IMPConfig, IMPPruner
from lmprune.pruning.sparse.masks import (
    apply_masks_, compute_keep_masks, magnitude_keep_masks, nm_keep_masks, prunable_parameters)
from lmprune.pruning.sparse.mgpp import (
    MGPPConfig, MGPPPruner, mgpp_eta_at, mgpp_is_update_step, mgpp_lam_at, mgpp_prior_grad, mgpp_sparsity_at)
from lmprune.step import train_step
from stepping import step_runner
from lmprune.report import plot_ppl_vs_sparsity, rows_to_markdown

torch.set_num_threads(1)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def make_batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 16), generator=gen) for _ in range(n)]


def train_steps(model, optimizer, pruner, batches, steps, check=None):
    """`steps` (a contiguous range) of the trainer's own train_step (no clipping); check(step, events)."""
    trainer, state = step_runner(model, pruner, batches, optimizer=optimizer, first_step=steps[0], grad_clip=0.0)
    for step in steps:
        assert state.step == step
        out = train_step(trainer, state)
        if check is not None:
            check(step, out.events)
    return trainer.optimizer


def adamw(model: nn.Module, lr: float = 1e-2) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def pruned_masks(pruner) -> dict[str, torch.Tensor]:
    state = pruner.state_dict()
    return {k.removeprefix("keep_mask."): v for k, v in state.items() if k.startswith("keep_mask.")}


# ----------------------------------------------------------------------------- prior gradient

def reference_prior_grad(w: torch.Tensor, lam: float, s0: float, s1: float, n: int) -> torch.Tensor:
    """Autograd of -(1/n) log pi(w), log pi by logsumexp (stable for any |w|), float64."""
    x = w.detach().double().clone().requires_grad_(True)

    def log_normal(var: float) -> torch.Tensor:
        return -0.5 * math.log(2 * math.pi * var) - x * x / (2 * var)

    log_pi = torch.logsumexp(torch.stack([math.log(lam) + log_normal(s1), math.log1p(-lam) + log_normal(s0)]), dim=0)
    (-(log_pi.sum()) / n).backward()
    return x.grad


@pytest.mark.parametrize("lam,s0,s1,n", [(0.1, 1e-10, 0.05, 1000), (0.3, 1e-9, 0.1, 7), (1e-4, 1e-6, 0.05, 1)])
def test_prior_grad_equals_autograd_of_log_prior_float64(lam, s0, s1, n):
    gen = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(200, generator=gen, dtype=torch.float64) * 0.3,
                   torch.randn(50, generator=gen, dtype=torch.float64) * math.sqrt(s0),  # |w| ~ spike scale
                   torch.tensor([0.0, 1e-12, -1e-7, 3e-5, -2e-4, 5.0, -30.0, 1e3], dtype=torch.float64)])
    got = mgpp_prior_grad(w, lam, s0, s1, n)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_prior_grad(w, lam, s0, s1, n), rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prior_grad_finite_at_tiny_spike_variance_low_precision(dtype):
    w = torch.tensor([0.0, -0.0, 1e-30, 1e-8, -1e-5, 1e-3, 0.02, -0.5, 3.0, 1e4, -3e30], dtype=dtype)
    got = mgpp_prior_grad(w, 0.1, 1e-10, 0.05, 1000)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    expected = reference_prior_grad(w.double(), 0.1, 1e-10, 0.05, 1000)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=0.0)


# ----------------------------------------------------------------------------- exact masks

def reference_keep_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Masks by concatenating everything and a stable sort (ties -> earlier tensor, lower index)."""
    groups = [list(weights)] if scope == "global" else [[name] for name in weights]
    keep = {}
    for group in groups:
        flat = torch.cat([weights[name].abs().float().reshape(-1) for name in group])
        prune = torch.zeros_like(flat, dtype=torch.bool)
        prune[torch.argsort(flat, stable=True)[:round(sparsity * flat.numel())]] = True
        for name, part in zip(group, prune.split([weights[name].numel() for name in group])):
            keep[name] = part.logical_not().reshape(weights[name].shape)
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.05, 0.33, 0.5, 0.9])
def test_masks_prune_exact_count_with_ties(dtype, scope, sparsity):
    gen = torch.Generator().manual_seed(3)
    # few distinct values -> many ties at the threshold, plus zeros of both signs
    weights = {f"w{i}": (torch.randint(-3, 4, shape, generator=gen).to(dtype) / 4)
               for i, shape in enumerate([(6, 10), (3, 7), (8, 8)])}
    weights["w1"][0, :3] = -0.0
    keep, _ = magnitude_keep_masks(weights, sparsity, scope)
    expected = reference_keep_masks(weights, sparsity, scope)
    for name in weights:
        assert torch.equal(keep[name], expected[name]), name
    if scope == "global":
        assert sum(int((~m).sum()) for m in keep.values()) == round(sparsity * 60 + sparsity * 21 + sparsity * 64)
    else:
        assert all(int((~keep[n]).sum()) == round(sparsity * weights[n].numel()) for n in weights)


def test_global_threshold_matches_concatenation_on_tiny_llama():
    params = prunable_parameters(tiny_llama(), MGPPConfig(n_train=1).patterns)
    sparsity = 0.37
    keep, threshold = magnitude_keep_masks(params, sparsity, "global")
    everything = torch.cat([p.detach().abs().reshape(-1) for p in params.values()])
    k = round(sparsity * everything.numel())
    assert threshold == everything.kthvalue(k).values.item()
    assert all(torch.equal(keep[n], m) for n, m in reference_keep_masks(dict(params), sparsity, "global").items())
    assert sum(int((~m).sum()) for m in keep.values()) == k


def test_previous_masks_stay_pruned_and_count_toward_target():
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(10, 10, generator=gen), "b": torch.randn(5, 20, generator=gen)}
    first, _ = magnitude_keep_masks(weights, 0.3, "global")
    for name, w in weights.items():  # pruned weights that moved far away (a leak) must stay pruned
        w[~first[name]] = 100.0
    second, _ = magnitude_keep_masks(weights, 0.5, "global", previous_keep=first)
    assert all(not (second[n] & ~first[n]).any() for n in weights)
    assert sum(int((~m).sum()) for m in second.values()) == 100


@pytest.mark.parametrize("keep_n,group", [(2, 4), (1, 4), (2, 8)])
def test_nm_masks_keep_n_largest_of_every_group(keep_n, group):
    gen = torch.Generator().manual_seed(1)
    weights = {"a": torch.randint(-2, 3, (6, 16), generator=gen).float(), "b": torch.randn(4, 8, generator=gen)}
    keep, _ = nm_keep_masks(weights, keep_n, group)
    for name, w in weights.items():
        kept, scores = keep[name].reshape(-1, group), w.abs().reshape(-1, group)
        assert (kept.sum(dim=1) == keep_n).all()
        smallest_kept = scores.masked_fill(~kept, math.inf).min(dim=1).values
        largest_pruned = scores.masked_fill(kept, -math.inf).max(dim=1).values
        assert (smallest_kept >= largest_pruned).all()
    again, _ = compute_keep_masks(weights, 0.5, nm=f"{keep_n}:{group}", previous_keep=keep)
    assert all(torch.equal(again[n], keep[n]) for n in weights)


def test_nm_rejects_input_dim_not_divisible():
    with pytest.raises(UserError, match="divisible by 4"):
        nm_keep_masks({"w": torch.randn(8, 6)}, 2, 4)


def test_gmp_nm_pruner_gives_exact_groups_on_llama():
    model = tiny_llama()
    pruner = GMPPruner(GMPConfig(t0=0, n=1, dt=1, s_f=0.5, nm="2:4"))
    pruner.apply(model)
    train_steps(model, adamw(model), pruner, make_batches(3), range(3))
    for name, p in prunable_parameters(model, GMPConfig().patterns).items():
        assert ((p.detach().reshape(-1, 4) == 0).sum(dim=1) == 2).all(), name


# ----------------------------------------------------------------------------- schedules

def test_mgpp_schedule_warmup_jump_cubic_freeze():
    cfg = MGPPConfig(n_train=10, warmup_steps=5, s_i=0.4, s_f=0.9, cubic_steps=10, dt=3, eta_warmin_steps=4)
    assert [mgpp_sparsity_at(t, cfg) for t in range(5)] == [0.0] * 5
    assert mgpp_sparsity_at(5, cfg) == 0.4 and mgpp_sparsity_at(15, cfg) == 0.9 and mgpp_sparsity_at(99, cfg) == 0.9
    assert mgpp_sparsity_at(10, cfg) == pytest.approx(0.9 - 0.5 * 0.5 ** 3)
    values = [mgpp_sparsity_at(t, cfg) for t in range(20)]
    assert values == sorted(values)
    assert [t for t in range(30) if mgpp_is_update_step(t, cfg)] == [5, 8, 11, 14, 15]
    assert mgpp_lam_at(5, cfg) == 0.1 and mgpp_lam_at(15, cfg) == pytest.approx(1e-4)
    assert mgpp_lam_at(10, cfg) == pytest.approx(0.1 * (1 + (1e-3 - 1) * 0.5))
    assert [mgpp_eta_at(t, cfg) for t in (4, 5, 6, 8, 20)] == [0.0, 0.25, 0.5, 1.0, 1.0]


def test_gmp_schedule_is_zhu_gupta_cubic_every_dt():
    cfg = GMPConfig(s_i=0.1, s_f=0.8, t0=4, n=4, dt=5)
    assert [t for t in range(40) if gmp_is_update_step(t, cfg)] == [4, 9, 14, 19, 24]
    assert gmp_sparsity_at(3, cfg) == 0.0 and gmp_sparsity_at(4, cfg) == pytest.approx(0.1)
    assert gmp_sparsity_at(8, cfg) == gmp_sparsity_at(4, cfg)  # constant between updates
    assert gmp_sparsity_at(14, cfg) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5 ** 3)
    assert gmp_sparsity_at(24, cfg) == pytest.approx(0.8) and gmp_sparsity_at(1000, cfg) == pytest.approx(0.8)


# ----------------------------------------------------------------------------- pruner behaviour

def test_mgpp_pruned_weight_regrows_before_freeze_and_never_after():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    cfg = MGPPConfig(n_train=10**9, warmup_steps=0, s_i=0.5, s_f=0.5, cubic_steps=6, dt=3, patterns=["*weight"])
    pruner = MGPPPruner(cfg)
    pruner.apply(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.3, weight_decay=0.1)
    weight = model[0].weight

    def step(t: int, boosted: tuple[int, int] | None) -> None:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        if boosted is not None:
            weight.grad[boosted] = -1.0  # pushes the weight up by ~lr per step
        pruner.after_backward(model, t)
        pruner.after_clip(model, t)
        optimizer.step()
        pruner.after_optimizer_step(model, optimizer, t)

    step(0, None)  # first mask update
    entry = tuple(int(i) for i in (~pruned_masks(pruner)["0.weight"]).nonzero()[0])
    assert weight[entry] == 0
    step(1, entry)
    assert weight[entry] > 0  # gradients of pruned weights are not masked before the freeze
    step(2, entry)
    step(3, entry)  # mask update: the grown weight is among the largest again
    assert pruned_masks(pruner)["0.weight"][entry] and weight[entry] > 0.5
    for t in (4, 5, 6):
        step(t, None)
    assert pruner.metrics()["mask_frozen"]
    entry = tuple(int(i) for i in (~pruned_masks(pruner)["0.weight"]).nonzero()[0])
    for t in range(7, 12):
        step(t, entry)
        assert weight[entry] == 0 and not pruned_masks(pruner)["0.weight"][entry]


def assert_pruned_are_exact_zeros(params, keep):
    for name, p in params.items():
        pruned = p.detach()[~keep[name].to(p.device)]
        assert (pruned.view(torch.int32) == 0).all(), name  # +0.0 bit patterns


def test_gmp_masked_weights_stay_zero_under_adamw_with_weight_decay():
    model = tiny_llama()
    cfg = GMPConfig(s_i=0.2, s_f=0.6, t0=1, n=3, dt=2, scope="global")
    pruner = GMPPruner(cfg)
    pruner.apply(model)
    params = prunable_parameters(model, cfg.patterns)
    total = sum(p.numel() for p in params.values())
    history = []

    def check(step: int, events) -> None:
        if step < cfg.t0:
            assert not pruned_masks(pruner)
            return
        keep = pruned_masks(pruner)
        assert_pruned_are_exact_zeros(params, keep)
        if history:
            assert all(not (keep[n] & ~history[-1][n]).any() for n in keep)  # monotone
        history.append(keep)
        metrics = pruner.metrics()
        assert events.mask_updated == gmp_is_update_step(step, cfg)
        assert sum(int((~m).sum()) for m in keep.values()) == round(gmp_sparsity_at(step, cfg) * total)
        assert metrics["sparsity"] == round(gmp_sparsity_at(step, cfg) * total) / total

    train_steps(model, adamw(model), pruner, make_batches(10), range(10), check)
    assert pruner.metrics()["mask_frozen"]


def test_frozen_mgpp_masked_weights_stay_zero_under_adamw_with_weight_decay():
    model = tiny_llama()
    cfg = MGPPConfig(n_train=100, warmup_steps=1, s_i=0.3, s_f=0.7, cubic_steps=4, dt=2)
    pruner = MGPPPruner(cfg)
    pruner.apply(model)
    params = prunable_parameters(model, cfg.patterns)
    total = sum(p.numel() for p in params.values())

    def check(step: int, events) -> None:
        metrics = pruner.metrics()
        assert events.mask_updated == mgpp_is_update_step(step, cfg)
        if events.mask_updated:  # right after an update: exactly round(s*N) zeros
            assert metrics["sparsity"] == round(mgpp_sparsity_at(step, cfg) * total) / total
        assert metrics["mask_frozen"] == (step >= 5)
        if metrics["mask_frozen"]:
            assert_pruned_are_exact_zeros(params, pruned_masks(pruner))
            assert metrics["sparsity"] == round(0.7 * total) / total and metrics["lam"] == pytest.approx(1e-4)

    train_steps(model, adamw(model), pruner, make_batches(10), range(10), check)


def serialise_state(state: dict, tmp_path) -> dict:
    """What a checkpoint does: tensors to safetensors, the rest to JSON."""
    save_file({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, tmp_path / "pruner.safetensors")
    (tmp_path / "pruner.json").write_text(json.dumps({k: v for k, v in state.items()
                                                      if not isinstance(v, torch.Tensor)}))
    return load_file(tmp_path / "pruner.safetensors") | json.loads((tmp_path / "pruner.json").read_text())


@pytest.mark.parametrize("method,split", [("mgpp", 5), ("mgpp", 9), ("gmp", 5)])
def test_exact_resume_in_the_middle_of_pruning(method, split, tmp_path):
    if method == "mgpp":
        cfg = MGPPConfig(n_train=1000, warmup_steps=2, s_i=0.3, s_f=0.7, cubic_steps=6, dt=2, eta_warmin_steps=3)
        make = lambda: MGPPPruner(cfg)  # noqa: E731
    else:
        cfg = GMPConfig(s_i=0.2, s_f=0.6, t0=2, n=3, dt=2, scope="global")
        make = lambda: GMPPruner(cfg)  # noqa: E731
    steps, batches = 11, make_batches(11)

    straight, pruner_a = tiny_llama(), make()
    pruner_a.apply(straight)
    train_steps(straight, adamw(straight), pruner_a, batches, range(steps))

    first, pruner_b = tiny_llama(), make()
    pruner_b.apply(first)
    optimizer = train_steps(first, adamw(first), pruner_b, batches, range(split))
    weights = {k: v.clone() for k, v in first.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    pruner_state = serialise_state(pruner_b.state_dict(), tmp_path)
    del first, pruner_b

    resumed, pruner_c = tiny_llama(seed=123), make()
    resumed.load_state_dict(weights)
    optimizer = adamw(resumed)
    optimizer.load_state_dict(optimizer_state)
    pruner_c.load_state_dict(pruner_state)
    pruner_c.apply(resumed)
    train_steps(resumed, optimizer, pruner_c, batches, range(split, steps))

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    masks_a, masks_c = pruned_masks(pruner_a), pruned_masks(pruner_c)
    assert masks_a.keys() == masks_c.keys() and all(torch.equal(masks_a[n], masks_c[n]) for n in masks_a)
    assert pruner_a.metrics() == pruner_c.metrics()


# ----------------------------------------------------------------------------- configs and patterns

@pytest.mark.parametrize("cls,kwargs,message", [
    (MGPPConfig, {"s_i": 1.0}, r"s_i must be in \[0, 1\)"),
    (MGPPConfig, {"s_f": -0.1}, r"s_f must be in \[0, 1\)"),
    (MGPPConfig, {"s_i": 0.6, "s_f": 0.5}, r"s_i \(0.6\) must be <="),
    (MGPPConfig, {"s0": 0.1, "s1": 0.05}, "0 < s0 < s1"),
    (MGPPConfig, {"lam": 0.0}, r"lam must be in \(0, 1\)"),
    (MGPPConfig, {"lam": 1.0}, r"lam must be in \(0, 1\)"),
    (MGPPConfig, {"nm": "4:4"}, "1 <= N < M"),
    (MGPPConfig, {"nm": "2-4"}, "N:M"),
    (MGPPConfig, {"n_train": 0}, "n_train must be > 0"),
    (MGPPConfig, {"dt": 0}, "dt must be >= 1"),
    (MGPPConfig, {"patterns": []}, "patterns must be a non-empty list"),
    (MGPPConfig, {"sparsity": 0.5}, "Extra inputs are not permitted"),
    (GMPConfig, {"s_f": 1.0}, r"s_f must be in \[0, 1\)"),
    (GMPConfig, {"s_i": 0.5, "s_f": 0.4}, "must be <="),
    (GMPConfig, {"nm": "3:2"}, "1 <= N < M"),
    (IMPConfig, {"levels": [0.3, 0.2]}, "strictly increasing"),
    (IMPConfig, {"levels": [0.5, 1.0]}, r"in \[0, 1\)"),
    (IMPConfig, {"levels": [0.1], "fraction_of_remaining": 0.2, "rounds": 2}, "not both"),
    (IMPConfig, {"fraction_of_remaining": 0.2}, "given together"),
])
def test_config_validation_errors(cls, kwargs, message):
    if cls is MGPPConfig:
        kwargs = {"n_train": 100} | kwargs
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_every_config_field_has_a_description():
    for cls in (MGPPConfig, GMPConfig, IMPConfig):
        assert all(field.description for field in cls.model_fields.values()), cls.__name__


def test_default_patterns_match_only_the_projections():
    names = list(prunable_parameters(tiny_llama(), MGPPConfig(n_train=1).patterns))
    assert len(names) == 14
    assert all(n.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
               for n in names)


@pytest.mark.parametrize("make", [lambda p: MGPPPruner(MGPPConfig(n_train=1, patterns=p)),
                                  lambda p: GMPPruner(GMPConfig(patterns=p))])
def test_patterns_that_match_nothing_are_user_errors(make):
    with pytest.raises(UserError, match=r"nothing_here\*"):
        make([r"mlp\.up_proj\.weight$", "nothing_here*"]).apply(tiny_llama())


# ----------------------------------------------------------------------------- iterative magnitude pruning

@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_imp_rounds_are_monotone_with_exact_counts(scope, tmp_path):
    model = tiny_llama()
    cfg = IMPConfig(levels=[0.1, 0.3, 0.5], steps_per_round=2, scope=scope)
    pruner = IMPPruner(cfg)
    pruner.apply(model)
    params = prunable_parameters(model, cfg.patterns)
    total = sum(p.numel() for p in params.values())
    eval_ids = make_batches(1, seed=9)[0]
    seen_masks, rows = [], []

    def check(step: int, events) -> None:
        assert events.mask_updated == (step % cfg.steps_per_round == 0)
        keep = pruned_masks(pruner)
        assert_pruned_are_exact_zeros(params, keep)  # during fine-tuning too
        if events.mask_updated:
            seen_masks.append(keep)
        if (step + 1) % cfg.steps_per_round == 0:  # end of a round: one row of the curve
            with torch.no_grad():
                ppl = math.exp(model(input_ids=eval_ids, labels=eval_ids).loss.item())
            metrics = pruner.metrics()
            rows.append({"round": len(rows) + 1, "target_sparsity": metrics["target_sparsity"],
                         "exact_sparsity": metrics["sparsity"], "ppl": ppl})

    train_steps(model, adamw(model), pruner, make_batches(6, seed=5), range(6), check)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["target_sparsity"] for r in rows] == [0.1, 0.3, 0.5]
    for row, masks in zip(rows, seen_masks):
        if scope == "global":
            expected = round(row["target_sparsity"] * total)
        else:
            expected = sum(round(row["target_sparsity"] * p.numel()) for p in params.values())
        assert sum(int((~m).sum()) for m in masks.values()) == expected
        assert row["exact_sparsity"] == expected / total
    for before, after in zip(seen_masks, seen_masks[1:]):
        assert all(not (after[n] & ~before[n]).any() for n in before)
    assert all(math.isfinite(r["ppl"]) for r in rows)

    png = plot_ppl_vs_sparsity(rows, tmp_path / "imp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = rows_to_markdown(rows)
    assert table.splitlines()[0] == "| round | target_sparsity | exact_sparsity | ppl |"
    assert len(table.splitlines()) == 2 + len(rows)


def test_imp_fraction_of_remaining_levels():
    assert IMPConfig(fraction_of_remaining=0.5, rounds=3).sparsity_levels() == [0.5, 0.75, 0.875]
    assert IMPConfig().sparsity_levels() == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_apply_masks_rejects_unknown_names():
    with pytest.raises(UserError, match="no such parameter"):
        apply_masks_(tiny_llama(), {"model.nope.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_imp_round_start_skipped_for_a_non_finite_loss_prunes_on_the_next_step(monkeypatch):
    from lmprune import step as step_module

    real, calls = step_module.lm_loss, {"n": 0}

    def lm_loss(logits, targets):  # NaN at step 2, the first step of round 2
        calls["n"] += 1
        return real(logits, targets) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(step_module, "lm_loss", lm_loss)
    model = tiny_llama()
    cfg = IMPConfig(levels=[0.2, 0.4], steps_per_round=2)
    pruner = IMPPruner(cfg)
    pruner.apply(model)
    updates = []
    train_steps(model, adamw(model), pruner, make_batches(4), range(4),
                lambda step, events: updates.append(step) if events.mask_updated else None)
    assert updates == [0, 3]  # round 2 pruned one step late, not lost
    assert pruner.metrics()["sparsity"] == pytest.approx(0.4, abs=1e-4)


def test_mgpp_prior_never_enters_the_clip_norm_and_is_logged_apart():
    """The logged grad_norm of an MGPP step is the loss gradient's (equal to a no-prior run's on the same
    weights and batch), and the prior's own norm -- here far larger -- is prior_grad_norm."""
    batches = make_batches(1)
    cfg = MGPPConfig(n_train=10, warmup_steps=0, s_i=0.5, s_f=0.6, cubic_steps=4, dt=2)
    with_prior, plain = tiny_llama(), tiny_llama()
    pruner = MGPPPruner(cfg)
    pruner.apply(with_prior)
    out_prior = train_step(*step_runner(with_prior, pruner, batches, grad_clip=1.0))
    out_plain = train_step(*step_runner(plain, None, batches, grad_clip=1.0))
    assert float(out_prior.grad_norm) == float(out_plain.grad_norm)
    prior_norm = pruner.metrics()["prior_grad_norm"]
    assert prior_norm > 100 * float(out_plain.grad_norm)  # s0 = 1e-10, n = 10: the prior dominates
    # and it was applied: one step moved the weights differently from the plain run
    assert not torch.equal(with_prior.model.layers[0].mlp.up_proj.weight, plain.model.layers[0].mlp.up_proj.weight)


def test_mgpp_without_prior_is_the_same_schedule_with_no_prior_gradient():
    """mgpp.prior false (the no-prior control): same masks, no prior gradient, prior_grad_norm 0; the
    compare report labels it mgpp_noprior."""
    from lmprune.compare import method_of
    from lmprune.config import config_from_dict

    batches = make_batches(1)
    cfg = MGPPConfig(n_train=10, warmup_steps=0, s_i=0.5, s_f=0.6, cubic_steps=4, dt=2, prior=False)
    control, masked = tiny_llama(), tiny_llama()
    pruner, reference = MGPPPruner(cfg), MGPPPruner(cfg.model_copy(update={"prior": True}))
    pruner.apply(control)
    reference.apply(masked)
    train_step(*step_runner(control, pruner, batches, grad_clip=1.0))
    train_step(*step_runner(masked, reference, batches, grad_clip=1.0))
    assert pruner.metrics()["prior_grad_norm"] == 0.0 < reference.metrics()["prior_grad_norm"]
    assert pruner.metrics()["sparsity"] == reference.metrics()["sparsity"] > 0
    run = config_from_dict({"mgpp": {"s_i": 0.3, "s_f": 0.5, "warmup_steps": 1, "cubic_steps": 4, "prior": False}})
    assert method_of(run)[0] == "mgpp_noprior"
