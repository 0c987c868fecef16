"""Enlarge-and-prune pipelines resolved into what the training loop needs.

A pipeline is not a second loop: it decides (1) the width of the model that training starts with,
(2) the LR segments (one warmup+cosine, or a restart), and (3) when and how the FFN pruner prunes.
The loop in train.py then runs the same way for every pipeline, so they differ in nothing else:
same data order, same seed, same token budget.

  scratch  target model; one warmup+cosine over T
  idea     enlarged model; one warmup+cosine over T; iterative pruning in [t_w, t_w + t_p]; recovery
  naive    enlarged model; warmup+cosine over [0, t_w) (decays fully); one-shot prune at t_w;
           a NEW warmup+cosine over [t_w, T)
  oneshot  enlarged model; one-shot prune at t_w; the run's schedule resumed (or restarted at t_w)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmprune.config import RunConfig
from lmprune.errors import UserError
from lmprune.models import PRESETS, check_model_dir
from lmprune.pruning.structured import FFNPruneConfig, resolve_target_width, validate_window
from lmprune.schedules import segmented_warmup_cosine
from lmprune.sources import resolve_model


@dataclass(frozen=True)
class Plan:
    """What a run config resolves to."""

    initial_width: int
    """FFN width of the model training starts with (the enlarged width for idea/naive/oneshot)."""
    target_width: int
    """FFN width of the exported model."""
    lr_segments: tuple[tuple[int, int], ...]
    """(start, length) warmup+cosine segments; one segment = no re-warm."""
    prune: FFNPruneConfig | None
    """The FFN pruner's config, None when nothing is pruned."""
    kd_start: int | None
    """First step with distillation (None = no KD)."""

    def lr_at(self, step: int, peak: float, end: float, warmup: int) -> float:
        return segmented_warmup_cosine(step, peak, end, warmup, list(self.lr_segments))


def configured_width(cfg: RunConfig) -> int:
    """FFN width the `model` section describes (preset + override, or the HF dir's config)."""
    if cfg.model.path:
        config = check_model_dir(resolve_model(cfg.model.path))
        if "intermediate_size" not in config:
            raise UserError(f"{cfg.model.path}: config has no intermediate_size (not a Llama-family FFN)")
        return int(config["intermediate_size"])
    return cfg.model.intermediate_size or PRESETS[cfg.model.preset or "tiny"]["intermediate_size"]


def enlarged_width(target: int, factor: float, round_to: int) -> int:
    return int(math.ceil(target * factor / round_to) * round_to)


def check_sparse_schedule(cfg: RunConfig) -> None:
    """The unstructured methods' schedules must fit in the run (UserError otherwise)."""
    steps = cfg.train.steps
    if cfg.mgpp is not None and cfg.mgpp.warmup_steps + cfg.mgpp.cubic_steps >= steps:
        raise UserError(f"mgpp: warmup_steps + cubic_steps ({cfg.mgpp.warmup_steps} + {cfg.mgpp.cubic_steps}) "
                        f"must end before train.steps ({steps}) so the mask freezes inside the run")
    if cfg.gmp is not None and cfg.gmp.t0 + cfg.gmp.n * cfg.gmp.dt >= steps:
        raise UserError(f"gmp: the last mask update (t0 + n*dt = {cfg.gmp.t0 + cfg.gmp.n * cfg.gmp.dt}) must come "
                        f"before train.steps ({steps})")
    if cfg.imp is not None:
        needed = len(cfg.imp.sparsity_levels()) * cfg.imp.steps_per_round
        if cfg.imp.steps_per_round < 1 or needed != steps:
            raise UserError(f"imp: train.steps must be rounds x steps_per_round = {needed} (got {steps}), "
                            "steps_per_round >= 1")


def resolve_plan(cfg: RunConfig) -> Plan:
    """Resolve pipeline/prune/kd sections into a Plan; every inconsistency is a UserError here."""
    steps = cfg.train.steps
    pipe = cfg.pipeline
    check_sparse_schedule(cfg)
    if pipe is None:
        width = configured_width(cfg)
        prune = cfg.prune
        target = width
        if prune is not None:
            target = resolve_target_width(prune, width)
            validate_window(prune, steps)
        kd_start = None
        if cfg.kd is not None:
            if cfg.kd.teacher is None and prune is None:
                raise UserError("kd.teacher must name a HF dir (no pruning here to snapshot a teacher from)")
            kd_start = 0 if cfg.kd.teacher is not None else prune.start_step
        return Plan(width, target, ((0, steps),), prune, kd_start)

    target = configured_width(cfg)
    if target % pipe.round_to:
        raise UserError(f"the target FFN width {target} is not a multiple of pipeline.round_to {pipe.round_to}")
    t_w = int(round(pipe.prune_start * steps))
    kd_start = None
    if cfg.kd is not None:
        if pipe.name == "scratch" and cfg.kd.teacher is None:
            raise UserError("pipeline scratch has no enlarged model to distil from: set kd.teacher to a HF dir")
        kd_start = 0 if cfg.kd.teacher is not None else t_w
    if pipe.name == "scratch":
        return Plan(target, target, ((0, steps),), None, kd_start)

    initial = enlarged_width(target, pipe.enlarge, pipe.round_to)
    span = int(round(pipe.prune_span * steps)) if pipe.name == "idea" else 0
    segments: tuple[tuple[int, int], ...] = ((0, steps),)
    if pipe.name == "naive":
        segments = ((0, t_w), (t_w, steps - t_w))
    elif pipe.name == "oneshot" and pipe.oneshot_schedule == "restarted":
        segments = ((0, steps), (t_w, steps - t_w))
    prune = FFNPruneConfig(start_step=t_w, span_steps=span, target_width=target, round_to=pipe.round_to,
                           prune_every=pipe.prune_every, importance=pipe.importance, ema=pipe.ema, f1=pipe.f1,
                           f2=pipe.f2, uncertainty=pipe.uncertainty,
                           state_dtype=pipe.state_dtype, seed=cfg.train.seed)
    resolve_target_width(prune, initial)
    validate_window(prune, steps)
    if cfg.train.warmup >= t_w:
        raise UserError(f"train.warmup ({cfg.train.warmup}) must end before pruning starts (step {t_w})")
    return Plan(initial, target, segments, prune, kd_start)
