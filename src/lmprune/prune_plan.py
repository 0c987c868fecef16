"""`lmprune prune --plan --target-params N`: which structure to cut at one parameter budget.

Prunes three fresh copies of the model to at most N parameters, one structure each: FFN neurons only
(the widest FFN that fits), whole GQA groups only (the fewest groups that fit) and decoder layers only
(the fewest layers that fit), with the request's criterion, calibration and refit settings, and measures
each one's val ppl and forward tok/s next to the unpruned model's. A structure that cannot reach N on
its own (e.g. removing every head but one group still leaves too many parameters) is reported as such.
No model is saved: the table (and OUT/prune_plan.json) says which `lmprune prune` command to run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lmprune.atomic import write_json
from lmprune.errors import UserError
from lmprune.prune_app import (
    DEFAULT_EVAL_SEQ_LEN,
    PruneRequest,
    _calib_seq_len,
    _check_family,
    calibration_batches,
    calibration_window_starts,
    load_for_pruning,
    measure,
    open_calibration_data,
)
from lmprune.models import check_model_dir
from lmprune.pruning.pretrained.oneshot import plan_pruning, prune_model, solve_for_target_params
from lmprune.pruning.surgery import attention_shape
from lmprune.sources import resolve_model

__all__ = ["PLAN_FILE", "format_plan", "plan_structures", "structure_candidates"]

PLAN_FILE = "prune_plan.json"


def structure_candidates(model: torch.nn.Module, target: int, round_to: int) -> list[dict[str, Any]]:
    """FFN-only, heads-only and depth-only prunes to <= target params ({"structure", "kwargs" or "unreachable"})."""
    compensate = False  # the parameter counts are compared without FLAP's added biases
    ffn = solve_for_target_params(model, target, round_to=round_to, compensate_bias=compensate)
    rows = [{"structure": "FFN only", "kwargs": {"ffn_ratio": 1 - ffn.ffn_width / ffn.ffn_width_before},
             "planned_params": ffn.params_after}]
    _, num_kv_heads, _ = attention_shape(model)
    heads = next((plan_pruning(model, heads_ratio=k / num_kv_heads) for k in range(1, num_kv_heads)
                  if plan_pruning(model, heads_ratio=k / num_kv_heads).params_after <= target), None)
    rows.append({"structure": "heads only", "kwargs": {"heads_ratio": 1 - heads.kv_groups / num_kv_heads},
                 "planned_params": heads.params_after} if heads else
                {"structure": "heads only", "unreachable": "removing all KV groups but one still exceeds the target"})
    layers = model.config.num_hidden_layers
    depth = next((k for k in range(1, layers) if plan_pruning(model, drop_layers=k).params_after <= target), None)
    rows.append({"structure": "depth only", "kwargs": {"drop_layers": depth},
                 "planned_params": plan_pruning(model, drop_layers=depth).params_after} if depth else
                {"structure": "depth only", "unreachable": "dropping all layers but one still exceeds the target"})
    return rows


def _check_plan_request(request: PruneRequest, out_dir: Path) -> None:
    if request.target_params is None:
        raise UserError("--plan needs --target-params (the budget each structure is pruned to)")
    if request.heads_ratio or request.drop_layers:
        raise UserError("--plan tries each structure itself; give --target-params only, not --heads-ratio / "
                        "--drop-layers")
    if request.offload:
        raise UserError("--plan prunes three copies in memory; it does not run with --offload")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / PLAN_FILE).is_file():
        raise UserError(f"--out {out_dir} is not empty and holds no earlier {PLAN_FILE}; choose another directory")
    if (out_dir / PLAN_FILE).is_file() and not request.overwrite:
        raise UserError(f"--out {out_dir} already holds {PLAN_FILE}; pass --overwrite to replace it")


def plan_structures(request: PruneRequest, progress: bool = True) -> dict[str, Any]:
    """Prune one fresh copy per structure to request.target_params, measure each; write OUT/prune_plan.json."""
    out_dir = Path(request.out).expanduser().absolute()
    _check_plan_request(request, out_dir)
    model_dir = resolve_model(request.model, request.dtype)
    config = check_model_dir(model_dir)
    _check_family(model_dir, config)
    data = open_calibration_data(request.calib, model_dir)
    max_positions = int(config.get("max_position_embeddings") or DEFAULT_EVAL_SEQ_LEN)
    calib_seq_len = _calib_seq_len(request.calib_seq_len, max_positions)
    eval_seq_len = min(DEFAULT_EVAL_SEQ_LEN, max_positions)
    starts = calibration_window_starts(data.train, request.calib_samples, calib_seq_len, request.seed, request.calib)
    batches = calibration_batches(data.train, starts, calib_seq_len, request.batch_size)
    device = torch.device(request.device)
    model, _ = load_for_pruning(model_dir, request, device)
    candidates = structure_candidates(model, request.target_params, request.round_to)
    measure_args = (data.val, request.batch_size, eval_seq_len, request.max_eval_tokens, device, request.dtype,
                    progress)
    base = measure(model, *measure_args)
    rows = []
    for candidate in candidates:
        if "kwargs" in candidate:
            if model is None:
                model, _ = load_for_pruning(model_dir, request, device)
            t0 = time.perf_counter()
            pruned = prune_model(model, batches, request.criterion, round_to=request.round_to,
                                 sequential=request.sequential, reconstruct=request.reconstruct, damp=request.damp,
                                 **candidate["kwargs"])
            candidate = {**candidate, **{k: pruned[k] for k in ("params_after", "ffn_width_after",
                                                               "num_kv_heads_after", "num_layers_after",
                                                               "dropped_layers", "reconstruct")},
                         "prune_seconds": time.perf_counter() - t0,
                         **{f"{key}_after": value for key, value in measure(model, *measure_args).items()}}
            model = None  # the next structure starts from a fresh copy
        rows.append(candidate)
    report = {"model": request.model, "criterion": request.criterion, "target_params": request.target_params,
              "calib_samples": request.calib_samples, "calib_seq_len": calib_seq_len,
              "max_eval_tokens": request.max_eval_tokens, "unpruned": base, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / PLAN_FILE, report, sort_keys=False)
    return {**report, "out": str(out_dir / PLAN_FILE)}


def format_plan(report: dict[str, Any]) -> str:
    """The side-by-side table printed by `lmprune prune --plan`."""
    base = report["unpruned"]
    lines = [f"{report['criterion']} pruning of {report['model']} to <= {report['target_params'] / 1e6:.2f}M params",
             f"{'structure':<14}{'params':>10}{'shape':>22}{'val ppl':>10}{'tok/s':>9}",
             f"{'unpruned':<14}{base['params'] / 1e6:>9.2f}M{'':>22}{base['ppl']:>10.2f}{base['tok_per_s']:>9,.0f}"]
    for row in report["rows"]:
        if "unreachable" in row:
            lines.append(f"{row['structure']:<14}{'unreachable: ' + row['unreachable']:>51}")
            continue
        shape = (f"FFN {row['ffn_width_after']}" if row["structure"].startswith("FFN") else
                 f"{row['num_kv_heads_after']} KV heads" if row["structure"].startswith("heads") else
                 f"{row['num_layers_after']} layers")
        lines.append(f"{row['structure']:<14}{row['params_after'] / 1e6:>9.2f}M{shape:>22}{row['ppl_after']:>10.2f}"
                     f"{row['tok_per_s_after']:>9,.0f}")
    lines.append(f"saved to {report['out']}")
    return "\n".join(lines)
