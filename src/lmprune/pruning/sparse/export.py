"""Compact on-disk format for unstructured-sparse models: bitmask + nonzero values per prunable weight.

Formulas: docs/algorithms.md, "Sparse export format".

`out_dir/model.sparse.safetensors` holds, for every prunable floating tensor W (names matched by
the pruning patterns), two tensors

    "<name>.__nonzero_bitmask__"  uint8 [ceil(numel/8)]  numpy.packbits of the nonzero mask (row-major)
    "<name>.__nonzero_values__"   W.dtype [nnz]          the nonzero entries, row-major

and every other tensor dense under its own name. "Nonzero" means a nonzero *bit pattern*: -0.0
(and NaN) are stored as values, so the round trip is bit-exact, -0.0 included; the zeros written
back are +0.0. Tensors sharing storage (tied embeddings) are stored once and restored as the same
tensor. The safetensors header metadata (str -> str) holds the format name and version, each
tensor's layout/shape/dtype, the aliases and a CRC32 of every stored tensor, so a truncated or
corrupted file is rejected with a UserError instead of loading wrong weights.

The dense Hugging Face export stays `save_pretrained`; `load_compact_into` fills a model of the
right architecture from a compact file.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lmprune.atomic import atomic_file
from lmprune.errors import UserError
from lmprune.pruning.sparse.masks import DEFAULT_PATTERNS, name_matches

COMPACT_FILENAME = "model.sparse.safetensors"
FORMAT_NAME = "lmprune-sparse-bitmask"
FORMAT_VERSION = "1"
_BITMASK = ".__nonzero_bitmask__"
_VALUES = ".__nonzero_values__"
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _crc32(t: Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def _plain_state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module)
             else dict(model_or_state_dict))
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        if name.endswith((_BITMASK, _VALUES)):
            raise ValueError(f"state dict key {name!r} collides with the compact format's suffixes")
    return {name: t.detach() for name, t in state.items()}


def _split_aliases(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Unique CPU tensors to store + {alias name: stored name} for tensors that are the same view (tied weights).

    Other tensors that merely overlap in memory are copied: safetensors refuses shared storage.
    """
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storages: set[tuple] = set()
    for name, t in state.items():
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in seen_views:
            aliases[name] = seen_views[view]
            continue
        seen_views[view] = name
        stored[name] = t.to("cpu", copy=storage in seen_storages or t.numel() == 0).contiguous()
        seen_storages.add(storage)
    return stored, aliases


def _pack(t: Tensor) -> tuple[Tensor, Tensor]:
    """(bitmask uint8 [ceil(numel/8)], values [nnz]) of a floating tensor, by nonzero bit pattern."""
    flat = t.contiguous().reshape(-1)
    nonzero = flat.view(_SAME_WIDTH_INT[flat.element_size()]) != 0  # [numel] bool; -0.0 counts as nonzero
    bitmask = torch.from_numpy(np.packbits(nonzero.numpy()))
    return bitmask, flat[nonzero].contiguous()


def save_compact(model_or_state_dict: nn.Module | Mapping[str, Tensor], out_dir: str | Path,
                 patterns: Sequence[str] = DEFAULT_PATTERNS) -> Path:
    """Write out_dir/model.sparse.safetensors (atomically) and return its path.

    Floating tensors with >= 2 dims whose names match `patterns` are stored as bitmask + values;
    everything else dense.
    """
    state = _plain_state_dict(model_or_state_dict)
    unique, aliases = _split_aliases(state)
    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict] = {}
    for name, t in unique.items():
        entry = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        compact = (t.is_floating_point() and t.ndim >= 2 and t.numel() > 0
                   and any(name_matches(p, name) for p in patterns))
        if compact:
            tensors[name + _BITMASK], tensors[name + _VALUES] = _pack(t)
            entry |= {"layout": "bitmask", "nnz": tensors[name + _VALUES].numel()}
        else:
            tensors[name] = t
            entry["layout"] = "dense"
        layout[name] = entry
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tensors": json.dumps(layout),
                "aliases": json.dumps(aliases),
                "crc32": json.dumps({key: _crc32(t) for key, t in tensors.items()})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / COMPACT_FILENAME
    with atomic_file(path, "wb") as handle:  # a reader never sees a half-written file
        save_file(tensors, handle.name, metadata=metadata)  # save_file takes a name: the temp file's
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            stored = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    return metadata, stored


def _unpack(name: str, entry: dict, stored: Mapping[str, Tensor]) -> Tensor:
    shape, dtype = tuple(entry["shape"]), _dtype_from_name(entry["dtype"])
    numel = int(np.prod(shape, dtype=np.int64))
    bitmask, values = stored[name + _BITMASK], stored[name + _VALUES]
    if bitmask.dtype != torch.uint8 or bitmask.numel() != (numel + 7) // 8:
        raise ValueError(f"{name}: bitmask has {bitmask.numel()} bytes, expected {(numel + 7) // 8}")
    if values.dtype != dtype:
        raise ValueError(f"{name}: values are {values.dtype}, expected {dtype}")
    nonzero = torch.from_numpy(np.unpackbits(bitmask.numpy(), count=numel).astype(bool))  # [numel]
    if int(nonzero.sum()) != values.numel():
        raise ValueError(f"{name}: bitmask has {int(nonzero.sum())} nonzeros, values {values.numel()}")
    dense = torch.zeros(numel, dtype=dtype)
    dense[nonzero] = values
    return dense.reshape(shape)


def load_compact(path: str | Path) -> dict[str, Tensor]:
    """The dense state dict saved by `save_compact` (bit-identical). `path` is the file or its directory.

    UserError for a missing, truncated, corrupted or foreign file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / COMPACT_FILENAME
    if not path.is_file():
        raise UserError(f"{path}: compact sparse checkpoint not found")
    metadata, stored = _read(path)
    if metadata.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: not an lmprune compact sparse file (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: compact format version {metadata.get('format_version')!r} is not supported "
                        f"(this lmprune reads version {FORMAT_VERSION})")
    try:
        layout = json.loads(metadata["tensors"])
        aliases = json.loads(metadata["aliases"])
        checksums = json.loads(metadata["crc32"])
        if set(checksums) != set(stored):
            raise ValueError(f"stored tensors {sorted(set(checksums) ^ set(stored))[:4]} missing or unexpected")
        for key, t in stored.items():
            if _crc32(t) != checksums[key]:
                raise ValueError(f"checksum mismatch in {key!r}")
        state = {}
        for name, entry in layout.items():
            tensor = _unpack(name, entry, stored) if entry["layout"] == "bitmask" else stored[name]
            if tuple(tensor.shape) != tuple(entry["shape"]) or _dtype_name(tensor.dtype) != entry["dtype"]:
                raise ValueError(f"{name}: stored {tuple(tensor.shape)} {tensor.dtype}, header says {entry}")
            state[name] = tensor
        for alias, target in aliases.items():
            state[alias] = state[target]
    except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{path}: corrupted compact sparse checkpoint: {exc}") from exc
    return state


def load_compact_into(model: nn.Module, path: str | Path) -> None:
    """Load a compact file into `model` in place; UserError if names or shapes differ from the model's."""
    state = load_compact(path)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path}: does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    wrong = [f"{name} {tuple(state[name].shape)} vs {tuple(t.shape)}"
             for name, t in expected.items() if state[name].shape != t.shape]
    if wrong:
        raise UserError(f"{path}: shapes differ from this model: {', '.join(wrong[:4])}")
    model.load_state_dict(state, strict=True)


def file_sizes(directory: str | Path) -> dict[str, int]:
    """{file name: bytes} of the regular files directly in `directory`, sorted by name."""
    return {p.name: p.stat().st_size for p in sorted(Path(directory).iterdir()) if p.is_file()}
