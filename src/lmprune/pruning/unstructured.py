"""Unstructured (per-weight) magnitude pruning methods: MGPP (S3) and GMP (S4), and fixed masks.

Configs and schedules are in `unstructured_config`, mask selection and enforcement in `masks`,
iterative magnitude pruning in `iterative`.

- `MGPPPruner`: mixture-Gaussian prior gradient + cubic schedule + one global magnitude threshold.
  Before the freeze a mask update zeroes the smallest weights once and leaves their gradients
  alone, so a pruned weight whose gradient is large grows back and survives the next update;
  at the end of the cubic phase the mask freezes and from then on pruned weights are zeroed and
  their gradients masked every step.
- `GMPPruner` (Zhu & Gupta): the same magnitude masks, but monotone and enforced from the first
  update: masked weights get no gradient, no AdamW moments and are re-zeroed every step.
- `MaskedWeights`: fixed masks as a pruning-method object, for fine-tuning an already pruned model.

The pruners follow the trainer's protocol (`apply`, `after_backward`, `after_optimizer_step`,
`state_dict`, `load_state_dict`, `metrics`); `step` is the 0-based optimizer step index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lmprune.errors import UserError
from lmprune.pruning.masks import (
    check_nm_shapes,
    check_state_method,
    checked_masks,
    compute_keep_masks,
    masked_parameters,
    masks_from_state,
    masks_to_state,
    parse_nm,
    prunable_parameters,
    zero_fraction,
    zero_pruned_grads_,
    zero_pruned_moments_,
    zero_pruned_params_,
)
from lmprune.pruning.unstructured_config import (
    GMPConfig,
    MGPPConfig,
    gmp_is_update_step,
    gmp_sparsity_at,
    mgpp_eta_at,
    mgpp_is_update_step,
    mgpp_lam_at,
    mgpp_sparsity_at,
)

# ----------------------------------------------------------------------------- MGPP prior

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


# ----------------------------------------------------------------------------- MGPP

class MGPPPruner:
    """MGPP (S3) as a training-time pruning method.

    Timeline (t0 = warmup_steps, t_end = t0 + cubic_steps):
    - steps < t0: dense, no prior.
    - t0 <= step <= t_end (until the freeze): after backward, eta(t) * prior gradient is added to
      the gradients of the prunable weights (lambda annealed linearly to lam * lam_final_factor).
      After the optimizer steps t0, t0+dt, ... the mask is recomputed from |w| of all weights
      (pruned ones included) at the scheduled sparsity and the pruned weights are set to zero
      once. Their gradients and AdamW moments are left alone, so they may regrow and win back
      their place at the next update.
    - after the optimizer step t_end: final mask at s_f, which then freezes: pruned weights are
      zeroed and their gradients masked every step; their AdamW moments are zeroed at the freeze,
      so AdamW (with weight decay) leaves them exactly at zero. The prior is off after the freeze.
    """

    def __init__(self, cfg: MGPPConfig) -> None:
        if cfg.n_train is None:
            raise ValueError("MGPPPruner needs cfg.n_train (the training-set size in examples)")
        self.cfg = cfg
        self._params: dict[str, nn.Parameter] = {}
        self._keep: dict[str, Tensor] | None = None  # from the last mask update; None before the first
        self._frozen = False
        self._threshold = 0.0
        self._last_step = -1
        self._mask_updated = False

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
        """Add eta(t) * prior gradient while pruning is active; mask gradients once frozen."""
        self._last_step = step
        if self._frozen:
            zero_pruned_grads_(self._params, self._keep)
            return
        if step < self.cfg.warmup_steps:
            return
        eta, lam = mgpp_eta_at(step, self.cfg), mgpp_lam_at(step, self.cfg)
        if eta == 0.0:
            return
        for p in self._params.values():
            if p.grad is not None:
                p.grad.add_(mgpp_prior_grad(p, lam, self.cfg.s0, self.cfg.s1, self.cfg.n_train), alpha=eta)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             step: int) -> torch.optim.Optimizer:
        """Recompute the mask on update steps, freeze it at the end of the cubic phase, keep frozen zeros."""
        self._last_step = step
        self._mask_updated = False
        if self._frozen:
            zero_pruned_params_(self._params, self._keep)
            return optimizer
        t_end = self.cfg.warmup_steps + self.cfg.cubic_steps
        if mgpp_is_update_step(step, self.cfg) or step > t_end:
            self._keep, self._threshold = compute_keep_masks(
                self._params, mgpp_sparsity_at(step, self.cfg), self.cfg.scope, self.cfg.nm)
            zero_pruned_params_(self._params, self._keep)
            self._mask_updated = True
            if step >= t_end:
                self._frozen = True
                zero_pruned_moments_(optimizer, self._params, self._keep)
        return optimizer

    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors, CPU) + frozen flag + schedule position; everything else is a function of step."""
        return {"method": "mgpp", "frozen": self._frozen, "threshold": self._threshold,
                "last_step": self._last_step, **masks_to_state(self._keep)}

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
        """sparsity (exact zero fraction of prunable weights), target, threshold, mask_update, lam, mask_frozen."""
        step = max(self._last_step, 0)
        return {"sparsity": zero_fraction(self._params), "target_sparsity": mgpp_sparsity_at(step, self.cfg),
                "threshold": self._threshold, "mask_update": self._mask_updated,
                "lam": mgpp_lam_at(step, self.cfg), "mask_frozen": self._frozen}


# ----------------------------------------------------------------------------- GMP

class GMPPruner:
    """GMP (Zhu & Gupta, S4) as a training-time pruning method.

    After the optimizer steps t0, t0+dt, ..., t0+n*dt the mask is updated to the cubic schedule's
    sparsity; masks are monotone (pruned weights stay pruned). From the first update on, masked
    weights get no updates: their gradients are zeroed after backward, their AdamW moments are
    zeroed at each update and they are re-zeroed after every optimizer step.
    """

    def __init__(self, cfg: GMPConfig) -> None:
        self.cfg = cfg
        self._params: dict[str, nn.Parameter] = {}
        self._keep: dict[str, Tensor] | None = None
        self._threshold = 0.0
        self._last_step = -1
        self._mask_updated = False

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

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             step: int) -> torch.optim.Optimizer:
        """Update the mask on schedule steps; keep pruned weights (and their moments) at zero."""
        self._last_step = step
        self._mask_updated = False
        if gmp_is_update_step(step, self.cfg):
            self._keep, self._threshold = compute_keep_masks(
                self._params, gmp_sparsity_at(step, self.cfg), self.cfg.scope, self.cfg.nm, self._keep)
            zero_pruned_moments_(optimizer, self._params, self._keep)
            self._mask_updated = True
        if self._keep is not None:
            zero_pruned_params_(self._params, self._keep)
        return optimizer

    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors, CPU) + schedule position."""
        return {"method": "gmp", "threshold": self._threshold, "last_step": self._last_step,
                **masks_to_state(self._keep)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); call before or after apply()."""
        check_state_method(state, "gmp")
        self._threshold = float(state["threshold"])
        self._last_step = int(state["last_step"])
        self._keep = masks_from_state(state)
        if self._keep is not None and self._params:
            self._keep = checked_masks(self._params, self._keep)

    def metrics(self) -> dict[str, float | int | bool]:
        """sparsity (exact zero fraction of prunable weights), target, threshold, mask_update, mask_frozen."""
        step = max(self._last_step, 0)
        return {"sparsity": zero_fraction(self._params), "target_sparsity": gmp_sparsity_at(step, self.cfg),
                "threshold": self._threshold, "mask_update": self._mask_updated,
                "mask_frozen": step >= self.cfg.t0 + self.cfg.n * self.cfg.dt}


# ----------------------------------------------------------------------------- fixed masks

class MaskedWeights:
    """Fixed keep-masks as a pruning-method object: pruned weights stay exactly zero while training.

    For fine-tuning a pruned model (e.g. the `finetune` callback of `iterative_magnitude_prune`):
    gradients of pruned weights are zeroed, their optimizer moments zeroed and the weights
    re-zeroed after every optimizer step.
    """

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        self._keep = {name: m.bool() for name, m in masks.items()}
        self._params: dict[str, nn.Parameter] = {}

    def apply(self, model: nn.Module) -> None:
        """Bind the masks to `model` (UserError for unknown names/shapes) and zero the pruned weights."""
        self._params = masked_parameters(model, self._keep)
        self._keep = checked_masks(self._params, self._keep)
        zero_pruned_params_(self._params, self._keep)

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Zero the gradients of pruned weights."""
        zero_pruned_grads_(self._params, self._keep)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             step: int) -> torch.optim.Optimizer:
        """Zero pruned moments (stale state from before the masks) and re-zero pruned weights."""
        zero_pruned_moments_(optimizer, self._params, self._keep)
        zero_pruned_params_(self._params, self._keep)
        return optimizer

    def state_dict(self) -> dict[str, Any]:
        """The masks (bool tensors, CPU)."""
        return {"method": "masked", **masks_to_state(self._keep)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); call before or after apply()."""
        check_state_method(state, "masked")
        self._keep = masks_from_state(state) or {}
        if self._params:
            self._params = {name: self._params[name] for name in self._keep if name in self._params}
            self._keep = checked_masks(self._params, self._keep)

    def metrics(self) -> dict[str, float | int | bool]:
        """sparsity: exact zero fraction of the masked weights."""
        return {"sparsity": zero_fraction(self._params)}
