"""`lmprune prune`: one-shot structured pruning of a pretrained Llama-family model, measured before and after.

    lmprune prune MODEL --calib DATA --out DIR --criterion {magnitude,taylor,wanda-sp,activation,flap}
                  [--ffn-ratio R] [--heads-ratio R] [--drop-layers K] [--target-params N]
                  [--calib-samples N] [--calib-seq-len L] [--no-sequential] [--no-reconstruct]
                  [--damp D] [--offload] [--device cuda] [--plan] [--json] ...

The work is `lmprune.pruning.pretrained.prune_pretrained`; this module only maps flags onto a
`PruneRequest` and prints. It imports no torch/transformers at module level, because the CLI builds
every verb's parser on each call (`lmprune --help` stays instant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

# Literal copies so that building the parser imports nothing heavy; tests check them against
# oneshot.FFN_CRITERIA, sources.DTYPES and sources.BUILTIN_MODELS.
CRITERIA = ("activation", "flap", "magnitude", "taylor", "wanda-sp")
DTYPE_CHOICES = ("bf16", "fp32")
BUILTIN_MODEL_NAMES = ("smollm2-135m",)


def add_prune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `prune` verb on the CLI's subparsers (it sets func=run_prune)."""
    p = subparsers.add_parser("prune", help="one-shot structured pruning of a pretrained HF model",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", help=f"a local HF causal-LM dir, a built-in ({', '.join(BUILTIN_MODEL_NAMES)}), "
                        "or a Hub id org/name[@revision] (HF cache; HF_HUB_OFFLINE=1: the cache alone)")
    p.add_argument("--calib", required=True,
                   help="prepared dir (lmprune prepare --tokenizer MODEL_DIR) or a raw source to prepare with "
                        "the model's tokenizer (shakespeare, files, dirs, globs, .jsonl)")
    p.add_argument("--out", required=True, help="output HF dir (written atomically)")
    p.add_argument("--criterion", required=True, choices=CRITERIA, help="importance criterion")
    p.add_argument("--ffn-ratio", type=float, default=0.0, help="fraction of FFN neurons removed per layer, [0, 1)")
    p.add_argument("--heads-ratio", type=float, default=0.0,
                   help="fraction of attention heads removed per layer, as whole GQA groups, [0, 1)")
    p.add_argument("--drop-layers", type=int, default=0, help="decoder layers removed (lowest block importance)")
    p.add_argument("--target-params", type=int, default=None,
                   help="solve the FFN width for at most this many parameters (instead of --ffn-ratio)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows from the train split")
    p.add_argument("--calib-seq-len", type=int, default=None,
                   help="tokens per calibration window (default 256, capped by the model's max positions)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (calibration and eval)")
    p.add_argument("--round-to", type=int, default=8, help="kept FFN width is a multiple of this")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="weights dtype: load, prune, save")
    p.add_argument("--max-eval-tokens", type=int, default=16384, help="val tokens scored for perplexity")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window choice")
    p.add_argument("--device", default="cpu", help="compute device of calibration, refit and evaluation (cpu, cuda)")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="calibrate layer l on the outputs of layers 0..l-1 already pruned (default on)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="least-squares refit of down_proj / o_proj on the kept channels "
                        "(default on for every criterion except magnitude)")
    p.add_argument("--damp", type=float, default=0.01, help="the refit's ridge term, x mean(diag G); > 0")
    p.add_argument("--offload", action="store_true",
                   help="load one layer at a time from the safetensors files (only that layer on --device)")
    p.add_argument("--plan", action="store_true",
                   help="with --target-params: prune FFN-only, heads-only and depth-only copies to that size, "
                        "print their val ppl and tok/s side by side, save no model")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prune output in --out")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run_prune)
    return p


def run_prune(args: argparse.Namespace) -> int:
    """The `prune` verb: prune, save, print a before/after table (or one JSON object with --json)."""
    from lmprune.cli import check_device
    from lmprune.prune_app import PruneRequest, prune_pretrained

    check_device(args.device)
    fields = {field.name for field in dataclasses.fields(PruneRequest)}
    request = PruneRequest(**{key: value for key, value in vars(args).items() if key in fields})
    if args.plan:
        from lmprune.prune_plan import format_plan, plan_structures

        plan_report = plan_structures(request, progress=not args.json)
        print(json.dumps(plan_report) if args.json else format_plan(plan_report))
        return 0
    report = prune_pretrained(request, progress=not args.json)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _millions(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.2f}M"


def _fixed(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict[str, Any]) -> str:
    """The before/after table printed by `lmprune prune`."""
    rows = [
        ("params", _millions(report["params_before"]), _millions(report["params_after"])),
        ("FFN width", report["ffn_width_before"], report["ffn_width_after"]),
        ("heads / KV heads", f"{report['num_heads_before']} / {report['num_kv_heads_before']}",
         f"{report['num_heads_after']} / {report['num_kv_heads_after']}"),
        ("layers", report["num_layers_before"], report["num_layers_after"]),
        ("val ppl", _fixed(report["ppl_before"], ".3f"), _fixed(report["ppl_after"], ".3f")),
        ("forward tok/s", _fixed(report["tok_per_s_before"], ",.0f"), _fixed(report["tok_per_s_after"], ",.0f")),
    ]
    lines = [f"{report['criterion']} pruning of {report['model']} "
             f"({report['calib_samples']} x {report['calib_seq_len']} calibration tokens, "
             f"ppl over {report['eval_tokens_after']:,} val tokens)",
             f"{'':<18}{'before':>14}{'after':>14}"]
    lines += [f"{name:<18}{str(b):>14}{str(a):>14}" for name, b, a in rows]
    if report["dropped_layers"]:
        lines.append(f"dropped layers: {report['dropped_layers']}")
    seconds = report["seconds"]
    lines.append(f"calibration {'sequential' if report['sequential'] else 'one pass'}: forward "
                 f"{seconds['calibration_forward']:.1f} s, refit {seconds['refit']:.1f} s"
                 + ("" if report["reconstruct"] else " (off)") + f"; prune {report['prune_seconds']:.1f} s")
    lines.append(f"peak RSS: {report['peak_rss_prune_bytes'] / 2**30:.2f} GiB while pruning"
                 + (" (--offload)" if report["offload"] else "") + f", {report['peak_rss_bytes'] / 2**30:.2f} GiB "
                 f"in all; the model in fp32: {report['model_fp32_bytes'] / 2**30:.2f} GiB")
    lines.append(f"saved to {report['out']}")
    return "\n".join(lines)
