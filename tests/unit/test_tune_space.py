"""Search-space validation, the sweep plan, seeded sampling, the trial config, and best-trial selection (no Ray
runtime: Tune's variant generator expands spaces without a cluster)."""

import math

import pytest

from ncf_ray.config import TrainConfig, TuneConfig, tower
from ncf_ray.errors import UserError
from ncf_ray.tune import (
    DEFAULT_SPACE,
    RANDOM_SAMPLES,
    _search_alg,
    pick_best,
    plan_sweep,
    to_param_space,
    trial_train_config,
    validate_space,
)

GRID_2X2 = {"factors": [8, 32], "depth": [1, 3], "lr": 0.005, "negatives": [4]}


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


def _expand(tcfg: TuneConfig, space: dict, seed_alg=None) -> list[dict]:
    """The trial configs Tune's own generator makes for this sweep (what run_sweep hands to the Tuner)."""
    plan, searched = plan_sweep(space, tcfg)
    gen = seed_alg or _search_alg(tcfg, "valid_hr@10", max_concurrent=0)  # 0: all at once
    gen.add_configurations({"sweep": {"run": lambda config: None, "num_samples": plan.samples,
                                      "config": to_param_space(searched, tcfg.search)}})
    configs = []
    while (trial := gen.next_trial()) is not None:
        configs.append(trial.config)
    return configs


def test_grid_runs_each_point_once_unless_num_samples_is_given():
    plan, _ = plan_sweep(GRID_2X2, TuneConfig(search="grid"))
    assert (plan.trials, plan.grid_points, plan.samples) == (4, 4, 1)
    assert plan.searched == ("factors", "depth") and plan.fixed == {"lr": 0.005, "negatives": 4}
    configs = _expand(TuneConfig(search="grid"), GRID_2X2)
    assert len(configs) == plan.trials
    assert sorted((c["factors"], c["depth"]) for c in configs) == [(8, 1), (8, 3), (32, 1), (32, 3)]
    text = plan.describe()
    assert "4 trial(s) = 4 grid point(s) x 1 sample(s)" in text and "fixed lr=0.005, negatives=4" in text
    # Asked for explicitly, repeats are honoured.
    assert plan_sweep(GRID_2X2, TuneConfig(search="grid", num_samples=3))[0].trials == 12


def test_random_search_defaults_to_eight_samples_and_lists_are_not_grid_axes():
    plan, _ = plan_sweep(GRID_2X2, TuneConfig(search="random"))
    assert plan.trials == RANDOM_SAMPLES and plan.grid_points == 1
    assert len(_expand(TuneConfig(search="random"), GRID_2X2)) == RANDOM_SAMPLES


def test_gmf_and_mf_sweep_no_depth_or_dropout():
    space = {"factors": [8, 16], "depth": [0, 2], "dropout": [0.0, 0.2], "lr": [0.01]}
    for model in ("gmf", "mf"):
        plan, searched = plan_sweep(space, TuneConfig(model=model, search="grid"))
        assert set(searched) == {"factors", "lr"} and plan.dropped == ("depth", "dropout")
        assert plan.trials == 2 and "ignored by the model: depth, dropout" in plan.describe()
    plan, searched = plan_sweep(space, TuneConfig(model="mlp", search="grid"))
    assert set(searched) == set(space) and plan.trials == 8  # mlp's tower width follows factors
    with pytest.raises(UserError, match="no key that --model gmf uses"):
        plan_sweep({"depth": [1, 2]}, TuneConfig(model="gmf"))


def test_random_search_is_seeded():
    space = {"factors": [8, 16, 32, 64], "lr": {"loguniform": [1e-4, 1e-2]}}
    first = _expand(TuneConfig(seed=1), space)
    assert first == _expand(TuneConfig(seed=1), space)
    assert first != _expand(TuneConfig(seed=2), space)


def test_trial_config_applies_sampled_values():
    cfg = trial_train_config(TrainConfig(), "neumf", {"factors": 16, "depth": 2, "lr": 0.01, "negatives": 6})
    assert cfg.model.factors == 16 and cfg.model.layers == (32, 16, 8)
    assert cfg.lr == 0.01 and cfg.negatives == 6
    # Without a sampled depth the tower keeps the base's depth, at the sampled width.
    assert trial_train_config(TrainConfig(), "neumf", {"factors": 8}).model.layers == (16, 8, 4)
    gmf = trial_train_config(TrainConfig(), "gmf", {"factors": 8})
    assert gmf.model.name == "gmf" and gmf.model.factors == 8


def _row(trial_id, hr, status="TERMINATED", ckpt=True, error=""):
    return {"trial_id": trial_id, "best_valid_hr": hr, "status": status, "error": error,
            "checkpoint_path": f"/ckpt/{trial_id}" if ckpt else None}


def test_best_is_never_an_errored_or_non_finite_trial():
    rows = [
        _row("nan", math.nan),
        _row("inf", math.inf),
        _row("diverged", 0.9, status="ERROR", error="non-finite training loss at epoch 3 (lr 1000000.0)"),
        _row("no_ckpt", 0.8, ckpt=False),
        _row("none", None),
        _row("good", 0.4),
        _row("better", 0.5),
    ]
    assert pick_best(rows)["trial_id"] == "better"
    assert pick_best(list(reversed(rows)))["trial_id"] == "better"


def test_all_trials_errored_is_one_line():
    rows = [_row("a", None, status="ERROR", error="non-finite training loss at epoch 1 (lr 1000000.0)"),
            _row("b", math.nan, status="ERROR", error="boom")]
    with pytest.raises(UserError) as exc:
        pick_best(rows, "/tmp/sweep")
    msg = str(exc.value)
    assert "\n" not in msg and "all 2 trial(s)" in msg and "trial a: non-finite training loss at epoch 1" in msg
    with pytest.raises(UserError, match="no trial of .* finite valid score"):
        pick_best([_row("n", math.nan)])


def test_a_workers_user_error_becomes_the_trials_one_line_error():
    from ncf_ray.train import user_error_in

    wrapped = RuntimeError("Training failed due to worker errors:\nTraceback (most recent call last):\n  ...\n"
                           "ncf_ray.errors.UserError: non-finite training loss at epoch 3 (lr 1000000.0)\n")
    assert str(user_error_in(wrapped)) == "non-finite training loss at epoch 3 (lr 1000000.0)"
    assert user_error_in(RuntimeError("CUDA error: device-side assert")) is None
    assert user_error_in(None) is None


def test_seq_sweeps_its_own_space_and_trials_build_seq_configs():
    from ncf_ray.config import default_train_config
    from ncf_ray.tune import SEQ_SPACE, default_space

    assert default_space("seq") == SEQ_SPACE and default_space("mf") == DEFAULT_SPACE
    plan, space = plan_sweep(default_space("seq"), TuneConfig(model="seq"))
    assert set(plan.searched) == {"history_len", "blocks", "factors", "dropout", "lr"} and not plan.dropped
    cfg = trial_train_config(default_train_config("seq"), "seq", {"history_len": 20, "blocks": 3, "factors": 32})
    assert (cfg.model.name, cfg.model.history_len, cfg.model.blocks, cfg.model.factors) == ("seq", 20, 3, 32)
    # The rest stays the family's default (batch, negatives), not NeuMF's.
    assert cfg.batch_size == default_train_config("seq").batch_size
    # A history length is an integer list, never a distribution.
    with pytest.raises(UserError, match="history_len"):
        validate_space({"history_len": {"uniform": [10, 50]}})


def test_closed_form_families_are_not_swept(tmp_path):
    from ncf_ray.tune import run_sweep

    with pytest.raises(UserError, match="closed form"):
        run_sweep(str(tmp_path), str(tmp_path / "s"), TuneConfig(model="ease"))


def test_auto_table_marks_the_family_chosen_on_valid():
    from ncf_ray.tune import format_auto

    fam = {f: {"valid": {"hr@10": v, "ndcg@10": v / 2}, "test": {"hr@10": v - 0.1, "ndcg@10": 0.1}, "trials": 1,
               "best_trial": f} for f, v in (("mf", 0.5), ("seq", 0.7), ("ease", 0.6))}
    lines = format_auto({"families": fam, "best_family": "seq"}).splitlines()
    assert len(lines) == 4 and "<- best by valid" in next(line for line in lines if line.startswith("seq"))
    assert not any("<-" in line for line in lines if not line.startswith("seq"))
