"""The streaming prepare pipeline: staging dir, BPE sample, worker pool, progress bar, resume, publish.

A build happens in `.{NAME}.partial` beside the output dir NAME (locked with flock while a process
works in it). `plan.json` there holds the fingerprint of the settings; `progress.json` the last
checkpoint (chunks done, shard sizes, counts). A killed build rerun with the same settings resumes at
its checkpoint (written at least every `CHECKPOINT_BYTES` of text and whenever a shard completes);
other settings start over. When the last chunk is written, the shards and tokenizer move into an
`atomic_dir` with meta.json and are published under NAME in one rename: NAME never holds a partial
corpus. Bad input (UserError) removes the staging dir; an interrupt keeps it for the resume.

Memory: the main process holds at most `2 * num_proc + 2` chunks (about 1 MiB of text each) and
their token ids; each worker one chunk and its encodings. Nothing grows with the corpus, except the
BPE sample (`tokenizer_sample_bytes` of text, and the BPE trainer's ~40x that).
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import json
import logging
import multiprocessing
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmprune.atomic import atomic_dir, crash_point, remove_tree, write_json
from lmprune.errors import UserError
from lmprune.prepare.inputs import Chunk, chunks, total_disk_bytes
from lmprune.prepare.shards import SplitWriter
from lmprune.prepare.tokenize import (
    ChunkTokenizer,
    Settings,
    Tokenized,
    _split_by_keys,
    init_worker,
    parse_chunk,
    tokenize_in_worker,
    unit_hash,
)

logger = logging.getLogger(__name__)

CHECKPOINT_BYTES = 64 << 20
_PLAN, _PROGRESS, _LOCK = "plan.json", "progress.json", ".lock"
_SAMPLE_SALT = "bpe-sample\0"


@dataclass
class StreamSettings:
    """Everything besides the tokenizer that decides a prepared corpus's bytes (and how to run)."""

    val_fraction: float
    seed: int
    text_field: str
    skip_bad_lines: bool
    shard_tokens: int
    tokenizer_sample_bytes: int
    num_proc: int  # how many workers: does not change a byte of the output
    progress: bool


def staging_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


@contextlib.contextmanager
def locked_staging(out_dir: Path, fingerprint: str) -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """(staging dir, its checkpoint or None), held under an exclusive lock; a staging dir of other
    settings is emptied first."""
    staging = staging_dir(out_dir)
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / _LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `lmprune prepare` is writing {out_dir} right now ({staging} is locked)") from None
        yield staging, _checkpoint_of(staging, fingerprint)


def _checkpoint_of(staging: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        plan = json.loads((staging / _PLAN).read_text())
    except (OSError, json.JSONDecodeError):
        plan = None
    if not isinstance(plan, dict) or plan.get("fingerprint") != fingerprint:
        for entry in staging.iterdir():  # another build's leftovers (or none)
            if entry.name != _LOCK:
                remove_tree(entry) if entry.is_dir() else entry.unlink()
        write_json(staging / _PLAN, {"fingerprint": fingerprint})
        return None
    try:
        progress = json.loads((staging / _PROGRESS).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return progress if isinstance(progress, dict) and progress.get("fingerprint") == fingerprint else None


# ----------------------------------------------------------------------------- BPE sample


def bpe_sample(sources, settings: StreamSettings) -> list[str]:
    """The train documents with the lowest seeded sample keys that fit `tokenizer_sample_bytes`, in
    corpus order (the whole train split when it fits). Reads the corpus once, holding only the sample."""
    heap: list[tuple[float, int, int, str]] = []  # (-key, chunk, position, text): a max-heap by key
    held = 0
    for chunk in _progress_chunks(sources, settings, "sample for BPE"):
        parsed = parse_chunk(chunk, settings.text_field, settings.skip_bad_lines)
        keys = [unit_hash(settings.seed, raw) for raw in parsed.documents]
        train, _ = _split_by_keys(keys, settings.val_fraction, fix_up=chunk.whole_corpus)
        for position in train:
            raw = parsed.documents[position]
            heapq.heappush(heap, (-unit_hash(settings.seed, raw, _SAMPLE_SALT), chunk.index, position,
                                  parsed.texts[position]))
            held += len(raw)
            while held > settings.tokenizer_sample_bytes and len(heap) > 1:
                held -= len(heapq.heappop(heap)[3].encode("utf-8"))
    return [text for _, _, _, text in sorted(heap, key=lambda item: (item[1], item[2]))]


def _progress_chunks(sources, settings: StreamSettings, desc: str) -> Iterator[Chunk]:
    with tqdm(total=total_disk_bytes(sources), unit="B", unit_scale=True, desc=desc,
              disable=not settings.progress) as bar:
        for chunk in chunks(sources, settings.text_field):
            bar.update(chunk.disk_bytes)
            yield chunk


# ----------------------------------------------------------------------------- tokenize and write


def tokenize_sources(sources, staging: Path, settings: StreamSettings, worker: Settings,
                     encode: Callable[[list[str]], list[list[int]]] | None,
                     checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """Tokenize every chunk into `staging`'s shards (resuming at `checkpoint`); returns the counts and shards."""
    dtype = np.dtype(worker.dtype)
    fingerprint = json.loads((staging / _PLAN).read_text())["fingerprint"]
    state = checkpoint or {"fingerprint": fingerprint, "chunks_done": 0, "documents": [0, 0], "skipped_lines": 0,
                           "replaced": 0, "text_bytes": 0, "disk_bytes": 0}
    if checkpoint and not all(SplitWriter.resumable(staging, s, dtype, checkpoint[s]) for s in ("train", "val")):
        raise UserError(f"{staging} holds a checkpoint whose shards are damaged: delete it and run again")
    writers = {split: SplitWriter(staging, split, dtype, settings.shard_tokens, state.get(split))
               for split in ("train", "val")}
    if checkpoint:
        print(f"lmprune: resuming from chunk {state['chunks_done']} ({writers['train'].tokens:,} train tokens "
              f"written)", file=sys.stderr)
    since_checkpoint, shards_seen = 0, len(writers["train"].completed) + len(writers["val"].completed)
    bar = tqdm(total=total_disk_bytes(sources), initial=state["disk_bytes"], unit="B", unit_scale=True,
               desc="prepare", disable=not settings.progress)
    todo = (chunk for chunk in chunks(sources, settings.text_field) if chunk.index >= state["chunks_done"])
    with bar, contextlib.closing(_tokenized(todo, worker, encode, settings.num_proc)) as results:
        for result in results:
            writers["train"].write(result.train)
            writers["val"].write(result.val)
            _count(state, result)
            bar.update(result.disk_bytes)
            bar.set_postfix_str(f"{writers['train'].tokens + writers['val'].tokens:,} tokens", refresh=False)
            since_checkpoint += result.text_bytes
            shards = len(writers["train"].completed) + len(writers["val"].completed)
            if since_checkpoint >= CHECKPOINT_BYTES or shards != shards_seen:
                _checkpoint(staging, state, writers)
                since_checkpoint, shards_seen = 0, shards
    state["shards"] = {split: writer.close() for split, writer in writers.items()}
    state["tokens"] = {split: writer.tokens for split, writer in writers.items()}
    return state


def _count(state: dict[str, Any], result: Tokenized) -> None:
    state["chunks_done"] = result.index + 1
    state["documents"] = [state["documents"][0] + result.documents[0], state["documents"][1] + result.documents[1]]
    for key in ("skipped_lines", "replaced", "text_bytes", "disk_bytes"):
        state[key] += getattr(result, key)


def _checkpoint(staging: Path, state: dict[str, Any], writers: dict[str, SplitWriter]) -> None:
    for split, writer in writers.items():
        state[split] = writer.checkpoint()  # fsyncs the shard being written before the checkpoint names it
    write_json(staging / _PROGRESS, state, sort_keys=False)
    crash_point("prepare.checkpoint")


def _tokenized(todo: Iterator[Chunk], worker: Settings, encode, num_proc: int) -> Iterator[Tokenized]:
    """Tokenized chunks in input order: in this process (num_proc 1, a corpus of one chunk, or a
    tokenizer without a Rust backend), else in `num_proc` spawned workers with at most 2 * num_proc
    chunks in flight (Pool.imap would read the whole input ahead)."""
    first = next(todo, None)
    if first is None:
        return
    todo = itertools.chain([first], todo)
    if num_proc <= 1 or encode is not None or first.whole_corpus:
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process is one core, as in the workers
        try:
            tokenize = ChunkTokenizer(worker, encode)
            yield from (tokenize(chunk) for chunk in todo)
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        return
    pool = multiprocessing.get_context("spawn").Pool(num_proc, initializer=init_worker, initargs=(worker,))
    try:
        pending: deque = deque()
        for chunk in todo:
            pending.append(pool.apply_async(tokenize_in_worker, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def publish(staging: Path, out_dir: Path, meta: dict[str, Any]) -> None:
    """Move the shards and tokenizer into an atomic_dir with meta.json (written last), onto `out_dir`."""
    with atomic_dir(out_dir, replace=True) as fresh:
        for split in ("train", "val"):
            for shard in meta["shards"][split]:
                os.rename(staging / shard["file"], fresh / shard["file"])
        os.rename(staging / "tokenizer", fresh / "tokenizer")
        write_json(fresh / "meta.json", meta, sort_keys=False)
    remove_tree(staging)


def warn_replaced(state: dict[str, Any]) -> None:
    if state["replaced"]:
        warnings.warn(f"{state['replaced']:,} byte sequence(s) of the JSONL input are not valid UTF-8; decoded "
                      "as U+FFFD", stacklevel=3)
    if state["skipped_lines"]:
        print(f"lmprune: skipped {state['skipped_lines']:,} bad JSONL line(s) (--skip-bad-lines)", file=sys.stderr)
