"""The training loop: one function, read top to bottom.

Pruning methods, distillation and regularisers enter at two fixed, named points of the step:
  after_backward(...)        gradients are present (all-reduced under DDP), before clipping
  after_optimizer_step(...)  weights were updated; may return a rebuilt optimizer (compaction)
They are plain objects passed in; the loop has no event system.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from lmprune import checkpoint as ckpt
from lmprune.config import RunConfig
from lmprune.data import PreparedData, ensure_prepared
from lmprune.loader import TokenLoader
from lmprune.errors import UserError
from lmprune.evaluate import evaluate_loss
from lmprune.distill import Distiller
from lmprune.models import (build_model, count_params, forward_flops_per_token, generate_sample, llama_config,
                            load_hf_model)
from lmprune.optim import build_optimizer, set_lr
from lmprune.pipelines import Plan, resolve_plan
from lmprune.pruning.iterative import IMPPruner
from lmprune.pruning.masks import DEFAULT_PATTERNS, prunable_parameters, zero_fraction
from lmprune.pruning.sparse_export import file_sizes, save_compact
from lmprune.pruning.structured import FFNPruner
from lmprune.pruning.unstructured import GMPPruner, MGPPPruner
from lmprune.report import plot_training, write_sparsity_curve
from lmprune.sources import resolve_model

# Config fields that may differ between a run and its resumption (they change no numbers).
RESUME_FREE_KEYS = {("train", "save_every"), ("train", "log_every"), ("train", "eval_every"),
                    ("train", "keep_last"), ("train", "sample_tokens"), ("out_dir",)}


class TrainingHook(Protocol):
    """What a pruning method / regulariser provides to the loop (see pruning/)."""

    def apply(self, model: torch.nn.Module) -> None: ...
    def after_backward(self, model: torch.nn.Module, step: int) -> None: ...
    def after_optimizer_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             step: int) -> torch.optim.Optimizer: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def metrics(self) -> dict[str, Any]: ...


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path
    val_loss: float
    val_ppl: float
    train_tok_per_s: float
    params: int
    steps: int
    tokens: int
    sample: str = ""
    is_main: bool = True


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on GPU."""
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist()
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        info = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def check_out_dir(out_dir: Path, run_config: dict, resume: bool) -> None:
    """Refuse an output dir that holds another run (or this one, without --resume)."""
    saved = out_dir / "run_config.json"
    if not saved.is_file():
        if out_dir.is_dir() and any(p.name in {"metrics.jsonl", "checkpoints", "final"} for p in out_dir.iterdir()):
            raise UserError(f"{out_dir} holds files of another run (no run_config.json); choose another --out")
        return
    if not resume:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    previous = json.loads(saved.read_text())
    for section, values in run_config.items():
        if not isinstance(values, dict):
            if (section,) not in RESUME_FREE_KEYS and previous.get(section) != values:
                raise UserError(f"{out_dir} holds another run ({section} differs); choose another --out")
            continue
        for key, value in values.items():
            if (section, key) not in RESUME_FREE_KEYS and previous.get(section, {}).get(key) != value:
                raise UserError(f"{out_dir} holds another run ({section}.{key}: {previous.get(section, {}).get(key)!r}"
                                f" there, {value!r} now); choose another --out")


def prepare_data(cfg: RunConfig, info: Dist) -> PreparedData:
    """Prepare (or reuse from the cache) the corpus named in the config; rank 0 does the work."""
    data_cfg = cfg.data
    if data_cfg.prepared_dir:
        return PreparedData.open(data_cfg.prepared_dir)
    tokenizer = data_cfg.tokenizer or (str(resolve_model(cfg.model.path)) if cfg.model.path else None)
    kwargs = dict(source=data_cfg.source, vocab_size=None if tokenizer else data_cfg.vocab_size,
                  tokenizer=tokenizer, val_fraction=data_cfg.val_fraction, seed=data_cfg.seed)
    if info.is_main:
        path = ensure_prepared(**kwargs)
    info.barrier()
    if not info.is_main:
        path = ensure_prepared(**kwargs)
    return PreparedData.open(path)


def make_model(cfg: RunConfig, plan: Plan, data: PreparedData, resume_from: Path | None) -> torch.nn.Module:
    """The model to train: from a checkpoint's HF config, a local HF dir, or a preset (at the plan's width)."""
    if resume_from is not None:
        # The checkpoint's own HF config: after compaction the shapes differ from the config's.
        saved = dict(ckpt.load_checkpoint_meta(resume_from)["model_config"])
        if "auto_map" in saved:
            raise UserError(f"checkpoint {resume_from}: model_config.json asks for remote code (auto_map)")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(saved.pop("model_type"), **saved),
                                                 trust_remote_code=False)
        ckpt.load_model_weights(resume_from, model)
        return model.float()
    if cfg.model.path:
        model = load_hf_model(resolve_model(cfg.model.path)).float()
    else:
        model_cfg = cfg.model.model_copy(update={"intermediate_size": plan.initial_width})
        model = build_model(llama_config(model_cfg, data.vocab_size, cfg.train.seq_len, data.eos_token_id),
                            cfg.train.seed)
    if data.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer vocab ({data.vocab_size}) is larger than the model's vocab "
                        f"({model.config.vocab_size}): the data was tokenized for another model")
    if cfg.train.seq_len > model.config.max_position_embeddings:
        raise UserError(f"train.seq_len {cfg.train.seq_len} exceeds the model's max_position_embeddings "
                        f"{model.config.max_position_embeddings}")
    return model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits [B, T, V] -> mean next-token cross entropy in fp32
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


class MetricsLog:
    """Appends one JSON object per logged step to OUT/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            # Rows past the checkpoint we resume from were written by the run that died: drop them.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def export_final(model: torch.nn.Module, data: PreparedData, final_dir: Path, sparse: bool = False,
                 patterns: list[str] | None = None) -> None:
    """OUT/final: a HF dir (config, safetensors, tokenizer) that loads with no lmprune import.

    With `sparse`, OUT/final-sparse holds the same model as bitmask + nonzero values
    (model.sparse.safetensors, which `lmprune eval` and `load_hf_model` read back bit-exactly).
    """
    targets = [(final_dir, False)] + ([(final_dir.with_name(final_dir.name + "-sparse"), True)] if sparse else [])
    for target, compact in targets:
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        if compact:
            tmp.mkdir()
            model.config.save_pretrained(tmp)
            save_compact(model, tmp, patterns or DEFAULT_PATTERNS)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        data.load_tokenizer().save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)


def make_hook(cfg: RunConfig, plan: Plan, data: PreparedData) -> TrainingHook | None:
    """The training-time pruning method the config names (at most one; the config checks that)."""
    if plan.prune is not None:
        return FFNPruner(plan.prune, make_optimizer=lambda model: build_optimizer(model, cfg.train))
    if cfg.mgpp is not None:
        n_train = cfg.mgpp.n_train or max(1, len(data.train) // cfg.train.seq_len)
        return MGPPPruner(cfg.mgpp.model_copy(update={"n_train": n_train}))
    if cfg.gmp is not None:
        return GMPPruner(cfg.gmp)
    if cfg.imp is not None:
        return IMPPruner(cfg.imp)
    return None


def make_distiller(cfg: RunConfig, plan: Plan, out_dir: Path, start_step: int, device: torch.device,
                   model: torch.nn.Module) -> Distiller | None:
    """The KD teacher: a HF dir, or (on resume past prune start) the snapshot saved at prune start."""
    if plan.kd_start is None:
        return None
    distiller = Distiller(cfg.kd, plan.kd_start, cfg.train.steps, cfg.train.dtype)
    if cfg.kd.teacher is not None:
        distiller.load_teacher(resolve_model(cfg.kd.teacher), device)
        if distiller.teacher.config.vocab_size < model.config.vocab_size:
            raise UserError(f"kd.teacher vocab ({distiller.teacher.config.vocab_size}) is smaller than the "
                            f"student's ({model.config.vocab_size})")
    elif start_step > plan.kd_start:
        saved = out_dir / "teacher"
        if not saved.is_dir():
            raise UserError(f"{saved} is missing: the teacher snapshot of this run cannot be restored")
        distiller.load_teacher(saved, device)
    return distiller


def train(cfg: RunConfig, out_dir: Path, resume: bool = False, hook: TrainingHook | None = None,
          quiet: bool = False) -> TrainResult:
    """Run (or resume) training as configured; returns the final evaluation.

    `hook` injects a training-time method (e.g. a pruner) in place of the one the config implies.
    """
    tcfg = cfg.train
    run_config = cfg.model_dump(mode="json")
    info, device = init_distributed(tcfg.device)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    check_out_dir(out_dir, run_config, resume)
    plan = resolve_plan(cfg)
    ckpt_root = out_dir / "checkpoints"
    resume_from = ckpt.latest_checkpoint(ckpt_root) if resume else None
    if resume and resume_from is None and any(ckpt_root.glob("step-*")):
        broken = sorted(p.name for p in ckpt_root.glob("step-*"))
        raise UserError(f"no complete checkpoint to resume from in {ckpt_root} ({', '.join(broken)}: "
                        f"{ckpt.checkpoint_problem(ckpt_root / broken[-1])})")

    # ---- everything that can fail on user input happens before the first step --------------
    data = prepare_data(cfg, info)
    configured_hook = make_hook(cfg, plan, data)
    if hook is not None and configured_hook is not None:
        raise UserError("the config already names a pruning method; no second training hook can be added")
    hook = hook or configured_hook
    model = make_model(cfg, plan, data, resume_from).to(device)
    loader = TokenLoader(data.train, tcfg.batch_size, tcfg.seq_len, tcfg.seed, info.rank, info.world_size)
    optimizer = build_optimizer(model, tcfg)
    start_step, tokens_seen, train_flops = 0, 0, 0.0
    if hook is not None:
        hook.apply(model)
    if resume_from is not None:
        meta = ckpt.load_checkpoint_meta(resume_from)
        state = meta["trainer_state"]
        ckpt.load_optimizer_state(resume_from, optimizer, meta["optimizer"])
        hook_state = ckpt.load_extra(resume_from, state)
        if hook is not None and hook_state is not None:
            hook.load_state_dict(hook_state)
        loader.load_state_dict(state["loader"])
        start_step, tokens_seen, train_flops = state["step"], state["tokens"], state["train_flops"]
    distiller = make_distiller(cfg, plan, out_dir, start_step, device, model)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out_dir / "run_config.json", run_config)
    info.barrier()

    raw_model = model
    model = wrap_ddp(raw_model, info, device)
    forward = torch.compile(model) if tcfg.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.dtype == "bf16")
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum * info.world_size
    metrics = MetricsLog(out_dir / "metrics.jsonl", info.is_main, start_step)
    progress = tqdm(total=tcfg.steps, initial=start_step, disable=quiet or not info.is_main,
                    desc="train", unit="step", dynamic_ncols=True)
    tok_per_s_sum, timed_steps = 0.0, 0
    if start_step == 0 and getattr(hook, "evaluate_before_training", False):
        val_loss, _, _ = evaluate_loss(raw_model, data.val, tcfg.batch_size, tcfg.seq_len, tcfg.eval_tokens,
                                       device, tcfg.dtype, info.rank, info.world_size)
        metrics.write({"step": 0, "tokens": 0, "val_loss": round(val_loss, 6), "val_ppl": round(math.exp(val_loss), 4),
                       **hook.metrics()})
    step_flops = step_flops_of(raw_model, distiller, tcfg.seq_len, tokens_per_step)

    for step in range(start_step, tcfg.steps):
        t0 = time.perf_counter()
        lr = plan.lr_at(step, tcfg.lr, tcfg.lr_end, tcfg.warmup)
        set_lr(optimizer, lr)
        model.train()
        if distiller is not None and distiller.teacher is None and step == plan.kd_start:
            # KD teacher = the enlarged model as it is when pruning starts
            distiller.snapshot_teacher(raw_model, out_dir / "teacher" if info.is_main else None)
            step_flops = step_flops_of(raw_model, distiller, tcfg.seq_len, tokens_per_step)

        # ---- single training step: forward/backward over the micro-batches ----------------
        loss_sum = torch.zeros((), device=device)
        for micro in range(tcfg.grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == tcfg.grad_accum - 1
            with (model.no_sync() if info.world_size > 1 and not sync else nullcontext()), autocast:
                logits = forward(input_ids=x).logits
                loss = lm_loss(logits, y)
                if distiller is not None:
                    loss = distiller.mix_loss(loss, logits, x, step)
                (loss / tcfg.grad_accum).backward()
            loss_sum += loss.detach()
        if hook is not None:
            hook.after_backward(raw_model, step)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        train_flops += step_flops
        if hook is not None:
            new_optimizer = hook.after_optimizer_step(raw_model, optimizer, step)
            if new_optimizer is not optimizer:  # compaction rebuilt the parameters: re-wrap
                optimizer = new_optimizer
                model = wrap_ddp(raw_model, info, device)
                forward = torch.compile(model) if tcfg.compile else model
                step_flops = step_flops_of(raw_model, distiller, tcfg.seq_len, tokens_per_step)
        train_loss = (loss_sum / tcfg.grad_accum).item()  # the .item() syncs, so the timing is honest
        step_seconds = time.perf_counter() - t0
        if step > start_step:  # the first step carries warm-up costs
            tok_per_s_sum += tokens_per_step / step_seconds
            timed_steps += 1
        if not math.isfinite(train_loss):
            raise RuntimeError(f"loss became {train_loss} at step {step}; lower train.lr")

        done = step + 1
        hook_metrics = hook.metrics() if hook is not None else {}
        row = None
        if done % tcfg.log_every == 0 or done == tcfg.steps or hook_metrics.get("mask_update"):
            row = {"step": done, "tokens": tokens_seen, "loss": round(train_loss, 6), "lr": lr,
                   "grad_norm": round(float(grad_norm), 6), "tok_per_s": round(tokens_per_step / step_seconds, 1)}
            row.update(hook_metrics)
            if distiller is not None:
                row.update(distiller.metrics(step))
        if (tcfg.eval_every and done % tcfg.eval_every == 0) or done == tcfg.steps or hook_metrics.get("evaluate"):
            val_loss, _, _ = evaluate_loss(raw_model, data.val, tcfg.batch_size, tcfg.seq_len, tcfg.eval_tokens,
                                           device, tcfg.dtype, info.rank, info.world_size)
            row = row or {"step": done, "tokens": tokens_seen, "loss": round(train_loss, 6), "lr": lr, **hook_metrics}
            row["val_loss"] = round(val_loss, 6)
            row["val_ppl"] = round(math.exp(val_loss), 4)
        if row is not None:
            metrics.write(row)
        progress.update(1)
        progress.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
        if (tcfg.save_every and done % tcfg.save_every == 0) or done == tcfg.steps:
            trainer_state = {"step": done, "tokens": tokens_seen, "train_flops": train_flops,
                             "loader": loader.state_dict(), "world_size": info.world_size}
            save(ckpt_root, done, raw_model, optimizer, trainer_state, run_config, hook, tcfg.keep_last, info)
    progress.close()

    # ---- final evaluation and export ------------------------------------------------------
    val_loss, _, _ = evaluate_loss(raw_model, data.val, tcfg.batch_size, tcfg.seq_len, tcfg.eval_tokens,
                                   device, tcfg.dtype, info.rank, info.world_size)
    fingerprints = rank_fingerprints(raw_model, info)
    if len(set(fingerprints)) > 1:
        raise RuntimeError(f"ranks ended with different weights: {fingerprints}")
    result = TrainResult(out_dir, out_dir / "final", val_loss, math.exp(val_loss),
                         tok_per_s_sum / max(1, timed_steps), count_params(raw_model), tcfg.steps, tokens_seen,
                         is_main=info.is_main)
    if info.is_main:
        patterns = getattr(getattr(hook, "cfg", None), "patterns", None)
        export_final(raw_model, data, result.final_dir, tcfg.export_sparse, patterns)
        plot_training(out_dir / "metrics.jsonl", out_dir / "training.png")
        if isinstance(hook, IMPPruner):
            write_sparsity_curve(out_dir)
        if tcfg.sample_tokens:
            prompt = data.load_tokenizer().decode(data.val[:8].tolist())
            result.sample = generate_sample(raw_model.eval(), data.load_tokenizer(), prompt, tcfg.sample_tokens)
        summary = {"val_loss": val_loss, "val_ppl": result.val_ppl, "train_tok_per_s": result.train_tok_per_s,
                   "params": result.params, "ffn_width": raw_model.config.intermediate_size,
                   "steps": tcfg.steps, "tokens": tokens_seen, "train_flops": train_flops,
                   "sparsity": zero_fraction(prunable_parameters(raw_model, patterns or DEFAULT_PATTERNS)),
                   "final_bytes": sum(file_sizes(result.final_dir).values()),
                   "rank_fingerprints": fingerprints}
        if tcfg.export_sparse:
            summary["final_sparse_bytes"] = sum(file_sizes(out_dir / "final-sparse").values())
        ckpt.write_json(out_dir / "summary.json", summary)
    info.barrier()
    return result


def step_flops_of(model: torch.nn.Module, distiller: Distiller | None, seq_len: int, tokens: int) -> float:
    """Training FLOPs of one step: 3x the student's forward, plus the teacher's forward under KD."""
    flops = 3 * forward_flops_per_token(model, seq_len)
    if distiller is not None and distiller.teacher is not None:
        flops += forward_flops_per_token(distiller.teacher, seq_len)
    return flops * tokens


def save(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict, run_config: dict, hook: TrainingHook | None, keep_last: int, info: Dist) -> None:
    if info.is_main:
        ckpt.save_checkpoint(ckpt_root, step, model, optimizer, trainer_state, run_config,
                             hook.state_dict() if hook is not None else None, keep_last)
    info.barrier()


def rank_fingerprints(model: torch.nn.Module, info: Dist) -> list[str]:
    """A hash of every rank's weights (DDP must leave all ranks identical; this checks it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    mine = torch.tensor([int.from_bytes(digest.digest()[:7], "big")], dtype=torch.int64)
    if info.world_size == 1:
        return [f"{mine.item():014x}"]
    device = next(model.parameters()).device
    gathered = [torch.zeros_like(mine, device=device) for _ in range(info.world_size)]
    dist.all_gather(gathered, mine.to(device))
    return [f"{t.item():014x}" for t in gathered]


def wrap_ddp(model: torch.nn.Module, info: Dist, device: torch.device) -> torch.nn.Module:
    if info.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def print_result(result: TrainResult, stream=None) -> None:
    stream = stream or sys.stdout
    print(f"val loss {result.val_loss:.4f}  val ppl {result.val_ppl:.2f}  "
          f"train {result.train_tok_per_s:,.0f} tok/s  params {result.params:,}  -> {result.final_dir}", file=stream)
    if result.sample:
        print(f"sample: {result.sample!r}", file=stream)
