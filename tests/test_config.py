"""Config: precedence (defaults < preset < TOML < flags), dotted flags and aliases, typed errors."""

from __future__ import annotations

import pytest

from cakelm.config import ConfigError, parse_config
from cakelm.stages.pretrain import PRESETS, PretrainConfig


def test_defaults_are_the_cpu_preset() -> None:
    cfg = parse_config(PretrainConfig, [], PRESETS)
    assert cfg.loop.max_steps == 300 and cfg.optim.lr == 1e-2 and cfg.optim.name == "muon"
    assert cfg.model.dim == 128 and cfg.model.n_kv_heads == 4 and cfg.model.ffn_dim == 320  # derived at build


def test_precedence(tmp_path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('out = "from-file"\n[loop]\nmax_steps = 77\nbatch_size = 3\n[model]\nn_layers = 3\n')
    cfg = parse_config(PretrainConfig, ["--preset", "micro", "--config", str(toml), "--batch-size", "5"], PRESETS)
    assert cfg.model.dim == 64  # preset
    assert cfg.model.n_layers == 3 and cfg.loop.max_steps == 77 and cfg.out == "from-file"  # file over preset
    assert cfg.loop.batch_size == 5  # flag over file


def test_dotted_flags_and_aliases() -> None:
    cfg = parse_config(PretrainConfig, ["--lr", "0.01", "--optim.weight-decay", "0", "--model.n-heads", "8",
                                        "--max-steps", "9", "--no-loop.progress", "--model.tie-embeddings"])
    assert cfg.optim.lr == 0.01 and cfg.optim.weight_decay == 0.0 and cfg.loop.max_steps == 9
    assert cfg.model.n_heads == 8 and cfg.model.n_kv_heads == 8  # 0 = n_heads, resolved after the override
    assert cfg.loop.progress is False and cfg.model.tie_embeddings is True


@pytest.mark.parametrize("text, match", [
    ("[loop]\nmax_step = 3\n", "run.toml: unknown option 'loop.max_step'"),
    ("[loop]\nmax_steps = 'ten'\n", "run.toml: 'loop.max_steps' must be int"),
    ("[optim]\nname = 'sgd'\n", "'optim.name' must be one of adamw, muon"),
    ("[loop\n", "run.toml: invalid TOML"),
])
def test_bad_config_files(tmp_path, text: str, match: str) -> None:
    (tmp_path / "run.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_config(PretrainConfig, ["--config", str(tmp_path / "run.toml")])


def test_range_checks() -> None:
    with pytest.raises(ConfigError, match="max-steps must be >= 1, got 0"):
        parse_config(PretrainConfig, ["--max-steps", "0"])
    with pytest.raises(ConfigError, match="optim.lr must be positive"):
        parse_config(PretrainConfig, ["--lr", "-1"])
    with pytest.raises(ConfigError, match="model.dim .100. must be divisible by model.n_heads .3."):
        parse_config(PretrainConfig, ["--model.dim", "100", "--model.n-heads", "3"])
    with pytest.raises(ConfigError, match="--config: file not found"):
        parse_config(PretrainConfig, ["--config", "nope.toml"])
