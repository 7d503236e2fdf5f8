"""Search-space validation and the trial config it produces (no Ray)."""

import pytest

from ncf_ray.config import TrainConfig
from ncf_ray.errors import UserError
from ncf_ray.tune import DEFAULT_SPACE, tower, trial_train_config, validate_space


def test_default_space_is_valid():
    assert validate_space(dict(DEFAULT_SPACE))


def test_tower_halves_from_the_embedding_width():
    assert tower(32, 0) == (64,)
    assert tower(32, 3) == (64, 32, 16, 8)


@pytest.mark.parametrize(
    "space, needle",
    [
        ({"factors": [0, 8]}, "factors=0"),
        ({"factors": [-8]}, "factors=-8"),
        ({"depth": [-1, 2]}, "depth=-1"),
        ({"embedding": [8]}, "embedding"),
        ({"lr": {"loguniform": [1e-2, 1e-4]}}, "lr.loguniform"),
        ({"lr": {"normal": [0, 1]}}, "lr"),
        ({"factors": {"loguniform": [8, 64]}}, "factors"),
        ({}, "non-empty"),
    ],
)
def test_invalid_spaces_name_the_offending_key(space, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        validate_space(space)


def test_trial_config_applies_sampled_values():
    cfg = trial_train_config(TrainConfig(), "neumf", {"factors": 16, "depth": 2, "lr": 0.01, "negatives": 6})
    assert cfg.model.factors == 16 and cfg.model.layers == (32, 16, 8)
    assert cfg.lr == 0.01 and cfg.negatives == 6
