"""Importance of the FFN neurons of SwiGLU blocks, for training-time structured pruning.

Layout of one block with `inter` neurons and model width `hidden` (HF `nn.Linear` weights):
gate_proj.weight and up_proj.weight are [inter, hidden] (neuron j = row j), down_proj.weight is
[hidden, inter] (neuron j = column j). A neuron's score is

    s_j = f2( f1(S_gate[j, :]), f1(S_up[j, :]), f1(S_down[:, j]) )

with S a per-weight score (|w * grad| averaged over steps, |w|, ...), f1 and f2 from `REDUCTIONS`.

Sensitivity EMA (IDEA Prune, after PLATON): I_t = |w * dL/dw|, Ibar_t = lam * Ibar_{t-1} + (1 - lam) * I_t.
Ibar starts at 0 (as in PLATON), so after n updates every score carries the same factor 1 - lam**n:
rankings are unaffected, and the per-neuron and per-weight paths below agree exactly from step one.
Optional uncertainty: U_t = |I_t - Ibar_t| (with the updated Ibar_t, docs/algorithms.md, "IDEA Prune"; this is lam times
PLATON's |I_t - Ibar_{t-1}|, the same ranking), Ubar_t = b2 * Ubar_{t-1} + (1 - b2) * U_t,
per-weight score Ibar * Ubar.

Memory: for f1 in {mean, sum} without uncertainty the EMA commutes with the reduction, so only the
reduced [3, inter] vectors per layer are kept (O(neurons)): 3 numbers per neuron against the neuron's
3 x hidden weights, a ratio below 1 / hidden. f1 in {max, l2} or the uncertainty term need per-weight
buffers: one (or two, with uncertainty) copies of every FFN weight.

Storage dtype: the buffers may be stored in bfloat16 (half the bytes; worth it for the per-weight
buffers, which are as large as the FFN). Updates are always computed in fp32 and rounded once when
stored, so the stored EMA stays within about 2**-9 / (1 - lam) relative error of the fp32 EMA (0.4% at
lam = 0.5): the EMA stops moving once a step's change (1 - lam) * |I - Ibar| falls under half a bf16
ulp. That is why bf16 storage is refused for lam > 0.9 (see FFNPruneConfig).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lmprune.errors import UserError
from lmprune.sharding import is_sharded

__all__ = [
    "LINEAR_REDUCTIONS", "REDUCTIONS", "SensitivityEMA", "combine_matrices", "magnitude_scores",
    "neuron_scores", "random_scores", "reduce_neuron_slices", "sharded_neuron_slices",
]

MATRICES = ("gate", "up", "down")
# Neuron j's slice is a row of gate/up ([inter, hidden]) and a column of down ([hidden, inter]):
# reduce over the `hidden` axis of each.
HIDDEN_AXIS = {"gate": 1, "up": 1, "down": 0}


def _mean(x: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    return x.mean(dim, dtype=dtype)


def _sum(x: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    return x.sum(dim, dtype=dtype)


def _max(x: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    return x.amax(dim).to(dtype)


def _l2(x: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vector_norm(x, dim=dim, dtype=dtype)


# f1 / f2 choices: reduce `x` over axis `dim`, accumulating and returning in `dtype`.
REDUCTIONS: dict[str, Callable[[Tensor, int, torch.dtype], Tensor]] = {
    "mean": _mean, "sum": _sum, "max": _max, "l2": _l2,
}
# Reductions that commute with an EMA (linear), so the EMA can live on the reduced vectors.
LINEAR_REDUCTIONS = ("mean", "sum")


def reduce_neuron_slices(gate: Tensor, up: Tensor, down: Tensor, f1: str,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """f1 over each neuron's slice of each matrix: gate/up [inter, hidden], down [hidden, inter] -> [3, inter]."""
    reduce = REDUCTIONS[f1]
    return torch.stack([reduce(gate, 1, dtype), reduce(up, 1, dtype), reduce(down, 0, dtype)])


def combine_matrices(per_matrix: Tensor, f2: str) -> Tensor:
    """f2 across the three matrices: [3, inter] -> [inter]."""
    return REDUCTIONS[f2](per_matrix, 0, per_matrix.dtype)


def neuron_scores(gate: Tensor, up: Tensor, down: Tensor, f1: str, f2: str,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-neuron score [inter] from per-weight scores of the three matrices (f1 within, f2 across)."""
    return combine_matrices(reduce_neuron_slices(gate, up, down, f1, dtype), f2)


def magnitude_scores(gate_w: Tensor, up_w: Tensor, down_w: Tensor, f1: str, f2: str) -> Tensor:
    """Neuron scores from |w| (no history needed): [inter]."""
    if is_sharded(gate_w):
        reduced = sharded_neuron_slices([[gate_w.detach().abs(), up_w.detach().abs(), down_w.detach().abs()]], f1)
        return combine_matrices(reduced[0], f2)
    dtype = torch.promote_types(gate_w.dtype, torch.float32)
    return neuron_scores(gate_w.detach().abs(), up_w.detach().abs(), down_w.detach().abs(), f1, f2, dtype)


def random_scores(num_layers: int, width: int, generator: torch.Generator) -> Tensor:
    """Uniform random neuron scores [num_layers, width] from a (CPU) generator the caller owns and saves."""
    return torch.rand(num_layers, width, generator=generator)


# Under FSDP each rank holds some gate/up rows (whole neurons) and some down rows (a part of every
# neuron's column): f1 is then a per-rank partial vector [3, inter] combined by one all-reduce.
_SHARDED_PARTIAL: dict[str, tuple[str, Callable[[Tensor, int], Tensor]]] = {
    "mean": ("sum", lambda x, dim: x.sum(dim, dtype=torch.float32)),
    "sum": ("sum", lambda x, dim: x.sum(dim, dtype=torch.float32)),
    "max": ("max", lambda x, dim: x.amax(dim).float()),
    "l2": ("sum", lambda x, dim: x.float().square().sum(dim)),
}


def sharded_neuron_slices(layers: Sequence[Sequence[Tensor]], f1: str) -> Tensor:
    """f1 over each neuron's slices, [L, 3, inter] fp32, from per-weight scores given as dim-0 sharded
    DTensors (gate, up, down) per layer: local partial vectors, then ONE all-reduce of L*3*inter numbers."""
    from lmprune.sharding import all_reduce_, local, row_range

    op, reduce = _SHARDED_PARTIAL[f1]
    gate0 = layers[0][0]
    width, hidden = gate0.shape
    partial = torch.zeros(len(layers), 3, width, dtype=torch.float32, device=local(gate0).device)
    for index, (gate, up, down) in enumerate(layers):
        start, stop = row_range(gate)
        partial[index, 0, start:stop] = reduce(local(gate), 1)
        partial[index, 1, start:stop] = reduce(local(up), 1)
        partial[index, 2] = reduce(local(down), 0)  # this rank's share of every neuron's column
    all_reduce_(partial, op)
    if f1 == "mean":
        partial /= hidden
    elif f1 == "l2":
        partial.sqrt_()
    return partial


def _ema_update(stored: Tensor, value: Tensor, lam: float) -> Tensor:
    """stored <- lam * stored + (1 - lam) * value, computed in value's dtype; returns the computed EMA.

    In place when the dtypes agree; for a narrower stored dtype (bf16) the EMA is computed in full
    precision and rounded once on the way back, so rounding errors do not compound within a step.
    """
    if stored.dtype == value.dtype:
        return stored.mul_(lam).add_(value, alpha=1.0 - lam)
    updated = stored.to(value.dtype).mul_(lam).add_(value, alpha=1.0 - lam)
    stored.copy_(updated)
    return updated


class SensitivityEMA:
    """EMA of the sensitivity |w * dL/dw| of the FFN neurons of `num_layers` SwiGLU blocks.

    Call `update()` once per optimizer step with every layer's weights and gradients, `scores()` to
    rank. The state is per neuron ([num_layers, 3, inter]) when f1 is linear and there is no
    uncertainty term, per weight otherwise (see the module docstring); `per_weight=True` forces the
    per-weight path (used by tests to check that both agree). `dtype` is the storage dtype of the
    buffers (updates are computed in fp32, or the weights' dtype if wider).
    """

    def __init__(self, num_layers: int, width: int, hidden: int, f1: str, f2: str, ema: float,
                 uncertainty: bool = False, uncertainty_ema: float = 0.85, per_weight: bool | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if f1 not in REDUCTIONS or f2 not in REDUCTIONS:
            raise ValueError(f"f1/f2 must be in {sorted(REDUCTIONS)}, got {f1!r}/{f2!r}")
        needs_per_weight = uncertainty or f1 not in LINEAR_REDUCTIONS
        if per_weight is None:
            per_weight = needs_per_weight
        elif not per_weight and needs_per_weight:
            raise ValueError(f"f1={f1!r} with uncertainty={uncertainty} needs per-weight buffers")
        self.num_layers, self.width, self.hidden = num_layers, width, hidden
        self.f1, self.f2, self.ema = f1, f2, ema
        self.uncertainty, self.uncertainty_ema = uncertainty, uncertainty_ema
        self.per_weight, self.dtype = per_weight, dtype
        self.updates = 0  # optimizer steps accumulated so far
        shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
        if per_weight:
            def buffers() -> list[dict[str, Tensor]]:
                return [{m: torch.zeros(shapes[m], dtype=dtype, device=device) for m in MATRICES}
                        for _ in range(num_layers)]
            self.weight_ema = buffers()
            self.weight_unc = buffers() if uncertainty else None
        else:
            self.neuron_ema = torch.zeros(num_layers, 3, width, dtype=dtype, device=device)  # [L, 3, inter]

    @torch.no_grad()
    def update(self, weights: Sequence[Sequence[Tensor]], grads: Sequence[Sequence[Tensor]]) -> None:
        """Fold one step's I = |w * grad| into the EMA; weights[l] / grads[l] = (gate, up, down) of layer l."""
        lam = self.ema
        if not self.per_weight and is_sharded(weights[0][0]):
            scores = [[torch.mul(w, g).abs_() for w, g in zip(layer_w, layer_g, strict=True)]
                      for layer_w, layer_g in zip(weights, grads, strict=True)]
            reduced = sharded_neuron_slices(scores, self.f1)  # [L, 3, inter], identical on every rank
            for layer in range(self.num_layers):
                for index in range(len(MATRICES)):
                    _ema_update(self.neuron_ema[layer, index], reduced[layer, index], lam)
            self.updates += 1
            return
        for layer, (layer_w, layer_g) in enumerate(zip(weights, grads, strict=True)):
            for index, (name, w, g) in enumerate(zip(MATRICES, layer_w, layer_g, strict=True)):
                sensitivity = torch.mul(w, g).abs_()  # I, same shape as w
                compute = torch.promote_types(sensitivity.dtype, torch.float32)
                if not self.per_weight:
                    reduced = REDUCTIONS[self.f1](sensitivity, HIDDEN_AXIS[name], compute)
                    _ema_update(self.neuron_ema[layer, index], reduced, lam)
                    continue
                sensitivity = sensitivity.to(compute)  # no copy for fp32 weights
                ibar = _ema_update(self.weight_ema[layer][name], sensitivity, lam)
                if self.weight_unc is not None:
                    uncertainty = sensitivity.sub_(ibar).abs_()  # U = |I - Ibar| (in place of I)
                    _ema_update(self.weight_unc[layer][name], uncertainty, self.uncertainty_ema)
        self.updates += 1

    @torch.no_grad()
    def scores(self) -> Tensor:
        """Neuron scores [num_layers, inter] (higher = more important)."""
        if not self.per_weight:
            return REDUCTIONS[self.f2](self.neuron_ema, 1, self.dtype)  # f2 over the 3 matrices
        rows = []
        for layer in range(self.num_layers):
            per_weight = self.weight_ema[layer]
            if self.weight_unc is not None:
                per_weight = {m: per_weight[m] * self.weight_unc[layer][m] for m in MATRICES}
            rows.append(neuron_scores(per_weight["gate"], per_weight["up"], per_weight["down"],
                                      self.f1, self.f2, self.dtype))
        return torch.stack(rows)

    def nbytes(self) -> int:
        """Bytes held by the EMA state."""
        return sum(t.numel() * t.element_size() for t in self._buffers().values())

    def _buffers(self) -> dict[str, Tensor]:
        if not self.per_weight:
            return {"neuron_ema": self.neuron_ema}
        out = {f"weight_ema.{layer}.{m}": self.weight_ema[layer][m]
               for layer in range(self.num_layers) for m in MATRICES}
        if self.weight_unc is not None:
            out.update({f"weight_unc.{layer}.{m}": self.weight_unc[layer][m]
                        for layer in range(self.num_layers) for m in MATRICES})
        return out

    def state_dict(self) -> dict[str, Any]:
        """`updates` plus the buffers (live tensors); buffers are left out while still all zero."""
        state: dict[str, Any] = {"updates": self.updates}
        if self.updates:
            state.update(self._buffers())
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffers = self._buffers()
        if "updates" not in state:
            raise UserError("pruner checkpoint holds no sensitivity state (was it written with another importance?)")
        self.updates = int(state["updates"])
        if not self.updates:
            return
        saved = {k for k in state if k != "updates"}
        if saved != set(buffers):
            raise UserError(f"pruner checkpoint holds importance buffers {sorted(saved)[:3]}..., expected "
                            f"{sorted(buffers)[:3]}...: the checkpoint was written with other f1/uncertainty "
                            "settings or another model")
        for key, buffer in buffers.items():
            if state[key].shape != buffer.shape:
                raise UserError(f"pruner checkpoint: {key} has shape {tuple(state[key].shape)}, "
                                f"expected {tuple(buffer.shape)}")
            if state[key].dtype != buffer.dtype:
                raise UserError(f"pruner checkpoint: {key} is {state[key].dtype}, expected {buffer.dtype} "
                                "(the checkpoint was written with another importance state_dtype)")
            buffer.copy_(state[key])
