"""`lmprune prune`: one-shot structured pruning of a pretrained Llama-family model, measured before and after.

    lmprune prune MODEL --calib DATA --out DIR --criterion {magnitude,taylor,wanda-sp,activation,flap}
                  [--ffn-ratio R] [--heads-ratio R] [--drop-layers K] [--target-params N]
                  [--calib-samples N] [--calib-seq-len L] [--json] ...

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
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prune output in --out")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run_prune)
    return p


def run_prune(args: argparse.Namespace) -> int:
    """The `prune` verb: prune, save, print a before/after table (or one JSON object with --json)."""
    from lmprune.prune_app import PruneRequest, prune_pretrained

    fields = {field.name for field in dataclasses.fields(PruneRequest)}
    request = PruneRequest(**{key: value for key, value in vars(args).items() if key in fields})
    report = prune_pretrained(request, progress=not args.json)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def format_report(report: dict[str, Any]) -> str:
    """The before/after table printed by `lmprune prune`."""
    rows = [
        ("params", _millions(report["params_before"]), _millions(report["params_after"])),
        ("FFN width", report["ffn_width_before"], report["ffn_width_after"]),
        ("heads / KV heads", f"{report['num_heads_before']} / {report['num_kv_heads_before']}",
         f"{report['num_heads_after']} / {report['num_kv_heads_after']}"),
        ("layers", report["num_layers_before"], report["num_layers_after"]),
        ("val ppl", f"{report['ppl_before']:.3f}", f"{report['ppl_after']:.3f}"),
        ("forward tok/s", f"{report['tok_per_s_before']:,.0f}", f"{report['tok_per_s_after']:,.0f}"),
    ]
    lines = [f"{report['criterion']} pruning of {report['model']} "
             f"({report['calib_samples']} x {report['calib_seq_len']} calibration tokens, "
             f"ppl over {report['eval_tokens_after']:,} val tokens)",
             f"{'':<18}{'before':>14}{'after':>14}"]
    lines += [f"{name:<18}{str(b):>14}{str(a):>14}" for name, b, a in rows]
    if report["dropped_layers"]:
        lines.append(f"dropped layers: {report['dropped_layers']}")
    lines.append(f"saved to {report['out']}")
    return "\n".join(lines)
