"""The token shards of one split, written append-only in a staging dir, with a resumable checkpoint.

Shard k of split s is `{s}-{k:05d}.bin`: exactly `shard_tokens` tokens, except the split's last shard
(1 to shard_tokens tokens; a split without tokens has one empty shard). Shards are cut by token
count alone, so they depend on the token stream and not on how it was produced. A checkpoint is the
list of completed shard sizes plus the length of the shard being written (its file is fsynced first);
a resumed writer truncates that file back to the checkpoint and goes on appending.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class SplitWriter:
    def __init__(self, staging: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 state: dict[str, Any] | None = None) -> None:
        self.staging, self.split, self.dtype, self.shard_tokens = staging, split, np.dtype(dtype), shard_tokens
        self.completed: list[int] = list(state["shards"]) if state else []
        self.partial = int(state["partial"]) if state else 0
        path = self._current_path()
        self.handle = open(path, "r+b" if state and path.exists() else "wb")
        self.handle.truncate(self.partial * self.dtype.itemsize)  # drops what was written after the checkpoint
        self.handle.seek(0, os.SEEK_END)

    @staticmethod
    def resumable(staging: Path, split: str, dtype: np.dtype, state: dict[str, Any]) -> bool:
        """Whether the files of a checkpoint are all there (completed shards whole, the current one long enough)."""
        itemsize = np.dtype(dtype).itemsize
        for index, count in enumerate(state["shards"]):
            file = staging / shard_name(split, index)
            if not file.is_file() or file.stat().st_size != count * itemsize:
                return False
        current = staging / shard_name(split, len(state["shards"]))
        return state["partial"] == 0 or (current.is_file() and current.stat().st_size >= state["partial"] * itemsize)

    def _current_path(self) -> Path:
        return self.staging / shard_name(self.split, len(self.completed))

    @property
    def tokens(self) -> int:
        return sum(self.completed) + self.partial

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            head = tokens[: self.shard_tokens - self.partial]
            self.handle.write(head.tobytes())
            self.partial += len(head)
            tokens = tokens[len(head):]
            if self.partial == self.shard_tokens:
                self._sync()
                self.handle.close()
                self.completed.append(self.partial)
                self.partial = 0
                self.handle = open(self._current_path(), "wb")

    def _sync(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def checkpoint(self) -> dict[str, Any]:
        self._sync()
        return {"shards": list(self.completed), "partial": self.partial}

    def close(self) -> list[dict[str, Any]]:
        """Finish the split; returns its shards as [{"file", "tokens"}] for meta.json."""
        self._sync()
        self.handle.close()
        if self.partial or not self.completed:
            self.completed.append(self.partial)
            self.partial = 0
        else:  # the split ended exactly on a shard boundary: the freshly opened file stays unused
            self._current_path().unlink()
        return [{"file": shard_name(self.split, i), "tokens": count} for i, count in enumerate(self.completed)]
