"""Weighted data mixtures (data.sources): the sampler, resume, per-source evaluation, bad input."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_config, write_config, write_corpus
from lmprune.checkpoint import load_checkpoint_meta
from lmprune.cli import main
from lmprune.errors import UserError
from lmprune.mixture import MixtureLoader
from lmprune.report import mixture_section

SEQ = 8


def source_tokens(offset: int, windows: int) -> np.ndarray:
    """Tokens whose value tells the source (offset) and the window (offset + window index)."""
    return np.repeat(np.arange(windows, dtype=np.uint16) + offset, SEQ + 1)


def window_sources(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // 1000).tolist()


SOURCES = [("a", source_tokens(0, 50), 3.0), ("b", source_tokens(1000, 20), 1.0), ("held_out", source_tokens(2000, 5), 0.0)]


def test_windows_are_drawn_by_weight_and_each_source_runs_through_its_epochs():
    loader = MixtureLoader(SOURCES, batch_size=8, seq_len=SEQ, seed=0)
    drawn = [loader.next_batch()[0] for _ in range(100)]
    sources = [s for x in drawn for s in window_sources(x)]
    assert sources.count(2) == 0  # weight 0: evaluated only
    assert abs(sources.count(0) / len(sources) - 0.75) < 0.04
    a_windows = [int(v) for x in drawn for v in x[:, 0] if v < 1000]
    first_epoch = a_windows[:50]
    assert sorted(first_epoch) == list(range(50)) and first_epoch != sorted(first_epoch)  # a permutation
    assert sorted(a_windows[50:100]) == list(range(50))  # the next epoch, in another order
    assert a_windows[50:100] != first_epoch


def test_the_order_is_seeded():
    def batches(seed: int) -> list[torch.Tensor]:
        loader = MixtureLoader(SOURCES, batch_size=4, seq_len=SEQ, seed=seed)
        return [loader.next_batch()[0] for _ in range(10)]

    assert all(torch.equal(p, q) for p, q in zip(batches(1), batches(1)))
    assert not all(torch.equal(p, q) for p, q in zip(batches(1), batches(2)))


def test_resume_from_state_dict_is_exact():
    straight = MixtureLoader(SOURCES, batch_size=4, seq_len=SEQ, seed=3)
    reference = [straight.next_batch() for _ in range(40)]
    first = MixtureLoader(SOURCES, batch_size=4, seq_len=SEQ, seed=3)
    for _ in range(23):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = MixtureLoader(SOURCES, batch_size=4, seq_len=SEQ, seed=3)
    resumed.load_state_dict(state)
    for x, y in reference[23:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_ranks_together_see_what_one_process_sees():
    single = MixtureLoader(SOURCES, batch_size=6, seq_len=SEQ, seed=5)
    ranks = [MixtureLoader(SOURCES, batch_size=3, seq_len=SEQ, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(15):
        x, y = single.next_batch()
        parts = [rank.next_batch() for rank in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_bad_loader_input():
    with pytest.raises(UserError, match="sum to a positive number"):
        MixtureLoader([("a", source_tokens(0, 5), 0.0)], 2, SEQ, 0)
    with pytest.raises(UserError, match="fewer than one window"):
        MixtureLoader([("a", source_tokens(0, 5), 1.0), ("b", np.zeros(SEQ, dtype=np.uint16), 1.0)], 2, SEQ, 0)
    loader = MixtureLoader(SOURCES, 2, SEQ, 0)
    with pytest.raises(UserError, match="not a mixture's"):
        loader.load_state_dict({"epoch": 0, "batch_index": 3})
    state = loader.state_dict()
    del state["mixture"]["sources"]["b"]
    with pytest.raises(UserError, match="data.sources changed"):
        loader.load_state_dict(state)


# ----------------------------------------------------------------------------- end to end


def write_code_corpus(root: Path, n_docs: int = 16) -> Path:
    """Python-like lines: a second domain with its own statistics."""
    rng = random.Random(7)
    root.mkdir(parents=True)
    for d in range(n_docs):
        lines = [f"def f{rng.randint(0, 99)}(x, y): return x {rng.choice('+-*')} {rng.randint(0, 9)} * y"
                 for _ in range(60)]
        (root / f"code{d:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    write_corpus(root / "prose")
    return root / "prose", write_code_corpus(root / "code")


def mixture_config(corpora, tmp_path: Path, **train) -> dict:
    raw = tiny_run_config(tmp_path, **train)
    raw["data"] = {"sources": [{"source": str(corpora[0]), "weight": 0.7},
                               {"source": str(corpora[1]), "weight": 0.3, "name": "code"}],
                   "vocab_size": 300, "val_fraction": 0.1}
    return raw


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_mixture_trains_resumes_exactly_and_reports_each_source(corpora, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "cache"))
    raw = mixture_config(corpora, tmp_path, steps=12, save_every=4, keep_last=4, eval_every=6, sample_tokens=0)
    cfg = write_config(tmp_path / "mix.yaml", raw)
    straight = tmp_path / "straight"
    assert main(["train", str(cfg), "--out", str(straight), "--quiet"]) == 0
    assert "val ppl per source: prose" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 2  # each source prepared once

    val_rows = [r for r in rows_of(straight) if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [6, 12]
    for row in val_rows:
        assert row["mixture"] == "prose:0.7+code:0.3"
        mean = 0.7 * row["val_loss/prose"] + 0.3 * row["val_loss/code"]
        assert row["val_loss"] == pytest.approx(mean, abs=2e-6)
        assert row["val_ppl/code"] == pytest.approx(math.exp(row["val_loss/code"]), rel=1e-4)
    assert val_rows[0]["val_loss/prose"] != val_rows[0]["val_loss/code"]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["mixture"] == "prose:0.7+code:0.3" and {"val_ppl/prose", "val_ppl/code"} <= summary.keys()
    assert [s["name"] for s in summary["mixture_sources"]] == ["prose", "code"]

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for later in ("final", "summary.json", "checkpoints/step-000012", "checkpoints/step-000008"):
        shutil.rmtree(resumed / later) if (resumed / later).is_dir() else (resumed / later).unlink()
    loader_state = load_checkpoint_meta(resumed / "checkpoints" / "step-000004")["trainer_state"]["loader"]
    assert loader_state["mixture"]["batch_index"] == 4 and set(loader_state["mixture"]["sources"]) == {"prose", "code"}
    kept = (resumed / "checkpoints" / "step-000004" / "manifest.json").stat().st_mtime_ns
    assert main(["train", str(cfg), "--out", str(resumed), "--resume", "--quiet"]) == 0
    assert (resumed / "checkpoints" / "step-000004" / "manifest.json").stat().st_mtime_ns == kept  # resumed from it
    assert (resumed / "checkpoints" / "step-000008").is_dir()
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["step"], r["loss"]) for r in rows_of(straight)] == [(r["step"], r["loss"]) for r in rows_of(resumed)]


def test_the_compare_report_shows_val_ppl_per_source():
    runs = {"idea": {"val_ppl": 20.0, "mixture": "prose:0.7+code:0.3", "val_ppl/prose": 25.0, "val_ppl/code": 12.5},
            "scratch": {"val_ppl": 22.0, "mixture": "prose:0.7+code:0.3", "val_ppl/prose": 27.0, "val_ppl/code": 14.0}}
    lines = mixture_section(runs)
    assert any("`prose:0.7+code:0.3`" in line for line in lines)
    assert "| run | val ppl (mixture) | val ppl prose | val ppl code |" in lines
    assert "| idea | 20.000 | 25.000 | 12.500 |" in lines
    assert mixture_section({"idea": {"val_ppl": 20.0}}) == []


def expect_one_line(capsys, argv: list[str], fragment: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err, err


@pytest.mark.parametrize("sources, fragment", [
    ([{"source": "A", "weight": None}, {"source": "B", "weight": 1}], "data.sources[0] (A): weight is empty"),
    ([{"source": "A"}, {"source": "B", "weight": 1}], "weight is empty"),
    ([{"source": "A", "weight": ""}], "data.sources.0.weight: Input should be a valid number"),
    ([{"source": "A", "weight": 0}, {"source": "B", "weight": 0.0}], "weights sum to 0.0; they must sum to a positive"),
    ([{"source": "A", "weight": -1}, {"source": "B", "weight": 2}], "weight must be a finite number >= 0, got -1"),
    ([{"source": "A", "weight": 1}, {"source": "no-such-corpus.txt", "weight": 1}],
     "data.sources[1] (no-such-corpus): unknown source 'no-such-corpus.txt'"),
    ([{"source": "A", "weight": 1}, {"source": "A", "weight": 1}], "two sources are named 'A'"),
    ([{"weight": 1}], "needs exactly one of `source` and `prepared_dir`"),
    ([], "data.sources is empty"),
])
def test_bad_mixtures_are_one_line_exit_2_before_any_work(corpora, tmp_path, capsys, monkeypatch, sources, fragment):
    monkeypatch.chdir(corpora[0].parent)
    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "cache"))
    (Path("A")).mkdir(exist_ok=True)
    (Path("B")).mkdir(exist_ok=True)
    raw = tiny_run_config(tmp_path)
    raw["data"] = {"sources": sources}
    cfg = write_config(tmp_path / "bad.yaml", raw)
    expect_one_line(capsys, ["train", str(cfg), "--out", str(tmp_path / "out"), "--quiet"], fragment)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out" / "run_config.json").exists()


def test_source_and_sources_together_are_refused(corpora, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "cache"))
    raw = mixture_config(corpora, tmp_path)
    raw["data"]["source"] = str(corpora[0])
    cfg = write_config(tmp_path / "both.yaml", raw)
    expect_one_line(capsys, ["train", str(cfg), "--out", str(tmp_path / "out")], "not both")


def test_compare_names_the_mixture_and_shows_per_source_val_ppl(corpora, tmp_path, monkeypatch):
    from lmprune.compare import run_compare

    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "cache"))
    raw = mixture_config(corpora, tmp_path, steps=4, eval_every=0, sample_tokens=0)
    raw["compare"] = {"runs": {"short": {"train.lr": 0.003}}, "scratch_equal_compute": False}
    summary = run_compare(write_config(tmp_path / "cmp.yaml", raw), tmp_path / "cmp", quiet=True)
    row = summary["pipelines"]["short"]
    assert row["mixture"] == "prose:0.7+code:0.3" and row["val_ppl/code"] > 1
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "weighted mixture `prose:0.7+code:0.3`" in report
    assert f"| short | {row['val_ppl']:.3f} | {row['val_ppl/prose']:.3f} | {row['val_ppl/code']:.3f} |" in report


def test_a_mixture_config_survives_a_dump_and_reload(corpora, tmp_path):
    from lmprune.config import config_from_dict

    cfg = config_from_dict(mixture_config(corpora, tmp_path))
    again = config_from_dict(cfg.model_dump(mode="json"))  # what compare's equal-compute run does
    assert [p.label() for p in again.data.sources] == ["prose", "code"]


def test_prepared_dirs_in_a_mixture_must_share_one_tokenizer(corpora, tmp_path, prepared_dir, monkeypatch, capsys):
    from lmprune.data import prepare_corpus

    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "cache"))
    raw = tiny_run_config(tmp_path, steps=2, eval_every=0, sample_tokens=0)
    raw["data"] = {"sources": [{"prepared_dir": str(prepared_dir), "weight": 1, "name": "prose"},
                               {"source": str(corpora[1]), "weight": 1}]}  # tokenized with prose's tokenizer
    assert main(["train", str(write_config(tmp_path / "ok.yaml", raw)), "--out", str(tmp_path / "ok"), "--quiet"]) == 0
    other = prepare_corpus(str(corpora[1]), tmp_path / "code-bpe", vocab_size=280, val_fraction=0.1)
    raw["data"]["sources"][1] = {"prepared_dir": str(other), "weight": 1}
    capsys.readouterr()
    expect_one_line(capsys, ["train", str(write_config(tmp_path / "bad.yaml", raw)), "--out", str(tmp_path / "bad")],
                    "was tokenized with another tokenizer than prose")
