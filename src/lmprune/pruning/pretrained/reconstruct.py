"""Least-squares reconstruction of an output projection after its input channels were pruned.

Formulas: docs/algorithms.md, "Least-squares reconstruction".

After keeping input channels S of a Linear y = W x (down_proj after FFN pruning, o_proj after GQA-group
removal), the kept columns are refit so that W' x_S matches the dense output W x over the calibration
tokens: W' = W G[:, S] (G[S, S] + damp I)^-1, G = sum_t x_t x_t^T (the ridge-regularised normal
equations; damp = damp_ratio * mean(diag G)). Only G is needed, never the activations themselves.
"""

from __future__ import annotations

import torch

from lmprune.errors import UserError

__all__ = ["DEFAULT_DAMP", "check_damp", "check_refit_tokens", "refit_columns", "relative_output_error",
           "residual_mean_bias"]

DEFAULT_DAMP = 0.01  # x mean(diag G): SparseGPT's default dampening


def check_damp(damp: float) -> float:
    """UserError unless damp is a finite number > 0 (G[S, S] may be singular without it)."""
    if not isinstance(damp, (int, float)) or not damp > 0.0 or damp == float("inf"):
        raise UserError(f"--damp must be > 0 (a fraction of mean(diag G) added to the refit's diagonal); got {damp}")
    return float(damp)


def check_refit_tokens(tokens: int, kept: int, what: str) -> None:
    """UserError if fewer calibration tokens than kept channels: G[S, S] is then singular without damping."""
    if tokens < kept:
        raise UserError(
            f"the calibration set has {tokens} tokens, fewer than the {kept} {what} kept per layer: the refit's "
            f"G[S, S] would be singular without damping and set by --damp alone; raise --calib-samples / "
            f"--calib-seq-len or pass --no-reconstruct"
        )


def _damped(gram: torch.Tensor, kept: torch.Tensor, damp_ratio: float) -> torch.Tensor:
    """G[S, S] + damp_ratio * mean(diag G) * I."""
    block = gram[kept][:, kept].clone()
    damp = damp_ratio * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    block.diagonal().add_(damp)
    return block


@torch.no_grad()
def refit_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp_ratio: float) -> torch.Tensor:
    """W G[:, S] (G[S, S] + damp I)^-1 ([out, |S|], in weight's dtype): the ridge least-squares refit.

    weight: [out, C]; gram: [C, C] sum of x x^T over calibration tokens (float64 preferred);
    kept: [|S|] column indices. Solved by Cholesky in gram's dtype (LU if not positive definite).
    """
    kept = kept.to(gram.device).long()
    w = weight.detach().to(gram.dtype)
    rhs = gram[kept] @ w.T  # [|S|, out] = (W G[:, S])^T, G symmetric
    system = _damped(gram, kept, damp_ratio)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)
    else:
        solution = torch.linalg.solve(system, rhs)
    return solution.T.to(weight.dtype).contiguous()


@torch.no_grad()
def relative_output_error(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor,
                          kept_weight: torch.Tensor) -> float:
    """sqrt(sum_t ||W x_t - W' x_{t,S}||^2 / sum_t ||W x_t||^2), computed from G alone.

    The error of replacing W ([out, C]) by kept_weight ([out, |S|]) on channels S over the calibration
    tokens: with E = W - W' embedded at columns S, sum_t ||E x_t||^2 = tr(E G E^T).
    """
    kept = kept.to(gram.device).long()
    w = weight.detach().to(gram.dtype)
    diff = w.clone()
    diff[:, kept] -= kept_weight.detach().to(gram.dtype)
    num = ((diff @ gram) * diff).sum()
    den = ((w @ gram) * w).sum().clamp_min(torch.finfo(gram.dtype).tiny)
    return float((num / den).clamp_min(0.0).sqrt())


@torch.no_grad()
def residual_mean_bias(weight: torch.Tensor, kept_weight: torch.Tensor, mean: torch.Tensor,
                       kept: torch.Tensor) -> torch.Tensor:
    """W mu - W' mu_S ([out]): the mean output the kept columns (refit or not) no longer carry.

    With W' = W[:, S] this is FLAP's compensation W[:, P] mu_P; after a refit it is the mean shift of
    the refit's residual, so the bias composes with the reconstruction (refit first, then the shift).
    """
    kept = kept.to(mean.device).long()
    w = weight.detach().to(mean.dtype)
    return w @ mean - kept_weight.detach().to(mean.dtype) @ mean[kept]
