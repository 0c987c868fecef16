"""Hub model ids (`org/name[@revision]`) resolved from a hand-built HF cache, offline."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_run_config, write_config
from lmprune.cli import main
from lmprune.errors import UserError
from lmprune.hub import hub_offline, parse_hub_id
from lmprune.sources import resolve_model

MAIN_COMMIT = "a" * 40
DEV_COMMIT = "b" * 40
PINNED_COMMIT = "c" * 40  # a snapshot no ref points at: reachable only as @commit


def tiny_llama(path: Path, hidden: int = 16) -> Path:
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=64)).save_pretrained(path)
    return path


def add_snapshot(cache: Path, repo: str, commit: str, model_dir: Path, ref: str | None) -> Path:
    """What huggingface_hub writes: blobs by hash, snapshots/COMMIT/* as relative symlinks, refs/REF."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for file in model_dir.iterdir():
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """org/tiny: main (hidden 16), dev (hidden 32), and a pinned commit (hidden 48); offline."""
    cache = tmp_path / "hf-cache"
    for commit, ref, hidden in ((MAIN_COMMIT, "main", 16), (DEV_COMMIT, "dev", 32), (PINNED_COMMIT, None, 48)):
        add_snapshot(cache, "org/tiny", commit, tiny_llama(tmp_path / f"m{hidden}", hidden), ref)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def expect_one_line(capsys, argv: list[str], fragment: str) -> None:
    capsys.readouterr()  # drop what building the fixtures printed
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err, err


def hidden_size(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["hidden_size"]


def test_hub_ids_are_parsed():
    assert parse_hub_id("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_an_id in ("smollm2-135m", "org//name", "org/na me", "a/b/c", "/abs/path", "./rel/dir", "org/..", "org/x@"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_offline_resolution_from_the_cache_by_ref_branch_and_commit(hub_cache):
    main_dir = resolve_model("org/tiny")
    assert main_dir == hub_cache / "models--org--tiny" / "snapshots" / MAIN_COMMIT and hidden_size(main_dir) == 16
    assert hidden_size(resolve_model("org/tiny@dev")) == 32
    assert hidden_size(resolve_model(f"org/tiny@{PINNED_COMMIT}")) == 48
    assert hidden_size(resolve_model(f"org/tiny@{DEV_COMMIT}")) == 32


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(hub_cache, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (hub_cache).rename(home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert resolve_model("org/tiny") == home / "hub" / "models--org--tiny" / "snapshots" / MAIN_COMMIT


def test_an_existing_local_dir_wins_over_the_hub_id(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_llama(tmp_path / "org" / "tiny", hidden=64)
    assert resolve_model("org/tiny") == Path("org/tiny") and hidden_size(Path("org/tiny")) == 64


@pytest.mark.parametrize("name, fragment", [
    ("org/tinny", "org/tinny is not in the HF cache"),  # a typo: not cached, and offline
    ("org/tiny@no-such-branch", "revision no-such-branch"),
    ("org/ti ny", "nor a Hub id (org/name[@revision])"),
    ("org//tiny", "nor a Hub id"),
])
def test_ids_neither_cached_nor_valid_are_one_line_exit_2(hub_cache, prepared_dir, capsys, name, fragment):
    expect_one_line(capsys, ["eval", name, "--data", str(prepared_dir)], fragment)


def test_a_cached_model_asking_for_remote_code_is_refused(hub_cache, tmp_path, prepared_dir, capsys):
    model = tiny_llama(tmp_path / "remote")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    add_snapshot(hub_cache, "evil/remote", MAIN_COMMIT, model, "main")
    expect_one_line(capsys, ["eval", "evil/remote", "--data", str(prepared_dir)], "lmprune never runs remote code")


def test_eval_prune_and_train_accept_a_cached_hub_id(hub_cache, tmp_path, prepared_dir, capsys):
    assert main(["eval", "org/tiny", "--data", str(prepared_dir), "--max-tokens", "256", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"].endswith(MAIN_COMMIT) and result["ppl"] > 1
    assert main(["prune", "org/tiny@dev", "--calib", str(prepared_dir), "--out", str(tmp_path / "pruned"),
                 "--criterion", "magnitude", "--ffn-ratio", "0.5", "--calib-samples", "4",
                 "--calib-seq-len", "32", "--json"]) == 0
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["intermediate_size"] == 16
    capsys.readouterr()
    raw = tiny_run_config(prepared_dir, steps=2, eval_every=0, sample_tokens=0)
    raw["model"] = {"preset": None, "path": "org/tiny"}
    raw["pipeline"] = {"name": "scratch"}
    raw["kd"] = {"teacher": "org/tiny@dev", "alpha": 0.5}
    cfg = write_config(tmp_path / "run.yaml", raw)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert hidden_size(tmp_path / "run" / "final") == 16


def test_a_bad_kd_teacher_id_fails_before_training(hub_cache, tmp_path, prepared_dir, capsys):
    raw = tiny_run_config(prepared_dir, steps=2)
    raw["pipeline"] = {"name": "scratch"}
    raw["kd"] = {"teacher": "org/no-such-teacher"}
    cfg = write_config(tmp_path / "run.yaml", raw)
    expect_one_line(capsys, ["train", str(cfg), "--out", str(tmp_path / "run"), "--quiet"],
                    "org/no-such-teacher is not in the HF cache")
    assert not (tmp_path / "run" / "run_config.json").exists()


def test_an_unreachable_hub_falls_back_to_the_cache_then_one_line_exit_2(hub_cache, prepared_dir, capsys,
                                                                         monkeypatch):
    """Online mode with a Hub that refuses connections (a closed local port): a cached id still resolves;
    an uncached one is one line and exit 2 (no retry warnings)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # in case the CI environment set it at import
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert not hub_offline()
    assert main(["eval", "org/tiny", "--data", str(prepared_dir), "--max-tokens", "128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"].endswith(MAIN_COMMIT)
    expect_one_line(capsys, ["eval", "org/other", "--data", str(prepared_dir)],
                    "the Hub (http://127.0.0.1:9) cannot be reached and the model is not in the HF cache")


def test_resolve_model_error_is_a_user_error(hub_cache):
    with pytest.raises(UserError, match="not in the HF cache"):
        resolve_model("someone/else")
