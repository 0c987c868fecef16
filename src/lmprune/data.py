"""Corpora -> tokenizer -> token shards: the prepared-corpus format, and reading it back.

A prepared corpus is one directory::

    DIR/tokenizer/          a Hugging Face tokenizer (`AutoTokenizer.from_pretrained` loads it without lmprune)
    DIR/train-00000.bin     token ids of the training documents, each followed by EOS (raw uint16 or
    DIR/train-00001.bin ... uint32), cut into shards of at most `shard_tokens` tokens (a document may
                            span two shards: the loader reads a split's shards as one stream)
    DIR/val-00000.bin ...   the same for the validation documents
    DIR/meta.json           written last: its presence marks the directory complete; lists the shards

`prepare_corpus` builds one by streaming (`lmprune.prepare`: bounded memory, worker processes,
resumable, published in one rename); `ensure_prepared` builds or reuses one under the cache;
`PreparedData.open` reads one (also the single-shard `train.bin` / `val.bin` dirs of data format 1).
The loaders over its shards live in `lmprune.loader`; the built-in text sources in `lmprune.corpora`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmprune.atomic import atomic_dir
from lmprune.corpora import cache_dir, parse_sources
from lmprune.errors import UserError
from lmprune.prepare import build
from lmprune.prepare.inputs import resolve_sources, source_identity
from lmprune.prepare.tokenize import Settings, split_documents
from lmprune.token_stream import TokenStream
from lmprune.trust import refuse_remote_code

logger = logging.getLogger(__name__)

__all__ = ["PreparedData", "prepare_corpus", "ensure_prepared", "load_hf_tokenizer", "train_bpe_tokenizer",
           "split_documents", "EOS_TOKEN", "FORMAT_VERSION"]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: one train.bin / val.bin per dir
EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
DEFAULT_SAMPLE_BYTES = 200_000_000  # BPE training needs ~40x its sample in RAM: ~8 GB at this default


# ----------------------------------------------------------------------------- tokenizer


def train_bpe_tokenizer(documents: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenization) with `<|endoftext|>` as its EOS token.

    The vocabulary may come out smaller than `vocab_size` when the text offers too few merges."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text stays encodable
        show_progress=sys.stderr.isatty(),
    )
    backend.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN)


def load_hf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local Hugging Face model/tokenizer dir (no hub access, no remote code).

    Missing dir, unloadable files or no eos_token -> UserError."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"tokenizer directory {path} does not exist")
    refuse_remote_code(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ... for a bad dir
        raise UserError(f"cannot load a tokenizer from {path}: {error}") from error
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {path} has no eos_token (needed as the document separator)")
    return tokenizer


# ----------------------------------------------------------------------------- prepare


@dataclass
class _Plan:
    """Everything that determines a prepared corpus's bytes, resolved and checked."""

    specs: list[str]
    sources: list  # lmprune.prepare.inputs sources, in order
    vocab_size: int | None  # requested BPE size; None with an HF tokenizer
    hf_tokenizer: PreTrainedTokenizerBase | None
    tokenizer_meta: dict[str, Any]
    settings: build.StreamSettings
    checksums: dict[str, str]
    fingerprint: str


def _checked_vocab_size(vocab_size: int | None, tokenizer: str | Path | None) -> int | None:
    """The BPE size to train (None when an HF tokenizer is given); UserError for a bad combination."""
    if vocab_size is not None and tokenizer is not None:
        raise UserError("give either a vocab size (train a BPE) or a tokenizer directory, not both")
    if tokenizer is not None:
        return None
    vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 257 <= vocab_size <= 1_000_000:
        raise UserError(f"vocab size must be an integer in [257, 1000000] (256 bytes + EOS), got {vocab_size!r}")
    return vocab_size


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def _stream_settings(val_fraction: float, seed: int, options: dict[str, Any]) -> build.StreamSettings:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}")
    num_proc = options.get("num_proc") or len(os.sched_getaffinity(0))
    text_field = options.get("text_field", "text")
    if not isinstance(text_field, str) or not text_field:
        raise UserError(f"text_field must be a non-empty string, got {text_field!r}")
    return build.StreamSettings(
        val_fraction=float(val_fraction), seed=seed, text_field=text_field,
        skip_bad_lines=bool(options.get("skip_bad_lines", False)),
        shard_tokens=_positive_int("shard_tokens", options.get("shard_tokens", DEFAULT_SHARD_TOKENS)),
        tokenizer_sample_bytes=_positive_int("tokenizer_sample_bytes",
                                             options.get("tokenizer_sample_bytes", DEFAULT_SAMPLE_BYTES)),
        num_proc=_positive_int("num_proc", num_proc), progress=bool(options.get("progress", True)),
    )


def _plan(source: str | Sequence[str], vocab_size: int | None, tokenizer: str | Path | None, val_fraction: float,
          seed: int, options: dict[str, Any]) -> _Plan:
    vocab_size = _checked_vocab_size(vocab_size, tokenizer)
    settings = _stream_settings(val_fraction, seed, options)
    hf_tokenizer = None if tokenizer is None else load_hf_tokenizer(tokenizer)
    specs = parse_sources(source)
    sources = resolve_sources(specs)
    checksums = source_identity(sources)
    if hf_tokenizer is None:
        tokenizer_meta: dict[str, Any] = {"kind": "bpe", "origin": None, "requested_vocab_size": vocab_size,
                                          "sample_bytes": settings.tokenizer_sample_bytes}
        tokenizer_identity: dict[str, Any] = {"kind": "bpe", "requested_vocab_size": vocab_size,
                                              "sample_bytes": settings.tokenizer_sample_bytes}
    else:
        content = hf_tokenizer.backend_tokenizer.to_str() if hf_tokenizer.is_fast else repr(hf_tokenizer.get_vocab())
        content_sha = hashlib.sha256(f"{content}\0{hf_tokenizer.eos_token_id}".encode()).hexdigest()
        tokenizer_meta = {"kind": "hf", "origin": str(Path(tokenizer).expanduser().absolute()), "sha256": content_sha}
        tokenizer_identity = {"kind": "hf", "sha256": content_sha}  # the same tokenizer moved elsewhere is a hit
    identity = {
        "version": FORMAT_VERSION,
        "sources": list(checksums),  # order matters: it orders the documents
        "source_checksums": checksums,
        "tokenizer": tokenizer_identity,
        "val_fraction": settings.val_fraction,
        "seed": seed,
        "text_field": settings.text_field,
        "skip_bad_lines": settings.skip_bad_lines,
        "shard_tokens": settings.shard_tokens,
    }
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return _Plan(specs, sources, vocab_size, hf_tokenizer, tokenizer_meta, settings, checksums, fingerprint)


def prepare_corpus(
    source: str | Sequence[str],
    out_dir: str | Path,
    *,
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Build a prepared corpus in `out_dir` and return its path.

    Tokenizer: a byte-level BPE of `vocab_size` (default 8192) trained on a seeded sample of the train
    split (`tokenizer_sample_bytes`), or the tokenizer of the local HF dir `tokenizer`. Options:
    `num_proc` (default: all cores; never changes the output), `shard_tokens`, `text_field`
    ("text"), `skip_bad_lines`, `tokenizer_sample_bytes`, `progress`. If `out_dir` already holds the
    same corpus (same source identities and settings) it is returned as-is; a different one ->
    UserError unless `overwrite`. A non-empty directory that is no prepared corpus is never touched.
    A killed build resumes when called again with the same settings."""
    out_dir = Path(out_dir).expanduser().absolute()
    _existing_meta(out_dir)  # refuse a foreign directory before any slow work
    return _prepare_planned(_plan(source, vocab_size, tokenizer, val_fraction, seed, options), out_dir, overwrite)


def ensure_prepared(
    source: str | Sequence[str],
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    out_dir: str | Path | None = None,
    **options: Any,
) -> Path:
    """Path of a prepared corpus for these settings, building it on first use.

    With `out_dir` None it lives under `cache_dir()/prepared/<hash of settings + source identities>`,
    so a config naming `source: shakespeare` prepares it once and reuses it after."""
    plan = _plan(source, vocab_size, tokenizer, val_fraction, seed, {"progress": True, **options})
    if out_dir is None:
        out_dir = cache_dir() / "prepared" / plan.fingerprint[:20]
    return _prepare_planned(plan, Path(out_dir).expanduser().absolute(), overwrite=False)


def _existing_meta(out_dir: Path) -> dict[str, Any] | None:
    """meta.json of a prepared corpus at out_dir; None if absent or an empty dir; UserError otherwise."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = None
        return meta if isinstance(meta, dict) else {}
    if any(out_dir.iterdir()):
        raise UserError(f"output directory {out_dir} is not empty and holds no prepared corpus (no meta.json)")
    return None


def _prepare_planned(plan: _Plan, out_dir: Path, overwrite: bool) -> Path:
    existing = _existing_meta(out_dir)
    if existing is not None:
        if existing.get("fingerprint") == plan.fingerprint:
            PreparedData.open(out_dir)  # checks the shards are whole before calling it a hit
            logger.info("reusing the prepared corpus in %s", out_dir)
            return out_dir
        if not overwrite:
            version = existing.get("version")
            older = f", data format {version}: re-prepare it" if version != FORMAT_VERSION else ""
            raise UserError(
                f"{out_dir} already holds a different prepared corpus (source {existing.get('source')!r}{older}); "
                "pass overwrite (--overwrite) to replace it, or choose another directory"
            )
    with build.locked_staging(out_dir, plan.fingerprint) as (staging, checkpoint):
        meta = _existing_meta(out_dir)  # another process may have published it while we waited
        if meta is not None and meta.get("fingerprint") == plan.fingerprint:
            return out_dir
        try:
            _build(plan, staging, out_dir, checkpoint)
        except UserError:
            build.remove_tree(staging)  # bad input: nothing to resume
            raise
    return out_dir


def _build(plan: _Plan, staging: Path, out_dir: Path, checkpoint: dict[str, Any] | None) -> None:
    tokenizer = _staged_tokenizer(plan, staging)
    vocab_size = len(tokenizer)
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    fast = getattr(tokenizer, "backend_tokenizer", None) is not None
    settings = plan.settings
    worker = Settings(tokenizer.backend_tokenizer.to_str() if fast else None, tokenizer.eos_token_id,
                      np.dtype(dtype).name, settings.val_fraction, settings.seed, settings.text_field,
                      settings.skip_bad_lines)
    encode = None if fast else (lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"])
    state = build.tokenize_sources(plan.sources, staging, settings, worker, encode, checkpoint)
    if sum(state["documents"]) == 0:
        raise UserError(f"data source {','.join(plan.specs)!r} holds no text (empty corpus)")
    build.warn_replaced(state)
    meta = {
        "version": FORMAT_VERSION,
        "source": ",".join(plan.specs),
        "tokenizer": plan.tokenizer_meta,
        "vocab_size": vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": np.dtype(dtype).name,
        "train_tokens": state["tokens"]["train"],
        "val_tokens": state["tokens"]["val"],
        "documents": {"train": state["documents"][0], "val": state["documents"][1]},
        "shards": state["shards"],
        "shard_tokens": settings.shard_tokens,
        "skipped_lines": state["skipped_lines"],
        "text_bytes": state["text_bytes"],
        "source_checksums": plan.checksums,
        "text_field": settings.text_field,
        "val_fraction": settings.val_fraction,
        "seed": settings.seed,
        "fingerprint": plan.fingerprint,
    }
    build.publish(staging, out_dir, meta)


def _staged_tokenizer(plan: _Plan, staging: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of this build: reloaded from the staging dir when resuming, else trained / copied there."""
    saved = staging / "tokenizer"
    if saved.is_dir():
        return load_hf_tokenizer(saved)
    if plan.hf_tokenizer is not None:
        tokenizer = plan.hf_tokenizer
    else:
        assert plan.vocab_size is not None
        sample = build.bpe_sample(plan.sources, plan.settings)  # train split only: val stays unseen
        if not sample:
            raise UserError(f"data source {','.join(plan.specs)!r} holds no text (empty corpus)")
        tokenizer = train_bpe_tokenizer(sample, plan.vocab_size)
        del sample
    with atomic_dir(saved) as fresh:
        tokenizer.save_pretrained(fresh)
    return tokenizer


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True, eq=False)
class PreparedData:
    """A prepared corpus opened for reading: each split's shards as one read-only `TokenStream`, plus meta.json."""

    path: Path
    meta: dict[str, Any]
    train: TokenStream  # [train_tokens] uint16/uint32
    val: TokenStream  # [val_tokens]

    @classmethod
    def open(cls, path: str | Path) -> PreparedData:
        """Open DIR; missing dir or meta.json, an unknown format version, or shards whose sizes do not
        match meta.json -> UserError."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise UserError(f"prepared data directory {path} does not exist (run `lmprune prepare`)")
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{path} has no meta.json: not a (complete) prepared corpus")
        try:
            meta = json.loads(meta_path.read_text())
            version = meta["version"]
            dtype = np.dtype(meta["dtype"])
            shards = cls._shard_lists(meta, version)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise UserError(f"{meta_path} is unreadable or incomplete: {error}") from error
        streams = {split: TokenStream.open([path / name for name, _ in files], dtype, [n for _, n in files])
                   for split, files in shards.items()}
        return cls(path, meta, streams["train"], streams["val"])

    @staticmethod
    def _shard_lists(meta: dict[str, Any], version: Any) -> dict[str, list[tuple[str, int]]]:
        if version not in READABLE_VERSIONS:
            raise UserError(f"prepared with data format {version}, this lmprune reads {READABLE_VERSIONS}: "
                            "re-prepare it with `lmprune prepare --overwrite`")
        if version == 1:
            return {split: [(f"{split}.bin", int(meta[f"{split}_tokens"]))] for split in ("train", "val")}
        return {split: [(str(s["file"]), int(s["tokens"])) for s in meta["shards"][split]] for split in ("train", "val")}

    def shard_files(self, split: str) -> list[Path]:
        """The shard files of "train" or "val", in stream order."""
        return [self.path / name for name, _ in self._shard_lists(self.meta, self.meta["version"])[split]]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_token_id(self) -> int:
        return int(self.meta["eos_token_id"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return load_hf_tokenizer(self.tokenizer_dir)
