"""Prune 50% of SmolLM2-135M's FFN neurons with each one-shot criterion and tabulate val perplexity.

    python scripts/smollm2_prune_table.py [--out runs/smollm2_prune_table] [--keep best|all|none]

Calibration and evaluation use Shakespeare tokenized with SmolLM2's own tokenizer (prepared and cached
on first use); the unpruned model is measured once, then each criterion prunes a fresh copy. Writes
OUT/table.md (a markdown table, also printed), OUT/table.json (every report), and the pruned models
under OUT/models/<criterion>/ (by default only the one with the lowest perplexity is kept: the
starting point for KD recovery with `lmprune train`). Fits in 8 GB of RAM: one model in memory at a
time, per-channel calibration statistics, batches of 4 windows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from lmprune.errors import UserError
from lmprune.models import load_hf_model
from lmprune.prune_app import (
    DEFAULT_EVAL_SEQ_LEN,
    calibration_batches,
    calibration_window_starts,
    measure,
    open_calibration_data,
    output_tokenizer,
    save_pruned,
)
from lmprune.pruning.pretrained.oneshot import FFN_CRITERIA, prune_model
from lmprune.sources import DTYPES, resolve_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="shakespeare", help="raw source (prepared with the model's tokenizer)")
    p.add_argument("--out", default="runs/smollm2_prune_table")
    p.add_argument("--criteria", default=",".join(FFN_CRITERIA), help="comma-separated")
    p.add_argument("--ffn-ratio", type=float, default=0.5)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--max-eval-tokens", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", choices=["best", "all", "none"], default="best", help="which pruned models to keep")
    return p.parse_args(argv)


def markdown_table(base: dict, rows: list[dict]) -> str:
    lines = ["| criterion | params | FFN width | val ppl | ppl / unpruned | forward tok/s | prune s |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| (unpruned) | {base['params'] / 1e6:.1f}M | {base['ffn_width']} | {base['ppl']:.2f} | 1.00 | "
             f"{base['tok_per_s']:,.0f} | - |"]
    for row in rows:
        lines.append(f"| {row['criterion']} | {row['params_after'] / 1e6:.1f}M | {row['ffn_width']} | "
                     f"{row['ppl_after']:.2f} | {row['ppl_after'] / base['ppl']:.2f} | "
                     f"{row['tok_per_s_after']:,.0f} | {row['prune_seconds']:.0f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    unknown = [c for c in criteria if c not in FFN_CRITERIA]
    if unknown or not criteria:
        raise UserError(f"unknown criteria {unknown}; choose from {sorted(FFN_CRITERIA)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model_dir = resolve_model(args.model, args.dtype)
    data = open_calibration_data(args.calib, model_dir)
    device, dtype = torch.device("cpu"), DTYPES[args.dtype]
    starts = calibration_window_starts(data.train, args.calib_samples, args.calib_seq_len, args.seed, args.calib)
    batches = calibration_batches(data.train, starts, args.calib_seq_len, args.batch_size)

    model = load_hf_model(model_dir, dtype)
    eval_seq_len = min(DEFAULT_EVAL_SEQ_LEN, model.config.max_position_embeddings)
    measure_args = (data.val, args.batch_size, eval_seq_len, args.max_eval_tokens, device, args.dtype, True)
    t0 = time.perf_counter()
    base = {**measure(model, *measure_args), "ffn_width": model.config.intermediate_size}
    base["seconds"] = time.perf_counter() - t0
    print(f"unpruned: ppl {base['ppl']:.2f}, {base['tok_per_s']:,.0f} tok/s ({base['seconds']:.0f} s)", flush=True)
    tokenizer = output_tokenizer(model_dir, data)
    del model

    rows = []
    for criterion in criteria:
        t0 = time.perf_counter()
        model = load_hf_model(model_dir, dtype)
        report = prune_model(model, batches, criterion, ffn_ratio=args.ffn_ratio)
        report["prune_seconds"] = time.perf_counter() - t0
        after = measure(model, *measure_args)
        report.update({f"{key}_after": value for key, value in after.items()},
                      ffn_width=report["ffn_width_after"], ppl_before=base["ppl"],
                      tok_per_s_before=base["tok_per_s"], calib_samples=args.calib_samples,
                      calib_seq_len=args.calib_seq_len, max_eval_tokens=args.max_eval_tokens,
                      eval_seq_len=eval_seq_len, seconds=time.perf_counter() - t0)
        if args.keep != "none":
            report["out"] = str(out / "models" / criterion)
            save_pruned(model, tokenizer, Path(report["out"]).absolute(), report, overwrite=True)
        rows.append(report)
        print(f"{criterion}: ppl {report['ppl_after']:.2f}, {report['tok_per_s_after']:,.0f} tok/s "
              f"({report['seconds']:.0f} s)", flush=True)
        del model

    best = min(rows, key=lambda row: row["ppl_after"])
    if args.keep == "best":
        for row in rows:
            if row is not best:
                shutil.rmtree(row.pop("out"), ignore_errors=True)
    table = markdown_table(base, rows)
    result = {"model": args.model, "calib": args.calib, "ffn_ratio": args.ffn_ratio, "unpruned": base,
              "criteria": rows, "best": best["criterion"], "best_dir": best.get("out"), "table": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        result = run(parse_args(argv))
    except UserError as err:
        print(f"smollm2_prune_table: error: {err}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"best: {result['best']}" + (f" (saved to {result['best_dir']})" if result["best_dir"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
