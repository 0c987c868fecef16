"""The optimizer: AdamW with weight decay on matrices only.

Formulas: docs/algorithms.md, "Optimizer".
"""

from __future__ import annotations

import torch
from torch import nn

from lmprune.config import TrainConfig


def build_optimizer(model: nn.Module, train_cfg: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; group 0 = matrices (decayed), group 1 = 1-D (not).

    Parameters are taken in `named_parameters()` order, so a rebuilt optimizer (after
    compaction) lists them in the same order as the original. `fused` (default: the parameters are
    on CUDA) picks the fused kernel: one launch per step instead of a dozen foreach passes, and a
    `found_inf` input that skips a non-finite step on the device (lmprune.step). On CPU the default
    stays the foreach kernel, so CPU runs are bit-identical to earlier versions.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fused is None:
        fused = any(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                             eps=train_cfg.eps, **({"fused": True} if fused else {}))


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours `optimizer.found_inf` (skips the update on the device when it is 1)."""
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
