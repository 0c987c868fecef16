"""Remote code never runs and pickled weights are never read, whatever the verb, on a terminal too."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_run_config, write_config
from lmprune.cli import main

EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def tiny_llama_dir(path: Path) -> Path:
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def evil_model_dir(root: Path, marker: Path) -> Path:
    """A real tiny Llama dir whose config asks transformers to import its own modeling_evil.py."""
    path = tiny_llama_dir(root / "evil")
    (path / "modeling_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "evil"  # unknown to transformers: only the dir's own code can load it
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def run_on_terminal(argv: list[str], cwd: Path, timeout: float = 120.0) -> tuple[int, str]:
    """Run `python -m lmprune ARGV` with a pseudo-terminal as stdin/stdout/stderr, answering "y" to
    every prompt; returns (exit code, everything it printed)."""
    master, slave = pty.openpty()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lmprune", *argv], stdin=slave, stdout=slave, stderr=slave,
                            cwd=cwd, env=env, close_fds=True)
    os.close(slave)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
                if b"[y/N]" in chunk or b"trust_remote_code" in chunk:
                    os.write(master, b"y\n")
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, output.decode(errors="replace")


def verb_argvs(tmp_path: Path, model: Path, prepared: Path) -> dict[str, list[str]]:
    raw = tiny_run_config(prepared)
    from_path = dict(raw, model={"path": str(model), "preset": None})
    teacher = dict(raw, kd={"teacher": str(model)})
    compare = dict(from_path, compare={"runs": {"a": {}}, "scratch_equal_compute": False})
    return {
        "eval": ["eval", str(model), "--data", str(prepared)],
        "train model.path": ["train", str(write_config(tmp_path / "p.yaml", from_path)), "--out", str(tmp_path / "o1")],
        "train kd.teacher": ["train", str(write_config(tmp_path / "t.yaml", teacher)), "--out", str(tmp_path / "o2")],
        "prune": ["prune", str(model), "--calib", str(prepared), "--out", str(tmp_path / "o3"),
                  "--criterion", "magnitude", "--ffn-ratio", "0.5"],
        "compare": ["compare", str(write_config(tmp_path / "c.yaml", compare)), "--out", str(tmp_path / "o4")],
    }


def test_remote_code_refused_by_every_verb_on_a_terminal(tmp_path, prepared_dir):
    marker = tmp_path / "REMOTE_CODE_RAN"
    model = evil_model_dir(tmp_path, marker)
    for verb, argv in verb_argvs(tmp_path, model, prepared_dir).items():
        code, printed = run_on_terminal(argv, cwd=tmp_path)
        assert not marker.exists(), f"{verb}: the model dir's code ran\n{printed}"
        errors = [line for line in printed.splitlines() if line.startswith("lmprune: error:")]
        assert code == 2, f"{verb}: exit {code}\n{printed}"
        assert len(errors) == 1 and "Traceback" not in printed, f"{verb}:\n{printed}"
        assert "remote code" in errors[0] and "auto_map" in errors[0], errors[0]


def test_remote_code_tokenizer_refused(tmp_path, capsys):
    path = tiny_llama_dir(tmp_path / "tok")
    (path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.Tok", None]}}))
    assert main(["prepare", "--source", str(path / "config.json"), "--out", str(tmp_path / "d"),
                 "--tokenizer", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer_config.json has auto_map" in err and "Traceback" not in err


class _WritesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this object calls Path.write_text(marker, ...)
        return (Path.write_text, (self.marker, "unpickled"))


def hostile_pickle(marker: Path) -> bytes:
    """Bytes that write `marker` when unpickled (what a hostile pytorch_model.bin can do)."""
    import pickle

    return pickle.dumps(_WritesMarker(marker))


@pytest.mark.parametrize("layout, fragment", [
    ("bin", "pytorch_model.bin: only safetensors"),
    ("index-to-bin", "points to pytorch_model-00001.bin: only safetensors"),
    ("index-outside", "points outside the model dir"),
])
def test_pickle_weights_refused(tmp_path, prepared_dir, capsys, layout, fragment):
    path = tiny_llama_dir(tmp_path / "m")
    weights = path / "model.safetensors"
    marker = tmp_path / "UNPICKLED"
    weights.unlink()
    if layout == "bin":
        (path / "pytorch_model.bin").write_bytes(hostile_pickle(marker))
    else:
        shard = "pytorch_model-00001.bin" if layout == "index-to-bin" else "../elsewhere.safetensors"
        (path / "pytorch_model-00001.bin").write_bytes(hostile_pickle(marker))
        save_file({"x": torch.zeros(1)}, str(tmp_path / "elsewhere.safetensors"))
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    assert main(["eval", str(path), "--data", str(prepared_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("lmprune: error:") == 1 and fragment in err, err
    assert not marker.exists()
