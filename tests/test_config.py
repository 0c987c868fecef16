from pathlib import Path

import pytest

from lmprune.compare import run_configs
from lmprune.config import RunConfig, apply_overrides, config_from_dict, describe_fields, load_config, read_raw_config
from lmprune.errors import UserError
from lmprune.pipelines import validate_run

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    load_config(path)


def stand_in_model_dir(path: Path) -> Path:
    """A tiny real Llama dir standing in for a model a shipped config names (built or downloaded on use)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_passes_validate_run(path, tmp_path):
    """Every cross-section rule, for the config and (with a compare section) each of its runs."""
    raw = read_raw_config(path)
    stand_in = None
    for section, key in (("model", "path"), ("kd", "teacher")):
        if (raw.get(section) or {}).get(key):
            stand_in = stand_in or stand_in_model_dir(tmp_path / "model")
            raw[section][key] = str(stand_in)
    cfg = config_from_dict(raw, source=path.name)
    if cfg.compare is None:
        plan = validate_run(cfg)
        assert plan.initial_width > 0
        return
    compare, runs = run_configs(raw, path.name, tmp_path / "out")  # validate_run per run (init first)
    if compare.init is not None:
        validate_run(runs["init"])
    assert runs


def test_two_methods_are_refused_by_validate_run():
    cfg = config_from_dict({"gmp": {"t0": 0, "n": 1, "dt": 1}, "random": {"t0": 0, "n": 1, "dt": 1}})
    with pytest.raises(UserError, match="give one pruning method, not gmp and random"):
        validate_run(cfg)


def test_defaults_validate():
    cfg = RunConfig()
    assert cfg.train.steps > 0 and cfg.model.preset == "tiny"


@pytest.mark.parametrize("raw, fragment", [
    ({"train": {"lr": 0}}, "train.lr must be > 0"),
    ({"train": {"lr": -1e-3}}, "train.lr must be > 0"),
    ({"train": {"steps": 10, "warmup": 20}}, "warmup (20) must be in [0, steps=10]"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be > 0"),
    ({"train": {"lr_rate": 1e-3}}, "train.lr_rate: unknown key"),
    ({"trian": {}}, "trian: unknown key"),
    ({"train": {"steps": "many"}}, "train.steps"),
    ({"model": {"preset": "huge"}}, "model.preset"),
    ({"train": {"keep_last": 1}}, "keep_last must be >= 2"),
    ({"data": {"val_fraction": 1.5}}, "val_fraction must be in (0, 1)"),
])
def test_bad_values_are_one_line_user_errors(raw, fragment):
    with pytest.raises(UserError) as err:
        config_from_dict(raw, source="x.yaml")
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_parse_yaml_scalars():
    raw = apply_overrides({}, ["train.lr=3e-4", "model.preset=small", "train.compile=true"])
    cfg = config_from_dict(raw)
    assert cfg.train.lr == 3e-4 and cfg.model.preset == "small" and cfg.train.compile is True


def test_override_without_equals_is_rejected():
    with pytest.raises(UserError):
        apply_overrides({}, ["train.lr"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_every_field_is_documented():
    lines = describe_fields(RunConfig)
    assert all(not line.endswith("# ") for line in lines), [line for line in lines if line.endswith("# ")]
