"""Random unstructured pruning: the floor any magnitude criterion has to beat.

Formulas: docs/algorithms.md, "Random pruning baseline".

The README's "Adding a pruning method" walks through this file: a config, a plan check, a hook, and
one line in `lmprune.pruning.METHODS`. Each prunable weight gets a fixed random score (seeded,
regenerated at every update, so nothing is stored); masks prune the lowest scores on GMP's cubic
schedule, are monotone (scores never change, so each mask contains the next) and are enforced like
GMP's: no gradient, no AdamW moments, re-zeroed after every step.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from lmprune.errors import UserError
from lmprune.sharding import is_sharded, local, row_range
from lmprune.pruning.hooks import StepEvents
from lmprune.pruning.sparse.masks import (
    DEFAULT_PATTERNS,
    check_patterns,
    check_state_method,
    checked_masks,
    magnitude_keep_masks,
    masks_from_state,
    masks_to_state,
    prunable_parameters,
    zero_fraction,
    zero_pruned_grads_,
    zero_pruned_moments_,
    zero_pruned_params_,
)
from lmprune.schedules import cubic_ramp


class RandomPruneConfig(BaseModel):
    """Random unstructured pruning on a cubic schedule (a baseline)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    s_f: float = 0.5
    """Final sparsity, reached at step t0 + n*dt, in (0, 1)."""
    t0: int = 0
    """Step of the first mask update."""
    n: int = 10
    """Number of pruning intervals: masks update at t0, t0+dt, ..., t0+n*dt."""
    dt: int = 10
    """Steps between mask updates."""
    seed: int = 0
    """Seed of the random scores."""
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS))
    """Regexes (re.search) or globs (fnmatch) of prunable 2-D parameter names."""

    _patterns = field_validator("patterns")(check_patterns)

    @model_validator(mode="after")
    def _check(self) -> "RandomPruneConfig":
        if not 0.0 < self.s_f < 1.0:
            raise ValueError(f"random.s_f must be in (0, 1), got {self.s_f}")
        if self.t0 < 0 or self.n < 1 or self.dt < 1:
            raise ValueError(f"random needs t0 >= 0, n >= 1, dt >= 1, got t0={self.t0}, n={self.n}, dt={self.dt}")
        return self


def check_random_plan(cfg: RandomPruneConfig, total_steps: int) -> None:
    """The last mask update must be a step of the run."""
    if cfg.t0 + cfg.n * cfg.dt >= total_steps:
        raise UserError(f"random: the last mask update (t0 + n*dt = {cfg.t0 + cfg.n * cfg.dt}) must come "
                        f"before train.steps ({total_steps})")


class RandomPruner:
    """Random unstructured pruning as a training hook."""

    def __init__(self, cfg: RandomPruneConfig) -> None:
        self.cfg = cfg
        self.export_patterns = tuple(cfg.patterns)
        self._params: dict[str, nn.Parameter] = {}
        self._keep: dict[str, Tensor] | None = None
        self._last_step = -1

    def _scores(self) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.cfg.seed)
        scores = {}
        for name, p in self._params.items():
            start, stop = row_range(p)  # under FSDP: this rank's rows of the one seeded draw
            scores[name] = torch.rand(p.shape, generator=generator)[start:stop].to(local(p).device)
        return scores

    def _sparsity_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.t0:
            return 0.0
        last_update = cfg.t0 + min((step - cfg.t0) // cfg.dt, cfg.n) * cfg.dt
        return cubic_ramp(last_update, cfg.t0, cfg.n * cfg.dt, 0.0, cfg.s_f)

    def apply(self, model: nn.Module) -> None:
        self._params = prunable_parameters(model, self.cfg.patterns)
        if self._keep is not None:
            self._keep = checked_masks(self._params, self._keep)
            zero_pruned_params_(self._params, self._keep)

    def after_backward(self, model: nn.Module, step: int) -> None:
        self._last_step = step
        if self._keep is not None:
            zero_pruned_grads_(self._params, self._keep)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> StepEvents:
        cfg = self.cfg
        updated = cfg.t0 <= step <= cfg.t0 + cfg.n * cfg.dt and (step - cfg.t0) % cfg.dt == 0
        if updated:
            sharded = any(is_sharded(p) for p in self._params.values())
            self._keep, _ = magnitude_keep_masks(self._scores(), self._sparsity_at(step), "global", self._keep,
                                                 sharded=sharded)
            zero_pruned_moments_(optimizer, self._params, self._keep)
        if self._keep is not None:
            zero_pruned_params_(self._params, self._keep)
        return StepEvents(mask_updated=updated)

    def state_dict(self) -> dict[str, Any]:
        return {"method": "random", "last_step": self._last_step, **masks_to_state(self._keep, self._params)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_method(state, "random")
        self._last_step = int(state["last_step"])
        self._keep = masks_from_state(state)
        if self._keep is not None and self._params:
            self._keep = checked_masks(self._params, self._keep)

    def metrics(self) -> dict[str, float]:
        return {"sparsity": zero_fraction(self._params), "target_sparsity": self._sparsity_at(max(self._last_step, 0))}
