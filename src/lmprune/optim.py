"""The optimizer: AdamW with weight decay on matrices only.

Formulas: docs/algorithms.md, "Optimizer".
"""

from __future__ import annotations

import torch
from torch import nn

from lmprune.config import TrainConfig


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; group 0 = matrices (decayed), group 1 = 1-D (not).

    Parameters are taken in `named_parameters()` order, so a rebuilt optimizer (after
    compaction) lists them in the same order as the original.
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
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                             eps=train_cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
