"""IDEA Prune: structured pruning of FFN neurons during training, then compaction.

Formulas: docs/algorithms.md, "IDEA Prune".

A neuron j of a SwiGLU block is row j of gate_proj and up_proj and column j of down_proj; the three
are pruned together. `FFNPruner` is a training hook (`lmprune.pruning.hooks.CompactingHook`): it ranks
neurons by an importance score (`importance.py`), masks them on a cubic schedule, and finally slices
the model and the AdamW state to the kept neurons (`compaction.py`), so recovery runs at target size
under the same LR schedule.

Masks never enter forward(). A pruned neuron's weights are zero; its gradients are zeroed in
`after_backward` (before clipping, so the gradient norm is the compacted model's); its AdamW moments
are zeroed when it is pruned; its weights are re-zeroed after every optimizer step. With zero weight,
gradient and moments, AdamW (weight decay included) leaves it at exactly zero, so the masked model
computes what the compacted one computes. Survivors keep their AdamW state.

Schedule: the pruned fraction is r(t) = cubic_ramp(t, start_step, span_steps, 0, R) with
R = (width - target) / width (the config's `ratio` after rounding the kept width to a multiple of
`round_to`). Masks update at start_step + k * prune_every inside the window and at
start_step + span_steps (the final update, which reaches the target width exactly). At an update,
round(r(t) * width) neurons per layer are pruned (global ranking: round(r(t) * all neurons), keeping
at least `min_width_fraction` of each layer). Masks are monotone: only survivors are ranked.

Global ranking gives non-uniform widths. HF Llama-family configs hold ONE intermediate_size, so such a
model cannot be compacted or exported: compaction raises UserError unless the widths happen to be
equal. Use ranking: per_layer (the default), or compact: false to keep the masked dense model.

Trainer call order (`lmprune.train.train_step` makes these calls)
  fresh run  validate first: FFNPruneConfig, resolve_target_width(cfg, intermediate_size),
             validate_window(cfg, total_steps). Then pruner.apply(model); optimizer = make_optimizer(model);
             per step: backward -> after_backward(model, step) -> clip -> optimizer.step() ->
             events = after_optimizer_step(model, optimizer, step); if events.compact:
             optimizer = compact(model, optimizer) (parameters rebuilt: re-wrap DDP / compile).
  resume     (a) model rebuilt from the checkpoint's HF config (already compacted if the run was) and
             its weights loaded: apply(model) and load_state_dict(state), in either order; or
             (b) the original dense model: load_state_dict(state) THEN apply(model), which compacts the
             model if the state is compacted (or call prepare_model_for_resume(model, state) yourself);
             load the weights and build the optimizer after that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn

from lmprune.errors import UserError
from lmprune.pruning.ffn.compaction import (
    MakeOptimizer,
    compact_ffn,
    ffn_blocks,
    neuron_params,
    prepare_model_for_resume,
)
from lmprune.pruning.ffn.importance import SensitivityEMA, magnitude_scores, random_scores
from lmprune.pruning.surgery import count_parameters
from lmprune.sharding import index_fill_, is_sharded
from lmprune.pruning.hooks import StepEvents
from lmprune.schedules import cubic_ramp

__all__ = [
    "FFNPruneConfig", "FFNPruner", "compact_ffn", "ffn_blocks", "min_kept_width",
    "prepare_model_for_resume", "prune_lowest_global", "prune_lowest_per_layer", "resolve_target_width",
    "validate_window",
]

Reduction = Literal["mean", "sum", "max", "l2"]


# Storage dtype of the importance buffers, given the weights' dtype (fp32 = at least fp32, e.g. fp64 in tests).
STATE_DTYPES: dict[str, Callable[[torch.dtype], torch.dtype]] = {
    "fp32": lambda weight_dtype: torch.promote_types(weight_dtype, torch.float32),
    "bf16": lambda weight_dtype: torch.bfloat16,
}


class FFNPruneConfig(BaseModel):
    """IDEA Prune: iterative structured pruning of FFN neurons during training."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    start_step: int
    """Step t_w where the pruning window starts (nothing is pruned before it)."""
    span_steps: int
    """Length t_p of the window: the target width is reached at start_step + span_steps (0 = one shot)."""
    ratio: float | None = None
    """Fraction R of FFN neurons to prune, in (0, 1); the kept width rounds to a multiple of round_to."""
    target_width: int | None = None
    """Final FFN width (intermediate_size) of every layer, a multiple of round_to (instead of ratio)."""
    round_to: int = 8
    """The target width is a multiple of this (hardware-friendly shapes)."""
    prune_every: int = 5
    """Steps between mask updates inside the window."""
    importance: Literal["sensitivity", "magnitude", "random"] = "sensitivity"
    """Neuron score: EMA of |w * grad| (IDEA), |w|, or seeded random (a baseline)."""
    ema: float = 0.5
    """EMA coefficient lambda of the sensitivity, Ibar = lambda*Ibar + (1-lambda)*I; in [0, 1)."""
    f1: Reduction = "mean"
    """Reduction of per-weight scores within a neuron's row/column of one matrix (max/l2 need per-weight buffers)."""
    f2: Reduction = "max"
    """Reduction across the neuron's three matrices (gate, up, down)."""
    uncertainty: bool = False
    """Multiply by the PLATON uncertainty EMA of |I - Ibar| (needs 2 fp32 copies of the FFN weights)."""
    uncertainty_ema: float = 0.85
    """EMA coefficient b2 of the uncertainty term; in [0, 1)."""
    state_dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage dtype of the sensitivity EMA buffers: bf16 halves them (updates still computed in fp32;
    about 2**-9/(1-ema) relative error, so only for ema <= 0.9 and uncertainty_ema <= 0.9)."""
    ranking: Literal["per_layer", "global"] = "per_layer"
    """per_layer: every layer ends at the target width; global: one threshold (non-uniform, not exportable)."""
    min_width_fraction: float = 0.1
    """Global ranking: each layer keeps at least this fraction of its width (and at least 1 neuron)."""
    compact: bool = True
    """After the final mask update, slice model and optimizer to the kept neurons (uniform widths only)."""
    fresh_optimizer: bool = False
    """After compaction the optimizer starts afresh (empty AdamW moments) instead of carrying the kept
    neurons' moments: the naive baseline's prune-then-retrain."""
    track_from: int | None = None
    """First step whose gradients feed the sensitivity EMA; default max(0, start_step - 2*prune_every)."""
    seed: int = 0
    """Seed of the random importance."""

    @model_validator(mode="after")
    def _check(self) -> FFNPruneConfig:
        for name in ("start_step", "span_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.ratio is None) == (self.target_width is None):
            raise ValueError("give exactly one of ratio (fraction pruned) and target_width (width kept)")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio (fraction of FFN neurons pruned) must be in (0, 1), got {self.ratio}")
        if self.target_width is not None and self.target_width <= 0:
            raise ValueError(f"target_width must be > 0, got {self.target_width}")
        for name in ("round_to", "prune_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ema", "uncertainty_ema", "min_width_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.track_from is not None and not 0 <= self.track_from <= self.start_step:
            raise ValueError(f"track_from must be in [0, start_step={self.start_step}], got {self.track_from}")
        if self.uncertainty and self.importance != "sensitivity":
            raise ValueError(f"uncertainty applies to importance 'sensitivity' only, not {self.importance!r}")
        if self.uncertainty and self.ema == 0.0:
            raise ValueError("uncertainty needs ema > 0: with ema 0, Ibar = I and |I - Ibar| is always 0")
        if self.state_dtype == "bf16":
            coefficients = {"ema": self.ema, **({"uncertainty_ema": self.uncertainty_ema} if self.uncertainty else {})}
            for name, value in coefficients.items():
                if value > 0.9:
                    raise ValueError(f"state_dtype bf16 needs {name} <= 0.9, got {value}: a bf16 EMA stops "
                                     f"moving within ~2**-9/(1-{name}) of its target (use state_dtype fp32)")
        return self

    @property
    def tracking_start(self) -> int:
        """First step whose gradients are folded into the sensitivity EMA."""
        if self.track_from is not None:
            return self.track_from
        return max(0, self.start_step - 2 * self.prune_every)

    @property
    def end_step(self) -> int:
        """Step of the final mask update (the target width is reached here)."""
        return self.start_step + self.span_steps


def resolve_target_width(cfg: FFNPruneConfig, intermediate_size: int) -> int:
    """The FFN width every layer ends at; UserError unless 0 < target < width and a multiple of round_to
    (and, for global ranking, at least the per-layer minimum).

    With `ratio`, the kept width width * (1 - ratio) is rounded to the nearest multiple of round_to
    (halves up), as in one-shot pruning.
    """
    width, step = intermediate_size, cfg.round_to
    if cfg.target_width is not None:
        target = cfg.target_width
        if not 0 < target < width:
            raise UserError(f"target_width {target} must be in (0, intermediate_size={width})")
        if target % step:
            raise UserError(f"target_width {target} must be a multiple of round_to={step}")
    else:
        kept = width * (1.0 - cfg.ratio)
        target = step * math.floor(kept / step + 0.5)
        if not 0 < target < width:
            raise UserError(f"ratio {cfg.ratio} of intermediate_size {width} keeps {kept:g} neurons, which rounds "
                            f"to {target} at a multiple of round_to={step}; it must be in (0, {width})")
    if cfg.ranking == "global" and min_kept_width(cfg, width) > target:
        raise UserError(f"min_width_fraction {cfg.min_width_fraction} keeps {min_kept_width(cfg, width)} neurons "
                        f"per layer, more than the target width {target}")
    return target


def min_kept_width(cfg: FFNPruneConfig, intermediate_size: int) -> int:
    """Global ranking: the fewest neurons a layer keeps (min_width_fraction of its width, at least 1)."""
    return max(1, math.ceil(cfg.min_width_fraction * intermediate_size))


def validate_window(cfg: FFNPruneConfig, total_steps: int) -> None:
    """UserError unless the final mask update (step start_step + span_steps) is a step of the run."""
    if cfg.end_step >= total_steps:
        raise UserError(f"pruning window [start_step={cfg.start_step}, start_step+span_steps={cfg.end_step}] "
                        f"must end inside the run's steps 0..{total_steps - 1}")


def prune_lowest_per_layer(scores: Tensor, keep_mask: Tensor, num_pruned: int) -> Tensor:
    """New keep mask [L, W] with `num_pruned` neurons pruned in every layer (lowest-scored survivors go)."""
    new_mask = keep_mask.clone()
    candidates = scores.masked_fill(~keep_mask, math.inf)  # pruned neurons are never picked again
    for layer in range(keep_mask.shape[0]):
        extra = num_pruned - int((~keep_mask[layer]).sum())
        if extra > 0:
            new_mask[layer, torch.topk(candidates[layer], extra, largest=False).indices] = False
    return new_mask


def prune_lowest_global(scores: Tensor, keep_mask: Tensor, num_pruned: int, min_keep: int) -> Tensor:
    """New keep mask [L, W] with `num_pruned` neurons pruned in all, lowest scores across layers first,
    every layer keeping at least `min_keep`."""
    extra = num_pruned - int((~keep_mask).sum())
    if extra <= 0:
        return keep_mask.clone()
    width = keep_mask.shape[1]
    sorted_scores, order = scores.masked_fill(~keep_mask, math.inf).sort(dim=1, stable=True)  # [L, W]
    # Layer l may lose its (kept_l - min_keep) lowest survivors; the lowest `extra` of those go.
    removable = (keep_mask.sum(1) - min_keep).clamp(min=0)  # [L]
    candidate = torch.arange(width, device=keep_mask.device)[None, :] < removable[:, None]  # [L, W]
    if extra > int(candidate.sum()):
        raise ValueError(f"cannot prune {extra} more neurons while keeping {min_keep} per layer")
    layers, positions = candidate.nonzero(as_tuple=True)
    chosen = torch.topk(sorted_scores[layers, positions], extra, largest=False).indices
    new_mask = keep_mask.clone()
    new_mask[layers[chosen], order[layers[chosen], positions[chosen]]] = False
    return new_mask


class FFNPruner:
    """IDEA Prune as a training hook: importance tracking, cubic-schedule masks, compaction.

    `make_optimizer(model)` builds the optimizer on a (compacted) model; required when cfg.compact.
    Public state: `keep_mask` [layers, original width] bool, `target_width`, `finished` (the final mask
    update happened), `compacted`.
    """

    def __init__(self, cfg: FFNPruneConfig, make_optimizer: MakeOptimizer | None = None):
        if cfg.compact and make_optimizer is None:
            raise ValueError("FFNPruner with compact=True needs make_optimizer to rebuild the optimizer")
        self.cfg = cfg
        self.export_patterns = None  # structured: no per-weight sparsity to export
        self.make_optimizer = make_optimizer
        self.keep_mask: Tensor | None = None
        self.target_width = 0
        self._min_keep = 1  # global ranking's per-layer minimum
        self.finished = False
        self.compacted = False
        self.last_mask_update_step = -1
        self._blocks: list[nn.Module] | None = None
        self._pending_state: dict[str, Any] | None = None  # loaded before apply()
        self._deferred_error: UserError | None = None
        self._tracker: SensitivityEMA | None = None
        self._generator = torch.Generator().manual_seed(cfg.seed) if cfg.importance == "random" else None
        self._pruned_indices: list[Tensor] = []  # per layer, on the weights' device
        self._kept_total = 0
        self._param_count = 0  # parameters of the model as it is (dense or compacted)
        self._params_per_neuron = 0

    # ---- setup and state ------------------------------------------------------------------
    def apply(self, model: nn.Module) -> None:
        """Find the FFN blocks and set up masks (all kept) and importance state, or restore a loaded state."""
        blocks = ffn_blocks(model)
        if is_sharded(blocks[0].gate_proj.weight) and self.cfg.importance == "sensitivity" and (
                self.cfg.uncertainty or self.cfg.f1 not in ("mean", "sum")):
            raise UserError(f"prune.importance sensitivity with f1 {self.cfg.f1!r} / uncertainty "
                            f"{self.cfg.uncertainty} needs per-weight buffers, which train.parallel fsdp does "
                            "not shard: use f1 mean or sum without uncertainty, or parallel ddp")
        self._blocks = blocks
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            prepare_model_for_resume(model, state)
            self._restore(state)
        else:
            widths = sorted({block.gate_proj.out_features for block in blocks})
            if len(widths) != 1:
                raise UserError(f"FFN pruning needs one FFN width in every layer, got {widths}")
            self.keep_mask = torch.ones(len(blocks), widths[0], dtype=torch.bool,
                                        device=blocks[0].gate_proj.weight.device)
            try:
                self._set_target(widths[0])
                self._make_tracker()
            except UserError as err:
                # A resumed model may already be at the target width and get its state after apply():
                # the error stands only if no state arrives before the first step.
                self._deferred_error = err
        self._params_per_neuron = sum(p.numel() // p.shape[axis] for p, axis in neuron_params(blocks[0]))
        self._param_count = count_parameters(model)
        self._refresh_indices()

    def _set_target(self, width: int) -> None:
        self.target_width = resolve_target_width(self.cfg, width)
        self._min_keep = min_kept_width(self.cfg, width)

    def _make_tracker(self) -> None:
        self._tracker = None
        if self.cfg.importance != "sensitivity" or self.finished or self.compacted:
            return
        gate = self._blocks[0].gate_proj
        cfg = self.cfg
        self._tracker = SensitivityEMA(
            len(self._blocks), gate.out_features, gate.in_features, cfg.f1, cfg.f2, cfg.ema,
            cfg.uncertainty, cfg.uncertainty_ema, dtype=STATE_DTYPES[cfg.state_dtype](gate.weight.dtype),
            device=gate.weight.device)

    def state_dict(self) -> dict[str, Any]:
        """Masks, schedule position, importance buffers, RNG: tensors (live) or JSON values."""
        self._check_ready()
        state: dict[str, Any] = {
            "keep_mask": self.keep_mask, "original_width": self.keep_mask.shape[1],
            "target_width": self.target_width, "last_mask_update_step": self.last_mask_update_step,
            "finished": self.finished, "compacted": self.compacted,
        }
        if self._tracker is not None:
            state.update({f"importance.{k}": v for k, v in self._tracker.state_dict().items()})
        if self._generator is not None:
            state["rng_state"] = self._generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state; before apply() it is kept until apply() (which then compacts if needed)."""
        if self._blocks is None:
            self._pending_state = dict(state)
            return
        self._restore(state)
        self._refresh_indices()

    def _restore(self, state: dict[str, Any]) -> None:
        keep_mask = state["keep_mask"].to(torch.bool)
        layers, width = keep_mask.shape
        if layers != len(self._blocks) or width != int(state["original_width"]):
            raise UserError(f"pruner checkpoint is for {layers} layers of width {width}, "
                            f"the model has {len(self._blocks)} layers")
        widths = [block.gate_proj.out_features for block in self._blocks]
        expected = keep_mask.sum(1).tolist() if state["compacted"] else [width] * layers
        if widths != expected:
            raise UserError(f"model FFN widths {widths} do not match the pruner checkpoint ({expected}); on resume "
                            "call load_state_dict() before apply(), or prepare_model_for_resume() first")
        self._set_target(width)
        if int(state["target_width"]) != self.target_width:
            raise UserError(f"pruner checkpoint prunes to width {state['target_width']}, "
                            f"the config to {self.target_width}")
        self.keep_mask = keep_mask.to(self._blocks[0].gate_proj.weight.device).clone()
        self.last_mask_update_step = int(state["last_mask_update_step"])
        self.finished, self.compacted = bool(state["finished"]), bool(state["compacted"])
        self._deferred_error = None
        self._make_tracker()
        if self._tracker is not None:
            prefix = "importance."
            self._tracker.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()
                                           if k.startswith(prefix)})
        if self._generator is not None:
            if "rng_state" not in state:
                raise UserError("pruner checkpoint has no RNG state for importance 'random'")
            self._generator.set_state(state["rng_state"])

    def _refresh_indices(self) -> None:
        if self.keep_mask is None:
            return
        self._kept_total = int(self.keep_mask.sum())
        self._pruned_indices = [] if self.compacted else [(~row).nonzero().squeeze(1) for row in self.keep_mask]

    def _check_ready(self) -> None:
        if self._blocks is None:
            raise RuntimeError("FFNPruner: call apply(model) first")
        if self._deferred_error is not None:
            raise self._deferred_error

    # ---- per-step hooks -------------------------------------------------------------------
    def reads_gradients(self, step: int) -> bool:
        """Whether after_backward(step) folds gradients into a statistic (the sensitivity EMA); outside
        that window it only zeroes pruned rows, so a non-finite step may be skipped on the device
        (lmprune.step.skips_on_device) with no host sync."""
        return not self.compacted and self._tracker is not None and step >= self.cfg.tracking_start

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        """Fold this step's |w * grad| into the EMA (from track_from until the final update); zero pruned grads."""
        self._check_ready()
        if self.compacted:
            return
        if self._tracker is not None and step >= self.cfg.tracking_start:
            weights = [self._ffn_weights(block) for block in self._blocks]
            grads = [tuple(p.grad for p in layer) for layer in weights]
            if any(g is None for layer in grads for g in layer):
                raise RuntimeError("FFNPruner.after_backward: an FFN weight has no gradient; "
                                   "call it after backward() and before zero_grad()")
            self._tracker.update(weights, grads)
        for block, pruned in self._with_pruned():
            for param, axis in neuron_params(block):
                if param.grad is not None:
                    index_fill_(param.grad, axis, pruned)  # FSDP: on this rank's shard

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> StepEvents:
        """Update masks on schedule and re-zero pruned weights; ask for compaction after the final update."""
        self._check_ready()
        if self.compacted:
            return StepEvents()
        cfg = self.cfg
        mask_updated = False
        if not self.finished and step >= cfg.start_step and (
                (step - cfg.start_step) % cfg.prune_every == 0 or step >= cfg.end_step):
            mask_updated = self._update_masks(step)
            if mask_updated:
                self._zero_pruned_moments(optimizer)
            self.last_mask_update_step = step
            if step >= cfg.end_step:
                self.finished = True
                self._tracker = None  # importance is no longer needed: free it
        for block, pruned in self._with_pruned():
            for param, axis in neuron_params(block):
                index_fill_(param, axis, pruned)
        return StepEvents(mask_updated=mask_updated, compact=self.finished and cfg.compact)

    def compact(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Slice the model and the AdamW moments to the kept neurons; the new optimizer (same hyper-parameters)."""
        self._check_ready()
        if not self.finished or self.compacted:
            raise RuntimeError("FFNPruner.compact: only once, after the final mask update")
        optimizer = compact_ffn(model, self.keep_mask, optimizer, self.make_optimizer)
        if self.cfg.fresh_optimizer:
            optimizer = self.make_optimizer(model)  # same hyper-parameters, no moments
        self.compacted = True
        self._param_count = count_parameters(model)
        self._refresh_indices()
        return optimizer

    def _update_masks(self, step: int) -> bool:
        """Prune up to the schedule's count at `step`; True if any neuron was newly pruned."""
        cfg = self.cfg
        layers, width = self.keep_mask.shape
        final_pruned = width - self.target_width  # per layer
        if step >= cfg.end_step:  # the final update reaches the target exactly
            per_layer, total = final_pruned, final_pruned * layers
        else:
            fraction = cubic_ramp(step, cfg.start_step, cfg.span_steps, 0.0, final_pruned / width)
            per_layer = min(round(fraction * width), final_pruned)
            total = min(round(fraction * width * layers), final_pruned * layers)
        goal = per_layer * layers if cfg.ranking == "per_layer" else total
        if goal <= self.keep_mask.numel() - self._kept_total:
            return False
        scores = self._scores()  # [L, W]
        if cfg.ranking == "per_layer":
            self.keep_mask = prune_lowest_per_layer(scores, self.keep_mask, per_layer)
        else:
            self.keep_mask = prune_lowest_global(scores, self.keep_mask, goal, self._min_keep)
        self._refresh_indices()
        return True

    def _scores(self) -> Tensor:
        """Neuron scores [L, W] on the masks' device (higher = more important)."""
        if self.cfg.importance == "sensitivity":
            return self._tracker.scores()
        if self.cfg.importance == "magnitude":
            return torch.stack([magnitude_scores(*self._ffn_weights(block), self.cfg.f1, self.cfg.f2)
                                for block in self._blocks])
        return random_scores(*self.keep_mask.shape, self._generator).to(self.keep_mask.device)

    def _zero_pruned_moments(self, optimizer: torch.optim.Optimizer) -> None:
        for block, pruned in self._with_pruned():
            for param, axis in neuron_params(block):
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:  # moments, not `step`
                        index_fill_(value, axis, pruned)

    def _with_pruned(self) -> list[tuple[nn.Module, Tensor]]:
        if self.compacted or self._kept_total == self.keep_mask.numel():
            return []
        return [(block, pruned) for block, pruned in zip(self._blocks, self._pruned_indices) if pruned.numel()]

    @staticmethod
    def _ffn_weights(block: nn.Module) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """(gate [W, H], up [W, H], down [H, W]) weights of one block."""
        return block.gate_proj.weight, block.up_proj.weight, block.down_proj.weight

    # ---- reporting ------------------------------------------------------------------------
    def metrics(self) -> dict[str, float | int | bool]:
        """pruned_fraction, ffn_width (mean kept), params (not counting pruned neurons)."""
        if self.keep_mask is None or self._deferred_error is not None:
            return {}
        layers, width = self.keep_mask.shape
        masked_present = 0 if self.compacted else self.keep_mask.numel() - self._kept_total
        return {"pruned_fraction": 1.0 - self._kept_total / (layers * width),
                "ffn_width": self._kept_total / layers,
                "params": self._param_count - masked_present * self._params_per_neuron}

    def importance_state_bytes(self) -> int:
        """Bytes held by the importance state now (allocated at apply(), freed after the final update)."""
        return self._tracker.nbytes() if self._tracker is not None else 0
