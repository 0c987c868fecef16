from pathlib import Path

import pytest

from lmprune.config import RunConfig, apply_overrides, config_from_dict, describe_fields, load_config
from lmprune.errors import UserError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    load_config(path)


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
