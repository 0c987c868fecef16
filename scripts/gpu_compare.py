"""compare-tiny's runs on one GPU, per seed, with the spread (driven by scripts/gpu_compare.sh).

Runs `lmprune compare configs/gpu-compare.yaml` once per seed. Where this lmprune has `compare.seeds`
it is passed the seed list and writes its own aggregate; otherwise each seed is a compare of its own
(`--set train.seed=S`: model init and data order; the train/val split, data.seed, stays fixed) in
OUT/seed-S, and this script aggregates them. Writes OUT/gpu_compare.json (per run: per-seed val ppl,
mean, std) and OUT/gpu_compare.md (mean ± std, the difference from scratch, "within noise" where
|difference| < 2 std), rewritten after every seed so a run cut short keeps what it measured.

--dry-run: CPU, toy sizes (2 layers, d32, 10 steps), the same code path, for the test suite.

    python scripts/gpu_compare.py --out OUT [--seeds 0,1,2] [--dry-run] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from lmprune.atomic import atomic_file, write_json
from lmprune.cli import main as lmprune_main
from lmprune.config import CompareConfig, config_from_dict, read_raw_config

ROOT = Path(__file__).resolve().parents[1]
TOY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
       "model.num_kv_heads=2", "train.steps=10", "train.warmup=2", "train.batch_size=2", "train.seq_len=32",
       "train.eval_every=0", "train.eval_tokens=1024", "train.log_every=5", "train.device=cpu", "train.threads=2",
       "pipeline.prune_every=1", "compare.infer_batch_size=2", "compare.infer_seq_len=32"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the comparisons and gpu_compare.json go")
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpu-compare.yaml"))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, the same code path")
    parser.add_argument("--set", action="append", default=[], help="section.key=value, passed to lmprune compare")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",") if s.strip()]
    out.mkdir(parents=True, exist_ok=True)
    overrides = (TOY if args.dry_run else []) + args.set
    t0 = time.perf_counter()
    if "seeds" in CompareConfig.model_fields:  # lmprune runs the seeds itself
        code = compare(args.config, out / "compare", overrides + [f"compare.seeds={json.dumps(seeds)}"])
        report = {"seeds": seeds, "native_seeds": True, "summary": read_summary(out / "compare")}
    else:
        report = {"seeds": [], "native_seeds": False, "runs": {}}
        code = 0
        for seed in seeds:
            code = compare(args.config, out / f"seed-{seed}", overrides + [f"train.seed={seed}"])
            if code != 0:
                break
            report["seeds"].append(seed)
            report["runs"] = aggregate(out, report["seeds"])
            write_report(out, report, time.perf_counter() - t0)
    if code == 0:
        report.update(data_coverage(args.config, overrides))
    write_report(out, report, time.perf_counter() - t0)
    print(f"gpu_compare: {len(report['seeds'])} seed(s) in {report['wall_s']} s -> {out / 'gpu_compare.json'}")
    return code


def compare(config: str, out_dir: Path, overrides: list[str]) -> int:
    args = ["compare", config, "--out", str(out_dir), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    print(f"gpu_compare: lmprune {' '.join(args)}", flush=True)
    return lmprune_main(args)


def data_coverage(config: str, overrides: list[str]) -> dict:
    """The corpus's unique training tokens against the tokens one run trains on (> 1 epoch repeats data)."""
    from lmprune.step import Dist
    from lmprune.train import prepare_data

    cfg = config_from_dict(read_raw_config(config, overrides), source=config)
    unique = len(prepare_data(cfg, Dist()).train)  # prepared by the compare: read from the cache
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
    return {"unique_train_tokens": unique, "tokens_per_run": tokens, "epochs_per_run": round(tokens / unique, 3)}


def read_summary(compare_dir: Path) -> dict:
    return json.loads((compare_dir / "summary.json").read_text())


def aggregate(out: Path, seeds: list[int]) -> dict[str, dict]:
    """Per run: the per-seed val ppl and tokens, and their mean and (sample) std."""
    per_run: dict[str, dict] = {}
    for seed in seeds:
        for name, row in read_summary(out / f"seed-{seed}")["pipelines"].items():
            entry = per_run.setdefault(name, {"val_ppl": [], "train_tokens": [], "params": row["params"]})
            entry["val_ppl"].append(row["val_ppl"])
            entry["train_tokens"].append(row["train_tokens"])
    for entry in per_run.values():
        values = entry["val_ppl"]
        entry["val_ppl_mean"] = statistics.fmean(values)
        entry["val_ppl_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return per_run


def write_report(out: Path, report: dict, seconds: float) -> None:
    report["wall_s"] = round(seconds, 1)
    write_json(out / "gpu_compare.json", report)
    if report.get("runs"):
        with atomic_file(out / "gpu_compare.md", "w") as handle:
            handle.write(markdown_table(report["runs"], report["seeds"]))


def markdown_table(runs: dict[str, dict], seeds: list[int]) -> str:
    scratch = runs.get("scratch")
    lines = [f"val ppl over seeds {seeds} (mean ± sample std)", "",
             "| run | params | train tokens | val ppl | vs scratch |", "|---|---:|---:|---:|---|"]
    for name, entry in runs.items():
        versus = ""
        if scratch is not None and name != "scratch":
            diff = entry["val_ppl_mean"] - scratch["val_ppl_mean"]
            noise = 2 * max(entry["val_ppl_std"], scratch["val_ppl_std"])
            versus = f"{diff:+.2f}" + (" (within noise)" if len(seeds) > 1 and abs(diff) < noise else "")
        lines.append(f"| {name} | {entry['params']:,} | {entry['train_tokens'][0]:,} | "
                     f"{entry['val_ppl_mean']:.2f} ± {entry['val_ppl_std']:.2f} | {versus} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
