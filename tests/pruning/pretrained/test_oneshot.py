"""One-shot structured pruning (S5): criteria, surgery, planning, export — on tiny random models."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lmprune.errors import UserError
from lmprune.pruning.pretrained.calibration import CRITERION_NEEDS, FFN_CRITERIA, HEAD_CRITERIA, collect_stats
from lmprune.pruning.pretrained.oneshot import (
    family_of,
    plan_pruning,
    prune_model,
    solve_for_target_params,
)
from lmprune.pruning.surgery import count_parameters

torch.set_num_threads(1)

VOCAB = 64
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """hidden 32, inter 64, 4 heads / 2 KV heads (head_dim 8), 3 layers, with weights large enough
    (std 0.2) and random biases / norm gains, so that a wrong slice changes the logits visibly."""
    config_cls, model_cls = FAMILIES[family]
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  initializer_range=0.2)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**fields)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def calib_batches(seed: int = 1, count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(count)]


def logits(model: torch.nn.Module, seed: int = 2) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Indices of the original rows that survive in `pruned` (rows are copied verbatim by surgery)."""
    matches = (pruned[:, None, :] == original[None, :, :]).all(-1)  # [kept, original]
    assert bool((matches.sum(1) == 1).all()), "every pruned row must be an exact copy of one original row"
    return matches.float().argmax(1)


def mask_like_pruned(original: torch.nn.Module, pruned: torch.nn.Module) -> torch.nn.Module:
    """A copy of `original` with exactly the neurons / KV groups that `pruned` removed zeroed out."""
    masked = copy.deepcopy(original)
    head_dim = original.config.head_dim
    with torch.no_grad():
        for layer, small in zip(masked.model.layers, pruned.model.layers):
            mlp, attn = layer.mlp, layer.self_attn
            keep = kept_rows(mlp.gate_proj.weight, small.mlp.gate_proj.weight)
            drop = torch.ones(mlp.gate_proj.out_features, dtype=torch.bool)
            drop[keep] = False
            mlp.gate_proj.weight[drop] = 0
            mlp.up_proj.weight[drop] = 0
            mlp.down_proj.weight[:, drop] = 0
            keep_kv = kept_rows(attn.k_proj.weight, small.self_attn.k_proj.weight)
            drop_kv_heads = torch.ones(attn.k_proj.out_features // head_dim, dtype=torch.bool)
            drop_kv_heads[keep_kv[::head_dim] // head_dim] = False
            drop_q_channels = drop_kv_heads.repeat_interleave(attn.q_proj.out_features // len(drop_kv_heads))
            attn.q_proj.weight[drop_q_channels] = 0
            attn.k_proj.weight[drop_kv_heads.repeat_interleave(head_dim)] = 0
            attn.v_proj.weight[drop_kv_heads.repeat_interleave(head_dim)] = 0
            attn.o_proj.weight[:, drop_q_channels] = 0
    return masked


def zero_neuron_(model: torch.nn.Module, neuron: int) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[neuron] = 0
            layer.mlp.up_proj.weight[neuron] = 0
            layer.mlp.down_proj.weight[:, neuron] = 0


def zero_kv_group_(model: torch.nn.Module, group: int) -> None:
    """Zero KV head `group` and its 2 query heads (q rows, k/v rows and biases, o columns)."""
    d = model.config.head_dim
    q_span, kv_span = slice(group * 2 * d, (group + 1) * 2 * d), slice(group * d, (group + 1) * d)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for linear, span in ((attn.q_proj, q_span), (attn.k_proj, kv_span), (attn.v_proj, kv_span)):
                linear.weight[span] = 0
                if linear.bias is not None:
                    linear.bias[span] = 0
            attn.o_proj.weight[:, q_span] = 0


# ---------------------------------------------------------------- family adapter


def test_family_of_accepts_llama_family_and_rejects_others():
    for family in FAMILIES:
        assert family_of(tiny_model(family)) == family
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(UserError, match="gpt2"):
        family_of(gpt2)
    base = LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UserError, match="causal LM"):
        family_of(base)


# ---------------------------------------------------------------- criteria


@pytest.mark.parametrize("criterion", sorted(FFN_CRITERIA))
def test_ffn_criterion_ranks_zeroed_neuron_last(criterion):
    model = tiny_model()
    zero_neuron_(model, 5)
    stats = collect_stats(model, calib_batches(), CRITERION_NEEDS[criterion])
    for scores in FFN_CRITERIA[criterion](model, stats):
        assert scores.shape == (64,)
        others = torch.cat([scores[:5], scores[6:]])
        assert scores[5] < others.min()


@pytest.mark.parametrize("criterion", sorted(HEAD_CRITERIA))
def test_head_criterion_ranks_zeroed_kv_group_last(criterion):
    model = tiny_model()
    zero_kv_group_(model, 0)
    stats = collect_stats(model, calib_batches(), CRITERION_NEEDS[criterion])
    for scores in HEAD_CRITERIA[criterion](model, stats):
        assert scores.shape == (2,)
        assert scores[0] < scores[1]


def test_collect_stats_restores_model_state_and_removes_hooks():
    model = tiny_model().train()
    model.model.embed_tokens.weight.requires_grad_(False)
    stats = collect_stats(model, calib_batches(count=3), {"activations", "taylor", "blocks"})
    assert stats.batches == 3 and stats.tokens == 3 * 2 * 16
    assert stats.ffn_inputs[0].tokens == 3 * 2 * 16
    assert model.training
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.layers[0].mlp.gate_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    importance = stats.block_importance()
    assert importance.shape == (3,) and bool((importance > 0).all())


# ---------------------------------------------------------------- surgery equals masking


@pytest.mark.parametrize("criterion", sorted(FFN_CRITERIA))
def test_pruned_model_logits_equal_masked_model(criterion):
    original = tiny_model()
    pruned = copy.deepcopy(original)
    report = prune_model(pruned, calib_batches(), criterion, ffn_ratio=0.5, heads_ratio=0.5,
                         bias_compensation=False, sequential=False, reconstruct=False)
    assert report["ffn_width_after"] == 32 and report["num_kv_heads_after"] == 1
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (32, 32)
    stats = collect_stats(original, calib_batches(), CRITERION_NEEDS[criterion])
    for scores, old, small in zip(FFN_CRITERIA[criterion](original, stats), original.model.layers,
                                  pruned.model.layers):  # the kept neurons are the 32 best-scored
        kept = kept_rows(old.mlp.gate_proj.weight, small.mlp.gate_proj.weight)
        assert set(kept.tolist()) == set(scores.topk(32).indices.tolist())
    masked = mask_like_pruned(original, pruned)
    torch.testing.assert_close(logits(pruned), logits(masked), atol=1e-5, rtol=0)
    assert (logits(pruned) - logits(original)).abs().max() > 1e-2  # the comparison can fail


def test_flap_bias_compensation_equals_masked_model_plus_mean_bias():
    original = tiny_model()
    pruned = copy.deepcopy(original)
    report = prune_model(pruned, calib_batches(), "flap", ffn_ratio=0.25, heads_ratio=0.5, sequential=False,
                         reconstruct=False)
    assert report["bias_compensation"] == {"ffn": True, "attention": True}
    assert pruned.config.mlp_bias and pruned.config.attention_bias
    assert report["params_after"] == plan_pruning(original, 0.25, 0.5, compensate_bias=True).params_after

    masked = mask_like_pruned(original, pruned)
    stats = collect_stats(original, calib_batches(), {"activations"})
    for layer, old, small, ffn_acc, attn_acc in zip(masked.model.layers, original.model.layers,
                                                    pruned.model.layers, stats.ffn_inputs, stats.attn_inputs):
        for linear, weight, acc in ((layer.mlp.down_proj, old.mlp.down_proj.weight, ffn_acc),
                                    (layer.self_attn.o_proj, old.self_attn.o_proj.weight, attn_acc)):
            dropped = (linear.weight == 0).all(0)  # the masked input channels
            bias = (weight.double()[:, dropped] @ acc.mean()[dropped]).float()  # [hidden]
            linear.register_forward_hook(lambda module, args, out, bias=bias: out + bias)
        assert bool((small.mlp.gate_proj.bias == 0).all()) and bool((small.self_attn.q_proj.bias == 0).all())
    torch.testing.assert_close(logits(pruned), logits(masked), atol=1e-5, rtol=0)


def test_flap_compensation_is_skipped_with_warning_where_family_has_no_bias():
    model = tiny_model("qwen2")
    with pytest.warns(UserWarning, match="compensation skipped"):
        report = prune_model(model, calib_batches(), "flap", ffn_ratio=0.5, heads_ratio=0.5)
    assert report["bias_compensation"] == {"ffn": False, "attention": False}
    assert model.model.layers[0].self_attn.o_proj.bias is None


def test_gqa_head_pruning_keeps_config_consistent_and_generates():
    model = tiny_model(num_attention_heads=8, num_key_value_heads=4, head_dim=4)
    prune_model(model, calib_batches(), "wanda-sp", heads_ratio=0.5)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 4)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16, 32) and attn.k_proj.weight.shape == (8, 32)
    assert attn.o_proj.weight.shape == (32, 16) and attn.num_key_value_groups == 2
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_head_pruning_slices_biases_and_keeps_qk_norms(family):
    original = tiny_model(family)
    pruned = copy.deepcopy(original)
    prune_model(pruned, calib_batches(), "activation", heads_ratio=0.5, reconstruct=False)
    attn, old = pruned.model.layers[1].self_attn, original.model.layers[1].self_attn
    if family == "qwen2":
        assert attn.q_proj.bias.shape == (16,) and attn.k_proj.bias.shape == (8,)
        kept = kept_rows(old.k_proj.weight, attn.k_proj.weight)
        torch.testing.assert_close(attn.k_proj.bias, old.k_proj.bias[kept], atol=0, rtol=0)
    else:
        torch.testing.assert_close(attn.q_norm.weight, old.q_norm.weight, atol=0, rtol=0)
        assert attn.k_norm.weight.shape == (8,)
    torch.testing.assert_close(logits(pruned), logits(mask_like_pruned(original, pruned)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- depth


def test_depth_pruning_drops_the_identity_layer():
    original = tiny_model()
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: block importance 0
        original.model.layers[1].self_attn.o_proj.weight.zero_()
        original.model.layers[1].mlp.down_proj.weight.zero_()
    pruned = copy.deepcopy(original)
    report = prune_model(pruned, calib_batches(), "magnitude", drop_layers=1)
    assert report["dropped_layers"] == [1]
    assert report["block_importance"][1] < 1e-6 < min(report["block_importance"][0], report["block_importance"][2])
    assert pruned.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    torch.testing.assert_close(logits(pruned), logits(original), atol=1e-5, rtol=0)
    prompt = torch.tensor([[4, 5, 6]])
    expected = original.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(pruned.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)


def test_depth_pruning_trims_layer_types():
    model = tiny_model("qwen2")
    prune_model(model, calib_batches(), "magnitude", drop_layers=2)
    assert model.config.num_hidden_layers == 1 and len(model.config.layer_types) == 1
    model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=False, pad_token_id=0)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("family,criterion", [("llama", "flap"), ("mistral", "taylor"), ("qwen2", "wanda-sp"),
                                              ("qwen3", "flap")])
def test_export_reload_gives_identical_logits(tmp_path, family, criterion):
    model = tiny_model(family)
    # Qwen3 can hold an o_proj bias but no down_proj bias: FLAP's FFN compensation is skipped.
    with pytest.warns(UserWarning, match="ffn") if family == "qwen3" else contextlib.nullcontext():
        report = prune_model(model, calib_batches(), criterion, ffn_ratio=0.5, heads_ratio=0.5, drop_layers=1)
    assert report["params_after"] == count_parameters(model) < report["params_before"]
    assert report["bias_compensation"]["attention"] == (criterion == "flap")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert count_parameters(reloaded) == report["params_after"]
    torch.testing.assert_close(logits(reloaded), logits(model), atol=0, rtol=0)


# ---------------------------------------------------------------- planning


def test_target_params_lands_at_or_below_target_and_as_close_as_possible():
    model = tiny_model()
    target = int(count_parameters(model) * 0.8)
    plan = solve_for_target_params(model, target, round_to=8)
    assert plan.params_after <= target
    wider = plan_pruning(model, ffn_ratio=1 - (plan.ffn_width + 8) / 64)
    assert wider.params_after > target
    report = prune_model(model, None, "magnitude", target_params=target)
    assert report["params_after"] == plan.params_after <= target
    assert model.config.intermediate_size == plan.ffn_width


def test_ffn_width_rounds_to_nearest_multiple():
    model = tiny_model()
    assert plan_pruning(model, ffn_ratio=0.3, round_to=8).ffn_width == 48  # 44.8 -> 48
    assert plan_pruning(model, ffn_ratio=0.45, round_to=8).ffn_width == 32  # 35.2 -> 32
    assert plan_pruning(model, ffn_ratio=0.3, round_to=1).ffn_width == 45


@pytest.mark.parametrize("kwargs,message", [
    (dict(ffn_ratio=1.0), "ffn_ratio"),
    (dict(ffn_ratio=-0.1), "ffn_ratio"),
    (dict(ffn_ratio=0.95), "round_to"),
    (dict(heads_ratio=0.3), "whole"),
    (dict(heads_ratio=0.99), "whole"),
    (dict(drop_layers=3), "drop_layers"),
    (dict(round_to=0), "round_to"),
    (dict(target_params=10**9), "larger than the model"),
    (dict(target_params=1000), "unreachable"),
    (dict(target_params=20000, ffn_ratio=0.5), "not both"),
    (dict(criterion="random"), "unknown criterion"),
    (dict(calib=None), "calibration"),
    (dict(calib=[torch.rand(2, 8)]), "token-id"),
    (dict(calib=[torch.full((2, 8), VOCAB)]), "outside"),
    (dict(calib=[]), "empty"),
])
def test_bad_inputs_raise_user_error_and_leave_model_untouched(kwargs, message):
    model = tiny_model()
    before = logits(model)
    criterion = kwargs.pop("criterion", "wanda-sp")
    batches = kwargs.pop("calib", calib_batches())
    if "target_params" not in kwargs:
        kwargs.setdefault("ffn_ratio", 0.5)
    with pytest.raises(UserError, match=message):
        prune_model(model, batches, criterion, **kwargs)
    assert model.config.intermediate_size == 64
    assert torch.equal(logits(model), before)


def test_heads_ratio_giving_an_invalid_config_is_refused():
    model = tiny_model(hidden_size=24, num_attention_heads=6, num_key_value_heads=6, head_dim=4)
    with pytest.raises(UserError, match="not a valid LlamaConfig"):
        plan_pruning(model, heads_ratio=1 / 6)  # 5 heads: hidden 24 is not a multiple of 5
