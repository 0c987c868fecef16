"""Model presets, construction of HF `LlamaForCausalLM`s, and loading local HF causal-LM dirs.

Formulas: docs/algorithms.md, "FLOPs accounting".
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from lmprune.config import ModelConfig
from lmprune.errors import UserError
from lmprune.trust import read_json_object, refuse_pickle_weights, refuse_remote_code

# SwiGLU FFN widths are ~8/3 of the model width, rounded to a multiple of 64.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 256, "intermediate_size": 704, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2},
    "small": {"hidden_size": 384, "intermediate_size": 1024, "num_layers": 6, "num_heads": 6, "num_kv_heads": 2},
    "base": {"hidden_size": 512, "intermediate_size": 1408, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4},
    # GPT-3 125M / 350M depths and widths as Llamas (head_dim 64, 4 KV heads; GQA makes them smaller):
    # 75.5M / 265.9M parameters without the (tied) embedding, 81.8M / 274.3M with a vocabulary of 8192.
    "gpu-125m": {"hidden_size": 768, "intermediate_size": 2048, "num_layers": 12, "num_heads": 12, "num_kv_heads": 4},
    "gpu-350m": {"hidden_size": 1024, "intermediate_size": 2752, "num_layers": 24, "num_heads": 16,
                 "num_kv_heads": 4},
}

# Families whose modules follow Llama's names (mlp.{gate,up,down}_proj, self_attn.{q,k,v,o}_proj).
LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}


def llama_config(model_cfg: ModelConfig, vocab_size: int, seq_len: int, eos_token_id: int | None) -> LlamaConfig:
    """The HF config of a from-scratch model: preset values, then the explicit overrides."""
    dims = dict(PRESETS[model_cfg.preset or "tiny"])
    for key in dims:
        override = getattr(model_cfg, key)
        if override is not None:
            dims[key] = override
    if dims["hidden_size"] % dims["num_heads"]:
        raise UserError(f"model.hidden_size {dims['hidden_size']} is not divisible by num_heads {dims['num_heads']}")
    if dims["num_heads"] % dims["num_kv_heads"]:
        raise UserError(f"model.num_kv_heads {dims['num_kv_heads']} must divide num_heads {dims['num_heads']}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_layers"],
        num_attention_heads=dims["num_heads"],
        num_key_value_heads=dims["num_kv_heads"],
        max_position_embeddings=model_cfg.max_position_embeddings or seq_len,
        rope_theta=model_cfg.rope_theta,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        initializer_range=model_cfg.init_std,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        # torch's fused scaled_dot_product_attention (flash / memory-efficient kernels on CUDA); stated,
        # not left to the library's default
        attn_implementation="sdpa",
    )


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 Llama; the init depends only on `seed` and the config."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def check_model_dir(path: str | Path) -> dict:
    """Validate a local HF causal-LM dir and return its config dict (UserError when it is not one).

    Refuses dirs that ask for remote code or whose weights are not safetensors (see trust.py).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model dir not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} is not a HF model dir (no config.json)")
    config = read_json_object(config_file)
    refuse_remote_code(path, config)
    architectures = config.get("architectures") or []
    if architectures and not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise UserError(f"{path} is not a causal LM (architectures: {', '.join(map(str, architectures))})")
    refuse_pickle_weights(path)
    return config


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a local HF causal-LM dir (no remote code, no network)."""
    check_model_dir(path)
    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        if not (path / "model.safetensors").exists() and (path / "model.sparse.safetensors").exists():
            from lmprune.pruning.sparse.export import load_compact_into  # bitmask + values (lmprune's own)

            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            load_compact_into(model, path / "model.sparse.safetensors")
            return model.to(dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
    return model


def forward_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token (Kaplan et al.): 2 x matmul weights + 2 x n_layer x n_ctx x d_attn.

    Every nn.Linear counts (attention, FFN, LM head); a masked-but-not-yet-compacted neuron still
    costs its FLOPs, which is the honest cost of pruning during training.
    """
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = config.num_hidden_layers * seq_len * config.num_attention_heads * head_dim
    return 2.0 * matmul + 2.0 * attention


def generate_sample(model: PreTrainedModel, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """A short sampled continuation of `prompt` (top-k sampling, fixed seed)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0 and tokenizer.eos_token_id is not None:
        ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
    limit = model.config.max_position_embeddings - ids.shape[1]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=max(1, min(max_new_tokens, limit)), do_sample=True,
                             top_k=40, temperature=0.8, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
