"""The shared integer-field checks of the config dataclasses (vqdiffusion.config.check_integers)."""

from __future__ import annotations

import pytest

from vqdiffusion.config import ConfigError, check_integers, check_positive_integers
from vqdiffusion.training.denoiser_config import DenoiserTrainConfig
from vqdiffusion.training.vqvae_config import VQVAETrainConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"positive": {"steps": True}}, "X: steps must be an integer, got True"),
        ({"positive": {"steps": None}}, "X: steps must be an integer, got None"),
        ({"nonneg": {"seed": 1.0}}, "X: seed must be an integer, got 1.0"),
        ({"optional_positive": {"dim": "8"}}, "X: dim must be an integer, got '8'"),
        ({"optional": {"pad": False}}, "X: pad must be an integer, got False"),
        ({"positive": {"steps": 0}}, "X: steps must be > 0, got 0"),
        ({"optional_positive": {"dim": -2}}, "X: dim must be > 0, got -2"),
        ({"nonneg": {"seed": -1}}, "X: seed must be a number >= 0, got -1"),
        # every type check comes before any range check
        ({"positive": {"steps": 0}, "optional": {"pad": 1.5}}, "X: pad must be an integer, got 1.5"),
    ],
)
def test_check_integers_messages(kwargs, message):
    with pytest.raises(ConfigError) as err:
        check_integers("X", **kwargs)
    assert str(err.value) == message


def test_check_integers_accepts_none_only_where_optional():
    check_integers("X", positive={"a": 1}, nonneg={"b": 0}, optional_positive={"c": None}, optional={"d": None})
    check_integers("X", optional={"pad": -1})  # an optional integer may be any integer (a pad token id)
    with pytest.raises(ConfigError, match="positive integer, got True"):
        check_positive_integers("X", a=1, b=True)


@pytest.mark.parametrize("cls", [DenoiserTrainConfig, VQVAETrainConfig])
def test_training_configs_name_a_null_integer(cls):
    paths = {"token_dir": "t"} if cls is DenoiserTrainConfig else {"data_dir": "d"}
    with pytest.raises(ConfigError, match=r"^\w+: steps must be an integer, got None$"):
        cls.from_dict({**paths, "output_dir": "o", "steps": None})
    assert cls.from_dict({**paths, "output_dir": "o", "lr_decay_steps": None}).lr_decay_steps is None
