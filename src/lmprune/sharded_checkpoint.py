"""Sharded checkpoints of `train.parallel: fsdp` runs: `torch.distributed.checkpoint` (DCP) with its
safetensors storage (every rank writes its own shard; no pickle anywhere), under the rules of
`lmprune.checkpoint`: a temp dir, the manifest written last, keep-last, incomplete ones skipped.

Layout of `OUT/checkpoints/step-NNNNNN/` (manifest `"layout": "dcp"`):
  shard-0000R-model-00001-of-00001.safetensors   rank R's slices of the weights ("model.*") and AdamW
                                                 moments ("optim.<param>.<key>"), with DCP's chunk offsets
  optimizer.json       the param groups (names, hyper-parameters)
  rank-R.safetensors / rank-R.json                rank R's RNG states; the json also holds the sha256 of
                                                 rank R's pruning state (masks), equal on every rank
  extra.safetensors    pruner tensors            trainer_state.json  step, tokens, loader, pruner
  model_config.json    HF config (shape after pruning)               run_config.json
  manifest.json        sha256 + size of every file above, written last by rank 0

DCP reshards on load, so a checkpoint written by W ranks resumes on any world size, sharded or not
(`load_sharded_state` works on a plain model as on an FSDP one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmprune import atomic
from lmprune import checkpoint as ckpt
from lmprune.errors import UserError

LAYOUT = "dcp"


def is_sharded_checkpoint(path: Path) -> bool:
    try:
        return json.loads((path / ckpt.MANIFEST).read_text()).get("layout") == LAYOUT
    except (OSError, ValueError, AttributeError):
        return False


def _flat_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict, dict]:
    """(DCP keys -> live tensors, model state, optimizer state) of a plain or sharded model; tied
    weights appear once (safetensors refuses shared storage)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    flat: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model_state.items():
        storage = (tensor.to_local() if hasattr(tensor, "to_local") else tensor).untyped_storage().data_ptr()
        if storage in seen:
            continue
        seen.add(storage)
        flat[f"model.{name}"] = tensor
    for name, values in optim_state["state"].items():
        flat.update({f"optim.{name}.{key}": value for key, value in values.items() if torch.is_tensor(value)})
    return flat, model_state, optim_state


def save_sharded_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            trainer_state: dict, run_config: dict, pruner_state: dict[str, Any] | None,
                            keep_last: int, rank: int, world_size: int) -> Path:
    """Every rank calls this; rank 0 writes the JSON parts, the manifest and renames the dir into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    final = ckpt_root / ckpt.step_dir_name(step)
    tmp = ckpt_root / f".{final.name}.tmp-sharded"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(world_size)
    flat, _, optim_state = _flat_state(model, optimizer)
    with atomic.disk_full_is_user_error(final):
        with _single_process_quiet(world_size):
            dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
        rng_tensors, rng_meta = ckpt.capture_rng()
        save_file(rng_tensors, str(tmp / f"rank-{rank}.safetensors"))
        atomic.write_json(tmp / f"rank-{rank}.json", {"rng": rng_meta, "pruner_sha256": state_digest(pruner_state)})
        _barrier(world_size)
        if rank == 0:
            _finish_dir(tmp, final, step, model, optim_state, trainer_state, run_config, pruner_state, world_size)
            for old in ckpt.complete_checkpoints(ckpt_root, verify=False)[:-keep_last]:
                atomic.remove_tree(old)
    _barrier(world_size)
    return final


def _finish_dir(tmp: Path, final: Path, step: int, model: nn.Module, optim_state: dict, trainer_state: dict,
                run_config: dict, pruner_state: dict[str, Any] | None, world_size: int) -> None:
    atomic.write_json(tmp / "model_config.json", model.config.to_dict())
    groups = [{k: v for k, v in group.items()} for group in optim_state["param_groups"]]
    atomic.write_json(tmp / "optimizer.json", {"param_groups": groups})
    pruner_tensors, pruner_meta = ckpt.split_state(pruner_state or {}, "pruner")
    save_file(pruner_tensors, str(tmp / "extra.safetensors"))
    state = dict(trainer_state, pruner=pruner_meta if pruner_state is not None else None)
    atomic.write_json(tmp / "trainer_state.json", state)
    atomic.write_json(tmp / "run_config.json", run_config)
    for path in tmp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    files = {p.name: {"sha256": atomic.sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
    atomic.write_json(tmp / ckpt.MANIFEST, {"format": ckpt.FORMAT_VERSION, "layout": LAYOUT, "step": step,
                                            "world_size": world_size, "files": files})  # last
    atomic.fsync_dir(tmp)
    if final.exists():  # a re-save of the same step replaces it whole
        atomic.remove_tree(final)
    os.replace(tmp, final)
    atomic.fsync_dir(final.parent)


def load_sharded_meta(path: Path) -> dict:
    """The JSON parts of a complete sharded checkpoint (UserError otherwise)."""
    problem = ckpt.checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"checkpoint {path}: {problem}")
    read = lambda name: json.loads((path / name).read_text())  # noqa: E731
    manifest = read(ckpt.MANIFEST)
    shards = sorted(name for name in manifest["files"] if name.startswith("shard-"))
    if len(shards) != int(manifest["world_size"]):
        raise UserError(f"checkpoint {path}: {len(shards)} shard files for the {manifest['world_size']} ranks "
                        "that wrote it (a rank's files are missing)")
    return {"trainer_state": read("trainer_state.json"), "run_config": read("run_config.json"),
            "model_config": read("model_config.json"), "world_size": int(manifest["world_size"])}


def load_sharded_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights and AdamW state from a sharded checkpoint into a plain or FSDP model (any world size);
    UserError naming the first tensor the checkpoint lacks or holds at another shape."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    flat, model_state, optim_state = _flat_state(model, optimizer)
    reader = HuggingFaceStorageReader(str(path))
    saved = reader.read_metadata().state_dict_metadata
    for key, tensor in flat.items():
        if key not in saved:
            raise UserError(f"checkpoint {path}: holds no {key} (a checkpoint of another model config?)")
        if tuple(saved[key].size) != tuple(tensor.shape):
            raise UserError(f"checkpoint {path}: {key} has shape {tuple(saved[key].size)}, the model "
                            f"{tuple(tensor.shape)} (a checkpoint of another model config)")
    with _single_process_quiet(1 if not dist.is_initialized() else dist.get_world_size()):
        dcp.load(flat, storage_reader=reader)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(strict=False))  # tied weights are saved once


def load_sharded_extra(path: Path, trainer_state: dict, rank: int) -> dict[str, Any] | None:
    """Restore this rank's RNG (rank 0's when the checkpoint had fewer ranks); the pruner state."""
    name = f"rank-{rank}" if (path / f"rank-{rank}.json").is_file() else "rank-0"
    meta = json.loads((path / f"{name}.json").read_text())
    ckpt.restore_rng(load_file(str(path / f"{name}.safetensors")), meta["rng"])
    if trainer_state.get("pruner") is None:
        return None
    return ckpt.join_state(load_file(str(path / "extra.safetensors")), trainer_state["pruner"], "pruner")


def state_digest(state: dict[str, Any] | None) -> str | None:
    """sha256 of a pruning state (tensors by bytes, the rest as JSON): ranks must agree on it."""
    if state is None:
        return None
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode())
        if torch.is_tensor(value):
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True).encode())
    return digest.hexdigest()


@contextmanager
def _single_process_quiet(world_size: int):
    """DCP warns that it assumes one process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        if world_size == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
