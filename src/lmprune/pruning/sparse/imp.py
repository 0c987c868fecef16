"""Iterative magnitude pruning with fine-tuning between rounds, as a training-time method.

Config and pruner in one place. Formulas: docs/algorithms.md, "Iterative magnitude pruning".

Round r (0-based) starts at step r * k: the weights are pruned by magnitude to levels[r] (masks are
monotone: pruned weights stay pruned), then the model is fine-tuned for k steps with the pruned
weights held at exactly zero, and evaluated at the end of the round. `lmprune train` runs all rounds
in its one loop, with checkpoints and exact resume like any other run; the evaluations before
training and after every round are entries of the run's plan (`imp_eval_steps`), so metrics.jsonl
holds the perplexity-vs-sparsity curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from lmprune.errors import UserError
from lmprune.pruning.hooks import StepEvents
from lmprune.pruning.sparse.masks import (
    DEFAULT_PATTERNS,
    Scope,
    check_patterns,
    checked_masks,
    masks_to_state,
    magnitude_keep_masks,
    prunable_parameters,
    zero_fraction,
    zero_pruned_grads_,
    zero_pruned_moments_,
    zero_pruned_params_,
)


class IMPConfig(BaseModel):
    """Iterative magnitude pruning: rounds of {prune by magnitude, fine-tune k steps, evaluate}."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    levels: list[float] | None = None
    """Target sparsity after each round, strictly increasing in [0, 1); default [0.1, 0.2, 0.3, 0.4, 0.5]."""
    fraction_of_remaining: float | None = None
    """Instead of levels: prune this fraction of the remaining weights each round (needs rounds)."""
    rounds: int | None = None
    """Number of rounds with fraction_of_remaining."""
    steps_per_round: int = 100
    """Fine-tuning steps k after each pruning round."""
    scope: Scope = "global"
    """Threshold over all prunable matrices (global) or per matrix (per_layer)."""
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS))
    """Regexes (re.search) or globs (fnmatch) of prunable 2-D parameter names."""

    _patterns = field_validator("patterns")(check_patterns)

    @model_validator(mode="after")
    def _check(self) -> "IMPConfig":
        by_fraction = self.fraction_of_remaining is not None or self.rounds is not None
        if self.levels is not None and by_fraction:
            raise ValueError("imp: give either levels or fraction_of_remaining + rounds, not both")
        if by_fraction:
            if self.fraction_of_remaining is None or self.rounds is None:
                raise ValueError("imp.fraction_of_remaining and imp.rounds must be given together")
            if not 0.0 < self.fraction_of_remaining < 1.0:
                raise ValueError(f"imp.fraction_of_remaining must be in (0, 1), got {self.fraction_of_remaining}")
            if self.rounds < 1:
                raise ValueError(f"imp.rounds must be >= 1, got {self.rounds}")
        if self.levels is not None:
            if not self.levels or any(not 0.0 <= s < 1.0 for s in self.levels):
                raise ValueError(f"imp.levels must be a non-empty list of sparsities in [0, 1), got {self.levels}")
            if any(b <= a for a, b in zip(self.levels, self.levels[1:])):
                raise ValueError(f"imp.levels must be strictly increasing, got {self.levels}")
        if self.steps_per_round < 0:
            raise ValueError(f"imp.steps_per_round must be >= 0, got {self.steps_per_round}")
        return self

    def sparsity_levels(self) -> list[float]:
        """Target sparsity after each round: levels, or 1 - (1 - p)^r for r = 1..rounds."""
        if self.fraction_of_remaining is not None and self.rounds is not None:
            return [1.0 - (1.0 - self.fraction_of_remaining) ** r for r in range(1, self.rounds + 1)]
        return list(self.levels) if self.levels is not None else [0.1, 0.2, 0.3, 0.4, 0.5]


def check_imp_plan(cfg: IMPConfig, total_steps: int) -> None:
    """train.steps must be exactly rounds x steps_per_round (UserError otherwise)."""
    needed = len(cfg.sparsity_levels()) * cfg.steps_per_round
    if cfg.steps_per_round < 1 or needed != total_steps:
        raise UserError(f"imp: train.steps must be rounds x steps_per_round = {needed} (got {total_steps}), "
                        "steps_per_round >= 1")


def imp_eval_steps(cfg: IMPConfig, total_steps: int) -> frozenset[int]:
    """Completed-step counts after which the plan evaluates: 0 (the dense start) and every round's end."""
    return frozenset(range(0, total_steps + 1, cfg.steps_per_round))


def write_imp_report(out_dir: Path) -> None:
    """OUT/sparsity.md and OUT/ppl_vs_sparsity.png: the per-round rows of metrics.jsonl."""
    from lmprune.report import write_sparsity_curve  # matplotlib: only when a run ends

    write_sparsity_curve(out_dir)


class IMPPruner:
    """Rounds of {prune to the next level by magnitude, fine-tune k steps}; evaluation is in the plan."""

    def __init__(self, cfg: IMPConfig) -> None:
        self.cfg = cfg
        self.export_patterns = tuple(cfg.patterns)
        self.levels = cfg.sparsity_levels()
        self._params: dict[str, nn.Parameter] = {}
        self._keep: dict[str, Tensor] | None = None
        self._round = -1  # index of the last round that pruned
        self._pruned_this_step = False

    def apply(self, model: nn.Module) -> None:
        self._params = prunable_parameters(model, self.cfg.patterns)
        if self._keep is not None:
            self._keep = checked_masks(self._params, self._keep)

    def after_backward(self, model: nn.Module, step: int) -> None:
        """At a round's first step prune (the weights as the previous round left them); mask gradients."""
        k = self.cfg.steps_per_round
        # the first step of a round that reaches here prunes (a skipped non-finite step defers it)
        self._pruned_this_step = self._round < step // k < len(self.levels)
        if self._pruned_this_step:
            self._round = step // k
            weights = {name: p.detach() for name, p in self._params.items()}
            self._keep, _ = magnitude_keep_masks(weights, self.levels[self._round], self.cfg.scope,
                                                 previous_keep=self._keep)
            zero_pruned_params_(self._params, self._keep)
        if self._keep is not None:
            zero_pruned_grads_(self._params, self._keep)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> StepEvents:
        if self._keep is not None:
            zero_pruned_moments_(optimizer, self._params, self._keep)
            zero_pruned_params_(self._params, self._keep)
        pruned, self._pruned_this_step = self._pruned_this_step, False
        return StepEvents(mask_updated=pruned)

    def state_dict(self) -> dict[str, Any]:
        return {"method": "imp", "round": self._round, **masks_to_state(self._keep, self._params)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != "imp":
            raise UserError(f"pruning state is for method {state.get('method')!r}, not 'imp'")
        self._round = int(state["round"])
        masks = {key.removeprefix("keep_mask."): value.bool() for key, value in state.items()
                 if key.startswith("keep_mask.")}
        self._keep = masks or None
        if self._keep is not None and self._params:
            self._keep = checked_masks(self._params, self._keep)

    def metrics(self) -> dict[str, Any]:
        level = self.levels[self._round] if self._round >= 0 else 0.0
        return {"sparsity": zero_fraction(self._params), "target_sparsity": level, "round": self._round + 1}
