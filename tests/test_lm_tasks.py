"""lm-eval tasks built from held-out text: valid task files, and an offline lm-eval run on a tiny model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import write_corpus
from lmprune.data import PreparedData, prepare_corpus
from lmprune.errors import UserError
from lmprune.lm_tasks import (
    META_FILE,
    NUM_CHOICES,
    TASKS,
    add_task_args,
    build_tasks,
    held_out_lines,
    run_lm_eval,
    run_tasks_from_args,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task_dir(prepared_dir: Path, tmp_path_factory) -> Path:
    return build_tasks(prepared_dir, tmp_path_factory.mktemp("tasks") / "tasks", num_examples=40, seed=0)


@pytest.fixture(scope="module")
def model_dir(prepared_dir: Path, tmp_path_factory) -> Path:
    """A tiny random Llama over the corpus's vocab, saved WITHOUT a tokenizer (the data's is used)."""
    path = tmp_path_factory.mktemp("model") / "model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=PreparedData.open(prepared_dir).vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def read_examples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_files_are_lm_eval_configs_over_jsonl(task_dir: Path):
    meta = json.loads((task_dir / META_FILE).read_text())
    for task in TASKS:
        config = yaml.safe_load((task_dir / f"{task}.yaml").read_text())
        assert config["task"] == task and config["output_type"] == "multiple_choice"
        assert config["dataset_path"] == "json"
        assert Path(config["dataset_kwargs"]["data_files"]["test"]) == task_dir / f"{task}.jsonl"
        assert config["target_delimiter"] == TASKS[task][1]
        examples = read_examples(task_dir / f"{task}.jsonl")
        assert len(examples) == meta["examples"][task] == 40
        for example in examples:
            choices = example["choices"]
            assert len(choices) == NUM_CHOICES
            assert len({c.lower() for c in choices}) == NUM_CHOICES
            assert 0 <= example["label"] < NUM_CHOICES
    labels = [e["label"] for e in read_examples(task_dir / "nextline_mc.jsonl")]
    assert len(set(labels)) > 1  # the answer's position is shuffled


def test_answers_are_the_true_continuations_of_held_out_text(task_dir: Path, prepared_dir: Path):
    held_out = "\n\n".join("\n".join(lines) for lines in held_out_lines(PreparedData.open(prepared_dir)))
    for example in read_examples(task_dir / "nextline_mc.jsonl"):
        answer = example["choices"][example["label"]]
        assert f"{example['context']}\n{answer}" in held_out
        assert example["context"].count("\n") == 2  # three context lines
    for example in read_examples(task_dir / "cloze_word.jsonl"):
        answer = example["choices"][example["label"]]
        assert f"{example['context']} {answer}" in held_out


def test_tasks_are_deterministic_in_the_seed(prepared_dir: Path, tmp_path: Path, task_dir: Path):
    again = build_tasks(prepared_dir, tmp_path / "again", num_examples=40, seed=0)
    other = build_tasks(prepared_dir, tmp_path / "other", num_examples=40, seed=1)
    for task in TASKS:
        assert read_examples(again / f"{task}.jsonl") == read_examples(task_dir / f"{task}.jsonl")
        assert read_examples(other / f"{task}.jsonl") != read_examples(task_dir / f"{task}.jsonl")


def test_too_little_held_out_text_is_a_user_error(tmp_path: Path):
    write_corpus(tmp_path / "texts", n_docs=4, lines_per_doc=2)  # val documents of 2 lines: no 3-line context
    prepared = prepare_corpus(str(tmp_path / "texts"), tmp_path / "prepared", vocab_size=280, val_fraction=0.3)
    with pytest.raises(UserError, match="too small for nextline_mc"):
        build_tasks(prepared, tmp_path / "tasks")
    assert not (tmp_path / "tasks").exists()


def test_build_refuses_a_non_empty_dir(prepared_dir: Path, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        build_tasks(prepared_dir, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_run_lm_eval_offline_returns_accuracies(model_dir: Path, task_dir: Path, prepared_dir: Path):
    scores = run_lm_eval(model_dir, task_dir, ["nextline_mc", "cloze_word"], limit=8, batch_size=4,
                         tokenizer=prepared_dir / "tokenizer")
    assert set(scores) == {f"{t}/{m}" for t in TASKS for m in ("acc", "acc_norm")}
    for value in scores.values():
        assert 0.0 <= value <= 1.0
        assert (value * 8) == pytest.approx(round(value * 8))  # a mean over exactly 8 examples


def test_eval_verb_args_build_cached_tasks_and_run(model_dir: Path, prepared_dir: Path, tmp_path: Path,
                                                   monkeypatch):
    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    parser.add_argument("--data")
    parser.add_argument("--batch-size", type=int, default=4)
    add_task_args(parser)
    args = parser.parse_args(["--data", str(prepared_dir), "--tasks", "cloze_word", "--limit", "4"])
    scores = run_tasks_from_args(args, model_dir)
    assert set(scores) == {"cloze_word/acc", "cloze_word/acc_norm"}
    built = list((tmp_path / "cache" / "lm_tasks").iterdir())
    assert len(built) == 1 and (built[0] / META_FILE).is_file()
    assert run_tasks_from_args(parser.parse_args(["--data", str(prepared_dir)]), model_dir) == {}


@pytest.mark.parametrize("tasks, limit, message", [
    ("nextline_mc,hellaswag", None, "unknown lm-eval task"),
    ("nextline_mc", 0, "--limit must be >= 1"),
])
def test_bad_task_request_fails_before_building(model_dir: Path, prepared_dir: Path, tmp_path: Path, monkeypatch,
                                                tasks, limit, message):
    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "cache"))
    args = argparse.Namespace(data=str(prepared_dir), tasks=tasks, limit=limit, batch_size=4)
    with pytest.raises(UserError, match=message):
        run_tasks_from_args(args, model_dir)
    assert not (tmp_path / "cache").exists()
