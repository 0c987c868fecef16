"""Streaming `lmprune prepare` (lmprune.prepare): formats, shards read as one stream, determinism
for any --num-proc, resume after a kill, the BPE sample, old data dirs, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmprune.cli import main
from lmprune.data import PreparedData, prepare_corpus, train_bpe_tokenizer
from lmprune.errors import UserError
from lmprune.loader import TokenLoader
from lmprune.prepare import inputs
from lmprune.token_stream import TokenStream

WORDS = "the king queen lord sword crown night day love death heart blood speak hath thou thee art".split()


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + f" ({i})\n" for i in range(n)]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_bpe_tokenizer(_documents(60), 300).save_pretrained(out)
    return out


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of ~2 KB: a corpus of a few hundred KB spans many chunks and shards."""
    monkeypatch.setattr(inputs, "CHUNK_BYTES", 2048)
    monkeypatch.setattr(inputs, "READ_BYTES", 1024)


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _bytes_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def _prepare(source, out: Path, tokenizer_dir: Path, **options) -> PreparedData:
    options.setdefault("progress", False)
    return PreparedData.open(prepare_corpus(str(source), out, tokenizer=tokenizer_dir, val_fraction=0.2, **options))


# ----------------------------------------------------------------------------- formats


def test_every_format_gives_the_same_shards(tmp_path: Path, tokenizer_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    docs = _documents(40)
    plain = _jsonl(tmp_path / "docs.jsonl", docs)
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    pq.write_table(pa.table({"id": list(range(40)), "body": docs}), tmp_path / "docs.parquet", row_group_size=7)
    Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, doc in enumerate(docs):
        (texts / f"{i:03d}.txt").write_text(doc)

    reference = _bytes_of(_prepare(plain, tmp_path / "out-jsonl", tokenizer_dir).path)
    assert sum(len(b) for b in reference.values()) > 0
    for name, source, options in (("gz", tmp_path / "docs.jsonl.gz", {}), ("zst", tmp_path / "docs.jsonl.zst", {}),
                                  ("parquet", tmp_path / "docs.parquet", {"text_field": "body"}),
                                  ("saved", tmp_path / "saved", {}), ("texts", texts, {}),
                                  ("glob", f"{texts}/0*.txt", {})):
        assert _bytes_of(_prepare(source, tmp_path / f"out-{name}", tokenizer_dir, **options).path) == reference, name


def test_datasetdict_split_and_hub_spec_parsing(tmp_path: Path, tokenizer_dir: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": _documents(10)}),
                 "test": Dataset.from_dict({"text": _documents(10, seed=1)})}).save_to_disk(str(tmp_path / "dd"))
    train = _prepare(tmp_path / "dd", tmp_path / "a", tokenizer_dir)
    again = _prepare(f"{tmp_path / 'dd'}@train", tmp_path / "b", tokenizer_dir)
    test = _prepare(f"{tmp_path / 'dd'}@test", tmp_path / "c", tokenizer_dir)
    assert _bytes_of(train.path) == _bytes_of(again.path) != _bytes_of(test.path)
    with pytest.raises(UserError, match="no split 'dev'"):
        _prepare(f"{tmp_path / 'dd'}@dev", tmp_path / "d", tokenizer_dir)
    hub = inputs._HubDataset("hf:org/name:cfg@validation")
    assert (hub.name, hub.config, hub.split) == ("org/name", "cfg", "validation")


def test_unreachable_hub_dataset_is_one_line(tmp_path, tokenizer_dir, capsys, monkeypatch) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _one_line_error(capsys, ["prepare", "--source", "hf:no-org/no-such-set", "--out", str(tmp_path / "out"),
                             "--tokenizer", str(tokenizer_dir), "--quiet"], "cannot stream hf:no-org/no-such-set")
    _nothing_left(tmp_path)


# ----------------------------------------------------------------------------- shards and determinism


def test_shards_read_as_one_stream_and_identical_for_any_num_proc(tmp_path, tokenizer_dir, small_chunks) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", _documents(400))
    one = _prepare(source, tmp_path / "one", tokenizer_dir, num_proc=1, shard_tokens=1000)
    two = _prepare(source, tmp_path / "two", tokenizer_dir, num_proc=2, shard_tokens=1000)
    assert _bytes_of(one.path) == _bytes_of(two.path)
    shards = one.meta["shards"]["train"]
    assert len(shards) > 3 and all(s["tokens"] == 1000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1000
    whole = np.concatenate([np.fromfile(one.path / s["file"], dtype=np.uint16) for s in shards])
    assert len(one.train) == len(whole) == one.meta["train_tokens"]
    assert np.array_equal(one.train[:], whole) and np.array_equal(one.train[995:1010], whole[995:1010])
    starts = np.array([0, 990, 2995, len(whole) - 20])
    assert np.array_equal(one.train.windows(starts, 20), whole[starts[:, None] + np.arange(20)])
    streamed, flat = TokenLoader(one.train, 4, 31, seed=3), TokenLoader(whole, 4, 31, seed=3)
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(streamed.next_batch(), flat.next_batch()))
    # the split is per document, by hash: the same documents land in val as with one chunk
    val_docs = _decoded(one, "val")
    assert one.meta["documents"]["val"] == len(val_docs) > 40 and not set(val_docs) & set(_decoded(one, "train"))


def _decoded(prepared: PreparedData, split: str) -> list[str]:
    tokens = getattr(prepared, split)[:].tolist()
    tokenizer, docs, current = prepared.load_tokenizer(), [], []
    for token in tokens:
        if token == prepared.eos_token_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return docs


def test_killed_prepare_resumes_from_its_checkpoint(tmp_path, tokenizer_dir, small_chunks, capsys) -> None:
    from lmprune import atomic

    source = _jsonl(tmp_path / "docs.jsonl", _documents(300))
    out = tmp_path / "out"
    options = {"tokenizer": tokenizer_dir, "val_fraction": 0.2, "num_proc": 1, "shard_tokens": 1000, "progress": False}
    child = os.fork()  # a process to SIGKILL at its 3rd checkpoint (LMPRUNE_CRASH_AT=prepare.checkpoint:3)
    if child == 0:
        try:
            atomic._CRASH_SITE, atomic._CRASH_N = "prepare.checkpoint", 3
            prepare_corpus(str(source), out, **options)
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    assert not out.exists() and (tmp_path / ".out.partial" / "progress.json").is_file()
    argv = ["prepare", "--source", str(source), "--out", str(out), "--tokenizer", str(tokenizer_dir),
            "--val-fraction", "0.2", "--num-proc", "1", "--shard-tokens", "1000", "--quiet"]
    assert main(argv) == 0
    assert "lmprune: resuming from chunk" in capsys.readouterr().err
    fresh = PreparedData.open(prepare_corpus(str(source), tmp_path / "fresh", **options))
    assert _bytes_of(out) == _bytes_of(fresh.path) and len(fresh.meta["shards"]["train"]) > 3
    assert json.loads((out / "meta.json").read_text()) == fresh.meta
    assert not (tmp_path / ".out.partial").exists()


def test_bpe_is_trained_on_a_bounded_seeded_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmprune import data

    source = _jsonl(tmp_path / "docs.jsonl", _documents(300))
    samples = []
    real = data.train_bpe_tokenizer

    def recording(documents, vocab_size):
        samples.append(list(documents))
        return real(documents, vocab_size)

    monkeypatch.setattr(data, "train_bpe_tokenizer", recording)
    for out in ("a", "b"):
        prepare_corpus(str(source), tmp_path / out, vocab_size=300, tokenizer_sample_bytes=20_000, progress=False)
    assert samples[0] == samples[1] and 10_000 < sum(len(d.encode()) for d in samples[0]) <= 20_000
    assert (tmp_path / "a/tokenizer/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer/tokenizer.json").read_bytes()
    val = set(_decoded(PreparedData.open(tmp_path / "a"), "val"))
    assert val and not val & set(samples[0])  # the sample comes from the train split only


def test_format_1_dirs_are_read_and_refused_for_rewrite_with_a_re_prepare_hint(tmp_path, tokenizer_dir) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", _documents(30))
    prepared = _prepare(source, tmp_path / "old", tokenizer_dir)
    train, val = prepared.train[:], prepared.val[:]
    meta = {k: v for k, v in prepared.meta.items() if k not in ("shards", "shard_tokens")}
    (tmp_path / "old/train-00000.bin").rename(tmp_path / "old/train.bin")
    (tmp_path / "old/val-00000.bin").rename(tmp_path / "old/val.bin")
    (tmp_path / "old/meta.json").write_text(json.dumps({**meta, "version": 1, "fingerprint": "old"}))
    old = PreparedData.open(tmp_path / "old")
    assert np.array_equal(old.train[:], train) and np.array_equal(old.val[:], val)
    with pytest.raises(UserError, match="data format 1: re-prepare"):
        _prepare(source, tmp_path / "old", tokenizer_dir)
    (tmp_path / "old/meta.json").write_text(json.dumps({**meta, "version": 9}))
    with pytest.raises(UserError, match="data format 9.*re-prepare"):
        PreparedData.open(tmp_path / "old")


def test_token_stream_of_mixed_dtypes_is_refused() -> None:
    with pytest.raises(ValueError, match="share a dtype"):
        TokenStream([np.zeros(3, np.uint16), np.zeros(3, np.uint32)])


# ----------------------------------------------------------------------------- bad input


def _one_line_error(capsys, argv: list[str], expected: str) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmprune: error:") and expected in lines[0], lines
    return lines[0]


def _nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_bad_jsonl_lines_name_file_and_line_or_are_skipped_and_counted(tmp_path, tokenizer_dir, capsys) -> None:
    docs = _documents(20)
    lines = [json.dumps({"text": d}) for d in docs]
    lines[7], lines[12] = '{"text": broken', '{"body": "no text field"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    argv = ["prepare", "--source", str(bad), "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir),
            "--quiet", "--num-proc", "1"]
    _one_line_error(capsys, argv, "bad.jsonl:8: not valid JSON")
    _nothing_left(tmp_path)
    assert main([*argv, "--skip-bad-lines"]) == 0
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["skipped_lines"] == 2 and sum(meta["documents"].values()) == 18
    assert "skipped 2 bad JSONL line(s)" in capsys.readouterr().err


def test_parquet_without_the_text_field_and_truncated_archives(tmp_path, tokenizer_dir, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    pq.write_table(pa.table({"body": _documents(5)}), tmp_path / "docs.parquet")
    base = ["--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir), "--quiet", "--num-proc", "1"]
    _one_line_error(capsys, ["prepare", "--source", str(tmp_path / "docs.parquet"), *base],
                    "has no column 'text' (columns: body)")
    raw = "".join(json.dumps({"text": d}) + "\n" for d in _documents(2000)).encode()
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(raw)[:20_000])
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw)[:20_000])
    for name in ("cut.jsonl.gz", "cut.jsonl.zst"):
        _one_line_error(capsys, ["prepare", "--source", str(tmp_path / name), *base], "truncated or corrupt")
        _nothing_left(tmp_path)


def test_missing_extra_names_it(tmp_path, tokenizer_dir, capsys, monkeypatch) -> None:
    (tmp_path / "docs.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError
    _one_line_error(capsys, ["prepare", "--source", str(tmp_path / "docs.jsonl.zst"), "--out", str(tmp_path / "out"),
                             "--tokenizer", str(tokenizer_dir), "--quiet"], "pip install 'lmprune[data]'")


def test_unreadable_shard_is_a_user_error(tmp_path, tokenizer_dir) -> None:
    prepared = _prepare(_jsonl(tmp_path / "docs.jsonl", _documents(30)), tmp_path / "p", tokenizer_dir)
    shard = prepared.path / "val-00000.bin"
    shard.unlink()
    shard.mkdir()  # not a readable file
    with pytest.raises(UserError, match=r"val-00000\.bin: size missing does not match meta.json"):
        PreparedData.open(prepared.path)
