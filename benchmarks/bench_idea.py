"""IDEA Prune overheads, each a ratio measured side by side in one run (interleaved, median of N).

Every timed step is `lmprune.step.train_step`, the step `lmprune train` runs (forward under bf16
autocast, backward, the pruner's calls, clipping, AdamW, compaction when the pruner asks for it).

  (a) step time with importance tracking / plain training of the same enlarged model   goal <= 1.03
  (b) recovery step time after compaction / a scratch target model                    goal <= 1.05
  (c) importance-state bytes / parameter bytes (mean-max), at the preset and at the
      shapes of SmolLM2-135M, Llama-3.2-1B and Llama-2-7B, fp32 and bf16 state          goal <= 0.001
  (d) exported model forward tok/s / a scratch model of the same config               goal >= 0.97

Usage: python benchmarks/bench_idea.py [--preset tiny] [--steps 20] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lmprune.config import ModelConfig, TrainConfig
from lmprune.evaluate import forward_throughput
from lmprune.models import PRESETS, build_model, llama_config
from lmprune.optim import build_optimizer
from lmprune.loader import TokenLoader
from lmprune.pipelines import Plan, enlarged_width
from lmprune.pruning.ffn.pruner import FFNPruneConfig, FFNPruner
from lmprune.step import Trainer, TrainState, train_step


# Published model shapes for (c): the ratio falls as 1/d_model, so the toy presets are the worst case.
SHAPES = [
    {"name": "smollm2_135m", "hidden": 576, "ffn": 1536, "layers": 30, "heads": 9, "kv": 3, "vocab": 49152,
     "tied": True},
    {"name": "llama3.2_1b", "hidden": 2048, "ffn": 8192, "layers": 16, "heads": 32, "kv": 8, "vocab": 128256,
     "tied": True},
    {"name": "llama2_7b", "hidden": 4096, "ffn": 11008, "layers": 32, "heads": 32, "kv": 32, "vocab": 32000,
     "tied": False},
]


def shape_state_and_param_bytes(shape: dict, enlarge: float, state_dtype: str,
                                 tcfg: TrainConfig) -> tuple[int, int, int]:
    """(importance-state bytes, fp32 parameter bytes, enlarged FFN width) of a shape enlarged by `enlarge`,
    without building it.

    Parameters are counted on the meta device (no memory); the state is measured by FFNPruner on ONE
    real decoder layer (uninitialised memory, tiny vocab) and scaled by the layer count: it is the
    same per layer.
    """
    wide = enlarged_width(shape["ffn"], enlarge, 8)

    def config(layers: int, vocab: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=wide,
                           num_hidden_layers=layers, num_attention_heads=shape["heads"],
                           num_key_value_heads=shape["kv"], tie_word_embeddings=shape["tied"])
    with torch.device("meta"):
        full = LlamaForCausalLM(config(shape["layers"], shape["vocab"]))
    params = sum(p.numel() * 4 for p in full.parameters())
    with torch.device("meta"):
        one_layer = LlamaForCausalLM(config(1, 8))
    one_layer.to_empty(device="cpu")
    hook = FFNPruner(FFNPruneConfig(start_step=10_000, span_steps=10, target_width=shape["ffn"], track_from=0,
                                    state_dtype=state_dtype), make_optimizer=lambda m: build_optimizer(m, tcfg))
    hook.apply(one_layer)
    return hook.importance_state_bytes() * shape["layers"], params, wide


def make(preset: str, width: int, seq_len: int, vocab: int):
    cfg = ModelConfig(preset=preset, intermediate_size=width)
    return build_model(llama_config(cfg, vocab, seq_len, None), seed=0)


def bench_trainer(model, tcfg: TrainConfig, tokens: np.ndarray, hook=None) -> tuple[Trainer, TrainState]:
    """The trainer's own step inputs for one model (+ an optional pruning hook) on a fixed token stream."""
    width = model.config.intermediate_size
    plan = Plan(width, width, ((0, tcfg.steps),), None, None, None)
    loader = TokenLoader(tokens, tcfg.batch_size, tcfg.seq_len, seed=0)
    if hook is not None:
        hook.apply(model)
    trainer = Trainer(tcfg, plan, model, build_optimizer(model, tcfg), loader, torch.device("cpu"), hook=hook)
    return trainer, TrainState(loader)


def timed_step(run: tuple[Trainer, TrainState]) -> float:
    t0 = time.perf_counter()
    train_step(*run).loss.item()
    return time.perf_counter() - t0


def interleaved(a, b, steps: int, warmup: int) -> tuple[float, float]:
    """Median step seconds of a and b, alternating which goes first (drift hits both alike)."""
    times_a, times_b = [], []
    for i in range(steps):
        pair = [(a, times_a), (b, times_b)] if i % 2 == 0 else [(b, times_b), (a, times_a)]
        for run, sink in pair:
            seconds = timed_step(run)
            if i >= warmup:
                sink.append(seconds)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--enlarge", type=float, default=2.6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tcfg = TrainConfig(steps=10_000, warmup=0, batch_size=args.batch_size, seq_len=args.seq_len, dtype="bf16")
    target = PRESETS[args.preset]["intermediate_size"]
    wide = enlarged_width(target, args.enlarge, 8)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, size=(args.steps + 2) * args.batch_size * (args.seq_len + 1)).astype(np.int64)
    warmup = min(3, args.steps // 4)
    results = {}

    # (a) tracking the sensitivity EMA every step (window far away: nothing is pruned) vs plain
    tracking_cfg = FFNPruneConfig(start_step=10_000, span_steps=10, target_width=target, track_from=0)
    plain = bench_trainer(make(args.preset, wide, args.seq_len, args.vocab), tcfg, tokens)
    tracked_hook = FFNPruner(tracking_cfg, make_optimizer=lambda m: build_optimizer(m, tcfg))
    tracked = bench_trainer(make(args.preset, wide, args.seq_len, args.vocab), tcfg, tokens, tracked_hook)
    t_plain, t_tracked = interleaved(plain, tracked, args.steps, warmup)
    results["a_tracking_step_ratio"] = {"ratio": t_tracked / t_plain, "goal": "<= 1.03",
                                        "ok": t_tracked / t_plain <= 1.03,
                                        "detail": f"{t_tracked * 1e3:.1f} ms vs {t_plain * 1e3:.1f} ms per step"}

    # (c) memory of the importance state vs the parameters, for mean-max: this preset, then real shapes
    param_bytes = sum(p.numel() * p.element_size() for p in tracked[0].model.parameters())
    state_ratio = tracked_hook.importance_state_bytes() / param_bytes
    results["c_importance_state_ratio"] = {
        "ratio": state_ratio, "goal": "<= 0.001", "ok": state_ratio <= 0.001,
        "detail": f"{tracked_hook.importance_state_bytes():,} B state / {param_bytes:,} B params "
                  f"({args.preset}, fp32 state: 3 floats per neuron, the ratio shrinks as 1/d_model)"}
    del plain, tracked
    for shape in SHAPES:
        for state_dtype in ("fp32", "bf16"):
            state, params, wide_ffn = shape_state_and_param_bytes(shape, args.enlarge, state_dtype, tcfg)
            results[f"c_importance_state_ratio_{shape['name']}_{state_dtype}"] = {
                "ratio": state / params, "goal": "<= 0.001", "ok": state / params <= 0.001,
                "detail": f"{state / 2**20:,.2f} MiB state / {params / 2**20:,.0f} MiB params "
                          f"(d{shape['hidden']}, FFN {wide_ffn} -> "
                          f"{shape['ffn']}, {shape['layers']} layers)"}

    # (b) recovery after compaction vs a scratch model of the target width: a one-shot prune at step 0,
    # compacted by train_step itself (weights and AdamW moments sliced, wrappers rebuilt)
    one_shot = FFNPruner(FFNPruneConfig(start_step=0, span_steps=0, target_width=target, importance="magnitude"),
                         make_optimizer=lambda m: build_optimizer(m, tcfg))
    compacted_model = make(args.preset, wide, args.seq_len, args.vocab)
    recovery = bench_trainer(compacted_model, tcfg, tokens, one_shot)
    timed_step(recovery)
    assert compacted_model.config.intermediate_size == target and one_shot.compacted
    scratch = bench_trainer(make(args.preset, target, args.seq_len, args.vocab), tcfg, tokens)
    t_scratch, t_recovery = interleaved(scratch, recovery, args.steps, warmup)
    results["b_recovery_step_ratio"] = {"ratio": t_recovery / t_scratch, "goal": "<= 1.05",
                                        "ok": t_recovery / t_scratch <= 1.05,
                                        "detail": f"{t_recovery * 1e3:.1f} ms vs {t_scratch * 1e3:.1f} ms per step"}

    # (d) the exported (pruned, saved, reloaded) model vs a scratch model of the same config
    with tempfile.TemporaryDirectory() as tmp:
        compacted_model.save_pretrained(Path(tmp) / "exported")
        exported = AutoModelForCausalLM.from_pretrained(Path(tmp) / "exported")
    fresh = scratch[0].model
    rates_exported, rates_fresh = [], []
    for i in range(5):
        order = [(exported, rates_exported), (fresh, rates_fresh)]
        for model, sink in (order if i % 2 == 0 else order[::-1]):
            sink.append(forward_throughput(model, args.vocab, 8, args.seq_len, torch.device("cpu"), repeats=3))
    ratio_d = statistics.median(rates_exported) / statistics.median(rates_fresh)
    results["d_exported_forward_ratio"] = {
        "ratio": ratio_d, "goal": ">= 0.97", "ok": ratio_d >= 0.97,
        "detail": f"{statistics.median(rates_exported):,.0f} vs {statistics.median(rates_fresh):,.0f} tok/s "
                  f"(intermediate_size {exported.config.intermediate_size} vs {fresh.config.intermediate_size})"}

    setup = {"preset": args.preset, "target_width": target, "enlarged_width": wide, "steps": args.steps,
             "batch": [args.batch_size, args.seq_len], "threads": args.threads, "torch": torch.__version__}
    if args.json:
        print(json.dumps({"setup": setup, "results": results}, indent=2))
        return
    print(f"setup: {setup}")
    for name, r in sorted(results.items()):
        print(f"{name:44s} {r['ratio']:.5f}  goal {r['goal']:8s} {'ok' if r['ok'] else 'MISSED':6s}  {r['detail']}")


if __name__ == "__main__":
    main()
