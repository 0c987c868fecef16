"""Bad input gets one clear line on stderr and exit code 2, before any work starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_run_config, write_config
from lmprune.cli import main


def expect_user_error(capsys, argv: list[str], fragment: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("lmprune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    return lines[0]


def train_argv(tmp_path: Path, raw: dict, *extra: str) -> list[str]:
    cfg = write_config(tmp_path / "run.yaml", raw)
    return ["train", str(cfg), "--out", str(tmp_path / "out"), "--quiet", *extra]


@pytest.mark.parametrize("train_override, fragment", [
    ({"lr": 0.0}, "train.lr must be > 0"),
    ({"steps": 10, "warmup": 50}, "warmup (50) must be in [0, steps=10]"),
    ({"batch_size": 0}, "train.batch_size must be > 0"),
    ({"learning_rate": 1e-3}, "train.learning_rate: unknown key"),
])
def test_bad_config_values(tmp_path, prepared_dir, capsys, train_override, fragment):
    expect_user_error(capsys, train_argv(tmp_path, tiny_run_config(prepared_dir, **train_override)), fragment)
    assert not (tmp_path / "out").exists()


def test_unknown_section(tmp_path, prepared_dir, capsys):
    raw = tiny_run_config(prepared_dir)
    raw["modle"] = {"preset": "tiny"}
    expect_user_error(capsys, train_argv(tmp_path, raw), "modle: unknown key")


def test_mistyped_override(tmp_path, prepared_dir, capsys):
    argv = train_argv(tmp_path, tiny_run_config(prepared_dir), "--set", "train.stpes=5")
    expect_user_error(capsys, argv, "train.stpes: unknown key")


def test_seq_len_larger_than_the_data(tmp_path, prepared_dir, capsys):
    raw = tiny_run_config(prepared_dir, seq_len=200_000, batch_size=1)
    expect_user_error(capsys, train_argv(tmp_path, raw), "tokens")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_missing_config_and_missing_data(tmp_path, prepared_dir, capsys):
    expect_user_error(capsys, ["train", str(tmp_path / "none.yaml")], "config file not found")
    raw = tiny_run_config(prepared_dir)
    raw["data"] = {"prepared_dir": str(tmp_path / "missing")}
    expect_user_error(capsys, train_argv(tmp_path, raw), "missing")
    raw["data"] = {"source": str(tmp_path / "no-such-file.txt"), "vocab_size": 300}
    expect_user_error(capsys, train_argv(tmp_path, raw), "no-such-file.txt")


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    argv = ["prepare", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "p"), "--vocab-size", "300"]
    expect_user_error(capsys, argv, "empty")


def test_tokenizer_model_vocab_mismatch(tmp_path, prepared_dir, capsys):
    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    small.save_pretrained(tmp_path / "small")
    raw = tiny_run_config(prepared_dir)
    raw["model"] = {"path": str(tmp_path / "small"), "preset": None}
    expect_user_error(capsys, train_argv(tmp_path, raw), "vocab")
    expect_user_error(capsys, ["eval", str(tmp_path / "small"), "--data", str(prepared_dir)], "vocab")


def test_model_dir_problems(tmp_path, prepared_dir, capsys):
    expect_user_error(capsys, ["eval", str(tmp_path / "nope"), "--data", str(prepared_dir)],
                      "neither an existing HF model dir nor a built-in model")
    (tmp_path / "notmodel").mkdir()
    expect_user_error(capsys, ["eval", str(tmp_path / "notmodel"), "--data", str(prepared_dir)], "no config.json")


def test_out_dir_holding_another_run(tmp_path, prepared_dir, capsys):
    raw = tiny_run_config(prepared_dir, steps=4, eval_every=0, sample_tokens=0)
    assert main(train_argv(tmp_path, raw)) == 0
    capsys.readouterr()
    before = (tmp_path / "out" / "metrics.jsonl").read_text()
    expect_user_error(capsys, train_argv(tmp_path, raw), "already holds a run")
    raw["train"]["lr"] = 1e-3
    expect_user_error(capsys, train_argv(tmp_path, raw, "--resume"), "train.lr")
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == before


def test_resume_with_only_corrupted_checkpoints(tmp_path, prepared_dir, capsys):
    raw = tiny_run_config(prepared_dir, steps=4, eval_every=0, sample_tokens=0)
    assert main(train_argv(tmp_path, raw)) == 0
    capsys.readouterr()
    ckpt = tmp_path / "out" / "checkpoints" / "step-000004" / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="skipping checkpoint step-000004: model.safetensors is truncated"):
        expect_user_error(capsys, train_argv(tmp_path, raw, "--resume"), "truncated")


def test_eval_json_prints_one_object(tmp_path, prepared_dir, capsys):
    raw = tiny_run_config(prepared_dir, steps=2, eval_every=0, sample_tokens=0)
    assert main(train_argv(tmp_path, raw)) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out" / "final"), "--data", str(prepared_dir), "--json",
                 "--max-tokens", "256", "--seq-len", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"ppl", "tokens", "tok_per_s"} <= result.keys()
    assert result["tokens"] == 256 and result["ppl"] > 1
    expect_user_error(capsys, ["eval", str(tmp_path / "out" / "final"), "--data", str(prepared_dir),
                               "--max-tokens", "0"], "--max-tokens")


def test_eval_runs_lm_eval_tasks_and_throughput(tmp_path, prepared_dir, capsys):
    raw = tiny_run_config(prepared_dir, steps=2, eval_every=0, sample_tokens=0)
    raw["model"]["max_position_embeddings"] = 256  # room for a task's context + continuation
    assert main(train_argv(tmp_path, raw)) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out" / "final"), "--data", str(prepared_dir), "--json", "--max-tokens",
                 "256", "--seq-len", "32", "--tasks", "nextline_mc", "--limit", "4", "--throughput"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["tasks"]["nextline_mc/acc"] <= 1.0 and result["forward_tok_per_s"] > 0
    expect_user_error(capsys, ["eval", str(tmp_path / "out" / "final"), "--data", str(prepared_dir),
                               "--tasks", "no_such_task"], "no_such_task")


# ----------------------------------------------------------------------------- faults seen by a new user

def small_model_dir(path: Path) -> Path:
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=64)).save_pretrained(path)
    return path


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a valid safetensors file"),
    (lambda p: p.write_bytes(b""), "not a valid safetensors file"),
    (lambda p: p.write_bytes(b"\xff" * 7 + b"\x7f" + b"garbage"), "not a valid safetensors file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-64]), "not a valid safetensors file"),
    (lambda p: (p.parent / "config.json").write_bytes(bytes(range(256))), "config.json: not a text file"),
], ids=["truncated", "empty", "bad_header", "short_data", "binary_config"])
def test_damaged_model_dirs(tmp_path, prepared_dir, capsys, damage, fragment):
    model = small_model_dir(tmp_path / "m")
    damage(model / "model.safetensors")
    expect_user_error(capsys, ["eval", str(model), "--data", str(prepared_dir)], fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--device", "tpu9"], "'tpu9' is not a device"),
    (["--device", "cuda"], "no CUDA device"),
])
def test_bad_eval_flags(tmp_path, prepared_dir, capsys, args, fragment):
    if "cuda" in args:
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    model = small_model_dir(tmp_path / "m")
    expect_user_error(capsys, ["eval", str(model), "--data", str(prepared_dir), *args], fragment)


def test_a_bad_flag_is_one_line_without_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no-such-flag"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage:" not in err
    assert err.strip().splitlines() == ["lmprune: error: unrecognized arguments: --no-such-flag "
                                        "(see: lmprune --help)"]


@pytest.mark.parametrize("override, fragment", [
    ("model.init_std=1e3", "model.init_std must be in (0, 1]"),
    ("train.lr=inf", "train.lr must be a finite number"),
    ("train.max_skipped_steps=0", "train.max_skipped_steps must be > 0"),
])
def test_values_that_would_overflow(tmp_path, prepared_dir, capsys, override, fragment):
    expect_user_error(capsys, train_argv(tmp_path, tiny_run_config(prepared_dir), "--set", override), fragment)
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_or_under_a_file(tmp_path, prepared_dir, capsys):
    (tmp_path / "afile").write_text("x")
    raw = tiny_run_config(prepared_dir)
    cfg = write_config(tmp_path / "run.yaml", raw)
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        expect_user_error(capsys, ["train", str(cfg), "--out", str(out), "--quiet"], "a file is in the way")
    assert (tmp_path / "afile").read_text() == "x"


def test_broken_tokenizer_in_a_prepared_dir_is_found_before_training(tmp_path, prepared_dir, capsys):
    broken = tmp_path / "prepared"
    shutil.copytree(prepared_dir, broken)
    (broken / "tokenizer" / "tokenizer.json").write_text("{not json")
    raw = tiny_run_config(broken)
    expect_user_error(capsys, train_argv(tmp_path, raw), "cannot load a tokenizer")
    assert not (tmp_path / "out").exists()


def test_latin1_corpus_is_decoded_with_a_counted_warning_and_an_empty_val_split_refused(tmp_path, capsys):
    from lmprune.data import prepare_corpus

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "latin1.txt").write_bytes("café au lait, déjà vu\n".encode("latin-1") * 200)
    with pytest.warns(UserWarning, match=r"latin1.txt: 600 byte sequence\(s\) are not valid UTF-8"):
        prepare_corpus(str(tmp_path / "texts"), tmp_path / "p", vocab_size=300, tokenizer=None,
                       val_fraction=0.1, seed=0)
    raw = tiny_run_config(tmp_path / "p")  # one document: it goes to train, val is empty
    expect_user_error(capsys, train_argv(tmp_path, raw), "the validation split has 0 tokens")
