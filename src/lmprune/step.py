"""One training step: the seam every pruning method, the loop, the tests and the benchmarks share.

`train_step(trainer, state)` runs one optimizer step and makes the method's calls at their fixed
places (see `lmprune.pruning.hooks`):

    [KD teacher snapshot, at the plan's kd_start]
    forward (autocast) + backward (outside autocast), for each micro-batch
    loss and gradients finite?   (all ranks agree: a MAX all-reduce of one flag)
      yes: hook.after_backward   gradients present, before clipping
           clip_grad_norm_       the loss gradient only
           hook.after_clip       a regulariser's gradient (RegularizingHook), after clipping
           optimizer.step()
      no:  the step is skipped: weights, AdamW moments and the method's statistics stay untouched
    zero_grad
    hook.after_optimizer_step -> StepEvents   (also on a skipped step, so no scheduled update is lost)
    if events.compact: trainer.compact()   hook.compact(...), then rewrap (DDP, compile, FLOPs); under
                       FSDP on a gathered copy, re-sharded after (`lmprune.sharding.compact_sharded`)

Where the answer to "finite?" is read:
  on the host (one sync per step): the default, and whenever a method reads this step's gradients
    (its statistics must never see a non-finite gradient), or the optimizer is not fused;
  on the device (no sync): a fused AdamW and no method reading gradients (`skips_on_device`). The
    flag goes to the fused kernel as `found_inf`, the mechanism GradScaler uses: the kernel leaves
    weights and moments untouched and the step count is reverted, all on the device. The loop reads
    the flag (and the loss) only on the steps it writes a row for (lmprune.train.fit).
The returned loss and grad norm stay device tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmprune.config import TrainConfig
from lmprune import sharding
from lmprune.distill import Distiller, save_snapshot
from lmprune.loader import TokenLoader
from lmprune.models import forward_flops_per_token
from lmprune.optim import is_fused, set_lr
from lmprune.pipelines import Plan
from lmprune.pruning.hooks import NO_EVENTS, RegularizingHook, StepEvents, TrainingHook


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

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
class TrainState:
    """Where the run is; saved in every checkpoint (trainer_state.json) and restored on resume."""

    loader: TokenLoader
    """The training batches; its position (epoch, batch) is part of the state."""
    step: int = 0
    """Optimizer steps done."""
    tokens: int = 0
    """Training tokens seen (all ranks)."""
    flops: float = 0.0
    """Training FLOPs spent (3x forward of the model as it was at each step, plus the KD teacher)."""
    tok_per_s_sum: float = 0.0
    """Sum of per-step tokens/s over timed steps (the first step of a process carries warm-up costs)."""
    timed_steps: int = 0
    """Steps counted in tok_per_s_sum."""
    skipped_in_a_row: int = 0
    """Consecutive steps skipped for a non-finite loss or gradient (0 after a good step)."""
    skip_streak: torch.Tensor | None = None
    """The same count kept on the device by steps that skip on the device (None: `skipped_in_a_row`
    is current); `sync_skips()` folds it in."""

    @property
    def train_tok_per_s(self) -> float:
        return self.tok_per_s_sum / max(1, self.timed_steps)

    def record_speed(self, tokens: int, seconds: float, steps: int = 1) -> None:
        """`steps` steps of `tokens` tokens each, `seconds` per step on average."""
        self.tok_per_s_sum += steps * (tokens / seconds)
        self.timed_steps += steps

    def count_skip_on_device(self, bad: torch.Tensor) -> None:
        """Extend or reset the skip streak by this step's 0/1 flag, without reading it."""
        streak = self.skip_streak if self.skip_streak is not None else torch.full_like(bad, self.skipped_in_a_row)
        self.skip_streak = (streak + bad) * bad

    def sync_skips(self) -> int:
        """The current skip streak (reads the device count if there is one: a host sync)."""
        if self.skip_streak is not None:
            self.skipped_in_a_row, self.skip_streak = int(self.skip_streak.item()), None
        return self.skipped_in_a_row

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "train_flops": self.flops,
                "loader": self.loader.state_dict(),
                "timing": {"tok_per_s_sum": self.tok_per_s_sum, "timed_steps": self.timed_steps},
                "skipped_in_a_row": self.sync_skips()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.flops = int(state["step"]), int(state["tokens"]), float(state["train_flops"])
        self.loader.load_state_dict(state["loader"])
        timing = state.get("timing", {})  # absent in checkpoints of earlier versions
        self.tok_per_s_sum = float(timing.get("tok_per_s_sum", 0.0))
        self.timed_steps = int(timing.get("timed_steps", 0))
        self.skipped_in_a_row, self.skip_streak = int(state.get("skipped_in_a_row", 0)), None


@dataclass
class Trainer:
    """Everything one step needs. `model` is the plain module; `forward` is what the step calls
    (DDP-wrapped and/or compiled); `rewrap()` rebuilds those after the parameters change."""

    tcfg: TrainConfig
    plan: Plan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: TokenLoader
    device: torch.device
    info: Dist = field(default_factory=Dist)
    hook: TrainingHook | None = None
    distiller: Distiller | None = None
    teacher_dir: Path | None = None
    """Where rank 0 saves the KD teacher snapshot (None: not saved)."""
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None
    """Builds the run's optimizer on a model (needed to re-shard after compaction under FSDP)."""
    wrapped: nn.Module | None = None
    forward: Callable[..., Any] | None = None
    step_flops: float = 0.0

    def __post_init__(self) -> None:
        self.rewrap()

    @property
    def tokens_per_step(self) -> int:
        return self.tcfg.batch_size * self.tcfg.seq_len * self.tcfg.grad_accum * self.info.world_size

    @property
    def sharded(self) -> bool:
        """FSDP2 under torchrun (train.parallel: fsdp): `model` is itself the sharded module."""
        return sharding.uses_fsdp(self.tcfg.parallel, self.info.world_size)

    def shard(self, model: nn.Module) -> nn.Module:
        """fully_shard `model` the run's way (per layer + root, bf16 policy, per-layer compile)."""
        return sharding.shard_model(model, self.tcfg.dtype, self.tcfg.compile)

    def rewrap(self) -> None:
        """DDP, torch.compile and the FLOP count follow the current parameters (after compaction too).
        Under FSDP the model was sharded (and its layers compiled) where it was built."""
        if self.sharded:
            self.wrapped = self.forward = self.model
        else:
            self.wrapped = wrap_ddp(self.model, self.info, self.device)
            self.forward = torch.compile(self.wrapped) if self.tcfg.compile else self.wrapped
        self.count_flops()

    def compact(self) -> None:
        """The method shrinks the model (`hook.compact`); the optimizer and wrappers follow."""
        if not self.sharded:
            self.optimizer = self.hook.compact(self.model, self.optimizer)
        else:
            self.model, self.optimizer = sharding.compact_sharded(
                self.model, self.optimizer, self.hook.compact, self.make_optimizer, self.shard, self.device)
            state = self.hook.state_dict()  # rebind the method to the new modules, as on resume
            self.hook.apply(self.model)
            self.hook.load_state_dict(state)
        self.rewrap()

    def snapshot_teacher(self) -> None:
        """KD teacher = the model as it is now (frozen); rank 0 saves it to `teacher_dir`."""
        save_dir = self.teacher_dir if self.info.is_main else None
        if not self.sharded:
            self.distiller.snapshot_teacher(self.model, save_dir)
        else:
            save = (lambda plain: save_snapshot(plain, save_dir)) if save_dir is not None else None
            self.distiller.teacher = sharding.sharded_teacher(self.model, self.shard, self.device, save)
        self.count_flops()

    def count_flops(self) -> None:
        self.step_flops = step_flops_of(self.model, self.distiller, self.tcfg.seq_len, self.tokens_per_step)


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Mean loss over the micro-batches (device tensor: reading it syncs)."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping."""
    lr: float
    events: StepEvents
    skip_flag: torch.Tensor | bool = False
    """The loss or a gradient was not finite: no optimizer step was taken (a device 0/1 tensor when
    the step skipped on the device)."""

    @property
    def skipped(self) -> bool:
        """Whether the step was skipped (reading a device flag syncs)."""
        return bool(self.skip_flag)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits [B, T, V] -> mean next-token cross entropy in fp32
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def train_step(trainer: Trainer, state: TrainState) -> StepOutput:
    """One optimizer step at `state.step`; advances `state` (step, tokens, FLOPs, loader)."""
    tcfg, step, hook = trainer.tcfg, state.step, trainer.hook
    if trainer.distiller is not None and trainer.distiller.teacher is None and step == trainer.plan.kd_start:
        # KD teacher = the enlarged model as it is when pruning starts
        trainer.snapshot_teacher()
    lr = trainer.plan.lr_at(step, tcfg.lr, tcfg.lr_end, tcfg.warmup)
    set_lr(trainer.optimizer, lr)
    trainer.wrapped.train()
    loss_sum = forward_backward(trainer, step)
    bad = nonfinite_flag(trainer, loss_sum)
    if skips_on_device(trainer, step):
        # the method's calls only write gradients this step, so calling them on a bad step is harmless
        grad_norm = hooks_and_clip(trainer, step)
        trainer.optimizer.found_inf = bad.to(torch.float32)  # 1: the fused kernel leaves everything as it was
        trainer.optimizer.step()
        state.count_skip_on_device(bad)
        skip_flag: torch.Tensor | bool = bad
    else:
        finite = int(bad.item()) == 0  # the host sync
        grad_norm = torch.full((), float("nan"))
        if finite:
            grad_norm = hooks_and_clip(trainer, step)
            if getattr(trainer.optimizer, "found_inf", None) is not None:
                trainer.optimizer.found_inf = None  # a flag left by an earlier step must not skip this one
            trainer.optimizer.step()
        state.skipped_in_a_row = 0 if finite else state.sync_skips() + 1
        skip_flag = not finite
    trainer.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += trainer.tokens_per_step
    state.flops += trainer.step_flops  # the model as it was during this step
    events = hook.after_optimizer_step(trainer.model, trainer.optimizer, step) if hook is not None else NO_EVENTS
    if events.compact:
        trainer.compact()
    return StepOutput(loss_sum / tcfg.grad_accum, grad_norm, lr, events, skip_flag=skip_flag)


def hooks_and_clip(trainer: Trainer, step: int) -> torch.Tensor:
    """The method's after_backward, clipping of the loss gradient, then a regulariser's after_clip (its
    gradient never enters the clip norm). Returns the global gradient norm before clipping."""
    hook = trainer.hook
    if hook is not None:
        hook.after_backward(trainer.model, step)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.tcfg.grad_clip or float("inf"))
    if sharding.is_sharded(grad_norm):  # FSDP: a DTensor over the shards
        grad_norm = grad_norm.full_tensor()
    if isinstance(hook, RegularizingHook):
        hook.after_clip(trainer.model, step)
    return grad_norm


def skips_on_device(trainer: Trainer, step: int) -> bool:
    """Whether this step can skip a non-finite update on the device (no host sync): the optimizer is
    fused (it honours `found_inf`) and no method folds this step's gradients into a statistic. A
    method says it does not with `reads_gradients(step) -> False` (its after_backward / after_clip are
    then still called, on a bad step too); one without that method is assumed to read them."""
    if not is_fused(trainer.optimizer):
        return False
    hook = trainer.hook
    if hook is None:
        return True
    reads_gradients = getattr(hook, "reads_gradients", None)
    return reads_gradients is not None and not reads_gradients(step)


def nonfinite_flag(trainer: Trainer, loss_sum: torch.Tensor) -> torch.Tensor:
    """0-dim int64 on the device: 1 when this step's loss or a gradient is not finite on any rank (a MAX
    all-reduce). Not read here, so no host sync."""
    grads = [sharding.local(p.grad) for p in trainer.model.parameters() if p.grad is not None]  # FSDP: shards
    bad = ~torch.isfinite(loss_sum)
    if grads:
        norms = torch._foreach_norm(grads)  # one fused pass; inf/NaN propagate into the norms
        bad = bad | ~torch.isfinite(torch.stack([n.float() for n in norms]).sum())
    flag = bad.to(torch.int64).view(1)
    if trainer.info.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.view(())


def forward_backward(trainer: Trainer, step: int) -> torch.Tensor:
    """Forward under autocast, backward outside it, over the step's micro-batches; the summed loss."""
    tcfg, device = trainer.tcfg, trainer.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.dtype == "bf16")
    loss_sum = torch.zeros((), device=device)
    for micro in range(tcfg.grad_accum):
        x, y = trainer.loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = micro == tcfg.grad_accum - 1
        # DDP / FSDP reduce gradients only on the last micro-batch
        with gradient_sync(trainer, last):
            with autocast:
                logits = trainer.forward(input_ids=x).logits
                loss = lm_loss(logits, y)
                if trainer.distiller is not None:
                    loss = trainer.distiller.mix_loss(loss, logits, x, step)
            (loss / tcfg.grad_accum).backward()
        loss_sum += loss.detach()
    return loss_sum


def gradient_sync(trainer: Trainer, last: bool):
    """The context of one micro-batch's backward: no gradient reduction before the last one."""
    if trainer.sharded:
        trainer.wrapped.set_requires_gradient_sync(last)
        return nullcontext()
    return trainer.wrapped.no_sync() if trainer.info.world_size > 1 and not last else nullcontext()


def step_flops_of(model: nn.Module, distiller: Distiller | None, seq_len: int, tokens: int) -> float:
    """Training FLOPs of one step: 3x the student's forward, plus the teacher's forward under KD."""
    flops = 3 * forward_flops_per_token(model, seq_len)
    if distiller is not None and distiller.teacher is not None:
        flops += forward_flops_per_token(distiller.teacher, seq_len)
    return flops * tokens


def wrap_ddp(model: nn.Module, info: Dist, device: torch.device) -> nn.Module:
    if info.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
