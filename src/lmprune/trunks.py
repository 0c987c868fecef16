"""Shared trunks: runs of a comparison that are identical up to a step train that prefix once.

idea, oneshot (resumed) and oneshot (restarted) do the same thing before prune start t_w: the same
enlarged model, seed, data order and LR, and the same pruner bookkeeping (its importance EMA starts
2 * prune_every before t_w in all of them); scratch and the scratch LR-restart control likewise. Such
runs are grouped by `trunk_key`; one trunk run (the first member's config) trains to t_w and
checkpoints there, and every member starts from a copy of that checkpoint (`branch`), which resume
makes exactly the run it would have been (checkpoint/resume is bit-exact; tests/test_trunks.py
checks a branched run against the same run trained whole).

Layout: DIR/trunks/<first member>[/seed-S]/ is the trunk run (its own metrics and checkpoints); a
member's dir gets the trunk's metrics rows up to t_w, the t_w checkpoint, then its run_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmprune import checkpoint as ckpt
from lmprune.atomic import atomic_dir, write_json, write_text
from lmprune.config import RunConfig
from lmprune.pipelines import validate_run
from lmprune.run_dir import read_rows

# Pipeline fields that act only from prune start on (the trunk key ignores them; what they change
# before t_w, such as the LR of naive or where the importance EMA starts, is in the key itself).
POST_PRUNE_FIELDS = ("name", "prune_span", "prune_every", "oneshot_schedule", "naive_fresh_optimizer")


def trunk_key(cfg: RunConfig) -> tuple[int, str] | None:
    """(t_w, a key equal for runs whose first t_w steps are identical), None for a run that shares nothing
    (no pipeline, or distillation, whose teacher snapshot belongs to the run)."""
    if cfg.pipeline is None or cfg.kd is not None:
        return None
    plan = validate_run(cfg)
    t_w, tcfg = plan.prune_start, cfg.train
    raw = cfg.model_dump(mode="json")
    key = {section: value for section, value in raw.items() if section not in ("pipeline", "compare", "out_dir")}
    key["pipeline"] = {k: v for k, v in raw["pipeline"].items() if k not in POST_PRUNE_FIELDS}
    key["initial_width"] = plan.initial_width
    key["method"] = plan.method
    key["tracking_start"] = plan.prune.tracking_start if plan.prune is not None else None
    key["lr"] = [plan.lr_at(step, tcfg.lr, tcfg.lr_end, tcfg.warmup) for step in range(t_w)]
    return t_w, json.dumps(key, sort_keys=True)


def trunk_groups(configs: dict[str, RunConfig]) -> dict[str, tuple[int, list[str]]]:
    """{first member: (t_w, members)} for every set of >= 2 runs with the same trunk key."""
    groups: dict[tuple[int, str], list[str]] = {}
    for name, cfg in configs.items():
        key = trunk_key(cfg)
        if key is not None:
            groups.setdefault(key, []).append(name)
    return {members[0]: (key[0], members) for key, members in groups.items() if len(members) > 1}


def branch(trunk_dir: Path, t_w: int, cfg: RunConfig, run_dir: Path) -> bool:
    """Start `run_dir` from the trunk's checkpoint at t_w (metrics rows up to t_w, the checkpoint, then
    run_config.json, written last as a run's own setup does). False when run_dir has already started."""
    if (run_dir / "run_config.json").is_file():
        return False
    source = trunk_dir / "checkpoints" / ckpt.step_dir_name(t_w)
    problem = ckpt.checkpoint_problem(source)
    if problem is not None:
        raise RuntimeError(f"trunk checkpoint {source}: {problem}")
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = read_rows(trunk_dir / "metrics.jsonl", up_to_step=t_w)
    write_text(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    target = run_dir / "checkpoints" / ckpt.step_dir_name(t_w)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target, replace=True) as tmp:
        for file in sorted(source.iterdir()):
            shutil.copyfile(file, tmp / file.name)
    write_json(run_dir / "run_config.json", cfg.model_dump(mode="json"))
    return True
