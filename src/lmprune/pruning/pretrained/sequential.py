"""Layer-sequential calibration (SparseGPT / Wanda order): layer l is measured on the outputs of layers
0..l-1 already pruned and refit, so the refit of layer l also absorbs the error of the layers before it.

The calibration set's hidden states [B, T, H] per batch are captured at layer 0's input once and carried
from layer to layer; memory is one layer's activations for the calibration set (calib_samples x
calib_seq_len x hidden) plus per-channel statistics (and one layer's G) of the layer being pruned.
Layers come from a `LayerSource`: the model's own (`InMemoryLayers`) or loaded one at a time from
safetensors (`offload.OffloadedLayers`), so with --offload only the current layer is on the compute
device and only pruned layers stay in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lmprune.errors import UserError
from lmprune.pruning.pretrained.calibration import CalibStats, ChannelStats, _checked_batch
from lmprune.sharding import all_reduce_, sum_over_ranks
from lmprune.pruning.pretrained.layerwise import (
    LayerOptions,
    LayerView,
    RefitLog,
    commit_config_,
    prune_layer_ffn_,
    prune_layer_heads_,
)
from lmprune.pruning.surgery import decoder_layers

__all__ = ["InMemoryLayers", "LayerInputs", "LayerSource", "SequentialTimes", "capture_layer_inputs",
           "layerwise_block_importance", "prune_sequential"]


class LayerSource(Protocol):
    """Where decoder layer i lives between uses: `fetch` puts it on the compute device, `release` back."""

    device: torch.device

    def fetch(self, index: int) -> nn.Module: ...

    def release(self, index: int, keep: bool) -> None: ...  # keep=False: its weights are not needed again


class InMemoryLayers:
    """The model's layers, already on the compute device: fetch and release do nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)
        self.device = next(model.parameters()).device

    def fetch(self, index: int) -> nn.Module:
        return self.layers[index]

    def release(self, index: int, keep: bool) -> None:
        return None


class _Captured(Exception):
    """Raised by the layer-0 pre-hook: the decoder's input and kwargs for one batch, nothing run past it."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.hidden, self.kwargs = hidden, kwargs


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@dataclass
class LayerInputs:
    """Per calibration batch: the hidden states entering the current layer and the decoder's layer kwargs
    (causal mask, position ids, rotary cos/sin), which are the same for every layer."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    tokens: int


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> LayerInputs:
    """Run embeddings (and mask / rotary set-up) only, keeping layer 0's inputs on `device`."""
    embed_device = model.model.embed_tokens.weight.device
    hidden, kwargs, tokens = [], [], 0

    def hook(module: nn.Module, args: tuple, call_kwargs: dict) -> None:
        state = args[0] if args else call_kwargs["hidden_states"]
        rest = {k: v for k, v in call_kwargs.items() if k != "hidden_states"}
        raise _Captured(state, rest)

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch = _checked_batch(batch, model.config.vocab_size).to(embed_device)
            try:
                model.model(input_ids=batch, use_cache=False)
            except _Captured as caught:
                hidden.append(caught.hidden.to(device))
                kwargs.append(_to(caught.kwargs, device))
                tokens += batch.numel()
            else:
                raise RuntimeError("the decoder never called its first layer")
    finally:
        handle.remove()
    if not hidden:
        raise UserError("no calibration batches: the calibration set is empty")
    return LayerInputs(hidden, kwargs, tokens)


@dataclass
class SequentialTimes:
    """Wall time of the layer forward passes (calibration) and of G's accumulation (part of the refit)."""

    forward_seconds: float = 0.0
    gram_seconds: float = 0.0


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def _run(layer: nn.Module, inputs: LayerInputs, times: SequentialTimes) -> list[torch.Tensor]:
    t0 = time.perf_counter()
    outputs = [_output(layer(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    times.forward_seconds += time.perf_counter() - t0
    return outputs


@torch.no_grad()
def _measure(layer: nn.Module, linear: nn.Linear, inputs: LayerInputs, gram: bool, times: SequentialTimes,
             keep: bool = False) -> tuple[ChannelStats, list[torch.Tensor], list[torch.Tensor]]:
    """ChannelStats (and G when gram) at `linear`'s input over the calibration set, this layer only.

    keep: also return the layer's outputs and `linear`'s inputs per batch (for `_patched_outputs`).
    """
    acc = ChannelStats.zeros(linear.in_features, linear.weight.device, gram)
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        acc.update(args[0])
        if keep:
            seen.append(args[0].detach())

    handle = linear.register_forward_pre_hook(hook)
    try:
        outputs = _run(layer, inputs, times)
    finally:
        handle.remove()
    sum_over_ranks(acc)  # under torchrun each rank carried its share of the calibration batches
    times.forward_seconds -= acc.gram_seconds  # the hook's G product is the refit's cost, not the forward's
    times.gram_seconds += acc.gram_seconds
    return acc, (outputs if keep else []), seen


@torch.no_grad()
def _patched_outputs(outputs: list[torch.Tensor], down_inputs: list[torch.Tensor], old: nn.Linear,
                     old_weight: torch.Tensor, old_bias: torch.Tensor | None, new: nn.Linear,
                     kept: torch.Tensor, times: SequentialTimes) -> list[torch.Tensor]:
    """The layer's outputs after its FFN was pruned, without running it again.

    A Llama-family layer adds down_proj's output to the residual stream last, so the new output is the
    old one plus down'(x_S) - down(x) (x = down_proj's input, unchanged by the FFN's own pruning).
    """
    t0 = time.perf_counter()
    kept = kept.to(old_weight.device)
    patched = [out + F.linear(x[..., kept], new.weight, new.bias) - F.linear(x, old_weight, old_bias)
               for out, x in zip(outputs, down_inputs)]
    times.forward_seconds += time.perf_counter() - t0
    return patched


@torch.no_grad()
def layerwise_block_importance(model: nn.Module, inputs: LayerInputs, source: LayerSource,
                               times: SequentialTimes) -> torch.Tensor:
    """[L] mean over tokens of 1 - cos(x_in, x_out) per layer of the UNPRUNED model, one layer at a time."""
    layers = decoder_layers(model)
    scores = torch.zeros(len(layers), dtype=torch.float64)
    hidden = list(inputs.hidden)
    for index in tqdm(range(len(layers)), desc="block importance", unit="layer"):
        layer = source.fetch(index)
        outputs = _run(layer, LayerInputs(hidden, inputs.kwargs, inputs.tokens), times)
        for x_in, x_out in zip(hidden, outputs):
            scores[index] += (1.0 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)).sum().item()
        hidden = outputs
        source.release(index, keep=False)
    tokens = torch.tensor([float(inputs.tokens)], dtype=torch.float64)
    all_reduce_(scores), all_reduce_(tokens)  # under torchrun: every rank's share of the batches
    return scores / tokens


def prune_sequential(model: nn.Module, inputs: LayerInputs | None, source: LayerSource, plan: Any,
                     dropped: list[int], options: LayerOptions, taylor: CalibStats | None,
                     times: SequentialTimes) -> RefitLog:
    """Prune every kept layer in order, each measured on its pruned predecessors' outputs (in place).

    inputs: layer 0's calibration inputs (None when no criterion, refit or bias reads activations);
    plan: the oneshot.PrunePlan (ffn_width, kv_groups); dropped: layers skipped here (identity, as after
    their removal) and removed by the caller; taylor: whole-model |w*g| sums when the criterion is taylor
    (a gradient needs the whole network, so those scores come from one backward on the unpruned model).
    Every kept layer is fetched and released once, so an offloaded model ends with all of them loaded.
    """
    log = RefitLog()
    view = None
    for index in tqdm(range(len(decoder_layers(model))), desc="sequential prune", unit="layer"):
        if index in dropped:
            continue
        layer = source.fetch(index)
        view = LayerView(model, layer)
        if plan.prunes_heads:
            stats = _layer_taylor(taylor, index)
            if inputs is not None:
                stats.attn_inputs = [_measure(layer, layer.self_attn.o_proj, inputs, options.reconstruct, times)[0]]
            prune_layer_heads_(view, stats, plan.kv_groups, options, log)
        if plan.prunes_ffn:
            stats = _layer_taylor(taylor, index)
            down = layer.mlp.down_proj
            outputs, down_inputs = [], []
            if inputs is not None:  # measured after this layer's heads were pruned
                acc, outputs, down_inputs = _measure(layer, down, inputs, options.reconstruct, times, keep=True)
                stats.ffn_inputs = [acc]
            old_weight, old_bias = down.weight, down.bias  # surgery replaces the parameters, these stay
            kept = prune_layer_ffn_(view, stats, plan.ffn_width, options, log)
            if inputs is not None:
                inputs.hidden = _patched_outputs(outputs, down_inputs, down, old_weight, old_bias,
                                                 layer.mlp.down_proj, kept, times)
                del outputs, down_inputs
        elif inputs is not None:
            inputs.hidden = _run(layer, inputs, times)
        source.release(index, keep=True)
    if view is not None and (plan.prunes_heads or plan.prunes_ffn):
        commit_config_(model, view)
    return log


def _layer_taylor(taylor: CalibStats | None, index: int) -> CalibStats:
    if taylor is None or not taylor.taylor_ffn:
        return CalibStats()
    return CalibStats(taylor_ffn=[taylor.taylor_ffn[index]], taylor_groups=[taylor.taylor_groups[index]])

