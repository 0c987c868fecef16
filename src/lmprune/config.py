"""Typed, validated run configuration (one section per component; unknown keys are errors).

A run config is YAML with the sections below. Every field has a docstring, which is also what
`lmprune train --help-config` prints. Validation happens on construction, so a bad value is
reported as one line before any work starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from lmprune.errors import UserError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class DataConfig(Section):
    source: str | list[str] = "shakespeare"
    """Corpus: a built-in name (shakespeare, gcide, pystdlib), or text files / dirs / globs / .jsonl files."""
    prepared_dir: str | None = None
    """An already prepared dir (`lmprune prepare --out DIR`); when set, `source` is not read."""
    vocab_size: int | None = 8192
    """Vocabulary of the byte-level BPE trained on the training split (ignored with `tokenizer`)."""
    tokenizer: str | None = None
    """A local HF model/tokenizer dir whose tokenizer to use instead of training a BPE."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (split by document, deterministic)."""
    seed: int = 0
    """Seed of the train/val split."""

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.vocab_size is not None and self.vocab_size < 260:
            raise ValueError(f"data.vocab_size must be >= 260 (bytes + specials), got {self.vocab_size}")
        return self


class ModelConfig(Section):
    preset: Literal["tiny", "small", "base"] | None = "tiny"
    """Architecture preset: tiny (4 layers, d256), small (6, d384), base (8, d512); SwiGLU FFN."""
    path: str | None = None
    """A local HF causal-LM dir to start from instead of a preset (fine-tuning / recovery)."""
    hidden_size: int | None = None
    """Override of the preset's model width."""
    intermediate_size: int | None = None
    """Override of the preset's FFN width."""
    num_layers: int | None = None
    """Override of the preset's number of decoder layers."""
    num_heads: int | None = None
    """Override of the preset's number of attention heads."""
    num_kv_heads: int | None = None
    """Override of the preset's number of key/value heads (GQA); must divide num_heads."""
    max_position_embeddings: int | None = None
    """Longest sequence the model supports; defaults to train.seq_len."""
    rope_theta: float = 10000.0
    """RoPE base."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the LM head (saves parameters in small models)."""
    init_std: float = 0.02
    """Std of the normal init of weights (from-scratch models only)."""

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.preset is None and self.path is None:
            raise ValueError("model needs a `preset` or a `path`")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"model.{name} must be > 0, got {value}")
        return self


class TrainConfig(Section):
    steps: int = 200
    """Optimizer steps of the whole run (the LR schedule spans all of them)."""
    batch_size: int = 16
    """Sequences per micro-batch per process."""
    seq_len: int = 256
    """Tokens per training sequence."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (end of warmup)."""
    lr_end: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; norms and biases have none)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    dtype: Literal["fp32", "bf16"] = "bf16"
    """Autocast dtype of forward/backward (weights and optimizer stay fp32)."""
    eval_every: int = 50
    """Evaluate validation loss every N steps (0 = only at the end)."""
    eval_tokens: int = 65536
    """Validation tokens per evaluation."""
    log_every: int = 10
    """Write a metrics.jsonl row every N steps."""
    save_every: int = 0
    """Write a checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Complete checkpoints to keep (>= 2, so a crash during a write never leaves none)."""
    seed: int = 0
    """Seed of model init and data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto = cuda when available."""
    threads: int | None = None
    """torch intra-op threads per process (None = torch default)."""
    compile: bool = False
    """torch.compile the model (faster after a slow first step)."""
    sample_tokens: int = 48
    """Length of the sample generation printed at the end (0 = none)."""

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_tokens", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.lr_end <= self.lr:
            raise ValueError(f"train.lr_end must be in [0, lr={self.lr}], got {self.lr_end}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"train.warmup ({self.warmup}) must be in [0, steps={self.steps}]")
        if self.keep_last < 2:
            raise ValueError(f"train.keep_last must be >= 2, got {self.keep_last}")
        for name in ("eval_every", "save_every", "weight_decay", "grad_clip", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("train.beta1 and train.beta2 must be in [0, 1)")
        return self


class RunConfig(Section):
    """A training run: data, model, optimisation."""

    data: DataConfig = DataConfig()
    """The corpus and tokenizer."""
    model: ModelConfig = ModelConfig()
    """The model to train."""
    train: TrainConfig = TrainConfig()
    """The optimisation loop."""
    out_dir: str | None = None
    """Where the run writes (overridden by --out); default runs/<config name>."""


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {where}: {msg}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML scalars) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected section.key=value")
        dotted, value_text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {key} is not a section")
        node[keys[-1]] = yaml.safe_load(value_text)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML run config; any problem is one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_one_line(err, source)) from None


def config_to_json(cfg: BaseModel) -> str:
    return json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True)


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per field with its type, default and docstring (for --help-config)."""
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{prefix}{name}:  {field.description or ''}")
            lines += describe_fields(annotation, prefix + "  ")
        else:
            lines.append(f"{prefix}{name} = {field.default!r}  # {field.description or ''}")
    return lines
