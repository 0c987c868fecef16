"""One-shot pruning of a pretrained model end to end: source -> calibration data -> measure -> prune -> measure -> save.

`prune_pretrained(PruneRequest(...))` is what `lmprune prune` runs. The model is a local HF causal-LM
dir or a built-in name (`lmprune.sources`); the calibration data a prepared corpus or a raw source that
is prepared with the model's tokenizer. Every field, the model dir, the data and the requested shape
are checked before any calibration or evaluation; the output dir is written atomically (model +
tokenizer + prune_report.json, the report last). The pieces (`calibration_batches`, `measure`,
`save_pruned`, ...) are public for scripts that prune one model several ways.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from lmprune.atomic import atomic_dir, write_json
from lmprune.data import PreparedData, ensure_prepared, load_hf_tokenizer
from lmprune.loader import val_batches
from lmprune.errors import UserError
from lmprune.evaluate import evaluate_loss, forward_throughput
from lmprune.models import check_model_dir, load_hf_model
from lmprune.pruning.pretrained.offload import OffloadedLayers, check_safetensors_dir, load_offloaded
from lmprune.pruning.pretrained.oneshot import (
    FFN_CRITERIA,
    PrunePlan,
    default_reconstruct,
    plan_pruning,
    prune_model,
    solve_for_target_params,
)
from lmprune.pruning.pretrained.reconstruct import DEFAULT_DAMP, check_damp, check_refit_tokens
from lmprune.pruning.surgery import FAMILIES, count_parameters
from lmprune.sources import DTYPES, resolve_model
from lmprune.sharding import join_torchrun

REPORT_FILE = "prune_report.json"
DEFAULT_CALIB_SEQ_LEN = 256  # capped by the model's max positions; never the max positions by default
DEFAULT_EVAL_SEQ_LEN = 512  # the same default as `lmprune eval`, so the numbers agree
THROUGHPUT_BATCH, THROUGHPUT_SEQ_LEN = 4, 256  # fixed shape of the tok/s measurement (seq capped by max positions)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class PruneRequest:
    """One `lmprune prune` run; the cheap checks run on construction (UserError naming the CLI flag)."""

    model: str  # local HF causal-LM dir or built-in name
    calib: str  # prepared dir, or a raw source prepared with the model's tokenizer
    out: str  # output HF dir
    criterion: str  # a key of oneshot.FFN_CRITERIA (it ranks heads too)
    ffn_ratio: float = 0.0  # fraction of FFN neurons removed per layer, [0, 1)
    heads_ratio: float = 0.0  # fraction of heads removed per layer, as whole GQA groups, [0, 1)
    drop_layers: int = 0  # decoder layers removed (lowest block importance)
    target_params: int | None = None  # solve the FFN width for <= this many params (instead of ffn_ratio)
    calib_samples: int = 32  # calibration windows drawn from the train split
    calib_seq_len: int | None = None  # tokens per window; None: DEFAULT_CALIB_SEQ_LEN capped by max positions
    batch_size: int = 4  # windows per forward pass, calibration and evaluation
    round_to: int = 8  # kept FFN width is a multiple of this
    dtype: str = "fp32"  # weights dtype for loading, pruning, evaluating and saving
    max_eval_tokens: int = 16384  # val tokens scored for perplexity, before and after
    seed: int = 0  # seed of the calibration window choice
    device: str = "cpu"  # compute device of calibration, refit and evaluation
    overwrite: bool = False  # replace an earlier prune output in `out`
    sequential: bool = True  # layer l calibrated on the outputs of layers 0..l-1 already pruned
    reconstruct: bool | None = None  # least-squares refit of down_proj / o_proj; None: on unless magnitude
    damp: float = DEFAULT_DAMP  # the refit's ridge term, x mean(diag G)
    offload: bool = False  # one layer at a time from the safetensors files; only pruned layers stay in memory

    def __post_init__(self) -> None:
        if self.criterion not in FFN_CRITERIA:
            raise UserError(f"--criterion must be one of {', '.join(sorted(FFN_CRITERIA))}; got {self.criterion!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(sorted(DTYPES))}; got {self.dtype!r}")
        for flag, value in (("--ffn-ratio", self.ffn_ratio), ("--heads-ratio", self.heads_ratio)):
            if not math.isfinite(value) or not 0.0 <= value < 1.0:
                raise UserError(f"{flag} must be in [0, 1); got {value}")
        for flag, value, low in (("--drop-layers", self.drop_layers, 0), ("--calib-samples", self.calib_samples, 1),
                                 ("--batch-size", self.batch_size, 1), ("--round-to", self.round_to, 1),
                                 ("--max-eval-tokens", self.max_eval_tokens, 1)):
            if value < low:
                raise UserError(f"{flag} must be >= {low}; got {value}")
        if self.calib_seq_len is not None and self.calib_seq_len < 2:
            raise UserError(f"--calib-seq-len must be >= 2; got {self.calib_seq_len}")
        if self.target_params is not None:
            if self.target_params < 1:
                raise UserError(f"--target-params must be >= 1; got {self.target_params}")
            if self.ffn_ratio != 0.0:
                raise UserError("give either --ffn-ratio or --target-params, not both")
        elif self.ffn_ratio == 0.0 and self.heads_ratio == 0.0 and self.drop_layers == 0:
            raise UserError("nothing to prune: give --ffn-ratio, --heads-ratio, --drop-layers or --target-params")
        check_damp(self.damp)
        if self.offload and not self.sequential:
            raise UserError("--offload loads one layer at a time and needs --sequential")
        if self.offload and self.criterion == "taylor":
            raise UserError("--criterion taylor needs the whole model for its backward pass; it cannot run with "
                            "--offload (use activation, flap, wanda-sp or magnitude)")

    @property
    def refit(self) -> bool:
        return default_reconstruct(self.criterion) if self.reconstruct is None else self.reconstruct


def prune_pretrained(request: PruneRequest, progress: bool = True) -> dict[str, Any]:
    """Prune, measure before/after, save to request.out; returns the report (also saved as prune_report.json).

    The report holds params, val loss/ppl and forward tok/s `_before` / `_after`, the kept shape
    (ffn_width, num_heads, num_kv_heads, num_layers) and everything `oneshot.prune_model` reports."""
    out_dir = Path(request.out).expanduser().absolute()
    check_out_dir(out_dir, request.overwrite)
    model_dir = resolve_model(request.model, request.dtype)
    if model_dir.absolute() == out_dir:
        raise UserError(f"--out {out_dir} is the model dir itself; choose another output dir")
    config = check_model_dir(model_dir)
    _check_family(model_dir, config)
    if request.offload:
        check_safetensors_dir(model_dir)
    data = open_calibration_data(request.calib, model_dir)
    _check_vocab(data, config, request.calib, model_dir)
    max_positions = int(config.get("max_position_embeddings") or DEFAULT_EVAL_SEQ_LEN)
    calib_seq_len = _calib_seq_len(request.calib_seq_len, max_positions)
    eval_seq_len = min(DEFAULT_EVAL_SEQ_LEN, max_positions)
    starts = calibration_window_starts(data.train, request.calib_samples, calib_seq_len, request.seed, request.calib)
    val_batches(data.val, request.batch_size, eval_seq_len, request.max_eval_tokens)  # raises now if val is too short

    device = torch.device(request.device)
    free_large_blocks_to_os()
    model, source = load_for_pruning(model_dir, request, device)
    plan = _plan(model, request)  # validates the ratios / target against this model before any heavy work
    if request.refit:
        _check_refit_tokens(plan, request.calib_samples * calib_seq_len)
    tokenizer = output_tokenizer(model_dir, data)

    measure_args = (data.val, request.batch_size, eval_seq_len, request.max_eval_tokens, device, request.dtype,
                    progress)
    # with --offload the unpruned model is never whole in memory, so it is not measured
    before = dict.fromkeys(_MEASURED) if request.offload else measure(model, *measure_args)
    rank, world = join_torchrun(device)  # under torchrun: each rank calibrates on its share, sums all-reduced
    t0 = time.perf_counter()
    batches = calibration_batches(data.train, starts, calib_seq_len, request.batch_size)[rank::world]
    pruned = prune_model(model, batches,
                         request.criterion, ffn_ratio=request.ffn_ratio, heads_ratio=request.heads_ratio,
                         drop_layers=request.drop_layers, target_params=request.target_params,
                         round_to=request.round_to, sequential=request.sequential, reconstruct=request.reconstruct,
                         damp=request.damp, layer_source=source)
    prune_seconds = time.perf_counter() - t0
    peak_rss_prune = peak_rss_bytes()
    model = model.to(device)
    after = measure(model, *measure_args)

    report = {
        "model": request.model, "model_dir": str(model_dir), "calib": request.calib, "data_dir": str(data.path),
        **pruned,
        "ffn_width": pruned["ffn_width_after"], "num_heads": pruned["num_heads_after"],
        "num_kv_heads": pruned["num_kv_heads_after"], "num_layers": pruned["num_layers_after"],
        **{f"{key}_before": value for key, value in before.items()},
        **{f"{key}_after": value for key, value in after.items()},
        "calib_samples": request.calib_samples, "calib_seq_len": calib_seq_len, "seed": request.seed,
        "eval_seq_len": eval_seq_len, "max_eval_tokens": request.max_eval_tokens, "batch_size": request.batch_size,
        "throughput_shape": [THROUGHPUT_BATCH, min(THROUGHPUT_SEQ_LEN, eval_seq_len)],
        "dtype": request.dtype, "device": request.device, "offload": request.offload,
        "prune_seconds": prune_seconds, "peak_rss_prune_bytes": peak_rss_prune, "peak_rss_bytes": peak_rss_bytes(),
        "model_fp32_bytes": 4 * pruned["params_before"], "out": str(out_dir),
    }
    if rank == 0:
        save_pruned(model, tokenizer, out_dir, report, request.overwrite)
    if world > 1:
        torch.distributed.barrier()
    return report


_MEASURED = ("params", "loss", "ppl", "eval_tokens", "tok_per_s")  # the keys `measure` returns


def free_large_blocks_to_os(threshold: int = 128 * 1024) -> bool:
    """Serve allocations >= threshold bytes by mmap, so that freeing them returns the memory (glibc only).

    Pruning loads, slices and frees many tensors of a few MB to tens of MB (one layer's weights, its
    calibration statistics). glibc raises its mmap threshold each time such a block is freed (up to
    32 MB), so the later ones come from the heap, whose freed middle is not given back: measured on
    SmolLM2 with --offload, the peak RSS while pruning fell from 0.99 to 0.90 GiB with a fixed threshold.
    Returns False where there is no glibc `mallopt` (macOS, musl): nothing changes there."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD; a fixed value turns the adjusting off
    except (OSError, AttributeError):
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_for_pruning(model_dir: Path, request: PruneRequest,
                     device: torch.device) -> tuple[torch.nn.Module, OffloadedLayers | None]:
    """The whole model on `device`, or with --offload a skeleton whose layers load one at a time."""
    if request.offload:
        model, weights = load_offloaded(model_dir, DTYPES[request.dtype])
        return model, OffloadedLayers(model, weights, device, DTYPES[request.dtype])
    with _quiet_transformers_progress():
        return load_hf_model(model_dir, DTYPES[request.dtype]).to(device), None


def _check_refit_tokens(plan: PrunePlan, tokens: int) -> None:
    if plan.prunes_ffn:
        check_refit_tokens(tokens, plan.ffn_width, "FFN neurons")
    if plan.prunes_heads:
        check_refit_tokens(tokens, plan.num_heads * plan.head_dim, "attention channels (o_proj inputs)")


# ---------------------------------------------------------------- checks (all before heavy work)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """UserError unless out_dir is absent, empty, or (with overwrite) an earlier prune output."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / REPORT_FILE).is_file():
        raise UserError(f"--out {out_dir} is not empty and holds no earlier prune output ({REPORT_FILE}); "
                        "choose another directory")
    if not overwrite:
        raise UserError(f"--out {out_dir} already holds a pruned model; pass --overwrite to replace it")


def _check_family(model_dir: Path, config: dict) -> None:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"{model_dir} is a {model_type!r} model; one-shot pruning supports the Llama family "
                        f"(model_type {', '.join(sorted(FAMILIES))})")


def _check_vocab(data: PreparedData, config: dict, calib: str, model_dir: Path) -> None:
    model_vocab = int(config.get("vocab_size") or 0)
    if data.vocab_size > model_vocab:
        raise UserError(f"the calibration data's tokenizer has {data.vocab_size} tokens but the model's vocab is "
                        f"{model_vocab}: {calib} was not tokenized for {model_dir} "
                        f"(run `lmprune prepare --tokenizer {model_dir}`)")


def _calib_seq_len(requested: int | None, max_positions: int) -> int:
    if requested is None:
        return min(DEFAULT_CALIB_SEQ_LEN, max_positions)
    if requested > max_positions:
        raise UserError(f"--calib-seq-len {requested} exceeds the model's max_position_embeddings {max_positions}")
    return requested


def _plan(model: torch.nn.Module, request: PruneRequest) -> PrunePlan:
    compensate = request.criterion == "flap"  # as prune_model does with its default bias_compensation=True
    if request.target_params is not None:
        return solve_for_target_params(model, request.target_params, request.heads_ratio, request.drop_layers,
                                       request.round_to, compensate)
    return plan_pruning(model, request.ffn_ratio, request.heads_ratio, request.drop_layers, request.round_to,
                        compensate)


# ---------------------------------------------------------------- data


def open_calibration_data(calib: str, model_dir: Path) -> PreparedData:
    """A prepared dir as-is; anything else is a raw source, prepared (and cached) with the model's tokenizer."""
    path = Path(calib).expanduser()
    if path.is_dir() and (path / "meta.json").is_file():
        return PreparedData.open(path)
    return PreparedData.open(ensure_prepared(calib, tokenizer=model_dir))


def calibration_window_starts(tokens: np.ndarray, samples: int, seq_len: int, seed: int, name: str) -> np.ndarray:
    """Start offsets of `samples` distinct, non-overlapping windows of the train split, seeded, in order."""
    available = len(tokens) // seq_len
    if available < samples:
        raise UserError(f"calibration data {name} has {available} windows of {seq_len} tokens in its train split "
                        f"({len(tokens):,} tokens); --calib-samples {samples} asked for more "
                        "(lower --calib-samples or --calib-seq-len)")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:samples].sort().values.numpy()
    return chosen.astype(np.int64) * seq_len


def calibration_batches(tokens: np.ndarray, starts: np.ndarray, seq_len: int,
                        batch_size: int) -> list[torch.Tensor]:
    """LongTensor [<= batch_size, seq_len] batches of the chosen windows (ids only: samples x seq_len x 8 bytes)."""
    batches = []
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        rows = np.asarray(tokens[chunk[:, None] + np.arange(seq_len)], dtype=np.int64)  # [b, seq_len]
        batches.append(torch.from_numpy(rows))
    return batches


# ---------------------------------------------------------------- measure and save


def measure(model: torch.nn.Module, val_tokens: np.ndarray, batch_size: int, eval_seq_len: int,
            max_eval_tokens: int, device: torch.device, dtype: str = "fp32", progress: bool = False) -> dict[str, Any]:
    """params, val loss/ppl over the first max_eval_tokens, and forward tok/s at the fixed throughput shape."""
    loss, tokens, _ = evaluate_loss(model, val_tokens, batch_size, eval_seq_len, max_eval_tokens, device, dtype,
                                    progress=progress)
    seq_len = min(THROUGHPUT_SEQ_LEN, eval_seq_len)
    tok_per_s = forward_throughput(model, model.config.vocab_size, THROUGHPUT_BATCH, seq_len, device,
                                   repeats=3, dtype=dtype)
    return {"params": count_parameters(model), "loss": loss, "ppl": math.exp(loss), "eval_tokens": tokens,
            "tok_per_s": tok_per_s}


@contextlib.contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """No "Loading weights" bar: a bad request found right after loading then prints one line only."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def output_tokenizer(model_dir: Path, data: PreparedData) -> PreTrainedTokenizerBase:
    """The model dir's own tokenizer when it has one, else the one the calibration data was tokenized with."""
    if any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        return load_hf_tokenizer(model_dir)
    return data.load_tokenizer()


def save_pruned(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path, report: dict[str, Any],
                overwrite: bool) -> None:
    """Write model + tokenizer + prune_report.json (last) to a staging dir, then rename it to out_dir."""
    check_out_dir(out_dir, overwrite)  # again: the dir may have changed during a long run
    # replace: check_out_dir allowed only an empty dir or (with overwrite) an earlier prune output
    with atomic_dir(out_dir, replace=True) as staging:
        os.chmod(staging, 0o755)  # an ordinary model dir, whatever the umask (as before)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(staging / REPORT_FILE, report, sort_keys=False)  # last
