"""Config: defaults of the classic replication, YAML + flags layering, errors naming file/line/field."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from emkit.core.config import config_hash, flag_fields, load_config
from emkit.core.errors import ConfigError
from emkit.train.config import QKVO, TrainConfig


def test_defaults_are_the_classic_replication() -> None:
    cfg = TrainConfig()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.targets, cfg.lr, cfg.epochs) == (16, 32.0, QKVO, 2e-4, 7.0)
    assert cfg.model == "bundled:smollm2-135m-instruct"


def test_yaml_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\nlora:\n  r: 1\n  targets: [down_proj]\n  layers: [1]\n  rslora: true\n")
    cfg = load_config(TrainConfig, path, {"epochs": 3, "lora.alpha": 64})
    assert cfg.epochs == 3 and cfg.lora.r == 1 and cfg.lora.alpha == 64
    assert cfg.lora.targets == ["down_proj"] and cfg.lora.layers == [1] and cfg.lora.rslora


def test_comma_lists_from_flags() -> None:
    cfg = load_config(TrainConfig, None, {"lora.targets": "q_proj, v_proj", "lora.layers": "0,3"})
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.lora.layers == [0, 3]
    assert load_config(TrainConfig, None, {"lora.targets": "all-linear"}).lora.targets == ["all-linear"]


def test_yaml_error_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\nlora:\n  r: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: lora\.r: Input should be greater than or equal to 1"):
        load_config(TrainConfig, path)


def test_unknown_key_suggests(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epoch: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:1: epoch: unknown field \(did you mean 'epochs'\?\)"):
        load_config(TrainConfig, path)


def test_invalid_yaml_and_flag_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"--batch-size: .*greater than or equal to 1"):
        load_config(TrainConfig, None, {"batch_size": 0})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_hash_ignores_output_and_logging() -> None:
    a = TrainConfig()
    assert config_hash(a) == config_hash(TrainConfig(output=Path("elsewhere"), logging_steps=7))
    assert config_hash(a) != config_hash(TrainConfig(epochs=1))


def test_every_field_is_a_flag() -> None:
    result = run_cli("train", "--help", env={"COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    for _, (flag, _info) in flag_fields(TrainConfig).items():
        assert flag in result.stdout, flag
    for flag in ("--output", "--max-steps", "--batch-size", "--lora-r", "--lora-layers", "--config"):
        assert flag in result.stdout
