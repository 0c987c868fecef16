"""Configs and pure schedules of unstructured pruning: MGPP (S3), GMP and iterative magnitude
pruning (S4). Each config validates itself on construction; each schedule is a function of the
0-based optimizer step and the config.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmprune.pruning.masks import DEFAULT_PATTERNS, Scope, parse_nm


# ----------------------------------------------------------------------------- configs


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
