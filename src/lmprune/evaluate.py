"""Held-out perplexity and forward throughput of any HF causal LM."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from lmprune.data import PreparedData
from lmprune.loader import val_batches
from lmprune.sharding import is_sharded
from lmprune.errors import UserError


def evaluate_loss(model: torch.nn.Module, tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int,
                  device: torch.device, dtype: str = "fp32", rank: int = 0, world_size: int = 1,
                  progress: bool = False) -> tuple[float, int, float]:
    """Mean next-token loss over the first `max_tokens` of `tokens` in contiguous windows.

    Under DDP each rank takes every world_size-th batch and the sums are all-reduced, so every
    rank returns the same numbers. Returns (loss, target tokens, forward seconds).
    """
    batches = list(val_batches(tokens, batch_size, seq_len, max_tokens))
    return mean_loss(model, batches, device, dtype, rank, world_size, progress)


def evaluate_windows(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                     dtype: str = "fp32", rank: int = 0, world_size: int = 1) -> float:
    """Mean next-token loss over given windows (int64 [n, seq_len + 1]), e.g. the retention probe."""
    batches = [(rows[:, :-1], rows[:, 1:]) for rows in windows.split(batch_size)]
    return mean_loss(model, batches, device, dtype, rank, world_size)[0]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
              dtype: str = "fp32", rank: int = 0, world_size: int = 1,
              progress: bool = False) -> tuple[float, int, float]:
    """(mean next-token loss, target tokens, forward seconds) over (x, y) batches, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    seconds = 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    # FSDP: every rank must run the same number of forwards (each gathers the weights with the others)
    sharded = world_size > 1 and is_sharded(next(model.parameters()))
    rounds = -(-len(batches) // world_size) * world_size if sharded else len(batches)
    for index in tqdm(range(rounds), desc="eval", disable=not progress, unit="batch"):
        if index % world_size != rank:
            continue
        if index >= len(batches):
            with autocast:
                model(input_ids=batches[0][0][:1].to(device))  # a forward that only keeps the ranks in step
            continue
        x, y = batches[index]
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        with autocast:
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        loss_sum += loss.double()
        seconds += time.perf_counter() - t0
        count += y.numel()
    if world_size > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
    model.train(was_training)
    return (loss_sum / count).item(), int(count.item()), seconds


@torch.no_grad()
def forward_throughput(model: torch.nn.Module, vocab_size: int, batch_size: int, seq_len: int, device: torch.device,
                       repeats: int = 5, warmup: int = 1, dtype: str = "fp32") -> float:
    """Forward tokens/s at a fixed batch and length (random token ids; best of `repeats`)."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    best = math.inf
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        with autocast:
            model(input_ids=x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            best = min(best, time.perf_counter() - t0)
    return batch_size * seq_len / best


def evaluate_model_dir(model_dir: str | Path, data_dir: str | Path, max_tokens: int, batch_size: int = 8,
                       seq_len: int | None = None, dtype: str = "fp32", device: str = "cpu",
                       progress: bool = True) -> dict:
    """`lmprune eval`: val perplexity and tokens/s of a HF causal-LM dir on a prepared corpus."""
    from lmprune.models import load_hf_model
    from lmprune.pruning.surgery import count_parameters

    data = PreparedData.open(data_dir)  # validates the data first: cheap, and fails before loading weights
    model = load_hf_model(model_dir)
    if data.vocab_size > model.config.vocab_size:
        raise UserError(f"the data's tokenizer has {data.vocab_size} tokens but the model's vocab is "
                        f"{model.config.vocab_size}: {data_dir} was not tokenized for {model_dir}")
    seq_len = seq_len or min(model.config.max_position_embeddings, 512)
    if seq_len > model.config.max_position_embeddings:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                        f"{model.config.max_position_embeddings}")
    torch_device = torch.device(device)
    model.to(torch_device)
    loss, tokens, seconds = evaluate_loss(model, data.val, batch_size, seq_len, max_tokens, torch_device, dtype,
                                          progress=progress)
    return {"model": str(model_dir), "data": str(data_dir), "loss": loss, "ppl": math.exp(loss), "tokens": tokens,
            "tok_per_s": tokens / seconds if seconds > 0 else float("nan"), "seq_len": seq_len,
            "batch_size": batch_size, "params": count_parameters(model), "dtype": dtype}
