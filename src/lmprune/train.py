"""The training loop: `train()` = `setup_run` / `fit` / `finish`, read top to bottom.

Every step is `lmprune.step.train_step`, which makes the pruning method's calls at fixed places
(`lmprune.pruning.hooks`). The loop only decides, per completed step, what to log, evaluate and
save: periodic blocks guarded by `last_step or done % every == 0`, plus the plan's extra evaluations
and a row at every mask update. The trainer names no pruning method: it builds the one the plan
names from `lmprune.pruning.METHODS`.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from lmprune import checkpoint as ckpt
from lmprune import sharded_checkpoint as sharded_ckpt
from lmprune import sharding
from lmprune.atomic import write_json
from lmprune.config import RunConfig
from lmprune.data import PreparedData, ensure_prepared
from lmprune.distill import Distiller
from lmprune.errors import Interrupted, NonFiniteError, UserError
from lmprune.evaluate import evaluate_loss, evaluate_windows
from lmprune.loader import TokenLoader
from lmprune.mixture import Mixture, per_source_fields, prepare_mixture, weighted_val_loss
from lmprune.models import build_model, generate_sample, llama_config, load_hf_model
from lmprune.optim import build_optimizer
from lmprune.pipelines import Plan, validate_run
from lmprune.pruning import METHODS, BuildContext, StepEvents, TrainingHook
from lmprune.pruning.sparse.export import file_sizes
from lmprune.pruning.sparse.masks import DEFAULT_PATTERNS, prunable_parameters, zero_fraction
from lmprune.pruning.surgery import count_parameters
from lmprune.report import plot_training
from lmprune.run_dir import MetricsLog, RunLock, check_out_dir, clean_leftovers, export_final
from lmprune.signals import StopRequests
from lmprune.sources import resolve_model
from lmprune.step import Dist, Trainer, TrainState, train_step

__all__ = ["TrainResult", "Run", "finish", "fit", "print_result", "setup_run", "train", "train_step", "train_until"]


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
    source_val_ppl: dict[str, float] = field(default_factory=dict)
    """data.sources: val ppl per source (val_ppl is exp of their weighted mean loss)."""


@dataclass
class Run:
    """A set-up run: the step's inputs, where it stands, and where it writes."""

    cfg: RunConfig
    trainer: Trainer
    state: TrainState
    data: PreparedData
    """The training data; with data.sources, the first source (it holds the mixture's shared tokenizer)."""
    out_dir: Path
    metrics: MetricsLog
    run_config: dict
    lock: RunLock
    """Held (by rank 0) for the life of the run."""
    mixture: Mixture | None = None
    """data.sources: every source, evaluated one by one."""
    source_val_losses: dict[str, float] = field(default_factory=dict)
    """The last evaluation's val loss per mixture source (empty without data.sources)."""
    retention: torch.Tensor | None = None
    """The retention probe's windows (int64 [n, seq_len + 1]), all trained on before prune start only."""


def train(cfg: RunConfig, out_dir: Path, resume: bool = False, quiet: bool = False) -> TrainResult:
    """Run (or resume) training as configured; returns the final evaluation."""
    run = setup_run(cfg, out_dir, resume, quiet=quiet)
    try:
        final_val_loss = fit(run, quiet)
        return finish(run, final_val_loss)
    finally:
        run.lock.release()


def train_until(cfg: RunConfig, out_dir: Path, stop_at: int, quiet: bool = False) -> Path:
    """Train (or resume) `cfg` up to step `stop_at` only and checkpoint it there: the trunk that runs
    identical up to that step branch from (see lmprune.compare). Returns the checkpoint's path."""
    run = setup_run(cfg, out_dir, resume=True, quiet=quiet)
    try:
        fit(run, quiet, stop_at=stop_at)
        return out_dir / "checkpoints" / ckpt.step_dir_name(stop_at)
    finally:
        run.lock.release()


# ----------------------------------------------------------------------------- setup

def init_distributed(device_pref: str, parallel: str = "ddp") -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on GPU. FSDP needs torchrun."""
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "fsdp" and "RANK" not in os.environ:
        raise UserError("train.parallel is fsdp but this process was not started by torchrun (no RANK in the "
                        "environment): launch it with `torchrun --nproc_per_node N -m lmprune train ...`, "
                        "or set train.parallel: ddp")
    info = Dist()
    if world_size > 1 or parallel == "fsdp":  # FSDP on one device still needs its (1-rank) process group
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        info = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def setup_run(cfg: RunConfig, out_dir: Path, resume: bool = False, quiet: bool = False) -> Run:
    """Everything that can fail on user input, before the first step: config, out dir, checkpoint,
    data, model, method, optimizer, teacher. Rank 0 holds OUT's lock from here on; if setup fails,
    --out is left as it was found (no run_config.json, no lock file, no dir it created)."""
    plan = validate_run(cfg)
    info, device = init_distributed(cfg.train.device, cfg.train.parallel)
    lock = RunLock(out_dir)
    if info.is_main:
        lock.acquire()
    try:
        run = _setup_locked(cfg, plan, out_dir, resume, info, device, lock, quiet)
    except BaseException:
        lock.release(cleanup=True)
        raise
    if info.is_main:
        write_json(out_dir / "run_config.json", run.run_config)  # last: the run can start
    info.barrier()
    return run


def _setup_locked(cfg: RunConfig, plan: Plan, out_dir: Path, resume: bool, info: Dist, device: torch.device,
                  lock: RunLock, quiet: bool = False) -> Run:
    tcfg, run_config = cfg.train, cfg.model_dump(mode="json")
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    check_out_dir(out_dir, run_config, resume)
    if info.is_main:
        clean_leftovers(out_dir)
    resume_from = find_resume_checkpoint(out_dir / "checkpoints") if resume else None
    tcfg = resumed_batch(tcfg, resume_from, info.world_size)
    mixture = prepare_mixture_data(cfg, info, quiet) if cfg.data.sources else None
    data = mixture.parts[0].data if mixture else prepare_data(cfg, info, quiet)
    for part_data in [p.data for p in mixture.parts] if mixture else [data]:
        check_data(part_data, tcfg)
    model = make_model(cfg, plan, data, resume_from).to(device)
    if tcfg.activation_checkpointing:  # each decoder layer recomputes its activations in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fsdp = sharding.uses_fsdp(tcfg.parallel, info.world_size)
    if fsdp:  # before the optimizer: it holds the shards
        sharding.shard_model(model, tcfg.dtype, tcfg.compile)
    make_optimizer = lambda m: build_optimizer(m, tcfg)  # noqa: E731  (also rebuilds it after compaction)
    hook = make_hook(plan, mixture.train_tokens if mixture else len(data.train), cfg, make_optimizer)
    optimizer = make_optimizer(model)
    loader_args = (tcfg.batch_size, tcfg.seq_len, tcfg.seed, info.rank, info.world_size)
    pin = device.type == "cuda"
    state = TrainState(mixture.loader(*loader_args, pin_memory=pin) if mixture
                       else TokenLoader(data.train, *loader_args, pin_memory=pin))
    if hook is not None:
        hook.apply(model)
    if resume_from is not None:
        restore_checkpoint(resume_from, model, optimizer, hook, state, info.rank)
    distiller = make_distiller(cfg, plan, out_dir, state.step, device, model)
    if fsdp and distiller is not None and distiller.teacher is not None:
        sharding.shard_model(distiller.teacher, tcfg.dtype)  # the teacher is sharded too (no optimizer)
    trainer = Trainer(tcfg, plan, model, optimizer, state.loader, device, info, hook, distiller,
                      teacher_dir=out_dir / "teacher", make_optimizer=make_optimizer)
    metrics = MetricsLog(out_dir / "metrics.jsonl", info.is_main, state.step)
    return Run(cfg, trainer, state, data, out_dir, metrics, run_config, lock, mixture, retention=retention_probe(cfg, plan, state))


def retention_probe(cfg: RunConfig, plan: Plan, state: TrainState) -> torch.Tensor | None:
    """train.retention_windows windows of the batches before prune start; the run must not reach the end of
    its first epoch, so they are never trained on again (UserError otherwise, before any step)."""
    tcfg = cfg.train
    if not tcfg.retention_windows:
        return None
    if not hasattr(state.loader, "seen_windows"):
        raise UserError("train.retention_windows is not supported with data.sources (a mixture) yet; "
                        "set it to 0 or train on one source")
    run_batches = tcfg.steps * tcfg.grad_accum
    if run_batches > state.loader.batches_per_epoch:
        raise UserError(f"train.retention_windows: the run's {run_batches} batches are more than one epoch of the "
                        f"data ({state.loader.batches_per_epoch}), so the probe's windows would be trained on "
                        "again after prune start; use more data or fewer steps")
    return state.loader.seen_windows(plan.prune_start * tcfg.grad_accum, tcfg.retention_windows)


def find_resume_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint; UserError when there are step dirs but none is complete."""
    found = ckpt.latest_checkpoint(ckpt_root)
    if found is None and any(ckpt_root.glob("step-*")):
        broken = sorted(p.name for p in ckpt_root.glob("step-*"))
        raise UserError(f"no complete checkpoint to resume from in {ckpt_root} ({', '.join(broken)}: "
                        f"{ckpt.checkpoint_problem(ckpt_root / broken[-1])})")
    return found


def resumed_batch(tcfg, resume_from: Path | None, world_size: int):
    """The train config with the per-rank batch that keeps the checkpoint's global batch when resuming
    at another world size (so the run continues on the same data); UserError if it does not divide."""
    if resume_from is None:
        return tcfg
    saved = checkpoint_meta(resume_from)["trainer_state"]
    saved_world = int(saved.get("world_size", 1))
    global_batch = int(saved.get("global_batch", tcfg.batch_size * saved_world))  # older checkpoints: the config's
    if global_batch == tcfg.batch_size * world_size:
        return tcfg
    if global_batch % world_size:
        raise UserError(f"checkpoint {resume_from.name} was written by {saved_world} ranks with a global batch of "
                        f"{global_batch} sequences ({global_batch // saved_world} per rank), which world size "
                        f"{world_size} does not divide; resume with a world size that divides it")
    return tcfg.model_copy(update={"batch_size": global_batch // world_size})


def checkpoint_meta(path: Path) -> dict:
    """The JSON parts of a checkpoint of either layout (plain or sharded)."""
    if sharded_ckpt.is_sharded_checkpoint(path):
        return sharded_ckpt.load_sharded_meta(path)
    return ckpt.load_checkpoint_meta(path)


def restore_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       hook: TrainingHook | None, state: TrainState, rank: int = 0) -> None:
    """Optimizer, RNG, method and train state from a checkpoint (plain weights were loaded with the
    model; a sharded checkpoint's are loaded here, into the plain or FSDP model)."""
    if sharded_ckpt.is_sharded_checkpoint(path):
        meta = sharded_ckpt.load_sharded_meta(path)
        sharded_ckpt.load_sharded_state(path, model, optimizer)
        hook_state = sharded_ckpt.load_sharded_extra(path, meta["trainer_state"], rank)
        if hook is not None and hook_state is not None:
            hook.load_state_dict(hook_state)
        state.load_state_dict(meta["trainer_state"])
        return
    meta = ckpt.load_checkpoint_meta(path)
    trainer_state = meta["trainer_state"]
    ckpt.load_optimizer_state(path, optimizer, meta["optimizer"])
    hook_state = ckpt.load_extra(path, trainer_state)
    if hook is not None and hook_state is not None:
        hook.load_state_dict(hook_state)
    state.load_state_dict(trainer_state)


def prepare_data(cfg: RunConfig, info: Dist, quiet: bool = False) -> PreparedData:
    """Prepare (or reuse from the cache) the corpus named in the config; rank 0 does the work."""
    data_cfg = cfg.data
    if data_cfg.prepared_dir:
        return PreparedData.open(data_cfg.prepared_dir)
    tokenizer = run_tokenizer(cfg)
    kwargs = dict(source=data_cfg.source, vocab_size=None if tokenizer else data_cfg.vocab_size,
                  tokenizer=tokenizer, val_fraction=data_cfg.val_fraction, seed=data_cfg.seed, progress=not quiet)
    if info.is_main:
        path = ensure_prepared(**kwargs)
    info.barrier()
    if not info.is_main:
        path = ensure_prepared(**kwargs)
    return PreparedData.open(path)


def run_tokenizer(cfg: RunConfig) -> str | None:
    """The tokenizer the data is prepared with: data.tokenizer, model.path's, or None (train a BPE)."""
    return cfg.data.tokenizer or (str(resolve_model(cfg.model.path)) if cfg.model.path else None)


def prepare_mixture_data(cfg: RunConfig, info: Dist, quiet: bool = False) -> Mixture:
    """data.sources: every source prepared (or reused) with one tokenizer; rank 0 does the work."""
    if info.is_main:
        mixture = prepare_mixture(cfg.data, run_tokenizer(cfg), progress=not quiet)
    info.barrier()
    if not info.is_main:
        mixture = prepare_mixture(cfg.data, run_tokenizer(cfg), progress=not quiet)
    return mixture


def check_data(data: PreparedData, tcfg) -> None:
    """The prepared data can train and evaluate this run: a loadable tokenizer (it is saved with every
    export) and a validation split of at least one window."""
    data.load_tokenizer()
    if len(data.val) < tcfg.seq_len + 1:
        raise UserError(f"{data.path}: the validation split has {len(data.val):,} tokens, fewer than one window of "
                        f"train.seq_len + 1 = {tcfg.seq_len + 1}; add documents or raise data.val_fraction")


def make_model(cfg: RunConfig, plan: Plan, data: PreparedData, resume_from: Path | None) -> torch.nn.Module:
    """The model to train: from a checkpoint's HF config, a local HF dir, or a preset (at the plan's width)."""
    if resume_from is not None:
        # The checkpoint's own HF config: after compaction the shapes differ from the config's.
        saved = dict(checkpoint_meta(resume_from)["model_config"])
        if "auto_map" in saved:
            raise UserError(f"checkpoint {resume_from}: model_config.json asks for remote code (auto_map)")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(saved.pop("model_type"), **saved),
                                                 trust_remote_code=False)
        if not sharded_ckpt.is_sharded_checkpoint(resume_from):  # sharded: loaded with the optimizer
            ckpt.load_model_weights(resume_from, model)
        return model.float()
    if cfg.model.path:
        model = load_hf_model(resolve_model(cfg.model.path)).float()
    else:
        model_cfg = cfg.model.model_copy(update={"intermediate_size": plan.initial_width})
        model = build_model(llama_config(model_cfg, data.vocab_size, cfg.train.seq_len, data.eos_token_id),
                            cfg.train.seed)
    if data.vocab_size > model.config.vocab_size:  # the one rule that needs the tokenized data
        raise UserError(f"tokenizer vocab ({data.vocab_size}) is larger than the model's vocab "
                        f"({model.config.vocab_size}): the data was tokenized for another model")
    return model


def make_hook(plan: Plan, train_tokens: int, cfg: RunConfig, make_optimizer) -> TrainingHook | None:
    """The training-time method the plan names, built from the method table."""
    if plan.method is None:
        return None
    context = BuildContext(train_sequences=train_tokens // cfg.train.seq_len, make_optimizer=make_optimizer)
    return METHODS[plan.method].build(plan.method_config, context)


def make_distiller(cfg: RunConfig, plan: Plan, out_dir: Path, start_step: int, device: torch.device,
                   model: torch.nn.Module) -> Distiller | None:
    """The KD teacher: a HF dir, or (on resume past prune start) the snapshot saved at prune start."""
    if plan.kd_start is None:
        return None
    distiller = Distiller(cfg.kd, plan.kd_start, cfg.train.steps)
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


# ----------------------------------------------------------------------------- the loop

def fit(run: Run, quiet: bool = False, stop_at: int | None = None) -> float | None:
    """Train from `run.state.step` to train.steps (or to `stop_at`, checkpointed there); the val loss of
    the last step (None if none ran).

    SIGTERM / SIGINT end it after the step in flight with a checkpoint (`Interrupted`);
    train.max_skipped_steps non-finite steps in a row end it with `NonFiniteError`.
    On CUDA the host reads nothing on a step that writes no row, saves nothing and is not the first
    (`reads_every_step` False): the device runs ahead; skips, stop requests under torchrun and the
    tok/s of the steps in between are read on the next such step (README "GPU")."""
    trainer, state, tcfg, plan = run.trainer, run.state, run.cfg.train, run.trainer.plan
    end = tcfg.steps if stop_at is None else stop_at
    progress = tqdm(total=end, initial=state.step, disable=quiet or not trainer.info.is_main,
                    desc="train", unit="step", dynamic_ncols=True)
    if state.step == 0 and 0 in plan.eval_steps:  # e.g. IMP: the dense start is the curve's first row
        run.metrics.write({"step": 0, "tokens": 0, **val_fields(run, evaluate(run)), **retention_fields(run),
                           **hook_metrics(trainer)})
    first_step, final_val_loss = state.step, None
    every_step = reads_every_step(trainer.device)
    mark_time, mark_step = time.perf_counter(), state.step  # the last step the host read (for tok/s)
    with StopRequests() as stop:
        while state.step < end:
            t0 = time.perf_counter()
            out = train_step(trainer, state)
            done = state.step
            last_step = done == tcfg.steps
            evaluates = plan.evaluates_after(done, tcfg.eval_every, tcfg.steps)
            saved = last_step or done == end or bool(tcfg.save_every and done % tcfg.save_every == 0)
            logs = last_step or done % tcfg.log_every == 0 or out.events.mask_updated
            progress.update(1)
            local_stop = trainer.info.world_size == 1 and stop.signum
            if not (every_step or logs or evaluates or saved or local_stop or done == first_step + 1):
                continue  # nothing read on the host this step
            train_loss = out.loss.item()  # syncs, so the timing is honest
            steps = 1 if every_step else done - mark_step
            seconds = (time.perf_counter() - (t0 if every_step else mark_time)) / steps  # per step
            if done > first_step + 1:  # a process's first step carries warm-up costs
                state.record_speed(trainer.tokens_per_step, seconds, steps)
            final_val_loss = log_step(run, out, train_loss, seconds, logs or out.skipped, evaluates, last_step)
            progress.set_postfix(loss=f"{train_loss:.3f}", lr=f"{out.lr:.2e}")
            if state.sync_skips() >= tcfg.max_skipped_steps:
                raise NonFiniteError(f"loss or gradients were not finite for {state.skipped_in_a_row} steps in a "
                                     f"row (last: step {done}); no update was applied, and the newest checkpoint "
                                     "holds the last finite state; lower train.lr or raise train.grad_clip")
            if saved:
                save_checkpoint(run)
            signum = stop.requested(trainer.info.world_size, trainer.device)
            if signum and done != end:
                path = save_checkpoint(run) if not saved else run.out_dir / "checkpoints" / ckpt.step_dir_name(done)
                raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {done}; "
                                          f"checkpoint {path}; continue with --resume")
            mark_time, mark_step = time.perf_counter(), done
    progress.close()
    return final_val_loss


def reads_every_step(device: torch.device) -> bool:
    """Whether the loop reads the loss on every step: on CPU a read costs nothing (and keeps CPU runs as
    they were); on CUDA it is a host sync that stalls the queue of kernels, so only logged steps read."""
    return device.type != "cuda"


def log_step(run: Run, out, train_loss: float, seconds: float, logs: bool, evaluates: bool,
             last_step: bool) -> float | None:
    """Write the step's metrics row (and evaluate when due); the val loss when this is the last step."""
    trainer, state = run.trainer, run.state
    row, final_val_loss = None, None
    if logs:
        row = step_row(run, out, train_loss, seconds)
    if evaluates:
        row = row or {"step": state.step, "tokens": state.tokens, "loss": finite_or_none(train_loss, 6),
                      "lr": out.lr, **hook_metrics(trainer)}
        val_loss = evaluate(run)
        row.update(val_fields(run, val_loss))
        row.update(retention_fields(run))
        final_val_loss = val_loss if last_step else None
    if row is not None:
        run.metrics.write(row)
    return final_val_loss


def step_row(run: Run, out, train_loss: float, seconds: float) -> dict:
    """The metrics.jsonl row of a logged step (non-finite numbers are written as null)."""
    trainer, state = run.trainer, run.state
    row = {"step": state.step, "tokens": state.tokens, "loss": finite_or_none(train_loss, 6), "lr": out.lr,
           "grad_norm": finite_or_none(float(out.grad_norm), 6),
           "tok_per_s": round(trainer.tokens_per_step / seconds, 1),
           **hook_metrics(trainer), **event_flags(out.events)}
    if out.skipped:
        row["skipped"] = True
    if trainer.distiller is not None:
        row.update(trainer.distiller.metrics(state.step - 1))
    return row


def finite_or_none(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def hook_metrics(trainer: Trainer) -> dict:
    return trainer.hook.metrics() if trainer.hook is not None else {}


def event_flags(events: StepEvents) -> dict:
    return {**({"mask_update": True} if events.mask_updated else {}), **({"compacted": True} if events.compact else {})}


def evaluate(run: Run) -> float:
    """The val loss; with data.sources, the weighted mean of the sources' (each kept in source_val_losses)."""
    t = run.cfg.train

    def loss_on(tokens) -> float:
        loss, _, _ = evaluate_loss(run.trainer.model, tokens, t.batch_size, t.seq_len, t.eval_tokens,
                                   run.trainer.device, t.dtype, run.trainer.info.rank, run.trainer.info.world_size)
        return loss

    if run.mixture is None:
        return loss_on(run.data.val)
    run.source_val_losses = {part.name: loss_on(part.data.val) for part in run.mixture.parts}
    return weighted_val_loss(run.source_val_losses, run.mixture)


def val_fields(run: Run, loss: float) -> dict:
    """The val keys of a metrics row: val_loss / val_ppl, and with a mixture its name and per-source keys."""
    fields = {"val_loss": round(loss, 6), "val_ppl": round(math.exp(loss), 4)}
    if run.mixture is not None:
        fields.update(mixture=run.mixture.label, **per_source_fields(run.source_val_losses))
    return fields


def retention_fields(run: Run) -> dict:
    """retention_loss / retention_ppl of the retention probe ({} without one)."""
    if run.retention is None:
        return {}
    t, trainer = run.cfg.train, run.trainer
    loss = evaluate_windows(trainer.model, run.retention, t.batch_size, trainer.device, t.dtype,
                            trainer.info.rank, trainer.info.world_size)
    return {"retention_loss": round(loss, 6), "retention_ppl": round(math.exp(loss), 4)}


def save_checkpoint(run: Run) -> Path:
    """Checkpoint the run as it is now (rank 0 writes; every rank waits); its path."""
    trainer = run.trainer
    root = run.out_dir / "checkpoints"
    if run.cfg.train.parallel == "fsdp":  # sharded (DCP): every rank writes its part
        trainer_state = dict(run.state.state_dict(), world_size=trainer.info.world_size,
                             global_batch=trainer.tcfg.batch_size * trainer.info.world_size)
        hook_state = trainer.hook.state_dict() if trainer.hook is not None else None
        return sharded_ckpt.save_sharded_checkpoint(root, run.state.step, trainer.model, trainer.optimizer,
                                                    trainer_state, run.run_config, hook_state,
                                                    run.cfg.train.keep_last, trainer.info.rank,
                                                    trainer.info.world_size)
    if trainer.info.is_main:
        hook_state = trainer.hook.state_dict() if trainer.hook is not None else None
        trainer_state = dict(run.state.state_dict(), world_size=trainer.info.world_size,
                             global_batch=trainer.tcfg.batch_size * trainer.info.world_size)
        ckpt.save_checkpoint(root, run.state.step, trainer.model, trainer.optimizer,
                             trainer_state, run.run_config, hook_state, run.cfg.train.keep_last)
    trainer.info.barrier()
    return root / ckpt.step_dir_name(run.state.step)


# ----------------------------------------------------------------------------- the end

def finish(run: Run, final_val_loss: float | None = None) -> TrainResult:
    """Evaluate (unless the last step just did), check ranks agree, export OUT/final, write summary.json."""
    trainer, state, tcfg, out_dir = run.trainer, run.state, run.cfg.train, run.out_dir
    model, info = trainer.model, trainer.info
    val_loss = final_val_loss if final_val_loss is not None else evaluate(run)
    if not math.isfinite(val_loss):
        raise NonFiniteError(f"the final val loss is {val_loss}; nothing exported (the newest checkpoint is kept)")
    retention = retention_fields(run)  # on every rank: an all-reduce under torchrun
    params = count_parameters(model)
    if trainer.sharded:  # the export is the full model, gathered on rank 0 (the shards differ by design)
        model = sharding.gathered_copy(model)
        fingerprints = rank_fingerprints(model, Dist()) if info.is_main else []
    else:
        fingerprints = rank_fingerprints(model, info)
    if len(set(fingerprints)) > 1:
        raise RuntimeError(f"ranks ended with different weights: {fingerprints}")
    result = TrainResult(out_dir, out_dir / "final", val_loss, math.exp(val_loss), state.train_tok_per_s,
                         params, tcfg.steps, state.tokens, is_main=info.is_main,
                         source_val_ppl={name: math.exp(loss) for name, loss in run.source_val_losses.items()})
    if info.is_main:
        patterns = getattr(trainer.hook, "export_patterns", None) or DEFAULT_PATTERNS
        export_final(model, run.data, result.final_dir, tcfg.export_sparse, patterns)
        plot_training(out_dir / "metrics.jsonl", out_dir / "training.png")
        method = METHODS.get(trainer.plan.method) if trainer.plan.method else None
        if method is not None and method.write_report is not None:
            method.write_report(out_dir)
        if tcfg.sample_tokens:
            prompt = run.data.load_tokenizer().decode(run.data.val[:8].tolist())
            result.sample = generate_sample(model.eval(), run.data.load_tokenizer(), prompt, tcfg.sample_tokens)
        summary = {"val_loss": val_loss, "val_ppl": result.val_ppl, "train_tok_per_s": result.train_tok_per_s,
                   "params": result.params, "ffn_width": model.config.intermediate_size,
                   "steps": tcfg.steps, "tokens": state.tokens, "train_flops": state.flops,
                   "sparsity": zero_fraction(prunable_parameters(model, patterns)),
                   "final_bytes": sum(file_sizes(result.final_dir).values()),
                   "rank_fingerprints": fingerprints, **retention}
        if run.mixture is not None:
            summary.update(mixture=run.mixture.label, mixture_sources=run.mixture.describe(),
                           **per_source_fields(run.source_val_losses))
        if tcfg.export_sparse:
            summary["final_sparse_bytes"] = sum(file_sizes(out_dir / "final-sparse").values())
        write_json(out_dir / "summary.json", summary)
    info.barrier()
    return result


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


def print_result(result: TrainResult, stream=None) -> None:
    stream = stream or sys.stdout
    print(f"val loss {result.val_loss:.4f}  val ppl {result.val_ppl:.2f}  "
          f"train {result.train_tok_per_s:,.0f} tok/s  params {result.params:,}  -> {result.final_dir}", file=stream)
    if result.source_val_ppl:
        print("val ppl per source: " + ", ".join(f"{name} {ppl:.2f}" for name, ppl in result.source_val_ppl.items()),
              file=stream)
    if result.sample:
        print(f"sample: {result.sample!r}", file=stream)
