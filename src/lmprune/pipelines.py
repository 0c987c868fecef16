"""Enlarge-and-prune pipelines resolved into what the training loop needs.

Formulas: docs/algorithms.md, "Pipelines".

A pipeline is not a second loop: it decides (1) the width of the model that training starts with,
(2) the LR segments (one warmup+cosine, or a restart), and (3) when and how the FFN pruner prunes.
The loop in train.py then runs the same way for every pipeline, so they differ in nothing else:
same data order, same seed, same token budget.

`validate_run(cfg)` is the one place every cross-section rule of a run config is checked, before
any data is prepared; it returns the run's Plan (which method, when to evaluate, LR segments).

  scratch  target model; one warmup+cosine over T
  idea     enlarged model; one warmup+cosine over T; iterative pruning in [t_w, t_w + t_p]; recovery
  naive    enlarged model; warmup+cosine over [0, t_w) (decays fully); one-shot prune at t_w;
           a NEW warmup+cosine over [t_w, T)
  oneshot  enlarged model; one-shot prune at t_w; the run's schedule resumed (or restarted at t_w)

  scratch with oneshot_schedule: restarted is the LR-restart control (the restart, no pruning);
  naive_fresh_optimizer gives naive empty AdamW moments after its prune; train.schedule: wsd makes every
  segment warmup-stable-decay (pipelines then prune inside the stable phase).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import BaseModel

from lmprune.config import RunConfig
from lmprune.errors import UserError
from lmprune.models import PRESETS, check_model_dir
from lmprune.pruning import METHODS, method_sections
from lmprune.pruning.ffn.pruner import FFNPruneConfig, resolve_target_width, validate_window
from lmprune.schedules import segmented_warmup_cosine
from lmprune.mixture import check_mixture_sources
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
    method: str | None
    """The training-time pruning method (a key of lmprune.pruning.METHODS), None for plain training."""
    method_config: BaseModel | None
    """Its config: the run config's section, or the FFN pruner config a pipeline derives."""
    kd_start: int | None
    """First step with distillation (None = no KD)."""
    eval_steps: frozenset[int] = field(default_factory=frozenset)
    """Completed-step counts with an evaluation besides train.eval_every and the end (0 = before training)."""
    wsd_decay: float | None = None
    """train.schedule wsd: the decay fraction of every segment (None = warmup+cosine)."""
    prune_start: int | None = None
    """t_w of a pipeline (also of scratch, whose restart control restarts there): where runs that share a
    trunk diverge, and the end of the steps whose windows the retention probe draws from."""

    @property
    def prune(self) -> FFNPruneConfig | None:
        """The FFN pruner's config when the method is FFN pruning (pipelines, `prune:`)."""
        return self.method_config if isinstance(self.method_config, FFNPruneConfig) else None

    def lr_at(self, step: int, peak: float, end: float, warmup: int) -> float:
        return segmented_warmup_cosine(step, peak, end, warmup, list(self.lr_segments), self.wsd_decay)

    def evaluates_after(self, done: int, eval_every: int, total_steps: int) -> bool:
        """Whether the loop evaluates once `done` steps are complete."""
        return done == total_steps or (eval_every > 0 and done % eval_every == 0) or done in self.eval_steps


def model_dir_config(cfg: RunConfig) -> dict | None:
    """The HF config dict of model.path (validated: no remote code, safetensors), None for a preset."""
    return check_model_dir(resolve_model(cfg.model.path)) if cfg.model.path else None


def configured_width(cfg: RunConfig, hf_config: dict | None = None) -> int:
    """FFN width the `model` section describes (preset + override, or the HF dir's config)."""
    if cfg.model.path:
        config = hf_config if hf_config is not None else model_dir_config(cfg)
        if "intermediate_size" not in config:
            raise UserError(f"{cfg.model.path}: config has no intermediate_size (not a Llama-family FFN)")
        return int(config["intermediate_size"])
    return cfg.model.intermediate_size or PRESETS[cfg.model.preset or "tiny"]["intermediate_size"]


def enlarged_width(target: int, factor: float, round_to: int) -> int:
    return int(math.ceil(target * factor / round_to) * round_to)


def validate_run(cfg: RunConfig) -> Plan:
    """Check every cross-section rule of a run config (UserError: one line) and resolve its Plan.

    Reads only the config, whether data.sources exist, and, for model.path / kd.teacher, the model dirs'
    config files: nothing is prepared, trained or written. Rules that need the tokenized data (vocab sizes) are checked by the
    trainer right after the data is opened, before its first step.
    """
    methods = method_sections(cfg)
    if cfg.pipeline is not None:
        methods = ["pipeline", *methods]
    if len(methods) > 1:
        raise UserError(f"give one pruning method, not {' and '.join(methods)}")
    if cfg.pipeline is not None and cfg.pipeline.name != "scratch" and cfg.model.path:
        raise UserError("pipelines enlarge a preset model; model.path cannot be enlarged")
    check_mixture_sources(cfg.data)
    hf_config = model_dir_config(cfg)
    max_positions = (hf_config or {}).get("max_position_embeddings") or cfg.model.max_position_embeddings
    if max_positions is not None and cfg.train.seq_len > int(max_positions):
        raise UserError(f"train.seq_len {cfg.train.seq_len} exceeds the model's max_position_embeddings "
                        f"{max_positions}")
    if cfg.kd is not None and cfg.kd.teacher is not None:
        check_model_dir(resolve_model(cfg.kd.teacher))
    plan = resolve_plan(cfg, hf_config)
    check_schedule_rules(cfg, plan)
    if plan.method is not None:
        METHODS[plan.method].check_plan(plan.method_config, cfg.train.steps, plan.initial_width)
    return plan


def check_schedule_rules(cfg: RunConfig, plan: Plan) -> None:
    """The control knobs apply where they mean something; wsd prunes inside the stable phase."""
    pipe = cfg.pipeline
    if pipe is not None and pipe.naive_fresh_optimizer and pipe.name != "naive":
        raise UserError(f"pipeline.naive_fresh_optimizer is for pipeline naive, not {pipe.name}")
    if cfg.train.retention_windows and plan.prune_start is None:
        raise UserError("train.retention_windows needs a pipeline (the probe draws windows seen before prune_start)")
    if plan.wsd_decay is None or plan.prune is None or (pipe is not None and pipe.name == "naive"):
        return
    decay_start = cfg.train.steps - int(round(plan.wsd_decay * cfg.train.steps))
    if plan.prune.end_step > decay_start:
        raise UserError(f"train.schedule wsd: pruning ends at step {plan.prune.end_step}, after the decay starts "
                        f"(step {decay_start}); prune inside the stable phase (lower train.wsd_decay or the window)")


def _kd_start(cfg: RunConfig, snapshot_step: int | None, why: str) -> int | None:
    """Step distillation starts: 0 with a teacher dir, else the snapshot of the enlarged model."""
    if cfg.kd is None:
        return None
    if cfg.kd.teacher is not None:
        return 0
    if snapshot_step is None:
        raise UserError(why)
    return snapshot_step


def resolve_plan(cfg: RunConfig, hf_config: dict | None = None) -> Plan:
    """Resolve pipeline / method / kd sections into a Plan (use `validate_run`, which also checks)."""
    steps = cfg.train.steps
    pipe = cfg.pipeline
    if pipe is None:
        width = configured_width(cfg, hf_config)
        sections = method_sections(cfg)
        name = sections[0] if sections else None
        method_cfg = getattr(cfg, name) if name else None
        target = width
        if isinstance(method_cfg, FFNPruneConfig):
            target = resolve_target_width(method_cfg, width)
        snapshot = method_cfg.start_step if isinstance(method_cfg, FFNPruneConfig) else None
        kd_start = _kd_start(cfg, snapshot, "kd.teacher must name a HF dir (no pruning here to snapshot a teacher from)")
        eval_steps = METHODS[name].eval_steps(method_cfg, steps) if name else frozenset()
        wsd = cfg.train.wsd_decay if cfg.train.schedule == "wsd" else None
        return Plan(width, target, ((0, steps),), name, method_cfg, kd_start, eval_steps, wsd_decay=wsd)

    target = configured_width(cfg, hf_config)
    if target % pipe.round_to:
        raise UserError(f"the target FFN width {target} is not a multiple of pipeline.round_to {pipe.round_to}")
    t_w = int(round(pipe.prune_start * steps))
    wsd = cfg.train.wsd_decay if cfg.train.schedule == "wsd" else None
    if pipe.name == "scratch":
        kd_start = _kd_start(cfg, None, "pipeline scratch has no enlarged model to distil from: set kd.teacher to a HF dir")
        segments = ((0, steps), (t_w, steps - t_w)) if pipe.oneshot_schedule == "restarted" else ((0, steps),)
        return Plan(target, target, segments, None, None, kd_start, wsd_decay=wsd, prune_start=t_w)
    kd_start = _kd_start(cfg, t_w, "")

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
                           state_dtype=pipe.state_dtype, seed=cfg.train.seed,
                           fresh_optimizer=pipe.naive_fresh_optimizer)
    resolve_target_width(prune, initial)
    validate_window(prune, steps)
    if cfg.train.warmup >= t_w:
        raise UserError(f"train.warmup ({cfg.train.warmup}) must end before pruning starts (step {t_w})")
    return Plan(initial, target, segments, "prune", prune, kd_start, wsd_decay=wsd, prune_start=t_w)
