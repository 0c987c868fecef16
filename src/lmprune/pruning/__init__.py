"""Pruning methods, by family, and the one table the rest of lmprune reads them from.

  ffn/         IDEA Prune: training-time structured pruning of FFN neurons (importance, masks, compaction)
  sparse/      training-time unstructured pruning: masks, MGPP, GMP, IMP, a random baseline, sparse export
  pretrained/  one-shot structured pruning of pretrained models: calibration statistics, criteria, planning
  surgery.py   physical removal of FFN neurons, GQA groups and layers (shared by ffn/ and pretrained/)
  hooks.py     the contract between the training loop and a method (TrainingHook, StepEvents)

`METHODS` maps a config section name to its config class, hook builder and plan check. The config,
the trainer, compare, pipelines and the report read it and name no method: a new method is one
module plus one line here (README, "Adding a pruning method").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from lmprune.pruning.ffn.pruner import FFNPruneConfig, FFNPruner, resolve_target_width, validate_window
from lmprune.pruning.hooks import StepEvents, TrainingHook
from lmprune.pruning.sparse.gmp import GMPConfig, GMPPruner, check_gmp_plan
from lmprune.pruning.sparse.imp import IMPConfig, IMPPruner, check_imp_plan, imp_eval_steps, write_imp_report
from lmprune.pruning.sparse.mgpp import MGPPConfig, MGPPPruner, check_mgpp_plan
from lmprune.pruning.sparse.random_prune import RandomPruneConfig, RandomPruner, check_random_plan

__all__ = ["METHODS", "BuildContext", "Method", "StepEvents", "TrainingHook", "method_sections"]


@dataclass(frozen=True)
class BuildContext:
    """What a hook builder may use besides its own config section."""

    train_sequences: int
    """Training-set size in train.seq_len sequences (MGPP's default n)."""
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    """Builds the run's optimizer on a (compacted) model."""


def _no_eval_steps(cfg: Any, total_steps: int) -> frozenset[int]:
    return frozenset()


@dataclass(frozen=True)
class Method:
    """One training-time pruning method, as the rest of lmprune sees it."""

    config: type[BaseModel]
    """Its config section's class (the section is optional in a run config)."""
    build: Callable[[Any, BuildContext], TrainingHook]
    """(section config, context) -> the hook the trainer runs."""
    check_plan: Callable[[Any, int, int], None]
    """(section config, train.steps, the model's FFN width) -> None, UserError if it cannot run."""
    family: str
    """"structured" (shrinks the model) or "unstructured" (per-weight sparsity): how the report groups runs."""
    description: str
    """One line for `--help-config`."""
    final_sparsity: Callable[[Any], float | None] = field(default=lambda cfg: None)
    """The sparsity the method ends at (the report's x-axis), None for structured methods."""
    eval_steps: Callable[[Any, int], frozenset[int]] = _no_eval_steps
    """Completed-step counts at which the plan evaluates besides train.eval_every (0 = before training)."""
    write_report: Callable[[Path], None] | None = None
    """Extra report files written into OUT/ at the end of a run (e.g. IMP's ppl-vs-sparsity curve)."""


def _check_ffn_plan(cfg: FFNPruneConfig, total_steps: int, ffn_width: int) -> None:
    resolve_target_width(cfg, ffn_width)
    validate_window(cfg, total_steps)


def _mgpp(cfg: MGPPConfig, ctx: BuildContext) -> MGPPPruner:
    return MGPPPruner(cfg if cfg.n_train else cfg.model_copy(update={"n_train": max(1, ctx.train_sequences)}))


METHODS: dict[str, Method] = {
    "prune": Method(FFNPruneConfig, lambda cfg, ctx: FFNPruner(cfg, make_optimizer=ctx.make_optimizer),
                    _check_ffn_plan, "structured",
                    "Structured FFN pruning with explicit steps (set by `pipeline` when that is given)."),
    "mgpp": Method(MGPPConfig, _mgpp, lambda cfg, steps, width: check_mgpp_plan(cfg, steps), "unstructured",
                   "Unstructured magnitude pruning with a mixture-Gaussian prior (fine-tuning a model.path).",
                   final_sparsity=lambda cfg: cfg.s_f),
    "gmp": Method(GMPConfig, lambda cfg, ctx: GMPPruner(cfg), lambda cfg, steps, width: check_gmp_plan(cfg, steps),
                  "unstructured", "Gradual magnitude pruning (Zhu & Gupta cubic schedule).",
                  final_sparsity=lambda cfg: cfg.s_f),
    "imp": Method(IMPConfig, lambda cfg, ctx: IMPPruner(cfg), lambda cfg, steps, width: check_imp_plan(cfg, steps),
                  "unstructured", "Iterative magnitude pruning: rounds of {prune, fine-tune steps_per_round, evaluate}.",
                  final_sparsity=lambda cfg: cfg.sparsity_levels()[-1], eval_steps=imp_eval_steps,
                  write_report=write_imp_report),
    "random": Method(RandomPruneConfig, lambda cfg, ctx: RandomPruner(cfg),
                     lambda cfg, steps, width: check_random_plan(cfg, steps), "unstructured",
                     "Random unstructured pruning on a cubic schedule (a baseline).",
                     final_sparsity=lambda cfg: cfg.s_f),
}


def method_sections(cfg: Any) -> list[str]:
    """Names of the method sections a run config sets."""
    return [name for name in METHODS if getattr(cfg, name, None) is not None]
