"""Iterative magnitude pruning with fine-tuning (DESIGN.md S4) as a training hook.

Round r (0-based) starts at step r * k: the weights are pruned by magnitude to levels[r] (masks are
monotone: pruned weights stay pruned), then the model is fine-tuned for k steps with the pruned
weights held at exactly zero, and evaluated at the end of the round. So `lmprune train` runs all
rounds in its one loop, with checkpoints and exact resume like any other run, and metrics.jsonl
gets one val row per round: the perplexity-vs-sparsity curve.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmprune.pruning.unstructured import (IMPConfig, apply_masks_, magnitude_keep_masks, mask_grads_,
                                          mask_optimizer_state_, prunable_parameters, zero_fraction)


class IMPPruner:
    """Rounds of {prune to the next level by magnitude, fine-tune k steps, evaluate}."""

    evaluate_before_training = True  # the dense starting point is the curve's first row

    def __init__(self, cfg: IMPConfig) -> None:
        self.cfg = cfg
        self.levels = cfg.sparsity_levels()
        self._params: dict[str, nn.Parameter] = {}
        self._keep: dict[str, Tensor] | None = None
        self._round = -1  # index of the last round that pruned
        self._flags: dict[str, bool] = {}

    @property
    def total_steps(self) -> int:
        return len(self.levels) * self.cfg.steps_per_round

    def apply(self, model: nn.Module) -> None:
        self._params = prunable_parameters(model, self.cfg.patterns)

    def after_backward(self, model: nn.Module, step: int) -> None:
        self._flags = {}
        k = self.cfg.steps_per_round
        if step % k == 0 and step // k < len(self.levels) and step // k > self._round:
            self._round = step // k
            # prune the weights as they are after the previous round's fine-tuning
            weights = {name: p.detach() for name, p in self._params.items()}
            self._keep, _ = magnitude_keep_masks(weights, self.levels[self._round], self.cfg.scope,
                                                 previous_keep=self._keep)
            apply_masks_(model, self._keep)
            self._flags["mask_update"] = True
        if self._keep is not None:
            mask_grads_(model, self._keep)
        if (step + 1) % k == 0:
            self._flags["evaluate"] = True  # end of a round

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             step: int) -> torch.optim.Optimizer:
        if self._keep is not None:
            mask_optimizer_state_(model, optimizer, self._keep)
            apply_masks_(model, self._keep)
        return optimizer

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"method": "imp", "round": self._round}
        for name, keep in (self._keep or {}).items():
            state[f"keep_mask.{name}"] = keep.cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != "imp":
            raise ValueError(f"not an IMP state (method {state.get('method')!r})")
        self._round = int(state["round"])
        masks = {key.removeprefix("keep_mask."): value.bool() for key, value in state.items()
                 if key.startswith("keep_mask.")}
        self._keep = masks or None

    def metrics(self) -> dict[str, Any]:
        level = self.levels[self._round] if self._round >= 0 else 0.0
        return {"sparsity": zero_fraction(self._params), "target_sparsity": level,
                "round": self._round + 1, **self._flags}
