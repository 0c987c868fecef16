"""Corpora -> tokenizer -> token shards: the prepared-corpus format, and reading it back.

A prepared corpus is one directory::

    DIR/tokenizer/   a Hugging Face tokenizer (`AutoTokenizer.from_pretrained` loads it without lmprune)
    DIR/train.bin    token ids of the training documents, each followed by EOS (raw uint16 or uint32)
    DIR/val.bin      the same for the validation documents
    DIR/meta.json    written last: its presence marks the directory complete

`prepare_corpus` builds one (in a temp dir next to DIR, renamed into place); `ensure_prepared` builds
or reuses one under the cache; `PreparedData.open` reads one. The loaders over its shards live in
`lmprune.loader` (`TokenLoader`: training batches with exact resume; `val_batches`: evaluation
windows); the raw text sources in `lmprune.corpora`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmprune.atomic import atomic_dir, write_json
from lmprune.corpora import Corpus, cache_dir, load_corpus
from lmprune.errors import UserError
from lmprune.trust import refuse_remote_code

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_FRACTION = 0.05
_ENCODE_BATCH_CHARS = 1 << 22  # text per encode_batch call: bounds memory, keeps the progress bar moving


# ----------------------------------------------------------------------------- split and tokenizer


def _unit_hash(seed: int, text: str) -> float:
    digest = hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(documents: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices), in corpus order, chosen by a seeded hash of each document's content.

    The split does not depend on document order, and identical documents land on the same side. With
    >= 2 documents both sides get at least one (the lowest / highest hash is moved if needed); a single
    document goes to train."""
    keys = [_unit_hash(seed, doc) for doc in documents]
    val = {i for i, key in enumerate(keys) if key < val_fraction}
    if len(documents) >= 2 and not val:
        val.add(min(range(len(keys)), key=keys.__getitem__))
    if val and len(val) == len(documents):  # training needs data more than validation does
        val.remove(max(range(len(keys)), key=keys.__getitem__))
    train = [i for i in range(len(documents)) if i not in val]
    return train, sorted(val)


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


def _batch_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], list[list[int]]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a pure-Python tokenizer: slower, but correct
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    encoder = Tokenizer.from_str(backend.to_str())  # a private copy: the settings below stay local
    encoder.encode_special_tokens = True  # "<|endoftext|>" written inside a document is text, not a boundary
    encoder.no_truncation()
    encoder.no_padding()
    return lambda texts: [encoding.ids for encoding in encoder.encode_batch(texts, add_special_tokens=False)]


def _write_token_shard(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], path: Path, dtype: type, desc: str
) -> int:
    """Encode documents in batches and append them, each followed by EOS, to `path`; returns the token count."""
    encode = _batch_encoder(tokenizer)
    eos = tokenizer.eos_token_id
    largest_id = np.iinfo(dtype).max
    written = 0
    with open(path, "wb") as shard, tqdm(
        total=sum(len(doc) for doc in documents), unit="char", unit_scale=True, desc=desc
    ) as progress:
        start = 0
        while start < len(documents):
            end, chars = start, 0
            while end < len(documents) and (end == start or chars + len(documents[end]) <= _ENCODE_BATCH_CHARS):
                chars += len(documents[end])
                end += 1
            for ids in encode(documents[start:end]):
                tokens = np.array([*ids, eos], dtype=np.int64)
                if tokens.max() > largest_id:
                    raise UserError(f"tokenizer produced id {tokens.max()} that does not fit {np.dtype(dtype).name}")
                shard.write(tokens.astype(dtype).tobytes())
                written += len(tokens)
            progress.update(chars)
            start = end
    return written


# ----------------------------------------------------------------------------- prepare


@dataclass
class _Plan:
    """Everything that determines a prepared corpus's bytes, resolved and checked."""

    corpus: Corpus
    vocab_size: int | None  # requested BPE size; None with an HF tokenizer
    hf_tokenizer: PreTrainedTokenizerBase | None
    tokenizer_meta: dict[str, Any]
    val_fraction: float
    seed: int
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


def _plan(
    source: str | Sequence[str], vocab_size: int | None, tokenizer: str | Path | None, val_fraction: float, seed: int
) -> _Plan:
    vocab_size = _checked_vocab_size(vocab_size, tokenizer)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}")
    hf_tokenizer = None if tokenizer is None else load_hf_tokenizer(tokenizer)
    corpus = load_corpus(source)
    if hf_tokenizer is None:
        tokenizer_meta: dict[str, Any] = {"kind": "bpe", "origin": None, "requested_vocab_size": vocab_size}
        tokenizer_identity: dict[str, Any] = {"kind": "bpe", "requested_vocab_size": vocab_size}
    else:
        content = hf_tokenizer.backend_tokenizer.to_str() if hf_tokenizer.is_fast else repr(hf_tokenizer.get_vocab())
        content_sha = hashlib.sha256(f"{content}\0{hf_tokenizer.eos_token_id}".encode()).hexdigest()
        tokenizer_meta = {"kind": "hf", "origin": str(Path(tokenizer).expanduser().absolute()), "sha256": content_sha}
        tokenizer_identity = {"kind": "hf", "sha256": content_sha}  # the same tokenizer moved elsewhere is a hit
    identity = {
        "version": FORMAT_VERSION,
        "sources": list(corpus.checksums),  # order matters: it orders the documents
        "source_checksums": corpus.checksums,
        "tokenizer": tokenizer_identity,
        "val_fraction": float(val_fraction),
        "seed": seed,
    }
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return _Plan(corpus, vocab_size, hf_tokenizer, tokenizer_meta, float(val_fraction), seed, fingerprint)


def prepare_corpus(
    source: str | Sequence[str],
    out_dir: str | Path,
    *,
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build a prepared corpus in `out_dir` and return its path.

    Tokenizer: a byte-level BPE of `vocab_size` (default 8192) trained on the train split, or the
    tokenizer of the local HF dir `tokenizer`. If `out_dir` already holds the same corpus (same source
    checksums and settings) it is returned as-is; a different one -> UserError unless `overwrite`. A
    non-empty directory that is no prepared corpus is never touched."""
    out_dir = Path(out_dir).expanduser().absolute()
    _existing_meta(out_dir)  # refuse a foreign directory before any slow work
    return _prepare_planned(_plan(source, vocab_size, tokenizer, val_fraction, seed), out_dir, overwrite)


def ensure_prepared(
    source: str | Sequence[str],
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> Path:
    """Path of a prepared corpus for these settings, building it on first use.

    With `out_dir` None it lives under `cache_dir()/prepared/<hash of settings + source checksums>`,
    so a config naming `source: shakespeare` prepares it once and reuses it after."""
    plan = _plan(source, vocab_size, tokenizer, val_fraction, seed)
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
            raise UserError(
                f"{out_dir} already holds a different prepared corpus (source {existing.get('source')!r}); "
                "pass overwrite (--overwrite) to replace it, or choose another directory"
            )
    built = False
    try:
        # replace: an empty dir, or (checked above) an old corpus with overwrite, gives way to the new one
        with atomic_dir(out_dir, replace=True) as staging:
            _build(plan, staging)
            built = True
    except OSError as error:
        if not built:  # failed while building, not while publishing
            raise
        # Another process (e.g. a second DDP rank in ensure_prepared) published first: fine if it is ours.
        meta = _existing_meta(out_dir) if out_dir.is_dir() else None
        if meta is None or meta.get("fingerprint") != plan.fingerprint:
            raise UserError(f"could not move the prepared corpus into {out_dir}: {error}") from error
    return out_dir


def _build(plan: _Plan, staging: Path) -> None:
    documents = plan.corpus.documents
    train_ids, val_ids = split_documents(documents, plan.val_fraction, plan.seed)
    train_docs = [documents[i] for i in train_ids]
    val_docs = [documents[i] for i in val_ids]
    if plan.hf_tokenizer is not None:
        tokenizer = plan.hf_tokenizer
    else:
        assert plan.vocab_size is not None
        tokenizer = train_bpe_tokenizer(train_docs, plan.vocab_size)  # train split only: val stays unseen
    tokenizer.save_pretrained(staging / "tokenizer")
    vocab_size = len(tokenizer)
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    train_tokens = _write_token_shard(tokenizer, train_docs, staging / "train.bin", dtype, "tokenize train")
    val_tokens = _write_token_shard(tokenizer, val_docs, staging / "val.bin", dtype, "tokenize val")
    meta = {
        "version": FORMAT_VERSION,
        "source": ",".join(plan.corpus.sources),
        "tokenizer": plan.tokenizer_meta,
        "vocab_size": vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": np.dtype(dtype).name,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "source_checksums": plan.corpus.checksums,
        "val_fraction": plan.val_fraction,
        "seed": plan.seed,
        "fingerprint": plan.fingerprint,
    }
    write_json(staging / "meta.json", meta, sort_keys=False)  # last: marks the dir complete


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True, eq=False)  # arrays do not compare as a bool
class PreparedData:
    """A prepared corpus opened for reading: token shards as read-only memmaps plus its meta.json."""

    path: Path
    meta: dict[str, Any]
    train: np.ndarray  # [train_tokens] uint16/uint32, read-only
    val: np.ndarray  # [val_tokens]

    @classmethod
    def open(cls, path: str | Path) -> PreparedData:
        """Open DIR; missing dir or meta.json, another format version, or shards whose size does not
        match meta.json -> UserError."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise UserError(f"prepared data directory {path} does not exist (run `lmprune prepare`)")
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{path} has no meta.json: not a (complete) prepared corpus")
        try:
            meta = json.loads(meta_path.read_text())
            dtype = np.dtype(meta["dtype"])
            counts = {"train": int(meta["train_tokens"]), "val": int(meta["val_tokens"])}
            version = meta["version"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise UserError(f"{meta_path} is unreadable or incomplete: {error}") from error
        if version != FORMAT_VERSION:
            raise UserError(f"{path} was prepared with data format {version}, this lmprune reads {FORMAT_VERSION}")
        shards = {split: cls._open_shard(path / f"{split}.bin", dtype, count) for split, count in counts.items()}
        return cls(path, meta, shards["train"], shards["val"])

    @staticmethod
    def _open_shard(file: Path, dtype: np.dtype, count: int) -> np.ndarray:
        expected = count * dtype.itemsize
        if not file.is_file() or file.stat().st_size != expected:
            size = file.stat().st_size if file.is_file() else "missing"
            raise UserError(f"{file}: size {size} does not match meta.json ({count} tokens = {expected} bytes)")
        if count == 0:  # numpy cannot memmap an empty file
            empty = np.zeros(0, dtype=dtype)
            empty.setflags(write=False)
            return empty
        return np.memmap(file, dtype=dtype, mode="r", shape=(count,))

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
