"""Typed, validated run configuration (one section per component; unknown keys are errors).

A run config is YAML with the sections below. Every field has a docstring, which is also what
`lmprune train --help-config` prints. Validation happens on construction, so a bad value is
reported as one line before any work starts.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from lmprune.errors import UserError
from lmprune.pruning import METHODS


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class MixtureSource(Section):
    """One corpus of a weighted mixture (data.sources)."""

    source: str | list[str] | None = None
    """The corpus, as data.source spells it (a built-in name, files / dirs / globs / .jsonl)."""
    prepared_dir: str | None = None
    """An already prepared dir instead of `source` (its tokenizer must be the mixture's)."""
    weight: float | None = None
    """Share of training windows drawn from this source (weights are normalised by their sum); 0 = evaluated
    only. Also its weight in the weighted-mean val loss."""
    name: str | None = None
    """Name in metrics (val_ppl/<name>) and reports; default: the source's file or built-in name."""

    def label(self) -> str:
        """The name, or one derived from the source (a file's stem, a dir's or built-in's name)."""
        if self.name is not None:
            return self.name
        spec = self.prepared_dir or (self.source if isinstance(self.source, str) else ",".join(self.source or []))
        stem = Path(spec.split(",")[0].rstrip("/*")).name.split(".")[0] or spec
        return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "source"


class DataConfig(Section):
    sources: list[MixtureSource] | None = None
    """A weighted mixture instead of `source`: [{source: ..., weight: ...}, ...]. Each is prepared once
    with one shared tokenizer (data.tokenizer, model.path's, or the BPE trained on the first source);
    training windows are drawn by weight (seeded, exact resume); each val split is evaluated separately
    (val_ppl/<name>) and val_loss is the weighted mean of their losses (val_ppl = exp of it)."""
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
        if self.sources is not None:
            self._check_mixture()
        return self

    def _check_mixture(self) -> None:
        # a dumped config (compare's equal-compute run) carries the default `source`: only another value clashes
        if self.source != DataConfig.model_fields["source"].default or self.prepared_dir is not None:
            raise ValueError("give data.source / data.prepared_dir or data.sources (a mixture), not both")
        if not self.sources:
            raise ValueError("data.sources is empty: give [{source: ..., weight: ...}, ...]")
        names: set[str] = set()
        for i, part in enumerate(self.sources):
            where = f"data.sources[{i}]"
            if (part.source is None) == (part.prepared_dir is None):
                raise ValueError(f"{where} needs exactly one of `source` and `prepared_dir`")
            if part.weight is None:
                raise ValueError(f"{where} ({part.label()}): weight is empty; give a number >= 0")
            if not math.isfinite(part.weight) or part.weight < 0:
                raise ValueError(f"{where} ({part.label()}): weight must be a finite number >= 0, got {part.weight}")
            if not _SOURCE_NAME.fullmatch(part.label()):
                raise ValueError(f"{where}: name {part.label()!r} must be letters, digits, '_', '-' and '.'")
            if part.label() in names:
                raise ValueError(f"{where}: two sources are named {part.label()!r}; give each a distinct `name`")
            names.add(part.label())
        total = sum(part.weight or 0.0 for part in self.sources)
        if not total > 0:
            raise ValueError(f"data.sources weights sum to {total}; they must sum to a positive number")


class ModelConfig(Section):
    preset: Literal["tiny", "small", "base", "gpu-125m", "gpu-350m"] | None = "tiny"
    """Architecture preset: tiny (4 layers, d256), small (6, d384), base (8, d512); for a GPU gpu-125m
    (12 layers, d768, 12/4 heads) and gpu-350m (24 layers, d1024, 16/4 heads); SwiGLU FFN, GQA."""
    path: str | None = None
    """A local HF causal-LM dir, the built-in smollm2-135m, or a Hub id org/name[@revision] (resolved
    through the HF cache; HF_HUB_OFFLINE=1: the cache alone) to start from instead of a preset."""
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
        if not 0.0 < self.init_std <= 1.0:
            raise ValueError(f"model.init_std must be in (0, 1], got {self.init_std} (larger weights overflow)")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"model.rope_theta must be a finite number > 0, got {self.rope_theta}")
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
    schedule: Literal["cosine", "wsd"] = "cosine"
    """LR after warmup: cosine decay to lr_end, or wsd (warmup-stable-decay: lr held at its peak, then a
    linear decay to lr_end over the last wsd_decay of the run; a pipeline prunes inside the stable phase)."""
    wsd_decay: float = 0.2
    """wsd: the fraction of the run (of each restarted segment) spent in the final decay."""
    retention_windows: int = 0
    """Retention probe (pipelines): this many training windows, all seen before pruning starts (t_w) and
    never after, are evaluated with val (`retention_ppl`): what the run still knows of its early data."""
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
    """torch.compile the model (faster after a slow first step); under parallel fsdp each decoder layer."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How torchrun ranks share the model: ddp = a full copy per rank; fsdp = FSDP2, weights, gradients
    and AdamW state sharded across ranks (per decoder layer + the root). A single process ignores it
    (but writes sharded DCP checkpoints under fsdp, so a run can move between world sizes)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)."""
    sample_tokens: int = 48
    """Length of the sample generation printed at the end (0 = none)."""
    export_sparse: bool = False
    """Also write OUT/final-sparse/: bitmask + nonzero values (safetensors) of the pruned matrices."""
    max_skipped_steps: int = 5
    """A step whose loss or gradient is not finite is skipped (no update); this many in a row stop the run
    (exit code 3) with its newest checkpoint holding the last finite state."""

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        for name in ("lr", "lr_end", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"train.{name} must be a finite number, got {getattr(self, name)}")
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_tokens", "log_every", "max_skipped_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.lr_end <= self.lr:
            raise ValueError(f"train.lr_end must be in [0, lr={self.lr}], got {self.lr_end}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"train.warmup ({self.warmup}) must be in [0, steps={self.steps}]")
        if not 0.0 < self.wsd_decay <= 1.0:
            raise ValueError(f"train.wsd_decay must be in (0, 1], got {self.wsd_decay}")
        if self.retention_windows < 0:
            raise ValueError(f"train.retention_windows must be >= 0, got {self.retention_windows}")
        if self.keep_last < 2:
            raise ValueError(f"train.keep_last must be >= 2, got {self.keep_last}")
        for name in ("eval_every", "save_every", "weight_decay", "grad_clip", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("train.beta1 and train.beta2 must be in [0, 1)")
        return self


class PipelineConfig(Section):
    """Enlarge-and-prune pipelines at one token budget (the `model` section describes the TARGET model)."""

    name: Literal["scratch", "idea", "naive", "oneshot"] = "idea"
    """scratch: the target model, one schedule; idea: enlarged model, one warmup+cosine, iterative pruning,
    recovery; naive: enlarged model with its own schedule to prune_start, one-shot prune, a new warmup+cosine;
    oneshot: one-shot prune at prune_start, then the resumed (or restarted) schedule."""
    enlarge: float = 2.6
    """FFN width of the enlarged model = target width x enlarge (rounded up to round_to)."""
    round_to: int = 8
    """Widths are multiples of this."""
    prune_start: float = 0.5
    """t_w: where pruning starts, as a fraction of train.steps."""
    prune_span: float = 0.25
    """t_p: length of the iterative pruning window (idea), as a fraction of train.steps."""
    prune_every: int = 5
    """Steps between mask updates inside the window (idea)."""
    oneshot_schedule: Literal["resumed", "restarted"] = "resumed"
    """oneshot: keep the run's schedule after pruning (resumed) or start a new warmup+cosine (restarted);
    scratch honours it too: `restarted` restarts its schedule at prune_start with no pruning (the LR-restart
    control)."""
    naive_fresh_optimizer: bool = False
    """naive: the optimizer after the one-shot prune starts afresh (empty AdamW moments), as a naive
    prune-then-retrain would; false carries the kept neurons' moments over."""
    importance: Literal["sensitivity", "magnitude", "random"] = "sensitivity"
    """Neuron score: EMA of |w * grad|, |w|, or seeded random."""
    ema: float = 0.5
    """EMA coefficient lambda of the sensitivity."""
    f1: Literal["mean", "sum", "max", "l2"] = "mean"
    """Reduction within a neuron's slice of one matrix."""
    f2: Literal["mean", "sum", "max", "l2"] = "max"
    """Reduction across the neuron's three matrices."""
    uncertainty: bool = False
    """Multiply by the PLATON uncertainty term (per-weight buffers)."""
    state_dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage dtype of the sensitivity EMA (bf16 halves it; only for ema <= 0.9)."""

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        if self.enlarge <= 1.0:
            raise ValueError(f"pipeline.enlarge must be > 1, got {self.enlarge}")
        if not 0.0 < self.prune_start < 1.0:
            raise ValueError(f"pipeline.prune_start must be in (0, 1) of the run, got {self.prune_start}")
        if not 0.0 <= self.prune_span < 1.0 or self.prune_start + self.prune_span >= 1.0:
            raise ValueError(f"pipeline pruning window [{self.prune_start}, {self.prune_start + self.prune_span}]"
                             " must end inside the run (< 1)")
        if self.round_to < 1 or self.prune_every < 1:
            raise ValueError("pipeline.round_to and pipeline.prune_every must be >= 1")
        if self.state_dtype == "bf16" and self.ema > 0.9:
            raise ValueError(f"pipeline.state_dtype bf16 needs pipeline.ema <= 0.9, got {self.ema} "
                             "(a bf16 EMA stops moving near its target; use fp32)")
        return self


class KDConfig(Section):
    """Knowledge distillation: loss = (1 - a) * CE + a * T^2 * KL(p_teacher^T || p_student^T)."""

    alpha: float = 0.5
    """Weight a of the KD term, in [0, 1]."""
    alpha_end: float | None = None
    """If set, a moves linearly from alpha to alpha_end over the KD phase."""
    temperature: float = 2.0
    """Softmax temperature T of teacher and student."""
    teacher: str | None = None
    """The teacher: a local HF dir, smollm2-135m, or a Hub id org/name[@revision]; None = the frozen
    enlarged model at prune start."""

    @model_validator(mode="after")
    def _check(self) -> "KDConfig":
        for name in ("alpha", "alpha_end"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"kd.{name} must be in [0, 1], got {value}")
        if self.temperature <= 0:
            raise ValueError(f"kd.temperature must be > 0, got {self.temperature}")
        return self


class CompareConfig(Section):
    """`lmprune compare`: several runs of one config side by side at the same token budget."""

    runs: dict[str, dict[str, Any]] = {"scratch": {"pipeline.name": "scratch"}, "idea": {"pipeline.name": "idea"},
                                       "naive": {"pipeline.name": "naive"},
                                       "oneshot": {"pipeline.name": "oneshot"}}
    """Run name -> `section.key: value` overrides of this config (same data order and seed for all)."""
    init: dict[str, Any] | None = None
    """Overrides of a dense run trained first (DIR/init); every run then starts from its final model
    (model.path): the same starting model for fine-tuning methods such as mgpp / gmp / imp."""
    seeds: list[int] | None = None
    """Run every entry once per seed (train.seed: init and data order); summary.json and the report then
    give the mean and std over seeds. None = one run at train.seed."""
    share_trunks: bool = True
    """Runs identical up to prune start (idea / oneshot / oneshot-restarted; scratch / scratch-restarted)
    branch from one checkpoint of a trunk run instead of each training that prefix again (exact: resume is
    bit-exact)."""
    scratch_equal_compute: bool = True
    """Also train the target model from scratch for the training FLOPs of `compute_reference`."""
    compute_reference: str = "idea"
    """The run whose training FLOPs the equal-compute scratch run matches."""
    infer_batch_size: int = 8
    """Batch of the inference-throughput measurement."""
    infer_seq_len: int = 256
    """Sequence length of the inference-throughput measurement."""

    @model_validator(mode="after")
    def _check(self) -> "CompareConfig":
        if not self.runs:
            raise ValueError("compare.runs is empty")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"compare.seeds must be a non-empty list of distinct seeds, got {self.seeds}")
        for name in self.runs:
            if not name.replace("-", "_").isidentifier():
                raise ValueError(f"compare run name {name!r} must be a plain name (letters, digits, _ and -)")
        if self.scratch_equal_compute and self.compute_reference not in self.runs:
            raise ValueError(f"compare.compute_reference {self.compute_reference!r} is not one of the runs")
        return self


class _RunSections(Section):
    """A training run: data, model, optimisation, and optionally pruning, distillation, comparison."""

    data: DataConfig = DataConfig()
    """The corpus and tokenizer."""
    model: ModelConfig = ModelConfig()
    """The model to train."""
    train: TrainConfig = TrainConfig()
    """The optimisation loop."""
    pipeline: PipelineConfig | None = None
    """Enlarge-and-prune pipeline (IDEA Prune and its baselines); None = train the model as given."""
    kd: KDConfig | None = None
    """Knowledge distillation."""
    compare: CompareConfig | None = None
    """Runs of `lmprune compare`."""
    out_dir: str | None = None
    """Where the run writes (overridden by --out); default runs/<config name>."""


# One optional section per training-time pruning method of the method table (lmprune.pruning.METHODS).
# Cross-section rules (one method at a time, ...) are checked by lmprune.pipelines.validate_run.
RunConfig = create_model(
    "RunConfig", __base__=_RunSections, __module__=__name__,
    **{name: (method.config | None, Field(default=None, description=method.description))
       for name, method in METHODS.items()},
)


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
    return config_from_dict(read_raw_config(path, overrides), source=str(path))


def read_raw_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML mapping of a config file with `--set` overrides applied (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    return apply_overrides(raw, overrides or [])


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
        candidates = [field.annotation, *get_args(field.annotation)]  # Section or Section | None
        listed = [inner for c in candidates if get_origin(c) is list for inner in get_args(c)]  # list[Section]
        section = next((c for c in candidates + listed if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is not None:
            optional = " (optional section)" if field.default is None else ""
            optional = " (optional list of:)" if listed else optional
            lines.append(f"{prefix}{name}:{optional}  {' '.join((field.description or '').split())}")
            lines += describe_fields(section, prefix + "  ")
        else:
            default = "(required)" if field.is_required() else repr(field.default)
            lines.append(f"{prefix}{name} = {default}  # {' '.join((field.description or '').split())}")
    return lines
