"""Forward tokens/s of SmolLM2-135M cut to each structure of the README's prune table, side by side in one run.

Speed depends on the shape a cut leaves, not on the criterion that chose it, so each shape is made
once (magnitude ranking, no calibration forward; the depth cut ranks blocks on two random batches)
and every model is timed in interleaved rounds, so that load that comes and goes hits them alike:
batch 4 x 256 (`lmprune prune`'s throughput shape), fp32, the median over rounds of the best of 3
forwards, and the ratio to the unpruned model measured in the same rounds.

    PYTHONPATH=src python benchmarks/bench_pruned_speed.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch

from lmprune.evaluate import forward_throughput
from lmprune.models import load_hf_model
from lmprune.prune_app import THROUGHPUT_BATCH, THROUGHPUT_SEQ_LEN
from lmprune.pruning.pretrained.oneshot import prune_model
from lmprune.sources import resolve_model

CUTS = {  # name -> prune_model keyword arguments (the README table's structures)
    "unpruned": None,
    "FFN 50%": {"ffn_ratio": 0.5},
    "FFN 25%": {"ffn_ratio": 0.25},
    "heads 33% (1 of 3 GQA groups)": {"heads_ratio": 1 / 3},
    "depth -3 layers": {"drop_layers": 3},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_hf_model(resolve_model(args.model), torch.float32).eval()
    vocab = base.config.vocab_size
    random_batches = [torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    models = {}
    for name, cut in CUTS.items():
        model = copy.deepcopy(base)
        if cut is not None:
            prune_model(model, random_batches if "drop_layers" in cut else None, "magnitude", reconstruct=False, **cut)
        models[name] = model
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            rates[name].append(forward_throughput(model, vocab, THROUGHPUT_BATCH, THROUGHPUT_SEQ_LEN,
                                                  torch.device("cpu"), repeats=3))
    base_rate = statistics.median(rates["unpruned"])
    print(f"{'structure':32s} {'params':>8s} {'tok/s':>8s} {'x unpruned':>10s}  (batch {THROUGHPUT_BATCH} x "
          f"{THROUGHPUT_SEQ_LEN}, fp32, {args.threads} threads, median of {args.rounds} rounds)")
    for name, model in models.items():
        rate = statistics.median(rates[name])
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:32s} {params / 1e6:7.1f}M {rate:8.0f} {rate / base_rate:10.3f}")
    print(f"CPU cores: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
