"""Hyperparameter sweeps on Ray Tune: embedding size x MLP depth (+ lr, negatives, weight decay), ASHA on valid HR@K.

    ncf-ray tune DATASET_DIR --out SWEEP_DIR [--num-samples 8] [--max-epochs 10] [--search random|grid|optuna]

Each trial is a Ray Train run built by `train.build_trainer` (Train V2 pattern: a function trainable that builds
and fits a TorchTrainer; `TuneReportCallback` forwards the workers' per-epoch reports to Tune so ASHA can stop
weak trials). Only valid metrics reach the search; the best trial's checkpoint is exported to SWEEP_DIR/best/
and its test metrics computed once, afterwards.

Per-trial overhead: every trial starts a TorchTrainer worker group (seconds; README, "Measured notes"), so short
trials are dominated by startup: give trials enough epochs for that to amortise, and use ASHA rather than many
tiny trials.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ncf_ray import console
from ncf_ray.atomic import replacing
from ncf_ray.config import MODEL_FIELDS, MODEL_NAMES, TrainConfig, TuneConfig, build_train_config, to_dict
from ncf_ray.errors import UserError
from ncf_ray.model import CLOSED_FORM

METRIC_KEY = "valid_hr@{k}"
SEARCHES = ("random", "grid", "optuna")

# The default space of the issue: embedding size x depth, plus optimiser knobs.
DEFAULT_SPACE: dict[str, Any] = {
    "factors": [8, 16, 32, 64, 128],
    "depth": [0, 1, 2, 3, 4],
    "lr": {"loguniform": [3e-4, 1e-2]},
    "negatives": [2, 3, 4, 6, 8],
    "weight_decay": {"loguniform": [1e-7, 1e-4]},
}
# The sequence model's space (issue: history length, blocks, width, dropout, lr).
SEQ_SPACE: dict[str, Any] = {
    "history_len": [20, 50, 100, 200],
    "blocks": [1, 2, 3],
    "factors": [32, 64, 128],
    "dropout": {"uniform": [0.1, 0.4]},
    "lr": {"loguniform": [3e-4, 3e-3]},
}
SPACE_KEYS = {"factors", "depth", "lr", "negatives", "weight_decay", "batch_size", "dropout", "history_len", "blocks",
              "id_dropout"}
# The ModelConfig fields a model-shaped space key changes; a model that reads none of them ignores the key.
# factors sets the tower's width too (tower(factors, depth)), so it matters to mlp.
SPACE_KEY_FIELDS = {"factors": {"factors", "layers"}, "depth": {"layers"}, "dropout": {"dropout"},
                    "history_len": {"history_len"}, "blocks": {"blocks"}}
# `--model auto`: these families are swept one after the other (EASE, closed form, is fitted once beside them)
# and the best by valid is exported.
AUTO_FAMILIES = ("mf", "neumf", "seq")
RANDOM_SAMPLES = 8  # --num-samples default for random/optuna search; grid runs each point once by default


# ------------------------------------------------------------------------------------------- space


def _check_values(key: str, values: list[Any]) -> None:
    if not values:
        raise UserError(f"search space key {key!r} has no values")
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise UserError(f"search space {key}={v!r} must be a number")
        if key == "depth" and (v < 0 or v != int(v)):
            raise UserError(f"search space depth={v} must be an integer >= 0")
        if key in ("factors", "negatives", "batch_size", "history_len", "blocks") and (v <= 0 or v != int(v)):
            raise UserError(f"search space {key}={v} must be an integer > 0")
        if key in ("lr",) and v <= 0:
            raise UserError(f"search space lr={v} must be > 0")
        if key in ("weight_decay", "dropout") and v < 0:
            raise UserError(f"search space {key}={v} must be >= 0")


def validate_space(space: dict[str, Any]) -> dict[str, Any]:
    """Refuse bad spaces before any trial starts, naming the offending key. Values are a list (choice/grid),
    a scalar (fixed), or {"loguniform"|"uniform": [low, high]}."""
    if not isinstance(space, dict) or not space:
        raise UserError("search space must be a non-empty mapping of key -> values")
    unknown = sorted(set(space) - SPACE_KEYS)
    if unknown:
        raise UserError(f"unknown search space key(s): {', '.join(unknown)} (known: {', '.join(sorted(SPACE_KEYS))})")
    for key, spec in space.items():
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in ("loguniform", "uniform"):
                raise UserError(f"search space {key}: a distribution is {{loguniform|uniform: [low, high]}}, got {spec}")
            kind, bounds = next(iter(spec.items()))
            if not isinstance(bounds, list) or len(bounds) != 2:
                raise UserError(f"search space {key}.{kind} needs [low, high], got {bounds!r}")
            _check_values(key, bounds)
            if not bounds[0] < bounds[1]:
                raise UserError(f"search space {key}.{kind}: low={bounds[0]} must be < high={bounds[1]}")
            if key in ("factors", "depth", "negatives", "batch_size", "history_len", "blocks"):
                raise UserError(f"search space {key} takes a list of integers, not a distribution")
        else:
            _check_values(key, spec if isinstance(spec, list) else [spec])
    return space


def default_space(model: str) -> dict[str, Any]:
    """The space a sweep of `model` searches without --space."""
    return dict(SEQ_SPACE if model == "seq" else DEFAULT_SPACE)


def load_space(path: str | None, model: str = "neumf") -> dict[str, Any]:
    if path is None:
        return default_space(model)
    import yaml

    p = Path(path)
    if not p.exists():
        raise UserError(f"search space file not found: {p}")
    try:
        space = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"search space {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return validate_space(space)


def to_param_space(space: dict[str, Any], search: str) -> dict[str, Any]:
    """Our YAML space -> Tune's param_space. Lists become grid axes under --search grid, choices otherwise."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            kind, (low, high) = next(iter(spec.items()))
            out[key] = tune.loguniform(low, high) if kind == "loguniform" else tune.uniform(low, high)
        elif isinstance(spec, list):
            out[key] = tune.grid_search(spec) if search == "grid" else tune.choice(spec)
        else:
            out[key] = spec
    return out


def space_for_model(space: dict[str, Any], model: str) -> tuple[dict[str, Any], list[str]]:
    """The space without the keys `model` ignores (gmf/mf have no MLP tower: depth and dropout would only repeat
    identical trials), and the names of the keys dropped."""
    uses = MODEL_FIELDS[model]
    dropped = sorted(k for k in space if k in SPACE_KEY_FIELDS and not SPACE_KEY_FIELDS[k] & uses)
    return {k: v for k, v in space.items() if k not in dropped}, dropped


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """What a sweep will run, worked out before Ray starts: printed first, so a 32-trial surprise is visible."""

    search: str
    trials: int
    grid_points: int  # 1 when nothing is a grid axis
    samples: int  # per grid point under grid search, in all otherwise
    searched: tuple[str, ...]  # keys that vary
    fixed: dict[str, Any]  # keys with one value
    dropped: tuple[str, ...]  # keys the model ignores, left out of the space

    def describe(self) -> str:
        if self.search == "grid":
            how = f"{self.grid_points} grid point(s) x {self.samples} sample(s)"
        else:
            how = f"{self.samples} {self.search} sample(s)"
        parts = [f"sweep plan: {self.trials} trial(s) = {how}; searching {', '.join(self.searched) or 'nothing'}"]
        if self.fixed:
            parts.append("fixed " + ", ".join(f"{k}={v}" for k, v in self.fixed.items()))
        if self.dropped:
            parts.append(f"ignored by the model: {', '.join(self.dropped)}")
        return "; ".join(parts)


def plan_sweep(space: dict[str, Any], tcfg: TuneConfig) -> tuple[SweepPlan, dict[str, Any]]:
    """The plan of a sweep and the space it searches (validated, irrelevant keys dropped). `tcfg.num_samples`
    None means RANDOM_SAMPLES for random/optuna and 1 per point for grid (where more repeats identical configs
    unless the space has distributions)."""
    space, dropped = space_for_model(validate_space(space), tcfg.model)
    if not space:
        raise UserError(f"the search space has no key that --model {tcfg.model} uses (dropped: {', '.join(dropped)})")
    fixed = {k: (v[0] if isinstance(v, list) else v) for k, v in space.items()
             if not isinstance(v, dict) and (not isinstance(v, list) or len(v) == 1)}
    searched = tuple(k for k in space if k not in fixed)
    grid_points = math.prod(len(v) for v in space.values() if isinstance(v, list)) if tcfg.search == "grid" else 1
    samples = tcfg.num_samples if tcfg.num_samples is not None else (1 if tcfg.search == "grid" else RANDOM_SAMPLES)
    plan = SweepPlan(search=tcfg.search, trials=grid_points * samples, grid_points=grid_points, samples=samples,
                     searched=searched, fixed=fixed, dropped=tuple(dropped))
    return plan, space


def trial_train_config(base: TrainConfig, model_name: str, params: dict[str, Any]) -> TrainConfig:
    """One trial's TrainConfig: the sweep's base settings with the sampled parameters applied (through the one
    builder). The MLP tower follows the sampled factors: without a sampled depth it keeps the base's depth."""
    params = dict(params)
    if "factors" in params and "depth" not in params and "layers" in MODEL_FIELDS[model_name]:
        params["depth"] = max(len(base.model.layers) - 1, 0)
    return build_train_config(base, model=model_name, **params)


# ------------------------------------------------------------------------------------------- trial
def _trial(config: dict[str, Any], train_ds: Any = None) -> None:
    """Function trainable: build and fit one Ray Train run; its reports reach Tune through the callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ncf_ray.train import build_trainer, user_error_in

    base = build_train_config(None, **config["__base__"])
    params = {k: v for k, v in config.items() if not k.startswith("__")}
    cfg = trial_train_config(base, config["__model__"], params)
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(config["__dataset__"], cfg, storage_path=config["__storage__"], name=f"trial_{trial_id}",
                            callbacks=[TuneReportCallback()], train_ds=train_ds)
    result = trainer.fit()
    if result.error is not None:
        # A worker's UserError (e.g. "non-finite training loss at epoch E (lr X)") errors the trial with its own
        # one-line message, which results.csv shows; pick_best never selects an errored trial.
        raise user_error_in(result.error) or RuntimeError(f"trial {trial_id} failed: {result.error}")


TRIAL_DRIVER_CPU = 0.01  # the trial function only waits on its TorchTrainer; Tune refuses 0


def default_max_concurrent(workers_per_trial: int, use_gpu: bool = False) -> int:
    """Trials that fit the cluster at once. Each trial holds its driver's sliver of CPU plus one CPU (and one GPU
    with --gpu) per Ray Train worker; a trial that does not fit would wait for its worker group and time out.
    On a 2-CPU laptop that is one one-worker trial at a time."""
    import ray

    res = ray.cluster_resources()
    k = int(res.get("CPU", 1) // (workers_per_trial + TRIAL_DRIVER_CPU))
    if use_gpu:
        k = min(k, int(res.get("GPU", 0) // workers_per_trial))
    return max(1, k)


# ------------------------------------------------------------------------------------------- sweep
def run_sweep(
    dataset_dir: str,
    out_dir: str,
    tcfg: TuneConfig,
    base: TrainConfig | None = None,
    space: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a sweep; write results.csv, plot.png, best/ and return a summary dict."""
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    from ncf_ray.data.dataset import read_meta
    from ncf_ray.runtime import ensure_ray
    from ncf_ray.train import check_fits_cluster, read_train

    if tcfg.model not in MODEL_NAMES:
        raise UserError(f"--model={tcfg.model!r} is not one of {', '.join(MODEL_NAMES)}")
    if tcfg.model in CLOSED_FORM:
        raise UserError(f"--model {tcfg.model} is fitted in closed form (EASE picks its lambda on valid): "
                        f"use `ncf-ray train --model {tcfg.model}`, or `ncf-ray tune --model auto` to compare it")
    if tcfg.search not in SEARCHES:
        raise UserError(f"--search={tcfg.search!r} is not one of {', '.join(SEARCHES)}")
    for name in ("num_samples", "max_epochs", "workers_per_trial", "grace_period", "reduction_factor"):
        value = getattr(tcfg, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')}={value} must be > 0")
    plan, space = plan_sweep(space if space is not None else default_space(tcfg.model), tcfg)
    read_meta(dataset_dir)  # refuses a path that is not a dataset dir before Ray starts
    base = base or TrainConfig()
    base = dataclasses.replace(base, epochs=tcfg.max_epochs, workers=tcfg.workers_per_trial, seed=tcfg.seed)
    out = Path(out_dir).resolve()
    exp_name = "sweep"
    exp_path = out / exp_name
    if resume and not exp_path.exists():
        raise UserError(f"--resume: no sweep found in {out}")
    if not resume and exp_path.exists():
        raise UserError(f"{out} already holds a sweep; pass --resume to finish it or choose another --out")
    if not resume:  # a resumed sweep runs the plan it was started with
        print(plan.describe(), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    check_fits_cluster(tcfg.workers_per_trial, base.gpu, extra_cpus=TRIAL_DRIVER_CPU)

    k = base.eval_k
    metric = METRIC_KEY.format(k=k)
    # Streaming trials read their positives through Ray Data: once for every trial, before trials hold the CPUs
    # (see train.read_train). The fast path reads each worker's users from the dataset dir itself.
    trainable = tune.with_parameters(_trial, train_ds=read_train(dataset_dir, materialize=False) if base.stream
                                     else None)
    trainable = tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPU})
    t0 = time.time()
    # One row per finished trial, under a header naming the family (an auto sweep prints one table per family).
    printer = console.trial_printer(None if resume else plan.trials, tcfg.max_epochs, label=tcfg.model)
    if resume:
        tuner = tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        param_space = to_param_space(space, tcfg.search)
        param_space.update({"__base__": to_dict(base), "__model__": tcfg.model,
                            "__dataset__": str(Path(dataset_dir).resolve()), "__storage__": str(out / "trials")})
        max_conc = tcfg.max_concurrent or default_max_concurrent(tcfg.workers_per_trial, base.gpu)
        search_alg = _search_alg(tcfg, metric, max_conc)
        if max_conc > 1 and not base.gpu and base.threads_per_worker is None:
            # Concurrent trials each defaulting to every core of the node would oversubscribe it: one torch
            # thread per worker, matching the one CPU each worker reserves.
            param_space["__base__"]["threads_per_worker"] = 1
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", num_samples=plan.samples, search_alg=search_alg,
                # Optuna is a Searcher that Tune wraps in a ConcurrencyLimiter; the variant generator got it above.
                max_concurrent_trials=max_conc if tcfg.search == "optuna" else None,
                scheduler=ASHAScheduler(time_attr="epoch", max_t=tcfg.max_epochs, grace_period=tcfg.grace_period,
                                        reduction_factor=tcfg.reduction_factor),
            ),
            run_config=tune.RunConfig(name=exp_name, storage_path=str(out), callbacks=[TBXLoggerCallback(), printer],
                                      verbose=0),
        )
    if not console.verbose():
        # Tune's own output (an experiment box, results and TensorBoard paths) prints even at verbose=0 with
        # its new output engine; the legacy one is silent at 0. The trial rows above say what a reader needs.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    handler_before = signal.getsignal(signal.SIGINT)
    grid = tuner.fit()
    seconds = time.time() - t0
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if unfinished or _was_interrupted(handler_before):  # Tune saved the state; a partial sweep exports nothing
        raise UserError(f"sweep interrupted after {len(grid)} trial(s) started; "
                        f"finish it with `ncf-ray tune {dataset_dir} --out {out_dir} --resume`")
    rows = _result_rows(grid)
    _write_csv(out / "results.csv", rows)
    summary: dict[str, Any] = {"trials": len(rows), "seconds": seconds, "results_csv": str(out / "results.csv"),
                               "errors": sum(r["status"] == "ERROR" for r in rows)}
    best_row = pick_best(rows, out)
    best = _export_best(dataset_dir, out, best_row, base, tcfg.model)
    summary.update(best=best_row["trial_id"], best_dir=str(out / "best"), best_metrics=best)
    try:
        _plot(out / "plot.png", rows, best["popularity"]["valid"][f"hr@{k}"], k)
    except Exception as exc:  # a missing plotting backend must not lose a finished sweep
        print(f"warning: plot.png not written: {exc}")
    return summary


def run_auto_sweep(
    dataset_dir: str, out_dir: str, tcfg: TuneConfig, overrides: dict[str, Any] | None = None,
    resume: bool = False, families: tuple[str, ...] = AUTO_FAMILIES, spaces: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`ncf-ray tune --model auto`: a sweep of each family in `families` (SWEEP_DIR/<family>/, each from its
    family defaults plus `overrides` and its default space or spaces[family], same budget), EASE fitted once in
    closed form
    (SWEEP_DIR/ease/), and the best of all by valid HR exported to SWEEP_DIR/best (test read once per family,
    by that family's own export, never for the choice)."""
    import shutil

    from ncf_ray.atomic import write_json
    from ncf_ray.baselines import check_ease_fits, fit_closed_form
    from ncf_ray.config import default_train_config
    from ncf_ray.data.dataset import read_meta

    meta = read_meta(dataset_dir)
    out = Path(out_dir).resolve()
    if (out / "best").exists() and not resume:
        raise UserError(f"{out} already holds a sweep; pass --resume to finish it or choose another --out")
    overrides = dict(overrides or {})
    t0 = time.time()
    candidates: dict[str, dict[str, Any]] = {}
    k = 10
    for family in families:
        print(f"== {family}", flush=True)
        sub = dataclasses.replace(tcfg, model=family)
        base = build_train_config(default_train_config(family), **overrides)
        k = base.eval_k
        fam_resume = resume and (out / family / "sweep").exists()
        space = (spaces or {}).get(family) or default_space(family)
        summary = run_sweep(dataset_dir, str(out / family), sub, base=base, space=space, resume=fam_resume)
        candidates[family] = {"dir": out / family / "best", "metrics": summary["best_metrics"],
                              "trials": summary["trials"], "best_trial": summary["best"]}
    try:
        check_ease_fits(int(meta["n_items"]))
        print("== ease (closed form)", flush=True)
        ease = fit_closed_form(dataset_dir, str(out / "ease"), default_train_config("ease"))
        candidates["ease"] = {"dir": out / "ease" / "model", "metrics": ease, "trials": 1, "best_trial": "ease"}
    except UserError as exc:  # a catalogue too large for EASE: the sweep goes on without it
        print(f"ease skipped: {exc}", flush=True)
    best = max(candidates, key=lambda f: candidates[f]["metrics"]["valid"][f"hr@{k}"])
    chosen = candidates[best]
    tmp = out / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(chosen["dir"], tmp)
    shutil.rmtree(out / "best", ignore_errors=True)
    os.replace(tmp, out / "best")
    table = {f: {"valid": c["metrics"]["valid"], "test": {m: c["metrics"]["test"][m] for m in
                                                           (f"hr@{k}", f"ndcg@{k}")},
                 "trials": c["trials"], "best_trial": c["best_trial"]} for f, c in candidates.items()}
    write_json(out / "best_metrics.json", chosen["metrics"] | {"auto": {"chosen": best, "families": table}})
    return {"best_family": best, "families": table, "best_dir": str(out / "best"),
            "best_metrics": chosen["metrics"], "seconds": time.time() - t0,
            "trials": sum(c["trials"] for c in candidates.values())}


def format_auto(summary: dict[str, Any], k: int = 10) -> str:
    """One row per family of an auto sweep: valid (what chose) and test (reported once), best marked."""
    lines = [f"{'family':<8} {'trials':>6} {'valid HR@' + str(k):>12} {'NDCG':>7} {'test HR@' + str(k):>11} "
             f"{'NDCG':>7}"]
    for fam, row in summary["families"].items():
        mark = "  <- best by valid" if fam == summary["best_family"] else ""
        lines.append(f"{fam:<8} {row['trials']:>6} {row['valid'][f'hr@{k}']:>12.4f} {row['valid'][f'ndcg@{k}']:>7.4f} "
                     f"{row['test'][f'hr@{k}']:>11.4f} {row['test'][f'ndcg@{k}']:>7.4f}{mark}")
    return "\n".join(lines)


def _search_alg(tcfg: TuneConfig, metric: str, max_concurrent: int) -> Any:
    """The searcher, seeded by --seed: Optuna's TPE, or Tune's variant generator for random and grid (whose
    random draws — tune.choice, distributions — follow `random_state`, so a rerun samples the same trials)."""
    if tcfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode="max", seed=tcfg.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=tcfg.seed)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def pick_best(rows: list[dict[str, Any]], where: Any = "the sweep") -> dict[str, Any]:
    """The row with the highest valid HR among trials that finished (status TERMINATED, ASHA stops included), have
    a finite valid score and a checkpoint. An errored trial (a worker raised, e.g. a non-finite training loss) is
    never picked, even if it reported good epochs first; NaN never wins. None eligible: one line (UserError)."""
    ok = [r for r in rows if r["status"] != "ERROR" and _finite(r["best_valid_hr"]) and r["checkpoint_path"]]
    if ok:
        return max(ok, key=lambda r: r["best_valid_hr"])
    errors = [r for r in rows if r["status"] == "ERROR"]
    if rows and len(errors) == len(rows):
        first = errors[0]
        raise UserError(f"all {len(rows)} trial(s) of {where} errored; first, trial {first['trial_id']}: "
                        f"{first['error'] or 'no message'} (see results.csv)")
    raise UserError(f"no trial of {where} finished with a finite valid score and a checkpoint "
                    f"({len(errors)} of {len(rows)} errored); see results.csv")


def _was_interrupted(handler_before: Any) -> bool:
    """Whether Ctrl-C (SIGINT) stopped the sweep. Tune swaps in its own SIGINT handler for the run and puts the
    previous one back only when a stop signal arrives, so finding the old handler again means "interrupted".
    That is Tune's private behaviour: the public count of unfinished trials is checked first and catches a stop
    that left trials pending or running; this catches one between trials (no trial left unfinished)."""
    if threading.current_thread() is not threading.main_thread() or os.getenv("TUNE_DISABLE_SIGINT_HANDLER") == "1":
        return False
    return signal.getsignal(signal.SIGINT) is handler_before


def _result_rows(grid: Any) -> list[dict[str, Any]]:
    from ncf_ray.train import STATE_FILE  # lazily, like the module's other train imports (torch, Ray Train)

    rows = []
    for res in grid:
        cfg = res.config or {}
        df = res.metrics_dataframe
        best_hr = best_ndcg = None
        epochs = 0
        if df is not None and len(df) and "best_valid_hr" in df:
            # Every report carries the best-so-far, so the last row is right even for a trial that a resumed
            # sweep restored after it had finished (it re-reports only its final row).
            best_hr, best_ndcg = float(df["best_valid_hr"].iloc[-1]), float(df["best_valid_ndcg"].iloc[-1])
            epochs = int(df["epoch"].max())
        last = res.metrics or {}
        trial_id = last.get("trial_id") or (Path(res.path).name if res.path else "")
        status = "ERROR" if res.error else "TERMINATED"
        # The trial's Ray Train run keeps one checkpoint (current + best-by-valid weights) under its name.
        ckpts = sorted(p for p in Path(cfg.get("__storage__", ".")).glob(f"trial_{trial_id}/checkpoint_*")
                       if (p / STATE_FILE).is_file())
        ckpt = str(ckpts[-1]) if ckpts else None
        rows.append({
            "trial_id": trial_id,
            "factors": cfg.get("factors"), "depth": cfg.get("depth"), "lr": cfg.get("lr"),
            "negatives": cfg.get("negatives"), "weight_decay": cfg.get("weight_decay"),
            "best_valid_hr": best_hr, "best_valid_ndcg": best_ndcg, "epochs": epochs,
            "seconds": float(last.get("time_total_s", 0.0) or 0.0), "status": status,
            "error": str(res.error).splitlines()[0][:300] if res.error else "", "checkpoint_path": ckpt,
            "config": cfg,
        })
    # Best first; errored trials and those without a finite score last (NaN would make the sort order arbitrary).
    rows.sort(key=lambda r: (r["status"] == "ERROR" or not _finite(r["best_valid_hr"]),
                             -r["best_valid_hr"] if _finite(r["best_valid_hr"]) else 0.0))
    return rows


CSV_COLUMNS = ["trial_id", "factors", "depth", "lr", "negatives", "weight_decay", "best_valid_hr",
               "best_valid_ndcg", "epochs", "seconds", "status", "error"]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with replacing(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _export_best(dataset_dir: str, out: Path, row: dict[str, Any], base: TrainConfig, model: str) -> dict[str, Any]:
    """Best trial (by valid HR only) -> SWEEP_DIR/best artifact; test metrics computed here, once."""
    from ncf_ray.train import finalize, load_state

    params = {k: v for k, v in row["config"].items() if not k.startswith("__")}
    cfg = trial_train_config(base, model, params)
    state = load_state(row["checkpoint_path"])
    return finalize(dataset_dir, out / "best", out / "best_metrics.json", cfg, state, row["seconds"])


def _plot(path: Path, rows: list[dict[str, Any]], popularity_hr: float | None, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    depths = sorted({r["depth"] for r in rows if r["depth"] is not None})
    for d in depths:
        pts = sorted((r["factors"], r["best_valid_hr"]) for r in rows if r["depth"] == d and r["best_valid_hr"] is not None)
        best_by_f: dict[int, float] = {}
        for f, hr in pts:
            best_by_f[f] = max(hr, best_by_f.get(f, -math.inf))
        if best_by_f:
            ax.plot(list(best_by_f), list(best_by_f.values()), marker="o", label=f"depth {d}")
    if popularity_hr is not None:
        ax.axhline(popularity_hr, color="grey", linestyle="--", label="popularity")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding size (factors)")
    ax.set_ylabel(f"best valid HR@{k}")
    ax.set_title("Sweep: valid HR by embedding size and MLP depth")
    ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def format_table(rows_csv: str, top: int = 10) -> str:
    with open(rows_csv) as f:
        rows = list(csv.DictReader(f))
    head = f"{'trial':<10} {'factors':>7} {'depth':>5} {'lr':>9} {'neg':>4} {'wd':>9} {'valid_hr':>9} {'ndcg':>7} {'ep':>3} {'status':<10}"
    lines = [head]
    for r in rows[:top]:
        def num(x: str, fmt: str) -> str:
            return format(float(x), fmt) if x not in ("", "None") else "-"
        lines.append(f"{r['trial_id']:<10} {r['factors']:>7} {r['depth']:>5} {num(r['lr'], '9.2e')} {r['negatives']:>4} "
                     f"{num(r['weight_decay'], '9.1e')} {num(r['best_valid_hr'], '9.4f')} {num(r['best_valid_ndcg'], '7.4f')} "
                     f"{r['epochs']:>3} {r['status']:<10}")
    return "\n".join(lines)
