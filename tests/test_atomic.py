"""lmprune.atomic: atomic file / dir writes, safe deletion, and the fsyncs behind them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from lmprune import atomic
from lmprune.atomic import atomic_dir, atomic_file, fsync_dir, remove_tree, sha256_file, write_json, write_text


class Boom(Exception):
    pass


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def fsyncs(monkeypatch):
    """Count os.fsync calls (they still happen)."""
    calls = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", counting)
    return calls


# ---------------------------------------------------------------- sha256_file / fsync_dir


def test_sha256_file_matches_hashlib_on_a_file_over_one_block(tmp_path):
    data = os.urandom((1 << 20) * 2 + 12345)  # > 1 MiB and not a multiple of the block size
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_sha256_file_of_an_empty_file(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_fsync_dir_fsyncs(tmp_path, fsyncs):
    fsync_dir(tmp_path)
    assert len(fsyncs) == 1


# ---------------------------------------------------------------- atomic_file / write_text / write_json


def test_atomic_file_writes_and_replaces(tmp_path):
    path = tmp_path / "a.txt"
    with atomic_file(path) as handle:
        handle.write("first")
    assert path.read_text() == "first"
    with atomic_file(path) as handle:
        handle.write("second")
        assert path.read_text() == "first"  # not visible before the block ends
        assert Path(handle.name).name == f".a.txt.tmp-{os.getpid()}"
    assert path.read_text() == "second"
    assert names(tmp_path) == ["a.txt"]


def test_atomic_file_binary_mode(tmp_path):
    path = tmp_path / "a.bin"
    with atomic_file(path, "wb", encoding="ignored-in-binary-mode") as handle:
        handle.write(b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"


def test_atomic_file_text_encoding(tmp_path):
    path = tmp_path / "a.txt"
    with atomic_file(path, "w", encoding="latin-1") as handle:
        handle.write("é")
    assert path.read_bytes() == b"\xe9"


def test_atomic_file_handle_name_works_for_path_writers(tmp_path):
    path = tmp_path / "a.bin"
    with atomic_file(path, "wb") as handle:
        Path(handle.name).write_bytes(b"written by name")
    assert path.read_bytes() == b"written by name"
    assert names(tmp_path) == ["a.bin"]


def test_atomic_file_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(Boom):
        with atomic_file(path) as handle:
            handle.write("half of the new")
            raise Boom
    assert path.read_text() == "old"
    assert names(tmp_path) == ["a.txt"]


def test_atomic_file_failure_without_an_old_file_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_file(tmp_path / "a.txt") as handle:
            handle.write("x")
            raise Boom
    assert names(tmp_path) == []


def test_atomic_file_rejects_other_modes(tmp_path):
    for mode in ("a", "r", "w+", "x"):
        with pytest.raises(ValueError):
            with atomic_file(tmp_path / "a", mode):
                pass
    assert names(tmp_path) == []


def test_atomic_file_fsyncs_the_file_and_its_directory(tmp_path, fsyncs, monkeypatch):
    dirs = []
    real_fsync_dir = atomic.fsync_dir
    monkeypatch.setattr(atomic, "fsync_dir", lambda p: (dirs.append(Path(p)), real_fsync_dir(p)))
    write_text(tmp_path / "a.txt", "x")
    assert dirs == [tmp_path]
    assert len(fsyncs) == 2  # the file, then the directory


def test_write_text(tmp_path):
    write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"


def test_write_json_round_trip_sorted_with_trailing_newline(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"z": "ü", "y": True}}
    path = tmp_path / "x.json"
    write_json(path, obj)
    text = path.read_text()
    assert json.loads(text) == obj
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text == json.dumps(obj, indent=2, sort_keys=True) + "\n"


def test_write_json_options(tmp_path):
    obj = {"b": 1, "a": 2}
    write_json(tmp_path / "x.json", obj, indent=None, sort_keys=False)
    assert (tmp_path / "x.json").read_text() == '{"b": 1, "a": 2}\n'


def test_write_json_unserializable_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert names(tmp_path) == ["x.json"]


# ---------------------------------------------------------------- atomic_dir


def fill(directory: Path, tag: str) -> None:
    (directory / "a.txt").write_text(tag)
    (directory / "sub").mkdir()
    (directory / "sub" / "b.txt").write_text(tag)


def test_atomic_dir_creates_target(tmp_path):
    target = tmp_path / "parent" / "out"  # the parent is created
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.name == f".out.tmp-{os.getpid()}"
        assert not target.exists()
        fill(tmp, "new")
    assert (target / "sub" / "b.txt").read_text() == "new"
    assert names(target.parent) == ["out"]


def test_atomic_dir_replaces_an_existing_dir_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_dir(target) as tmp:
        fill(tmp, "new")
        assert (target / "stale.txt").read_text() == "old"  # untouched until the block ends
    assert names(target) == ["a.txt", "sub"]
    assert (target / "a.txt").read_text() == "new"
    assert names(tmp_path) == ["out"]  # no .tmp- or .old- left


def test_atomic_dir_without_replace_refuses_an_existing_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_dir(target, replace=False) as tmp:
            fill(tmp, "new")
    assert names(target) == ["keep.txt"]
    assert names(tmp_path) == ["out"]


def test_atomic_dir_without_replace_creates_a_missing_target(tmp_path):
    with atomic_dir(tmp_path / "out", replace=False) as tmp:
        fill(tmp, "new")
    assert (tmp_path / "out" / "a.txt").read_text() == "new"


def test_atomic_dir_failure_keeps_the_old_dir_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    fill(target, "old")
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            fill(tmp, "new")
            raise Boom
    assert (target / "a.txt").read_text() == "old" and (target / "sub" / "b.txt").read_text() == "old"
    assert names(tmp_path) == ["out"]


def test_atomic_dir_failure_without_an_old_dir_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "out") as tmp:
            fill(tmp, "new")
            raise Boom
    assert names(tmp_path) == []


def test_atomic_dir_removes_a_stale_temp_dir_of_the_same_name(tmp_path):
    stale = tmp_path / f".out.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "junk.txt").write_text("left by a killed run")
    with atomic_dir(tmp_path / "out") as tmp:
        assert names(tmp) == []
        (tmp / "a.txt").write_text("new")
    assert names(tmp_path / "out") == ["a.txt"]
    assert names(tmp_path) == ["out"]


def test_atomic_dir_failed_rename_restores_the_old_dir(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    fill(target, "old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("simulated rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        with atomic_dir(target) as tmp:
            fill(tmp, "new")
    assert (target / "a.txt").read_text() == "old"
    assert names(tmp_path) == ["out"]


def test_atomic_dir_fsyncs_every_file_and_dir(tmp_path, fsyncs, monkeypatch):
    dirs = []
    real_fsync_dir = atomic.fsync_dir
    monkeypatch.setattr(atomic, "fsync_dir", lambda p: (dirs.append(Path(p).name), real_fsync_dir(p)))
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        fill(tmp, "new")  # 2 files, 1 subdir
    tmp_name = f".out.tmp-{os.getpid()}"
    assert sorted(dirs) == sorted(["sub", tmp_name, tmp_path.name])  # subdir, the temp dir, the parent
    assert dirs[-1] == tmp_path.name  # the parent last, after the rename
    assert len(fsyncs) == 2 + 3


# ---------------------------------------------------------------- remove_tree


def test_remove_tree_leaves_nothing(tmp_path, fsyncs):
    target = tmp_path / "step-000010"
    target.mkdir()
    fill(target, "x")
    (tmp_path / "other").mkdir()
    remove_tree(target)
    assert names(tmp_path) == ["other"]
    assert len(fsyncs) == 1  # the parent, after the rename


def test_remove_tree_renames_before_deleting(tmp_path, monkeypatch):
    target = tmp_path / "doomed"
    target.mkdir()
    fill(target, "x")
    seen = []
    real_rmtree = atomic.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        seen.append((Path(path).name, target.exists()))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    remove_tree(target)
    assert seen == [(f".doomed.deleting-{os.getpid()}", False)]  # gone from its name before any delete
    assert names(tmp_path) == []


def test_remove_tree_missing_or_not_a_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        remove_tree(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        remove_tree(tmp_path / "file")
    assert names(tmp_path) == ["file"]


# ---------------------------------------------------------------- the converted callers


def test_save_compact_leaves_only_the_compact_file(tmp_path):
    torch = pytest.importorskip("torch")
    from lmprune.pruning.sparse.export import COMPACT_FILENAME, load_compact, save_compact

    state = {"layer.weight": torch.tensor([[0.0, 1.5], [-0.0, 0.0]]), "bias": torch.ones(2)}
    save_compact(state, tmp_path, patterns=["*weight"])
    assert names(tmp_path) == [COMPACT_FILENAME]
    loaded = load_compact(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_save_checkpoint_keeps_last_and_leaves_no_temp_dirs(tmp_path):
    torch = pytest.importorskip("torch")
    from lmprune import checkpoint

    class Config:
        def to_dict(self):
            return {"hidden": 3}

    model = torch.nn.Linear(3, 3)
    model.config = Config()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 30):  # the last one re-saves step 30
        checkpoint.save_checkpoint(root, step, model, optimizer, {"step": step}, {"run": 1}, None, keep_last=2)
    assert names(root) == ["step-000020", "step-000030"]  # nothing hidden left: no .tmp-, .old-, .deleting-
    for path in root.iterdir():
        assert checkpoint.checkpoint_problem(path) is None
    manifest = json.loads((root / "step-000030" / checkpoint.MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(set(names(root / "step-000030")) - {checkpoint.MANIFEST})
    assert checkpoint.load_checkpoint_meta(root / "step-000030")["trainer_state"]["step"] == 30
