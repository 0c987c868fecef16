"""A run's output dir: who may write into it, its metrics log, and the final export.

    OUT/run_config.json   the resolved config (a resumed run must match it)
    OUT/metrics.jsonl     one JSON object per logged step
    OUT/checkpoints/      see checkpoint.py
    OUT/final/            HF dir of the trained model (OUT/final-sparse/: bitmask + values)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmprune.atomic import atomic_dir, write_text
from lmprune.data import PreparedData
from lmprune.errors import UserError
from lmprune.pruning.sparse.export import save_compact
from lmprune.pruning.sparse.masks import DEFAULT_PATTERNS

# Config fields that may differ between a run and its resumption (they change no numbers).
RESUME_FREE_KEYS = {("train", "save_every"), ("train", "log_every"), ("train", "eval_every"),
                    ("train", "keep_last"), ("train", "sample_tokens"), ("out_dir",)}


def check_out_dir(out_dir: Path, run_config: dict, resume: bool) -> None:
    """Refuse an output dir that holds another run (or this one, without --resume)."""
    saved = out_dir / "run_config.json"
    if not saved.is_file():
        if out_dir.is_dir() and any(p.name in {"metrics.jsonl", "checkpoints", "final"} for p in out_dir.iterdir()):
            raise UserError(f"{out_dir} holds files of another run (no run_config.json); choose another --out")
        return
    if not resume:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    previous = json.loads(saved.read_text())
    for section, values in run_config.items():
        if not isinstance(values, dict):
            if (section,) not in RESUME_FREE_KEYS and previous.get(section) != values:
                raise UserError(f"{out_dir} holds another run ({section} differs); choose another --out")
            continue
        for key, value in values.items():
            if (section, key) not in RESUME_FREE_KEYS and previous.get(section, {}).get(key) != value:
                raise UserError(f"{out_dir} holds another run ({section}.{key}: {previous.get(section, {}).get(key)!r}"
                                f" there, {value!r} now); choose another --out")


class MetricsLog:
    """Appends one JSON object per logged step to OUT/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            # Rows past the checkpoint we resume from were written by the run that died: drop them.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text(path, "".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def export_final(model: torch.nn.Module, data: PreparedData, final_dir: Path, sparse: bool = False,
                 patterns: tuple[str, ...] | list[str] | None = None) -> None:
    """OUT/final: a HF dir (config, safetensors, tokenizer) that loads with no lmprune import.

    With `sparse`, OUT/final-sparse holds the same model as bitmask + nonzero values
    (model.sparse.safetensors, which `lmprune eval` and `load_hf_model` read back bit-exactly).
    """
    with atomic_dir(final_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        data.load_tokenizer().save_pretrained(tmp)
    if sparse:
        with atomic_dir(final_dir.with_name(final_dir.name + "-sparse")) as tmp:
            model.config.save_pretrained(tmp)
            save_compact(model, tmp, patterns or DEFAULT_PATTERNS)
            data.load_tokenizer().save_pretrained(tmp)
