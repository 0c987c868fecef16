"""MGPP: magnitude pruning with a mixture-Gaussian prior, as a training-time method.

Config, schedule and pruner in one place. Formulas: docs/algorithms.md, "MGPP".

Timeline (t0 = warmup_steps, t_end = t0 + cubic_steps):
- steps < t0: dense, no prior.
- t0 <= step <= t_end (until the freeze): after gradient clipping (the prior never enters the clip
  norm; see `after_clip`), eta(t) * prior gradient is added to the gradients of the prunable weights
  (lambda annealed linearly to lam * lam_final_factor). After the optimizer steps t0, t0+dt, ... the mask is recomputed from |w| of all weights (pruned ones included)
  at the scheduled sparsity and the pruned weights are set to zero once. Their gradients and AdamW
  moments are left alone, so a pruned weight with a large gradient regrows and can win back its place.
- after the optimizer step t_end: final mask at s_f, which then freezes: pruned weights are zeroed and
  their gradients masked every step; their AdamW moments are zeroed at the freeze, so AdamW (with
  weight decay) leaves them exactly at zero. The prior is off after the freeze.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from lmprune.errors import UserError
from lmprune.sharding import all_reduce_, is_sharded, local
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


class MGPPConfig(BaseModel):
    """MGPP: magnitude pruning with a mixture-Gaussian prior and a cubic sparsity schedule."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    n_train: int | None = None
    """n: training-set size in examples; the prior gradient is scaled by 1/n. None (in `lmprune train`) =
    the number of train.seq_len sequences in the training split."""
    lam: float = 0.1
    """Slab weight lambda of the prior lam*N(0, s1) + (1-lam)*N(0, s0), in (0, 1)."""
    lam_final_factor: float = 1e-3
    """lambda anneals linearly to lam * lam_final_factor over the cubic phase (0.1 -> 1e-4), in (0, 1]."""
    s0: float = 1e-10
    """Spike variance (a variance, not a std); must be < s1."""
    s1: float = 0.05
    """Slab variance (a variance, not a std)."""
    warmup_steps: int = 100
    """Dense steps before pruning starts (no prior, no mask)."""
    s_i: float = 0.5
    """Sparsity the mask jumps to at the end of warmup, in [0, 1)."""
    s_f: float = 0.9
    """Final sparsity, reached at the end of the cubic phase, in [0, 1)."""
    cubic_steps: int = 1000
    """Length of the cubic phase in steps; the mask freezes at step warmup_steps + cubic_steps."""
    dt: int = 10
    """Mask recompute interval in steps during the cubic phase."""
    prior: bool = True
    """Add the prior gradient; false = the same mask schedule with no prior at all (the no-prior control)."""
    eta_warmin_steps: int = 0
    """Linear warm-in 0 -> 1 of the prior-gradient multiplier eta(t) from the end of warmup; 0 = off (eta = 1)."""
    scope: Scope = "global"
    """Magnitude threshold over all prunable matrices at once (global) or per matrix (per_layer)."""
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS))
    """Regexes (re.search) or globs (fnmatch) of prunable 2-D parameter names."""
    nm: str | None = None
    """'N:M' semi-structured sparsity (keep N of every M consecutive inputs) instead of the threshold."""

    _patterns = field_validator("patterns")(check_patterns)
    _nm = field_validator("nm")(check_nm)

    @model_validator(mode="after")
    def _check(self) -> "MGPPConfig":
        if not 0.0 < self.lam < 1.0:
            raise ValueError(f"mgpp.lam must be in (0, 1), got {self.lam}")
        if not 0.0 < self.lam_final_factor <= 1.0:
            raise ValueError(f"mgpp.lam_final_factor must be in (0, 1], got {self.lam_final_factor}")
        if not 0.0 < self.s0 < self.s1:
            raise ValueError(f"mgpp needs 0 < s0 < s1 (variances), got s0={self.s0}, s1={self.s1}")
        if self.n_train is not None and self.n_train <= 0:
            raise ValueError(f"mgpp.n_train must be > 0, got {self.n_train}")
        check_sparsities("mgpp", self.s_i, self.s_f)
        for name in ("warmup_steps", "cubic_steps", "eta_warmin_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"mgpp.{name} must be >= 0, got {getattr(self, name)}")
        if self.dt < 1:
            raise ValueError(f"mgpp.dt must be >= 1, got {self.dt}")
        if self.nm is not None and self.s_f == 0.0:
            raise ValueError("mgpp.nm needs s_f > 0: the N:M mask applies once the scheduled sparsity is > 0")
        return self


def check_mgpp_plan(cfg: MGPPConfig, total_steps: int) -> None:
    """The mask must freeze inside the run (UserError otherwise)."""
    if cfg.warmup_steps + cfg.cubic_steps >= total_steps:
        raise UserError(f"mgpp: warmup_steps + cubic_steps ({cfg.warmup_steps} + {cfg.cubic_steps}) "
                        f"must end before train.steps ({total_steps}) so the mask freezes inside the run")


# ----------------------------------------------------------------------------- schedule (pure)

def mgpp_sparsity_at(step: int, cfg: MGPPConfig) -> float:
    """MGPP target sparsity: 0 in warmup, s_i at its end, cubic to s_f over cubic_steps."""
    return cubic_ramp(step, cfg.warmup_steps, cfg.cubic_steps, cfg.s_i, cfg.s_f)


def mgpp_is_update_step(step: int, cfg: MGPPConfig) -> bool:
    """A mask update follows the optimizer step `step`: every dt steps of the cubic phase and at its end."""
    t0, t_end = cfg.warmup_steps, cfg.warmup_steps + cfg.cubic_steps
    return step == t_end or (t0 <= step < t_end and (step - t0) % cfg.dt == 0)


def mgpp_lam_at(step: int, cfg: MGPPConfig) -> float:
    """lambda: cfg.lam until warmup ends, then linear to lam * lam_final_factor at the end of the cubic phase."""
    if step <= cfg.warmup_steps:
        return cfg.lam
    progress = 1.0 if cfg.cubic_steps == 0 else min(1.0, (step - cfg.warmup_steps) / cfg.cubic_steps)
    return cfg.lam * (1.0 + (cfg.lam_final_factor - 1.0) * progress)


def mgpp_eta_at(step: int, cfg: MGPPConfig) -> float:
    """Prior-gradient multiplier eta(t): 1, or (t - t0 + 1)/W for the first W pruning steps when warmed in."""
    if cfg.eta_warmin_steps == 0:
        return 1.0
    return min(1.0, max(0, step - cfg.warmup_steps + 1) / cfg.eta_warmin_steps)


def mgpp_prior_grad(w: Tensor, lam: float, s0: float, s1: float, n: int) -> Tensor:
    """Gradient of -(1/n) log pi(w), pi = lam*N(w; 0, s1) + (1-lam)*N(w; 0, s0), elementwise, in w.dtype.

    = (w/n) * (p0/s0 + (1-p0)/s1) with p0 = sigmoid(-(c2 w^2 + c1)) the posterior probability of
    the spike. Computed in at least float32 (the logistic form saturates instead of overflowing,
    so s0 = 1e-10 is safe even for bf16 weights).
    """
    compute_dtype = torch.promote_types(w.dtype, torch.float32)
    x = w.detach().to(compute_dtype)
    c1 = math.log(lam) - math.log1p(-lam) + 0.5 * math.log(s0) - 0.5 * math.log(s1)
    c2 = 0.5 / s0 - 0.5 / s1
    p0 = x.square().mul_(c2).add_(c1).neg_().sigmoid_()
    # p0/s0 + (1-p0)/s1 == 1/s1 + p0 * (1/s0 - 1/s1)
    scale = p0.mul_(1.0 / s0 - 1.0 / s1).add_(1.0 / s1)
    return scale.mul_(x).div_(n).to(w.dtype)


# ----------------------------------------------------------------------------- the method

class MGPPPruner:
    """MGPP as a training hook (see the module docstring for its timeline)."""

    def __init__(self, cfg: MGPPConfig) -> None:
        if cfg.n_train is None:
            raise ValueError("MGPPPruner needs cfg.n_train (the training-set size in examples)")
        self.cfg = cfg
        self.export_patterns = tuple(cfg.patterns)
        self._params: dict[str, nn.Parameter] = {}
        self._keep: dict[str, Tensor] | None = None  # from the last mask update; None before the first
        self._frozen = False
        self._threshold = 0.0
        self._last_step = -1
        self._prior_norm_sq: Tensor | None = None  # of the last step's eta * prior gradient

    def apply(self, model: nn.Module) -> None:
        """Find the prunable weights (UserError for patterns that match nothing) and bind loaded masks."""
        self._params = prunable_parameters(model, self.cfg.patterns)
        if self.cfg.nm is not None:
            check_nm_shapes(self._params, parse_nm(self.cfg.nm)[1])
        if self._keep is not None:
            self._keep = checked_masks(self._params, self._keep)
            if self._frozen:
                zero_pruned_params_(self._params, self._keep)

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Once frozen: mask the gradients of pruned weights (before clipping, like every mask)."""
        self._last_step = step
        if self._frozen:
            zero_pruned_grads_(self._params, self._keep)

    def after_clip(self, model: nn.Module, step: int) -> None:
        """Add eta(t) * prior gradient while pruning is active, AFTER clipping (RegularizingHook): with
        s0 = 1e-10 its norm can be 10^4 x the loss gradient's, and inside the clip norm it would scale
        the loss gradient down to almost nothing."""
        self._prior_norm_sq = None
        if not self.cfg.prior or self._frozen or step < self.cfg.warmup_steps:
            return
        eta, lam = mgpp_eta_at(step, self.cfg), mgpp_lam_at(step, self.cfg)
        if eta == 0.0:
            return
        norm_sq = None
        for p in self._params.values():
            if p.grad is not None:  # under FSDP on this rank's shard (the prior is elementwise)
                prior = mgpp_prior_grad(local(p), lam, self.cfg.s0, self.cfg.s1, self.cfg.n_train).mul_(eta)
                local(p.grad).add_(prior)
                square = prior.float().square().sum()  # stays on the device: read only on logged steps
                norm_sq = square if norm_sq is None else norm_sq + square
        self._prior_norm_sq = norm_sq

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> StepEvents:
        """Recompute the mask on update steps, freeze it at the end of the cubic phase, keep frozen zeros."""
        self._last_step = step
        if self._frozen:
            zero_pruned_params_(self._params, self._keep)
            return StepEvents()
        t_end = self.cfg.warmup_steps + self.cfg.cubic_steps
        if not (mgpp_is_update_step(step, self.cfg) or step > t_end):
            return StepEvents()
        self._keep, self._threshold = compute_keep_masks(
            self._params, mgpp_sparsity_at(step, self.cfg), self.cfg.scope, self.cfg.nm)
        zero_pruned_params_(self._params, self._keep)
        if step >= t_end:
            self._frozen = True
            zero_pruned_moments_(optimizer, self._params, self._keep)
        return StepEvents(mask_updated=True)

    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors, CPU) + frozen flag + schedule position; everything else is a function of step."""
        return {"method": "mgpp", "frozen": self._frozen, "threshold": self._threshold,
                "last_step": self._last_step, **masks_to_state(self._keep, self._params)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); call before or after apply()."""
        check_state_method(state, "mgpp")
        self._frozen = bool(state["frozen"])
        self._threshold = float(state["threshold"])
        self._last_step = int(state["last_step"])
        self._keep = masks_from_state(state)
        if self._frozen and self._keep is None:
            raise UserError("mgpp pruning state is frozen but holds no masks")
        if self._keep is not None and self._params:
            self._keep = checked_masks(self._params, self._keep)

    def metrics(self) -> dict[str, float | int | bool]:
        """sparsity (exact zero fraction of prunable weights), target, threshold, lam, mask_frozen, and
        prior_grad_norm (norm of the last step's eta * prior gradient, 0 when the prior is off)."""
        step = max(self._last_step, 0)
        prior_sq = self._prior_norm_sq
        if prior_sq is not None and any(is_sharded(p) for p in self._params.values()):
            prior_sq = all_reduce_(prior_sq.detach().clone().view(1))  # every rank calls metrics() on a logged step
        prior = 0.0 if prior_sq is None else float(prior_sq.sqrt())
        return {"sparsity": zero_fraction(self._params), "target_sparsity": mgpp_sparsity_at(step, self.cfg),
                "threshold": self._threshold, "lam": mgpp_lam_at(step, self.cfg), "mask_frozen": self._frozen,
                "prior_grad_norm": round(prior, 6)}
