"""Per-weight keep masks for unstructured pruning: which parameters are prunable, how masks are

Formulas: docs/algorithms.md, "Masks and thresholds".
chosen (magnitude, globally or per layer; N:M), enforced (weights, gradients, AdamW moments) and
saved in a pruner's state.

Masks are dicts `param name -> bool tensor` with True = keep. Names are those of
`model.named_parameters()` without DDP / torch.compile wrapper prefixes.

Under FSDP (`train.parallel: fsdp`) a mask covers this rank's rows of its (dim-0 sharded) parameter;
the global magnitude threshold comes from all-reduced per-tensor counts (the bisection below never
concatenates weights), so every rank picks the same threshold and together they prune exactly what
one process would. Saved masks are gathered to full size (`masks_to_state(keep, params)`), and a
full mask is cut to the rank's rows when it is bound (`checked_masks`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lmprune.errors import UserError
from lmprune.sharding import all_reduce_, gather_rows, is_sharded, local, row_range

Scope = Literal["global", "per_layer"]

DEFAULT_PATTERNS: tuple[str, ...] = (
    r"self_attn\.(q|k|v|o)_proj\.weight$",
    r"mlp\.(gate|up|down)_proj\.weight$",
)
"""Attention q/k/v/o and SwiGLU gate/up/down projections; embeddings, norms and lm_head are not matched."""


def parse_nm(spec: str) -> tuple[int, int]:
    """'N:M' -> (N, M) with 1 <= N < M, else ValueError."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
    if match is None:
        raise ValueError(f"nm must look like 'N:M' (e.g. '2:4'), got {spec!r}")
    keep, group = int(match.group(1)), int(match.group(2))
    if not 1 <= keep < group:
        raise ValueError(f"nm {spec!r}: need 1 <= N < M (keep N of every M weights)")
    return keep, group


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


def masked_parameters(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
    """Parameters named by `masks`, checked to exist with the masks' shapes."""
    params = {_clean_name(name): p for name, p in model.named_parameters()}
    for name, mask in masks.items():
        if name not in params:
            raise UserError(f"mask for {name!r} but the model has no such parameter")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise UserError(f"mask for {name!r} has shape {tuple(mask.shape)}, "
                            f"the parameter {tuple(params[name].shape)}")
    return {name: params[name] for name in masks}


def zero_pruned_params_(params: Mapping[str, Tensor], keep: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            local(p).masked_fill_(keep[name].logical_not(), 0.0)  # +0.0, never -0.0


def zero_pruned_grads_(params: Mapping[str, Tensor], keep: Mapping[str, Tensor]) -> None:
    for name, p in params.items():
        if p.grad is not None:
            local(p.grad).mul_(keep[name])


def zero_pruned_moments_(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor],
                          keep: Mapping[str, Tensor]) -> None:
    """Zero the optimizer state (AdamW exp_avg, exp_avg_sq, ...) of pruned entries so they never move."""
    for name, p in params.items():
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, Tensor) and value.shape == p.shape:
                local(value).masked_fill_(keep[name].logical_not(), 0)


def apply_masks_(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Set pruned weights (mask False) of `model` to +0.0 in place."""
    zero_pruned_params_(masked_parameters(model, masks), masks)


def zero_fraction(weights: Mapping[str, Tensor] | Sequence[Tensor]) -> float:
    """Exact fraction of entries equal to zero over all given tensors."""
    tensors = list(weights.values()) if isinstance(weights, Mapping) else list(weights)
    total = sum(t.numel() for t in tensors)  # global sizes, also of sharded tensors
    zeros = torch.tensor([sum(int((local(t).detach() == 0).sum()) for t in tensors)], dtype=torch.int64)
    if any(is_sharded(t) for t in tensors):
        all_reduce_(zeros)
    return int(zeros) / total if total else 0.0


# ----------------------------------------------------------------------------- masks

def _abs_keys(w: Tensor) -> Tensor:
    """|w| as float32 bit patterns (int32, same shape): integer order == order of |w|."""
    return w.detach().abs().to(torch.float32).contiguous().view(torch.int32)


def _global_int(value: int, sharded: bool, op: str = "sum") -> int:
    """An int summed (or maxed) over the ranks when the tensors are shards."""
    if not sharded:
        return value
    return int(all_reduce_(torch.tensor([value], dtype=torch.int64), op))


def _select_smallest(weights: list[Tensor], eligible: list[Tensor | None], k: int,
                     sharded: bool = False) -> tuple[list[Tensor], float]:
    """Prune masks (True = prune) taking exactly k eligible entries with the smallest |w|.

    Ineligible entries (eligible False) are pruned as well, outside the count. The k-th smallest
    |w| is found by bisection on the float bit patterns, counting per tensor, so no copy of all
    weights is ever made (about 31 passes over the weights). Ties at the threshold go to earlier
    tensors first, then to lower flat indices. Returns the masks and the threshold |w|.
    `sharded`: the tensors are this rank's row shards; counts are all-reduced (one int per pass) and
    ties go to lower ranks first (their rows come first), so the masks are one process's masks, cut.
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
        return _global_int(int(total), sharded)

    # invariant: count(lo) < k <= count(hi); keys are >= 0 so count(-1) == 0
    lo, count_lo = -1, 0
    hi = _global_int(max((int(_abs_keys(w).max()) for w in weights if w.numel()), default=0), sharded, "max")
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
            ties_to_take = _take_ties(prune, at_limit, ties_to_take, sharded)
        if e is not None:
            prune |= e.logical_not()
        masks.append(prune)
    threshold = torch.tensor([limit], dtype=torch.int32).view(torch.float32).item()
    return masks, threshold


def _take_ties(prune: Tensor, at_limit: Tensor, ties_to_take: int, sharded: bool) -> int:
    """Prune up to `ties_to_take` entries at the threshold, lowest flat index first (lower ranks first
    when sharded); the number still to take."""
    ties = at_limit.view(-1).nonzero().squeeze(1)
    before, everywhere = 0, ties.numel()
    if sharded:
        import torch.distributed as dist
        counts = torch.zeros(dist.get_world_size(), dtype=torch.int64)
        counts[dist.get_rank()] = ties.numel()
        all_reduce_(counts)
        before, everywhere = int(counts[:dist.get_rank()].sum()), int(counts.sum())
    mine = ties[:max(0, ties_to_take - before)]
    prune.view(-1)[mine] = True
    return max(0, ties_to_take - everywhere)


def magnitude_keep_masks(weights: Mapping[str, Tensor], sparsity: float, scope: Scope = "global",
                         previous_keep: Mapping[str, Tensor] | None = None,
                         sharded: bool | None = None) -> tuple[dict[str, Tensor], float]:
    """Keep masks pruning exactly round(sparsity * N) entries of smallest |w| (N over all tensors or per tensor).

    With `previous_keep`, previously pruned entries stay pruned and count toward the target
    (monotone masks). Returns (masks, threshold), threshold = the largest |w| newly pruned (0.0 if none).
    Sharded DTensor weights (or `sharded=True` with row shards): masks of this rank's rows, one threshold.
    """
    if sharded is None:
        sharded = any(is_sharded(w) for w in weights.values())
    weights = {name: local(w) for name, w in weights.items()}
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
        already_pruned = _global_int(sum(int(e.logical_not().sum()) for e in eligible if e is not None), sharded)
        k = max(0, round(sparsity * _global_int(sum(t.numel() for t in tensors), sharded)) - already_pruned)
        prune, group_threshold = _select_smallest(tensors, eligible, k, sharded)
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
    sharded = any(is_sharded(w) for w in weights.values())
    keep: dict[str, Tensor] = {}
    threshold = 0.0
    for name, w in ((name, local(w)) for name, w in weights.items()):  # groups run along the unsharded dim
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
    if sharded:
        threshold = float(all_reduce_(torch.tensor([threshold], dtype=torch.float64), "max"))
    return keep, threshold


def compute_keep_masks(weights: Mapping[str, Tensor], sparsity: float, scope: Scope = "global",
                       nm: str | None = None,
                       previous_keep: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], float]:
    """Magnitude masks at `sparsity`; with `nm` an N:M mask replaces the threshold whenever sparsity > 0."""
    if nm is None:
        return magnitude_keep_masks(weights, sparsity, scope, previous_keep)
    if sparsity <= 0.0:
        dense = {name: torch.ones_like(local(w), dtype=torch.bool) for name, w in weights.items()}
        return (dict(previous_keep) if previous_keep is not None else dense), 0.0
    keep_n, group = parse_nm(nm)
    return nm_keep_masks(weights, keep_n, group, previous_keep)


# ----------------------------------------------------------------------------- pruner state helpers

_MASK_PREFIX = "keep_mask."


def masks_to_state(keep: Mapping[str, Tensor] | None,
                   params: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Masks as state tensors (CPU), full size: masks of sharded `params` are gathered (a collective)."""
    if keep is None:
        return {}
    params = params or {}
    return {_MASK_PREFIX + name: (gather_rows(m, params[name].shape[0]) if is_sharded(params.get(name)) else m)
            .to("cpu", copy=True) for name, m in keep.items()}


def masks_from_state(state: Mapping[str, Any]) -> dict[str, Tensor] | None:
    masks = {key[len(_MASK_PREFIX):]: torch.as_tensor(value).bool()
             for key, value in state.items() if key.startswith(_MASK_PREFIX)}
    return masks or None


def check_state_method(state: Mapping[str, Any], method: str) -> None:
    if state.get("method") != method:
        raise UserError(f"pruning state is for method {state.get('method')!r}, not {method!r}")


def checked_masks(params: Mapping[str, Tensor], keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`keep` checked against the prunable parameters and moved to their devices."""
    if set(keep) != set(params):
        raise UserError(f"pruning state has masks for {sorted(set(keep) ^ set(params))[:4]} ... which do not "
                        "match the prunable parameters of this model/config")
    out = {}
    for name, p in params.items():
        mask = keep[name]
        if is_sharded(p) and tuple(mask.shape) == tuple(p.shape):  # a full (saved) mask: this rank's rows
            start, stop = row_range(p)
            mask = mask[start:stop]
        if tuple(mask.shape) != tuple(local(p).shape):
            raise UserError(f"pruning mask {name!r} has shape {tuple(keep[name].shape)}, parameter {tuple(p.shape)}")
        out[name] = mask.to(local(p).device)
    return out


# ----------------------------------------------------------------------------- config checks shared by the methods

def check_patterns(patterns: list[str]) -> list[str]:
    """A pydantic field check: a non-empty list of non-empty regexes/globs."""
    if not patterns or any(not isinstance(p, str) or not p.strip() for p in patterns):
        raise ValueError(f"patterns must be a non-empty list of non-empty regexes/globs, got {patterns!r}")
    return patterns


def check_nm(nm: str | None) -> str | None:
    """A pydantic field check: None or 'N:M'."""
    if nm is not None:
        parse_nm(nm)
    return nm


def check_sparsities(section: str, s_i: float, s_f: float) -> None:
    """ValueError unless 0 <= s_i <= s_f < 1."""
    for name, value in (("s_i", s_i), ("s_f", s_f)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{section}.{name} must be in [0, 1), got {value}")
    if s_i > s_f:
        raise ValueError(f"{section}.s_i ({s_i}) must be <= {section}.s_f ({s_f})")
