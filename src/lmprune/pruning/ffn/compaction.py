"""Compaction: slice a SwiGLU FFN to its kept neurons, in place, and carry the AdamW state over.

Formulas: docs/algorithms.md, "IDEA Prune".

A neuron j is row j of gate_proj and up_proj (and their biases) and column j of down_proj. After
`compact_ffn` the model is a plain smaller HF model (`config.intermediate_size` updated); with an
optimizer, a new one is built on the new parameters holding the old moments sliced the same way, so
training continues as if the pruned neurons had never existed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lmprune.errors import UserError
from lmprune.pruning.surgery import decoder_layers, prune_ffn_

__all__ = ["MakeOptimizer", "compact_ffn", "ffn_blocks", "neuron_params", "prepare_model_for_resume"]

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


def ffn_blocks(model: nn.Module) -> list[nn.Module]:
    """The SwiGLU blocks (`mlp` with gate_proj/up_proj/down_proj) of a Llama-family causal LM, in layer order."""
    return [layer.mlp for layer in decoder_layers(model)]


def neuron_params(block: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """(parameter, axis of the neurons) of every tensor a neuron owns; down_proj's bias is per output: not."""
    out = []
    for linear, axis in ((block.gate_proj, 0), (block.up_proj, 0), (block.down_proj, 1)):
        out.append((linear.weight, axis))
        if axis == 0 and linear.bias is not None:
            out.append((linear.bias, 0))
    return out


def compact_ffn(model: nn.Module, keep_masks: Sequence[Tensor] | Tensor,
                optimizer: torch.optim.Optimizer | None = None,
                make_optimizer: MakeOptimizer | None = None) -> torch.optim.Optimizer | None:
    """Slice every layer's FFN to its kept neurons (bool masks [W], one per layer) and set
    `config.intermediate_size`, in place.

    With `optimizer`, returns a new one from `make_optimizer(model)` holding the old optimizer's state:
    moments (`exp_avg`, `exp_avg_sq`, ...) sliced like their parameters, `step` kept, and every param
    group's hyper-parameters (lr, weight_decay, ...) copied. Returns None without an optimizer.
    UserError if the layers keep different widths (HF configs hold one intermediate_size).
    """
    blocks = ffn_blocks(model)
    masks = [mask.to(torch.bool) for mask in keep_masks]
    if len(masks) != len(blocks):
        raise ValueError(f"compact_ffn: {len(masks)} masks for {len(blocks)} layers")
    widths = [int(mask.sum()) for mask in masks]
    if len(set(widths)) != 1:
        raise UserError(f"cannot compact FFN layers to different widths {widths}: the model config holds one "
                        "intermediate_size, so non-uniform widths (from ranking: global) cannot be exported; "
                        "use ranking: per_layer, or compact: false to keep the masked dense model")
    if optimizer is not None and make_optimizer is None:
        raise ValueError("compact_ffn: an optimizer to carry over needs make_optimizer to rebuild it")
    keep_indices = [mask.nonzero().squeeze(1) for mask in masks]
    old_params = [neuron_params(block) for block in blocks]
    prune_ffn_(model, keep_indices)
    if optimizer is None:
        return None
    sliced: dict[Tensor, tuple[Tensor, int, Tensor]] = {}  # new param -> (old param, axis, kept indices)
    for block, old, keep in zip(blocks, old_params, keep_indices):
        for (old_param, axis), (new_param, _) in zip(old, neuron_params(block), strict=True):
            sliced[new_param] = (old_param, axis, keep.to(old_param.device))
    new_optimizer = make_optimizer(model)
    _carry_optimizer_state(optimizer, new_optimizer, sliced)
    return new_optimizer


def _carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer,
                           sliced: dict[Tensor, tuple[Tensor, int, Tensor]]) -> None:
    if len(old.param_groups) != len(new.param_groups):
        raise ValueError("make_optimizer built a different number of param groups than the old optimizer")
    for old_group, new_group in zip(old.param_groups, new.param_groups):
        if len(old_group["params"]) != len(new_group["params"]):
            raise ValueError("make_optimizer grouped the parameters differently from the old optimizer")
        new_group.update({key: value for key, value in old_group.items() if key != "params"})
        for param in new_group["params"]:
            old_param, axis, keep = sliced.get(param, (param, None, None))
            state = old.state.get(old_param)
            if not state:
                continue
            new.state[param] = {
                # Tensors shaped like the parameter (moments) follow its slicing; `step` etc. are kept.
                key: value.index_select(axis, keep)
                if axis is not None and torch.is_tensor(value) and value.shape == old_param.shape else value
                for key, value in state.items()
            }


def prepare_model_for_resume(model: nn.Module, state: dict[str, Any]) -> None:
    """Compact a freshly built dense model the way a saved pruner state says the run was (no-op otherwise).

    Call before loading the checkpoint's weights and building the optimizer.
    """
    if not state.get("compacted"):
        return
    keep_mask = state["keep_mask"].to(torch.bool)
    widths = [block.gate_proj.out_features for block in ffn_blocks(model)]
    kept = keep_mask.sum(1).tolist()
    if widths == kept:
        return
    if widths != [keep_mask.shape[1]] * len(widths):
        raise UserError(f"model FFN widths {widths} match neither the checkpoint's original width "
                        f"{keep_mask.shape[1]} nor its pruned widths {kept}")
    compact_ffn(model, keep_mask)
