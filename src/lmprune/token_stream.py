"""A list of token shards read as one stream of token ids.

`TokenStream` is what a prepared corpus's train and val splits are: shard files (raw uint16/uint32)
memory-mapped read-only and addressed by one global position, so a window may start in one shard and
end in the next. The loaders (`lmprune.loader`) and calibration only need `len()`, `windows()` and
numpy-style indexing (`stream[a:b]`, `stream[int_array]`); nothing here reads a whole shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmprune.errors import UserError


def open_shard(file: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """A read-only memmap of `count` tokens; a missing file or one of another size -> UserError."""
    expected = count * dtype.itemsize
    try:
        size = file.stat().st_size if file.is_file() else "missing"
    except OSError as error:
        raise UserError(f"cannot read token shard {file}: {error.strerror}") from error
    if size != expected:
        raise UserError(f"{file}: size {size} does not match meta.json ({count} tokens = {expected} bytes)")
    if count == 0:  # numpy cannot memmap an empty file
        empty = np.zeros(0, dtype=dtype)
        empty.setflags(write=False)
        return empty
    try:
        return np.memmap(file, dtype=dtype, mode="r", shape=(count,))
    except OSError as error:  # e.g. permission denied
        raise UserError(f"cannot read token shard {file}: {error.strerror or error}") from error


class TokenStream:
    """Shards concatenated into one read-only sequence of token ids (no copy, no up-front read)."""

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        dtypes = {shard.dtype for shard in shards}
        if len(dtypes) > 1:
            raise ValueError(f"shards of one stream must share a dtype, got {sorted(map(str, dtypes))}")
        self.shards = [shard for shard in shards if len(shard)] or list(shards[:1])
        self.dtype = next(iter(dtypes)) if dtypes else np.dtype(np.uint16)
        lengths = [len(shard) for shard in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)  # [S + 1]

    @classmethod
    def open(cls, files: Sequence[Path], dtype: np.dtype, counts: Sequence[int]) -> TokenStream:
        return cls([open_shard(Path(file), np.dtype(dtype), int(count)) for file, count in zip(files, counts)])

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.total_tokens

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 [len(starts), length]: the tokens [s, s + length) for each start s (may cross shards)."""
        starts = np.asarray(starts, dtype=np.int64)
        return self._gather(starts[:, None] + np.arange(length, dtype=np.int64)).astype(np.int64)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.total_tokens)
            return self._gather(np.arange(start, stop, step, dtype=np.int64))
        if isinstance(index, (int, np.integer)):
            position = int(index) + (self.total_tokens if index < 0 else 0)
            if not 0 <= position < self.total_tokens:
                raise IndexError(f"token {index} is outside a stream of {self.total_tokens}")
            return self._gather(np.array([position]))[0]
        return self._gather(np.asarray(index, dtype=np.int64))

    def _gather(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at integer positions (any shape), in the shards' dtype."""
        if positions.size and (positions.min() < 0 or positions.max() >= self.total_tokens):
            raise IndexError(f"positions outside a stream of {self.total_tokens} tokens")
        if len(self.shards) == 1:
            return np.asarray(self.shards[0][positions])
        flat = positions.reshape(-1)
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1  # [n]
        out = np.empty(flat.shape, dtype=self.dtype)
        for shard in np.unique(shard_of):
            chosen = shard_of == shard
            out[chosen] = self.shards[shard][flat[chosen] - self.offsets[shard]]
        return out.reshape(positions.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """All tokens as one array (reads everything: for small streams and tests)."""
        tokens = self[:]
        return tokens if dtype is None else tokens.astype(dtype)

    def tolist(self) -> list[int]:
        return self[:].tolist()
