"""Config dataclasses: validation with the offending value, dict/YAML round trips."""

import pytest

from ncf_ray.config import ModelConfig, TrainConfig, from_dict, load_yaml, save_yaml, to_dict
from ncf_ray.errors import UserError


def test_round_trip_dict_and_yaml(tmp_path):
    cfg = TrainConfig(model=ModelConfig(name="mlp", factors=16, layers=(32, 16)), epochs=3)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(TrainConfig, tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"name": "svd"}, "model='svd'"),
        ({"factors": 0}, "factors=0"),
        ({"layers": (63, 32)}, "layers\\[0\\]=63"),
        ({"dropout": 1.5}, "dropout=1.5"),
    ],
)
def test_model_config_errors_carry_the_value(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        ModelConfig(**kwargs)


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(UserError, match="bogus"):
        from_dict(TrainConfig, {"bogus": 1})
