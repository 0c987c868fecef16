"""The GPU check of one lent GPU (driven by benchmarks/gpu_check.sh), written to OUT/gpu_check.json.

Legs, each through lmprune's own code paths (setup_run + train_step, or `lmprune train`):
  throughput   gpu-125m and gpu-350m, eager and torch.compile: train tok/s, MFU = 6 * params *
               tokens / seconds / peak FLOP/s, peak memory; and gpu-125m eager with a host sync per step
               (the step before the GPU path), to measure what the device-side skip saves
  fsdp         `torchrun --nproc_per_node 1 -m lmprune train ... --set train.parallel=fsdp`, IDEA with one
               compaction mid-run (skipped with a message where this lmprune has no train.parallel)
  idea_vs_scratch  the gpu-125m target, IDEA and scratch for ~--train-seconds each, same tokens: val ppl
The JSON is rewritten after every leg, so a run cut short keeps what it measured; a failed leg is
recorded with its error and the exit code is 1.

--dry-run: the same legs on CPU at toy sizes (2 layers, d32, a few steps), with CUDA's code paths
(fused AdamW, the device-side skip, reads on logged steps only; torch.compile with the eager backend,
since Inductor takes over a minute per graph on a small CPU), for the test suite.

    python benchmarks/gpu_check.py --out OUT [--dry-run] [--data pystdlib | --prepared DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

from lmprune.atomic import remove_tree, write_json
from lmprune.cli import main as lmprune_main
from lmprune.config import TrainConfig, config_from_dict
from lmprune.models import forward_flops_per_token
from lmprune.optim import is_fused
from lmprune.pruning.surgery import count_parameters
from lmprune import step as step_module
from lmprune.step import train_step
from lmprune.train import setup_run

H200_BF16_DENSE_TFLOPS = 790.0
TOY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where gpu_check.json and the runs go")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, the same code paths")
    parser.add_argument("--data", default="pystdlib", help="data.source (pystdlib needs no network)")
    parser.add_argument("--prepared", help="an already prepared data dir (lmprune prepare) instead of --data")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="dense bf16 peak")
    parser.add_argument("--train-seconds", type=float, default=110.0, help="IDEA / scratch: time of each")
    parser.add_argument("--timed-steps", type=int, default=20, help="throughput: steps timed after warm-up")
    return parser.parse_args(argv)


def base_config(args: argparse.Namespace, preset: str) -> dict:
    """A run config of `preset`: bf16, the run's data; at toy sizes under --dry-run."""
    data = {"prepared_dir": args.prepared} if args.prepared else {"source": args.data, "vocab_size": 8192}
    model = {"preset": preset, **(TOY_MODEL if args.dry_run else {})}
    train = {"batch_size": 2, "seq_len": 32, "threads": 2} if args.dry_run else {"batch_size": 32, "seq_len": 1024}
    train.update({"steps": 1000, "warmup": 10, "lr": 1e-3, "lr_end": 1e-4, "dtype": "bf16", "eval_every": 0,
                  "log_every": 1000, "sample_tokens": 0, "device": "cpu" if args.dry_run else "cuda"})
    return {"data": data, "model": model, "train": train}


# ----------------------------------------------------------------------------- throughput

def throughput_leg(args: argparse.Namespace, out: Path, preset: str, compiled: bool, host_sync: bool = False) -> dict:
    """Train tok/s and MFU of `preset` over --timed-steps steps of lmprune's train_step after warm-up.

    `host_sync`: the step as it was before the GPU path (the non-finite check read on the host and the
    loss read after every step), to measure what the device-side skip saves."""
    raw = base_config(args, preset)
    raw["train"]["compile"] = compiled
    run = setup_run(config_from_dict(raw, source=f"gpu_check {preset}"),
                    out / f"throughput-{preset}-{compiled}-{host_sync}")
    real_skips_on_device = step_module.skips_on_device
    if host_sync:
        step_module.skips_on_device = lambda trainer, step: False
    try:
        trainer, state = run.trainer, run.state
        reset_peak_memory(trainer.device)
        t0 = time.perf_counter()
        for _ in range(3):  # the first step compiles; the next ones settle the allocator
            train_step(trainer, state)
        synchronize(trainer.device)
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.timed_steps):
            out_step = train_step(trainer, state)
            if host_sync:
                out_step.loss.item()
        out_step.loss.item()  # waits for the queue: the timing is honest
        seconds = time.perf_counter() - t0
        params = count_parameters(trainer.model)
        tokens = args.timed_steps * trainer.tokens_per_step
        return {"preset": preset, "compile": compiled, "host_sync_per_step": host_sync, "params": params,
                "tokens_per_step": trainer.tokens_per_step, "fused_adamw": is_fused(trainer.optimizer),
                "timed_steps": args.timed_steps, "seconds": round(seconds, 3), "warmup_s": round(warmup_s, 2),
                "tok_per_s": round(tokens / seconds, 1),
                "mfu": float(f"{6 * params * tokens / seconds / (args.peak_tflops * 1e12):.4g}"),
                "peak_memory_gib": round(peak_memory_bytes(trainer.device) / 2**30, 3),
                "loss": round(float(out_step.loss), 4)}
    finally:
        step_module.skips_on_device = real_skips_on_device
        run.lock.release()
        del run
        free_memory()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated; on CPU the process's peak RSS (ru_maxrss is KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- fsdp

def fsdp_leg(args: argparse.Namespace, out: Path) -> dict:
    """IDEA with one compaction under `train.parallel: fsdp`, one process launched by torchrun."""
    if "parallel" not in TrainConfig.model_fields:
        return {"skipped": "this lmprune has no train.parallel (FSDP is built on branch issue11); "
                           "the leg runs once that is merged"}
    raw = idea_config(args, steps=10 if args.dry_run else 60)
    raw["pipeline"].update(prune_start=0.3, prune_span=0.3)  # compaction at ~60% of the run
    config = write_yaml(out / "fsdp.yaml", raw)
    run_dir = out / "fsdp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "lmprune", "train",
               str(config), "--out", str(run_dir), "--quiet", "--set", "train.parallel=fsdp"]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-600:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": round(wall, 1), "val_ppl": round(summary["val_ppl"], 3), "steps": summary["steps"],
            "compactions": sum(1 for r in rows if r.get("compacted")), "ffn_width": summary["ffn_width"],
            "train_tok_per_s": round(summary["train_tok_per_s"], 1)}


def idea_config(args: argparse.Namespace, steps: int) -> dict:
    raw = base_config(args, "gpu-125m")
    raw["train"].update(steps=steps, warmup=max(1, steps // 20), eval_every=0, log_every=max(1, steps // 20),
                        eval_tokens=1024 if args.dry_run else 262144, compile=True)
    raw["pipeline"] = {"name": "idea", "enlarge": 2.6, "prune_start": 0.5, "prune_span": 0.25,
                       "prune_every": 1 if args.dry_run else 5}
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------- IDEA vs scratch

def idea_vs_scratch_leg(args: argparse.Namespace, out: Path, scratch_tok_per_s: float) -> dict:
    """IDEA and scratch on the gpu-125m target at the same tokens, each sized to ~--train-seconds."""
    steps = idea_steps(args, scratch_tok_per_s)
    legs = {"steps": steps}
    for name in ("idea", "scratch"):
        raw = idea_config(args, steps)
        raw["pipeline"]["name"] = name
        run_dir = out / f"compare-{name}"
        t0 = time.perf_counter()
        code = lmprune_main(["train", str(write_yaml(out / f"{name}.yaml", raw)), "--out", str(run_dir), "--quiet"])
        if code != 0:
            raise RuntimeError(f"lmprune train ({name}) exited {code}")
        summary = json.loads((run_dir / "summary.json").read_text())
        legs[name] = {"val_ppl": round(summary["val_ppl"], 3), "wall_s": round(time.perf_counter() - t0, 1),
                      "tokens": summary["tokens"], "params": summary["params"],
                      "train_tok_per_s": round(summary["train_tok_per_s"], 1)}
        free_memory()
    legs["idea_over_scratch_ppl"] = round(legs["idea"]["val_ppl"] / legs["scratch"]["val_ppl"], 4)
    return legs


def idea_steps(args: argparse.Namespace, scratch_tok_per_s: float) -> int:
    """Steps for which the IDEA run (enlarged FFN until its window ends) takes ~--train-seconds, from the
    target's measured compiled throughput and the two models' forward FLOPs."""
    if args.dry_run:
        return 10
    raw = idea_config(args, 100)
    tokens_per_step = raw["train"]["batch_size"] * raw["train"]["seq_len"]
    ratio = enlarged_cost_ratio(raw)
    enlarged_share = raw["pipeline"]["prune_start"] + raw["pipeline"]["prune_span"] / 2  # the width falls linearly
    per_token_s = (enlarged_share * ratio + 1 - enlarged_share) / scratch_tok_per_s
    return max(50, int(args.train_seconds / (per_token_s * tokens_per_step)))


def enlarged_cost_ratio(raw: dict) -> float:
    """Forward FLOPs per token of the enlarged model over the target's (meta-device models: no memory)."""
    from transformers import LlamaForCausalLM

    from lmprune.config import ModelConfig
    from lmprune.models import PRESETS, llama_config

    width = PRESETS["gpu-125m"]["intermediate_size"]
    costs = []
    for ffn in (width, math.ceil(width * raw["pipeline"]["enlarge"] / 8) * 8):
        config = llama_config(ModelConfig(preset="gpu-125m", intermediate_size=ffn), 8192, raw["train"]["seq_len"], 0)
        with torch.device("meta"):
            costs.append(forward_flops_per_token(LlamaForCausalLM(config), raw["train"]["seq_len"]))
    return costs[1] / costs[0]


# ----------------------------------------------------------------------------- driver

def run_leg(report: dict, key: str, json_path: Path, leg, *leg_args) -> dict | None:
    """Run one leg; its result (or its error) goes into the report, which is rewritten at once."""
    t0 = time.perf_counter()
    print(f"gpu_check: {key} ...", flush=True)
    try:
        result = leg(*leg_args)
    except Exception as exc:  # noqa: BLE001  (one failed leg must not lose the others' numbers)
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {str(exc)[:800]}"}
    result["leg_wall_s"] = round(time.perf_counter() - t0, 1)
    report["legs"][key] = result
    write_json(json_path, report)
    print(f"gpu_check: {key}: {json.dumps(result)}", flush=True)
    return result


def use_cuda_paths_on_cpu() -> None:
    """--dry-run: what CUDA runs, on CPU: the fused AdamW and its device-side skip, the loop's reads on
    logged steps only; torch.compile with Dynamo's capture but not Inductor's minute-long CPU codegen."""
    from lmprune import optim, train

    train.build_optimizer = functools.partial(optim.build_optimizer, fused=True)
    train.reads_every_step = lambda device: False
    torch.compile = functools.partial(torch.compile, backend="eager")


def describe_device(dry_run: bool) -> str:
    if not dry_run and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        use_cuda_paths_on_cpu()
    json_path, t_start = out / "gpu_check.json", time.perf_counter()
    runs = out / "runs"  # the legs' run dirs: a repeated check starts them afresh
    if runs.is_dir():
        remove_tree(runs)
    report = {"device": describe_device(args.dry_run), "dry_run": args.dry_run, "peak_tflops": args.peak_tflops,
              "torch": torch.__version__, "legs": {}}
    for preset in ("gpu-125m", "gpu-350m"):
        for compiled in (False, True):
            run_leg(report, f"throughput/{preset}/{'compiled' if compiled else 'eager'}", json_path,
                    throughput_leg, args, runs, preset, compiled)
    run_leg(report, "throughput/gpu-125m/eager-host-sync", json_path, throughput_leg, args, runs, "gpu-125m",
            False, True)
    run_leg(report, "fsdp", json_path, fsdp_leg, args, runs)
    reference = report["legs"]["throughput/gpu-125m/compiled"].get("tok_per_s") or 1.0
    run_leg(report, "idea_vs_scratch", json_path, idea_vs_scratch_leg, args, runs, reference)
    summarize(report, time.perf_counter() - t_start)
    write_json(json_path, report)
    failed = [key for key, leg in report["legs"].items() if "error" in leg]
    print(f"gpu_check: wrote {json_path} in {report['wall_s']} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def summarize(report: dict, seconds: float) -> None:
    """The headline numbers: MFU of gpu-350m compiled against the goal, what the device-side skip saves."""
    legs = report["legs"]
    report["mfu_350m_compiled"] = legs["throughput/gpu-350m/compiled"].get("mfu")
    report["goal_mfu_350m_compiled"] = 0.40
    device_skip = legs["throughput/gpu-125m/eager"].get("tok_per_s")
    host_sync = legs["throughput/gpu-125m/eager-host-sync"].get("tok_per_s")
    if device_skip and host_sync:
        report["device_skip_over_host_sync_125m_eager"] = round(device_skip / host_sync, 3)
    report["wall_s"] = round(seconds, 1)


if __name__ == "__main__":
    sys.exit(main())
