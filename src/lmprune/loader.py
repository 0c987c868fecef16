"""Loaders over a prepared corpus's token shards: seeded, resumable training batches and ordered
evaluation windows (see `lmprune.data` for the shard format).

`tokens` is anything with `len()` and numpy integer-array indexing: a numpy array, or the
`lmprune.token_stream.TokenStream` of a split's shards (windows then cross shard ends freely)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lmprune.errors import UserError


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
    skipped (different ones each epoch). x, y: int64 [batch_size, seq_len], y = x shifted by one token.
    With `pin_memory` (training on CUDA) both come in page-locked host memory, so the step's
    `.to(device, non_blocking=True)` is an asynchronous copy that does not wait for the device."""

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1 or seq_len < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader shape: batch_size={batch_size} seq_len={seq_len} rank={rank}/{world_size}")
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
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
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if self.pin_memory:  # torch's caching host allocator reuses the pinned blocks
            return x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def seen_windows(self, batches: int, count: int) -> torch.Tensor:
        """`count` windows (int64 [count, seq_len + 1]) evenly spread over the windows of global batches
        [0, batches) of epoch 0, i.e. those all ranks train on in those batches; reads no loader state."""
        if batches > self.batches_per_epoch:
            raise UserError(f"{batches} batches are more than one epoch ({self.batches_per_epoch} batches)")
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, 0))
        order = torch.randperm(self.num_windows, generator=generator)  # the same order as epoch 0's
        used = batches * self.batch_size * self.world_size
        picks = np.linspace(0, used - 1, num=min(count, used)).round().astype(np.int64)
        window_ids = order[torch.from_numpy(picks)].numpy()
        return _gather_windows(self.tokens, window_ids * (self.seq_len + 1), self.seq_len + 1)

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
