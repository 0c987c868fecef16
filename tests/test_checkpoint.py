"""Unit tests of lmprune.checkpoint: manifest, round trips, keep-last, skipping damaged checkpoints.

Only the public behaviour is tested (not private helper names): the write-order check observes the
files being opened for writing, whichever module does the writing.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import random
import re
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmprune.checkpoint import (
    capture_rng,
    checkpoint_problem,
    complete_checkpoints,
    join_state,
    latest_checkpoint,
    load_checkpoint_meta,
    load_extra,
    load_model_weights,
    load_optimizer_state,
    optimizer_from_flat,
    optimizer_to_flat,
    restore_rng,
    save_checkpoint,
    split_state,
)
from lmprune.errors import UserError

MANIFEST = "manifest.json"
DOCUMENTED_FILES = {"model.safetensors", "model_config.json", "optimizer.safetensors", "optimizer.json",
                    "extra.safetensors", "trainer_state.json", "run_config.json"}
RUN_CONFIG = {"train": {"steps": 5, "lr": 0.001}, "model": {"preset": "tiny"}, "out_dir": "/x/out"}


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=True)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides))


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    ids = batch(seed)
    loss = model(input_ids=ids, labels=ids).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def make_optimizer(model: torch.nn.Module, lr: float = 1e-2) -> torch.optim.AdamW:
    # two groups with distinct hyper-parameters, so param_groups must come back group by group
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0, "lr": lr / 2}],
                             lr=lr, betas=(0.8, 0.95), eps=1e-7)


@pytest.fixture
def trained():
    model = tiny_model(0)
    optimizer = make_optimizer(model)
    for seed in (1, 2):
        train_step(model, optimizer, seed)
    return model, optimizer


def save(root: Path, step: int, model, optimizer, keep_last: int = 10, pruner_state=None,
         trainer_state: dict | None = None) -> Path:
    state = {"step": step, "tokens": 16 * step} if trainer_state is None else trainer_state
    return save_checkpoint(root, step, model, optimizer, state, RUN_CONFIG, pruner_state, keep_last)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- manifest ----------------------------------------------------------------------------------

def test_manifest_lists_every_other_file_with_sha256_and_size(tmp_path, trained):
    path = save(tmp_path / "ckpt", 3, *trained)
    assert path == tmp_path / "ckpt" / "step-000003"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == 1
    assert manifest["step"] == 3
    on_disk = {p.name for p in path.iterdir()}
    assert MANIFEST in on_disk
    assert set(manifest["files"]) == on_disk - {MANIFEST}
    assert DOCUMENTED_FILES <= set(manifest["files"])
    for name, info in manifest["files"].items():
        assert info["sha256"] == sha256(path / name), name
        assert info["bytes"] == (path / name).stat().st_size, name
        assert info["bytes"] > 0, name
    assert checkpoint_problem(path) is None


def test_manifest_is_written_last(tmp_path, trained, monkeypatch):
    """When the manifest is first touched (opened for writing, directly or under a temp name, or
    renamed into place) every other file already exists under its final name, and no other checkpoint
    file is written or renamed into place afterwards. Observed through open/os.open/rename/replace, so
    it holds whichever module does the writing and whether files are written in place or via temp."""
    events: list[tuple[Path, str, frozenset]] = []  # (dir, name, names present in dir at that moment)

    def record(file, writing: bool = True) -> None:
        if not writing or isinstance(file, int):
            return
        p = Path(os.fsdecode(file))
        if "step-" in p.parent.name:
            present = frozenset(c.name for c in p.parent.iterdir()) if p.parent.is_dir() else frozenset()
            events.append((p.parent, p.name, present))

    real_open, real_io_open = builtins.open, io.open
    real_os_open, real_rename, real_replace = os.open, os.rename, os.replace

    def wrapped_open(file, mode="r", *args, **kwargs):
        record(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def wrapped_io_open(file, mode="r", *args, **kwargs):
        record(file, any(c in mode for c in "wax+"))
        return real_io_open(file, mode, *args, **kwargs)

    def wrapped_os_open(path, flags, *args, **kwargs):
        record(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
        return real_os_open(path, flags, *args, **kwargs)

    def wrapped_rename(src, dst, *args, **kwargs):
        record(dst)
        return real_rename(src, dst, *args, **kwargs)

    def wrapped_replace(src, dst, *args, **kwargs):
        record(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", wrapped_open)
    monkeypatch.setattr(io, "open", wrapped_io_open)
    monkeypatch.setattr(os, "open", wrapped_os_open)
    monkeypatch.setattr(os, "rename", wrapped_rename)
    monkeypatch.setattr(os, "replace", wrapped_replace)
    path = save(tmp_path / "ckpt", 1, *trained)
    monkeypatch.undo()

    listed = set(json.loads((path / MANIFEST).read_text())["files"])

    def logical(name: str) -> str | None:  # "model.json" for "model.json" or ".model.json.tmp-123"
        if MANIFEST in name:
            return MANIFEST
        return next((file for file in listed if file in name), None)

    touches = [i for i, (_, name, _) in enumerate(events) if logical(name) == MANIFEST]
    assert touches, f"the manifest write was not observed: {events}"
    first = touches[0]
    ckpt_dir, _, present = events[first]
    assert listed <= present, f"manifest written before {sorted(listed - present)}"
    later = [name for d, name, _ in events[first + 1:] if d == ckpt_dir and logical(name) not in (None, MANIFEST)]
    assert later == [], f"written after the manifest: {later}"
    # and by the clock: nothing in the final dir is newer than the manifest
    newest_other = max((path / name).stat().st_mtime_ns for name in listed)
    assert (path / MANIFEST).stat().st_mtime_ns >= newest_other


def test_save_leaves_no_temp_dir(tmp_path, trained):
    root = tmp_path / "ckpt"
    save(root, 1, *trained)
    save(root, 2, *trained)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]


# ---- round trips -------------------------------------------------------------------------------

def test_meta_round_trip(tmp_path, trained):
    model, optimizer = trained
    path = save(tmp_path / "ckpt", 7, model, optimizer, trainer_state={"step": 7, "tokens": 112,
                                                                        "loader": {"epoch": 1, "pos": [3, 4]}})
    meta = load_checkpoint_meta(path)
    assert meta["run_config"] == RUN_CONFIG
    ts = meta["trainer_state"]
    assert (ts["step"], ts["tokens"], ts["loader"]) == (7, 112, {"epoch": 1, "pos": [3, 4]})
    assert ts["pruner"] is None
    assert meta["model_config"] == json.loads(json.dumps(model.config.to_dict()))
    rebuilt = LlamaConfig.from_dict(meta["model_config"])
    assert (rebuilt.hidden_size, rebuilt.num_hidden_layers, rebuilt.vocab_size) == (32, 2, 64)
    assert rebuilt.tie_word_embeddings is True


def test_weights_round_trip_and_embedding_stays_tied(tmp_path, trained):
    model, optimizer = trained
    path = save(tmp_path / "ckpt", 2, model, optimizer)
    fresh = tiny_model(seed=123)
    assert not torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    load_model_weights(path, fresh)
    want = model.state_dict()
    got = fresh.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    ids = batch(9)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    # still one shared tensor: lm_head follows an in-place change of the embedding
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        fresh.model.embed_tokens.weight[0, 0] = 123.0
    assert fresh.lm_head.weight[0, 0] == 123.0


def test_weights_of_another_shape_raise_user_error(tmp_path, trained):
    path = save(tmp_path / "ckpt", 2, *trained)
    with pytest.raises(UserError, match="model weights do not load"):
        load_model_weights(path, tiny_model(intermediate_size=48))


def test_adamw_state_and_param_groups_round_trip(tmp_path, trained):
    model, optimizer = trained
    path = save(tmp_path / "ckpt", 2, model, optimizer)
    meta = load_checkpoint_meta(path)

    model2 = tiny_model(seed=5)
    load_model_weights(path, model2)
    optimizer2 = make_optimizer(model2, lr=0.5)  # different hyper-parameters until loaded
    optimizer2.param_groups[0]["betas"] = (0.1, 0.2)
    load_optimizer_state(path, optimizer2, meta["optimizer"])

    want, got = optimizer.state_dict(), optimizer2.state_dict()
    assert len(got["param_groups"]) == len(want["param_groups"]) == 2
    for g_want, g_got in zip(want["param_groups"], got["param_groups"]):
        for key in ("lr", "weight_decay", "eps", "params"):
            assert g_got[key] == g_want[key], key
        assert tuple(g_got["betas"]) == tuple(g_want["betas"]) == (0.8, 0.95)
    assert set(got["state"]) == set(want["state"]) and len(want["state"]) == len(list(model.parameters()))
    for index, s_want in want["state"].items():
        s_got = got["state"][index]
        assert set(s_got) == set(s_want) >= {"exp_avg", "exp_avg_sq", "step"}
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s_got[key], s_want[key]), (index, key)
        assert float(s_got["step"]) == float(s_want["step"]) == 2.0
    # the restored optimizer takes exactly the same next step
    train_step(model, optimizer, seed=3)
    train_step(model2, optimizer2, seed=3)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), name


def test_optimizer_flat_round_trip():
    model = tiny_model(0)
    optimizer = make_optimizer(model)
    train_step(model, optimizer, seed=1)
    tensors, meta = optimizer_to_flat(optimizer)
    assert all(torch.is_tensor(v) for v in tensors.values())
    json.dumps(meta)  # the non-tensor part must be plain JSON
    back = optimizer_from_flat(tensors, json.loads(json.dumps(meta)))
    want = optimizer.state_dict()
    assert set(back["state"]) == set(want["state"])
    for index in want["state"]:
        for key, value in want["state"][index].items():
            assert torch.equal(back["state"][index][key], value), (index, key)
    assert [g["params"] for g in back["param_groups"]] == [g["params"] for g in want["param_groups"]]


def draws() -> tuple:
    return (torch.rand(4).tolist(), torch.randn(3).tolist(), np.random.rand(3).tolist(),
            np.random.standard_normal(3).tolist(), random.random(), random.gauss(0.0, 1.0))


def test_rng_states_round_trip(tmp_path, trained):
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    # leave a cached gaussian in numpy's and python's state (extra fields of those states)
    np.random.standard_normal()
    random.gauss(0.0, 1.0)
    path = save(tmp_path / "ckpt", 2, *trained)
    after_save = draws()
    moved_on = draws()
    assert moved_on != after_save
    restore_ts = load_checkpoint_meta(path)["trainer_state"]
    assert load_extra(path, restore_ts) is None  # no pruner
    assert draws() == after_save


def test_capture_restore_rng_direct():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    random.gauss(0.0, 1.0)
    tensors, meta = capture_rng()
    first = draws()
    meta = json.loads(json.dumps(meta))  # stored as JSON
    restore_rng(tensors, meta)
    assert draws() == first


def test_pruner_state_round_trip(tmp_path, trained):
    pruner_state = {
        "mask.layers.0": torch.tensor([[True, False, True], [False, False, True]]),
        "scores": torch.linspace(-1.0, 1.0, 7, dtype=torch.float32),
        "counts": torch.arange(5, dtype=torch.int64),
        "half": torch.tensor([0.5, -2.25], dtype=torch.bfloat16),
        "step": 3,
        "history": [1.5, 2.0, 0.125],
        "method": "magnitude",
        "nested": {"a": [1, 2], "b": None},
        "done": False,
    }
    path = save(tmp_path / "ckpt", 2, *trained, pruner_state=pruner_state)
    back = load_extra(path, load_checkpoint_meta(path)["trainer_state"])
    assert set(back) == set(pruner_state)
    for key, value in pruner_state.items():
        if torch.is_tensor(value):
            assert torch.is_tensor(back[key]) and back[key].dtype == value.dtype, key
            assert torch.equal(back[key], value), key
        else:
            assert back[key] == value and type(back[key]) is type(value), key


def test_empty_pruner_state_is_not_none(tmp_path, trained):
    path = save(tmp_path / "ckpt", 2, *trained, pruner_state={})
    assert load_extra(path, load_checkpoint_meta(path)["trainer_state"]) == {}


def test_split_join_state():
    state = {"w": torch.ones(2, 3), "ids": torch.tensor([4, 5]), "n": 7, "name": "x", "list": [1, 2]}
    tensors, meta = split_state(state, "pruner")
    assert set(tensors) == {"pruner.w", "pruner.ids"}
    assert meta == {"n": 7, "name": "x", "list": [1, 2]}
    # tensors of other prefixes (e.g. RNG) in the same store are not picked up
    back = join_state(dict(tensors, **{"rng.torch": torch.zeros(1), "prunerx.y": torch.zeros(1)}),
                      json.loads(json.dumps(meta)), "pruner")
    assert set(back) == set(state)
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["ids"], state["ids"])
    assert (back["n"], back["name"], back["list"]) == (7, "x", [1, 2])


# ---- keep-last and re-save ---------------------------------------------------------------------

def test_keep_last_leaves_the_two_newest(tmp_path, trained):
    root = tmp_path / "ckpt"
    for step in range(1, 6):
        save(root, step, *trained, keep_last=2)
        assert len(list(root.iterdir())) == min(step, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000005"]
    assert [p.name for p in complete_checkpoints(root)] == ["step-000004", "step-000005"]


def test_resave_of_the_same_step_replaces_it(tmp_path, trained):
    model, optimizer = trained
    root = tmp_path / "ckpt"
    save(root, 4, model, optimizer, keep_last=2)
    first_weights = sha256(root / "step-000004" / "model.safetensors")
    train_step(model, optimizer, seed=7)
    save(root, 4, model, optimizer, keep_last=2, trainer_state={"step": 4, "marker": "second"})
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]
    path = root / "step-000004"
    assert checkpoint_problem(path) is None
    assert load_checkpoint_meta(path)["trainer_state"]["marker"] == "second"
    assert sha256(path / "model.safetensors") != first_weights
    fresh = tiny_model(seed=9)
    load_model_weights(path, fresh)
    assert torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)


# ---- skipping damaged checkpoints --------------------------------------------------------------

def _no_manifest(path: Path) -> None:
    (path / MANIFEST).unlink()


def _truncate(path: Path) -> None:
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


def _flip_byte(path: Path) -> None:
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    at = 8 + header_len + (len(data) - 8 - header_len) // 2  # inside the tensor data
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


def _missing_file(path: Path) -> None:
    (path / "optimizer.json").unlink()


def _bad_manifest_json(path: Path) -> None:
    text = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text(text[: len(text) // 2])


DAMAGES = {
    "no_manifest": (_no_manifest, r"no manifest"),
    "truncated": (_truncate, r"model\.safetensors is truncated"),
    "flipped_byte": (_flip_byte, r"model\.safetensors is corrupted \(checksum mismatch\)"),
    "missing_file": (_missing_file, r"missing optimizer\.json"),
    "bad_manifest_json": (_bad_manifest_json, r"unreadable manifest"),
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_damaged_newest_checkpoint_is_skipped(tmp_path, trained, kind):
    damage, reason = DAMAGES[kind]
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save(root, step, *trained)
    bad = root / "step-000003"
    size_before = (bad / "model.safetensors").stat().st_size
    damage(bad)
    if kind == "flipped_byte":
        assert (bad / "model.safetensors").stat().st_size == size_before
        assert checkpoint_problem(bad, verify=False) is None  # size-only check cannot see it

    problem = checkpoint_problem(bad)
    assert problem is not None and re.search(reason, problem), problem
    for good in ("step-000001", "step-000002"):
        assert checkpoint_problem(root / good) is None
    with pytest.warns(UserWarning, match=r"skipping checkpoint step-000003: " + reason):
        found = complete_checkpoints(root)
    assert [p.name for p in found] == ["step-000001", "step-000002"]
    with pytest.warns(UserWarning, match=reason):
        assert latest_checkpoint(root) == root / "step-000002"
    with pytest.raises(UserError, match=reason):
        load_checkpoint_meta(bad)


def test_damaged_middle_checkpoint_is_skipped_newest_kept(tmp_path, trained):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save(root, step, *trained)
    _flip_byte(root / "step-000002")
    with pytest.warns(UserWarning, match="step-000002"):
        assert [p.name for p in complete_checkpoints(root)] == ["step-000001", "step-000003"]
    with pytest.warns(UserWarning, match="step-000002"):
        assert latest_checkpoint(root) == root / "step-000003"


def test_each_damage_has_a_distinct_reason(tmp_path, trained):
    root = tmp_path / "ckpt"
    model, optimizer = trained
    reasons = {}
    for step, (kind, (damage, _)) in enumerate(DAMAGES.items(), start=1):
        path = save(root, step, model, optimizer)
        damage(path)
        reasons[kind] = checkpoint_problem(path)
    assert None not in reasons.values()
    assert len(set(reasons.values())) == len(DAMAGES), reasons
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_checkpoint(root) is None
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(DAMAGES)
    for reason in reasons.values():
        assert any(reason in m for m in messages), reason


def test_missing_or_empty_root(tmp_path):
    assert complete_checkpoints(tmp_path / "nope") == []
    assert latest_checkpoint(tmp_path / "nope") is None
    (tmp_path / "empty").mkdir()
    assert latest_checkpoint(tmp_path / "empty") is None


# ---- temp dirs ---------------------------------------------------------------------------------

def test_leftover_temp_dirs_are_never_checkpoints(tmp_path, trained):
    root = tmp_path / "ckpt"
    save(root, 1, *trained)
    save(root, 2, *trained)
    # complete-looking, newer leftovers (killed between manifest and rename, or mid-replace/delete),
    # in the old (.tmp-step-N-pid) and the current (.step-N.tmp-pid, .old-, .deleting-) naming,
    # and a half-written one
    for leftover in (".tmp-step-000009-4242", ".step-000009.tmp-4242", ".step-000008.old-1",
                     ".step-000007.deleting-2"):
        shutil.copytree(root / "step-000002", root / leftover)
        assert checkpoint_problem(root / leftover) is None  # complete content: only the name excludes it
    (root / ".tmp-step-000010-77").mkdir()
    (root / ".tmp-step-000010-77" / "model.safetensors").write_bytes(b"partial")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = complete_checkpoints(root)
        latest = latest_checkpoint(root)
    assert [p.name for p in found] == ["step-000001", "step-000002"]
    assert latest == root / "step-000002"
    assert caught == []
    # nor are they counted (or kept instead of real checkpoints) by keep-last
    save(root, 3, *trained, keep_last=2)
    assert [p.name for p in complete_checkpoints(root)] == ["step-000002", "step-000003"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-000002",
                                                                                      "step-000003"]


# ---- a damaged manifest is reported, never raised (a resume skips the dir) -------------------

@pytest.mark.parametrize("content", [b"\xff\xfe\x00 not utf-8", b'{"files": []}',
                                     b'{"format": 1, "step": 1, "files": {"model.safetensors": {}}}',
                                     b'{"files": {"../../outside": {"bytes": 1, "sha256": "x"}}}'],
                         ids=["binary", "files_is_list", "entry_without_bytes", "name_outside_the_dir"])
def test_malformed_manifest_is_reported_not_raised(tmp_path, trained, content):
    path = save(tmp_path / "ckpt", 1, *trained)
    (path / MANIFEST).write_bytes(content)
    problem = checkpoint_problem(path)
    assert problem is not None and "manifest" in problem
