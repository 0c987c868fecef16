"""Prune SmolLM2-135M several ways (FFN ratios, one heads ratio, one depth cut) with each one-shot criterion,
with and without the least-squares refit, and tabulate val perplexity, forward tok/s and wall times.

    python scripts/smollm2_prune_table.py [--out runs/smollm2_prune_table] [--keep best|all|none]
        [--ffn-ratios 0.5,0.25] [--heads-ratio 0.3333] [--drop-layers 3] [--criteria ...] [--refit both|on|off]

Calibration and evaluation use Shakespeare tokenized with SmolLM2's own tokenizer (prepared and cached
on first use); the unpruned model is measured once, then every row prunes a fresh copy (layer-sequential
calibration unless --no-sequential). Rows run in the order of the table (the 50% FFN rows first) and
OUT/table.md / OUT/table.json are rewritten after each row, so an interrupted run leaves the rows done.
The pruned models go under OUT/models/<row>/ (by default only the one with the lowest perplexity at the
first FFN ratio is kept: the starting point for KD recovery with `lmprune train`). One model in memory
at a time, per-channel calibration statistics and one layer's G, batches of 4 windows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from lmprune.atomic import write_json, write_text
from lmprune.errors import UserError
from lmprune.models import load_hf_model
from lmprune.prune_app import (
    DEFAULT_EVAL_SEQ_LEN,
    calibration_batches,
    calibration_window_starts,
    measure,
    open_calibration_data,
    output_tokenizer,
    peak_rss_bytes,
    save_pruned,
)
from lmprune.pruning.pretrained.oneshot import FFN_CRITERIA, prune_model
from lmprune.sources import DTYPES, resolve_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="shakespeare", help="raw source (prepared with the model's tokenizer)")
    p.add_argument("--out", default="runs/smollm2_prune_table")
    p.add_argument("--criteria", default=",".join(FFN_CRITERIA), help="comma-separated, for the first FFN ratio")
    p.add_argument("--other-criteria", default=None,
                   help="comma-separated, for the depth, heads and other FFN-ratio rows (default: --criteria)")
    p.add_argument("--ffn-ratios", default="0.5,0.25", help="comma-separated FFN ratios (the first one decides --keep best)")
    p.add_argument("--heads-ratio", type=float, default=1 / 3, help="0: no heads rows")
    p.add_argument("--drop-layers", type=int, default=3, help="0: no depth row")
    p.add_argument("--refit", choices=["both", "on", "off"], default="both", help="rows with / without the refit")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--max-eval-tokens", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", choices=["best", "all", "none"], default="best", help="which pruned models to keep")
    return p.parse_args(argv)


def _criteria(names: str) -> list[str]:
    criteria = [c.strip() for c in names.split(",") if c.strip()]
    unknown = [c for c in criteria if c not in FFN_CRITERIA]
    if unknown or not criteria:
        raise UserError(f"unknown criteria {unknown}; choose from {sorted(FFN_CRITERIA)}")
    return criteria


def row_specs(args: argparse.Namespace) -> list[dict]:
    """(structure, structure kwargs, criterion, reconstruct) of every row, in table order: the first FFN
    ratio with --criteria, then depth, heads and the other FFN ratios with --other-criteria."""
    first, others = _criteria(args.criteria), _criteria(args.other_criteria or args.criteria)
    refits = {"both": [False, True], "on": [True], "off": [False]}[args.refit]
    ratios = [float(r) for r in args.ffn_ratios.split(",") if r.strip()]
    structures = [(f"FFN {ratios[0]:.0%}", {"ffn_ratio": ratios[0]}, first)] if ratios else []
    if args.drop_layers:  # depth is ranked by block importance whatever the criterion; nothing to refit
        structures.append((f"depth -{args.drop_layers}", {"drop_layers": args.drop_layers}, None))
    if args.heads_ratio:
        structures.append((f"heads {args.heads_ratio:.0%}", {"heads_ratio": args.heads_ratio}, others))
    structures += [(f"FFN {ratio:.0%}", {"ffn_ratio": ratio}, others) for ratio in ratios[1:]]
    specs = []
    for label, kwargs, criteria in structures:
        if criteria is None:
            specs.append({"structure": label, "kwargs": kwargs, "criterion": "magnitude", "reconstruct": False})
            continue
        specs += [{"structure": label, "kwargs": kwargs, "criterion": criterion, "reconstruct": refit}
                  for criterion in criteria for refit in refits]
    return specs


def markdown_table(base: dict, rows: list[dict]) -> str:
    lines = ["| structure | criterion | refit | params | val ppl | x unpruned | forward tok/s | calib forward s "
             "| refit s | prune s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| (unpruned) | - | - | {base['params'] / 1e6:.1f}M | {base['ppl']:.2f} | 1.00 | "
             f"{base['tok_per_s']:,.0f} | - | - | - |"]
    for row in rows:
        seconds = row["seconds"]
        criterion = "block importance" if row["structure"].startswith("depth") else row["criterion"]
        lines.append(f"| {row['structure']} | {criterion} | {'on' if row['reconstruct'] else 'off'} | "
                     f"{row['params_after'] / 1e6:.1f}M | {row['ppl_after']:.2f} | "
                     f"{row['ppl_after'] / base['ppl']:.2f} | {row['tok_per_s_after']:,.0f} | "
                     f"{seconds['calibration_forward']:.0f} | {seconds['refit']:.1f} | {row['prune_seconds']:.0f} |")
    return "\n".join(lines)


def goal_lines(rows: list[dict]) -> list[str]:
    """Per structure and criterion with both rows: ppl with refit / without (goal <= 0.8 at 50% FFN) and
    refit wall time / calibration forward time of the refit row (goal <= 1)."""
    by_key = {(row["structure"], row["criterion"], row["reconstruct"]): row for row in rows}
    lines = []
    for (structure, criterion, refit), row in by_key.items():
        plain = by_key.get((structure, criterion, False))
        if refit and plain is not None:
            seconds = row["seconds"]
            lines.append(f"{structure} {criterion}: ppl refit / no refit = {row['ppl_after'] / plain['ppl_after']:.3f}"
                         f"; refit s / calibration forward s = {seconds['refit']:.1f} / "
                         f"{seconds['calibration_forward']:.1f} = {seconds['refit'] / seconds['calibration_forward']:.3f}")
    return lines


def _row_name(spec: dict) -> str:
    structure = spec["structure"].replace(" ", "").replace("%", "").replace("-", "drop")
    return f"{structure}-{spec['criterion']}-{'refit' if spec['reconstruct'] else 'norefit'}"


def run(args: argparse.Namespace) -> dict:
    specs = row_specs(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model_dir = resolve_model(args.model, args.dtype)
    data = open_calibration_data(args.calib, model_dir)
    device, dtype = torch.device("cpu"), DTYPES[args.dtype]
    starts = calibration_window_starts(data.train, args.calib_samples, args.calib_seq_len, args.seed, args.calib)
    batches = calibration_batches(data.train, starts, args.calib_seq_len, args.batch_size)

    model = load_hf_model(model_dir, dtype)
    eval_seq_len = min(DEFAULT_EVAL_SEQ_LEN, model.config.max_position_embeddings)
    measure_args = (data.val, args.batch_size, eval_seq_len, args.max_eval_tokens, device, args.dtype, False)
    t0 = time.perf_counter()
    base = {**measure(model, *measure_args), "ffn_width": model.config.intermediate_size}
    base["seconds"] = time.perf_counter() - t0
    print(f"unpruned: ppl {base['ppl']:.2f}, {base['tok_per_s']:,.0f} tok/s ({base['seconds']:.0f} s)", flush=True)
    tokenizer = output_tokenizer(model_dir, data)
    del model

    rows: list[dict] = []
    result = {"model": args.model, "calib": args.calib, "calib_samples": args.calib_samples,
              "calib_seq_len": args.calib_seq_len, "max_eval_tokens": args.max_eval_tokens,
              "sequential": args.sequential, "damp": args.damp, "unpruned": base, "rows": rows}
    for spec in specs:
        t0 = time.perf_counter()
        model = load_hf_model(model_dir, dtype)
        report = prune_model(model, batches, spec["criterion"], sequential=args.sequential,
                             reconstruct=spec["reconstruct"], damp=args.damp, **spec["kwargs"])
        report["prune_seconds"] = time.perf_counter() - t0
        after = measure(model, *measure_args)
        report.update({f"{key}_after": value for key, value in after.items()}, structure=spec["structure"],
                      name=_row_name(spec), seconds_total=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes())
        if args.keep != "none":
            report["out"] = str(out / "models" / report["name"])
            save_pruned(model, tokenizer, Path(report["out"]).absolute(), report, overwrite=True)
        rows.append(report)
        print(f"{report['name']}: ppl {report['ppl_after']:.2f}, {report['tok_per_s_after']:,.0f} tok/s, calib "
              f"forward {report['seconds']['calibration_forward']:.0f} s, refit {report['seconds']['refit']:.1f} s "
              f"({report['seconds_total']:.0f} s)", flush=True)
        del model
        _write(out, base, result)

    first = specs[0]["structure"]
    best = min((row for row in rows if row["structure"] == first), key=lambda row: row["ppl_after"])
    if args.keep == "best":
        for row in rows:
            if row is not best:
                shutil.rmtree(row.pop("out"), ignore_errors=True)
    result.update(best=best["name"], best_dir=best.get("out"))
    _write(out, base, result)
    return result


def _write(out: Path, base: dict, result: dict) -> None:
    result["table"] = markdown_table(base, result["rows"])
    result["goals"] = goal_lines(result["rows"])
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "table.md", result["table"] + "\n")
    write_json(out / "table.json", result)


def main(argv: list[str] | None = None) -> int:
    try:
        result = run(parse_args(argv))
    except UserError as err:
        print(f"smollm2_prune_table: error: {err}", file=sys.stderr)
        return 2
    print(result["table"])
    print("\n".join(result["goals"]))
    print(f"best: {result['best']}" + (f" (saved to {result['best_dir']})" if result["best_dir"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
