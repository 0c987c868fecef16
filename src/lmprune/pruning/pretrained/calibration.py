"""Calibration statistics and the one-shot structured criteria computed from them.

Formulas: docs/algorithms.md, "One-shot pruning of pretrained models".

`collect_stats` makes one pass over calibration batches and keeps per-channel statistics only (sums
at the down_proj / o_proj inputs, |w * grad| per FFN neuron and GQA group, block dissimilarity), so
memory is bounded by channels and layers, never by tokens. Each criterion maps (model, stats) to one
score tensor per decoder layer (higher = more important): `FFN_CRITERIA` scores FFN neurons,
`HEAD_CRITERIA` whole GQA groups; `CRITERION_NEEDS` says which statistics each one reads.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lmprune.errors import UserError
from lmprune.pruning.surgery import attention_shape, decoder_layers
from lmprune.sharding import sum_over_ranks

__all__ = [
    "CRITERION_NEEDS", "FFN_CRITERIA", "HEAD_CRITERIA", "STAT_KINDS", "CalibStats", "ChannelStats", "collect_stats",
]

STAT_KINDS = ("activations", "gram", "taylor", "blocks")


# ---------------------------------------------------------------- calibration statistics


def _accumulator(size: int, device: torch.device) -> torch.Tensor:
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    return torch.zeros(size, dtype=dtype, device=device)


@dataclass
class ChannelStats:
    """Per-input-channel sums at one Linear's input (down_proj or o_proj) over all calibration tokens.

    `gram` (only when the refit needs it) is sum_t x_t x_t^T, [C, C]: the reconstruction's G.
    """

    sum: torch.Tensor  # [C] sum_t x_tc
    sq_sum: torch.Tensor  # [C] sum_t x_tc^2
    seq_mean_sq: torch.Tensor  # [C] sum_b (mean_t |x_btc|)^2  (Minitron: mean over sequence, L2 over batch)
    tokens: int = 0
    gram: torch.Tensor | None = None  # [C, C] sum_t x_t x_t^T, or None
    gram_seconds: float = 0.0  # wall time spent accumulating gram (part of the refit's cost)

    @classmethod
    def zeros(cls, channels: int, device: torch.device, gram: bool = False) -> ChannelStats:
        sums = (_accumulator(channels, device) for _ in range(3))
        return cls(*sums, gram=_accumulator(channels * channels, device).view(channels, channels) if gram else None)

    def update(self, x: torch.Tensor) -> None:
        """Add one batch x [B, T, C]. The one place calibration statistics are accumulated."""
        x = x.detach().float()  # [B, T, C]
        self.sum += x.sum(dim=(0, 1))
        self.sq_sum += x.square().sum(dim=(0, 1))
        self.seq_mean_sq += x.abs().mean(dim=1).square().sum(dim=0)
        self.tokens += x.shape[0] * x.shape[1]
        if self.gram is not None:
            t0 = time.perf_counter()
            flat = x.reshape(-1, x.shape[-1])  # [B*T, C]
            self.gram += (flat.T @ flat).to(self.gram.dtype)  # one batch's product in fp32, summed in fp64
            if flat.is_cuda:
                torch.cuda.synchronize(flat.device)
            self.gram_seconds += time.perf_counter() - t0

    def mean(self) -> torch.Tensor:
        return self.sum / self.tokens

    def variance(self) -> torch.Tensor:
        return (self.sq_sum / self.tokens - self.mean().square()).clamp_min(0.0)

    def l2(self) -> torch.Tensor:
        """||X_c||_2 over all calibration tokens."""
        return self.sq_sum.sqrt()

    def sequence_activation(self) -> torch.Tensor:
        """Minitron activation score: |x| averaged over each sequence, then L2 over sequences."""
        return self.seq_mean_sq.sqrt()


@dataclass
class CalibStats:
    """Everything the criteria read; sized by channels and layers, never by tokens."""

    ffn_inputs: list[ChannelStats] = field(default_factory=list)  # per layer, down_proj input [inter]
    attn_inputs: list[ChannelStats] = field(default_factory=list)  # per layer, o_proj input [heads * head_dim]
    block_dissimilarity: torch.Tensor | None = None  # [L] sum over tokens of 1 - cos(x_in, x_out)
    block_tokens: int = 0
    taylor_ffn: list[torch.Tensor] = field(default_factory=list)  # per layer [inter]: sum |w*g| over the neuron
    taylor_groups: list[torch.Tensor] = field(default_factory=list)  # per layer [num_kv_heads]
    batches: int = 0
    tokens: int = 0

    def block_importance(self) -> torch.Tensor:
        """[L] mean over calibration tokens of 1 - cos(hidden in, hidden out) per decoder layer."""
        if self.block_dissimilarity is None:
            raise ValueError("block importance needs collect_stats(..., needs={'blocks'})")
        return (self.block_dissimilarity / max(self.block_tokens, 1)).cpu()


def _empty_stats(model: nn.Module, needs: Collection[str], device: torch.device) -> CalibStats:
    layers = decoder_layers(model)
    num_heads, num_kv_heads, head_dim = attention_shape(model)
    inter = model.config.intermediate_size
    stats = CalibStats()
    if "activations" in needs or "gram" in needs:
        gram = "gram" in needs
        stats.ffn_inputs = [ChannelStats.zeros(inter, device, gram) for _ in layers]
        stats.attn_inputs = [ChannelStats.zeros(num_heads * head_dim, device, gram) for _ in layers]
    if "blocks" in needs:
        stats.block_dissimilarity = _accumulator(len(layers), device)
    if "taylor" in needs:
        stats.taylor_ffn = [_accumulator(inter, device) for _ in layers]
        stats.taylor_groups = [_accumulator(num_kv_heads, device) for _ in layers]
    return stats


def _register_hooks(model: nn.Module, stats: CalibStats, needs: Collection[str]) -> list[Any]:
    handles = []

    def channel_hook(accumulator: ChannelStats) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            accumulator.update(args[0])

        return hook

    def block_hook(layer_index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]  # [B, T, H]
            x_out = output[0] if isinstance(output, tuple) else output  # [B, T, H]
            cos = F.cosine_similarity(x_in.detach().float(), x_out.detach().float(), dim=-1)  # [B, T]
            stats.block_dissimilarity[layer_index] += (1.0 - cos).sum()
            if layer_index == 0:
                stats.block_tokens += cos.numel()

        return hook

    for index, layer in enumerate(decoder_layers(model)):
        if "activations" in needs or "gram" in needs:
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(channel_hook(stats.ffn_inputs[index])))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(channel_hook(stats.attn_inputs[index])))
        if "blocks" in needs:
            handles.append(layer.register_forward_hook(block_hook(index), with_kwargs=True))
    return handles


def _accumulate_taylor(model: nn.Module, stats: CalibStats) -> None:
    """Add |w * dL/dw| of this batch, summed over each FFN neuron's and each GQA group's weights."""
    _, num_kv_heads, _ = attention_shape(model)

    def saliency(linear: nn.Linear) -> torch.Tensor:
        return (linear.weight.detach().float() * linear.weight.grad.float()).abs()

    for index, layer in enumerate(decoder_layers(model)):
        mlp, attn = layer.mlp, layer.self_attn
        neuron = saliency(mlp.gate_proj).sum(1) + saliency(mlp.up_proj).sum(1) + saliency(mlp.down_proj).sum(0)
        group = (
            saliency(attn.q_proj).sum(1).view(num_kv_heads, -1).sum(1)  # q rows of the group's heads
            + saliency(attn.k_proj).sum(1).view(num_kv_heads, -1).sum(1)
            + saliency(attn.v_proj).sum(1).view(num_kv_heads, -1).sum(1)
            + saliency(attn.o_proj).sum(0).view(num_kv_heads, -1).sum(1)  # o columns of the group's heads
        )
        stats.taylor_ffn[index] += neuron
        stats.taylor_groups[index] += group


def _checked_batch(batch: Any, vocab_size: int) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.is_floating_point():
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise UserError(f"calibration batches must be integer token-id tensors [B, T]; got {shape}")
    if batch.numel() == 0 or int(batch.min()) < 0 or int(batch.max()) >= vocab_size:
        raise UserError(f"calibration batch holds token ids outside [0, {vocab_size}) (or is empty)")
    return batch.long()


def _prunable_weights(model: nn.Module) -> list[nn.Parameter]:
    weights = []
    for layer in decoder_layers(model):
        mlp, attn = layer.mlp, layer.self_attn
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            weights.append(linear.weight)
    return weights


def collect_stats(model: nn.Module, calib_batches: Iterable[torch.Tensor], needs: Collection[str]) -> CalibStats:
    """One pass over `calib_batches` (LongTensor [B, T] each) accumulating per-channel statistics only.

    needs ⊆ STAT_KINDS: "activations" = sums at down_proj and o_proj inputs; "gram" = those and the
    Gram matrices sum x x^T there (the refit's G, [C, C] per layer);
    "taylor" = |w*g| per neuron / GQA group from backward of the LM loss, summed over batches (only
    the projection weights get gradients; `.grad` is cleared afterwards); "blocks" = 1 - cos of each
    decoder layer's hidden states in and out. Runs in eval mode and under no_grad unless "taylor";
    the model's training flag and requires_grad flags are restored.
    """
    unknown = set(needs) - set(STAT_KINDS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {STAT_KINDS}")
    device = next(model.parameters()).device
    stats = _empty_stats(model, needs, device)
    taylor = "taylor" in needs
    handles = _register_hooks(model, stats, needs)
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        if taylor:
            for p, _ in grad_flags:
                p.requires_grad_(False)
            for weight in _prunable_weights(model):
                weight.requires_grad_(True)
        for batch in tqdm(calib_batches, desc="calibration", unit="batch"):
            batch = _checked_batch(batch, model.config.vocab_size).to(device)
            if taylor:
                model.zero_grad(set_to_none=True)
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
                _accumulate_taylor(model, stats)
            else:
                with torch.no_grad():
                    model.model(input_ids=batch, use_cache=False)  # decoder only: no [B, T, vocab] logits
            stats.batches += 1
            stats.tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        if taylor:
            model.zero_grad(set_to_none=True)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    sum_over_ranks(stats)  # under torchrun each rank saw its share of the batches
    if stats.batches == 0:
        raise UserError("no calibration batches: the calibration set is empty")
    return stats


# ---------------------------------------------------------------- criteria (higher = more important)


def _require(values: Any, criterion: str, kind: str) -> None:
    if not values:
        raise ValueError(f"criterion {criterion!r} needs collect_stats(..., needs={{{kind!r}}})")


def _weights(layer: nn.Module, *names: str) -> list[torch.Tensor]:
    """float32 weights of named projections (gate/up/down_proj live in .mlp, q/k/v/o_proj in .self_attn)."""
    owners = [layer.mlp if name in ("gate_proj", "up_proj", "down_proj") else layer.self_attn for name in names]
    return [getattr(owner, name).weight.detach().float() for owner, name in zip(owners, names)]


def ffn_magnitude(model: nn.Module, stats: CalibStats | None) -> list[torch.Tensor]:
    """L2 norm over all weights of neuron j: sqrt(||gate[j,:]||^2 + ||up[j,:]||^2 + ||down[:,j]||^2)."""
    scores = []
    for layer in decoder_layers(model):
        gate, up, down = _weights(layer, "gate_proj", "up_proj", "down_proj")
        scores.append((gate.square().sum(1) + up.square().sum(1) + down.square().sum(0)).sqrt())
    return [s.double().cpu() for s in scores]


def ffn_taylor(model: nn.Module, stats: CalibStats) -> list[torch.Tensor]:
    """LLM-Pruner: sum of |w * dL/dw| over the neuron's gate row, up row and down column."""
    _require(stats.taylor_ffn, "taylor", "taylor")
    return [s.double().cpu() for s in stats.taylor_ffn]


def ffn_wanda_sp(model: nn.Module, stats: CalibStats) -> list[torch.Tensor]:
    """Wanda-sp: mean over down_proj output rows i of |W_ij| * ||X_j||_2 (X = down_proj input)."""
    _require(stats.ffn_inputs, "wanda-sp", "activations")
    scores = []
    for layer, acc in zip(decoder_layers(model), stats.ffn_inputs):
        (down,) = _weights(layer, "down_proj")
        scores.append(down.abs().mean(0).double() * acc.l2())
    return [s.cpu() for s in scores]


def ffn_activation(model: nn.Module, stats: CalibStats) -> list[torch.Tensor]:
    """Minitron: |activation| at the down_proj input, mean over sequence, then L2 over batch."""
    _require(stats.ffn_inputs, "activation", "activations")
    return [acc.sequence_activation().double().cpu() for acc in stats.ffn_inputs]


def ffn_flap(model: nn.Module, stats: CalibStats) -> list[torch.Tensor]:
    """FLAP fluctuation: Var(X_j) * ||W_down[:, j]||^2 (X = down_proj input)."""
    _require(stats.ffn_inputs, "flap", "activations")
    scores = []
    for layer, acc in zip(decoder_layers(model), stats.ffn_inputs):
        (down,) = _weights(layer, "down_proj")
        scores.append(acc.variance().double() * down.square().sum(0).double())
    return [s.cpu() for s in scores]


def _group_l2(channel_scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[heads * head_dim] o_proj-input channel scores -> [num_kv_heads]: L2 over each group's channels.

    A head's score is the L2 over its channels; a group's is the L2 over its heads' scores, which is
    the L2 over all its channels (a group's channels are contiguous, see surgery.kv_group_channels).
    """
    return channel_scores.view(num_kv_heads, -1).square().sum(1).sqrt()


def heads_magnitude(model: nn.Module, stats: CalibStats | None) -> list[torch.Tensor]:
    """L2 norm over all weights of a GQA group: its q rows, k/v rows and o_proj columns."""
    _, num_kv_heads, _ = attention_shape(model)
    scores = []
    for layer in decoder_layers(model):
        q, k, v, o = _weights(layer, "q_proj", "k_proj", "v_proj", "o_proj")
        per_group = sum(rows.view(num_kv_heads, -1).sum(1) for rows in (
            q.square().sum(1), k.square().sum(1), v.square().sum(1), o.square().sum(0)))
        scores.append(per_group.sqrt())
    return [s.double().cpu() for s in scores]


def heads_taylor(model: nn.Module, stats: CalibStats) -> list[torch.Tensor]:
    """LLM-Pruner: sum of |w * dL/dw| over the group's q, k, v rows and o_proj columns."""
    _require(stats.taylor_groups, "taylor", "taylor")
    return [s.double().cpu() for s in stats.taylor_groups]


def heads_wanda_sp(model: nn.Module, stats: CalibStats) -> list[torch.Tensor]:
    """Wanda-sp channel scores at the o_proj input (mean_i |W_ij| * ||X_j||_2), L2 over each group."""
    _require(stats.attn_inputs, "wanda-sp", "activations")
    _, num_kv_heads, _ = attention_shape(model)
    scores = []
    for layer, acc in zip(decoder_layers(model), stats.attn_inputs):
        (o,) = _weights(layer, "o_proj")
        scores.append(_group_l2(o.abs().mean(0).double() * acc.l2(), num_kv_heads))
    return [s.cpu() for s in scores]


def heads_activation(model: nn.Module, stats: CalibStats) -> list[torch.Tensor]:
    """Minitron activation of the o_proj-input channels, L2 over each group."""
    _require(stats.attn_inputs, "activation", "activations")
    _, num_kv_heads, _ = attention_shape(model)
    return [_group_l2(acc.sequence_activation().double(), num_kv_heads).cpu() for acc in stats.attn_inputs]


def heads_flap(model: nn.Module, stats: CalibStats) -> list[torch.Tensor]:
    """FLAP channel scores at the o_proj input (Var(X_j) * ||W_o[:, j]||^2), L2 over each group."""
    _require(stats.attn_inputs, "flap", "activations")
    _, num_kv_heads, _ = attention_shape(model)
    scores = []
    for layer, acc in zip(decoder_layers(model), stats.attn_inputs):
        (o,) = _weights(layer, "o_proj")
        scores.append(_group_l2(acc.variance().double() * o.square().sum(0).double(), num_kv_heads))
    return [s.cpu() for s in scores]


Criterion = Callable[[nn.Module, CalibStats], list[torch.Tensor]]
FFN_CRITERIA: dict[str, Criterion] = {
    "magnitude": ffn_magnitude,
    "taylor": ffn_taylor,
    "wanda-sp": ffn_wanda_sp,
    "activation": ffn_activation,
    "flap": ffn_flap,
}
HEAD_CRITERIA: dict[str, Criterion] = {
    "magnitude": heads_magnitude,
    "taylor": heads_taylor,
    "wanda-sp": heads_wanda_sp,
    "activation": heads_activation,
    "flap": heads_flap,
}
CRITERION_NEEDS: dict[str, frozenset[str]] = {
    "magnitude": frozenset(),
    "taylor": frozenset({"taylor"}),
    "wanda-sp": frozenset({"activations"}),
    "activation": frozenset({"activations"}),
    "flap": frozenset({"activations"}),
}
