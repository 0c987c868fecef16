"""One chunk -> its documents -> train/val split -> token ids: the work of one prepare worker.

Imports only the standard library, numpy and `tokenizers`, so a spawned worker starts in a fraction
of a second and holds no torch. Every worker runs its tokenizer single-threaded
(TOKENIZERS_PARALLELISM=false): parallelism comes from the worker processes, and `--num-proc 1` is
one core.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lmprune.errors import UserError
from lmprune.prepare.inputs import Chunk


def unit_hash(seed: int, text_bytes: bytes, salt: str = "") -> float:
    """A document's seeded position in [0, 1): the split (and the BPE sample) are decided by it."""
    digest = hashlib.sha256(f"{salt}{seed}\0".encode() + text_bytes).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(documents: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices), in corpus order, chosen by a seeded hash of each document's content.

    The split does not depend on document order, and identical documents land on the same side. With
    >= 2 documents both sides get at least one (the lowest / highest hash is moved if needed); a single
    document goes to train. (`prepare` applies the moves only to a corpus of one chunk: a larger one
    is split by the hash alone, document by document.)"""
    keys = [unit_hash(seed, _utf8(doc)[0]) for doc in documents]
    return _split_by_keys(keys, val_fraction, fix_up=True)


def _split_by_keys(keys: list[float], val_fraction: float, fix_up: bool) -> tuple[list[int], list[int]]:
    val = {i for i, key in enumerate(keys) if key < val_fraction}
    if fix_up and len(keys) >= 2 and not val:
        val.add(min(range(len(keys)), key=keys.__getitem__))
    if fix_up and val and len(val) == len(keys):  # training needs data more than validation does
        val.remove(max(range(len(keys)), key=keys.__getitem__))
    return [i for i in range(len(keys)) if i not in val], sorted(val)


def _utf8(text: str) -> tuple[bytes, str]:
    """(UTF-8 bytes, text): lone surrogates (JSON "\\ud800" escapes) become U+FFFD, which hashing and
    tokenizers accept."""
    try:
        return text.encode("utf-8"), text
    except UnicodeEncodeError:
        raw = text.encode("utf-8", errors="replace")
        return raw, raw.decode("utf-8")


@dataclass
class Parsed:
    documents: list[bytes]  # UTF-8, non-blank, in order
    texts: list[str]
    skipped_lines: int = 0
    replaced: int = 0  # invalid UTF-8 sequences decoded as U+FFFD (JSONL)


def parse_chunk(chunk: Chunk, text_field: str, skip_bad_lines: bool) -> Parsed:
    """The non-blank documents of a chunk. A bad JSONL line -> UserError naming file and line, unless
    `skip_bad_lines` (then counted)."""
    parsed = Parsed([], [])
    for part in chunk.parts:
        texts = part.texts if part.raw is None else _jsonl_texts(part, text_field, skip_bad_lines, parsed)
        for text in texts or ():
            if text.strip():
                raw, text = _utf8(text)
                parsed.documents.append(raw)
                parsed.texts.append(text)
    return parsed


def _jsonl_texts(part, text_field: str, skip_bad_lines: bool, parsed: Parsed) -> list[str]:
    text = part.raw.decode("utf-8", errors="replace")
    parsed.replaced += text.count("\ufffd") - part.raw.count("\ufffd".encode())
    texts = []
    for number, line in enumerate(text.split("\n"), start=part.first_line):  # not splitlines(): see U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None
        except json.JSONDecodeError as error:
            record, problem = None, f"not valid JSON ({error.msg})"
        if problem is None and not (isinstance(record, dict) and isinstance(record.get(text_field), str)):
            problem = f"expected a JSON object with a string {text_field!r} field"
        if problem is None:
            texts.append(record[text_field])
        elif skip_bad_lines:
            parsed.skipped_lines += 1
        else:
            raise UserError(f"{part.origin}:{number}: {problem} (--skip-bad-lines skips such lines)")
    return texts


@dataclass
class Settings:
    """What every worker needs, sent once at start."""

    tokenizer_json: str | None  # a `tokenizers` JSON; None: the caller passes an encode function
    eos_token_id: int
    dtype: str
    val_fraction: float
    seed: int
    text_field: str
    skip_bad_lines: bool


@dataclass
class Tokenized:
    """A chunk's token ids per split, each document followed by EOS, and its counts."""

    index: int
    train: np.ndarray
    val: np.ndarray
    documents: tuple[int, int]  # (train, val)
    skipped_lines: int
    replaced: int
    text_bytes: int
    disk_bytes: int


def backend_encoder(tokenizer_json: str) -> Callable[[list[str]], list[list[int]]]:
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(tokenizer_json)
    encoder.encode_special_tokens = True  # "<|endoftext|>" written inside a document is text, not a boundary
    encoder.no_truncation()
    encoder.no_padding()
    return lambda texts: [encoding.ids for encoding in encoder.encode_batch(texts, add_special_tokens=False)]


class ChunkTokenizer:
    def __init__(self, settings: Settings, encode: Callable[[list[str]], list[list[int]]] | None = None) -> None:
        self.settings = settings
        self.encode = encode or backend_encoder(settings.tokenizer_json)
        self.dtype = np.dtype(settings.dtype)

    def __call__(self, chunk: Chunk) -> Tokenized:
        s = self.settings
        parsed = parse_chunk(chunk, s.text_field, s.skip_bad_lines)
        keys = [unit_hash(s.seed, raw) for raw in parsed.documents]
        train, val = _split_by_keys(keys, s.val_fraction, fix_up=chunk.whole_corpus)
        ids = self.encode(parsed.texts) if parsed.texts else []
        return Tokenized(chunk.index, self._join([ids[i] for i in train]), self._join([ids[i] for i in val]),
                         (len(train), len(val)), parsed.skipped_lines, parsed.replaced, chunk.text_bytes,
                         chunk.disk_bytes)

    def _join(self, documents: list[list[int]]) -> np.ndarray:
        out = np.empty(sum(len(doc) + 1 for doc in documents), dtype=self.dtype)
        position = 0
        try:
            for doc in documents:
                out[position : position + len(doc)] = doc
                position += len(doc)
                out[position] = self.settings.eos_token_id
                position += 1
        except OverflowError:
            raise UserError(f"the tokenizer produced an id that does not fit {self.dtype.name}") from None
        return out


_worker: ChunkTokenizer | None = None


def init_worker(settings: Settings) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = ChunkTokenizer(settings)


def tokenize_in_worker(chunk: Chunk) -> Tokenized:
    assert _worker is not None, "init_worker runs first"
    return _worker(chunk)
