"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for `train.parallel: fsdp`: wrapping, local shards,
the O(neurons) reductions the pruning methods need, and the full-state gather used by compaction.

Layout under FSDP2: every parameter is a DTensor sharded on dim 0 (torch.chunk rule: rank r holds
rows [r*c, min((r+1)*c, n)) with c = ceil(n / world)). So an FFN neuron j (row j of gate/up, column j
of down) has its gate/up rows on one rank and its down column split across all ranks by hidden rows.
A per-neuron statistic is then a sum of per-rank partial vectors of length `width`: one all-reduce
of O(neurons) numbers, never a gather of weights. `local()` is the rank's own slice; writing into it
writes the parameter (FSDP2 keeps the shard in place).

Compaction (`compact_sharded`) gathers the full model and AdamW state onto rank 0's host
(`get_state_dict(full_state_dict=True, cpu_offload=True)`: the other ranks get nothing), runs the
method's own `compact()` there on a plain model (the other ranks run it on a meta-device copy so the
method's state changes the same way without memory), re-shards the smaller model, and broadcasts its
weights and moments from rank 0 (`set_state_dict(broadcast_from_rank0=True)`). Peak host memory:
one full copy of weights + moments on rank 0, plus its compacted copy.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["all_reduce_", "compact_sharded", "full_model_state", "gather_rows", "gathered_copy", "index_fill_",
           "is_sharded", "join_torchrun", "local", "row_range", "shard_model", "sharded_from_full", "sharded_teacher",
           "sum_over_ranks", "uses_fsdp"]


def uses_fsdp(parallel: str, world_size: int) -> bool:
    """FSDP applies under torchrun only (any world size, 1 included: its process group exists); a
    process not started by torchrun trains the plain model."""
    return parallel == "fsdp" and (world_size > 1 or (dist.is_available() and dist.is_initialized()))


def is_sharded(tensor: Any) -> bool:
    """Whether `tensor` is a DTensor (a parameter, gradient or moment under FSDP2). No DTensor exists
    before `torch.distributed.tensor` is imported, so that (slow) import is left to FSDP itself."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place writes reach the parameter); a plain tensor as is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def row_range(tensor: Tensor) -> tuple[int, int]:
    """[start, stop) of the dim-0 rows this rank holds (all rows for a plain tensor)."""
    rows = tensor.shape[0]
    if not is_sharded(tensor):
        return 0, rows
    mesh = tensor.device_mesh
    chunk = -(-rows // mesh.size())
    start = min(rows, mesh.get_local_rank() * chunk)
    stop = min(rows, start + chunk)
    assert stop - start == tensor.to_local().shape[0], "FSDP2 shards dim 0 by torch.chunk"
    return start, stop


def all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """In-place SUM / MAX over the ranks when running distributed (identity otherwise)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def gather_rows(shard: Tensor, rows: int) -> Tensor:
    """The full tensor of `rows` rows from every rank's dim-0 shard (torch.chunk layout); a collective."""
    world = dist.get_world_size()
    chunk = -(-rows // world)
    wire = torch.uint8 if shard.dtype == torch.bool else shard.dtype  # gloo has no bool
    padded = torch.zeros((chunk, *shard.shape[1:]), dtype=wire, device=shard.device)
    padded[:shard.shape[0]] = shard
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:rows].to(shard.dtype)


def index_fill_(tensor: Tensor, axis: int, indices: Tensor, value: float = 0.0) -> None:
    """`tensor.index_fill_(axis, indices, value)` on a plain tensor or on this rank's shard of a dim-0
    sharded DTensor (indices are global; only the rows this rank holds are touched)."""
    if not is_sharded(tensor):
        tensor.index_fill_(axis, indices, value)
        return
    shard = tensor.to_local()
    if axis != 0:
        shard.index_fill_(axis, indices, value)
        return
    start, stop = row_range(tensor)
    mine = indices[(indices >= start) & (indices < stop)] - start
    if mine.numel():
        shard.index_fill_(0, mine, value)


def shard_model(model: nn.Module, dtype: str, compile_layers: bool = False) -> nn.Module:
    """fully_shard every decoder layer, then the root (embeddings, final norm, head: tied weights stay
    in one group); bf16 parameters with fp32 gradient reduction under `train.dtype: bf16`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lmprune.pruning.surgery import decoder_layers

    kwargs: dict[str, Any] = {}
    if dtype == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        if compile_layers:
            layer.compile()  # per layer: the FQNs (and so the checkpoints) are unchanged
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict on rank 0's CPU; every rank must call it (others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_copy(model: nn.Module) -> nn.Module | None:
    """The full model as a plain module on rank 0's CPU (None on the other ranks); a collective."""
    state = full_model_state(model)
    if dist.get_rank() != 0:
        return None
    plain = _plain_copy(model, torch.device("cpu"))
    plain.load_state_dict(state, strict=False)
    return plain


def compact_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, compact: Callable,
                    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                    reshard: Callable[[nn.Module], nn.Module],
                    device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Run `compact(plain_model, plain_optimizer) -> optimizer` (the method's own compaction) on a
    gathered copy and return the re-sharded smaller model with its optimizer (moments carried over)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_state_dict, set_optimizer_state_dict)

    gather = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=gather)
    is_main = dist.get_rank() == 0
    plain = _plain_copy(model, torch.device("cpu") if is_main else torch.device("meta"))
    plain_optimizer = make_optimizer(plain)
    if is_main:
        plain.load_state_dict(model_state, strict=False)  # tied weights appear once or twice: both load
        _load_named_optimizer_state(plain, plain_optimizer, optim_state)
    del model_state, optim_state
    plain_optimizer = compact(plain, plain_optimizer)  # identical method state on every rank
    if is_main:
        model_state, optim_state = plain.state_dict(), _named_optimizer_state(plain, plain_optimizer)
    else:
        model_state, optim_state = {}, {}
    del plain_optimizer
    new = sharded_from_full(plain, model_state, model, reshard, device)
    del plain
    new_optimizer = make_optimizer(new)
    set_optimizer_state_dict(new, new_optimizer, optim_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return new, new_optimizer


def sharded_from_full(template: nn.Module, model_state: dict[str, Tensor], buffers_from: nn.Module,
                      reshard: Callable[[nn.Module], nn.Module], device: torch.device) -> nn.Module:
    """A sharded model shaped like `template` holding `model_state` (given on rank 0 only, broadcast)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    buffers = {name: buffer.detach().clone() for name, buffer in buffers_from.named_buffers()}
    new = _plain_copy(template, torch.device("meta"))
    reshard(new)
    new.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in buffers.items():  # non-persistent buffers (rotary tables) are not in a state dict
            new.get_buffer(name).copy_(buffer)
    set_model_state_dict(new, model_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return new


def sharded_teacher(model: nn.Module, reshard: Callable[[nn.Module], nn.Module], device: torch.device,
                    save: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """A frozen, sharded copy of a sharded `model` (the KD teacher: no optimizer); `save(plain)` runs on
    rank 0 with the gathered plain copy (the OUT/teacher snapshot)."""
    state = full_model_state(model)
    if dist.get_rank() == 0 and save is not None:
        plain = _plain_copy(model, torch.device("cpu"))
        plain.load_state_dict(state, strict=False)
        save(plain)
        del plain
    teacher = sharded_from_full(model, state, model, reshard, device)
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def _plain_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """An unsharded model of `model`'s HF config (fp32) on `device` (meta: shapes only)."""
    from transformers import AutoModelForCausalLM
    config = type(model.config).from_dict(model.config.to_dict())
    with device:
        plain = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return plain.float()


def _named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A plain optimizer's state keyed by parameter name (the layout of the DCP state-dict API)."""
    names = {param: name for name, param in model.named_parameters()}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [names[p] for p in group["params"]]}
              for group in optimizer.param_groups]
    state = {names[param]: dict(values) for param, values in optimizer.state.items()}
    return {"state": state, "param_groups": groups}


def _load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any]) -> None:
    params = dict(model.named_parameters())
    for group, saved in zip(optimizer.param_groups, named["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for name, values in named["state"].items():
        optimizer.state[params[name]] = {k: v.clone() if torch.is_tensor(v) else v for k, v in values.items()}


def join_torchrun(device: torch.device) -> tuple[int, int]:
    """(rank, world size): joins the torchrun job's process group when WORLD_SIZE > 1 (gloo on CPU)."""
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def sum_over_ranks(stats: Any) -> Any:
    """Sum a statistics dataclass over the ranks in place: every tensor is all-reduced, every int summed
    (nested dataclasses and lists too). Identity outside a distributed job; returns `stats`."""
    import dataclasses
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return stats
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if torch.is_tensor(item):
                all_reduce_(item)
            elif dataclasses.is_dataclass(item):
                sum_over_ranks(item)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(stats, field.name, int(all_reduce_(torch.tensor([value], dtype=torch.int64))))
    return stats
