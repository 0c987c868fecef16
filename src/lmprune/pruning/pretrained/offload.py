"""Models larger than memory: a skeleton on the meta device whose decoder layers load one at a time.

`load_offloaded(model_dir, dtype)` builds the model on the meta device and materialises only what is
not a decoder layer (embeddings, final norm, LM head, rotary tables) from the safetensors files.
`OffloadedLayers` is the `sequential.LayerSource` that loads layer i from the (memory-mapped)
safetensors files onto the compute device when it is fetched and, after pruning, keeps only the pruned
layer (on the CPU). Peak memory is then the pruned model plus one unpruned layer plus the calibration
set's hidden states, instead of the whole unpruned model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lmprune.errors import UserError
from lmprune.pruning.surgery import decoder_layers, family_of

__all__ = ["OffloadedLayers", "SafetensorsWeights", "check_safetensors_dir", "load_offloaded"]

_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


def check_safetensors_dir(model_dir: Path) -> None:
    """UserError unless model_dir holds plain safetensors weights (one file or an index of shards)."""
    if not ((model_dir / _SINGLE).is_file() or (model_dir / _INDEX).is_file()):
        raise UserError(f"--offload needs a model dir with safetensors weights ({_SINGLE} or {_INDEX}); "
                        f"{model_dir} has neither")


class SafetensorsWeights:
    """Tensors by name from a model dir's safetensors file(s), read on demand.

    Each `read` maps the files it needs and unmaps them afterwards: file pages read through a mapping
    that stays open count in the process's RSS, so a handle kept open for the whole run would end up
    holding the whole unpruned model's pages.
    """

    def __init__(self, model_dir: Path) -> None:
        check_safetensors_dir(model_dir)
        if (model_dir / _INDEX).is_file():
            weight_map = json.loads((model_dir / _INDEX).read_text())["weight_map"]
            files = {name: model_dir / shard for name, shard in weight_map.items()}
        else:
            with safe_open(model_dir / _SINGLE, framework="pt") as handle:
                files = {name: model_dir / _SINGLE for name in handle.keys()}
        self.files = files

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        missing = [name for name in names if name not in self.files]
        if missing:
            raise UserError(f"the model's safetensors files hold no tensor {missing[0]!r}")
        tensors = {}
        for path in dict.fromkeys(self.files[name] for name in names):
            with safe_open(path, framework="pt", device="cpu") as handle:
                for name in names:
                    if self.files[name] == path:
                        tensors[name] = handle.get_tensor(name).to(dtype).clone()  # own memory, not the map
        return tensors


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, leaf, nn.Parameter(value, requires_grad=getattr(owner, leaf).requires_grad))


def load_offloaded(model_dir: Path, dtype: torch.dtype) -> tuple[nn.Module, SafetensorsWeights]:
    """The model with its decoder layers on the meta device and everything else loaded on the CPU."""
    weights = SafetensorsWeights(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    family_of(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = [name for name, _ in model.named_parameters() if not name.startswith("model.layers.")
             and not (tied and name == "lm_head.weight" and name not in weights)]
    for name, tensor in weights.read(names, dtype).items():
        _set_parameter(model, name, tensor)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # non-persistent buffers
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta and not name.startswith("model.layers."):
            raise UserError(f"--offload cannot materialise {name!r} of {type(model).__name__} from {model_dir}")
    return model.eval(), weights


class OffloadedLayers:
    """`LayerSource` over a `load_offloaded` skeleton: layer i is read from safetensors when fetched."""

    def __init__(self, model: nn.Module, weights: SafetensorsWeights, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.layers = decoder_layers(model)
        self.weights, self.device, self.dtype = weights, device, dtype

    def fetch(self, index: int) -> nn.Module:
        layer = self.layers[index]
        if any(p.is_meta for p in layer.parameters()):
            prefix = f"model.layers.{index}."
            tensors = self.weights.read([prefix + name for name in layer.state_dict()], self.dtype)
            state = {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}
            layer.load_state_dict(state, strict=True, assign=True)
        return layer.to(self.device)

    def release(self, index: int, keep: bool) -> None:
        self.layers[index].to("cpu" if keep else "meta")  # meta: frees the unpruned weights
