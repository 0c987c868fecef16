"""Physical surgery on Llama-family HF causal LMs: slice FFN neurons and GQA groups, drop decoder layers.

Formulas: docs/algorithms.md, "One-shot pruning of pretrained models".

Supported families (Llama, Mistral, Qwen2, Qwen3; SmolLM is Llama) share the module names
`model.model.layers[i].mlp.{gate,up,down}_proj` and `model.model.layers[i].self_attn.{q,k,v,o}_proj`.
Every function edits the model in place and changes the config THROUGH the config object
(`model.config.intermediate_size = ...`), so `save_pretrained` writes a standard checkpoint that plain
`AutoModelForCausalLM.from_pretrained` loads. Widths stay uniform across layers (HF configs hold one
`intermediate_size` and one head count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmprune.errors import UserError


@dataclass(frozen=True)
class FamilyAdapter:
    """What differs between the supported families; the prunable groups have the same names in all of them.

    ffn_bias_field: config flag that gives down_proj a bias (it also gives gate/up_proj one); None where
        the family's modeling code hard-codes the MLP without biases.
    attn_bias_field: config flag that gives o_proj a bias (it also gives q/k/v_proj one); None where the
        family hard-codes o_proj without a bias (Qwen2 has q/k/v biases but never an o_proj bias).
    """

    model_type: str
    ffn_bias_field: str | None
    attn_bias_field: str | None


FAMILIES: dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama", ffn_bias_field="mlp_bias", attn_bias_field="attention_bias"),
    "mistral": FamilyAdapter("mistral", ffn_bias_field=None, attn_bias_field=None),
    "qwen2": FamilyAdapter("qwen2", ffn_bias_field=None, attn_bias_field=None),
    "qwen3": FamilyAdapter("qwen3", ffn_bias_field=None, attn_bias_field="attention_bias"),
}


def family_of(model: nn.Module) -> str:
    """The family name of a supported causal LM (`llama`, `mistral`, `qwen2`, `qwen3`), else UserError."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"one-shot pruning supports model_type in {sorted(FAMILIES)}; got model_type={model_type!r}"
        )
    inner = getattr(model, "model", None)
    if getattr(model, "lm_head", None) is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise UserError(
            f"one-shot pruning needs a causal LM (e.g. {type(model).__name__.removesuffix('Model')}ForCausalLM "
            f"with .model.layers and .lm_head); got {type(model).__name__} (model_type={model_type!r})"
        )
    return model_type


def adapter_of(model: nn.Module) -> FamilyAdapter:
    """The FamilyAdapter of a supported causal LM (UserError otherwise)."""
    return FAMILIES[family_of(model)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers `model.model.layers` of a supported causal LM."""
    family_of(model)
    return model.model.layers


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) read from the config and the modules."""
    config = model.config
    head_dim = decoder_layers(model)[0].self_attn.head_dim
    return config.num_attention_heads, config.num_key_value_heads, head_dim


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied embedding/LM-head weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    requires_grad = old.requires_grad if old is not None else True
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=requires_grad))


@torch.no_grad()
def _keep_rows_(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep output rows `rows` of a Linear (its bias follows)."""
    rows = rows.to(linear.weight.device)
    _replace_parameter(linear, "weight", linear.weight.index_select(0, rows))
    if linear.bias is not None:
        _replace_parameter(linear, "bias", linear.bias.index_select(0, rows))
    linear.out_features = len(rows)


@torch.no_grad()
def _keep_columns_(linear: nn.Linear, columns: torch.Tensor) -> None:
    """Keep input columns `columns` of a Linear (its bias is per output row: unchanged)."""
    columns = columns.to(linear.weight.device)
    _replace_parameter(linear, "weight", linear.weight.index_select(1, columns))
    linear.in_features = len(columns)


def _check_keep(keep: Sequence[torch.Tensor], num_layers: int, limit: int, what: str) -> int:
    """Validate one index tensor per layer, all the same length, unique, in [0, limit); return the length."""
    if len(keep) != num_layers:
        raise ValueError(f"{what}: expected {num_layers} index tensors (one per layer), got {len(keep)}")
    counts = {len(k) for k in keep}
    if len(counts) != 1:
        raise ValueError(f"{what}: every layer must keep the same count (HF configs hold one width); got {counts}")
    count = counts.pop()
    for layer_index, indices in enumerate(keep):
        if count == 0 or len(torch.unique(indices)) != count:
            raise ValueError(f"{what}: layer {layer_index} keeps an empty or repeated index set")
        if int(indices.min()) < 0 or int(indices.max()) >= limit:
            raise ValueError(f"{what}: layer {layer_index} has an index outside [0, {limit})")
    return count


def prune_ffn_(model: nn.Module, keep: Sequence[torch.LongTensor]) -> None:
    """Keep FFN neurons `keep[i]` (same count in every layer): gate/up rows and down_proj columns.

    Sets `config.intermediate_size` to the kept count.
    """
    layers = decoder_layers(model)
    width = _check_keep(keep, len(layers), model.config.intermediate_size, "prune_ffn_")
    for layer, indices in zip(layers, keep):
        indices = torch.sort(indices.long()).values  # keep the original neuron order
        mlp = layer.mlp
        _keep_rows_(mlp.gate_proj, indices)
        _keep_rows_(mlp.up_proj, indices)
        _keep_columns_(mlp.down_proj, indices)
        mlp.intermediate_size = width
    model.config.intermediate_size = width


def kv_group_channels(groups: torch.Tensor, channels_per_group: int) -> torch.Tensor:
    """Flat channel indices of whole groups laid out contiguously: group g -> [g*c, (g+1)*c)."""
    offsets = torch.arange(channels_per_group, device=groups.device)
    return (groups.long()[:, None] * channels_per_group + offsets[None, :]).reshape(-1)


def prune_kv_groups_(model: nn.Module, keep_groups: Sequence[torch.LongTensor]) -> None:
    """Keep whole GQA groups `keep_groups[i]` (same count per layer): a KV head and its query heads.

    Query head h reads KV head h // (num_heads / num_kv_heads) (HF `repeat_kv`), so group g owns q rows
    and o_proj columns [g*r*d, (g+1)*r*d) and k/v rows [g*d, (g+1)*d) (r = query heads per KV head,
    d = head_dim). q/k/v biases follow their rows; Qwen3's q_norm/k_norm act per head_dim and are untouched.
    Sets num_attention_heads / num_key_value_heads and pins `config.head_dim`, so head_dim and the
    query/KV ratio stay as they were.
    """
    layers = decoder_layers(model)
    num_heads, num_kv_heads, head_dim = attention_shape(model)
    heads_per_group = num_heads // num_kv_heads
    kept_groups = _check_keep(keep_groups, len(layers), num_kv_heads, "prune_kv_groups_")
    for layer, groups in zip(layers, keep_groups):
        groups = torch.sort(groups.long()).values
        attn = layer.self_attn
        query_channels = kv_group_channels(groups, heads_per_group * head_dim)  # [kept * r * d]
        kv_channels = kv_group_channels(groups, head_dim)  # [kept * d]
        _keep_rows_(attn.q_proj, query_channels)
        _keep_rows_(attn.k_proj, kv_channels)
        _keep_rows_(attn.v_proj, kv_channels)
        _keep_columns_(attn.o_proj, query_channels)
    config = model.config
    config.head_dim = head_dim  # Qwen2 has no head_dim field and would re-derive it as hidden // heads
    config.num_attention_heads = kept_groups * heads_per_group
    config.num_key_value_heads = kept_groups


def drop_layers_(model: nn.Module, layer_indices: Sequence[int]) -> None:
    """Remove decoder layers `layer_indices`; renumber `layer_idx` (KV-cache slots) of the rest.

    Updates `config.num_hidden_layers` and, where the config has it, `config.layer_types`.
    """
    layers = decoder_layers(model)
    drop = sorted(set(int(i) for i in layer_indices))
    if drop and (drop[0] < 0 or drop[-1] >= len(layers)):
        raise ValueError(f"drop_layers_: indices {drop} outside [0, {len(layers)})")
    if len(drop) >= len(layers):
        raise ValueError("drop_layers_: cannot drop every decoder layer")
    kept = [i for i in range(len(layers)) if i not in drop]
    model.model.layers = nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in kept]


def supports_output_bias(model: nn.Module, part: str) -> bool:
    """Whether down_proj (`part="ffn"`) / o_proj (`part="attention"`) has or can get a bias via the config."""
    first = decoder_layers(model)[0]
    linear = first.mlp.down_proj if part == "ffn" else first.self_attn.o_proj
    adapter = adapter_of(model)
    field = adapter.ffn_bias_field if part == "ffn" else adapter.attn_bias_field
    return linear.bias is not None or field is not None


@torch.no_grad()
def add_output_bias_(model: nn.Module, part: str, biases: Sequence[torch.Tensor]) -> None:
    """Add `biases[i]` ([hidden]) to the output of layer i's down_proj (`part="ffn"`) or o_proj ("attention").

    Where the projection has no bias, the family's config flag is switched on (Llama `mlp_bias`,
    Llama/Qwen3 `attention_bias`); that flag also gives the sibling projections (gate/up, or q/k/v) a
    bias, which is added as zeros so the function is unchanged. UserError if the family cannot hold one.
    """
    if part not in ("ffn", "attention"):
        raise ValueError(f"part must be 'ffn' or 'attention', got {part!r}")
    layers = decoder_layers(model)
    if len(biases) != len(layers):
        raise ValueError(f"add_output_bias_: expected {len(layers)} bias vectors, got {len(biases)}")
    if not supports_output_bias(model, part):
        raise UserError(f"model_type={model.config.model_type!r} cannot hold a {part} output-projection bias")
    adapter = adapter_of(model)
    for layer, bias in zip(layers, biases):
        if part == "ffn":
            output, siblings = layer.mlp.down_proj, (layer.mlp.gate_proj, layer.mlp.up_proj)
        else:
            attn = layer.self_attn
            output, siblings = attn.o_proj, (attn.q_proj, attn.k_proj, attn.v_proj)
        if output.bias is None:
            for linear in (*siblings, output):
                if linear.bias is None:
                    zeros = torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
                    linear.bias = nn.Parameter(zeros, requires_grad=linear.weight.requires_grad)
        output.bias.add_(bias.to(device=output.bias.device, dtype=output.bias.dtype))
    field = adapter.ffn_bias_field if part == "ffn" else adapter.attn_bias_field
    if field is not None and not getattr(model.config, field):
        setattr(model.config, field, True)
