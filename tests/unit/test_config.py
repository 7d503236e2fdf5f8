"""The one config builder: flags, saved dicts, trial values and `key=value` strings all become the same configs;
validation names the offending value; a new model family is one registry line."""

import json

import numpy as np
import pytest
import yaml

from ncf_ray import config as C
from ncf_ray.cli import build_parser, serve_config_from_flags, train_config_from_args
from ncf_ray.config import (
    ModelConfig,
    ServeConfig,
    TrainConfig,
    build_serve_config,
    build_train_config,
    from_dict,
    to_dict,
)
from ncf_ray.errors import UserError


def test_round_trip_dict_json_and_yaml():
    cfg = TrainConfig(model=ModelConfig(name="mlp", factors=16, layers=(32, 16)), epochs=3,
                      pretrain_from=("a", "b"))
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    assert from_dict(TrainConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


def test_flat_keys_set_model_and_training_fields_in_one_call():
    cfg = build_train_config(model="mlp", layers=[32, 16], dropout=0.1, lr=0.01, epochs=3)
    assert cfg.model == ModelConfig(name="mlp", factors=32, layers=(32, 16), dropout=0.1)
    assert (cfg.lr, cfg.epochs) == (0.01, 3)
    # A base keeps everything not given; depth derives the tower from the (new) factors.
    again = build_train_config(cfg, factors=8, depth=2)
    assert again.model.layers == (16, 8, 4) and again.model.name == "mlp" and again.lr == 0.01
    # A nested model dict (as `to_dict` writes it) and flat keys next to it.
    nested = build_train_config(model={"name": "gmf", "factors": 4}, factors=6)
    assert nested.model.name == "gmf" and nested.model.factors == 6


def test_values_are_coerced_from_strings_and_numpy():
    cfg = build_train_config(epochs="3", lr="0.5", gpu="false", negatives=np.int64(6), weight_decay=np.float32(0))
    assert (cfg.epochs, cfg.lr, cfg.gpu, cfg.negatives) == (3, 0.5, False, 6)
    assert type(cfg.negatives) is int and type(cfg.weight_decay) is float
    assert build_train_config(pretrain_from="g,m").pretrain_from == ("g", "m")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"epochs": 2.5}, "epochs=2.5"),
        ({"epochs": "x"}, "epochs='x'"),
        ({"gpu": "maybe"}, "gpu='maybe'"),
        ({"bogus": 1}, "bogus"),
        ({"depth": 2, "layers": (8, 4)}, "depth=2"),
        ({"depth": -1}, "depth=-1"),
        ({"model": "svd"}, "model='svd'"),
        ({"model": "neumf", "layers": (63, 32)}, "layers\\[0\\]=63"),
        ({"lr": 0}, "lr=0"),
    ],
)
def test_bad_values_are_refused_by_name(overrides, needle):
    with pytest.raises(UserError, match=needle):
        build_train_config(**overrides)


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


def test_gmf_has_no_mlp_rules_and_a_new_family_is_one_registry_line(monkeypatch):
    assert ModelConfig(name="gmf", layers=(63,)).layers == (63,)  # gmf ignores the tower: no evenness rule
    with pytest.raises(UserError, match="'newfam'"):
        ModelConfig(name="newfam")
    monkeypatch.setitem(C.MODEL_FIELDS, "newfam", frozenset())
    assert build_train_config(model="newfam").model.name == "newfam"


def _args(*argv):
    return build_parser().parse_args(list(argv))


def test_train_flags_go_through_the_builder():
    args = _args("train", "DS", "--out", "RUN", "--model", "gmf", "--factors", "8", "--threads", "2",
                 "--pretrain-from", "g,m", "--epochs", "4", "--gpu", "--storage", "s3://b/p")
    cfg = train_config_from_args(args)
    assert cfg == build_train_config(C.default_train_config("gmf"), factors=8, threads_per_worker=2,
                                     pretrain_from=("g", "m"), epochs=4, gpu=True)
    # Flags not given take the family's defaults (chosen on real data), given ones override them.
    assert cfg.negatives == C.MODEL_DEFAULTS["gmf"]["negatives"] and cfg.model.factors == 8
    # No flags at all: the default family with its defaults.
    assert train_config_from_args(_args("train", "DS", "--out", "RUN")) == C.default_train_config(C.DEFAULT_MODEL)
    assert C.default_train_config("mlp") == build_train_config(model="mlp")  # no defaults of its own


def test_serve_flags_and_key_value_args_build_the_same_config(tmp_path):
    flags = serve_config_from_flags(_args("serve", str(tmp_path), "--replicas", "auto", "--port", "9000",
                                          "--batch-wait-ms", "5", "--precision", "fp32"))
    kv = build_serve_config(model_dir=str(tmp_path.resolve()), replicas="auto", port="9000",
                            batch_wait_timeout_s="0.005", precision="fp32")
    assert flags == kv and kv.replicas == "auto" and kv.port == 9000
    assert from_dict(ServeConfig, to_dict(kv)) == kv


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({}, "model_dir is required"),
        ({"model_dir": "m", "replicas": "0"}, "replicas=0 must be"),
        ({"model_dir": "m", "max_batch_size": "x"}, "max_batch_size='x'"),
        ({"model_dir": "m", "max_batch_size": 500}, "max_batch_size=500"),
        ({"model_dir": "m", "precision": "fp8"}, "precision='fp8'"),
        ({"model_dir": "m", "k": "3"}, "k"),
    ],
)
def test_serve_config_refuses_by_name(overrides, needle):
    with pytest.raises(UserError, match=needle):
        build_serve_config(**overrides)


def test_synthetic_spec_has_one_builder():
    from ncf_ray.data.synthetic import SyntheticSpec, synthetic_spec

    assert synthetic_spec("synthetic") == SyntheticSpec()
    assert synthetic_spec("synthetic", users=50, items=40, interactions=900, seed=3) == \
        SyntheticSpec(users=50, items=40, interactions=900, seed=3)
    assert synthetic_spec("logs.csv") is None
    with pytest.raises(UserError, match="--users/--interactions only apply"):
        synthetic_spec("logs.csv", users=5, interactions=9)
    with pytest.raises(UserError, match="users=0"):
        synthetic_spec("synthetic", users=0)  # not silently the default


def test_pipeline_refuses_sizes_for_a_real_source_and_drops_the_presets():
    from ncf_ray.pipeline import preset

    with pytest.raises(UserError, match="--users only apply to --source synthetic"):
        preset("quick", out="o", source="logs.csv", users=10)
    real = preset("quick", out="o", source="logs.csv")
    assert (real.users, real.items, real.interactions) == (None, None, None)
    assert preset("quick", out="o").users == 300
