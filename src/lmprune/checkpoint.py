"""Atomic checkpoints of plain state: safetensors for tensors, JSON for everything else.

Layout of `OUT/checkpoints/step-NNNNNN/`:
  model.safetensors      model weights          model_config.json  HF config (shape after pruning)
  optimizer.safetensors  AdamW moments          optimizer.json     param groups + state layout
  extra.safetensors      RNG + pruner tensors   trainer_state.json step, tokens, loader, RNG, pruner
  run_config.json        the resolved run config
  manifest.json          sha256 + size of every file above; written LAST: a step dir without a
                         valid manifest is incomplete and is skipped on resume.
Everything is written into a temp dir, fsynced, then renamed into place (`lmprune.atomic.atomic_dir`);
checkpoints beyond keep_last are deleted with `lmprune.atomic.remove_tree` (renamed away first, so a
kill mid-delete never leaves a half-deleted `step-*` dir).
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from lmprune import atomic
from lmprune.errors import NonFiniteError, UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ---- optimizer and RNG state <-> (tensors, json) -------------------------------------------

def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, layout = {}, {}
    for index, per_param in state["state"].items():
        layout[str(index)] = {}
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                layout[str(index)][key] = "tensor"
            else:
                layout[str(index)][key] = value
    return tensors, {"param_groups": state["param_groups"], "state": layout}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for index, keys in meta["state"].items():
        state[int(index)] = {key: tensors[f"{index}.{key}"] if kind == "tensor" else kind
                             for key, kind in keys.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    py_version, py_internal, py_gauss = random.getstate()
    meta = {"python": [py_version, list(py_internal), py_gauss],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def split_state(state: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a state dict whose values are tensors or JSON values into the two stores."""
    tensors = {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    meta = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    return tensors, meta


def join_state(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> dict[str, Any]:
    state = dict(meta)
    start = prefix + "."
    state.update({k[len(start):]: v for k, v in tensors.items() if k.startswith(start)})
    return state


# ---- save / find / load --------------------------------------------------------------------

def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, run_config: dict, pruner_state: dict[str, Any] | None,
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last` complete ones.

    NonFiniteError (nothing written) when a weight or optimizer moment is NaN / inf; UserError (the
    previous checkpoints intact) when the disk is full.
    """
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    check_finite(model.state_dict().items(), f"checkpoint step {step}: weight")
    check_finite(opt_tensors.items(), f"checkpoint step {step}: optimizer state")
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    with atomic.disk_full_is_user_error(final):
        _write_step_dir(final, step, model, opt_tensors, opt_meta, trainer_state, run_config, pruner_state)
    for old in complete_checkpoints(ckpt_root, verify=False)[:-keep_last]:
        atomic.remove_tree(old)
    return final


def check_finite(named_tensors, what: str) -> None:
    """NonFiniteError naming the first floating tensor holding NaN or inf."""
    for name, tensor in named_tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"{what} {name} is not finite (NaN or inf); refusing to write it")


def _write_step_dir(final: Path, step: int, model: torch.nn.Module, opt_tensors: dict, opt_meta: dict,
                    trainer_state: dict, run_config: dict, pruner_state: dict[str, Any] | None) -> None:
    # replace: a re-save of the same step (e.g. resumed at the end) replaces it whole
    with atomic.atomic_dir(final, replace=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) tensors
        atomic.write_json(tmp / "model_config.json", model.config.to_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        atomic.write_json(tmp / "optimizer.json", opt_meta)
        extra_tensors, rng_meta = capture_rng()
        pruner_tensors, pruner_meta = split_state(pruner_state or {}, "pruner")
        extra_tensors.update(pruner_tensors)
        save_file(extra_tensors, str(tmp / "extra.safetensors"))
        state = dict(trainer_state, rng=rng_meta, pruner=pruner_meta if pruner_state is not None else None)
        atomic.write_json(tmp / "trainer_state.json", state)
        atomic.write_json(tmp / "run_config.json", run_config)
        files = {p.name: {"sha256": atomic.sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        atomic.write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": files})  # last
    # atomic_dir fsynced every file and the dir before the rename, and the root after it


def checkpoint_problem(path: Path, verify: bool = True) -> str | None:
    """None when `path` is a complete checkpoint, else why not."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (incomplete write)"
    files = _manifest_files(manifest_path)
    if files is None:
        return "unreadable manifest"
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        if file.stat().st_size != info["bytes"]:
            return f"{name} is truncated ({file.stat().st_size} of {info['bytes']} bytes)"
        if verify and atomic.sha256_file(file) != info["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def _manifest_files(manifest_path: Path) -> dict[str, dict] | None:
    """The manifest's {file name: {"sha256", "bytes"}}, None unless it is well formed (names are plain
    file names inside the step dir; sizes ints; checksums strings)."""
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(files, dict):
        return None
    for name, info in files.items():
        if (Path(name).name != name or name in ("", ".", "..") or not isinstance(info, dict)
                or not isinstance(info.get("bytes"), int) or not isinstance(info.get("sha256"), str)):
            return None
    return files


def complete_checkpoints(ckpt_root: Path, verify: bool = True) -> list[Path]:
    """Complete checkpoint dirs, oldest first; incomplete or corrupted ones are skipped with a warning."""
    if not ckpt_root.is_dir():
        return []
    good = []
    for path in sorted(ckpt_root.glob("step-*")):
        problem = checkpoint_problem(path, verify=verify)
        if problem is None:
            good.append(path)
        elif verify:
            warnings.warn(f"skipping checkpoint {path.name}: {problem}", stacklevel=2)
    return good


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_checkpoint_meta(path: Path) -> dict:
    """The JSON parts of a checkpoint (UserError if it is not a complete checkpoint)."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"checkpoint {path}: {problem}")
    return {
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        "run_config": json.loads((path / "run_config.json").read_text()),
        "model_config": json.loads((path / "model_config.json").read_text()),
        "optimizer": json.loads((path / "optimizer.json").read_text()),
    }


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path}: model weights do not load ({str(exc).splitlines()[0]})") from None


def load_optimizer_state(path: Path, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(optimizer_from_flat(tensors, meta))


def load_extra(path: Path, trainer_state: dict) -> dict[str, Any] | None:
    """Restore the RNG states; return the pruner state (None when the run had no pruner)."""
    tensors = load_file(str(path / "extra.safetensors"))
    restore_rng(tensors, trainer_state["rng"])
    if trainer_state.get("pruner") is None:
        return None
    return join_state(tensors, trainer_state["pruner"], "pruner")
