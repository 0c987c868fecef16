"""Peak memory of `lmprune prune` with and without `--offload`, as the model grows, side by side in one run.

Builds LLaMA models of SmolLM2's family with random weights (SmolLM2's tokenizer, so `--calib shakespeare`
works as for SmolLM2 itself) at the widths given, saved as fp32 safetensors, and prunes each twice as
its own process, FLAP at 50% of FFN neurons with the refit:

    lmprune prune MODEL --calib shakespeare --criterion flap --ffn-ratio 0.5 --calib-samples S
        --calib-seq-len 256 --batch-size 1 --max-eval-tokens 1024 [--offload]

Memory is the process's peak RSS: the larger of psutil samples every 0.2 s and the report's
`peak_rss_bytes` (ru_maxrss, in all, evaluation included); `peak_rss_prune_bytes` is the peak while pruning. It also measures
the RSS that importing lmprune's prune command alone costs (torch + transformers), which does not
grow with the model. The goal of issue 15: with --offload, peak <= the model's fp32 bytes + 30%.
Random weights make the perplexities meaningless; only memory is measured here.

    PYTHONPATH=src python benchmarks/bench_offload.py --work /tmp/bench_offload [--sizes smollm2-135m,1024x16x4096]
    PYTHONPATH=src python benchmarks/bench_offload.py --sizes 2048x22x5632 --modes offload   # ~1.1B, TinyLlama's shape
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lmprune.sources import resolve_model


def build_model(out: Path, hidden: int, layers: int, ffn: int) -> int:
    """A random LLaMA at this width with SmolLM2's tokenizer, saved in fp32; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smollm2 = resolve_model("smollm2-135m")
    if (out / "model.safetensors").is_file():
        return json.loads((out / "lmprune_bench.json").read_text())["params"]
    head_dim = 64
    heads = hidden // head_dim
    kv_heads = next(k for k in range(max(1, heads // 3), 0, -1) if heads % k == 0)  # GQA groups of >= 3 heads
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(smollm2, local_files_only=True, trust_remote_code=False).save_pretrained(tmp)
    (tmp / "lmprune_bench.json").write_text(json.dumps({"params": params}))
    tmp.rename(out)
    return params


def model_parameters(model_dir: Path) -> int:
    """Parameter count from the safetensors header (tied embeddings are stored once)."""
    from safetensors import safe_open

    total = 0
    with safe_open(model_dir / "model.safetensors", framework="pt") as handle:
        for name in handle.keys():
            count = 1
            for size in handle.get_slice(name).get_shape():
                count *= size
            total += count
    return total


def watch(command: list[str], log: Path | None = None, threads: int = 2) -> tuple[float, int]:
    """(seconds, peak RSS of the process) of a command run to completion (its output to `log`)."""
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log or os.devnull, "w") as sink:
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        watched, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... exited with {child.returncode} (see {log})")
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_offload"))
    parser.add_argument("--sizes", default="smollm2-135m,1024x16x4096",
                        help="comma-separated HIDDENxLAYERSxFFN (random weights) or model names / dirs")
    parser.add_argument("--calib-samples", type=int, default=16, help="x 256 tokens (>= the kept FFN neurons)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="memory,offload",
                        help="memory,offload or one of them: 'offload' alone skips the slow in-memory leg of a large model")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",")]
    if any(mode not in ("memory", "offload") for mode in modes):
        parser.exit(2, f"--modes must be memory, offload or both; got {args.modes!r}\n")
    args.work.mkdir(parents=True, exist_ok=True)
    _, baseline = watch([sys.executable, "-c", "import time, lmprune.prune_app; time.sleep(1)"])
    print(f"importing lmprune.prune_app alone: peak RSS {baseline / 2**30:.2f} GiB", flush=True)
    rows = []
    for size in args.sizes.split(","):
        if "x" in size:
            hidden, layers, ffn = (int(x) for x in size.split("x"))
            model_dir = args.work / f"llama-{size}"
            params = build_model(model_dir, hidden, layers, ffn)
        else:  # a model name or dir as `lmprune prune` takes it
            model_dir = resolve_model(size)
            params = model_parameters(model_dir)
        fp32 = 4 * params
        for offload in [mode == "offload" for mode in modes]:
            out = args.work / f"pruned-{size}-{'offload' if offload else 'memory'}"
            command = [sys.executable, "-m", "lmprune", "prune", str(model_dir), "--calib", "shakespeare",
                       "--out", str(out), "--overwrite", "--criterion", "flap", "--ffn-ratio", "0.5",
                       "--calib-samples", str(args.calib_samples), "--calib-seq-len", "256", "--batch-size", "1",
                       "--max-eval-tokens", "1024", *(["--offload"] if offload else [])]
            seconds, peak = watch(command, args.work / f"{out.name}.log", args.threads)
            report = json.loads((out / "prune_report.json").read_text())
            # the 0.2 s samples can miss a short spike that the process's own ru_maxrss catches
            peak = max(peak, report["peak_rss_bytes"])
            rows.append((size, params, offload, seconds, peak, report["peak_rss_prune_bytes"]))
            print(f"{size} ({params / 1e6:.1f}M params, fp32 {fp32 / 2**30:.2f} GiB) "
                  f"{'--offload' if offload else 'in memory'}: {seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB "
                  f"(while pruning {report['peak_rss_prune_bytes'] / 2**30:.2f} GiB) = {peak / fp32:.3f} x fp32 bytes, "
                  f"{(peak - baseline) / fp32:.3f} x above the import baseline", flush=True)
            shutil.rmtree(out)
    for size, params, offload, _, peak, _ in rows:
        if offload:
            print(f"goal {size}: peak RSS with --offload / fp32 bytes = {peak / (4 * params):.3f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
