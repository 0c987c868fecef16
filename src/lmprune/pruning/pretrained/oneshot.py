"""One-shot structured pruning of pretrained Llama-family HF causal LMs.

Formulas: docs/algorithms.md, "One-shot pruning of pretrained models".

Pipeline (`prune_model`): validate the request and plan the widths -> calibration statistics, per
channel only: layer by layer on the already pruned predecessors' outputs (`sequential.prune_sequential`,
default) or in one pass over the unpruned model (`calibration.collect_stats`) -> per layer
(`layerwise`): score FFN neurons / GQA groups with one criterion from `FFN_CRITERIA` / `HEAD_CRITERIA`
(in `lmprune.pruning.pretrained.calibration`, re-exported here), refit down_proj / o_proj by least
squares (`reconstruct`, default on except for magnitude), slice (`lmprune.pruning.surgery`) -> drop
the layers of lowest block importance, giving a smaller dense model that plain `AutoModelForCausalLM` loads.

Choices a caller should know:
- Ranking is per layer, so every layer keeps the same FFN width and KV-group count (HF configs hold
  one width). The kept FFN width is rounded to the NEAREST multiple of `round_to` (halves up), never
  above the original width, and must stay >= `round_to`. Heads are pruned as whole GQA groups (a KV head
  and its query heads), so head_dim and the query/KV ratio never change; `round_to` does not apply.
- Depth pruning drops the `drop_layers` layers of lowest block importance 1 - cos(x_in, x_out),
  ranked once on the unpruned model (ShortGPT style).
- FLAP bias compensation adds W mean(X) - W' mean(X[kept]) (= W[:, pruned] @ mean(X[pruned]) without a
  refit) to down_proj / o_proj as a bias where the
  family's config can hold one (Llama: `mlp_bias`, `attention_bias`; Qwen3: `attention_bias`); those
  flags also give the sibling projections zero biases (counted in the parameter totals). Where the
  family cannot (Mistral, Qwen2, Qwen3's MLP), compensation is skipped with a warning.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmprune.errors import UserError
from lmprune.pruning.pretrained.calibration import (
    CRITERION_NEEDS,
    FFN_CRITERIA,
    HEAD_CRITERIA,
    CalibStats,
    ChannelStats,
    _checked_batch,
    collect_stats,
)
from lmprune.pruning.pretrained.layerwise import (
    LayerOptions,
    LayerView,
    RefitLog,
    commit_config_,
    layer_stats,
    prune_layer_ffn_,
    prune_layer_heads_,
    top_indices,
)
from lmprune.pruning.pretrained.reconstruct import DEFAULT_DAMP, check_damp, check_refit_tokens
from lmprune.pruning.pretrained.sequential import (
    InMemoryLayers,
    LayerSource,
    SequentialTimes,
    capture_layer_inputs,
    layerwise_block_importance,
    prune_sequential,
)
from lmprune.pruning.surgery import (
    attention_shape,
    count_parameters,
    decoder_layers,
    drop_layers_,
    family_of,
    supports_output_bias,
)

__all__ = [
    "CRITERION_NEEDS", "FFN_CRITERIA", "HEAD_CRITERIA", "CalibStats", "ChannelStats", "PrunePlan",
    "collect_stats", "default_reconstruct", "family_of", "plan_pruning", "prune_model", "solve_for_target_params",
]

# A heads ratio must select whole KV groups; this much slack (in groups) lets "0.33" mean one of three.
GROUP_RATIO_TOLERANCE = 0.02


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class PrunePlan:
    """Target shape of a one-shot prune (uniform across layers) and its exact parameter counts."""

    ffn_width_before: int
    ffn_width: int  # kept FFN neurons per layer
    kv_groups_before: int
    kv_groups: int  # kept KV heads (= GQA groups) per layer
    num_heads: int  # kept query heads per layer
    head_dim: int
    num_layers_before: int
    layers_to_drop: int  # how many; which ones is decided from block importance
    ffn_bias_compensation: bool  # FLAP compensation will be folded into down_proj biases
    attn_bias_compensation: bool  # ... into o_proj biases
    params_before: int
    params_after: int

    @property
    def prunes_ffn(self) -> bool:
        return self.ffn_width < self.ffn_width_before

    @property
    def prunes_heads(self) -> bool:
        return self.kv_groups < self.kv_groups_before


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a number in [0, 1); got {value!r}")
    if not 0.0 <= value < 1.0:
        raise UserError(f"{name} must be in [0, 1); got {value}")
    return float(value)


def _check_count(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UserError(f"{name} must be an integer {bounds}; got {value!r}")
    return value


def _ffn_width_for_ratio(intermediate: int, ratio: float, round_to: int) -> int:
    """Kept FFN width: nearest multiple of round_to (halves up) to intermediate * (1 - ratio), <= intermediate."""
    if ratio == 0.0:
        return intermediate
    width = round_to * math.floor(intermediate * (1.0 - ratio) / round_to + 0.5)
    width = min(width, intermediate // round_to * round_to)
    if width < round_to:
        raise UserError(
            f"ffn_ratio={ratio} leaves {intermediate * (1.0 - ratio):.1f} of {intermediate} FFN neurons per layer, "
            f"fewer than one multiple of round_to={round_to}"
        )
    return width


def _kv_groups_for_ratio(num_kv_heads: int, ratio: float) -> int:
    """Kept GQA groups: the ratio must remove a whole number (>= 1) of groups and keep >= 1."""
    if ratio == 0.0:
        return num_kv_heads
    removed = ratio * num_kv_heads
    whole = round(removed)
    if abs(removed - whole) > GROUP_RATIO_TOLERANCE or whole < 1 or whole >= num_kv_heads:
        valid = ", ".join(f"{k / num_kv_heads:.4g}" for k in range(1, num_kv_heads))
        raise UserError(
            f"heads_ratio={ratio} removes {removed:.3g} of {num_kv_heads} KV groups; heads are pruned as whole "
            f"GQA groups and at least one must stay: valid ratios are 0{', ' + valid if valid else ''}"
        )
    return num_kv_heads - whole


def _check_pruned_config(model: nn.Module, width: int, kv_groups: int, layers_to_drop: int) -> None:
    """UserError if the family's config class would refuse the pruned shape (e.g. hidden % heads != 0)."""
    num_heads, num_kv_heads, head_dim = attention_shape(model)
    candidate = copy.deepcopy(model.config)
    candidate.intermediate_size = width
    candidate.head_dim = head_dim
    candidate.num_attention_heads = kv_groups * (num_heads // num_kv_heads)
    candidate.num_key_value_heads = kv_groups
    candidate.num_hidden_layers = model.config.num_hidden_layers - layers_to_drop
    if getattr(candidate, "layer_types", None) is not None:
        candidate.layer_types = candidate.layer_types[: candidate.num_hidden_layers]
    validate = getattr(candidate, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as error:  # the config classes raise several error types; all mean "not loadable"
        detail = " ".join(str(error).split())
        raise UserError(
            f"the pruned shape ({candidate.num_attention_heads} heads, {kv_groups} KV heads, FFN {width}) "
            f"is not a valid {type(model.config).__name__}: {detail}"
        ) from error


def _make_plan(model: nn.Module, width: int, kv_groups: int, layers_to_drop: int, compensate_bias: bool) -> PrunePlan:
    """Exact parameter arithmetic for a uniform prune (all layers have the shape of layer 0)."""
    layers = decoder_layers(model)
    layer_sizes = {sum(p.numel() for p in layer.parameters()) for layer in layers}
    if len(layer_sizes) != 1:
        raise UserError("decoder layers differ in size; one-shot pruning needs uniform layers")
    num_heads, num_kv_heads, head_dim = attention_shape(model)
    heads_per_group = num_heads // num_kv_heads
    mlp, attn = layers[0].mlp, layers[0].self_attn

    def row_cost(linear: nn.Linear) -> int:  # one output row with its bias entry
        return linear.in_features + (linear.bias is not None)

    per_neuron = row_cost(mlp.gate_proj) + row_cost(mlp.up_proj) + mlp.down_proj.out_features
    per_group = heads_per_group * head_dim * (row_cost(attn.q_proj) + attn.o_proj.out_features) + head_dim * (
        row_cost(attn.k_proj) + row_cost(attn.v_proj)
    )
    intermediate = model.config.intermediate_size
    ffn_comp = compensate_bias and width < intermediate and supports_output_bias(model, "ffn")
    attn_comp = compensate_bias and kv_groups < num_kv_heads and supports_output_bias(model, "attention")
    added_per_layer = 0  # biases that switching on mlp_bias / attention_bias creates
    if ffn_comp and mlp.down_proj.bias is None:
        added_per_layer += mlp.down_proj.out_features + width * sum(
            lin.bias is None for lin in (mlp.gate_proj, mlp.up_proj))
    if attn_comp and attn.o_proj.bias is None:
        added_per_layer += attn.o_proj.out_features + kv_groups * head_dim * (
            heads_per_group * (attn.q_proj.bias is None) + (attn.k_proj.bias is None) + (attn.v_proj.bias is None))
    kept_layers = len(layers) - layers_to_drop
    params_before = count_parameters(model)
    removed = layers_to_drop * layer_sizes.pop() + kept_layers * (
        (intermediate - width) * per_neuron + (num_kv_heads - kv_groups) * per_group
    )
    return PrunePlan(
        ffn_width_before=intermediate, ffn_width=width, kv_groups_before=num_kv_heads, kv_groups=kv_groups,
        num_heads=kv_groups * heads_per_group, head_dim=head_dim, num_layers_before=len(layers),
        layers_to_drop=layers_to_drop, ffn_bias_compensation=ffn_comp, attn_bias_compensation=attn_comp,
        params_before=params_before, params_after=params_before - removed + kept_layers * added_per_layer,
    )


def plan_pruning(
    model: nn.Module,
    ffn_ratio: float = 0.0,
    heads_ratio: float = 0.0,
    drop_layers: int = 0,
    round_to: int = 8,
    compensate_bias: bool = False,
) -> PrunePlan:
    """Validate pruning ratios and return the resulting widths and parameter counts (UserError if invalid).

    ffn_ratio / heads_ratio: fraction of FFN neurons / KV groups removed per layer, in [0, 1).
    compensate_bias: count the biases FLAP compensation adds where the family supports them.
    """
    family_of(model)
    ffn_ratio = _check_fraction("ffn_ratio", ffn_ratio)
    heads_ratio = _check_fraction("heads_ratio", heads_ratio)
    round_to = _check_count("round_to", round_to, 1)
    num_layers = model.config.num_hidden_layers
    drop_layers = _check_count("drop_layers", drop_layers, 0, num_layers - 1)
    _, num_kv_heads, _ = attention_shape(model)
    width = _ffn_width_for_ratio(model.config.intermediate_size, ffn_ratio, round_to)
    kv_groups = _kv_groups_for_ratio(num_kv_heads, heads_ratio)
    _check_pruned_config(model, width, kv_groups, drop_layers)
    return _make_plan(model, width, kv_groups, drop_layers, compensate_bias)


def solve_for_target_params(
    model: nn.Module,
    target_params: int,
    heads_ratio: float = 0.0,
    drop_layers: int = 0,
    round_to: int = 8,
    compensate_bias: bool = False,
) -> PrunePlan:
    """The plan with the widest FFN (a multiple of round_to, or the full width) whose size is <= target_params.

    Only the FFN width is solved for; heads_ratio and drop_layers are taken as given, so a caller who
    wants heads or depth pruned too fixes those and lets the FFN absorb the rest of the budget.
    UserError if the target exceeds the model or even the narrowest FFN (round_to neurons) overshoots it.
    """
    base = plan_pruning(model, 0.0, heads_ratio, drop_layers, round_to, compensate_bias)
    target_params = _check_count("target_params", target_params, 1)
    if target_params > base.params_before:
        raise UserError(f"target_params={target_params} is larger than the model ({base.params_before} parameters)")
    intermediate = base.ffn_width_before
    widths = [intermediate] + list(range(intermediate // round_to * round_to, 0, -round_to))
    for width in widths:
        plan = _make_plan(model, width, base.kv_groups, drop_layers, compensate_bias)
        if plan.params_after <= target_params:
            _check_pruned_config(model, width, base.kv_groups, drop_layers)
            return plan
    raise UserError(
        f"target_params={target_params} is unreachable: FFN width {round_to} with heads_ratio={heads_ratio} and "
        f"drop_layers={drop_layers} still leaves {plan.params_after} parameters; prune heads or layers too"
    )


# ---------------------------------------------------------------- one-shot prune


def default_reconstruct(criterion: str) -> bool:
    """The refit is on by default for every criterion that sees data; magnitude keeps its plain slice."""
    return criterion != "magnitude"


@dataclass(frozen=True)
class _Request:
    """What prune_model was asked, validated and resolved against the model."""

    criterion: str
    plan: PrunePlan
    needs: frozenset[str]
    options: LayerOptions
    sequential: bool


def _resolve(model: nn.Module, criterion: str, plan: PrunePlan, sequential: bool, reconstruct: bool | None,
             damp: float, offloaded: bool, calib_batches: list | None) -> _Request:
    """Calibration needs and per-layer options; every UserError before any calibration work."""
    damp = check_damp(damp)
    reconstruct = default_reconstruct(criterion) if reconstruct is None else bool(reconstruct)
    prunes_width = plan.prunes_ffn or plan.prunes_heads
    reconstruct = reconstruct and prunes_width
    needs = set(CRITERION_NEEDS[criterion]) if prunes_width else set()
    if reconstruct:
        needs.add("gram")
    if plan.ffn_bias_compensation or plan.attn_bias_compensation:
        needs.add("activations")
    if plan.layers_to_drop:
        needs.add("blocks")
    if needs and calib_batches is None:
        raise UserError(f"criterion {criterion!r} / depth pruning / the refit needs calibration batches")
    if needs and not calib_batches:
        raise UserError("no calibration batches: the calibration set is empty")
    for batch in calib_batches if needs else ():
        _checked_batch(batch, model.config.vocab_size)  # a bad batch fails now, not after hours of layers
    if offloaded and not sequential:
        raise UserError("--offload loads one layer at a time and needs --sequential")
    if offloaded and "taylor" in needs:
        raise UserError("--criterion taylor needs the whole model for its backward pass; it cannot run with "
                        "--offload (use activation, flap, wanda-sp or magnitude)")
    if reconstruct:
        tokens = sum(int(batch.numel()) for batch in calib_batches)
        if plan.prunes_ffn:
            check_refit_tokens(tokens, plan.ffn_width, "FFN neurons")
        if plan.prunes_heads:
            check_refit_tokens(tokens, plan.num_heads * plan.head_dim, "attention channels (o_proj inputs)")
    options = LayerOptions(criterion, reconstruct, damp, plan.ffn_bias_compensation, plan.attn_bias_compensation)
    return _Request(criterion, plan, frozenset(needs), options, sequential or offloaded)


def _prune_globally(model: nn.Module, batches: list | None, request: _Request) -> tuple[CalibStats, list[int],
                                                                                       RefitLog, SequentialTimes]:
    """--no-sequential: statistics of every layer from one pass over the unpruned model, then per-layer pruning."""
    plan, times = request.plan, SequentialTimes()
    t0 = time.perf_counter()
    stats = collect_stats(model, batches, request.needs) if request.needs else CalibStats()
    times.gram_seconds = sum(acc.gram_seconds for acc in (*stats.ffn_inputs, *stats.attn_inputs))
    times.forward_seconds = time.perf_counter() - t0 - times.gram_seconds
    dropped = []
    if plan.layers_to_drop:
        dropped = sorted(top_indices(-stats.block_importance(), plan.layers_to_drop).tolist())
    log, view = RefitLog(), None
    for index, layer in enumerate(decoder_layers(model)):
        if index in dropped:
            continue
        view, layer_part = LayerView(model, layer), layer_stats(stats, index)
        if plan.prunes_heads:
            prune_layer_heads_(view, layer_part, plan.kv_groups, request.options, log)
        if plan.prunes_ffn:
            prune_layer_ffn_(view, layer_part, plan.ffn_width, request.options, log)
    if view is not None:
        commit_config_(model, view)
    return stats, dropped, log, times


def _prune_sequentially(model: nn.Module, batches: list | None, request: _Request,
                        source: LayerSource | None) -> tuple[CalibStats, list[int], RefitLog, SequentialTimes]:
    """--sequential: layer by layer, each layer measured on its pruned predecessors' outputs."""
    plan, times = request.plan, SequentialTimes()
    source = source or InMemoryLayers(model)
    stats = CalibStats()
    if "taylor" in request.needs:  # gradients need the whole network: one backward on the unpruned model
        t0 = time.perf_counter()
        stats = collect_stats(model, batches, {"taylor"})
        times.forward_seconds += time.perf_counter() - t0
    dropped = []
    if plan.layers_to_drop:
        block_inputs = capture_layer_inputs(model, batches, source.device)
        importance = layerwise_block_importance(model, block_inputs, source, times)
        stats.block_dissimilarity, stats.block_tokens = importance * block_inputs.tokens, block_inputs.tokens
        dropped = sorted(top_indices(-importance, plan.layers_to_drop).tolist())
        del block_inputs
    inputs = None
    if request.needs & {"activations", "gram"}:
        inputs = capture_layer_inputs(model, batches, source.device)
        stats.batches, stats.tokens = len(inputs.hidden), inputs.tokens
    elif batches:
        stats.batches, stats.tokens = len(batches), sum(int(b.numel()) for b in batches)
    log = prune_sequential(model, inputs, source, plan, dropped, request.options, stats, times)
    return stats, dropped, log, times


def prune_model(
    model: nn.Module,
    calib_batches: Iterable[torch.Tensor] | None,
    criterion: str,
    ffn_ratio: float = 0.0,
    heads_ratio: float = 0.0,
    drop_layers: int = 0,
    target_params: int | None = None,
    round_to: int = 8,
    bias_compensation: bool = True,
    sequential: bool = True,
    reconstruct: bool | None = None,
    damp: float = DEFAULT_DAMP,
    layer_source: LayerSource | None = None,
) -> dict[str, Any]:
    """Prune `model` in place: FFN neurons, whole GQA groups and/or decoder layers, ranked per layer.

    criterion: a key of FFN_CRITERIA (the same name ranks heads via HEAD_CRITERIA).
    target_params: instead of ffn_ratio, solve the FFN width for a size <= target (see solve_for_target_params).
    bias_compensation: FLAP only; fold the mean output the kept columns no longer carry into biases.
    sequential: layer l calibrated on the outputs of layers 0..l-1 already pruned (default); False: one
    pass over the unpruned model. reconstruct: least-squares refit of down_proj / o_proj on the kept
    channels (None: on for every criterion but magnitude); damp: its ridge term, x mean(diag G), > 0.
    layer_source: where the layers live (offload.OffloadedLayers for --offload; default the model's own).
    calib_batches: LongTensor [B, T] token ids; may be None when nothing needs calibration (magnitude
    without refit or depth pruning). Everything is validated before calibration starts.
    Returns a JSON-serialisable report (params and shapes before/after, dropped layers, refit errors, times).
    """
    family = family_of(model)
    if criterion not in FFN_CRITERIA:
        raise UserError(f"unknown criterion {criterion!r}; choose from {sorted(FFN_CRITERIA)}")
    compensate = criterion == "flap" and bias_compensation
    if target_params is not None:
        if ffn_ratio != 0.0:
            raise UserError("give either ffn_ratio or target_params, not both")
        plan = solve_for_target_params(model, target_params, heads_ratio, drop_layers, round_to, compensate)
    else:
        plan = plan_pruning(model, ffn_ratio, heads_ratio, drop_layers, round_to, compensate)
    batches = list(calib_batches) if calib_batches is not None else None
    request = _resolve(model, criterion, plan, sequential, reconstruct, damp, layer_source is not None, batches)
    if compensate:
        _warn_skipped_compensation(plan, family)
    if request.sequential:
        stats, dropped, log, times = _prune_sequentially(model, batches, request, layer_source)
    else:
        stats, dropped, log, times = _prune_globally(model, batches, request)
    drop_layers_(model, dropped)
    return _prune_report(model, family, request, stats, dropped, log, times, round_to)


def _warn_skipped_compensation(plan: PrunePlan, family: str) -> None:
    for part, output, prunes, applied in (
        ("ffn", "down_proj", plan.prunes_ffn, plan.ffn_bias_compensation),
        ("attention", "o_proj", plan.prunes_heads, plan.attn_bias_compensation),
    ):
        if prunes and not applied:
            warnings.warn(
                f"FLAP bias compensation skipped for the {part}: model_type={family!r} has no {output} bias "
                "option in its config, and adding one would make the checkpoint non-standard",
                stacklevel=3,
            )


def _prune_report(model: nn.Module, family: str, request: _Request, stats: CalibStats, dropped: list[int],
                  log: RefitLog, times: SequentialTimes, round_to: int) -> dict[str, Any]:
    """The JSON-serialisable before/after record of one `prune_model` call."""
    plan = request.plan
    heads_per_group = plan.num_heads // plan.kv_groups
    return {
        "family": family,
        "criterion": request.criterion,
        "params_before": plan.params_before,
        "params_after": count_parameters(model),
        "ffn_width_before": plan.ffn_width_before,
        "ffn_width_after": plan.ffn_width,
        "num_heads_before": plan.kv_groups_before * heads_per_group,
        "num_heads_after": plan.num_heads,
        "num_kv_heads_before": plan.kv_groups_before,
        "num_kv_heads_after": plan.kv_groups,
        "head_dim": plan.head_dim,
        "num_layers_before": plan.num_layers_before,
        "num_layers_after": plan.num_layers_before - plan.layers_to_drop,
        "dropped_layers": dropped,
        "block_importance": stats.block_importance().tolist() if plan.layers_to_drop else None,
        "bias_compensation": {"ffn": plan.ffn_bias_compensation, "attention": plan.attn_bias_compensation},
        "round_to": round_to,
        "sequential": request.sequential,
        "reconstruct": request.options.reconstruct,
        "damp": request.options.damp,
        "refit": log.as_dict(),
        "seconds": {"calibration_forward": times.forward_seconds, "refit": times.gram_seconds + log.solve_seconds,
                    "refit_gram": times.gram_seconds, "refit_solve": log.solve_seconds},
        "calibration": {"batches": stats.batches, "tokens": stats.tokens},
    }
