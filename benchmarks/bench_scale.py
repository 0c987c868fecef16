"""FSDP vs DDP at 2 ranks (CPU, gloo), ratios measured side by side in one run.

Every timed step is `lmprune.step.train_step` (the step `lmprune train` runs) on the `small` preset
enlarged 2.6x (IDEA's enlarged model), with the same global batch in both modes:

  (a) step time fsdp / ddp                                              (reported; CPU gloo has no overlap)
  (b) parameter + AdamW-state bytes held per rank, fsdp / ddp           goal <= 0.55 at 2 ranks
  (c) compaction wall time under fsdp (gather, slice weights + moments,
      re-shard, rebuild the optimizer) / one fsdp step's time           goal <= 5

The script starts itself under torchrun with 2 processes; rank 0 prints the table.
Usage: python benchmarks/bench_scale.py [--preset small] [--steps 6] [--seq-len 128] [--batch-size 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--enlarge", type=float, default=2.6)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (after one warm-up step)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def train_config(args, parallel: str):
    from lmprune.config import TrainConfig
    return TrainConfig(steps=args.steps + 2, batch_size=args.batch_size, seq_len=args.seq_len, dtype="fp32",
                       warmup=1, parallel=parallel)


def build_trainer(args, parallel: str, hook=None):
    from lmprune.config import ModelConfig
    from lmprune.loader import TokenLoader
    from lmprune.models import PRESETS, build_model, llama_config
    from lmprune.optim import build_optimizer
    from lmprune.pipelines import Plan, enlarged_width
    from lmprune.sharding import shard_model
    from lmprune.step import Dist, Trainer

    width = enlarged_width(PRESETS[args.preset]["intermediate_size"], args.enlarge, 8)
    tcfg = train_config(args, parallel)
    total = tcfg.steps
    model_cfg = ModelConfig(preset=args.preset, intermediate_size=width)
    model = build_model(llama_config(model_cfg, 512, args.seq_len, None), seed=0)
    info = Dist(dist.get_rank(), dist.get_world_size(), 0)
    if parallel == "fsdp":
        shard_model(model, tcfg.dtype)
    tokens = np.random.default_rng(0).integers(0, 512, size=400_000, dtype=np.int64)
    loader = TokenLoader(tokens, tcfg.batch_size, tcfg.seq_len, 0, info.rank, info.world_size)
    plan = Plan(width, width, ((0, total),), None, None, None)
    make_optimizer = lambda m: build_optimizer(m, tcfg)  # noqa: E731
    optimizer = make_optimizer(model)
    if hook is not None:
        hook.apply(model)
    return Trainer(tcfg, plan, model, optimizer, loader, torch.device("cpu"), info, hook,
                   make_optimizer=make_optimizer)


def state_bytes(trainer) -> int:
    """Parameter + optimizer-state bytes this rank holds (its shards under FSDP)."""
    from lmprune.sharding import local
    total = sum(local(p).numel() * local(p).element_size() for p in trainer.model.parameters())
    for values in trainer.optimizer.state.values():
        total += sum(local(v).numel() * local(v).element_size() for v in values.values() if torch.is_tensor(v))
    return total


def timed_steps(trainer, steps: int) -> list[float]:
    from lmprune.step import TrainState, train_step
    state = TrainState(trainer.loader)
    times = []
    for index in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        float(train_step(trainer, state).loss)
        if index:  # the first step carries warm-up costs
            times.append(time.perf_counter() - t0)
    return times


def compaction_seconds(args) -> float:
    """Wall time of `Trainer.compact` under FSDP: an IDEA pruner that compacts 2.6x -> 1x at step 1."""
    from lmprune.models import PRESETS
    from lmprune.optim import build_optimizer
    from lmprune.pruning.ffn.pruner import FFNPruneConfig, FFNPruner
    from lmprune.step import TrainState, train_step

    target = PRESETS[args.preset]["intermediate_size"]
    cfg = FFNPruneConfig(start_step=1, span_steps=0, target_width=target, importance="magnitude")
    tcfg = train_config(args, "fsdp")
    hook = FFNPruner(cfg, make_optimizer=lambda m: build_optimizer(m, tcfg))
    trainer = build_trainer(args, "fsdp", hook)
    seconds = []
    compact = trainer.compact

    def timed_compact() -> None:
        dist.barrier()
        t0 = time.perf_counter()
        compact()
        dist.barrier()
        seconds.append(time.perf_counter() - t0)

    trainer.compact = timed_compact
    state = TrainState(trainer.loader)
    for _ in range(3):
        float(train_step(trainer, state).loss)
    assert len(seconds) == 1 and trainer.model.config.intermediate_size == target
    return seconds[0]


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    results = {}
    for parallel in ("ddp", "fsdp"):
        trainer = build_trainer(args, parallel)
        results[parallel] = {"step_s": statistics.median(timed_steps(trainer, args.steps)),
                             "bytes": state_bytes(trainer)}
        del trainer
    results["compaction_s"] = compaction_seconds(args)
    peak_bytes = torch.tensor([results["fsdp"]["bytes"], results["ddp"]["bytes"]], dtype=torch.float64)
    dist.all_reduce(peak_bytes, op=dist.ReduceOp.MAX)  # the most any rank holds
    if dist.get_rank() == 0:
        report(args, results, peak_bytes.tolist())
    dist.destroy_process_group()


def report(args, results: dict, peak_bytes: list[float]) -> None:
    fsdp_s, ddp_s = results["fsdp"]["step_s"], results["ddp"]["step_s"]
    rows = {
        "step_time_fsdp_over_ddp": fsdp_s / ddp_s,
        "bytes_per_rank_fsdp_over_ddp": peak_bytes[0] / peak_bytes[1],
        "compaction_over_step": results["compaction_s"] / fsdp_s,
    }
    if args.json:
        print(json.dumps({"args": vars(args), "results": results, "ratios": rows}, indent=2))
        return
    print(f"preset {args.preset} enlarged {args.enlarge}x, 2 ranks gloo, batch {args.batch_size}/rank x "
          f"seq {args.seq_len}, {args.threads} thread(s)/rank, median of {args.steps} steps")
    print(f"  step time      ddp {ddp_s * 1e3:8.1f} ms   fsdp {fsdp_s * 1e3:8.1f} ms")
    print(f"  bytes per rank ddp {peak_bytes[1] / 2**20:8.1f} MiB  fsdp {peak_bytes[0] / 2**20:8.1f} MiB")
    print(f"  compaction     {results['compaction_s'] * 1e3:8.1f} ms (fsdp)")
    print(f"(a) step time fsdp / ddp              {rows['step_time_fsdp_over_ddp']:.3f}")
    print(f"(b) param+optimizer bytes fsdp / ddp  {rows['bytes_per_rank_fsdp_over_ddp']:.3f}  (goal <= 0.55)")
    print(f"(c) compaction / one fsdp step        {rows['compaction_over_step']:.3f}  (goal <= 5)")


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           __file__, "--worker", *sys.argv[1:]]
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
