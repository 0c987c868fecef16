"""`lmprune compare`: the runs of one config side by side, at the same token budget.

Every run is the base config plus a few `section.key: value` overrides (compare.runs), so they share
data, data order, seed and token budget. Optionally one more run trains the target model from scratch
for the training FLOPs of a reference run (equal compute: it sees more tokens). Each run lives in
DIR/NAME (its own checkpoints; DIR/NAME/final is the HF model); a compare that is interrupted picks up
where it stopped: finished runs are kept, an unfinished one resumes from its newest checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from lmprune import checkpoint as ckpt
from lmprune.atomic import remove_stale_leftovers, write_json
from lmprune.config import CompareConfig, RunConfig, apply_overrides, config_from_dict, read_raw_config
from lmprune.errors import UserError
from lmprune.evaluate import forward_throughput
from lmprune.models import build_model, forward_flops_per_token, llama_config, load_hf_model
from lmprune.pipelines import validate_run
from lmprune.pruning import METHODS, method_sections
from lmprune.report import plot_compare, write_compare_report
from lmprune.train import print_result, train, train_until
from lmprune.trunks import branch, trunk_groups

EQUAL_COMPUTE_RUN = "scratch_equal_flops"


INIT_RUN = "init"


def with_overrides(raw: dict[str, Any], sets: dict[str, Any] | None, source: str,
                   check_plan: bool = True) -> RunConfig:
    """The base config plus one run's `section.key: value` overrides, validated."""
    run_raw = copy.deepcopy({k: v for k, v in raw.items() if k not in ("compare", "out_dir")})
    run_raw = apply_overrides(run_raw, [f"{key}={json.dumps(value)}" for key, value in (sets or {}).items()])
    cfg = config_from_dict(run_raw, source=source)
    if check_plan:
        validate_run(cfg)
    return cfg


def run_configs(raw: dict[str, Any], source: str, out_dir: Path) -> tuple[CompareConfig, dict[str, RunConfig]]:
    """Validate the base config and every run's config (and its plan) before anything trains.

    With compare.init, the init run comes first and every other run starts from DIR/init/final.
    """
    base = config_from_dict(raw, source=source)
    compare = base.compare or CompareConfig()
    runs = {}
    if compare.init is not None:
        if INIT_RUN in compare.runs:
            raise UserError(f"compare.runs cannot have a run named {INIT_RUN!r} when compare.init is set")
        runs[INIT_RUN] = with_overrides(raw, compare.init, f"{source} (compare.init)")
    for name, sets in compare.runs.items():
        sets = dict(sets or {})
        if compare.init is not None:
            sets = {"model.path": str(out_dir / INIT_RUN / "final"), "model.preset": None, **sets}
        # with an init run the starting model does not exist yet: its plan is checked after init trains
        runs[name] = with_overrides(raw, sets, f"{source} (run {name})", check_plan=compare.init is None)
    if compare.scratch_equal_compute and runs[compare.compute_reference].pipeline is None:
        raise UserError(f"compare.compute_reference {compare.compute_reference!r} has no pipeline to compare with")
    return compare, runs


def equal_compute_config(reference: RunConfig, reference_flops: float, vocab_size: int) -> RunConfig:
    """The target model from scratch, with as many steps as the reference's training FLOPs buy."""
    raw = reference.model_dump(mode="json")
    raw["pipeline"] = dict(raw["pipeline"], name="scratch")
    raw["kd"] = None
    tcfg = reference.train
    target = build_model(llama_config(reference.model, vocab_size, tcfg.seq_len, None), tcfg.seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # as the trainer counts it (every rank's batch)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum * world_size
    step_flops = 3 * forward_flops_per_token(target, tcfg.seq_len) * tokens_per_step
    steps = max(tcfg.steps, int(round(reference_flops / step_flops)))
    # no retention probe: with more tokens this run may pass the end of its first epoch and see the windows again
    raw["train"] = dict(raw["train"], steps=steps, retention_windows=0)
    return config_from_dict(raw, source=EQUAL_COMPUTE_RUN)


def run_compare(config_path: str | Path, out_dir: Path, overrides: list[str] | None = None,
                quiet: bool = False, report_only: bool = False, only_seeds: list[int] | None = None) -> dict[str, Any]:
    """Train every run (per seed of compare.seeds), then write summary.json, the plots and report.md.

    With `report_only` nothing trains: the summary and report cover the runs that have finished. With
    `only_seeds` only those seeds train (so that one process per seed can share an out dir); the
    other seeds' runs are reported as far as they have finished."""
    raw = read_raw_config(config_path, overrides)
    compare, runs = run_configs(raw, str(config_path), out_dir)
    if only_seeds:
        unknown = sorted(set(only_seeds) - set(compare.seeds or []))
        if unknown:
            raise UserError(f"--seed {unknown[0]} is not one of compare.seeds ({compare.seeds})")
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = out_dir / "compare_config.json"
    if saved.is_file() and json.loads(saved.read_text()) != raw:
        raise UserError(f"{out_dir} holds another comparison (its compare_config.json differs); choose another --out")
    removed = remove_stale_leftovers(out_dir)  # temp files of a killed compare (its own writes in DIR)
    if removed:
        warnings.warn(f"removed {len(removed)} temp file(s) left by a killed compare in {out_dir}", stacklevel=2)
    write_json(saved, raw)

    seeds = compare.seeds or [None]
    if not report_only:
        for seed in seeds:
            if not only_seeds or seed in only_seeds:
                run_seed(compare, runs, out_dir, seed, quiet, report_only=False)
    # read every seed's rows after training: another process (--seed S into the same --out) may have
    # finished its runs while this one trained
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    shared: dict[str, list[str]] = {}
    for seed in seeds:
        rows, groups = run_seed(compare, runs, out_dir, seed, quiet, report_only=True)
        for name, row in rows.items():
            per_seed.setdefault(name, {})[row["seed"]] = row
        shared.update({f"trunks/{first}": members for first, (_, members) in groups.items()})
    results = {name: aggregate_seeds(rows) for name, rows in per_seed.items()}
    for name, result in results.items():
        model = load_hf_model(seed_dir(out_dir, name, compare.seeds and result["seeds"][0]) / "final")
        result["infer_tok_per_s"] = round(forward_throughput(model, model.config.vocab_size, compare.infer_batch_size,
                                                             compare.infer_seq_len, torch.device("cpu")), 1)
    summary = {"pipelines": results, "seeds": compare.seeds, "shared_trunks": shared}
    if report_only or only_seeds:
        expected = [*runs, *([EQUAL_COMPUTE_RUN] if compare.scratch_equal_compute else [])]
        if compare.seeds:
            summary["unfinished"] = [f"{name} (seed {seed})" for seed in compare.seeds for name in expected
                                     if seed not in per_seed.get(name, {})]
        else:
            summary["unfinished"] = [name for name in expected if name not in per_seed]
    write_json(out_dir / "summary.json", summary)
    run_dirs = {name: [seed_dir(out_dir, name, seed if compare.seeds else None) for seed in results[name]["seeds"]]
                for name in results}
    plot_compare(out_dir, run_dirs)
    write_compare_report(out_dir, summary, compare)
    return summary


def seed_dir(out_dir: Path, name: str, seed: int | None) -> Path:
    """DIR/NAME for a compare without seeds, DIR/NAME/seed-S with them."""
    return out_dir / name if seed is None else out_dir / name / f"seed-{seed}"


def with_seed(cfg: RunConfig, seed: int | None, out_dir: Path) -> RunConfig:
    """The run at `seed` (train.seed: init and data order); a start from DIR/init uses that seed's init."""
    if seed is None:
        return cfg
    update: dict[str, Any] = {"train": cfg.train.model_copy(update={"seed": seed})}
    if cfg.model.path == str(out_dir / INIT_RUN / "final"):
        update["model"] = cfg.model.model_copy(update={"path": str(seed_dir(out_dir, INIT_RUN, seed) / "final")})
    return cfg.model_copy(update=update)


def run_seed(compare: CompareConfig, runs: dict[str, RunConfig], out_dir: Path, seed: int | None, quiet: bool,
             report_only: bool) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[int, list[str]]]]:
    """Every run at one seed (trunk groups branched from one trunk each); their summary rows."""
    configs = {name: with_seed(cfg, seed, out_dir) for name, cfg in runs.items()}
    groups = trunk_groups(configs) if compare.share_trunks and compare.init is None else {}
    trunk_of = {member: first for first, (_, members) in groups.items() for member in members}
    results: dict[str, dict[str, Any]] = {}
    for name, cfg in configs.items():
        run_dir = seed_dir(out_dir, name, seed)
        if report_only:
            if (run_dir / "summary.json").is_file() and (run_dir / "final" / "config.json").is_file():
                results[name] = summary_row(cfg, run_dir, seed)
            continue
        if name != INIT_RUN and compare.init is not None:
            validate_run(cfg)  # the starting model exists now
        if name in trunk_of and not (run_dir / "run_config.json").is_file():  # not branched yet
            first = trunk_of[name]
            t_w = groups[first][0]
            trunk_dir = seed_dir(out_dir / "trunks", first, seed)
            if not quiet and not (trunk_dir / "checkpoints" / ckpt.step_dir_name(t_w)).is_dir():
                print(f"== trunk of {', '.join(groups[first][1])} (to step {t_w}) ==", flush=True)
            train_until(configs[first], trunk_dir, t_w, quiet=quiet)
            branch(trunk_dir, t_w, cfg, run_dir)
        results[name] = run_one(name, cfg, run_dir, quiet, seed)
    if compare.scratch_equal_compute and compare.compute_reference in results:
        reference = configs[compare.compute_reference]
        run_dir = seed_dir(out_dir, EQUAL_COMPUTE_RUN, seed)
        vocab = load_hf_model(seed_dir(out_dir, compare.compute_reference, seed) / "final").config.vocab_size
        cfg = equal_compute_config(reference, results[compare.compute_reference]["train_flops"], vocab)
        if not report_only:
            results[EQUAL_COMPUTE_RUN] = run_one(EQUAL_COMPUTE_RUN, cfg, run_dir, quiet, seed)
        elif (run_dir / "summary.json").is_file() and (run_dir / "final" / "config.json").is_file():
            results[EQUAL_COMPUTE_RUN] = summary_row(cfg, run_dir, seed)
    return results, groups


def aggregate_seeds(rows: dict[int | None, dict[str, Any]]) -> dict[str, Any]:
    """One summary row over seeds: the first seed's row with val_ppl the mean, plus val_ppl_mean,
    val_ppl_std (sample std; None with one seed) and val_ppl_seeds; the same for retention_ppl."""
    seeds = list(rows)
    result = dict(rows[seeds[0]])
    result.pop("seed")
    result["seeds"] = seeds
    for metric in ("val_ppl", "retention_ppl"):
        values = [rows[seed][metric] for seed in seeds if metric in rows[seed]]
        if len(values) != len(seeds):
            continue
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        result.update({metric: mean, f"{metric}_mean": mean, f"{metric}_std": std,
                       f"{metric}_seeds": {str(seed): value for seed, value in zip(seeds, values)}})
    return result


def run_one(name: str, cfg: RunConfig, run_dir: Path, quiet: bool, seed: int | None = None) -> dict[str, Any]:
    """Train one run (or reuse / resume it) and return its summary row."""
    summary_file = run_dir / "summary.json"
    if not (summary_file.is_file() and (run_dir / "final" / "config.json").is_file()):
        if not quiet:
            print(f"== {name}{'' if seed is None else f' (seed {seed})'} ==", flush=True)
        result = train(cfg, run_dir, resume=True, quiet=quiet)
        if not quiet:
            print_result(result)
    return summary_row(cfg, run_dir, seed)


def summary_row(cfg: RunConfig, run_dir: Path, seed: int | None) -> dict[str, Any]:
    """The compare summary row of a finished run."""
    run = json.loads((run_dir / "summary.json").read_text())
    method, level, family = method_of(cfg)
    return {"val_ppl": run["val_ppl"], "val_loss": run["val_loss"], "params": run["params"],
            "ffn_width": run["ffn_width"], "train_tokens": run["tokens"], "train_flops": run["train_flops"],
            "train_tok_per_s": round(run["train_tok_per_s"], 1), "steps": run["steps"],
            "pipeline": cfg.pipeline.name if cfg.pipeline else method, "method": method, "level": level, "family": family,
            "sparsity": run["sparsity"], "final_bytes": run["final_bytes"], "seed": cfg.train.seed if seed is None else seed,
            **({"final_sparse_bytes": run["final_sparse_bytes"]} if "final_sparse_bytes" in run else {}),
            **({"retention_ppl": run["retention_ppl"]} if "retention_ppl" in run else {}),
            **{key: value for key, value in run.items() if key == "mixture" or key.startswith("val_ppl/")}}


def method_of(cfg: RunConfig) -> tuple[str, float | None, str]:
    """(method name, final sparsity, family) of a run, for the report; read from the method table."""
    sections = method_sections(cfg)
    if sections:
        method, method_cfg = METHODS[sections[0]], getattr(cfg, sections[0])
        # a regulariser switched off (mgpp.prior: false) is its own line in the report: the no-prior control
        label = sections[0] + ("_noprior" if getattr(method_cfg, "prior", True) is False else "")
        return label, method.final_sparsity(method_cfg), method.family
    if cfg.pipeline is not None:
        return cfg.pipeline.name, None, "dense" if cfg.pipeline.name == "scratch" else "structured"
    return "dense", None, "dense"
