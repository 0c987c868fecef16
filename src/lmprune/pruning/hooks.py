"""The contract between the training loop and a pruning method (or any model-changing component).

A method is a plain object the loop calls at fixed, named points of every step (see `train_step`):

    forward + backward (all micro-batches)
    hook.after_backward(model, step)        gradients present (all-reduced under DDP), before clipping
    clip_grad_norm_                          the loss gradient only
    hook.after_clip(model, step)            a RegularizingHook adds its gradient here, never clipped
    optimizer.step(), zero_grad
    events = hook.after_optimizer_step(model, optimizer, step)
    if events.compact:
        optimizer = hook.compact(model, optimizer)   # then the loop rebuilds DDP / compile / FLOP counts
    hook.metrics()                          on logged steps only

`after_optimizer_step` reports what happened as `StepEvents`; it never swaps the optimizer itself
and `metrics()` carries values, not control flags. When to evaluate is part of the run's plan
(`Method.eval_steps`), not a hook's business. State round-trips through `state_dict()` /
`load_state_dict()` (tensors and JSON values) inside every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class StepEvents:
    """What a method did in one step, as the loop needs to know it."""

    mask_updated: bool = False
    """Masks changed this step (the loop logs a metrics row for it)."""
    compact: bool = False
    """The model must be physically shrunk now: the loop calls `hook.compact(model, optimizer)` once."""


NO_EVENTS = StepEvents()


@runtime_checkable
class TrainingHook(Protocol):
    """What a training-time method provides to the loop."""

    export_patterns: tuple[str, ...] | None
    """Regexes/globs of the weights the method prunes (sparsity summary and sparse export); None =
    the default attention + FFN projections."""

    def apply(self, model: nn.Module) -> None:
        """Bind to the model before the first step (and after a checkpoint's weights are loaded)."""

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Gradients are present; before clipping. Regularisers add to `grad` here."""

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> StepEvents:
        """Weights were updated: update and enforce masks; report what happened."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: tensors or JSON values."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; may be called before or after `apply`."""

    def metrics(self) -> dict[str, Any]:
        """Values for the metrics row of a logged step (never control flags)."""


class CompactingHook(TrainingHook, Protocol):
    """A method that shrinks the model during the run (sets `StepEvents.compact`)."""

    def compact(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Slice the model (and the optimizer state) in place; return the optimizer of the new parameters."""


@runtime_checkable
class RegularizingHook(TrainingHook, Protocol):
    """A method that adds a regulariser's gradient (e.g. MGPP's prior) to `grad`.

    It is added after clipping: clip_grad_norm_ sees the loss gradient alone, so the clip threshold
    keeps its meaning (the loss scale) and a strong regulariser cannot scale the loss gradient down
    to nothing; the logged `grad_norm` is the loss gradient's norm. The method reports its own
    gradient's norm in `metrics()` (e.g. `prior_grad_norm`).
    """

    def after_clip(self, model: nn.Module, step: int) -> None:
        """Add the regulariser's gradient to the (clipped) loss gradient."""
