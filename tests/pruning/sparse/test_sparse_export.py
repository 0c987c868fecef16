"""Compact sparse export: bit-exact round trip, smaller files, clean errors on bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lmprune.errors import UserError
from lmprune.pruning.sparse.export import COMPACT_FILENAME, file_sizes, load_compact, load_compact_into, save_compact
from lmprune.pruning.sparse.masks import DEFAULT_PATTERNS, apply_masks_, magnitude_keep_masks, prunable_parameters

torch.set_num_threads(1)


def sparse_llama(sparsity: float = 0.9, dtype: torch.dtype = torch.float32, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, tie_word_embeddings=True)).to(dtype)
    keep, _ = magnitude_keep_masks(prunable_parameters(model, DEFAULT_PATTERNS), sparsity, "global")
    apply_masks_(model, keep)
    return model


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (torch.equal treats -0.0 == +0.0)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(dtype, tmp_path):
    model = sparse_llama(dtype=dtype)
    with torch.no_grad():  # signed zeros must survive in compact and dense tensors alike
        model.model.layers[0].mlp.up_proj.weight[0, :2] = -0.0
        model.model.norm.weight[0] = -0.0
    state = model.state_dict()
    path = save_compact(model, tmp_path)
    assert path == tmp_path / COMPACT_FILENAME
    loaded = load_compact(tmp_path)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor) and same_bits(loaded[name], tensor), name
    # tied embeddings are stored once and come back as one tensor
    assert loaded["lm_head.weight"] is loaded["model.embed_tokens.weight"]


def test_compact_file_is_smaller_than_dense_at_90_percent(tmp_path):
    model = sparse_llama(0.9, hidden=64)
    save_compact(model, tmp_path)
    unique = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(unique, tmp_path / "model.safetensors")
    sizes = file_sizes(tmp_path)
    assert set(sizes) == {COMPACT_FILENAME, "model.safetensors"}
    assert sizes[COMPACT_FILENAME] < 0.5 * sizes["model.safetensors"]


def test_load_compact_into_a_fresh_model_gives_the_same_logits(tmp_path):
    model = sparse_llama()
    save_compact(model.state_dict(), tmp_path)
    fresh = LlamaForCausalLM(model.config)
    load_compact_into(fresh, tmp_path / COMPACT_FILENAME)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_load_compact_into_a_different_architecture_is_a_user_error(tmp_path):
    save_compact(sparse_llama(), tmp_path)
    with pytest.raises(UserError, match="shapes differ"):
        load_compact_into(sparse_llama(hidden=48), tmp_path)


def corrupt_tail(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last stored tensor
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def replace_with_garbage(path):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def replace_with_plain_safetensors(path):
    save_file({"w": torch.zeros(2, 2)}, path)


@pytest.mark.parametrize("damage,message", [
    (corrupt_tail, "checksum mismatch"), (truncate, "truncated or corrupted"),
    (replace_with_garbage, "truncated or corrupted"), (replace_with_plain_safetensors, "not an lmprune"),
])
def test_damaged_files_are_user_errors(damage, message, tmp_path):
    path = save_compact(sparse_llama(), tmp_path)
    damage(path)
    with pytest.raises(UserError, match=message):
        load_compact(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_compact(tmp_path / "nowhere")
