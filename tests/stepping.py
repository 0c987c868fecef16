"""Tests drive pruning methods through the trainer's own step (`lmprune.step.train_step`).

`step_runner` wraps a model, a hook and a fixed list of token batches into the trainer's Trainer and
TrainState, so a test runs exactly the call order `lmprune train` runs (never a hand-written copy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lmprune.config import TrainConfig
from lmprune.pipelines import Plan
from lmprune.step import StepOutput, Trainer, TrainState, train_step


class ListLoader:
    """Token batches [B, T+1] served in order by position (x = all but the last token, y = shifted)."""

    def __init__(self, batches: Sequence[torch.Tensor], position: int = 0):
        self.batches, self.position = list(batches), position

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.batches[self.position]
        self.position += 1
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def step_runner(model: nn.Module, hook, batches: Sequence[torch.Tensor],
                optimizer: torch.optim.Optimizer | None = None,
                make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
                first_step: int = 0, lr: float = 1e-2, total_steps: int = 100, grad_clip: float = 1.0,
                ) -> tuple[Trainer, TrainState]:
    """(trainer, state) at `first_step`: fp32, warmup 0, cosine from `lr` to 0 over `total_steps`."""
    tcfg = TrainConfig(steps=total_steps, warmup=0, lr=lr, lr_end=0.0, grad_clip=grad_clip, dtype="fp32",
                       batch_size=int(batches[0].shape[0]), seq_len=int(batches[0].shape[1]) - 1)
    if optimizer is None:
        optimizer = make_optimizer(model) if make_optimizer else torch.optim.AdamW(model.parameters(), lr=lr)
    width = getattr(model.config, "intermediate_size", 0) if hasattr(model, "config") else 0
    plan = Plan(width, width, ((0, total_steps),), None, None, None)
    loader = ListLoader(batches, first_step)
    trainer = Trainer(tcfg, plan, model, optimizer, loader, torch.device("cpu"), hook=hook)
    return trainer, TrainState(loader, step=first_step)


def run_steps(trainer: Trainer, state: TrainState, count: int,
              on_step: Callable[[int, StepOutput], None] | None = None) -> list[StepOutput]:
    """`count` train_steps; on_step(step index, output) after each."""
    outputs = []
    for _ in range(count):
        step = state.step
        out = train_step(trainer, state)
        outputs.append(out)
        if on_step is not None:
            on_step(step, out)
    return outputs
