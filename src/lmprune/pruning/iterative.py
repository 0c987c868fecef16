"""Iterative magnitude pruning with fine-tuning (DESIGN.md S4) as a training hook.

Round r (0-based) starts at step r * k: the weights are pruned by magnitude to levels[r] (masks are
monotone: pruned weights stay pruned), then the model is fine-tuned for k steps with the pruned
weights held at exactly zero, and evaluated at the end of the round. So `lmprune train` runs all
rounds in its one loop, with checkpoints and exact resume like any other run, and metrics.jsonl
gets one val row per round: the perplexity-vs-sparsity curve. `iterative_magnitude_prune` is the same
procedure as a plain function around a caller's own fine-tune and evaluate callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lmprune.pruning.masks import (
    apply_masks_,
    magnitude_keep_masks,
    mask_grads_,
    mask_optimizer_state_,
    prunable_parameters,
    zero_fraction,
    zero_pruned_params_,
)
from lmprune.pruning.unstructured_config import IMPConfig

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


# ----------------------------------------------------------------------------- iterative magnitude pruning

FinetuneFn = Callable[[nn.Module, dict[str, Tensor], int], None]


def iterative_magnitude_prune(model: nn.Module, cfg: IMPConfig, finetune: FinetuneFn,
                              evaluate: Callable[[nn.Module], dict]) -> list[dict]:
    """Rounds of {prune to the next level by magnitude, finetune(model, masks, k), evaluate(model)}.

    Row 0 evaluates the model before pruning; row r the model after round r. Masks are monotone
    (pruned weights stay pruned even if a fine-tune let them move) and each round prunes exactly
    round(level * N) weights. `finetune` must keep masked weights at zero, e.g. by training with
    `MaskedWeights(masks)` or calling `mask_grads_` / `apply_masks_`; `exact_sparsity` is measured
    after it returns, so a leak shows up there. Returns one dict per row: round, target_sparsity,
    exact_sparsity, then the keys of `evaluate`'s dict.
    """
    params = prunable_parameters(model, cfg.patterns)

    def row(round_index: int, target: float) -> dict:
        measured = {"round": round_index, "target_sparsity": target, "exact_sparsity": zero_fraction(params)}
        return measured | {key: value for key, value in evaluate(model).items() if key not in measured}

    rows = [row(0, 0.0)]
    keep: dict[str, Tensor] | None = None
    for round_index, level in enumerate(cfg.sparsity_levels(), start=1):
        keep, _ = magnitude_keep_masks(params, level, cfg.scope, previous_keep=keep)
        zero_pruned_params_(params, keep)
        finetune(model, {name: m.clone() for name, m in keep.items()}, cfg.steps_per_round)
        rows.append(row(round_index, level))
    return rows
