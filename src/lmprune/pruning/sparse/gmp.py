"""GMP (Zhu & Gupta): gradual magnitude pruning on a cubic schedule, as a training-time method.

Config, schedule and pruner in one place. Formulas: docs/algorithms.md, "GMP".

After the optimizer steps t0, t0+dt, ..., t0+n*dt the mask is updated to the cubic schedule's
sparsity; masks are monotone (pruned weights stay pruned). From the first update on, masked weights
get no updates: their gradients are zeroed after backward, their AdamW moments are zeroed at each
update and they are re-zeroed after every optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from lmprune.errors import UserError
from lmprune.pruning.hooks import StepEvents
from lmprune.pruning.sparse.masks import (
    DEFAULT_PATTERNS,
    Scope,
    check_nm,
    check_nm_shapes,
    check_patterns,
    check_sparsities,
    check_state_method,
    checked_masks,
    compute_keep_masks,
    masks_from_state,
    masks_to_state,
    parse_nm,
    prunable_parameters,
    zero_fraction,
    zero_pruned_grads_,
    zero_pruned_moments_,
    zero_pruned_params_,
)
from lmprune.schedules import cubic_ramp


class GMPConfig(BaseModel):
    """GMP (Zhu & Gupta): cubic schedule, masks updated every dt steps, masked weights frozen at zero."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    s_i: float = 0.0
    """Sparsity at the first mask update (step t0), in [0, 1)."""
    s_f: float = 0.5
    """Final sparsity, reached at step t0 + n*dt, in [0, 1)."""
    t0: int = 0
    """Step of the first mask update."""
    n: int = 10
    """Number of pruning intervals: masks update at t0, t0+dt, ..., t0+n*dt."""
    dt: int = 100
    """Steps between mask updates."""
    scope: Scope = "per_layer"
    """Threshold per matrix (per_layer, as Zhu & Gupta) or over all prunable matrices (global)."""
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS))
    """Regexes (re.search) or globs (fnmatch) of prunable 2-D parameter names."""
    nm: str | None = None
    """'N:M' semi-structured sparsity (keep N of every M consecutive inputs) instead of the threshold."""

    _patterns = field_validator("patterns")(check_patterns)
    _nm = field_validator("nm")(check_nm)

    @model_validator(mode="after")
    def _check(self) -> "GMPConfig":
        check_sparsities("gmp", self.s_i, self.s_f)
        if self.t0 < 0 or self.n < 1 or self.dt < 1:
            raise ValueError(f"gmp needs t0 >= 0, n >= 1, dt >= 1, got t0={self.t0}, n={self.n}, dt={self.dt}")
        if self.nm is not None and self.s_f == 0.0:
            raise ValueError("gmp.nm needs s_f > 0: the N:M mask applies once the scheduled sparsity is > 0")
        return self

    @property
    def end_step(self) -> int:
        """Step of the last mask update."""
        return self.t0 + self.n * self.dt


def check_gmp_plan(cfg: GMPConfig, total_steps: int) -> None:
    """The last mask update must be a step of the run (UserError otherwise)."""
    if cfg.end_step >= total_steps:
        raise UserError(f"gmp: the last mask update (t0 + n*dt = {cfg.end_step}) must come "
                        f"before train.steps ({total_steps})")


def gmp_is_update_step(step: int, cfg: GMPConfig) -> bool:
    """GMP masks update after the optimizer steps t0, t0 + dt, ..., t0 + n*dt."""
    return cfg.t0 <= step <= cfg.end_step and (step - cfg.t0) % cfg.dt == 0


def gmp_sparsity_at(step: int, cfg: GMPConfig) -> float:
    """Sparsity set by the last GMP mask update at or before `step` (0 before t0)."""
    if step < cfg.t0:
        return 0.0
    last_update = cfg.t0 + min((step - cfg.t0) // cfg.dt, cfg.n) * cfg.dt
    return cubic_ramp(last_update, cfg.t0, cfg.n * cfg.dt, cfg.s_i, cfg.s_f)


class GMPPruner:
    """GMP as a training hook."""

    def __init__(self, cfg: GMPConfig) -> None:
        self.cfg = cfg
        self.export_patterns = tuple(cfg.patterns)
        self._params: dict[str, nn.Parameter] = {}
        self._keep: dict[str, Tensor] | None = None
        self._threshold = 0.0
        self._last_step = -1

    def apply(self, model: nn.Module) -> None:
        """Find the prunable weights (UserError for patterns that match nothing); re-zero loaded masks."""
        self._params = prunable_parameters(model, self.cfg.patterns)
        if self.cfg.nm is not None:
            check_nm_shapes(self._params, parse_nm(self.cfg.nm)[1])
        if self._keep is not None:
            self._keep = checked_masks(self._params, self._keep)
            zero_pruned_params_(self._params, self._keep)

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Zero the gradients of pruned weights."""
        self._last_step = step
        if self._keep is not None:
            zero_pruned_grads_(self._params, self._keep)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> StepEvents:
        """Update the mask on schedule steps; keep pruned weights (and their moments) at zero."""
        self._last_step = step
        updated = gmp_is_update_step(step, self.cfg)
        if updated:
            self._keep, self._threshold = compute_keep_masks(
                self._params, gmp_sparsity_at(step, self.cfg), self.cfg.scope, self.cfg.nm, self._keep)
            zero_pruned_moments_(optimizer, self._params, self._keep)
        if self._keep is not None:
            zero_pruned_params_(self._params, self._keep)
        return StepEvents(mask_updated=updated)

    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors, CPU) + schedule position."""
        return {"method": "gmp", "threshold": self._threshold, "last_step": self._last_step,
                **masks_to_state(self._keep, self._params)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); call before or after apply()."""
        check_state_method(state, "gmp")
        self._threshold = float(state["threshold"])
        self._last_step = int(state["last_step"])
        self._keep = masks_from_state(state)
        if self._keep is not None and self._params:
            self._keep = checked_masks(self._params, self._keep)

    def metrics(self) -> dict[str, float | int | bool]:
        """sparsity (exact zero fraction of prunable weights), target, threshold, mask_frozen."""
        step = max(self._last_step, 0)
        return {"sparsity": zero_fraction(self._params), "target_sparsity": gmp_sparsity_at(step, self.cfg),
                "threshold": self._threshold, "mask_frozen": step >= self.cfg.end_step}
