"""lm-eval harness tasks built from a prepared corpus's held-out text, and an offline runner for them.

Tasks (multiple choice, 4 candidates, scored by log-likelihood; metrics acc and acc_norm):
- `nextline_mc`: given `CONTEXT_LINES` consecutive lines of held-out text, pick the true next line
  among it and 3 lines drawn from elsewhere in the held-out text.
- `cloze_word`: given 2 lines and the start of a third, pick its true last word among it and 3 last
  words of other held-out lines.

A task dir holds, per task, `<task>.yaml` (an lm-eval task config naming its JSONL by absolute path:
moving the dir means rebuilding it) and `<task>.jsonl` (one {"context", "choices", "label"} object per
line), plus `tasks_meta.json`, written last. Any lm-eval install runs them:
`lm_eval --model hf --model_args pretrained=MODEL_DIR --include_path TASK_DIR --tasks nextline_mc`.
The held-out text is the val split decoded with the corpus's tokenizer, so corpora prepared from the
same source with different tokenizers give the same tasks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from lmprune.atomic import atomic_dir, write_json
from lmprune.errors import UserError

if TYPE_CHECKING:  # lmprune.data (torch, transformers) is imported where used: add_task_args runs on every CLI call
    from lmprune.data import PreparedData

TASK_VERSION = 1  # bump when the example construction changes: it is part of the cache key
NUM_CHOICES = 4
CONTEXT_LINES = 3
DEFAULT_EXAMPLES = 500
META_FILE = "tasks_meta.json"
MAX_DECODED_TOKENS = 1 << 21  # held-out text decoded for building tasks: plenty for a few thousand examples
_LAST_WORD = re.compile(r"^(?P<head>.*\S)\s+(?P<word>[A-Za-z][A-Za-z'-]{2,})(?P<tail>[^\w\s]*)$")


# ---------------------------------------------------------------- held-out text


def held_out_lines(data: PreparedData) -> list[list[str]]:
    """Per val document, its non-blank lines (stripped), decoded from the val token shard."""
    tokens = np.asarray(data.val[:MAX_DECODED_TOKENS], dtype=np.int64)
    tokenizer = data.load_tokenizer()
    boundaries = np.flatnonzero(tokens == data.eos_token_id)
    documents, start = [], 0
    for end in [*boundaries.tolist(), len(tokens)]:
        if end > start:
            documents.append(tokenizer.decode(tokens[start:end].tolist(), skip_special_tokens=True))
        start = end + 1
    return [[line.strip() for line in doc.splitlines() if line.strip()] for doc in documents]


def _is_candidate_line(line: str) -> bool:
    """A line worth predicting: a few words of text, not a stray heading or a whole paragraph."""
    return 12 <= len(line) <= 160 and len(line.split()) >= 3


def _distinct(items: Sequence[str]) -> list[str]:
    """Sorted items, one per case-insensitive spelling (so a pool of k entries offers k - 1 distractors)."""
    return sorted({item.lower(): item for item in sorted(items)}.values())


def _distractors(rng: random.Random, pool: Sequence[str], answer: str, count: int) -> list[str]:
    """`count` distinct pool entries that differ from `answer` (case-insensitively)."""
    picked: dict[str, str] = {}
    while len(picked) < count:
        candidate = pool[rng.randrange(len(pool))]
        if candidate.lower() != answer.lower():
            picked.setdefault(candidate.lower(), candidate)
    return list(picked.values())


def _example(rng: random.Random, context: str, answer: str, pool: Sequence[str]) -> dict[str, Any]:
    choices = [answer, *_distractors(rng, pool, answer, NUM_CHOICES - 1)]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(answer)}


def _too_few(task: str, found: int, pool: int) -> UserError:
    return UserError(f"the held-out text is too small for {task}: {found} usable positions and {pool} distinct "
                     f"candidates (needs >= 1 and >= {NUM_CHOICES})")


def nextline_examples(documents: list[list[str]], count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Up to `count` next-line multiple-choice examples (fewer when the text has fewer positions)."""
    positions = [(d, i) for d, lines in enumerate(documents) for i in range(CONTEXT_LINES, len(lines))
                 if _is_candidate_line(lines[i])]
    pool = _distinct([documents[d][i] for d, i in positions])
    if not positions or len(pool) < NUM_CHOICES:
        raise _too_few("nextline_mc", len(positions), len(pool))
    chosen = sorted(rng.sample(positions, min(count, len(positions))))
    return [_example(rng, "\n".join(documents[d][i - CONTEXT_LINES:i]), documents[d][i], pool) for d, i in chosen]


def cloze_examples(documents: list[list[str]], count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Up to `count` last-word cloze examples: context = 2 lines + the third without its last word."""
    positions = []
    for d, lines in enumerate(documents):
        for i in range(2, len(lines)):
            match = _LAST_WORD.match(lines[i])
            if match and len(match["head"].split()) >= 3:
                positions.append((d, i, match["head"], match["word"]))
    pool = _distinct([word for *_, word in positions])
    if not positions or len(pool) < NUM_CHOICES:
        raise _too_few("cloze_word", len(positions), len(pool))
    chosen = sorted(rng.sample(positions, min(count, len(positions))))
    return [_example(rng, "\n".join([*documents[d][i - 2:i], head]), word, pool) for d, i, head, word in chosen]


# target_delimiter joins the context and a choice: the next line starts after a newline, a word after a space.
TASKS: dict[str, tuple[Callable[[list[list[str]], int, random.Random], list[dict[str, Any]]], str]] = {
    "nextline_mc": (nextline_examples, "\n"),
    "cloze_word": (cloze_examples, " "),
}


# ---------------------------------------------------------------- task files


def task_config(task: str, jsonl: Path) -> dict[str, Any]:
    """The lm-eval YAML config of one task reading `jsonl` (an absolute path) as its test split."""
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # column names: lm-eval reads the field as-is
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": TASKS[task][1],
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": TASK_VERSION},
    }


def build_tasks(data_dir: str | Path, out_dir: str | Path, num_examples: int = DEFAULT_EXAMPLES,
                seed: int = 0) -> Path:
    """Write every task of TASKS (YAML + JSONL) built from the corpus's held-out text into out_dir.

    out_dir must not exist or be empty; it is filled in a staging dir and renamed into place."""
    from lmprune.data import PreparedData

    if num_examples < 1:
        raise UserError(f"number of task examples must be >= 1; got {num_examples}")
    data = PreparedData.open(data_dir)
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"task dir {out_dir} already exists and is not empty")
    documents = held_out_lines(data)
    # replace=False: a task dir another process published meanwhile is kept (OSError, see ensure_tasks)
    with atomic_dir(out_dir, replace=False) as staging:
        counts = {}
        for task, (make_examples, _) in TASKS.items():
            examples = make_examples(documents, num_examples, random.Random(f"{seed}:{task}"))
            with open(staging / f"{task}.jsonl", "w") as handle:
                handle.writelines(json.dumps(example) + "\n" for example in examples)
            config = task_config(task, out_dir / f"{task}.jsonl")  # the final path, valid after the rename
            (staging / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            counts[task] = len(examples)
        meta = {"version": TASK_VERSION, "data_dir": str(data.path), "data_fingerprint": data.meta.get("fingerprint"),
                "seed": seed, "examples": counts}
        write_json(staging / META_FILE, meta, sort_keys=False)  # last: marks the dir complete
        os.chmod(staging, 0o755)  # an ordinary world-readable dir, whatever the umask (as before)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above (not empty now: OSError, the staging dir is removed)
    return out_dir


def ensure_tasks(data_dir: str | Path, num_examples: int = DEFAULT_EXAMPLES, seed: int = 0) -> Path:
    """The task dir for this corpus under `cache_dir()/lm_tasks/`, built on first use."""
    from lmprune.corpora import cache_dir
    from lmprune.data import PreparedData

    data = PreparedData.open(data_dir)
    identity = json.dumps({"data": data.meta.get("fingerprint"), "path": str(data.path.absolute()),
                           "version": TASK_VERSION, "examples": num_examples, "seed": seed}, sort_keys=True)
    target = cache_dir() / "lm_tasks" / hashlib.sha256(identity.encode()).hexdigest()[:20]
    if (target / META_FILE).is_file():
        return target
    if target.exists():
        shutil.rmtree(target)  # an incomplete build of ours (no marker): start again
    try:
        return build_tasks(data_dir, target, num_examples, seed)
    except OSError:
        if (target / META_FILE).is_file():  # another process published the same tasks first
            return target
        raise


# ---------------------------------------------------------------- running lm-eval offline


def parse_task_names(spec: str | Sequence[str]) -> list[str]:
    """"a,b" or a list -> task names, each checked against TASKS (UserError naming the known ones)."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def run_lm_eval(model_dir: str | Path, task_dir: str | Path, tasks: Sequence[str], limit: int | None = None,
                batch_size: int = 8, tokenizer: str | Path | None = None, device: str = "cpu",
                dtype: str = "fp32") -> dict[str, float]:
    """Run tasks of `task_dir` on the local HF model with lm-eval, offline, zero-shot.

    Returns {"<task>/acc": ..., "<task>/acc_norm": ...}. limit: first N examples of each task.
    tokenizer: a tokenizer dir when model_dir has none. Sets HF_HUB_OFFLINE=1 and
    HF_DATASETS_OFFLINE=1 in this process (nothing may come from a hub)."""
    tasks = parse_task_names(tasks)
    task_dir = Path(task_dir)
    missing = [t for t in tasks if not (task_dir / f"{t}.yaml").is_file()]
    if missing:
        raise UserError(f"task dir {task_dir} has no {', '.join(m + '.yaml' for m in missing)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1; got {limit}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval tasks need the `lm-eval` package: pip install 'lmprune[eval]'") from None
    model = HFLM(pretrained=str(model_dir), tokenizer=str(tokenizer) if tokenizer else None, batch_size=batch_size,
                 device=device, dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype], trust_remote_code=False)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    output = simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=0,
                             bootstrap_iters=0, log_samples=False)
    scores = {}
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            scores[f"{task}/{metric}"] = float(output["results"][task][f"{metric},none"])
    return scores


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """Add --tasks and --limit to the `eval` verb's parser (it already has --data, --batch-size, --device, --dtype)."""
    parser.add_argument("--tasks", default=None,
                        help=f"lm-eval tasks built from the held-out text of --data: {', '.join(TASKS)}")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")


def run_tasks_from_args(args: argparse.Namespace, model_dir: str | Path) -> dict[str, float]:
    """`lmprune eval ... --tasks ...`: build (or reuse) the tasks of args.data and run them on model_dir.

    Returns {} when no --tasks were given. Task names and --limit are checked before anything is built."""
    from lmprune.data import PreparedData

    if not getattr(args, "tasks", None):
        return {}
    tasks = parse_task_names(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1; got {args.limit}")
    model_dir = Path(model_dir)
    has_tokenizer = any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = None if has_tokenizer else PreparedData.open(args.data).tokenizer_dir
    task_dir = ensure_tasks(args.data)
    return run_lm_eval(model_dir, task_dir, tasks, limit=args.limit, batch_size=getattr(args, "batch_size", 8),
                       tokenizer=tokenizer, device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", "fp32"))
