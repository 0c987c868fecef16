"""Pruning one decoder layer at a time: rank, refit, compensate, slice.

Both calibration orders use it: `oneshot.prune_model` with statistics from one pass over the whole
unpruned model (`--no-sequential`), and `sequential.prune_sequential` with each layer's statistics
measured on the outputs of the layers before it, already pruned. A `LayerView` presents one layer as a
one-layer model with its own copy of the config, so the criteria (`FFN_CRITERIA`, `HEAD_CRITERIA`) and
the surgery (`prune_ffn_`, `prune_kv_groups_`, `add_output_bias_`) run unchanged on it while the other
layers still have their original shape; `commit_config_` copies the pruned shape to the model at the end.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmprune.pruning.pretrained.calibration import FFN_CRITERIA, HEAD_CRITERIA, CalibStats, ChannelStats
from lmprune.pruning.pretrained.reconstruct import refit_columns, relative_output_error, residual_mean_bias
from lmprune.pruning.surgery import add_output_bias_, kv_group_channels, prune_ffn_, prune_kv_groups_

__all__ = ["LayerOptions", "LayerView", "RefitLog", "commit_config_", "layer_stats", "prune_layer_ffn_",
           "prune_layer_heads_", "top_indices"]

# config fields the per-layer surgery changes (copied from the last view onto the model's config)
_SHAPE_FIELDS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "mlp_bias",
                 "attention_bias")


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in ascending index order (stable on ties)."""
    return torch.argsort(scores, descending=True, stable=True)[:count].sort().values


class LayerView(nn.Module):
    """Decoder layer `layer` of `model` seen as a one-layer causal LM with a private copy of the config."""

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.config = copy.deepcopy(model.config)
        self.config.num_hidden_layers = 1
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])
        object.__setattr__(self, "lm_head", model.lm_head)  # family_of checks it exists; not registered here


def commit_config_(model: nn.Module, view: LayerView) -> None:
    """Give the model's config the pruned shape the per-layer surgery gave `view`'s copy."""
    for name in _SHAPE_FIELDS:
        if hasattr(view.config, name):
            setattr(model.config, name, getattr(view.config, name))


@dataclass(frozen=True)
class LayerOptions:
    """How each layer is pruned: the criterion, the refit, FLAP's mean shift."""

    criterion: str
    reconstruct: bool
    damp: float
    ffn_bias: bool  # add the mean-shift bias to down_proj (FLAP compensation)
    attn_bias: bool  # ... and to o_proj


@dataclass
class RefitLog:
    """Per layer relative output error of down_proj / o_proj on the calibration tokens, and the solve time."""

    ffn_error_sliced: list[float] = field(default_factory=list)  # W[:, S] alone
    ffn_error_refit: list[float] = field(default_factory=list)  # after the least-squares refit
    attn_error_sliced: list[float] = field(default_factory=list)
    attn_error_refit: list[float] = field(default_factory=list)
    solve_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"ffn_error_sliced": self.ffn_error_sliced, "ffn_error_refit": self.ffn_error_refit,
                "attn_error_sliced": self.attn_error_sliced, "attn_error_refit": self.attn_error_refit,
                "solve_seconds": self.solve_seconds}


def layer_stats(stats: CalibStats, index: int) -> CalibStats:
    """Layer `index`'s part of whole-model statistics, as one-layer CalibStats for a LayerView."""
    def pick(values: list) -> list:
        return [values[index]] if values else []

    return CalibStats(ffn_inputs=pick(stats.ffn_inputs), attn_inputs=pick(stats.attn_inputs),
                      taylor_ffn=pick(stats.taylor_ffn), taylor_groups=pick(stats.taylor_groups),
                      batches=stats.batches, tokens=stats.tokens)


def _kept_weight(linear: nn.Linear, acc: ChannelStats | None, kept: torch.Tensor, options: LayerOptions,
                 errors: tuple[list[float], list[float]], log: RefitLog) -> torch.Tensor:
    """The new columns of `linear` for channels `kept`: refit by least squares, or the plain slice."""
    sliced = linear.weight.detach()[:, kept.to(linear.weight.device)]
    if not options.reconstruct:
        return sliced
    t0 = time.perf_counter()
    refit = refit_columns(linear.weight, acc.gram, kept, options.damp)
    log.solve_seconds += time.perf_counter() - t0
    errors[0].append(relative_output_error(linear.weight, acc.gram, kept, sliced))
    errors[1].append(relative_output_error(linear.weight, acc.gram, kept, refit))
    return refit


@torch.no_grad()
def _rewrite_(view: LayerView, linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None,
              part: str) -> None:
    linear.weight.copy_(weight.to(device=linear.weight.device, dtype=linear.weight.dtype))
    if bias is not None:
        add_output_bias_(view, part, [bias])


def prune_layer_ffn_(view: LayerView, stats: CalibStats, width: int, options: LayerOptions,
                     log: RefitLog) -> torch.Tensor:
    """Keep the `width` best FFN neurons of the view's layer; refit down_proj; add the mean shift.

    Returns the kept neurons' indices (ascending)."""
    scores = FFN_CRITERIA[options.criterion](view, stats)[0]
    keep = top_indices(scores, width)
    down = view.model.layers[0].mlp.down_proj
    acc = stats.ffn_inputs[0] if stats.ffn_inputs else None
    weight = _kept_weight(down, acc, keep, options, (log.ffn_error_sliced, log.ffn_error_refit), log)
    bias = residual_mean_bias(down.weight, weight, acc.mean(), keep) if options.ffn_bias else None
    prune_ffn_(view, [keep])
    _rewrite_(view, down, weight, bias, "ffn")
    return keep


def prune_layer_heads_(view: LayerView, stats: CalibStats, kv_groups: int, options: LayerOptions,
                       log: RefitLog) -> None:
    """Keep the `kv_groups` best GQA groups of the view's layer; refit o_proj on their channels; mean shift."""
    num_heads, num_kv_heads = view.config.num_attention_heads, view.config.num_key_value_heads
    attn = view.model.layers[0].self_attn
    scores = HEAD_CRITERIA[options.criterion](view, stats)[0]
    groups = top_indices(scores, kv_groups)
    channels = kv_group_channels(groups, num_heads // num_kv_heads * attn.head_dim)
    acc = stats.attn_inputs[0] if stats.attn_inputs else None
    weight = _kept_weight(attn.o_proj, acc, channels, options, (log.attn_error_sliced, log.attn_error_refit), log)
    bias = residual_mean_bias(attn.o_proj.weight, weight, acc.mean(), channels) if options.attn_bias else None
    prune_kv_groups_(view, [groups])
    _rewrite_(view, attn.o_proj, weight, bias, "attention")
