"""Unstructured (per-weight) magnitude pruning: MGPP (S3), GMP and iterative magnitude pruning (S4).

Masks are dicts `param name -> bool tensor` with True = keep. Names are those of
`model.named_parameters()` without DDP / torch.compile wrapper prefixes.

- `MGPPPruner`: mixture-Gaussian prior gradient + cubic schedule + one global magnitude threshold.
  Before the freeze a mask update zeroes the smallest weights once and leaves their gradients
  alone, so a pruned weight whose gradient is large grows back and survives the next update;
  at the end of the cubic phase the mask freezes and from then on pruned weights are zeroed and
  their gradients masked every step.
- `GMPPruner` (Zhu & Gupta): the same magnitude masks, but monotone and enforced from the first
  update: masked weights get no gradient, no AdamW moments and are re-zeroed every step.
- `iterative_magnitude_prune`: rounds of {prune to the next level, fine-tune, evaluate}.
- `MaskedWeights`: fixed masks as a pruning-method object, for fine-tuning an already pruned model.

The pruners follow the trainer's protocol (`apply`, `after_backward`, `after_optimizer_step`,
`state_dict`, `load_state_dict`, `metrics`); `step` is the 0-based optimizer step index.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from lmprune.errors import UserError

Scope = Literal["global", "per_layer"]

DEFAULT_PATTERNS: tuple[str, ...] = (
    r"self_attn\.(q|k|v|o)_proj\.weight$",
    r"mlp\.(gate|up|down)_proj\.weight$",
)
"""Attention q/k/v/o and SwiGLU gate/up/down projections; embeddings, norms and lm_head are not matched."""


# ----------------------------------------------------------------------------- configs

def parse_nm(spec: str) -> tuple[int, int]:
    """'N:M' -> (N, M) with 1 <= N < M, else ValueError."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
    if match is None:
        raise ValueError(f"nm must look like 'N:M' (e.g. '2:4'), got {spec!r}")
    keep, group = int(match.group(1)), int(match.group(2))
    if not 1 <= keep < group:
        raise ValueError(f"nm {spec!r}: need 1 <= N < M (keep N of every M weights)")
    return keep, group


def _check_patterns(patterns: list[str]) -> list[str]:
    if not patterns or any(not isinstance(p, str) or not p.strip() for p in patterns):
        raise ValueError(f"patterns must be a non-empty list of non-empty regexes/globs, got {patterns!r}")
    return patterns


def _check_nm(nm: str | None) -> str | None:
    if nm is not None:
        parse_nm(nm)
    return nm


def _check_sparsities(section: str, s_i: float, s_f: float) -> None:
    for name, value in (("s_i", s_i), ("s_f", s_f)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{section}.{name} must be in [0, 1), got {value}")
    if s_i > s_f:
        raise ValueError(f"{section}.s_i ({s_i}) must be <= {section}.s_f ({s_f})")


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
    eta_warmin_steps: int = 0
    """Linear warm-in 0 -> 1 of the prior-gradient multiplier eta(t) from the end of warmup; 0 = off (eta = 1)."""
    scope: Scope = "global"
    """Magnitude threshold over all prunable matrices at once (global) or per matrix (per_layer)."""
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATTERNS))
    """Regexes (re.search) or globs (fnmatch) of prunable 2-D parameter names."""
    nm: str | None = None
    """'N:M' semi-structured sparsity (keep N of every M consecutive inputs) instead of the threshold."""

    _patterns = field_validator("patterns")(_check_patterns)
    _nm = field_validator("nm")(_check_nm)

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
        _check_sparsities("mgpp", self.s_i, self.s_f)
        for name in ("warmup_steps", "cubic_steps", "eta_warmin_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"mgpp.{name} must be >= 0, got {getattr(self, name)}")
        if self.dt < 1:
            raise ValueError(f"mgpp.dt must be >= 1, got {self.dt}")
        if self.nm is not None and self.s_f == 0.0:
            raise ValueError("mgpp.nm needs s_f > 0: the N:M mask applies once the scheduled sparsity is > 0")
        return self


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

    _patterns = field_validator("patterns")(_check_patterns)
    _nm = field_validator("nm")(_check_nm)

    @model_validator(mode="after")
    def _check(self) -> "GMPConfig":
        _check_sparsities("gmp", self.s_i, self.s_f)
        if self.t0 < 0 or self.n < 1 or self.dt < 1:
            raise ValueError(f"gmp needs t0 >= 0, n >= 1, dt >= 1, got t0={self.t0}, n={self.n}, dt={self.dt}")
        if self.nm is not None and self.s_f == 0.0:
            raise ValueError("gmp.nm needs s_f > 0: the N:M mask applies once the scheduled sparsity is > 0")
        return self


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

    _patterns = field_validator("patterns")(_check_patterns)

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


# ----------------------------------------------------------------------------- schedules (pure)

def cubic_sparsity(step: int, start: int, span: int, s_i: float, s_f: float) -> float:
    """0 before `start`; s_f + (s_i - s_f) * (1 - (step - start)/span)**3 on [start, start+span]; s_f after."""
    if step < start:
        return 0.0
    if span <= 0 or step >= start + span:
        return s_f
    return s_f + (s_i - s_f) * (1.0 - (step - start) / span) ** 3


def mgpp_sparsity_at(step: int, cfg: MGPPConfig) -> float:
    """MGPP target sparsity: 0 in warmup, s_i at its end, cubic to s_f over cubic_steps."""
    return cubic_sparsity(step, cfg.warmup_steps, cfg.cubic_steps, cfg.s_i, cfg.s_f)


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


def gmp_is_update_step(step: int, cfg: GMPConfig) -> bool:
    """GMP masks update after the optimizer steps t0, t0 + dt, ..., t0 + n*dt."""
    return cfg.t0 <= step <= cfg.t0 + cfg.n * cfg.dt and (step - cfg.t0) % cfg.dt == 0


def gmp_sparsity_at(step: int, cfg: GMPConfig) -> float:
    """Sparsity set by the last GMP mask update at or before `step` (0 before t0)."""
    if step < cfg.t0:
        return 0.0
    last_update = cfg.t0 + min((step - cfg.t0) // cfg.dt, cfg.n) * cfg.dt
    return cubic_sparsity(last_update, cfg.t0, cfg.n * cfg.dt, cfg.s_i, cfg.s_f)


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


# ----------------------------------------------------------------------------- prunable parameters

def _clean_name(name: str) -> str:
    """Parameter name without DDP ('module.') and torch.compile ('_orig_mod.') prefixes."""
    return re.sub(r"^(?:module\.|_orig_mod\.)+", "", name)


def name_matches(pattern: str, name: str) -> bool:
    """True when `pattern` matches `name` as a glob (whole name) or as a regex (re.search)."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.search(pattern, name) is not None
    except re.error:  # a glob such as "*.q_proj.weight" is not a valid regex
        return False


def prunable_parameters(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Parameter]:
    """2-D parameters whose names match any pattern, in model order; UserError names unmatched patterns."""
    named = [(_clean_name(name), p) for name, p in model.named_parameters()]
    found: dict[str, nn.Parameter] = {}
    unmatched = []
    for pattern in patterns:
        hits = [(name, p) for name, p in named if p.ndim == 2 and name_matches(pattern, name)]
        if not hits:
            unmatched.append(pattern)
        found.update(hits)
    if unmatched:
        examples = ", ".join(name for name, p in named[:6] if p.ndim == 2)
        raise UserError(f"pruning patterns match no 2-D parameter of the model: {unmatched} "
                        f"(parameter names look like: {examples}, ...)")
    order = {name: i for i, (name, _) in enumerate(named)}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def _resolve(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
    """Parameters named by `masks`, checked to exist with the masks' shapes."""
    params = {_clean_name(name): p for name, p in model.named_parameters()}
    for name, mask in masks.items():
        if name not in params:
            raise UserError(f"mask for {name!r} but the model has no such parameter")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise UserError(f"mask for {name!r} has shape {tuple(mask.shape)}, "
                            f"the parameter {tuple(params[name].shape)}")
    return {name: params[name] for name in masks}


def _zero_pruned_(params: Mapping[str, Tensor], keep: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.masked_fill_(keep[name].logical_not(), 0.0)  # +0.0, never -0.0


def _mask_grads_(params: Mapping[str, Tensor], keep: Mapping[str, Tensor]) -> None:
    for name, p in params.items():
        if p.grad is not None:
            p.grad.mul_(keep[name])


def _zero_pruned_moments_(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor],
                          keep: Mapping[str, Tensor]) -> None:
    """Zero the optimizer state (AdamW exp_avg, exp_avg_sq, ...) of pruned entries so they never move."""
    for name, p in params.items():
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, Tensor) and value.shape == p.shape:
                value.masked_fill_(keep[name].logical_not(), 0)


def apply_masks_(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Set pruned weights (mask False) of `model` to +0.0 in place."""
    _zero_pruned_(_resolve(model, masks), masks)


def mask_grads_(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the gradients of pruned weights (call between backward and the optimizer step)."""
    _mask_grads_(_resolve(model, masks), masks)


def mask_optimizer_state_(model: nn.Module, optimizer: torch.optim.Optimizer, masks: Mapping[str, Tensor]) -> None:
    """Zero the optimizer moments of pruned weights, so stale momentum cannot move them."""
    _zero_pruned_moments_(optimizer, _resolve(model, masks), masks)


def zero_fraction(weights: Mapping[str, Tensor] | Sequence[Tensor]) -> float:
    """Exact fraction of entries equal to zero over all given tensors."""
    tensors = list(weights.values()) if isinstance(weights, Mapping) else list(weights)
    total = sum(t.numel() for t in tensors)
    zeros = sum(int((t.detach() == 0).sum()) for t in tensors)
    return zeros / total if total else 0.0


# ----------------------------------------------------------------------------- masks

def _abs_keys(w: Tensor) -> Tensor:
    """|w| as float32 bit patterns (int32, same shape): integer order == order of |w|."""
    return w.detach().abs().to(torch.float32).contiguous().view(torch.int32)


def _select_smallest(weights: list[Tensor], eligible: list[Tensor | None], k: int) -> tuple[list[Tensor], float]:
    """Prune masks (True = prune) taking exactly k eligible entries with the smallest |w|.

    Ineligible entries (eligible False) are pruned as well, outside the count. The k-th smallest
    |w| is found by bisection on the float bit patterns, counting per tensor, so no copy of all
    weights is ever made (about 31 passes over the weights). Ties at the threshold go to earlier
    tensors first, then to lower flat indices. Returns the masks and the threshold |w|.
    """
    if k <= 0:
        masks = [e.logical_not() if e is not None else torch.zeros_like(w, dtype=torch.bool)
                 for w, e in zip(weights, eligible)]
        return masks, 0.0

    def count_at_most(limit: int) -> int:
        total = torch.zeros((), dtype=torch.int64, device=weights[0].device)
        for w, e in zip(weights, eligible):
            hit = _abs_keys(w) <= limit
            if e is not None:
                hit &= e
            total += hit.sum().to(total.device)
        return int(total)

    # invariant: count(lo) < k <= count(hi); keys are >= 0 so count(-1) == 0
    lo, count_lo = -1, 0
    hi = max(int(_abs_keys(w).max()) for w in weights if w.numel())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        count = count_at_most(mid)
        if count >= k:
            hi = mid
        else:
            lo, count_lo = mid, count
    limit, ties_to_take = hi, k - count_lo
    masks = []
    for w, e in zip(weights, eligible):
        keys = _abs_keys(w)
        prune = keys < limit
        at_limit = keys == limit
        if e is not None:
            prune &= e
            at_limit &= e
        if ties_to_take > 0:
            tie_index = at_limit.view(-1).nonzero().squeeze(1)[:ties_to_take]
            prune.view(-1)[tie_index] = True
            ties_to_take -= tie_index.numel()
        if e is not None:
            prune |= e.logical_not()
        masks.append(prune)
    threshold = torch.tensor([limit], dtype=torch.int32).view(torch.float32).item()
    return masks, threshold


def magnitude_keep_masks(weights: Mapping[str, Tensor], sparsity: float, scope: Scope = "global",
                         previous_keep: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], float]:
    """Keep masks pruning exactly round(sparsity * N) entries of smallest |w| (N over all tensors or per tensor).

    With `previous_keep`, previously pruned entries stay pruned and count toward the target
    (monotone masks). Returns (masks, threshold), threshold = the largest |w| newly pruned (0.0 if none).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    names = list(weights)
    if scope == "global":
        groups = [names]
    elif scope == "per_layer":
        groups = [[name] for name in names]
    else:
        raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    keep: dict[str, Tensor] = {}
    threshold = 0.0
    for group in groups:
        tensors = [weights[name] for name in group]
        eligible = [previous_keep[name] if previous_keep is not None else None for name in group]
        already_pruned = sum(int(e.logical_not().sum()) for e in eligible if e is not None)
        k = max(0, round(sparsity * sum(t.numel() for t in tensors)) - already_pruned)
        prune, group_threshold = _select_smallest(tensors, eligible, k)
        threshold = max(threshold, group_threshold)
        keep.update({name: p.logical_not() for name, p in zip(group, prune)})
    return keep, threshold


def check_nm_shapes(weights: Mapping[str, Tensor], group: int) -> None:
    """UserError unless every matrix's input dimension (the last) is a multiple of M."""
    bad = [f"{name} {tuple(w.shape)}" for name, w in weights.items() if w.shape[-1] % group]
    if bad:
        raise UserError(f"N:M sparsity with M={group} needs input dims divisible by {group}: {', '.join(bad)}")


def nm_keep_masks(weights: Mapping[str, Tensor], keep_n: int, group: int,
                  previous_keep: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], float]:
    """Keep the N largest |w| of every M consecutive weights along the input (last) dimension.

    Ties go to the lower index; previously pruned entries (previous_keep False) stay pruned.
    Returns (masks, threshold), threshold = the largest |w| pruned.
    """
    check_nm_shapes(weights, group)
    keep: dict[str, Tensor] = {}
    threshold = 0.0
    for name, w in weights.items():
        score = w.detach().abs().to(torch.float32).reshape(-1, group)  # [groups, M]
        if previous_keep is not None:
            score.masked_fill_(previous_keep[name].reshape(-1, group).logical_not(), -1.0)
        order = torch.argsort(score, dim=1, descending=True, stable=True)  # [groups, M]
        kept = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order[:, :keep_n], True)
        if previous_keep is not None:
            kept &= previous_keep[name].reshape(-1, group)
        pruned_scores = score.masked_fill(kept, -1.0)
        threshold = max(threshold, float(pruned_scores.max()) if pruned_scores.numel() else 0.0)
        keep[name] = kept.reshape(w.shape)
    return keep, threshold


def compute_keep_masks(weights: Mapping[str, Tensor], sparsity: float, scope: Scope = "global",
                       nm: str | None = None,
                       previous_keep: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], float]:
    """Magnitude masks at `sparsity`; with `nm` an N:M mask replaces the threshold whenever sparsity > 0."""
    if nm is None:
        return magnitude_keep_masks(weights, sparsity, scope, previous_keep)
    if sparsity <= 0.0:
        dense = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
        return (dict(previous_keep) if previous_keep is not None else dense), 0.0
    keep_n, group = parse_nm(nm)
    return nm_keep_masks(weights, keep_n, group, previous_keep)


# ----------------------------------------------------------------------------- pruner state helpers

_MASK_PREFIX = "keep_mask."


def _masks_to_state(keep: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    return {} if keep is None else {_MASK_PREFIX + name: m.to("cpu", copy=True) for name, m in keep.items()}


def _masks_from_state(state: Mapping[str, Any]) -> dict[str, Tensor] | None:
    masks = {key[len(_MASK_PREFIX):]: torch.as_tensor(value).bool()
             for key, value in state.items() if key.startswith(_MASK_PREFIX)}
    return masks or None


def _check_method(state: Mapping[str, Any], method: str) -> None:
    if state.get("method") != method:
        raise UserError(f"pruning state is for method {state.get('method')!r}, not {method!r}")


def _masks_for(params: Mapping[str, Tensor], keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`keep` checked against the prunable parameters and moved to their devices."""
    if set(keep) != set(params):
        raise UserError(f"pruning state has masks for {sorted(set(keep) ^ set(params))[:4]} ... which do not "
                        "match the prunable parameters of this model/config")
    out = {}
    for name, p in params.items():
        if tuple(keep[name].shape) != tuple(p.shape):
            raise UserError(f"pruning mask {name!r} has shape {tuple(keep[name].shape)}, parameter {tuple(p.shape)}")
        out[name] = keep[name].to(p.device)
    return out


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
            self._keep = _masks_for(self._params, self._keep)
            if self._frozen:
                _zero_pruned_(self._params, self._keep)

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Add eta(t) * prior gradient while pruning is active; mask gradients once frozen."""
        self._last_step = step
        if self._frozen:
            _mask_grads_(self._params, self._keep)
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
            _zero_pruned_(self._params, self._keep)
            return optimizer
        t_end = self.cfg.warmup_steps + self.cfg.cubic_steps
        if mgpp_is_update_step(step, self.cfg) or step > t_end:
            self._keep, self._threshold = compute_keep_masks(
                self._params, mgpp_sparsity_at(step, self.cfg), self.cfg.scope, self.cfg.nm)
            _zero_pruned_(self._params, self._keep)
            self._mask_updated = True
            if step >= t_end:
                self._frozen = True
                _zero_pruned_moments_(optimizer, self._params, self._keep)
        return optimizer

    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors, CPU) + frozen flag + schedule position; everything else is a function of step."""
        return {"method": "mgpp", "frozen": self._frozen, "threshold": self._threshold,
                "last_step": self._last_step, **_masks_to_state(self._keep)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); call before or after apply()."""
        _check_method(state, "mgpp")
        self._frozen = bool(state["frozen"])
        self._threshold = float(state["threshold"])
        self._last_step = int(state["last_step"])
        self._keep = _masks_from_state(state)
        if self._frozen and self._keep is None:
            raise UserError("mgpp pruning state is frozen but holds no masks")
        if self._keep is not None and self._params:
            self._keep = _masks_for(self._params, self._keep)

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
            self._keep = _masks_for(self._params, self._keep)
            _zero_pruned_(self._params, self._keep)

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Zero the gradients of pruned weights."""
        self._last_step = step
        if self._keep is not None:
            _mask_grads_(self._params, self._keep)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             step: int) -> torch.optim.Optimizer:
        """Update the mask on schedule steps; keep pruned weights (and their moments) at zero."""
        self._last_step = step
        self._mask_updated = False
        if gmp_is_update_step(step, self.cfg):
            self._keep, self._threshold = compute_keep_masks(
                self._params, gmp_sparsity_at(step, self.cfg), self.cfg.scope, self.cfg.nm, self._keep)
            _zero_pruned_moments_(optimizer, self._params, self._keep)
            self._mask_updated = True
        if self._keep is not None:
            _zero_pruned_(self._params, self._keep)
        return optimizer

    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors, CPU) + schedule position."""
        return {"method": "gmp", "threshold": self._threshold, "last_step": self._last_step,
                **_masks_to_state(self._keep)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); call before or after apply()."""
        _check_method(state, "gmp")
        self._threshold = float(state["threshold"])
        self._last_step = int(state["last_step"])
        self._keep = _masks_from_state(state)
        if self._keep is not None and self._params:
            self._keep = _masks_for(self._params, self._keep)

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
        self._params = _resolve(model, self._keep)
        self._keep = _masks_for(self._params, self._keep)
        _zero_pruned_(self._params, self._keep)

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Zero the gradients of pruned weights."""
        _mask_grads_(self._params, self._keep)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             step: int) -> torch.optim.Optimizer:
        """Zero pruned moments (stale state from before the masks) and re-zero pruned weights."""
        _zero_pruned_moments_(optimizer, self._params, self._keep)
        _zero_pruned_(self._params, self._keep)
        return optimizer

    def state_dict(self) -> dict[str, Any]:
        """The masks (bool tensors, CPU)."""
        return {"method": "masked", **_masks_to_state(self._keep)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); call before or after apply()."""
        _check_method(state, "masked")
        self._keep = _masks_from_state(state) or {}
        if self._params:
            self._params = {name: self._params[name] for name in self._keep if name in self._params}
            self._keep = _masks_for(self._params, self._keep)

    def metrics(self) -> dict[str, float | int | bool]:
        """sparsity: exact zero fraction of the masked weights."""
        return {"sparsity": zero_fraction(self._params)}


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
        _zero_pruned_(params, keep)
        finetune(model, {name: m.clone() for name, m in keep.items()}, cfg.steps_per_round)
        rows.append(row(round_index, level))
    return rows


def plot_ppl_vs_sparsity(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "ppl") -> Path:
    """PNG of `metric` (log scale when all > 0) against exact sparsity, one point per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: plotting is optional work
    from matplotlib.figure import Figure

    missing = [r.get("round", i) for i, r in enumerate(rows) if metric not in r]
    if missing:
        raise ValueError(f"rows {missing} have no {metric!r} value to plot")
    xs = [100.0 * float(r["exact_sparsity"]) for r in rows]
    ys = [float(r[metric]) for r in rows]
    fig = Figure(figsize=(5.0, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="o")
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("sparsity of prunable weights (%)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def rows_to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of the rows (columns in first-seen order; floats to 4 significant digits)."""
    columns: list[str] = []
    for r in rows:
        columns += [key for key in r if key not in columns]

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
