"""What lmprune refuses to load: remote code and pickled weights.

Every model and tokenizer dir goes through these checks before `transformers` sees it, so no verb
(eval, train's model.path / kd.teacher, prune, compare) can reach the "run custom code? [y/N]"
prompt that `transformers` shows on a terminal when a dir's config has an `auto_map`, and no
weights are unpickled. Loads also pass `trust_remote_code=False` explicitly, as a second lock.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmprune.errors import UserError

# Files whose `auto_map` makes transformers import Python shipped in the dir.
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
# Weight files transformers would read with pickle (torch.load) or that need other frameworks.
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
                  "model.ckpt.index")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_json_object(path: Path) -> dict:
    """A JSON object file; binary, malformed or non-object content -> one UserError line."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (binary content)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def refuse_remote_code(path: Path, config: dict | None = None) -> None:
    """UserError when any config file of the dir asks for code shipped with it (`auto_map`)."""
    for name in REMOTE_CODE_FILES:
        file = path / name
        if name == "config.json" and config is not None:
            content = config
        elif file.is_file():
            content = read_json_object(file)
        else:
            continue
        if "auto_map" in content:
            classes = ", ".join(sorted(str(k) for k in content["auto_map"])) if isinstance(
                content["auto_map"], dict) else "custom classes"
            raise UserError(f"{path} asks to run its own Python code ({name} has auto_map: {classes}); "
                            "lmprune never runs remote code")


def refuse_pickle_weights(path: Path) -> None:
    """UserError when the dir's weights are not all safetensors files inside the dir."""
    index = path / SAFETENSORS_INDEX
    shards: list[str] = []
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: no weight_map")
        shards = sorted(set(map(str, weight_map.values())))
        for shard in shards:
            if not shard.endswith(".safetensors"):
                raise UserError(f"{index} points to {shard}: only safetensors weights are read (no pickle)")
            if Path(shard).name != shard:
                raise UserError(f"{index} points outside the model dir ({shard})")
            if not (path / shard).is_file():
                raise UserError(f"{index} names {shard}, which is missing")
    has_safetensors = any((path / n).is_file() for n in ("model.safetensors", SAFETENSORS_INDEX,
                                                            "model.sparse.safetensors"))
    for name in [n for n in ("model.safetensors", "model.sparse.safetensors") if (path / n).is_file()] + shards:
        check_safetensors_header(path / name)
    if not has_safetensors:
        pickled = [n for n in PICKLE_WEIGHTS if (path / n).exists()]
        if pickled:
            raise UserError(f"{path} holds {pickled[0]}: only safetensors weights are read (no pickle)")
        raise UserError(f"{path} holds no model.safetensors weights")


def check_safetensors_header(file: Path) -> None:
    """UserError unless `file` has a readable safetensors header whose tensors fit in the file (reads
    the header only, not the weights)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise UserError(f"{file}: not a valid safetensors file ({str(error).splitlines()[0]})") from None
