"""Streaming preparation: raw corpora -> token shards in bounded memory, in worker processes.

- `inputs`: source specs (files, dirs, globs, .jsonl[.gz|.zst], .parquet, `datasets` dirs, `hf:NAME`,
  built-ins) -> a deterministic sequence of chunks of about 1 MiB of raw text each.
- `tokenize`: what a worker does to one chunk: parse, split train/val per document by hash, encode.
- `shards`: the token shards of a split, written append-only with a resumable checkpoint.
- `build`: the pipeline (BPE sample, worker pool, progress bar, resume, publish).

This package's `__init__` imports nothing: spawned workers import `tokenize` alone (no torch).
"""
