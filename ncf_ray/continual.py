"""Continual learning: apply log partitions `date=YYYY-MM-DD/` one by one through update -> guard -> promote,
recording every step in a JSON state log that a restarted job resumes from.

    ray job submit --working-dir . -- python jobs/continual.py --model-dir M --watch DIR --state STATE.json \
        [--serve-address auto] [--models DIR] [--once] [--epochs 2 --replay 0.2 --tolerance 0.01]

For each partition not yet done, in name (= date) order:
1. update from the latest promoted model to MODELS/<partition> (default MODELS = STATE.json's dir / "models"),
   unless that artifact already exists — it was written atomically, so it is whole — and was made from the
   same parent: then it is reused, not retrained (a crash after the update lost only the later steps);
2. the guard (update.guard): promote when the child's holdout HR@K >= the parent's - tolerance; with
   --serve-address (or `serve=True`) the running app swaps to it (serve.swap_model, no dropped requests);
3. the partition is marked done ("promoted" or "rejected") only now. A rejected child is kept on disk for
   inspection; the next partition updates from the last promoted model.
Every update of a pass (and of a polling job's whole life) trains on one standing Ray Train worker group
(ncf_ray/standing.py), so the group's start is paid once, not per partition.
The state file is rewritten atomically after every step, so a kill at any point leaves a readable log, and no
partition is trained twice or applied twice. `--once` processes what is there and exits; otherwise the job polls
--watch every --poll-s seconds.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from ncf_ray.atomic import write_json
from ncf_ray.errors import UserError

PARTITION_RE = re.compile(r"^date=\d{4}-\d{2}-\d{2}$")
DONE = ("promoted", "rejected")
# Fault injection for the crash-resume test: a real SIGKILL of this process right after an update is recorded.
KILL_AFTER_UPDATE_ENV = "NCF_CONTINUAL_KILL_AFTER_UPDATE"


def partitions(watch: str | Path) -> list[Path]:
    """The `date=YYYY-MM-DD` subdirs of `watch`, oldest first."""
    root = Path(watch)
    if not root.is_dir():
        raise UserError(f"--watch {root} is not a directory")
    return sorted(p for p in root.iterdir() if p.is_dir() and PARTITION_RE.match(p.name))


def load_state(path: Path, model_dir: str) -> dict[str, Any]:
    """The state log, or a fresh one whose promoted model is `model_dir`."""
    import json

    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except ValueError as exc:
            raise UserError(f"--state {path} is not valid JSON ({exc}); move it aside to start afresh") from None
        if not isinstance(state, dict) or "promoted" not in state or "partitions" not in state:
            raise UserError(f"--state {path} is not a continual state log")
        return state
    return {"base_model": str(Path(model_dir).resolve()), "promoted": str(Path(model_dir).resolve()),
            "partitions": {}, "steps": []}


def _step(state: dict[str, Any], path: Path, partition: str, step: str, **info: Any) -> None:
    state["steps"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "partition": partition,
                           "step": step, **info})
    write_json(path, state)


def _reusable(artifact: Path, parent_version: str) -> bool:
    """An artifact already written for this partition from this parent (atomic writes: it exists whole or not)."""
    from ncf_ray.artifact import load_artifact

    if not artifact.is_dir():
        return False
    art = load_artifact(artifact)
    return (art.lineage or {}).get("parent_version") == parent_version


def process(watch: str | Path, state_path: str | Path, model_dir: str, models: str | Path | None = None,
            serve_address: str | None = None, serve: bool = False, tolerance: float = 0.01,
            update_args: dict[str, Any] | None = None, log: Any = print, runner: Any = None) -> dict[str, Any]:
    """One pass over the partitions not yet done (module docstring). Returns the state. `runner`: the standing
    worker group to train on (default: one for this pass, closed at its end)."""
    from ncf_ray.artifact import load_artifact
    from ncf_ray.standing import StandingTrainer

    state_path = Path(state_path).resolve()
    todo = partitions(watch)
    state = load_state(state_path, model_dir)
    load_artifact(state["promoted"])  # the model to start from must load before anything is written
    models_dir = Path(models).resolve() if models else state_path.parent / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    if runner is None:
        with StandingTrainer() as own:  # one worker group for every partition of this pass, started when needed
            for part in todo:
                _apply(part, state, state_path, models_dir, serve_address, serve, tolerance, update_args, log, own)
        return state
    for part in todo:
        _apply(part, state, state_path, models_dir, serve_address, serve, tolerance, update_args, log, runner)
    return state


def _apply(part: Path, state: dict[str, Any], state_path: Path, models_dir: Path, serve_address: str | None,
           serve: bool, tolerance: float, update_args: dict[str, Any] | None, log: Any, runner: Any) -> None:
    """One partition: update from the promoted model (or reuse the artifact a crashed run left), guard, promote."""
    from ncf_ray.artifact import load_artifact
    from ncf_ray.update import guard, run_update

    name = part.name
    entry = state["partitions"].get(name, {})
    if entry.get("status") in DONE:
        return
    parent = load_artifact(state["promoted"])
    artifact = models_dir / name
    if _reusable(artifact, parent.model_version):
        if entry.get("status") != "updated":
            entry = {"status": "updated", "artifact": str(artifact)}
        _step(state, state_path, name, "reuse", artifact=str(artifact))
    else:
        if artifact.exists():
            raise UserError(f"{artifact} exists but was not made from the promoted model "
                            f"{parent.model_version}; move it aside")
        res = run_update(parent.path, str(part), artifact, log=log, runner=runner, **(update_args or {}))
        entry = {"status": "updated", "artifact": str(artifact), "model_version": res["model_version"]}
        state["partitions"][name] = entry
        _step(state, state_path, name, "update", model_version=res["model_version"],
              parent_version=parent.model_version, window=res["lineage"]["data_window"])
        if os.environ.get(KILL_AFTER_UPDATE_ENV):
            os.kill(os.getpid(), signal.SIGKILL)
    child = load_artifact(artifact)
    ok, why = guard(child.metrics, tolerance)
    entry = {**entry, "model_version": child.model_version, "guard": why}
    if ok:
        if serve or serve_address:
            from ncf_ray.serve import swap_model

            swap_model(str(artifact), serve_address)
        state["promoted"] = str(artifact)
        entry["status"] = "promoted"
    else:
        entry["status"] = "rejected"
    state["partitions"][name] = entry
    _step(state, state_path, name, entry["status"], model_version=child.model_version, guard=why)
    log(f"{name}: {entry['status']} {child.model_version} ({why})")


def watch_forever(poll_s: float, **kwargs: Any) -> None:
    """`process` every `poll_s` seconds until interrupted, on one standing worker group throughout."""
    from ncf_ray.standing import StandingTrainer

    with StandingTrainer() as runner:
        while True:
            process(**kwargs, runner=runner)
            time.sleep(poll_s)
