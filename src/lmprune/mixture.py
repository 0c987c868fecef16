"""Weighted data mixtures (`data.sources`): preparing the sources with one tokenizer, drawing training
windows by weight, and evaluating each source's val split.

The sampler composes one window stream per source; a stream only needs `len(tokens)` and the loader's
window gather, so it does not care how a source's tokens are stored. For global batch g, the source of
each of its B x W window slots is drawn from the normalised weights by a generator seeded with
(seed, g); each source then hands out its next windows in its own seeded per-epoch permutation. Every
rank draws the same slots and takes its own B of them, so W ranks see what one process with batch B x W
sees, and the state (g plus each stream's epoch and position) resumes the order exactly.
"""

from __future__ import annotations

import glob
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmprune.config import DataConfig
from lmprune.corpora import BUILTIN_SOURCES, parse_sources
from lmprune.data import PreparedData, ensure_prepared
from lmprune.errors import UserError
from lmprune.loader import _gather_windows


def _seed_of(*parts: Any) -> int:
    digest = hashlib.sha256("\0".join(["lmprune-mixture", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- preparing


@dataclass(frozen=True, eq=False)
class MixturePart:
    name: str
    weight: float  # as configured (not normalised)
    data: PreparedData


@dataclass(frozen=True, eq=False)
class Mixture:
    """The prepared sources of a mixture, in config order (parts[0] holds the shared tokenizer)."""

    parts: list[MixturePart]

    @property
    def label(self) -> str:
        """e.g. "shakespeare:0.7+code:0.3" (normalised weights): how metrics and reports name it."""
        total = sum(p.weight for p in self.parts)
        return "+".join(f"{p.name}:{p.weight / total:.3g}" for p in self.parts)

    def describe(self) -> list[dict[str, Any]]:
        total = sum(p.weight for p in self.parts)
        return [{"name": p.name, "weight": p.weight / total, "data_dir": str(p.data.path),
                 "train_tokens": len(p.data.train), "val_tokens": len(p.data.val)} for p in self.parts]

    @property
    def train_tokens(self) -> int:
        return sum(len(p.data.train) for p in self.parts)

    def loader(self, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
               pin_memory: bool = False) -> MixtureLoader:
        return MixtureLoader([(p.name, p.data.train, p.weight) for p in self.parts], batch_size, seq_len, seed,
                             rank, world_size, pin_memory)


def check_mixture_sources(data_cfg: DataConfig) -> None:
    """Every source of the mixture exists (cheap: no file is read), so a typo fails before any preparing."""
    for i, part in enumerate(data_cfg.sources or []):
        if part.prepared_dir is not None:
            if not (Path(part.prepared_dir).expanduser() / "meta.json").is_file():
                raise UserError(f"data.sources[{i}] ({part.label()}): {part.prepared_dir} is not a prepared dir "
                                "(no meta.json; run `lmprune prepare`)")
            continue
        for spec in parse_sources(part.source):
            if spec in BUILTIN_SOURCES or spec.startswith("hf:"):  # hf: datasets are checked when streamed
                continue
            found = glob.glob(str(Path(spec).expanduser())) if any(c in spec for c in "*?[") else \
                Path(spec).expanduser().exists()
            if not found:
                raise UserError(f"data.sources[{i}] ({part.label()}): unknown source {spec!r}: neither a built-in "
                                f"({', '.join(BUILTIN_SOURCES)}) nor an existing file, directory or glob")


def prepare_mixture(data_cfg: DataConfig, tokenizer: str | None, progress: bool = True) -> Mixture:
    """Prepare (or reuse from the cache) every source with one tokenizer: `tokenizer`, else the BPE
    trained on the first source (the others are then tokenized with it)."""
    check_mixture_sources(data_cfg)
    parts: list[MixturePart] = []
    shared = tokenizer
    for part in data_cfg.sources or []:
        if part.prepared_dir is not None:
            data = PreparedData.open(part.prepared_dir)
        else:
            path = ensure_prepared(part.source, vocab_size=None if shared else data_cfg.vocab_size, tokenizer=shared,
                                   val_fraction=data_cfg.val_fraction, seed=data_cfg.seed, progress=progress)
            data = PreparedData.open(path)
        shared = shared or str(data.tokenizer_dir)
        parts.append(MixturePart(part.label(), float(part.weight or 0.0), data))
    _check_one_tokenizer(parts)
    return Mixture(parts)


def _check_one_tokenizer(parts: list[MixturePart]) -> None:
    def identity(data: PreparedData) -> str:
        tokenizer = data.load_tokenizer()
        content = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(sorted(tokenizer.get_vocab()))
        return hashlib.sha256(f"{content}\0{tokenizer.eos_token_id}".encode()).hexdigest()

    first = identity(parts[0].data)
    for part in parts[1:]:
        if identity(part.data) != first:
            raise UserError(f"data.sources {part.name} ({part.data.path}) was tokenized with another tokenizer than "
                            f"{parts[0].name}; a mixture needs one tokenizer (re-prepare it with --tokenizer "
                            f"{parts[0].data.tokenizer_dir})")


# ----------------------------------------------------------------------------- sampling


class WindowStream:
    """One source's windows of seq_len + 1 tokens, each epoch in a permutation seeded by (seed, name, epoch);
    `take(n)` hands out the next n window ids, running on into the next epoch (no window is skipped)."""

    def __init__(self, name: str, tokens: Any, seq_len: int, seed: int) -> None:
        self.name, self.tokens, self.seq_len, self.seed = name, tokens, seq_len, seed
        self.num_windows = len(tokens) // (seq_len + 1)
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(_seed_of(self.seed, self.name, self.epoch))
            self._order = torch.randperm(self.num_windows, generator=generator)  # [num_windows]
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    def take(self, count: int) -> np.ndarray:
        if count > 0 and self.num_windows == 0:
            raise UserError(f"data.sources {self.name}: no window of seq_len + 1 = {self.seq_len + 1} tokens to draw")
        taken = []
        while count > 0:
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
            chunk = min(count, self.num_windows - self.position)
            taken.append(self._epoch_order()[self.position : self.position + chunk].numpy())
            self.position += chunk
            count -= chunk
        return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)

    def gather(self, window_ids: np.ndarray) -> torch.Tensor:
        return _gather_windows(self.tokens, window_ids.astype(np.int64) * (self.seq_len + 1), self.seq_len + 1)


class MixtureLoader:
    """Training batches (x, y) int64 [batch_size, seq_len] drawn from weighted sources (see the module doc).

    `sources`: (name, train tokens, weight) per source; weights >= 0 with a positive sum. `pin_memory`
    as in TokenLoader (training on CUDA: page-locked batches for non-blocking copies)."""

    def __init__(self, sources: list[tuple[str, Any, float]], batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> None:
        if batch_size < 1 or seq_len < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader shape: batch_size={batch_size} seq_len={seq_len} rank={rank}/{world_size}")
        weights = [float(w) for _, _, w in sources]
        if not sources or any(not math.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
            raise UserError(f"mixture weights must be finite, >= 0 and sum to a positive number, got {weights}")
        self.streams = [WindowStream(name, tokens, seq_len, seed) for name, tokens, _ in sources]
        for stream, weight in zip(self.streams, weights):
            if weight > 0 and stream.num_windows < 1:
                raise UserError(f"data.sources {stream.name}: its train split has {len(stream.tokens):,} tokens, "
                                f"fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.batch_index = 0  # the next global batch to produce

    def slot_sources(self, batch_index: int) -> torch.Tensor:
        """The source index of each of global batch `batch_index`'s B x W window slots."""
        generator = torch.Generator().manual_seed(_seed_of(self.seed, "slots", batch_index))
        return torch.multinomial(self.weights, self.batch_size * self.world_size, replacement=True,
                                 generator=generator)  # [B*W]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.slot_sources(self.batch_index)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        rows = torch.empty(self.batch_size, self.seq_len + 1, dtype=torch.int64)
        for index, stream in enumerate(self.streams):
            chosen = (slots == index).nonzero().flatten()  # slots of this source, in slot order
            if len(chosen) == 0:
                continue
            window_ids = stream.take(len(chosen))  # every rank advances every stream the same
            own = (chosen >= mine.start) & (chosen < mine.stop)
            if own.any():
                rows[chosen[own] - mine.start] = stream.gather(window_ids[own.numpy()])
        self.batch_index += 1
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if self.pin_memory:
            return x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"mixture": {"batch_index": self.batch_index,
                            "sources": {s.name: {"epoch": s.epoch, "position": s.position} for s in self.streams}}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mixture = state.get("mixture") if isinstance(state, dict) else None
        if not isinstance(mixture, dict):
            raise UserError(f"the checkpoint's data loader state {state!r} is not a mixture's (data.sources changed?)")
        saved, names = mixture.get("sources"), [s.name for s in self.streams]
        batch_index = mixture.get("batch_index")
        if not isinstance(saved, dict) or sorted(saved) != sorted(names) or not isinstance(batch_index, int):
            raise UserError(f"the checkpoint's mixture state names sources {sorted(saved or {})}, this run "
                            f"{sorted(names)} (data.sources changed?)")
        for stream in self.streams:
            epoch, position = saved[stream.name].get("epoch"), saved[stream.name].get("position")
            if not (isinstance(epoch, int) and isinstance(position, int) and epoch >= 0
                    and 0 <= position <= stream.num_windows):
                raise UserError(f"bad mixture loader state for {stream.name}: {saved[stream.name]!r}")
            stream.epoch, stream.position = epoch, position
        self.batch_index = batch_index


# ----------------------------------------------------------------------------- evaluating


def weighted_val_loss(losses: dict[str, float], mixture: Mixture) -> float:
    """The weighted mean of the per-source val losses (zero-weight sources are reported, not averaged)."""
    weighted = [(p.weight, losses[p.name]) for p in mixture.parts if p.weight > 0]
    return sum(w * loss for w, loss in weighted) / sum(w for w, _ in weighted)


def per_source_fields(losses: dict[str, float]) -> dict[str, float]:
    """metrics.jsonl / summary.json keys of the per-source val losses: val_loss/<name>, val_ppl/<name>."""
    fields: dict[str, float] = {}
    for name, loss in losses.items():
        fields[f"val_loss/{name}"] = round(loss, 6)
        fields[f"val_ppl/{name}"] = round(math.exp(loss), 4)
    return fields
