"""Shared fixtures: a small corpus written by the tests and a tiny training config."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml

# Tests pin one thread per process: results are then bit-reproducible and two agents/processes
# do not fight over the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

WORDS = ("the king queen lord lady castle sword horse night day love war crown speak hath thou thee "
         "doth fair foul heart death life gold silver field river storm sea ship wind fire blood "
         "honour shame friend enemy wise fool young old sweet bitter").split()


def write_corpus(root: Path, n_docs: int = 24, lines_per_doc: int = 60, seed: int = 0) -> list[Path]:
    """Deterministic pseudo-English documents with enough structure for a model to learn."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(n_docs):
        lines = []
        for _ in range(lines_per_doc):
            n = rng.randint(4, 10)
            words = [rng.choice(WORDS) for _ in range(n)]
            lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?"]))
        path = root / f"doc{d:03d}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    from lmprune.data import prepare_corpus

    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "texts")
    out = root / "prepared"
    prepare_corpus(str(root / "texts"), out, vocab_size=300, tokenizer=None, val_fraction=0.1, seed=0)
    return out


def tiny_run_config(prepared: Path, **train_overrides) -> dict:
    train = {"steps": 12, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "lr_end": 3e-4, "warmup": 2,
             "eval_every": 6, "eval_tokens": 512, "log_every": 1, "save_every": 0, "dtype": "fp32",
             "threads": 1, "sample_tokens": 8}
    train.update(train_overrides)
    return {
        "data": {"prepared_dir": str(prepared)},
        "model": {"preset": "tiny", "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                  "num_heads": 4, "num_kv_heads": 2},
        "train": train,
    }


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory, prepared_dir) -> Path:
    """A small dense model trained by `lmprune train` (20 steps): the starting point of fine-tuning methods."""
    from lmprune.cli import main

    root = tmp_path_factory.mktemp("dense")
    raw = tiny_run_config(prepared_dir, steps=20, eval_every=0, sample_tokens=0)
    assert main(["train", str(write_config(root / "dense.yaml", raw)), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run" / "final"
