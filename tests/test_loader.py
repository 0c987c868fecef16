"""Training batches (seeded, resumable, per-rank slices) and evaluation windows over token shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmprune.errors import UserError
from lmprune.loader import TokenLoader, val_batches


def _tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint32)  # token i == position i: windows are identifiable


def test_loader_windows_are_shifted_pairs_from_a_seeded_permutation() -> None:
    tokens = _tokens(11 * 40 + 5)  # 40 windows of seq_len 10 + 1
    loader = TokenLoader(tokens, batch_size=4, seq_len=10, seed=0)
    assert loader.batches_per_epoch == 10
    starts = []
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 10) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)
        assert bool((x[:, 0] % 11 == 0).all())  # windows start on the (seq_len + 1) grid
        starts += x[:, 0].tolist()
    assert sorted(starts) == [11 * i for i in range(40)]  # an epoch visits each window once
    assert starts != sorted(starts)
    again = TokenLoader(tokens, batch_size=4, seq_len=10, seed=0)
    assert [again.next_batch()[0][:, 0].tolist() for _ in range(10)] == [starts[i : i + 4] for i in range(0, 40, 4)]
    other = TokenLoader(tokens, batch_size=4, seq_len=10, seed=1)
    assert [other.next_batch()[0][:, 0].tolist() for _ in range(10)] != [starts[i : i + 4] for i in range(0, 40, 4)]
    next_epoch = [loader.next_batch()[0][:, 0].tolist() for _ in range(10)]
    assert loader.state_dict() == {"epoch": 1, "batch_index": 10}
    assert sorted(sum(next_epoch, [])) == sorted(starts) and sum(next_epoch, []) != starts  # re-permuted


def test_loader_resumes_exactly_from_state_dict() -> None:
    tokens = _tokens(9 * 30)
    reference = TokenLoader(tokens, batch_size=3, seq_len=8, seed=5)
    expected = [reference.next_batch() for _ in range(25)]  # 10 batches per epoch: crosses two epochs
    for stop in (0, 7, 10, 13):
        loader = TokenLoader(tokens, batch_size=3, seq_len=8, seed=5)
        for _ in range(stop):
            loader.next_batch()
        state = json.loads(json.dumps(loader.state_dict()))
        resumed = TokenLoader(tokens, batch_size=3, seq_len=8, seed=5)
        resumed.load_state_dict(state)
        for x_expected, y_expected in expected[stop:]:
            x, y = resumed.next_batch()
            assert torch.equal(x, x_expected) and torch.equal(y, y_expected)
    with pytest.raises(UserError, match="outside"):
        TokenLoader(tokens, batch_size=3, seq_len=8, seed=5).load_state_dict({"epoch": 0, "batch_index": 11})


def test_ranks_together_see_the_single_process_batches() -> None:
    tokens = _tokens(7 * 50)
    single = TokenLoader(tokens, batch_size=4, seq_len=6, seed=2)
    ranks = [TokenLoader(tokens, batch_size=2, seq_len=6, seed=2, rank=r, world_size=2) for r in range(2)]
    assert single.batches_per_epoch == ranks[0].batches_per_epoch == 12
    for _ in range(30):  # past two epoch boundaries
        x_single, y_single = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x_single)
        assert torch.equal(torch.cat([p[1] for p in parts]), y_single)


def test_loader_refuses_data_smaller_than_one_global_batch() -> None:
    with pytest.raises(UserError, match=r"need 4,112 tokens, the split has 4,000"):
        TokenLoader(_tokens(4000), batch_size=8, seq_len=256, seed=0, world_size=2)


def test_val_batches_cover_contiguous_targets_up_to_max_tokens() -> None:
    tokens = _tokens(105)
    batches = list(val_batches(tokens, batch_size=4, seq_len=10))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    assert targets.tolist() == list(range(1, 101))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    capped = list(val_batches(tokens, batch_size=4, seq_len=10, max_tokens=35))
    assert sum(y.numel() for _, y in capped) == 30
    with pytest.raises(UserError, match="needs 11"):
        val_batches(_tokens(10), batch_size=4, seq_len=10)
    with pytest.raises(UserError, match="smaller than one window"):
        val_batches(tokens, batch_size=4, seq_len=10, max_tokens=5)


