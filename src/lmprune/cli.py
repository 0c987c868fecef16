"""One CLI: each verb parses its flags and calls a plain function.

User errors (bad config, data, model dir, checkpoint, flags) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from lmprune.errors import Interrupted, NonFiniteError, UserError
from lmprune.lm_tasks import add_task_args
from lmprune.prune_cmd import add_prune_parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"lmprune: warning: {message}\n"


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line and exit code 2, like every other bad input (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"lmprune: error: {message} (see: {self.prog} --help)\n")


def check_device(name: str) -> str:
    """UserError unless `name` is a torch device this machine has."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device (use cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: lmprune runs on cpu or cuda")
    return name


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmprune.data import prepare_corpus

    if args.vocab_size is not None and args.tokenizer is not None:
        raise UserError("give --vocab-size (train a BPE) or --tokenizer (use a model's), not both")
    vocab_size = None if args.tokenizer else (args.vocab_size or 8192)
    out = prepare_corpus(args.source, Path(args.out), vocab_size=vocab_size, tokenizer=args.tokenizer,
                         val_fraction=args.val_fraction, seed=args.seed, overwrite=args.overwrite,
                         num_proc=args.num_proc, shard_tokens=args.shard_tokens, text_field=args.text_field,
                         skip_bad_lines=args.skip_bad_lines, tokenizer_sample_bytes=args.tokenizer_sample_bytes,
                         progress=not args.quiet)
    meta = json.loads((Path(out) / "meta.json").read_text())
    shards = len(meta["shards"]["train"]) + len(meta["shards"]["val"])
    print(f"prepared {out}: vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens, "
          f"val {meta['val_tokens']:,} tokens ({meta['documents']['train']} + {meta['documents']['val']} documents, "
          f"{shards} shards)")
    return 0


def quiet_hf_progress() -> None:
    """--quiet: no transformers / huggingface_hub progress bars either (e.g. "Writing model shards")."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def cmd_train(args: argparse.Namespace) -> int:
    from lmprune.config import RunConfig, describe_fields, load_config
    from lmprune.train import print_result, train

    if args.help_config:
        print("\n".join(describe_fields(RunConfig)))
        return 0
    if args.config is None:
        raise UserError("train needs a CONFIG.yaml")
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    cfg = load_config(args.config, overrides)
    if args.quiet:
        quiet_hf_progress()
    out_dir = Path(args.out or cfg.out_dir or Path("runs") / Path(args.config).stem)
    result = train(cfg, out_dir, resume=args.resume, quiet=args.quiet)
    if result.is_main:
        print_result(result)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lmprune.compare import run_compare
    from lmprune.report import format_flops

    if args.quiet:
        quiet_hf_progress()
    summary = run_compare(args.config, Path(args.out), overrides=args.set, quiet=args.quiet,
                          report_only=args.report_only, only_seeds=args.only_seeds)
    print(f"{'run':24s} {'val ppl':>9s} {'params':>11s} {'ffn':>5s} {'tokens':>11s} {'FLOPs':>10s} {'infer tok/s':>11s}")
    for name, r in summary["pipelines"].items():
        print(f"{name:24s} {r['val_ppl']:9.3f} {r['params']:11,d} {r['ffn_width']:5d} {r['train_tokens']:11,d} "
              f"{format_flops(r['train_flops']):>10s} {r['infer_tok_per_s']:11,.0f}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmprune.evaluate import evaluate_model_dir
    from lmprune.lm_tasks import parse_task_names, run_tasks_from_args
    from lmprune.sources import resolve_model

    if args.max_tokens <= 0:
        raise UserError(f"--max-tokens must be > 0, got {args.max_tokens}")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.seq_len is not None and args.seq_len <= 0:
        raise UserError(f"--seq-len must be > 0, got {args.seq_len}")
    check_device(args.device)
    if args.tasks:
        parse_task_names(args.tasks)  # bad task names fail before the perplexity pass
    model_dir = resolve_model(args.model_dir)
    result = evaluate_model_dir(model_dir, args.data, args.max_tokens, batch_size=args.batch_size,
                                seq_len=args.seq_len, dtype=args.dtype, device=args.device,
                                progress=not args.json)
    if args.throughput:
        import torch

        from lmprune.evaluate import forward_throughput
        from lmprune.models import load_hf_model

        model = load_hf_model(model_dir)
        result["forward_tok_per_s"] = forward_throughput(model, model.config.vocab_size, args.batch_size,
                                                         result["seq_len"], torch.device(args.device),
                                                         dtype=args.dtype)
    if not math.isfinite(result["loss"]):
        raise NonFiniteError(f"{result['model']}: the val loss is {result['loss']} (the model's outputs are not "
                             "finite); no perplexity to report")
    if args.tasks:
        result["tasks"] = run_tasks_from_args(args, model_dir)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']}: val ppl {result['ppl']:.3f} (loss {result['loss']:.4f}) over "
              f"{result['tokens']:,} tokens, {result['tok_per_s']:,.0f} tok/s, {result['params']:,} params")
        if "forward_tok_per_s" in result:
            print(f"forward throughput at batch {args.batch_size} x {result['seq_len']}: "
                  f"{result['forward_tok_per_s']:,.0f} tok/s")
        for name, value in result.get("tasks", {}).items():
            print(f"{name}: {value:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lmprune", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    p.add_argument("--source", required=True,
                   help="shakespeare | gcide | pystdlib | files, dirs, globs (.txt .md .jsonl .jsonl.gz .jsonl.zst "
                        ".parquet) | a datasets dir (save_to_disk; DIR@SPLIT) | hf:NAME[:CONFIG][@SPLIT]; comma-separated")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--vocab-size", type=int, default=None, help="train a byte-level BPE of this size (default 8192)")
    p.add_argument("--tokenizer", default=None, help="use this local HF dir's tokenizer instead")
    p.add_argument("--tokenizer-sample-bytes", type=int, default=200_000_000,
                   help="text sampled (seeded) from the train split to train the BPE on; training needs ~40x "
                        "this in RAM (default 200 MB: ~8 GB)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split and the BPE sample")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl / .parquet / datasets rows")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) .jsonl lines that are not JSON "
                   "objects with the text field, instead of stopping")
    p.add_argument("--num-proc", type=int, default=None, help="tokenizer worker processes (default: all cores); "
                   "the output is the same for any value")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file at most")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace a dir that holds another corpus")
    p.set_defaults(func=cmd_prepare)

    p = verbs.add_parser("train", help="train (and prune) a model as a YAML config says")
    p.add_argument("config", nargs="?", help="CONFIG.yaml")
    p.add_argument("--out", default=None, help="output dir (default: out_dir of the config, else runs/<name>)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--save-every", type=int, default=None, help="override train.save_every")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--help-config", action="store_true", help="list every config field with its meaning")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("compare", help="run the pipelines of a config side by side and write a report")
    p.add_argument("config", help="CONFIG.yaml (with a compare section, or the default four pipelines)")
    p.add_argument("--out", required=True, help="output dir (one sub-dir per run; rerun to resume)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write summary.json and report.md from the runs that have finished")
    p.add_argument("--seed", type=int, action="append", dest="only_seeds", metavar="S",
                   help="train only seed S of compare.seeds (repeatable): one process per seed (a core or GPU "
                        "each) into the same --out; the others' finished runs are reported; then --report-only")
    p.set_defaults(func=cmd_compare)

    p = verbs.add_parser("eval", help="val perplexity and tokens/s of a HF causal-LM dir")
    p.add_argument("model_dir", help="a local HF causal-LM dir, smollm2-135m, or a Hub id org/name[@revision]")
    p.add_argument("--data", required=True, help="a prepared dir (lmprune prepare)")
    p.add_argument("--max-tokens", type=int, default=65536, help="val tokens to score")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: min(model max positions, 512)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--throughput", action="store_true", help="also measure forward tok/s at a fixed batch x length")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_task_args(p)
    p.set_defaults(func=cmd_eval)

    add_prune_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"lmprune: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"lmprune: error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as stop:
        print(f"lmprune: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("lmprune: interrupted", file=sys.stderr)
        return 130
